//! The legacy session establishment of RFC 3921, still sent by some clients; RFC 6121
//! Appendix E lets the server announce it as optional and answer with an empty result.

use async_trait::async_trait;
use confab_protocol::{ns, Element, StanzaError, StanzaErrorCondition};

use super::{FeatureScope, IqHandler, IqRequest};

pub struct Session;

#[async_trait]
impl IqHandler for Session {
    fn payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[("session", ns::SESSION)]
    }
    fn features(&self, _scope: FeatureScope) -> &'static [&'static str] {
        &[]
    }
    async fn handle(&self, req: IqRequest<'_>) -> Result<Option<Element>, StanzaError> {
        if req.set && req.session.is_some() {
            Ok(None)
        } else {
            Err(StanzaError::new(StanzaErrorCondition::BadRequest))
        }
    }
}
