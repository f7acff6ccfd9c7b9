//! Offline storage (RFC 6121 §8.5.2.2.1, XEP-0160): chat and normal messages to an
//! account without an available resource are stored with an XEP-0203 delay stamp and
//! delivered, in order, at its next available presence with non-negative priority.
//!
//! A stored message is deleted only after the session task has written it to the
//! recipient's stream (see [`crate::router::ToSession::Offline`]).

use std::sync::Arc;

use confab_protocol::{ns, Element, Node, StanzaErrorCondition as Cond};
use confab_storage::StorageError;

use super::FeatureScope;
use crate::router::SessionHandle;
use crate::server::Server;

pub fn features(scope: FeatureScope) -> Vec<&'static str> {
    match scope {
        FeatureScope::Server => vec!["msgoffline"],
        FeatureScope::Account => Vec::new(),
    }
}

const CHATSTATES: &str = "http://jabber.org/protocol/chatstates";

/// XEP-0160 §3: messages with only a chat state (or nothing) are not worth keeping.
fn worth_storing(m: &Element) -> bool {
    m.children()
        .any(|c| c.ns() != CHATSTATES && !c.is("thread", ns::CLIENT))
}

/// Stores a message for an account with no available resource.
pub async fn store(server: &Arc<Server>, owner: &str, mut message: Element) {
    if !worth_storing(&message) {
        return;
    }
    let domain = owner.rsplit('@').next().unwrap_or(owner);
    let delay = Element::new("delay", ns::DELAY)
        .with_attr("from", domain)
        .with_attr("stamp", stamp_now());
    // A sender-supplied delay claiming to come from this domain would be
    // indistinguishable from ours (XEP-0203 §3: `from` names the delaying entity).
    let ours = |n: &Node| matches!(n, Node::Element(e) if e.is("delay", ns::DELAY) && e.attr("from") == Some(domain));
    let mut bytes = Vec::with_capacity(STORED_CAPACITY);
    if message.nodes().iter().any(ours) {
        let mut stamped = message.clone();
        stamped.nodes_mut().retain(|n| !ours(n));
        stamped.append_child(delay);
        stamped.write_to(&mut bytes, "");
    } else {
        // The stamp is added for serializing only: an error reply quotes the message as
        // sent, not our internal stamp.
        message.append_child(delay);
        message.write_to(&mut bytes, "");
        message.nodes_mut().pop();
    }
    let max = server.config().limits.max_offline_messages;
    // From a client stream, the flush is left to the stream, which makes the message
    // durable before it answers anything later (crate::durability); from elsewhere
    // (server-to-server links) it is waited for here.
    let stored = if crate::durability::can_defer() {
        server
            .storage
            .push_offline_unsynced(owner, bytes, max)
            .await
            .map(|(seq, point)| {
                crate::durability::defer(point);
                seq
            })
    } else {
        server.storage.push_offline(owner, bytes, max).await
    };
    match stored {
        Ok(_) => server.stats.offline_stored(),
        Err(StorageError::QueueFull) => {
            server.send_error_text(
                &message,
                Cond::ServiceUnavailable,
                "the recipient's offline storage is full",
            );
        }
        Err(e) => {
            tracing::error!(error = %e, %owner, "storing an offline message failed");
            server.send_error(&message, Cond::InternalServerError);
        }
    }
}

/// What a stored message is serialized into at first: most chat messages fit.
const STORED_CAPACITY: usize = 512;

/// The XEP-0082 stamp of now, formatted once per millisecond (its resolution) per thread.
fn stamp_now() -> String {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static LAST: RefCell<(u128, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let ms = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != ms || last.1.is_empty() {
            *last = (ms, crate::stanza::timestamp(now));
        }
        last.1.clone()
    })
}

/// Stored messages handed to a session at once: a page, then the next once it was
/// written (`ToSession::Offline`), so a full queue of large messages is never parsed or
/// queued whole.
const PAGE_MESSAGES: usize = 64;
const PAGE_BYTES: usize = 512 * 1024;

/// Hands the oldest page of stored messages to a session that just became available (and,
/// called again by the session once it wrote a page, the next one).
pub async fn deliver(server: &Arc<Server>, session: &SessionHandle) {
    let list = match server
        .storage
        .offline_page(&session.bare, PAGE_MESSAGES, PAGE_BYTES)
        .await
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "reading offline messages failed");
            return;
        }
    };
    let Some(up_to) = list.last().map(|(seq, _)| *seq) else {
        return;
    };
    let bytes: usize = list.iter().map(|(_, b)| b.len()).sum();
    let more = list.len() >= PAGE_MESSAGES || bytes >= PAGE_BYTES;
    let mut stanzas = Vec::with_capacity(list.len());
    for (seq, bytes) in list {
        let parsed = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| Element::parse(s).ok());
        match parsed {
            Some(mut m) => {
                m.set_attr("to", session.full_jid());
                stanzas.push(m);
            }
            None => {
                tracing::error!(seq, owner = %session.bare, "skipping an unreadable offline message")
            }
        }
    }
    session.send_offline(stanzas, up_to, more);
}
