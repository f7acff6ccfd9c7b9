//! The running server: shared state, listeners and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use confab_federation::{Federation, FederationService, Host};
use confab_protocol::Element;
use confab_storage::Storage;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::modules::Modules;
use crate::router::Router;
use crate::tls::{CertStore, LiveCerts};

/// Called with the configuration a reload put in force.
pub type ReloadHook = Box<dyn Fn(&Config) + Send + Sync>;

/// Everything a connection task needs, shared by all of them.
pub struct Server {
    /// The configuration in force; replaced as a whole by a reload.
    config: std::sync::RwLock<Arc<Config>>,
    /// The configuration file, if any, that a reload reads again.
    pub config_path: std::sync::OnceLock<std::path::PathBuf>,
    /// Called with the new configuration after a successful reload (the binary uses it
    /// to apply a new log level).
    pub on_reload: std::sync::OnceLock<ReloadHook>,
    pub storage: Arc<dyn Storage>,
    pub router: Router,
    pub certs: Arc<LiveCerts>,
    pub tls: TlsAcceptor,
    pub modules: Modules,
    pub started: Instant,
    pub connections: Arc<Semaphore>,
    /// Client connections by source address (`limits.max_connections_per_address`).
    pub c2s_addresses: confab_protocol::limits::ConnectionLimiter,
    /// What unauthenticated streams, client and server, may hold of unfinished elements
    /// together (`limits.pre_auth_buffer_total`).
    pub pre_auth_budget: Arc<confab_protocol::limits::ByteBudget>,
    /// Counters for `confab stats` and the metrics endpoint.
    pub stats: crate::ops::Stats,
    /// Failed logins by source address (`limits.auth_failures_per_minute`).
    pub auth_limiter: crate::ratelimit::AuthLimiter,
    /// Server-to-server links; unset when federation is off.
    pub federation: std::sync::OnceLock<Arc<FederationService>>,
    /// Remote resources that told local users they are available, by remote domain:
    /// remote full JID → local bare JIDs. When a remote server goes away without
    /// saying so, they are told it is unavailable (RFC 6121 §4.3, presence for
    /// contacts whose server is gone).
    pub remote_presence: std::sync::Mutex<
        std::collections::HashMap<
            String,
            std::collections::HashMap<String, std::collections::HashSet<String>>,
        >,
    >,
    shutdown: watch::Sender<bool>,
}

/// A started server: its bound addresses and the way to stop it.
pub struct RunningServer {
    pub server: Arc<Server>,
    /// Bound STARTTLS client addresses (port 0 in the config becomes the real port here).
    pub c2s_addrs: Vec<SocketAddr>,
    /// Bound direct-TLS client addresses.
    pub c2s_tls_addrs: Vec<SocketAddr>,
    /// Bound STARTTLS server-to-server addresses.
    pub s2s_addrs: Vec<SocketAddr>,
    /// Bound direct-TLS server-to-server addresses.
    pub s2s_tls_addrs: Vec<SocketAddr>,
    /// Bound Prometheus endpoint addresses (`[metrics] listen`).
    pub metrics_addrs: Vec<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reload refused, the old configuration stays: {0}")]
    Refused(String),
    #[error("reload refused, the old configuration stays: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("federation: {0}")]
    Federation(#[from] confab_federation::SetupError),
    #[error("cannot prepare federation: {0}")]
    FederationIo(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

impl Server {
    pub fn new(config: Config, storage: Arc<dyn Storage>) -> Result<Arc<Server>, StartError> {
        let certs = LiveCerts::new(CertStore::load(&config)?);
        let tls = TlsAcceptor::from(certs.server_config()?);
        let (shutdown, _) = watch::channel(false);
        Ok(Arc::new(Server {
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            c2s_addresses: Default::default(),
            pre_auth_budget: confab_protocol::limits::ByteBudget::new(
                config.limits.pre_auth_buffer_total,
            ),
            config: std::sync::RwLock::new(Arc::new(config)),
            config_path: std::sync::OnceLock::new(),
            on_reload: std::sync::OnceLock::new(),
            storage,
            router: Router::new(),
            certs,
            tls,
            modules: Modules::new(),
            started: Instant::now(),
            stats: Default::default(),
            auth_limiter: Default::default(),
            federation: std::sync::OnceLock::new(),
            remote_presence: Default::default(),
            shutdown,
        }))
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// The configuration in force (a snapshot: a reload does not change it under you).
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.config().is_local_domain(domain)
    }

    /// Applies a new configuration without dropping anyone: certificates, domains,
    /// limits and authentication settings take effect for new connections and stanzas
    /// at once. Listen addresses, the data directory and federation settings other than
    /// certificates need a restart; the returned notes say which changed. On any error
    /// the running configuration stays as it was.
    pub fn reload(&self, new: Config) -> Result<Vec<String>, ReloadError> {
        let old = self.config();
        let mut notes = Vec::new();
        if new.data_dir != old.data_dir {
            return Err(ReloadError::Refused(
                "data_dir cannot change while the server runs".into(),
            ));
        }
        let restart = [
            ("c2s.listen", new.c2s.listen != old.c2s.listen),
            ("c2s.tls_listen", new.c2s.tls_listen != old.c2s.tls_listen),
            ("s2s", format!("{:?}", new.s2s) != format!("{:?}", old.s2s)),
            (
                "limits.max_connections",
                new.limits.max_connections != old.limits.max_connections,
            ),
            ("metrics.listen", new.metrics.listen != old.metrics.listen),
            ("log_format", new.log_format != old.log_format),
        ];
        for (key, changed) in restart {
            if changed {
                notes.push(format!("{key} changed: takes effect after a restart"));
            }
        }
        let certs = CertStore::load(&new)?;
        self.certs.replace(certs);
        if new.domains != old.domains {
            notes.push(format!("domains: {}", new.domains.join(", ")));
        }
        self.pre_auth_budget
            .set_limit(new.limits.pre_auth_buffer_total);
        let new = Arc::new(new);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
        if let Some(hook) = self.on_reload.get() {
            hook(&new);
        }
        tracing::info!("configuration and certificates reloaded");
        notes.push("configuration and certificates reloaded".into());
        Ok(notes)
    }

    /// Reads the configuration file again (or the defaults, without one) and applies it.
    pub fn reload_from_file(&self) -> Result<Vec<String>, ReloadError> {
        let config = match self.config_path.get() {
            Some(p) => Config::load(p).map_err(|e| ReloadError::Refused(e.to_string()))?,
            None => Config::default(),
        };
        self.reload(config)
    }

    /// Hands a stanza for a remote domain to federation; the sender gets the error
    /// when that is impossible (RFC 6120 §8.3.3.15).
    pub async fn send_remote(self: &Arc<Self>, remote: &str, stanza: Element) {
        let local = stanza
            .attr("from")
            .and_then(|f| crate::jid::Addr::parse(f).ok())
            .map(|a| a.domain)
            .filter(|d| self.is_local_domain(d));
        let Some(local) = local else {
            return;
        };
        if let Some(kind) = crate::stanza::kind(&stanza) {
            self.stats.stanza_out(kind);
        }
        let result = match self.federation.get() {
            Some(f) => f.send(&local, remote, stanza.clone()).await,
            None => Err(confab_federation::FederationError::RemoteServerNotFound(
                remote.to_string(),
            )),
        };
        if let Err(e) = result {
            self.bounce(&stanza, &e);
        }
    }

    /// Answers a stanza that could not reach a remote domain with the matching error.
    pub fn bounce(self: &Arc<Self>, stanza: &Element, error: &confab_federation::FederationError) {
        use confab_protocol::StanzaErrorCondition as Cond;
        // Presence that cannot be delivered is dropped, except subscription requests
        // whose sender waits for an answer.
        if stanza.name() == "presence" && !matches!(stanza.attr("type"), Some("subscribe")) {
            return;
        }
        let cond = match error {
            confab_federation::FederationError::RemoteServerTimeout(_) => Cond::RemoteServerTimeout,
            confab_federation::FederationError::QueueFull(_) => Cond::ResourceConstraint,
            _ => Cond::RemoteServerNotFound,
        };
        self.send_error(stanza, cond);
    }
}

/// What federation sees of the server.
struct FederationHost(std::sync::Weak<Server>);

#[async_trait::async_trait]
impl Host for FederationHost {
    fn is_local_domain(&self, domain: &str) -> bool {
        self.0.upgrade().is_some_and(|s| s.is_local_domain(domain))
    }
    fn default_domain(&self) -> Option<String> {
        self.0
            .upgrade()
            .and_then(|s| s.config().domains.first().cloned())
    }
    fn certificate(&self, domain: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0
            .upgrade()
            .and_then(|s| s.certs.get(domain))
            .map(|c| c.key.clone())
    }
    async fn deliver(&self, stanza: Element) {
        if let Some(server) = self.0.upgrade() {
            if let Some(kind) = crate::stanza::kind(&stanza) {
                server.stats.stanza_in(kind);
            }
            server.route(stanza).await;
        }
    }
    async fn bounce(&self, stanza: Element, error: confab_federation::FederationError) {
        if let Some(server) = self.0.upgrade() {
            server.bounce(&stanza, &error);
        }
    }
    async fn remote_gone(&self, domain: &str) {
        if let Some(server) = self.0.upgrade() {
            crate::modules::presence::remote_gone(&server, domain).await;
        }
    }
}

impl RunningServer {
    /// Binds every configured listener and starts accepting.
    pub async fn start(
        config: Config,
        storage: Arc<dyn Storage>,
    ) -> Result<RunningServer, StartError> {
        let server = Server::new(config, storage)?;
        let mut tasks = Vec::new();
        let (mut s2s_addrs, mut s2s_tls_addrs) = (Vec::new(), Vec::new());
        let config = server.config();
        for note in &config.derived {
            tracing::info!("{note}");
        }
        if config.s2s.enabled {
            let mut fed_config = config.federation().map_err(StartError::FederationIo)?;
            fed_config.pre_auth_budget = server.pre_auth_budget.clone();
            let host = Arc::new(FederationHost(Arc::downgrade(&server)));
            let federation = FederationService::new(fed_config, host, server.certs.resolver())?;
            let (plain, tls) = federation.start_listeners().await?;
            s2s_addrs = plain;
            s2s_tls_addrs = tls;
            let _ = server.federation.set(federation);
        }
        let mut c2s_addrs = Vec::new();
        let mut c2s_tls_addrs = Vec::new();
        for (addrs, direct_tls, out) in [
            (&config.c2s.listen, false, &mut c2s_addrs),
            (&config.c2s.tls_listen, true, &mut c2s_tls_addrs),
        ] {
            for addr in addrs {
                let listener = bind(addr).await?;
                let local = listener.local_addr().map_err(|source| StartError::Bind {
                    addr: addr.clone(),
                    source,
                })?;
                tracing::info!(addr = %local, direct_tls, "listening for clients");
                out.push(local);
                tasks.push(tokio::spawn(crate::c2s::accept_loop(
                    server.clone(),
                    listener,
                    direct_tls,
                )));
            }
        }
        let mut metrics_addrs = Vec::new();
        for addr in &config.metrics.listen {
            let listener = bind(addr).await?;
            let local = listener.local_addr().map_err(|source| StartError::Bind {
                addr: addr.clone(),
                source,
            })?;
            tracing::info!(addr = %local, "serving metrics on /metrics");
            metrics_addrs.push(local);
            tasks.push(tokio::spawn(crate::metrics::serve(
                server.clone(),
                listener,
            )));
        }
        Ok(RunningServer {
            server,
            c2s_addrs,
            c2s_tls_addrs,
            s2s_addrs,
            s2s_tls_addrs,
            metrics_addrs,
            tasks,
        })
    }

    /// Stops accepting, closes every stream with `system-shutdown`, flushes storage; a
    /// failed flush is logged (see [`RunningServer::close`] to act on it).
    pub async fn shutdown(self) {
        if let Err(e) = self.close().await {
            tracing::error!(error = %e, "flushing storage at shutdown failed");
        }
    }

    /// [`RunningServer::shutdown`], returning the result of the final flush of the store:
    /// an error means that writes made since the last successful flush may not be on disk.
    pub async fn close(self) -> Result<(), confab_storage::StorageError> {
        self.server.shutdown.send_replace(true);
        if let Some(f) = self.server.federation.get() {
            f.shutdown();
        }
        for t in &self.tasks {
            t.abort();
        }
        // Sessions see the signal and close their streams; wait (bounded) for them.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while self.server.router.session_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.server.storage.flush().await
    }
}

async fn bind(addr: &str) -> Result<TcpListener, StartError> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        // A host without IPv6 cannot bind the default "[::]"; serve IPv4 there.
        Err(e) if addr.starts_with("[::]:") && e.kind() != std::io::ErrorKind::AddrInUse => {
            let v4 = addr.replacen("[::]", "0.0.0.0", 1);
            tracing::warn!(%addr, error = %e, fallback = %v4, "IPv6 unavailable");
            TcpListener::bind(&v4)
                .await
                .map_err(|source| StartError::Bind { addr: v4, source })
        }
        Err(source) => Err(StartError::Bind {
            addr: addr.to_string(),
            source,
        }),
    }
}
