//! XEP-0049: Private XML Storage, one record per (element name, namespace).

use async_trait::async_trait;
use confab_protocol::{ns, Element, StanzaError, StanzaErrorCondition};

use super::vcard::internal;
use super::{FeatureScope, IqHandler, IqRequest, IqTarget};

pub struct Private;

fn key(e: &Element) -> String {
    format!("private\u{1}{}\u{1}{}", e.ns(), e.name())
}

#[async_trait]
impl IqHandler for Private {
    fn payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[("query", ns::PRIVATE)]
    }
    fn features(&self, _scope: FeatureScope) -> &'static [&'static str] {
        &[]
    }
    async fn handle(&self, req: IqRequest<'_>) -> Result<Option<Element>, StanzaError> {
        let IqTarget::Account(owner) = req.target else {
            return Err(StanzaError::new(StanzaErrorCondition::ServiceUnavailable));
        };
        // XEP-0049 §3: only the owner may touch its private storage.
        if !req.is_own_account() {
            return Err(StanzaError::new(StanzaErrorCondition::Forbidden));
        }
        let children: Vec<&Element> = req.payload.children().collect();
        if children.is_empty() {
            return Err(StanzaError::new(StanzaErrorCondition::BadRequest));
        }
        // §3: the data must be qualified by a namespace of its own, not jabber:*.
        if children
            .iter()
            .any(|c| c.ns().is_empty() || c.ns().starts_with("jabber:"))
        {
            return Err(StanzaError::new(StanzaErrorCondition::NotAcceptable));
        }
        let storage = &req.server.storage;
        if req.set {
            for c in children {
                storage
                    .put_user_data(owner, &key(c), c.to_xml("").into_bytes())
                    .await
                    .map_err(internal)?;
            }
            return Ok(None);
        }
        let [asked] = children.as_slice() else {
            return Err(StanzaError::new(StanzaErrorCondition::NotAcceptable));
        };
        let mut query = Element::new("query", ns::PRIVATE);
        match storage
            .get_user_data(owner, &key(asked))
            .await
            .map_err(internal)?
        {
            Some(bytes) => {
                let stored = String::from_utf8(bytes)
                    .ok()
                    .and_then(|s| Element::parse(&s).ok())
                    .ok_or_else(|| StanzaError::new(StanzaErrorCondition::InternalServerError))?;
                query.append_child(stored);
            }
            None => {
                query.append_child(Element::new(asked.name(), asked.namespace().clone()));
            }
        }
        Ok(Some(query))
    }
}
