//! `deliveries`: the push-delivery cursors (with the node that holds each target) and the dead
//! letters; `deliveries redrive`: marks dead letters to be delivered again. Both go through the
//! [`Api`](crate::api::Api): the store in `--data-dir` (or `--store`), or a server (`--server`).

use clap::{Args, Subcommand};
use cnsm_runtime::delivery::RedriveRequest;
use serde_json::json;

use super::Context;
use crate::api::{Access, Api};
use crate::error::CliError;
use crate::output::{Out, Table, rfc3339_ms};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DeliveriesArgs {
    #[command(subcommand)]
    pub command: Option<DeliveriesCommand>,
    /// Only this target (`namespace/machine/name`)
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// Output format: table (default) or json
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// Deliver dead letters again (same CloudEvent id, so receivers deduplicate)
    #[command(
        long_about = "Deliver dead letters again.\n\n\
            Marks the dead letter at --position, or every dead letter of the target (--all), \
            for redrive, durably and with --actor. The node that delivers the target (the \
            running server, or whichever node holds the target's lease on PostgreSQL) reads the \
            record again from the history and sends it with the same CloudEvent id and a fresh \
            round of attempts (the target's maxAttempts, with back-off). A delivered letter \
            leaves the list; one that fails again stays, with its new error and without the \
            mark, and can be redriven again. A redriven record goes out after newer records of \
            its instance that were already delivered: receivers order by the record's version.",
        after_help = "Examples:\n  \
            cnsmctl deliveries                                   # find the target and position\n  \
            cnsmctl deliveries redrive --target shop/order-processing/fulfilment --position 1042\n  \
            cnsmctl deliveries redrive --target shop/order-processing/fulfilment --all\n  \
            cnsmctl --server http://127.0.0.1:8080 deliveries redrive --target shop/order-processing/fulfilment --all\n\n\
            Locally it marks the letters in the store (the embedded store must not be in use: \
            the next `serve` delivers them; on --store PostgreSQL the serving nodes pick them up \
            within a poll). With --server it needs the admin role on every namespace."
    )]
    Redrive(RedriveArgs),
}

#[derive(Debug, Args)]
pub struct RedriveArgs {
    /// The target (`namespace/machine/name`, as `deliveries` lists it)
    #[arg(long, value_name = "TARGET")]
    pub target: String,
    /// The dead letter at this commit position (the POSITION column)
    #[arg(
        long,
        value_name = "P",
        conflicts_with = "all",
        required_unless_present = "all"
    )]
    pub position: Option<u64>,
    /// Every dead letter of the target
    #[arg(long)]
    pub all: bool,
    /// Who asks, kept with each marked letter (a server with --auth-file records the token's name)
    #[arg(long, env = "CNSM_ACTOR", default_value = "cnsmctl")]
    pub actor: String,
}

pub async fn run(context: &Context, args: &DeliveriesArgs, out: &mut Out) -> Result<(), CliError> {
    if let Some(DeliveriesCommand::Redrive(redrive)) = &args.command {
        return run_redrive(context, redrive, out).await;
    }
    let api = context.connect(Access::ReadOnly)?;
    let list = api.deliveries(args.target.as_deref()).await?;
    if args.output == "json" {
        let cursors: Vec<_> = list
            .cursors
            .iter()
            .map(|c| {
                json!({
                    "target": c.target,
                    "position": c.position,
                    "leaseNode": c.lease_node,
                    "leaseUntil": rfc3339_ms(c.lease_until_ms),
                })
            })
            .collect();
        return out.json(&json!({"cursors": cursors, "deadLetters": list.dead_letters}));
    }
    let mut table = Table::new(["TARGET", "CURSOR", "HELD-BY", "LEASE-UNTIL"]);
    for c in &list.cursors {
        table.row(vec![
            c.target.clone(),
            c.position.to_string(),
            c.lease_node.clone(),
            rfc3339_ms(c.lease_until_ms),
        ]);
    }
    out.text(table);
    let letters = &list.dead_letters;
    out.line(format_args!("\nDead letters: {}", letters.len()));
    if !letters.is_empty() {
        let mut table = Table::new([
            "TARGET",
            "POSITION",
            "INSTANCE",
            "VERSION",
            "ATTEMPTS",
            "FAILED",
            "REDRIVE",
            "LAST-ERROR",
        ]);
        for d in letters {
            table.row(vec![
                d.target.clone(),
                d.position.to_string(),
                format!("{}/{}", d.namespace, d.instance),
                d.version.to_string(),
                d.attempts.to_string(),
                rfc3339_ms(d.failed_ms),
                d.redrive
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |r| format!("pending ({})", r.actor)),
                d.last_error.clone(),
            ]);
        }
        out.text(table);
    }
    Ok(())
}

async fn run_redrive(context: &Context, args: &RedriveArgs, out: &mut Out) -> Result<(), CliError> {
    let request = RedriveRequest {
        target: args.target.clone(),
        position: if args.all { None } else { args.position },
        actor: args.actor.clone(),
    };
    let api = context.connect(Access::ReadOnly)?;
    let report = api.redrive_dead_letters(request).await?;
    match report.position {
        Some(position) => out.line(format_args!(
            "dead letter {} at position {position} marked for redrive",
            report.target
        )),
        None => out.line(format_args!(
            "{} dead letter(s) of {} marked for redrive",
            report.marked, report.target
        )),
    }
    Ok(())
}
