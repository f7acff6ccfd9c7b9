//! One client stream from TCP accept to close: STARTTLS, SASL, resource binding, then
//! stanzas in both directions (RFC 6120 §4–§7).

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use confab_protocol::limits::BudgetShare;
use confab_protocol::sasl::{
    decode_payload, encode_payload, parse_plain, verify_password, ChannelBindings, SaslError,
    ScramHash, ScramKeys, ScramServer,
};
use confab_protocol::{
    ns, Element, ParserLimits, StanzaErrorCondition, StreamError, StreamErrorCondition as SErr,
    StreamEvent, StreamParser,
};
use confab_storage::SyncPoint;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::sasl::{channel_binding_element, failure, mechanisms, mechanisms_element};
use super::Conn;
use crate::accounts::keys_for;
use crate::jid::{prepare_resource, Addr};
use crate::modules::presence;
use crate::router::{SessionHandle, SessionReceiver, ToSession};
use crate::routing::is_stanza;
use crate::server::Server;
use crate::stanza;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest read from a connection. The buffer is on the stack of the task reading, only while
/// data is there to read: an idle connection holds no read buffer.
const READ_BUFFER: usize = 16 * 1024;
/// Stanzas written in one batch before the socket is flushed.
const WRITE_BATCH: usize = 64;
/// Bytes serialized into one batch at most (a batch of large stanzas is cut short), so a
/// session blocked writing holds no more than this besides its queue.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Resources one account may bind at the same time (RFC 6120 §7.6.2.1 resource-constraint).
const MAX_RESOURCES: usize = 64;

/// How a stream ends.
enum End {
    /// The peer sent `</stream:stream>`: answer with ours and close.
    PeerClosed,
    /// The TCP connection is gone (or unusable): nothing more to write.
    Eof,
    /// We close the stream with this error.
    Stream(StreamError),
}

impl End {
    fn error(condition: SErr, text: &str) -> End {
        End::Stream(StreamError::new(condition).with_text(text))
    }
}

enum Sasl {
    Success { bare: String, data: Option<Vec<u8>> },
    Failure(Refusal),
}

/// A failed SASL attempt: the RFC 6120 §6.5 condition, a text for the client, and whether
/// it tested the client's credentials. Only a tested credential counts against the
/// per-stream and per-address login limits; a mechanism or channel-binding type the
/// client chose that we cannot serve is answered and the client goes on to its next
/// mechanism (RFC 6120 §6.4.5).
struct Refusal {
    condition: &'static str,
    text: Option<String>,
    guess: bool,
}

impl Refusal {
    /// Wrong credentials.
    fn guess(condition: &'static str) -> Sasl {
        Sasl::Failure(Refusal {
            condition,
            text: None,
            guess: true,
        })
    }

    /// Anything that tested no credential.
    fn protocol(condition: &'static str, text: Option<String>) -> Sasl {
        Sasl::Failure(Refusal {
            condition,
            text,
            guess: false,
        })
    }

    /// A failure of a SASL step, with a text that says what to do instead.
    fn of(e: &SaslError, bindings: &ChannelBindings) -> Sasl {
        if e.is_credential_failure() {
            return Refusal::guess(e.condition());
        }
        let supported = || {
            let mut types = Vec::new();
            if bindings.tls_exporter.is_some() {
                types.push("tls-exporter");
            }
            if bindings.tls_server_end_point.is_some() {
                types.push("tls-server-end-point");
            }
            types.join(", ")
        };
        let text = match e {
            SaslError::UnsupportedChannelBinding => format!(
                "unsupported channel-binding type; this server supports: {} (XEP-0440)",
                supported()
            ),
            // RFC 5802 §7's server-error value, then what to do.
            SaslError::Downgrade => format!(
                "server-does-support-channel-binding: use a -PLUS mechanism with {}",
                supported()
            ),
            other => other.to_string(),
        };
        Refusal::protocol(e.condition(), Some(text))
    }
}

/// SASL attempts on one stream that tested no credential before it is closed: enough to
/// walk every mechanism we offer twice, few enough that nobody loops on us.
const MAX_SASL_REFUSALS_PER_STREAM: u32 = 16;

struct C2sStream {
    server: Arc<Server>,
    conn: Conn,
    peer: SocketAddr,
    parser: StreamParser,
    /// Until authentication: this stream's part of the budget every unauthenticated
    /// stream shares (`limits.pre_auth_buffer_total`), held for the bytes of an unfinished
    /// element while the stream waits for more.
    pre_auth: BudgetShare,
    throttle: Option<Throttle>,
    header_sent: bool,
    domain: Option<String>,
    /// The authenticated account's bare JID.
    authenticated: Option<String>,
    auth_failures: u32,
    /// SASL attempts refused without testing a credential (see [`Refusal`]).
    sasl_refusals: u32,
    /// Writes of this client's stanzas that must be durable before we write anything
    /// more to it (crate::durability).
    unsynced: SyncPoint,
}

/// Serves one connection to its end.
pub(super) async fn run(server: Arc<Server>, tcp: TcpStream, peer: SocketAddr, direct_tls: bool) {
    // Subscribed before anything else, and read with `wait_for`, so that a shutdown that
    // happens at any point of the connection's life (even before this task ran) is seen.
    let mut shutdown = server.shutdown_signal();
    let conn = if direct_tls {
        let handshake =
            tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, Box::pin(server.tls.accept(tcp)));
        let accepted = tokio::select! {
            r = handshake => r,
            _ = shutdown.wait_for(|down| *down) => return,
        };
        match accepted {
            Ok(Ok(s)) => Conn::Tls(Box::new(s)),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        }
    } else {
        Conn::Plain(tcp)
    };
    // Before authentication a client sends STARTTLS and SASL only: small elements.
    let limits = ParserLimits {
        max_stanza_size: server
            .config()
            .limits
            .pre_auth_stanza_size
            .min(server.config().limits.max_stanza_size),
        max_depth: server.config().limits.max_depth,
    };
    let mut s = C2sStream {
        server: server.clone(),
        conn,
        peer,
        parser: StreamParser::new(limits),
        pre_auth: BudgetShare::new(server.pre_auth_budget.clone()),
        throttle: Throttle::new(
            server.config().limits.client_read_rate,
            server.config().limits.max_stanza_size,
        ),
        header_sent: false,
        domain: None,
        authenticated: None,
        auth_failures: 0,
        sasl_refusals: 0,
        unsynced: SyncPoint::DURABLE,
    };
    let login_timeout = Duration::from_secs(server.config().limits.login_timeout_secs);
    // A stream still negotiating is closed at shutdown too (DESIGN: every stream gets
    // system-shutdown), not left to hold the server's state until its login timeout.
    let negotiated = tokio::select! {
        r = tokio::time::timeout(login_timeout, Box::pin(s.negotiate())) => Some(r),
        _ = shutdown.wait_for(|down| *down) => None,
    };
    let bound = match negotiated {
        Some(Ok(Ok(b))) => b,
        Some(Ok(Err(end))) => return Box::pin(s.finish(end)).await,
        Some(Err(_)) => {
            return s
                .finish(End::error(SErr::ConnectionTimeout, "no login in time"))
                .await
        }
        None => {
            return s
                .finish(End::Stream(StreamError::new(SErr::SystemShutdown)))
                .await
        }
    };
    let (handle, receiver) = bound;
    tracing::info!(jid = %handle.full_jid(), peer = %s.peer, tls = s.conn.is_tls(), "session started");
    let end = s.session(&handle, receiver, shutdown).await;
    if let Some(state) = server.router.unbind(&handle) {
        Box::pin(presence::session_ended(&server, &handle, state)).await;
    }
    tracing::info!(jid = %handle.full_jid(), "session ended");
    Box::pin(s.finish(end)).await;
}

impl C2sStream {
    // ---- reading and writing -------------------------------------------------------

    async fn next_event(&mut self) -> Result<StreamEvent, End> {
        loop {
            match self.parser.next_event() {
                Ok(Some(ev)) => return Ok(ev),
                Ok(None) => {}
                Err(e) => {
                    return Err(End::Stream(
                        StreamError::new(e.condition()).with_text(e.to_string()),
                    ))
                }
            }
            self.hold_unfinished()?;
            let n = read_some(&mut self.conn, &mut self.parser, &mut self.throttle)
                .await
                .map_err(|_| End::Eof)?;
            if n == 0 {
                return Err(End::Eof);
            }
        }
    }

    /// Before reading more on a stream that has not authenticated: frees the parser's
    /// empty buffer and holds the shared budget for what is left of an unfinished element,
    /// so that many half-sent elements cannot together take more than the budget.
    fn hold_unfinished(&mut self) -> Result<(), End> {
        if self.authenticated.is_some() {
            return Ok(());
        }
        self.parser.release_buffer();
        if self.pre_auth.hold(self.parser.buffered()) {
            return Ok(());
        }
        tracing::warn!(
            peer = %self.peer,
            held = self.parser.buffered(),
            "unauthenticated streams hold their whole budget of unfinished input; closing one"
        );
        Err(End::error(
            SErr::ResourceConstraint,
            "too much unfinished input before authentication; try again later",
        ))
    }

    async fn write_bytes(&mut self, data: &[u8]) -> Result<(), End> {
        if self.unsynced != SyncPoint::DURABLE {
            let point = std::mem::replace(&mut self.unsynced, SyncPoint::DURABLE);
            if let Err(e) = self.server.storage.sync(point).await {
                // What the client sent may not be stored: it must not hear anything that
                // would let it believe so.
                tracing::error!(error = %e, "storage flush failed; closing the stream");
                return Err(End::error(SErr::InternalServerError, "storage failure"));
            }
        }
        let conn = &mut self.conn;
        let write = async {
            conn.write_all(data).await?;
            conn.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(End::Eof),
        }
    }

    async fn write_element(&mut self, e: &Element) -> Result<(), End> {
        // Serialized into a buffer of its own, freed again once written: an idle connection
        // keeps no output buffer.
        let mut out = Vec::new();
        e.write_to(&mut out, ns::CLIENT);
        self.write_bytes(&out).await
    }

    /// Writes a child of the stream in the stream namespace with the `stream:` prefix,
    /// the form every client library recognises (RFC 6120 §4.8.1).
    fn stream_child(name: &str, children: &[Element]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(format!("<stream:{name}>").as_bytes());
        for c in children {
            c.write_to(&mut out, ns::STREAM);
        }
        out.extend_from_slice(format!("</stream:{name}>").as_bytes());
        out
    }

    async fn send_header(&mut self, lang: Option<&str>) -> Result<(), End> {
        let from = self
            .domain
            .clone()
            .or_else(|| self.server.config().domains.first().cloned())
            .unwrap_or_default();
        let lang = lang
            .filter(|l| {
                !l.is_empty()
                    && l.len() < 36
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
            .unwrap_or("en");
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' id='{}' from='{}' version='1.0' xml:lang='{}'>",
            ns::CLIENT,
            ns::STREAM,
            stanza::random_id(),
            escape_attr(&from),
            lang
        );
        self.header_sent = true;
        self.write_bytes(header.as_bytes()).await
    }

    async fn finish(mut self, end: End) {
        let data = match end {
            End::Eof => return,
            End::PeerClosed => b"</stream:stream>".to_vec(),
            End::Stream(err) => {
                tracing::debug!(peer = %self.peer, error = %err, "closing stream with an error");
                if !self.header_sent {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.send_header(None)).await;
                }
                let mut data = Self::stream_child(
                    "error",
                    &err.to_element().children().cloned().collect::<Vec<_>>(),
                );
                data.extend_from_slice(b"</stream:stream>");
                data
            }
        };
        let conn = &mut self.conn;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            conn.write_all(&data).await?;
            conn.flush().await?;
            conn.shutdown().await
        })
        .await;
    }

    // ---- negotiation -----------------------------------------------------------------

    /// Runs stream negotiation up to a bound resource.
    async fn negotiate(&mut self) -> Result<(SessionHandle, SessionReceiver), End> {
        loop {
            self.open_stream().await?;
            loop {
                let el = match self.next_event().await? {
                    StreamEvent::Element(e) => e,
                    StreamEvent::Close => return Err(End::PeerClosed),
                    StreamEvent::Open(_) => {
                        return Err(End::error(SErr::NotWellFormed, "unexpected stream header"))
                    }
                };
                if self.authenticated.is_none() {
                    if el.is("starttls", ns::TLS) {
                        self.starttls().await?;
                        break;
                    }
                    if el.is("auth", ns::SASL) {
                        if self.sasl(el).await? {
                            break;
                        }
                        continue;
                    }
                    if is_stanza(&el) {
                        return Err(End::error(SErr::NotAuthorized, "authenticate first"));
                    }
                    return Err(End::error(
                        SErr::UnsupportedStanzaType,
                        "unexpected element",
                    ));
                }
                if el.is("iq", ns::CLIENT) && el.get_child("bind", ns::BIND).is_some() {
                    if let Some(bound) = self.bind(&el).await? {
                        return Ok(bound);
                    }
                    continue;
                }
                if is_stanza(&el) {
                    return Err(End::error(SErr::NotAuthorized, "bind a resource first"));
                }
                return Err(End::error(
                    SErr::UnsupportedStanzaType,
                    "unexpected element",
                ));
            }
        }
    }

    /// Waits for the client's stream header, answers it and offers features.
    async fn open_stream(&mut self) -> Result<(), End> {
        let header = match self.next_event().await? {
            StreamEvent::Open(h) => h,
            _ => return Err(End::error(SErr::NotWellFormed, "expected a stream header")),
        };
        let to = header
            .to
            .as_deref()
            .and_then(|t| Addr::parse(t).ok())
            .filter(|a| a.node.is_none() && a.resource.is_none())
            .map(|a| a.domain);
        let served = to.clone().filter(|d| self.server.is_local_domain(d));
        if self.domain.is_none() {
            self.domain = served.clone();
        }
        // RFC 6120 §4.9.1.2: the header goes out first, even when an error follows.
        self.send_header(header.lang.as_deref()).await?;
        if header.default_ns != ns::CLIENT {
            return Err(End::error(
                SErr::InvalidNamespace,
                "this is a client port: use jabber:client",
            ));
        }
        let major = header
            .version
            .as_deref()
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse::<u32>().ok());
        if major != Some(1) {
            return Err(End::error(SErr::UnsupportedVersion, "XMPP 1.0 is required"));
        }
        match (served, &self.domain) {
            (Some(d), Some(ours)) if &d == ours => {}
            _ => {
                return Err(End::error(
                    SErr::HostUnknown,
                    &format!("this server does not serve {}", to.unwrap_or_default()),
                ))
            }
        }
        let features = self.features();
        let bytes = Self::stream_child("features", &features);
        self.write_bytes(&bytes).await
    }

    fn features(&self) -> Vec<Element> {
        let tls = self.conn.is_tls();
        let require = self.server.config().c2s.require_encryption;
        let mut f = Vec::new();
        if self.authenticated.is_none() {
            if !tls {
                let mut starttls = Element::new("starttls", ns::TLS);
                if require {
                    starttls.append_child(Element::new("required", ns::TLS));
                }
                f.push(starttls);
            }
            if tls || !require {
                f.push(mechanisms_element(tls));
            }
            if tls {
                f.push(channel_binding_element(
                    self.channel_bindings().tls_exporter.is_some(),
                ));
            }
        } else {
            f.push(Element::new("bind", ns::BIND));
            // RFC 6121 Appendix E: legacy session establishment, optional.
            f.push(
                Element::new("session", ns::SESSION)
                    .with_child(Element::new("optional", ns::SESSION)),
            );
            f.push(Element::new("ver", ns::ROSTERVER));
            f.push(Element::new("sub", ns::PRE_APPROVAL));
        }
        f
    }

    async fn starttls(&mut self) -> Result<(), End> {
        if self.conn.is_tls() {
            return Err(End::error(SErr::PolicyViolation, "TLS is already in place"));
        }
        self.write_bytes(format!("<proceed xmlns='{}'/>", ns::TLS).as_bytes())
            .await?;
        let Conn::Plain(tcp) = std::mem::replace(&mut self.conn, Conn::Gone) else {
            return Err(End::Eof);
        };
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, self.server.tls.accept(tcp)).await {
            Ok(Ok(tls)) => self.conn = Conn::Tls(Box::new(tls)),
            _ => return Err(End::Eof),
        }
        // RFC 6120 §5.4.3.3: anything the client sent before the handshake is discarded,
        // so no plaintext can be injected into the protected stream.
        self.parser.reset();
        self.header_sent = false;
        Ok(())
    }

    fn tls_version(&self) -> Option<String> {
        let Conn::Tls(s) = &self.conn else {
            return None;
        };
        s.get_ref().1.protocol_version().map(|v| match v {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
            other => format!("{other:?}"),
        })
    }

    fn channel_bindings(&self) -> ChannelBindings {
        let Conn::Tls(s) = &self.conn else {
            return ChannelBindings::default();
        };
        let (_, tls) = s.get_ref();
        // RFC 9266: tls-exporter is defined for TLS 1.3 (and 1.2 with EMS; we keep to 1.3).
        let tls_exporter = if tls.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
            tls.export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
                .ok()
                .map(|k| k.to_vec())
        } else {
            None
        };
        let cert = self.server.certs.for_name(tls.server_name());
        ChannelBindings {
            tls_exporter,
            tls_server_end_point: Some(cert.end_point_hash.clone()),
        }
    }

    /// Runs one SASL exchange; true on success (the stream then restarts).
    async fn sasl(&mut self, auth: Element) -> Result<bool, End> {
        // Too many failures from this address (on any connection): no further guess,
        // whatever the credentials (DESIGN: auth failures per IP per minute).
        let per_minute = self.server.config().limits.auth_failures_per_minute;
        let now = std::time::Instant::now();
        if self
            .server
            .auth_limiter
            .is_blocked(self.peer.ip(), per_minute, now)
        {
            self.server.stats.auth_refused();
            tracing::warn!(peer = %self.peer, "login refused: too many failed logins from this address");
            return Err(End::error(
                SErr::PolicyViolation,
                "too many failed logins from your address, try again later",
            ));
        }
        let tls = self.conn.is_tls();
        let outcome = if !tls && self.server.config().c2s.require_encryption {
            Refusal::protocol("encryption-required", None)
        } else {
            let mechanism = auth.attr("mechanism").unwrap_or("").to_string();
            if !mechanisms(tls).contains(&mechanism.as_str()) {
                Refusal::protocol(
                    "invalid-mechanism",
                    Some(format!("offered: {}", mechanisms(tls).join(" "))),
                )
            } else {
                let text = auth.text();
                let initial = match text.trim() {
                    "" => None,
                    t => match decode_payload(t) {
                        Ok(d) => Some(d),
                        Err(_) => {
                            let refusal = Refusal {
                                condition: "incorrect-encoding",
                                text: None,
                                guess: false,
                            };
                            return self.sasl_failed(refusal).await;
                        }
                    },
                };
                if mechanism == "PLAIN" {
                    self.sasl_plain(initial).await?
                } else {
                    match ScramHash::from_mechanism(&mechanism) {
                        Some((hash, plus)) => self.sasl_scram(hash, plus, initial).await?,
                        None => Refusal::protocol("invalid-mechanism", None),
                    }
                }
            }
        };
        match outcome {
            Sasl::Success { bare, data } => {
                let mut success = Element::new("success", ns::SASL);
                if let Some(d) = data {
                    success.append_text(encode_payload(&d));
                }
                self.write_element(&success).await?;
                tracing::debug!(%bare, peer = %self.peer, "authenticated");
                self.authenticated = Some(bare);
                // Authenticated: the full stanza size, and nothing held of the budget.
                self.pre_auth.hold(0);
                let limits = &self.server.config().limits;
                self.parser.set_limits(ParserLimits {
                    max_stanza_size: limits.max_stanza_size,
                    max_depth: limits.max_depth,
                });
                self.parser.reset();
                self.header_sent = false;
                Ok(true)
            }
            Sasl::Failure(refusal) => self.sasl_failed(refusal).await,
        }
    }

    async fn sasl_failed(&mut self, refusal: Refusal) -> Result<bool, End> {
        let Refusal {
            condition,
            text,
            guess,
        } = refusal;
        self.write_element(&failure(condition, text.as_deref()))
            .await?;
        if guess {
            self.auth_failures += 1;
            self.server.stats.auth_failure();
            self.server.auth_limiter.record_failure(
                self.peer.ip(),
                self.server.config().limits.auth_failures_per_minute,
                std::time::Instant::now(),
            );
            tracing::info!(peer = %self.peer, condition, "authentication failed");
        } else if condition != "aborted" {
            self.sasl_refusals += 1;
            tracing::debug!(peer = %self.peer, condition, text, "SASL attempt refused");
        }
        // RFC 6120 §6.4.5: a few retries, then the connection is closed.
        if self.auth_failures >= self.server.config().auth.max_failures_per_stream {
            return Err(End::error(
                SErr::PolicyViolation,
                "too many failed authentication attempts",
            ));
        }
        if self.sasl_refusals >= MAX_SASL_REFUSALS_PER_STREAM {
            return Err(End::error(
                SErr::PolicyViolation,
                "too many refused SASL attempts",
            ));
        }
        Ok(false)
    }

    /// Reads the client's next SASL `<response/>`; None if it aborted.
    async fn sasl_response(&mut self) -> Result<Result<Vec<u8>, &'static str>, End> {
        let el = match self.next_event().await? {
            StreamEvent::Element(e) => e,
            StreamEvent::Close => return Err(End::PeerClosed),
            StreamEvent::Open(_) => {
                return Err(End::error(SErr::NotWellFormed, "unexpected stream header"))
            }
        };
        if el.is("abort", ns::SASL) {
            return Ok(Err("aborted"));
        }
        if !el.is("response", ns::SASL) {
            return Err(End::error(
                SErr::NotAuthorized,
                "authentication in progress",
            ));
        }
        Ok(decode_payload(el.text().trim()).map_err(|_| "incorrect-encoding"))
    }

    async fn challenge(&mut self, data: &[u8]) -> Result<(), End> {
        let mut c = Element::new("challenge", ns::SASL);
        if !data.is_empty() {
            c.append_text(encode_payload(data));
        }
        self.write_element(&c).await
    }

    /// The initial response, asking for it with an empty challenge when absent (RFC 6120 §6.4.2).
    async fn initial_response(
        &mut self,
        initial: Option<Vec<u8>>,
    ) -> Result<Result<Vec<u8>, &'static str>, End> {
        match initial {
            Some(d) => Ok(Ok(d)),
            None => {
                self.challenge(&[]).await?;
                self.sasl_response().await
            }
        }
    }

    /// The bare JID for a SASL username on this stream's domain (nodeprep applied).
    fn account_for(&self, username: &str) -> Option<String> {
        let domain = self.domain.as_deref()?;
        let a = Addr::parse(&format!("{username}@{domain}")).ok()?;
        (a.resource.is_none() && a.node.is_some()).then(|| a.bare())
    }

    fn authzid_ok(&self, authzid: Option<&str>, bare: Option<&str>) -> bool {
        // Acting for another identity is not supported: an authzid must name the
        // authenticated account itself (DESIGN security checklist).
        match authzid {
            None | Some("") => true,
            Some(a) => Addr::parse(a).ok().map(|a| a.bare()).as_deref() == bare,
        }
    }

    async fn sasl_scram(
        &mut self,
        hash: ScramHash,
        plus: bool,
        initial: Option<Vec<u8>>,
    ) -> Result<Sasl, End> {
        let bindings = self.channel_bindings();
        let plus_advertised = self.conn.is_tls();
        let mut scram = ScramServer::new(hash, plus, bindings.clone(), plus_advertised)
            .with_unknown_user_iterations(self.server.config().auth.scram_iterations);
        let first = match self.initial_response(initial).await? {
            Ok(d) => d,
            Err(cond) => return Ok(Refusal::protocol(cond, None)),
        };
        let client_first = match scram.client_first(&first) {
            Ok(c) => c,
            Err(e) => return Ok(Refusal::of(&e, &bindings)),
        };
        let bare = self.account_for(&client_first.username);
        if !self.authzid_ok(client_first.authzid.as_deref(), bare.as_deref()) {
            return Ok(Refusal::protocol(
                "invalid-authzid",
                Some("an authorization identity must name the authenticated account".into()),
            ));
        }
        let keys = match &bare {
            Some(b) => match self.server.storage.account(b).await {
                Ok(Some(acct)) => keys_for(&acct.credentials, hash),
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(error = %e, "account lookup failed");
                    return Ok(Refusal::protocol("temporary-auth-failure", None));
                }
            },
            None => None,
        };
        let server_first = scram.server_first(keys);
        self.challenge(&server_first).await?;
        let last = match self.sasl_response().await? {
            Ok(d) => d,
            Err(cond) => return Ok(Refusal::protocol(cond, None)),
        };
        match (scram.client_final(&last), bare) {
            (Ok(server_final), Some(bare)) => Ok(Sasl::Success {
                bare,
                data: Some(server_final),
            }),
            (Err(e), _) => Ok(Refusal::of(&e, &bindings)),
            (Ok(_), None) => Ok(Refusal::guess("not-authorized")),
        }
    }

    async fn sasl_plain(&mut self, initial: Option<Vec<u8>>) -> Result<Sasl, End> {
        let data = match self.initial_response(initial).await? {
            Ok(d) => d,
            Err(cond) => return Ok(Refusal::protocol(cond, None)),
        };
        let creds = match parse_plain(&data) {
            Ok(c) => c,
            Err(e) => return Ok(Refusal::of(&e, &ChannelBindings::default())),
        };
        let bare = self.account_for(&creds.authcid);
        if !self.authzid_ok(creds.authzid.as_deref(), bare.as_deref()) {
            return Ok(Refusal::protocol(
                "invalid-authzid",
                Some("an authorization identity must name the authenticated account".into()),
            ));
        }
        let keys = match &bare {
            Some(b) => match self.server.storage.account(b).await {
                Ok(Some(acct)) => keys_for(&acct.credentials, ScramHash::Sha256),
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(error = %e, "account lookup failed");
                    return Ok(Refusal::protocol("temporary-auth-failure", None));
                }
            },
            None => None,
        };
        let password = creds.password.clone();
        let iterations = self.server.config().auth.scram_iterations;
        // PBKDF2 is deliberately slow: keep it off the async worker threads. An unknown
        // user costs the same derivation, so the time to answer does not tell which
        // accounts exist (the same concern as SCRAM's fake salts, RFC 5802 §9).
        let ok = tokio::task::spawn_blocking(move || match keys {
            Some(k) => verify_password(&k, &password),
            None => {
                let _ = ScramKeys::derive(ScramHash::Sha256, &password, &[0u8; 16], iterations);
                false
            }
        })
        .await
        .unwrap_or(false);
        match (ok, bare) {
            (true, Some(bare)) => Ok(Sasl::Success { bare, data: None }),
            _ => Ok(Refusal::guess("not-authorized")),
        }
    }

    /// RFC 6120 §7: resource binding. Returns the session once bound.
    async fn bind(
        &mut self,
        iq: &Element,
    ) -> Result<Option<(SessionHandle, SessionReceiver)>, End> {
        let Some(bare) = self.authenticated.clone() else {
            return Err(End::error(SErr::NotAuthorized, "authenticate first"));
        };
        let is_set = iq.attr("type") == Some("set") && iq.attr("id").is_some();
        let requested = iq
            .get_child("bind", ns::BIND)
            .and_then(|b| b.get_child("resource", ns::BIND))
            .map(|r| r.text().trim().to_string())
            .filter(|r| !r.is_empty());
        if !is_set {
            self.bind_error(iq, StanzaErrorCondition::BadRequest)
                .await?;
            return Ok(None);
        }
        let resource = match requested {
            Some(r) => match prepare_resource(&bare, &r) {
                Some(p) => p,
                None => {
                    self.bind_error(iq, StanzaErrorCondition::BadRequest)
                        .await?;
                    return Ok(None);
                }
            },
            None => format!("confab-{}", stanza::random_id()),
        };
        let router = &self.server.router;
        if !router.resource_exists(&bare, &resource)
            && router.resources(&bare).len() >= MAX_RESOURCES
        {
            self.bind_error(iq, StanzaErrorCondition::ResourceConstraint)
                .await?;
            return Ok(None);
        }
        let info = crate::router::SessionInfo {
            peer: self.peer,
            tls: self.tls_version(),
            since: std::time::SystemTime::now(),
        };
        let limits = &self.server.config().limits;
        let queue = crate::router::QueueLimits {
            stanzas: limits.session_queue,
            bytes: limits.session_queue_bytes,
        };
        let (handle, receiver) = router.new_session(bare, resource, queue, info);
        // RFC 6120 §7.7.2.2: the new session takes over; the old one is told why.
        if let Some((old, state)) = router.bind(handle.clone()) {
            old.kill(
                StreamError::new(SErr::Conflict)
                    .with_text("replaced by a new login with the same resource"),
            );
            // The old session is no longer registered, so its own end cannot do this.
            presence::session_ended(&self.server, &old, state).await;
        }
        let full = handle.full_jid();
        let reply = stanza::iq_result(
            iq,
            Some(
                Element::new("bind", ns::BIND)
                    .with_child(Element::new("jid", ns::BIND).with_text(full)),
            ),
        );
        self.write_element(&reply).await?;
        Ok(Some((handle, receiver)))
    }

    async fn bind_error(
        &mut self,
        iq: &Element,
        condition: StanzaErrorCondition,
    ) -> Result<(), End> {
        match stanza::error_reply(iq, condition) {
            Some(reply) => self.write_element(&reply).await,
            None => Ok(()),
        }
    }

    // ---- the bound session -------------------------------------------------------------

    async fn session(
        &mut self,
        handle: &SessionHandle,
        mut receiver: SessionReceiver,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> End {
        enum Wake {
            Shutdown,
            Killed,
            Queue(Option<Box<ToSession>>),
            Read(std::io::Result<usize>),
        }
        loop {
            // Stanzas the client pipelined are handled before reading more.
            loop {
                match self.parser.next_event() {
                    Ok(Some(StreamEvent::Element(e))) => {
                        let mut loaded = match self.client_stanza(handle, e).await {
                            Ok(loaded) => loaded,
                            Err(end) => return end,
                        };
                        // Its own queue drains only when this task writes: replies its
                        // client asked for are written out before it handles more.
                        loaded.retain(|s| s.id != handle.id);
                        // Recipients this stanza loaded write some out before this client
                        // is read again; meanwhile its own queue keeps being written, so
                        // two clients loading each other never wait on each other.
                        if !loaded.is_empty() {
                            let waiting = crate::pacing::wait(loaded, handle.id);
                            tokio::pin!(waiting);
                            loop {
                                let queued = tokio::select! {
                                    () = &mut waiting => break,
                                    _ = shutdown.wait_for(|down| *down) => {
                                        return End::Stream(StreamError::new(SErr::SystemShutdown))
                                    }
                                    _ = receiver.kill.changed() => {
                                        let err = receiver.kill.borrow().clone();
                                        return End::Stream(err.unwrap_or_else(|| {
                                            StreamError::new(SErr::PolicyViolation)
                                        }));
                                    }
                                    m = receiver.rx.recv() => m,
                                };
                                let Some(first) = queued else {
                                    return End::Eof;
                                };
                                if let Err(end) =
                                    Box::pin(self.deliver(handle, first, &mut receiver)).await
                                {
                                    return end;
                                }
                            }
                        }
                        if handle.loaded() {
                            break;
                        }
                    }
                    Ok(Some(StreamEvent::Close)) => return End::PeerClosed,
                    Ok(Some(StreamEvent::Open(_))) => {
                        return End::error(SErr::NotWellFormed, "unexpected stream header")
                    }
                    Ok(None) => break,
                    Err(e) => {
                        return End::Stream(
                            StreamError::new(e.condition()).with_text(e.to_string()),
                        )
                    }
                }
            }
            // Everything read so far is handled: while it waits, the session holds no input
            // buffer.
            self.parser.release_buffer();
            let wake = tokio::select! {
                _ = shutdown.wait_for(|down| *down) => Wake::Shutdown,
                _ = receiver.kill.changed() => Wake::Killed,
                m = receiver.rx.recv() => Wake::Queue(m),
                // Nothing more is read while the client's own queue is loaded: what it
                // asked for is written first, and TCP holds the rest of its requests back.
                r = read_some(&mut self.conn, &mut self.parser, &mut self.throttle), if !handle.loaded() => Wake::Read(r),
            };
            match wake {
                Wake::Shutdown => return End::Stream(StreamError::new(SErr::SystemShutdown)),
                Wake::Killed => {
                    let err = receiver.kill.borrow().clone();
                    return End::Stream(
                        err.unwrap_or_else(|| StreamError::new(SErr::PolicyViolation)),
                    );
                }
                Wake::Queue(None) => return End::Eof,
                Wake::Queue(Some(first)) => {
                    if let Err(end) = Box::pin(self.deliver(handle, first, &mut receiver)).await {
                        return end;
                    }
                }
                Wake::Read(Ok(0)) | Wake::Read(Err(_)) => return End::Eof,
                Wake::Read(Ok(_)) => {}
            }
        }
    }

    /// Writes queued stanzas in one batch; stored offline messages are deleted only
    /// once the batch that carried them is written and flushed.
    async fn deliver(
        &mut self,
        handle: &SessionHandle,
        first: Box<ToSession>,
        receiver: &mut SessionReceiver,
    ) -> Result<(), End> {
        let mut out = Vec::new();
        let mut offline_up_to = None;
        let mut next = Some(first);
        let mut count = 0;
        while let Some(item) = next.take() {
            handle.taken(&item);
            match *item {
                ToSession::Stanza(e) => {
                    self.server.stats.element_out(&e);
                    e.write_to(&mut out, ns::CLIENT);
                }
                ToSession::Offline {
                    stanzas,
                    up_to,
                    more,
                } => {
                    for e in &stanzas {
                        self.server.stats.element_out(e);
                        e.write_to(&mut out, ns::CLIENT);
                    }
                    offline_up_to = Some((up_to, more));
                }
            }
            count += 1;
            if count < WRITE_BATCH && out.len() < WRITE_BATCH_BYTES {
                next = receiver.rx.try_recv().ok();
            }
        }
        // A client that stops reading blocks this write; the router then finds its queue
        // full and flips the kill switch, which must end the session at once rather
        // than after the write timeout.
        let r = tokio::select! {
            r = self.write_bytes(&out) => r,
            _ = receiver.kill.changed() => {
                // Part of an element may be on the wire: a stream error after it would
                // be malformed, so the connection is just closed.
                let err = receiver.kill.borrow().clone();
                tracing::info!(jid = %handle.full_jid(), error = ?err, "disconnected while writing");
                Err(End::Eof)
            }
        };
        drop(out);
        r?;
        handle.made_progress();
        if let Some((up_to, more)) = offline_up_to {
            match self
                .server
                .storage
                .remove_offline(&handle.bare, up_to)
                .await
            {
                // The next page, now that this one is on the wire.
                Ok(()) if more => crate::modules::offline::deliver(&self.server, handle).await,
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(error = %e, "removing delivered offline messages failed")
                }
            }
        }
        Ok(())
    }

    /// Handles one stanza of the client's; returns the sessions it loaded (see
    /// [`crate::pacing`]).
    async fn client_stanza(
        &mut self,
        handle: &SessionHandle,
        mut e: Element,
    ) -> Result<Vec<SessionHandle>, End> {
        if !is_stanza(&e) {
            return Err(End::error(SErr::UnsupportedStanzaType, "not a stanza"));
        }
        // RFC 6120 §8.1.2.1: a `from` must be the session's own JID; we stamp the full JID.
        if let Some(from) = e.attr("from") {
            let ok = Addr::parse(from).is_ok_and(|a| {
                a.bare() == handle.bare
                    && a.resource.as_deref().is_none_or(|r| r == handle.resource)
            });
            if !ok {
                return Err(End::error(
                    SErr::InvalidFrom,
                    "from does not match the session",
                ));
            }
        }
        e.set_attr("from", handle.full_jid());
        let (((), outcome), loaded) = crate::pacing::collecting(crate::durability::deferring(
            Box::pin(self.server.handle_client_stanza(handle, e)),
        ))
        .await;
        self.unsynced = self.unsynced.max(outcome.point);
        if outcome.failed {
            // A write this stanza caused failed, and nothing said so: whatever the stream
            // sent next would vouch for it (docs/durability.md).
            return Err(End::error(SErr::InternalServerError, "storage failure"));
        }
        Ok(loaded)
    }
}

/// Reads what the connection has (at most [`READ_BUFFER`] bytes) into the parser; `Ok(0)` at
/// the end of the stream. The read waits first while the connection is over its rate
/// (`limits.client_read_rate`): reading nothing is how a flood is paused, as TCP then holds
/// the sender back. Cancelling it loses nothing: bytes are taken from the connection only in
/// the poll that hands them to the parser.
async fn read_some(
    conn: &mut Conn,
    parser: &mut StreamParser,
    throttle: &mut Option<Throttle>,
) -> std::io::Result<usize> {
    if let Some(t) = throttle.as_mut() {
        t.wait().await;
    }
    let n = std::future::poll_fn(|cx| {
        let mut space = [MaybeUninit::<u8>::uninit(); READ_BUFFER];
        let mut rb = ReadBuf::uninit(&mut space);
        Pin::new(&mut *conn).poll_read(cx, &mut rb).map_ok(|()| {
            parser.feed(rb.filled());
            rb.filled().len()
        })
    })
    .await?;
    if let Some(t) = throttle.as_mut() {
        t.spend(n);
    }
    Ok(n)
}

/// A token bucket over the bytes one connection sends.
struct Throttle {
    /// Bytes per second.
    rate: f64,
    /// Most bytes that may be read at once after a pause.
    burst: f64,
    /// Bytes that may be read now; below zero after a read larger than the allowance.
    tokens: f64,
    last: tokio::time::Instant,
}

impl Throttle {
    /// `None` for rate 0 (no limit).
    fn new(rate: u64, max_stanza: usize) -> Option<Throttle> {
        if rate == 0 {
            return None;
        }
        let rate = rate as f64;
        let burst = rate.max(max_stanza as f64);
        Some(Throttle {
            rate,
            burst,
            tokens: burst,
            last: tokio::time::Instant::now(),
        })
    }

    fn refill(&mut self) {
        let now = tokio::time::Instant::now();
        let gained = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + gained).min(self.burst);
        self.last = now;
    }

    /// Returns once something may be read.
    async fn wait(&mut self) {
        self.refill();
        if self.tokens > 0.0 {
            return;
        }
        // Long enough for the allowance to be positive again.
        let secs = (-self.tokens + 1.0) / self.rate;
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        self.refill();
    }

    fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

fn escape_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}
