//! Bad input on the server-to-server port (RFC 6120 §4.9, §8.1, §13; XEP-0178;
//! XEP-0220): a scripted peer sends what a broken or hostile server might, and the
//! listener answers with the right stream error or SASL failure, never panics, and
//! keeps serving: after each case a normal federation round trip between two real
//! servers still works.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use confab_federation::dialback::{dialback_key, DialbackSecret};
use confab_protocol::sasl::encode_payload;
use confab_protocol::{ns, Element, ParserLimits, StreamEvent, StreamHeader, StreamParser};
use confab_tests::dns::TestDns;
use confab_tests::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const A: &str = "a.test";
const B: &str = "b.test";
/// A domain with a certificate from the test CA but no server.
const C: &str = "c.test";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// ---------------------------------------------------------------------------------------
// Two federating servers (as in federation.rs).

struct Pair {
    dns: TestDns,
    a: TestServer,
    b: TestServer,
}

fn publish(dns: &TestDns, domain: &str, server: &TestServer) {
    let host = format!("xmpp.{domain}");
    dns.add_srv(
        &format!("_xmpp-server._tcp.{domain}"),
        0,
        5,
        server.running().s2s_addrs[0].port(),
        &host,
    );
    dns.add_a(&host, LOOPBACK);
}

async fn pair() -> Result<Pair> {
    pair_with(|_| {}).await
}

async fn pair_with(adjust: impl Fn(&mut confab::Config) + Copy) -> Result<Pair> {
    let pki = TestPki::create_temp(&[A, B, C])?;
    let dns = TestDns::start().await?;
    let ns_addr = dns.addr.to_string();
    let set = |c: &mut confab::Config| {
        c.s2s.nameservers = vec![ns_addr.clone()];
        c.s2s.connect_timeout_secs = 5;
        adjust(c);
    };
    let a = TestServer::start_with_pki(pki.clone(), &[A], set).await?;
    let b = TestServer::start_with_pki(pki, &[B], set).await?;
    publish(&dns, A, &a);
    publish(&dns, B, &b);
    a.add_account(&format!("alice@{A}"), "pw-alice").await?;
    b.add_account(&format!("bob@{B}"), "pw-bob").await?;
    Ok(Pair { dns, a, b })
}

impl Pair {
    /// b's STARTTLS s2s address, where the scripted peer connects.
    fn b_s2s(&self) -> SocketAddr {
        self.b.running().s2s_addrs[0]
    }

    /// A message each way between alice@a.test and bob@b.test over real links.
    async fn round_trip(&self, tag: &str) -> Result<()> {
        let mut alice = self
            .a
            .online_at(A, "alice", "pw-alice", &format!("rt-{tag}"))
            .await?;
        let mut bob = self
            .b
            .online_at(B, "bob", "pw-bob", &format!("rt-{tag}"))
            .await?;
        let there = format!("{tag}: a to b");
        alice.chat(&format!("bob@{B}"), &there).await?;
        bob.expect_body(&there).await.context("round trip a -> b")?;
        let back = format!("{tag}: b to a");
        bob.chat(&alice.jid.clone(), &back).await?;
        alice
            .expect_body(&back)
            .await
            .context("round trip b -> a")?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// A scripted server-to-server peer.

enum RawConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Gone,
}

struct RawS2s {
    conn: RawConn,
    parser: StreamParser,
    pending: VecDeque<Element>,
    buf: Vec<u8>,
    /// The header of the stream the server opened last.
    header: Option<StreamHeader>,
}

impl RawS2s {
    async fn connect(addr: SocketAddr) -> Result<RawS2s> {
        let tcp = TcpStream::connect(addr).await?;
        Ok(RawS2s {
            conn: RawConn::Plain(tcp),
            parser: StreamParser::new(ParserLimits {
                max_stanza_size: 16 * 1024 * 1024,
                max_depth: 128,
            }),
            pending: VecDeque::new(),
            buf: vec![0; 65536],
            header: None,
        })
    }

    async fn send_raw(&mut self, data: &[u8]) -> Result<()> {
        match &mut self.conn {
            RawConn::Plain(s) => {
                s.write_all(data).await?;
                s.flush().await?;
            }
            RawConn::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await?;
            }
            RawConn::Gone => bail!("connection gone"),
        }
        Ok(())
    }

    async fn send_str(&mut self, data: &str) -> Result<()> {
        self.send_raw(data.as_bytes()).await
    }

    async fn send(&mut self, e: &Element) -> Result<()> {
        self.send_str(&e.to_xml(ns::SERVER)).await
    }

    async fn read_some(&mut self) -> Result<usize> {
        let n = match &mut self.conn {
            RawConn::Plain(s) => s.read(&mut self.buf).await?,
            RawConn::Tls(s) => s.read(&mut self.buf).await?,
            RawConn::Gone => bail!("connection gone"),
        };
        self.parser.feed(&self.buf[..n]);
        Ok(n)
    }

    async fn next_event(&mut self) -> Result<StreamEvent> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(ev) = self.parser.next_event()? {
                return Ok(ev);
            }
            let n = tokio::time::timeout_at(deadline, self.read_some())
                .await
                .map_err(|_| anyhow!("timed out waiting for the server"))??;
            if n == 0 {
                bail!("connection closed by the server");
            }
        }
    }

    async fn next(&mut self) -> Result<Element> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(e);
        }
        match self.next_event().await? {
            StreamEvent::Element(e) => Ok(e),
            StreamEvent::Close => bail!("stream closed by the server"),
            StreamEvent::Open(h) => bail!("unexpected stream header {h:?}"),
        }
    }

    /// Waits for an element matching `pred`; others are kept.
    async fn expect(&mut self, pred: impl Fn(&Element) -> bool) -> Result<Element> {
        if let Some(pos) = self.pending.iter().position(&pred) {
            return Ok(self.pending.remove(pos).expect("position is valid"));
        }
        loop {
            match self.next_event().await? {
                StreamEvent::Element(e) if pred(&e) => return Ok(e),
                StreamEvent::Element(e) => self.pending.push_back(e),
                StreamEvent::Close => bail!("stream closed; unmatched: {:?}", self.pending),
                StreamEvent::Open(h) => bail!("unexpected stream header {h:?}"),
            }
        }
    }

    /// Sends an s2s stream header and reads the server's header and features.
    async fn open(&mut self, from: Option<&str>, to: &str) -> Result<Element> {
        let from = from.map(|f| format!(" from='{f}'")).unwrap_or_default();
        self.send_str(&format!(
            "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' xmlns:db='{}'{from} to='{to}' version='1.0'>",
            ns::SERVER,
            ns::STREAM,
            ns::DIALBACK
        ))
        .await?;
        match self.next_event().await? {
            StreamEvent::Open(h) => self.header = Some(h),
            other => bail!("expected a stream header, got {other:?}"),
        }
        let features = self.next().await?;
        if !features.is("features", ns::STREAM) {
            bail!("expected features, got {features}");
        }
        Ok(features)
    }

    /// STARTTLS to `server_name`, presenting the certificate of `cert_domain` from the
    /// test CA as client certificate when given.
    async fn starttls(
        &mut self,
        pki: &TestPki,
        server_name: &str,
        cert_domain: Option<&str>,
    ) -> Result<()> {
        self.send_str(&format!("<starttls xmlns='{}'/>", ns::TLS))
            .await?;
        let proceed = self.next().await?;
        if !proceed.is("proceed", ns::TLS) {
            bail!("expected proceed, got {proceed}");
        }
        let RawConn::Plain(tcp) = std::mem::replace(&mut self.conn, RawConn::Gone) else {
            bail!("already TLS");
        };
        let connector = tokio_rustls::TlsConnector::from(tls_client(pki, cert_domain)?);
        let name = ServerName::try_from(server_name.to_string())?;
        let tls = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp)).await??;
        self.conn = RawConn::Tls(Box::new(tls));
        self.parser.reset();
        Ok(())
    }

    /// SASL EXTERNAL with `authzid` ("=" for an empty response); the outcome element.
    async fn external(&mut self, authzid: &str) -> Result<Element> {
        let payload = if authzid == "=" {
            "=".to_string()
        } else {
            encode_payload(authzid.as_bytes())
        };
        self.send(
            &Element::new("auth", ns::SASL)
                .with_attr("mechanism", "EXTERNAL")
                .with_text(payload),
        )
        .await?;
        let outcome = self.next().await?;
        if outcome.is("success", ns::SASL) {
            self.parser.reset();
        }
        Ok(outcome)
    }

    /// Reads until the stream ends; the stream error condition if there was one.
    async fn expect_closed(&mut self) -> Result<Closed> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let mut error = None;
        loop {
            let ev = match tokio::time::timeout_at(deadline, self.next_event()).await {
                Err(_) => bail!("timed out waiting for the stream to close"),
                Ok(Err(_)) => return Ok(error.map(Closed::StreamError).unwrap_or(Closed::Eof)),
                Ok(Ok(ev)) => ev,
            };
            match ev {
                StreamEvent::Element(e) if e.is("error", ns::STREAM) => {
                    error = Some(
                        e.children()
                            .find(|c| c.ns() == ns::STREAMS && c.name() != "text")
                            .map(|c| c.name().to_string())
                            .unwrap_or_default(),
                    );
                }
                StreamEvent::Element(_) | StreamEvent::Open(_) => {}
                StreamEvent::Close => {
                    return Ok(error.map(Closed::StreamError).unwrap_or(Closed::Clean))
                }
            }
        }
    }

    /// Plain TCP, stream, STARTTLS (with a client certificate for `cert`), stream again.
    async fn secured(
        p: &Pair,
        claimed: Option<&str>,
        cert: Option<&str>,
    ) -> Result<(RawS2s, Element)> {
        let mut raw = RawS2s::connect(p.b_s2s()).await?;
        let features = raw.open(claimed, B).await?;
        if features.get_child("starttls", ns::TLS).is_none() {
            bail!("STARTTLS not offered: {features}");
        }
        raw.starttls(&p.b.pki, B, cert).await?;
        let features = raw.open(claimed, B).await?;
        Ok((raw, features))
    }
}

fn tls_client(pki: &TestPki, cert_domain: Option<&str>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(pki.ca_der.clone()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match cert_domain {
        None => builder.with_no_client_auth(),
        Some(d) => {
            let pem = std::fs::read(pki.dir.join(format!("{d}.pem")))?;
            let chain = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>()?;
            let key =
                PrivateKeyDer::from_pem_slice(&std::fs::read(pki.dir.join(format!("{d}.key")))?)?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    Ok(Arc::new(config))
}

fn sasl_condition(e: &Element) -> Option<String> {
    e.is("failure", ns::SASL)
        .then(|| {
            e.children()
                .find(|c| c.ns() == ns::SASL && c.name() != "text")
                .map(|c| c.name().to_string())
        })
        .flatten()
}

fn has_external(features: &Element) -> bool {
    features
        .get_child("mechanisms", ns::SASL)
        .is_some_and(|m| m.children().any(|c| c.text() == "EXTERNAL"))
}

fn s2s_message(from: &str, to: &str, body: &str) -> Element {
    Element::new("message", ns::SERVER)
        .with_attr("from", from)
        .with_attr("to", to)
        .with_attr("type", "chat")
        .with_child(Element::new("body", ns::SERVER).with_text(body))
}

fn header(ns_default: &str, from: &str, to: &str, version: Option<&str>) -> String {
    let version = version
        .map(|v| format!(" version='{v}'"))
        .unwrap_or_default();
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='{ns_default}' xmlns:stream='{}' from='{from}' to='{to}'{version}>",
        ns::STREAM
    )
}

/// Sends `data` on a fresh connection to b's s2s port and returns how the stream ended.
async fn send_and_close(p: &Pair, data: &str) -> Result<Closed> {
    let mut raw = RawS2s::connect(p.b_s2s()).await?;
    raw.send_str(data).await?;
    raw.expect_closed().await
}

fn stream_error(cond: &str) -> Closed {
    Closed::StreamError(cond.to_string())
}

// ---------------------------------------------------------------------------------------
// Malformed or restricted XML, bad headers.

#[tokio::test]
async fn garbage_before_the_header_is_not_well_formed() -> Result<()> {
    let p = pair().await?;
    // RFC 6120 §4.9.1.1: even before the peer's header, the error is preceded by ours.
    let closed = send_and_close(&p, "GET / HTTP/1.1\r\nHost: b.test\r\n\r\n").await?;
    assert_eq!(closed, stream_error("not-well-formed"));
    p.round_trip("garbage").await
}

#[tokio::test]
async fn not_well_formed_stanza_closes_the_stream() -> Result<()> {
    let p = pair().await?;
    let mut raw = RawS2s::connect(p.b_s2s()).await?;
    raw.open(Some(A), B).await?;
    raw.send_str("<message><body>unclosed</message>").await?;
    assert_eq!(raw.expect_closed().await?, stream_error("not-well-formed"));
    p.round_trip("nwf").await
}

#[tokio::test]
async fn doctype_before_the_header_is_restricted_xml() -> Result<()> {
    let p = pair().await?;
    let data = format!(
        "<?xml version='1.0'?><!DOCTYPE stream:stream [<!ENTITY x 'boom'>]>{}",
        &header(ns::SERVER, A, B, Some("1.0"))["<?xml version='1.0'?>".len()..]
    );
    let closed = send_and_close(&p, &data).await?;
    assert_eq!(closed, stream_error("restricted-xml"));
    p.round_trip("doctype").await
}

#[tokio::test]
async fn processing_instruction_and_comment_are_restricted_xml() -> Result<()> {
    let p = pair().await?;
    for bad in ["<?evil instruction?>", "<!-- a comment -->"] {
        let mut raw = RawS2s::connect(p.b_s2s()).await?;
        raw.open(Some(A), B).await?;
        raw.send_str(bad).await?;
        assert_eq!(
            raw.expect_closed().await?,
            stream_error("restricted-xml"),
            "{bad}"
        );
    }
    p.round_trip("pi-comment").await
}

#[tokio::test]
async fn client_namespace_on_the_server_port_is_invalid_namespace() -> Result<()> {
    let p = pair().await?;
    let closed = send_and_close(&p, &header(ns::CLIENT, A, B, Some("1.0"))).await?;
    assert_eq!(closed, stream_error("invalid-namespace"));
    p.round_trip("jabber-client").await
}

#[tokio::test]
async fn header_to_a_domain_not_served_is_host_unknown() -> Result<()> {
    let p = pair().await?;
    let closed = send_and_close(&p, &header(ns::SERVER, A, "nowhere.test", Some("1.0"))).await?;
    assert_eq!(closed, stream_error("host-unknown"));
    p.round_trip("host-unknown").await
}

#[tokio::test]
async fn missing_or_old_version_is_unsupported_version() -> Result<()> {
    let p = pair().await?;
    for version in [None, Some("0.9")] {
        let closed = send_and_close(&p, &header(ns::SERVER, A, B, version)).await?;
        assert_eq!(
            closed,
            stream_error("unsupported-version"),
            "version {version:?}"
        );
    }
    p.round_trip("version").await
}

#[tokio::test]
async fn stanza_before_authentication_is_not_authorized() -> Result<()> {
    let p = pair().await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "watch").await?;
    // Before TLS, and after TLS but before SASL or dialback.
    let mut raw = RawS2s::connect(p.b_s2s()).await?;
    raw.open(Some(A), B).await?;
    raw.send(&s2s_message(
        &format!("mallory@{A}"),
        &format!("bob@{B}"),
        "plain",
    ))
    .await?;
    assert_eq!(raw.expect_closed().await?, stream_error("not-authorized"));
    let (mut raw, _) = RawS2s::secured(&p, Some(A), None).await?;
    raw.send(&s2s_message(
        &format!("mallory@{A}"),
        &format!("bob@{B}"),
        "tls",
    ))
    .await?;
    assert_eq!(raw.expect_closed().await?, stream_error("not-authorized"));
    bob.expect_none(|e| e.name() == "message").await?;
    p.round_trip("unauthenticated").await
}

/// The first bytes of a message to bob of `len` bytes in all (the rest is up to the caller).
fn big_message_head(len: usize) -> Vec<u8> {
    let mut big = format!("<message from='x@{A}' to='bob@{B}'><body>").into_bytes();
    big.resize(len, b'x');
    big
}

/// Before a domain is authenticated only small elements are expected (STARTTLS, SASL,
/// dialback): past 16 KiB (`limits.pre_auth_stanza_size`) a stanza is a policy violation.
/// Once the link is authenticated, by certificate or by dialback, stanzas of up to 512 KiB
/// (`s2s.max_stanza_size`) are taken: 100 KiB is delivered, 513 KiB is refused.
#[tokio::test]
async fn stanza_size_is_16_kib_before_authentication_and_512_kib_after() -> Result<()> {
    let p = pair().await?;
    let mut raw = RawS2s::connect(p.b_s2s()).await?;
    raw.open(Some(A), B).await?;
    // The server may stop reading once the limit is passed: a failed write is fine.
    let _ = raw.send_raw(&big_message_head(17 * 1024)).await;
    assert_eq!(raw.expect_closed().await?, stream_error("policy-violation"));

    let mut bob = p.b.online_at(B, "bob", "pw-bob", "big").await?;
    let body = "y".repeat(100 * 1024);
    let big = s2s_message(&format!("carol@{A}"), &format!("bob@{B}"), &body);
    // By certificate.
    let (mut raw, _) = RawS2s::secured(&p, Some(A), Some(A)).await?;
    let outcome = raw.external(A).await?;
    assert!(outcome.is("success", ns::SASL), "{outcome}");
    raw.open(Some(A), B).await?;
    raw.send(&big).await?;
    bob.expect_body(&body).await?;
    let _ = raw.send_raw(&big_message_head(513 * 1024)).await;
    assert_eq!(raw.expect_closed().await?, stream_error("policy-violation"));
    // By dialback, with the key a's secret gives for this stream (XEP-0185), so that a
    // confirms it when b asks.
    let secret = std::fs::read(p.a.config.data_dir.join("dialback.secret"))?;
    let (mut raw, _) = RawS2s::secured(&p, Some(A), None).await?;
    let stream_id = raw
        .header
        .as_ref()
        .and_then(|h| h.id.clone())
        .context("b's header has no id")?;
    let key = dialback_key(&DialbackSecret::from_bytes(&secret), B, A, &stream_id);
    raw.send(
        &Element::new("result", ns::DIALBACK)
            .with_attr("from", A)
            .with_attr("to", B)
            .with_text(key),
    )
    .await?;
    let answer = raw.expect(|e| e.is("result", ns::DIALBACK)).await?;
    assert_eq!(answer.attr("type"), Some("valid"), "{answer}");
    raw.send(&big).await?;
    bob.expect_body(&body).await?;
    p.round_trip("too-big").await
}

#[tokio::test]
async fn starttls_twice_is_refused() -> Result<()> {
    let p = pair().await?;
    let (mut raw, features) = RawS2s::secured(&p, Some(A), None).await?;
    assert!(features.get_child("starttls", ns::TLS).is_none());
    raw.send_str(&format!("<starttls xmlns='{}'/>", ns::TLS))
        .await?;
    assert_eq!(raw.expect_closed().await?, stream_error("policy-violation"));
    p.round_trip("starttls-twice").await
}

// ---------------------------------------------------------------------------------------
// SASL EXTERNAL (XEP-0178).

#[tokio::test]
async fn external_without_a_certificate_is_not_authorized() -> Result<()> {
    let p = pair().await?;
    let (mut raw, features) = RawS2s::secured(&p, Some(A), None).await?;
    assert!(!has_external(&features), "{features}");
    let outcome = raw.external(A).await?;
    assert_eq!(sasl_condition(&outcome).as_deref(), Some("not-authorized"));
    // Still not authenticated: a stanza ends the stream.
    raw.send(&s2s_message(&format!("x@{A}"), &format!("bob@{B}"), "no"))
        .await?;
    assert_eq!(raw.expect_closed().await?, stream_error("not-authorized"));
    p.round_trip("external-no-cert").await
}

#[tokio::test]
async fn external_with_a_certificate_for_another_domain_is_not_authorized() -> Result<()> {
    let p = pair().await?;
    // The certificate is valid, but for c.test; the peer claims a.test.
    let (mut raw, features) = RawS2s::secured(&p, Some(A), Some(C)).await?;
    assert!(!has_external(&features), "{features}");
    for authzid in [A, "="] {
        let outcome = raw.external(authzid).await?;
        assert_eq!(
            sasl_condition(&outcome).as_deref(),
            Some("not-authorized"),
            "authzid {authzid}"
        );
    }
    p.round_trip("external-wrong-cert").await
}

#[tokio::test]
async fn external_authzid_for_another_domain_is_invalid_authzid() -> Result<()> {
    let p = pair().await?;
    let (mut raw, features) = RawS2s::secured(&p, Some(A), Some(A)).await?;
    assert!(has_external(&features), "{features}");
    let outcome = raw.external(C).await?;
    assert_eq!(sasl_condition(&outcome).as_deref(), Some("invalid-authzid"));
    // The right authzid still works on the same stream.
    let outcome = raw.external(A).await?;
    assert!(outcome.is("success", ns::SASL), "{outcome}");
    p.round_trip("authzid").await
}

#[tokio::test]
async fn spoofed_from_after_external_is_invalid_from_and_not_delivered() -> Result<()> {
    let p = pair().await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "watch").await?;
    let (mut raw, _) = RawS2s::secured(&p, Some(A), Some(A)).await?;
    let outcome = raw.external(A).await?;
    assert!(outcome.is("success", ns::SASL), "{outcome}");
    raw.open(Some(A), B).await?;
    // From the authenticated domain: delivered (the scripted peer works).
    raw.send(&s2s_message(
        &format!("carol@{A}"),
        &format!("bob@{B}"),
        "genuine",
    ))
    .await?;
    let m = bob.expect_body("genuine").await?;
    assert_eq!(m.attr("from"), Some(format!("carol@{A}").as_str()));
    // From a domain the link never proved.
    raw.send(&s2s_message(
        &format!("mallory@{C}"),
        &format!("bob@{B}"),
        "spoofed",
    ))
    .await?;
    assert_eq!(raw.expect_closed().await?, stream_error("invalid-from"));
    bob.expect_none(|e| {
        e.name() == "message"
            && e.get_child("body", ns::CLIENT).map(|b| b.text()).as_deref() == Some("spoofed")
    })
    .await?;
    p.round_trip("spoofed-from").await
}

/// A peer that vanishes without closing its stream takes its users' presence with it
/// (RFC 6121 §4.3): local users are told those resources are unavailable.
#[tokio::test]
async fn a_vanished_link_marks_its_users_unavailable() -> Result<()> {
    let p = pair().await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "watch").await?;
    let (mut raw, _) = RawS2s::secured(&p, Some(A), Some(A)).await?;
    let outcome = raw.external(A).await?;
    assert!(outcome.is("success", ns::SASL), "{outcome}");
    raw.open(Some(A), B).await?;
    let carol = format!("carol@{A}/laptop");
    let mut avail = Element::new("presence", ns::SERVER)
        .with_attr("from", carol.clone())
        .with_attr("to", format!("bob@{B}"));
    avail.append_child(Element::new("status", ns::SERVER).with_text("here"));
    raw.send(&avail).await?;
    bob.expect(|e| e.name() == "presence" && e.attr("from") == Some(carol.as_str()))
        .await?;
    // The TCP connection drops without </stream:stream>.
    drop(raw);
    let gone = bob
        .expect(|e| {
            e.name() == "presence"
                && e.attr("from") == Some(carol.as_str())
                && e.attr("type") == Some("unavailable")
        })
        .await?;
    assert_eq!(gone.attr("to"), Some(format!("bob@{B}").as_str()));
    p.round_trip("vanished-link").await
}

#[tokio::test]
async fn stanza_to_a_domain_not_served_is_host_unknown() -> Result<()> {
    let p = pair().await?;
    let (mut raw, _) = RawS2s::secured(&p, Some(A), Some(A)).await?;
    let outcome = raw.external(A).await?;
    assert!(outcome.is("success", ns::SASL), "{outcome}");
    raw.open(Some(A), B).await?;
    raw.send(&s2s_message(
        &format!("carol@{A}"),
        "someone@nowhere.test",
        "relay me",
    ))
    .await?;
    assert_eq!(raw.expect_closed().await?, stream_error("host-unknown"));
    p.round_trip("stanza-host-unknown").await
}

// ---------------------------------------------------------------------------------------
// Dialback (XEP-0220).

#[tokio::test]
async fn dialback_with_a_forged_key_is_invalid() -> Result<()> {
    let p = pair().await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "watch").await?;
    // No client certificate: the peer must use dialback, and claims a.test, whose
    // authoritative server (the real a) never issued this key.
    let (mut raw, features) = RawS2s::secured(&p, Some(A), None).await?;
    assert!(
        features
            .get_child("dialback", ns::DIALBACK_FEATURE)
            .is_some(),
        "{features}"
    );
    raw.send(
        &Element::new("result", ns::DIALBACK)
            .with_attr("from", A)
            .with_attr("to", B)
            .with_text("0".repeat(64)),
    )
    .await?;
    let answer = raw.expect(|e| e.is("result", ns::DIALBACK)).await?;
    assert_eq!(answer.attr("type"), Some("invalid"), "{answer}");
    assert_eq!(answer.attr("from"), Some(B));
    assert_eq!(answer.attr("to"), Some(A));
    // Nothing from a.test is accepted on this stream.
    let _ = raw
        .send(&s2s_message(
            &format!("mallory@{A}"),
            &format!("bob@{B}"),
            "forged",
        ))
        .await;
    assert!(matches!(
        raw.expect_closed().await?,
        Closed::StreamError(_) | Closed::Eof
    ));
    bob.expect_none(|e| e.name() == "message").await?;
    p.round_trip("dialback-forged").await
}

#[tokio::test]
async fn db_verify_confirms_only_keys_we_issued() -> Result<()> {
    let p = pair().await?;
    // b's keys come from its dialback secret (XEP-0185): the key b's outgoing side
    // sends to receiving server c.test on a stream with id S is HMAC(secret, c.test b.test S).
    let secret = std::fs::read(p.b.config.data_dir.join("dialback.secret"))?;
    let secret = DialbackSecret::from_bytes(&secret);
    let stream_id = "d1a1bac4";
    let issued = dialback_key(&secret, C, B, stream_id);
    let verify = |key: &str| {
        Element::new("verify", ns::DIALBACK)
            .with_attr("from", C)
            .with_attr("to", B)
            .with_attr("id", stream_id)
            .with_text(key)
    };
    let (mut raw, _) = RawS2s::secured(&p, Some(C), None).await?;
    raw.send(&verify(&issued)).await?;
    let answer = raw.expect(|e| e.is("verify", ns::DIALBACK)).await?;
    assert_eq!(answer.attr("type"), Some("valid"), "{answer}");
    assert_eq!(answer.attr("from"), Some(B));
    assert_eq!(answer.attr("to"), Some(C));
    assert_eq!(answer.attr("id"), Some(stream_id));

    // A key for another stream, another receiving server, or made up: invalid.
    let other_stream = dialback_key(&secret, C, B, "another-stream");
    let other_receiver = dialback_key(&secret, A, B, stream_id);
    let forged = dialback_key(&DialbackSecret::generate(), C, B, stream_id);
    for key in [other_stream, other_receiver, forged, "not a key".into()] {
        raw.send(&verify(&key)).await?;
        let answer = raw.expect(|e| e.is("verify", ns::DIALBACK)).await?;
        assert_eq!(answer.attr("type"), Some("invalid"), "{key}: {answer}");
    }
    // The verification stream is still usable and closes cleanly.
    raw.send_str("</stream:stream>").await?;
    assert_eq!(raw.expect_closed().await?, Closed::Clean);
    p.round_trip("db-verify").await
}

/// Each `<db:result>` makes b connect to the claimed domain's authoritative server to
/// verify the key (XEP-0220 §2.1.2): with `dialback_per_domain_per_minute = 3`, a peer
/// claiming d.test gets three verifications, each a connection to d.test's server (here a
/// listener that counts connections and closes them, so each fails), then its further
/// requests are answered with `resource-constraint` and no connection is made. Another
/// claimed domain is still verified, and federation between a and b goes on.
#[tokio::test]
async fn dialback_verifications_are_limited_per_claimed_domain() -> Result<()> {
    const PER_MINUTE: usize = 3;
    let p = pair_with(|c| c.s2s.dialback_per_domain_per_minute = PER_MINUTE as u32).await?;
    let mut connections = Vec::new();
    for domain in ["d.test", "e.test"] {
        let listener = tokio::net::TcpListener::bind((LOOPBACK, 0)).await?;
        let host = format!("xmpp.{domain}");
        p.dns.add_srv(
            &format!("_xmpp-server._tcp.{domain}"),
            0,
            5,
            listener.local_addr()?.port(),
            &host,
        );
        p.dns.add_a(&host, LOOPBACK);
        let (count, seen) = tokio::sync::watch::channel(0usize);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                // Counted before the close that ends b's verification attempt.
                count.send_modify(|n| *n += 1);
                drop(tcp);
            }
        });
        connections.push(seen);
    }
    let result = |from: &str| {
        Element::new("result", ns::DIALBACK)
            .with_attr("from", from)
            .with_attr("to", B)
            .with_text("0".repeat(64))
    };
    let condition = |answer: &Element| {
        answer
            .get_child("error", ns::SERVER)
            .and_then(|e| e.children().find(|c| c.ns() == ns::STANZAS))
            .map(|c| c.name().to_string())
            .unwrap_or_default()
    };
    let (mut raw, _) = RawS2s::secured(&p, Some("d.test"), None).await?;
    let mut after_allowed = 0;
    for i in 0..PER_MINUTE + 3 {
        raw.send(&result("d.test")).await?;
        let answer = raw.expect(|e| e.is("result", ns::DIALBACK)).await?;
        assert_eq!(answer.attr("type"), Some("error"), "{answer}");
        let made = *connections[0].borrow();
        if i < PER_MINUTE {
            assert_eq!(condition(&answer), "remote-server-not-found", "{answer}");
            assert!(made > i, "verification {i} made no connection");
            after_allowed = made;
        } else {
            assert_eq!(condition(&answer), "resource-constraint", "{answer}");
            assert_eq!(made, after_allowed, "a refused request made a connection");
        }
    }
    // The limit is per claimed domain.
    raw.send(&result("e.test")).await?;
    let answer = raw.expect(|e| e.is("result", ns::DIALBACK)).await?;
    assert_eq!(condition(&answer), "remote-server-not-found", "{answer}");
    assert!(*connections[1].borrow() >= 1);
    assert_eq!(*connections[0].borrow(), after_allowed);
    p.round_trip("dialback-limit").await
}

// ---------------------------------------------------------------------------------------
// Transport-level oddities.

#[tokio::test]
async fn plaintext_on_the_direct_tls_port_is_dropped() -> Result<()> {
    let p = pair().await?;
    let mut raw = RawS2s::connect(p.b.running().s2s_tls_addrs[0]).await?;
    // A TLS server reading a stream header as a ClientHello gives up on the connection.
    let _ = raw.send_str(&header(ns::SERVER, A, B, Some("1.0"))).await;
    assert!(matches!(raw.expect_closed().await?, Closed::Eof));
    p.round_trip("plaintext-on-tls").await
}

#[tokio::test]
async fn restarted_stream_naming_another_domain_is_host_unknown() -> Result<()> {
    let p = pair().await?;
    let mut raw = RawS2s::connect(p.b_s2s()).await?;
    raw.open(Some(A), B).await?;
    raw.starttls(&p.b.pki, B, Some(A)).await?;
    // After TLS the peer addresses a domain b does not serve.
    raw.send_str(&header(ns::SERVER, A, "nowhere.test", Some("1.0")))
        .await?;
    assert_eq!(raw.expect_closed().await?, stream_error("host-unknown"));
    p.round_trip("restart-other-domain").await
}

#[tokio::test]
async fn shutdown_closes_incoming_links_with_system_shutdown() -> Result<()> {
    let mut p = pair().await?;
    let (mut raw, _) = RawS2s::secured(&p, Some(A), Some(A)).await?;
    let outcome = raw.external(A).await?;
    assert!(outcome.is("success", ns::SASL), "{outcome}");
    raw.open(Some(A), B).await?;
    let running = p.b.running.take().expect("b is running");
    running.shutdown().await;
    assert_eq!(raw.expect_closed().await?, stream_error("system-shutdown"));
    // b starts again (on new ports) and federates as before.
    p.b.restart().await?;
    p.dns.remove(&format!("_xmpp-server._tcp.{B}"));
    publish(&p.dns, B, &p.b);
    p.round_trip("after-shutdown").await
}

#[tokio::test]
async fn silent_unauthenticated_peers_are_disconnected() -> Result<()> {
    // With connect_timeout 1 s, a stream has 3 s to authenticate a domain.
    let p = pair_with(|c| c.s2s.connect_timeout_secs = 1).await?;
    let started = tokio::time::Instant::now();
    // Says nothing at all.
    let mut silent = RawS2s::connect(p.b_s2s()).await?;
    // Opens a stream (and even secures it) but never authenticates.
    let (mut idle, _) = RawS2s::secured(&p, Some(A), None).await?;
    assert_eq!(
        silent.expect_closed().await?,
        stream_error("connection-timeout")
    );
    assert_eq!(
        idle.expect_closed().await?,
        stream_error("connection-timeout")
    );
    assert!(started.elapsed() >= std::time::Duration::from_secs(2));
    p.round_trip("silent").await
}

/// A peer sends 1,030 subscription requests from distinct JIDs to one user (they were all
/// stored, and every later login of hers was cut off at once by their delivery). Only what
/// the account may hold from one domain is kept (`limits.max_pending_subscriptions`, a
/// quarter of it per domain); the rest are answered with resource-constraint; her next
/// login gets those kept and works.
#[tokio::test]
async fn a_flood_of_subscription_requests_is_bounded_and_cannot_lock_a_user_out() -> Result<()> {
    const SENT: usize = 1_030;
    let p = pair_with(|c| c.limits.max_pending_subscriptions = 40).await?;
    let (mut raw, _) = RawS2s::secured(&p, Some(A), Some(A)).await?;
    let outcome = raw.external(A).await?;
    assert!(outcome.is("success", ns::SASL), "{outcome}");
    raw.open(Some(A), B).await?;
    let mut flood = String::new();
    for i in 0..SENT {
        flood.push_str(
            &Element::new("presence", ns::SERVER)
                .with_attr("from", format!("spam{i}@{A}"))
                .with_attr("to", format!("bob@{B}"))
                .with_attr("type", "subscribe")
                .to_xml(ns::SERVER),
        );
    }
    raw.send_raw(flood.as_bytes()).await?;
    // The ones refused come back as errors, on the link's other direction or ours: wait
    // until bob's store holds what it may, then log in.
    let storage = p.b.storage();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let kept = loop {
        let kept = storage
            .list_user_data(&format!("bob@{B}"), "pending-in\u{1}")
            .await?
            .len();
        if kept >= 10 || tokio::time::Instant::now() > deadline {
            break kept;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(kept, 10, "a quarter of 40 from one domain");
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "home").await?;
    for _ in 0..10 {
        bob.expect(|e| e.name() == "presence" && e.attr("type") == Some("subscribe"))
            .await?;
    }
    bob.ping().await?;
    p.round_trip("subscription-flood").await
}
