//! Addresses as the router sees them: prepared parts of a JID.
//!
//! Preparation (nodeprep, nameprep, resourceprep) is done by the `jid` crate, through
//! `confab_protocol::prepare_jid` (which applies RFC 7622 §3.2's final-dot rule
//! consistently); this type only gives the router cheap access to the parts and the
//! bare form.

use std::fmt;

use confab_protocol::prepare_jid;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Addr {
    pub node: Option<String>,
    pub domain: String,
    pub resource: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed JID: {0}")]
pub struct JidError(String);

impl Addr {
    pub fn parse(s: &str) -> Result<Addr, JidError> {
        let jid = prepare_jid(s).map_err(|e| JidError(e.to_string()))?;
        Ok(Addr {
            node: jid.node().map(|n| n.as_str().to_string()),
            domain: jid.domain().as_str().to_string(),
            resource: jid.resource().map(|r| r.as_str().to_string()),
        })
    }

    /// `node@domain` or `domain`.
    pub fn bare(&self) -> String {
        match &self.node {
            Some(n) => format!("{n}@{}", self.domain),
            None => self.domain.clone(),
        }
    }

    pub fn to_bare(&self) -> Addr {
        Addr {
            node: self.node.clone(),
            domain: self.domain.clone(),
            resource: None,
        }
    }

    pub fn is_bare(&self) -> bool {
        self.resource.is_none()
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = &self.node {
            write!(f, "{n}@")?;
        }
        f.write_str(&self.domain)?;
        if let Some(r) = &self.resource {
            write!(f, "/{r}")?;
        }
        Ok(())
    }
}

/// Prepares a resource (resourceprep via the `jid` crate); `None` if it is not valid.
pub fn prepare_resource(bare: &str, resource: &str) -> Option<String> {
    if resource.is_empty() {
        return None;
    }
    let full = Addr::parse(&format!("{bare}/{resource}")).ok()?;
    full.resource
}

/// Prepares a bare account JID `user@domain`.
pub fn prepare_account(s: &str) -> Result<Addr, JidError> {
    let a = Addr::parse(s)?;
    if a.node.is_none() || a.resource.is_some() {
        return Err(JidError(format!("{s:?} is not of the form user@domain")));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_prepared() {
        let a = Addr::parse("Juliet@Example.COM/Balcony").unwrap();
        assert_eq!(a.node.as_deref(), Some("juliet"));
        assert_eq!(a.domain, "example.com");
        assert_eq!(a.resource.as_deref(), Some("Balcony"));
        assert_eq!(a.bare(), "juliet@example.com");
        assert_eq!(a.to_string(), "juliet@example.com/Balcony");
    }

    #[test]
    fn malformed_jids_are_refused() {
        for s in [
            "",
            "@example.com",
            "a@b@c",
            "a@/r",
            "a@example.com/",
            "a b@example.com",
        ] {
            assert!(Addr::parse(s).is_err(), "{s:?}");
        }
        assert!(prepare_account("example.com").is_err());
        assert!(prepare_account("a@example.com/r").is_err());
    }
}
