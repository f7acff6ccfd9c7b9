//! JID preparation as the server uses it: the `jid` crate's nodeprep,
//! nameprep and resourceprep, with the final-dot rule of RFC 7622 §3.2 applied
//! consistently.
//!
//! jid 0.12.3 strips a domainpart's final dot while checking it, but when no
//! part otherwise changed, `Jid::new` keeps the input string (with the dot)
//! and computes the part offsets from the stripped lengths: `s./x` yields the
//! domain `s` and the resource `/x`, and `u@example.com.` keeps the domain
//! `example.com.`, which is not our domain. Found by the `jid` fuzz target.
//!
//! Preparation is also not always idempotent: the stringprep crate accepts
//! code points unassigned in Unicode 3.2 (RFC 3454 §7 leaves that to "query"
//! strings) and its tables then miss some mappings, so `ᴲ` (U+1D32) becomes
//! `Ǝ` (NFKC) on the first pass and `ǝ` (case folding) on the second. A JID we
//! stored or forwarded would then compare unequal to itself after a reparse, so
//! preparation is repeated until it is stable. Also found by the fuzz target.

use jid::{Error, Jid};

/// Prepares a JID (RFC 7622). A final dot of the domainpart is removed before
/// the parts are taken (RFC 7622 §3.2); a domainpart that still ends with a dot
/// after that (an empty label, as in `example.com..`) is refused.
pub fn prepare_jid(s: &str) -> Result<Jid, Error> {
    let mut jid = prepare_once(s)?;
    // Unchanged by a pass, so unchanged by every further one (the usual case).
    if jid.as_str() == s {
        return Ok(jid);
    }
    // Each extra pass can only apply a mapping the previous one missed; real
    // strings are stable after one or two.
    for _ in 0..MAX_PASSES {
        let again = prepare_once(jid.as_str())?;
        if again == jid {
            return Ok(jid);
        }
        jid = again;
    }
    // Not stable: refuse it, naming the part that kept changing.
    let again = prepare_once(jid.as_str())?;
    Err(if again.node() != jid.node() {
        Error::NodePrep
    } else if again.domain() != jid.domain() {
        Error::NamePrep
    } else {
        Error::ResourcePrep
    })
}

/// Passes after the first before a JID that keeps changing is refused.
const MAX_PASSES: usize = 4;

fn prepare_once(s: &str) -> Result<Jid, Error> {
    // RFC 7622 §3.1: the first '/' ends the bare JID, whose first '@' ends the
    // localpart.
    let bare_end = s.find('/').unwrap_or(s.len());
    let bare = &s[..bare_end];
    let domain_start = bare.find('@').map_or(0, |at| at + 1);
    let jid = if bare.len() > domain_start && bare.ends_with('.') {
        let mut stripped = String::with_capacity(s.len() - 1);
        stripped.push_str(&s[..bare_end - 1]);
        stripped.push_str(&s[bare_end..]);
        Jid::new(&stripped)?
    } else {
        Jid::new(s)?
    };
    if jid.domain().as_str().ends_with('.') || !parts_rejoin(&jid) {
        return Err(Error::Idna);
    }
    Ok(jid)
}

/// The parts the crate reports make up its string (the invariant the final-dot
/// bug broke).
fn parts_rejoin(jid: &Jid) -> bool {
    let mut joined = String::new();
    if let Some(node) = jid.node() {
        joined.push_str(node.as_str());
        joined.push('@');
    }
    joined.push_str(jid.domain().as_str());
    if let Some(resource) = jid.resource() {
        joined.push('/');
        joined.push_str(resource.as_str());
    }
    joined == jid.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> (Option<String>, String, Option<String>) {
        let jid = prepare_jid(s).unwrap();
        (
            jid.node().map(|n| n.as_str().to_owned()),
            jid.domain().as_str().to_owned(),
            jid.resource().map(|r| r.as_str().to_owned()),
        )
    }

    // Regression: fuzz/artifacts/jid/crash-72d8ac92 ("s./>").
    #[test]
    fn final_dot_before_a_resource_does_not_shift_the_parts() {
        assert_eq!(parts("s./>"), (None, "s".into(), Some(">".into())));
        assert_eq!(prepare_jid("s./>").unwrap().as_str(), "s/>");
        assert_eq!(
            parts("juliet@example.com./balcony"),
            (
                Some("juliet".into()),
                "example.com".into(),
                Some("balcony".into())
            )
        );
    }

    #[test]
    fn final_dot_of_a_bare_jid_is_stripped() {
        let jid = prepare_jid("juliet@example.com.").unwrap();
        assert_eq!(jid.as_str(), "juliet@example.com");
        assert_eq!(jid, prepare_jid("juliet@example.com").unwrap());
        assert_eq!(prepare_jid("example.com.").unwrap().as_str(), "example.com");
    }

    #[test]
    fn empty_final_label_is_refused() {
        assert!(prepare_jid("juliet@example.com..").is_err());
        assert!(prepare_jid("example.com../r").is_err());
        assert!(prepare_jid(".").is_err());
    }

    // Regression: fuzz/artifacts/jid/crash-8412fd7a ("ᛃᛃᴲẲ'v" prepared to
    // "ᛃᛃƎẳ'v", which prepared again to "ᛃᛃǝẳ'v").
    #[test]
    fn preparation_is_idempotent() {
        for s in ["ᛃᛃᴲẲ'v", "u@ᴲ.example", "ᴲ@example.com/ᴲ"] {
            let jid = prepare_jid(s).unwrap();
            assert_eq!(prepare_jid(jid.as_str()).unwrap(), jid, "{s}");
        }
        assert_eq!(prepare_jid("ᛃᛃᴲẲ'v").unwrap().as_str(), "ᛃᛃǝẳ'v");
    }

    #[test]
    fn dots_elsewhere_are_untouched() {
        assert_eq!(
            parts("a.b@example.com/res.ource."),
            (
                Some("a.b".into()),
                "example.com".into(),
                Some("res.ource.".into())
            )
        );
        assert_eq!(
            prepare_jid("JULIET@Example.COM/Balcony").unwrap().as_str(),
            "juliet@example.com/Balcony"
        );
    }
}
