//! Deferred durability for a client stream (docs/durability.md): while a stream handles
//! the stanzas its client pipelined, the offline messages they store may return before
//! they are flushed; the stream then makes them durable, with one flush for the whole
//! batch, before it writes anything more to that client. So nothing the client hears
//! later on the stream — an iq result, a ping reply, a delivered message — can overtake
//! the durability of what it sent before.

use std::cell::Cell;
use std::future::Future;

use confab_storage::SyncPoint;

tokio::task_local! {
    static PENDING: Cell<SyncPoint>;
}

/// Runs `f` in a scope where storage writes may be deferred; returns what `f` returned
/// and the point to sync before acknowledging anything (`DURABLE` when nothing waits).
pub async fn deferring<F: Future>(f: F) -> (F::Output, SyncPoint) {
    PENDING
        .scope(Cell::new(SyncPoint::DURABLE), async move {
            let out = f.await;
            (out, PENDING.with(Cell::get))
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
    PENDING.try_with(|p| p.set(p.get().max(point))).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn points_are_collected_only_inside_the_scope() {
        assert!(!can_defer());
        assert!(!defer(SyncPoint(3)));
        let ((), point) = deferring(async {
            assert!(can_defer());
            assert!(defer(SyncPoint(5)));
            assert!(defer(SyncPoint(2)));
        })
        .await;
        assert_eq!(point, SyncPoint(5));
        let ((), point) = deferring(async {}).await;
        assert_eq!(point, SyncPoint::DURABLE);
    }
}
