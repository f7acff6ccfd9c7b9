//! RFC 6121 §2: the roster — get (with versioning, §2.6), set, remove, pushes.

use std::sync::Arc;

use async_trait::async_trait;
use confab_protocol::{ns, Element, StanzaError, StanzaErrorCondition as Cond};
use confab_storage::{RosterItem, Subscription};

use super::vcard::internal;
use super::{FeatureScope, IqHandler, IqRequest, IqTarget};
use crate::jid::Addr;
use crate::server::Server;
use crate::stanza;

/// Longest item name or group name accepted (RFC 6121 §2.1.2.3 lets servers limit them).
const MAX_NAME: usize = 1023;
const MAX_GROUPS: usize = 64;

pub struct Roster;

#[async_trait]
impl IqHandler for Roster {
    fn payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[("query", ns::ROSTER)]
    }
    fn features(&self, _scope: FeatureScope) -> &'static [&'static str] {
        &[]
    }
    async fn handle(&self, req: IqRequest<'_>) -> Result<Option<Element>, StanzaError> {
        let IqTarget::Account(owner) = req.target else {
            return Err(StanzaError::new(Cond::ServiceUnavailable));
        };
        // §2.1.5 / §2.3.3: only the account itself reads or changes its roster.
        if !req.is_own_account() {
            return Err(StanzaError::new(Cond::Forbidden));
        }
        if req.set {
            set(req.server, owner, req.payload).await.map(|()| None)
        } else {
            if let Some(s) = req.session {
                req.server
                    .router
                    .update_presence(s, |p| p.interested = true);
            }
            get(req.server, owner, req.payload.attr("ver")).await
        }
    }
}

async fn get(
    server: &Arc<Server>,
    owner: &str,
    ver: Option<&str>,
) -> Result<Option<Element>, StanzaError> {
    let (version, items) = server.storage.roster(owner).await.map_err(internal)?;
    let current = version.to_string();
    // §2.6.3: an unchanged roster is answered with an empty result.
    if ver == Some(current.as_str()) {
        return Ok(None);
    }
    let mut query = Element::new("query", ns::ROSTER).with_attr("ver", current);
    for item in &items {
        query.append_child(item_element(item));
    }
    Ok(Some(query))
}

async fn set(server: &Arc<Server>, owner: &str, query: &Element) -> Result<(), StanzaError> {
    // §2.3.3: exactly one item.
    let mut items = query.children().filter(|c| c.is("item", ns::ROSTER));
    let (Some(item), None) = (items.next(), items.next()) else {
        return Err(
            StanzaError::new(Cond::BadRequest).with_text("a roster set carries exactly one item")
        );
    };
    if query.children().count() != 1 {
        return Err(StanzaError::new(Cond::BadRequest));
    }
    let jid = item
        .attr("jid")
        .ok_or_else(|| StanzaError::new(Cond::BadRequest).with_text("item without jid"))?;
    let contact = Addr::parse(jid).map_err(|_| StanzaError::new(Cond::JidMalformed))?;
    if contact.resource.is_some() {
        return Err(StanzaError::new(Cond::JidMalformed).with_text("roster items are bare JIDs"));
    }
    let contact = contact.bare();
    let existing = server
        .storage
        .roster_item(owner, &contact)
        .await
        .map_err(internal)?;
    // §2.1.2.5: "in a roster set the server MUST ignore all values of the 'subscription'
    // attribute other than 'remove'": the subscription state changes only through
    // presence subscription stanzas (§3), never by a roster set.
    if item.attr("subscription") == Some("remove") {
        return remove(server, owner, &contact, existing).await;
    }
    let name = match item.attr("name") {
        Some(n) if n.chars().count() > MAX_NAME => {
            return Err(StanzaError::new(Cond::NotAcceptable).with_text("name too long"))
        }
        Some("") | None => None,
        Some(n) => Some(n.to_string()),
    };
    let mut groups: Vec<String> = Vec::new();
    for g in item.children() {
        if !g.is("group", ns::ROSTER) {
            continue;
        }
        let text = g.text();
        // §2.3.3: an empty group name is not-acceptable, a duplicate group bad-request.
        if text.is_empty() || text.chars().count() > MAX_NAME {
            return Err(StanzaError::new(Cond::NotAcceptable).with_text("bad group name"));
        }
        if groups.contains(&text) {
            return Err(StanzaError::new(Cond::BadRequest).with_text("duplicate group"));
        }
        groups.push(text);
    }
    if groups.len() > MAX_GROUPS {
        return Err(StanzaError::new(Cond::NotAcceptable).with_text("too many groups"));
    }
    let mut new = existing.unwrap_or(RosterItem {
        jid: contact.clone(),
        name: None,
        subscription: Subscription::None,
        ask: false,
        approved: false,
        groups: Vec::new(),
    });
    new.name = name;
    new.groups = groups;
    save_and_push(server, owner, new).await
}

async fn remove(
    server: &Arc<Server>,
    owner: &str,
    contact: &str,
    existing: Option<RosterItem>,
) -> Result<(), StanzaError> {
    let Some(item) = existing else {
        return Err(StanzaError::new(Cond::ItemNotFound));
    };
    // §2.5.2: cancel both directions of the subscription with the contact.
    if matches!(item.subscription, Subscription::To | Subscription::Both) || item.ask {
        server
            .route(stanza::presence(Some("unsubscribe"), owner, contact))
            .await;
    }
    if matches!(item.subscription, Subscription::From | Subscription::Both) {
        server
            .route(stanza::presence(Some("unsubscribed"), owner, contact))
            .await;
        // §3.2.2: cancelling the contact's subscription also ends the presence it
        // received: unavailable from each of our available resources.
        super::presence::send_unavailable_from_all(server, owner, contact).await;
    }
    super::presence::clear_pending_in(server, owner, contact).await;
    let version = server
        .storage
        .remove_roster_item(owner, contact)
        .await
        .map_err(internal)?;
    let removed = Element::new("item", ns::ROSTER)
        .with_attr("jid", contact)
        .with_attr("subscription", "remove");
    push(server, owner, removed, version);
    Ok(())
}

/// Stores an item and pushes it to the owner's interested resources.
pub async fn save_and_push(
    server: &Arc<Server>,
    owner: &str,
    item: RosterItem,
) -> Result<(), StanzaError> {
    let element = item_element(&item);
    let version = server
        .storage
        .put_roster_item(owner, item)
        .await
        .map_err(internal)?;
    push(server, owner, element, version);
    Ok(())
}

/// §2.1.6: a roster push to every interested resource of `owner`.
pub fn push(server: &Arc<Server>, owner: &str, item: Element, version: u64) {
    for r in server.router.resources(owner) {
        if !r.presence.interested {
            continue;
        }
        let iq = Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("id", stanza::random_id())
            .with_attr("to", r.handle.full_jid())
            .with_child(
                Element::new("query", ns::ROSTER)
                    .with_attr("ver", version.to_string())
                    .with_child(item.clone()),
            );
        r.handle.send(iq);
    }
}

/// The wire form of an item (§2.1.2).
pub fn item_element(item: &RosterItem) -> Element {
    let mut e = Element::new("item", ns::ROSTER)
        .with_attr("jid", item.jid.clone())
        .with_attr("subscription", item.subscription.as_str());
    if let Some(n) = &item.name {
        e.set_attr("name", n.clone());
    }
    if item.ask {
        e.set_attr("ask", "subscribe");
    }
    if item.approved {
        e.set_attr("approved", "true");
    }
    for g in &item.groups {
        e.append_child(Element::new("group", ns::ROSTER).with_text(g.clone()));
    }
    e
}
