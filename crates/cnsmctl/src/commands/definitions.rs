//! Commands on definitions: `validate`, `apply`, `get machines`, `describe machine`, `graph`,
//! `delete machine`.

use cnsm_core::Status;
use cnsm_core::admission::{Severity, admit_str, render_problem};
use cnsm_core::graph::{to_dot, to_mermaid};
use cnsm_core::resource::{DEFAULT_NAMESPACE, EVENT_COMPLETE, EVENT_FAIL, StateMachine, StateType};
use cnsm_runtime::AppliedDefinition;
use cnsm_store::DefinitionRow;
use serde_json::{Value, json};

use super::{Context, no_resources, read_source};
use crate::api::{Access, Api, InstanceFilter};
use crate::cli::{
    ApplyArgs, DeleteMachineArgs, DescribeMachineArgs, GetMachinesArgs, GraphArgs, GraphFormat,
    OutputFormat, ResultFormat, ValidateArgs,
};
use crate::error::{CliError, EXIT_OK, admission_error};
use crate::output::{
    Out, Table, age, definition_json, items, labels_text, now_ms, rfc3339_ms, seconds_exact,
    short_hash,
};

/// The resource name kubectl would print for a machine.
const RESOURCE: &str = "statemachine.statemachine.cn";

/// `validate`: every problem of every file; exit 1 when any file has an error.
pub fn validate(
    args: &ValidateArgs,
    flags_file: Option<&std::path::Path>,
    out: &mut Out,
) -> Result<u8, CliError> {
    // With --flags, gates naming a key the file does not define are warnings.
    let flag_set = match flags_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                CliError::invalid(format!("cannot read --flags {}: {e}", path.display()))
            })?;
            Some(
                cnsm_flags::FlagSet::parse(&text)
                    .map_err(|e| CliError::invalid(format!("--flags {}: {e}", path.display())))?,
            )
        }
        None => None,
    };
    let mut invalid: Vec<String> = Vec::new();
    let mut n_errors = 0;
    for path in &args.files {
        let (name, text) = match read_source(path) {
            Ok(source) => source,
            Err(e) => {
                eprintln!("{}", e.message);
                invalid.push(path.clone());
                continue;
            }
        };
        let admission = admit_str(&text, Some(&name));
        for problem in &admission.problems {
            eprintln!("{}", render_problem(problem, Some(&name)));
        }
        n_errors += admission.errors().count();
        let mut n_warnings = admission.warnings().count();
        if let (Some(set), Some(machine)) = (&flag_set, &admission.machine) {
            for (key, at) in cnsm_flags::undefined_flag_keys(machine, set) {
                eprintln!(
                    "{name}: warning[flag-undefined]: flag '{key}' is not defined in the --flags file (at {at})"
                );
                n_warnings += 1;
            }
        }
        if admission.machine.is_some() {
            match n_warnings {
                0 => out.line(format_args!("{name}: valid")),
                n => out.line(format_args!("{name}: valid ({n} warning(s))")),
            }
        } else {
            invalid.push(name);
        }
    }
    if invalid.is_empty() {
        return Ok(EXIT_OK);
    }
    Err(CliError::invalid(format!(
        "{} of {} file(s) invalid ({n_errors} error(s)): {}",
        invalid.len(),
        args.files.len(),
        invalid.join(", ")
    )))
}

/// The namespace a file names in `metadata.namespace`, if any. Admission defaults a missing
/// namespace, so the typed machine cannot tell; the source can. Called only on admitted sources
/// (size, depth and anchors already checked).
fn namespace_in_source(text: &str) -> Option<Option<String>> {
    #[derive(serde::Deserialize)]
    struct Doc {
        metadata: Option<Meta>,
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        namespace: Option<String>,
    }
    let doc: Doc = serde_saphyr::from_str(text).ok()?;
    Some(doc.metadata.and_then(|m| m.namespace))
}

/// Admits one source and settles its namespace: the file's, else `-n`; both given and different
/// is an error (kubectl's rule). Warnings go to stderr; errors come back as one [`CliError`].
pub fn admit_source(context: &Context, name: &str, text: &str) -> Result<StateMachine, CliError> {
    let admission = admit_str(text, Some(name));
    for warning in admission.warnings() {
        eprintln!("{}", render_problem(warning, Some(name)));
    }
    let Some(mut machine) = admission.machine else {
        let errors: Vec<_> = admission
            .problems
            .into_iter()
            .filter(|p| p.severity == Severity::Error)
            .collect();
        return Err(admission_error(&errors, Some(name)));
    };
    let file_namespace = namespace_in_source(text).unwrap_or_else(|| {
        (machine.metadata.namespace != DEFAULT_NAMESPACE)
            .then(|| machine.metadata.namespace.clone())
    });
    machine.metadata.namespace = match file_namespace {
        Some(ns) if context.namespace_on_command_line && ns != context.namespace => {
            return Err(CliError::invalid(format!(
                "{name}: the namespace from the file ({ns}) does not match the namespace from -n ({}); \
                 pass -n {ns} or remove metadata.namespace from the file",
                context.namespace
            )));
        }
        Some(ns) => ns,
        None => context.namespace.clone(),
    };
    Ok(machine)
}

/// Admits and stores one source (used by `apply` and `demo`).
pub async fn apply_source(
    context: &Context,
    api: &impl Api,
    name: &str,
    text: &str,
) -> Result<AppliedDefinition, CliError> {
    let machine = admit_source(context, name, text)?;
    api.apply(machine).await
}

/// `statemachine.statemachine.cn/NAME created (revision N)`.
pub fn applied_line(applied: &AppliedDefinition) -> String {
    let verb = if applied.created {
        "created"
    } else {
        "unchanged"
    };
    format!(
        "{RESOURCE}/{} {verb} (revision {})",
        applied.name, applied.revision
    )
}

fn applied_json(applied: &AppliedDefinition) -> Value {
    json!({
        "namespace": applied.namespace,
        "name": applied.name,
        "revision": applied.revision,
        "hash": applied.hash.to_hex(),
        "created": applied.created,
    })
}

/// `apply`: every file is admitted before anything is stored.
pub async fn apply(context: &Context, args: &ApplyArgs, out: &mut Out) -> Result<(), CliError> {
    let mut machines = Vec::new();
    let mut failures: Vec<CliError> = Vec::new();
    for path in &args.files {
        let admitted =
            read_source(path).and_then(|(name, text)| admit_source(context, &name, &text));
        match admitted {
            Ok(machine) => machines.push(machine),
            Err(e) => failures.push(e),
        }
    }
    if let Some(first) = failures.first() {
        let mut error = if failures.len() == 1 {
            first.clone()
        } else {
            CliError::invalid(format!(
                "{} of {} file(s) invalid; nothing was stored",
                failures.len(),
                args.files.len()
            ))
        };
        error.diagnostics = failures
            .iter()
            .flat_map(|f| {
                let own = (failures.len() > 1).then(|| format!("error: {f}"));
                f.diagnostics.iter().cloned().chain(own)
            })
            .collect();
        return Err(error);
    }
    let api = context.connect(Access::Mutating)?;
    let mut results = Vec::new();
    for machine in machines {
        let applied = api.apply(machine).await?;
        // Admission warnings were printed above; these come from the running instances.
        for warning in applied
            .warnings
            .iter()
            .filter(|w| w.code == cnsm_core::admission::codes::BREAKING_CHANGE)
        {
            eprintln!("{}", render_problem(warning, None));
        }
        if args.output == ResultFormat::Text {
            out.line(applied_line(&applied));
        }
        results.push(applied_json(&applied));
    }
    let value = if results.len() == 1 {
        results.remove(0)
    } else {
        items(results)
    };
    match args.output {
        ResultFormat::Text => Ok(()),
        ResultFormat::Json => out.json(&value),
        ResultFormat::Yaml => out.yaml(&value),
    }
}

/// `get machines [NAME]`.
pub async fn get(context: &Context, args: &GetMachinesArgs, out: &mut Out) -> Result<(), CliError> {
    if args.all_namespaces && args.name.is_some() {
        return Err(CliError::invalid(
            "a machine cannot be retrieved by name across all namespaces",
        ));
    }
    let api = context.connect(Access::ReadOnly)?;
    let rows = match &args.name {
        Some(name) => vec![api.machine(&context.namespace, name, args.revision).await?],
        None => {
            let namespace = (!args.all_namespaces).then_some(context.namespace.as_str());
            api.machines(namespace).await?
        }
    };
    match args.output {
        OutputFormat::Json | OutputFormat::Yaml => {
            let value = match &args.name {
                Some(_) => definition_json(&rows[0]),
                None => items(rows.iter().map(definition_json).collect()),
            };
            if args.output == OutputFormat::Json {
                out.json(&value)
            } else {
                out.yaml(&value)
            }
        }
        OutputFormat::Table | OutputFormat::Wide => {
            if rows.is_empty() {
                no_resources((!args.all_namespaces).then_some(context.namespace.as_str()));
                return Ok(());
            }
            out.text(machines_table(
                &rows,
                args.all_namespaces,
                args.output == OutputFormat::Wide,
            ));
            Ok(())
        }
    }
}

fn machines_table(rows: &[DefinitionRow], with_namespace: bool, wide: bool) -> Table {
    let mut header = Vec::new();
    if with_namespace {
        header.push("NAMESPACE");
    }
    header.extend(["NAME", "REVISION", "STATES", "INITIAL", "AGE"]);
    if wide {
        header.extend(["HASH", "LABELS"]);
    }
    let now = now_ms();
    let mut table = Table::new(header);
    for row in rows {
        let definition = &row.definition;
        let mut cells = Vec::new();
        if with_namespace {
            cells.push(row.namespace.clone());
        }
        cells.extend([
            row.name.clone(),
            row.revision.to_string(),
            definition.spec.states.len().to_string(),
            definition.spec.initial_state.clone(),
            age(now, row.created_ms),
        ]);
        if wide {
            cells.push(short_hash(&row.hash.to_hex()).to_owned());
            cells.push(labels_text(&definition.metadata.labels));
        }
        table.row(cells);
    }
    table
}

/// Every way out of every state, as (from, trigger, to, condition).
fn transitions(machine: &StateMachine) -> Vec<[String; 4]> {
    let mut out = Vec::new();
    for state in &machine.spec.states {
        let from = &state.name;
        let timeout = state.timeout_seconds.map(seconds_exact).unwrap_or_default();
        for t in &state.on_event {
            let mut condition = Vec::new();
            if let Some(guard) = &t.guard {
                condition.push(format!("guard: {guard}"));
            }
            if let Some(flag) = &t.flag {
                condition.push(format!("flag: {}", flag.key));
            }
            if !t.assign.is_empty() {
                let assign: Vec<String> =
                    t.assign.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                condition.push(format!("assign: {}", assign.join(", ")));
            }
            out.push([
                from.clone(),
                t.event.clone(),
                t.target.clone(),
                condition.join("; "),
            ]);
        }
        if let Some(next) = &state.transition {
            let trigger = match state.state_type {
                StateType::Wait => format!("(after {timeout})"),
                _ => EVENT_COMPLETE.to_owned(),
            };
            out.push([from.clone(), trigger, next.clone(), String::new()]);
        }
        if let Some(next) = &state.on_timeout {
            out.push([
                from.clone(),
                format!("(timeout {timeout})"),
                next.clone(),
                String::new(),
            ]);
        }
        for c in &state.choices {
            out.push([
                from.clone(),
                "(choice)".into(),
                c.target.clone(),
                format!("guard: {}", c.guard),
            ]);
        }
        if let Some(next) = &state.default {
            out.push([
                from.clone(),
                "(default)".into(),
                next.clone(),
                String::new(),
            ]);
        }
        if let Some(next) = &state.on_failure {
            out.push([
                from.clone(),
                format!("{EVENT_FAIL} (no attempts left)"),
                next.clone(),
                String::new(),
            ]);
        }
    }
    out
}

/// `describe machine NAME`.
pub async fn describe(
    context: &Context,
    args: &DescribeMachineArgs,
    out: &mut Out,
) -> Result<(), CliError> {
    let api = context.connect(Access::ReadOnly)?;
    let row = api
        .machine(&context.namespace, &args.name, args.revision)
        .await?;
    let latest = match args.revision {
        None => row.revision,
        Some(_) => {
            api.machine(&context.namespace, &args.name, None)
                .await?
                .revision
        }
    };
    let filter = InstanceFilter {
        namespace: Some(context.namespace.clone()),
        machine: Some(args.name.clone()),
        ..InstanceFilter::default()
    };
    let instances = api.instances(&filter).await?;
    let definition = &row.definition;
    let now = now_ms();
    let revision_note = if row.revision == latest {
        " (latest)".to_owned()
    } else {
        format!(" (latest is {latest})")
    };
    out.line(format_args!("Name:          {}", row.name));
    out.line(format_args!("Namespace:     {}", row.namespace));
    out.line(format_args!(
        "Revision:      {}{revision_note}",
        row.revision
    ));
    out.line(format_args!("Hash:          {}", row.hash));
    out.line(format_args!(
        "Created:       {} ({} ago)",
        rfc3339_ms(row.created_ms),
        age(now, row.created_ms)
    ));
    out.line(format_args!(
        "Labels:        {}",
        labels_text(&definition.metadata.labels)
    ));
    out.line(format_args!(
        "Annotations:   {}",
        labels_text(&definition.metadata.annotations)
    ));
    out.line(format_args!(
        "Initial state: {}",
        definition.spec.initial_state
    ));

    let mut states = Table::new(["NAME", "TYPE", "TIMEOUT", "DETAILS"]);
    for state in &definition.spec.states {
        let mut details = Vec::new();
        if state.state_type == StateType::Final {
            let outcome = state.outcome.unwrap_or_default();
            details.push(format!("outcome: {}", Status::from(outcome).as_str()));
        }
        if let Some(retry) = &state.retry {
            details.push(format!(
                "retry: {} attempts, backoff {}s x{}",
                retry.max_attempts, retry.backoff_seconds, retry.backoff_rate
            ));
        }
        if let Some(compensation) = &state.compensation {
            details.push(format!("compensation: {compensation}"));
        }
        states.row(vec![
            state.name.clone(),
            state.state_type.as_str().to_owned(),
            state
                .timeout_seconds
                .map(seconds_exact)
                .unwrap_or_else(|| "-".into()),
            if details.is_empty() {
                "-".into()
            } else {
                details.join("; ")
            },
        ]);
    }
    out.line(format_args!("States ({}):", definition.spec.states.len()));
    out.text(states.render_indented("  "));

    let mut edges = Table::new(["FROM", "EVENT", "TO", "CONDITION"]);
    for [from, event, to, condition] in transitions(definition) {
        edges.row(vec![
            from,
            event,
            to,
            if condition.is_empty() {
                "-".into()
            } else {
                condition
            },
        ]);
    }
    out.line("Transitions:");
    out.text(edges.render_indented("  "));

    let counts = cnsm_runtime::count_by_status(&instances);
    let summary: Vec<String> = ["active", "succeeded", "failed", "cancelled"]
        .iter()
        .map(|s| format!("{} {s}", counts.get(s).copied().unwrap_or(0)))
        .collect();
    out.line(format_args!(
        "Instances:     {} ({})",
        instances.len(),
        summary.join(", ")
    ));
    Ok(())
}

/// `graph MACHINE`.
pub async fn graph(context: &Context, args: &GraphArgs, out: &mut Out) -> Result<(), CliError> {
    let api = context.connect(Access::ReadOnly)?;
    let row = api
        .machine(&context.namespace, &args.machine, args.revision)
        .await?;
    out.text(match args.format {
        GraphFormat::Mermaid => to_mermaid(&row.definition),
        GraphFormat::Dot => to_dot(&row.definition),
    });
    Ok(())
}

/// `delete machine NAME`: refused while instances of it are active.
pub async fn delete(
    context: &Context,
    args: &DeleteMachineArgs,
    out: &mut Out,
) -> Result<(), CliError> {
    let namespace = &context.namespace;
    let api = context.connect(Access::Mutating)?;
    api.machine(namespace, &args.name, None).await?;
    let filter = InstanceFilter {
        namespace: Some(namespace.clone()),
        machine: Some(args.name.clone()),
        status: Some(Status::Active),
        ..InstanceFilter::default()
    };
    let active = api.instances(&filter).await?;
    if !active.is_empty() {
        let shown: Vec<&str> = active.iter().take(5).map(|i| &*i.id).collect();
        let more = if active.len() > shown.len() {
            format!(" and {} more", active.len() - shown.len())
        } else {
            String::new()
        };
        return Err(CliError::conflict(format!(
            "statemachine {namespace}/{} has {} active instance(s) ({}{more}); it can be deleted once they have ended",
            args.name,
            active.len(),
            shown.join(", ")
        )));
    }
    api.delete_machine(namespace, &args.name).await?;
    out.line(format_args!("{RESOURCE}/{} deleted", args.name));
    Ok(())
}
