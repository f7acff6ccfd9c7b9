//! An in-memory backend for tests: the same semantics as the sled backend, nothing survives a drop.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::keys::{check_owner, domain_of};
use crate::snapshot::{not_empty, Snapshot};
use crate::{
    Account, AccountStore, BackupStore, OfflineStore, Record, RecordSink, Result, RosterItem,
    RosterStore, Storage, StorageError, StoredCredential, UserDataStore,
};

#[derive(Default)]
struct OfflineQueue {
    last_seq: u64,
    messages: BTreeMap<u64, Vec<u8>>,
}

#[derive(Default)]
struct Inner {
    accounts: BTreeMap<String, Account>,
    rosters: HashMap<String, (u64, BTreeMap<String, RosterItem>)>,
    offline: HashMap<String, OfflineQueue>,
    userdata: HashMap<String, BTreeMap<String, Vec<u8>>>,
}

/// Everything in one mutex: every call is atomic, and no lock is held across an await.
#[derive(Default)]
pub struct MemoryStorage {
    inner: Mutex<Inner>,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-done update (each call mutates through std
        // collections that stay consistent), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[async_trait::async_trait]
impl AccountStore for MemoryStorage {
    async fn create_account(&self, jid: &str, credentials: Vec<StoredCredential>) -> Result<()> {
        check_owner(jid)?;
        let mut g = self.lock();
        if g.accounts.contains_key(jid) {
            return Err(StorageError::AccountExists);
        }
        let account = Account {
            jid: jid.to_owned(),
            credentials,
            created_unix: now_unix(),
        };
        g.accounts.insert(jid.to_owned(), account);
        Ok(())
    }

    async fn account(&self, jid: &str) -> Result<Option<Account>> {
        Ok(self.lock().accounts.get(jid).cloned())
    }

    async fn set_credentials(&self, jid: &str, credentials: Vec<StoredCredential>) -> Result<()> {
        match self.lock().accounts.get_mut(jid) {
            Some(a) => {
                a.credentials = credentials;
                Ok(())
            }
            None => Err(StorageError::NoSuchAccount),
        }
    }

    async fn delete_account(&self, jid: &str) -> Result<()> {
        check_owner(jid)?;
        let mut g = self.lock();
        if g.accounts.remove(jid).is_none() {
            return Err(StorageError::NoSuchAccount);
        }
        g.rosters.remove(jid);
        g.offline.remove(jid);
        g.userdata.remove(jid);
        Ok(())
    }

    async fn list_accounts(&self, domain: Option<&str>) -> Result<Vec<String>> {
        let g = self.lock();
        Ok(g.accounts
            .keys()
            .filter(|j| domain.is_none() || domain == Some(domain_of(j)))
            .cloned()
            .collect())
    }
}

#[async_trait::async_trait]
impl RosterStore for MemoryStorage {
    async fn roster(&self, owner: &str) -> Result<(u64, Vec<RosterItem>)> {
        check_owner(owner)?;
        Ok(match self.lock().rosters.get(owner) {
            Some((v, items)) => (*v, items.values().cloned().collect()),
            None => (0, Vec::new()),
        })
    }

    async fn roster_item(&self, owner: &str, jid: &str) -> Result<Option<RosterItem>> {
        check_owner(owner)?;
        Ok(self
            .lock()
            .rosters
            .get(owner)
            .and_then(|(_, items)| items.get(jid).cloned()))
    }

    async fn put_roster_item(&self, owner: &str, item: RosterItem) -> Result<u64> {
        check_owner(owner)?;
        let mut g = self.lock();
        let (v, items) = g.rosters.entry(owner.to_owned()).or_default();
        *v += 1;
        items.insert(item.jid.clone(), item);
        Ok(*v)
    }

    async fn remove_roster_item(&self, owner: &str, jid: &str) -> Result<u64> {
        check_owner(owner)?;
        let mut g = self.lock();
        let (v, items) = g.rosters.entry(owner.to_owned()).or_default();
        *v += 1;
        items.remove(jid);
        Ok(*v)
    }
}

#[async_trait::async_trait]
impl OfflineStore for MemoryStorage {
    async fn push_offline(&self, owner: &str, stanza: Vec<u8>, max: usize) -> Result<u64> {
        check_owner(owner)?;
        let mut g = self.lock();
        let q = g.offline.entry(owner.to_owned()).or_default();
        if q.messages.len() >= max {
            return Err(StorageError::QueueFull);
        }
        q.last_seq += 1;
        q.messages.insert(q.last_seq, stanza);
        Ok(q.last_seq)
    }

    async fn offline_messages(&self, owner: &str) -> Result<Vec<(u64, Vec<u8>)>> {
        check_owner(owner)?;
        Ok(self
            .lock()
            .offline
            .get(owner)
            .map(|q| q.messages.iter().map(|(s, m)| (*s, m.clone())).collect())
            .unwrap_or_default())
    }

    async fn offline_page(
        &self,
        owner: &str,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        check_owner(owner)?;
        let state = self.lock();
        let Some(q) = state.offline.get(owner) else {
            return Ok(Vec::new());
        };
        let items = q.messages.iter().map(|(seq, m)| Ok((*seq, m.clone())));
        crate::offline_page_of(items, max_count, max_bytes)
    }

    async fn remove_offline(&self, owner: &str, up_to_seq: u64) -> Result<()> {
        check_owner(owner)?;
        if let Some(q) = self.lock().offline.get_mut(owner) {
            q.messages = match up_to_seq.checked_add(1) {
                Some(first_kept) => q.messages.split_off(&first_kept),
                None => BTreeMap::new(),
            };
        }
        Ok(())
    }

    async fn offline_count(&self, owner: &str) -> Result<usize> {
        check_owner(owner)?;
        Ok(self
            .lock()
            .offline
            .get(owner)
            .map_or(0, |q| q.messages.len()))
    }
}

#[async_trait::async_trait]
impl UserDataStore for MemoryStorage {
    async fn get_user_data(&self, owner: &str, key: &str) -> Result<Option<Vec<u8>>> {
        check_owner(owner)?;
        Ok(self
            .lock()
            .userdata
            .get(owner)
            .and_then(|m| m.get(key).cloned()))
    }

    async fn put_user_data(&self, owner: &str, key: &str, value: Vec<u8>) -> Result<()> {
        check_owner(owner)?;
        self.lock()
            .userdata
            .entry(owner.to_owned())
            .or_default()
            .insert(key.to_owned(), value);
        Ok(())
    }

    async fn delete_user_data(&self, owner: &str, key: &str) -> Result<()> {
        check_owner(owner)?;
        if let Some(m) = self.lock().userdata.get_mut(owner) {
            m.remove(key);
        }
        Ok(())
    }

    async fn list_user_data(
        &self,
        owner: &str,
        key_prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        check_owner(owner)?;
        Ok(self
            .lock()
            .userdata
            .get(owner)
            .map(|m| {
                m.range(key_prefix.to_owned()..)
                    .take_while(|(k, _)| k.starts_with(key_prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// `owner`s of a map, sorted, so exports come out in the same order as the sled backend's.
fn sorted<V>(m: &HashMap<String, V>) -> Vec<(&String, &V)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

/// The snapshot is taken under the one mutex, so it is one point in time; the sink runs after the mutex is
/// released.
#[async_trait::async_trait]
impl BackupStore for MemoryStorage {
    async fn export(&self, sink: &mut RecordSink<'_>) -> Result<()> {
        let records = {
            let g = self.lock();
            let mut out: Vec<Record> = g.accounts.values().cloned().map(Record::Account).collect();
            for (owner, (version, items)) in sorted(&g.rosters) {
                out.push(Record::RosterVersion {
                    owner: owner.clone(),
                    version: *version,
                });
                out.extend(items.values().map(|item| Record::RosterItem {
                    owner: owner.clone(),
                    item: item.clone(),
                }));
            }
            for (owner, q) in sorted(&g.offline) {
                out.push(Record::OfflineCounter {
                    owner: owner.clone(),
                    last_seq: q.last_seq,
                });
                out.extend(q.messages.iter().map(|(seq, m)| Record::OfflineMessage {
                    owner: owner.clone(),
                    seq: *seq,
                    stanza: m.clone(),
                }));
            }
            for (owner, data) in sorted(&g.userdata) {
                out.extend(data.iter().map(|(k, v)| Record::UserData {
                    owner: owner.clone(),
                    key: k.clone(),
                    value: v.clone(),
                }));
            }
            out
        };
        records.into_iter().try_for_each(sink)
    }

    async fn import(&self, records: Vec<Record>) -> Result<()> {
        let snap = Snapshot::from_records(records)?;
        let mut g = self.lock();
        if !(g.accounts.is_empty()
            && g.rosters.is_empty()
            && g.offline.is_empty()
            && g.userdata.is_empty())
        {
            return Err(not_empty(g.accounts.len()));
        }
        g.accounts = snap.accounts;
        let mut owners: Vec<&String> = snap.roster_versions.keys().collect();
        owners.extend(snap.rosters.keys());
        for owner in owners {
            let version = snap.roster_versions.get(owner).copied().unwrap_or(0);
            let items = snap.rosters.get(owner).cloned().unwrap_or_default();
            g.rosters.insert(owner.clone(), (version, items));
        }
        for (owner, q) in snap.offline {
            let last_seq = q.counter();
            g.offline.insert(
                owner,
                OfflineQueue {
                    last_seq,
                    messages: q.messages,
                },
            );
        }
        g.userdata = snap.userdata.into_iter().collect();
        Ok(())
    }
}

#[async_trait::async_trait]
impl Storage for MemoryStorage {
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}
