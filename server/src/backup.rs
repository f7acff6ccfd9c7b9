//! `confab backup FILE` and `confab restore FILE`: the whole store in one versioned text file.
//!
//! # Format, version 1
//!
//! UTF-8 text, one item a line, each line ending in `\n`:
//!
//! 1. the header `confab-backup 1` (the format version; a reader refuses any other);
//! 2. a `meta` object: `{"type":"meta","confab":"0.1.0","created_unix":1700000000}`;
//! 3. any number of records, JSON objects tagged by `type`: `account`, `roster_version`,
//!    `roster_item`, `offline_counter`, `offline_message`, `user_data` (fields below, on [`Line`]);
//!    byte strings (SCRAM salts and keys, offline stanzas, user data values) are standard base64
//!    with padding;
//! 4. the end line `{"type":"end","records":N,"sha256":"…"}`: N is the number of records, and the
//!    checksum is the SHA-256 (lowercase hex) of every byte of the file before this line.
//!
//! Nothing may follow the end line. Unknown record types and unknown fields are errors, not skipped:
//! a format change that old readers must not misread gets a new version number. A file without
//! its end line (truncated), with a wrong count or checksum, or with a line that does not parse is
//! refused as a whole before the store is touched.
//!
//! # Consistency
//!
//! The records are one point in time of the store (see `BackupStore::export`): writes racing the
//! backup are either wholly in it or wholly absent. A restore goes into an empty store only, in one
//! atomic step.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use confab_storage::{Account, Record, RosterItem, Storage, StorageError, StoredCredential};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first word of the header line.
pub const MAGIC: &str = "confab-backup";
/// The format version this build writes and the only one it reads.
pub const VERSION: u32 = 1;

/// What a backup or restore did, for the command's output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub accounts: usize,
    pub records: usize,
}

/// A SCRAM credential in a backup: the stored keys, never a password.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// `SHA-1`, `SHA-256` or `SHA-512`.
    pub hash: String,
    pub salt: String,
    pub iterations: u32,
    pub stored_key: String,
    pub server_key: String,
}

/// One line of a backup after the header.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Line {
    Meta {
        /// The version of confab that wrote the file.
        confab: String,
        created_unix: u64,
    },
    Account {
        jid: String,
        created_unix: u64,
        credentials: Vec<Credential>,
    },
    /// The roster version of RFC 6121 §2.6 (absent for a roster never written).
    RosterVersion {
        owner: String,
        version: u64,
    },
    RosterItem {
        owner: String,
        jid: String,
        #[serde(default)]
        name: Option<String>,
        /// `none`, `to`, `from` or `both`.
        subscription: String,
        /// An outbound subscription request is pending (`ask="subscribe"`).
        ask: bool,
        /// A pre-approved inbound subscription (RFC 6121 §3.4).
        approved: bool,
        groups: Vec<String>,
    },
    /// The last offline sequence number handed out (kept even for an empty queue).
    OfflineCounter {
        owner: String,
        last_seq: u64,
    },
    /// A stored stanza (with its XEP-0203 delay stamp) and its sequence number.
    OfflineMessage {
        owner: String,
        seq: u64,
        stanza: String,
    },
    /// vCard (`vcard`), private XML (`private/…`), pending subscription requests, ...
    UserData {
        owner: String,
        key: String,
        value: String,
    },
    End {
        records: u64,
        sha256: String,
    },
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn unb64(field: &str, s: &str) -> anyhow::Result<Vec<u8>> {
    B64.decode(s)
        .map_err(|e| anyhow!("{field} is not valid base64: {e}"))
}

impl Line {
    /// The line of a record. `Record` is non-exhaustive: a kind this build does not know fails the
    /// backup rather than leaving it out silently.
    pub fn from_record(r: Record) -> anyhow::Result<Line> {
        Ok(match r {
            Record::Account(a) => Line::Account {
                jid: a.jid,
                created_unix: a.created_unix,
                credentials: a
                    .credentials
                    .iter()
                    .map(|c| Credential {
                        hash: c.hash.clone(),
                        salt: b64(&c.salt),
                        iterations: c.iterations,
                        stored_key: b64(&c.stored_key),
                        server_key: b64(&c.server_key),
                    })
                    .collect(),
            },
            Record::RosterVersion { owner, version } => Line::RosterVersion { owner, version },
            Record::RosterItem { owner, item } => Line::RosterItem {
                owner,
                jid: item.jid,
                name: item.name,
                subscription: item.subscription.as_str().to_string(),
                ask: item.ask,
                approved: item.approved,
                groups: item.groups,
            },
            Record::OfflineCounter { owner, last_seq } => Line::OfflineCounter { owner, last_seq },
            Record::OfflineMessage { owner, seq, stanza } => Line::OfflineMessage {
                owner,
                seq,
                stanza: b64(&stanza),
            },
            Record::UserData { owner, key, value } => Line::UserData {
                owner,
                key,
                value: b64(&value),
            },
            other => bail!("this version of confab cannot back up a record like {other:?}"),
        })
    }

    /// The record of a line; `None` for `meta` and `end`.
    pub fn into_record(self) -> anyhow::Result<Option<Record>> {
        Ok(Some(match self {
            Line::Meta { .. } | Line::End { .. } => return Ok(None),
            Line::Account {
                jid,
                created_unix,
                credentials,
            } => {
                let mut creds = Vec::with_capacity(credentials.len());
                for c in credentials {
                    creds.push(StoredCredential {
                        salt: unb64("salt", &c.salt)?,
                        stored_key: unb64("stored_key", &c.stored_key)?,
                        server_key: unb64("server_key", &c.server_key)?,
                        hash: c.hash,
                        iterations: c.iterations,
                    });
                }
                Record::Account(Account {
                    jid,
                    credentials: creds,
                    created_unix,
                })
            }
            Line::RosterVersion { owner, version } => Record::RosterVersion { owner, version },
            Line::RosterItem {
                owner,
                jid,
                name,
                subscription,
                ask,
                approved,
                groups,
            } => Record::RosterItem {
                owner,
                item: RosterItem {
                    subscription: subscription.parse()?,
                    jid,
                    name,
                    ask,
                    approved,
                    groups,
                },
            },
            Line::OfflineCounter { owner, last_seq } => Record::OfflineCounter { owner, last_seq },
            Line::OfflineMessage { owner, seq, stanza } => Record::OfflineMessage {
                owner,
                seq,
                stanza: unb64("stanza", &stanza)?,
            },
            Line::UserData { owner, key, value } => Record::UserData {
                owner,
                key,
                value: unb64("value", &value)?,
            },
        }))
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `FILE.tmp`, next to `FILE`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes lines while hashing them.
struct Out {
    file: BufWriter<File>,
    hash: Sha256,
    records: u64,
}

impl Out {
    fn raw(&mut self, line: &str) -> std::io::Result<()> {
        self.hash.update(line.as_bytes());
        self.hash.update(b"\n");
        self.file.write_all(line.as_bytes())?;
        self.file.write_all(b"\n")
    }

    fn line(&mut self, line: &Line) -> anyhow::Result<()> {
        let json = serde_json::to_string(line)?;
        Ok(self.raw(&json)?)
    }
}

/// Backs up the whole store into `path`: written to `path.tmp`, synced, then renamed over `path`
/// (so `path` is always either the previous file or a complete new one), with mode 0600 (the file
/// holds SCRAM keys, which allow offline password guessing). File I/O runs off the async workers.
pub async fn backup(storage: Arc<dyn Storage>, path: &Path) -> anyhow::Result<Summary> {
    let path = path.to_owned();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let tmp = tmp_path(&path);
        let file = open_tmp(&tmp)?;
        let result = write_backup(&runtime, storage, file, &path, &tmp);
        if result.is_err() {
            // Ours to remove: we hold its lock.
            let _ = std::fs::remove_file(&tmp);
        }
        result
    })
    .await
    .context("the backup task failed")?
}

/// Opens `FILE.tmp` for writing, locked against a concurrent backup to the same file, empty,
/// mode 0600. A `FILE.tmp` left by a crashed backup is reused.
fn open_tmp(tmp: &Path) -> anyhow::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options
        .open(tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let busy = || anyhow!("another backup is being written to {}", tmp.display());
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => busy(),
        std::fs::TryLockError::Error(e) => anyhow!("cannot lock {}: {e}", tmp.display()),
    })?;
    // The other backup may have renamed the file we opened between our open and our lock.
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let ours = file.metadata()?;
        match std::fs::metadata(tmp) {
            Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {}
            _ => return Err(busy()),
        }
    }
    file.set_len(0)
        .with_context(|| format!("cannot truncate {}", tmp.display()))?;
    // A reused FILE.tmp keeps its old mode otherwise.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", tmp.display()))?;
    }
    Ok(file)
}

fn write_backup(
    runtime: &tokio::runtime::Handle,
    storage: Arc<dyn Storage>,
    file: File,
    path: &Path,
    tmp: &Path,
) -> anyhow::Result<Summary> {
    let mut out = Out {
        file: BufWriter::new(file),
        hash: Sha256::new(),
        records: 0,
    };
    let write_err = |e: std::io::Error| anyhow!("cannot write {}: {e}", tmp.display());
    out.raw(&format!("{MAGIC} {VERSION}")).map_err(write_err)?;
    out.line(&Line::Meta {
        confab: env!("CARGO_PKG_VERSION").to_string(),
        created_unix: now_unix(),
    })?;
    let mut accounts = 0;
    // The sink cannot carry an anyhow error through the storage API: keep it aside.
    let mut failure: Option<anyhow::Error> = None;
    let exported = runtime.block_on(storage.export(&mut |record| {
        accounts += usize::from(matches!(record, Record::Account(_)));
        let r = Line::from_record(record).and_then(|l| out.line(&l));
        r.map_err(|e| {
            let msg = e.to_string();
            failure = Some(e);
            StorageError::Backend(msg)
        })?;
        out.records += 1;
        Ok(())
    }));
    if let Some(e) = failure {
        return Err(e.context(format!("cannot write {}", tmp.display())));
    }
    exported.context("cannot read the store")?;
    let sha256 = hex(&std::mem::take(&mut out.hash).finalize());
    let records = out.records;
    out.line(&Line::End { records, sha256 })?;
    let file = out
        .file
        .into_inner()
        .map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)?;
    // Still open, so still locked, while it is renamed.
    std::fs::rename(tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    drop(file);
    // The rename itself must survive a crash (best effort where directories cannot be synced).
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Summary {
        accounts,
        records: usize::try_from(records).unwrap_or(usize::MAX),
    })
}

/// The next line without its `\n`; `None` at the end of the file or for a last line without its
/// `\n` (a file cut short).
fn next_line<'a>(
    reader: &mut impl BufRead,
    buf: &'a mut Vec<u8>,
    name: &std::path::Display<'_>,
) -> anyhow::Result<Option<&'a [u8]>> {
    buf.clear();
    reader
        .read_until(b'\n', buf)
        .with_context(|| format!("cannot read {name}"))?;
    Ok(match buf.split_last() {
        Some((b'\n', line)) => Some(line),
        _ => None,
    })
}

/// Reads and checks a whole backup file: the header, every line, the count and the checksum.
/// Nothing is returned unless all of it is sound.
pub fn read_backup(path: &Path) -> anyhow::Result<Vec<Record>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let name = path.display();
    let mut reader = BufReader::new(file);
    let mut hash = Sha256::new();
    let mut buf = Vec::new();

    let header = next_line(&mut reader, &mut buf, &name)?.unwrap_or_default();
    hash.update(header);
    hash.update(b"\n");
    let version = header
        .strip_prefix(MAGIC.as_bytes())
        .and_then(|v| v.strip_prefix(b" "))
        .and_then(|v| std::str::from_utf8(v).ok());
    let Some(version) = version else {
        bail!("{name} is not a confab backup (it does not start with `{MAGIC} {VERSION}`)");
    };
    match version.parse::<u32>() {
        Ok(VERSION) => {}
        Ok(v) => bail!(
            "{name} is in backup format version {v}; this confab reads version {VERSION} only (restore it with the confab that wrote it, or a newer one)"
        ),
        Err(_) => bail!("{name} is not a confab backup (bad version {version:?} in its header)"),
    }

    let mut records = Vec::new();
    let mut number = 1u64;
    loop {
        let Some(bytes) = next_line(&mut reader, &mut buf, &name)? else {
            bail!(
                "{name} is truncated: it ends after {} record(s) without its end line",
                records.len()
            );
        };
        number += 1;
        let line: Line = std::str::from_utf8(bytes)
            .map_err(|_| anyhow!("line {number} is not UTF-8"))
            .and_then(|text| Ok(serde_json::from_str(text)?))
            .map_err(|e| anyhow!("{name} is corrupt: line {number}: {e}"))?;
        match (&line, number) {
            (Line::Meta { .. }, 2) => {}
            (_, 2) => bail!("{name} is corrupt: line 2 is not the meta line"),
            (Line::Meta { .. }, _) => bail!("{name} is corrupt: line {number}: a second meta line"),
            (Line::End { records: n, sha256 }, _) => {
                if *n != records.len() as u64 {
                    bail!(
                        "{name} is corrupt: its end line counts {n} record(s), the file holds {}",
                        records.len()
                    );
                }
                if *sha256 != hex(&hash.finalize()) {
                    bail!("{name} is corrupt: the checksum does not match its content");
                }
                break;
            }
            _ => {}
        }
        hash.update(bytes);
        hash.update(b"\n");
        if let Some(r) = line
            .into_record()
            .map_err(|e| anyhow!("{name} is corrupt: line {number}: {e}"))?
        {
            records.push(r);
        }
    }
    buf.clear();
    if reader
        .read_until(b'\n', &mut buf)
        .with_context(|| format!("cannot read {name}"))?
        > 0
    {
        bail!("{name} is corrupt: there is data after its end line");
    }
    Ok(records)
}

/// Restores a backup into `storage`, which must be empty: the file is read and checked in full
/// first, then imported in one atomic step. On any error the store is unchanged.
pub async fn restore(storage: &dyn Storage, path: &Path) -> anyhow::Result<Summary> {
    let owned = path.to_owned();
    let records = tokio::task::spawn_blocking(move || read_backup(&owned))
        .await
        .context("the restore task failed")??;
    let summary = Summary {
        accounts: records
            .iter()
            .filter(|r| matches!(r, Record::Account(_)))
            .count(),
        records: records.len(),
    };
    match storage.import(records).await {
        Ok(()) => Ok(summary),
        Err(e @ StorageError::NotEmpty(_)) => Err(anyhow!("nothing restored: {e}")),
        Err(StorageError::Corrupt(m)) => Err(anyhow!(
            "nothing restored: {} is inconsistent: {m}",
            path.display()
        )),
        Err(e) => Err(anyhow!("nothing restored: {e}")),
    }
}

/// The line `confab backup` prints.
pub fn backup_line(s: Summary, path: &Path) -> String {
    format!(
        "backed up {} account(s) in {} record(s) to {}",
        s.accounts,
        s.records,
        path.display()
    )
}

/// The line `confab restore` prints.
pub fn restore_line(s: Summary, path: &Path) -> String {
    format!(
        "restored {} account(s) in {} record(s) from {}",
        s.accounts,
        s.records,
        path.display()
    )
}

/// The server's paths are not the command line's: the admin socket takes absolute paths only.
fn absolute(path: &Path) -> Result<(), String> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "{} is not an absolute path (the server does not share the command's working directory)",
            path.display()
        ))
    }
}

/// `Backup` over the admin socket: the running server writes the file, as its own user.
pub async fn admin_backup(server: &crate::Server, path: &Path) -> Result<String, String> {
    absolute(path)?;
    let summary = backup(server.storage.clone(), path)
        .await
        .map_err(|e| format!("{e:#}"))?;
    tracing::info!(file = %path.display(), accounts = summary.accounts, records = summary.records, "backup written");
    Ok(backup_line(summary, path))
}

/// `Restore` over the admin socket, into the running server's (empty) store.
pub async fn admin_restore(server: &crate::Server, path: &Path) -> Result<String, String> {
    absolute(path)?;
    let summary = restore(server.storage.as_ref(), path)
        .await
        .map_err(|e| format!("{e:#}"))?;
    tracing::info!(file = %path.display(), accounts = summary.accounts, records = summary.records, "backup restored");
    Ok(restore_line(summary, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_storage::{MemoryStorage, Subscription};

    async fn populated() -> Arc<dyn Storage> {
        let s: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        s.create_account(
            "a@x",
            vec![StoredCredential {
                hash: "SHA-256".into(),
                salt: vec![1, 2, 3],
                iterations: 4096,
                stored_key: vec![4; 32],
                server_key: vec![5; 32],
            }],
        )
        .await
        .unwrap();
        let mut item = RosterItem::new("b@y");
        item.subscription = Subscription::Both;
        item.name = Some("B \"quoted\"\n".into());
        item.groups = vec!["G".into()];
        s.put_roster_item("a@x", item).await.unwrap();
        s.push_offline("a@x", "<message>é</message>".into(), 10)
            .await
            .unwrap();
        s.put_user_data("a@x", "vcard", vec![0, 255]).await.unwrap();
        s
    }

    async fn records_of(s: &dyn Storage) -> Vec<Record> {
        let mut v = Vec::new();
        s.export(&mut |r| {
            v.push(r);
            Ok(())
        })
        .await
        .unwrap();
        v
    }

    #[tokio::test]
    async fn roundtrip_and_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.confab");
        let s = populated().await;
        let summary = backup(s.clone(), &path).await.unwrap();
        assert_eq!(
            summary,
            Summary {
                accounts: 1,
                records: 6
            }
        );
        assert!(!tmp_path(&path).exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "confab-backup 1");
        assert!(lines[1].starts_with(r#"{"type":"meta""#), "{}", lines[1]);
        assert!(lines[2].starts_with(r#"{"type":"account","jid":"a@x""#));
        assert!(lines
            .last()
            .unwrap()
            .starts_with(r#"{"type":"end","records":6,"sha256":""#));
        assert_eq!(lines.len(), 9);

        let fresh = MemoryStorage::new();
        let restored = restore(&fresh, &path).await.unwrap();
        assert_eq!(restored, summary);
        assert_eq!(records_of(&fresh).await, records_of(s.as_ref()).await);
        // Into a store with data: refused, unchanged.
        let err = restore(&fresh, &path).await.unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        // A second backup replaces the first.
        backup(s, &path).await.unwrap();
    }

    #[tokio::test]
    async fn every_damage_is_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.confab");
        backup(populated().await, &path).await.unwrap();
        let good = std::fs::read(&path).unwrap();
        let text = String::from_utf8(good.clone()).unwrap();
        let damaged = dir.path().join("damaged");
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "not a confab backup"),
            (b"hello\n".to_vec(), "not a confab backup"),
            (vec![0xff, 0xfe, 0, 1, b'\n'], "not a confab backup"),
            (
                text.replacen("confab-backup 1", "confab-backup 2", 1)
                    .into_bytes(),
                "version 2",
            ),
            (
                text.replacen("\"seq\":1", "\"seq\":2", 1).into_bytes(),
                "checksum",
            ),
            (
                text.replacen("\"type\":\"user_data\"", "\"type\":\"user_dada\"", 1)
                    .into_bytes(),
                "line 8",
            ),
            (
                text.replacen("\"records\":6", "\"records\":7", 1)
                    .into_bytes(),
                "counts 7",
            ),
            ([good.as_slice(), b"more\n"].concat(), "after its end line"),
            (
                text.replacen("\"type\":\"account\",", "\"type\":\"account\",\"x\":1,", 1)
                    .into_bytes(),
                "unknown field",
            ),
            (
                text.replacen("\"value\":\"", "\"value\":\"!", 1)
                    .into_bytes(),
                "base64",
            ),
            (
                text.replacen("\"both\"", "\"sometimes\"", 1).into_bytes(),
                "sometimes",
            ),
        ];
        // Every truncation, at and between line ends.
        for n in [1, 10, 17, good.len() / 2, good.len() - 1] {
            cases.push((good[..n].to_vec(), ""));
        }
        for (i, _) in text.match_indices('\n').take(8) {
            cases.push((good[..=i].to_vec(), ""));
        }
        for (bytes, needle) in cases {
            std::fs::write(&damaged, &bytes).unwrap();
            let store = MemoryStorage::new();
            let err = format!("{:#}", restore(&store, &damaged).await.unwrap_err());
            assert!(err.contains(needle), "{err} (expected {needle})");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(records_of(&store).await.is_empty(), "{err}");
        }
        // A missing file.
        let err = format!(
            "{:#}",
            restore(&MemoryStorage::new(), &dir.path().join("nope"))
                .await
                .unwrap_err()
        );
        assert!(err.contains("cannot open"), "{err}");
    }

    #[tokio::test]
    async fn one_backup_at_a_time_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.confab");
        let other = File::create(tmp_path(&path)).unwrap();
        other.lock().unwrap();
        let err = format!("{:#}", backup(populated().await, &path).await.unwrap_err());
        assert!(err.contains("another backup"), "{err}");
        // The other writer's file is left alone, and no backup appeared.
        assert!(tmp_path(&path).exists());
        assert!(!path.exists());
        drop(other);
        // A leftover FILE.tmp (from a crash) is reused.
        backup(populated().await, &path).await.unwrap();
        assert!(!tmp_path(&path).exists());
        read_backup(&path).unwrap();
    }

    #[tokio::test]
    async fn a_failed_write_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("b.confab");
        let err = backup(populated().await, &path).await.unwrap_err();
        assert!(format!("{err:#}").contains("cannot create"), "{err:#}");
        assert!(!path.exists());
    }
}
