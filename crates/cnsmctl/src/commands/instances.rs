//! Commands on instances: `create instance`, `send`, `get instances`, `describe instance`,
//! `history`.

use cnsm_core::{Instance, StateChangeEvent, Status};
use cnsm_runtime::{
    Control, ControlRequest, CreateInstance, EraseRequest, EventRequest, TransitionOutcome,
};
use serde_json::{Map, Value, json};

use super::{Context, no_resources, parse_json, parse_labels};
use crate::api::{Access, Api, Connection, InstanceFilter};
use crate::cli::{
    ControlArgs, CreateInstanceArgs, DescribeInstanceArgs, EraseArgs, GetInstancesArgs,
    HistoryArgs, OutputFormat, ResultFormat, SendArgs, StatusArg,
};
use crate::error::CliError;
use crate::output::{
    Out, Table, age, history_json, history_table, instance_json, items, labels_text, now_ms,
    record_json, rfc3339_ms, short_duration, timer_due, timer_kind,
};

/// The JSON type of a value, for messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses `--data`: a JSON object.
pub fn parse_data(text: &str) -> Result<Map<String, Value>, CliError> {
    match parse_json("--data", text)? {
        Value::Object(map) => Ok(map),
        other => Err(CliError::invalid(format!(
            "--data must be a JSON object, got {}",
            json_kind(&other)
        ))),
    }
}

/// `instance/ID created (state S, version 0)`.
pub fn created_line(instance: &Instance) -> String {
    format!(
        "instance/{} created (state {}, version {})",
        instance.id, instance.state, instance.version
    )
}

/// `instance/ID: FROM -> TO (version N)`, with the choice states passed through and tags for a
/// replayed result or an instance that has ended.
pub fn transition_line(outcome: &TransitionOutcome) -> String {
    let record = &outcome.record;
    let Some(from) = record.from.as_deref() else {
        return format!(
            "instance/{} created (state {}, version {})",
            record.instance, record.to, record.version
        );
    };
    let via = if record.via.is_empty() {
        String::new()
    } else {
        format!(" (via {})", record.via.join(", "))
    };
    let mut line = format!(
        "instance/{}: {from} -> {}{via} (version {})",
        outcome.instance.id, record.to, outcome.instance.version
    );
    let mut tags = Vec::new();
    if outcome.replayed {
        tags.push("replayed: idempotency key already applied, nothing changed");
    }
    if outcome.instance.status.is_final() {
        tags.push(outcome.instance.status.as_str());
    }
    if !tags.is_empty() {
        line.push_str(&format!(" [{}]", tags.join(", ")));
    }
    line
}

/// The JSON view of a send result: the record (with its hash), the instance after it, and
/// whether it was a replay.
pub fn outcome_json(outcome: &TransitionOutcome) -> Value {
    json!({
        "record": record_json(&outcome.record, &outcome.hash.to_hex()),
        "instance": instance_json(&outcome.instance),
        "replayed": outcome.replayed,
    })
}

/// `create instance MACHINE`.
pub async fn create(
    context: &Context,
    args: &CreateInstanceArgs,
    out: &mut Out,
) -> Result<(), CliError> {
    let data = args
        .data
        .as_deref()
        .map(parse_data)
        .transpose()?
        .unwrap_or_default();
    let labels = parse_labels("--label", &args.labels)?;
    let mut request = CreateInstance::new(&context.namespace, &args.machine).data(data);
    request.id = args.id.clone();
    request.labels = labels.into_iter().collect();
    request.revision = args.revision;
    request.actor = args.actor.clone();
    let api = context.connect(Access::Mutating)?;
    let instance = api.create_instance(request).await?;
    match args.output {
        ResultFormat::Text => {
            out.line(created_line(&instance));
            Ok(())
        }
        ResultFormat::Json => out.json(&instance_json(&instance)),
        ResultFormat::Yaml => out.yaml(&instance_json(&instance)),
    }
}

/// `send ID EVENT`.
pub async fn send(context: &Context, args: &SendArgs, out: &mut Out) -> Result<(), CliError> {
    let payload = args
        .payload
        .as_deref()
        .map(|p| parse_json("--payload", p))
        .transpose()?
        .unwrap_or(Value::Null);
    let mut event = EventRequest::new(&args.event)
        .payload(payload)
        .actor(&args.actor);
    event.expected_version = args.expected_version;
    event.idempotency_key = args.idempotency_key.clone();
    let api = context.connect(Access::Mutating)?;
    let outcome = api.send(&context.namespace, &args.id, event).await?;
    match args.output {
        ResultFormat::Text => {
            out.line(transition_line(&outcome));
            Ok(())
        }
        ResultFormat::Json => out.json(&outcome_json(&outcome)),
        ResultFormat::Yaml => out.yaml(&outcome_json(&outcome)),
    }
}

/// `cancel|suspend|resume|redrive ID`.
pub async fn control(
    context: &Context,
    action: Control,
    args: &ControlArgs,
    out: &mut Out,
) -> Result<(), CliError> {
    let mut request = ControlRequest::new(action).actor(&args.actor);
    request.reason = args.reason.clone();
    let api = context.connect(Access::Mutating)?;
    let outcome = api.control(&context.namespace, &args.id, request).await?;
    match args.output {
        ResultFormat::Text => {
            out.line(format_args!(
                "instance/{} {}: state {}, status {}{} (version {})",
                outcome.instance.id,
                past_tense(action),
                outcome.instance.state,
                outcome.instance.status.as_str(),
                if outcome.instance.suspended {
                    ", suspended"
                } else {
                    ""
                },
                outcome.instance.version
            ));
            Ok(())
        }
        ResultFormat::Json => out.json(&outcome_json(&outcome)),
        ResultFormat::Yaml => out.yaml(&outcome_json(&outcome)),
    }
}

/// `erase ID [--field PATH]... [--reason R]`.
pub async fn erase(context: &Context, args: &EraseArgs, out: &mut Out) -> Result<(), CliError> {
    let request = EraseRequest {
        fields: args.fields.clone(),
        reason: args.reason.clone(),
        trace: None,
        actor: args.actor.clone(),
    };
    let api = context.connect(Access::Mutating)?;
    let outcome = api.erase(&context.namespace, &args.id, request).await?;
    match args.output {
        ResultFormat::Text => {
            let n_records = outcome
                .record
                .erasure
                .as_ref()
                .map_or(0, |e| e.records.len());
            let what = if args.fields.is_empty() {
                "all data and payloads".to_owned()
            } else {
                args.fields.join(", ")
            };
            out.line(format_args!(
                "instance/{} erased ({what}): {n_records} record(s) redacted, erasure record at version {}",
                outcome.instance.id, outcome.instance.version
            ));
            Ok(())
        }
        ResultFormat::Json => out.json(&outcome_json(&outcome)),
        ResultFormat::Yaml => out.yaml(&outcome_json(&outcome)),
    }
}

fn past_tense(action: Control) -> &'static str {
    match action {
        Control::Cancel => "cancelled",
        Control::Suspend => "suspended",
        Control::Resume => "resumed",
        Control::Redrive => "redriven",
    }
}

fn status_of(arg: StatusArg) -> Status {
    match arg {
        StatusArg::Active => Status::Active,
        StatusArg::Succeeded => Status::Succeeded,
        StatusArg::Failed => Status::Failed,
        StatusArg::Cancelled => Status::Cancelled,
    }
}

/// `get instances [ID] [-w]`.
pub async fn get(
    context: &Context,
    args: &GetInstancesArgs,
    out: &mut Out,
) -> Result<(), CliError> {
    if args.all_namespaces && args.id.is_some() {
        return Err(CliError::invalid(
            "an instance cannot be retrieved by id across all namespaces",
        ));
    }
    if args.watch && context.server.is_none() {
        return Err(CliError::invalid(
            "watching (-w) needs a server: start `cnsmctl serve` and pass --server URL \
             (or set CNSM_SERVER)",
        ));
    }
    let filter = InstanceFilter {
        namespace: (!args.all_namespaces).then(|| context.namespace.clone()),
        machine: args.machine.clone(),
        state: args.state.clone(),
        status: args.status.map(status_of),
        labels: parse_labels("-l", &args.labels)?,
        limit: args.limit,
    };
    let api = context.connect(Access::ReadOnly)?;
    // Open the watch before listing, so nothing committed in between is missed.
    let stream = match (&api, args.watch) {
        (Connection::Remote(remote), true) => {
            Some(remote.watch(&filter, args.id.as_deref()).await?)
        }
        _ => None,
    };
    match &args.id {
        None => {
            let instances = api.instances(&filter).await?;
            match args.output {
                OutputFormat::Json => {
                    out.json(&items(instances.iter().map(instance_json).collect()))?
                }
                OutputFormat::Yaml => {
                    out.yaml(&items(instances.iter().map(instance_json).collect()))?
                }
                OutputFormat::Table | OutputFormat::Wide if instances.is_empty() => {
                    no_resources(filter.namespace.as_deref());
                }
                OutputFormat::Table | OutputFormat::Wide => {
                    out.text(instances_table(
                        &instances,
                        args.all_namespaces,
                        args.output == OutputFormat::Wide,
                    ));
                }
            }
        }
        Some(id) => {
            let instance = api.instance(&context.namespace, id).await?;
            match args.output {
                OutputFormat::Json => out.json(&instance_json(&instance))?,
                OutputFormat::Yaml => out.yaml(&instance_json(&instance))?,
                OutputFormat::Table | OutputFormat::Wide => {
                    out.text(instances_table(
                        std::slice::from_ref(&instance),
                        false,
                        args.output == OutputFormat::Wide,
                    ));
                }
            }
        }
    }
    match stream {
        Some(stream) => watch(stream, args, out).await,
        None => Ok(()),
    }
}

/// Prints one line per transition until the server ends the stream (or the process is
/// stopped). JSON output prints one compact object per line: record, hash, instance.
async fn watch(
    mut stream: cnsm_server::client::EventStream,
    args: &GetInstancesArgs,
    out: &mut Out,
) -> Result<(), CliError> {
    loop {
        let event = stream
            .next_event()
            .await
            .map_err(|e| CliError::unavailable(format!("the watch stream broke: {e}")))?;
        let Some(event) = event else {
            return Ok(());
        };
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        match event.event.as_str() {
            "transition" => {}
            "error" => {
                let message = data["message"]
                    .as_str()
                    .unwrap_or("the server ended the watch");
                return Err(CliError::unavailable(format!("watch ended: {message}")));
            }
            // The opening `instance` event repeats what was just printed.
            _ => continue,
        }
        let Ok(record) = serde_json::from_value::<StateChangeEvent>(data["record"].clone()) else {
            continue;
        };
        let instance: Option<Instance> = serde_json::from_value(data["instance"].clone()).ok();
        match (args.output, instance) {
            (OutputFormat::Json | OutputFormat::Yaml, Some(instance)) => {
                let hash = data["hash"].as_str().unwrap_or_default();
                let value = json!({
                    "record": record_json(&record, hash),
                    "instance": instance_json(&instance),
                });
                out.line(value);
            }
            (_, instance) => {
                let line = watch_line(&record, instance.as_ref());
                if args.all_namespaces {
                    out.line(format_args!("{}\t{line}", record.namespace));
                } else {
                    out.line(line);
                }
            }
        }
    }
}

/// `instance/ID: FROM -> TO (version N)` for a watched record, as `send` prints it.
fn watch_line(record: &StateChangeEvent, instance: Option<&Instance>) -> String {
    let Some(from) = record.from.as_deref() else {
        return format!(
            "instance/{} created (state {}, version {})",
            record.instance, record.to, record.version
        );
    };
    let via = if record.via.is_empty() {
        String::new()
    } else {
        format!(" (via {})", record.via.join(", "))
    };
    let mut line = format!(
        "instance/{}: {from} -> {}{via} (version {})",
        record.instance, record.to, record.version
    );
    if let Some(event) = &record.event {
        line.push_str(&format!(" on {event}"));
    }
    if let Some(status) = instance.map(|i| i.status).filter(|s| s.is_final()) {
        line.push_str(&format!(" [{}]", status.as_str()));
    }
    line
}

/// ID MACHINE REV STATE STATUS VERSION AGE; wide adds LABELS TIMER-DUE UPDATED.
fn instances_table(instances: &[Instance], with_namespace: bool, wide: bool) -> Table {
    let mut header = Vec::new();
    if with_namespace {
        header.push("NAMESPACE");
    }
    header.extend(["ID", "MACHINE", "REV", "STATE", "STATUS", "VERSION", "AGE"]);
    if wide {
        header.extend(["LABELS", "TIMER-DUE", "UPDATED"]);
    }
    let now = now_ms();
    let mut table = Table::new(header);
    for i in instances {
        let mut cells = Vec::new();
        if with_namespace {
            cells.push(i.namespace.to_string());
        }
        cells.extend([
            i.id.to_string(),
            i.machine.to_string(),
            i.revision.to_string(),
            i.state.to_string(),
            i.status.as_str().to_owned(),
            i.version.to_string(),
            age(now, i.created_ms),
        ]);
        if wide {
            cells.push(labels_text(&i.labels));
            cells.push(timer_due(now, i.timer.as_ref()));
            cells.push(age(now, i.updated_ms));
        }
        table.row(cells);
    }
    table
}

/// `describe instance ID`.
pub async fn describe(
    context: &Context,
    args: &DescribeInstanceArgs,
    out: &mut Out,
) -> Result<(), CliError> {
    let api = context.connect(Access::ReadOnly)?;
    let i = api.instance(&context.namespace, &args.id).await?;
    let n_records = args.records.max(1);
    let from = (i.version + 1).saturating_sub(n_records as u64);
    let records = api
        .history(&context.namespace, &args.id, from, n_records)
        .await?;
    let now = now_ms();
    let phase = serde_json::to_value(i.phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    out.line(format_args!("Name:        {}", i.id));
    out.line(format_args!("Namespace:   {}", i.namespace));
    out.line(format_args!(
        "Machine:     {} (revision {}, {})",
        i.machine, i.revision, i.revision_hash
    ));
    out.line(format_args!("State:       {}", i.state));
    out.line(format_args!("Status:      {}", i.status.as_str()));
    out.line(format_args!("Phase:       {phase}"));
    out.line(format_args!(
        "Reason:      {}",
        i.reason.as_deref().unwrap_or("<none>")
    ));
    out.line(format_args!("Version:     {}", i.version));
    out.line(format_args!(
        "Attempt:     {}{}",
        i.attempt,
        if i.in_backoff { " (in back-off)" } else { "" }
    ));
    out.line(format_args!("Labels:      {}", labels_text(&i.labels)));
    out.line(format_args!(
        "Created:     {} ({} ago)",
        rfc3339_ms(i.created_ms),
        age(now, i.created_ms)
    ));
    out.line(format_args!(
        "Updated:     {} ({} ago)",
        rfc3339_ms(i.updated_ms),
        age(now, i.updated_ms)
    ));
    match &i.timer {
        Some(t) => {
            let relative = if t.due_ms >= now {
                format!("in {}", short_duration(t.due_ms - now))
            } else {
                format!("overdue by {}", short_duration(now - t.due_ms))
            };
            out.line(format_args!(
                "Timer:       {} due {} ({relative})",
                timer_kind(t.kind),
                rfc3339_ms(t.due_ms)
            ));
        }
        None => out.line("Timer:       <none>"),
    }
    if !i.compensations.is_empty() {
        out.line(format_args!(
            "Compensations pending: {}",
            i.compensations.join(", ")
        ));
    }
    out.line(format_args!("Last hash:   {}", i.last_hash));
    let data = serde_json::to_string_pretty(&i.data).unwrap_or_default();
    out.line("Data:");
    for line in data.lines() {
        out.line(format_args!("  {line}"));
    }
    out.line(format_args!(
        "Records ({} of {}):",
        records.len(),
        i.version + 1
    ));
    out.text(history_table(&records, false).render_indented("  "));
    Ok(())
}

/// `history ID`.
pub async fn history(context: &Context, args: &HistoryArgs, out: &mut Out) -> Result<(), CliError> {
    let api = context.connect(Access::ReadOnly)?;
    let entries = api
        .history(&context.namespace, &args.id, args.from, args.limit)
        .await?;
    match args.output {
        OutputFormat::Json => out.json(&history_json(&entries)),
        OutputFormat::Yaml => out.yaml(&history_json(&entries)),
        OutputFormat::Table | OutputFormat::Wide => {
            out.text(history_table(&entries, args.output == OutputFormat::Wide));
            if entries.len() == args.limit
                && let Some(last) = entries.last()
            {
                eprintln!(
                    "(showing {} records; more may follow: --from {})",
                    entries.len(),
                    last.record.version + 1
                );
            }
            Ok(())
        }
    }
}
