//! Small helpers for building and inspecting stanzas.

use confab_protocol::{ns, Element, StanzaError, StanzaErrorCondition};

/// A stanza's kind, from its element name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Message,
    Presence,
    Iq,
}

pub fn kind(e: &Element) -> Option<Kind> {
    if e.ns() != ns::CLIENT {
        return None;
    }
    match e.name() {
        "message" => Some(Kind::Message),
        "presence" => Some(Kind::Presence),
        "iq" => Some(Kind::Iq),
        _ => None,
    }
}

/// The `type` attribute with the RFC 6120 defaults for each kind.
pub fn stanza_type(e: &Element) -> &str {
    match e.attr("type") {
        Some(t) => t,
        None if e.name() == "message" => "normal",
        None if e.name() == "presence" => "available",
        None => "",
    }
}

/// An iq result answering `req`, with an optional payload.
pub fn iq_result(req: &Element, payload: Option<Element>) -> Element {
    let mut reply = Element::new("iq", ns::CLIENT).with_attr("type", "result");
    if let Some(id) = req.attr("id") {
        reply.set_attr("id", id);
    }
    if let Some(from) = req.attr("from") {
        reply.set_attr("to", from);
    }
    if let Some(to) = req.attr("to") {
        reply.set_attr("from", to);
    }
    if let Some(p) = payload {
        reply.append_child(p);
    }
    reply
}

/// The error reply to `stanza`; `None` when `stanza` is itself an error.
pub fn error_reply(stanza: &Element, condition: StanzaErrorCondition) -> Option<Element> {
    confab_protocol::error::error_reply(stanza, &StanzaError::new(condition))
}

pub fn error_reply_text(
    stanza: &Element,
    condition: StanzaErrorCondition,
    text: &str,
) -> Option<Element> {
    confab_protocol::error::error_reply(stanza, &StanzaError::new(condition).with_text(text))
}

/// A presence stanza of `ty` (None = available) from → to.
pub fn presence(ty: Option<&str>, from: &str, to: &str) -> Element {
    let mut p = Element::new("presence", ns::CLIENT)
        .with_attr("from", from)
        .with_attr("to", to);
    if let Some(t) = ty {
        p.set_attr("type", t);
    }
    p
}

/// XEP-0082 date-time in UTC with millisecond precision.
pub fn timestamp(t: std::time::SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

/// A random id for server-generated stanzas.
pub fn random_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("{n:016x}")
}
