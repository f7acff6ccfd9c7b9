//! XEP-0030: Service Discovery. Features are announced by the modules that serve them.

use async_trait::async_trait;
use confab_protocol::{ns, Element, StanzaError, StanzaErrorCondition};

use super::{FeatureScope, IqHandler, IqRequest, IqTarget};

pub struct Disco;

#[async_trait]
impl IqHandler for Disco {
    fn payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[("query", ns::DISCO_INFO), ("query", ns::DISCO_ITEMS)]
    }
    fn features(&self, _scope: FeatureScope) -> &'static [&'static str] {
        &[ns::DISCO_INFO, ns::DISCO_ITEMS]
    }
    async fn handle(&self, req: IqRequest<'_>) -> Result<Option<Element>, StanzaError> {
        if req.set {
            return Err(StanzaError::new(StanzaErrorCondition::NotAllowed));
        }
        // No nodes are served yet: any node is unknown (XEP-0030 §3.1, item-not-found).
        if req.payload.attr("node").is_some() {
            return Err(StanzaError::new(StanzaErrorCondition::ItemNotFound));
        }
        let ns_ = req.payload.ns();
        let mut query = Element::new("query", req.payload.namespace().clone());
        if ns_ == ns::DISCO_ITEMS {
            return Ok(Some(query));
        }
        let (scope, category, kind, name) = match req.target {
            IqTarget::Server(_) => (FeatureScope::Server, "server", "im", Some("confab")),
            IqTarget::Account(_) => (FeatureScope::Account, "account", "registered", None),
        };
        let mut identity = Element::new("identity", ns::DISCO_INFO)
            .with_attr("category", category)
            .with_attr("type", kind);
        if let Some(n) = name {
            identity.set_attr("name", n);
        }
        query.append_child(identity);
        for f in req.server.modules.features(scope) {
            query.append_child(Element::new("feature", ns::DISCO_INFO).with_attr("var", f));
        }
        Ok(Some(query))
    }
}
