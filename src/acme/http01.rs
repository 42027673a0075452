//! The HTTP-01 responder (RFC 8555 8.3) on `http_listen`: it answers
//! `GET /.well-known/acme-challenge/<token>` for a published token with the
//! key authorization (200, `text/plain`) and everything else with 404.
//! Nothing else is served on the port. Requests are small and quick or
//! cut off: headers within 5 s and 8 KiB, a connection within 15 s, and
//! at most [`super::RESPONDER_CONNECTIONS`] connections at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::challenges::PendingChallenges;

/// The path prefix the CA asks under.
const PREFIX: &str = "/.well-known/acme-challenge/";
/// How long a client has to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open at all.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// hyper's smallest read buffer, which bounds the request head.
const MAX_HEADER_BYTES: usize = 8192;

/// Serves HTTP-01 challenges on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, challenges: Arc<PendingChallenges>) {
    serve_at_most(listener, challenges, super::RESPONDER_CONNECTIONS).await
}

/// [`serve`] with at most `limit` connections open at once: one more is
/// closed at once, unread.
async fn serve_at_most(listener: TcpListener, challenges: Arc<PendingChallenges>, limit: usize) {
    if let Ok(address) = listener.local_addr() {
        info!(%address, "acme: answering HTTP-01 challenges");
    }
    let open = Arc::new(Semaphore::new(limit));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "acme: HTTP-01 responder: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            debug!(%peer, limit, "acme: HTTP-01 responder: too many connections; closed");
            continue;
        };
        let challenges = challenges.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&request, &challenges);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    debug!(%peer, %error, "acme: HTTP-01 connection ended with an error")
                }
                Err(_) => debug!(%peer, "acme: HTTP-01 connection timed out"),
            }
        });
    }
}

/// The answer to one request.
pub(crate) fn respond(
    request: &Request<Incoming>,
    challenges: &PendingChallenges,
) -> Response<Full<Bytes>> {
    answer(request.method(), request.uri().path(), challenges)
}

fn answer(method: &Method, path: &str, challenges: &PendingChallenges) -> Response<Full<Bytes>> {
    let key_authorization = (method == Method::GET)
        .then(|| path.strip_prefix(PREFIX))
        .flatten()
        .filter(|token| is_token(token))
        .and_then(|token| challenges.http01(token));
    match key_authorization {
        Some(key_authorization) => {
            debug!(path, "acme: HTTP-01 challenge answered");
            text(StatusCode::OK, key_authorization)
        }
        None => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// RFC 8555 8.3: a token is base64url (letters, digits, `-`, `_`).
fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn exchange(address: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream.write_all(request).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        String::from_utf8_lossy(&response).into_owned()
    }

    fn status_and_body(response: &str) -> (String, String, String) {
        let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
        let status = head.lines().next().unwrap_or_default().to_string();
        let content_type = head
            .lines()
            .find_map(|line| line.strip_prefix("content-type: "))
            .unwrap_or_default()
            .to_string();
        (status, content_type, body.to_string())
    }

    #[tokio::test]
    async fn only_the_published_token_is_answered() {
        let challenges = PendingChallenges::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(serve(listener, challenges.clone()));
        let published = challenges.publish_http01("tok_EN-1", "tok_EN-1.thumbprint");

        let response = exchange(
            address,
            b"GET /.well-known/acme-challenge/tok_EN-1 HTTP/1.1\r\nHost: mail.example.org\r\n\r\n",
        )
        .await;
        assert_eq!(
            status_and_body(&response),
            (
                "HTTP/1.1 200 OK".to_string(),
                "text/plain".to_string(),
                "tok_EN-1.thumbprint".to_string()
            )
        );

        for request in [
            "GET /.well-known/acme-challenge/other HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /.well-known/acme-challenge/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST /.well-known/acme-challenge/tok_EN-1 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /.well-known/acme-challenge/../tok_EN-1 HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            let response = exchange(address, request.as_bytes()).await;
            let (status, _, body) = status_and_body(&response);
            assert_eq!(status, "HTTP/1.1 404 Not Found", "{request}");
            assert_eq!(body, "not found\n", "{request}");
        }

        drop(published);
        let response = exchange(
            address,
            b"GET /.well-known/acme-challenge/tok_EN-1 HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");

        // Oversized headers are refused, not buffered.
        let mut huge = b"GET / HTTP/1.1\r\nHost: a\r\nX-Filler: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
        huge.extend_from_slice(b"\r\n\r\n");
        let response = exchange(address, &huge).await;
        assert!(response.starts_with("HTTP/1.1 431"), "{response}");
        server.abort();
    }

    /// What the responder answers to `request`; empty when it closed (or
    /// reset) the connection without an answer.
    async fn answer_or_nothing(address: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let _ = stream.write_all(request).await;
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        String::from_utf8_lossy(&response).into_owned()
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_unread() {
        let challenges = PendingChallenges::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(serve_at_most(listener, challenges.clone(), 2));
        let _published = challenges.publish_http01("tok", "tok.thumbprint");
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            stream
                .write_all(b"GET / HTTP/1.1\r\n")
                .await
                .expect("write");
            held.push(stream);
        }
        // Both slots taken by clients that have not finished their
        // headers: the next one is closed before any answer.
        let refused = tokio::time::timeout(
            Duration::from_secs(2),
            answer_or_nothing(
                address,
                b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a\r\n\r\n",
            ),
        )
        .await
        .expect("closed at once");
        assert_eq!(refused, "");

        // A slot given back serves again.
        drop(held.pop());
        let answered = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                let response = answer_or_nothing(
                    address,
                    b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a\r\n\r\n",
                )
                .await;
                if !response.is_empty() {
                    return response;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("served again");
        assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_cut_off() {
        let challenges = PendingChallenges::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(serve(listener, challenges));
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .expect("write");
        let started = tokio::time::Instant::now();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        assert!(
            started.elapsed() <= CONNECTION_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() >= HEADER_READ_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        server.abort();
    }
}
