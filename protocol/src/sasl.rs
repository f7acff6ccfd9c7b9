//! SASL message handling for XMPP (RFC 6120 §6).
//!
//! * SCRAM-SHA-1, SCRAM-SHA-256 and SCRAM-SHA-512, each with and without
//!   channel binding ("-PLUS"): RFC 5802, RFC 7677, with the channel-binding
//!   types `tls-server-end-point` (RFC 5929) and `tls-exporter` (RFC 9266).
//! * PLAIN (RFC 4616) parsing, checked against the same stored SCRAM keys, so
//!   that only StoredKey/ServerKey are ever stored (no reversible passwords).
//!
//! Everything here is pure and sans-IO: the caller moves bytes between the
//! stream and these state machines, looks users up in storage, and asks the
//! TLS layer for channel-binding data. Every byte handed to the server side is
//! untrusted; parsing never panics and fails with a [`SaslError`] whose
//! [`SaslError::condition`] is the RFC 6120 §6.5 failure element name.
//!
//! Identity handling that is deliberately left to the caller:
//! * the username from [`ScramServer::client_first`] / [`parse_plain`] is only
//!   saslname-decoded; the caller prepares it as a JID localpart (nodeprep);
//! * an authzid, if present, must be refused (`invalid-authzid`) unless it
//!   equals the authenticated identity (RFC 6120 §6.4.6, DESIGN.md checklist).

use std::fmt;
use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use subtle::{Choice, ConstantTimeEq};

/// Largest SCRAM or PLAIN message (after XMPP base64 decoding) we accept. Real
/// messages are a few hundred bytes; the cap bounds work done for an attacker.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Smallest iteration count [`ScramKeys::generate`] accepts: RFC 7677 §4 asks
/// for at least 4096, and so does our security checklist.
pub const MIN_ITERATIONS: u32 = 4096;
/// Largest iteration count we derive with, so a hostile server (client side) or
/// a corrupt record (server side) cannot make us spin for hours.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// Length of salts we generate (RFC 5802 leaves it open; 16 bytes is the
/// usual choice and is what fake salts for unknown users look like too).
pub const SALT_LEN: usize = 16;
/// Random bytes in a nonce we generate (base64-encoded on the wire). The brief
/// asks for at least 18; RFC 5802 §5.1 only requires it to be unpredictable.
const NONCE_RANDOM_BYTES: usize = 24;
/// RFC 4616 §2 leaves lengths to the implementation; 255 bytes per field.
pub const PLAIN_FIELD_MAX: usize = 255;

/// The hash function underlying a SCRAM mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScramHash {
    /// SCRAM-SHA-1 (RFC 5802). Kept for old clients.
    Sha1,
    /// SCRAM-SHA-256 (RFC 7677).
    Sha256,
    /// SCRAM-SHA-512 (registered in the IANA SCRAM family, same construction).
    Sha512,
}

impl ScramHash {
    /// Every supported hash, weakest first.
    pub const ALL: [ScramHash; 3] = [ScramHash::Sha1, ScramHash::Sha256, ScramHash::Sha512];

    /// SASL mechanism name, e.g. `SCRAM-SHA-256-PLUS` when `plus`.
    pub fn mechanism(&self, plus: bool) -> &'static str {
        match (self, plus) {
            (ScramHash::Sha1, false) => "SCRAM-SHA-1",
            (ScramHash::Sha1, true) => "SCRAM-SHA-1-PLUS",
            (ScramHash::Sha256, false) => "SCRAM-SHA-256",
            (ScramHash::Sha256, true) => "SCRAM-SHA-256-PLUS",
            (ScramHash::Sha512, false) => "SCRAM-SHA-512",
            (ScramHash::Sha512, true) => "SCRAM-SHA-512-PLUS",
        }
    }

    /// Inverse of [`ScramHash::mechanism`]: `(hash, plus)`. Exact match only;
    /// SASL mechanism names are upper case (RFC 4422 §3.1).
    pub fn from_mechanism(name: &str) -> Option<(ScramHash, bool)> {
        ScramHash::ALL.into_iter().find_map(|h| {
            if name == h.mechanism(false) {
                Some((h, false))
            } else if name == h.mechanism(true) {
                Some((h, true))
            } else {
                None
            }
        })
    }

    /// Stable name for storage: `SHA-1`, `SHA-256`, `SHA-512`.
    pub fn name(&self) -> &'static str {
        match self {
            ScramHash::Sha1 => "SHA-1",
            ScramHash::Sha256 => "SHA-256",
            ScramHash::Sha512 => "SHA-512",
        }
    }

    /// Inverse of [`ScramHash::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        ScramHash::ALL.into_iter().find(|h| h.name() == name)
    }

    /// Output length of H() and HMAC() in bytes.
    pub fn output_len(&self) -> usize {
        match self {
            ScramHash::Sha1 => 20,
            ScramHash::Sha256 => 32,
            ScramHash::Sha512 => 64,
        }
    }

    /// H(data), RFC 5802 §2.2.
    fn h(&self, data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => Sha1::digest(data).to_vec(),
            ScramHash::Sha256 => Sha256::digest(data).to_vec(),
            ScramHash::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    /// HMAC(key, data), RFC 5802 §2.2. HMAC accepts keys of any length, so
    /// the error branch cannot happen; it is mapped to a temporary failure
    /// rather than a panic all the same.
    fn hmac(&self, key: &[u8], data: &[u8]) -> Result<Vec<u8>, SaslError> {
        macro_rules! run {
            ($d:ty) => {{
                let mut mac = <Hmac<$d> as Mac>::new_from_slice(key)
                    .map_err(|_| SaslError::TemporaryAuthFailure)?;
                mac.update(data);
                Ok(mac.finalize().into_bytes().to_vec())
            }};
        }
        match self {
            ScramHash::Sha1 => run!(Sha1),
            ScramHash::Sha256 => run!(Sha256),
            ScramHash::Sha512 => run!(Sha512),
        }
    }

    /// Hi(str, salt, i), RFC 5802 §2.2: PBKDF2 with HMAC as the PRF and an
    /// output of exactly one hash length.
    fn hi(&self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut out = vec![0u8; self.output_len()];
        match self {
            ScramHash::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out),
            ScramHash::Sha256 => {
                pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out)
            }
            ScramHash::Sha512 => {
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out)
            }
        }
        out
    }
}

/// Why a SASL exchange failed. [`SaslError::condition`] gives the RFC 6120
/// §6.5 `<failure/>` child to send; the variants carry more detail for logs.
/// Note that a wrong password and an unknown user are both `NotAuthorized`.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SaslError {
    /// The message does not follow the mechanism's syntax.
    #[error("malformed SASL request: {0}")]
    MalformedRequest(&'static str),
    /// The XMPP-level base64 payload (RFC 6120 §6.4.2) is invalid.
    #[error("incorrect base64 encoding of the SASL payload")]
    IncorrectEncoding,
    /// The requested mechanism is not offered.
    #[error("invalid or unsupported SASL mechanism")]
    InvalidMechanism,
    /// The authzid is not acceptable (returned by callers; see module docs).
    #[error("invalid authorization identity")]
    InvalidAuthzid,
    /// Wrong password, unknown user, or bad proof — deliberately one variant.
    #[error("not authorized")]
    NotAuthorized,
    /// The client answered with a nonce other than the one we combined.
    #[error("nonce mismatch")]
    NonceMismatch,
    /// c= does not match the GS2 header and our channel-binding data.
    #[error("channel binding mismatch")]
    ChannelBindingMismatch,
    /// Client sent "y" although we offered -PLUS mechanisms: RFC 5802 §6
    /// says this indicates a downgrade attack and MUST fail.
    #[error("client claims no channel binding was offered (possible downgrade attack)")]
    Downgrade,
    /// "p=" with a mechanism without -PLUS (RFC 5802 §6).
    #[error("channel binding requested with a non-PLUS mechanism")]
    ChannelBindingNotSupported,
    /// A -PLUS mechanism was selected but the GS2 header is "n" or "y".
    #[error("a -PLUS mechanism requires channel binding")]
    ChannelBindingRequired,
    /// Unknown cb-name, or one the TLS layer has no data for.
    #[error("unsupported channel binding type")]
    UnsupportedChannelBinding,
    /// The "m=" mandatory extension (RFC 5802 §5.1 says it MUST fail).
    #[error("unsupported mandatory SCRAM extension")]
    UnsupportedExtension,
    /// The password fails SASLprep (RFC 4013), e.g. prohibited characters.
    #[error("password is not valid under SASLprep")]
    InvalidPassword,
    /// Iteration count outside the accepted range.
    #[error("invalid iteration count {0}")]
    InvalidIterations(u32),
    /// A step was called out of order or after the exchange ended.
    #[error("SASL step out of order")]
    OutOfOrder,
    /// Client side: the server sent "e=<value>" (RFC 5802 §7).
    #[error("server rejected authentication: {0}")]
    ServerError(String),
    /// Client side: the server signature does not verify.
    #[error("server signature mismatch")]
    ServerSignatureMismatch,
    /// A local failure unrelated to the client's input.
    #[error("temporary authentication failure")]
    TemporaryAuthFailure,
}

impl SaslError {
    /// RFC 6120 §6.5 failure condition element name.
    pub fn condition(&self) -> &'static str {
        match self {
            // A request the mechanism cannot take, the channel-binding type or flag
            // included: the client's choice, not its credentials (RFC 5802 §5.1, §6).
            SaslError::MalformedRequest(_)
            | SaslError::ChannelBindingRequired
            | SaslError::ChannelBindingNotSupported
            | SaslError::UnsupportedChannelBinding
            | SaslError::UnsupportedExtension
            | SaslError::InvalidPassword
            | SaslError::OutOfOrder => "malformed-request",
            SaslError::IncorrectEncoding => "incorrect-encoding",
            SaslError::InvalidMechanism => "invalid-mechanism",
            SaslError::InvalidAuthzid => "invalid-authzid",
            // RFC 5802 §6: "y" while we offer -PLUS MUST fail authentication.
            SaslError::NotAuthorized
            | SaslError::NonceMismatch
            | SaslError::ChannelBindingMismatch
            | SaslError::Downgrade
            | SaslError::ServerError(_)
            | SaslError::ServerSignatureMismatch => "not-authorized",
            SaslError::InvalidIterations(_) | SaslError::TemporaryAuthFailure => {
                "temporary-auth-failure"
            }
        }
    }
}

impl SaslError {
    /// Whether the failure tested the client's credentials (a proof, a password, data
    /// bound into the proof), as opposed to the mechanism, the channel-binding type or
    /// the message's syntax. Only the former count as a guess against login limits: a
    /// client that picked a binding we lack has guessed nothing and goes on to its next
    /// mechanism (RFC 6120 §6.4.5 lets it retry).
    pub fn is_credential_failure(&self) -> bool {
        matches!(
            self,
            SaslError::NotAuthorized
                | SaslError::NonceMismatch
                | SaslError::ChannelBindingMismatch
                | SaslError::InvalidPassword
        )
    }
}

/// What storage keeps for an account and mechanism (RFC 5802 §3, §9): never
/// the password, only the salt, iteration count, StoredKey and ServerKey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramKeys {
    pub hash: ScramHash,
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

/// Keys derived from SaltedPassword (RFC 5802 §3). The client needs
/// ClientKey to build its proof; the server only ever keeps the other two.
struct DerivedKeys {
    client_key: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

/// SaslPrep, Hi, then ClientKey, StoredKey and ServerKey (RFC 5802 §3).
fn derive_all(
    hash: ScramHash,
    password: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<DerivedKeys, SaslError> {
    if iterations == 0 || iterations > MAX_ITERATIONS {
        return Err(SaslError::InvalidIterations(iterations));
    }
    // RFC 5802 §2.2: Normalize(str) is SASLprep (RFC 4013).
    let prepared = stringprep::saslprep(password).map_err(|_| SaslError::InvalidPassword)?;
    let salted = hash.hi(prepared.as_bytes(), salt, iterations);
    let client_key = hash.hmac(&salted, b"Client Key")?;
    let stored_key = hash.h(&client_key);
    let server_key = hash.hmac(&salted, b"Server Key")?;
    Ok(DerivedKeys {
        client_key,
        stored_key,
        server_key,
    })
}

impl ScramKeys {
    /// SaslPrep(password), then SaltedPassword = Hi(password, salt, i),
    /// ClientKey, StoredKey = H(ClientKey) and ServerKey (RFC 5802 §3).
    /// Any iteration count in `1..=MAX_ITERATIONS` is accepted so that the
    /// RFC test vectors can be reproduced; use [`ScramKeys::generate`] for
    /// new accounts.
    pub fn derive(
        hash: ScramHash,
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Result<ScramKeys, SaslError> {
        let derived = derive_all(hash, password, salt, iterations)?;
        Ok(ScramKeys {
            hash,
            salt: salt.to_vec(),
            iterations,
            stored_key: derived.stored_key,
            server_key: derived.server_key,
        })
    }

    /// Keys for a new password with a fresh random salt of [`SALT_LEN`]
    /// bytes. Requires at least [`MIN_ITERATIONS`] (RFC 7677 §4).
    pub fn generate(
        hash: ScramHash,
        password: &str,
        iterations: u32,
    ) -> Result<ScramKeys, SaslError> {
        if iterations < MIN_ITERATIONS {
            return Err(SaslError::InvalidIterations(iterations));
        }
        let mut salt = [0u8; SALT_LEN];
        rand::thread_rng().fill_bytes(&mut salt);
        ScramKeys::derive(hash, password, &salt, iterations)
    }
}

/// Checks a password (e.g. from PLAIN) against stored keys: derives
/// SaltedPassword with the stored salt and iteration count and compares the
/// resulting StoredKey in constant time. Any derivation failure is `false`.
pub fn verify_password(keys: &ScramKeys, password: &str) -> bool {
    match derive_all(keys.hash, password, &keys.salt, keys.iterations) {
        Ok(derived) => bool::from(derived.stored_key.ct_eq(&keys.stored_key)),
        Err(_) => false,
    }
}

/// Channel-binding data the server's TLS layer provides for this connection.
/// `None` means "not available" (e.g. `tls-exporter` on TLS 1.2 without
/// extended master secret, RFC 9266 §3); such types are then refused.
#[derive(Clone, Debug, Default)]
pub struct ChannelBindings {
    /// RFC 9266: TLS exporter, label "EXPORTER-Channel-Binding", 32 bytes.
    pub tls_exporter: Option<Vec<u8>>,
    /// RFC 5929 §4: hash of the server's end-entity certificate.
    pub tls_server_end_point: Option<Vec<u8>>,
}

/// Result of parsing a client-first-message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientFirst {
    /// saslname-decoded (RFC 5802 §5.1: "=2C" → ',', "=3D" → '='), not yet
    /// prepared as a localpart.
    pub username: String,
    /// Requested authorization identity, decoded likewise; the caller must
    /// refuse it unless it equals the authenticated identity.
    pub authzid: Option<String>,
}

enum ServerState {
    AwaitClientFirst,
    AwaitLookup {
        gs2_header: String,
        client_first_bare: String,
        client_nonce: String,
        cb_data: Vec<u8>,
        username: String,
    },
    AwaitClientFinal {
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
        cb_data: Vec<u8>,
        keys: ScramKeys,
        known_user: bool,
    },
    Done,
    Failed,
}

impl ServerState {
    fn name(&self) -> &'static str {
        match self {
            ServerState::AwaitClientFirst => "await-client-first",
            ServerState::AwaitLookup { .. } => "await-lookup",
            ServerState::AwaitClientFinal { .. } => "await-client-final",
            ServerState::Done => "done",
            ServerState::Failed => "failed",
        }
    }
}

/// Server side of one SCRAM exchange. Call [`client_first`], look the user
/// up, call [`server_first`], then [`client_final`]. Any error poisons the
/// exchange: later calls fail with [`SaslError::OutOfOrder`].
///
/// [`client_first`]: ScramServer::client_first
/// [`server_first`]: ScramServer::server_first
/// [`client_final`]: ScramServer::client_final
pub struct ScramServer {
    hash: ScramHash,
    plus: bool,
    bindings: ChannelBindings,
    plus_advertised: bool,
    fixed_server_nonce: Option<String>,
    unknown_user_iterations: u32,
    state: ServerState,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No keys or nonces in logs.
        f.debug_struct("ScramServer")
            .field("mechanism", &self.hash.mechanism(self.plus))
            .field("plus_advertised", &self.plus_advertised)
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

/// How the client's GS2 header treats channel binding (RFC 5802 §7).
enum CbFlag<'a> {
    /// "n": client does not support channel binding.
    No,
    /// "y": client supports it but thinks the server does not.
    Yes,
    /// "p=<cb-name>": client uses channel binding of that type.
    Plus(&'a str),
}

impl ScramServer {
    /// `plus` selects the -PLUS variant; `bindings` is what TLS can give us;
    /// `plus_advertised` says whether any -PLUS mechanism was offered on this
    /// stream (needed to detect the "y" downgrade, RFC 5802 §6).
    pub fn new(
        hash: ScramHash,
        plus: bool,
        bindings: ChannelBindings,
        plus_advertised: bool,
    ) -> Self {
        ScramServer {
            hash,
            plus,
            bindings,
            plus_advertised,
            fixed_server_nonce: None,
            unknown_user_iterations: MIN_ITERATIONS,
            state: ServerState::AwaitClientFirst,
        }
    }

    /// Iteration count announced for unknown users; set it to what real
    /// accounts use so the fake server-first-message looks the same.
    pub fn with_unknown_user_iterations(mut self, iterations: u32) -> Self {
        self.unknown_user_iterations = iterations;
        self
    }

    /// Test hook: use a fixed server nonce part (RFC test vectors).
    #[doc(hidden)]
    pub fn with_server_nonce(mut self, nonce: &str) -> Self {
        self.fixed_server_nonce = Some(nonce.to_owned());
        self
    }

    /// The hash this exchange uses.
    pub fn hash(&self) -> ScramHash {
        self.hash
    }

    /// True once [`ScramServer::client_final`] succeeded.
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, ServerState::Done)
    }

    /// Parses a client-first-message (RFC 5802 §5.1, §7):
    /// `gs2-header client-first-message-bare`, and applies the
    /// channel-binding policy of RFC 5802 §6.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<ClientFirst, SaslError> {
        if !matches!(self.state, ServerState::AwaitClientFirst) {
            self.state = ServerState::Failed;
            return Err(SaslError::OutOfOrder);
        }
        match self.parse_client_first(msg) {
            Ok((first, state)) => {
                self.state = state;
                Ok(first)
            }
            Err(e) => {
                self.state = ServerState::Failed;
                Err(e)
            }
        }
    }

    fn parse_client_first(&self, msg: &[u8]) -> Result<(ClientFirst, ServerState), SaslError> {
        let text = message_text(msg)?;
        // gs2-header = gs2-cbind-flag "," [ authzid ] "," (RFC 5802 §7).
        let (flag, rest) = text
            .split_once(',')
            .ok_or(SaslError::MalformedRequest("missing GS2 header"))?;
        let (authz, bare) = rest
            .split_once(',')
            .ok_or(SaslError::MalformedRequest("missing GS2 header"))?;
        let cb = match flag {
            "n" => CbFlag::No,
            "y" => CbFlag::Yes,
            _ => match flag.strip_prefix("p=") {
                Some(name) if is_cb_name(name) => CbFlag::Plus(name),
                _ => return Err(SaslError::MalformedRequest("invalid gs2-cbind-flag")),
            },
        };
        let authzid = if authz.is_empty() {
            None
        } else {
            let value = authz
                .strip_prefix("a=")
                .ok_or(SaslError::MalformedRequest("invalid authzid in GS2 header"))?;
            Some(decode_saslname(value)?)
        };

        let cb_data = self.channel_binding_data(cb)?;

        // client-first-message-bare = [reserved-mext ","] username "," nonce
        //                             ["," extensions]
        let mut parts = bare.split(',');
        let first = parts.next().unwrap_or_default();
        if first.starts_with("m=") {
            // RFC 5802 §5.1: "m" MUST cause authentication failure.
            return Err(SaslError::UnsupportedExtension);
        }
        let username = decode_saslname(attribute(first, 'n', "expected n=username")?)?;
        let nonce = attribute(
            parts.next().unwrap_or_default(),
            'r',
            "expected r=nonce after username",
        )?;
        check_nonce(nonce)?;
        for ext in parts {
            check_extension(ext)?;
        }

        let gs2_header = format!("{flag},{authz},");
        Ok((
            ClientFirst {
                username: username.clone(),
                authzid,
            },
            ServerState::AwaitLookup {
                gs2_header,
                client_first_bare: bare.to_owned(),
                client_nonce: nonce.to_owned(),
                cb_data,
                username,
            },
        ))
    }

    /// Applies RFC 5802 §6 to the GS2 flag and returns the channel-binding
    /// data that c= must carry after the GS2 header.
    fn channel_binding_data(&self, cb: CbFlag<'_>) -> Result<Vec<u8>, SaslError> {
        match (self.plus, cb) {
            (false, CbFlag::No) => Ok(Vec::new()),
            (false, CbFlag::Yes) => {
                // "y" means "I support channel binding but believe you do
                // not". If we offered -PLUS, an attacker stripped it.
                if self.plus_advertised {
                    Err(SaslError::Downgrade)
                } else {
                    Ok(Vec::new())
                }
            }
            (false, CbFlag::Plus(_)) => Err(SaslError::ChannelBindingNotSupported),
            (true, CbFlag::No | CbFlag::Yes) => Err(SaslError::ChannelBindingRequired),
            (true, CbFlag::Plus(name)) => {
                let data = match name {
                    // RFC 9266 §2 / RFC 5929 §4 names.
                    "tls-exporter" => self.bindings.tls_exporter.as_ref(),
                    "tls-server-end-point" => self.bindings.tls_server_end_point.as_ref(),
                    _ => None,
                };
                // Empty data would bind to nothing; treat it as unavailable.
                match data {
                    Some(d) if !d.is_empty() => Ok(d.clone()),
                    _ => Err(SaslError::UnsupportedChannelBinding),
                }
            }
        }
    }

    /// Produces the server-first-message `r=<c-nonce><s-nonce>,s=<salt>,i=<n>`
    /// (RFC 5802 §5.1). `None` (unknown user) continues with fake keys whose
    /// salt is derived from the username and a per-process secret, so
    /// repeated probes see a stable salt; the exchange then fails at the
    /// proof exactly like a wrong password (RFC 5802 §9 on enumeration).
    ///
    /// Called out of order, it returns an empty message and poisons the
    /// exchange (a caller bug, never client-triggerable).
    pub fn server_first(&mut self, keys: Option<ScramKeys>) -> Vec<u8> {
        let state = std::mem::replace(&mut self.state, ServerState::Failed);
        let ServerState::AwaitLookup {
            gs2_header,
            client_first_bare,
            client_nonce,
            cb_data,
            username,
        } = state
        else {
            return Vec::new();
        };
        let (keys, known_user) = match keys {
            Some(k) if k.hash == self.hash => (k, true),
            // Keys for another hash cannot verify anything: same as unknown.
            _ => (
                fake_keys(self.hash, &username, self.unknown_user_iterations),
                false,
            ),
        };
        let server_nonce = self.fixed_server_nonce.clone().unwrap_or_else(random_nonce);
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&keys.salt),
            keys.iterations
        );
        let out = server_first.clone().into_bytes();
        self.state = ServerState::AwaitClientFinal {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
            cb_data,
            keys,
            known_user,
        };
        out
    }

    /// Verifies a client-final-message (RFC 5802 §5.1, §7):
    /// `c=<cbind-input>,r=<nonce>[,extensions],p=<proof>` and returns the
    /// server-final-message `v=<ServerSignature>`.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, SaslError> {
        let state = std::mem::replace(&mut self.state, ServerState::Failed);
        let ServerState::AwaitClientFinal {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
            cb_data,
            keys,
            known_user,
        } = state
        else {
            return Err(SaslError::OutOfOrder);
        };
        let text = message_text(msg)?;

        // The proof is last; everything before it is
        // client-final-message-without-proof, part of AuthMessage.
        let (without_proof, proof_attr) = text.rsplit_once(',').ok_or(
            SaslError::MalformedRequest("client-final-message too short"),
        )?;
        let proof_b64 = attribute(proof_attr, 'p', "expected p=proof last")?;
        let mut parts = without_proof.split(',');
        let cbind_b64 = attribute(
            parts.next().unwrap_or_default(),
            'c',
            "expected c=channel-binding first",
        )?;
        let client_nonce = attribute(
            parts.next().unwrap_or_default(),
            'r',
            "expected r=nonce after channel binding",
        )?;
        for ext in parts {
            check_extension(ext)?;
        }

        // Channel binding (RFC 5802 §6, §7): c= is base64 of the GS2 header
        // followed by the channel-binding data (none unless "p=").
        let cbind_input = B64
            .decode(cbind_b64)
            .map_err(|_| SaslError::MalformedRequest("c= is not valid base64"))?;
        let mut expected = gs2_header.into_bytes();
        expected.extend_from_slice(&cb_data);
        if !bool::from(cbind_input.ct_eq(&expected)) {
            return Err(SaslError::ChannelBindingMismatch);
        }

        // The nonce must be exactly the combined nonce we sent (RFC 5802 §5.1).
        if !bool::from(client_nonce.as_bytes().ct_eq(nonce.as_bytes())) {
            return Err(SaslError::NonceMismatch);
        }

        let proof = B64
            .decode(proof_b64)
            .map_err(|_| SaslError::MalformedRequest("p= is not valid base64"))?;

        // RFC 5802 §3:
        //   AuthMessage     = client-first-message-bare + "," +
        //                     server-first-message + "," +
        //                     client-final-message-without-proof
        //   ClientSignature = HMAC(StoredKey, AuthMessage)
        //   ClientKey       = ClientProof XOR ClientSignature
        //   check H(ClientKey) == StoredKey
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = self.hash.hmac(&keys.stored_key, auth_message.as_bytes())?;
        let mut client_key = vec![0u8; client_signature.len()];
        for ((k, p), s) in client_key.iter_mut().zip(&proof).zip(&client_signature) {
            *k = p ^ s;
        }
        // A proof of the wrong length fails below through the length check
        // inside ct_eq (proof length is public, nothing leaks).
        let length_ok = Choice::from(u8::from(proof.len() == client_signature.len()));
        let key_ok = self.hash.h(&client_key).ct_eq(&keys.stored_key);
        let known = Choice::from(u8::from(known_user));
        if !bool::from(length_ok & key_ok & known) {
            return Err(SaslError::NotAuthorized);
        }

        let server_signature = self.hash.hmac(&keys.server_key, auth_message.as_bytes())?;
        self.state = ServerState::Done;
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

/// Per-process secret for fake salts of unknown users.
fn fake_secret() -> &'static [u8; 32] {
    static SECRET: OnceLock<[u8; 32]> = OnceLock::new();
    SECRET.get_or_init(|| {
        let mut s = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut s);
        s
    })
}

/// Keys for an unknown user: a salt that is stable per (hash, username) for
/// the life of the process, random keys that can never verify.
fn fake_keys(hash: ScramHash, username: &str, iterations: u32) -> ScramKeys {
    let mut h = Sha256::new();
    h.update(fake_secret());
    h.update([0u8]);
    h.update(hash.name().as_bytes());
    h.update([0u8]);
    h.update(username.as_bytes());
    let salt: Vec<u8> = h.finalize().into_iter().take(SALT_LEN).collect();
    let mut stored_key = vec![0u8; hash.output_len()];
    let mut server_key = vec![0u8; hash.output_len()];
    rand::thread_rng().fill_bytes(&mut stored_key);
    rand::thread_rng().fill_bytes(&mut server_key);
    ScramKeys {
        hash,
        salt,
        iterations,
        stored_key,
        server_key,
    }
}

fn random_nonce() -> String {
    let mut bytes = [0u8; NONCE_RANDOM_BYTES];
    rand::thread_rng().fill_bytes(&mut bytes);
    // Standard base64 has no ',' and only printable ASCII: a valid nonce.
    B64.encode(bytes)
}

/// Length cap, UTF-8 (RFC 5802 §7: messages are UTF-8) and no NUL.
fn message_text(msg: &[u8]) -> Result<&str, SaslError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(SaslError::MalformedRequest("message too long"));
    }
    let text = std::str::from_utf8(msg)
        .map_err(|_| SaslError::MalformedRequest("message is not UTF-8"))?;
    if text.contains('\0') {
        return Err(SaslError::MalformedRequest("NUL in message"));
    }
    Ok(text)
}

/// Returns the value of `<name>=<value>`, or a malformed-request error.
fn attribute<'a>(part: &'a str, name: char, what: &'static str) -> Result<&'a str, SaslError> {
    part.strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('='))
        .ok_or(SaslError::MalformedRequest(what))
}

/// An optional extension attribute: `ALPHA "=" 1*value-char`. RFC 5802 §7
/// says unrecognized extensions MUST be ignored, but "m" MUST fail (§5.1),
/// and a known attribute in extension position is out of order.
fn check_extension(part: &str) -> Result<(), SaslError> {
    let mut chars = part.chars();
    let name = chars.next();
    let eq = chars.next();
    let value = chars.as_str();
    match (name, eq) {
        (Some('m'), Some('=')) => Err(SaslError::UnsupportedExtension),
        (Some('a' | 'c' | 'e' | 'i' | 'n' | 'p' | 'r' | 's' | 'v'), Some('=')) => Err(
            SaslError::MalformedRequest("attribute repeated or out of order"),
        ),
        (Some(n), Some('=')) if n.is_ascii_alphabetic() && !value.is_empty() => Ok(()),
        _ => Err(SaslError::MalformedRequest("malformed attribute")),
    }
}

/// RFC 5802 §7: `printable = %x21-2B / %x2D-7E` (printable ASCII but ',').
fn check_nonce(nonce: &str) -> Result<(), SaslError> {
    if !nonce.is_empty()
        && nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
    {
        Ok(())
    } else {
        Err(SaslError::MalformedRequest("invalid nonce"))
    }
}

/// RFC 5802 §7: `cb-name = 1*(ALPHA / DIGIT / "." / "-")`.
fn is_cb_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// saslname decoding (RFC 5802 §5.1, §7): non-empty; '=' only as "=2C"
/// (',') or "=3D" ('='); any other '=' sequence MUST fail.
fn decode_saslname(value: &str) -> Result<String, SaslError> {
    if value.is_empty() {
        return Err(SaslError::MalformedRequest("empty saslname"));
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(pos) = rest.find('=') {
        let (before, after) = rest.split_at(pos);
        out.push_str(before);
        if let Some(tail) = after.strip_prefix("=2C") {
            out.push(',');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("=3D") {
            out.push('=');
            rest = tail;
        } else {
            return Err(SaslError::MalformedRequest(
                "invalid '=' escape in saslname",
            ));
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// saslname encoding, the inverse of [`decode_saslname`].
fn encode_saslname(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            ',' => out.push_str("=2C"),
            '=' => out.push_str("=3D"),
            c => out.push(c),
        }
    }
    out
}

/// Decodes the character data of `<auth/>` / `<response/>` (RFC 6120
/// §6.4.2): base64, where a single "=" stands for an empty response.
/// Anything else that is not canonical base64 is `incorrect-encoding`.
pub fn decode_payload(text: &str) -> Result<Vec<u8>, SaslError> {
    if text == "=" {
        return Ok(Vec::new());
    }
    // Base64 inflates by 4/3; bound the work before decoding.
    if text.len() > MAX_MESSAGE_LEN.div_ceil(3) * 4 {
        return Err(SaslError::MalformedRequest("payload too long"));
    }
    B64.decode(text).map_err(|_| SaslError::IncorrectEncoding)
}

/// Encodes data for `<challenge/>` / `<success/>` (RFC 6120 §6.4.2): base64,
/// with "=" for empty data.
pub fn encode_payload(data: &[u8]) -> String {
    if data.is_empty() {
        "=".to_owned()
    } else {
        B64.encode(data)
    }
}

/// Parsed PLAIN message (RFC 4616 §2). `Debug` redacts the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainCredentials {
    pub authzid: Option<String>,
    pub authcid: String,
    pub password: String,
}

impl fmt::Debug for PlainCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlainCredentials")
            .field("authzid", &self.authzid)
            .field("authcid", &self.authcid)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Parses PLAIN (RFC 4616 §2): `[authzid] NUL authcid NUL passwd`. Each part
/// must be UTF-8 and at most [`PLAIN_FIELD_MAX`] bytes; authcid and password
/// must be non-empty. An empty authzid means none. The caller checks the
/// password with [`verify_password`] and prepares the authcid.
pub fn parse_plain(msg: &[u8]) -> Result<PlainCredentials, SaslError> {
    if msg.len() > 3 * PLAIN_FIELD_MAX + 2 {
        return Err(SaslError::MalformedRequest("PLAIN message too long"));
    }
    let mut parts = msg.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::MalformedRequest(
            "PLAIN message must have exactly two NUL separators",
        ));
    };
    let field = |bytes: &[u8]| -> Result<String, SaslError> {
        if bytes.len() > PLAIN_FIELD_MAX {
            return Err(SaslError::MalformedRequest("PLAIN field too long"));
        }
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| SaslError::MalformedRequest("PLAIN field is not UTF-8"))
    };
    let authzid = field(authzid)?;
    let authcid = field(authcid)?;
    let password = field(password)?;
    if authcid.is_empty() {
        return Err(SaslError::MalformedRequest("empty authcid"));
    }
    if password.is_empty() {
        return Err(SaslError::MalformedRequest("empty password"));
    }
    Ok(PlainCredentials {
        authzid: (!authzid.is_empty()).then_some(authzid),
        authcid,
        password,
    })
}

/// Channel binding the client uses (the GS2 cbind flag, RFC 5802 §7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientBinding {
    /// "n": no channel binding support.
    None,
    /// "y": supported, but the server did not seem to offer -PLUS.
    SupportedButNotUsed,
    /// "p=tls-exporter" with the RFC 9266 exporter value.
    TlsExporter(Vec<u8>),
    /// "p=tls-server-end-point" with the RFC 5929 certificate hash.
    TlsServerEndPoint(Vec<u8>),
}

impl ClientBinding {
    fn gs2_header(&self) -> &'static str {
        match self {
            ClientBinding::None => "n,,",
            ClientBinding::SupportedButNotUsed => "y,,",
            ClientBinding::TlsExporter(_) => "p=tls-exporter,,",
            ClientBinding::TlsServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            ClientBinding::None | ClientBinding::SupportedButNotUsed => &[],
            ClientBinding::TlsExporter(d) | ClientBinding::TlsServerEndPoint(d) => d,
        }
    }
}

enum ClientState {
    Initial,
    SentFirst { client_first_bare: String },
    SentFinal { server_signature: Vec<u8> },
    Done,
    Failed,
}

/// Client side of SCRAM, for tests and the load generator. Never sends an
/// authzid. The mechanism to select is `hash.mechanism(plus)` where `plus`
/// is true for the `TlsExporter` / `TlsServerEndPoint` bindings.
pub struct ScramClient {
    hash: ScramHash,
    username: String,
    password: String,
    binding: ClientBinding,
    client_nonce: String,
    state: ClientState,
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient")
            .field("hash", &self.hash)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    pub fn new(hash: ScramHash, username: &str, password: &str, binding: ClientBinding) -> Self {
        ScramClient {
            hash,
            username: username.to_owned(),
            password: password.to_owned(),
            binding,
            client_nonce: random_nonce(),
            state: ClientState::Initial,
        }
    }

    /// Test hook: use a fixed client nonce (RFC test vectors).
    #[doc(hidden)]
    pub fn with_nonce(mut self, nonce: &str) -> Self {
        self.client_nonce = nonce.to_owned();
        self
    }

    /// The mechanism name matching this client's hash and binding.
    pub fn mechanism(&self) -> &'static str {
        let plus = matches!(
            self.binding,
            ClientBinding::TlsExporter(_) | ClientBinding::TlsServerEndPoint(_)
        );
        self.hash.mechanism(plus)
    }

    /// `gs2-header "n=" saslname ",r=" c-nonce` (RFC 5802 §5.1).
    pub fn client_first(&mut self) -> Vec<u8> {
        let bare = format!(
            "n={},r={}",
            encode_saslname(&self.username),
            self.client_nonce
        );
        let msg = format!("{}{bare}", self.binding.gs2_header());
        self.state = ClientState::SentFirst {
            client_first_bare: bare,
        };
        msg.into_bytes()
    }

    /// Parses server-first-message and returns client-final-message.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, SaslError> {
        let state = std::mem::replace(&mut self.state, ClientState::Failed);
        let ClientState::SentFirst { client_first_bare } = state else {
            return Err(SaslError::OutOfOrder);
        };
        let server_first = message_text(msg)?;
        let mut parts = server_first.split(',');
        let first = parts.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err(SaslError::UnsupportedExtension);
        }
        let nonce = attribute(first, 'r', "expected r=nonce")?;
        check_nonce(nonce)?;
        // The server must extend our nonce, not replace it (RFC 5802 §5.1).
        match nonce.strip_prefix(self.client_nonce.as_str()) {
            Some(server_part) if !server_part.is_empty() => {}
            _ => return Err(SaslError::NonceMismatch),
        }
        let salt = B64
            .decode(attribute(
                parts.next().unwrap_or_default(),
                's',
                "expected s=salt",
            )?)
            .map_err(|_| SaslError::MalformedRequest("s= is not valid base64"))?;
        let iter_text = attribute(parts.next().unwrap_or_default(), 'i', "expected i=count")?;
        if iter_text.is_empty() || !iter_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SaslError::MalformedRequest("i= is not a number"));
        }
        let iterations: u32 = iter_text
            .parse()
            .map_err(|_| SaslError::InvalidIterations(u32::MAX))?;
        for ext in parts {
            check_extension(ext)?;
        }

        let DerivedKeys {
            client_key,
            stored_key,
            server_key,
        } = derive_all(self.hash, &self.password, &salt, iterations)?;
        let mut cbind_input = self.binding.gs2_header().as_bytes().to_vec();
        cbind_input.extend_from_slice(self.binding.data());
        let without_proof = format!("c={},r={nonce}", B64.encode(&cbind_input));
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = self.hash.hmac(&stored_key, auth_message.as_bytes())?;
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&client_signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_signature = self.hash.hmac(&server_key, auth_message.as_bytes())?;
        self.state = ClientState::SentFinal { server_signature };
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Verifies server-final-message `v=<ServerSignature>` (RFC 5802 §5.1),
    /// authenticating the server; "e=<error>" becomes [`SaslError::ServerError`].
    pub fn server_final(&mut self, msg: &[u8]) -> Result<(), SaslError> {
        let state = std::mem::replace(&mut self.state, ClientState::Failed);
        let ClientState::SentFinal { server_signature } = state else {
            return Err(SaslError::OutOfOrder);
        };
        let text = message_text(msg)?;
        let mut parts = text.split(',');
        let first = parts.next().unwrap_or_default();
        if let Some(err) = first.strip_prefix("e=") {
            return Err(SaslError::ServerError(err.to_owned()));
        }
        let verifier = B64
            .decode(attribute(first, 'v', "expected v=verifier")?)
            .map_err(|_| SaslError::MalformedRequest("v= is not valid base64"))?;
        for ext in parts {
            check_extension(ext)?;
        }
        if !bool::from(verifier.ct_eq(&server_signature)) {
            return Err(SaslError::ServerSignatureMismatch);
        }
        self.state = ClientState::Done;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn b64(s: &str) -> Vec<u8> {
        B64.decode(s).unwrap()
    }

    // ---- RFC vectors -------------------------------------------------

    const RFC5802_CLIENT_FIRST: &str = "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL";
    const RFC5802_SERVER_FIRST: &str =
        "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096";
    const RFC5802_CLIENT_FINAL: &str =
        "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
    const RFC5802_SERVER_FINAL: &str = "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=";

    const RFC7677_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC7677_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC7677_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC7677_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn check_vector(
        hash: ScramHash,
        c_nonce: &str,
        s_nonce: &str,
        salt_b64: &str,
        msgs: [&str; 4],
    ) {
        let [cf, sf, cfin, sfin] = msgs;
        // Client side.
        let mut client =
            ScramClient::new(hash, "user", "pencil", ClientBinding::None).with_nonce(c_nonce);
        assert_eq!(client.client_first(), cf.as_bytes());
        assert_eq!(client.server_first(sf.as_bytes()).unwrap(), cfin.as_bytes());
        client.server_final(sfin.as_bytes()).unwrap();
        // Server side.
        let keys = ScramKeys::derive(hash, "pencil", &b64(salt_b64), 4096).unwrap();
        let mut server = ScramServer::new(hash, false, ChannelBindings::default(), false)
            .with_server_nonce(s_nonce);
        let first = server.client_first(cf.as_bytes()).unwrap();
        assert_eq!(first.username, "user");
        assert_eq!(first.authzid, None);
        assert_eq!(server.server_first(Some(keys.clone())), sf.as_bytes());
        assert_eq!(
            server.client_final(cfin.as_bytes()).unwrap(),
            sfin.as_bytes()
        );
        assert!(server.is_authenticated());
        assert!(verify_password(&keys, "pencil"));
        assert!(!verify_password(&keys, "pencil2"));
    }

    #[test]
    fn rfc5802_sha1_vector() {
        check_vector(
            ScramHash::Sha1,
            "fyko+d2lbbFgONRv9qkxdawL",
            "3rfcNHYJY1ZVvWVs7j",
            "QSXCR+Q6sek8bf92",
            [
                RFC5802_CLIENT_FIRST,
                RFC5802_SERVER_FIRST,
                RFC5802_CLIENT_FINAL,
                RFC5802_SERVER_FINAL,
            ],
        );
    }

    #[test]
    fn rfc7677_sha256_vector() {
        check_vector(
            ScramHash::Sha256,
            "rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            "W22ZaJ0SNY7soEsUEjb6gQ==",
            [
                RFC7677_CLIENT_FIRST,
                RFC7677_SERVER_FIRST,
                RFC7677_CLIENT_FINAL,
                RFC7677_SERVER_FINAL,
            ],
        );
    }

    // ---- Helpers for round trips --------------------------------------

    const EXPORTER: &[u8] = &[7u8; 32];
    const END_POINT: &[u8] = &[9u8; 32];

    fn bindings() -> ChannelBindings {
        ChannelBindings {
            tls_exporter: Some(EXPORTER.to_vec()),
            tls_server_end_point: Some(END_POINT.to_vec()),
        }
    }

    /// Runs a full exchange; returns the first error from either side.
    fn exchange(
        hash: ScramHash,
        stored_password: Option<&str>,
        client_password: &str,
        binding: ClientBinding,
        server: &mut ScramServer,
    ) -> Result<(), SaslError> {
        let mut client = ScramClient::new(hash, "al,i=ce", client_password, binding);
        let first = server.client_first(&client.client_first())?;
        assert_eq!(first.username, "al,i=ce");
        let keys =
            stored_password.map(|p| ScramKeys::derive(hash, p, b"saltsaltsaltsalt", 4096).unwrap());
        let sf = server.server_first(keys);
        let cf = client.server_first(&sf)?;
        let fin = server.client_final(&cf)?;
        client.server_final(&fin)
    }

    fn plain_server(hash: ScramHash) -> ScramServer {
        ScramServer::new(hash, false, bindings(), false)
    }

    fn plus_server(hash: ScramHash) -> ScramServer {
        ScramServer::new(hash, true, bindings(), true)
    }

    #[test]
    fn round_trips_all_hashes_and_bindings() {
        for hash in ScramHash::ALL {
            exchange(
                hash,
                Some("pw"),
                "pw",
                ClientBinding::None,
                &mut plain_server(hash),
            )
            .unwrap();
            exchange(
                hash,
                Some("pw"),
                "pw",
                ClientBinding::SupportedButNotUsed,
                &mut plain_server(hash),
            )
            .unwrap();
            exchange(
                hash,
                Some("pw"),
                "pw",
                ClientBinding::TlsExporter(EXPORTER.to_vec()),
                &mut plus_server(hash),
            )
            .unwrap();
            exchange(
                hash,
                Some("pw"),
                "pw",
                ClientBinding::TlsServerEndPoint(END_POINT.to_vec()),
                &mut plus_server(hash),
            )
            .unwrap();
            // Non-PLUS mechanism while PLUS was also advertised, "n" is fine.
            exchange(
                hash,
                Some("pw"),
                "pw",
                ClientBinding::None,
                &mut ScramServer::new(hash, false, bindings(), true),
            )
            .unwrap();
        }
    }

    #[test]
    fn generated_keys_round_trip() {
        for hash in ScramHash::ALL {
            let keys = ScramKeys::generate(hash, "s3cret", 4096).unwrap();
            assert_eq!(keys.salt.len(), SALT_LEN);
            assert_eq!(keys.stored_key.len(), hash.output_len());
            assert!(verify_password(&keys, "s3cret"));
            assert!(!verify_password(&keys, "s3cret "));
            let mut server = plain_server(hash);
            let mut client = ScramClient::new(hash, "bob", "s3cret", ClientBinding::None);
            server.client_first(&client.client_first()).unwrap();
            let sf = server.server_first(Some(keys));
            let cf = client.server_first(&sf).unwrap();
            let fin = server.client_final(&cf).unwrap();
            client.server_final(&fin).unwrap();
        }
    }

    #[test]
    fn saslprep_applies_to_passwords() {
        // RFC 4013 §3: U+00AD (soft hyphen) maps to nothing, U+00A0 to space.
        let keys = ScramKeys::derive(ScramHash::Sha256, "I\u{00AD}X", b"salt", 4096).unwrap();
        assert!(verify_password(&keys, "IX"));
        let keys = ScramKeys::derive(ScramHash::Sha256, "a\u{00A0}b", b"salt", 1).unwrap();
        assert!(verify_password(&keys, "a b"));
        // Prohibited character (U+0007 control).
        assert_eq!(
            ScramKeys::derive(ScramHash::Sha256, "\u{0007}", b"salt", 1),
            Err(SaslError::InvalidPassword)
        );
        assert!(!verify_password(&keys, "\u{0007}"));
    }

    #[test]
    fn iteration_bounds() {
        assert_eq!(
            ScramKeys::derive(ScramHash::Sha1, "pw", b"s", 0),
            Err(SaslError::InvalidIterations(0))
        );
        assert!(ScramKeys::derive(ScramHash::Sha1, "pw", b"s", 1).is_ok());
        assert_eq!(
            ScramKeys::generate(ScramHash::Sha1, "pw", 4095),
            Err(SaslError::InvalidIterations(4095))
        );
        assert_eq!(
            ScramKeys::derive(ScramHash::Sha1, "pw", b"s", MAX_ITERATIONS + 1),
            Err(SaslError::InvalidIterations(MAX_ITERATIONS + 1))
        );
        let mut keys = ScramKeys::derive(ScramHash::Sha1, "pw", b"s", 1).unwrap();
        keys.iterations = 0;
        assert!(!verify_password(&keys, "pw"));
    }

    #[test]
    fn mechanism_names() {
        for hash in ScramHash::ALL {
            for plus in [false, true] {
                assert_eq!(
                    ScramHash::from_mechanism(hash.mechanism(plus)),
                    Some((hash, plus))
                );
            }
            assert_eq!(ScramHash::from_name(hash.name()), Some(hash));
        }
        assert_eq!(ScramHash::Sha256.mechanism(true), "SCRAM-SHA-256-PLUS");
        assert_eq!(ScramHash::Sha1.mechanism(false), "SCRAM-SHA-1");
        assert_eq!(ScramHash::from_mechanism("scram-sha-1"), None);
        assert_eq!(ScramHash::from_mechanism("SCRAM-SHA-1-PLUSX"), None);
        assert_eq!(ScramHash::from_mechanism("PLAIN"), None);
        assert_eq!(ScramHash::from_name("SHA-384"), None);
        let client = ScramClient::new(
            ScramHash::Sha512,
            "u",
            "p",
            ClientBinding::TlsExporter(vec![1]),
        );
        assert_eq!(client.mechanism(), "SCRAM-SHA-512-PLUS");
    }

    // ---- Negative cases -----------------------------------------------

    #[test]
    fn wrong_password_and_unknown_user_fail_alike() {
        for hash in ScramHash::ALL {
            let wrong = exchange(
                hash,
                Some("pw"),
                "nope",
                ClientBinding::None,
                &mut plain_server(hash),
            );
            let unknown = exchange(
                hash,
                None,
                "pw",
                ClientBinding::None,
                &mut plain_server(hash),
            );
            assert_eq!(wrong, Err(SaslError::NotAuthorized));
            assert_eq!(unknown, Err(SaslError::NotAuthorized));
            assert_eq!(wrong.unwrap_err().condition(), "not-authorized");
        }
    }

    #[test]
    fn unknown_user_server_first_looks_real_and_stable() {
        let run = |user: &str| {
            let mut server = plain_server(ScramHash::Sha256).with_unknown_user_iterations(10_000);
            let mut client = ScramClient::new(ScramHash::Sha256, user, "pw", ClientBinding::None)
                .with_nonce("abc");
            server.client_first(&client.client_first()).unwrap();
            let sf = String::from_utf8(server.server_first(None)).unwrap();
            let mut parts = sf.split(',');
            let r = parts.next().unwrap().to_owned();
            let s = parts.next().unwrap().to_owned();
            let i = parts.next().unwrap().to_owned();
            assert!(r.starts_with("r=abc") && r.len() > "r=abc".len() + 24);
            assert_eq!(b64(s.strip_prefix("s=").unwrap()).len(), SALT_LEN);
            assert_eq!(i, "i=10000");
            s
        };
        assert_eq!(run("ghost"), run("ghost"));
        assert_ne!(run("ghost"), run("ghost2"));
    }

    #[test]
    fn keys_for_other_hash_treated_as_unknown() {
        let mut server = plain_server(ScramHash::Sha256);
        let mut client = ScramClient::new(ScramHash::Sha256, "u", "pw", ClientBinding::None);
        server.client_first(&client.client_first()).unwrap();
        let keys = ScramKeys::derive(ScramHash::Sha1, "pw", b"salt", 4096).unwrap();
        let sf = server.server_first(Some(keys));
        let cf = client.server_first(&sf).unwrap();
        assert_eq!(server.client_final(&cf), Err(SaslError::NotAuthorized));
    }

    /// Runs up to client-final and lets the test tamper with it.
    fn tampered_final(
        server: &mut ScramServer,
        binding: ClientBinding,
        tamper: impl FnOnce(String) -> String,
    ) -> Result<Vec<u8>, SaslError> {
        let hash = server.hash();
        let mut client = ScramClient::new(hash, "user", "pw", binding);
        server.client_first(&client.client_first()).unwrap();
        let keys = ScramKeys::derive(hash, "pw", b"salt", 4096).unwrap();
        let sf = server.server_first(Some(keys));
        let cf = String::from_utf8(client.server_first(&sf).unwrap()).unwrap();
        server.client_final(tamper(cf).as_bytes())
    }

    #[test]
    fn tampered_proof_fails() {
        let hash = ScramHash::Sha256;
        let flip = |cf: String| {
            let (head, proof) = cf.rsplit_once(",p=").unwrap();
            let mut bytes = b64(proof);
            bytes[0] ^= 1;
            format!("{head},p={}", B64.encode(bytes))
        };
        let mut server = plain_server(hash);
        assert_eq!(
            tampered_final(&mut server, ClientBinding::None, flip),
            Err(SaslError::NotAuthorized)
        );
        assert!(!server.is_authenticated());
        // Proof of the wrong length.
        let short = |cf: String| {
            let (head, _) = cf.rsplit_once(",p=").unwrap();
            format!("{head},p={}", B64.encode([0u8; 20]))
        };
        assert_eq!(
            tampered_final(&mut plain_server(hash), ClientBinding::None, short),
            Err(SaslError::NotAuthorized)
        );
        let empty = |cf: String| {
            let (head, _) = cf.rsplit_once(",p=").unwrap();
            format!("{head},p=")
        };
        assert_eq!(
            tampered_final(&mut plain_server(hash), ClientBinding::None, empty),
            Err(SaslError::NotAuthorized)
        );
        let bad_b64 = |cf: String| format!("{cf}!");
        assert_eq!(
            tampered_final(&mut plain_server(hash), ClientBinding::None, bad_b64)
                .unwrap_err()
                .condition(),
            "malformed-request"
        );
    }

    #[test]
    fn wrong_nonce_fails() {
        let hash = ScramHash::Sha1;
        let change = |cf: String| cf.replacen(",r=", ",r=X", 1);
        assert_eq!(
            tampered_final(&mut plain_server(hash), ClientBinding::None, change),
            Err(SaslError::NonceMismatch)
        );
        let truncate = |cf: String| {
            let (c, rest) = cf.split_once(",r=").unwrap();
            let (nonce, proof) = rest.split_once(',').unwrap();
            format!("{c},r={},{proof}", &nonce[..nonce.len() - 1])
        };
        assert_eq!(
            tampered_final(&mut plain_server(hash), ClientBinding::None, truncate),
            Err(SaslError::NonceMismatch)
        );
        // Client refuses a server nonce that does not extend its own.
        let mut client = ScramClient::new(hash, "u", "pw", ClientBinding::None).with_nonce("abc");
        client.client_first();
        assert_eq!(
            client.server_first(b"r=xyz123,s=c2FsdA==,i=4096"),
            Err(SaslError::NonceMismatch)
        );
        let mut client = ScramClient::new(hash, "u", "pw", ClientBinding::None).with_nonce("abc");
        client.client_first();
        assert_eq!(
            client.server_first(b"r=abc,s=c2FsdA==,i=4096"),
            Err(SaslError::NonceMismatch)
        );
    }

    #[test]
    fn wrong_channel_binding_data_fails() {
        for hash in ScramHash::ALL {
            let r = exchange(
                hash,
                Some("pw"),
                "pw",
                ClientBinding::TlsExporter(vec![1u8; 32]),
                &mut plus_server(hash),
            );
            assert_eq!(r, Err(SaslError::ChannelBindingMismatch));
            // Right data, wrong type.
            let r = exchange(
                hash,
                Some("pw"),
                "pw",
                ClientBinding::TlsServerEndPoint(EXPORTER.to_vec()),
                &mut plus_server(hash),
            );
            assert_eq!(r, Err(SaslError::ChannelBindingMismatch));
        }
        // c= claiming another GS2 header than client-first had.
        let swap = |cf: String| {
            let (_, rest) = cf.split_once(',').unwrap();
            format!("c={},{rest}", B64.encode(b"n,,"))
        };
        assert_eq!(
            tampered_final(
                &mut plus_server(ScramHash::Sha256),
                ClientBinding::TlsExporter(EXPORTER.to_vec()),
                swap
            ),
            Err(SaslError::ChannelBindingMismatch)
        );
        // Non-PLUS: c= must be exactly "biws".
        let wrong = |cf: String| cf.replacen("c=biws", "c=eSws", 1);
        assert_eq!(
            tampered_final(
                &mut plain_server(ScramHash::Sha1),
                ClientBinding::None,
                wrong
            ),
            Err(SaslError::ChannelBindingMismatch)
        );
    }

    #[test]
    fn channel_binding_policy() {
        let hash = ScramHash::Sha256;
        // "y" while PLUS was advertised: downgrade (RFC 5802 §6).
        let mut server = ScramServer::new(hash, false, bindings(), true);
        let r = server.client_first(b"y,,n=user,r=abc");
        assert_eq!(r, Err(SaslError::Downgrade));
        assert_eq!(SaslError::Downgrade.condition(), "not-authorized");
        // "p=" with a non-PLUS mechanism.
        let mut server = plain_server(hash);
        let r = server.client_first(b"p=tls-exporter,,n=user,r=abc");
        assert_eq!(r, Err(SaslError::ChannelBindingNotSupported));
        // PLUS mechanism without channel binding.
        for msg in [&b"n,,n=user,r=abc"[..], b"y,,n=user,r=abc"] {
            let mut server = plus_server(hash);
            assert_eq!(
                server.client_first(msg),
                Err(SaslError::ChannelBindingRequired)
            );
        }
        // Unknown type or type without data.
        let mut server = plus_server(hash);
        assert_eq!(
            server.client_first(b"p=tls-unique,,n=user,r=abc"),
            Err(SaslError::UnsupportedChannelBinding)
        );
        let only_endpoint = ChannelBindings {
            tls_exporter: None,
            tls_server_end_point: Some(END_POINT.to_vec()),
        };
        let mut server = ScramServer::new(hash, true, only_endpoint.clone(), true);
        assert_eq!(
            server.client_first(b"p=tls-exporter,,n=user,r=abc"),
            Err(SaslError::UnsupportedChannelBinding)
        );
        let mut server = ScramServer::new(hash, true, only_endpoint, true);
        assert!(server
            .client_first(b"p=tls-server-end-point,,n=user,r=abc")
            .is_ok());
        let empty = ChannelBindings {
            tls_exporter: Some(Vec::new()),
            tls_server_end_point: None,
        };
        let mut server = ScramServer::new(hash, true, empty, true);
        assert_eq!(
            server.client_first(b"p=tls-exporter,,n=user,r=abc"),
            Err(SaslError::UnsupportedChannelBinding)
        );
        // Malformed cb-name.
        let mut server = plus_server(hash);
        assert!(matches!(
            server.client_first(b"p=,,n=user,r=abc"),
            Err(SaslError::MalformedRequest(_))
        ));
    }

    #[test]
    fn client_first_parsing() {
        let parse = |msg: &[u8]| plain_server(ScramHash::Sha1).client_first(msg);
        let ok = parse(b"n,a=ad=3Dmin=2Cx,n=us=2Cer=3D,r=abc,x=ext,y=more").unwrap();
        assert_eq!(ok.username, "us,er=");
        assert_eq!(ok.authzid.as_deref(), Some("ad=min,x"));
        let ok = parse("n,,n=jürgen,r=abc".as_bytes()).unwrap();
        assert_eq!(ok.username, "jürgen");

        let bad: &[&[u8]] = &[
            b"",
            b"n",
            b"n,",
            b"n,,",
            b"x,,n=user,r=abc",
            b"N,,n=user,r=abc",
            b"n,b=x,n=user,r=abc",
            b"n,a=,n=user,r=abc",
            b"n,a=a=2,n=user,r=abc",
            b"n,,m=ext,n=user,r=abc",
            b"n,,n=user,r=abc,m=ext",
            b"n,,r=abc,n=user",
            b"n,,n=,r=abc",
            b"n,,n=us=2cer,r=abc",
            b"n,,n=us=er,r=abc",
            b"n,,n=user=,r=abc",
            b"n,,n=user",
            b"n,,n=user,",
            b"n,,n=user,r=",
            b"n,,n=user,r=ab c",
            b"n,,n=user,r=abc,",
            b"n,,n=user,r=abc,1=x",
            b"n,,n=user,r=abc,x=",
            b"n,,n=user,r=abc,r=again",
            b"n,,n=user,r=abc,p=proof",
            b"n,,n=us\0er,r=abc",
            b"n,,n=us\xffer,r=abc",
            b"n,,n=user,r=\xc3\xa4",
        ];
        for msg in bad {
            let err = parse(msg).unwrap_err();
            assert_eq!(
                err.condition(),
                "malformed-request",
                "{:?}",
                String::from_utf8_lossy(msg)
            );
        }
        assert_eq!(
            parse(b"n,,m=x,n=user,r=abc"),
            Err(SaslError::UnsupportedExtension)
        );

        let mut huge = b"n,,n=user,r=".to_vec();
        huge.resize(MAX_MESSAGE_LEN + 1, b'a');
        assert_eq!(
            parse(&huge),
            Err(SaslError::MalformedRequest("message too long"))
        );
        let mut max = b"n,,n=user,r=".to_vec();
        max.resize(MAX_MESSAGE_LEN, b'a');
        assert!(parse(&max).is_ok());
    }

    #[test]
    fn client_final_parsing() {
        let hash = ScramHash::Sha256;
        let cases: Vec<Box<dyn Fn(String) -> String>> = vec![
            Box::new(|cf| cf.replacen("c=", "x=", 1)),
            Box::new(|cf| {
                // Swap c= and r=.
                let mut parts: Vec<&str> = cf.split(',').collect();
                parts.swap(0, 1);
                parts.join(",")
            }),
            Box::new(|cf| cf.replacen(",p=", ",m=x,p=", 1)),
            Box::new(|cf| cf.replacen(",p=", ",r=again,p=", 1)),
            Box::new(|cf| format!("{cf},x=after-proof")),
            Box::new(|cf| cf.rsplit_once(",p=").unwrap().0.to_owned()),
            Box::new(|cf| cf.replacen("c=biws", "c=biws!", 1)),
            Box::new(|cf| cf.replacen("c=biws", "c=biw", 1)),
            Box::new(|cf| format!("{cf}\0")),
            Box::new(|_| String::new()),
            Box::new(|_| ",".to_owned()),
            Box::new(|cf| cf.replacen(",p=", ",,p=", 1)),
        ];
        for (i, case) in cases.into_iter().enumerate() {
            let r = tampered_final(&mut plain_server(hash), ClientBinding::None, case);
            assert!(r.is_err(), "case {i} unexpectedly succeeded");
        }
        // Unknown optional extensions are ignored (RFC 5802 §7) but are
        // part of AuthMessage: an unsigned one breaks the proof, a signed
        // one is accepted.
        for signed in [false, true] {
            let mut server = plain_server(hash).with_server_nonce("srv");
            server.client_first(b"n,,n=user,r=cli").unwrap();
            let keys = ScramKeys::derive(hash, "pw", b"salt", 4096).unwrap();
            let sf = String::from_utf8(server.server_first(Some(keys))).unwrap();
            let without_proof = "c=biws,r=clisrv,x=ext";
            let signed_part = if signed {
                without_proof
            } else {
                "c=biws,r=clisrv"
            };
            let auth = format!("n=user,r=cli,{sf},{signed_part}");
            let d = derive_all(hash, "pw", b"salt", 4096).unwrap();
            let sig = hash.hmac(&d.stored_key, auth.as_bytes()).unwrap();
            let proof: Vec<u8> = d.client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
            let msg = format!("{without_proof},p={}", B64.encode(proof));
            let r = server.client_final(msg.as_bytes());
            if signed {
                let v = hash.hmac(&d.server_key, auth.as_bytes()).unwrap();
                assert_eq!(r.unwrap(), format!("v={}", B64.encode(v)).into_bytes());
            } else {
                assert_eq!(r, Err(SaslError::NotAuthorized));
            }
        }
    }

    #[test]
    fn authzid_is_part_of_channel_binding_input() {
        // c= covers the whole GS2 header, authzid included (RFC 5802 §7).
        let hash = ScramHash::Sha256;
        let gs2 = "p=tls-exporter,a=ad=2Cmin,";
        for (cbind, ok) in [(gs2, true), ("p=tls-exporter,,", false)] {
            let mut server = plus_server(hash).with_server_nonce("srv");
            let first = server
                .client_first(format!("{gs2}n=user,r=cli").as_bytes())
                .unwrap();
            assert_eq!(first.authzid.as_deref(), Some("ad,min"));
            let keys = ScramKeys::derive(hash, "pw", b"salt", 4096).unwrap();
            let sf = String::from_utf8(server.server_first(Some(keys))).unwrap();
            let mut input = cbind.as_bytes().to_vec();
            input.extend_from_slice(EXPORTER);
            let without_proof = format!("c={},r=clisrv", B64.encode(input));
            let auth = format!("n=user,r=cli,{sf},{without_proof}");
            let d = derive_all(hash, "pw", b"salt", 4096).unwrap();
            let sig = hash.hmac(&d.stored_key, auth.as_bytes()).unwrap();
            let proof: Vec<u8> = d.client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
            let msg = format!("{without_proof},p={}", B64.encode(proof));
            let r = server.client_final(msg.as_bytes());
            if ok {
                assert!(r.is_ok());
            } else {
                assert_eq!(r, Err(SaslError::ChannelBindingMismatch));
            }
        }
    }

    #[test]
    fn non_utf8_client_final() {
        let r = tampered_final(
            &mut plain_server(ScramHash::Sha1),
            ClientBinding::None,
            |cf| cf,
        );
        assert!(r.is_ok());
        let mut server = plain_server(ScramHash::Sha1);
        server.client_first(b"n,,n=user,r=abc").unwrap();
        server.server_first(None);
        assert!(matches!(
            server.client_final(b"c=biws,r=abc\xff,p=AAAA"),
            Err(SaslError::MalformedRequest(_))
        ));
    }

    #[test]
    fn state_machine_order() {
        let mut server = plain_server(ScramHash::Sha1);
        assert_eq!(
            server.client_final(b"c=biws,r=a,p=AAAA"),
            Err(SaslError::OutOfOrder)
        );
        assert!(server.server_first(None).is_empty());
        let mut server = plain_server(ScramHash::Sha1);
        assert!(server.server_first(None).is_empty());
        let mut server = plain_server(ScramHash::Sha1);
        server.client_first(b"n,,n=user,r=abc").unwrap();
        assert_eq!(
            server.client_first(b"n,,n=user,r=abc"),
            Err(SaslError::OutOfOrder)
        );
        // After a failure everything fails.
        let mut server = plain_server(ScramHash::Sha1);
        assert!(server.client_first(b"garbage").is_err());
        assert!(server.server_first(None).is_empty());
        assert_eq!(server.client_final(b"c=biws"), Err(SaslError::OutOfOrder));
        // After success, replaying fails.
        let mut server = plain_server(ScramHash::Sha1);
        exchange(
            ScramHash::Sha1,
            Some("pw"),
            "pw",
            ClientBinding::None,
            &mut server,
        )
        .unwrap();
        assert_eq!(server.client_final(b"c=biws"), Err(SaslError::OutOfOrder));
        // Client side order.
        let mut client = ScramClient::new(ScramHash::Sha1, "u", "p", ClientBinding::None);
        assert_eq!(
            client.server_first(b"r=a,s=AA==,i=1"),
            Err(SaslError::OutOfOrder)
        );
        assert_eq!(client.server_final(b"v=AA=="), Err(SaslError::OutOfOrder));
    }

    #[test]
    fn client_checks_server() {
        let hash = ScramHash::Sha256;
        let setup = || {
            let mut client =
                ScramClient::new(hash, "u", "pw", ClientBinding::None).with_nonce("abc");
            client.client_first();
            client
        };
        let bad: &[&[u8]] = &[
            b"m=x,r=abcd,s=c2FsdA==,i=1",
            b"r=abcd,s=c2FsdA=,i=1",
            b"r=abcd,i=1,s=c2FsdA==",
            b"r=abcd,s=c2FsdA==,i=0",
            b"r=abcd,s=c2FsdA==,i=-1",
            b"r=abcd,s=c2FsdA==,i=+1",
            b"r=abcd,s=c2FsdA==,i=99999999999",
            b"r=abcd,s=c2FsdA==,i=",
            b"r=abcd,s=c2FsdA==",
            b"r=abcd,s=c2FsdA==,i=1,m=x",
        ];
        for msg in bad {
            assert!(
                setup().server_first(msg).is_err(),
                "{:?}",
                String::from_utf8_lossy(msg)
            );
        }
        let mut client = setup();
        client
            .server_first(b"r=abcd,s=c2FsdA==,i=1,x=ignored")
            .unwrap();
        assert_eq!(
            client.server_final(b"e=invalid-proof"),
            Err(SaslError::ServerError("invalid-proof".into()))
        );
        let mut client = setup();
        client.server_first(b"r=abcd,s=c2FsdA==,i=1").unwrap();
        assert_eq!(
            client.server_final(b"v=AAAA"),
            Err(SaslError::ServerSignatureMismatch)
        );
    }

    #[test]
    fn payload_helpers() {
        assert_eq!(decode_payload("=").unwrap(), Vec::<u8>::new());
        assert_eq!(encode_payload(b""), "=");
        assert_eq!(
            decode_payload(&encode_payload(b"n,,n=u,r=x")).unwrap(),
            b"n,,n=u,r=x"
        );
        assert_eq!(decode_payload("biws!"), Err(SaslError::IncorrectEncoding));
        assert_eq!(decode_payload("biw"), Err(SaslError::IncorrectEncoding));
        assert_eq!(decode_payload("bi ws"), Err(SaslError::IncorrectEncoding));
        assert_eq!(
            SaslError::IncorrectEncoding.condition(),
            "incorrect-encoding"
        );
        assert!(decode_payload(&"A".repeat(100_000)).is_err());
    }

    // ---- PLAIN ---------------------------------------------------------

    #[test]
    fn plain_parsing() {
        let c = parse_plain(b"\0user\0pencil").unwrap();
        assert_eq!(c.authzid, None);
        assert_eq!(c.authcid, "user");
        assert_eq!(c.password, "pencil");
        let c = parse_plain("admin@example\0jürgen\0pä ss".as_bytes()).unwrap();
        assert_eq!(c.authzid.as_deref(), Some("admin@example"));
        assert_eq!(c.authcid, "jürgen");
        assert_eq!(c.password, "pä ss");
        assert!(!format!("{c:?}").contains("pä ss"));

        let long = "x".repeat(PLAIN_FIELD_MAX);
        assert!(parse_plain(format!("{long}\0{long}\0{long}").as_bytes()).is_ok());
        let too_long = "x".repeat(PLAIN_FIELD_MAX + 1);

        let bad: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"user".to_vec(),
            b"\0user".to_vec(),
            b"\0\0pw".to_vec(),
            b"\0user\0".to_vec(),
            b"\0user\0pw\0".to_vec(),
            b"a\0b\0c\0d".to_vec(),
            b"\0us\xffer\0pw".to_vec(),
            b"\xff\0user\0pw".to_vec(),
            b"\0user\0p\xc3".to_vec(),
            format!("\0{too_long}\0pw").into_bytes(),
            format!("\0user\0{too_long}").into_bytes(),
            format!("{too_long}\0user\0pw").into_bytes(),
            vec![b'a'; 100_000],
        ];
        for msg in bad {
            let err = parse_plain(&msg).unwrap_err();
            assert_eq!(
                err.condition(),
                "malformed-request",
                "{:?}",
                String::from_utf8_lossy(&msg)
            );
        }
    }

    #[test]
    fn plain_with_stored_keys() {
        let keys = ScramKeys::generate(ScramHash::Sha256, "pencil", 4096).unwrap();
        let c = parse_plain(b"\0user\0pencil").unwrap();
        assert!(verify_password(&keys, &c.password));
        let c = parse_plain(b"\0user\0pencil!").unwrap();
        assert!(!verify_password(&keys, &c.password));
    }

    #[test]
    fn error_conditions() {
        assert_eq!(
            SaslError::MalformedRequest("x").condition(),
            "malformed-request"
        );
        assert_eq!(SaslError::NotAuthorized.condition(), "not-authorized");
        assert_eq!(
            SaslError::UnsupportedChannelBinding.condition(),
            "malformed-request"
        );
        assert_eq!(
            SaslError::ChannelBindingNotSupported.condition(),
            "malformed-request"
        );
        assert!(SaslError::NotAuthorized.is_credential_failure());
        assert!(SaslError::ChannelBindingMismatch.is_credential_failure());
        for not_a_guess in [
            SaslError::UnsupportedChannelBinding,
            SaslError::ChannelBindingRequired,
            SaslError::ChannelBindingNotSupported,
            SaslError::Downgrade,
            SaslError::InvalidMechanism,
            SaslError::MalformedRequest("x"),
        ] {
            assert!(!not_a_guess.is_credential_failure(), "{not_a_guess:?}");
        }
        assert_eq!(SaslError::InvalidAuthzid.condition(), "invalid-authzid");
        assert_eq!(SaslError::InvalidMechanism.condition(), "invalid-mechanism");
        assert_eq!(
            SaslError::TemporaryAuthFailure.condition(),
            "temporary-auth-failure"
        );
        assert_eq!(
            SaslError::ChannelBindingMismatch.condition(),
            "not-authorized"
        );
    }

    // ---- Robustness: random input must never panic ---------------------

    #[test]
    fn random_input_never_panics() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let hash = ScramHash::Sha1;
        // Valid messages to truncate and mutate.
        let mut client = ScramClient::new(
            hash,
            "user",
            "pw",
            ClientBinding::TlsExporter(EXPORTER.to_vec()),
        );
        let cf = client.client_first();
        let mut server = plus_server(hash);
        server.client_first(&cf).unwrap();
        let sf = server.server_first(Some(ScramKeys::derive(hash, "pw", b"salt", 1).unwrap()));
        let cfin = client.server_first(&sf).unwrap();
        let seeds: Vec<Vec<u8>> = vec![cf.clone(), cfin.clone(), sf.clone(), b"v=AAAA".to_vec()];

        for round in 0..3000 {
            let msg: Vec<u8> = match round % 3 {
                0 => {
                    let len = rng.gen_range(0..64);
                    (0..len).map(|_| rng.gen()).collect()
                }
                1 => {
                    let seed = &seeds[rng.gen_range(0..seeds.len())];
                    seed[..rng.gen_range(0..=seed.len())].to_vec()
                }
                _ => {
                    let mut m = seeds[rng.gen_range(0..seeds.len())].clone();
                    for _ in 0..rng.gen_range(1..4) {
                        let i = rng.gen_range(0..m.len());
                        m[i] = *[b',', b'=', 0u8, 0xff, b'a', b'p']
                            .get(rng.gen_range(0..6))
                            .unwrap();
                    }
                    m
                }
            };
            // Server first step on random input.
            let mut s = plus_server(hash);
            let _ = s.client_first(&msg);
            let _ = plain_server(hash).client_first(&msg);
            // Server final step on random input after a valid first step.
            let mut s = plus_server(hash);
            s.client_first(&cf).unwrap();
            s.server_first(None);
            let _ = s.client_final(&msg);
            // Client steps on random input.
            let mut c = ScramClient::new(hash, "user", "pw", ClientBinding::None);
            c.client_first();
            let _ = c.server_first(&msg);
            let _ = c.server_final(&msg);
            let _ = parse_plain(&msg);
            let _ = decode_payload(&String::from_utf8_lossy(&msg));
        }
        // Huge inputs are rejected up front.
        let huge = vec![b'a'; 1 << 20];
        assert!(plus_server(hash).client_first(&huge).is_err());
        let mut s = plain_server(hash);
        s.client_first(b"n,,n=u,r=a").unwrap();
        s.server_first(None);
        assert!(s.client_final(&huge).is_err());
        assert!(parse_plain(&huge).is_err());
    }
}
