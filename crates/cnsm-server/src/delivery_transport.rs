//! The HTTP [`Transport`] of push delivery: one POST per attempt over this crate's small
//! HTTP/1.1 client (one connection per request, `https://` with the certificates given to
//! trust, no system roots).

use std::sync::Arc;

use cnsm_runtime::delivery::{DeliveryRequest, DeliveryResponse, Transport, TransportFuture};

use crate::client::Client;

/// POSTs deliveries with [`Client`].
#[derive(Debug, Clone, Default)]
pub struct HttpTransport {
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl HttpTransport {
    /// Plain HTTP; `https://` targets fail until [`HttpTransport::with_tls`] gives trust.
    pub fn new() -> HttpTransport {
        HttpTransport::default()
    }

    /// Trusts the receivers' certificates `config` trusts (see [`crate::tls::client_config`]).
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> HttpTransport {
        self.tls = Some(config);
        self
    }
}

/// `scheme://authority` and the request target (`/path?query`, at least `/`).
fn split_url(url: &str) -> Result<(&str, String), String> {
    let scheme_end = url
        .find("://")
        .ok_or_else(|| format!("{url} is not an absolute URL"))?
        + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let base = &url[..scheme_end + authority_end];
    let target = &rest[authority_end..];
    let target = if target.starts_with('/') {
        target.to_owned()
    } else {
        format!("/{target}")
    };
    Ok((base, target))
}

impl Transport for HttpTransport {
    fn post(&self, request: DeliveryRequest) -> TransportFuture {
        let tls = self.tls.clone();
        Box::pin(async move {
            let (base, target) = split_url(&request.url)?;
            let mut client = Client::new(base).map_err(|e| e.to_string())?;
            if let Some(tls) = tls {
                client = client.with_tls(tls);
            }
            let headers: Vec<(&str, &str)> = request
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let response = client
                .request("POST", &target, &headers, request.body.to_vec())
                .await
                .map_err(|e| e.to_string())?;
            Ok(DeliveryResponse {
                status: response.status,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::split_url;

    #[test]
    fn urls_split_into_base_and_request_target() {
        for (url, base, target) in [
            (
                "http://127.0.0.1:9/hooks/a?x=1",
                "http://127.0.0.1:9",
                "/hooks/a?x=1",
            ),
            ("https://example.com", "https://example.com", "/"),
            ("http://h:1?q", "http://h:1", "/?q"),
            ("http://[::1]:8080/p", "http://[::1]:8080", "/p"),
        ] {
            assert_eq!(split_url(url).unwrap(), (base, target.to_owned()), "{url}");
        }
        assert!(split_url("nope").is_err());
    }
}
