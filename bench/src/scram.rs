//! A SCRAM-SHA-1 client (RFC 5802) that keeps each account's SaltedPassword, as real
//! clients do (Conversations, Gajim), so that a login costs the generator two HMACs and
//! a hash instead of 4096 PBKDF2 rounds. Without that cache the generator, not the
//! server, would be the bottleneck of a login benchmark.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha1::{Digest, Sha1};

type HmacSha1 = Hmac<Sha1>;

/// (user, salt, iterations).
type SaltKey = (String, Vec<u8>, u32);

/// SaltedPassword per (user, salt, iterations).
#[derive(Default)]
pub struct SaltCache {
    map: Mutex<HashMap<SaltKey, [u8; 20]>>,
}

impl SaltCache {
    fn salted(&self, user: &str, password: &str, salt: &[u8], iterations: u32) -> [u8; 20] {
        let key = (user.to_string(), salt.to_vec(), iterations);
        if let Some(v) = self.map.lock().ok().and_then(|m| m.get(&key).copied()) {
            return v;
        }
        let mut out = [0u8; 20];
        pbkdf2::pbkdf2_hmac::<Sha1>(password.as_bytes(), salt, iterations, &mut out);
        if let Ok(mut m) = self.map.lock() {
            m.insert(key, out);
        }
        out
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 20] {
    // HMAC takes keys of any length.
    let mut mac = HmacSha1::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// One exchange: `first()`, then `respond(server_first)`, then `verify(server_final)`.
pub struct Scram<'a> {
    user: &'a str,
    password: &'a str,
    nonce: String,
    auth_message: String,
    server_key: [u8; 20],
}

impl<'a> Scram<'a> {
    pub fn new(user: &'a str, password: &'a str) -> Self {
        let nonce: String = rand::thread_rng()
            .sample_iter(rand::distributions::Alphanumeric)
            .take(24)
            .map(char::from)
            .collect();
        Scram {
            user,
            password,
            nonce,
            auth_message: String::new(),
            server_key: [0; 20],
        }
    }

    fn first_bare(&self) -> String {
        format!("n={},r={}", self.user, self.nonce)
    }

    /// The client-first-message, base64.
    pub fn first(&self) -> String {
        B64.encode(format!("n,,{}", self.first_bare()))
    }

    /// The client-final-message for the server-first-message (both base64).
    pub fn respond(&mut self, server_first_b64: &str, cache: &SaltCache) -> Result<String> {
        let server_first = String::from_utf8(B64.decode(server_first_b64.trim())?)?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for part in server_first.split(',') {
            if let Some(v) = part.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = part.strip_prefix("s=") {
                salt = Some(B64.decode(v)?);
            } else if let Some(v) = part.strip_prefix("i=") {
                iterations = Some(v.parse::<u32>()?);
            }
        }
        let nonce = nonce.context("server-first without nonce")?;
        if !nonce.starts_with(&self.nonce) {
            bail!("server nonce does not extend ours");
        }
        let salt = salt.context("server-first without salt")?;
        let iterations = iterations.context("server-first without iterations")?;
        let salted = cache.salted(self.user, self.password, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 20] = Sha1::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{server_first},{without_proof}", self.first_bare());
        let signature = hmac(&stored_key, self.auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        self.server_key = hmac(&salted, b"Server Key");
        Ok(B64.encode(format!("{without_proof},p={}", B64.encode(proof))))
    }

    /// Checks the server's signature in the server-final-message (base64).
    pub fn verify(&self, server_final_b64: &str) -> Result<()> {
        let server_final = String::from_utf8(B64.decode(server_final_b64.trim())?)?;
        let v = server_final
            .strip_prefix("v=")
            .context("server-final without signature")?;
        let expected = hmac(&self.server_key, self.auth_message.as_bytes());
        if B64.decode(v)? != expected {
            bail!("wrong server signature");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5802 §5's example exchange.
    #[test]
    fn rfc5802_example() {
        let cache = SaltCache::default();
        let mut s = Scram::new("user", "pencil");
        s.nonce = "fyko+d2lbbFgONRv9qkxdawL".to_string();
        let server_first = "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096";
        let last = s.respond(&B64.encode(server_first), &cache).unwrap();
        assert_eq!(
            String::from_utf8(B64.decode(last).unwrap()).unwrap(),
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
        );
        s.verify(&B64.encode("v=rmF9pqV8S7suAoZWja4dJRkFsKQ="))
            .unwrap();
        assert!(s.verify(&B64.encode("v=AAAA")).is_err());
    }
}
