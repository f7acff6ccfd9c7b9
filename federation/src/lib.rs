//! Server-to-server links for confab.
//!
//! The router talks to federation only through [`Federation`]: it hands over stanzas
//! for remote domains and gets told when one cannot be delivered. Until server-to-server
//! streams exist, [`NoFederation`] refuses every remote domain, which the router turns
//! into `remote-server-not-found` for the sender (RFC 6120 §8.3.3.15).

use async_trait::async_trait;
use confab_protocol::Element;

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
