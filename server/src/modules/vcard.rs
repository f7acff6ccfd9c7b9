//! XEP-0054: vcard-temp. Each account stores its own vCard; anyone may read it.

use async_trait::async_trait;
use confab_protocol::{ns, Element, StanzaError, StanzaErrorCondition};

use super::{FeatureScope, IqHandler, IqRequest, IqTarget};

const KEY: &str = "vcard";

pub struct VCard;

#[async_trait]
impl IqHandler for VCard {
    fn payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[("vCard", ns::VCARD)]
    }
    fn features(&self, scope: FeatureScope) -> &'static [&'static str] {
        match scope {
            FeatureScope::Server => &[ns::VCARD],
            FeatureScope::Account => &[],
        }
    }
    async fn handle(&self, req: IqRequest<'_>) -> Result<Option<Element>, StanzaError> {
        let IqTarget::Account(owner) = req.target else {
            // The server has no vCard of its own.
            return if req.set {
                Err(StanzaError::new(StanzaErrorCondition::NotAllowed))
            } else {
                Ok(Some(Element::new("vCard", ns::VCARD)))
            };
        };
        let storage = &req.server.storage;
        if req.set {
            if !req.is_own_account() {
                return Err(StanzaError::new(StanzaErrorCondition::Forbidden));
            }
            let xml = req.payload.to_xml("");
            storage
                .put_user_data(owner, KEY, xml.into_bytes())
                .await
                .map_err(internal)?;
            return Ok(None);
        }
        match storage.get_user_data(owner, KEY).await.map_err(internal)? {
            Some(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| corrupt())?;
                Ok(Some(Element::parse(&text).map_err(|_| corrupt())?))
            }
            // XEP-0054 §3.1: no vCard yet is an empty vCard for the owner.
            None if req.is_own_account() => Ok(Some(Element::new("vCard", ns::VCARD))),
            None => Err(StanzaError::new(StanzaErrorCondition::ItemNotFound)),
        }
    }
}

pub(crate) fn internal(e: confab_storage::StorageError) -> StanzaError {
    tracing::error!(error = %e, "storage error");
    StanzaError::new(StanzaErrorCondition::InternalServerError)
}

fn corrupt() -> StanzaError {
    tracing::error!("stored vCard does not parse");
    StanzaError::new(StanzaErrorCondition::InternalServerError)
}
