//! JID preparation as the server does it (`confab_protocol::prepare_jid`: the
//! `jid` crate's nodeprep/nameprep/resourceprep plus RFC 7622 §3.2's final-dot
//! rule, used by `server/src/jid.rs`) on arbitrary strings.
//!
//! Asserts: no panic; a JID that prepares re-serializes to a string that
//! prepares to the same JID and the same string (preparation is idempotent);
//! its parts rejoin to that string and rebuild the same JID; the domain has no
//! final dot; its bare form parses as a bare JID equal to `to_bare()`.
#![no_main]

use confab_protocol::jid::{BareJid, Jid};
use confab_protocol::prepare_jid;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // The crate's own parser must not panic either.
    let _ = Jid::new(s);
    let Ok(jid) = prepare_jid(s) else {
        return;
    };
    let text = jid.as_str();
    assert_eq!(jid.to_string(), text);
    let again =
        prepare_jid(text).unwrap_or_else(|e| panic!("{s:?} → {text:?} no longer parses: {e}"));
    assert_eq!(again, jid, "{s:?} → {text:?} is not idempotent");
    assert_eq!(again.as_str(), text);

    // What `Addr` keeps: the prepared parts, rejoined for routing.
    let domain = jid.domain().as_str();
    assert!(
        !domain.ends_with('.'),
        "{s:?}: domain {domain:?} keeps a final dot"
    );
    let mut joined = String::new();
    if let Some(n) = jid.node() {
        joined.push_str(n.as_str());
        joined.push('@');
    }
    joined.push_str(domain);
    let bare_text = joined.clone();
    if let Some(r) = jid.resource() {
        joined.push('/');
        joined.push_str(r.as_str());
    }
    assert_eq!(joined, text, "{s:?}: parts do not rejoin to the JID");
    assert_eq!(
        Jid::from_parts(jid.node(), jid.domain(), jid.resource()),
        jid
    );
    assert_eq!(jid.is_full(), jid.resource().is_some());

    let as_bare = BareJid::new(&bare_text)
        .unwrap_or_else(|e| panic!("bare form {bare_text:?} of {s:?} does not parse: {e}"));
    assert_eq!(as_bare, jid.to_bare());
    assert_eq!(as_bare.as_str(), bare_text);
});
