//! Printing: the stdout writer, the column table, kubectl-style times, and the JSON views of
//! instances, records and definitions.
//!
//! The JSON views are the CLI's contract for scripts (`-o json`), so they are built here on
//! purpose rather than left to whatever the core types serialize to: timestamps are RFC 3339 with
//! milliseconds, hashes are hex, and every field is always present (null or empty when unset).

use std::fmt::{self, Display};
use std::io::Write;

use cnsm_core::Instance;
use cnsm_core::record::{StateChangeEvent, Timer, TimerKind};
use cnsm_runtime::HistoryEntry;
use cnsm_store::DefinitionRow;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::error::CliError;

/// Standard output. A closed pipe (`cnsmctl get instances | head`) is not an error worth a
/// panic: the rest of the output is dropped.
#[derive(Debug, Default)]
pub struct Out {
    closed: bool,
}

impl Out {
    pub fn new() -> Out {
        Out::default()
    }

    /// Prints `text` and a newline.
    pub fn line(&mut self, text: impl Display) {
        self.text(format_args!("{text}\n"));
    }

    /// Prints `text` as is.
    pub fn text(&mut self, text: impl Display) {
        if self.closed {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        if write!(stdout, "{text}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            self.closed = true;
        }
    }

    /// Prints a value as pretty JSON.
    pub fn json(&mut self, value: &impl Serialize) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| CliError::new("Internal", format!("cannot encode JSON: {e}")))?;
        self.line(text);
        Ok(())
    }

    /// Prints a value as YAML.
    pub fn yaml(&mut self, value: &impl Serialize) -> Result<(), CliError> {
        let text = serde_saphyr::to_string(value)
            .map_err(|e| CliError::new("Internal", format!("cannot encode YAML: {e}")))?;
        self.text(&text);
        if !text.ends_with('\n') {
            self.text('\n');
        }
        Ok(())
    }
}

/// Left-aligned columns separated by three spaces, as kubectl prints them.
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Table {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table with every line prefixed by `indent`.
    pub fn render_indented(&self, indent: &str) -> String {
        let n_columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(n_columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, cell) in row.iter().enumerate().take(n_columns) {
                line.push_str(cell);
                if i + 1 < n_columns {
                    let pad = widths[i] - cell.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

impl Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render_indented(""))
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-11-27T06:36:00.123Z`.
pub fn rfc3339_ms(time_ms: u64) -> String {
    let seconds = time_ms / 1000;
    let days = seconds / 86_400;
    let second_of_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        time_ms % 1000
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A duration as kubectl shows ages: `5s`, `3m`, `2h`, `4d` (the largest whole unit).
pub fn short_duration(ms: u64) -> String {
    let seconds = ms / 1000;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86_400 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

/// The age of something created at `then_ms`.
pub fn age(now_ms: u64, then_ms: u64) -> String {
    short_duration(now_ms.saturating_sub(then_ms))
}

/// A timeout in seconds in the unit it was most likely written in: `30s`, `15m`, `1h`, `7d`.
pub fn seconds_exact(seconds: u64) -> String {
    match seconds {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

pub fn timer_kind(kind: TimerKind) -> &'static str {
    match kind {
        TimerKind::Timeout => "timeout",
        TimerKind::Wait => "wait",
        TimerKind::Backoff => "backoff",
    }
}

/// `timeout in 29s`, `wait overdue 3s`, or `<none>`.
pub fn timer_due(now_ms: u64, timer: Option<&Timer>) -> String {
    match timer {
        None => "<none>".into(),
        Some(t) if t.due_ms >= now_ms => format!(
            "{} in {}",
            timer_kind(t.kind),
            short_duration(t.due_ms - now_ms)
        ),
        Some(t) => format!(
            "{} overdue {}",
            timer_kind(t.kind),
            short_duration(now_ms - t.due_ms)
        ),
    }
}

/// `k=v,k2=v2`, or `<none>`.
pub fn labels_text<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let text: Vec<String> = labels
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if text.is_empty() {
        "<none>".into()
    } else {
        text.join(",")
    }
}

/// The first 12 hex digits of a hash, enough to tell records apart on screen.
pub fn short_hash(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

/// The JSON view of an instance (`get instance -o json`).
pub fn instance_json(instance: &Instance) -> Value {
    let timer = instance.timer.map(|t| {
        json!({
            "kind": timer_kind(t.kind),
            "dueAt": rfc3339_ms(t.due_ms),
            "dueMs": t.due_ms,
            "entrySeq": t.entry_seq,
        })
    });
    json!({
        "namespace": instance.namespace,
        "id": instance.id,
        "machine": instance.machine,
        "revision": instance.revision,
        "revisionHash": instance.revision_hash.to_hex(),
        "state": instance.state,
        "status": instance.status.as_str(),
        "phase": instance.phase,
        "reason": instance.reason,
        "data": instance.data,
        "version": instance.version,
        "attempt": instance.attempt,
        "compensations": instance.compensations,
        "labels": instance.labels,
        "createdAt": rfc3339_ms(instance.created_ms),
        "updatedAt": rfc3339_ms(instance.updated_ms),
        "timer": timer,
        "lastHash": instance.last_hash.to_hex(),
    })
}

/// The JSON view of one history record: the record as stored, its `hash` and a readable `time`.
pub fn record_json(record: &StateChangeEvent, hash_hex: &str) -> Value {
    let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("time".into(), Value::String(rfc3339_ms(record.time_ms)));
        map.insert("hash".into(), Value::String(hash_hex.to_owned()));
    }
    value
}

pub fn history_json(entries: &[HistoryEntry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|e| record_json(&e.record, &e.hash.to_hex()))
            .collect(),
    )
}

/// The history table: VERSION KIND FROM TO EVENT ACTOR TIME HASH (wide: VIA, PREV-HASH).
pub fn history_table(entries: &[HistoryEntry], wide: bool) -> Table {
    let mut header = vec![
        "VERSION", "KIND", "FROM", "TO", "EVENT", "ACTOR", "TIME", "HASH",
    ];
    if wide {
        header.extend(["VIA", "PREV-HASH"]);
    }
    let mut table = Table::new(header);
    for entry in entries {
        let r = &entry.record;
        let kind = serde_json::to_value(r.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let hash = entry.hash.to_hex();
        let mut row = vec![
            r.version.to_string(),
            kind,
            r.from.as_deref().unwrap_or("-").to_owned(),
            r.to.to_string(),
            r.event.as_deref().unwrap_or("-").to_owned(),
            r.actor.to_string(),
            rfc3339_ms(r.time_ms),
            short_hash(&hash).to_owned(),
        ];
        if wide {
            row.push(if r.via.is_empty() {
                "-".into()
            } else {
                r.via.join(">")
            });
            row.push(short_hash(&r.prev_hash.to_hex()).to_owned());
        }
        table.row(row);
    }
    table
}

/// The JSON view of a stored definition: the resource as applied plus a `status` with its
/// revision, content hash and creation time.
pub fn definition_json(row: &DefinitionRow) -> Value {
    let mut value = serde_json::to_value(&row.definition).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        let mut status = Map::new();
        status.insert("revision".into(), json!(row.revision));
        status.insert("hash".into(), json!(row.hash.to_hex()));
        status.insert("createdAt".into(), json!(rfc3339_ms(row.created_ms)));
        map.insert("status".into(), Value::Object(status));
    }
    value
}

/// `{"items": [...]}`, the shape of every list in JSON and YAML.
pub fn items(values: Vec<Value>) -> Value {
    json!({ "items": values })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_798_761_599_999), "2026-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(4_107_542_400_123), "2100-03-01T00:00:00.123Z");
    }

    #[test]
    fn ages_like_kubectl() {
        let cases = [
            (0, "0s"),
            (5_900, "5s"),
            (180_000, "3m"),
            (7_300_000, "2h"),
            (4 * 86_400_000 + 5, "4d"),
        ];
        for (ms, expected) in cases {
            assert_eq!(short_duration(ms), expected, "{ms} ms");
        }
        assert_eq!(seconds_exact(604_800), "7d");
        assert_eq!(seconds_exact(900), "15m");
        assert_eq!(seconds_exact(30), "30s");
    }

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(["NAME", "STATE"]);
        table.row(vec!["o-1".into(), "created".into()]);
        table.row(vec!["order-22".into(), "paid".into()]);
        assert_eq!(
            table.to_string(),
            "NAME       STATE\no-1        created\norder-22   paid\n"
        );
    }
}
