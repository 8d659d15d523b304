//! Bearer-token authentication with namespace-scoped roles (`--auth-file`).
//!
//! An [`AuthConfig`] is a list of tokens, each with a `name` (the subject recorded as the actor of
//! its events) and grants `(namespace or "*", role)`. Roles are ordered: `reader` (GET) <
//! `writer` (+ create instances, send events) < `admin` (+ apply and delete statemachines).
//!
//! Tokens are kept only as SHA-256 digests. A presented token is hashed and compared with every
//! digest in constant time, so neither the token nor how much of it matched shows in timing,
//! logs or error messages.
//!
//! Two middlewares do the work: [`authenticate`] (on the whole router) answers 401 to any
//! `/apis/...` or `/debug/...` request without a known token and leaves a [`Caller`] in the
//! request; [`authorize`] (on each route, with that route's [`Access`]) answers 403 when the
//! caller's grants do not cover the route's namespace and role.
//!
//! ```
//! use cnsm_server::auth::{AuthConfig, Role};
//! let yaml = "tokens:\n- name: ci-bot\n  token: s3cret-token\n  roles:\n  - {namespace: shop, role: writer}\n";
//! let (config, warnings) = AuthConfig::from_yaml(yaml).unwrap();
//! assert_eq!(warnings.len(), 1); // plaintext tokens are discouraged
//! let caller = config.authenticate("s3cret-token").unwrap();
//! assert_eq!(caller.name, "ci-bot");
//! assert!(caller.allows(Some("shop"), Role::Writer));
//! assert!(!caller.allows(Some("shop"), Role::Admin));
//! assert!(!caller.allows(Some("other"), Role::Reader));
//! ```

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::ServerState;
use crate::problem::{ApiError, ProblemKind};

/// Largest auth file read (it is a short list of tokens).
pub const AUTH_FILE_BYTES_MAX: usize = 1 << 20;

/// What a token may do in a namespace. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// GET: read machines, instances, history; watch.
    Reader,
    /// Also create instances and send events.
    Writer,
    /// Also apply and delete statemachines.
    Admin,
}

impl Role {
    /// The lowercase name used in the auth file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token (health probes, the OpenAPI document).
    Open,
    /// `role` in the namespace of the `{ns}` path segment.
    Namespace(Role),
    /// `role` on every namespace (a grant on `"*"`): cross-namespace lists, diagnostics.
    AllNamespaces(Role),
}

/// One grant: a namespace (or `"*"` for all) and a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// A namespace name, or `"*"`.
    pub namespace: String,
    /// The role granted there.
    pub role: Role,
}

/// A known token's identity: its name and grants (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The subject, recorded as the actor of the events it sends.
    pub name: String,
    /// Where it may do what.
    pub grants: Vec<Grant>,
}

impl Principal {
    /// True when a grant covers `role` in `namespace` (`None`: every namespace, which only a
    /// `"*"` grant covers).
    pub fn allows(&self, namespace: Option<&str>, role: Role) -> bool {
        self.grants.iter().any(|grant| {
            grant.role >= role
                && (grant.namespace == "*" || Some(grant.namespace.as_str()) == namespace)
        })
    }
}

/// Who made a request, as the middleware leaves it in the request's extensions.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Authentication is off: everyone may do everything.
    Anonymous,
    /// A known token.
    Token(Arc<Principal>),
}

impl Caller {
    /// The actor to record for this caller, when authentication decides it.
    pub fn actor(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::Token(principal) => Some(&principal.name),
        }
    }
}

struct TokenEntry {
    digest: [u8; 32],
    principal: Arc<Principal>,
}

/// The tokens a server accepts.
pub struct AuthConfig {
    tokens: Vec<TokenEntry>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests are not secrets, but there is no reason to print them either.
        let names: Vec<&str> = self
            .tokens
            .iter()
            .map(|t| t.principal.name.as_str())
            .collect();
        f.debug_struct("AuthConfig")
            .field("tokens", &names)
            .finish()
    }
}

/// Why an auth file was refused. Messages name the field (and the line when the YAML parser
/// knows it) and never contain a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthFileError {
    /// The file could not be read.
    #[error("cannot read the auth file {path}: {reason}")]
    Read { path: String, reason: String },
    /// Not YAML of the expected shape.
    #[error("the auth file is not valid: {0}")]
    Syntax(String),
    /// A field has a value the server cannot use.
    #[error("the auth file is not valid: {field}: {reason}")]
    Field { field: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    tokens: Vec<TokenDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TokenDoc {
    name: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_sha256: Option<String>,
    roles: Vec<RoleDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleDoc {
    namespace: String,
    role: Role,
}

/// SHA-256 of a token.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lowercase hex of a digest (for writing `tokenSha256`).
pub fn digest_hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, slot) in digest.iter_mut().enumerate() {
        *slot = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(digest)
}

/// Equality that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

impl AuthConfig {
    /// Reads and checks an auth file. Returns the config and warnings (plaintext tokens).
    pub fn load(path: &std::path::Path) -> Result<(AuthConfig, Vec<String>), AuthFileError> {
        let read_error = |reason: String| AuthFileError::Read {
            path: path.display().to_string(),
            reason,
        };
        let metadata = std::fs::metadata(path).map_err(|e| read_error(e.to_string()))?;
        if metadata.len() > AUTH_FILE_BYTES_MAX as u64 {
            return Err(read_error(format!(
                "larger than {AUTH_FILE_BYTES_MAX} bytes"
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| read_error(e.to_string()))?;
        AuthConfig::from_yaml(&text)
    }

    /// Parses and checks the YAML of an auth file (see the module docs for the shape).
    pub fn from_yaml(text: &str) -> Result<(AuthConfig, Vec<String>), AuthFileError> {
        if text.len() > AUTH_FILE_BYTES_MAX {
            return Err(AuthFileError::Syntax(format!(
                "larger than {AUTH_FILE_BYTES_MAX} bytes"
            )));
        }
        let doc: FileDoc = serde_saphyr::from_str(text)
            .map_err(|e| AuthFileError::Syntax(redact_tokens(&e.to_string(), text)))?;
        let field = |i: usize, name: &str, reason: String| AuthFileError::Field {
            field: format!("tokens[{i}].{name}"),
            reason,
        };
        if doc.tokens.is_empty() {
            return Err(AuthFileError::Field {
                field: "tokens".into(),
                reason: "must list at least one token".into(),
            });
        }
        let mut warnings = Vec::new();
        let mut names = HashSet::new();
        let mut digests: Vec<[u8; 32]> = Vec::new();
        let mut tokens = Vec::with_capacity(doc.tokens.len());
        for (i, token) in doc.tokens.into_iter().enumerate() {
            let name = token.name.trim().to_owned();
            if name.is_empty() || name.len() > 253 || name.chars().any(char::is_control) {
                return Err(field(
                    i,
                    "name",
                    "must be a non-empty name of at most 253 characters".into(),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(field(i, "name", format!("'{name}' is used by two tokens")));
            }
            let digest = match (&token.token, &token.token_sha256) {
                (Some(_), Some(_)) => {
                    return Err(field(
                        i,
                        "token",
                        "give either token or tokenSha256, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(field(
                        i,
                        "tokenSha256",
                        "missing (give tokenSha256, the hex SHA-256 of the token, or token)".into(),
                    ));
                }
                (Some(plain), None) => {
                    if plain.len() < 8 {
                        return Err(field(
                            i,
                            "token",
                            "must be at least 8 characters long".into(),
                        ));
                    }
                    warnings.push(format!(
                        "auth file: tokens[{i}] ({name}) has a plaintext `token`; this is \
                         discouraged, store `tokenSha256` (the hex SHA-256 of the token) instead"
                    ));
                    token_digest(plain)
                }
                (None, Some(hex)) => parse_hex_digest(hex).ok_or_else(|| {
                    field(
                        i,
                        "tokenSha256",
                        "must be 64 hexadecimal digits (the SHA-256 of the token)".into(),
                    )
                })?,
            };
            if digests.iter().any(|d| constant_time_eq(d, &digest)) {
                return Err(field(
                    i,
                    "tokenSha256",
                    "the same token is listed twice".into(),
                ));
            }
            digests.push(digest);
            if token.roles.is_empty() {
                return Err(field(i, "roles", "must list at least one role".into()));
            }
            let mut grants = Vec::with_capacity(token.roles.len());
            for (j, role) in token.roles.into_iter().enumerate() {
                let namespace = role.namespace.trim().to_owned();
                if namespace != "*" && cnsm_runtime::validate_name("namespace", &namespace).is_err()
                {
                    return Err(field(
                        i,
                        &format!("roles[{j}].namespace"),
                        format!("'{namespace}' is not a namespace name or \"*\""),
                    ));
                }
                grants.push(Grant {
                    namespace,
                    role: role.role,
                });
            }
            tokens.push(TokenEntry {
                digest,
                principal: Arc::new(Principal { name, grants }),
            });
        }
        Ok((AuthConfig { tokens }, warnings))
    }

    /// The principal of a presented token, comparing its digest with every known digest in
    /// constant time.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Principal>> {
        let digest = token_digest(token);
        let mut found = None;
        for entry in &self.tokens {
            if constant_time_eq(&entry.digest, &digest) {
                found = Some(Arc::clone(&entry.principal));
            }
        }
        found
    }
}

/// The parser's message, first line only (later lines quote the source), with every value
/// of a `token:` key in `text` replaced: a plaintext token must never be echoed.
fn redact_tokens(message: &str, text: &str) -> String {
    let mut first_line = message
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .trim_start_matches("error: ")
        .to_owned();
    for (at, _) in text.match_indices("token:") {
        let value = text[at + "token:".len()..]
            .split(['\n', ',', '}'])
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches(['"', '\'']);
        if !value.is_empty() {
            first_line = first_line.replace(value, "<redacted>");
        }
    }
    first_line
}

/// The bearer token of a request, if it has one.
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn unauthorized(detail: &str) -> Response {
    let mut response = ApiError::new(ProblemKind::Unauthorized, detail).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// True for the paths that need a token when authentication is on.
fn is_protected(path: &str) -> bool {
    path.starts_with("/apis/") || path == "/apis" || path.starts_with("/debug/")
}

/// Router-wide: with authentication on, a protected path needs a known bearer token (401
/// otherwise). Leaves the [`Caller`] in the request for [`authorize`] and the handlers.
pub(crate) async fn authenticate(
    State(state): State<ServerState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(config) = state.options().auth.clone() else {
        request.extensions_mut().insert(Caller::Anonymous);
        return next.run(request).await;
    };
    if let Some(principal) = bearer(&request).and_then(|token| config.authenticate(token)) {
        request.extensions_mut().insert(Caller::Token(principal));
    } else if is_protected(request.uri().path()) {
        return unauthorized(if request.headers().contains_key(header::AUTHORIZATION) {
            "the bearer token is not valid"
        } else {
            "this server requires a bearer token (Authorization: Bearer <token>)"
        });
    }
    next.run(request).await
}

/// Per route: checks the caller's grants against the route's [`Access`] (403 otherwise).
pub(crate) async fn authorize(
    State(access): State<Access>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    request: Request,
    next: Next,
) -> Response {
    let (namespace, role) = match access {
        Access::Open => return next.run(request).await,
        Access::Namespace(role) => {
            let namespace = params.ok().and_then(|params| {
                params
                    .iter()
                    .find(|(key, _)| *key == "ns")
                    .map(|(_, value)| value.to_owned())
            });
            match namespace {
                Some(ns) => (Some(ns), role),
                // A namespace that cannot be read is rejected before any handler runs.
                None => {
                    return ApiError::invalid("the namespace in the path is not valid")
                        .into_response();
                }
            }
        }
        Access::AllNamespaces(role) => (None, role),
    };
    let principal = match request.extensions().get::<Caller>() {
        Some(Caller::Anonymous) => return next.run(request).await,
        Some(Caller::Token(principal)) => Arc::clone(principal),
        // Fail closed: a route reached without the authentication middleware.
        None => return unauthorized("this server requires a bearer token"),
    };
    if principal.allows(namespace.as_deref(), role) {
        return next.run(request).await;
    }
    let scope = match &namespace {
        Some(ns) => format!("namespace {ns}"),
        None => "all namespaces (a grant on \"*\")".to_owned(),
    };
    let mut problem = ApiError::new(
        ProblemKind::Forbidden,
        format!(
            "token '{}' may not do this in {scope}: it needs the {} role there",
            principal.name,
            role.as_str()
        ),
    )
    .with("requiredRole", role.as_str())
    .with("subject", principal.name.clone());
    if let Some(ns) = namespace {
        problem = problem.with("namespace", ns);
    }
    problem.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<AuthConfig, String> {
        AuthConfig::from_yaml(yaml)
            .map(|(config, _)| config)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn digests_and_roles() {
        let digest = digest_hex(&token_digest("reader-token"));
        let yaml = format!(
            "tokens:\n- name: r\n  tokenSha256: {digest}\n  roles:\n  - {{namespace: \"*\", role: reader}}\n- name: a\n  token: admin-token\n  roles:\n  - {{namespace: shop, role: admin}}\n"
        );
        let (config, warnings) = AuthConfig::from_yaml(&yaml).expect("valid");
        assert_eq!(warnings.len(), 1);
        assert!(!warnings[0].contains("admin-token"), "{}", warnings[0]);
        let reader = config.authenticate("reader-token").expect("known");
        assert_eq!(reader.name, "r");
        assert!(reader.allows(Some("any"), Role::Reader));
        assert!(reader.allows(None, Role::Reader));
        assert!(!reader.allows(Some("any"), Role::Writer));
        let admin = config.authenticate("admin-token").expect("known");
        assert!(admin.allows(Some("shop"), Role::Writer));
        assert!(!admin.allows(None, Role::Reader));
        assert!(config.authenticate("admin-token ").is_none());
        assert!(config.authenticate("").is_none());
        assert!(!format!("{config:?}").contains(&digest));
    }

    #[test]
    fn bad_files_name_the_field_and_never_the_token() {
        let cases = [
            ("tokens: []\n", "tokens"),
            (
                "tokens:\n- name: x\n  roles: [{namespace: a, role: reader}]\n",
                "tokens[0].tokenSha256",
            ),
            (
                "tokens:\n- name: x\n  tokenSha256: abc\n  roles: [{namespace: a, role: reader}]\n",
                "tokens[0].tokenSha256",
            ),
            (
                "tokens:\n- name: x\n  token: supersecret1\n  roles: []\n",
                "tokens[0].roles",
            ),
            (
                "tokens:\n- name: x\n  token: supersecret1\n  roles: [{namespace: 'Bad NS', role: reader}]\n",
                "tokens[0].roles[0].namespace",
            ),
            (
                "tokens:\n- name: x\n  token: supersecret1\n  roles: [{namespace: a, role: reader}]\n- name: x\n  token: supersecret2\n  roles: [{namespace: a, role: reader}]\n",
                "tokens[1].name",
            ),
            (
                "tokens:\n- name: x\n  token: supersecret1\n  roles: [{namespace: a, role: owner}]\n",
                "line 4",
            ),
            (
                "tokens:\n- name: x\n  tokn: supersecret1\n  roles: [{namespace: a, role: reader}]\n",
                "line 3",
            ),
            (
                "tokens:\n- name: x\n  token: [supersecret1]\n  roles: [{namespace: a, role: reader}]\n",
                "line 3",
            ),
            (
                "tokens:\n- {name: x, token: supersecret1, roles: [{namespace: a, role: supersecret1}]}\n",
                "line 2",
            ),
        ];
        for (yaml, expected) in cases {
            let error = load(yaml).expect_err(yaml);
            assert!(error.contains(expected), "{yaml}\n=> {error}");
            assert!(!error.contains("supersecret"), "{error}");
        }
    }

    #[test]
    fn bearer_header_parsing() {
        let request = |value: &str| {
            axum::http::Request::builder()
                .header(header::AUTHORIZATION, value)
                .body(axum::body::Body::empty())
                .expect("request")
        };
        assert_eq!(bearer(&request("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&request("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&request("Basic abc")), None);
        assert_eq!(bearer(&request("Bearer ")), None);
    }
}
