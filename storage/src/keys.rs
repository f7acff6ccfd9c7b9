//! Key layout, shared by the backends that order keys bytewise.
//!
//! Per-owner records are keyed `owner bytes ++ 0x00 ++ rest`, so all of one owner's records are one prefix
//! scan, and the separator keeps `a@x` from matching `a@xy`'s records. Offline messages use the big-endian
//! sequence number as `rest`, so a scan returns them in order.

use crate::{Result, StorageError};

pub(crate) const SEP: u8 = 0x00;

/// Refuses owners that would make the layout ambiguous.
pub(crate) fn check_owner(owner: &str) -> Result<()> {
    if owner.as_bytes().contains(&SEP) {
        return Err(StorageError::InvalidKey(format!(
            "owner {owner:?} contains a NUL byte"
        )));
    }
    Ok(())
}

/// `owner 0x00`: the prefix of all of `owner`'s records.
pub(crate) fn owner_prefix(owner: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 1);
    k.extend_from_slice(owner.as_bytes());
    k.push(SEP);
    k
}

/// `owner 0x00 rest`.
pub(crate) fn owner_key(owner: &str, rest: &[u8]) -> Vec<u8> {
    let mut k = owner_prefix(owner);
    k.extend_from_slice(rest);
    k
}

/// `owner 0x00 seq` with `seq` big-endian.
pub(crate) fn seq_key(owner: &str, seq: u64) -> Vec<u8> {
    owner_key(owner, &seq.to_be_bytes())
}

/// The sequence number of a key made by [`seq_key`] for an owner whose prefix is `prefix_len` bytes long.
pub(crate) fn seq_of_key(key: &[u8], prefix_len: usize) -> Result<u64> {
    let rest = key.get(prefix_len..).unwrap_or(&[]);
    let bytes: [u8; 8] = rest
        .try_into()
        .map_err(|_| StorageError::Corrupt(format!("offline key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

/// The domain of a bare JID: the part after `@`, or the whole JID for a domain-only JID.
pub(crate) fn domain_of(jid: &str) -> &str {
    jid.split_once('@').map_or(jid, |(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(owner_key("a@x", b"b@y"), b"a@x\0b@y");
        let k = seq_key("a@x", 258);
        assert_eq!(k, b"a@x\0\0\0\0\0\0\0\x01\x02");
        assert_eq!(seq_of_key(&k, 4).unwrap(), 258);
        assert!(seq_of_key(b"a@x\0\x01", 4).is_err());
        assert!(seq_key("a@x", 1) < seq_key("a@x", 256));
        assert!(check_owner("a\0b@x").is_err());
        assert_eq!(domain_of("a@x.org"), "x.org");
        assert_eq!(domain_of("x.org"), "x.org");
    }
}
