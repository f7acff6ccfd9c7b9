//! The session registry: which resources of which accounts are connected here, their
//! presence, and the queues that carry stanzas to them.
//!
//! Each connection task owns its socket; the router only holds a bounded sender. A
//! session's queue is bounded in stanzas and in bytes. A client whose stanza pushed a
//! recipient's queue past a quarter of either bound waits, before it reads more, until
//! that recipient has written some out (see [`crate::pacing`]): a fast sender is slowed
//! and a healthy recipient keeps up. A recipient that writes nothing for
//! [`NO_PROGRESS`] while so loaded, or whose queue reaches a bound, has stopped reading
//! and is disconnected (it never buffers without end). Nothing here assumes this process owns all sessions forever: lookups go
//! through this type only, so a multi-node registry can replace it behind the same API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use confab_protocol::{Element, StreamError, StreamErrorCondition};
use tokio::sync::{mpsc, watch, Notify};

/// How long a loaded queue may go without its session writing anything out before the
/// session counts as a reader that stopped.
pub const NO_PROGRESS: Duration = Duration::from_secs(5);

/// The bounds of one session's outbound queue (`limits.session_queue`,
/// `limits.session_queue_bytes`).
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub stanzas: usize,
    pub bytes: usize,
}

/// What a session task receives from the rest of the server.
#[derive(Debug)]
pub enum ToSession {
    Stanza(Element),
    /// A page of stored offline messages: the session writes them, then deletes them
    /// from the store up to `up_to`, so nothing is deleted before it reached the stream;
    /// with `more`, it then asks for the next page. A queue is read one page at a time,
    /// each after the last one was written, never parsed whole.
    Offline {
        stanzas: Vec<Element>,
        up_to: u64,
        more: bool,
    },
}

/// Facts about a session's connection, for administration.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    pub peer: std::net::SocketAddr,
    /// The TLS version, if the connection is encrypted.
    pub tls: Option<String>,
    pub since: std::time::SystemTime,
}

/// A handle to one bound resource; cloning it (as routing does for every stanza) costs a
/// reference count, not copies of its JID strings and channels.
#[derive(Clone, Debug)]
pub struct SessionHandle(Arc<SessionData>);

/// What a [`SessionHandle`] refers to.
#[derive(Debug)]
pub struct SessionData {
    pub id: u64,
    pub info: Arc<SessionInfo>,
    /// The bare JID `user@domain`.
    pub bare: String,
    pub resource: String,
    /// Boxed, so the queue's slots (allocated in blocks when the session starts) stay small.
    tx: mpsc::Sender<Box<ToSession>>,
    kill: watch::Sender<Option<StreamError>>,
    limits: QueueLimits,
    /// [`Element::footprint`] of what is queued and not yet taken by the session.
    queued_bytes: AtomicUsize,
    /// Woken whenever the session wrote a batch out, or was killed.
    progress: Notify,
}

impl std::ops::Deref for SessionHandle {
    type Target = SessionData;
    fn deref(&self) -> &SessionData {
        &self.0
    }
}

impl SessionHandle {
    pub fn full_jid(&self) -> String {
        format!("{}/{}", self.bare, self.resource)
    }

    /// Queues a stanza; a queue at its bound disconnects the session (slow reader). A
    /// sender that loads the queue past a quarter of a bound is noted for pacing.
    pub fn send(&self, stanza: Element) -> bool {
        let bytes = stanza.footprint();
        let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        // One stanza always fits an empty queue, however large it is.
        if before > 0 && before.saturating_add(bytes) > self.limits.bytes {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            tracing::warn!(jid = %self.full_jid(), queued = before, "outbound queue over its byte bound, disconnecting slow reader");
            self.kill(
                StreamError::new(StreamErrorCondition::PolicyViolation)
                    .with_text("too many unread bytes"),
            );
            return false;
        }
        match self.tx.try_send(Box::new(ToSession::Stanza(stanza))) {
            Ok(()) => {
                if self.loaded() {
                    crate::pacing::note(self);
                }
                true
            }
            Err(e) => {
                self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                if let mpsc::error::TrySendError::Full(_) = e {
                    tracing::warn!(jid = %self.full_jid(), "outbound queue full, disconnecting slow reader");
                    self.kill(
                        StreamError::new(StreamErrorCondition::PolicyViolation)
                            .with_text("too many unread stanzas"),
                    );
                }
                false
            }
        }
    }

    /// Queues stored offline messages (see [`ToSession::Offline`]).
    pub fn send_offline(&self, stanzas: Vec<Element>, up_to: u64, more: bool) -> bool {
        let bytes: usize = stanzas.iter().map(Element::footprint).sum();
        self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        let sent = self
            .tx
            .try_send(Box::new(ToSession::Offline {
                stanzas,
                up_to,
                more,
            }))
            .is_ok();
        if !sent {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
        sent
    }

    /// The session took `item` off its queue.
    pub fn taken(&self, item: &ToSession) {
        let bytes = match item {
            ToSession::Stanza(e) => e.footprint(),
            ToSession::Offline { stanzas, .. } => stanzas.iter().map(Element::footprint).sum(),
        };
        self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// The session wrote a batch out: senders waiting for it may go on.
    pub fn made_progress(&self) {
        self.progress.notify_waiters();
    }

    /// Bytes queued and not yet taken by the session.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// Past a quarter of either bound: a sender should wait for this session (and the
    /// session itself handles no more of its client's stanzas until it wrote some out).
    pub fn loaded(&self) -> bool {
        let stanzas = self.tx.max_capacity() - self.tx.capacity();
        stanzas > (self.limits.stanzas / 4).max(1)
            || self.queued_bytes.load(Ordering::Acquire) > self.limits.bytes / 4
    }

    /// Waits until this session's queue is no longer loaded, or it is gone. A session that
    /// writes nothing out for [`NO_PROGRESS`] meanwhile has stopped reading and is killed.
    pub async fn wait_until_unloaded(&self) {
        loop {
            let progress = self.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if !self.loaded() || self.tx.is_closed() || self.kill.borrow().is_some() {
                return;
            }
            if tokio::time::timeout(NO_PROGRESS, progress).await.is_err() {
                tracing::warn!(
                    jid = %self.full_jid(),
                    "nothing written for {NO_PROGRESS:?} with a loaded queue, disconnecting slow reader"
                );
                self.kill(
                    StreamError::new(StreamErrorCondition::PolicyViolation)
                        .with_text("too many unread stanzas"),
                );
                return;
            }
        }
    }

    /// Asks the session task to close its stream with `error`.
    pub fn kill(&self, error: StreamError) {
        self.kill.send_replace(Some(error));
        self.progress.notify_waiters();
    }
}

/// The receiving side, owned by the session task.
pub struct SessionReceiver {
    pub rx: mpsc::Receiver<Box<ToSession>>,
    pub kill: watch::Receiver<Option<StreamError>>,
}

/// Presence state of one resource (RFC 6121 §4).
#[derive(Clone, Debug, Default)]
pub struct PresenceState {
    /// Sent initial presence and has not gone unavailable since.
    pub available: bool,
    pub priority: i8,
    /// The last broadcast presence, as sent (with `from` stamped).
    pub last: Option<Element>,
    /// Requested the roster: receives roster pushes (RFC 6121 §2.1.6).
    pub interested: bool,
    /// Entities that got directed presence and must get unavailable (RFC 6121 §4.6).
    pub directed: Vec<String>,
}

struct Entry {
    handle: SessionHandle,
    /// Shared with the snapshots handed out; an update copies it only while one is alive.
    presence: Arc<PresenceState>,
}

/// A snapshot of one resource, for routing decisions.
#[derive(Clone, Debug)]
pub struct ResourceInfo {
    pub handle: SessionHandle,
    pub presence: Arc<PresenceState>,
}

fn unshare(p: Arc<PresenceState>) -> PresenceState {
    Arc::try_unwrap(p).unwrap_or_else(|shared| (*shared).clone())
}

#[derive(Default)]
pub struct Router {
    sessions: RwLock<HashMap<String, Vec<Entry>>>,
    next_id: AtomicU64,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates the channels of a new session; register it with [`Router::bind`].
    pub fn new_session(
        &self,
        bare: String,
        resource: String,
        limits: QueueLimits,
        info: SessionInfo,
    ) -> (SessionHandle, SessionReceiver) {
        let (tx, rx) = mpsc::channel(limits.stanzas.max(1));
        let (kill, kill_rx) = watch::channel(None);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        (
            SessionHandle(Arc::new(SessionData {
                id,
                info: Arc::new(info),
                bare,
                resource,
                tx,
                kill,
                limits,
                queued_bytes: AtomicUsize::new(0),
                progress: Notify::new(),
            })),
            SessionReceiver { rx, kill: kill_rx },
        )
    }

    /// Registers a bound resource. A session already holding that resource is removed
    /// and returned with its presence state, so the caller can close it and send the
    /// unavailable presence it owes: the newest login wins (RFC 6120 §7.7.2.2, option 2).
    pub fn bind(&self, handle: SessionHandle) -> Option<(SessionHandle, PresenceState)> {
        let mut map = self.write();
        let list = map.entry(handle.bare.clone()).or_default();
        let old = list
            .iter()
            .position(|e| e.handle.resource == handle.resource)
            .map(|i| list.remove(i))
            .map(|e| (e.handle, unshare(e.presence)));
        list.push(Entry {
            handle,
            presence: Arc::default(),
        });
        old
    }

    /// Removes a session; returns its last presence state.
    pub fn unbind(&self, handle: &SessionHandle) -> Option<PresenceState> {
        let mut map = self.write();
        let list = map.get_mut(&handle.bare)?;
        let pos = list.iter().position(|e| e.handle.id == handle.id)?;
        let entry = list.remove(pos);
        if list.is_empty() {
            map.remove(&handle.bare);
        }
        Some(unshare(entry.presence))
    }

    /// Whether the account has a bound resource.
    pub fn has_resources(&self, bare: &str) -> bool {
        self.read().get(bare).is_some_and(|l| !l.is_empty())
    }

    pub fn resource_exists(&self, bare: &str, resource: &str) -> bool {
        self.read()
            .get(bare)
            .is_some_and(|l| l.iter().any(|e| e.handle.resource == resource))
    }

    /// All bound resources of an account.
    pub fn resources(&self, bare: &str) -> Vec<ResourceInfo> {
        self.read()
            .get(bare)
            .map(|l| {
                l.iter()
                    .map(|e| ResourceInfo {
                        handle: e.handle.clone(),
                        presence: e.presence.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn resource(&self, bare: &str, resource: &str) -> Option<ResourceInfo> {
        self.read().get(bare).and_then(|l| {
            l.iter()
                .find(|e| e.handle.resource == resource)
                .map(|e| ResourceInfo {
                    handle: e.handle.clone(),
                    presence: e.presence.clone(),
                })
        })
    }

    /// Updates the presence state of one session; returns the value of `f`.
    pub fn update_presence<R>(
        &self,
        handle: &SessionHandle,
        f: impl FnOnce(&mut PresenceState) -> R,
    ) -> Option<R> {
        let mut map = self.write();
        map.get_mut(&handle.bare)
            .and_then(|l| l.iter_mut().find(|e| e.handle.id == handle.id))
            .map(|e| f(Arc::make_mut(&mut e.presence)))
    }

    pub fn session_count(&self) -> usize {
        self.read().values().map(Vec::len).sum()
    }

    /// Every bound session (for shutdown and administration).
    pub fn all_sessions(&self) -> Vec<SessionHandle> {
        self.read()
            .values()
            .flat_map(|l| l.iter().map(|e| e.handle.clone()))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Vec<Entry>>> {
        // A poisoned lock means a panic elsewhere while holding it; the map itself is
        // still consistent (every mutation is a single push/remove), so keep serving.
        self.sessions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Vec<Entry>>> {
        self.sessions.write().unwrap_or_else(|e| e.into_inner())
    }
}

pub type SharedRouter = Arc<Router>;
