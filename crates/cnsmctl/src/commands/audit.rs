//! `audit export`: regenerates the committed part of the audit log from the store's history,
//! the same lines (byte for byte) the server's audit writer produced.

use clap::{Args, Subcommand};
use cnsm_runtime::audit::{AuditSince, export_committed};
use cnsm_store::embedded::EmbeddedStore;

use super::Context;
use crate::error::CliError;
use crate::output::Out;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the ECS JSON line of every committed transition, in commit order
    #[command(after_help = "Examples:\n  \
        cnsmctl audit export > audit.jsonl\n  \
        cnsmctl audit export --since 2026-11-27T10:00:00Z\n  \
        cnsmctl audit export --since 1200        # after commit position 1200 (event.sequence)\n\n\
        cnsmctl --server http://127.0.0.1:8080 audit export --since 1200\n\n\
        Works on the embedded store in --data-dir (stop the server first), or, with --server, \
        through the running server (role admin on every namespace). Rejected attempts are \
        written only by a running server's live sink (--audit-log) and are not regenerated.")]
    Export(AuditExportArgs),
}

#[derive(Debug, Args)]
pub struct AuditExportArgs {
    /// Only records at or after this RFC 3339 UTC time (or a date), or, given a number, after
    /// that commit position (`event.sequence`)
    #[arg(long, value_name = "TIME|SEQ")]
    pub since: Option<String>,
}

pub async fn run(context: &Context, command: &AuditCommand, out: &mut Out) -> Result<(), CliError> {
    let AuditCommand::Export(args) = command;
    let since = AuditSince::parse(args.since.as_deref())
        .map_err(|e| CliError::invalid(format!("--{e}")))?;
    if let Some(url) = &context.server {
        let remote =
            crate::remote::Remote::new(url, context.token.as_deref(), context.ca_cert.as_deref())?;
        let mut lines = LineWriter {
            out,
            pending: Vec::new(),
        };
        remote
            .audit_export(args.since.as_deref(), &mut lines)
            .await?;
        return lines.finish();
    }
    if !context
        .data_dir
        .join(cnsm_store::embedded::FILE_NAME)
        .exists()
    {
        return Err(CliError::not_found(format!(
            "no store in {}",
            context.data_dir.display()
        )));
    }
    let store = EmbeddedStore::open(&context.data_dir)?;
    export_committed(&store, since, &mut |lines| {
        for line in lines {
            out.line(line);
        }
        true
    })
    .map_err(CliError::unavailable)?;
    store.close()?;
    Ok(())
}

/// Prints the streamed ND-JSON body line by line (a chunk may end inside a line, or inside a
/// UTF-8 sequence).
struct LineWriter<'a> {
    out: &'a mut Out,
    pending: Vec<u8>,
}

impl LineWriter<'_> {
    fn finish(self) -> Result<(), CliError> {
        if self.pending.is_empty() {
            Ok(())
        } else {
            Err(CliError::unavailable(
                "the server's audit stream ended inside a line",
            ))
        }
    }
}

impl std::io::Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if let Some(end) = self.pending.iter().rposition(|b| *b == b'\n') {
            let rest = self.pending.split_off(end + 1);
            let complete = std::mem::replace(&mut self.pending, rest);
            self.out.text(String::from_utf8_lossy(&complete));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
