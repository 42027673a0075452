//! `mail-tls-proxy healthcheck`: a container health check that needs
//! nothing but this binary (a `FROM scratch` image has no curl).
//!
//! One HTTP/1.1 GET over plain TCP; success is a `200` status. Only `http://`
//! URLs with a literal or resolvable host are supported: the admin endpoint
//! is plain HTTP on a local address. Without a URL the check asks the
//! configuration's own admin endpoint ([`readyz_url`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most of a response read (status line and a reason to show).
const MAX_RESPONSE: usize = 16 * 1024;

/// An `http://host:port/path` URL, split.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HttpUrl {
    /// `host:port`, as connected to (port 80 if none was given).
    pub(crate) authority: String,
    /// The `Host` header value (as written in the URL).
    pub(crate) host_header: String,
    pub(crate) path: String,
}

/// The `/readyz` URL of the admin endpoint that listens on `metrics_listen`
/// (`[metrics] listen`): an unspecified address (`0.0.0.0`, `[::]`) is asked
/// on the loopback address of its family.
pub fn readyz_url(metrics_listen: SocketAddr) -> String {
    let ip = match metrics_listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!(
        "http://{}/readyz",
        SocketAddr::new(ip, metrics_listen.port())
    )
}

/// Splits an `http://` URL; the error says what is wrong.
pub(crate) fn parse_url(url: &str) -> Result<HttpUrl, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
    let (host_port, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    if host_port.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let has_port = match host_port.rfind(':') {
        Some(colon) => host_port.rfind(']').is_none_or(|bracket| colon > bracket),
        None => false,
    };
    let authority = if has_port {
        host_port.to_string()
    } else {
        format!("{host_port}:80")
    };
    Ok(HttpUrl {
        authority,
        host_header: host_port.to_string(),
        path: path.to_string(),
    })
}

/// GETs `url`; `Ok` with the body on status 200, `Err` with the reason
/// (status and the body's first line, or the connection error) otherwise.
pub async fn get(url: &str, timeout: Duration) -> Result<String, String> {
    let url = parse_url(url)?;
    tokio::time::timeout(timeout, fetch(&url))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer from {} within {} s",
                url.authority,
                timeout.as_secs_f64()
            ))
        })
}

async fn fetch(url: &HttpUrl) -> Result<String, String> {
    let mut stream = TcpStream::connect(url.authority.as_str())
        .await
        .map_err(|error| format!("cannot connect to {}: {error}", url.authority))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: mail-tls-proxy-healthcheck\r\nConnection: close\r\n\r\n",
        url.path, url.host_header
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("cannot send the request: {error}"))?;
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    while response.len() < MAX_RESPONSE {
        match stream.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
            Err(error) => return Err(format!("reading the response failed: {error}")),
        }
    }
    let text = String::from_utf8_lossy(&response);
    let status_line = text.lines().next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| format!("not an HTTP response: {status_line:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim_end().to_string())
        .unwrap_or_default();
    if status == "200" {
        Ok(body)
    } else {
        Err(format!("HTTP {status}: {body}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split() {
        assert_eq!(
            parse_url("http://127.0.0.1:9464/readyz"),
            Ok(HttpUrl {
                authority: "127.0.0.1:9464".into(),
                host_header: "127.0.0.1:9464".into(),
                path: "/readyz".into()
            })
        );
        assert_eq!(
            parse_url("http://localhost").unwrap().authority,
            "localhost:80"
        );
        assert_eq!(parse_url("http://[::1]/x").unwrap().authority, "[::1]:80");
        assert_eq!(
            parse_url("http://[::1]:9464/healthz").unwrap().authority,
            "[::1]:9464"
        );
        assert!(parse_url("https://example.org/").is_err());
        assert!(parse_url("http:///readyz").is_err());
    }

    #[test]
    fn the_admin_endpoint_is_asked_where_it_listens_or_on_loopback() {
        let url = |listen: &str| readyz_url(listen.parse().unwrap());
        assert_eq!(url("127.0.0.1:9464"), "http://127.0.0.1:9464/readyz");
        assert_eq!(url("192.0.2.7:8080"), "http://192.0.2.7:8080/readyz");
        assert_eq!(url("0.0.0.0:9464"), "http://127.0.0.1:9464/readyz");
        assert_eq!(url("[::]:9465"), "http://[::1]:9465/readyz");
        assert_eq!(
            url("[2001:db8::1]:9464"),
            "http://[2001:db8::1]:9464/readyz"
        );
        assert_eq!(
            parse_url(&url("[::]:9465")).unwrap().authority,
            "[::1]:9465"
        );
    }

    #[tokio::test]
    async fn status_200_is_success_and_anything_else_says_why() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for answer in [
                "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n",
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 20\r\n\r\nnot ready: draining\n",
            ] {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = vec![0u8; 1024];
                let n = stream.read(&mut request).await.unwrap();
                assert!(request[..n].starts_with(b"GET /readyz HTTP/1.1\r\n"));
                stream.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let url = format!("http://{address}/readyz");
        assert_eq!(
            get(&url, Duration::from_secs(5)).await,
            Ok("ready".to_string())
        );
        assert_eq!(
            get(&url, Duration::from_secs(5)).await,
            Err("HTTP 503: not ready: draining".to_string())
        );
        let error = get(&url, Duration::from_secs(5)).await.unwrap_err();
        assert!(error.starts_with("cannot connect to"), "{error}");
    }
}
