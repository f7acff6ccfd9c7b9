//! XEP-0202: Entity Time, answered for the server.

use async_trait::async_trait;
use confab_protocol::{ns, Element, StanzaError, StanzaErrorCondition};

use super::{FeatureScope, IqHandler, IqRequest, IqTarget};

pub struct Time;

#[async_trait]
impl IqHandler for Time {
    fn payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[("time", ns::TIME)]
    }
    fn features(&self, scope: FeatureScope) -> &'static [&'static str] {
        match scope {
            FeatureScope::Server => &[ns::TIME],
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
        // The server reports UTC: its clock is UTC-based and it has no user's zone.
        Ok(Some(
            Element::new("time", ns::TIME)
                .with_child(Element::new("tzo", ns::TIME).with_text("+00:00"))
                .with_child(
                    Element::new("utc", ns::TIME)
                        .with_text(crate::stanza::timestamp(std::time::SystemTime::now())),
                ),
        ))
    }
}
