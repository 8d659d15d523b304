//! Turns an event request into one [`EventRequest`]: a plain JSON body, a structured-mode
//! CloudEvent (`application/cloudevents+json`) or a binary-mode one (`ce-*` headers).
//!
//! CloudEvents mapping (DESIGN.md §3): `type` is the event name, `data` the payload, and
//! `source` + " " + `id` the idempotency key (a CloudEvent is unique by source and id).
//! `specversion` must be `1.0`. The trace context comes from the CloudEvents distributed-tracing
//! extension (`traceparent`, `tracestate`) first, then the W3C `traceparent`/`tracestate`
//! headers; an invalid one is ignored. It becomes the parent of the transition span.

use axum::http::HeaderMap;
use cnsm_runtime::{EventRequest, TraceParent};
use serde_json::{Map, Value};

use crate::params::{self, header_text};
use crate::problem::ApiError;
use crate::wire::{ANONYMOUS_ACTOR, CONTENT_TYPE_CLOUDEVENTS, EventBody};

/// The CloudEvents attributes every event must carry.
const REQUIRED_ATTRIBUTES: [&str; 4] = ["specversion", "id", "source", "type"];

/// Parses the event of a `POST .../events` request. `If-Match` and `Idempotency-Key` apply to
/// every mode; a CloudEvent's own key (`source` + `id`) wins over `Idempotency-Key`.
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<EventRequest, ApiError> {
    let media_type = params::media_type(headers);
    let mut event = if media_type == CONTENT_TYPE_CLOUDEVENTS {
        structured(body)?
    } else if media_type == "application/cloudevents-batch+json" {
        return Err(params::unsupported(
            &media_type,
            "one event per request (plain JSON or a CloudEvent)",
        ));
    } else if headers.keys().any(|k| k.as_str().starts_with("ce-")) {
        binary(headers, &media_type, body)?
    } else if params::is_json_like(&media_type) {
        plain(body)?
    } else {
        return Err(params::unsupported(
            &media_type,
            "application/json or application/cloudevents+json",
        ));
    };
    event.expected_version = params::if_match(headers)?;
    if event.idempotency_key.is_none() {
        event.idempotency_key = header_text(headers, "idempotency-key")?
            .filter(|k| !k.is_empty())
            .map(str::to_owned);
    }
    if let Some(key) = &event.idempotency_key
        && key.len() > 512
    {
        return Err(ApiError::invalid(
            "the idempotency key is longer than 512 bytes",
        ));
    }
    if event.trace.is_none()
        && let Some(parent) = header_text(headers, "traceparent")
            .ok()
            .flatten()
            .and_then(|t| TraceParent::parse(t, header_text(headers, "tracestate").ok().flatten()))
    {
        event = event.traced(parent);
    }
    Ok(event)
}

fn plain(body: &[u8]) -> Result<EventRequest, ApiError> {
    let parsed: EventBody =
        serde_json::from_slice(body).map_err(|e| ApiError::json("the event body", &e))?;
    Ok(EventRequest::new(parsed.event)
        .payload(parsed.payload)
        .actor(parsed.actor.unwrap_or_else(|| ANONYMOUS_ACTOR.to_owned())))
}

/// The invalid-CloudEvent problem, naming every attribute at fault.
fn bad_cloudevent(attributes: &[&str], why: &str) -> ApiError {
    let names: Vec<String> = attributes.iter().map(|a| format!("'{a}'")).collect();
    ApiError::invalid(format!(
        "invalid CloudEvent: attribute {} {why}",
        names.join(", ")
    ))
    .with(
        "attributes",
        attributes
            .iter()
            .map(|a| Value::from(*a))
            .collect::<Vec<_>>(),
    )
}

/// Checks the required attributes, each a non-empty string; `specversion` must be `1.0`.
fn check_required(get: impl Fn(&str) -> Option<Value>) -> Result<[String; 4], ApiError> {
    let mut missing = Vec::new();
    let mut invalid = Vec::new();
    let mut values: [String; 4] = Default::default();
    for (slot, name) in values.iter_mut().zip(REQUIRED_ATTRIBUTES) {
        match get(name) {
            None | Some(Value::Null) => missing.push(name),
            Some(Value::String(s)) if !s.is_empty() => *slot = s,
            Some(_) => invalid.push(name),
        }
    }
    if !missing.is_empty() {
        return Err(bad_cloudevent(
            &missing,
            "is missing (required: specversion, id, source, type)",
        ));
    }
    if !invalid.is_empty() {
        return Err(bad_cloudevent(&invalid, "must be a non-empty string"));
    }
    if values[0] != "1.0" {
        return Err(bad_cloudevent(
            &["specversion"],
            &format!("must be \"1.0\", got \"{}\"", values[0]),
        ));
    }
    Ok(values)
}

fn cloudevent(
    [_, id, source, event_type]: [String; 4],
    data: Value,
    trace: Option<TraceParent>,
) -> EventRequest {
    let event = EventRequest::new(event_type)
        .payload(data)
        .idempotency_key(format!("{source} {id}"))
        .actor(ANONYMOUS_ACTOR);
    match trace {
        Some(parent) => event.traced(parent),
        None => event,
    }
}

fn is_json_content_type(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    media == "application/json" || media.ends_with("+json") || media == "text/json"
}

fn structured(body: &[u8]) -> Result<EventRequest, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::json("the CloudEvent", &e))?;
    let Value::Object(mut attributes) = value else {
        return Err(ApiError::invalid(
            "invalid CloudEvent: a structured-mode event must be a JSON object",
        ));
    };
    let required = check_required(|name| attributes.get(name).cloned())?;
    if attributes.contains_key("data_base64") {
        return Err(bad_cloudevent(
            &["data_base64"],
            "is not supported: event data must be JSON (use data)",
        ));
    }
    if let Some(content_type) = attributes.get("datacontenttype") {
        match content_type.as_str() {
            Some(ct) if is_json_content_type(ct) => {}
            _ => {
                return Err(bad_cloudevent(
                    &["datacontenttype"],
                    "must be a JSON media type (application/json)",
                ));
            }
        }
    }
    let trace = attributes
        .get("traceparent")
        .and_then(Value::as_str)
        .and_then(|t| TraceParent::parse(t, attributes.get("tracestate").and_then(Value::as_str)));
    let data = attributes.remove("data").unwrap_or(Value::Null);
    Ok(cloudevent(required, data, trace))
}

fn binary(headers: &HeaderMap, media_type: &str, body: &[u8]) -> Result<EventRequest, ApiError> {
    let mut attributes = Map::new();
    for name in REQUIRED_ATTRIBUTES {
        let header = format!("ce-{name}");
        if let Some(value) = header_text(headers, &header)? {
            attributes.insert(name.to_owned(), Value::from(value));
        }
    }
    let required = check_required(|name| attributes.get(name).cloned())?;
    let data = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else if media_type.is_empty() || is_json_content_type(media_type) {
        serde_json::from_slice(body).map_err(|e| ApiError::json("the CloudEvent data", &e))?
    } else {
        return Err(bad_cloudevent(
            &["datacontenttype"],
            &format!("must be a JSON media type in binary mode, got Content-Type {media_type}"),
        ));
    };
    let trace = header_text(headers, "ce-traceparent")
        .ok()
        .flatten()
        .and_then(|t| TraceParent::parse(t, header_text(headers, "ce-tracestate").ok().flatten()));
    Ok(cloudevent(required, data, trace))
}

/// Parses a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`); `None` when invalid.
#[cfg(test)]
fn parse_traceparent(text: &str) -> Option<cnsm_core::record::TraceContext> {
    TraceParent::parse(text, None).map(|p| p.context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = parse_traceparent(good).expect("valid");
        assert_eq!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.span_id, "00f067aa0ba902b7");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn trace_context_with_state_and_flags_becomes_the_parent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        // Plain JSON with the W3C headers.
        let event = parse(
            &headers(&[
                ("content-type", "application/json"),
                ("traceparent", tp),
                ("tracestate", "congo=t61rcWkgMzE"),
            ]),
            br#"{"event":"go"}"#,
        )
        .expect("parses");
        let parent = event.trace_parent.expect("a parent");
        assert!(!parent.sampled);
        assert_eq!(parent.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(event.trace, Some(parent.context));
        // Binary CloudEvent: the ce- headers win over the plain ones.
        let event = parse(
            &headers(&[
                ("content-type", "application/json"),
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "s"),
                ("ce-type", "go"),
                (
                    "ce-traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
                ("ce-tracestate", "rojo=1"),
                ("traceparent", tp),
            ]),
            b"{}",
        )
        .expect("parses");
        let parent = event.trace_parent.expect("a parent");
        assert_eq!(parent.context.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert!(parent.sampled);
        assert_eq!(parent.tracestate.as_deref(), Some("rojo=1"));
        // An invalid traceparent is ignored.
        let event = parse(
            &headers(&[
                ("content-type", "application/json"),
                ("traceparent", "junk"),
            ]),
            br#"{"event":"go"}"#,
        )
        .expect("parses");
        assert!(event.trace_parent.is_none() && event.trace.is_none());
    }
}
