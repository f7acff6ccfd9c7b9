//! XEP-0199: XMPP Ping. The server answers pings to itself and to accounts.

use async_trait::async_trait;
use confab_protocol::{ns, Element, StanzaError, StanzaErrorCondition};

use super::{FeatureScope, IqHandler, IqRequest};

pub struct Ping;

#[async_trait]
impl IqHandler for Ping {
    fn payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[("ping", ns::PING)]
    }
    fn features(&self, _scope: FeatureScope) -> &'static [&'static str] {
        &[ns::PING]
    }
    async fn handle(&self, req: IqRequest<'_>) -> Result<Option<Element>, StanzaError> {
        // XEP-0199 §4: a ping is an iq of type get; the answer is an empty result.
        if req.set {
            Err(StanzaError::new(StanzaErrorCondition::BadRequest))
        } else {
            Ok(None)
        }
    }
}
