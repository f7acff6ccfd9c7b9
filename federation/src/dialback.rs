//! Dialback keys (XEP-0220 Server Dialback, keys generated per XEP-0185).
//!
//! XEP-0185 §2: the key is `HEX( HMAC-SHA256( Secret, { Receiving Server, Originating
//! Server, Stream ID } ) )`, where the HMAC key is the lowercase hex of SHA-256 of the
//! secret and the message is the three values joined by single spaces. Keys are thus
//! verifiable by any server that shares the secret (e.g. a cluster) without keeping state,
//! and bound to one stream, so a key seen on one stream is useless on another.

use std::fmt;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The secret dialback keys are derived from, stored as SHA-256 of the configured secret
/// (the value XEP-0185 §2 hexes into the HMAC key).
#[derive(Clone)]
pub struct DialbackSecret([u8; 32]);

impl DialbackSecret {
    /// A fresh random secret (keys then verify only within this process, which is enough
    /// for a single server: XEP-0185 §2 asks only that the secret be unguessable).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        DialbackSecret(bytes)
    }

    /// A secret from configured bytes (shared between the nodes of a cluster): stored as
    /// SHA-256 of `secret`, as XEP-0185 §2 prescribes.
    pub fn from_bytes(secret: &[u8]) -> Self {
        DialbackSecret(Sha256::digest(secret).into())
    }

    fn hmac(&self, receiving: &str, originating: &str, stream_id: &str) -> HmacSha256 {
        let key = hex(&self.0);
        let mut mac =
            HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC accepts keys of any length");
        mac.update(receiving.as_bytes());
        mac.update(b" ");
        mac.update(originating.as_bytes());
        mac.update(b" ");
        mac.update(stream_id.as_bytes());
        mac
    }
}

impl fmt::Debug for DialbackSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DialbackSecret(..)")
    }
}

/// XEP-0185 §2: `HEX( HMAC-SHA256( HEX(SHA256(secret)), receiving ' ' originating ' '
/// stream_id ) )`, lowercase hex.
///
/// `receiving` is the domain the key is sent to, `originating` the domain that wants to
/// send (ours), `stream_id` the id the receiving server gave the stream (XEP-0220 §2.1.1).
pub fn dialback_key(
    secret: &DialbackSecret,
    receiving: &str,
    originating: &str,
    stream_id: &str,
) -> String {
    hex(&secret
        .hmac(receiving, originating, stream_id)
        .finalize()
        .into_bytes())
}

/// Whether `key` is the dialback key for these values, compared in constant time.
/// Hex digits are accepted in either case; anything but 64 hex digits is refused.
pub fn verify_key(
    secret: &DialbackSecret,
    receiving: &str,
    originating: &str,
    stream_id: &str,
    key: &str,
) -> bool {
    let Some(presented) = unhex32(key.trim()) else {
        return false;
    };
    secret
        .hmac(receiving, originating, stream_id)
        .verify_slice(&presented)
        .is_ok()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of XEP-0185 §2 (version 1.0): the key for receiving server
    /// `xmpp.example.com`, originating server `example.org` and stream id `D60000229F`.
    #[test]
    fn xep_0185_example() {
        let secret = DialbackSecret::from_bytes(b"s3cr3tf0rd14lb4ck");
        assert_eq!(
            hex(&secret.0),
            "a7136eb1f46c9ef18c5e78c36ca257067c69b3d518285f0b18a96c33beae9acc"
        );
        let key = dialback_key(&secret, "xmpp.example.com", "example.org", "D60000229F");
        assert_eq!(
            key,
            "37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643"
        );
        assert!(verify_key(
            &secret,
            "xmpp.example.com",
            "example.org",
            "D60000229F",
            &key
        ));
        // Receiving and originating are not interchangeable.
        assert!(!verify_key(
            &secret,
            "example.org",
            "xmpp.example.com",
            "D60000229F",
            &key
        ));
    }

    /// Earlier drafts of XEP-0185 used example.net/example.com with the same secret and
    /// stream id; Twisted Words tests against this value.
    #[test]
    fn earlier_example_domains() {
        let secret = DialbackSecret::from_bytes(b"s3cr3tf0rd14lb4ck");
        assert_eq!(
            dialback_key(&secret, "example.net", "example.com", "D60000229F"),
            "008c689ff366b50c63d69a3e2d2c0e0e1f8404b0118eb688a0102c87cb691bdc"
        );
    }

    #[test]
    fn key_is_bound_to_every_input() {
        let secret = DialbackSecret::generate();
        let key = dialback_key(&secret, "b.test", "a.test", "s1");
        assert_eq!(key.len(), 64);
        assert!(verify_key(&secret, "b.test", "a.test", "s1", &key));
        assert!(verify_key(
            &secret,
            "b.test",
            "a.test",
            "s1",
            &key.to_ascii_uppercase()
        ));
        assert!(!verify_key(&secret, "c.test", "a.test", "s1", &key));
        assert!(!verify_key(&secret, "b.test", "c.test", "s1", &key));
        assert!(!verify_key(&secret, "b.test", "a.test", "s2", &key));
        // The separator matters: moving it between fields changes the key.
        assert!(!verify_key(&secret, "b.test a.test", "", "s1", &key));
        assert!(!verify_key(
            &DialbackSecret::generate(),
            "b.test",
            "a.test",
            "s1",
            &key
        ));
    }

    #[test]
    fn malformed_keys_are_refused() {
        let secret = DialbackSecret::from_bytes(b"x");
        let key = dialback_key(&secret, "b.test", "a.test", "s1");
        for bad in [
            "",
            &key[..63],
            &key[..62],
            &format!("{key}00"),
            &format!("{}g", &key[..63]),
            &"é".repeat(32),
        ] {
            assert!(
                !verify_key(&secret, "b.test", "a.test", "s1", bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn secrets_from_the_same_bytes_agree() {
        let a = DialbackSecret::from_bytes(b"cluster secret");
        let b = DialbackSecret::from_bytes(b"cluster secret");
        let key = dialback_key(&a, "b.test", "a.test", "id");
        assert!(verify_key(&b, "b.test", "a.test", "id", &key));
        assert_ne!(
            dialback_key(&DialbackSecret::generate(), "b.test", "a.test", "id"),
            dialback_key(&DialbackSecret::generate(), "b.test", "a.test", "id")
        );
        assert_eq!(format!("{a:?}"), "DialbackSecret(..)");
    }
}
