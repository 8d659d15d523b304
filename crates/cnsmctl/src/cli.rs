//! The command line: every command, flag and help text of `cnsmctl`, as clap derive types.
//!
//! Nothing here runs anything; [`crate::commands`] turns a parsed [`Cli`] into calls on
//! [`crate::api::Api`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The root help's epilogue: exit codes scripts can rely on, and a first session.
pub const ROOT_AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  invalid input: a definition that fails admission, malformed --data/--payload JSON,
     a file that cannot be read, store verification problems; with --server also a
     missing, unknown or insufficient --token (Unauthorized, Forbidden)
  2  usage error (unknown flag, missing argument)
  3  not found (machine, revision or instance)
  4  rejected: TransitionFailure, StaleState, RaceCondition, Locked, or a conflict
     (instance exists, idempotency key reused with another payload, machine still in use)
  5  store unavailable: locked by another process, unreadable, or too new for this binary;
     with --server also: the server cannot be reached or answers 503

Errors are one line on stderr: `error: <ErrorType>: <message>`.

First steps:
  cnsmctl demo                                   # a complete tour on a throw-away store
  cnsmctl validate -f order.yaml
  cnsmctl apply -f order.yaml
  cnsmctl -n shop create instance order-processing --id o-1 --data '{\"total\": 40}'
  cnsmctl -n shop send o-1 complete
  cnsmctl -n shop get instances -o wide
  cnsmctl -n shop history o-1
  cnsmctl serve                                  # the HTTP API on http://127.0.0.1:8080
  cnsmctl --server http://127.0.0.1:8080 get instances -A";

/// cnsmctl: run and inspect cnsm state machines, kubectl style.
#[derive(Debug, Parser)]
#[command(
    name = "cnsmctl",
    version,
    about = "Run and inspect cnsm state machines (kubectl habits, embedded store)",
    long_about = "Run and inspect cnsm state machines.\n\n\
        A StateMachine (statemachine.cn/v1alpha1) is a versioned YAML definition: `apply` stores it \
        as a numbered revision. An instance is one running copy of a machine in a namespace, with a \
        current state, JSON data and a version (0 at creation, +1 per committed transition). \
        `send` delivers an event; every committed transition is a hash-chained history record \
        (`history`).\n\n\
        cnsmctl works on the embedded store in --data-dir; no server or setup is needed. \
        `cnsmctl serve` runs the HTTP API on that store, and --server URL (or CNSM_SERVER) makes \
        every command go through a running server instead.",
    after_help = ROOT_AFTER_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// Directory of the embedded store [default: ./cnsm-data]
    #[arg(long, global = true, env = "CNSM_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Namespace of the machines and instances a command works on
    #[arg(
        short = 'n',
        long,
        global = true,
        env = "CNSM_NAMESPACE",
        default_value = "default",
        value_name = "NS"
    )]
    pub namespace: String,

    /// A PostgreSQL store (postgres://USER@HOST:PORT/DB) instead of the embedded store in
    /// --data-dir; several `serve` nodes can share it (see docs/postgres.md)
    #[arg(
        long,
        global = true,
        env = "CNSM_STORE",
        value_name = "URL",
        hide_env_values = true
    )]
    pub store: Option<String>,

    /// Talk to a running `cnsmctl serve` (http://HOST:PORT or https://HOST:PORT) instead of
    /// the embedded store
    #[arg(long, global = true, env = "CNSM_SERVER", value_name = "URL")]
    pub server: Option<String>,

    /// Bearer token sent to --server (a server started with --auth-file needs one)
    #[arg(
        long,
        global = true,
        env = "CNSM_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// PEM certificate(s) trusted for an https --server: its CA, or its self-signed
    /// certificate (system roots are not used)
    #[arg(long, global = true, env = "CNSM_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// flagd flag file for `flag:` gates (docs/flags.md): evaluated by `serve` and local
    /// commands, reloaded when it changes; `validate` warns on flag keys it does not define
    #[arg(long, global = true, env = "CNSM_FLAGS", value_name = "FILE")]
    pub flags: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// Every top-level command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check StateMachine files without storing anything
    #[command(
        long_about = "Check StateMachine files without storing anything.\n\n\
            Runs admission, the same checks `apply` runs: every problem of every file is printed \
            as `FILE:LINE:COLUMN: error[code]: message (at path)`. Warnings (unreachable states, \
            shadowed transitions...) go to stderr and do not fail the command.",
        after_help = "Examples:\n  \
            cnsmctl validate -f order.yaml\n  \
            cnsmctl validate -f a.yaml -f b.yaml\n  \
            cat order.yaml | cnsmctl validate -f -\n\n\
            Exit code 1 when any file has an error, 0 otherwise."
    )]
    Validate(ValidateArgs),

    /// Store StateMachine definitions (a new revision when the content changed)
    #[command(
        long_about = "Store StateMachine definitions.\n\n\
            Each file is admitted first; if any has an error nothing is stored. A definition whose \
            content equals the latest revision is left `unchanged`; otherwise it becomes a new \
            revision, which new instances get. Running instances keep the revision they were \
            created with.\n\n\
            Namespace: the file's metadata.namespace, else -n. When both are given and differ \
            the command fails (as kubectl does).",
        after_help = "Examples:\n  \
            cnsmctl apply -f order.yaml\n  \
            # statemachine.statemachine.cn/order-processing created (revision 1)\n  \
            cnsmctl apply -f order.yaml\n  \
            # statemachine.statemachine.cn/order-processing unchanged (revision 1)\n  \
            cnsmctl -n staging apply -f provisioning.yaml"
    )]
    Apply(ApplyArgs),

    /// List or show machines and instances
    #[command(subcommand)]
    Get(GetCommand),

    /// Show a machine or an instance in detail
    #[command(subcommand)]
    Describe(DescribeCommand),

    /// Create an instance of a machine
    #[command(subcommand)]
    Create(CreateCommand),

    /// Send an event to an instance
    #[command(
        long_about = "Send an event to an instance.\n\n\
            The event is applied atomically: the first matching transition of the current state \
            wins, its `assign` updates the data, and one history record is committed before the \
            answer. An event with no matching transition is refused with TransitionFailure \
            (exit 4) and changes nothing.\n\n\
            --expected-version makes the send a compare-and-swap: it fails with StaleState \
            (exit 4) unless the instance is at that version. --idempotency-key makes retries \
            safe: a repeated key returns the original result without applying the event again; \
            the same key with another payload is a Conflict (exit 4).",
        after_help = "Examples:\n  \
            cnsmctl -n shop send o-1 complete\n  \
            # instance/o-1: created -> validated (version 1)\n  \
            cnsmctl -n shop send o-1 pay --payload '{\"amount\": 40}' --expected-version 1 --idempotency-key k1\n  \
            cnsmctl -n shop send o-1 ship -o json"
    )]
    Send(SendArgs),

    /// Operator control: end an instance cancelled (its compensations run first)
    #[command(
        long_about = "Cancel an instance: it ends with status cancelled. If it has completed \
            steps with compensations, those run first (the instance is compensating until the \
            stack is empty, then ends cancelled). Written as one history record with the acting \
            subject and --reason. Refused (TransitionFailure, exit 4) once the instance has ended.",
        after_help = "Examples:\n  \
            cnsmctl -n shop cancel o-1 --reason \"customer request\"\n  \
            cnsmctl --server http://127.0.0.1:8080 -n shop cancel o-1 -o json"
    )]
    Cancel(ControlArgs),

    /// Operator control: hold an instance (events refused, timers held)
    #[command(
        long_about = "Suspend an instance: events are refused with TransitionFailure until it is \
            resumed, and its timer does not fire (a timer that falls due meanwhile fires right \
            after resume). Written as one history record with the acting subject.",
        after_help = "Examples:\n  cnsmctl -n shop suspend o-1\n  cnsmctl -n shop resume o-1"
    )]
    Suspend(ControlArgs),

    /// Operator control: release a suspended instance (an overdue timer fires right after)
    Resume(ControlArgs),

    /// Operator control: a failed instance re-enters the state where it failed
    #[command(
        long_about = "Redrive a failed instance: it re-enters the state it failed in as a fresh \
            entry (attempt 1, a new timeout, compensations and failure reason cleared) and is \
            active again. Refused (exit 4) for an instance that did not fail, or that failed by \
            reaching a final state. The history chain continues: nothing is rewritten.",
        after_help = "Examples:\n  cnsmctl -n shop redrive o-9"
    )]
    Redrive(ControlArgs),

    /// Erase personal data from an instance's data and history; the hash chain stays verifiable
    #[command(
        long_about = "Erase personal data from an instance: the values of its data, of every \
            record's data and of every event payload become \"[erased]\" (keys stay), or with \
            --field only the values at those dotted paths (repeatable). One `erasure` record \
            lists the redacted records with their original and redacted hashes, so `store verify` \
            stays green; everything else (states, events, versions, actors, times) stays. \
            Allowed in any status. Exported snapshots, backups and delivered notifications \
            taken before are not reached (docs/operations.md).",
        after_help = "Examples:\n  \
            cnsmctl -n shop erase o-1 --reason \"GDPR request 4711\"\n  \
            cnsmctl -n shop erase o-1 --field customer.email --field address.zip\n  \
            cnsmctl --server http://127.0.0.1:8080 -n shop erase o-1 -o json"
    )]
    Erase(EraseArgs),

    /// Show the hash-chained history of an instance
    #[command(
        long_about = "Show the history of an instance.\n\n\
            Record N is version N; record 0 is the genesis (creation). Each record holds the hash \
            of the previous one (prevHash) and has its own hash, so any edit, gap or reorder is \
            detectable (`cnsmctl store verify`).",
        after_help = "Examples:\n  \
            cnsmctl -n shop history o-1\n  \
            cnsmctl -n shop history o-1 --from 2 --limit 10\n  \
            cnsmctl -n shop history o-1 -o json   # every record with prevHash and hash"
    )]
    History(HistoryArgs),

    /// Draw a machine as a Mermaid or Graphviz DOT state diagram
    #[command(after_help = "Examples:\n  \
            cnsmctl -n shop graph order-processing                 # Mermaid (paste into Markdown)\n  \
            cnsmctl -n shop graph order-processing --format dot | dot -Tsvg > order.svg\n  \
            cnsmctl -n shop graph order-processing --revision 1")]
    Graph(GraphArgs),

    /// Route new instances between revisions: status, set a canary weight, promote, abort
    #[command(subcommand)]
    Rollout(RolloutCommand),

    /// Compare two revisions of a machine: states and transitions added, removed, changed
    #[command(after_help = "Examples:\n  \
            cnsmctl -n shop diff order-processing 1 2\n  \
            cnsmctl -n shop diff order-processing 1 2 -o json")]
    Diff(DiffArgs),

    /// Move running instances to another revision under a StateMigrationPolicy
    #[command(
        args_conflicts_with_subcommands = true,
        long_about = "Migrate the active instances of a machine from one revision to another \
            under a StateMigrationPolicy (kind: StateMigrationPolicy; see docs/migration.md): a \
            state mapping, data defaults and CEL transforms, and states from which migration is \
            refused.\n\n\
            --dry-run reports per instance what would happen and changes nothing. A real run \
            works in chunks: `pre` locks each instance of the chunk (events get Locked, 423, \
            naming the migration; the lock is a lease of lockSeconds), then `post` writes one \
            migration record per instance (new revision, data changes, timers re-armed under \
            the new revision's timeouts) and lifts the lock. --phase pre|post runs one phase \
            alone. A run that stopped (crash, kill) is resumed by running it again: migrated \
            instances are at the new revision and are skipped; locked ones are completed. \
            `migrate rollback` moves the instances this policy migrated back where the reverse \
            mapping exists.",
        after_help = "Examples:\n  \
            cnsmctl -n shop migrate order-processing --from 1 --to 2 --policy migration.yaml --dry-run\n  \
            cnsmctl -n shop migrate order-processing --from 1 --to 2 --policy migration.yaml\n  \
            cnsmctl -n shop migrate rollback order-processing --from 1 --to 2 --policy migration.yaml"
    )]
    Migrate(MigrateCommand),

    /// Delete a machine (every revision)
    #[command(subcommand)]
    Delete(DeleteCommand),

    /// Check or maintain the embedded store
    #[command(subcommand)]
    Store(StoreCommand),

    /// Generate signing keys for snapshots
    #[command(subcommand)]
    Keys(crate::commands::snapshot::KeysCommand),

    /// Export, verify and import signed portable snapshots (docs/snapshots.md)
    #[command(subcommand)]
    Snapshot(crate::commands::snapshot::SnapshotCommand),

    /// Run the HTTP API on the embedded store in --data-dir
    #[command(
        long_about = "Run the HTTP API (statemachine.cn/v1alpha1) on the embedded store in --data-dir.\n\n\
            Routes live under /apis/statemachine.cn/v1alpha1/namespaces/{ns}/: statemachines, \
            instances, instances/{id}/events (JSON or CloudEvents 1.0), instances/{id}/history, \
            and ?watch=true streams (Server-Sent Events). Health: /health/livez, /health/readyz, \
            /health/statez; diagnostics: /debug/statemachine. See docs/api.md.\n\n\
            Without --auth-file the server listens on loopback only (unless --insecure) and \
            everyone may do everything. With --auth-file every /apis and /debug request needs \
            `Authorization: Bearer <token>` whose roles (reader, writer, admin per namespace or \
            \"*\") cover it, and any address may be served. With --tls-cert and --tls-key \
            (PEM files) it serves HTTPS only (rustls); clients then pass --ca-cert. The OpenAPI \
            document is at \
            /openapi.json. SIGTERM or Ctrl-C stops accepting, drains in-flight requests, flushes \
            the group commit and exits 0.",
        after_help = "Examples:\n  \
            cnsmctl serve                                   # http://127.0.0.1:8080, store in ./cnsm-data\n  \
            cnsmctl --data-dir /var/lib/cnsm serve --listen 127.0.0.1:9000\n  \
            cnsmctl serve --listen 0.0.0.0:8080 --auth-file tokens.yaml\n  \
            cnsmctl serve --tls-cert cert.pem --tls-key key.pem   # https://127.0.0.1:8080\n  \
            cnsmctl --server https://127.0.0.1:8080 --ca-cert cert.pem get instances -A\n  \
            CNSM_TOKEN=... cnsmctl --server http://host:8080 -n shop get instances\n  \
            cnsmctl --server http://127.0.0.1:8080 get instances -A"
    )]
    Serve(ServeArgs),

    /// The audit log (ECS JSON lines) of committed transitions
    #[command(subcommand)]
    Audit(crate::commands::audit::AuditCommand),

    /// Push delivery: each notify target's cursor and lease, the dead letters, and their redrive
    #[command(
        long_about = "Push delivery: each notify target's cursor and lease, and the dead letters.\n\n\
            A machine's notify targets receive a signed CloudEvent per matching committed \
            transition, at least once, in order per instance. CURSOR is the commit position \
            below which every matching record was delivered or dead-lettered; HELD-BY is the \
            node delivering the target (its lease ends at LEASE-UNTIL). A dead letter is a \
            record the target gave up on after maxAttempts (or that the receiver refused with a \
            4xx); POSITION is its commit position, REDRIVE shows a pending redrive and who \
            asked. `deliveries redrive` sends dead letters again. docs/operations.md (Push delivery) \
            explains it all.",
        after_help = "Examples:\n  \
            cnsmctl deliveries\n  \
            cnsmctl deliveries --target shop/order-processing/fulfilment -o json\n  \
            cnsmctl deliveries redrive --target shop/order-processing/fulfilment --all\n  \
            cnsmctl --store postgres://cnsm@db/cnsm deliveries\n  \
            cnsmctl --server http://127.0.0.1:8080 deliveries\n\n\
            Reads the embedded store in --data-dir (stop the server first), the PostgreSQL \
            store of --store (while the nodes serve), or, with --server, asks the running \
            server (admin role on every namespace)."
    )]
    Deliveries(crate::commands::deliveries::DeliveriesArgs),

    /// A complete tour on a throw-away store: apply, create, send, history, graph
    #[command(
        long_about = "A complete tour on a throw-away store.\n\n\
            Applies the four bundled example machines, creates an order, drives it \
            created -> validated -> paid -> shipped -> delivered, shows a guard rejecting a \
            payment that is too small, prints the hash-chained history and the Mermaid graph. \
            Uses a temporary directory (removed afterwards) unless --data-dir is given on the \
            command line.",
        after_help = "Examples:\n  \
            cnsmctl demo\n  \
            cnsmctl demo --data-dir ./demo-data   # keep the store to explore it afterwards"
    )]
    Demo(DemoArgs),

    /// Copy an embedded store into a new PostgreSQL database, then verify the copy
    #[command(
        name = "migrate-store",
        long_about = "Copy an embedded store into a new PostgreSQL database (or schema), then verify.\n\n\
            Copies every definition revision, every instance with its full history (the exact \
            record bytes, so every hash chain still verifies), its pending timer and its \
            idempotency keys, then checks that the target holds exactly what the source does. \
            The target must be empty; stop the server on the source first.",
        after_help = "Examples:\n  \
            cnsmctl migrate-store --from ./cnsm-data --to postgres://cnsm@db/cnsm\n\n\
            Exit code 4 when the target is not empty, 5 when a store cannot be opened."
    )]
    MigrateStore(MigrateStoreArgs),
}

/// How list and show commands print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns
    Table,
    /// Aligned columns with more of them
    Wide,
    /// JSON (lists as {"items": [...]})
    Json,
    /// YAML
    Yaml,
}

/// How commands that change something print their result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResultFormat {
    /// One human line
    Text,
    Json,
    Yaml,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// A StateMachine YAML file; `-` reads stdin. Repeat for several files
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A StateMachine YAML file; `-` reads stdin. Repeat for several files
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<String>,
    /// Output format of the result
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: ResultFormat,
}

#[derive(Debug, Subcommand)]
pub enum GetCommand {
    /// List machines (latest revisions) or show one
    #[command(
        visible_aliases = ["machine", "statemachines", "statemachine", "sm"],
        after_help = "Examples:\n  \
            cnsmctl get machines -A\n  \
            cnsmctl -n shop get sm\n  \
            cnsmctl -n shop get machine order-processing -o yaml       # the stored definition\n  \
            cnsmctl -n shop get machine order-processing --revision 1 -o json"
    )]
    Machines(GetMachinesArgs),

    /// List instances (with filters) or show one
    #[command(
        visible_aliases = ["instance", "inst"],
        after_help = "Examples:\n  \
            cnsmctl -n shop get instances\n  \
            cnsmctl -n shop get instances -l tier=gold --state paid -o wide\n  \
            cnsmctl get inst -A --status failed\n  \
            cnsmctl -n shop get instance o-1 -o json\n  \
            cnsmctl --server http://127.0.0.1:8080 -n shop get instances -w   # stream transitions"
    )]
    Instances(GetInstancesArgs),
}

#[derive(Debug, Args)]
pub struct GetMachinesArgs {
    /// Show only this machine
    pub name: Option<String>,
    /// A specific revision (with NAME) instead of the latest
    #[arg(long, requires = "name")]
    pub revision: Option<u32>,
    /// List machines of every namespace
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format; json and yaml print the stored definition with its revision and hash
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

/// An instance status, as a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    Active,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Args)]
pub struct GetInstancesArgs {
    /// Show only this instance
    pub id: Option<String>,
    /// Keep instances with this label (key=value); repeat or comma-separate to require several
    #[arg(short = 'l', long = "selector", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Keep instances in this state
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// Keep instances with this status
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
    /// Keep instances of this machine
    #[arg(long, value_name = "MACHINE")]
    pub machine: Option<String>,
    /// Show at most this many instances
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// List instances of every namespace
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format; wide adds LABELS, TIMER-DUE and UPDATED
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// After listing, print one line per transition as it commits (needs --server)
    #[arg(short = 'w', long)]
    pub watch: bool,
}

#[derive(Debug, Subcommand)]
pub enum DescribeCommand {
    /// States, transitions, revision and instance counts of a machine
    #[command(
        visible_aliases = ["machines", "statemachine", "statemachines", "sm"],
        after_help = "Examples:\n  cnsmctl -n shop describe machine order-processing"
    )]
    Machine(DescribeMachineArgs),
    /// State, status, version, timer, data and last records of an instance
    #[command(
        visible_aliases = ["instances", "inst"],
        after_help = "Examples:\n  cnsmctl -n shop describe instance o-1"
    )]
    Instance(DescribeInstanceArgs),
}

#[derive(Debug, Args)]
pub struct DescribeMachineArgs {
    pub name: String,
    /// A specific revision instead of the latest
    #[arg(long)]
    pub revision: Option<u32>,
}

#[derive(Debug, Args)]
pub struct DescribeInstanceArgs {
    pub id: String,
    /// How many of the latest history records to show
    #[arg(long, default_value_t = 10)]
    pub records: usize,
}

#[derive(Debug, Subcommand)]
pub enum CreateCommand {
    /// Create an instance at version 0 in the machine's initial state
    #[command(
        visible_aliases = ["inst"],
        long_about = "Create an instance at version 0 in the machine's initial state.\n\n\
            The instance is pinned to the machine's latest revision (or --revision) for its whole \
            life. Its genesis record (version 0) holds the initial data and labels.",
        after_help = "Examples:\n  \
            cnsmctl -n shop create instance order-processing --id o-1 --data '{\"total\": 40}'\n  \
            # instance/o-1 created (state created, version 0)\n  \
            cnsmctl -n shop create instance order-processing -l tier=gold -l region=eu\n  \
            cnsmctl -n shop create instance order-processing --revision 1 -o json"
    )]
    Instance(CreateInstanceArgs),
}

#[derive(Debug, Args)]
pub struct CreateInstanceArgs {
    /// The machine to instantiate
    pub machine: String,
    /// Instance id (letters, digits, '.', '_', ':', '-'); generated when absent
    #[arg(long)]
    pub id: Option<String>,
    /// Initial data, a JSON object
    #[arg(long, value_name = "JSON")]
    pub data: Option<String>,
    /// A label (key=value); repeat for several
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Pin this revision instead of the latest
    #[arg(long)]
    pub revision: Option<u32>,
    /// Who creates it, recorded in the genesis record
    #[arg(long, env = "CNSM_ACTOR", default_value = "cnsmctl")]
    pub actor: String,
    /// Output format of the result
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: ResultFormat,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// The instance
    pub id: String,
    /// The event name (`complete` and `fail` are reserved)
    pub event: String,
    /// Event payload, JSON (guards and assignments read it as `event`)
    #[arg(long, value_name = "JSON")]
    pub payload: Option<String>,
    /// Apply only if the instance is at this version (else StaleState, exit 4)
    #[arg(long, value_name = "N")]
    pub expected_version: Option<u64>,
    /// Deduplicate retries: a repeated key returns the original result
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Who sends it, recorded in the history record
    #[arg(long, env = "CNSM_ACTOR", default_value = "cnsmctl")]
    pub actor: String,
    /// Output format of the result; json prints the record and the instance
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: ResultFormat,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The instance
    pub id: String,
    /// Why (kept on the record of a cancel)
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Who acts, recorded in the history record (the token's name when the server has auth)
    #[arg(long, env = "CNSM_ACTOR", default_value = "cnsmctl")]
    pub actor: String,
    /// Output format of the result; json prints the record and the instance
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: ResultFormat,
}

#[derive(Debug, Args)]
pub struct EraseArgs {
    /// The instance
    pub id: String,
    /// A dotted data path to erase (in the data and in event payloads); repeatable; none: all
    /// data and payloads
    #[arg(long = "field", value_name = "PATH")]
    pub fields: Vec<String>,
    /// Why (kept in the erasure record)
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Who acts, recorded in the erasure record (the token's name when the server has auth)
    #[arg(long, env = "CNSM_ACTOR", default_value = "cnsmctl")]
    pub actor: String,
    /// Output format of the result; json prints the erasure record and the instance
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: ResultFormat,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The instance
    pub id: String,
    /// First version to show
    #[arg(long, default_value_t = 0, value_name = "V")]
    pub from: u64,
    /// Show at most this many records
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub limit: usize,
    /// Output format; json is an array of records, each with prevHash and hash
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

/// A diagram language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    /// Mermaid stateDiagram-v2
    Mermaid,
    /// Graphviz DOT
    Dot,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    /// The machine
    pub machine: String,
    /// A specific revision instead of the latest
    #[arg(long)]
    pub revision: Option<u32>,
    /// Diagram language
    #[arg(long, value_enum, default_value = "mermaid")]
    pub format: GraphFormat,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// The rollout (stable, canary, weight) and active instances per revision
    #[command(after_help = "Examples:\n  cnsmctl -n shop rollout status order-processing")]
    Status(RolloutArgs),
    /// Send WEIGHT percent of new instances to REVISION (sticky per instance id), or route by a flag
    #[command(
        long_about = "Route WEIGHT percent of new instances of the machine to REVISION, the rest \
            to the stable revision (the rollout's, or the revision before REVISION when none is \
            in progress). Routing is a fractional flag over the instance id (flagd's bucketing), \
            so the same id always gets the same answer; the decision is recorded in the \
            instance's genesis record. Instances created with --revision are not routed.\n\n\
            With --flag KEY instead, each new instance is routed by evaluating that flag \
            (--flags FILE, or the server's provider) with the instance's context (targeting key \
            = instance id, labels as fields, machine, namespace); the value names the revision \
            (an integer or a string of digits). A value naming no existing revision, or a \
            provider error, gives the stable revision (what new instances got before), recorded \
            with reason ERROR.",
        after_help = "Examples:\n  cnsmctl -n shop rollout set order-processing --revision 2 --weight 10\n  \
            cnsmctl -n shop rollout set order-processing --flag order-revision"
    )]
    Set(RolloutSetArgs),
    /// Send every new instance to the canary revision
    Promote(RolloutArgs),
    /// Send every new instance back to the stable revision
    Abort(RolloutArgs),
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// The machine
    pub machine: String,
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: ResultFormat,
}

#[derive(Debug, Args)]
pub struct RolloutSetArgs {
    /// The machine
    pub machine: String,
    /// The canary revision
    #[arg(long, value_name = "N", requires = "weight", conflicts_with = "flag")]
    pub revision: Option<u32>,
    /// Percent of new instances it gets (0 to 100)
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100), requires = "revision")]
    pub weight: Option<u8>,
    /// Route by this flag instead: its value names the revision
    #[arg(long, value_name = "KEY", required_unless_present = "revision")]
    pub flag: Option<String>,
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: ResultFormat,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The machine
    pub machine: String,
    /// The old revision
    pub from: u32,
    /// The new revision
    pub to: u32,
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: ResultFormat,
}

#[derive(Debug, Args)]
pub struct MigrateCommand {
    #[command(subcommand)]
    pub rollback: Option<MigrateSubcommand>,
    #[command(flatten)]
    pub args: Option<MigrateArgs>,
}

#[derive(Debug, Subcommand)]
pub enum MigrateSubcommand {
    /// Move the instances this policy migrated back to --from, by the reverse mapping
    Rollback(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The machine
    pub machine: String,
    /// The revision the instances are on
    #[arg(long, value_name = "N")]
    pub from: u32,
    /// The revision to move them to
    #[arg(long, value_name = "N")]
    pub to: u32,
    /// The StateMigrationPolicy file (YAML)
    #[arg(long, value_name = "FILE")]
    pub policy: std::path::PathBuf,
    /// Report per instance what would happen; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Run one phase alone: pre (lock) or post (migrate what this policy locked)
    #[arg(long, value_parser = ["all", "pre", "post"], default_value = "all")]
    pub phase: String,
    /// Instances per round (each round shares its commits)
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub chunk: usize,
    /// Progress on stderr: a bar on a terminal (auto), one line per round (lines), or none
    #[arg(long, value_parser = ["auto", "lines", "none"], default_value = "auto")]
    pub progress: String,
    /// Output format; json lists every instance
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: ResultFormat,
}

#[derive(Debug, Subcommand)]
pub enum DeleteCommand {
    /// Delete every revision of a machine; refused while it has active instances
    #[command(
        visible_aliases = ["machines", "statemachine", "statemachines", "sm"],
        after_help = "Examples:\n  cnsmctl -n shop delete machine order-processing"
    )]
    Machine(DeleteMachineArgs),
}

#[derive(Debug, Args)]
pub struct DeleteMachineArgs {
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Check every hash chain, every instance against its last record, every index
    #[command(
        after_help = "Examples:\n  cnsmctl store verify\n  cnsmctl --data-dir /var/lib/cnsm store verify\n\n\
            Exit code 1 when a problem is found."
    )]
    Verify,

    /// Write a consistent, verified point-in-time copy of the store while it serves
    #[command(
        long_about = "Write a backup: a consistent point-in-time copy of the whole store (every \
            definition, instance, record, timer and idempotency key), taken from one read \
            snapshot while commits go on beside it, verified from genesis before it is kept. \
            The backup is itself a store file. Locally it reads --data-dir; with --server it \
            asks the server (admin role) and downloads the copy, verifying it again on arrival. \
            An existing --out file is never overwritten.",
        after_help = "Examples:\n  \
            cnsmctl store backup --out backup.cnsm\n  \
            cnsmctl --server http://127.0.0.1:8080 store backup --out backup.cnsm\n  \
            cnsmctl store restore backup.cnsm --data-dir /var/lib/cnsm-restored"
    )]
    Backup(BackupArgs),

    /// Restore a backup into a new data directory (--data-dir), after verifying it
    #[command(
        long_about = "Restore a backup file as the store of --data-dir. The backup is verified \
            from genesis first (every chain, every index); a backup that does not verify, or a \
            data directory that already holds a store, is refused and nothing is written. \
            Local only: run it where the new data directory lives, then start the server on it.",
        after_help = "Examples:\n  cnsmctl store restore backup.cnsm --data-dir ./restored\n  \
            cnsmctl --data-dir ./restored store verify"
    )]
    Restore(RestoreArgs),

    /// Apply the missing schema migrations of the PostgreSQL store of --store
    #[command(
        after_help = "Examples:\n  cnsmctl --store postgres://cnsm@db/cnsm store migrate\n\n\
            `serve` and every command migrate on open too; this runs them alone (one transaction, \
            under an advisory lock, safe while nodes start)."
    )]
    Migrate,
    /// Show the schema version of the PostgreSQL store of --store
    #[command(
        after_help = "Examples:\n  cnsmctl --store postgres://cnsm@db/cnsm store status\n\n\
            Exit code 1 when the schema is behind this binary, 5 when it is newer."
    )]
    Status,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The backup file to write (refused if it exists)
    #[arg(long, value_name = "FILE")]
    pub out: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup file to restore
    pub backup: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct DemoArgs {}

#[derive(Debug, Args)]
pub struct MigrateStoreArgs {
    /// The embedded store's directory
    #[arg(long, value_name = "DIR")]
    pub from: std::path::PathBuf,
    /// The PostgreSQL database to copy into (postgres://USER@HOST:PORT/DB)
    #[arg(long, value_name = "URL")]
    pub to: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (the first line of output names it)
    #[arg(
        long,
        env = "CNSM_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    pub listen: String,
    /// Allow a non-loopback address without authentication (anyone who can reach it can
    /// change every instance)
    #[arg(long)]
    pub insecure: bool,
    /// YAML file of bearer tokens with namespace-scoped roles (see docs/cli.md); turns
    /// authentication on and allows non-loopback addresses
    #[arg(long, env = "CNSM_AUTH_FILE", value_name = "FILE")]
    pub auth_file: Option<std::path::PathBuf>,
    /// PEM certificate chain (leaf first): serve HTTPS instead of HTTP (needs --tls-key)
    #[arg(long, env = "CNSM_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert (needs --tls-cert)
    #[arg(long, env = "CNSM_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificate(s) to trust for https:// notify targets (no system roots)
    #[arg(long, env = "CNSM_DELIVERY_CA_CERT", value_name = "FILE")]
    pub delivery_ca_cert: Option<std::path::PathBuf>,
    /// On a PostgreSQL store: take a record for delivery once it is this old, so commits
    /// still in flight on other nodes are seen first (docs/operations.md)
    #[arg(
        long,
        env = "CNSM_DELIVERY_SETTLE_MS",
        default_value_t = 10_000,
        value_name = "MS"
    )]
    pub delivery_settle_ms: u64,
    #[command(flatten)]
    pub telemetry: crate::telemetry::TelemetryArgs,
}
