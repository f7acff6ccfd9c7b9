//! Test support for confab's end-to-end tests: a real server on 127.0.0.1 port 0 with a
//! temporary data directory and certificates from a test CA made by rcgen, and a small
//! scripted XMPP client speaking over real TCP and TLS.
//!
//! Every wait is an event with a timeout; nothing sleeps for a fixed time.

pub mod bin;
pub mod crash;
pub mod dns;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use confab::{Config, RunningServer};
use confab_protocol::sasl::{
    decode_payload, encode_payload, ClientBinding, ScramClient, ScramHash,
};
use confab_protocol::{ns, Element, ParserLimits, StreamEvent, StreamHeader, StreamParser};
use confab_storage::{SledStorage, Storage};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any single expectation waits before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const DOMAIN: &str = "confab.test";

/// A test CA and a certificate for the served domains, written as PEM files.
pub struct TestPki {
    pub ca_der: Vec<u8>,
    pub ca_pem: String,
    /// `DOMAIN.pem` (full chain) and `DOMAIN.key` for each domain, and `ca.pem`.
    pub dir: PathBuf,
    /// Test clients accept certificates from the CA whatever name they carry.
    pub lenient_names: bool,
    _tmp: Option<tempfile::TempDir>,
}

impl TestPki {
    /// Creates a CA and one leaf certificate valid for each of `domains`, files in `dir`.
    pub fn create(dir: &Path, domains: &[&str]) -> Result<TestPki> {
        let names: Vec<(&str, &str)> = domains.iter().map(|d| (*d, *d)).collect();
        Self::create_named(dir, &names)
    }

    /// Like [`TestPki::create`] in a temporary directory of its own.
    pub fn create_temp(domains: &[&str]) -> Result<Arc<TestPki>> {
        let tmp = tempfile::tempdir()?;
        let mut pki = Self::create(tmp.path(), domains)?;
        pki._tmp = Some(tmp);
        Ok(Arc::new(pki))
    }

    /// Creates certificates under file names that may differ from the names they are
    /// valid for: `(file name, DNS name in the certificate)`. A server configured with
    /// `b.test.pem` valid for `elsewhere.test` presents a certificate that does not match.
    pub fn create_named(dir: &Path, files: &[(&str, &str)]) -> Result<TestPki> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "confab test CA");
        let ca = ca_params.self_signed(&ca_key)?;
        for (file, name) in files {
            let key = rcgen::KeyPair::generate()?;
            let params = rcgen::CertificateParams::new(vec![name.to_string()])?;
            let cert = params.signed_by(&key, &ca, &ca_key)?;
            // Written as a full chain, leaf first, as Let's Encrypt's fullchain.pem.
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem() + &ca.pem())?;
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem())?;
        }
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        Ok(TestPki {
            ca_der: ca.der().to_vec(),
            ca_pem: ca.pem(),
            dir: dir.to_path_buf(),
            lenient_names: false,
            _tmp: None,
        })
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        let _ = roots.add(rustls_pki_types::CertificateDer::from(self.ca_der.clone()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions");
        if !self.lenient_names {
            return Arc::new(builder.with_root_certificates(roots).with_no_client_auth());
        }
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        Arc::new(
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(LenientNames(inner)))
                .with_no_client_auth(),
        )
    }

    /// Lets test clients accept a certificate from the test CA whose name does not
    /// match (tests of servers with deliberately misnamed certificates).
    pub fn with_lenient_names(mut self) -> Self {
        self.lenient_names = true;
        self
    }
}

/// Chain checks as usual, but a name mismatch is accepted.
#[derive(Debug)]
struct LenientNames(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for LenientNames {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A confab server started in this process on loopback, with its own temp dir.
pub struct TestServer {
    pub running: Option<RunningServer>,
    pub config: Config,
    pub pki: Arc<TestPki>,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server for [`DOMAIN`] with default settings.
    pub async fn start() -> Result<TestServer> {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after letting `adjust` change the test config.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Result<TestServer> {
        Self::start_domains(&[DOMAIN], adjust).await
    }

    /// Starts a server for several domains, each with a certificate from the test CA.
    pub async fn start_domains(
        domains: &[&str],
        adjust: impl FnOnce(&mut Config),
    ) -> Result<TestServer> {
        let pki = TestPki::create_temp(domains)?;
        Self::start_with_pki(pki, domains, adjust).await
    }

    /// Starts a server for `domains` with certificates from a shared test CA (servers
    /// that federate in a test trust each other through it).
    pub async fn start_with_pki(
        pki: Arc<TestPki>,
        domains: &[&str],
        adjust: impl FnOnce(&mut Config),
    ) -> Result<TestServer> {
        init_tracing();
        let dir = tempfile::tempdir()?;
        let mut config = Config {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        config.c2s.listen = vec!["127.0.0.1:0".into()];
        config.c2s.tls_listen = vec!["127.0.0.1:0".into()];
        // Federation listens on loopback port 0 too, and trusts only the test CA.
        config.s2s.listen = vec!["127.0.0.1:0".into()];
        config.s2s.tls_listen = vec!["127.0.0.1:0".into()];
        config.s2s.use_system_roots = false;
        config.s2s.ca_files = vec![pki.dir.join("ca.pem")];
        for d in domains {
            config.tls.insert(
                d.to_string(),
                confab::config::TlsFiles {
                    cert: pki.dir.join(format!("{d}.pem")),
                    key: pki.dir.join(format!("{d}.key")),
                },
            );
        }
        adjust(&mut config);
        config.normalize()?;
        let running = start_running(&config).await?;
        Ok(TestServer {
            running: Some(running),
            config,
            pki,
            dir,
        })
    }

    pub fn running(&self) -> &RunningServer {
        self.running.as_ref().expect("server is running")
    }

    /// The STARTTLS client address.
    pub fn addr(&self) -> SocketAddr {
        self.running().c2s_addrs[0]
    }

    /// The direct-TLS client address.
    pub fn tls_addr(&self) -> SocketAddr {
        self.running().c2s_tls_addrs[0]
    }

    pub fn storage(&self) -> Arc<dyn Storage> {
        self.running().server.storage.clone()
    }

    /// Creates an account through the same code path as `confab user add`.
    pub async fn add_user(&self, user: &str, password: &str) -> Result<String> {
        let jid = format!("{user}@{DOMAIN}");
        let bare = confab::accounts::add_user(
            self.storage().as_ref(),
            &self.config.domains,
            &jid,
            password,
            self.config.auth.scram_iterations,
        )
        .await?;
        Ok(bare)
    }

    /// Creates an account with a full bare JID (any served domain).
    pub async fn add_account(&self, jid: &str, password: &str) -> Result<String> {
        Ok(confab::accounts::add_user(
            self.storage().as_ref(),
            &self.config.domains,
            jid,
            password,
            self.config.auth.scram_iterations,
        )
        .await?)
    }

    /// Stops the server (graceful shutdown) and starts it again on the same data dir.
    /// Listening ports change (port 0).
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        self.running = Some(start_running(&self.config).await?);
        Ok(())
    }

    /// Logs in `user` over STARTTLS with SCRAM-SHA-256 and binds `resource`.
    pub async fn login(&self, user: &str, password: &str, resource: &str) -> Result<Client> {
        self.login_at(DOMAIN, user, password, resource).await
    }

    /// [`TestServer::login`] for an account of another served domain.
    pub async fn login_at(
        &self,
        domain: &str,
        user: &str,
        password: &str,
        resource: &str,
    ) -> Result<Client> {
        let mut c = Client::connect_to(self.addr(), domain).await?;
        c.starttls(&self.pki).await?;
        c.authenticate(ScramHash::Sha256, false, user, password)
            .await?;
        c.bind(Some(resource)).await?;
        Ok(c)
    }

    /// [`TestServer::login`], then roster get and initial presence, as a typical client does.
    pub async fn online(&self, user: &str, password: &str, resource: &str) -> Result<Client> {
        self.online_at(DOMAIN, user, password, resource).await
    }

    /// [`TestServer::online`] for an account of another served domain.
    pub async fn online_at(
        &self,
        domain: &str,
        user: &str,
        password: &str,
        resource: &str,
    ) -> Result<Client> {
        let mut c = self.login_at(domain, user, password, resource).await?;
        c.roster_get().await?;
        c.send(&Element::new("presence", ns::CLIENT)).await?;
        // Our own presence comes back to us (RFC 6121 §4.2.2).
        let full = c.jid.clone();
        c.expect(|e| e.name() == "presence" && e.attr("from") == Some(full.as_str()))
            .await?;
        Ok(c)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.server.router.all_sessions().iter().for_each(|s| {
                s.kill(confab_protocol::StreamError::new(
                    confab_protocol::StreamErrorCondition::SystemShutdown,
                ))
            });
        }
    }
}

async fn start_running(config: &Config) -> Result<RunningServer> {
    // A restarted server reopens the store once every task of the old one let go of it.
    let dir = config.store_dir();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let storage = loop {
        match SledStorage::open(&dir) {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "store still held, retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    Ok(RunningServer::start(config.clone(), Arc::new(storage)).await?)
}

/// The `confab` binary of this build.
///
/// `CARGO_BIN_EXE_confab` exists only for the binary's own package, so the binary is
/// found next to the test executable (`target/<profile>/confab`, tests running from
/// `target/<profile>/deps/`, binaries of this crate such as `confab-crashtest` from
/// `target/<profile>/`). `cargo test --workspace` builds it; so that
/// `cargo test -p confab-tests` never runs a stale one, it first asks the cargo that
/// runs the tests (`$CARGO`) to build it, a no-op when it is up to date.
pub fn confab_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let parent = exe.parent().expect("executable in a directory");
        let dir = if parent.file_name().is_some_and(|n| n == "deps") {
            parent.parent().expect("target/<profile>/deps")
        } else {
            parent
        };
        let bin = dir.join(format!("confab{}", std::env::consts::EXE_SUFFIX));
        if let Ok(cargo) = std::env::var("CARGO") {
            let release = dir.file_name().is_some_and(|n| n == "release");
            let mut cmd = std::process::Command::new(cargo);
            cmd.args(["build", "--quiet", "-p", "confab", "--bin", "confab"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("running cargo build");
            assert!(status.success(), "building the confab binary failed");
        }
        assert!(
            bin.exists(),
            "{} not found: build it with `cargo build -p confab` (cargo test --workspace does)",
            bin.display()
        );
        bin
    })
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONFAB_TEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum ClientConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Gone,
}

impl ClientConn {
    fn io(&mut self) -> Result<&mut dyn Io> {
        match self {
            ClientConn::Plain(s) => Ok(s),
            ClientConn::Tls(s) => Ok(s.as_mut()),
            ClientConn::Gone => bail!("connection gone"),
        }
    }
}

/// What a stream ended with, from the client's point of view.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// `<stream:error>` with this condition, then the end of the stream.
    StreamError(String),
    /// `</stream:stream>` without an error.
    Clean,
    /// The TCP connection ended without either.
    Eof,
}

/// A scripted XMPP client for tests.
pub struct Client {
    conn: ClientConn,
    parser: StreamParser,
    pending: VecDeque<Element>,
    buf: Vec<u8>,
    pub domain: String,
    /// The bound full JID (after [`Client::bind`]).
    pub jid: String,
    /// The features of the current stream.
    pub features: Option<Element>,
    pub header: Option<StreamHeader>,
    next_id: u64,
}

impl Client {
    /// Connects over plain TCP (STARTTLS port) and opens a stream to [`DOMAIN`].
    pub async fn connect(addr: SocketAddr) -> Result<Client> {
        let mut c = Client::connect_raw(addr).await?;
        c.open_stream().await?;
        Ok(c)
    }

    /// Connects over plain TCP and opens a stream to `domain`.
    pub async fn connect_to(addr: SocketAddr, domain: &str) -> Result<Client> {
        let mut c = Client::connect_raw(addr).await?;
        c.domain = domain.to_string();
        c.open_stream().await?;
        Ok(c)
    }

    /// The certificate chain the server presented on this TLS connection.
    pub fn peer_certificates(&self) -> Vec<Vec<u8>> {
        match &self.conn {
            ClientConn::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.as_ref().to_vec()).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Connects without sending anything.
    pub async fn connect_raw(addr: SocketAddr) -> Result<Client> {
        let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await??;
        Ok(Client::new(ClientConn::Plain(tcp)))
    }

    /// [`Client::connect`] from the local address `source` (127.0.0.2 and so on are
    /// loopback addresses too, so a test can be several clients' addresses).
    pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> Result<Client> {
        let tcp = connect_from(source, addr).await?;
        let mut c = Client::new(ClientConn::Plain(tcp));
        c.open_stream().await?;
        Ok(c)
    }

    /// Connects to the direct-TLS port (XEP-0368) and opens a stream.
    pub async fn connect_tls(addr: SocketAddr, pki: &TestPki) -> Result<Client> {
        let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await??;
        let connector = tokio_rustls::TlsConnector::from(pki.client_config());
        let name = rustls_pki_types::ServerName::try_from(DOMAIN.to_string())?;
        let tls = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp)).await??;
        let mut c = Client::new(ClientConn::Tls(Box::new(tls)));
        c.open_stream().await?;
        Ok(c)
    }

    fn new(conn: ClientConn) -> Client {
        Client {
            conn,
            parser: StreamParser::new(ParserLimits {
                max_stanza_size: 16 * 1024 * 1024,
                max_depth: 128,
            }),
            pending: VecDeque::new(),
            buf: vec![0; 65536],
            domain: DOMAIN.to_string(),
            jid: String::new(),
            features: None,
            header: None,
            next_id: 0,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.conn, ClientConn::Tls(_))
    }

    pub async fn send_raw(&mut self, data: &[u8]) -> Result<()> {
        let io = self.conn.io()?;
        io.write_all(data).await?;
        io.flush().await?;
        Ok(())
    }

    pub async fn send_str(&mut self, data: &str) -> Result<()> {
        self.send_raw(data.as_bytes()).await
    }

    pub async fn send(&mut self, e: &Element) -> Result<()> {
        let xml = e.to_xml(ns::CLIENT);
        self.send_raw(xml.as_bytes()).await
    }

    /// Sends a stream header and reads the server's header and features.
    pub async fn open_stream(&mut self) -> Result<Element> {
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='{}' to='{}' version='1.0' xml:lang='en'>",
            ns::STREAM,
            self.domain
        );
        self.send_str(&header).await?;
        self.read_header().await?;
        let features = self.next().await?;
        if !features.is("features", ns::STREAM) {
            bail!("expected stream features, got {}", features);
        }
        self.features = Some(features.clone());
        Ok(features)
    }

    /// Reads the server's stream header.
    pub async fn read_header(&mut self) -> Result<StreamHeader> {
        match self.next_event().await? {
            StreamEvent::Open(h) => {
                self.header = Some(h.clone());
                Ok(h)
            }
            other => bail!("expected a stream header, got {other:?}"),
        }
    }

    async fn next_event(&mut self) -> Result<StreamEvent> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(ev) = self.parser.next_event()? {
                return Ok(ev);
            }
            let io = self.conn.io()?;
            let n = tokio::time::timeout_at(deadline, io.read(&mut self.buf))
                .await
                .map_err(|_| anyhow!("timed out waiting for data from the server"))??;
            if n == 0 {
                bail!("connection closed by the server");
            }
            self.parser.feed(&self.buf[..n]);
        }
    }

    /// The next top-level element (after any set aside by [`Client::expect`]).
    pub async fn next(&mut self) -> Result<Element> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(e);
        }
        match self.next_event().await? {
            StreamEvent::Element(e) => Ok(e),
            StreamEvent::Close => bail!("stream closed by the server"),
            StreamEvent::Open(_) => bail!("unexpected stream header"),
        }
    }

    /// Waits for an element matching `pred`; others are kept for later calls.
    pub async fn expect(&mut self, pred: impl Fn(&Element) -> bool) -> Result<Element> {
        if let Some(pos) = self.pending.iter().position(&pred) {
            return Ok(self.pending.remove(pos).expect("position is valid"));
        }
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.next_event())
                .await
                .map_err(|_| anyhow!("timed out; unmatched: {:?}", self.pending))??;
            match ev {
                StreamEvent::Element(e) if pred(&e) => return Ok(e),
                StreamEvent::Element(e) => self.pending.push_back(e),
                StreamEvent::Close => {
                    bail!("stream closed while waiting; unmatched: {:?}", self.pending)
                }
                StreamEvent::Open(_) => bail!("unexpected stream header"),
            }
        }
    }

    /// Asserts that nothing matching `pred` arrives: sends a ping to the server and
    /// checks everything that arrives before its answer (the server handles our
    /// stanzas in order, so anything caused earlier is already queued before it).
    pub async fn expect_none(&mut self, pred: impl Fn(&Element) -> bool) -> Result<()> {
        if let Some(e) = self.pending.iter().find(|e| pred(e)) {
            bail!("unexpected {e}");
        }
        let id = self.new_id();
        let ping = Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", id.clone())
            .with_attr("to", self.domain.clone())
            .with_child(Element::new("ping", ns::PING));
        self.send(&ping).await?;
        let is_pong = |e: &Element| e.name() == "iq" && e.attr("id") == Some(id.as_str());
        let got = self.expect(|e| is_pong(e) || pred(e)).await?;
        if is_pong(&got) {
            Ok(())
        } else {
            bail!("unexpected {got}")
        }
    }

    /// Reads until the stream ends and says how.
    pub async fn expect_closed(&mut self) -> Result<Closed> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let mut error = None;
        loop {
            let ev = match tokio::time::timeout_at(deadline, self.next_event()).await {
                Err(_) => bail!("timed out waiting for the stream to close"),
                Ok(Err(_)) => {
                    return Ok(error.map(Closed::StreamError).unwrap_or(Closed::Eof));
                }
                Ok(Ok(ev)) => ev,
            };
            match ev {
                StreamEvent::Element(e) if e.is("error", ns::STREAM) => {
                    let cond = e
                        .children()
                        .find(|c| c.ns() == ns::STREAMS && c.name() != "text")
                        .map(|c| c.name().to_string())
                        .unwrap_or_default();
                    error = Some(cond);
                }
                StreamEvent::Element(_) | StreamEvent::Open(_) => {}
                StreamEvent::Close => {
                    return Ok(error.map(Closed::StreamError).unwrap_or(Closed::Clean));
                }
            }
        }
    }

    pub fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!("t{}", self.next_id)
    }

    /// Sends an iq (an id is added when missing) and returns the reply with that id.
    pub async fn iq(&mut self, mut iq: Element) -> Result<Element> {
        let id = match iq.attr("id") {
            Some(id) => id.to_string(),
            None => {
                let id = self.new_id();
                iq.set_attr("id", id.clone());
                id
            }
        };
        self.send(&iq).await?;
        self.expect(|e| {
            e.name() == "iq"
                && e.attr("id") == Some(id.as_str())
                && matches!(e.attr("type"), Some("result") | Some("error"))
        })
        .await
    }

    /// STARTTLS (RFC 6120 §5), then a new stream.
    pub async fn starttls(&mut self, pki: &TestPki) -> Result<()> {
        self.send_str(&format!("<starttls xmlns='{}'/>", ns::TLS))
            .await?;
        let proceed = self.next().await?;
        if !proceed.is("proceed", ns::TLS) {
            bail!("expected proceed, got {proceed}");
        }
        let ClientConn::Plain(tcp) = std::mem::replace(&mut self.conn, ClientConn::Gone) else {
            bail!("already TLS");
        };
        let connector = tokio_rustls::TlsConnector::from(pki.client_config());
        let name = rustls_pki_types::ServerName::try_from(self.domain.clone())?;
        let tls = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp)).await??;
        self.conn = ClientConn::Tls(Box::new(tls));
        self.parser.reset();
        self.open_stream().await?;
        Ok(())
    }

    /// The mechanisms offered in the current features.
    pub fn mechanisms(&self) -> Vec<String> {
        self.features
            .as_ref()
            .and_then(|f| f.get_child("mechanisms", ns::SASL))
            .map(|m| m.children().map(|c| c.text()).collect())
            .unwrap_or_default()
    }

    /// tls-exporter channel-binding data of this connection (RFC 9266).
    pub fn tls_exporter(&self) -> Option<Vec<u8>> {
        match &self.conn {
            ClientConn::Tls(s) => s
                .get_ref()
                .1
                .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
                .ok()
                .map(|k| k.to_vec()),
            _ => None,
        }
    }

    /// SCRAM authentication; on success the stream is restarted. Err carries the
    /// failure condition for a SASL failure.
    pub async fn authenticate(
        &mut self,
        hash: ScramHash,
        plus: bool,
        user: &str,
        password: &str,
    ) -> Result<()> {
        let binding = if plus {
            ClientBinding::TlsExporter(self.tls_exporter().context("no TLS")?)
        } else if self.is_tls() {
            // We could bind but do not: say so ("y"), RFC 5802 §6.
            ClientBinding::SupportedButNotUsed
        } else {
            ClientBinding::None
        };
        let binding = if !plus && self.mechanisms().iter().any(|m| m.ends_with("-PLUS")) {
            // The server offers PLUS: "y" would be a downgrade; use "n" as a client
            // that does not support binding at all.
            let _ = binding;
            ClientBinding::None
        } else {
            binding
        };
        let mut scram = ScramClient::new(hash, user, password, binding);
        let first = scram.client_first();
        self.send(
            &Element::new("auth", ns::SASL)
                .with_attr("mechanism", hash.mechanism(plus))
                .with_text(encode_payload(&first)),
        )
        .await?;
        let challenge = self.next().await?;
        if challenge.is("failure", ns::SASL) {
            bail!(SaslFailure(failure_condition(&challenge)));
        }
        let server_first = decode_payload(challenge.text().trim())?;
        let last = scram.server_first(&server_first)?;
        self.send(&Element::new("response", ns::SASL).with_text(encode_payload(&last)))
            .await?;
        let outcome = self.next().await?;
        if outcome.is("failure", ns::SASL) {
            bail!(SaslFailure(failure_condition(&outcome)));
        }
        if !outcome.is("success", ns::SASL) {
            bail!("expected success, got {outcome}");
        }
        scram.server_final(&decode_payload(outcome.text().trim())?)?;
        self.parser.reset();
        self.open_stream().await?;
        Ok(())
    }

    /// SCRAM-SHA-256 with a wrong `password`, which must be answered `not-authorized`.
    pub async fn expect_not_authorized(&mut self, user: &str, password: &str) -> Result<()> {
        let err = match self
            .authenticate(ScramHash::Sha256, false, user, password)
            .await
        {
            Ok(()) => bail!("a wrong password was accepted"),
            Err(e) => e,
        };
        let failure = err
            .downcast_ref::<SaslFailure>()
            .with_context(|| format!("not a SASL failure: {err:#}"))?;
        anyhow::ensure!(failure.0 == "not-authorized", "{}", failure.0);
        Ok(())
    }

    /// Starts SCRAM-SHA-256 (the password may be right) and expects the stream to be closed
    /// with `policy-violation` ("too many failed logins") before any challenge, then cleanly.
    pub async fn expect_login_refused(&mut self, user: &str, password: &str) -> Result<()> {
        let mut scram = ScramClient::new(ScramHash::Sha256, user, password, ClientBinding::None);
        self.send(
            &Element::new("auth", ns::SASL)
                .with_attr("mechanism", "SCRAM-SHA-256")
                .with_text(encode_payload(&scram.client_first())),
        )
        .await?;
        let e = self.next().await?;
        anyhow::ensure!(e.is("error", ns::STREAM), "expected a stream error: {e}");
        anyhow::ensure!(
            e.get_child("policy-violation", ns::STREAMS).is_some(),
            "expected policy-violation, got {e}"
        );
        let text = e
            .get_child("text", ns::STREAMS)
            .map(|t| t.text())
            .unwrap_or_default();
        anyhow::ensure!(text.contains("too many failed logins"), "{e}");
        anyhow::ensure!(
            self.expect_closed().await? == Closed::Clean,
            "not closed cleanly"
        );
        Ok(())
    }

    /// SASL PLAIN; on success the stream is restarted.
    pub async fn authenticate_plain(&mut self, user: &str, password: &str) -> Result<()> {
        let data = format!("\0{user}\0{password}");
        self.send(
            &Element::new("auth", ns::SASL)
                .with_attr("mechanism", "PLAIN")
                .with_text(encode_payload(data.as_bytes())),
        )
        .await?;
        let outcome = self.next().await?;
        if outcome.is("failure", ns::SASL) {
            bail!(SaslFailure(failure_condition(&outcome)));
        }
        if !outcome.is("success", ns::SASL) {
            bail!("expected success, got {outcome}");
        }
        self.parser.reset();
        self.open_stream().await?;
        Ok(())
    }

    /// Binds a resource (or lets the server choose); returns the full JID.
    pub async fn bind(&mut self, resource: Option<&str>) -> Result<String> {
        let mut bind = Element::new("bind", ns::BIND);
        if let Some(r) = resource {
            bind.append_child(Element::new("resource", ns::BIND).with_text(r));
        }
        let reply = self
            .iq(Element::new("iq", ns::CLIENT)
                .with_attr("type", "set")
                .with_child(bind))
            .await?;
        let jid = reply
            .get_child("bind", ns::BIND)
            .and_then(|b| b.get_child("jid", ns::BIND))
            .map(|j| j.text())
            .ok_or_else(|| anyhow!("bind failed: {reply}"))?;
        self.jid = jid.clone();
        Ok(jid)
    }

    pub fn bare(&self) -> String {
        self.jid.split('/').next().unwrap_or_default().to_string()
    }

    /// Pings the server (XEP-0199) and fails unless it answers with a result.
    pub async fn ping(&mut self) -> Result<()> {
        let reply = self
            .iq(Element::new("iq", ns::CLIENT)
                .with_attr("type", "get")
                .with_attr("to", self.domain.clone())
                .with_child(Element::new("ping", ns::PING)))
            .await?;
        if reply.attr("type") != Some("result") {
            bail!("ping failed: {reply}");
        }
        Ok(())
    }

    /// Requests the roster; returns the query element.
    pub async fn roster_get(&mut self) -> Result<Element> {
        let reply = self
            .iq(Element::new("iq", ns::CLIENT)
                .with_attr("type", "get")
                .with_child(Element::new("query", ns::ROSTER)))
            .await?;
        if reply.attr("type") != Some("result") {
            bail!("roster get failed: {reply}");
        }
        Ok(reply
            .get_child("query", ns::ROSTER)
            .cloned()
            .unwrap_or_else(|| Element::new("query", ns::ROSTER)))
    }

    /// Sends a chat message.
    pub async fn chat(&mut self, to: &str, body: &str) -> Result<()> {
        self.send(&chat(to, body)).await
    }

    /// Waits for a message with this body.
    pub async fn expect_body(&mut self, body: &str) -> Result<Element> {
        self.expect(|e| {
            e.name() == "message"
                && e.get_child("body", ns::CLIENT).map(|b| b.text()).as_deref() == Some(body)
        })
        .await
    }

    /// Sends `</stream:stream>` and waits for the server's.
    pub async fn close(mut self) -> Result<Closed> {
        self.send_str("</stream:stream>").await?;
        self.expect_closed().await
    }
}

/// After a failed or closed connection, a fresh client of the account `probe` (password
/// `probing`, which the test created) still logs in, gets an answer and closes cleanly.
pub async fn assert_serving(server: &TestServer) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let resource = format!("probe-{}", N.fetch_add(1, Ordering::Relaxed));
    let mut c = server
        .login("probe", "probing", &resource)
        .await
        .context("a fresh client could not log in")?;
    c.ping().await?;
    anyhow::ensure!(
        c.close().await? == Closed::Clean,
        "the probe's close was not clean"
    );
    Ok(())
}

/// A minimal XML stream over any transport, for scripts the [`Client`] cannot express
/// (bytes pipelined around STARTTLS, a TLS connection held by the test itself).
pub struct RawStream<S> {
    pub io: S,
    pub parser: StreamParser,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawStream<S> {
    pub fn new(io: S) -> RawStream<S> {
        RawStream {
            io,
            parser: StreamParser::new(ParserLimits::default()),
        }
    }

    pub async fn send(&mut self, e: &Element) -> Result<()> {
        self.send_str(&e.to_xml(ns::CLIENT)).await
    }

    pub async fn send_str(&mut self, s: &str) -> Result<()> {
        self.io.write_all(s.as_bytes()).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// The next event, reading as needed (bounded by [`TIMEOUT`]).
    pub async fn event(&mut self) -> Result<StreamEvent> {
        let mut buf = vec![0u8; 16384];
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(ev) = self.parser.next_event()? {
                return Ok(ev);
            }
            let n = tokio::time::timeout_at(deadline, self.io.read(&mut buf)).await??;
            if n == 0 {
                bail!("connection closed");
            }
            self.parser.feed(&buf[..n]);
        }
    }

    pub async fn element(&mut self) -> Result<Element> {
        match self.event().await? {
            StreamEvent::Element(e) => Ok(e),
            other => bail!("expected an element, got {other:?}"),
        }
    }

    /// Opens a client stream to [`DOMAIN`] (restarting the parser) and returns the features.
    pub async fn open(&mut self) -> Result<Element> {
        self.parser.reset();
        self.send_str(&format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='{}' to='{DOMAIN}' version='1.0'>",
            ns::STREAM
        ))
        .await?;
        match self.event().await? {
            StreamEvent::Open(_) => {}
            other => bail!("expected a header, got {other:?}"),
        }
        let f = self.element().await?;
        if !f.is("features", ns::STREAM) {
            bail!("expected features, got {f}");
        }
        Ok(f)
    }
}

/// A TCP connection to `addr` from the local address `source`, within [`TIMEOUT`].
pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> Result<TcpStream> {
    let socket = match source {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding to {source}"))?;
    Ok(tokio::time::timeout(TIMEOUT, socket.connect(addr)).await??)
}

/// A chat message stanza.
pub fn chat(to: &str, body: &str) -> Element {
    Element::new("message", ns::CLIENT)
        .with_attr("to", to)
        .with_attr("type", "chat")
        .with_child(Element::new("body", ns::CLIENT).with_text(body))
}

/// A presence stanza of a type (None = available) to someone.
pub fn presence(ty: Option<&str>, to: Option<&str>) -> Element {
    let mut p = Element::new("presence", ns::CLIENT);
    if let Some(t) = ty {
        p.set_attr("type", t);
    }
    if let Some(t) = to {
        p.set_attr("to", t);
    }
    p
}

/// The stanza error condition of an error reply.
pub fn error_condition(e: &Element) -> Option<String> {
    e.get_child("error", ns::CLIENT).and_then(|err| {
        err.children()
            .find(|c| c.ns() == ns::STANZAS && c.name() != "text")
            .map(|c| c.name().to_string())
    })
}

fn failure_condition(f: &Element) -> String {
    f.children()
        .find(|c| c.ns() == ns::SASL && c.name() != "text")
        .map(|c| c.name().to_string())
        .unwrap_or_default()
}

/// A SASL `<failure/>` with its condition.
#[derive(Debug)]
pub struct SaslFailure(pub String);

impl std::fmt::Display for SaslFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SASL failure: {}", self.0)
    }
}

impl std::error::Error for SaslFailure {}
