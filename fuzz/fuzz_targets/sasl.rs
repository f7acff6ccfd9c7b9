//! SASL message parsing on arbitrary input: SCRAM client-first and
//! client-final on the server side (and server-first/server-final on the
//! client side), PLAIN, and the base64 payload of `<auth/>`/`<response/>`.
//!
//! Input layout: byte 0 picks the hash, the -PLUS variant, which channel
//! bindings TLS offers and the role; the rest is split at the first 0xFF
//! (never part of UTF-8) into the first and second message.
//!
//! Asserts: no panic; PLAIN credentials rebuild the message they came from;
//! a decoded payload re-encodes to the same text; a SCRAM exchange that
//! succeeded reports authentication, one that failed stays failed, and no
//! message is accepted after the exchange ended.
#![no_main]

use std::sync::OnceLock;

use confab_protocol::sasl::{
    self, decode_payload, encode_payload, parse_plain, ChannelBindings, ClientBinding, ScramClient,
    ScramHash, ScramKeys, ScramServer,
};
use libfuzzer_sys::fuzz_target;

const HASHES: [ScramHash; 3] = [ScramHash::Sha1, ScramHash::Sha256, ScramHash::Sha512];
/// The account the fixed keys belong to, and the fixed nonces, so that the
/// seed corpus can hold complete, valid exchanges.
pub const USER: &str = "user";
pub const PASSWORD: &str = "pencil";
pub const SERVER_NONCE: &str = "3rfcNHYJY1ZVvWVs7j";
pub const CLIENT_NONCE: &str = "fyko+d2lbbFgONRv9qkxdawL";
pub const EXPORTER: [u8; 32] = [7; 32];
pub const END_POINT: [u8; 32] = [9; 32];

/// Real keys, derived once with a low iteration count so each run is fast.
fn keys(hash: ScramHash) -> ScramKeys {
    static KEYS: OnceLock<Vec<ScramKeys>> = OnceLock::new();
    let all = KEYS.get_or_init(|| {
        HASHES
            .iter()
            .map(|&h| ScramKeys::derive(h, PASSWORD, b"salt-for-fuzzing", 2).expect("keys"))
            .collect()
    });
    all.iter()
        .find(|k| k.hash == hash)
        .cloned()
        .expect("keys for every hash")
}

fn bindings(selector: u8) -> ChannelBindings {
    ChannelBindings {
        tls_exporter: (selector & 0x10 != 0).then(|| EXPORTER.to_vec()),
        tls_server_end_point: (selector & 0x20 != 0).then(|| END_POINT.to_vec()),
    }
}

fn server(hash: ScramHash, selector: u8, first: &[u8], fin: &[u8]) {
    let plus = selector & 0x04 != 0;
    let plus_advertised = plus || selector & 0x08 != 0;
    let mut server = ScramServer::new(hash, plus, bindings(selector), plus_advertised)
        .with_server_nonce(SERVER_NONCE);
    let client_first = match server.client_first(first) {
        Ok(c) => c,
        Err(_) => {
            assert!(
                server.client_final(fin).is_err(),
                "accepted after a failure"
            );
            return;
        }
    };
    // Known user with real keys, anyone else gets the fake exchange.
    let known = client_first.username == USER;
    let server_first = server.server_first(known.then(|| keys(hash)));
    assert!(!server_first.is_empty());
    assert!(std::str::from_utf8(&server_first).is_ok());
    match server.client_final(fin) {
        Ok(server_final) => {
            assert!(server.is_authenticated());
            assert!(known, "an unknown user authenticated");
            assert!(server_final.starts_with(b"v="));
        }
        Err(_) => assert!(!server.is_authenticated()),
    }
    assert!(
        server.client_final(fin).is_err(),
        "a second client-final was accepted"
    );
}

/// Iteration counts above this are not derived on the client side: a hostile
/// server may ask for up to `MAX_ITERATIONS` (10 million, by design, seconds of
/// work), which would only make the fuzzer slow (the first long run reported
/// it as a timeout). Counts over `MAX_ITERATIONS` are refused before any work
/// and are still fuzzed.
const CLIENT_MAX_FUZZ_ITERATIONS: u64 = 64;

fn expensive_count(server_first: &[u8]) -> bool {
    server_first.split(|&b| b == b',').any(|part| {
        part.strip_prefix(b"i=")
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > CLIENT_MAX_FUZZ_ITERATIONS && n <= u64::from(sasl::MAX_ITERATIONS))
    })
}

fn client(hash: ScramHash, selector: u8, first: &[u8], fin: &[u8]) {
    if expensive_count(first) {
        return;
    }
    let binding = match (selector >> 2) & 3 {
        0 => ClientBinding::None,
        1 => ClientBinding::SupportedButNotUsed,
        2 => ClientBinding::TlsExporter(EXPORTER.to_vec()),
        _ => ClientBinding::TlsServerEndPoint(END_POINT.to_vec()),
    };
    let mut client = ScramClient::new(hash, USER, PASSWORD, binding).with_nonce(CLIENT_NONCE);
    let _ = client.client_first();
    if client.server_first(first).is_ok() {
        let _ = client.server_final(fin);
    }
}

fn plain(msg: &[u8]) {
    if let Ok(creds) = parse_plain(msg) {
        let mut rebuilt = creds.authzid.clone().unwrap_or_default().into_bytes();
        rebuilt.push(0);
        rebuilt.extend_from_slice(creds.authcid.as_bytes());
        rebuilt.push(0);
        rebuilt.extend_from_slice(creds.password.as_bytes());
        assert_eq!(rebuilt, msg);
    }
}

fn payload(text: &str) {
    if let Ok(data) = decode_payload(text) {
        if !text.is_empty() {
            assert_eq!(encode_payload(&data), text, "non-canonical base64 accepted");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let hash = HASHES[usize::from(selector & 3) % 3];
    let (first, fin) = match rest.iter().position(|&b| b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    plain(rest);
    if let Ok(text) = std::str::from_utf8(rest) {
        payload(text);
    }
    if selector & 0x40 != 0 {
        client(hash, selector, first, fin);
    } else {
        server(hash, selector, first, fin);
    }
});
