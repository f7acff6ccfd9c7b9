//! Namespace URIs used across confab.
//!
//! Elements in the tree carry their namespace URI, never a prefix, so code
//! compares against these constants (RFC 6120 §4.8 makes prefixes irrelevant
//! to meaning).

/// Default namespace of client-to-server streams (RFC 6120 §4.8.3).
pub const CLIENT: &str = "jabber:client";
/// Default namespace of server-to-server streams (RFC 6120 §4.8.3).
pub const SERVER: &str = "jabber:server";
/// The stream namespace, usually bound to the `stream` prefix (RFC 6120 §4.8.1).
pub const STREAM: &str = "http://etherx.jabber.org/streams";
/// STARTTLS negotiation (RFC 6120 §5).
pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
/// SASL negotiation (RFC 6120 §6).
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
/// Resource binding (RFC 6120 §7).
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
/// Legacy session establishment (RFC 3921 §3, kept for old clients).
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
/// Stanza error conditions (RFC 6120 §8.3).
pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// Stream error conditions (RFC 6120 §4.9).
pub const STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// Roster management (RFC 6121 §2).
pub const ROSTER: &str = "jabber:iq:roster";
/// Roster versioning stream feature (RFC 6121 §2.6).
pub const ROSTERVER: &str = "urn:xmpp:features:rosterver";
/// Subscription pre-approval stream feature (RFC 6121 §3.4).
pub const PRE_APPROVAL: &str = "urn:xmpp:features:pre-approval";
/// Service discovery, info (XEP-0030).
pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
/// Service discovery, items (XEP-0030).
pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
/// XMPP ping (XEP-0199).
pub const PING: &str = "urn:xmpp:ping";
/// Software version (XEP-0092).
pub const VERSION: &str = "jabber:iq:version";
/// Entity time (XEP-0202).
pub const TIME: &str = "urn:xmpp:time";
/// vCard storage (XEP-0054).
pub const VCARD: &str = "vcard-temp";
/// Private XML storage (XEP-0049).
pub const PRIVATE: &str = "jabber:iq:private";
/// Delayed delivery (XEP-0203).
pub const DELAY: &str = "urn:xmpp:delay";
/// The namespace the `xml` prefix is permanently bound to (XML Namespaces 1.0 §3).
pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
/// Server dialback (XEP-0220).
pub const DIALBACK: &str = "jabber:server:dialback";
/// XEP-0220 §2.4: the stream feature announcing dialback (with error support).
pub const DIALBACK_FEATURE: &str = "urn:xmpp:features:dialback";
/// Entity capabilities (XEP-0115).
pub const CAPS: &str = "http://jabber.org/protocol/caps";
