//! `audit export`: regenerates the committed part of the audit log from the store's history,
//! the same lines (byte for byte) the server's audit writer produced.

use clap::{Args, Subcommand};
use cnsm_runtime::audit::{committed_line, parse_rfc3339_ms};
use cnsm_store::Store;
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
        Works on the embedded store in --data-dir (stop the server first). Rejected attempts \
        are written only by a running server's live sink (--audit-log) and are not regenerated.")]
    Export(AuditExportArgs),
}

#[derive(Debug, Args)]
pub struct AuditExportArgs {
    /// Only records at or after this RFC 3339 UTC time (or a date), or, given a number, after
    /// that commit position (`event.sequence`)
    #[arg(long, value_name = "TIME|SEQ")]
    pub since: Option<String>,
}

enum Since {
    All,
    Time(u64),
    After(u64),
}

pub fn run(context: &Context, command: &AuditCommand, out: &mut Out) -> Result<(), CliError> {
    let AuditCommand::Export(args) = command;
    if context.server.is_some() {
        return Err(CliError::invalid(
            "audit export reads the store in --data-dir; it does not take --server",
        ));
    }
    let since = match args.since.as_deref() {
        None => Since::All,
        Some(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            Since::After(text.parse().map_err(|_| {
                CliError::invalid(format!("--since '{text}' is too large a commit position"))
            })?)
        }
        Some(text) => Since::Time(parse_rfc3339_ms(text).ok_or_else(|| {
            CliError::invalid(format!(
                "--since '{text}' is neither an RFC 3339 UTC time (2026-11-27T10:00:00Z) nor a commit position"
            ))
        })?),
    };
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
    let mut cursor = match since {
        Since::After(seq) => seq,
        _ => 0,
    };
    loop {
        let page = store.records_after(cursor, cnsm_store::PAGE_LEN_MAX)?;
        let Some((last, _)) = page.last() else { break };
        let last = *last;
        for (seq, sealed) in &page {
            if let Since::Time(from_ms) = since {
                let record = cnsm_core::record::decode_record(sealed.version, &sealed.bytes)
                    .map_err(|e| CliError::unavailable(format!("commit position {seq}: {e}")))?;
                if record.time_ms < from_ms {
                    continue;
                }
            }
            let line = committed_line(*seq, sealed).map_err(CliError::unavailable)?;
            out.line(line);
        }
        cursor = last;
    }
    store.close()?;
    Ok(())
}
