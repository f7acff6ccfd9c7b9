//! The binary format of stored values. Every value starts with a format version byte so the format can evolve:
//! a reader that meets a version it does not know returns [`StorageError::Corrupt`] instead of guessing.
//! Integers are big-endian; byte strings and strings are prefixed by a `u32` length. Decoding never panics
//! and never allocates more than the input holds.

use crate::{Account, RosterItem, StorageError, StoredCredential, Subscription};

/// The current (and only) format version of every record kind.
pub(crate) const V1: u8 = 1;

pub(crate) fn corrupt(what: &str, detail: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("{what}: {detail}"))
}

#[derive(Default)]
pub(crate) struct Writer(Vec<u8>);

impl Writer {
    pub(crate) fn new(version: u8) -> Self {
        Writer(vec![version])
    }
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn len(&mut self, n: usize) -> &mut Self {
        // Records are small (a roster item, a credential); a length over 4 GiB is a caller bug.
        let n = u32::try_from(n).expect("field longer than 4 GiB");
        self.u32(n)
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.len(v.len());
        self.0.extend_from_slice(v);
        self
    }
    pub(crate) fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    /// Unprefixed bytes; only as the last field.
    pub(crate) fn rest(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

pub(crate) struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks the version byte.
    pub(crate) fn new(what: &'static str, buf: &'a [u8]) -> Result<Self, StorageError> {
        match buf.split_first() {
            None => Err(corrupt(what, "empty value")),
            Some((&V1, rest)) => Ok(Reader { what, buf: rest }),
            Some((v, _)) => Err(corrupt(what, format_args!("unknown format version {v}"))),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], StorageError> {
        if n > self.buf.len() {
            return Err(corrupt(self.what, "truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, StorageError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, StorageError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, StorageError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    /// A count of following items, each at least `min_item_len` bytes: checked against what is left so a
    /// corrupt count cannot make us reserve a huge vector.
    pub(crate) fn count(&mut self, min_item_len: usize) -> Result<usize, StorageError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item_len.max(1)) > self.buf.len() {
            return Err(corrupt(self.what, "count larger than the value"));
        }
        Ok(n)
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], StorageError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(crate) fn string(&mut self) -> Result<String, StorageError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| corrupt(self.what, "invalid UTF-8"))
    }
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    pub(crate) fn end(self) -> Result<(), StorageError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(corrupt(self.what, "trailing bytes"))
        }
    }
}

// --- accounts: key = bare JID ---------------------------------------------------------------------------------

pub(crate) fn encode_account(created_unix: u64, credentials: &[StoredCredential]) -> Vec<u8> {
    let mut w = Writer::new(V1);
    w.u64(created_unix).len(credentials.len());
    for c in credentials {
        w.str(&c.hash)
            .bytes(&c.salt)
            .u32(c.iterations)
            .bytes(&c.stored_key)
            .bytes(&c.server_key);
    }
    w.finish()
}

pub(crate) fn decode_account(jid: &[u8], value: &[u8]) -> Result<Account, StorageError> {
    const WHAT: &str = "account";
    let jid = std::str::from_utf8(jid).map_err(|_| corrupt(WHAT, "key is not UTF-8"))?;
    let mut r = Reader::new(WHAT, value)?;
    let created_unix = r.u64()?;
    // Each credential is at least four length prefixes and the iteration count.
    let n = r.count(4 * 4 + 4)?;
    let mut credentials = Vec::with_capacity(n);
    for _ in 0..n {
        credentials.push(StoredCredential {
            hash: r.string()?,
            salt: r.bytes()?.to_vec(),
            iterations: r.u32()?,
            stored_key: r.bytes()?.to_vec(),
            server_key: r.bytes()?.to_vec(),
        });
    }
    r.end()?;
    Ok(Account {
        jid: jid.to_owned(),
        credentials,
        created_unix,
    })
}

// --- roster items: key = owner 0x00 contact JID ---------------------------------------------------------------

const FLAG_ASK: u8 = 1;
const FLAG_APPROVED: u8 = 2;
const FLAG_HAS_NAME: u8 = 4;

fn subscription_code(s: Subscription) -> u8 {
    match s {
        Subscription::None => 0,
        Subscription::To => 1,
        Subscription::From => 2,
        Subscription::Both => 3,
    }
}

pub(crate) fn encode_roster_item(item: &RosterItem) -> Vec<u8> {
    let mut flags = 0;
    if item.ask {
        flags |= FLAG_ASK;
    }
    if item.approved {
        flags |= FLAG_APPROVED;
    }
    if item.name.is_some() {
        flags |= FLAG_HAS_NAME;
    }
    let mut w = Writer::new(V1);
    w.u8(subscription_code(item.subscription)).u8(flags);
    if let Some(name) = &item.name {
        w.str(name);
    }
    w.len(item.groups.len());
    for g in &item.groups {
        w.str(g);
    }
    w.finish()
}

pub(crate) fn decode_roster_item(jid: &[u8], value: &[u8]) -> Result<RosterItem, StorageError> {
    const WHAT: &str = "roster item";
    let jid = std::str::from_utf8(jid).map_err(|_| corrupt(WHAT, "key is not UTF-8"))?;
    let mut r = Reader::new(WHAT, value)?;
    let subscription = match r.u8()? {
        0 => Subscription::None,
        1 => Subscription::To,
        2 => Subscription::From,
        3 => Subscription::Both,
        other => {
            return Err(corrupt(
                WHAT,
                format_args!("unknown subscription code {other}"),
            ))
        }
    };
    let flags = r.u8()?;
    if flags & !(FLAG_ASK | FLAG_APPROVED | FLAG_HAS_NAME) != 0 {
        return Err(corrupt(WHAT, format_args!("unknown flags {flags:#x}")));
    }
    let name = if flags & FLAG_HAS_NAME != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let n = r.count(4)?;
    let mut groups = Vec::with_capacity(n);
    for _ in 0..n {
        groups.push(r.string()?);
    }
    r.end()?;
    Ok(RosterItem {
        jid: jid.to_owned(),
        name,
        subscription,
        ask: flags & FLAG_ASK != 0,
        approved: flags & FLAG_APPROVED != 0,
        groups,
    })
}

// --- counters: roster version (key = owner), offline queue state (key = owner) --------------------------------

pub(crate) fn encode_roster_version(version: u64) -> Vec<u8> {
    Writer::new(V1).u64(version).finish()
}

pub(crate) fn decode_roster_version(value: &[u8]) -> Result<u64, StorageError> {
    let mut r = Reader::new("roster version", value)?;
    let v = r.u64()?;
    r.end()?;
    Ok(v)
}

/// Per-owner offline queue state as stored in `offline_meta`: a sequence number no number handed out exceeds
/// (the sled backend's reservation, see "Offline queues" in `sled.rs`) and the number of queued messages when it
/// was written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct OfflineMeta {
    pub(crate) last_seq: u64,
    pub(crate) count: u64,
}

pub(crate) fn encode_offline_meta(m: OfflineMeta) -> Vec<u8> {
    Writer::new(V1).u64(m.last_seq).u64(m.count).finish()
}

pub(crate) fn decode_offline_meta(value: &[u8]) -> Result<OfflineMeta, StorageError> {
    let mut r = Reader::new("offline queue state", value)?;
    let m = OfflineMeta {
        last_seq: r.u64()?,
        count: r.u64()?,
    };
    r.end()?;
    Ok(m)
}

// --- opaque payloads: offline stanzas, user data ----------------------------------------------------------------

pub(crate) fn encode_blob(payload: &[u8]) -> Vec<u8> {
    let mut w = Writer::new(V1);
    w.rest(payload);
    w.finish()
}

/// [`encode_blob`] in place: no second buffer, and no reallocation when `payload` has room for one more
/// byte (the payload moves up by one within it).
pub(crate) fn encode_blob_owned(mut payload: Vec<u8>) -> Vec<u8> {
    payload.insert(0, V1);
    payload
}

pub(crate) fn decode_blob(what: &'static str, value: &[u8]) -> Result<Vec<u8>, StorageError> {
    let mut r = Reader::new(what, value)?;
    Ok(r.rest().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> RosterItem {
        RosterItem {
            jid: "b@y".into(),
            name: Some("Bé".into()),
            subscription: Subscription::From,
            ask: true,
            approved: false,
            groups: vec!["Friends".into(), "".into()],
        }
    }

    #[test]
    fn roundtrips() {
        let creds = vec![StoredCredential {
            hash: "SHA-256".into(),
            salt: vec![1, 2, 3],
            iterations: 4096,
            stored_key: vec![9; 32],
            server_key: vec![8; 32],
        }];
        let a = decode_account(b"a@x", &encode_account(42, &creds)).unwrap();
        assert_eq!(
            a,
            Account {
                jid: "a@x".into(),
                credentials: creds,
                created_unix: 42
            }
        );

        let i = item();
        assert_eq!(
            decode_roster_item(b"b@y", &encode_roster_item(&i)).unwrap(),
            i
        );
        let bare = RosterItem::new("c@z");
        assert_eq!(
            decode_roster_item(b"c@z", &encode_roster_item(&bare)).unwrap(),
            bare
        );

        assert_eq!(decode_roster_version(&encode_roster_version(7)).unwrap(), 7);
        let m = OfflineMeta {
            last_seq: 5,
            count: 2,
        };
        assert_eq!(decode_offline_meta(&encode_offline_meta(m)).unwrap(), m);
        assert_eq!(decode_blob("x", &encode_blob(b"<m/>")).unwrap(), b"<m/>");
        assert_eq!(decode_blob("x", &encode_blob(b"")).unwrap(), b"");
        assert_eq!(encode_blob_owned(b"<m/>".to_vec()), encode_blob(b"<m/>"));
        assert_eq!(encode_blob_owned(Vec::new()), encode_blob(b""));
    }

    #[test]
    fn every_truncation_and_bad_version_is_corrupt() {
        let creds = vec![StoredCredential {
            hash: "SHA-1".into(),
            salt: vec![1],
            iterations: 1,
            stored_key: vec![2],
            server_key: vec![3],
        }];
        let acc = encode_account(1, &creds);
        let it = encode_roster_item(&item());
        for n in 0..acc.len() {
            assert!(
                matches!(
                    decode_account(b"a@x", &acc[..n]),
                    Err(StorageError::Corrupt(_))
                ),
                "{n}"
            );
        }
        for n in 0..it.len() {
            assert!(
                matches!(
                    decode_roster_item(b"a@x", &it[..n]),
                    Err(StorageError::Corrupt(_))
                ),
                "{n}"
            );
        }
        let mut bad = acc.clone();
        bad[0] = 99;
        assert!(
            matches!(decode_account(b"a@x", &bad), Err(StorageError::Corrupt(m)) if m.contains("version 99"))
        );
        let mut trailing = it.clone();
        trailing.push(0);
        assert!(matches!(
            decode_roster_item(b"a@x", &trailing),
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(
            decode_account(&[0xff], &acc),
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(
            decode_blob("x", &[]),
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(
            decode_offline_meta(&[1, 0, 0]),
            Err(StorageError::Corrupt(_))
        ));
    }

    #[test]
    fn huge_count_does_not_allocate() {
        // version, created, count = u32::MAX, nothing else
        let mut v = vec![V1];
        v.extend_from_slice(&0u64.to_be_bytes());
        v.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_account(b"a@x", &v),
            Err(StorageError::Corrupt(_))
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every record decoder over many pseudo-random inputs.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (x >> (i % 8 * 8)) as u8 ^ i as u8)
                .collect();
            let mut v = bytes.clone();
            if let Some(b) = v.first_mut() {
                *b = V1;
            }
            for input in [&bytes, &v] {
                let _ = decode_account(b"a@x", input);
                let _ = decode_roster_item(b"a@x", input);
                let _ = decode_roster_version(input);
                let _ = decode_offline_meta(input);
                let _ = decode_blob("x", input);
            }
        }
    }
}
