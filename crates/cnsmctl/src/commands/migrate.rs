//! `diff MACHINE A B` and `migrate [rollback] MACHINE --from A --to B --policy FILE`.

use std::io::IsTerminal;

use cnsm_core::diff::diff;
use cnsm_runtime::{MigrationOutcome, MigrationRequest};

use crate::api::{Access, Api};
use crate::cli::{DiffArgs, MigrateArgs, MigrateCommand, MigrateSubcommand, ResultFormat};
use crate::commands::Context;
use crate::error::CliError;
use crate::output::Out;

/// `diff MACHINE FROM TO`.
pub async fn run_diff(context: &Context, args: &DiffArgs, out: &mut Out) -> Result<(), CliError> {
    let api = context.connect(Access::ReadOnly)?;
    let a = api
        .machine(&context.namespace, &args.machine, Some(args.from))
        .await?;
    let b = api
        .machine(&context.namespace, &args.machine, Some(args.to))
        .await?;
    let d = diff(&a.definition, &b.definition);
    match args.output {
        ResultFormat::Json => return out.json(&d),
        ResultFormat::Yaml => return out.yaml(&d),
        ResultFormat::Text => {}
    }
    out.line(format_args!(
        "statemachine {} revision {} -> {}{}",
        args.machine,
        args.from,
        args.to,
        if d.is_empty() { ": no differences" } else { "" }
    ));
    if let Some((x, y)) = &d.initial_state {
        out.line(format_args!("~ initialState: {x} -> {y}"));
    }
    for s in &d.states_added {
        out.line(format_args!("+ state {s}"));
    }
    for s in &d.states_removed {
        out.line(format_args!("- state {s}"));
    }
    for s in &d.states_changed {
        out.line(format_args!("~ state {}: {}", s.name, s.changes.join(", ")));
    }
    let edge = |e: &cnsm_core::diff::Edge| {
        let detail = if e.detail.is_empty() {
            String::new()
        } else {
            format!(" [{}]", e.detail)
        };
        format!("{} --{}--> {}{detail}", e.from, e.label, e.to)
    };
    for e in &d.transitions_added {
        out.line(format_args!("+ {}", edge(e)));
    }
    for e in &d.transitions_removed {
        out.line(format_args!("- {}", edge(e)));
    }
    for (old, new) in &d.transitions_changed {
        out.line(format_args!("~ {} (was{})", edge(new), {
            let d = &old.detail;
            if d.is_empty() {
                " unguarded".to_owned()
            } else {
                format!(" [{d}]")
            }
        }));
    }
    Ok(())
}

/// `migrate [rollback] MACHINE ...`: exit 0 when nothing was blocked, 4 otherwise.
pub async fn run_migrate(
    context: &Context,
    command: &MigrateCommand,
    out: &mut Out,
) -> Result<u8, CliError> {
    let (args, rollback) = match (&command.rollback, &command.args) {
        (Some(MigrateSubcommand::Rollback(args)), _) => (args, true),
        (None, Some(args)) => (args, false),
        (None, None) => {
            return Err(CliError::invalid(
                "name the machine: cnsmctl migrate MACHINE --from N --to M --policy FILE",
            ));
        }
    };
    let request = request(context, args, rollback)?;
    let access = if request.dry_run {
        Access::ReadOnly
    } else {
        Access::Mutating
    };
    let api = context.connect(access)?;
    let bar = match args.progress.as_str() {
        "lines" => Some(false),
        "none" => None,
        _ => std::io::stderr().is_terminal().then_some(true),
    };
    let mut progress = |done: usize, total: usize| match bar {
        Some(true) if total > 0 => {
            eprint!(
                "\rmigrating: {done}/{total} instances ({}%)   ",
                done * 100 / total
            );
            if done == total {
                eprintln!();
            }
        }
        Some(false) => eprintln!("migrating: {done}/{total} instances"),
        _ => {}
    };
    let report = api.migrate(request, &mut progress).await?;
    match args.output {
        ResultFormat::Json => {
            out.json(&cnsm_server::migrations::MigrationReportView::from(&report))?
        }
        ResultFormat::Yaml => {
            out.yaml(&cnsm_server::migrations::MigrationReportView::from(&report))?
        }
        ResultFormat::Text => {
            for entry in &report.entries {
                match &entry.outcome {
                    MigrationOutcome::WouldMigrate { from, to } => {
                        out.line(format_args!("instance/{}: ok ({from} -> {to})", entry.id))
                    }
                    MigrationOutcome::Migrated { from, to } => out.line(format_args!(
                        "instance/{}: migrated ({from} -> {to})",
                        entry.id
                    )),
                    MigrationOutcome::Locked => {
                        out.line(format_args!("instance/{}: locked", entry.id))
                    }
                    MigrationOutcome::Blocked(why) => {
                        out.line(format_args!("instance/{}: blocked: {why}", entry.id))
                    }
                }
            }
            let verb = if args.dry_run {
                "would migrate"
            } else {
                "migrated"
            };
            out.line(format_args!(
                "{} instance(s) {verb}, {} blocked",
                report.n_migrated(),
                report.n_blocked()
            ));
        }
    }
    Ok(if report.n_blocked() == 0 {
        crate::commands::EXIT_OK
    } else {
        crate::error::exit_code_of("TransitionFailure")
    })
}

fn request(
    context: &Context,
    args: &MigrateArgs,
    rollback: bool,
) -> Result<MigrationRequest, CliError> {
    let file = args.policy.display().to_string();
    let text = std::fs::read_to_string(&args.policy)
        .map_err(|e| CliError::new("NotFound", format!("cannot read {file}: {e}")))?;
    let policy = cnsm_core::migration::parse_policy(&text).map_err(|problems| {
        let lines: Vec<String> = problems
            .iter()
            .map(|p| cnsm_core::admission::render_problem(p, Some(&file)))
            .collect();
        CliError::invalid(format!("{file}: invalid policy\n{}", lines.join("\n")))
    })?;
    if policy.spec.machine != args.machine {
        return Err(CliError::invalid(format!(
            "{file} is a policy for machine '{}', not '{}'",
            policy.spec.machine, args.machine
        )));
    }
    let mut request = MigrationRequest::new(policy, args.from, args.to);
    request.namespace = context.namespace.clone();
    request.dry_run = args.dry_run;
    request.rollback = rollback;
    request.phase =
        cnsm_server::migrations::parse_phase(Some(&args.phase)).map_err(CliError::invalid)?;
    request.chunk = args.chunk;
    Ok(request)
}

/// `rollout status|set|promote|abort MACHINE`.
pub async fn run_rollout(
    context: &Context,
    command: &crate::cli::RolloutCommand,
    out: &mut Out,
) -> Result<(), CliError> {
    use crate::cli::RolloutCommand;
    use cnsm_runtime::RolloutChange;
    let (machine, output, change) = match command {
        RolloutCommand::Status(a) => (&a.machine, a.output, None),
        RolloutCommand::Set(a) => {
            let change = match (a.revision, a.weight, &a.flag) {
                (Some(revision), Some(weight), None) => RolloutChange::Set { revision, weight },
                (None, None, Some(flag)) => RolloutChange::Flag { flag: flag.clone() },
                _ => {
                    return Err(CliError::invalid(
                        "rollout set needs either --revision and --weight, or --flag",
                    ));
                }
            };
            (&a.machine, a.output, Some(change))
        }
        RolloutCommand::Promote(a) => (&a.machine, a.output, Some(RolloutChange::Promote)),
        RolloutCommand::Abort(a) => (&a.machine, a.output, Some(RolloutChange::Abort)),
    };
    let access = if change.is_some() {
        Access::Mutating
    } else {
        Access::ReadOnly
    };
    let api = context.connect(access)?;
    let status = match change {
        Some(change) => {
            api.change_rollout(&context.namespace, machine, change)
                .await?
        }
        None => api.rollout_status(&context.namespace, machine).await?,
    };
    let view = cnsm_server::migrations::RolloutView::from(&status);
    match output {
        ResultFormat::Json => return out.json(&view),
        ResultFormat::Yaml => return out.yaml(&view),
        ResultFormat::Text => {}
    }
    match &status.rollout {
        Some(r) if r.flag.is_some() => out.line(format_args!(
            "statemachine {machine}: new instances routed by flag {} (fallback revision {}; latest is {})",
            r.flag.as_deref().unwrap_or_default(),
            r.stable,
            status.latest
        )),
        Some(r) if r.stable == r.canary || r.weight == 0 => out.line(format_args!(
            "statemachine {machine}: every new instance gets revision {} (pinned; latest is {})",
            r.stable, status.latest
        )),
        Some(r) if r.weight >= 100 => out.line(format_args!(
            "statemachine {machine}: every new instance gets revision {} (canary at 100%)",
            r.canary
        )),
        Some(r) => out.line(format_args!(
            "statemachine {machine}: rollout revision {} {}% / revision {} {}%",
            r.canary,
            r.weight,
            r.stable,
            100 - u32::from(r.weight)
        )),
        None => out.line(format_args!(
            "statemachine {machine}: no rollout; new instances get the latest revision {}",
            status.latest
        )),
    }
    out.line("REVISION  ACTIVE");
    for (revision, n) in &status.active_by_revision {
        out.line(format_args!("{revision:<9} {n}"));
    }
    Ok(())
}
