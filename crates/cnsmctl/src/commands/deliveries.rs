//! `deliveries`: the push-delivery cursors (with the node that holds each target) and the
//! dead letters of a store, read directly (local mode).

use clap::Args;
use cnsm_store::Store;
use cnsm_store::embedded::EmbeddedStore;
use serde_json::json;

use super::Context;
use crate::error::CliError;
use crate::output::{Out, Table, rfc3339_ms};

#[derive(Debug, Args)]
pub struct DeliveriesArgs {
    /// Only this target (`namespace/machine/name`)
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// Output format: table (default) or json
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

pub fn run(context: &Context, args: &DeliveriesArgs, out: &mut Out) -> Result<(), CliError> {
    if context.server.is_some() {
        return Err(CliError::invalid(
            "deliveries reads the store (--data-dir or --store); it does not take --server",
        ));
    }
    let store: std::sync::Arc<dyn Store> = match &context.store {
        Some(url) => crate::postgres::open(url, false)?,
        None => {
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
            std::sync::Arc::new(EmbeddedStore::open(&context.data_dir)?)
        }
    };
    let target = args.target.as_deref();
    let cursors: Vec<_> = store
        .delivery_cursors()?
        .into_iter()
        .filter(|(name, _)| target.is_none_or(|t| t == name))
        .collect();
    let mut letters = Vec::new();
    let mut after: Option<(String, u64)> = None;
    loop {
        let page = store.dead_letters(target, after.as_ref().map(|(t, p)| (t.as_str(), *p)), 0)?;
        let full = page.len() >= cnsm_store::PAGE_LEN_MAX;
        after = page.last().map(|d| (d.target.clone(), d.position));
        letters.extend(page);
        if !full {
            break;
        }
    }
    if args.output == "json" {
        let cursors: Vec<_> = cursors
            .iter()
            .map(|(name, c)| {
                json!({
                    "target": name,
                    "position": c.position,
                    "leaseNode": c.lease_node,
                    "leaseUntil": rfc3339_ms(c.lease_until_ms),
                })
            })
            .collect();
        return out.json(&json!({"cursors": cursors, "deadLetters": letters}));
    }
    let mut table = Table::new(["TARGET", "CURSOR", "HELD-BY", "LEASE-UNTIL"]);
    for (name, c) in &cursors {
        table.row(vec![
            name.clone(),
            c.position.to_string(),
            c.lease_node.clone(),
            rfc3339_ms(c.lease_until_ms),
        ]);
    }
    out.text(table);
    out.line(format_args!("\nDead letters: {}", letters.len()));
    if !letters.is_empty() {
        let mut table = Table::new([
            "TARGET",
            "POSITION",
            "INSTANCE",
            "VERSION",
            "ATTEMPTS",
            "FAILED",
            "LAST-ERROR",
        ]);
        for d in &letters {
            table.row(vec![
                d.target.clone(),
                d.position.to_string(),
                format!("{}/{}", d.namespace, d.instance),
                d.version.to_string(),
                d.attempts.to_string(),
                rfc3339_ms(d.failed_ms),
                d.last_error.clone(),
            ]);
        }
        out.text(table);
    }
    Ok(())
}
