//! `confab check connectivity` without a remote domain: do our own ports answer?
//!
//! Each configured listener is contacted on loopback (a wildcard address is checked
//! through 127.0.0.1 or ::1) and must answer a stream header with its own; direct-TLS
//! ports must complete a TLS handshake first (any certificate: `check certs` judges it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use confab_federation::check::Finding;
use confab_federation::verify::{client_config, ClientCert, TrustAnchors};
use confab_protocol::{ns, ParserLimits, StreamEvent, StreamParser};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;

const TIMEOUT: Duration = Duration::from_secs(5);

/// One finding per configured listener.
pub async fn check_own_ports(config: &Config) -> Vec<Finding> {
    let domain = config.domains.first().cloned().unwrap_or_default();
    let mut listeners: Vec<(&str, &String, bool, &str)> = Vec::new();
    for a in &config.c2s.listen {
        listeners.push(("c2s", a, false, ns::CLIENT));
    }
    for a in &config.c2s.tls_listen {
        listeners.push(("c2s", a, true, ns::CLIENT));
    }
    if config.s2s.enabled {
        for a in &config.s2s.listen {
            listeners.push(("s2s", a, false, ns::SERVER));
        }
        for a in &config.s2s.tls_listen {
            listeners.push(("s2s", a, true, ns::SERVER));
        }
    }
    let mut out = Vec::new();
    for (kind, addr, direct, stream_ns) in listeners {
        let label = format!("{kind} {addr}{}", if direct { " (direct TLS)" } else { "" });
        let Ok(mut target) = addr.parse::<SocketAddr>() else {
            out.push(Finding::problem(format!("{label}: not an IP:PORT address")));
            continue;
        };
        if target.port() == 0 {
            out.push(Finding::ok(format!(
                "{label}: port 0 is chosen at start; not checked"
            )));
            continue;
        }
        if target.ip().is_unspecified() {
            target.set_ip(if target.is_ipv6() {
                std::net::Ipv6Addr::LOCALHOST.into()
            } else {
                std::net::Ipv4Addr::LOCALHOST.into()
            });
        }
        let result = tokio::time::timeout(TIMEOUT, probe(target, direct, &domain, stream_ns)).await;
        out.push(match result {
            Ok(Ok(())) => Finding::ok(format!("{label} answers")),
            Ok(Err(e)) => Finding::problem(format!("{label}: {e}")),
            Err(_) => Finding::problem(format!(
                "{label}: no answer within {TIMEOUT:?} (is the server stuck or a firewall dropping?)"
            )),
        });
    }
    out
}

async fn probe(
    target: SocketAddr,
    direct: bool,
    domain: &str,
    stream_ns: &str,
) -> Result<(), String> {
    let tcp = TcpStream::connect(target).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            "connection refused: is the server running, and listening there?".to_string()
        } else {
            e.to_string()
        }
    })?;
    if !direct {
        return exchange_headers(tcp, domain, stream_ns).await;
    }
    // The client configuration outgoing s2s links use: it checks the handshake but
    // defers the trust decision, which is `check certs`' job here.
    let anchors = TrustAnchors::from_root_store(rustls::RootCertStore::empty());
    let config = client_config(&anchors, Arc::new(ClientCert(None)));
    let name =
        rustls_pki_types::ServerName::try_from(domain.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    exchange_headers(tls, domain, stream_ns).await
}

async fn exchange_headers<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    domain: &str,
    stream_ns: &str,
) -> Result<(), String> {
    let header = format!(
        "<?xml version='1.0'?><stream:stream xmlns='{stream_ns}' xmlns:stream='{}' to='{domain}' version='1.0'>",
        ns::STREAM
    );
    s.write_all(header.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut parser = StreamParser::new(ParserLimits {
        max_stanza_size: 65536,
        max_depth: 16,
    });
    let mut buf = [0u8; 4096];
    loop {
        match parser.next_event() {
            Ok(Some(StreamEvent::Open(_))) => {
                let _ = s.write_all(b"</stream:stream>").await;
                return Ok(());
            }
            Ok(Some(_)) => return Err("answered without a stream header".into()),
            Ok(None) => {}
            Err(e) => return Err(format!("not an XMPP answer: {e}")),
        }
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        let chunk = buf
            .get(..n)
            .filter(|c| !c.is_empty())
            .ok_or("closed without answering")?;
        parser.feed(chunk);
    }
}
