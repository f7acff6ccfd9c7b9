//! TLS for client streams: one certificate per served domain, chosen by SNI.
//!
//! Domains without a configured certificate get a self-signed one, generated on first
//! start and kept in the data directory so clients that pinned it keep trusting it.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no certificate found in the PEM file")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key found in the PEM file")]
    NoKey { path: PathBuf },
    #[error("{path}: {message}")]
    BadKey { path: PathBuf, message: String },
    #[error("cannot generate a certificate for {domain}: {message}")]
    Generate { domain: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A loaded certificate with what channel binding needs to know about it.
#[derive(Debug)]
pub struct DomainCert {
    pub key: Arc<CertifiedKey>,
    /// RFC 5929 §4.1 `tls-server-end-point`: hash of the end-entity certificate with the
    /// hash of its signature algorithm (SHA-256 for MD5/SHA-1).
    pub end_point_hash: Vec<u8>,
}

/// Certificates for all served domains, selected by SNI.
#[derive(Debug)]
pub struct CertStore {
    by_domain: HashMap<String, Arc<DomainCert>>,
    default: Arc<DomainCert>,
}

impl CertStore {
    /// Loads configured certificates and generates missing ones.
    pub fn load(config: &Config) -> Result<CertStore, TlsError> {
        let mut by_domain = HashMap::new();
        for domain in &config.domains {
            let (cert_path, key_path) = match config.tls.get(domain) {
                Some(files) => (files.cert.clone(), files.key.clone()),
                None => {
                    let dir = config.cert_dir();
                    let cert = dir.join(format!("{domain}.crt"));
                    let key = dir.join(format!("{domain}.key"));
                    if !cert.exists() || !key.exists() {
                        generate_self_signed(domain, &cert, &key)?;
                        tracing::info!(%domain, path = %cert.display(), "generated a self-signed certificate");
                    }
                    (cert, key)
                }
            };
            let cert = load_domain_cert(&cert_path, &key_path)?;
            by_domain.insert(domain.clone(), Arc::new(cert));
        }
        let default = config
            .domains
            .first()
            .and_then(|d| by_domain.get(d))
            .cloned()
            .ok_or_else(|| TlsError::Generate {
                domain: String::new(),
                message: "no domain configured".into(),
            })?;
        Ok(CertStore { by_domain, default })
    }

    /// The certificate served for `sni` (falls back to the first domain).
    pub fn for_name(&self, sni: Option<&str>) -> Arc<DomainCert> {
        sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase())
            .and_then(|s| self.by_domain.get(&s).cloned())
            .unwrap_or_else(|| self.default.clone())
    }

    /// The certificate of exactly this domain, if served.
    pub fn get(&self, domain: &str) -> Option<Arc<DomainCert>> {
        self.by_domain.get(domain).cloned()
    }

    /// A certificate resolver by SNI over these certificates (for other listeners).
    pub fn resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(SniResolver(self.clone()))
    }

    /// A rustls server configuration serving these certificates.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(SniResolver(self.clone())));
        Ok(Arc::new(config))
    }
}

/// The certificates in use, replaceable while the server runs (`confab reload`):
/// connections already established keep theirs, new handshakes get the new ones.
#[derive(Debug)]
pub struct LiveCerts(std::sync::RwLock<Arc<CertStore>>);

impl LiveCerts {
    pub fn new(store: CertStore) -> Arc<LiveCerts> {
        Arc::new(LiveCerts(std::sync::RwLock::new(Arc::new(store))))
    }

    pub fn current(&self) -> Arc<CertStore> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, store: CertStore) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(store);
    }

    pub fn get(&self, domain: &str) -> Option<Arc<DomainCert>> {
        self.current().get(domain)
    }

    pub fn for_name(&self, sni: Option<&str>) -> Arc<DomainCert> {
        self.current().for_name(sni)
    }

    /// A resolver by SNI that always serves the current certificates.
    pub fn resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(LiveResolver(self.clone()))
    }

    /// A rustls server configuration serving the current certificates.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(self.resolver());
        Ok(Arc::new(config))
    }
}

#[derive(Debug)]
struct LiveResolver(Arc<LiveCerts>);

impl ResolvesServerCert for LiveResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.for_name(hello.server_name()).key.clone())
    }
}

#[derive(Debug)]
struct SniResolver(Arc<CertStore>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.for_name(hello.server_name()).key.clone())
    }
}

/// Reads a PEM chain and key (Let's Encrypt `fullchain.pem` / `privkey.pem` work as is).
pub fn load_domain_cert(cert_path: &Path, key_path: &Path) -> Result<DomainCert, TlsError> {
    let cert_pem = fs::read(cert_path).map_err(|source| TlsError::Read {
        path: cert_path.to_path_buf(),
        source,
    })?;
    let key_pem = fs::read(key_path).map_err(|source| TlsError::Read {
        path: key_path.to_path_buf(),
        source,
    })?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: cert_path.to_path_buf(),
            source,
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    };
    let end_point_hash = end_point_hash(leaf.as_ref());
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: key_path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: key_path.to_path_buf(),
        })?;
    let signing_key = provider::sign::any_supported_type(&key).map_err(|e| TlsError::BadKey {
        path: key_path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(DomainCert {
        key: Arc::new(CertifiedKey::new(chain, signing_key)),
        end_point_hash,
    })
}

fn end_point_hash(der: &[u8]) -> Vec<u8> {
    // RFC 5929 §4.1: use the certificate's signature hash, but SHA-256 if that is MD5 or SHA-1.
    let oid = x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.signature_algorithm.algorithm.to_id_string());
    match oid.as_deref() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        Some("1.2.840.113549.1.1.12") | Some("1.2.840.10045.4.3.3") => {
            sha2::Sha384::digest(der).to_vec()
        }
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        Some("1.2.840.113549.1.1.13") | Some("1.2.840.10045.4.3.4") => {
            sha2::Sha512::digest(der).to_vec()
        }
        _ => sha2::Sha256::digest(der).to_vec(),
    }
}

/// Writes a self-signed certificate and key (mode 0600) for `domain`.
pub fn generate_self_signed(
    domain: &str,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), TlsError> {
    let err = |message: String| TlsError::Generate {
        domain: domain.to_string(),
        message,
    };
    let mut params =
        rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(|e| err(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, domain);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let key = rcgen::KeyPair::generate().map_err(|e| err(e.to_string()))?;
    let cert = params.self_signed(&key).map_err(|e| err(e.to_string()))?;
    if let Some(dir) = cert_path.parent() {
        fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    write_private(key_path, key.serialize_pem().as_bytes())?;
    fs::write(cert_path, cert.pem()).map_err(|source| TlsError::Write {
        path: cert_path.to_path_buf(),
        source,
    })?;
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    let wrap = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(wrap)?;
    file.write_all(data).map_err(wrap)?;
    file.sync_all().map_err(wrap)
}
