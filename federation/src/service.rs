//! The federation service: listeners, the table of outgoing links, and what the rest
//! of the server sees of them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use async_trait::async_trait;
use confab_protocol::limits::{ConnectionLimiter, WindowLimiter};
use confab_protocol::Element;
use rustls::server::ResolvesServerCert;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::FederationConfig;
use crate::dialback::DialbackSecret;
use crate::dns::Resolver;
use crate::verify::{client_config, incoming_client_verifier, TrustAnchors};
use crate::{Federation, FederationError, Host};

/// Claimed domains whose dialback verifications are remembered at most (the oldest is
/// forgotten first).
const DIALBACK_DOMAINS: usize = 4096;

/// How a link's domain was authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// SASL EXTERNAL with a certificate (XEP-0178).
    External,
    /// Server dialback (XEP-0220).
    Dialback,
    /// Not authenticated (dialback verification connections).
    None,
}

/// (local domain, remote domain).
pub(crate) type LinkKey = (String, String);

struct LinkEntry {
    id: u64,
    tx: mpsc::Sender<Element>,
    method: Option<AuthMethod>,
    since: SystemTime,
}

/// An incoming link: the peer's address, since when, and the domains it proved.
struct IncomingEntry {
    #[allow(dead_code)]
    peer: SocketAddr,
    since: SystemTime,
    domains: Vec<(String, AuthMethod)>,
}

/// One link as the administrator sees it.
#[derive(Clone, Debug)]
pub struct LinkInfo {
    pub local: String,
    pub remote: String,
    pub outgoing: bool,
    /// None while connecting.
    pub method: Option<AuthMethod>,
    pub since: SystemTime,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

pub struct FederationService {
    pub(crate) config: FederationConfig,
    pub(crate) host: Arc<dyn Host>,
    pub(crate) resolver: Resolver,
    pub(crate) anchors: TrustAnchors,
    pub(crate) secret: DialbackSecret,
    pub(crate) server_tls: TlsAcceptor,
    /// Incoming connections held (`max_connections`).
    pub(crate) connections: Arc<Semaphore>,
    /// Incoming connections by source address (`max_connections_per_address`).
    pub(crate) addresses: ConnectionLimiter,
    /// Dialback verifications started per claimed domain (`dialback_per_domain_per_minute`).
    pub(crate) dialback_starts: WindowLimiter<String>,
    this: Weak<FederationService>,
    links: Mutex<HashMap<LinkKey, LinkEntry>>,
    incoming: Mutex<HashMap<u64, IncomingEntry>>,
    next_id: AtomicU64,
    stanzas_out: AtomicU64,
    stanzas_in: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl FederationService {
    /// Sets federation up; `certs` serves our certificate by SNI on incoming links.
    pub fn new(
        config: FederationConfig,
        host: Arc<dyn Host>,
        certs: Arc<dyn ResolvesServerCert>,
    ) -> Result<Arc<FederationService>, SetupError> {
        let anchors = TrustAnchors::load(config.use_system_roots, &config.ca_files)?;
        let resolver = if config.nameservers.is_empty() {
            Resolver::system()?
        } else {
            Resolver::with_nameservers(&config.nameservers)?
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError::Tls(e.to_string()))?
            .with_client_cert_verifier(incoming_client_verifier(&anchors))
            .with_cert_resolver(certs);
        // XEP-0368: direct TLS to a server port announces the protocol with ALPN.
        server_config.alpn_protocols = vec![b"xmpp-server".to_vec()];
        let secret = if config.dialback_secret.is_empty() {
            DialbackSecret::generate()
        } else {
            DialbackSecret::from_bytes(&config.dialback_secret)
        };
        let (shutdown, _) = watch::channel(false);
        let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
        Ok(Arc::new_cyclic(|this| FederationService {
            connections,
            addresses: ConnectionLimiter::new(),
            dialback_starts: WindowLimiter::with_capacity(DIALBACK_DOMAINS),
            config,
            host,
            resolver,
            anchors,
            secret,
            server_tls: TlsAcceptor::from(Arc::new(server_config)),
            this: this.clone(),
            links: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stanzas_out: AtomicU64::new(0),
            stanzas_in: AtomicU64::new(0),
            shutdown,
        }))
    }

    /// Binds the s2s listeners; returns (STARTTLS addresses, direct TLS addresses).
    pub async fn start_listeners(
        self: &Arc<Self>,
    ) -> Result<(Vec<SocketAddr>, Vec<SocketAddr>), SetupError> {
        let mut plain = Vec::new();
        let mut tls = Vec::new();
        for (addrs, direct, out) in [
            (&self.config.listen, false, &mut plain),
            (&self.config.tls_listen, true, &mut tls),
        ] {
            for addr in addrs {
                let listener = bind(addr).await?;
                let local = listener.local_addr().map_err(|source| SetupError::Bind {
                    addr: addr.clone(),
                    source,
                })?;
                tracing::info!(addr = %local, direct_tls = direct, "listening for servers");
                out.push(local);
                let svc = self.clone();
                let mut stop = self.shutdown_signal();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = crate::incoming::accept_loop(svc, listener, direct) => {}
                        _ = crate::stream::stopped(&mut stop) => {}
                    }
                });
            }
        }
        Ok((plain, tls))
    }

    /// Closes every link with `system-shutdown` and stops the listeners.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub(crate) fn client_tls(&self, local: &str, direct: bool) -> Arc<rustls::ClientConfig> {
        let cert = crate::verify::ClientCert(self.host.certificate(local));
        let config = client_config(&self.anchors, Arc::new(cert));
        if !direct {
            return config;
        }
        // XEP-0368 §4: direct TLS to a server port names the protocol with ALPN.
        let mut config = (*config).clone();
        config.alpn_protocols = vec![b"xmpp-server".to_vec()];
        Arc::new(config)
    }

    /// Queues a stanza for `remote` without waiting (for callers that cannot await);
    /// the same as [`Federation::send`].
    pub fn enqueue(
        &self,
        local: &str,
        remote: &str,
        stanza: Element,
    ) -> Result<(), FederationError> {
        self.send_stanza(local, remote, stanza, true)
    }

    /// Queues a stanza on the link for (local, remote), starting the link if needed.
    pub(crate) fn send_stanza(
        &self,
        local: &str,
        remote: &str,
        mut stanza: Element,
        retry: bool,
    ) -> Result<(), FederationError> {
        if *self.shutdown.borrow() {
            return Err(FederationError::RemoteServerTimeout(remote.to_string()));
        }
        let key: LinkKey = (local.to_string(), remote.to_string());
        for _ in 0..2 {
            let (tx, id) = {
                let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
                match links.get(&key) {
                    Some(entry) => (entry.tx.clone(), entry.id),
                    None => {
                        let Some(this) = self.this.upgrade() else {
                            return Err(FederationError::RemoteServerNotFound(remote.into()));
                        };
                        let (tx, rx) = mpsc::channel(self.config.queue.max(1));
                        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        links.insert(
                            key.clone(),
                            LinkEntry {
                                id,
                                tx: tx.clone(),
                                method: None,
                                since: SystemTime::now(),
                            },
                        );
                        tokio::spawn(crate::outgoing::run_link(this, key.clone(), id, rx));
                        (tx, id)
                    }
                }
            };
            match tx.try_send(stanza) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The link cannot keep up (or is stuck connecting): tell the sender.
                    return Err(FederationError::QueueFull(remote.to_string()));
                }
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    self.remove_link(&key, id);
                    if !retry {
                        return Err(FederationError::RemoteServerTimeout(remote.to_string()));
                    }
                    stanza = back;
                }
            }
        }
        Err(FederationError::RemoteServerTimeout(remote.to_string()))
    }

    pub(crate) fn remove_link(&self, key: &LinkKey, id: u64) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.get(key).is_some_and(|e| e.id == id) {
            links.remove(key);
        }
    }

    pub(crate) fn link_ready(&self, key: &LinkKey, id: u64, method: AuthMethod) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = links.get_mut(key).filter(|e| e.id == id) {
            e.method = Some(method);
            e.since = SystemTime::now();
        }
    }

    pub(crate) fn incoming_opened(&self, peer: SocketAddr) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                IncomingEntry {
                    peer,
                    since: SystemTime::now(),
                    domains: Vec::new(),
                },
            );
        id
    }

    pub(crate) fn incoming_closed(&self, id: u64) {
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    pub(crate) fn incoming_authenticated(&self, id: u64, domain: &str, method: AuthMethod) {
        if let Some(entry) = self
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&id)
        {
            entry.domains.push((domain.to_string(), method));
        }
    }

    pub(crate) fn count_out(&self, n: usize) {
        self.stanzas_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn count_in(&self) {
        self.stanzas_in.fetch_add(1, Ordering::Relaxed);
    }

    /// Outgoing links, for administration.
    pub fn links(&self) -> Vec<LinkInfo> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links
            .iter()
            .map(|((local, remote), e)| LinkInfo {
                local: local.clone(),
                remote: remote.clone(),
                outgoing: true,
                method: e.method,
                since: e.since,
            })
            .collect()
    }

    /// Authenticated domains on incoming links, for administration.
    pub fn incoming_links(&self) -> Vec<LinkInfo> {
        let incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        incoming
            .values()
            .flat_map(|e| {
                e.domains.iter().map(|(remote, method)| LinkInfo {
                    local: String::new(),
                    remote: remote.clone(),
                    outgoing: false,
                    method: Some(*method),
                    since: e.since,
                })
            })
            .collect()
    }

    /// (stanzas sent, stanzas received) over all links.
    pub fn stanza_counts(&self) -> (u64, u64) {
        (
            self.stanzas_out.load(Ordering::Relaxed),
            self.stanzas_in.load(Ordering::Relaxed),
        )
    }
}

/// Binds `addr`; on a host without IPv6 the wildcard "[::]" falls back to "0.0.0.0".
async fn bind(addr: &str) -> Result<TcpListener, SetupError> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if addr.starts_with("[::]:") && e.kind() != std::io::ErrorKind::AddrInUse => {
            let v4 = addr.replacen("[::]", "0.0.0.0", 1);
            tracing::warn!(%addr, error = %e, fallback = %v4, "IPv6 unavailable");
            TcpListener::bind(&v4)
                .await
                .map_err(|source| SetupError::Bind { addr: v4, source })
        }
        Err(source) => Err(SetupError::Bind {
            addr: addr.to_string(),
            source,
        }),
    }
}

#[async_trait]
impl Federation for FederationService {
    async fn send(
        &self,
        local_domain: &str,
        remote_domain: &str,
        stanza: Element,
    ) -> Result<(), FederationError> {
        self.send_stanza(local_domain, remote_domain, stanza, true)
    }
}
