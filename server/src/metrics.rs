//! The Prometheus endpoint: `GET /metrics` on the addresses of `[metrics] listen`.
//!
//! A few lines of HTTP/1.1 on tokio rather than an HTTP stack: one fixed resource, one
//! request per connection, the body rendered from the same counters as `confab stats`
//! ([`crate::ops`]). Requests are small and bounded in size, time and number, so a
//! scraper (or anyone else who can reach the port) cannot hold the server's memory.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::server::Server;

/// Largest request head read; a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// Time for a client to send its request and read the answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Requests served at the same time; more connections are closed at once.
const MAX_CONNECTIONS: usize = 32;

/// Serves scrapes until the task is aborted.
pub async fn serve(server: Arc<Server>, listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if tokio::time::timeout(TIMEOUT, answer(&server, tcp))
                .await
                .is_err()
            {
                tracing::debug!(%peer, "metrics: request timed out");
            }
        });
    }
}

async fn answer(server: &Arc<Server>, mut tcp: TcpStream) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(buf.get(..n).unwrap_or_default()),
        }
        if head.len() > MAX_REQUEST {
            let _ = respond(&mut tcp, "431 Request Header Fields Too Large", "", false).await;
            return;
        }
    }
    let request_line = head
        .split(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
        .unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let result = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = crate::ops::prometheus_text(&crate::ops::snapshot(server));
            respond(&mut tcp, "200 OK", &body, method == "HEAD").await
        }
        ("GET" | "HEAD", _) => respond(&mut tcp, "404 Not Found", "try /metrics\n", false).await,
        _ => respond(&mut tcp, "405 Method Not Allowed", "", false).await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "metrics: writing the answer failed");
    }
}

async fn respond(
    tcp: &mut TcpStream,
    status: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(body);
    }
    tcp.write_all(out.as_bytes()).await?;
    tcp.shutdown().await
}
