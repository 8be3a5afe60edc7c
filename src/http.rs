//! HTTP: turning a [`RequestSpec`] into a ready `reqwest::Request` once at load time, the
//! client every user of a worker shares, sending, and classifying failures into [`Reason`]s.

use std::error::Error as _;
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use reqwest::header::HeaderMap;
use url::Url;

use crate::scenario::api::{RequestSpec, Target};
use crate::stats::Reason;

/// The URL a request goes to: `host` + path (+ query), or its absolute `url` (+ query).
pub fn request_url(host: Option<&Url>, spec: &RequestSpec) -> Result<Url> {
    let mut url = match &spec.target {
        Target::Url(u) => Url::parse(u).with_context(|| format!("bad url {u:?}"))?,
        Target::Path(p) => {
            let host = host.context("no host: pass --host URL or set `host` in the scenario")?;
            // Join by text, as Locust does, so a host with a base path keeps it.
            let base = host.as_str().trim_end_matches('/');
            Url::parse(&format!("{base}{p}")).with_context(|| format!("bad path {p:?}"))?
        }
    };
    if !spec.query.is_empty() {
        url.query_pairs_mut().extend_pairs(&spec.query);
    }
    Ok(url)
}

/// A request built once; each send clones it (a few reference-count bumps and a header map
/// copy), so no URL parsing, JSON encoding or header validation happens per request.
pub fn build_request(host: Option<&Url>, spec: &RequestSpec) -> Result<reqwest::Request> {
    let url = request_url(host, spec)?;
    let mut req = reqwest::Request::new(spec.method.clone(), url);
    *req.headers_mut() = spec.headers.clone();
    if let Some(body) = &spec.body {
        *req.body_mut() = Some(reqwest::Body::from(body.clone()));
    }
    *req.timeout_mut() = spec.timeout;
    Ok(req)
}

/// Clones a prebuilt request. Bodies are `Bytes`, so cloning cannot fail.
pub fn clone_request(req: &reqwest::Request) -> reqwest::Request {
    req.try_clone().expect("requests built from bytes are always cloneable")
}

static CRYPTO: Once = Once::new();

/// The HTTP client of one worker thread: keep-alive pool, no proxy lookup, no decompression.
/// One client per worker (not per user): a default reqwest client costs ~100 KB.
pub fn client(timeout: Duration) -> Result<reqwest::Client> {
    CRYPTO.call_once(|| {
        // reqwest is built without a bundled crypto provider; ring is ours.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("stormlight/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot build the HTTP client")
}

/// What came back, for the verdict and for `after_response`.
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    /// The body, kept only when asked for; otherwise read and dropped chunk by chunk.
    pub body: Bytes,
    pub elapsed: Duration,
}

/// Sends a request and reads the whole body. `Err` carries the elapsed time and the reason.
pub async fn send(
    client: &reqwest::Client,
    req: reqwest::Request,
    keep_body: bool,
) -> Result<Response, (Duration, Reason)> {
    let start = Instant::now();
    let fail = |e: reqwest::Error| (start.elapsed(), classify(&e));
    let mut resp = client.execute(req).await.map_err(fail)?;
    let status = resp.status().as_u16();
    let headers = if keep_body {
        std::mem::take(resp.headers_mut())
    } else {
        HeaderMap::new()
    };
    let body = if keep_body {
        resp.bytes().await.map_err(fail)?
    } else {
        while resp.chunk().await.map_err(fail)?.is_some() {}
        Bytes::new()
    };
    Ok(Response {
        status,
        headers,
        body,
        elapsed: start.elapsed(),
    })
}

/// Puts a transport error into its class by walking the error's causes.
pub fn classify(err: &reqwest::Error) -> Reason {
    if err.is_timeout() {
        return if err.is_connect() {
            Reason::ConnectTimeout
        } else {
            Reason::Timeout
        };
    }
    if err.is_redirect() {
        return Reason::Other("redirect limit".into());
    }
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            match io.kind() {
                ConnectionRefused => return Reason::Refused,
                ConnectionReset | ConnectionAborted | BrokenPipe => return Reason::Reset,
                TimedOut => {
                    return if err.is_connect() {
                        Reason::ConnectTimeout
                    } else {
                        Reason::Timeout
                    };
                }
                UnexpectedEof => return Reason::Closed,
                _ => {}
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return Reason::Closed;
            }
            if h.is_parse() || h.is_parse_status() {
                return Reason::Protocol;
            }
        }
        if e.downcast_ref::<rustls::Error>().is_some() {
            return Reason::Tls;
        }
        let text = e.to_string();
        if text.contains("dns error") || text.contains("failed to lookup address") {
            return Reason::Dns;
        }
        source = e.source();
    }
    if err.is_connect() {
        Reason::Connect
    } else if err.is_body() || err.is_decode() {
        Reason::Body
    } else {
        // The URL would make one failures row per address; the message without it groups.
        let text = err.to_string();
        let text = match err.url() {
            Some(u) => text.replace(&format!(" ({u})"), "").replace(u.as_str(), "URL"),
            None => text,
        };
        Reason::Other(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::api::RequestSpec;
    use reqwest::Method;

    fn spec(target: Target, query: &[(&str, &str)]) -> RequestSpec {
        RequestSpec {
            method: Method::GET,
            target,
            headers: HeaderMap::new(),
            query: query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: None,
            name: "x".into(),
            weight: 1,
            timeout: None,
        }
    }

    #[test]
    fn paths_join_the_host_and_keep_its_base_path() {
        let host = Url::parse("http://127.0.0.1:8000/api/").unwrap();
        let u = request_url(Some(&host), &spec(Target::Path("/items/7".into()), &[("q", "a b")])).unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:8000/api/items/7?q=a+b");
        let u = request_url(Some(&host), &spec(Target::Url("http://[::1]:9/z".into()), &[])).unwrap();
        assert_eq!(u.as_str(), "http://[::1]:9/z");
        assert!(request_url(None, &spec(Target::Path("/x".into()), &[])).is_err());
    }
}
