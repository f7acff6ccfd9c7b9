//! SASL on client streams (RFC 6120 §6): which mechanisms we offer and how.

use confab_protocol::sasl::ScramHash;
use confab_protocol::{ns, Element};

/// XEP-0440: the channel-binding types we can serve.
pub const SASL_CB_NS: &str = "urn:xsf:sasl-cb:0";

/// Mechanisms offered on a stream, strongest first. PLUS variants only over TLS
/// (they bind to it); PLAIN only over TLS (the password would travel in clear).
pub fn mechanisms(tls: bool) -> Vec<&'static str> {
    let strongest_first = [ScramHash::Sha512, ScramHash::Sha256, ScramHash::Sha1];
    let mut m = Vec::new();
    if tls {
        m.extend(strongest_first.iter().map(|h| h.mechanism(true)));
    }
    m.extend(strongest_first.iter().map(|h| h.mechanism(false)));
    if tls {
        m.push("PLAIN");
    }
    m
}

pub fn mechanisms_element(tls: bool) -> Element {
    let mut e = Element::new("mechanisms", ns::SASL);
    for m in mechanisms(tls) {
        e.append_child(Element::new("mechanism", ns::SASL).with_text(m));
    }
    e
}

pub fn channel_binding_element(exporter: bool) -> Element {
    let mut e = Element::new("sasl-channel-binding", SASL_CB_NS);
    if exporter {
        e.append_child(
            Element::new("channel-binding", SASL_CB_NS).with_attr("type", "tls-exporter"),
        );
    }
    e.append_child(
        Element::new("channel-binding", SASL_CB_NS).with_attr("type", "tls-server-end-point"),
    );
    e
}

/// `<failure/>` with its condition and, where there is more to say, a text (RFC 6120 §6.5).
pub fn failure(condition: &str, text: Option<&str>) -> Element {
    let mut e = Element::new("failure", ns::SASL).with_child(Element::new(condition, ns::SASL));
    if let Some(text) = text {
        e.append_child(
            Element::new("text", ns::SASL)
                .with_attr("xml:lang", "en")
                .with_text(text),
        );
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_plus_only_over_tls() {
        assert!(!mechanisms(false).contains(&"PLAIN"));
        assert!(!mechanisms(false).iter().any(|m| m.ends_with("-PLUS")));
        assert_eq!(mechanisms(true).first(), Some(&"SCRAM-SHA-512-PLUS"));
        assert!(mechanisms(true).contains(&"PLAIN"));
    }
}
