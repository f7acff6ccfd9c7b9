//! Just enough of a client stream to log in (RFC 6120 §4–§7): header, STARTTLS,
//! SCRAM-SHA-1, resource binding, initial presence. After login a session is raw bytes:
//! the scenarios write pre-rendered stanzas and scan what comes back.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use confab_protocol::{Element, ParserLimits, StreamEvent, StreamParser};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::scram::{SaltCache, Scram};

pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where and how to log in.
pub struct Target {
    pub addr: SocketAddr,
    pub domain: String,
    pub starttls: bool,
    pub password: String,
    /// Source addresses to spread connections over (loopback has 127/8), so that many
    /// connections and TIME_WAIT sockets do not run out of ephemeral ports.
    pub sources: Vec<IpAddr>,
    next_source: AtomicUsize,
    tls: TlsConnector,
    pub cache: SaltCache,
}

impl Target {
    pub fn new(
        addr: SocketAddr,
        domain: String,
        starttls: bool,
        password: String,
        sources: usize,
    ) -> Result<Target> {
        if !addr.ip().is_loopback() {
            bail!(
                "the load generator only targets loopback addresses, not {}",
                addr.ip()
            );
        }
        let sources = match addr.ip() {
            IpAddr::V4(_) => (0..sources.clamp(1, 250))
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8)))
                .collect(),
            IpAddr::V6(_) => vec![addr.ip()],
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate))
        .with_no_client_auth();
        Ok(Target {
            addr,
            domain,
            starttls,
            password,
            sources,
            next_source: AtomicUsize::new(0),
            tls: TlsConnector::from(Arc::new(config)),
            cache: SaltCache::default(),
        })
    }

    async fn connect(&self) -> Result<TcpStream> {
        let i = self.next_source.fetch_add(1, Ordering::Relaxed);
        let source = self.sources.get(i % self.sources.len().max(1)).copied();
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let tcp = socket.connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// Logs `user` in with `resource` and sends initial presence; returns when the server
    /// answered a ping sent after the presence, so the session is fully established.
    pub async fn login(&self, user: &str, resource: &str, presence: bool) -> Result<Session> {
        let tcp = self.connect().await?;
        let mut s = Stream::new(tcp);
        s.open(&self.domain).await?;
        let mut features = s.element().await?;
        let mut s: Stream<Box<dyn Io>> = if self.starttls {
            if features.get_child("starttls", NS_TLS).is_none() {
                bail!("the server offers no STARTTLS");
            }
            s.write(format!("<starttls xmlns='{NS_TLS}'/>").as_bytes())
                .await?;
            let proceed = s.element().await?;
            if !proceed.is("proceed", NS_TLS) {
                bail!("STARTTLS refused: {proceed}");
            }
            let name = ServerName::try_from(self.domain.clone())?;
            let tls = self.tls.connect(name, s.io).await?;
            let mut s = Stream::new(Box::new(tls) as Box<dyn Io>);
            s.open(&self.domain).await?;
            features = s.element().await?;
            s
        } else {
            Stream {
                io: Box::new(s.io) as Box<dyn Io>,
                parser: s.parser,
                buf: s.buf,
            }
        };
        let offered = features
            .get_child("mechanisms", NS_SASL)
            .map(|m| m.children().any(|c| c.text() == "SCRAM-SHA-1"))
            .unwrap_or(false);
        if !offered {
            bail!("the server offers no SCRAM-SHA-1: {features}");
        }
        let mut scram = Scram::new(user, &self.password);
        s.write(
            format!(
                "<auth xmlns='{NS_SASL}' mechanism='SCRAM-SHA-1'>{}</auth>",
                scram.first()
            )
            .as_bytes(),
        )
        .await?;
        let challenge = s.element().await?;
        if !challenge.is("challenge", NS_SASL) {
            bail!("login of {user} failed: {challenge}");
        }
        let last = scram.respond(&challenge.text(), &self.cache)?;
        s.write(format!("<response xmlns='{NS_SASL}'>{last}</response>").as_bytes())
            .await?;
        let outcome = s.element().await?;
        if !outcome.is("success", NS_SASL) {
            bail!("login of {user} failed: {outcome}");
        }
        scram.verify(&outcome.text())?;
        s.parser.reset();
        s.open(&self.domain).await?;
        let _features = s.element().await?;
        s.write(
            format!(
                "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
                 <resource>{resource}</resource></bind></iq>"
            )
            .as_bytes(),
        )
        .await?;
        s.until_id("bind").await?;
        let mut out = String::new();
        if presence {
            out.push_str("<presence/>");
        }
        out.push_str(&format!(
            "<iq type='get' id='ready' to='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
            self.domain
        ));
        s.write(out.as_bytes()).await?;
        s.until_id("ready").await?;
        Ok(s)
    }
}

/// A logged-in session: the socket past negotiation, and the parser in the middle of the
/// stream for scenarios that read replies as elements.
pub type Session = Stream<Box<dyn Io>>;

impl Session {
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.io.write_all(b"</stream:stream>").await;
            let _ = self.io.flush().await;
            let mut buf = [0u8; 1024];
            // Wait for the server's close, so that the server did the work of ending the
            // session before the next login is counted.
            while let Ok(n) = self.io.read(&mut buf).await {
                if n == 0
                    || buf
                        .get(..n)
                        .is_some_and(|b| contains(b, b"</stream:stream>"))
                {
                    break;
                }
            }
        })
        .await;
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A stream being negotiated: parsed element by element.
pub struct Stream<S> {
    pub io: S,
    pub parser: StreamParser,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream<S> {
    pub fn new(io: S) -> Self {
        Stream {
            io,
            parser: StreamParser::new(ParserLimits {
                max_stanza_size: 1 << 20,
                max_depth: 64,
            }),
            buf: vec![0; 8192],
        }
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await?;
        Ok(())
    }

    async fn open(&mut self, domain: &str) -> Result<()> {
        self.write(
            format!(
                "<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' \
                 xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
            )
            .as_bytes(),
        )
        .await
    }

    /// The next top-level element (stream headers are skipped).
    pub async fn element(&mut self) -> Result<Element> {
        loop {
            match self.parser.next_event()? {
                Some(StreamEvent::Element(e)) => {
                    if e.name() == "error" && e.ns() == "http://etherx.jabber.org/streams" {
                        bail!("stream error: {e}");
                    }
                    return Ok(e);
                }
                Some(StreamEvent::Open(_)) => continue,
                Some(StreamEvent::Close) => bail!("the server closed the stream"),
                None => {}
            }
            let n = tokio::time::timeout(STEP_TIMEOUT, self.io.read(&mut self.buf))
                .await
                .context("no answer in time")??;
            let chunk = self
                .buf
                .get(..n)
                .filter(|c| !c.is_empty())
                .context("connection closed")?;
            self.parser.feed(chunk);
        }
    }

    /// Reads until the iq with this id; an error reply fails.
    pub async fn until_id(&mut self, id: &str) -> Result<Element> {
        loop {
            let e = self.element().await?;
            if e.name() == "iq" && e.attr("id") == Some(id) {
                if e.attr("type") == Some("result") {
                    return Ok(e);
                }
                bail!("iq {id} failed: {e}");
            }
        }
    }
}

/// The generator talks to servers on loopback with self-signed certificates: it encrypts
/// like a client but does not authenticate the server.
#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
