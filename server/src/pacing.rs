//! Pacing a client by the recipients it loads (DESIGN: a fast sender is slowed before a
//! healthy recipient is ever cut off).
//!
//! While a client stream handles one of its stanzas, every session whose queue that
//! stanza loaded past a quarter of a bound is noted here ([`note`], called by
//! [`SessionHandle::send`]). Before the stream reads its next stanza it waits for each of
//! them to write some out ([`wait`]); while it waits it reads nothing, so TCP holds the
//! sending client back. A recipient that keeps up lets it go on at once; one that writes
//! nothing for [`crate::router::NO_PROGRESS`] has stopped reading and is disconnected.
//! Stanzas not caused by a client stream (federation, server work) are not paced; the
//! queue's bounds still hold for them.

use std::cell::RefCell;
use std::future::Future;

use crate::router::SessionHandle;

/// Recipients noted for one stanza at most; a broadcast to more waits for these.
const MAX_NOTED: usize = 64;

tokio::task_local! {
    static LOADED: RefCell<Vec<SessionHandle>>;
}

/// Runs `f` and returns, besides its output, the sessions it loaded.
pub async fn collecting<F: Future>(f: F) -> (F::Output, Vec<SessionHandle>) {
    LOADED
        .scope(RefCell::new(Vec::new()), async move {
            let out = f.await;
            let loaded = LOADED.with(|l| std::mem::take(&mut *l.borrow_mut()));
            (out, loaded)
        })
        .await
}

/// Notes a session that the stanza being handled loaded (outside [`collecting`]: nothing).
pub fn note(session: &SessionHandle) {
    let _ = LOADED.try_with(|l| {
        let mut l = l.borrow_mut();
        if l.len() < MAX_NOTED && !l.iter().any(|s| s.id == session.id) {
            l.push(session.clone());
        }
    });
}

/// Waits for each loaded session but the sender's own (its queue drains when its stream
/// goes back to writing, which waiting here would prevent).
pub async fn wait(loaded: Vec<SessionHandle>, own: u64) {
    for session in loaded {
        if session.id != own {
            session.wait_until_unloaded().await;
        }
    }
}
