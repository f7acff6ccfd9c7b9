//! Incoming links: the s2s listener side (RFC 6120 §4–§6, XEP-0178, XEP-0220).
//!
//! A peer authenticates one or more of its domains on the stream, by SASL EXTERNAL
//! with a certificate valid for the domain or by dialback; every stanza it sends must
//! come from an authenticated domain and go to one of ours.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use confab_protocol::limits::BudgetShare;
use confab_protocol::sasl::decode_payload;
use confab_protocol::{
    ns, Element, ParserLimits, StreamError, StreamErrorCondition as SErr, StreamEvent,
};
use rustls_pki_types::UnixTime;
use tokio::net::{TcpListener, TcpStream};

use crate::dialback::verify_key;
use crate::outgoing::verify_dialback;
use crate::service::FederationService;
use crate::stream::{new_id, Conn, XmlStream};
use crate::verify::{check_peer_cert, CertStatus};
use crate::LinkError;

pub(crate) async fn accept_loop(
    svc: Arc<FederationService>,
    listener: TcpListener,
    direct_tls: bool,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "s2s accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // Per address first, so that an address at its limit takes no place of the others.
        let per_address = svc.config.max_connections_per_address;
        let Some(address) = svc.addresses.try_acquire(peer.ip(), per_address) else {
            tracing::warn!(%peer, limit = per_address, "too many server connections from this address, refusing");
            continue;
        };
        let Ok(permit) = svc.connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "s2s connection limit reached, refusing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let svc = svc.clone();
        tokio::spawn(async move {
            let _held = (permit, address);
            serve(svc, tcp, peer, direct_tls).await;
        });
    }
}

/// The parser limits of an authenticated stream.
fn full_limits(svc: &FederationService) -> ParserLimits {
    ParserLimits {
        max_stanza_size: svc.config.max_stanza_size,
        max_depth: svc.config.max_depth,
    }
}

fn err(c: SErr, text: &str) -> LinkError {
    LinkError::Stream(StreamError::new(c).with_text(text))
}

struct Incoming {
    svc: Arc<FederationService>,
    s: XmlStream,
    peer: SocketAddr,
    /// Our domain the peer addressed.
    local: Option<String>,
    /// The peer's domain from its stream header.
    claimed: Option<String>,
    /// Domains the peer proved on this stream.
    authenticated: HashSet<String>,
    stream_id: String,
    sasl_done: bool,
    /// Whether our header for the current stream is out: a stream error needs one
    /// before it, even when the peer's header never came (RFC 6120 §4.9.1.1).
    header_sent: bool,
    /// A peer that has not authenticated a domain by then is disconnected, so that idle
    /// unauthenticated connections cannot pile up (RFC 6120 §13.12).
    negotiation_deadline: tokio::time::Instant,
    /// This link's entry in the service's table (for administration).
    link_id: u64,
}

async fn serve(svc: Arc<FederationService>, tcp: TcpStream, peer: SocketAddr, direct_tls: bool) {
    let mut shutdown = svc.shutdown_signal();
    let conn = if direct_tls {
        let accept = svc.server_tls.accept(tcp);
        let accepted = tokio::select! {
            r = tokio::time::timeout(svc.config.connect_timeout, accept) => r,
            _ = crate::stream::stopped(&mut shutdown) => return,
        };
        match accepted {
            Ok(Ok(tls)) => Conn::Server(Box::new(tls)),
            _ => return,
        }
    } else {
        Conn::Plain(tcp)
    };
    // Until a domain is authenticated, only small elements are expected (STARTTLS, SASL,
    // dialback), and what the stream holds of an unfinished one counts against the budget
    // all unauthenticated streams share.
    let limits = ParserLimits {
        max_stanza_size: svc
            .config
            .pre_auth_stanza_size
            .min(svc.config.max_stanza_size),
        max_depth: svc.config.max_depth,
    };
    let share = BudgetShare::new(svc.config.pre_auth_budget.clone());
    let link_id = svc.incoming_opened(peer);
    let mut inc = Incoming {
        s: XmlStream::new(conn, limits).with_budget(share),
        svc: svc.clone(),
        peer,
        local: None,
        claimed: None,
        authenticated: HashSet::new(),
        stream_id: new_id(),
        sasl_done: false,
        header_sent: false,
        negotiation_deadline: tokio::time::Instant::now() + negotiation_timeout(&svc),
        link_id,
    };
    let result = tokio::select! {
        r = inc.run() => r,
        // Shutdown closes incoming links too, with a reason the peer can log.
        _ = crate::stream::stopped(&mut shutdown) => {
            Err(err(SErr::SystemShutdown, "the server is shutting down"))
        }
    };
    svc.incoming_closed(link_id);
    match result {
        Ok(()) => inc.s.close_with(None).await,
        Err(LinkError::Stream(e)) => {
            tracing::info!(%peer, error = %e, "closing incoming link");
            if !inc.header_sent {
                let name = inc
                    .local
                    .clone()
                    .or_else(|| svc.host.default_domain())
                    .unwrap_or_default();
                let id = inc.stream_id.clone();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    inc.s.write_header(&name, None, Some(&id)),
                )
                .await;
            }
            inc.s.close_with(Some(&e)).await
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "incoming link ended");
            // The peer vanished (or closed with an error) instead of closing the stream:
            // what it told us about its users' presence is stale (RFC 6121 §4.3).
            for domain in &inc.authenticated {
                svc.host.remote_gone(domain).await;
            }
        }
    }
}

/// How long an incoming stream may take to authenticate its first domain: TLS, SASL and
/// a dialback round trip to the peer's authoritative server (itself bounded by
/// `connect_timeout` twice), with room to spare.
fn negotiation_timeout(svc: &FederationService) -> std::time::Duration {
    (svc.config.connect_timeout * 3).max(std::time::Duration::from_secs(3))
}

impl Incoming {
    /// The next event; before the peer authenticated anything, within the deadline.
    async fn next_event(&mut self) -> Result<StreamEvent, LinkError> {
        if !self.authenticated.is_empty() {
            return self.s.next_event().await;
        }
        match tokio::time::timeout_at(self.negotiation_deadline, self.s.next_event()).await {
            Ok(r) => r,
            Err(_) => Err(err(
                SErr::ConnectionTimeout,
                "no domain authenticated in time",
            )),
        }
    }

    async fn run(&mut self) -> Result<(), LinkError> {
        loop {
            if self.open().await? {
                continue;
            }
            loop {
                let el = match self.next_event().await? {
                    StreamEvent::Element(e) => e,
                    StreamEvent::Close => return Ok(()),
                    StreamEvent::Open(_) => {
                        return Err(err(SErr::NotWellFormed, "unexpected stream header"))
                    }
                };
                if self.element(el).await? {
                    break;
                }
            }
        }
    }

    /// Reads the peer's header and answers it; true if the stream must be reopened.
    async fn open(&mut self) -> Result<bool, LinkError> {
        let header = match self.next_event().await? {
            StreamEvent::Open(h) => h,
            _ => return Err(err(SErr::NotWellFormed, "expected a stream header")),
        };
        let to = header.to.clone().map(|t| t.to_ascii_lowercase());
        let local_ok = to
            .as_deref()
            .is_some_and(|t| self.svc.host.is_local_domain(t));
        let from_header = to
            .clone()
            .filter(|_| local_ok)
            .or_else(|| self.local.clone());
        self.stream_id = new_id();
        let our_name = from_header
            .clone()
            .or_else(|| self.svc.host.default_domain())
            .unwrap_or_default();
        self.s
            .write_header(&our_name, header.from.as_deref(), Some(&self.stream_id))
            .await?;
        self.header_sent = true;
        if header.default_ns != ns::SERVER {
            return Err(err(
                SErr::InvalidNamespace,
                "this is a server port: use jabber:server",
            ));
        }
        if header.version.as_deref().and_then(|v| v.split('.').next()) != Some("1") {
            return Err(err(SErr::UnsupportedVersion, "XMPP 1.0 is required"));
        }
        if !local_ok {
            return Err(err(SErr::HostUnknown, "not a domain served here"));
        }
        if let (Some(prev), Some(now)) = (&self.local, &to) {
            if prev != now {
                return Err(err(SErr::HostUnknown, "the stream changed its target"));
            }
        }
        self.local = to;
        if let Some(from) = header.from.as_deref() {
            self.claimed = Some(from.to_ascii_lowercase());
        }
        let features = self.features();
        self.s.write_stream_child("features", &features).await?;
        Ok(false)
    }

    fn remote_policy_domain(&self) -> &str {
        self.claimed.as_deref().unwrap_or("")
    }

    fn peer_cert_status(&self, domain: &str) -> CertStatus {
        if !self.s.conn.is_tls() {
            return CertStatus::Missing;
        }
        check_peer_cert(
            &self.svc.anchors,
            &self.s.conn.peer_certificates(),
            domain,
            UnixTime::now(),
        )
    }

    fn features(&self) -> Vec<Element> {
        let mut f = Vec::new();
        let tls = self.s.conn.is_tls();
        let remote = self.remote_policy_domain();
        if !tls {
            let mut starttls = Element::new("starttls", ns::TLS);
            if self.svc.config.require_encryption_for(remote) {
                starttls.append_child(Element::new("required", ns::TLS));
            }
            f.push(starttls);
        }
        if self.sasl_done {
            return f;
        }
        if let Some(claimed) = &self.claimed {
            if self.peer_cert_status(claimed) == CertStatus::Valid {
                f.push(
                    Element::new("mechanisms", ns::SASL)
                        .with_child(Element::new("mechanism", ns::SASL).with_text("EXTERNAL")),
                );
            }
        }
        if self.svc.config.allow_dialback_for(remote)
            && (tls || !self.svc.config.require_encryption_for(remote))
        {
            f.push(
                Element::new("dialback", ns::DIALBACK_FEATURE)
                    .with_child(Element::new("errors", ns::DIALBACK_FEATURE)),
            );
        }
        f
    }

    /// Handles one element; true when the stream restarts.
    async fn element(&mut self, el: Element) -> Result<bool, LinkError> {
        if el.is("error", ns::STREAM) {
            // RFC 6120 §4.9: the peer closes the stream with an error; nothing to answer.
            let why = StreamError::from_element(&el)
                .map(|e| e.to_string())
                .unwrap_or_else(|| "unknown".into());
            return Err(LinkError::Protocol(format!(
                "peer sent a stream error: {why}"
            )));
        }
        if el.is("starttls", ns::TLS) {
            return self.starttls().await.map(|()| true);
        }
        if el.is("auth", ns::SASL) {
            return self.sasl_external(&el).await;
        }
        if el.is("result", ns::DIALBACK) {
            self.dialback_result(&el).await?;
            return Ok(false);
        }
        if el.is("verify", ns::DIALBACK) {
            self.dialback_verify(&el).await?;
            return Ok(false);
        }
        if el.ns() == ns::SERVER && matches!(el.name(), "message" | "presence" | "iq") {
            self.stanza(el).await?;
            return Ok(false);
        }
        Err(err(SErr::UnsupportedStanzaType, "unexpected element"))
    }

    async fn starttls(&mut self) -> Result<(), LinkError> {
        if self.s.conn.is_tls() {
            return Err(err(SErr::PolicyViolation, "TLS is already in place"));
        }
        self.s
            .write_raw(format!("<proceed xmlns='{}'/>", ns::TLS).as_bytes())
            .await?;
        let tcp = self
            .s
            .conn
            .take_plain()
            .ok_or_else(|| LinkError::Tls("no plain connection".into()))?;
        let accept = self.svc.server_tls.accept(tcp);
        match tokio::time::timeout(self.svc.config.connect_timeout, accept).await {
            Ok(Ok(tls)) => self.s.conn = Conn::Server(Box::new(tls)),
            Ok(Err(e)) => return Err(LinkError::Tls(e.to_string())),
            Err(_) => return Err(LinkError::Timeout),
        }
        // RFC 6120 §5.4.3.3: nothing sent before the handshake counts.
        self.s.restart();
        self.header_sent = false;
        Ok(())
    }

    /// XEP-0178: SASL EXTERNAL with the certificate the peer presented in TLS.
    async fn sasl_external(&mut self, el: &Element) -> Result<bool, LinkError> {
        let failure =
            |cond: &str| Element::new("failure", ns::SASL).with_child(Element::new(cond, ns::SASL));
        if el.attr("mechanism") != Some("EXTERNAL") || self.sasl_done {
            self.s.write_element(&failure("invalid-mechanism")).await?;
            return Ok(false);
        }
        // The authorization identity is the peer's domain, or "=" for "as in the header".
        let text = el.text();
        let authzid = match text.trim() {
            "" | "=" => self.claimed.clone(),
            t => match decode_payload(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
            {
                Some(d) if !d.is_empty() => Some(d.to_ascii_lowercase()),
                Some(_) => self.claimed.clone(),
                None => {
                    self.s.write_element(&failure("incorrect-encoding")).await?;
                    return Ok(false);
                }
            },
        };
        let Some(domain) = authzid else {
            self.s.write_element(&failure("invalid-authzid")).await?;
            return Ok(false);
        };
        if self.claimed.as_deref().is_some_and(|c| c != domain) {
            self.s.write_element(&failure("invalid-authzid")).await?;
            return Ok(false);
        }
        if self.peer_cert_status(&domain) != CertStatus::Valid {
            self.s.write_element(&failure("not-authorized")).await?;
            return Ok(false);
        }
        self.s
            .write_element(&Element::new("success", ns::SASL))
            .await?;
        tracing::info!(peer = %self.peer, %domain, "incoming link authenticated by certificate");
        self.svc.incoming_authenticated(
            self.link_id,
            &domain,
            crate::service::AuthMethod::External,
        );
        self.authenticated.insert(domain);
        self.s.authenticated(full_limits(&self.svc));
        self.sasl_done = true;
        self.s.restart();
        self.header_sent = false;
        Ok(true)
    }

    /// XEP-0220 §2.1: the peer asks us to accept its domain with a key we verify with
    /// its authoritative server (found through DNS).
    async fn dialback_result(&mut self, el: &Element) -> Result<(), LinkError> {
        let (Some(from), Some(to)) = (el.attr("from"), el.attr("to")) else {
            return Err(err(SErr::ImproperAddressing, "dialback without from/to"));
        };
        let (from, to) = (from.to_ascii_lowercase(), to.to_ascii_lowercase());
        if !self.svc.host.is_local_domain(&to) {
            return Err(err(SErr::HostUnknown, "not a domain served here"));
        }
        let answer = |ty: &str| {
            Element::new("result", ns::DIALBACK)
                .with_attr("from", to.clone())
                .with_attr("to", from.clone())
                .with_attr("type", ty)
        };
        let allowed = self.svc.config.allow_dialback_for(&from)
            && (self.s.conn.is_tls() || !self.svc.config.require_encryption_for(&from));
        if !allowed {
            // XEP-0220 §2.4: refuse with an error the peer can report.
            let refusal = answer("error").with_child(
                Element::new("error", ns::SERVER)
                    .with_attr("type", "cancel")
                    .with_child(Element::new("policy-violation", ns::STANZAS)),
            );
            self.s.write_element(&refusal).await?;
            return Ok(());
        }
        if self.authenticated.contains(&from) {
            // Proved on this stream already: nothing to ask its authoritative server again.
            return self.s.write_element(&answer("valid")).await;
        }
        // Each verification is an outgoing connection to the server of the domain the peer
        // claims: without a limit, anyone could make us connect to a domain of their
        // choosing as often as they like.
        let per_minute = self.svc.config.dialback_per_domain_per_minute;
        if !self
            .svc
            .dialback_starts
            .try_record(&from, per_minute, std::time::Instant::now())
        {
            tracing::warn!(peer = %self.peer, domain = %from, "too many dialback requests for this domain; refusing");
            let refusal = answer("error").with_child(
                Element::new("error", ns::SERVER)
                    .with_attr("type", "wait")
                    .with_child(Element::new("resource-constraint", ns::STANZAS)),
            );
            self.s.write_element(&refusal).await?;
            return Ok(());
        }
        let key = el.text();
        let valid = match verify_dialback(&self.svc, &to, &from, &self.stream_id, key.trim()).await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(%from, error = %e, "dialback verification failed");
                let refusal = answer("error").with_child(
                    Element::new("error", ns::SERVER)
                        .with_attr("type", "cancel")
                        .with_child(Element::new("remote-server-not-found", ns::STANZAS)),
                );
                self.s.write_element(&refusal).await?;
                return Ok(());
            }
        };
        if valid {
            tracing::info!(peer = %self.peer, domain = %from, "incoming link authenticated by dialback");
            self.svc.incoming_authenticated(
                self.link_id,
                &from,
                crate::service::AuthMethod::Dialback,
            );
            self.authenticated.insert(from.clone());
            self.s.authenticated(full_limits(&self.svc));
            self.s.write_element(&answer("valid")).await
        } else {
            self.s.write_element(&answer("invalid")).await?;
            Err(err(SErr::NotAuthorized, "dialback key refused"))
        }
    }

    /// XEP-0220 §2.3: as the authoritative server, say whether we issued `key`.
    async fn dialback_verify(&mut self, el: &Element) -> Result<(), LinkError> {
        let (Some(from), Some(to), Some(id)) = (el.attr("from"), el.attr("to"), el.attr("id"))
        else {
            return Err(err(
                SErr::ImproperAddressing,
                "dialback verify without from/to/id",
            ));
        };
        if !self.svc.host.is_local_domain(to) {
            return Err(err(SErr::HostUnknown, "not a domain served here"));
        }
        // The key was computed by our outgoing side for (receiving = from, originating = to).
        let valid = verify_key(&self.svc.secret, from, to, id, el.text().trim());
        let reply = Element::new("verify", ns::DIALBACK)
            .with_attr("from", to)
            .with_attr("to", from)
            .with_attr("id", id)
            .with_attr("type", if valid { "valid" } else { "invalid" });
        self.s.write_element(&reply).await
    }

    /// RFC 6120 §8.1.1/§8.1.2: a stanza must come from an authenticated domain and go
    /// to one of ours.
    async fn stanza(&mut self, mut stanza: Element) -> Result<(), LinkError> {
        if self.authenticated.is_empty() {
            return Err(err(SErr::NotAuthorized, "authenticate first"));
        }
        let from_domain = stanza.attr("from").and_then(domain_of);
        let to_domain = stanza.attr("to").and_then(domain_of);
        let (Some(from_domain), Some(to_domain)) = (from_domain, to_domain) else {
            return Err(err(SErr::ImproperAddressing, "stanzas need from and to"));
        };
        if !self.authenticated.contains(&from_domain) {
            return Err(err(
                SErr::InvalidFrom,
                "from a domain not authenticated on this link",
            ));
        }
        if !self.svc.host.is_local_domain(&to_domain) {
            return Err(err(SErr::HostUnknown, "to a domain not served here"));
        }
        stanza.map_ns(ns::SERVER, ns::CLIENT);
        self.svc.count_in();
        self.svc.host.deliver(stanza).await;
        Ok(())
    }
}

/// The (lower-cased) domain part of a JID string, without full preparation: the
/// router prepares and checks the whole address again.
fn domain_of(jid: &str) -> Option<String> {
    // RFC 7622 §3.1: the first '/' starts the resource; an '@' before it ends the node.
    let bare = jid.split('/').next().unwrap_or(jid);
    let domain = bare.split_once('@').map_or(bare, |(_, d)| d);
    (!domain.is_empty()).then(|| domain.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::domain_of;

    #[test]
    fn domain_parts() {
        assert_eq!(domain_of("a@B.test/r").as_deref(), Some("b.test"));
        assert_eq!(domain_of("b.test").as_deref(), Some("b.test"));
        assert_eq!(domain_of("b.test/r@x").as_deref(), Some("b.test"));
        assert_eq!(domain_of("a@").as_deref(), None);
    }
}
