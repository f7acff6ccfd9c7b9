//! Outgoing links: one stream per (local domain, remote domain), found through DNS,
//! secured with TLS and authenticated with SASL EXTERNAL (XEP-0178) or dialback
//! (XEP-0220). Stanzas queue while the link connects; if it cannot be established
//! they are bounced to their senders.

use std::sync::Arc;

use confab_protocol::sasl::encode_payload;
use confab_protocol::{ns, Element, ParserLimits, StreamError, StreamErrorCondition, StreamEvent};
use rustls_pki_types::{ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::dialback::dialback_key;
use crate::dns::Endpoint;
use crate::service::{AuthMethod, FederationService, LinkKey};
use crate::stream::{Conn, XmlStream};
use crate::verify::{check_peer_cert, CertStatus};
use crate::{FederationError, LinkError};

/// Stanzas written in one batch on an outgoing link.
const WRITE_BATCH: usize = 64;

/// What an outgoing connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A link that carries stanzas: authenticate our domain.
    Link,
    /// A dialback verification connection (XEP-0220 §2.3): no authentication needed.
    Verify,
}

/// A negotiated outgoing stream.
pub(crate) struct Established {
    pub(crate) stream: XmlStream,
    pub(crate) method: AuthMethod,
    /// What the peer's certificate proved about its name (RFC 6125).
    pub(crate) peer_cert: CertStatus,
}

fn limits(svc: &FederationService) -> ParserLimits {
    ParserLimits {
        max_stanza_size: svc.config.max_stanza_size,
        max_depth: svc.config.max_depth,
    }
}

/// Resolves `remote` and tries each endpoint in turn.
pub(crate) async fn connect(
    svc: &Arc<FederationService>,
    local: &str,
    remote: &str,
    purpose: Purpose,
) -> Result<Established, LinkError> {
    let endpoints = svc
        .resolver
        .resolve(remote, 5269)
        .await
        .map_err(|e| LinkError::Dns(e.to_string()))?;
    let mut last = LinkError::Dns(format!("{remote}: no address to connect to"));
    for ep in endpoints {
        let attempt = tokio::time::timeout(
            svc.config.connect_timeout,
            negotiate(svc, local, remote, &ep, purpose),
        )
        .await;
        match attempt {
            Ok(Ok(est)) => return Ok(est),
            Ok(Err(e)) => {
                tracing::debug!(%remote, addr = %ep.addr, error = %e, "s2s endpoint failed");
                last = e;
            }
            Err(_) => {
                tracing::debug!(%remote, addr = %ep.addr, "s2s endpoint timed out");
                last = LinkError::Timeout;
            }
        }
    }
    Err(last)
}

async fn tls_connect(
    svc: &Arc<FederationService>,
    tcp: TcpStream,
    local: &str,
    remote: &str,
    direct: bool,
) -> Result<Conn, LinkError> {
    let config = svc.client_tls(local, direct);
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from(remote.to_string())
        .map_err(|_| LinkError::Tls(format!("{remote} is not a valid TLS server name")))?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    Ok(Conn::Client(Box::new(tls)))
}

async fn negotiate(
    svc: &Arc<FederationService>,
    local: &str,
    remote: &str,
    ep: &Endpoint,
    purpose: Purpose,
) -> Result<Established, LinkError> {
    let tcp = TcpStream::connect(ep.addr)
        .await
        .map_err(|e| LinkError::Connect(format!("{}: {e}", ep.addr)))?;
    let _ = tcp.set_nodelay(true);
    let conn = if ep.direct_tls {
        tls_connect(svc, tcp, local, remote, true).await?
    } else {
        Conn::Plain(tcp)
    };
    let mut s = XmlStream::new(conn, limits(svc));
    let require_tls = svc.config.require_encryption_for(remote);
    let allow_dialback = svc.config.allow_dialback_for(remote);
    let mut sasl_done = false;
    loop {
        s.write_header(local, Some(remote), None).await?;
        let header = match s.next_event().await? {
            StreamEvent::Open(h) => h,
            _ => return Err(LinkError::Protocol("expected a stream header".into())),
        };
        if header.default_ns != ns::SERVER {
            return Err(LinkError::Protocol(
                "peer is not speaking jabber:server".into(),
            ));
        }
        let stream_id = header.id.clone().unwrap_or_default();
        let features = s.next_element().await?;
        if features.is("error", ns::STREAM) {
            return Err(LinkError::Stream(
                StreamError::from_element(&features)
                    .unwrap_or_else(|| StreamError::new(StreamErrorCondition::UndefinedCondition)),
            ));
        }
        if !features.is("features", ns::STREAM) {
            return Err(LinkError::Protocol("expected stream features".into()));
        }
        if !s.conn.is_tls() {
            if features.get_child("starttls", ns::TLS).is_some() {
                s.write_element(&Element::new("starttls", ns::TLS)).await?;
                let answer = s.next_element().await?;
                if !answer.is("proceed", ns::TLS) {
                    return Err(LinkError::Tls("peer refused STARTTLS".into()));
                }
                let tcp = s
                    .conn
                    .take_plain()
                    .ok_or_else(|| LinkError::Tls("no plain connection".into()))?;
                s.conn = tls_connect(svc, tcp, local, remote, false).await?;
                s.restart();
                continue;
            }
            if require_tls {
                // RFC 6120 §5.3.1: nothing goes out in the clear; tell the peer why.
                let text = format!("{remote} does not offer TLS and encryption is required");
                s.close_with(Some(
                    &StreamError::new(StreamErrorCondition::PolicyViolation).with_text(&text),
                ))
                .await;
                return Err(LinkError::Policy(text));
            }
        }
        let peer_cert = if s.conn.is_tls() {
            check_peer_cert(
                &svc.anchors,
                &s.conn.peer_certificates(),
                remote,
                UnixTime::now(),
            )
        } else {
            CertStatus::Missing
        };
        // Only dialback's DNS-based trust (XEP-0220 §1.3) could stand in for a certificate
        // that does not authenticate the peer (RFC 6120 §13.7.2); where policy forbids
        // dialback, such a peer is not talked to at all.
        if purpose == Purpose::Link && !peer_cert.is_valid() && !allow_dialback {
            let text = format!(
                "the certificate of {remote} does not authenticate it ({peer_cert:?}) and dialback is not allowed"
            );
            s.close_with(Some(
                &StreamError::new(StreamErrorCondition::PolicyViolation).with_text(&text),
            ))
            .await;
            return Err(LinkError::NotAuthenticated(text));
        }
        if purpose == Purpose::Verify {
            return Ok(Established {
                stream: s,
                method: AuthMethod::None,
                peer_cert,
            });
        }
        if sasl_done {
            return Ok(Established {
                stream: s,
                method: AuthMethod::External,
                peer_cert,
            });
        }
        // XEP-0178: the peer offers EXTERNAL when our certificate is good for `local`.
        let external = features
            .get_child("mechanisms", ns::SASL)
            .is_some_and(|m| m.children().any(|c| c.text().trim() == "EXTERNAL"));
        if external && s.conn.is_tls() {
            s.write_element(
                &Element::new("auth", ns::SASL)
                    .with_attr("mechanism", "EXTERNAL")
                    .with_text(encode_payload(local.as_bytes())),
            )
            .await?;
            let answer = s.next_element().await?;
            if answer.is("success", ns::SASL) {
                sasl_done = true;
                s.restart();
                continue;
            }
            tracing::debug!(%remote, "SASL EXTERNAL refused, trying dialback");
        }
        let dialback_offered = features
            .get_child("dialback", ns::DIALBACK_FEATURE)
            .is_some();
        if !allow_dialback || !dialback_offered {
            return Err(LinkError::NotAuthenticated(format!(
                "{remote} accepts neither our certificate nor dialback"
            )));
        }
        let key = dialback_key(&svc.secret, remote, local, &stream_id);
        s.write_element(
            &Element::new("result", ns::DIALBACK)
                .with_attr("from", local)
                .with_attr("to", remote)
                .with_text(key),
        )
        .await?;
        loop {
            let answer = s.next_element().await?;
            if answer.is("result", ns::DIALBACK)
                && answer.attr("from") == Some(remote)
                && answer.attr("to") == Some(local)
            {
                return match answer.attr("type") {
                    Some("valid") => Ok(Established {
                        stream: s,
                        method: AuthMethod::Dialback,
                        peer_cert,
                    }),
                    _ => Err(LinkError::NotAuthenticated(format!(
                        "{remote} refused our dialback key"
                    ))),
                };
            }
            if answer.is("error", ns::STREAM) {
                return Err(LinkError::Stream(
                    StreamError::from_element(&answer).unwrap_or_else(|| {
                        StreamError::new(StreamErrorCondition::UndefinedCondition)
                    }),
                ));
            }
            // Anything else before the answer (e.g. a db:verify we never sent) is ignored:
            // we accept only the answer to our own request.
        }
    }
}

/// XEP-0220 §2.3: asks `originating`'s authoritative server whether `key` is one it
/// issued for a stream from it to `receiving` with `stream_id`.
pub(crate) async fn verify_dialback(
    svc: &Arc<FederationService>,
    receiving: &str,
    originating: &str,
    stream_id: &str,
    key: &str,
) -> Result<bool, LinkError> {
    let mut est = connect(svc, receiving, originating, Purpose::Verify).await?;
    let s = &mut est.stream;
    s.write_element(
        &Element::new("verify", ns::DIALBACK)
            .with_attr("from", receiving)
            .with_attr("to", originating)
            .with_attr("id", stream_id)
            .with_text(key),
    )
    .await?;
    let deadline = svc.config.connect_timeout;
    let answer = tokio::time::timeout(deadline, async {
        loop {
            let e = s.next_element().await?;
            if e.is("verify", ns::DIALBACK) && e.attr("id") == Some(stream_id) {
                return Ok::<_, LinkError>(e);
            }
        }
    })
    .await
    .map_err(|_| LinkError::Timeout)??;
    s.close_with(None).await;
    Ok(answer.attr("type") == Some("valid")
        && answer.attr("from") == Some(originating)
        && answer.attr("to") == Some(receiving))
}

/// The task behind one outgoing link.
pub(crate) async fn run_link(
    svc: Arc<FederationService>,
    key: LinkKey,
    id: u64,
    mut rx: mpsc::Receiver<Element>,
) {
    let (local, remote) = (key.0.clone(), key.1.clone());
    let mut shutdown = svc.shutdown_signal();
    let est = tokio::select! {
        r = connect(&svc, &local, &remote, Purpose::Link) => r,
        _ = crate::stream::stopped(&mut shutdown) => Err(LinkError::Closed),
    };
    let mut est = match est {
        Ok(est) => est,
        Err(e) => {
            tracing::info!(%local, %remote, error = %e, "outgoing link failed");
            svc.remove_link(&key, id);
            // RFC 6120 §8.3.3: every queued stanza goes back to its sender.
            rx.close();
            let error = e.to_federation_error(&remote);
            while let Some(stanza) = rx.recv().await {
                svc.host.bounce(stanza, error.clone()).await;
            }
            return;
        }
    };
    tracing::info!(%local, %remote, method = ?est.method, peer_cert = ?est.peer_cert, "outgoing link established");
    svc.link_ready(&key, id, est.method);
    let idle = svc.config.idle_timeout;
    let s = &mut est.stream;
    let mut batch: Vec<Element> = Vec::with_capacity(WRITE_BATCH);
    let end: Option<StreamError> = loop {
        tokio::select! {
            // What the peer said comes first: a link it already closed (e.g. its idle
            // timeout) must not be handed more stanzas that it would never read.
            biased;
            _ = crate::stream::stopped(&mut shutdown) => {
                break Some(StreamError::new(StreamErrorCondition::SystemShutdown));
            }
            r = s.read_more() => {
                if r.is_err() { break None; }
                // The peer may answer with errors or close; stanzas are not expected here.
                let mut closed = false;
                loop {
                    match s.buffered_event() {
                        Ok(None) => break,
                        Ok(Some(StreamEvent::Close)) | Err(_) => { closed = true; break; }
                        Ok(Some(StreamEvent::Element(e))) if e.is("error", ns::STREAM) => {
                            tracing::info!(%remote, error = %e, "peer closed the link with an error");
                        }
                        Ok(Some(_)) => {}
                    }
                }
                if closed { break None; }
            }
            m = rx.recv() => {
                let Some(first) = m else { break None };
                batch.clear();
                batch.push(first);
                while batch.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                for stanza in &batch {
                    s.queue_stanza(stanza);
                }
                if let Err(e) = s.flush_batch().await {
                    tracing::info!(%remote, error = %e, "outgoing link write failed");
                    // The connection is broken: these stanzas did not reach the peer
                    // (not all of them, at least). Their senders are told rather than
                    // left waiting (RFC 6120 §8.3.3); retrying could duplicate some.
                    for stanza in batch.drain(..) {
                        svc.host.bounce(stanza, FederationError::RemoteServerTimeout(remote.clone())).await;
                    }
                    break None;
                }
                svc.count_out(batch.len());
            }
            _ = tokio::time::sleep(idle) => {
                tracing::debug!(%local, %remote, "closing idle outgoing link");
                break None;
            }
        }
    };
    svc.remove_link(&key, id);
    s.close_with(end.as_ref()).await;
    // Stanzas that were queued behind the closed link go out on a new one.
    rx.close();
    while let Some(stanza) = rx.recv().await {
        if let Err(e) = svc.send_stanza(&local, &remote, stanza.clone(), false) {
            svc.host.bounce(stanza, e).await;
        }
    }
}

impl LinkError {
    /// The stanza error senders get for stanzas that could not be sent (RFC 6120 §8.3.3).
    pub(crate) fn to_federation_error(&self, remote: &str) -> FederationError {
        match self {
            LinkError::Timeout => FederationError::RemoteServerTimeout(remote.to_string()),
            _ => FederationError::RemoteServerNotFound(remote.to_string()),
        }
    }
}
