//! `keys generate` and `snapshot export|verify|import`: signed portable snapshots
//! (`docs/snapshots.md`). Signing and signature checks happen here, in the client, with the
//! key files given; the deployment (local store or `--server`) exports and imports payloads.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use cnsm_snapshot::files::{SignedOutput, SnapshotPaths, verify_file};
use cnsm_snapshot::{PublicKey, Selection, SigningKey, VerifyError};

use crate::api::{Access, Api, Connection};
use crate::commands::{Context, parse_labels};
use crate::error::{CliError, EXIT_OK};
use crate::output::Out;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate an ECDSA P-256 signing key (PKCS#8 PEM) and its public key (PEM)
    #[command(after_help = "Examples:\n  \
            cnsmctl keys generate --out signing-key.pem   # also writes signing-key.pub.pem\n\n\
            The private key file is created with mode 0600; an existing file is kept unless \
            --force.")]
    Generate(KeysGenerateArgs),
}

#[derive(Debug, Args)]
pub struct KeysGenerateArgs {
    /// Where to write the private key; the public key goes beside it as NAME.pub.pem
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Overwrite existing key files
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Export instances with their full history as a signed snapshot
    #[command(
        long_about = "Export instances of a namespace (-n) with their full hash-chained history, \
            pending timers, live idempotency keys and the definition revisions they pin, as \
            deterministic CBOR signed into a Sigstore bundle (ECDSA P-256). The export time is \
            fixed when it starts, so exporting an unchanged store twice gives the same payload. \
            Without --bundle the file holds a `cnsm-snapshot v1` line, the bundle JSON line and \
            the payload; with --bundle FILE the output is the bare CBOR payload and the bundle \
            goes to FILE (the layout standard Sigstore verifiers take).",
        after_help = "Examples:\n  \
            cnsmctl -n shop snapshot export --all --key signing-key.pem -o shop.snapshot\n  \
            cnsmctl -n shop snapshot export --instance o-1 --key signing-key.pem -o o-1.snapshot\n  \
            cnsmctl -n shop snapshot export -l tier=gold --key k.pem -o gold.cbor --bundle gold.sigstore.json"
    )]
    Export(ExportArgs),
    /// Verify a snapshot against a public key (nothing is imported)
    #[command(
        long_about = "Verify a snapshot, in this order, stopping at the first failure: bundle \
            structure and media type, payload digest, signature against --public-key, CBOR \
            determinism and format version, each instance's hash chain and version continuity, \
            every definition's content hash. Exit code 1 names the failed step.",
        after_help = "Examples:\n  \
            cnsmctl snapshot verify shop.snapshot --public-key signing-key.pub.pem\n  \
            cnsmctl snapshot verify gold.cbor --bundle gold.sigstore.json --public-key k.pub.pem"
    )]
    Verify(VerifyArgs),
    /// Verify a snapshot and import it, all or nothing
    #[command(
        long_about = "Verify a snapshot (as `snapshot verify`) and import its definitions and \
            instances in one durable transaction: history, data, timers (absolute due times: a \
            timer that fell due in transit fires right after the import) and idempotency keys. \
            An instance that already exists refuses the whole import (exit 4, nothing changes) \
            unless --replace. Everything in the snapshot must belong to -n.",
        after_help = "Examples:\n  \
            cnsmctl --data-dir other-cluster -n shop snapshot import shop.snapshot --public-key signing-key.pub.pem\n  \
            cnsmctl --server http://127.0.0.1:8080 -n shop snapshot import shop.snapshot --public-key k.pub.pem --replace"
    )]
    Import(ImportArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("selection").required(true).args(["all", "instance", "selector"])))]
pub struct ExportArgs {
    /// Every instance of the namespace
    #[arg(long)]
    pub all: bool,
    /// One instance
    #[arg(long, value_name = "ID")]
    pub instance: Option<String>,
    /// Instances whose labels match (key=value, comma-separated or repeated)
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    pub selector: Vec<String>,
    /// The private key (PKCS#8 PEM, from `keys generate`)
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The snapshot file to write
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Write the Sigstore bundle JSON to this file and the bare payload to --output
    #[arg(long, value_name = "FILE")]
    pub bundle: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The snapshot file (or the bare payload with --bundle)
    pub file: PathBuf,
    /// The signer's public key (PEM)
    #[arg(long, value_name = "FILE")]
    pub public_key: PathBuf,
    /// The detached Sigstore bundle JSON
    #[arg(long, value_name = "FILE")]
    pub bundle: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub verify: VerifyArgs,
    /// Replace instances that already exist instead of refusing the import
    #[arg(long)]
    pub replace: bool,
}

/// `keys generate`.
pub fn keys_generate(args: &KeysGenerateArgs, out: &mut Out) -> Result<u8, CliError> {
    let public_path = public_key_path(&args.out);
    for path in [&args.out, &public_path] {
        if path.exists() && !args.force {
            return Err(CliError::conflict(format!(
                "{} exists; pass --force to overwrite it",
                path.display()
            )));
        }
    }
    let key = SigningKey::generate().map_err(|e| CliError::unavailable(e.to_string()))?;
    write_file(&args.out, key.to_pem().as_bytes(), true)?;
    let public = key.public_key();
    write_file(&public_path, public.to_pem().as_bytes(), false)?;
    out.line(format_args!(
        "private key {} (keep it secret), public key {} (hint {})",
        args.out.display(),
        public_path.display(),
        &public.hint()[..16]
    ));
    Ok(EXIT_OK)
}

/// `snapshot export`.
pub async fn export(context: &Context, args: &ExportArgs, out: &mut Out) -> Result<u8, CliError> {
    let selection = match (&args.instance, args.selector.is_empty()) {
        (Some(id), _) => Selection::Instance(id.clone()),
        (None, false) => Selection::Labels(parse_labels("-l", &args.selector)?),
        (None, true) => Selection::All,
    };
    let key = SigningKey::from_pem(&read_text(&args.key)?)
        .map_err(|e| CliError::invalid(format!("--key {}: {e}", args.key.display())))?;
    let api = context.connect_for_snapshot(Access::ReadOnly)?;
    let cannot_write = |e: &dyn std::fmt::Display| {
        CliError::invalid(format!("cannot write {}: {e}", args.output.display()))
    };
    // The payload streams to a temporary file beside the output (removed if anything fails),
    // is checked on a second thread as it passes, then signed by its digest and put in place.
    let mut output =
        SignedOutput::create(&args.output, args.bundle.as_deref()).map_err(|e| cannot_write(&e))?;
    output.check_while_writing().map_err(|e| cannot_write(&e))?;
    let mut progress = Progress::new("exporting");
    api.export_snapshot(
        &context.namespace,
        &selection,
        output.writer(),
        &mut |d, t| progress.show(d, t),
    )
    .await?;
    progress.done();
    drop(api);
    let summary = match output.checked() {
        Some(checked) => checked,
        None => cnsm_snapshot::verify_payload_from(
            output.payload().map_err(|e| cannot_write(&e))?,
            &mut |_, _| {},
        ),
    }
    .map_err(|e| CliError::unavailable(format!("the exported payload does not verify: {e}")))?;
    output.finish(&key).map_err(|e| cannot_write(&e))?;
    out.line(format_args!(
        "snapshot {}: {} instance(s), {} record(s), {} definition revision(s), {} bytes, signed by key {}",
        args.output.display(),
        summary.n_instances,
        summary.n_records,
        summary.n_definitions,
        summary.payload_len,
        &key.public_key().hint()[..16]
    ));
    Ok(EXIT_OK)
}

/// `snapshot verify`.
pub fn verify(args: &VerifyArgs, out: &mut Out) -> Result<u8, CliError> {
    let (paths, public) = open_snapshot(args)?;
    let mut progress = Progress::new("verifying");
    let summary =
        verify_file(&paths, &public, &mut |d, t| progress.show(d, t)).map_err(rejected)?;
    progress.done();
    out.line(format_args!(
        "VERIFIED {}: {} instance(s), {} record(s), {} definition revision(s), as of {}, key {}",
        args.file.display(),
        summary.n_instances,
        summary.n_records,
        summary.n_definitions,
        crate::output::rfc3339_ms(summary.as_of_ms),
        &summary.key_hint[..16]
    ));
    Ok(EXIT_OK)
}

/// `snapshot import`. Into a local store: one streaming pass over the file that decodes,
/// checks (steps 4-6) and hashes it while the store writes, with digest and signature (steps
/// 2-3) checked at its end before the store commits, all or nothing. Through a server: verified
/// here first (two streaming passes), then uploaded; the server checks steps 4-6 again. A
/// refused import is then verified in full, so the error names the first failing step as
/// `snapshot verify` would.
pub async fn import(context: &Context, args: &ImportArgs, out: &mut Out) -> Result<u8, CliError> {
    let (paths, public) = open_snapshot(&args.verify)?;
    let as_of_ms = match payload_as_of_ms(&paths) {
        Ok(as_of_ms) => as_of_ms,
        Err(error) => {
            verify_file(&paths, &public, &mut |_, _| {}).map_err(rejected)?;
            return Err(rejected(error));
        }
    };
    let api = context.connect_for_snapshot(Access::Mutating)?;
    if let Connection::Remote(_) = api {
        verify_file(&paths, &public, &mut |_, _| {}).map_err(rejected)?;
    }
    let mut progress = Progress::new("importing");
    let imported = api
        .import_snapshot(
            &context.namespace,
            &paths,
            &public,
            args.replace,
            Box::new(move |d, t| {
                progress.show(d, t);
                if d == t {
                    progress.done();
                }
            }),
        )
        .await;
    let report = match imported {
        Ok(report) => report,
        Err(error) => {
            drop(api);
            verify_file(&paths, &public, &mut |_, _| {}).map_err(rejected)?;
            return Err(error);
        }
    };
    out.line(format_args!(
        "imported {}: {} instance(s) ({} replaced), {} record(s), {} new definition revision(s), {} timer(s); snapshot as of {}",
        args.verify.file.display(),
        report.n_instances,
        report.n_replaced,
        report.n_records,
        report.n_definitions_created,
        report.n_timers,
        crate::output::rfc3339_ms(as_of_ms),
    ));
    Ok(EXIT_OK)
}

/// The `asOf` of a snapshot payload, read from its head (a rejected head fails at step 4).
fn payload_as_of_ms(paths: &SnapshotPaths) -> Result<u64, VerifyError> {
    let reader = cnsm_core::snapshot::SnapshotReader::from_reader(paths.payload()?)?;
    Ok(reader.as_of_ms())
}

/// A rejected snapshot: exit 1, naming the step that failed.
fn rejected(error: VerifyError) -> CliError {
    let step = match &error {
        VerifyError::Bundle(_) => "1 (bundle)",
        VerifyError::Digest { .. } => "2 (digest)",
        VerifyError::Signature(_) => "3 (signature)",
        VerifyError::Encoding(_) | VerifyError::Format(_) => "4 (encoding)",
        VerifyError::Chain(_) => "5 (hash chain)",
        VerifyError::Definition(_) => "6 (definition)",
        VerifyError::Io(detail) => return CliError::invalid(detail.clone()),
        _ => "?",
    };
    CliError::invalid(format!("snapshot rejected at step {step}: {error}"))
}

fn open_snapshot(args: &VerifyArgs) -> Result<(SnapshotPaths, PublicKey), CliError> {
    let public = PublicKey::from_pem(&read_text(&args.public_key)?).map_err(|e| {
        CliError::invalid(format!("--public-key {}: {e}", args.public_key.display()))
    })?;
    let paths = SnapshotPaths::open(&args.file, args.bundle.as_deref()).map_err(rejected)?;
    Ok((paths, public))
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path)
        .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", path.display())))
}

fn read_text(path: &Path) -> Result<String, CliError> {
    String::from_utf8(read_bytes(path)?)
        .map_err(|_| CliError::invalid(format!("{} is not text", path.display())))
}

/// `signing-key.pem` -> `signing-key.pub.pem`; any other name gets `.pub.pem` appended.
fn public_key_path(private: &Path) -> PathBuf {
    let name = private
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let public = match name.strip_suffix(".pem") {
        Some(stem) => format!("{stem}.pub.pem"),
        None => format!("{name}.pub.pem"),
    };
    private.with_file_name(public)
}

/// Writes a file durably and atomically: a temporary file beside it, fsync, rename.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CliError> {
    let fail =
        |e: std::io::Error| CliError::invalid(format!("cannot write {}: {e}", path.display()));
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&temporary).map_err(fail)?;
    file.write_all(bytes).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(fail)?;
    Ok(())
}

/// Progress on stderr: a one-line bar when stderr is a terminal, otherwise a count line at
/// each tenth of the way (for logs).
struct Progress {
    label: &'static str,
    terminal: bool,
    shown: bool,
    next_line_at: u64,
}

impl Progress {
    fn new(label: &'static str) -> Progress {
        Progress {
            label,
            terminal: std::io::stderr().is_terminal(),
            shown: false,
            next_line_at: 0,
        }
    }

    fn show(&mut self, done: u64, total: u64) {
        if total == 0 {
            return;
        }
        if !self.terminal {
            if done >= self.next_line_at {
                eprintln!("{}: {done}/{total} instances", self.label);
                self.next_line_at = done + total.div_ceil(10).max(1);
            }
            return;
        }
        let width = 30u64;
        let filled = (done.min(total) * width / total) as usize;
        eprint!(
            "\r{} [{}{}] {done}/{total} instances",
            self.label,
            "#".repeat(filled),
            " ".repeat(width as usize - filled)
        );
        self.shown = true;
    }

    fn done(&mut self) {
        if self.shown {
            eprintln!();
            self.shown = false;
        }
    }
}
