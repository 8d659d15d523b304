//! `cnsmctl demo`: the first command a new user runs. A scripted tour through the same code
//! paths as the real commands, printed as the commands a user would type.
//!
//! The example machines are embedded (copies of `shared/examples/` kept in
//! `crates/cnsmctl/examples/`) so the binary needs no files at run time.

use std::path::PathBuf;

use cnsm_core::graph::to_mermaid;
use cnsm_runtime::{CreateInstance, EventRequest};
use serde_json::json;

use crate::api::{Access, Api};
use crate::commands::{Context, applied_line, apply_source, created_line, transition_line};
use crate::error::CliError;
use crate::local::Local;
use crate::output::{Out, history_table};

/// The bundled examples, as (file name, YAML).
pub const EXAMPLES: [(&str, &str); 4] = [
    (
        "order-processing.yaml",
        include_str!("../examples/order-processing.yaml"),
    ),
    (
        "payment-saga.yaml",
        include_str!("../examples/payment-saga.yaml"),
    ),
    (
        "provisioning.yaml",
        include_str!("../examples/provisioning.yaml"),
    ),
    (
        "checkout-canary.yaml",
        include_str!("../examples/checkout-canary.yaml"),
    ),
];

const NAMESPACE: &str = "shop";
const MACHINE: &str = "order-processing";
const ACTOR: &str = "demo";

/// Runs the tour on a temporary store, or on `--data-dir` when given on the command line.
pub async fn run(context: &Context, out: &mut Out) -> Result<(), CliError> {
    let temp_dir;
    let data_dir: PathBuf = if context.data_dir_on_command_line {
        context.data_dir.clone()
    } else {
        temp_dir = tempfile::Builder::new()
            .prefix("cnsm-demo-")
            .tempdir()
            .map_err(|e| {
                CliError::unavailable(format!("cannot create a temporary directory: {e}"))
            })?;
        temp_dir.path().to_owned()
    };
    let kept = context.data_dir_on_command_line;
    out.line(format_args!(
        "# cnsm demo: a store in {}{}",
        data_dir.display(),
        if kept {
            ""
        } else {
            " (temporary, removed at the end)"
        }
    ));
    let demo_context = Context {
        data_dir: data_dir.clone(),
        data_dir_on_command_line: kept,
        namespace: "default".into(),
        namespace_on_command_line: false,
        // The tour always runs on its own embedded store.
        server: None,
        store: None,
        token: None,
        ca_cert: None,
        flags_file: None,
        flags: None,
    };
    let api = Local::open(&data_dir, Access::Mutating)?;
    let result = tour(&demo_context, &api, out).await;
    drop(api);
    result?;
    if kept {
        out.line(format_args!(
            "\n# Explore it: cnsmctl --data-dir {} -n {NAMESPACE} get instances -o wide",
            data_dir.display()
        ));
    }
    Ok(())
}

async fn tour(context: &Context, api: &Local, out: &mut Out) -> Result<(), CliError> {
    out.line("\n# 1. Store the example machines (admission checks each one first).");
    for (file, text) in EXAMPLES {
        out.line(format_args!("$ cnsmctl apply -f {file}"));
        let applied = apply_source(context, api, file, text).await?;
        out.line(applied_line(&applied));
    }

    out.line("\n# 2. Create an order: version 0, its genesis record.");
    // A kept store may already hold o-1 from an earlier run; then let the runtime name it.
    let id = match api.instance(NAMESPACE, "o-1").await {
        Err(e) if e.error_type == "NotFound" => Some("o-1".to_owned()),
        _ => None,
    };
    out.line(format_args!(
        "$ cnsmctl -n {NAMESPACE} create instance {MACHINE}{} --data '{{\"total\": 40}}'",
        id.as_deref()
            .map(|i| format!(" --id {i}"))
            .unwrap_or_default()
    ));
    let mut request = CreateInstance::new(NAMESPACE, MACHINE).data(
        json!({"total": 40})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    );
    request.id = id;
    request.actor = ACTOR.into();
    let order = api.create_instance(request).await?;
    out.line(created_line(&order));
    let id = order.id;

    out.line("\n# 3. Drive it. Each event commits one hash-chained record before the answer.");
    send(api, out, &id, "complete", None).await?;

    out.line("\n# A payment below the total: the guard `event.amount >= data.total` is false.");
    let cheap = json!({"amount": 10});
    out.line(format_args!(
        "$ cnsmctl -n {NAMESPACE} send {id} pay --payload '{cheap}'"
    ));
    match api
        .send(
            NAMESPACE,
            &id,
            EventRequest::new("pay").payload(cheap).actor(ACTOR),
        )
        .await
    {
        Err(e) => out.line(format_args!(
            "error: {e}    # exit code {}; nothing was committed",
            e.exit_code()
        )),
        Ok(outcome) => {
            return Err(CliError::new(
                "Internal",
                format!(
                    "the guard should have refused the payment: {}",
                    transition_line(&outcome)
                ),
            ));
        }
    }

    send(api, out, &id, "pay", Some(json!({"amount": 40}))).await?;
    send(api, out, &id, "ship", None).await?;
    send(api, out, &id, "deliver", None).await?;

    out.line("\n# 4. The history: record N is version N; each holds the previous record's hash.");
    out.line(format_args!(
        "$ cnsmctl -n {NAMESPACE} history {id} -o wide"
    ));
    let history = api.history(NAMESPACE, &id, 0, 100).await?;
    out.text(history_table(&history, true));

    out.line("\n# 5. The machine as a diagram (paste into any Mermaid renderer).");
    out.line(format_args!("$ cnsmctl -n {NAMESPACE} graph {MACHINE}"));
    let definition = api
        .machine(NAMESPACE, MACHINE, Some(order.revision))
        .await?;
    out.text(to_mermaid(&definition.definition));

    out.line("\n# 6. Check every hash chain in the store.");
    out.line("$ cnsmctl store verify");
    let report = api.verify_store().await?;
    out.line(format_args!(
        "{} definition revision(s), {} instance(s), {} record(s): {}",
        report.n_definitions,
        report.n_instances,
        report.n_records,
        if report.is_ok() {
            "OK".to_owned()
        } else {
            format!("{} problem(s)", report.problems.len())
        }
    ));
    Ok(())
}

async fn send(
    api: &Local,
    out: &mut Out,
    id: &str,
    event: &str,
    payload: Option<serde_json::Value>,
) -> Result<(), CliError> {
    let flag = payload
        .as_ref()
        .map(|p| format!(" --payload '{p}'"))
        .unwrap_or_default();
    out.line(format_args!(
        "$ cnsmctl -n {NAMESPACE} send {id} {event}{flag}"
    ));
    let request = EventRequest::new(event)
        .payload(payload.unwrap_or_default())
        .actor(ACTOR);
    let outcome = api.send(NAMESPACE, id, request).await?;
    out.line(transition_line(&outcome));
    Ok(())
}
