//! An owned XML element tree and its serializer.
//!
//! Every stanza confab forwards is re-serialized from this tree, never copied
//! from the peer's bytes, so the serializer is a security boundary: whatever a
//! text node or attribute value contains, the output must be well-formed XML
//! that re-parses to the same tree (RFC 6120 §11.1 requires well-formed XML on
//! the wire, and §13.3 warns about injection through stanza content).
//!
//! Names are stored without prefixes: elements carry their namespace URI
//! (RFC 6120 §4.8 makes prefixes meaningless beyond the document), attributes
//! are stored as follows:
//! - attributes without a prefix under their plain name (`to`, `type`, …);
//! - attributes in the `xml` namespace as `xml:local` (`xml:lang`), because that
//!   prefix is fixed by XML Namespaces 1.0 §3 and can never be redeclared;
//! - attributes in any other namespace as `{namespace-uri}local`; the serializer
//!   declares a generated prefix for them on the element that carries them.
//!
//! Namespace declarations (`xmlns`, `xmlns:p`) are not attributes: the
//! serializer derives them from the element namespaces.

use crate::ns;
use crate::parser::XmlError;
use std::fmt;
use std::sync::Arc;

/// A namespace URI. Constants of the code are kept as they are; a URI from a parse is
/// allocated once per declaration and shared by every element in its scope, so a long
/// `xmlns` on an element with thousands of children costs its length once, not once per
/// child (a peer must not turn a small stanza into a large tree).
#[derive(Clone)]
pub struct Namespace(NsRepr);

#[derive(Clone)]
enum NsRepr {
    Static(&'static str),
    Shared(Arc<str>),
}

impl Namespace {
    pub fn as_str(&self) -> &str {
        match &self.0 {
            NsRepr::Static(s) => s,
            NsRepr::Shared(s) => s,
        }
    }
}

impl From<&'static str> for Namespace {
    fn from(s: &'static str) -> Self {
        Namespace(NsRepr::Static(s))
    }
}

impl From<String> for Namespace {
    fn from(s: String) -> Self {
        Namespace(NsRepr::Shared(s.into()))
    }
}

impl From<&String> for Namespace {
    fn from(s: &String) -> Self {
        Namespace(NsRepr::Shared(s.as_str().into()))
    }
}

impl From<Arc<str>> for Namespace {
    fn from(s: Arc<str>) -> Self {
        Namespace(NsRepr::Shared(s))
    }
}

impl std::ops::Deref for Namespace {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Namespace {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Namespace {}

impl PartialEq<str> for Namespace {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Namespace {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// An XML element: local name, namespace URI, attributes and child nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    name: String,
    ns: Namespace,
    attrs: Vec<(String, String)>,
    children: Vec<Node>,
}

/// A child of an element: another element or character data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    /// A new, empty element. `name` is the local name (no prefix) and must be a
    /// valid XML name; names come from code or from the parser, never from
    /// peer-supplied text content.
    pub fn new(name: impl Into<String>, ns: impl Into<Namespace>) -> Self {
        Element {
            name: name.into(),
            ns: ns.into(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Builder form of [`Element::set_attr`].
    #[must_use]
    pub fn with_attr(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_attr(name, value);
        self
    }

    /// Builder form of [`Element::append_child`].
    #[must_use]
    pub fn with_child(mut self, child: Element) -> Self {
        self.children.push(Node::Element(child));
        self
    }

    /// Builder form of [`Element::append_text`].
    #[must_use]
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.append_text(text);
        self
    }

    /// The local name, without any prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace URI ("" for no namespace).
    pub fn ns(&self) -> &str {
        self.ns.as_str()
    }

    /// The namespace URI as a value that can be given to another element without a copy.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// Changes the namespace URI, e.g. to move a stanza between `jabber:client`
    /// and `jabber:server` when routing across a federation link (RFC 6120 §4.8.3).
    pub fn set_ns(&mut self, ns: impl Into<Namespace>) {
        self.ns = ns.into();
    }

    /// Whether this element has the given local name and namespace.
    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    /// The value of an attribute (see the module docs for how names are stored).
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets an attribute, replacing an existing one of the same name.
    pub fn set_attr(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.attrs.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.attrs.push((name, value)),
        }
    }

    /// Removes an attribute, returning its value.
    pub fn remove_attr(&mut self, name: &str) -> Option<String> {
        let idx = self.attrs.iter().position(|(n, _)| n == name)?;
        Some(self.attrs.remove(idx).1)
    }

    /// Replaces all attributes at once; the parser has already checked the
    /// names are unique (avoids the quadratic cost of `set_attr` on a hostile
    /// tag with thousands of attributes).
    pub(crate) fn set_attrs_unchecked(&mut self, attrs: Vec<(String, String)>) {
        self.attrs = attrs;
    }

    /// All attributes, in document order.
    pub fn attrs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.attrs.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// All child nodes, elements and text, in document order.
    pub fn nodes(&self) -> &[Node] {
        &self.children
    }

    /// Mutable access to the child nodes.
    pub fn nodes_mut(&mut self) -> &mut Vec<Node> {
        &mut self.children
    }

    /// The element children, skipping text.
    pub fn children(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The element children, mutably.
    pub fn children_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The first child element with this name and namespace.
    pub fn get_child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.children().find(|e| e.is(name, ns))
    }

    /// The first child element with this name and namespace, mutably.
    pub fn get_child_mut(&mut self, name: &str, ns: &str) -> Option<&mut Element> {
        self.children_mut().find(|e| e.is(name, ns))
    }

    /// Whether a child element with this name and namespace exists.
    pub fn has_child(&self, name: &str, ns: &str) -> bool {
        self.get_child(name, ns).is_some()
    }

    /// The first child element, whatever its name (e.g. the payload of an iq,
    /// RFC 6120 §8.2.3).
    pub fn first_child(&self) -> Option<&Element> {
        self.children().next()
    }

    /// Appends a child element and returns a reference to it, so that callers
    /// can keep building inside it.
    pub fn append_child(&mut self, child: Element) -> &mut Element {
        self.children.push(Node::Element(child));
        match self.children.last_mut() {
            Some(Node::Element(e)) => e,
            // The element was pushed on the line above.
            _ => unreachable!("last node is the element just pushed"),
        }
    }

    /// Appends character data. Adjacent text is merged into one node, so that a
    /// parsed tree (where CDATA sections and references split text) compares
    /// equal to a built one.
    pub fn append_text(&mut self, text: impl Into<String>) {
        let text = text.into();
        if text.is_empty() {
            return;
        }
        match self.children.last_mut() {
            Some(Node::Text(t)) => t.push_str(&text),
            _ => self.children.push(Node::Text(text)),
        }
    }

    /// Removes and returns the first child element with this name and namespace.
    pub fn remove_child(&mut self, name: &str, ns: &str) -> Option<Element> {
        let idx = self
            .children
            .iter()
            .position(|n| matches!(n, Node::Element(e) if e.is(name, ns)))?;
        match self.children.remove(idx) {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        }
    }

    /// Removes every child element with this name and namespace.
    pub fn remove_children(&mut self, name: &str, ns: &str) {
        self.children
            .retain(|n| !matches!(n, Node::Element(e) if e.is(name, ns)));
    }

    /// Bytes of memory this tree occupies: its own struct and everything it owns on the
    /// heap, by capacity. A namespace parsed from a declaration is shared by the elements
    /// in its scope and counted nowhere here (its declaration's bytes are the input's).
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<Element>() + self.heap_footprint()
    }

    fn heap_footprint(&self) -> usize {
        let attrs: usize = self
            .attrs
            .iter()
            .map(|(n, v)| n.capacity() + v.capacity())
            .sum();
        let children: usize = self
            .children
            .iter()
            .map(|n| match n {
                Node::Element(e) => e.heap_footprint(),
                Node::Text(t) => t.capacity(),
            })
            .sum();
        self.name.capacity()
            + self.attrs.capacity() * std::mem::size_of::<(String, String)>()
            + attrs
            + self.children.capacity() * std::mem::size_of::<Node>()
            + children
    }

    /// What the parser counts for a new element before its children: its slot in the
    /// parent's child list, its name and its attributes — what [`Element::footprint`]
    /// finds for it once the parser has dropped spare capacity ([`Element::shrink_to_fit`]).
    pub(crate) fn node_cost(&self) -> usize {
        std::mem::size_of::<Node>()
            + self.name.capacity()
            + self.attrs.capacity() * std::mem::size_of::<(String, String)>()
            + self
                .attrs
                .iter()
                .map(|(n, v)| n.capacity() + v.capacity())
                .sum::<usize>()
    }

    /// What the parser counts for `len` bytes of text: a node slot and the text.
    pub(crate) fn text_cost(len: usize) -> usize {
        std::mem::size_of::<Node>() + len
    }

    /// Sets the children the parser collected (a list of exactly their number); text
    /// merged from several pieces gives back its spare capacity.
    pub(crate) fn set_children(&mut self, mut children: Vec<Node>) {
        for node in &mut children {
            if let Node::Text(t) = node {
                if t.capacity() > t.len() {
                    t.shrink_to_fit();
                }
            }
        }
        self.children = children;
    }

    /// The concatenation of the direct text children.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                out.push_str(t);
            }
        }
        out
    }

    /// Serializes the element. `parent_ns` is the default namespace in scope
    /// where the output is inserted (for stanzas: the stream's default
    /// namespace, RFC 6120 §4.8.3); `xmlns` is only written where an element's
    /// namespace differs from the one in scope.
    /// Renames namespace `from` to `to` here and in every descendant. Stanzas are
    /// `jabber:client` inside the server and `jabber:server` between servers
    /// (RFC 6120 §4.8.3); the content namespace of a stanza follows its default.
    pub fn map_ns(&mut self, from: &str, to: impl Into<Namespace>) {
        self.map_ns_to(from, &to.into());
    }

    fn map_ns_to(&mut self, from: &str, to: &Namespace) {
        if self.ns == from {
            self.ns = to.clone();
        }
        for child in self.children_mut() {
            child.map_ns_to(from, to);
        }
    }

    pub fn write_to(&self, out: &mut Vec<u8>, parent_ns: &str) {
        out.push(b'<');
        out.extend_from_slice(self.name.as_bytes());
        if self.ns != parent_ns {
            out.extend_from_slice(b" xmlns='");
            escape_attr(&self.ns, out);
            out.push(b'\'');
        }
        // Namespaced attributes get a prefix declared on this very element;
        // the element itself always uses the default namespace, so generated
        // prefixes never clash with element names.
        let mut prefixes: Vec<&str> = Vec::new();
        for (name, _) in &self.attrs {
            if let Some((uri, _)) = split_clark(name) {
                if !uri.is_empty() && uri != ns::XML && !prefixes.contains(&uri) {
                    out.extend_from_slice(format!(" xmlns:ns{}='", prefixes.len()).as_bytes());
                    escape_attr(uri, out);
                    out.push(b'\'');
                    prefixes.push(uri);
                }
            }
        }
        for (name, value) in &self.attrs {
            // Declarations are generated above; a stray "xmlns" attribute set by
            // code would produce a duplicate or conflicting declaration.
            if name == "xmlns" || name.starts_with("xmlns:") {
                continue;
            }
            out.push(b' ');
            match split_clark(name) {
                // No namespace: the plain name (prefixes cannot be bound to "").
                Some(("", local)) => out.extend_from_slice(local.as_bytes()),
                Some((uri, local)) if uri == ns::XML => {
                    out.extend_from_slice(b"xml:");
                    out.extend_from_slice(local.as_bytes());
                }
                Some((uri, local)) => {
                    let idx = prefixes.iter().position(|p| *p == uri).unwrap_or(0);
                    out.extend_from_slice(format!("ns{idx}:").as_bytes());
                    out.extend_from_slice(local.as_bytes());
                }
                None => out.extend_from_slice(name.as_bytes()),
            }
            out.extend_from_slice(b"='");
            escape_attr(value, out);
            out.push(b'\'');
        }
        if self.children.is_empty() {
            out.extend_from_slice(b"/>");
            return;
        }
        out.push(b'>');
        for child in &self.children {
            match child {
                Node::Element(e) => e.write_to(out, &self.ns),
                Node::Text(t) => escape_text(t, out),
            }
        }
        out.extend_from_slice(b"</");
        out.extend_from_slice(self.name.as_bytes());
        out.push(b'>');
    }

    /// Serializes to a string; see [`Element::write_to`].
    pub fn to_xml(&self, parent_ns: &str) -> String {
        let mut out = Vec::new();
        self.write_to(&mut out, parent_ns);
        // Everything written is either a &str or ASCII, so this cannot fail;
        // the lossy conversion avoids a panic path anyway.
        match String::from_utf8(out) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// Parses one complete element (surrounding whitespace allowed) with the
    /// same restrictions as the stream parser (RFC 6120 §11.1): no DTD,
    /// comments, processing instructions or undefined entities. Used for
    /// stored XML and in tests. No XML declaration is accepted (it would be a
    /// processing instruction here); the depth limit is the stream parser's
    /// default, the size is not limited since the input is already in memory.
    pub fn parse(xml: &str) -> Result<Element, XmlError> {
        crate::parser::parse_element(xml)
    }
}

impl fmt::Display for Element {
    /// The element as a standalone document fragment: the root always
    /// declares its namespace.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_xml(""))
    }
}

/// Splits a `{uri}local` attribute name. The URI may contain `}` itself; the local name
/// cannot (it is an XML name), so the split is at the last one.
fn split_clark(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix('{')?;
    rest.rsplit_once('}')
}

/// Whether `c` is a character allowed in an XML 1.0 document (XML 1.0 §2.2,
/// production [2] `Char`).
pub(crate) fn is_xml_char(c: char) -> bool {
    matches!(c,
        '\u{9}' | '\u{A}' | '\u{D}'
        | '\u{20}'..='\u{D7FF}'
        | '\u{E000}'..='\u{FFFD}'
        | '\u{10000}'..='\u{10FFFF}')
}

/// The length in bytes of the character at `bytes[i]` if XML 1.0 does not allow it
/// (§2.2 [2]). In UTF-8, which has no surrogates and nothing above U+10FFFF, those are
/// the controls below U+0020 but tab, LF and CR (one byte), and U+FFFE and U+FFFF
/// (EF BF BE, EF BF BF): bytes are enough to find them.
#[inline]
pub(crate) fn illegal_char_len(bytes: &[u8], i: usize) -> Option<usize> {
    match bytes.get(i)? {
        &b if is_forbidden_control(b) => Some(1),
        0xef if bytes.get(i + 1) == Some(&0xbf)
            && matches!(bytes.get(i + 2), Some(0xbe | 0xbf)) =>
        {
            Some(3)
        }
        _ => None,
    }
}

/// A control byte XML 1.0 forbids: everything below U+0020 but tab, LF and CR.
#[inline]
pub(crate) fn is_forbidden_control(b: u8) -> bool {
    b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')
}

/// Characters that XML 1.0 cannot represent at all, not even as character
/// references, are replaced by U+FFFD so the output stays well-formed.
fn escape_into(s: &str, out: &mut Vec<u8>, attr: bool) {
    // Runs of bytes that need no escaping are copied whole. Every byte that does is
    // ASCII, or the first of U+FFFE or U+FFFF (EF BF BE, EF BF BF), so the run ends
    // only on character boundaries.
    let bytes = s.as_bytes();
    let mut run = 0;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let (rep, len): (&[u8], usize) = match b {
            b'&' => (b"&amp;", 1),
            b'<' => (b"&lt;", 1),
            b'>' => (b"&gt;", 1),
            // A literal CR would be turned into LF by end-of-line handling
            // (XML 1.0 §2.11), so it is written as a reference in text too.
            b'\r' => (b"&#xD;", 1),
            b'"' if attr => (b"&quot;", 1),
            b'\'' if attr => (b"&apos;", 1),
            // Attribute-value normalization (XML 1.0 §3.3.3) would turn
            // literal tabs and newlines into spaces.
            b'\t' if attr => (b"&#x9;", 1),
            b'\n' if attr => (b"&#xA;", 1),
            _ => match illegal_char_len(bytes, i) {
                Some(len) => ("\u{FFFD}".as_bytes(), len),
                None => {
                    i += 1;
                    continue;
                }
            },
        };
        out.extend_from_slice(bytes.get(run..i).unwrap_or_default());
        out.extend_from_slice(rep);
        i += len;
        run = i;
    }
    out.extend_from_slice(bytes.get(run..).unwrap_or_default());
}

fn escape_text(s: &str, out: &mut Vec<u8>) {
    escape_into(s, out, false);
}

fn escape_attr(s: &str, out: &mut Vec<u8>) {
    escape_into(s, out, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Element {
        Element::new("message", ns::CLIENT)
            .with_attr("to", "juliet@example.com")
            .with_attr("type", "chat")
            .with_child(Element::new("body", ns::CLIENT).with_text("Art thou not Romeo?"))
            .with_child(Element::new(
                "active",
                "http://jabber.org/protocol/chatstates",
            ))
    }

    #[test]
    fn map_ns_renames_the_stanza_namespace_throughout() {
        let mut m = Element::parse(
            "<message xmlns='jabber:server' to='a@b'><body>x</body><x xmlns='urn:x'><y/></x></message>",
        )
        .unwrap();
        m.map_ns("jabber:server", "jabber:client");
        assert_eq!(m.ns(), "jabber:client");
        assert_eq!(
            m.get_child("body", "jabber:client").map(|b| b.text()),
            Some("x".into())
        );
        assert_eq!(
            m.get_child("x", "urn:x")
                .and_then(|x| x.first_child())
                .map(|y| y.ns()),
            Some("urn:x")
        );
    }

    /// Found by the roundtrip fuzz target: a namespace URI with `}` in it, on a prefixed
    /// attribute, was cut at its own `}` when serialized and did not parse back.
    #[test]
    fn attribute_namespace_with_a_brace_round_trips() {
        let xml = "<result xmlns='urn:a}b' xmlns:db='urn:a}b' db:from='x' to='y'>t</result>";
        let e = Element::parse(xml).unwrap();
        assert_eq!(e.attr("{urn:a}b}from"), Some("x"));
        let out = e.to_xml("");
        let again = Element::parse(&out).unwrap_or_else(|err| panic!("{out}: {err}"));
        assert_eq!(again, e);
        assert_eq!(again.to_xml(""), out);
        let mut streamed = Vec::new();
        e.write_to(&mut streamed, "jabber:server");
        let again = Element::parse(std::str::from_utf8(&streamed).unwrap()).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn builder_and_accessors() {
        let mut m = sample();
        assert!(m.is("message", ns::CLIENT));
        assert_eq!(m.attr("to"), Some("juliet@example.com"));
        m.set_attr("to", "romeo@example.net");
        assert_eq!(m.attr("to"), Some("romeo@example.net"));
        assert_eq!(m.attrs().count(), 2);
        assert_eq!(m.remove_attr("type").as_deref(), Some("chat"));
        assert_eq!(m.attr("type"), None);
        assert_eq!(
            m.get_child("body", ns::CLIENT).map(|b| b.text()),
            Some("Art thou not Romeo?".to_string())
        );
        assert!(m.has_child("active", "http://jabber.org/protocol/chatstates"));
        assert!(!m.has_child("body", ns::SERVER));
        assert_eq!(m.first_child().map(|c| c.name()), Some("body"));
        m.append_child(Element::new("x", "urn:x"))
            .set_attr("a", "b");
        assert_eq!(
            m.get_child("x", "urn:x").and_then(|x| x.attr("a")),
            Some("b")
        );
        if let Some(x) = m.get_child_mut("x", "urn:x") {
            x.set_ns("urn:y");
        }
        assert!(m.has_child("x", "urn:y"));
        assert!(m.remove_child("x", "urn:y").is_some());
        assert!(m.remove_child("x", "urn:y").is_none());
        m.append_child(Element::new("d", "urn:d"));
        m.append_child(Element::new("d", "urn:d"));
        m.remove_children("d", "urn:d");
        assert_eq!(m.children().count(), 2);
        assert_eq!(m.children_mut().count(), 2);
    }

    #[test]
    fn text_is_merged_and_concatenated() {
        let mut e = Element::new("a", "").with_text("x").with_text("y");
        assert_eq!(e.nodes().len(), 1);
        e.append_child(Element::new("b", "").with_text("inner"));
        e.append_text("z");
        e.append_text("");
        assert_eq!(e.nodes().len(), 3);
        assert_eq!(e.text(), "xyz");
        e.nodes_mut().clear();
        assert_eq!(e.text(), "");
    }

    #[test]
    fn serialization_of_namespaces() {
        let m = sample();
        assert_eq!(
            m.to_xml(ns::CLIENT),
            "<message to='juliet@example.com' type='chat'><body>Art thou not Romeo?</body>\
             <active xmlns='http://jabber.org/protocol/chatstates'/></message>"
        );
        assert!(m
            .to_string()
            .starts_with("<message xmlns='jabber:client' to="));
        // A child in no namespace under a namespaced parent must undeclare.
        let e = Element::new("a", "urn:a").with_child(Element::new("b", ""));
        assert_eq!(e.to_xml("urn:a"), "<a><b xmlns=''/></a>");
        assert_eq!(Element::parse(&e.to_string()), Ok(e));
    }

    #[test]
    fn namespaced_attributes() {
        let e = Element::new("a", "urn:a")
            .with_attr("xml:lang", "en")
            .with_attr("{urn:p}x", "1")
            .with_attr("{urn:q}y", "2")
            .with_attr("{urn:p}z", "3")
            .with_attr(format!("{{{}}}space", ns::XML), "preserve");
        let xml = e.to_string();
        assert_eq!(
            xml,
            "<a xmlns='urn:a' xmlns:ns0='urn:p' xmlns:ns1='urn:q' xml:lang='en' ns0:x='1' \
             ns1:y='2' ns0:z='3' xml:space='preserve'/>"
        );
        let back = Element::parse(&xml).expect("parse");
        assert_eq!(back.attr("xml:lang"), Some("en"));
        assert_eq!(back.attr("{urn:p}x"), Some("1"));
        assert_eq!(back.attr("{urn:q}y"), Some("2"));
        // xml-namespace attributes come back in their fixed-prefix form.
        assert_eq!(back.attr("xml:space"), Some("preserve"));
    }

    #[test]
    fn stray_xmlns_attributes_are_not_serialized() {
        let e = Element::new("a", "urn:a")
            .with_attr("xmlns", "urn:evil")
            .with_attr("xmlns:p", "urn:evil");
        assert_eq!(e.to_string(), "<a xmlns='urn:a'/>");
    }

    const ADVERSARIAL: &[&str] = &[
        "",
        "plain",
        "<script>alert(1)</script>",
        "a & b &amp; &lt; &#0; &foo;",
        "'\"'\"",
        "]]>",
        "<![CDATA[x]]>",
        "</body></message><message to='evil'>",
        "' onload='x",
        "\" x=\"",
        "tab\tnl\ncr\rcrlf\r\n",
        "\u{0}\u{1}\u{8}\u{B}\u{C}\u{1F}\u{FFFE}\u{FFFF}",
        "unicode: é ☃ 𝄞 \u{FEFF}",
        "near U+FFFF: \u{FFFD}\u{FFFC}\u{F000}\u{FBFF}\u{FFFE}x\u{FFFF}\u{10000}",
        "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]>",
        "<!-- comment -->",
    ];

    /// The character-at-a-time definition of the escaping, for comparison.
    fn escape_reference(s: &str, attr: bool) -> String {
        s.chars()
            .map(|c| match c {
                '&' => "&amp;".to_string(),
                '<' => "&lt;".to_string(),
                '>' => "&gt;".to_string(),
                '\r' => "&#xD;".to_string(),
                '"' if attr => "&quot;".to_string(),
                '\'' if attr => "&apos;".to_string(),
                '\t' if attr => "&#x9;".to_string(),
                '\n' if attr => "&#xA;".to_string(),
                c if !is_xml_char(c) => "\u{FFFD}".to_string(),
                c => c.to_string(),
            })
            .collect()
    }

    #[test]
    fn escaping_matches_the_character_definition() {
        for s in ADVERSARIAL {
            for attr in [false, true] {
                let mut out = Vec::new();
                escape_into(s, &mut out, attr);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    escape_reference(s, attr),
                    "{s:?}"
                );
            }
        }
    }

    #[test]
    fn escaping_round_trips_adversarial_strings() {
        for s in ADVERSARIAL {
            let expected: String = s
                .chars()
                .map(|c| if is_xml_char(c) { c } else { '\u{FFFD}' })
                .collect();
            let e = Element::new("message", ns::CLIENT)
                .with_attr("id", *s)
                .with_attr("{urn:x}a", *s)
                .with_child(Element::new("body", ns::CLIENT).with_text(*s));
            let xml = e.to_string();
            let back = Element::parse(&xml).unwrap_or_else(|err| panic!("{s:?}: {err} in {xml}"));
            assert_eq!(back.attr("id"), Some(expected.as_str()), "{xml}");
            assert_eq!(back.attr("{urn:x}a"), Some(expected.as_str()), "{xml}");
            let body = back.get_child("body", ns::CLIENT).map(Element::text);
            assert_eq!(body.as_deref(), Some(expected.as_str()), "{xml}");
            if expected == **s {
                assert_eq!(back, e);
            }
        }
    }

    #[test]
    fn round_trip_nested() {
        let xml =
            "<iq xmlns='jabber:client' type='result' id='r1'><query xmlns='jabber:iq:roster' \
                   ver='v2'><item jid='a@b' name='A &amp; B'><group>Friends</group></item>\
                   <item jid='c@d' subscription='both'/></query></iq>";
        let e = Element::parse(xml).expect("parse");
        assert_eq!(e.to_string(), xml);
        assert_eq!(Element::parse(&e.to_xml("")), Ok(e.clone()));
        let q = e.get_child("query", ns::ROSTER).expect("query");
        assert_eq!(q.children().count(), 2);
    }
}
