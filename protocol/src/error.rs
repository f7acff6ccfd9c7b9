//! Stream errors (RFC 6120 §4.9) and stanza errors (RFC 6120 §8.3).

use crate::element::Element;
use crate::ns;
use std::fmt;

/// Defined stream error conditions (RFC 6120 §4.9.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamErrorCondition {
    BadFormat,
    BadNamespacePrefix,
    Conflict,
    ConnectionTimeout,
    HostGone,
    HostUnknown,
    ImproperAddressing,
    InternalServerError,
    InvalidFrom,
    InvalidNamespace,
    InvalidXml,
    NotAuthorized,
    NotWellFormed,
    PolicyViolation,
    RemoteConnectionFailed,
    Reset,
    ResourceConstraint,
    RestrictedXml,
    SeeOtherHost,
    SystemShutdown,
    UndefinedCondition,
    UnsupportedEncoding,
    UnsupportedFeature,
    UnsupportedStanzaType,
    UnsupportedVersion,
}

impl StreamErrorCondition {
    const ALL: [StreamErrorCondition; 25] = [
        Self::BadFormat,
        Self::BadNamespacePrefix,
        Self::Conflict,
        Self::ConnectionTimeout,
        Self::HostGone,
        Self::HostUnknown,
        Self::ImproperAddressing,
        Self::InternalServerError,
        Self::InvalidFrom,
        Self::InvalidNamespace,
        Self::InvalidXml,
        Self::NotAuthorized,
        Self::NotWellFormed,
        Self::PolicyViolation,
        Self::RemoteConnectionFailed,
        Self::Reset,
        Self::ResourceConstraint,
        Self::RestrictedXml,
        Self::SeeOtherHost,
        Self::SystemShutdown,
        Self::UndefinedCondition,
        Self::UnsupportedEncoding,
        Self::UnsupportedFeature,
        Self::UnsupportedStanzaType,
        Self::UnsupportedVersion,
    ];

    /// The element name of the condition.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::BadFormat => "bad-format",
            Self::BadNamespacePrefix => "bad-namespace-prefix",
            Self::Conflict => "conflict",
            Self::ConnectionTimeout => "connection-timeout",
            Self::HostGone => "host-gone",
            Self::HostUnknown => "host-unknown",
            Self::ImproperAddressing => "improper-addressing",
            Self::InternalServerError => "internal-server-error",
            Self::InvalidFrom => "invalid-from",
            Self::InvalidNamespace => "invalid-namespace",
            Self::InvalidXml => "invalid-xml",
            Self::NotAuthorized => "not-authorized",
            Self::NotWellFormed => "not-well-formed",
            Self::PolicyViolation => "policy-violation",
            Self::RemoteConnectionFailed => "remote-connection-failed",
            Self::Reset => "reset",
            Self::ResourceConstraint => "resource-constraint",
            Self::RestrictedXml => "restricted-xml",
            Self::SeeOtherHost => "see-other-host",
            Self::SystemShutdown => "system-shutdown",
            Self::UndefinedCondition => "undefined-condition",
            Self::UnsupportedEncoding => "unsupported-encoding",
            Self::UnsupportedFeature => "unsupported-feature",
            Self::UnsupportedStanzaType => "unsupported-stanza-type",
            Self::UnsupportedVersion => "unsupported-version",
        }
    }

    /// Parses a condition element name (for stream errors received from peers).
    #[allow(clippy::should_implement_trait)] // Option, not Result: unknown names are not an error
    pub fn from_str(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for StreamErrorCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stream error, sent before closing the stream (RFC 6120 §4.9).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stream error {condition}{}", text_suffix(.text))]
pub struct StreamError {
    pub condition: StreamErrorCondition,
    pub text: Option<String>,
}

fn text_suffix(text: &Option<String>) -> String {
    match text {
        Some(t) => format!(": {t}"),
        None => String::new(),
    }
}

impl StreamError {
    pub fn new(condition: StreamErrorCondition) -> Self {
        StreamError {
            condition,
            text: None,
        }
    }

    /// Adds the human-readable `<text/>` (RFC 6120 §4.9.2).
    #[must_use]
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// `<stream:error>` (RFC 6120 §4.9.2). The element is in the stream
    /// namespace; written inside a stream whose default namespace is
    /// jabber:client it carries its own `xmlns`, which is equivalent to the
    /// `stream:` prefix.
    pub fn to_element(&self) -> Element {
        let mut e = Element::new("error", ns::STREAM);
        e.append_child(Element::new(self.condition.as_str(), ns::STREAMS));
        if let Some(t) = &self.text {
            e.append_child(Element::new("text", ns::STREAMS).with_text(t.clone()));
        }
        e
    }

    /// Reads a `<stream:error/>` received from a peer. Unknown conditions
    /// become undefined-condition (RFC 6120 §4.9.3.21).
    pub fn from_element(e: &Element) -> Option<Self> {
        if !e.is("error", ns::STREAM) {
            return None;
        }
        let condition = e
            .children()
            .filter(|c| c.ns() == ns::STREAMS && c.name() != "text")
            .find_map(|c| StreamErrorCondition::from_str(c.name()))
            .unwrap_or(StreamErrorCondition::UndefinedCondition);
        let text = e.get_child("text", ns::STREAMS).map(Element::text);
        Some(StreamError { condition, text })
    }
}

/// Stanza error types (RFC 6120 §8.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorType {
    Auth,
    Cancel,
    Continue,
    Modify,
    Wait,
}

impl ErrorType {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorType::Auth => "auth",
            ErrorType::Cancel => "cancel",
            ErrorType::Continue => "continue",
            ErrorType::Modify => "modify",
            ErrorType::Wait => "wait",
        }
    }

    #[allow(clippy::should_implement_trait)] // Option, not Result: unknown names are not an error
    pub fn from_str(s: &str) -> Option<Self> {
        Some(match s {
            "auth" => ErrorType::Auth,
            "cancel" => ErrorType::Cancel,
            "continue" => ErrorType::Continue,
            "modify" => ErrorType::Modify,
            "wait" => ErrorType::Wait,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Defined stanza error conditions (RFC 6120 §8.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StanzaErrorCondition {
    BadRequest,
    Conflict,
    FeatureNotImplemented,
    Forbidden,
    Gone,
    InternalServerError,
    ItemNotFound,
    JidMalformed,
    NotAcceptable,
    NotAllowed,
    NotAuthorized,
    PolicyViolation,
    RecipientUnavailable,
    Redirect,
    RegistrationRequired,
    RemoteServerNotFound,
    RemoteServerTimeout,
    ResourceConstraint,
    ServiceUnavailable,
    SubscriptionRequired,
    UndefinedCondition,
    UnexpectedRequest,
}

impl StanzaErrorCondition {
    const ALL: [StanzaErrorCondition; 22] = [
        Self::BadRequest,
        Self::Conflict,
        Self::FeatureNotImplemented,
        Self::Forbidden,
        Self::Gone,
        Self::InternalServerError,
        Self::ItemNotFound,
        Self::JidMalformed,
        Self::NotAcceptable,
        Self::NotAllowed,
        Self::NotAuthorized,
        Self::PolicyViolation,
        Self::RecipientUnavailable,
        Self::Redirect,
        Self::RegistrationRequired,
        Self::RemoteServerNotFound,
        Self::RemoteServerTimeout,
        Self::ResourceConstraint,
        Self::ServiceUnavailable,
        Self::SubscriptionRequired,
        Self::UndefinedCondition,
        Self::UnexpectedRequest,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::Conflict => "conflict",
            Self::FeatureNotImplemented => "feature-not-implemented",
            Self::Forbidden => "forbidden",
            Self::Gone => "gone",
            Self::InternalServerError => "internal-server-error",
            Self::ItemNotFound => "item-not-found",
            Self::JidMalformed => "jid-malformed",
            Self::NotAcceptable => "not-acceptable",
            Self::NotAllowed => "not-allowed",
            Self::NotAuthorized => "not-authorized",
            Self::PolicyViolation => "policy-violation",
            Self::RecipientUnavailable => "recipient-unavailable",
            Self::Redirect => "redirect",
            Self::RegistrationRequired => "registration-required",
            Self::RemoteServerNotFound => "remote-server-not-found",
            Self::RemoteServerTimeout => "remote-server-timeout",
            Self::ResourceConstraint => "resource-constraint",
            Self::ServiceUnavailable => "service-unavailable",
            Self::SubscriptionRequired => "subscription-required",
            Self::UndefinedCondition => "undefined-condition",
            Self::UnexpectedRequest => "unexpected-request",
        }
    }

    #[allow(clippy::should_implement_trait)] // Option, not Result: unknown names are not an error
    pub fn from_str(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The error type used with this condition in the examples of
    /// RFC 6120 §8.3.3 (one subsection per condition, in enum order).
    pub fn default_type(&self) -> ErrorType {
        match self {
            Self::BadRequest => ErrorType::Modify,
            Self::Conflict => ErrorType::Cancel,
            Self::FeatureNotImplemented => ErrorType::Cancel,
            Self::Forbidden => ErrorType::Auth,
            Self::Gone => ErrorType::Cancel,
            Self::InternalServerError => ErrorType::Cancel,
            Self::ItemNotFound => ErrorType::Cancel,
            Self::JidMalformed => ErrorType::Modify,
            Self::NotAcceptable => ErrorType::Modify,
            Self::NotAllowed => ErrorType::Cancel,
            Self::NotAuthorized => ErrorType::Auth,
            Self::PolicyViolation => ErrorType::Modify,
            Self::RecipientUnavailable => ErrorType::Wait,
            Self::Redirect => ErrorType::Modify,
            Self::RegistrationRequired => ErrorType::Auth,
            Self::RemoteServerNotFound => ErrorType::Cancel,
            Self::RemoteServerTimeout => ErrorType::Wait,
            Self::ResourceConstraint => ErrorType::Wait,
            Self::ServiceUnavailable => ErrorType::Cancel,
            Self::SubscriptionRequired => ErrorType::Auth,
            Self::UndefinedCondition => ErrorType::Modify,
            Self::UnexpectedRequest => ErrorType::Wait,
        }
    }
}

impl fmt::Display for StanzaErrorCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stanza error (RFC 6120 §8.3).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stanza error {error_type} {condition}{}", text_suffix(.text))]
pub struct StanzaError {
    pub condition: StanzaErrorCondition,
    pub error_type: ErrorType,
    pub text: Option<String>,
    /// The entity that generated the error (RFC 6120 §8.3.2 `by`).
    pub by: Option<String>,
}

impl StanzaError {
    /// An error with the condition's usual type.
    pub fn new(condition: StanzaErrorCondition) -> Self {
        StanzaError {
            condition,
            error_type: condition.default_type(),
            text: None,
            by: None,
        }
    }

    #[must_use]
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    #[must_use]
    pub fn with_type(mut self, error_type: ErrorType) -> Self {
        self.error_type = error_type;
        self
    }

    #[must_use]
    pub fn with_by(mut self, by: impl Into<String>) -> Self {
        self.by = Some(by.into());
        self
    }

    /// `<error type='…' [by='…']><condition xmlns=STANZAS/>[<text/>]</error>`,
    /// the error element being qualified by the stanza's namespace
    /// (RFC 6120 §8.3.2).
    pub fn to_element(&self, stanza_ns: &str) -> Element {
        let mut e =
            Element::new("error", stanza_ns.to_owned()).with_attr("type", self.error_type.as_str());
        if let Some(by) = &self.by {
            e.set_attr("by", by.clone());
        }
        e.append_child(Element::new(self.condition.as_str(), ns::STANZAS));
        if let Some(t) = &self.text {
            e.append_child(Element::new("text", ns::STANZAS).with_text(t.clone()));
        }
        e
    }

    /// Reads an error from an `<error/>` element, or from a stanza carrying
    /// one. A missing or unknown condition gives `None`; a missing or unknown
    /// type falls back to the condition's default (be liberal in what we
    /// accept from peers, but never invent a condition).
    pub fn from_element(e: &Element) -> Option<Self> {
        let err = if e.name() == "error" {
            e
        } else {
            e.get_child("error", e.ns())?
        };
        let condition = err
            .children()
            .filter(|c| c.ns() == ns::STANZAS && c.name() != "text")
            .find_map(|c| StanzaErrorCondition::from_str(c.name()))?;
        let error_type = err
            .attr("type")
            .and_then(ErrorType::from_str)
            .unwrap_or_else(|| condition.default_type());
        Some(StanzaError {
            condition,
            error_type,
            text: err.get_child("text", ns::STANZAS).map(Element::text),
            by: err.attr("by").map(str::to_owned),
        })
    }
}

/// Builds the error reply to `stanza` (RFC 6120 §8.3.1): same element name,
/// namespace and id, `type='error'`, `to`/`from` swapped, the error appended.
/// The original payload is kept for message and presence (§8.3.1 allows it and
/// it helps the sender correlate) but not for iq, whose error reply is a
/// response and must not look like a request payload.
///
/// Returns `None` when `stanza` is itself an error: answering an error with an
/// error can loop between two entities forever (RFC 6120 §8.3.1, "MUST NOT
/// respond to a stanza of type error").
pub fn error_reply(stanza: &Element, err: &StanzaError) -> Option<Element> {
    if stanza.attr("type") == Some("error") {
        return None;
    }
    let mut reply = Element::new(stanza.name(), stanza.namespace().clone());
    if let Some(id) = stanza.attr("id") {
        reply.set_attr("id", id);
    }
    if let Some(from) = stanza.attr("from") {
        reply.set_attr("to", from);
    }
    if let Some(to) = stanza.attr("to") {
        reply.set_attr("from", to);
    }
    reply.set_attr("type", "error");
    if stanza.name() != "iq" {
        for node in stanza.nodes() {
            reply.nodes_mut().push(node.clone());
        }
        // An old error child would make the reply ambiguous.
        reply.remove_children("error", stanza.ns());
    }
    reply.append_child(err.to_element(stanza.ns()));
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_names_round_trip() {
        for c in StreamErrorCondition::ALL {
            assert_eq!(StreamErrorCondition::from_str(c.as_str()), Some(c));
        }
        for c in StanzaErrorCondition::ALL {
            assert_eq!(StanzaErrorCondition::from_str(c.as_str()), Some(c));
        }
        for t in ["auth", "cancel", "continue", "modify", "wait"] {
            assert_eq!(ErrorType::from_str(t).map(|t| t.as_str()), Some(t));
        }
        assert_eq!(StanzaErrorCondition::from_str("nope"), None);
        assert_eq!(ErrorType::from_str("Cancel"), None);
        assert_eq!(
            StanzaErrorCondition::ServiceUnavailable.default_type(),
            ErrorType::Cancel
        );
    }

    #[test]
    fn stream_error_element_and_display() {
        let e = StreamError::new(StreamErrorCondition::NotWellFormed).with_text("bad <xml>");
        assert_eq!(e.to_string(), "stream error not-well-formed: bad <xml>");
        assert_eq!(
            StreamError::new(StreamErrorCondition::Reset).to_string(),
            "stream error reset"
        );
        let el = e.to_element();
        assert_eq!(
            el.to_xml(ns::CLIENT),
            "<error xmlns='http://etherx.jabber.org/streams'>\
             <not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>bad &lt;xml&gt;</text></error>"
        );
        assert_eq!(StreamError::from_element(&el), Some(e));
    }

    #[test]
    fn stanza_error_element_round_trip() {
        let e = StanzaError::new(StanzaErrorCondition::ItemNotFound)
            .with_text("no such item")
            .with_by("example.com");
        let el = e.to_element(ns::CLIENT);
        assert_eq!(
            el.to_xml(ns::CLIENT),
            "<error type='cancel' by='example.com'>\
             <item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>no such item</text></error>"
        );
        assert_eq!(StanzaError::from_element(&el), Some(e.clone()));
        assert_eq!(
            e.to_string(),
            "stanza error cancel item-not-found: no such item"
        );
        let missing = Element::new("error", ns::CLIENT).with_attr("type", "cancel");
        assert_eq!(StanzaError::from_element(&missing), None);
    }

    #[test]
    fn error_reply_swaps_addresses() {
        let iq = Element::new("iq", ns::CLIENT)
            .with_attr("from", "romeo@example.net/orchard")
            .with_attr("to", "example.net")
            .with_attr("id", "q1")
            .with_attr("type", "get")
            .with_child(Element::new("query", "urn:unknown"));
        let err = StanzaError::new(StanzaErrorCondition::ServiceUnavailable);
        let reply = error_reply(&iq, &err).expect("reply");
        assert_eq!(reply.attr("to"), Some("romeo@example.net/orchard"));
        assert_eq!(reply.attr("from"), Some("example.net"));
        assert_eq!(reply.attr("id"), Some("q1"));
        assert_eq!(reply.attr("type"), Some("error"));
        assert!(!reply.has_child("query", "urn:unknown"));
        assert_eq!(StanzaError::from_element(&reply), Some(err.clone()));

        let msg = Element::new("message", ns::SERVER)
            .with_attr("from", "a@x")
            .with_attr("to", "b@y")
            .with_child(Element::new("body", ns::SERVER).with_text("hi"));
        let reply = error_reply(&msg, &err).expect("reply");
        assert!(reply.is("message", ns::SERVER));
        assert!(reply.has_child("body", ns::SERVER));
        assert!(reply.has_child("error", ns::SERVER));
        assert_eq!(reply.attr("id"), None);

        assert_eq!(error_reply(&reply, &err), None);
    }
}
