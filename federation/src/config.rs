//! Federation settings, as the server's configuration hands them over.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use confab_protocol::limits::ByteBudget;

/// Policy overrides for one remote domain.
#[derive(Clone, Debug, Default)]
pub struct DomainPolicy {
    pub require_encryption: Option<bool>,
    pub allow_dialback: Option<bool>,
}

#[derive(Clone, Debug)]
pub struct FederationConfig {
    /// Addresses for incoming links that start in plaintext (STARTTLS).
    pub listen: Vec<String>,
    /// Addresses for incoming links that start with TLS (XEP-0368).
    pub tls_listen: Vec<String>,
    /// Links must be encrypted (RFC 6120 §5.1); default true.
    pub require_encryption: bool,
    /// Accept and use dialback (XEP-0220) when certificates do not authenticate a peer.
    pub allow_dialback: bool,
    pub connect_timeout: Duration,
    /// An outgoing link with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Stanzas queued on one outgoing link while it connects.
    pub queue: usize,
    pub max_stanza_size: usize,
    pub max_depth: usize,
    /// Incoming connections held at once; further ones are closed at accept.
    pub max_connections: usize,
    /// Incoming connections held at once from one address (IPv6: one /64). 0: no limit.
    pub max_connections_per_address: usize,
    /// Largest element an incoming stream may send before it has authenticated a domain.
    pub pre_auth_stanza_size: usize,
    /// What unauthenticated streams may hold of unfinished elements, all together; the
    /// server passes the budget its client listeners use, so the total covers both.
    pub pre_auth_budget: Arc<ByteBudget>,
    /// Dialback verifications started per minute for one claimed domain. 0: no limit.
    pub dialback_per_domain_per_minute: u32,
    pub use_system_roots: bool,
    pub ca_files: Vec<PathBuf>,
    /// DNS servers to ask; empty means the system resolver.
    pub nameservers: Vec<SocketAddr>,
    /// Per remote domain overrides.
    pub domains: HashMap<String, DomainPolicy>,
    /// The secret dialback keys are derived from (XEP-0185).
    pub dialback_secret: Vec<u8>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            listen: vec!["[::]:5269".into()],
            tls_listen: vec!["[::]:5270".into()],
            require_encryption: true,
            allow_dialback: true,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            queue: 1000,
            max_stanza_size: 512 * 1024,
            max_depth: 64,
            max_connections: 10_000,
            max_connections_per_address: 32,
            pre_auth_stanza_size: 16 * 1024,
            pre_auth_budget: ByteBudget::new(16 * 1024 * 1024),
            dialback_per_domain_per_minute: 30,
            use_system_roots: true,
            ca_files: Vec::new(),
            nameservers: Vec::new(),
            domains: HashMap::new(),
            dialback_secret: Vec::new(),
        }
    }
}

impl FederationConfig {
    pub fn require_encryption_for(&self, remote: &str) -> bool {
        self.domains
            .get(remote)
            .and_then(|p| p.require_encryption)
            .unwrap_or(self.require_encryption)
    }

    pub fn allow_dialback_for(&self, remote: &str) -> bool {
        self.domains
            .get(remote)
            .and_then(|p| p.allow_dialback)
            .unwrap_or(self.allow_dialback)
    }
}
