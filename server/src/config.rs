//! Server configuration: TOML, every key optional, defaults that run with no file.
//!
//! Unknown keys are an error (with the key's name and line), so a typo never silently
//! turns into a default. Every key is documented in `docs/config.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The domains (virtual hosts) this server serves.
    pub domains: Vec<String>,
    /// Where the store, generated certificates and the admin socket live.
    pub data_dir: PathBuf,
    /// `error`, `warn`, `info`, `debug` or `trace`, or a tracing filter directive.
    pub log_level: String,
    /// How log lines are written to stderr: for people or as JSON objects.
    pub log_format: LogFormat,
    pub c2s: C2sConfig,
    pub s2s: S2sConfig,
    pub auth: AuthConfig,
    pub limits: Limits,
    pub metrics: MetricsConfig,
    /// Certificate and key per domain; domains without an entry get a self-signed
    /// certificate generated into `data_dir/certs/` on first start.
    pub tls: BTreeMap<String, TlsFiles>,
    /// Defaults the server derived from other keys (see [`Config::parse_str`]), said at
    /// start and by `confab check config` so an operator sees where it listens and why.
    #[serde(skip)]
    pub derived: Vec<String>,
}

/// The form of log lines (`log_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The Prometheus endpoint (`GET /metrics`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Addresses to serve `/metrics` on; empty (the default): none.
    pub listen: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct C2sConfig {
    /// Addresses for client connections that start in plaintext and upgrade with STARTTLS.
    pub listen: Vec<String>,
    /// Addresses for client connections that start with TLS (XEP-0368).
    pub tls_listen: Vec<String>,
    /// Require TLS before authentication (RFC 6120 §5.3.1). Turn off only for local tests.
    pub require_encryption: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S2sConfig {
    /// Federate with other domains at all.
    pub enabled: bool,
    /// Addresses for servers that connect in plaintext and upgrade with STARTTLS.
    pub listen: Vec<String>,
    /// Addresses for servers that start with TLS (XEP-0368).
    pub tls_listen: Vec<String>,
    /// Links must be encrypted (RFC 6120 §5.1).
    pub require_encryption: bool,
    /// Use server dialback (XEP-0220) when certificates do not authenticate a peer.
    pub allow_dialback: bool,
    pub connect_timeout_secs: u64,
    /// Outgoing links without traffic for this long are closed.
    pub idle_timeout_secs: u64,
    /// Stanzas queued per outgoing link while it connects.
    pub queue: usize,
    /// Largest stanza accepted from a server, in bytes.
    pub max_stanza_size: usize,
    /// Simultaneous incoming server connections; further ones are refused.
    pub max_connections: usize,
    /// Simultaneous incoming server connections from one address (IPv6: one /64). 0: no
    /// limit.
    pub max_connections_per_address: usize,
    /// Dialback verifications (each an outgoing connection) started per minute for one
    /// claimed remote domain; further requests are answered with an error. 0: no limit.
    pub dialback_per_domain_per_minute: u32,
    /// Trust the operating system's CA certificates for peers.
    pub use_system_roots: bool,
    /// Extra CA certificates (PEM) trusted for peers.
    pub ca_files: Vec<PathBuf>,
    /// DNS servers (`IP:PORT`) for finding peers; empty: the system's resolver.
    pub nameservers: Vec<String>,
    /// Per remote domain overrides.
    pub domains: BTreeMap<String, S2sDomainPolicy>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S2sDomainPolicy {
    pub require_encryption: Option<bool>,
    pub allow_dialback: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// PBKDF2 iterations for newly stored SCRAM keys (RFC 5802 asks for at least 4096).
    pub scram_iterations: u32,
    /// Failed authentication attempts allowed on one stream before it is closed.
    pub max_failures_per_stream: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest stanza accepted from a client, in bytes.
    pub max_stanza_size: usize,
    /// Deepest XML nesting accepted inside one stanza.
    pub max_depth: usize,
    /// Simultaneous client connections; further ones are refused.
    pub max_connections: usize,
    /// Simultaneous client connections from one address (IPv6: one /64); further ones
    /// are refused. 0: no limit.
    pub max_connections_per_address: usize,
    /// Largest element a stream may send before it has authenticated, in bytes, on
    /// client and server listeners (STARTTLS, SASL and dialback need a few hundred).
    pub pre_auth_stanza_size: usize,
    /// Bytes of unfinished elements that all streams not yet authenticated may hold
    /// together (client and server listeners); a stream that would take more is closed.
    pub pre_auth_buffer_total: usize,
    /// Stanzas queued for one session before it is considered a slow reader and disconnected.
    pub session_queue: usize,
    /// Bytes of memory (parsed stanzas) queued for one session before it is disconnected
    /// likewise; a single stanza is always taken into an empty queue.
    pub session_queue_bytes: usize,
    /// Messages kept in one account's offline store.
    pub max_offline_messages: usize,
    /// Inbound subscription requests kept for one account until it answers them; at most
    /// a quarter of this from any one domain.
    pub max_pending_subscriptions: usize,
    /// Seconds a new connection may take to authenticate and bind.
    pub login_timeout_secs: u64,
    /// Failed logins one address may make within a minute, across connections; then
    /// its logins are refused until older failures leave the window. 0: no limit.
    pub auth_failures_per_minute: u32,
    /// Bytes per second one client connection may send; a faster sender's reads are paused
    /// (bursts up to `max_stanza_size` or one second's worth pass at once). 0: no limit.
    pub client_read_rate: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first (Let's Encrypt's `fullchain.pem`).
    pub cert: PathBuf,
    /// PEM private key (Let's Encrypt's `privkey.pem`).
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domains: vec!["localhost".to_string()],
            data_dir: PathBuf::from("data"),
            log_level: "info".to_string(),
            log_format: LogFormat::Human,
            c2s: C2sConfig::default(),
            s2s: S2sConfig::default(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            metrics: MetricsConfig::default(),
            tls: BTreeMap::new(),
            derived: Vec::new(),
        }
    }
}

impl Default for C2sConfig {
    fn default() -> Self {
        C2sConfig {
            listen: vec!["[::]:5222".to_string()],
            tls_listen: vec!["[::]:5223".to_string()],
            require_encryption: true,
        }
    }
}

impl Default for S2sConfig {
    fn default() -> Self {
        S2sConfig {
            enabled: true,
            listen: vec!["[::]:5269".to_string()],
            tls_listen: vec!["[::]:5270".to_string()],
            require_encryption: true,
            allow_dialback: true,
            connect_timeout_secs: 10,
            idle_timeout_secs: 600,
            queue: 1000,
            max_stanza_size: 512 * 1024,
            max_connections: 10_000,
            max_connections_per_address: 32,
            dialback_per_domain_per_minute: 30,
            use_system_roots: true,
            ca_files: Vec::new(),
            nameservers: Vec::new(),
            domains: BTreeMap::new(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            scram_iterations: 4096,
            max_failures_per_stream: 3,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_size: 256 * 1024,
            max_depth: 64,
            max_connections: 100_000,
            max_connections_per_address: 32,
            pre_auth_stanza_size: 16 * 1024,
            pre_auth_buffer_total: 16 * 1024 * 1024,
            session_queue: 1024,
            session_queue_bytes: 8 * 1024 * 1024,
            max_offline_messages: 1000,
            max_pending_subscriptions: 100,
            login_timeout_secs: 60,
            auth_failures_per_minute: 10,
            client_read_rate: 1024 * 1024,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse_str(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        // Relative paths in a config file are relative to the file, not to the
        // working directory the operator happened to start the server from.
        if let Some(dir) = path.parent() {
            if config.data_dir.is_relative() {
                config.data_dir = dir.join(&config.data_dir);
            }
            for ca in config.s2s.ca_files.iter_mut() {
                if ca.is_relative() {
                    *ca = dir.join(&*ca);
                }
            }
            for files in config.tls.values_mut() {
                if files.cert.is_relative() {
                    files.cert = dir.join(&files.cert);
                }
                if files.key.is_relative() {
                    files.key = dir.join(&files.key);
                }
            }
        }
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn parse_str(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            // One line, for an operator's terminal: "line N: what is wrong".
            let line = e
                .span()
                .map(|span| text.get(..span.start).unwrap_or(text).matches('\n').count() + 1);
            let what = e.message().trim().replace('\n', " ");
            ConfigError::Parse {
                path: PathBuf::from("<config>"),
                message: match line {
                    Some(n) => format!("line {n}: {what}"),
                    None => what,
                },
            }
        })?;
        // The file parsed, so it is a table; the raw form tells which keys were given.
        let raw: toml::Table = toml::from_str(text).unwrap_or_default();
        config.derive_tls_listen(&raw);
        config.normalize()?;
        Ok(config)
    }

    /// Direct TLS follows the operator's `listen`: a config that sets `[c2s] listen` (or
    /// `[s2s] listen`) but not `tls_listen` gets direct-TLS listeners on the same
    /// addresses at the direct-TLS port (5223 / 5270; port 0 stays 0), not the default's
    /// wildcard address, which would open every interface and collide with a second
    /// instance bound elsewhere. `tls_listen = []` turns direct TLS off.
    fn derive_tls_listen(&mut self, raw: &toml::Table) {
        let given = |section: &str, key: &str| {
            raw.get(section)
                .and_then(toml::Value::as_table)
                .is_some_and(|t| t.contains_key(key))
        };
        for (section, port) in [("c2s", 5223u16), ("s2s", 5270)] {
            if !given(section, "listen") || given(section, "tls_listen") {
                continue;
            }
            let (listen, tls_listen) = match section {
                "c2s" => (&self.c2s.listen, &mut self.c2s.tls_listen),
                _ => (&self.s2s.listen, &mut self.s2s.tls_listen),
            };
            let mut derived: Vec<String> = Vec::new();
            for addr in listen {
                // A malformed address is reported by normalize(); derive nothing from it.
                let Ok(mut a) = addr.parse::<SocketAddr>() else {
                    continue;
                };
                if a.port() != 0 {
                    a.set_port(port);
                }
                let a = a.to_string();
                if !derived.contains(&a) {
                    derived.push(a);
                }
            }
            self.derived.push(format!(
                "{section}.tls_listen is not set: direct TLS on {} (the addresses of \
                 {section}.listen at port {port}); set {section}.tls_listen to change it, \
                 or to [] to turn it off",
                if derived.is_empty() {
                    "no address".to_string()
                } else {
                    derived.join(", ")
                }
            ));
            *tls_listen = derived;
        }
    }

    /// Prepares domain names and checks values that serde cannot.
    pub fn normalize(&mut self) -> Result<(), ConfigError> {
        if self.domains.is_empty() {
            return Err(ConfigError::Invalid(
                "`domains` must name at least one domain".into(),
            ));
        }
        let mut prepared = Vec::new();
        for d in &self.domains {
            let bare = confab_protocol::jid::BareJid::new(d).map_err(|e| {
                ConfigError::Invalid(format!("domain {d:?} is not a valid domain: {e}"))
            })?;
            if bare.node().is_some() {
                return Err(ConfigError::Invalid(format!(
                    "domain {d:?} must not contain '@'"
                )));
            }
            let domain = bare.domain().to_string();
            if prepared.contains(&domain) {
                return Err(ConfigError::Invalid(format!(
                    "domain {d:?} is listed twice"
                )));
            }
            prepared.push(domain);
        }
        self.domains = prepared;
        for name in self.tls.keys() {
            if !self.domains.iter().any(|d| d == name) {
                return Err(ConfigError::Invalid(format!(
                    "[tls.\"{name}\"] names a domain that is not in `domains`"
                )));
            }
        }
        for ns in &self.s2s.nameservers {
            ns.parse::<SocketAddr>().map_err(|_| {
                ConfigError::Invalid(format!(
                    "s2s.nameservers entry {ns:?} is not of the form IP:PORT (e.g. \"127.0.0.1:53\")"
                ))
            })?;
        }
        if self.s2s.max_stanza_size < 10_000 {
            return Err(ConfigError::Invalid(
                "s2s.max_stanza_size must be at least 10000 bytes (RFC 6120 §13.12)".into(),
            ));
        }
        let mut s2s_domains = BTreeMap::new();
        for (name, policy) in std::mem::take(&mut self.s2s.domains) {
            s2s_domains.insert(name.to_ascii_lowercase(), policy);
        }
        self.s2s.domains = s2s_domains;
        for addr in self
            .c2s
            .listen
            .iter()
            .chain(&self.c2s.tls_listen)
            .chain(&self.s2s.listen)
            .chain(&self.s2s.tls_listen)
            .chain(&self.metrics.listen)
        {
            addr.parse::<SocketAddr>().map_err(|_| {
                ConfigError::Invalid(format!(
                    "listen address {addr:?} is not of the form IP:PORT (e.g. \"[::]:5222\" or \"0.0.0.0:5222\")"
                ))
            })?;
        }
        if self.auth.scram_iterations < 4096 {
            return Err(ConfigError::Invalid(
                "auth.scram_iterations must be at least 4096 (RFC 5802 §5.1)".into(),
            ));
        }
        if self.limits.max_stanza_size < 10_000 {
            return Err(ConfigError::Invalid(
                "limits.max_stanza_size must be at least 10000 bytes (RFC 6120 §13.12)".into(),
            ));
        }
        if self.limits.session_queue == 0 || self.limits.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "limits.session_queue and limits.max_connections must be positive".into(),
            ));
        }
        if self.s2s.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "s2s.max_connections must be positive".into(),
            ));
        }
        if self.limits.pre_auth_stanza_size < 4096 {
            return Err(ConfigError::Invalid(
                "limits.pre_auth_stanza_size must be at least 4096 bytes".into(),
            ));
        }
        if self.limits.pre_auth_buffer_total < self.limits.pre_auth_stanza_size {
            return Err(ConfigError::Invalid(
                "limits.pre_auth_buffer_total must be at least limits.pre_auth_stanza_size".into(),
            ));
        }
        if self.limits.session_queue_bytes < 64 * 1024 {
            return Err(ConfigError::Invalid(
                "limits.session_queue_bytes must be at least 65536".into(),
            ));
        }
        Ok(())
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| d == domain)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("store")
    }

    pub fn cert_dir(&self) -> PathBuf {
        self.data_dir.join("certs")
    }

    /// The federation settings, with the dialback secret read from (or first written
    /// to) the data directory so keys stay valid across restarts.
    pub fn federation(&self) -> std::io::Result<confab_federation::FederationConfig> {
        let s = &self.s2s;
        let secret = load_or_create_secret(&self.data_dir.join("dialback.secret"))?;
        Ok(confab_federation::FederationConfig {
            listen: s.listen.clone(),
            tls_listen: s.tls_listen.clone(),
            require_encryption: s.require_encryption,
            allow_dialback: s.allow_dialback,
            connect_timeout: std::time::Duration::from_secs(s.connect_timeout_secs.max(1)),
            idle_timeout: std::time::Duration::from_secs(s.idle_timeout_secs.max(1)),
            queue: s.queue.max(1),
            max_stanza_size: s.max_stanza_size,
            max_depth: self.limits.max_depth,
            max_connections: s.max_connections,
            max_connections_per_address: s.max_connections_per_address,
            pre_auth_stanza_size: self.limits.pre_auth_stanza_size,
            // The running server hands federation its own budget, shared with clients.
            pre_auth_budget: confab_protocol::limits::ByteBudget::new(
                self.limits.pre_auth_buffer_total,
            ),
            dialback_per_domain_per_minute: s.dialback_per_domain_per_minute,
            use_system_roots: s.use_system_roots,
            ca_files: s.ca_files.clone(),
            nameservers: s
                .nameservers
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            domains: s
                .domains
                .iter()
                .map(|(d, p)| {
                    (
                        d.clone(),
                        confab_federation::DomainPolicy {
                            require_encryption: p.require_encryption,
                            allow_dialback: p.allow_dialback,
                        },
                    )
                })
                .collect(),
            dialback_secret: secret,
        })
    }
}

/// A 32-byte random secret kept in `path` (mode 0600).
fn load_or_create_secret(path: &Path) -> std::io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() >= 16 => return Ok(bytes),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    use rand::RngCore;
    let mut secret = vec![0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    let mut f = options.open(path)?;
    f.write_all(&secret)?;
    f.sync_all()?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse_str("").unwrap();
        assert_eq!(c.domains, vec!["localhost"]);
        assert!(c.c2s.require_encryption);
        assert_eq!(c.limits.max_stanza_size, 262_144);
    }

    #[test]
    fn direct_tls_follows_the_configured_listen_address() {
        // Neither set: the documented wildcard defaults, nothing derived.
        let c = Config::parse_str("").unwrap();
        assert_eq!(c.c2s.tls_listen, ["[::]:5223"]);
        assert_eq!(c.s2s.tls_listen, ["[::]:5270"]);
        assert!(c.derived.is_empty());
        // listen set, tls_listen not: same addresses at the direct-TLS port.
        let c = Config::parse_str(
            "[c2s]\nlisten = [\"127.0.0.2:15222\", \"[::1]:15222\"]\n[s2s]\nlisten = [\"127.0.0.2:0\"]\n",
        )
        .unwrap();
        assert_eq!(c.c2s.tls_listen, ["127.0.0.2:5223", "[::1]:5223"]);
        assert_eq!(c.s2s.tls_listen, ["127.0.0.2:0"]);
        assert_eq!(c.derived.len(), 2, "{:?}", c.derived);
        assert!(c.derived[0].contains("127.0.0.2:5223"), "{:?}", c.derived);
        // Both set: the operator's choice, including none at all.
        let c =
            Config::parse_str("[c2s]\nlisten = [\"127.0.0.2:5222\"]\ntls_listen = []\n").unwrap();
        assert!(c.c2s.tls_listen.is_empty());
        assert_eq!(c.s2s.tls_listen, ["[::]:5270"]);
        assert!(c.derived.is_empty());
        // An empty listen derives no direct-TLS listener either.
        let c = Config::parse_str("[c2s]\nlisten = []\n").unwrap();
        assert!(c.c2s.tls_listen.is_empty());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse_str("domains = [\"a.example\"]\n\n[c2s]\nlisten_typo = []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_typo"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn domains_are_prepared_and_checked() {
        let c = Config::parse_str("domains = [\"Example.ORG\"]").unwrap();
        assert_eq!(c.domains, vec!["example.org"]);
        assert!(Config::parse_str("domains = []").is_err());
        assert!(Config::parse_str("domains = [\"a@b\"]").is_err());
        assert!(Config::parse_str("domains = [\"a.org\", \"A.org\"]").is_err());
    }

    #[test]
    fn tls_for_unknown_domain_is_refused() {
        let err = Config::parse_str(
            "domains = [\"a.org\"]\n[tls.\"b.org\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("b.org"), "{err}");
    }

    #[test]
    fn bad_listen_address_is_refused() {
        assert!(Config::parse_str("[c2s]\nlisten = [\"localhost\"]").is_err());
        assert!(Config::parse_str("[metrics]\nlisten = [\"localhost\"]").is_err());
    }

    #[test]
    fn operations_settings() {
        let c = Config::parse_str("").unwrap();
        assert_eq!(c.log_format, LogFormat::Human);
        assert!(c.metrics.listen.is_empty());
        assert_eq!(c.limits.auth_failures_per_minute, 10);
        let c = Config::parse_str(
            "log_format = \"json\"\n[metrics]\nlisten = [\"127.0.0.1:9142\"]\n[limits]\nauth_failures_per_minute = 0\n",
        )
        .unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.metrics.listen, ["127.0.0.1:9142"]);
        assert_eq!(c.limits.auth_failures_per_minute, 0);
        let err = Config::parse_str("log_format = \"xml\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
