//! What both backends share for [`BackupStore`](crate::BackupStore): records checked against each other and
//! grouped by owner before an import touches anything.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use crate::keys::check_owner;
use crate::{Account, Record, Result, RosterItem, StorageError};

/// One owner's offline queue: the counter and the messages by sequence number.
#[derive(Default)]
pub(crate) struct Queue {
    pub(crate) last_seq: Option<u64>,
    pub(crate) messages: BTreeMap<u64, Vec<u8>>,
}

impl Queue {
    /// The counter to store: the exported one, or the highest message when there was none.
    pub(crate) fn counter(&self) -> u64 {
        self.last_seq
            .unwrap_or_else(|| self.messages.keys().next_back().copied().unwrap_or(0))
    }
}

/// Validated records, by kind and owner, in key order.
#[derive(Default)]
pub(crate) struct Snapshot {
    pub(crate) accounts: BTreeMap<String, Account>,
    pub(crate) roster_versions: BTreeMap<String, u64>,
    pub(crate) rosters: BTreeMap<String, BTreeMap<String, RosterItem>>,
    pub(crate) offline: BTreeMap<String, Queue>,
    pub(crate) userdata: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

fn corrupt(msg: String) -> StorageError {
    StorageError::Corrupt(msg)
}

/// Inserts unless the key is taken.
fn unique<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    key: K,
    value: V,
    what: impl FnOnce() -> String,
) -> Result<()> {
    match map.entry(key) {
        Entry::Vacant(e) => {
            e.insert(value);
            Ok(())
        }
        Entry::Occupied(_) => Err(corrupt(format!("duplicate {}", what()))),
    }
}

impl Snapshot {
    /// Checks that `records` can be imported as they are: no key twice, owners usable as keys, offline
    /// sequence numbers from 1 and at most their owner's counter.
    pub(crate) fn from_records(records: Vec<Record>) -> Result<Snapshot> {
        let mut s = Snapshot::default();
        for r in records {
            let owner = r.owner().to_owned();
            check_owner(&owner).map_err(|e| corrupt(e.to_string()))?;
            match r {
                Record::Account(a) => {
                    unique(&mut s.accounts, owner, a, || "account".to_string())?;
                }
                Record::RosterVersion { version, .. } => {
                    let what = || format!("roster version of {owner}");
                    unique(&mut s.roster_versions, owner.clone(), version, what)?;
                }
                Record::RosterItem { item, .. } => {
                    let what = || format!("roster item {} of {owner}", item.jid);
                    let items = s.rosters.entry(owner.clone()).or_default();
                    unique(items, item.jid.clone(), item.clone(), what)?;
                }
                Record::OfflineCounter { last_seq, .. } => {
                    let q = s.offline.entry(owner.clone()).or_default();
                    if q.last_seq.replace(last_seq).is_some() {
                        return Err(corrupt(format!("duplicate offline counter of {owner}")));
                    }
                }
                Record::OfflineMessage { seq, stanza, .. } => {
                    if seq == 0 {
                        return Err(corrupt(format!(
                            "offline message of {owner} numbered 0 (numbers start at 1)"
                        )));
                    }
                    let what = || format!("offline message {seq} of {owner}");
                    let q = s.offline.entry(owner.clone()).or_default();
                    unique(&mut q.messages, seq, stanza, what)?;
                }
                Record::UserData { key, value, .. } => {
                    let what = || format!("user data {key:?} of {owner}");
                    let data = s.userdata.entry(owner.clone()).or_default();
                    unique(data, key.clone(), value, what)?;
                }
            }
        }
        for (owner, q) in &s.offline {
            if let (Some(last), Some(&top)) = (q.last_seq, q.messages.keys().next_back()) {
                if top > last {
                    return Err(corrupt(format!(
                        "offline message {top} of {owner} is above its counter {last}"
                    )));
                }
            }
        }
        Ok(s)
    }
}

/// The refusal of an import into a store holding `accounts` accounts (and maybe other records).
pub(crate) fn not_empty(accounts: usize) -> StorageError {
    if accounts > 0 {
        StorageError::NotEmpty(format!(
            "it holds {accounts} account(s); restore only into an empty store (a new data directory)"
        ))
    } else {
        StorageError::NotEmpty(
            "it holds records of deleted or never created accounts; restore only into an empty store \
             (a new data directory)"
                .into(),
        )
    }
}
