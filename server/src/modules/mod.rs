//! One module per XEP or RFC area. A module declares the iq payloads it serves and the
//! disco features it announces; the router dispatches by that table, so adding a XEP is
//! one file here and one line in [`Modules::new`].

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use confab_protocol::{Element, StanzaError};

use crate::router::SessionHandle;
use crate::server::Server;

pub mod disco;
pub mod offline;
pub mod ping;
pub mod presence;
pub mod private;
pub mod roster;
pub mod session;
pub mod time;
pub mod vcard;
pub mod version;

/// Whom an iq is addressed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IqTarget {
    /// The server itself (a local domain).
    Server(String),
    /// An account's bare JID, answered by the server on its behalf.
    Account(String),
}

pub struct IqRequest<'a> {
    pub server: &'a Arc<Server>,
    /// The whole iq (`from` stamped).
    pub stanza: &'a Element,
    /// Its single payload child.
    pub payload: &'a Element,
    /// `type='set'` (else `get`).
    pub set: bool,
    pub target: &'a IqTarget,
    /// The sender's session when the iq came from a local client for its own account.
    pub session: Option<&'a SessionHandle>,
}

impl IqRequest<'_> {
    /// The sender's bare JID.
    pub fn from_bare(&self) -> Option<String> {
        self.stanza
            .attr("from")
            .and_then(|f| crate::jid::Addr::parse(f).ok())
            .map(|a| a.bare())
    }

    /// True when the sender addresses its own account (roster, private storage, ...).
    pub fn is_own_account(&self) -> bool {
        match self.target {
            IqTarget::Account(bare) => self.from_bare().as_deref() == Some(bare.as_str()),
            IqTarget::Server(_) => false,
        }
    }
}

/// Where a disco#info feature is announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureScope {
    Server,
    Account,
}

#[async_trait]
pub trait IqHandler: Send + Sync {
    /// The payloads this module serves: (element name, namespace).
    fn payloads(&self) -> &'static [(&'static str, &'static str)];
    /// Features announced in disco#info for `scope`.
    fn features(&self, scope: FeatureScope) -> &'static [&'static str];
    /// Returns the result payload (None for an empty result) or the stanza error.
    async fn handle(&self, req: IqRequest<'_>) -> Result<Option<Element>, StanzaError>;
}

pub struct Modules {
    handlers: Vec<Arc<dyn IqHandler>>,
    by_payload: HashMap<(&'static str, &'static str), Arc<dyn IqHandler>>,
}

impl Modules {
    pub fn new() -> Self {
        let handlers: Vec<Arc<dyn IqHandler>> = vec![
            Arc::new(roster::Roster),
            Arc::new(disco::Disco),
            Arc::new(ping::Ping),
            Arc::new(version::Version),
            Arc::new(time::Time),
            Arc::new(vcard::VCard),
            Arc::new(private::Private),
            Arc::new(session::Session),
        ];
        let mut by_payload = HashMap::new();
        for h in &handlers {
            for p in h.payloads() {
                by_payload.insert(*p, h.clone());
            }
        }
        Modules {
            handlers,
            by_payload,
        }
    }

    pub fn iq_handler(&self, name: &str, ns: &str) -> Option<Arc<dyn IqHandler>> {
        self.by_payload.get(&(name, ns)).cloned()
    }

    /// All features announced for `scope`, sorted and deduplicated.
    pub fn features(&self, scope: FeatureScope) -> Vec<&'static str> {
        let mut f: Vec<&'static str> = self
            .handlers
            .iter()
            .flat_map(|h| h.features(scope).iter().copied())
            .collect();
        f.extend(presence::features(scope));
        f.extend(offline::features(scope));
        f.sort_unstable();
        f.dedup();
        f
    }
}

impl Default for Modules {
    fn default() -> Self {
        Self::new()
    }
}
