//! Certificate verification for server-to-server links.
//!
//! On s2s, a bad certificate is not a reason to drop the TCP connection: RFC 6120 §13.7.2
//! and XEP-0178 §3 let a server that cannot authenticate its peer by certificate fall back
//! to Server Dialback (XEP-0220) if its policy allows. So the TLS handshake never fails on
//! the *trust decision* (chain or name); it still fails on a bad handshake signature, which
//! would mean the peer does not hold the key of the certificate it presents. The trust
//! decision is taken afterwards by [`check_peer_cert`], once we know which domain the peer
//! has to prove (its stream header's `from` for incoming streams, the domain we dialled for
//! outgoing ones).
//!
//! Name matching is RFC 6125 DNS-ID matching done by webpki (subjectAltName dNSName,
//! wildcards only as the whole left-most label); the subject CN is never consulted.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// Why trust anchors could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A configured CA file could not be read.
    #[error("cannot read CA file {path}: {source}")]
    ReadCaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A configured CA file is not valid PEM.
    #[error("CA file {path}: {message}")]
    BadCaFile { path: PathBuf, message: String },
    /// A configured CA file holds no `CERTIFICATE` block.
    #[error("CA file {path}: no certificate found in the PEM file")]
    NoCertificate { path: PathBuf },
    /// A certificate given as trust anchor cannot be used as one.
    #[error("{origin}: unusable CA certificate: {message}")]
    BadCaCertificate { origin: String, message: String },
}

/// Trust anchors for peer certificates: system roots (rustls-native-certs) unless disabled,
/// plus extra PEM CA files.
#[derive(Clone)]
pub struct TrustAnchors {
    roots: Arc<RootCertStore>,
    /// Signature algorithms for chains and handshake signatures (the ring provider's).
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl TrustAnchors {
    /// Loads the system roots (when `use_system_roots`) and every certificate of every file
    /// in `ca_files`. A missing or unusable CA file is an error naming the file; finding no
    /// system roots is not (a server federating only within a private CA needs none).
    pub fn load(use_system_roots: bool, ca_files: &[PathBuf]) -> Result<TrustAnchors, VerifyError> {
        let mut roots = RootCertStore::empty();
        if use_system_roots {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(%error, "while loading the system's trusted CA certificates");
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            if ignored > 0 {
                tracing::debug!(
                    ignored,
                    "system CA certificates that cannot be trust anchors"
                );
            }
            if added == 0 {
                tracing::warn!(
                    "no system CA certificates found; only configured CA files are trusted for s2s"
                );
            }
        }
        for path in ca_files {
            for cert in read_pem_certs(path)? {
                roots.add(cert).map_err(|e| VerifyError::BadCaCertificate {
                    origin: path.display().to_string(),
                    message: e.to_string(),
                })?;
            }
        }
        Ok(Self::from_root_store(roots))
    }

    /// Trust anchors from DER certificates (tests and callers that hold CA certificates in
    /// memory), without system roots.
    pub fn from_der(
        certs: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<TrustAnchors, VerifyError> {
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| VerifyError::BadCaCertificate {
                origin: "in-memory certificate".into(),
                message: e.to_string(),
            })?;
        }
        Ok(Self::from_root_store(roots))
    }

    /// Trust anchors from an already built root store.
    pub fn from_root_store(roots: RootCertStore) -> TrustAnchors {
        TrustAnchors {
            roots: Arc::new(roots),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    /// The anchors as a rustls root store.
    pub fn root_store(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// Number of trust anchors (for `confab check certs` and logs).
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// True when nothing is trusted: every peer certificate is then `UntrustedIssuer`.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, VerifyError> {
    let data = std::fs::read(path).map_err(|source| VerifyError::ReadCaFile {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| VerifyError::BadCaFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(VerifyError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Outcome of checking a peer certificate chain for a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertStatus {
    /// Chains to a trusted root, usable for s2s, and names the domain.
    Valid,
    /// The chain is fine but the certificate does not name the domain.
    NameMismatch,
    /// The certificate (or one in its chain) is past its notAfter.
    Expired,
    /// The certificate (or one in its chain) is before its notBefore.
    NotYetValid,
    /// No path to a trusted root (self-signed, private CA we do not trust, missing intermediate).
    UntrustedIssuer,
    /// Anything else wrong with the chain or the domain, with webpki's reason.
    Invalid(String),
    /// The peer presented no certificate.
    Missing,
}

impl CertStatus {
    /// Whether the certificate authenticates the domain (SASL EXTERNAL may be offered).
    pub fn is_valid(&self) -> bool {
        matches!(self, CertStatus::Valid)
    }
}

// id-kp-serverAuth (1.3.6.1.5.5.7.3.1) and id-kp-clientAuth (1.3.6.1.5.5.7.3.2), DER content.
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 1];
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 2];

/// EKU policy for s2s: serverAuth or clientAuth. XEP-0178 peers present their server
/// certificate as a TLS client, and public CAs are dropping clientAuth from server
/// certificates, so either purpose must do (RFC 5280 §4.2.1.12: no EKU extension means
/// any purpose).
struct ServerOrClientAuth;

impl webpki::ExtendedKeyUsageValidator for ServerOrClientAuth {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let wanted = [
            webpki::KeyPurposeId::new(EKU_SERVER_AUTH),
            webpki::KeyPurposeId::new(EKU_CLIENT_AUTH),
        ];
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            if wanted.contains(&id) {
                return Ok(());
            }
            present.push(id.to_decoded_oid());
        }
        if present.is_empty() {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext {
                required: webpki::KeyUsage::server_auth(),
                present,
            },
        ))
    }
}

/// Checks an end-entity certificate (`chain[0]`) and its intermediates (`chain[1..]`)
/// against the anchors for `domain` at `now`: a path to a trusted root (webpki), an EKU
/// allowing serverAuth or clientAuth, and an RFC 6125 DNS-ID for `domain` (webpki's name
/// matching, wildcards included; never the subject CN).
///
/// `domain` may be given in Unicode (an XMPP domainpart); it is converted to A-labels
/// before matching, as certificates carry A-labels.
pub fn check_peer_cert(
    anchors: &TrustAnchors,
    chain: &[CertificateDer<'_>],
    domain: &str,
    now: UnixTime,
) -> CertStatus {
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return CertStatus::Missing;
    };
    let cert = match webpki::EndEntityCert::try_from(end_entity) {
        Ok(cert) => cert,
        Err(e) => return CertStatus::Invalid(format!("malformed certificate: {e}")),
    };
    if let Err(e) = cert.verify_for_usage(
        anchors.algorithms.all,
        &anchors.roots.roots,
        intermediates,
        now,
        ServerOrClientAuth,
        None,
        None,
    ) {
        return match e {
            webpki::Error::CertExpired { .. } => CertStatus::Expired,
            webpki::Error::CertNotValidYet { .. } => CertStatus::NotYetValid,
            webpki::Error::UnknownIssuer => CertStatus::UntrustedIssuer,
            webpki::Error::RequiredEkuNotFoundContext(_) => CertStatus::Invalid(
                "extended key usage allows neither serverAuth nor clientAuth".into(),
            ),
            other => CertStatus::Invalid(format!("{other}")),
        };
    }
    let name = match reference_name(domain) {
        Ok(name) => name,
        Err(message) => return CertStatus::Invalid(message),
    };
    match cert.verify_is_valid_for_subject_name(&name) {
        Ok(()) => CertStatus::Valid,
        Err(webpki::Error::CertNotValidForName(_)) => CertStatus::NameMismatch,
        Err(other) => CertStatus::Invalid(format!("{other}")),
    }
}

/// The reference identifier for `domain` (RFC 6125 §6.2.1: A-labels, no trailing dot).
fn reference_name(domain: &str) -> Result<ServerName<'static>, String> {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let ascii = if domain.is_ascii() {
        domain.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(domain)
            .map_err(|_| format!("{domain:?} is not a valid internationalized domain name"))?
    };
    ServerName::try_from(ascii).map_err(|_| format!("{domain:?} is not a valid domain name"))
}

/// Server certificate verifier for outgoing s2s: handshake signatures are verified for
/// real, the trust decision is deferred to [`check_peer_cert`] (see the module docs).
struct DeferredServerCertVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for DeferredServerCertVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeferredServerCertVerifier")
    }
}

impl ServerCertVerifier for DeferredServerCertVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Deferred: the caller runs check_peer_cert on peer_certificates() and picks
        // SASL EXTERNAL or dialback from the verdict (XEP-0178 §3, XEP-0220 §2).
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client certificate offered on outgoing links (for the peer's SASL EXTERNAL), or
/// none.
pub struct ClientCert(pub Option<Arc<rustls::sign::CertifiedKey>>);

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientCert")
    }
}

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.clone()
    }
    fn has_certs(&self) -> bool {
        self.0.is_some()
    }
}

/// rustls `ClientConfig` for outgoing s2s connections. The handshake does not fail on an
/// untrusted or misnamed server certificate (we may fall back to dialback); get the verdict
/// afterwards with [`check_peer_cert`] on `conn.peer_certificates()`. Our own certificate
/// is offered as client certificate through `client_cert`, so that the peer can
/// authenticate us with SASL EXTERNAL (XEP-0178 §3).
pub fn client_config(
    anchors: &TrustAnchors,
    client_cert: Arc<dyn rustls::client::ResolvesClientCert>,
) -> Arc<rustls::ClientConfig> {
    let verifier = Arc::new(DeferredServerCertVerifier {
        algorithms: anchors.algorithms,
    });
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(client_cert);
    Arc::new(config)
}

/// Client certificate verifier for incoming s2s: asks for a certificate without requiring
/// one, accepts any chain at handshake time and verifies handshake signatures for real.
struct DeferredClientCertVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for DeferredClientCertVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeferredClientCertVerifier")
    }
}

impl ClientCertVerifier for DeferredClientCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // A peer without a certificate may still authenticate with dialback.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // An empty list lets the peer send whatever certificate it has; with system roots
        // the full list would bloat every CertificateRequest by kilobytes.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deferred until the stream header tells us which domain the peer claims.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A rustls client certificate verifier for incoming s2s connections: requests a client
/// certificate without requiring one and accepts any chain at handshake time; verify it
/// afterwards with [`check_peer_cert`] against the domain the peer claims in its stream
/// header. Handshake signatures are verified for real.
pub fn incoming_client_verifier(
    anchors: &TrustAnchors,
) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
    Arc::new(DeferredClientCertVerifier {
        algorithms: anchors.algorithms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    use rustls::sign::CertifiedKey;
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn intermediate(name: &str, issuer: &Ca) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer.cert, &issuer.key).unwrap();
        Ca { cert, key }
    }

    struct Leaf {
        cert: CertificateDer<'static>,
        key: KeyPair,
    }

    fn leaf_with(names: &[&str], issuer: &Ca, edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        // A CN that names the domain must not make a mismatched SAN pass.
        params
            .distinguished_name
            .push(DnType::CommonName, "cn-only.test");
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer.cert, &issuer.key).unwrap();
        Leaf {
            cert: cert.der().clone(),
            key,
        }
    }

    fn leaf(names: &[&str], issuer: &Ca) -> Leaf {
        leaf_with(names, issuer, |_| {})
    }

    fn anchors(ca: &Ca) -> TrustAnchors {
        TrustAnchors::from_der([ca.cert.der().clone()]).unwrap()
    }

    fn check(anchors: &TrustAnchors, chain: &[CertificateDer<'_>], domain: &str) -> CertStatus {
        check_peer_cert(anchors, chain, domain, UnixTime::now())
    }

    #[test]
    fn valid_chain_and_name() {
        let ca = ca("Test CA");
        let leaf = leaf(&["a.test"], &ca);
        assert_eq!(
            check(&anchors(&ca), std::slice::from_ref(&leaf.cert), "a.test"),
            CertStatus::Valid
        );
        // Reference identifiers compare case-insensitively and ignore a trailing dot.
        assert_eq!(
            check(&anchors(&ca), std::slice::from_ref(&leaf.cert), "A.Test."),
            CertStatus::Valid
        );
    }

    #[test]
    fn wildcard_matches_one_label_only() {
        let ca = ca("Test CA");
        let a = anchors(&ca);
        let leaf = leaf(&["*.a.test"], &ca);
        let chain = [leaf.cert];
        assert_eq!(check(&a, &chain, "x.a.test"), CertStatus::Valid);
        assert_eq!(check(&a, &chain, "a.test"), CertStatus::NameMismatch);
        assert_eq!(check(&a, &chain, "y.x.a.test"), CertStatus::NameMismatch);
    }

    #[test]
    fn wrong_name_is_a_mismatch_and_cn_is_ignored() {
        let ca = ca("Test CA");
        let a = anchors(&ca);
        let leaf = leaf(&["a.test"], &ca);
        assert_eq!(
            check(&a, std::slice::from_ref(&leaf.cert), "b.test"),
            CertStatus::NameMismatch
        );
        assert_eq!(
            check(&a, std::slice::from_ref(&leaf.cert), "cn-only.test"),
            CertStatus::NameMismatch
        );
        // Substrings and suffixes of the DNS-ID are not matches.
        assert_eq!(
            check(&a, std::slice::from_ref(&leaf.cert), "test"),
            CertStatus::NameMismatch
        );
        assert_eq!(check(&a, &[leaf.cert], "xa.test"), CertStatus::NameMismatch);
    }

    #[test]
    fn internationalized_domain_is_matched_as_a_label() {
        let ca = ca("Test CA");
        // "bücher.test" in A-labels.
        let leaf = leaf(&["xn--bcher-kva.test"], &ca);
        assert_eq!(
            check(&anchors(&ca), &[leaf.cert], "bücher.test"),
            CertStatus::Valid
        );
    }

    #[test]
    fn untrusted_issuer() {
        let trusted = ca("Trusted CA");
        let other = ca("Other CA");
        let leaf = leaf(&["a.test"], &other);
        assert_eq!(
            check(&anchors(&trusted), &[leaf.cert], "a.test"),
            CertStatus::UntrustedIssuer
        );
    }

    #[test]
    fn self_signed_is_untrusted() {
        let ca = ca("Test CA");
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            check(&anchors(&ca), &[cert.der().clone()], "a.test"),
            CertStatus::UntrustedIssuer
        );
    }

    #[test]
    fn no_anchors_trusts_nothing() {
        let ca = ca("Test CA");
        let leaf = leaf(&["a.test"], &ca);
        let none = TrustAnchors::load(false, &[]).unwrap();
        assert!(none.is_empty());
        assert_eq!(
            check(&none, &[leaf.cert], "a.test"),
            CertStatus::UntrustedIssuer
        );
    }

    #[test]
    fn expired() {
        let ca = ca("Test CA");
        let leaf = leaf_with(&["a.test"], &ca, |p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        });
        assert_eq!(
            check(&anchors(&ca), &[leaf.cert], "a.test"),
            CertStatus::Expired
        );
    }

    #[test]
    fn not_yet_valid() {
        let ca = ca("Test CA");
        let leaf = leaf_with(&["a.test"], &ca, |p| {
            p.not_before = rcgen::date_time_ymd(2999, 1, 1);
            p.not_after = rcgen::date_time_ymd(3000, 1, 1);
        });
        assert_eq!(
            check(&anchors(&ca), &[leaf.cert], "a.test"),
            CertStatus::NotYetValid
        );
    }

    #[test]
    fn validity_is_judged_at_the_given_time() {
        let ca = ca("Test CA");
        let leaf = leaf_with(&["a.test"], &ca, |p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        });
        // 2000-07-01T00:00:00Z
        let then = UnixTime::since_unix_epoch(std::time::Duration::from_secs(962_409_600));
        assert_eq!(
            check_peer_cert(&anchors(&ca), &[leaf.cert], "a.test", then),
            CertStatus::Valid
        );
    }

    #[test]
    fn server_auth_only_eku_accepted() {
        let ca = ca("Test CA");
        let leaf = leaf_with(&["a.test"], &ca, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        });
        assert_eq!(
            check(&anchors(&ca), &[leaf.cert], "a.test"),
            CertStatus::Valid
        );
    }

    #[test]
    fn client_auth_only_eku_accepted() {
        let ca = ca("Test CA");
        let leaf = leaf_with(&["a.test"], &ca, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        });
        assert_eq!(
            check(&anchors(&ca), &[leaf.cert], "a.test"),
            CertStatus::Valid
        );
    }

    #[test]
    fn both_ekus_accepted() {
        let ca = ca("Test CA");
        let leaf = leaf_with(&["a.test"], &ca, |p| {
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::CodeSigning,
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ];
        });
        assert_eq!(
            check(&anchors(&ca), &[leaf.cert], "a.test"),
            CertStatus::Valid
        );
    }

    #[test]
    fn code_signing_only_eku_refused() {
        let ca = ca("Test CA");
        let leaf = leaf_with(&["a.test"], &ca, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        });
        let status = check(&anchors(&ca), &[leaf.cert], "a.test");
        assert_eq!(
            status,
            CertStatus::Invalid(
                "extended key usage allows neither serverAuth nor clientAuth".into()
            )
        );
    }

    #[test]
    fn empty_chain_is_missing() {
        let ca = ca("Test CA");
        assert_eq!(check(&anchors(&ca), &[], "a.test"), CertStatus::Missing);
    }

    #[test]
    fn garbage_certificate_is_invalid() {
        let ca = ca("Test CA");
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let status = check(&anchors(&ca), &[junk], "a.test");
        assert!(matches!(status, CertStatus::Invalid(_)), "{status:?}");
    }

    #[test]
    fn bad_domain_is_invalid_not_a_panic() {
        let ca = ca("Test CA");
        let leaf = leaf(&["a.test"], &ca);
        for domain in ["", "a..test", "a test", "*.a.test"] {
            let status = check(&anchors(&ca), std::slice::from_ref(&leaf.cert), domain);
            assert_ne!(status, CertStatus::Valid, "{domain:?}");
        }
    }

    #[test]
    fn intermediates_supported() {
        let root = ca("Root CA");
        let inter = intermediate("Intermediate CA", &root);
        let leaf = leaf(&["a.test"], &inter);
        let a = anchors(&root);
        let chain = [leaf.cert.clone(), inter.cert.der().clone()];
        assert_eq!(check(&a, &chain, "a.test"), CertStatus::Valid);
        // Without the intermediate there is no path to the root.
        assert_eq!(
            check(&a, &chain[..1], "a.test"),
            CertStatus::UntrustedIssuer
        );
    }

    #[test]
    fn ca_files_are_loaded_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!(
            "confab-verify-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let root = ca("File CA");
        let good = dir.join("ca.pem");
        std::fs::write(&good, root.cert.pem()).unwrap();
        let anchors = TrustAnchors::load(false, std::slice::from_ref(&good)).unwrap();
        assert_eq!(anchors.len(), 1);
        assert_eq!(anchors.root_store().len(), 1);
        let leaf = leaf(&["a.test"], &root);
        assert_eq!(check(&anchors, &[leaf.cert], "a.test"), CertStatus::Valid);

        let missing = dir.join("missing.pem");
        let err = TrustAnchors::load(false, &[good.clone(), missing.clone()]).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = TrustAnchors::load(false, &[empty]).unwrap_err();
        assert!(matches!(err, VerifyError::NoCertificate { .. }), "{err:?}");
        assert!(err.to_string().contains("empty.pem"), "{err}");

        let bad = dir.join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = TrustAnchors::load(false, &[bad]).unwrap_err();
        assert!(err.to_string().contains("bad.pem"), "{err}");

        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn system_roots_load_without_error() {
        // Whatever the machine has (possibly nothing), loading must not fail.
        TrustAnchors::load(true, &[]).unwrap();
    }

    // End-to-end handshakes.

    #[derive(Debug)]
    struct FixedClientCert(Arc<CertifiedKey>);

    impl rustls::client::ResolvesClientCert for FixedClientCert {
        fn resolve(
            &self,
            _root_hint_subjects: &[&[u8]],
            _sigschemes: &[SignatureScheme],
        ) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }

        fn has_certs(&self) -> bool {
            true
        }
    }

    #[derive(Debug)]
    struct FixedServerCert(Arc<CertifiedKey>);

    impl rustls::server::ResolvesServerCert for FixedServerCert {
        fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    fn certified_key(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> Arc<CertifiedKey> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
        Arc::new(CertifiedKey::new(chain, signer))
    }

    fn server_config(
        anchors: &TrustAnchors,
        cert: Arc<CertifiedKey>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ServerConfig> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_client_cert_verifier(incoming_client_verifier(anchors))
            .with_cert_resolver(Arc::new(FixedServerCert(cert)));
        Arc::new(config)
    }

    type Handshake = (
        std::io::Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>>,
        std::io::Result<tokio_rustls::server::TlsStream<tokio::io::DuplexStream>>,
    );

    async fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
        server_name: &str,
    ) -> Handshake {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from(server_name.to_string()).unwrap();
        let connector = tokio_rustls::TlsConnector::from(client);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let run = async { tokio::join!(connector.connect(name, c), acceptor.accept(s)) };
        tokio::time::timeout(std::time::Duration::from_secs(10), run)
            .await
            .expect("handshake timed out")
    }

    /// a.test (outgoing, its certificate from the shared CA) connects to b.test, whose
    /// certificate is self-signed and so untrusted by a.test.
    async fn untrusted_server_handshake(versions: &[&'static rustls::SupportedProtocolVersion]) {
        let ca = ca("Federation CA");
        let anchors = anchors(&ca);
        let client_leaf = leaf(&["a.test"], &ca);
        let server_key = KeyPair::generate().unwrap();
        let server_cert = CertificateParams::new(vec!["b.test".to_string()])
            .unwrap()
            .self_signed(&server_key)
            .unwrap();

        let client = client_config(
            &anchors,
            Arc::new(FixedClientCert(certified_key(
                vec![client_leaf.cert.clone()],
                &client_leaf.key,
            ))),
        );
        let server = server_config(
            &anchors,
            certified_key(vec![server_cert.der().clone()], &server_key),
            versions,
        );
        let (c, s) = handshake(client, server, "b.test").await;
        let c = c.expect("client handshake");
        let s = s.expect("server handshake");

        let seen_by_client = c
            .get_ref()
            .1
            .peer_certificates()
            .expect("server certificate");
        assert_eq!(seen_by_client, &[server_cert.der().clone()]);
        assert_eq!(
            check_peer_cert(&anchors, seen_by_client, "b.test", UnixTime::now()),
            CertStatus::UntrustedIssuer
        );

        let seen_by_server = s
            .get_ref()
            .1
            .peer_certificates()
            .expect("client certificate");
        assert_eq!(seen_by_server, std::slice::from_ref(&client_leaf.cert));
        assert_eq!(
            check_peer_cert(&anchors, seen_by_server, "a.test", UnixTime::now()),
            CertStatus::Valid
        );
        assert_eq!(
            check_peer_cert(&anchors, seen_by_server, "evil.test", UnixTime::now()),
            CertStatus::NameMismatch
        );
    }

    #[tokio::test]
    async fn handshake_tls13_succeeds_with_untrusted_server_cert() {
        untrusted_server_handshake(&[&rustls::version::TLS13]).await;
    }

    #[tokio::test]
    async fn handshake_tls12_succeeds_with_untrusted_server_cert() {
        untrusted_server_handshake(&[&rustls::version::TLS12]).await;
    }

    #[tokio::test]
    async fn handshake_without_client_cert_is_allowed() {
        #[derive(Debug)]
        struct NoClientCert;
        impl rustls::client::ResolvesClientCert for NoClientCert {
            fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
                None
            }
            fn has_certs(&self) -> bool {
                false
            }
        }
        let ca = ca("Federation CA");
        let anchors = anchors(&ca);
        let server_leaf = leaf(&["b.test"], &ca);
        let client = client_config(&anchors, Arc::new(NoClientCert));
        let server = server_config(
            &anchors,
            certified_key(vec![server_leaf.cert.clone()], &server_leaf.key),
            rustls::DEFAULT_VERSIONS,
        );
        let (c, s) = handshake(client, server, "b.test").await;
        let c = c.expect("client handshake");
        let s = s.expect("server handshake");
        let seen = c.get_ref().1.peer_certificates().unwrap();
        assert_eq!(
            check_peer_cert(&anchors, seen, "b.test", UnixTime::now()),
            CertStatus::Valid
        );
        assert_eq!(
            check_peer_cert(
                &anchors,
                s.get_ref().1.peer_certificates().unwrap_or(&[]),
                "a.test",
                UnixTime::now()
            ),
            CertStatus::Missing
        );
    }

    /// A server presenting a certificate whose key it does not hold must fail the
    /// handshake: only the trust decision is deferred, not the signature check.
    #[tokio::test]
    async fn server_without_the_certificate_key_fails_the_handshake() {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let ca = ca("Federation CA");
            let anchors = anchors(&ca);
            let server_leaf = leaf(&["b.test"], &ca);
            let wrong_key = KeyPair::generate().unwrap();
            let client_leaf = leaf(&["a.test"], &ca);
            let client = client_config(
                &anchors,
                Arc::new(FixedClientCert(certified_key(
                    vec![client_leaf.cert],
                    &client_leaf.key,
                ))),
            );
            let server = server_config(
                &anchors,
                certified_key(vec![server_leaf.cert], &wrong_key),
                versions,
            );
            let (c, _s) = handshake(client, server, "b.test").await;
            let err = c.expect_err("client accepted a bad server signature");
            assert!(err.to_string().contains("BadSignature"), "{err}");
        }
    }

    /// Likewise for a client certificate presented without its key.
    #[tokio::test]
    async fn client_without_the_certificate_key_fails_the_handshake() {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let ca = ca("Federation CA");
            let anchors = anchors(&ca);
            let server_leaf = leaf(&["b.test"], &ca);
            let client_leaf = leaf(&["a.test"], &ca);
            let wrong_key = KeyPair::generate().unwrap();
            let client = client_config(
                &anchors,
                Arc::new(FixedClientCert(certified_key(
                    vec![client_leaf.cert],
                    &wrong_key,
                ))),
            );
            let server = server_config(
                &anchors,
                certified_key(vec![server_leaf.cert], &server_leaf.key),
                versions,
            );
            let (_c, s) = handshake(client, server, "b.test").await;
            let err = s.expect_err("server accepted a bad client signature");
            assert!(err.to_string().contains("BadSignature"), "{err}");
        }
    }
}
