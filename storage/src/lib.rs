//! Storage for confab: accounts (SCRAM stored keys only), rosters with versions (RFC 6121 §2.6), the offline
//! message queue, and small per-user records (vCard, private XML storage, pending subscription requests, ...).
//!
//! The traits are split by concern so a module only depends on what it uses; [`Storage`] bundles them for the
//! server. Two backends: [`SledStorage`] (on disk, durable on return, group commit) and [`MemoryStorage`]
//! (tests). No backend type leaks into this API so that other backends (PostgreSQL, a multi-node mode) can be
//! added without touching callers.
//!
//! Owners are bare JID strings already prepared by the caller; the storage does not validate JIDs. The one
//! thing it refuses is an owner containing a NUL byte ([`StorageError::InvalidKey`]): NUL separates the owner
//! from the rest of a key, and no valid JID can contain it (it is not even legal in XML).

mod codec;
mod keys;
mod memory;
mod sled;
mod snapshot;

#[cfg(test)]
mod test_suite;

pub use crate::memory::MemoryStorage;
pub use crate::sled::SledStorage;

use std::fmt;
use std::str::FromStr;

/// Everything that can go wrong in a storage call.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum StorageError {
    #[error("account already exists")]
    AccountExists,
    #[error("no such account")]
    NoSuchAccount,
    #[error("offline queue is full")]
    QueueFull,
    /// A stored value could not be decoded (unknown format version, truncated, invalid UTF-8, ...).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The backend failed (I/O error, database locked by another process, ...).
    #[error("storage backend error: {0}")]
    Backend(String),
    /// An owner (bare JID) that cannot be used as a key prefix (it contains a NUL byte).
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// An import into a store that already holds data.
    #[error("the store is not empty: {0}")]
    NotEmpty(String),
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// SCRAM credentials for one hash function (RFC 5802 §3): only StoredKey and ServerKey, never the password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCredential {
    /// `"SHA-1"`, `"SHA-256"` or `"SHA-512"`.
    pub hash: String,
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// Bare JID.
    pub jid: String,
    pub credentials: Vec<StoredCredential>,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// The subscription state of a roster item (RFC 6121 §2.1.2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum Subscription {
    #[default]
    None,
    To,
    From,
    Both,
}

impl Subscription {
    /// The value of the `subscription` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Subscription::None => "none",
            Subscription::To => "to",
            Subscription::From => "from",
            Subscription::Both => "both",
        }
    }
}

impl fmt::Display for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of [`Subscription::from_str`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown subscription state {0:?}")]
pub struct UnknownSubscription(pub String);

impl FromStr for Subscription {
    type Err = UnknownSubscription;

    /// Parses `"none"`, `"to"`, `"from"` or `"both"`. `"remove"` is not a state, it is a request, and is refused.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "none" => Ok(Subscription::None),
            "to" => Ok(Subscription::To),
            "from" => Ok(Subscription::From),
            "both" => Ok(Subscription::Both),
            other => Err(UnknownSubscription(other.to_owned())),
        }
    }
}

/// One contact in a user's roster (RFC 6121 §2.1.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RosterItem {
    /// The contact's bare JID.
    pub jid: String,
    pub name: Option<String>,
    pub subscription: Subscription,
    /// Pending out: we sent a subscribe request and have no answer yet (`ask="subscribe"`).
    pub ask: bool,
    /// Pre-approved subscription request (RFC 6121 §3.4).
    pub approved: bool,
    pub groups: Vec<String>,
}

impl RosterItem {
    /// An item with no name, no groups and subscription `none`.
    pub fn new(jid: impl Into<String>) -> Self {
        RosterItem {
            jid: jid.into(),
            name: None,
            subscription: Subscription::None,
            ask: false,
            approved: false,
            groups: Vec::new(),
        }
    }
}

#[async_trait::async_trait]
pub trait AccountStore: Send + Sync {
    /// Fails with [`StorageError::AccountExists`] if the account exists.
    async fn create_account(&self, jid: &str, credentials: Vec<StoredCredential>) -> Result<()>;
    async fn account(&self, jid: &str) -> Result<Option<Account>>;
    /// Whether the account exists, without decoding it (routing asks this for every stanza to a user).
    async fn account_exists(&self, jid: &str) -> Result<bool> {
        Ok(self.account(jid).await?.is_some())
    }
    /// Fails with [`StorageError::NoSuchAccount`].
    async fn set_credentials(&self, jid: &str, credentials: Vec<StoredCredential>) -> Result<()>;
    /// Fails with [`StorageError::NoSuchAccount`]. Also removes that user's roster, roster version, offline
    /// queue (and its sequence counter) and user data, in one atomic step.
    async fn delete_account(&self, jid: &str) -> Result<()>;
    /// Bare JIDs, sorted bytewise. With a domain, only the accounts whose part after `@` is that domain.
    async fn list_accounts(&self, domain: Option<&str>) -> Result<Vec<String>>;
}

#[async_trait::async_trait]
pub trait RosterStore: Send + Sync {
    /// The current roster version and the items sorted by JID. Version 0 for a roster never written.
    async fn roster(&self, owner: &str) -> Result<(u64, Vec<RosterItem>)>;
    async fn roster_item(&self, owner: &str, jid: &str) -> Result<Option<RosterItem>>;
    /// Inserts or replaces the item with the same JID; bumps and returns the new roster version, atomically
    /// with the item.
    async fn put_roster_item(&self, owner: &str, item: RosterItem) -> Result<u64>;
    /// Removes the item (absent is fine); bumps and returns the new roster version.
    async fn remove_roster_item(&self, owner: &str, jid: &str) -> Result<u64>;
}

/// The first page of `items` under [`OfflineStore::offline_page`]'s rule: at most
/// `max_count`, and none after the one whose bytes reach `max_bytes`. Items are decoded
/// only as far as the page goes.
pub(crate) fn offline_page_of(
    items: impl Iterator<Item = Result<(u64, Vec<u8>)>>,
    max_count: usize,
    max_bytes: usize,
) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for item in items {
        if out.len() >= max_count || bytes >= max_bytes {
            break;
        }
        let (seq, stanza) = item?;
        bytes = bytes.saturating_add(stanza.len());
        out.push((seq, stanza));
    }
    Ok(out)
}

#[async_trait::async_trait]
pub trait OfflineStore: Send + Sync {
    /// Appends a stanza to the owner's queue and returns its sequence number. Sequence numbers start at 1
    /// and are strictly increasing per owner, even across removals and restarts (a persistent per-owner
    /// counter; it is reset only by [`AccountStore::delete_account`]). Fails with [`StorageError::QueueFull`]
    /// if the queue already holds `max` or more messages; the check and the insert are atomic.
    async fn push_offline(&self, owner: &str, stanza: Vec<u8>, max: usize) -> Result<u64>;
    /// All queued stanzas, ascending by sequence number.
    async fn offline_messages(&self, owner: &str) -> Result<Vec<(u64, Vec<u8>)>>;
    /// The oldest queued stanzas, ascending: at most `max_count`, and no more once their
    /// bytes reach `max_bytes` (the stanza that reaches it is included, so a page holds
    /// at least one when the queue is not empty). Delivery reads a queue a page at a time,
    /// never all of it at once.
    async fn offline_page(
        &self,
        owner: &str,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>>;
    /// Removes every queued stanza with a sequence number `<= up_to_seq`.
    async fn remove_offline(&self, owner: &str, up_to_seq: u64) -> Result<()>;
    async fn offline_count(&self, owner: &str) -> Result<usize>;
    /// Like [`push_offline`](Self::push_offline), but may return before the write is durable: the caller
    /// must pass the returned point to [`Storage::sync`] before it tells anyone of the write. A client
    /// stream uses this to make a batch of pipelined messages durable with one flush, before it answers
    /// anything later on that stream.
    async fn push_offline_unsynced(
        &self,
        owner: &str,
        stanza: Vec<u8>,
        max: usize,
    ) -> Result<(u64, SyncPoint)> {
        Ok((
            self.push_offline(owner, stanza, max).await?,
            SyncPoint::DURABLE,
        ))
    }
}

/// A position in a store's write history: the writes that had completed when it was taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct SyncPoint(pub u64);

impl SyncPoint {
    /// Nothing to wait for.
    pub const DURABLE: SyncPoint = SyncPoint(0);
}

/// Small per-user records keyed by a string: vCard, private XML (XEP-0049), pending inbound subscription
/// requests, etc.
#[async_trait::async_trait]
pub trait UserDataStore: Send + Sync {
    async fn get_user_data(&self, owner: &str, key: &str) -> Result<Option<Vec<u8>>>;
    async fn put_user_data(&self, owner: &str, key: &str, value: Vec<u8>) -> Result<()>;
    /// Absent is fine.
    async fn delete_user_data(&self, owner: &str, key: &str) -> Result<()>;
    /// The records whose key starts with `key_prefix` (`""` for all), sorted by key.
    async fn list_user_data(&self, owner: &str, key_prefix: &str)
        -> Result<Vec<(String, Vec<u8>)>>;
}

/// One unit of a store's content, as [`BackupStore::export`] hands it out and [`BackupStore::import`] takes it
/// back: backend-neutral, so a backup made from one backend restores into another.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// An account with its stored SCRAM credentials and creation time.
    Account(Account),
    /// A roster's version (RFC 6121 §2.6); absent for a roster never written.
    RosterVersion {
        owner: String,
        version: u64,
    },
    RosterItem {
        owner: String,
        item: RosterItem,
    },
    /// The last offline sequence number handed out for `owner`: kept even when the queue is empty, so sequence
    /// numbers never go back after a restore.
    OfflineCounter {
        owner: String,
        last_seq: u64,
    },
    /// A queued offline stanza with its sequence number.
    OfflineMessage {
        owner: String,
        seq: u64,
        stanza: Vec<u8>,
    },
    UserData {
        owner: String,
        key: String,
        value: Vec<u8>,
    },
}

impl Record {
    /// The bare JID the record belongs to.
    pub fn owner(&self) -> &str {
        match self {
            Record::Account(a) => &a.jid,
            Record::RosterVersion { owner, .. }
            | Record::RosterItem { owner, .. }
            | Record::OfflineCounter { owner, .. }
            | Record::OfflineMessage { owner, .. }
            | Record::UserData { owner, .. } => owner,
        }
    }
}

/// Where [`BackupStore::export`] sends each record; an error from it stops the export and is returned.
pub type RecordSink<'a> = dyn FnMut(Record) -> Result<()> + Send + 'a;

/// Everything a store holds, out and in: what `confab backup` and `confab restore` are made of.
#[async_trait::async_trait]
pub trait BackupStore: Send + Sync {
    /// Hands every record of the store to `sink`: a consistent snapshot (one point in time across all
    /// records; see each backend for how). Accounts come first, then the other records; callers must not
    /// rely on any further order. The sink runs synchronously: a slow sink slows the export, and
    /// backends may hold writers back while they take the snapshot, never while the sink runs.
    async fn export(&self, sink: &mut RecordSink<'_>) -> Result<()>;
    /// Loads `records` into an empty store, all or nothing. Fails with [`StorageError::NotEmpty`] if the
    /// store holds anything (even a stray record without an account), and with [`StorageError::Corrupt`]
    /// (changing nothing) if the records contradict each other: two records for the same key, an offline
    /// message numbered above its owner's counter, an owner containing NUL. Offline counts are recomputed
    /// from the messages; a missing counter is taken as the highest sequence number.
    async fn import(&self, records: Vec<Record>) -> Result<()>;
}

#[async_trait::async_trait]
pub trait Storage:
    AccountStore + RosterStore + OfflineStore + UserDataStore + BackupStore + Send + Sync + 'static
{
    /// Makes every write that has returned so far durable (they already are for the sled backend; this is for
    /// shutdown paths and backends that buffer).
    async fn flush(&self) -> Result<()>;
    /// Returns once every write up to `point` is durable (at once for a point already covered).
    async fn sync(&self, point: SyncPoint) -> Result<()> {
        let _ = point;
        Ok(())
    }
    /// Bytes used on disk, if the backend knows.
    fn size_on_disk(&self) -> Option<u64> {
        None
    }
}
