//! Server-to-server links for confab.
//!
//! The router talks to federation only through [`Federation`]: it hands over stanzas
//! for remote domains, and federation hands back, through [`Host`], stanzas that arrived
//! from authenticated remote domains and stanzas that could not be delivered (to bounce
//! to their senders, RFC 6120 §8.3.3). Federation knows nothing of rosters or sessions.
//!
//! [`FederationService`] is the real thing: DNS discovery (`dns`), TLS with certificate
//! checks (`verify`), SASL EXTERNAL or dialback (`dialback`), outgoing links with a queue
//! while they connect, incoming links on the s2s listeners. [`NoFederation`] refuses
//! every remote domain.

pub mod check;
pub mod config;
pub mod dialback;
pub mod dns;
mod incoming;
mod outgoing;
pub mod service;
mod stream;
pub mod verify;

use std::sync::Arc;

use async_trait::async_trait;
use confab_protocol::{Element, StreamError};
use rustls::sign::CertifiedKey;

pub use config::{DomainPolicy, FederationConfig};
pub use service::{AuthMethod, FederationService, LinkInfo, SetupError};

/// What federation needs from the rest of the server.
#[async_trait]
pub trait Host: Send + Sync + 'static {
    fn is_local_domain(&self, domain: &str) -> bool;
    /// The domain to name in a stream header when the peer named none of ours.
    fn default_domain(&self) -> Option<String>;
    /// Our certificate for a local domain (offered as client certificate for EXTERNAL).
    fn certificate(&self, domain: &str) -> Option<Arc<CertifiedKey>>;
    /// A stanza from an authenticated remote domain to one of ours, in `jabber:client`.
    async fn deliver(&self, stanza: Element);
    /// A stanza accepted by [`Federation::send`] that could not be delivered.
    async fn bounce(&self, stanza: Element, error: FederationError);
    /// The link from `domain` ended without a clean close (the peer crashed, restarted
    /// or was cut off): what we knew of its users' presence is stale.
    async fn remote_gone(&self, _domain: &str) {}
}

/// Why a link could not be established or ended.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("DNS: {0}")]
    Dns(String),
    #[error("connect: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("I/O: {0}")]
    Io(String),
    #[error("connection closed")]
    Closed,
    #[error("stream error: {0}")]
    Stream(StreamError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("policy: {0}")]
    Policy(String),
    #[error("not authenticated: {0}")]
    NotAuthenticated(String),
}

/// Why a stanza could not be handed to a remote domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FederationError {
    /// No link to the domain can be established (or federation is off).
    #[error("remote server not found: {0}")]
    RemoteServerNotFound(String),
    /// The link could not be established in time.
    #[error("remote server timeout: {0}")]
    RemoteServerTimeout(String),
    /// Too many stanzas are already waiting for the link to this domain.
    #[error("too many stanzas queued for {0}")]
    QueueFull(String),
}

/// What the router needs from federation.
#[async_trait]
pub trait Federation: Send + Sync {
    /// Queues `stanza` (with `from` in `local_domain`) for `remote_domain`.
    async fn send(
        &self,
        local_domain: &str,
        remote_domain: &str,
        stanza: Element,
    ) -> Result<(), FederationError>;
}

/// Federation switched off: every remote domain is unreachable.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoFederation;

#[async_trait]
impl Federation for NoFederation {
    async fn send(
        &self,
        _local_domain: &str,
        remote_domain: &str,
        _stanza: Element,
    ) -> Result<(), FederationError> {
        Err(FederationError::RemoteServerNotFound(
            remote_domain.to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_federation_refuses_every_domain() {
        let err = NoFederation
            .send(
                "a.example",
                "b.example",
                Element::new("message", "jabber:client"),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            FederationError::RemoteServerNotFound("b.example".into())
        );
    }
}
