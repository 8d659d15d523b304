//! Request inputs with every failure turned into a problem: path segments, query strings,
//! bodies, media types and the headers the API reads.

use axum::body::Bytes;
use axum::extract::Query;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::{HeaderMap, StatusCode, header};

use crate::problem::{ApiError, ProblemKind};

/// The query string as ordered pairs.
pub type QueryPairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// A path extraction failure (bad percent-encoding and the like).
pub fn path_error(rejection: PathRejection) -> ApiError {
    ApiError::invalid(format!(
        "the request path is not valid: {}",
        rejection.body_text()
    ))
}

/// The body, or 413 past the limit.
pub fn body(result: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    result.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ProblemKind::PayloadTooLarge,
                "the request body is larger than the server's limit",
            )
        } else {
            ApiError::invalid("the request body could not be read")
        }
    })
}

/// The query pairs; a malformed query string is a 400.
pub fn query(result: QueryPairs) -> Result<Vec<(String, String)>, ApiError> {
    result
        .map(|Query(pairs)| pairs)
        .map_err(|e| ApiError::invalid(format!("the query string is not valid: {}", e.body_text())))
}

/// The last value of a query parameter.
pub fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A numeric query parameter; a value that is not a number is a 400 naming the parameter.
pub fn number<T: std::str::FromStr>(
    pairs: &[(String, String)],
    name: &str,
) -> Result<Option<T>, ApiError> {
    match param(pairs, name) {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| {
            ApiError::invalid(format!(
                "query parameter '{name}' must be a non-negative integer, got '{text}'"
            ))
        }),
    }
}

/// A boolean query parameter (`true`/`false`/`1`/`0`).
pub fn flag(pairs: &[(String, String)], name: &str) -> Result<bool, ApiError> {
    match param(pairs, name) {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "query parameter '{name}' must be true or false, got '{other}'"
        ))),
    }
}

/// The media type of the body, lowercased, without parameters; empty when absent.
pub fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// A header as text; a header that is not visible ASCII is a 400 naming it.
pub fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| ApiError::invalid(format!("header {name} is not valid text"))),
    }
}

/// The body as UTF-8 text.
pub fn utf8(body: &[u8]) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid(format!(
            "the request body is not UTF-8 text (byte {})",
            e.valid_up_to()
        ))
    })
}

/// True for media types the API reads as JSON: absent, `application/json`, any `+json`, and
/// the types `curl -d` and browsers send by default.
pub fn is_json_like(media_type: &str) -> bool {
    matches!(
        media_type,
        "" | "application/json" | "text/plain" | "application/x-www-form-urlencoded"
    ) || media_type.ends_with("+json")
}

/// The 415 for a body in a media type the route does not read.
pub fn unsupported(media_type: &str, expected: &str) -> ApiError {
    ApiError::new(
        ProblemKind::UnsupportedMediaType,
        format!("Content-Type {media_type} is not supported here; send {expected}"),
    )
}

/// Parses an `If-Match` value (`"5"`, `W/"5"` or `5`) as an expected version; `*` means any.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(text) = header_text(headers, "if-match")? else {
        return Ok(None);
    };
    if text == "*" {
        return Ok(None);
    }
    let bare = text.strip_prefix("W/").unwrap_or(text);
    let bare = bare
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(bare);
    bare.parse::<u64>().map(Some).map_err(|_| {
        ApiError::invalid(format!(
            "If-Match must be one ETag holding an instance version, like \"3\"; got {text}"
        ))
        .with("header", "If-Match")
    })
}

/// The `ETag` of a version.
pub fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

/// Checks a namespace from the path.
pub fn namespace(ns: &str) -> Result<(), ApiError> {
    cnsm_runtime::validate_name("namespace", ns).map_err(ApiError::from_runtime)
}
