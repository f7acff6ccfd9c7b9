//! Deferred durability for a client stream (docs/durability.md): while a stream handles
//! the stanzas its client pipelined, the offline messages they store may return before
//! they are flushed; the stream then makes them durable, with one flush for the whole
//! batch, before it writes anything more to that client. So nothing the client hears
//! later on the stream — an iq result, a ping reply, a delivered message — can overtake
//! the durability of what it sent before.
//!
//! A write that failed while a stanza was handled, and that has no error reply of its own
//! (the subscription state a presence changes, for one), is recorded with [`failed`]: the
//! stream then closes instead of acknowledging anything later, so a client's next ping can
//! never vouch for a write that did not happen.

use std::cell::Cell;
use std::future::Future;

use confab_storage::SyncPoint;

struct Scope {
    point: Cell<SyncPoint>,
    failed: Cell<bool>,
}

tokio::task_local! {
    static PENDING: Scope;
}

/// What a [`deferring`] scope leaves the stream to do before it acknowledges anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The point to sync (`DURABLE` when nothing waits).
    pub point: SyncPoint,
    /// A write failed without an error reply of its own: nothing may be acknowledged.
    pub failed: bool,
}

/// Runs `f` in a scope where storage writes may be deferred; returns what `f` returned
/// and what must happen before anything is acknowledged.
pub async fn deferring<F: Future>(f: F) -> (F::Output, Outcome) {
    let scope = Scope {
        point: Cell::new(SyncPoint::DURABLE),
        failed: Cell::new(false),
    };
    PENDING
        .scope(scope, async move {
            let out = f.await;
            let outcome = PENDING.with(|s| Outcome {
                point: s.point.get(),
                failed: s.failed.get(),
            });
            (out, outcome)
        })
        .await
}

/// Whether the caller runs inside [`deferring`]: only then may it skip waiting for a flush.
pub fn can_defer() -> bool {
    PENDING.try_with(|_| ()).is_ok()
}

/// Records a write whose flush the enclosing [`deferring`] scope must wait for. Outside
/// such a scope it returns false and the caller must sync itself.
pub fn defer(point: SyncPoint) -> bool {
    PENDING
        .try_with(|s| s.point.set(s.point.get().max(point)))
        .is_ok()
}

/// Records that a write failed and nothing told the client: the enclosing stream must
/// not acknowledge anything after it. Outside a [`deferring`] scope (work not caused by a
/// client's stanza) there is nobody to mislead and it does nothing.
pub fn failed() {
    let _ = PENDING.try_with(|s| s.failed.set(true));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn points_are_collected_only_inside_the_scope() {
        assert!(!can_defer());
        assert!(!defer(SyncPoint(3)));
        failed();
        let ((), outcome) = deferring(async {
            assert!(can_defer());
            assert!(defer(SyncPoint(5)));
            assert!(defer(SyncPoint(2)));
        })
        .await;
        assert_eq!(
            outcome,
            Outcome {
                point: SyncPoint(5),
                failed: false
            }
        );
        let ((), outcome) = deferring(async { failed() }).await;
        assert_eq!(
            outcome,
            Outcome {
                point: SyncPoint::DURABLE,
                failed: true
            }
        );
    }
}
