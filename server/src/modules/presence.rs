//! RFC 6121 §3 and §4: subscriptions and presence.
//!
//! Outbound handling runs for stanzas from a local client; inbound handling runs for
//! presence addressed to a local account, whatever its origin, so local and (later)
//! remote contacts take the same path.

use std::sync::Arc;

use confab_protocol::{ns, Element, StanzaErrorCondition as Cond};
use confab_storage::{RosterItem, Subscription};

use super::{offline, roster, FeatureScope};
use crate::jid::Addr;
use crate::router::{PresenceState, SessionHandle};
use crate::server::Server;
use crate::stanza;

const PENDING_PREFIX: &str = "pending-in\u{1}";

pub fn features(_scope: FeatureScope) -> Vec<&'static str> {
    Vec::new()
}

fn pending_key(contact: &str) -> String {
    format!("{PENDING_PREFIX}{contact}")
}

/// Why one more pending request for `owner` from `contact` would be too many, if it would:
/// `limits.max_pending_subscriptions` in all, a quarter of it from one remote domain.
async fn pending_full(server: &Arc<Server>, owner: &str, contact: &str) -> Option<&'static str> {
    let max = server.config().limits.max_pending_subscriptions;
    let keys = match server.storage.list_user_data(owner, PENDING_PREFIX).await {
        Ok(list) => list.into_iter().map(|(k, _)| k).collect::<Vec<_>>(),
        Err(e) => {
            tracing::error!(error = %e, "reading pending subscriptions failed");
            return Some("the store could not be read");
        }
    };
    if keys.len() >= max {
        return Some("the account holds as many pending requests as it may");
    }
    let domain_of = |jid: &str| jid.rsplit_once('@').map_or(jid, |(_, d)| d).to_string();
    let domain = domain_of(contact);
    // The share per domain is for remote domains: our own users are accountable here.
    if server.is_local_domain(&domain) {
        return None;
    }
    let from_domain = keys
        .iter()
        .filter_map(|k| k.strip_prefix(PENDING_PREFIX))
        .filter(|c| domain_of(c) == domain)
        .count();
    if from_domain >= (max / 4).max(1) {
        return Some("the account holds as many pending requests from that domain as it may");
    }
    None
}

/// A presence stanza sent by a local client (`from` stamped with its full JID).
pub async fn outbound(
    server: &Arc<Server>,
    session: &SessionHandle,
    stanza: Element,
    to: Option<Addr>,
) {
    let ty = stanza::stanza_type(&stanza).to_string();
    match (ty.as_str(), to) {
        ("available", None) => broadcast_available(server, session, stanza).await,
        ("unavailable", None) => {
            let state = server.router.update_presence(session, take_unavailable);
            if let Some(state) = state {
                broadcast_unavailable(server, session, state, Some(stanza), true).await;
            }
        }
        ("available" | "unavailable", Some(to)) => {
            directed(server, session, stanza, ty == "available", to).await
        }
        ("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed", Some(to)) => {
            outbound_subscription(server, session, &ty, stanza, to).await
        }
        ("probe", Some(to)) => {
            let mut p = stanza;
            p.set_attr("from", session.bare.clone());
            p.set_attr("to", to.bare());
            server.route(p).await;
        }
        ("error", Some(_)) => server.route(stanza).await,
        _ => server.send_error(&stanza, Cond::BadRequest),
    }
}

fn take_unavailable(p: &mut PresenceState) -> PresenceState {
    let old = std::mem::take(p);
    p.interested = old.interested;
    old
}

fn parse_priority(p: &Element) -> i8 {
    // RFC 6121 §4.7.2.3: an integer in -128..=127; anything else is treated as 0.
    p.get_child("priority", ns::CLIENT)
        .and_then(|e| e.text().trim().parse::<i8>().ok())
        .unwrap_or(0)
}

async fn broadcast_available(server: &Arc<Server>, session: &SessionHandle, mut p: Element) {
    p.remove_attr("to");
    let priority = parse_priority(&p);
    let (was_available, old_priority) = server
        .router
        .update_presence(session, |s| {
            let was = (s.available, s.priority);
            s.available = true;
            s.priority = priority;
            s.last = Some(p.clone());
            was
        })
        .unwrap_or((true, priority));
    let owner = &session.bare;
    let items = match server.storage.roster(owner).await {
        Ok((_, items)) => items,
        Err(e) => {
            tracing::error!(error = %e, "roster read failed");
            Vec::new()
        }
    };
    // §4.2.2 / §4.4.2: to every contact subscribed to us, and to all our own resources.
    for item in items.iter().filter(|i| subscribed_from(i)) {
        let mut copy = p.clone();
        copy.set_attr("to", item.jid.clone());
        server.route(copy).await;
    }
    let own = server.router.resources(owner);
    for r in &own {
        if r.presence.available {
            let mut copy = p.clone();
            copy.set_attr("to", r.handle.full_jid());
            r.handle.send(copy);
        }
    }
    if !was_available {
        // §4.2.2: an entity is implicitly subscribed to its own presence, so a newly
        // available resource learns the presence of the account's other resources.
        for r in &own {
            if let (true, false, Some(last)) = (
                r.presence.available,
                r.handle.id == session.id,
                &r.presence.last,
            ) {
                let mut copy = last.clone();
                copy.set_attr("to", session.full_jid());
                session.send(copy);
            }
        }
        // §4.2.2: initial presence probes the contacts we are subscribed to.
        for item in items.iter().filter(|i| subscribed_to(i)) {
            server
                .route(stanza::presence(Some("probe"), owner, &item.jid))
                .await;
        }
        // §3.1.3: subscription requests that arrived while offline; no more than the
        // account may hold (a store from before that bound may hold more: the rest come
        // at later logins, as these are answered), so a login never floods its queue.
        let most = server.config().limits.max_pending_subscriptions;
        match server.storage.list_user_data(owner, PENDING_PREFIX).await {
            Ok(list) => {
                for (_, bytes) in list.into_iter().take(most) {
                    if let Some(req) = String::from_utf8(bytes)
                        .ok()
                        .and_then(|s| Element::parse(&s).ok())
                    {
                        session.send(req);
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "reading pending subscriptions failed"),
        }
    }
    // §8.5.2.2.1 / XEP-0160: stored messages go to a resource once it becomes available
    // with a non-negative priority, not again on every later presence update (a second
    // read of the queue before the first delivery is deleted would duplicate them).
    if priority >= 0 && (!was_available || old_priority < 0) {
        offline::deliver(server, session).await;
    }
}

/// Sends unavailable presence for a session that went unavailable or away.
/// `to_self` is false when the session itself is gone.
pub async fn broadcast_unavailable(
    server: &Arc<Server>,
    session: &SessionHandle,
    state: PresenceState,
    stanza: Option<Element>,
    to_self: bool,
) {
    if !state.available && state.directed.is_empty() {
        return;
    }
    let mut p = stanza.unwrap_or_else(|| Element::new("presence", ns::CLIENT));
    p.set_attr("type", "unavailable");
    p.set_attr("from", session.full_jid());
    p.remove_attr("to");
    let owner = &session.bare;
    let mut targets: Vec<String> = state.directed.clone();
    if state.available {
        if let Ok((_, items)) = server.storage.roster(owner).await {
            for item in items.iter().filter(|i| subscribed_from(i)) {
                if !targets.contains(&item.jid) {
                    targets.push(item.jid.clone());
                }
            }
        }
    }
    for t in targets {
        let mut copy = p.clone();
        copy.set_attr("to", t);
        server.route(copy).await;
    }
    if state.available {
        // The session's own state was already taken (it is no longer available), so the
        // loop never includes it; the sender gets its unavailable back explicitly
        // (§4.5.2, like initial and subsequent presence in §4.2.2 / §4.4.2).
        for r in server.router.resources(owner) {
            if r.presence.available && r.handle.id != session.id {
                let mut copy = p.clone();
                copy.set_attr("to", r.handle.full_jid());
                r.handle.send(copy);
            }
        }
        if to_self {
            let mut copy = p.clone();
            copy.set_attr("to", session.full_jid());
            session.send(copy);
        }
    }
}

/// A session ended (logout or dropped connection): §4.5.2 unavailable on its behalf.
pub async fn session_ended(server: &Arc<Server>, session: &SessionHandle, state: PresenceState) {
    broadcast_unavailable(server, session, state, None, false).await;
}

/// §4.6: directed presence, remembered so unavailable reaches it later.
async fn directed(
    server: &Arc<Server>,
    session: &SessionHandle,
    stanza: Element,
    available: bool,
    to: Addr,
) {
    let target = to.to_string();
    let subscribed = match server.storage.roster_item(&session.bare, &to.bare()).await {
        Ok(Some(item)) => subscribed_from(&item),
        _ => false,
    };
    if !subscribed {
        server.router.update_presence(session, |s| {
            s.directed.retain(|d| d != &target);
            if available {
                s.directed.push(target.clone());
            }
        });
    }
    server.route(stanza).await;
}

fn subscribed_from(i: &RosterItem) -> bool {
    matches!(i.subscription, Subscription::From | Subscription::Both)
}

fn subscribed_to(i: &RosterItem) -> bool {
    matches!(i.subscription, Subscription::To | Subscription::Both)
}

fn new_item(jid: &str) -> RosterItem {
    RosterItem {
        jid: jid.to_string(),
        name: None,
        subscription: Subscription::None,
        ask: false,
        approved: false,
        groups: Vec::new(),
    }
}

async fn has_pending_in(server: &Arc<Server>, owner: &str, contact: &str) -> bool {
    matches!(
        server
            .storage
            .get_user_data(owner, &pending_key(contact))
            .await,
        Ok(Some(_))
    )
}

pub async fn clear_pending_in(server: &Arc<Server>, owner: &str, contact: &str) {
    if let Err(e) = server
        .storage
        .delete_user_data(owner, &pending_key(contact))
        .await
    {
        tracing::error!(error = %e, "clearing a pending subscription failed");
        crate::durability::failed();
    }
}

async fn save(server: &Arc<Server>, owner: &str, item: RosterItem) {
    if let Err(e) = roster::save_and_push(server, owner, item).await {
        tracing::error!(error = %e, "roster update failed");
        crate::durability::failed();
    }
}

/// Sends the current presence of every available resource of `owner` to `contact`.
async fn send_current_presence(server: &Arc<Server>, owner: &str, contact: &str) {
    for r in server.router.resources(owner) {
        if let (true, Some(last)) = (r.presence.available, &r.presence.last) {
            let mut copy = last.clone();
            copy.set_attr("to", contact);
            server.route(copy).await;
        }
    }
}

pub(crate) async fn send_unavailable_from_all(server: &Arc<Server>, owner: &str, contact: &str) {
    for r in server.router.resources(owner) {
        if r.presence.available {
            server
                .route(stanza::presence(
                    Some("unavailable"),
                    &r.handle.full_jid(),
                    contact,
                ))
                .await;
        }
    }
}

/// §3.1.2, §3.2.2, §3.3.2, §3.4: subscription stanzas from a local user.
async fn outbound_subscription(
    server: &Arc<Server>,
    session: &SessionHandle,
    ty: &str,
    mut stanza: Element,
    to: Addr,
) {
    let owner = session.bare.clone();
    let contact = to.bare();
    if contact == owner {
        // Subscribing to oneself is implicit (RFC 6121 §4.4 note); nothing to do.
        return;
    }
    // §3.1.2: subscription stanzas carry the bare JIDs of both parties.
    stanza.set_attr("from", owner.clone());
    stanza.set_attr("to", contact.clone());
    let existing = match server.storage.roster_item(&owner, &contact).await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "roster read failed");
            server.send_error(&stanza, Cond::InternalServerError);
            return;
        }
    };
    match ty {
        "subscribe" => {
            let mut item = existing.unwrap_or_else(|| new_item(&contact));
            if !subscribed_to(&item) && !item.ask {
                item.ask = true;
                save(server, &owner, item).await;
            }
            server.route(stanza).await;
        }
        "subscribed" => {
            let mut item = existing.unwrap_or_else(|| new_item(&contact));
            if subscribed_from(&item) {
                return;
            }
            if has_pending_in(server, &owner, &contact).await {
                item.subscription = match item.subscription {
                    Subscription::To => Subscription::Both,
                    _ => Subscription::From,
                };
                item.approved = false;
                save(server, &owner, item).await;
                clear_pending_in(server, &owner, &contact).await;
                server.route(stanza).await;
                send_current_presence(server, &owner, &contact).await;
            } else if !item.approved {
                // §3.4: pre-approval; not routed.
                item.approved = true;
                save(server, &owner, item).await;
            }
        }
        "unsubscribe" => {
            if let Some(mut item) = existing {
                if subscribed_to(&item) || item.ask {
                    item.subscription = match item.subscription {
                        Subscription::Both => Subscription::From,
                        Subscription::From => Subscription::From,
                        _ => Subscription::None,
                    };
                    item.ask = false;
                    save(server, &owner, item).await;
                }
            }
            server.route(stanza).await;
        }
        "unsubscribed" => {
            let pending = has_pending_in(server, &owner, &contact).await;
            if pending {
                clear_pending_in(server, &owner, &contact).await;
            }
            let mut was_from = false;
            if let Some(mut item) = existing {
                if subscribed_from(&item) || item.approved {
                    was_from = subscribed_from(&item);
                    item.subscription = match item.subscription {
                        Subscription::Both => Subscription::To,
                        Subscription::To => Subscription::To,
                        _ => Subscription::None,
                    };
                    item.approved = false;
                    save(server, &owner, item).await;
                }
            }
            if pending || was_from {
                server.route(stanza).await;
            }
            if was_from {
                send_unavailable_from_all(server, &owner, &contact).await;
            }
        }
        _ => {}
    }
}

/// Presence addressed to a local account that exists (`resource` when to a full JID).
pub async fn inbound(
    server: &Arc<Server>,
    owner: &str,
    resource: Option<&str>,
    mut stanza: Element,
) {
    let ty = stanza::stanza_type(&stanza).to_string();
    let Some(from) = stanza.attr("from").and_then(|f| Addr::parse(f).ok()) else {
        return;
    };
    match ty.as_str() {
        "available" | "unavailable" | "error" => {
            if !server.is_local_domain(&from.domain) {
                track_remote(server, owner, &from, ty == "available");
            }
            match resource {
                Some(res) => {
                    if let Some(r) = server.router.resource(owner, res) {
                        r.handle.send(stanza);
                    }
                }
                None => deliver_to_available(server, owner, &stanza),
            }
        }
        "probe" => answer_probe(server, owner, &from).await,
        "subscribe" | "subscribed" | "unsubscribe" | "unsubscribed" => {
            let contact = from.bare();
            stanza.set_attr("from", contact.clone());
            stanza.set_attr("to", owner);
            inbound_subscription(server, owner, &contact, &ty, stanza).await;
        }
        _ => {}
    }
}

/// §3.1.6, §3.2.3, §3.3.3: subscription answers and cancellations go to the
/// interested resources (those that requested the roster), available or not.
fn deliver_to_interested(server: &Arc<Server>, owner: &str, stanza: &Element) {
    for r in server.router.resources(owner) {
        if r.presence.interested {
            r.handle.send(stanza.clone());
        }
    }
}

fn deliver_to_available(server: &Arc<Server>, owner: &str, stanza: &Element) {
    for r in server.router.resources(owner) {
        if r.presence.available {
            r.handle.send(stanza.clone());
        }
    }
}

/// §4.3.2: answer a probe with the last presence of each available resource.
async fn answer_probe(server: &Arc<Server>, owner: &str, from: &Addr) {
    let prober = from.bare();
    let allowed = prober == owner
        || matches!(server.storage.roster_item(owner, &prober).await, Ok(Some(i)) if subscribed_from(&i));
    if !allowed {
        return;
    }
    let reply_to = from.to_string();
    let mut any = false;
    for r in server.router.resources(owner) {
        if let (true, Some(last)) = (r.presence.available, &r.presence.last) {
            let mut copy = last.clone();
            copy.set_attr("to", reply_to.clone());
            server.route(copy).await;
            any = true;
        }
    }
    if !any {
        server
            .route(stanza::presence(Some("unavailable"), owner, &reply_to))
            .await;
    }
}

/// §3.1.3, §3.1.6, §3.2.3, §3.3.3: subscription stanzas to a local user.
async fn inbound_subscription(
    server: &Arc<Server>,
    owner: &str,
    contact: &str,
    ty: &str,
    stanza: Element,
) {
    let existing = match server.storage.roster_item(owner, contact).await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "roster read failed");
            return;
        }
    };
    match ty {
        "subscribe" => {
            if let Some(mut item) = existing {
                if subscribed_from(&item) {
                    // Already approved: answer on the user's behalf.
                    server
                        .route(stanza::presence(Some("subscribed"), owner, contact))
                        .await;
                    return;
                }
                if item.approved {
                    item.subscription = match item.subscription {
                        Subscription::To => Subscription::Both,
                        _ => Subscription::From,
                    };
                    item.approved = false;
                    save(server, owner, item).await;
                    server
                        .route(stanza::presence(Some("subscribed"), owner, contact))
                        .await;
                    send_current_presence(server, owner, contact).await;
                    return;
                }
            }
            // Keep the request until the user answers; deliver it now to whoever is online.
            // Requests kept are bounded per account and per domain: a peer that sends
            // thousands from distinct JIDs fills neither the store nor a later login.
            if !has_pending_in(server, owner, contact).await {
                if let Some(why) = pending_full(server, owner, contact).await {
                    tracing::warn!(%owner, %contact, why, "subscription request refused");
                    if let Some(reply) = stanza::error_reply(&stanza, Cond::ResourceConstraint) {
                        server.route(reply).await;
                    }
                    return;
                }
            }
            let bytes = stanza.to_xml("").into_bytes();
            if let Err(e) = server
                .storage
                .put_user_data(owner, &pending_key(contact), bytes)
                .await
            {
                tracing::error!(error = %e, "storing a subscription request failed");
                crate::durability::failed();
            }
            deliver_to_available(server, owner, &stanza);
        }
        "subscribed" => {
            if let Some(mut item) = existing {
                if item.ask && !subscribed_to(&item) {
                    item.subscription = match item.subscription {
                        Subscription::From => Subscription::Both,
                        _ => Subscription::To,
                    };
                    item.ask = false;
                    save(server, owner, item).await;
                    deliver_to_interested(server, owner, &stanza);
                }
            }
        }
        "unsubscribe" => {
            let pending = has_pending_in(server, owner, contact).await;
            if pending {
                clear_pending_in(server, owner, contact).await;
            }
            let mut changed = false;
            if let Some(mut item) = existing {
                if subscribed_from(&item) {
                    item.subscription = match item.subscription {
                        Subscription::Both => Subscription::To,
                        _ => Subscription::None,
                    };
                    save(server, owner, item).await;
                    changed = true;
                }
            }
            if changed || pending {
                deliver_to_interested(server, owner, &stanza);
            }
            if changed {
                send_unavailable_from_all(server, owner, contact).await;
            }
        }
        "unsubscribed" => {
            if let Some(mut item) = existing {
                if subscribed_to(&item) || item.ask {
                    item.subscription = match item.subscription {
                        Subscription::Both => Subscription::From,
                        Subscription::From => Subscription::From,
                        _ => Subscription::None,
                    };
                    item.ask = false;
                    save(server, owner, item).await;
                    deliver_to_interested(server, owner, &stanza);
                }
            }
        }
        _ => {}
    }
}

/// Remembers which local accounts saw a remote resource available (only full JIDs:
/// a bare unavailable from a remote server covers all of its resources).
fn track_remote(server: &Arc<Server>, owner: &str, from: &Addr, available: bool) {
    let mut map = server
        .remote_presence
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let domain = map.entry(from.domain.clone()).or_default();
    let full = from.to_string();
    if available {
        domain.entry(full).or_default().insert(owner.to_string());
    } else if from.resource.is_none() {
        let bare = from.bare();
        domain.retain(|jid, owners| {
            if jid.split('/').next() == Some(bare.as_str()) {
                owners.remove(owner);
            }
            !owners.is_empty()
        });
    } else if let Some(owners) = domain.get_mut(&full) {
        owners.remove(owner);
        if owners.is_empty() {
            domain.remove(&full);
        }
    }
    if domain.is_empty() {
        map.remove(&from.domain);
    }
}

/// A remote server went away without telling: its resources are unavailable to every
/// local account that saw them available.
pub async fn remote_gone(server: &Arc<Server>, domain: &str) {
    let gone = server
        .remote_presence
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(domain)
        .unwrap_or_default();
    for (remote, owners) in gone {
        for owner in owners {
            let p = stanza::presence(Some("unavailable"), &remote, &owner);
            deliver_to_available(server, &owner, &p);
        }
    }
}
