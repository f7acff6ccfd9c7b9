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
    pub c2s: C2sConfig,
    pub auth: AuthConfig,
    pub limits: Limits,
    /// Certificate and key per domain; domains without an entry get a self-signed
    /// certificate generated into `data_dir/certs/` on first start.
    pub tls: BTreeMap<String, TlsFiles>,
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
    /// Stanzas queued for one session before it is considered a slow reader and disconnected.
    pub session_queue: usize,
    /// Messages kept in one account's offline store.
    pub max_offline_messages: usize,
    /// Seconds a new connection may take to authenticate and bind.
    pub login_timeout_secs: u64,
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
            c2s: C2sConfig::default(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            tls: BTreeMap::new(),
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
            session_queue: 1024,
            max_offline_messages: 1000,
            login_timeout_secs: 60,
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
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        config.normalize()?;
        Ok(config)
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
        for addr in self.c2s.listen.iter().chain(&self.c2s.tls_listen) {
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
    }
}
