//! XEP-0092: Software Version, answered for the server.

use async_trait::async_trait;
use confab_protocol::{ns, Element, StanzaError, StanzaErrorCondition};

use super::{FeatureScope, IqHandler, IqRequest, IqTarget};

pub struct Version;

#[async_trait]
impl IqHandler for Version {
    fn payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[("query", ns::VERSION)]
    }
    fn features(&self, scope: FeatureScope) -> &'static [&'static str] {
        match scope {
            FeatureScope::Server => &[ns::VERSION],
            FeatureScope::Account => &[],
        }
    }
    async fn handle(&self, req: IqRequest<'_>) -> Result<Option<Element>, StanzaError> {
        if !matches!(req.target, IqTarget::Server(_)) {
            return Err(StanzaError::new(StanzaErrorCondition::ServiceUnavailable));
        }
        if req.set {
            return Err(StanzaError::new(StanzaErrorCondition::NotAllowed));
        }
        Ok(Some(
            Element::new("query", ns::VERSION)
                .with_child(Element::new("name", ns::VERSION).with_text("confab"))
                .with_child(
                    Element::new("version", ns::VERSION).with_text(env!("CARGO_PKG_VERSION")),
                ),
        ))
    }
}
