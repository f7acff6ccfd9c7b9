//! The on-disk backend, on sled 0.34.
//!
//! # Durability contract
//!
//! Every write method returns only after its write has been flushed: sled's `Db::flush` has written the log
//! to the file, and then we call `fsync` (`File::sync_all`) on the log file ourselves. Concurrent writers
//! share flushes (group commit, see `GroupCommit` below): one flush covers every write that had completed when it
//! started, and wakes all of their callers.
//!
//! - **Process kill** (crash, SIGKILL, OOM): everything whose write method returned survives; a write whose
//!   method had not returned may or may not survive, but never half of it (multi-key updates are sled
//!   transactions, see below).
//! - **Power loss / kernel crash**: on Linux, sled 0.34's own flush only calls `sync_file_range(2)` on the
//!   log range it wrote (WAIT_BEFORE | WRITE | WAIT_AFTER), which neither flushes the drive's volatile cache
//!   nor persists file metadata such as the file's new length; other platforms get `fsync`. That is why we
//!   add an `fsync` of the log file (`<dir>/db`) after each sled flush, and `fsync` the directory once at
//!   open. With that, what survives a power loss is what survives a process kill, provided the drive honours
//!   flush requests. sled also flushes on its own every 500 ms; we do not rely on that.
//!
//! # Atomicity
//!
//! Updates that touch several keys are sled transactions (which sled 0.34 runs one at a time, under a
//! global lock, so they are serializable): a roster item with the roster version; and `delete_account`,
//! which removes the account and all of the user's records in one transaction (offline pushes are not
//! transactions, see "Offline queues"). sled transactions cannot scan, so the keys to remove are listed by a
//! scan just before; a record written for that user between the scan and the transaction is caught by a second
//! transactional sweep (skipped if the account was created again meanwhile). A write racing with a deletion
//! may outlive it only if it lands after that sweep; callers should not write for accounts being deleted.
//!
//! # Backups
//!
//! [`BackupStore::export`] is a snapshot of one point in time across all trees. sled 0.34 has no snapshots
//! (its iterators see concurrent writes), so every write method holds the shared side of a gate (an
//! `RwLock<()>`) while it applies its write to sled's in-memory state, never while it waits for the flush;
//! the export takes the exclusive side while it lists every tree. The listing copies key and value handles
//! (reference-counted, no payload copy) and nothing else: decoding and the caller's sink (writing the file)
//! run after the gate is released. So a write racing a backup is either wholly in it (its sled update was
//! done before the listing began) or wholly absent (it waited until the listing was done, a pause of the
//! time it takes to walk the trees; reads never wait). A write in a backup may be one whose flush had not
//! finished yet. [`BackupStore::import`] holds the exclusive side too: it checks that every tree is empty and
//! inserts everything in one transaction, so a concurrent writer (say `confab user add`) either makes the
//! import fail as "not empty" or fails itself because the account now exists.
//!
//! # Offline queues
//!
//! Pushing an offline message is the hottest write, so it uses no sled transaction (every sled transaction or
//! batch seals and writes sled's current log buffer, a `pwrite` and a `sync_file_range` each, which limited
//! pushes to a few thousand a second) and, most of the time, one sled write: the message. Each owner's queue
//! state (last sequence number handed out, number of queued messages) lives in memory (`queues`, sharded by
//! owner, each shard under its own mutex); it is loaded on first use and is exact: the count is that of the
//! owner's keys in `offline`, the last number the highest of `offline_meta`'s record and of those keys.
//!
//! `offline_meta` holds, per owner, a *reservation*: a number that no sequence number handed out exceeds. A push
//! that would go past it first raises it by [`SEQ_BLOCK`] (one insert per block, not per message), then inserts
//! the message. The reservation is written before any message numbered from it, and a flush writes everything
//! written before it, so whatever survives a crash — a message, a removal that left the queue empty — survives
//! with a reservation at least as high as its number, and the next process starts above both: a number is never
//! used twice. A crash merely skips the rest of a block. A clean close ([`Storage::flush`], dropping the store)
//! writes the exact last number back, so a restart continues without a gap. The count needs no repair: it is
//! counted again from the keys on first use after a restart.
//!
//! Pushes, removals and account deletion for one owner hold its shard's lock while they update sled and the
//! state, always after the shared side of the backup gate. The state of at most [`QUEUES_PER_SHARD`] owners
//! is kept per shard; one evicted is loaded again from sled when next used (its reservation stays, which only
//! skips numbers).
//!
//! # Known accounts
//!
//! Every stanza to a bare JID without a session checks that the account exists, so positive answers are kept
//! in memory ([`KnownShard`], sharded like the queues, at most [`QUEUES_PER_SHARD`] per shard). Only
//! `delete_account` removes an account, and it holds the owner's shard of that set while its transaction
//! runs and until the name is dropped from the set, while a check holds the same lock from its read of
//! `accounts` to its insert: a check never caches a name whose deletion it did not see.

//! # Trees
//!
//! `accounts` (bare JID), `rosters` (owner 0x00 contact), `roster_meta` (owner → version), `offline`
//! (owner 0x00 big-endian sequence number), `offline_meta` (owner → sequence number reservation, and the
//! count when it was written, which nothing relies on), `userdata` (owner 0x00 key). Value formats are in `codec.rs`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ::sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};
use ::sled::{IVec, Transactional, Tree};
use tokio::sync::watch;

use crate::codec::{self, OfflineMeta};
use crate::keys::{check_owner, domain_of, owner_key, owner_prefix, seq_key, seq_of_key, SEP};
use crate::snapshot::{not_empty, Snapshot};
use crate::{
    Account, AccountStore, BackupStore, OfflineStore, Record, RecordSink, Result, RosterItem,
    RosterStore, Storage, StorageError, StoredCredential, SyncPoint, UserDataStore,
};

fn backend(e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(e.to_string())
}

fn tx_error(e: TransactionError<StorageError>) -> StorageError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    }
}

fn abort<T>(e: StorageError) -> ConflictableTransactionResult<T, StorageError> {
    Err(ConflictableTransactionError::Abort(e))
}

/// The sled backend. Share it behind an `Arc`; all methods take `&self`. The async methods must run inside
/// a Tokio runtime (flushes run on its blocking pool).
pub struct SledStorage {
    db: ::sled::Db,
    path: PathBuf,
    accounts: Tree,
    rosters: Tree,
    roster_meta: Tree,
    offline: Tree,
    offline_meta: Tree,
    userdata: Tree,
    commit: GroupCommit,
    /// Writers hold it shared while they update sled, backups exclusively (see "Backups" above).
    gate: RwLock<()>,
    /// The offline queue state of each owner (see "Offline queues" above).
    queues: Sharded<QueueShard>,
    /// Accounts known to exist (see "Known accounts" above).
    known: Sharded<KnownShard>,
}

impl std::fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStorage")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn is_lock_error(msg: &str) -> bool {
    msg.contains("could not acquire lock")
}

/// How long [`SledStorage::open`] waits for a handle just dropped in this process to let go of its lock.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens the sled database. When a handle on the same directory was dropped a moment ago, sled's
/// background I/O threads can still hold its file lock for a little while (they own a reference to the
/// log file until their last write or truncation returns), so a lock failure is retried for up to
/// [`LOCK_GRACE`]; a directory held by a live handle or another process still fails after that.
fn open_db(path: &Path) -> std::result::Result<::sled::Db, ::sled::Error> {
    let deadline = std::time::Instant::now() + LOCK_GRACE;
    loop {
        remove_unfinished_snapshots(path).map_err(::sled::Error::Io)?;
        match ::sled::Config::new().path(path).open() {
            Err(e) if is_lock_error(&e.to_string()) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Creates `path` (and missing parents) with mode 0700 on Unix, whatever the umask: the store holds
/// password keys and private data. An existing directory that other users can read is tightened to 0700,
/// with a warning; if it cannot be (it belongs to someone else), the warning says so and the open goes on.
fn create_private_dir(path: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)) {
                Ok(()) => tracing::warn!(
                    path = %path.display(),
                    "the store directory was mode {mode:04o}, open to other users: changed to 0700"
                ),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "the store directory is mode {mode:04o}, open to other users, and cannot be changed to 0700"
                ),
            }
        }
    }
    Ok(())
}

/// Removes the snapshot files that sled 0.34 left unfinished in `path` (`snap.<lsn>.generating`), with a
/// warning each, so that the store opens after a kill during a previous open.
///
/// A snapshot is not data: it is a cache of sled's page table, to start recovery from a point in the log
/// (`db`) instead of its beginning. sled 0.34 writes one only while it opens (`read_snapshot_or_default`,
/// `advance_snapshot`, `write_snapshot` in its `pagecache/snapshot.rs`; the periodic snapshots of older
/// versions are gone, `snapshot_after_ops` does nothing): it recovers from the newest snapshot and the log,
/// writes the new one to `snap.<lsn>.generating`, `fsync`s it, renames it to `snap.<lsn>` and only then
/// removes the older snapshots. The rename is the commit, so a `.generating` file is never a finished
/// snapshot, and the one it was to replace is still there. But sled's own listing of snapshots skips only
/// `.in___motion` files and reads the one whose name sorts last, which `snap.<lsn>.generating` does; an
/// unfinished one fails its length or CRC check, and every later open fails with "Read corrupted data at
/// file offset None". Removing it puts the directory back as it was before that open began writing its
/// snapshot: the previous snapshot (or none, and sled recovers from the start of the log) and the log,
/// which that open had changed only by recovery steps that the next open repeats (zeroing the torn tail
/// after the recovered end of the log, removing blobs above it; sled's own tests check that recovery is
/// idempotent).
///
/// Only the holder of sled's lock may do this: a `.generating` file of a process that is opening the
/// store right now is work in progress. So the files are removed while this holds the same lock sled
/// takes (an exclusive `flock` of `db`, by the same crate, fs2), and left alone when someone else holds
/// it; sled's own open then fails (or is retried, see [`open_db`]) on that lock.
fn remove_unfinished_snapshots(path: &Path) -> std::io::Result<()> {
    let mut unfinished = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("snap.") && name.ends_with(".generating") {
            unfinished.push(entry.path());
        }
    }
    if unfinished.is_empty() {
        return Ok(());
    }
    let db = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path.join("db"))?;
    if fs2::FileExt::try_lock_exclusive(&db).is_err() {
        return Ok(());
    }
    for file in unfinished {
        let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(&file)?;
        tracing::warn!(
            path = %file.display(),
            bytes,
            "removed an unfinished sled snapshot (the open that was writing it was interrupted); \
             it holds no data, the store recovers from the previous snapshot and its log"
        );
    }
    // Closing `db` releases the lock for sled's open.
    drop(db);
    Ok(())
}

impl SledStorage {
    /// Opens (creating if needed) the database in directory `path`. sled takes an exclusive lock on it, so
    /// a second open of the same directory, from this process or another, fails with
    /// [`StorageError::Backend`] (after a grace period of a few seconds, see [`open_db`]) until the first
    /// handle is dropped. The directory is made private (mode 0700, see [`create_private_dir`]); the files sled
    /// creates in it follow the process's umask, which the `confab` binary sets to 0077.
    pub fn open(path: &Path) -> Result<Self> {
        create_private_dir(path).map_err(|e| {
            backend(format_args!(
                "cannot create data directory {}: {e}",
                path.display()
            ))
        })?;
        let db = open_db(path).map_err(|e| {
            let msg = e.to_string();
            if is_lock_error(&msg) {
                backend(format_args!(
                    "database {} is already open (by another process, such as a running confab server, or \
                     another handle in this process): {msg}",
                    path.display()
                ))
            } else {
                backend(format_args!("cannot open database {}: {msg}", path.display()))
            }
        })?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        // The log file sled writes to; see the durability contract above.
        let log = File::open(path.join("db")).map_err(|e| {
            backend(format_args!(
                "cannot open {}: {e}",
                path.join("db").display()
            ))
        })?;
        // Make the directory entries of the files sled created durable too (best effort: not every
        // platform can fsync a directory).
        if let Ok(dir) = File::open(path) {
            if let Err(e) = dir.sync_all() {
                tracing::debug!(path = %path.display(), error = %e, "cannot fsync the data directory");
            }
        }
        Ok(SledStorage {
            accounts: tree("accounts")?,
            rosters: tree("rosters")?,
            roster_meta: tree("roster_meta")?,
            offline: tree("offline")?,
            offline_meta: tree("offline_meta")?,
            userdata: tree("userdata")?,
            commit: GroupCommit::new(db.clone(), log),
            gate: RwLock::new(()),
            queues: Sharded::new(),
            known: Sharded::new(),
            path: path.to_owned(),
            db,
        })
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Held by each write while it updates sled (not while it waits for the flush). The guard is not
    /// `Send`, so the compiler keeps it from living across an await.
    fn writing(&self) -> RwLockReadGuard<'_, ()> {
        // Nothing is guarded but the exclusion itself, so a poisoned lock is still good.
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    fn offline_meta_of(&self, owner: &str) -> Result<OfflineMeta> {
        match self.offline_meta.get(owner.as_bytes()).map_err(backend)? {
            Some(v) => codec::decode_offline_meta(&v),
            None => Ok(OfflineMeta::default()),
        }
    }

    /// `owner`'s queue state as sled has it: the number of its messages, and a last sequence number no lower
    /// than any handed out (the reservation, or a higher message key should one ever be there).
    fn load_queue(&self, owner: &str) -> Result<QueueState> {
        let reserved = self.offline_meta_of(owner)?.last_seq;
        let prefix = owner_prefix(owner);
        let (mut count, mut highest) = (0u64, 0u64);
        for k in self.offline.scan_prefix(&prefix).keys() {
            let k = k.map_err(backend)?;
            count += 1;
            // A malformed key (reported by `offline_messages`) still takes a place in the queue.
            if let Ok(seq) = seq_of_key(&k, prefix.len()) {
                highest = highest.max(seq);
            }
        }
        let last = reserved.max(highest);
        Ok(QueueState {
            last,
            reserved: last,
            count,
        })
    }

    /// Runs `f` on `owner`'s queue state, loading it first if needed, with the owner's shard locked. A state
    /// that `f` leaves inconsistent with sled must be dropped by `f` (see [`SledStorage::purge_owner`]).
    fn with_queue<T>(
        &self,
        owner: &str,
        f: impl FnOnce(&mut QueueState) -> Result<T>,
    ) -> Result<T> {
        let mut shard = self.queues.shard(owner);
        if let Some(q) = shard.get_mut(owner) {
            return f(q);
        }
        let mut q = self.load_queue(owner)?;
        let out = f(&mut q);
        // An evicted state is loaded again, exactly, when next needed.
        evict_one(&mut shard);
        shard.insert(owner.into(), q);
        out
    }

    /// Writes back the exact last sequence number of every owner whose reservation is ahead of it, so that the
    /// next process goes on without a gap (see "Offline queues" above). The caller flushes afterwards.
    fn release_reservations(&self) -> Result<()> {
        let _writing = self.writing();
        for shard in self.queues.shards.iter() {
            let mut shard = lock(shard);
            for (owner, q) in shard.iter_mut() {
                if q.reserved > q.last {
                    let meta = OfflineMeta {
                        last_seq: q.last,
                        count: q.count,
                    };
                    self.offline_meta
                        .insert(owner.as_bytes(), codec::encode_offline_meta(meta))
                        .map_err(backend)?;
                    q.reserved = q.last;
                }
            }
        }
        Ok(())
    }

    /// Held by backups and restores: no write is in progress or starts meanwhile.
    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    fn trees(&self) -> [&Tree; 6] {
        [
            &self.accounts,
            &self.rosters,
            &self.roster_meta,
            &self.offline,
            &self.offline_meta,
            &self.userdata,
        ]
    }

    /// Keys of all of `tree`'s records with `prefix`.
    fn keys_with_prefix(tree: &Tree, prefix: &[u8]) -> Result<Vec<IVec>> {
        tree.scan_prefix(prefix)
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(backend)
    }

    /// Every key of `owner`'s per-user records, by tree (rosters, offline, userdata).
    fn owner_keys(&self, owner: &str) -> Result<[Vec<IVec>; 3]> {
        let prefix = owner_prefix(owner);
        Ok([
            Self::keys_with_prefix(&self.rosters, &prefix)?,
            Self::keys_with_prefix(&self.offline, &prefix)?,
            Self::keys_with_prefix(&self.userdata, &prefix)?,
        ])
    }

    fn read_roster_version(
        tx: &TransactionalTree,
        owner: &str,
    ) -> ConflictableTransactionResult<u64, StorageError> {
        match tx.get(owner.as_bytes())? {
            Some(v) => {
                codec::decode_roster_version(&v).map_err(ConflictableTransactionError::Abort)
            }
            None => Ok(0),
        }
    }

    /// Removes all of `owner`'s per-user records in one transaction, and with `delete_account` the account
    /// too (failing with [`StorageError::NoSuchAccount`] if there is none). Without it, does nothing if the
    /// account exists (it was created again meanwhile, and these records are the new account's).
    fn purge_owner(&self, owner: &str, delete_account: bool) -> Result<()> {
        // Gate first, then the owner's queue shard, as for pushes; no push for this owner runs meanwhile.
        let _writing = self.writing();
        let mut queues = self.queues.shard(owner);
        // Held until the name is gone from the set too (see "Known accounts" above).
        let mut known = self.known.shard(owner);
        let [roster_keys, offline_keys, userdata_keys] = self.owner_keys(owner)?;
        let trees = (
            &self.accounts,
            &self.rosters,
            &self.roster_meta,
            &self.offline,
            &self.offline_meta,
            &self.userdata,
        );
        let purged = trees
            .transaction(
                |(accounts, rosters, roster_meta, offline, offline_meta, userdata)| {
                    if delete_account {
                        if accounts.remove(owner.as_bytes())?.is_none() {
                            return abort(StorageError::NoSuchAccount);
                        }
                    } else if accounts.get(owner.as_bytes())?.is_some() {
                        return Ok(false);
                    }
                    for k in &roster_keys {
                        rosters.remove(k)?;
                    }
                    for k in &offline_keys {
                        offline.remove(k)?;
                    }
                    for k in &userdata_keys {
                        userdata.remove(k)?;
                    }
                    roster_meta.remove(owner.as_bytes())?;
                    offline_meta.remove(owner.as_bytes())?;
                    Ok(true)
                },
            )
            .map_err(tx_error)?;
        if purged {
            // The queue and its counter are gone: numbering starts again at 1.
            queues.remove(owner);
            known.remove(owner);
        }
        Ok(())
    }

    /// Stores a roster change and the bumped version in one transaction.
    async fn roster_change(
        &self,
        owner: &str,
        jid: &str,
        item: Option<&RosterItem>,
    ) -> Result<u64> {
        check_owner(owner)?;
        let key = owner_key(owner, jid.as_bytes());
        let value = item.map(codec::encode_roster_item);
        let writing = self.writing();
        let version = (&self.rosters, &self.roster_meta)
            .transaction(|(rosters, meta)| {
                let Some(version) = Self::read_roster_version(meta, owner)?.checked_add(1) else {
                    return abort(StorageError::Corrupt("roster version overflow".into()));
                };
                match &value {
                    Some(v) => rosters.insert(key.as_slice(), v.as_slice())?,
                    None => rosters.remove(key.as_slice())?,
                };
                meta.insert(owner.as_bytes(), codec::encode_roster_version(version))?;
                Ok(version)
            })
            .map_err(tx_error)?;
        drop(writing);
        self.commit.wait().await?;
        Ok(version)
    }
}

#[async_trait::async_trait]
impl AccountStore for SledStorage {
    async fn create_account(&self, jid: &str, credentials: Vec<StoredCredential>) -> Result<()> {
        check_owner(jid)?;
        let value = codec::encode_account(now_unix(), &credentials);
        {
            let _writing = self.writing();
            self.accounts
                .compare_and_swap(jid.as_bytes(), None as Option<&[u8]>, Some(value))
                .map_err(backend)?
                .map_err(|_| StorageError::AccountExists)?;
        }
        self.commit.wait().await
    }

    async fn account(&self, jid: &str) -> Result<Option<Account>> {
        match self.accounts.get(jid.as_bytes()).map_err(backend)? {
            Some(v) => codec::decode_account(jid.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    async fn account_exists(&self, jid: &str) -> Result<bool> {
        let mut known = self.known.shard(jid);
        if known.contains_key(jid) {
            return Ok(true);
        }
        let exists = self
            .accounts
            .contains_key(jid.as_bytes())
            .map_err(backend)?;
        if exists {
            evict_one(&mut known);
            known.insert(jid.into(), ());
        }
        Ok(exists)
    }

    async fn set_credentials(&self, jid: &str, credentials: Vec<StoredCredential>) -> Result<()> {
        // Keep `created_unix`: read, modify, compare-and-swap, retry if someone else changed it meanwhile.
        loop {
            let Some(old) = self.accounts.get(jid.as_bytes()).map_err(backend)? else {
                return Err(StorageError::NoSuchAccount);
            };
            let account = codec::decode_account(jid.as_bytes(), &old)?;
            let new = codec::encode_account(account.created_unix, &credentials);
            let swapped = {
                let _writing = self.writing();
                self.accounts
                    .compare_and_swap(jid.as_bytes(), Some(old), Some(new))
                    .map_err(backend)?
            };
            match swapped {
                Ok(()) => return self.commit.wait().await,
                Err(_) => continue,
            }
        }
    }

    async fn delete_account(&self, jid: &str) -> Result<()> {
        check_owner(jid)?;
        self.purge_owner(jid, true)?;
        // Second sweep, for records written for this user between the first scan and its transaction.
        self.purge_owner(jid, false)?;
        self.commit.wait().await
    }

    async fn list_accounts(&self, domain: Option<&str>) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for key in self.accounts.iter().keys() {
            let key = key.map_err(backend)?;
            let jid = std::str::from_utf8(&key)
                .map_err(|_| StorageError::Corrupt("account key is not UTF-8".into()))?;
            if domain.is_none() || domain == Some(domain_of(jid)) {
                out.push(jid.to_owned());
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl RosterStore for SledStorage {
    async fn roster(&self, owner: &str) -> Result<(u64, Vec<RosterItem>)> {
        check_owner(owner)?;
        // Version first, then items: a change racing with this read can only make the items newer than the
        // version (the client then sees that change again in a push), never older (it would miss it).
        let version = match self.roster_meta.get(owner.as_bytes()).map_err(backend)? {
            Some(v) => codec::decode_roster_version(&v)?,
            None => 0,
        };
        let prefix = owner_prefix(owner);
        let mut items = Vec::new();
        for kv in self.rosters.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(backend)?;
            items.push(codec::decode_roster_item(&k[prefix.len()..], &v)?);
        }
        Ok((version, items))
    }

    async fn roster_item(&self, owner: &str, jid: &str) -> Result<Option<RosterItem>> {
        check_owner(owner)?;
        match self
            .rosters
            .get(owner_key(owner, jid.as_bytes()))
            .map_err(backend)?
        {
            Some(v) => codec::decode_roster_item(jid.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    async fn put_roster_item(&self, owner: &str, item: RosterItem) -> Result<u64> {
        self.roster_change(owner, &item.jid, Some(&item)).await
    }

    async fn remove_roster_item(&self, owner: &str, jid: &str) -> Result<u64> {
        self.roster_change(owner, jid, None).await
    }
}

#[async_trait::async_trait]
impl OfflineStore for SledStorage {
    async fn push_offline(&self, owner: &str, stanza: Vec<u8>, max: usize) -> Result<u64> {
        let (seq, point) = self.push_offline_unsynced(owner, stanza, max).await?;
        self.commit.wait_for(point.0).await?;
        Ok(seq)
    }

    async fn push_offline_unsynced(
        &self,
        owner: &str,
        stanza: Vec<u8>,
        max: usize,
    ) -> Result<(u64, SyncPoint)> {
        check_owner(owner)?;
        let value = codec::encode_blob_owned(stanza);
        let max = u64::try_from(max).unwrap_or(u64::MAX);
        let writing = self.writing();
        let seq = self.with_queue(owner, |q| {
            if q.count >= max {
                return Err(StorageError::QueueFull);
            }
            let seq = q
                .last
                .checked_add(1)
                .ok_or_else(|| StorageError::Corrupt("offline sequence number overflow".into()))?;
            if seq > q.reserved {
                // The reservation before any message numbered from it (see "Offline queues").
                let reserved = seq.saturating_add(SEQ_BLOCK - 1);
                let meta = OfflineMeta {
                    last_seq: reserved,
                    count: q.count,
                };
                self.offline_meta
                    .insert(owner.as_bytes(), codec::encode_offline_meta(meta))
                    .map_err(backend)?;
                q.reserved = reserved;
            }
            // Taken even if the insert fails: a number is never handed out twice.
            q.last = seq;
            self.offline
                .insert(seq_key(owner, seq), value)
                .map_err(backend)?;
            q.count += 1;
            Ok(seq)
        })?;
        drop(writing);
        Ok((seq, SyncPoint(self.commit.mark())))
    }

    async fn offline_messages(&self, owner: &str) -> Result<Vec<(u64, Vec<u8>)>> {
        check_owner(owner)?;
        let prefix = owner_prefix(owner);
        let mut out = Vec::new();
        for kv in self.offline.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(backend)?;
            out.push((
                seq_of_key(&k, prefix.len())?,
                codec::decode_blob("offline message", &v)?,
            ));
        }
        Ok(out)
    }

    async fn offline_page(
        &self,
        owner: &str,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        check_owner(owner)?;
        let prefix = owner_prefix(owner);
        let items = self.offline.scan_prefix(&prefix).map(|kv| {
            let (k, v) = kv.map_err(backend)?;
            Ok((
                seq_of_key(&k, prefix.len())?,
                codec::decode_blob("offline message", &v)?,
            ))
        });
        crate::offline_page_of(items, max_count, max_bytes)
    }

    async fn remove_offline(&self, owner: &str, up_to_seq: u64) -> Result<()> {
        check_owner(owner)?;
        {
            let _writing = self.writing();
            // Listed under the owner's shard lock, which every push and removal for the owner holds: the
            // keys are exactly those there, so the count goes down by their number.
            self.with_queue(owner, |q| {
                let keys = self
                    .offline
                    .range(seq_key(owner, 0)..=seq_key(owner, up_to_seq))
                    .keys()
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(backend)?;
                if keys.is_empty() {
                    return Ok(());
                }
                let mut batch = ::sled::Batch::default();
                for k in &keys {
                    batch.remove(k.as_ref());
                }
                self.offline.apply_batch(batch).map_err(backend)?;
                q.count = q
                    .count
                    .saturating_sub(u64::try_from(keys.len()).unwrap_or(u64::MAX));
                Ok(())
            })?;
        }
        // Wait even when there was nothing to remove: a concurrent call may have removed these messages
        // without being durable yet.
        self.commit.wait().await
    }

    async fn offline_count(&self, owner: &str) -> Result<usize> {
        check_owner(owner)?;
        let count = self.with_queue(owner, |q| Ok(q.count))?;
        usize::try_from(count).map_err(|_| StorageError::Corrupt(format!("offline count {count}")))
    }
}

#[async_trait::async_trait]
impl UserDataStore for SledStorage {
    async fn get_user_data(&self, owner: &str, key: &str) -> Result<Option<Vec<u8>>> {
        check_owner(owner)?;
        match self
            .userdata
            .get(owner_key(owner, key.as_bytes()))
            .map_err(backend)?
        {
            Some(v) => codec::decode_blob("user data", &v).map(Some),
            None => Ok(None),
        }
    }

    async fn put_user_data(&self, owner: &str, key: &str, value: Vec<u8>) -> Result<()> {
        check_owner(owner)?;
        {
            let _writing = self.writing();
            self.userdata
                .insert(owner_key(owner, key.as_bytes()), codec::encode_blob(&value))
                .map_err(backend)?;
        }
        self.commit.wait().await
    }

    async fn delete_user_data(&self, owner: &str, key: &str) -> Result<()> {
        check_owner(owner)?;
        {
            let _writing = self.writing();
            self.userdata
                .remove(owner_key(owner, key.as_bytes()))
                .map_err(backend)?;
        }
        // Wait even if it was absent: a concurrent delete of it may not be durable yet.
        self.commit.wait().await
    }

    async fn list_user_data(
        &self,
        owner: &str,
        key_prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        check_owner(owner)?;
        let owner_len = owner_prefix(owner).len();
        let mut out = Vec::new();
        for kv in self
            .userdata
            .scan_prefix(owner_key(owner, key_prefix.as_bytes()))
        {
            let (k, v) = kv.map_err(backend)?;
            let key = String::from_utf8(k[owner_len..].to_vec())
                .map_err(|_| StorageError::Corrupt("user data key is not UTF-8".into()))?;
            out.push((key, codec::decode_blob("user data", &v)?));
        }
        Ok(out)
    }
}

type Listing = Vec<(IVec, IVec)>;

fn list_tree(tree: &Tree) -> Result<Listing> {
    tree.iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(backend)
}

/// `owner 0x00 rest` split at the separator; `what` names the tree in errors.
fn split_owner_key<'a>(what: &str, key: &'a [u8]) -> Result<(&'a str, &'a [u8])> {
    let at = key
        .iter()
        .position(|b| *b == SEP)
        .ok_or_else(|| StorageError::Corrupt(format!("{what} key without an owner")))?;
    let owner = std::str::from_utf8(&key[..at])
        .map_err(|_| StorageError::Corrupt(format!("{what} owner is not UTF-8")))?;
    Ok((owner, &key[at + 1..]))
}

fn owner_of(what: &str, key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec())
        .map_err(|_| StorageError::Corrupt(format!("{what} key is not UTF-8")))
}

#[async_trait::async_trait]
impl BackupStore for SledStorage {
    async fn export(&self, sink: &mut RecordSink<'_>) -> Result<()> {
        // The snapshot: handles only, under the exclusive gate (see "Backups" above).
        let ([accounts, rosters, roster_meta, offline, offline_meta, userdata], last_seqs) = {
            let _exclusive = self.exclusive();
            let mut lists = Vec::with_capacity(6);
            for tree in self.trees() {
                lists.push(list_tree(tree)?);
            }
            // `offline_meta` holds reservations; the numbers actually handed out are in memory.
            let mut last_seqs = std::collections::HashMap::new();
            for shard in self.queues.shards.iter() {
                for (owner, q) in lock(shard).iter() {
                    last_seqs.insert(owner.clone(), q.last);
                }
            }
            let lists = <[Listing; 6]>::try_from(lists)
                .map_err(|_| backend("a tree listing is missing"))?;
            (lists, last_seqs)
        };
        for (k, v) in accounts {
            sink(Record::Account(codec::decode_account(&k, &v)?))?;
        }
        for (k, v) in roster_meta {
            sink(Record::RosterVersion {
                owner: owner_of("roster version", &k)?,
                version: codec::decode_roster_version(&v)?,
            })?;
        }
        for (k, v) in rosters {
            let (owner, jid) = split_owner_key("roster item", &k)?;
            sink(Record::RosterItem {
                owner: owner.to_owned(),
                item: codec::decode_roster_item(jid, &v)?,
            })?;
        }
        for (k, v) in offline_meta {
            let owner = owner_of("offline queue state", &k)?;
            let reserved = codec::decode_offline_meta(&v)?.last_seq;
            // An owner not in memory: its reservation, which no number handed out exceeds.
            let last_seq = last_seqs.get(owner.as_str()).copied().unwrap_or(reserved);
            sink(Record::OfflineCounter { owner, last_seq })?;
        }
        for (k, v) in offline {
            let (owner, _) = split_owner_key("offline message", &k)?;
            sink(Record::OfflineMessage {
                owner: owner.to_owned(),
                seq: seq_of_key(&k, owner.len() + 1)?,
                stanza: codec::decode_blob("offline message", &v)?,
            })?;
        }
        for (k, v) in userdata {
            let (owner, key) = split_owner_key("user data", &k)?;
            let key = std::str::from_utf8(key)
                .map_err(|_| StorageError::Corrupt("user data key is not UTF-8".into()))?;
            sink(Record::UserData {
                owner: owner.to_owned(),
                key: key.to_owned(),
                value: codec::decode_blob("user data", &v)?,
            })?;
        }
        Ok(())
    }

    async fn import(&self, records: Vec<Record>) -> Result<()> {
        let snap = Snapshot::from_records(records)?;
        // Encoded up front: the transaction closure may run more than once.
        let mut accounts = Vec::new();
        for (jid, a) in &snap.accounts {
            accounts.push((
                jid.as_bytes().to_vec(),
                codec::encode_account(a.created_unix, &a.credentials),
            ));
        }
        let mut roster_meta = Vec::new();
        for (owner, v) in &snap.roster_versions {
            roster_meta.push((owner.as_bytes().to_vec(), codec::encode_roster_version(*v)));
        }
        let mut rosters = Vec::new();
        for (owner, items) in &snap.rosters {
            for (jid, item) in items {
                rosters.push((
                    owner_key(owner, jid.as_bytes()),
                    codec::encode_roster_item(item),
                ));
            }
        }
        let (mut offline, mut offline_meta) = (Vec::new(), Vec::new());
        for (owner, q) in &snap.offline {
            let meta = OfflineMeta {
                last_seq: q.counter(),
                count: q.messages.len() as u64,
            };
            offline_meta.push((owner.as_bytes().to_vec(), codec::encode_offline_meta(meta)));
            for (seq, m) in &q.messages {
                offline.push((seq_key(owner, *seq), codec::encode_blob(m)));
            }
        }
        let mut userdata = Vec::new();
        for (owner, data) in &snap.userdata {
            for (key, value) in data {
                userdata.push((owner_key(owner, key.as_bytes()), codec::encode_blob(value)));
            }
        }
        let lists = [
            &accounts,
            &rosters,
            &roster_meta,
            &offline,
            &offline_meta,
            &userdata,
        ];
        {
            let _exclusive = self.exclusive();
            if !self.trees().iter().all(|t| t.is_empty()) {
                return Err(not_empty(self.accounts.len()));
            }
            let trees = (
                &self.accounts,
                &self.rosters,
                &self.roster_meta,
                &self.offline,
                &self.offline_meta,
                &self.userdata,
            );
            trees
                .transaction(|(t0, t1, t2, t3, t4, t5)| {
                    for (tree, list) in [t0, t1, t2, t3, t4, t5].into_iter().zip(lists) {
                        for (k, v) in list {
                            tree.insert(k.as_slice(), v.as_slice())?;
                        }
                    }
                    Ok::<_, ConflictableTransactionError<StorageError>>(())
                })
                .map_err(tx_error)?;
            // States loaded while the store was empty are stale now.
            for shard in self.queues.shards.iter() {
                lock(shard).clear();
            }
        }
        self.commit.wait().await
    }
}

#[async_trait::async_trait]
impl Storage for SledStorage {
    async fn flush(&self) -> Result<()> {
        self.release_reservations()?;
        self.commit.wait().await
    }

    async fn sync(&self, point: SyncPoint) -> Result<()> {
        self.commit.wait_for(point.0).await
    }

    fn size_on_disk(&self) -> Option<u64> {
        self.db.size_on_disk().ok()
    }
}

impl Drop for SledStorage {
    /// A clean close: the exact last sequence numbers go back to sled, which flushes when its last handle goes.
    fn drop(&mut self) {
        if let Err(e) = self.release_reservations() {
            tracing::warn!(error = %e, "cannot write back offline sequence numbers at close");
        }
    }
}

/// How many sequence numbers a push reserves at once when it needs a new reservation (see "Offline queues").
const SEQ_BLOCK: u64 = 1024;

/// Shards of the queue states and known accounts: owners of different shards do not wait for each other.
const QUEUE_SHARDS: usize = 64;

/// At most this many owners' states are kept per shard (fewer in tests, so that they evict).
const QUEUES_PER_SHARD: usize = if cfg!(test) { 16 } else { 4096 };

/// One owner's offline queue, as in sled once the updates under its shard's lock are done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct QueueState {
    /// The last sequence number handed out.
    last: u64,
    /// The reservation in `offline_meta`: `>= last`.
    reserved: u64,
    /// Messages in the queue.
    count: u64,
}

type QueueShard = std::collections::HashMap<String, QueueState>;

/// Bare JIDs of accounts known to exist.
type KnownShard = std::collections::HashMap<String, ()>;

/// In-memory state by owner, sharded by a hash of the owner, each shard under its own mutex.
struct Sharded<T> {
    shards: Box<[Mutex<T>]>,
}

impl<T: Default> Sharded<T> {
    fn new() -> Self {
        Sharded {
            shards: (0..QUEUE_SHARDS)
                .map(|_| Mutex::new(T::default()))
                .collect(),
        }
    }

    fn shard(&self, owner: &str) -> MutexGuard<'_, T> {
        // FNV-1a: cheap, and good enough to spread owners over the shards.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in owner.as_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        // The remainder is below QUEUE_SHARDS, which fits in usize.
        lock(&self.shards[(h % QUEUE_SHARDS as u64) as usize])
    }
}

/// Makes room for one more entry in a full shard, dropping any one entry: both kinds are loaded again from
/// sled when next needed.
fn evict_one<V>(shard: &mut std::collections::HashMap<String, V>) {
    if shard.len() >= QUEUES_PER_SHARD {
        if let Some(k) = shard.keys().next().cloned() {
            shard.remove(&k);
        }
    }
}

/// A poisoned lock is still good here: every update under these locks leaves the state matching sled.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Group commit: writers do their (cheap, in-memory) sled write, then call [`GroupCommit::wait`], which
/// returns once a flush that *started after* the write has completed.
///
/// Each completed write takes a ticket from `written`. One waiter at a time is the leader: it notes the
/// highest ticket handed out so far, runs one flush on the blocking pool, records that every ticket up to
/// that mark is durable, and wakes the others through a `watch` channel. A waiter whose ticket is covered
/// returns; the others elect the next leader, whose flush covers everything that arrived meanwhile. So under
/// load there is at most one flush running and one batch waiting for the next.
///
/// If a flush fails, its leader returns the error and the waiters it would have covered try again with a
/// flush of their own (each then gets its own result). If the leader's future is dropped mid-flush, a guard
/// hands leadership on, so nobody waits forever.
struct GroupCommit {
    db: ::sled::Db,
    log: Arc<File>,
    /// Tickets handed out to completed writes.
    written: AtomicU64,
    state: Mutex<CommitState>,
    /// Bumped after each flush attempt (success or failure).
    epoch: watch::Sender<u64>,
    /// Successful flushes, for tests and diagnostics.
    flushes: AtomicU64,
    /// The first failed flush. After an I/O error sled 0.34 refuses every write until the store is opened
    /// again (its "global error"), and what was in the buffer it failed to write is not on disk. Its flush
    /// looks at that error only when something is left to write (`make_stable` returns success first when
    /// its stable position has reached the last reservation); rather than rely on the failed buffer always
    /// counting as left to write, once a flush has failed every later one fails too, so that no caller,
    /// the final flush at shutdown included, hears that data is durable after some was lost. It costs
    /// nothing sled would have allowed: no write succeeds before the store is opened again.
    failed: std::sync::OnceLock<String>,
}

#[derive(Default)]
struct CommitState {
    /// Every ticket `<= durable` is durable.
    durable: u64,
    /// A leader is flushing.
    flushing: bool,
}

impl GroupCommit {
    fn new(db: ::sled::Db, log: File) -> Self {
        GroupCommit {
            db,
            log: Arc::new(log),
            written: AtomicU64::new(0),
            state: Mutex::new(CommitState::default()),
            epoch: watch::Sender::new(0),
            flushes: AtomicU64::new(0),
            failed: std::sync::OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CommitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once every write completed before this call is durable.
    async fn wait(&self) -> Result<()> {
        self.wait_for(self.mark()).await
    }

    /// A ticket covering every write completed before this call (for [`Self::wait_for`]).
    fn mark(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Returns once the writes covered by `ticket` are durable.
    async fn wait_for(&self, ticket: u64) -> Result<()> {
        loop {
            // Subscribe before looking at the state, so an epoch bump after the look is not missed.
            let mut epoch = self.epoch.subscribe();
            let target = {
                let mut st = self.lock();
                if st.durable >= ticket {
                    return Ok(());
                }
                if let Some(e) = self.failed.get() {
                    return Err(backend(format_args!(
                        "the store takes no writes until it is opened again, after an earlier flush failed: {e}"
                    )));
                }
                if st.flushing {
                    None
                } else {
                    st.flushing = true;
                    // Every ticket up to here belongs to a write that has completed.
                    Some(self.written.load(Ordering::SeqCst))
                }
            };
            match target {
                None => {
                    // The sender lives in `self`, so this cannot fail while we are borrowed.
                    let _ = epoch.changed().await;
                }
                Some(target) => return self.lead(target).await,
            }
        }
    }

    async fn lead(&self, target: u64) -> Result<()> {
        struct Handoff<'a>(&'a GroupCommit, Option<u64>);
        impl Drop for Handoff<'_> {
            fn drop(&mut self) {
                let mut st = self.0.lock();
                if let Some(done) = self.1 {
                    st.durable = st.durable.max(done);
                }
                st.flushing = false;
                drop(st);
                self.0.epoch.send_modify(|e| *e = e.wrapping_add(1));
            }
        }
        let mut handoff = Handoff(self, None);
        let db = self.db.clone();
        let log = self.log.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<()> {
            db.flush()
                .map_err(|e| backend(format_args!("flush failed: {e}")))?;
            log.sync_all()
                .map_err(|e| backend(format_args!("fsync failed: {e}")))?;
            Ok(())
        })
        .await
        .map_err(|e| backend(format_args!("flush task failed: {e}")))
        .and_then(|r| r);
        if result.is_ok() {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            handoff.1 = Some(target);
        } else if let Err(e) = &result {
            tracing::error!(error = %e, "storage flush failed");
            let _ = self.failed.set(e.to_string());
        }
        drop(handoff);
        result
    }

    #[cfg(test)]
    fn durable(&self) -> u64 {
        self.lock().durable
    }

    #[cfg(test)]
    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{OfflineStore, RosterStore, UserDataStore};

    /// Runs the test `name` of this test binary alone in a child process, with `env` set to
    /// `dir` (so it plays the child's part), its stdout piped to us.
    fn spawn_test_child(name: &str, env: &str, dir: &Path) -> std::process::Child {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(env, dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    fn open() -> (tempfile::TempDir, SledStorage) {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path()).unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn unsynced_pushes_share_one_flush_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            let before = s.commit.flushes();
            let mut last = SyncPoint::DURABLE;
            for i in 0..100 {
                let (seq, point) = s
                    .push_offline_unsynced("a@x", format!("m{i}").into_bytes(), 1000)
                    .await
                    .unwrap();
                assert_eq!(seq, i + 1);
                assert!(point > last);
                last = point;
            }
            // Nothing was flushed for them yet; one sync covers all of them.
            assert_eq!(s.commit.flushes(), before);
            s.sync(last).await.unwrap();
            assert_eq!(s.commit.flushes(), before + 1);
            assert!(s.commit.durable() >= last.0);
            // An earlier point is covered already: no further flush.
            s.sync(SyncPoint(last.0 - 50)).await.unwrap();
            s.sync(SyncPoint::DURABLE).await.unwrap();
            assert_eq!(s.commit.flushes(), before + 1);
            // The queue limit still holds.
            assert!(matches!(
                s.push_offline_unsynced("a@x", b"over".to_vec(), 100).await,
                Err(StorageError::QueueFull)
            ));
        }
        let s = SledStorage::open(dir.path()).unwrap();
        let msgs = s.offline_messages("a@x").await.unwrap();
        assert_eq!(msgs.len(), 100);
        assert_eq!(msgs.last().map(|m| m.1.clone()), Some(b"m99".to_vec()));
    }

    #[tokio::test]
    async fn sequence_numbers_are_reserved_in_blocks_and_written_back_at_flush() {
        let (_dir, s) = open();
        let disk = |s: &SledStorage| s.offline_meta_of("a@x").unwrap().last_seq;
        for i in 1..=10 {
            assert_eq!(
                s.push_offline("a@x", b"m".to_vec(), 10_000).await.unwrap(),
                i
            );
        }
        // One reservation for the first block, written before message 1.
        assert_eq!(disk(&s), SEQ_BLOCK);
        s.flush().await.unwrap();
        assert_eq!(disk(&s), 10);
        // The next push reserves again; a block boundary reserves the next block.
        assert_eq!(
            s.push_offline("a@x", b"m".to_vec(), 10_000).await.unwrap(),
            11
        );
        assert_eq!(disk(&s), 11 + SEQ_BLOCK - 1);
        for _ in 12..=11 + SEQ_BLOCK {
            s.push_offline_unsynced("a@x", b"m".to_vec(), 10_000)
                .await
                .unwrap();
        }
        assert_eq!(disk(&s), 11 + 2 * SEQ_BLOCK - 1);
        assert_eq!(s.offline_count("a@x").await.unwrap() as u64, 11 + SEQ_BLOCK);
        // An export names the numbers handed out, not the reservation.
        let mut counters = Vec::new();
        s.export(&mut |r| {
            if let Record::OfflineCounter { last_seq, .. } = r {
                counters.push(last_seq);
            }
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(counters, [11 + SEQ_BLOCK]);
    }

    #[tokio::test]
    async fn queue_state_is_loaded_from_what_a_killed_process_left() {
        let (_dir, s) = open();
        let meta = |last_seq, count| codec::encode_offline_meta(OfflineMeta { last_seq, count });
        // A process that reserved up to 2000, pushed, removed some and was killed: messages 5 and 7 are left,
        // and the count on disk is stale.
        s.offline_meta.insert("a@x", meta(2000, 9)).unwrap();
        for seq in [5, 7] {
            s.offline
                .insert(seq_key("a@x", seq), codec::encode_blob(b"m"))
                .unwrap();
        }
        assert_eq!(s.offline_count("a@x").await.unwrap(), 2);
        assert_eq!(
            s.push_offline("a@x", b"m".to_vec(), 10).await.unwrap(),
            2001
        );
        assert_eq!(s.offline_count("a@x").await.unwrap(), 3);
        // A message numbered above the reservation (this backend never writes one) still moves the numbering
        // past it, and the cap counts the messages, not the stale count.
        s.offline_meta.insert("b@x", meta(10, 50)).unwrap();
        s.offline
            .insert(seq_key("b@x", 3000), codec::encode_blob(b"m"))
            .unwrap();
        assert_eq!(s.push_offline("b@x", b"m".to_vec(), 2).await.unwrap(), 3001);
        assert!(matches!(
            s.push_offline("b@x", b"m".to_vec(), 2).await,
            Err(StorageError::QueueFull)
        ));
        s.remove_offline("b@x", 3000).await.unwrap();
        assert_eq!(s.offline_count("b@x").await.unwrap(), 1);
        assert_eq!(s.push_offline("b@x", b"m".to_vec(), 2).await.unwrap(), 3002);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deletion_racing_existence_checks_is_not_forgotten() {
        let (_dir, s) = open();
        let s = Arc::new(s);
        for round in 0..50 {
            s.create_account("a@x", vec![]).await.unwrap();
            let checker = {
                let s = s.clone();
                tokio::spawn(async move {
                    for _ in 0..200 {
                        s.account_exists("a@x").await.unwrap();
                        tokio::task::yield_now().await;
                    }
                })
            };
            tokio::task::yield_now().await;
            s.delete_account("a@x").await.unwrap();
            checker.await.unwrap();
            assert!(!s.account_exists("a@x").await.unwrap(), "round {round}");
        }
    }

    #[tokio::test]
    async fn evicted_queue_states_load_again() {
        let (_dir, s) = open();
        // More owners than one shard keeps: some states are evicted and loaded again.
        let owners: Vec<String> = (0..QUEUE_SHARDS * QUEUES_PER_SHARD * 2)
            .map(|i| format!("u{i}@x"))
            .collect();
        for o in &owners {
            s.push_offline_unsynced(o, b"m".to_vec(), 10).await.unwrap();
        }
        assert!(s
            .queues
            .shards
            .iter()
            .all(|q| lock(q).len() <= QUEUES_PER_SHARD));
        for o in &owners {
            let (seq, _) = s.push_offline_unsynced(o, b"m".to_vec(), 10).await.unwrap();
            assert!(seq >= 2, "{o}: {seq}");
            assert_eq!(s.offline_count(o).await.unwrap(), 2, "{o}");
        }
    }

    #[tokio::test]
    async fn corrupt_values_are_errors_not_panics() {
        let (_dir, s) = open();
        s.accounts.insert("a@x", &[1u8, 2, 3][..]).unwrap();
        s.accounts
            .insert("b@x", &[77u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..])
            .unwrap();
        s.accounts.insert(&[0xffu8, 0xfe][..], &[1u8][..]).unwrap();
        assert!(matches!(
            s.account("a@x").await,
            Err(StorageError::Corrupt(_))
        ));
        assert!(
            matches!(s.account("b@x").await, Err(StorageError::Corrupt(m)) if m.contains("version 77"))
        );
        assert!(matches!(
            s.list_accounts(None).await,
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(
            s.set_credentials("a@x", vec![]).await,
            Err(StorageError::Corrupt(_))
        ));

        s.roster_meta.insert("a@x", &[9u8][..]).unwrap();
        assert!(matches!(
            s.roster("a@x").await,
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(
            s.put_roster_item("a@x", RosterItem::new("c@y")).await,
            Err(StorageError::Corrupt(_))
        ));
        s.rosters.insert(owner_key("b@x", b"c@y"), &[][..]).unwrap();
        assert!(matches!(
            s.roster_item("b@x", "c@y").await,
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(
            s.roster("b@x").await,
            Err(StorageError::Corrupt(_))
        ));

        s.offline.insert(seq_key("a@x", 1), &[2u8][..]).unwrap();
        assert!(matches!(
            s.offline_messages("a@x").await,
            Err(StorageError::Corrupt(_))
        ));
        s.offline
            .insert(owner_key("b@x", b"short"), &[1u8][..])
            .unwrap();
        assert!(matches!(
            s.offline_messages("b@x").await,
            Err(StorageError::Corrupt(_))
        ));
        s.offline_meta.insert("c@x", &[1u8, 0][..]).unwrap();
        assert!(matches!(
            s.offline_count("c@x").await,
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(
            s.push_offline("c@x", b"m".to_vec(), 10).await,
            Err(StorageError::Corrupt(_))
        ));

        s.userdata
            .insert(owner_key("a@x", b"vcard"), &[][..])
            .unwrap();
        assert!(matches!(
            s.get_user_data("a@x", "vcard").await,
            Err(StorageError::Corrupt(_))
        ));
        s.userdata
            .insert(owner_key("b@x", &[0xff]), &[1u8][..])
            .unwrap();
        assert!(matches!(
            s.list_user_data("b@x", "").await,
            Err(StorageError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn second_open_fails_cleanly() {
        let (dir, s) = open();
        let err = SledStorage::open(dir.path()).unwrap_err();
        match &err {
            StorageError::Backend(m) => assert!(m.contains("already open"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        drop(s);
        // Once the first handle is gone the directory opens again.
        SledStorage::open(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn open_creates_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/c");
        let s = SledStorage::open(&p).unwrap();
        s.put_user_data("a@x", "k", b"v".to_vec()).await.unwrap();
        assert!(s.size_on_disk().is_some());
        assert_eq!(s.path(), p);
    }

    #[tokio::test]
    async fn open_on_a_file_fails_with_backend() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("file");
        std::fs::write(&p, b"x").unwrap();
        assert!(matches!(
            SledStorage::open(&p),
            Err(StorageError::Backend(_))
        ));
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (seq, ver) = {
            let s = SledStorage::open(dir.path()).unwrap();
            s.create_account("a@x", vec![]).await.unwrap();
            let mut item = RosterItem::new("b@y");
            item.groups = vec!["G".into()];
            s.put_roster_item("a@x", item).await.unwrap();
            let ver = s
                .put_roster_item("a@x", RosterItem::new("c@y"))
                .await
                .unwrap();
            s.push_offline("a@x", b"one".to_vec(), 10).await.unwrap();
            let seq = s.push_offline("a@x", b"two".to_vec(), 10).await.unwrap();
            s.remove_offline("a@x", seq).await.unwrap();
            s.push_offline("a@x", b"three".to_vec(), 10).await.unwrap();
            s.put_user_data("a@x", "vcard", b"<vCard/>".to_vec())
                .await
                .unwrap();
            (seq, ver)
        };
        let s = SledStorage::open(dir.path()).unwrap();
        let acc = s.account("a@x").await.unwrap().unwrap();
        assert_eq!(acc.jid, "a@x");
        let (v, items) = s.roster("a@x").await.unwrap();
        assert_eq!(v, ver);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].groups, vec!["G".to_string()]);
        let msgs = s.offline_messages("a@x").await.unwrap();
        assert_eq!(msgs, vec![(seq + 1, b"three".to_vec())]);
        assert_eq!(s.offline_count("a@x").await.unwrap(), 1);
        // The counter survived the restart even though the queue was emptied before.
        s.remove_offline("a@x", u64::MAX).await.unwrap();
        drop(s);
        let s = SledStorage::open(dir.path()).unwrap();
        assert_eq!(
            s.push_offline("a@x", b"four".to_vec(), 10).await.unwrap(),
            seq + 2
        );
        assert_eq!(
            s.get_user_data("a@x", "vcard").await.unwrap().unwrap(),
            b"<vCard/>"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_pushes_are_ordered_durable_and_capped() {
        let (_dir, s) = open();
        let s = Arc::new(s);
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let seq = s
                        .push_offline("a@x", format!("m{i}").into_bytes(), 1000)
                        .await
                        .unwrap();
                    // Durable on return: the flush watermark covers this write.
                    assert!(s.commit.durable() > 0);
                    seq
                })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        let msgs = s.offline_messages("a@x").await.unwrap();
        assert_eq!(msgs.len(), 200);
        assert!(msgs.windows(2).all(|w| w[0].0 < w[1].0));
        // Group commit: all writes are covered, by fewer flushes than writes.
        assert!(s.commit.durable() >= 200);
        let flushes = s.commit.flushes();
        assert!(flushes < 200, "{flushes} flushes for 200 concurrent writes");

        // Cap under concurrency: exactly `max` of 200 concurrent pushes succeed.
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.push_offline("b@x", format!("m{i}").into_bytes(), 50)
                        .await
                })
            })
            .collect();
        let (mut ok, mut full) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StorageError::QueueFull) => full += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((ok, full), (50, 150));
        assert_eq!(s.offline_count("b@x").await.unwrap(), 50);

        // And everything is there after a reopen.
        let s = Arc::into_inner(s).unwrap();
        let path = s.path().to_owned();
        drop(s);
        let s = SledStorage::open(&path).unwrap();
        assert_eq!(s.offline_messages("a@x").await.unwrap().len(), 200);
        assert_eq!(s.offline_count("b@x").await.unwrap(), 50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn group_commit_covers_concurrent_writers() {
        let (_dir, s) = open();
        let s = Arc::new(s);
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.put_user_data("a@x", &format!("k{i:03}"), vec![i as u8])
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(s.list_user_data("a@x", "k").await.unwrap().len(), 100);
        // Flush with nothing pending returns.
        s.flush().await.unwrap();
    }

    #[tokio::test]
    async fn cancelled_leader_hands_over() {
        let (_dir, s) = open();
        // Start a flush and drop it right away, possibly mid-flush; the next waiter must not hang.
        {
            let fut = s.flush();
            let _ = tokio::time::timeout(std::time::Duration::from_nanos(1), fut).await;
        }
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            s.put_user_data("a@x", "k", vec![1]),
        )
        .await
        .expect("group commit hung after a cancelled leader")
        .unwrap();
    }

    /// Everything whose write returned survives a SIGKILL. The test runs itself as a child process (selected
    /// by an environment variable), which reports each returned sequence number on stdout and is killed
    /// while still writing.
    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn acknowledged_writes_survive_sigkill() {
        use std::io::{BufRead, BufReader, Write};
        const CHILD_ENV: &str = "CONFAB_STORAGE_SIGKILL_CHILD_DIR";
        if let Ok(dir) = std::env::var(CHILD_ENV) {
            let s = Arc::new(SledStorage::open(Path::new(&dir)).unwrap());
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            for w in 0..8 {
                let (s, tx) = (s.clone(), tx.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        let owner = format!("u{w}@x");
                        let seq = s
                            .push_offline(&owner, format!("{w}/{i}").into_bytes(), usize::MAX)
                            .await
                            .unwrap();
                        if tx.send((w, seq)).is_err() {
                            return;
                        }
                    }
                });
            }
            let mut out = std::io::stdout().lock();
            while let Some((w, seq)) = rx.recv().await {
                writeln!(out, "ack {w} {seq}").unwrap();
                out.flush().unwrap();
            }
            return;
        }

        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_test_child(
            "sled::tests::acknowledged_writes_survive_sigkill",
            CHILD_ENV,
            dir.path(),
        );
        let mut acked: Vec<Vec<u64>> = vec![Vec::new(); 8];
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut n = 0;
        while n < 300 {
            let line = lines.next().expect("child ended early").unwrap();
            let Some(rest) = line.strip_prefix("ack ") else {
                continue;
            };
            let (w, seq) = rest.split_once(' ').unwrap();
            acked[w.parse::<usize>().unwrap()].push(seq.parse().unwrap());
            n += 1;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let s = SledStorage::open(dir.path()).unwrap();
        for (w, seqs) in acked.iter().enumerate() {
            let stored: Vec<u64> = s
                .offline_messages(&format!("u{w}@x"))
                .await
                .unwrap()
                .into_iter()
                .map(|(seq, _)| seq)
                .collect();
            for seq in seqs {
                assert!(
                    stored.contains(seq),
                    "acknowledged u{w}@x #{seq} lost; stored {stored:?}"
                );
            }
            // The count is counted again from the messages after the restart: exact.
            let owner = format!("u{w}@x");
            assert_eq!(s.offline_count(&owner).await.unwrap(), stored.len());
            assert!(stored.windows(2).all(|p| p[0] < p[1]));
            // The next push takes a fresh number, after a removal too.
            let last = stored.last().copied().unwrap_or(0);
            s.remove_offline(&owner, last).await.unwrap();
            assert_eq!(s.offline_count(&owner).await.unwrap(), 0);
            let next = s.push_offline(&owner, b"after".to_vec(), 10).await.unwrap();
            assert!(next > last);
            assert_eq!(s.offline_count(&owner).await.unwrap(), 1);
        }
    }

    /// Once a flush failed (here: the log cannot grow past the process's file size limit, as on a full
    /// disk), every later flush fails too, the final one of a clean close included; and the store opens
    /// again, without the limit, with everything acknowledged before, and takes writes.
    #[cfg(unix)]
    #[tokio::test]
    async fn after_a_failed_flush_every_flush_fails() {
        use std::io::{BufRead, BufReader, Write};
        const CHILD_ENV: &str = "CONFAB_STORAGE_FULL_CHILD_DIR";
        if let Ok(dir) = std::env::var(CHILD_ENV) {
            let s = SledStorage::open(Path::new(&dir)).unwrap();
            let mut out = std::io::stdout().lock();
            let body = vec![b'x'; 8192];
            for i in 0..1000 {
                match s.push_offline("a@x", body.clone(), usize::MAX).await {
                    Ok(seq) => writeln!(out, "ack {seq}").unwrap(),
                    Err(e) => {
                        writeln!(out, "failed at {i}: {e}").unwrap();
                        break;
                    }
                }
            }
            for _ in 0..20 {
                let flushed = s.commit.wait().await;
                writeln!(out, "flush {}", if flushed.is_ok() { "ok" } else { "err" }).unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let flushed = s.flush().await;
            writeln!(out, "flush {}", if flushed.is_ok() { "ok" } else { "err" }).unwrap();
            out.flush().unwrap();
            return;
        }

        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            s.create_account("a@x", vec![]).await.unwrap();
        }
        // At most one segment of sled's log (512 KiB, 1024 blocks of 512 bytes), which the store above
        // fits in; SIGXFSZ ignored, so that a write past the limit fails with EFBIG instead of killing the
        // child.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("trap '' XFSZ; ulimit -f 1024 && exec \"$@\"")
            .arg("sh")
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sled::tests::after_a_failed_flush_every_flush_fails",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stderr(std::process::Stdio::null())
            .output()
            .unwrap();
        let lines: Vec<String> = BufReader::new(&out.stdout[..])
            .lines()
            .map(|l| l.unwrap())
            .collect();
        let acked: Vec<u64> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("ack ")?.parse().ok())
            .collect();
        assert!(
            lines.iter().any(|l| l.starts_with("failed at ")),
            "{lines:?}"
        );
        assert!(!acked.is_empty(), "{lines:?}");
        let flushes: Vec<&String> = lines.iter().filter(|l| l.starts_with("flush ")).collect();
        assert_eq!(flushes.len(), 21, "{lines:?}");
        assert!(flushes.iter().all(|l| *l == "flush err"), "{flushes:?}");
        let s = SledStorage::open(dir.path()).unwrap();
        let stored: Vec<u64> = s
            .offline_messages("a@x")
            .await
            .unwrap()
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        for seq in &acked {
            assert!(
                stored.contains(seq),
                "acknowledged #{seq} lost; stored {stored:?}"
            );
        }
        s.push_offline("a@x", b"after".to_vec(), usize::MAX)
            .await
            .unwrap();
    }

    /// A killed process never leads to a sequence number used twice, even when the messages that had those
    /// numbers were removed (so that only the reservation remembers them) and the pushes crossed blocks.
    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sequence_numbers_are_not_reused_after_sigkill() {
        use std::io::{BufRead, BufReader, Write};
        const CHILD_ENV: &str = "CONFAB_STORAGE_SEQ_CHILD_DIR";
        const OWNERS: usize = 3;
        if let Ok(dir) = std::env::var(CHILD_ENV) {
            let s = Arc::new(SledStorage::open(Path::new(&dir)).unwrap());
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            for w in 0..OWNERS {
                let (s, tx) = (s.clone(), tx.clone());
                tokio::spawn(async move {
                    let owner = format!("u{w}@x");
                    loop {
                        // A batch made durable with one sync, then removed (durably) but for its last message.
                        let mut seqs = Vec::new();
                        let mut point = SyncPoint::DURABLE;
                        for i in 0..37 {
                            let (seq, p) = s
                                .push_offline_unsynced(&owner, format!("{i}").into_bytes(), 1000)
                                .await
                                .unwrap();
                            seqs.push(seq);
                            point = p;
                        }
                        s.sync(point).await.unwrap();
                        let n = seqs.len();
                        s.remove_offline(&owner, seqs[n - 2]).await.unwrap();
                        if tx.send((w, seqs[n - 2], seqs[n - 1])).is_err() {
                            return;
                        }
                    }
                });
            }
            let mut out = std::io::stdout().lock();
            while let Some((w, removed, kept)) = rx.recv().await {
                writeln!(out, "ack {w} {removed} {kept}").unwrap();
                out.flush().unwrap();
            }
            return;
        }

        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_test_child(
            "sled::tests::sequence_numbers_are_not_reused_after_sigkill",
            CHILD_ENV,
            dir.path(),
        );
        // Per owner, the highest acknowledged number. (Which messages survive is not checked here: a removal
        // in flight at the kill may have taken the last kept one; `acknowledged_writes_survive_sigkill` checks
        // survival.)
        let mut highest = [0u64; OWNERS];
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Past the first reservation block for every owner.
        while highest.iter().any(|h| *h < 2 * SEQ_BLOCK) {
            let line = lines.next().expect("child ended early").unwrap();
            let Some(rest) = line.strip_prefix("ack ") else {
                continue;
            };
            let f: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap()).collect();
            highest[f[0] as usize] = f[2];
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let s = SledStorage::open(dir.path()).unwrap();
        for (w, high) in highest.iter().enumerate() {
            let owner = format!("u{w}@x");
            let stored: Vec<u64> = s
                .offline_messages(&owner)
                .await
                .unwrap()
                .into_iter()
                .map(|(seq, _)| seq)
                .collect();
            assert_eq!(s.offline_count(&owner).await.unwrap(), stored.len());
            let above = stored.last().copied().unwrap_or(0).max(*high);
            // Even after removing everything, so that no message key remembers the numbers.
            s.remove_offline(&owner, u64::MAX).await.unwrap();
            let next = s.push_offline(&owner, b"after".to_vec(), 10).await.unwrap();
            assert!(next > above, "{owner}: {next} after {above}");
        }
        // And across a clean reopen, numbering goes on without a gap.
        let next = s.push_offline("u0@x", b"again".to_vec(), 10).await.unwrap();
        drop(s);
        let s = SledStorage::open(dir.path()).unwrap();
        assert_eq!(
            s.push_offline("u0@x", b"more".to_vec(), 10).await.unwrap(),
            next + 1
        );
    }

    #[tokio::test]
    async fn second_sweep_spares_a_recreated_account() {
        let (_dir, s) = open();
        s.create_account("a@x", vec![]).await.unwrap();
        s.put_user_data("a@x", "vcard", b"v".to_vec())
            .await
            .unwrap();
        s.push_offline("a@x", b"m".to_vec(), 5).await.unwrap();
        // The account exists: the sweep leaves its records alone.
        s.purge_owner("a@x", false).unwrap();
        assert_eq!(s.offline_count("a@x").await.unwrap(), 1);
        assert!(s.get_user_data("a@x", "vcard").await.unwrap().is_some());
        // Records without an account (a write that raced with a deletion) are swept, queue state included.
        s.delete_account("a@x").await.unwrap();
        s.push_offline("a@x", b"late".to_vec(), 5).await.unwrap();
        s.put_roster_item("a@x", RosterItem::new("b@y"))
            .await
            .unwrap();
        s.purge_owner("a@x", false).unwrap();
        assert_eq!(s.offline_count("a@x").await.unwrap(), 0);
        assert!(s.offline_messages("a@x").await.unwrap().is_empty());
        assert_eq!(s.roster("a@x").await.unwrap(), (0, vec![]));
        assert!(s.offline_meta.get("a@x").unwrap().is_none());
        assert!(matches!(
            s.purge_owner("a@x", true),
            Err(StorageError::NoSuchAccount)
        ));
    }

    /// The names of the snapshot files in `dir`, sorted as sled sorts them.
    fn snapshot_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("snap."))
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn an_unfinished_snapshot_left_by_a_kill_during_open_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            s.create_account("a@x", vec![]).await.unwrap();
            for i in 0..3 {
                s.push_offline("a@x", format!("m{i}").into_bytes(), 10)
                    .await
                    .unwrap();
            }
            s.put_user_data("a@x", "vcard", b"v".to_vec())
                .await
                .unwrap();
        }
        // What a kill leaves while sled writes a snapshot at open (`write_snapshot`): nothing written yet,
        // one page written, or part of the snapshot's bytes.
        for case in ["empty", "one page", "part of a snapshot"] {
            // Each open that follows writes of a previous one writes a snapshot.
            drop(SledStorage::open(dir.path()).unwrap());
            let names = snapshot_files(dir.path());
            let newest = names.last().expect("sled wrote a snapshot");
            assert!(!newest.ends_with(".generating"), "{names:?}");
            let lsn = u64::from_str_radix(newest.trim_start_matches("snap."), 16).unwrap();
            let finished = std::fs::read(dir.path().join(newest)).unwrap();
            let content = match case {
                "empty" => Vec::new(),
                "one page" => vec![0xAB; 4096],
                _ => finished[..finished.len() / 2].to_vec(),
            };
            let unfinished = dir.path().join(format!("snap.{:016X}.generating", lsn + 1));
            std::fs::write(&unfinished, content).unwrap();
            // sled alone refuses the store, at every open.
            for _ in 0..2 {
                match ::sled::Config::new().path(dir.path()).open() {
                    Err(::sled::Error::Corruption { .. }) => {}
                    other => panic!("{case}: sled opened it: {:?}", other.map(|_| ())),
                }
            }
            let s = SledStorage::open(dir.path()).unwrap();
            assert!(
                !unfinished.exists(),
                "{case}: {:?}",
                snapshot_files(dir.path())
            );
            assert!(s.account_exists("a@x").await.unwrap(), "{case}");
            let bodies: Vec<_> = s
                .offline_messages("a@x")
                .await
                .unwrap()
                .into_iter()
                .map(|(_, m)| m)
                .collect();
            assert_eq!(
                bodies,
                [b"m0".to_vec(), b"m1".to_vec(), b"m2".to_vec()],
                "{case}"
            );
            assert_eq!(
                s.get_user_data("a@x", "vcard").await.unwrap(),
                Some(b"v".to_vec()),
                "{case}"
            );
            // And it writes again.
            s.put_user_data("a@x", "private", case.as_bytes().to_vec())
                .await
                .unwrap();
        }
        let s = SledStorage::open(dir.path()).unwrap();
        assert_eq!(
            s.get_user_data("a@x", "private").await.unwrap(),
            Some(b"part of a snapshot".to_vec())
        );
    }

    #[tokio::test]
    async fn an_unfinished_snapshot_of_a_store_open_elsewhere_is_left_alone() {
        let (dir, s) = open();
        s.create_account("a@x", vec![]).await.unwrap();
        // Another open in progress (here: a live handle) owns its snapshot file.
        let in_progress = dir.path().join("snap.00000000FFFFFFFF.generating");
        std::fs::write(&in_progress, b"").unwrap();
        let started = std::time::Instant::now();
        let err = SledStorage::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("already open"), "{err}");
        assert!(started.elapsed() >= LOCK_GRACE);
        assert!(in_progress.exists());
        drop(s);
        std::fs::remove_file(&in_progress).unwrap();
    }
}
