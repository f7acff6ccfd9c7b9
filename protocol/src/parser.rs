//! Incremental XMPP stream parser.
//!
//! An XMPP stream is one XML document delivered over time (RFC 6120 §4.2): a
//! stream header (the open `<stream:stream>` tag), then top-level children
//! (stanzas and negotiation elements), then `</stream:stream>`. The parser
//! works in two layers:
//!
//! 1. A byte scanner finds the boundaries of the header tag and of each
//!    complete top-level element. It keeps its state between calls, so every
//!    byte is scanned once however the input is chunked. All XML syntax
//!    characters are ASCII and never occur inside a multi-byte UTF-8 sequence,
//!    so scanning bytes is safe even when a chunk splits a character. The
//!    scanner also enforces the size and depth limits while the element is
//!    still incomplete, so a peer cannot make us buffer without bound, and
//!    rejects restricted constructs (RFC 6120 §11.1) as early as possible.
//! 2. A complete element is decoded (UTF-8, XML characters), tokenized by
//!    quick-xml and turned into an [`Element`] with our own namespace
//!    resolution, seeded with the declarations of the stream header
//!    (RFC 6120 §4.8: stanzas inherit the stream's namespaces).
//!
//! Restrictions (RFC 6120 §11.1): comments, processing instructions, internal
//! or external DTD subsets and entity references other than the predefined
//! ones are refused with `<restricted-xml/>`. Character references are checked
//! against the XML `Char` production, so `&#0;` cannot smuggle a NUL in.

use crate::element::{
    illegal_char_len, is_forbidden_control, is_xml_char, Element, Namespace, Node,
};
use crate::error::StreamErrorCondition;
use crate::ns;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The most memory a parsed element tree may take, in bytes per byte of its XML (and
/// [`MIN_TREE_BYTES`] for the smallest stanzas): [`Element::footprint`] of any tree the
/// parser returns is at most this many times its input. Ordinary stanzas take 1–10
/// (text about its length, a roster item with a group about 8); the densest well-formed
/// shape, nothing but one-letter empty elements, about 25. What the limit refuses is
/// the copy of a namespace URI that every prefixed attribute carries in its name: a
/// long prefix declaration and many attributes using it.
pub const TREE_BYTES_PER_INPUT_BYTE: usize = 32;

/// Allowance for tiny stanzas, whose fixed cost (one element) dwarfs their length.
pub const MIN_TREE_BYTES: usize = 1024;

/// Resource limits applied to every peer (RFC 6120 §13.12 asks servers to
/// limit stanza size and processing cost).
#[derive(Clone, Debug)]
pub struct ParserLimits {
    /// Maximum size in bytes of one top-level element (and of the stream
    /// header). Exceeding it is a `<policy-violation/>` (RFC 6120 §4.9.3.14).
    pub max_stanza_size: usize,
    /// Maximum element nesting depth, counting the top-level element as 1
    /// (the stream element itself is not counted).
    pub max_depth: usize,
}

impl Default for ParserLimits {
    fn default() -> Self {
        ParserLimits {
            max_stanza_size: 262_144,
            max_depth: 64,
        }
    }
}

/// Why the XML input was rejected. Each maps to the stream error to send
/// before closing the stream (RFC 6120 §4.9.3).
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum XmlError {
    /// Syntax errors, invalid UTF-8 and characters XML does not allow.
    #[error("not well-formed XML: {0}")]
    NotWellFormed(String),
    /// Constructs RFC 6120 §11.1 forbids in XMPP.
    #[error("restricted XML: {0}")]
    RestrictedXml(String),
    /// The root element is not `stream` in the streams namespace.
    #[error("the stream root is not <stream> in namespace http://etherx.jabber.org/streams")]
    InvalidNamespace,
    /// A prefix was used without a declaration in scope.
    #[error("undeclared namespace prefix '{0}'")]
    BadNamespacePrefix(String),
    /// A stanza (or the stream header) exceeded `max_stanza_size`.
    #[error("stanza exceeds the size limit")]
    TooBig,
    /// Elements nested deeper than `max_depth`.
    #[error("XML nested too deeply")]
    TooDeep,
    /// The element tree would take more than [`TREE_BYTES_PER_INPUT_BYTE`] bytes of
    /// memory per byte of the stanza (many tiny elements, or prefixed attributes that
    /// each name a long namespace).
    #[error("stanza too complex: its element tree would take too much memory for its size")]
    TooComplex,
    /// The XML declaration names an encoding other than UTF-8.
    #[error("unsupported encoding (only UTF-8 is allowed)")]
    UnsupportedEncoding,
}

impl XmlError {
    /// The stream error condition to report.
    ///
    /// Invalid UTF-8 is reported as NotWellFormed, not UnsupportedEncoding:
    /// RFC 6120 §11.6 mandates UTF-8 and XML 1.0 §4.3.3 makes a byte sequence
    /// that does not match the encoding a fatal well-formedness error;
    /// `<unsupported-encoding/>` (§4.9.3.22) is kept for a stream that
    /// declares another encoding.
    pub fn condition(&self) -> StreamErrorCondition {
        match self {
            XmlError::NotWellFormed(_) => StreamErrorCondition::NotWellFormed,
            XmlError::RestrictedXml(_) => StreamErrorCondition::RestrictedXml,
            XmlError::InvalidNamespace => StreamErrorCondition::InvalidNamespace,
            XmlError::BadNamespacePrefix(_) => StreamErrorCondition::BadNamespacePrefix,
            XmlError::TooBig | XmlError::TooDeep | XmlError::TooComplex => {
                StreamErrorCondition::PolicyViolation
            }
            XmlError::UnsupportedEncoding => StreamErrorCondition::UnsupportedEncoding,
        }
    }
}

fn nwf(msg: impl Into<String>) -> XmlError {
    XmlError::NotWellFormed(msg.into())
}

fn restricted(msg: impl Into<String>) -> XmlError {
    XmlError::RestrictedXml(msg.into())
}

/// What the parser produces.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// The stream header was received.
    Open(StreamHeader),
    /// A complete top-level element (stanza or negotiation element).
    Element(Element),
    /// `</stream:stream>` was received; nothing further is parsed.
    Close,
}

/// Attributes of the stream header (RFC 6120 §4.7).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct StreamHeader {
    /// The default namespace declared on the header ("" when none).
    pub default_ns: String,
    pub to: Option<String>,
    pub from: Option<String>,
    pub id: Option<String>,
    pub version: Option<String>,
    /// `xml:lang`.
    pub lang: Option<String>,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";
/// The XML declaration is tiny; anything longer is an attack or garbage.
const MAX_DECL: usize = 256;
/// Longest entity/character reference we accept (`&#x0010FFFF;` with some
/// leading zeros); the only valid ones are short.
const MAX_REF: usize = 32;

fn is_xml_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Where the stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Start of the document: optional BOM, optional XML declaration.
    Prolog,
    /// Inside the XML declaration (from `mark`).
    Decl,
    /// Waiting for the `<` of the stream header.
    HeaderSeek,
    /// Scanning the stream header tag (from `mark`).
    HeaderTag,
    /// Between top-level elements.
    Body,
    /// Just after a top-level `<` (at `mark`), deciding what follows.
    TopTag,
    /// Scanning a top-level element (from `mark`).
    Element,
    /// Scanning the stream's end tag (from `mark`).
    CloseTag,
    /// The stream was closed.
    Closed,
}

/// Lexical state of the scanner inside a tag or element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lex {
    Content,
    /// After `<`.
    TagStart,
    /// Inside a start tag; `quote` is set inside an attribute value, `slash`
    /// when the last byte outside quotes was `/`.
    StartTag {
        quote: Option<u8>,
        slash: bool,
    },
    EndTag,
    /// After `<!` in content.
    Bang,
    /// Inside `<![CDATA[`; `run` counts trailing `]`.
    CData {
        run: u8,
    },
    /// After `&`, `len` bytes of the reference name seen; `quote` says where to
    /// return (attribute value or content).
    Ref {
        len: usize,
        quote: Option<u8>,
    },
}

/// What the scanner is delimiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    /// The stream header: complete at the end of the first start tag.
    Header,
    /// A top-level element: complete when depth returns to zero.
    Element,
    /// The stream end tag.
    Close,
}

#[derive(Clone, Debug)]
struct Scanner {
    unit: Unit,
    lex: Lex,
    /// Open elements of the unit.
    depth: usize,
    /// Names of the open elements (at most `max_depth`), so a mismatched end tag is
    /// refused when it arrives instead of leaving the unit waiting for more input.
    open: Vec<Vec<u8>>,
    /// The tag name being read (start or end tag).
    name: Vec<u8>,
    /// Still inside the name of the current start tag.
    naming: bool,
}

enum Scan {
    Incomplete,
    /// The unit ends just before `end`; `self_closing` for `<x/>` headers.
    Complete {
        end: usize,
        self_closing: bool,
    },
}

impl Scanner {
    fn new(unit: Unit, lex: Lex) -> Self {
        Scanner {
            unit,
            lex,
            depth: 0,
            open: Vec::new(),
            name: Vec::new(),
            // A unit that starts inside a start tag starts with its name.
            naming: matches!(lex, Lex::StartTag { .. }),
        }
    }

    /// Advances `pos` over `buf`, for the unit starting at `mark`.
    fn scan(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
        mark: usize,
        limits: &ParserLimits,
    ) -> Result<Scan, XmlError> {
        while let Some(&b) = buf.get(*pos) {
            // The byte at `pos` would make the unit pos - mark + 1 bytes long.
            if *pos - mark >= limits.max_stanza_size {
                return Err(XmlError::TooBig);
            }
            match self.lex {
                Lex::Content => match b {
                    b'<' => self.lex = Lex::TagStart,
                    b'&' => {
                        self.lex = Lex::Ref {
                            len: 0,
                            quote: None,
                        }
                    }
                    _ => {
                        // Nothing but '<' and '&' matters here: skip to the next one.
                        let rest = buf.get(*pos..).unwrap_or_default();
                        let skip = memchr::memchr2(b'<', b'&', rest).unwrap_or(rest.len());
                        skip_to(pos, skip, mark, limits);
                        continue;
                    }
                },
                Lex::TagStart => match b {
                    b'/' => {
                        self.name.clear();
                        self.lex = Lex::EndTag
                    }
                    b'!' => self.lex = Lex::Bang,
                    b'?' => return Err(restricted("processing instruction")),
                    _ => {
                        // The byte belongs to the tag name: rescan it there.
                        self.name.clear();
                        self.naming = true;
                        self.lex = Lex::StartTag {
                            quote: None,
                            slash: false,
                        };
                        continue;
                    }
                },
                Lex::StartTag { quote: None, slash } => match b {
                    b'"' | b'\'' => {
                        self.lex = Lex::StartTag {
                            quote: Some(b),
                            slash: false,
                        }
                    }
                    b'<' => return Err(nwf("'<' inside a tag")),
                    b'>' => {
                        *pos += 1;
                        self.naming = false;
                        if self.unit == Unit::Header {
                            return Ok(Scan::Complete {
                                end: *pos,
                                self_closing: slash,
                            });
                        }
                        if self.depth >= limits.max_depth {
                            return Err(XmlError::TooDeep);
                        }
                        if slash {
                            if self.depth == 0 {
                                return Ok(Scan::Complete {
                                    end: *pos,
                                    self_closing: true,
                                });
                            }
                        } else {
                            self.depth += 1;
                            self.open.push(std::mem::take(&mut self.name));
                        }
                        self.lex = Lex::Content;
                        continue;
                    }
                    _ => {
                        if self.naming {
                            if b == b'/' || b.is_ascii_whitespace() {
                                self.naming = false;
                            } else {
                                self.name.push(b);
                            }
                        }
                        self.lex = Lex::StartTag {
                            quote: None,
                            slash: b == b'/',
                        }
                    }
                },
                Lex::StartTag { quote: Some(q), .. } => match b {
                    _ if b == q => {
                        self.lex = Lex::StartTag {
                            quote: None,
                            slash: false,
                        }
                    }
                    // XML 1.0 §3.1 [10]: '<' is not allowed in attribute values.
                    b'<' => return Err(nwf("'<' in an attribute value")),
                    b'&' => {
                        self.lex = Lex::Ref {
                            len: 0,
                            quote: Some(q),
                        }
                    }
                    _ => {
                        let rest = buf.get(*pos..).unwrap_or_default();
                        let skip = memchr::memchr3(q, b'<', b'&', rest).unwrap_or(rest.len());
                        skip_to(pos, skip, mark, limits);
                        continue;
                    }
                },
                Lex::EndTag => match b {
                    b'>' => {
                        *pos += 1;
                        if self.unit != Unit::Close {
                            // XML 1.0 §3 [GIEC]: the end tag names the open element.
                            match self.open.pop() {
                                Some(open) if open == self.name => {}
                                _ => return Err(nwf("mismatched end tag")),
                            }
                        }
                        self.depth = self.depth.saturating_sub(1);
                        if self.unit == Unit::Close || self.depth == 0 {
                            return Ok(Scan::Complete {
                                end: *pos,
                                self_closing: false,
                            });
                        }
                        self.lex = Lex::Content;
                        continue;
                    }
                    b'<' | b'"' | b'\'' => return Err(nwf("malformed end tag")),
                    _ if b.is_ascii_whitespace() => {}
                    _ => self.name.push(b),
                },
                Lex::Bang => {
                    // `<!` in content is either CDATA or something XMPP forbids
                    // (comment, DOCTYPE and other declarations, RFC 6120 §11.1).
                    const CDATA: &[u8] = b"[CDATA[";
                    if b == b'-' {
                        return Err(restricted("comment"));
                    }
                    if b.is_ascii_uppercase() {
                        return Err(restricted("markup declaration"));
                    }
                    let avail = buf.get(*pos..).unwrap_or_default();
                    let n = avail.len().min(CDATA.len());
                    if avail.get(..n) != CDATA.get(..n) {
                        return Err(nwf("malformed markup after '<!'"));
                    }
                    if n < CDATA.len() {
                        // Wait for the rest of "[CDATA[" without consuming.
                        return Ok(Scan::Incomplete);
                    }
                    *pos += CDATA.len();
                    self.lex = Lex::CData { run: 0 };
                    continue;
                }
                Lex::CData { run } => {
                    self.lex = match b {
                        b']' => Lex::CData {
                            run: (run + 1).min(2),
                        },
                        b'>' if run == 2 => Lex::Content,
                        _ => Lex::CData { run: 0 },
                    }
                }
                Lex::Ref { len, quote } => {
                    if b == b';' {
                        let name = buf.get(*pos - len..*pos).unwrap_or_default();
                        // Only ASCII was accepted into `name`.
                        let name = std::str::from_utf8(name).map_err(|_| nwf("bad reference"))?;
                        resolve_reference(name)?;
                        self.lex = match quote {
                            None => Lex::Content,
                            Some(q) => Lex::StartTag {
                                quote: Some(q),
                                slash: false,
                            },
                        };
                    } else if b.is_ascii_alphanumeric() || b == b'#' {
                        if len >= MAX_REF {
                            return Err(nwf("reference too long"));
                        }
                        self.lex = Lex::Ref {
                            len: len + 1,
                            quote,
                        };
                    } else {
                        return Err(nwf("malformed entity or character reference"));
                    }
                }
            }
            *pos += 1;
        }
        Ok(Scan::Incomplete)
    }
}

/// Moves `pos` over `skip` bytes that need no look, but not past the first byte that
/// would make the unit too big: the scan loop reports that byte as it would have.
fn skip_to(pos: &mut usize, skip: usize, mark: usize, limits: &ParserLimits) {
    let limit = mark.saturating_add(limits.max_stanza_size);
    // `skip` is at least 1: the byte at `pos` was looked at.
    *pos = pos.saturating_add(skip.max(1)).min(limit.max(*pos + 1));
}

/// Namespace declarations of the stream header, in scope for every stanza.
#[derive(Clone, Debug)]
struct HeaderCtx {
    bindings: Bindings,
    /// The header's qualified name as written, to match `</stream:stream>`.
    qname: String,
}

/// Incremental parser for one XMPP stream (one per connection; [`reset`]
/// after STARTTLS and SASL success, RFC 6120 §5.4.3.3 and §6.4.6).
///
/// [`reset`]: StreamParser::reset
pub struct StreamParser {
    limits: ParserLimits,
    buf: Vec<u8>,
    /// Bytes before `head` are consumed.
    head: usize,
    /// Scan position (everything before it has been looked at).
    pos: usize,
    /// Start of the unit being scanned.
    mark: usize,
    phase: Phase,
    scanner: Scanner,
    header: Option<HeaderCtx>,
    bom_checked: bool,
    pending_close: bool,
    /// Errors are final: the stream must be closed after a stream error
    /// (RFC 6120 §4.9.1.1), so the parser keeps reporting it.
    failed: Option<XmlError>,
}

impl StreamParser {
    pub fn new(limits: ParserLimits) -> Self {
        StreamParser {
            limits,
            buf: Vec::new(),
            head: 0,
            pos: 0,
            mark: 0,
            phase: Phase::Prolog,
            scanner: Scanner::new(Unit::Element, Lex::Content),
            header: None,
            bom_checked: false,
            pending_close: false,
            failed: None,
        }
    }

    /// Appends bytes received from the peer. Any chunking is fine.
    pub fn feed(&mut self, data: &[u8]) {
        if self.phase == Phase::Closed || self.failed.is_some() {
            // Nothing after the end of the stream (or an error) is parsed, so
            // nothing needs to be kept.
            return;
        }
        // Compact only when the consumed prefix is at least as large as the
        // rest: each byte is then moved a bounded number of times, keeping
        // feeding O(n) overall even for one-byte chunks.
        if self.head > 0 && self.head >= self.buf.len() - self.head {
            self.buf.drain(..self.head);
            self.pos -= self.head;
            self.mark = self.mark.saturating_sub(self.head);
            self.head = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Frees the input buffer when everything in it has been consumed, so a stream waiting for
    /// input holds no memory for it; the next [`Self::feed`] allocates again.
    pub fn release_buffer(&mut self) {
        if self.head == self.buf.len() && self.buf.capacity() > 0 {
            self.pos -= self.head;
            self.mark = self.mark.saturating_sub(self.head);
            self.head = 0;
            self.buf = Vec::new();
        }
    }

    /// Bytes received but not yet consumed by an event.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.head
    }

    /// Changes the limits from the next byte on, keeping everything received. A stream
    /// gets its full limits once the peer has authenticated; before, it needs only
    /// small elements (STARTTLS, SASL, dialback), and many unauthenticated streams must
    /// not be able to hold large unfinished ones.
    pub fn set_limits(&mut self, limits: ParserLimits) {
        self.limits = limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> &ParserLimits {
        &self.limits
    }

    /// Forgets everything for a stream restart: the new stream starts with a
    /// new header and its own namespace declarations (RFC 6120 §4.3.3).
    pub fn reset(&mut self) {
        *self = StreamParser::new(self.limits.clone());
    }

    /// The next event, `Ok(None)` when more data is needed (or after Close).
    pub fn next_event(&mut self) -> Result<Option<StreamEvent>, XmlError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.step() {
            Ok(ev) => Ok(ev),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                self.head = 0;
                self.pos = 0;
                self.mark = 0;
                Err(e)
            }
        }
    }

    fn consume_to(&mut self, end: usize) {
        self.head = end;
        self.pos = end;
        self.mark = end;
    }

    fn step(&mut self) -> Result<Option<StreamEvent>, XmlError> {
        if self.pending_close {
            self.pending_close = false;
            return Ok(Some(self.close()));
        }
        loop {
            match self.phase {
                Phase::Closed => return Ok(None),
                Phase::Prolog => {
                    let avail = self.buf.get(self.pos..).unwrap_or_default();
                    if !self.bom_checked {
                        // A UTF-8 byte order mark may start the document
                        // (XML 1.0 §4.3.3).
                        if avail.len() < BOM.len() && BOM.starts_with(avail) {
                            return Ok(None);
                        }
                        self.bom_checked = true;
                        if avail.starts_with(BOM) {
                            self.consume_to(self.pos + BOM.len());
                            continue;
                        }
                    }
                    // Leniency: whitespace before the declaration is tolerated.
                    if let Some(&b) = avail.first() {
                        if is_xml_space(b) {
                            self.consume_to(self.pos + 1);
                            continue;
                        }
                    }
                    const DECL: &[u8] = b"<?xml";
                    if avail.len() <= DECL.len() && DECL.starts_with(avail) {
                        return Ok(None);
                    }
                    if avail.starts_with(DECL)
                        && avail.get(DECL.len()).copied().is_some_and(is_xml_space)
                    {
                        self.mark = self.pos;
                        self.pos += DECL.len();
                        self.phase = Phase::Decl;
                    } else {
                        self.phase = Phase::HeaderSeek;
                    }
                }
                Phase::Decl => {
                    let Some(end) = self.find_decl_end()? else {
                        return Ok(None);
                    };
                    let decl = self.buf.get(self.mark..end).unwrap_or_default();
                    check_decl(decl)?;
                    self.consume_to(end);
                    self.phase = Phase::HeaderSeek;
                }
                Phase::HeaderSeek => {
                    let Some(&b) = self.buf.get(self.pos) else {
                        return Ok(None);
                    };
                    if is_xml_space(b) {
                        self.consume_to(self.pos + 1);
                        continue;
                    }
                    if b != b'<' {
                        return Err(nwf("text before the stream header"));
                    }
                    let Some(&next) = self.buf.get(self.pos + 1) else {
                        return Ok(None);
                    };
                    match next {
                        b'?' => return Err(restricted("processing instruction")),
                        b'!' => return Err(restricted("DOCTYPE, comment or declaration")),
                        b'/' => return Err(nwf("end tag before the stream header")),
                        _ => {}
                    }
                    self.mark = self.pos;
                    self.pos += 1;
                    self.scanner = Scanner::new(
                        Unit::Header,
                        Lex::StartTag {
                            quote: None,
                            slash: false,
                        },
                    );
                    self.phase = Phase::HeaderTag;
                }
                Phase::HeaderTag => {
                    let Scan::Complete { end, self_closing } =
                        self.scanner
                            .scan(&self.buf, &mut self.pos, self.mark, &self.limits)?
                    else {
                        return Ok(None);
                    };
                    let raw = self.buf.get(self.mark..end).unwrap_or_default();
                    let (header, ctx) = parse_header(raw)?;
                    self.header = Some(ctx);
                    self.consume_to(end);
                    self.phase = Phase::Body;
                    // `<stream:stream/>` opens and closes at once.
                    self.pending_close = self_closing;
                    return Ok(Some(StreamEvent::Open(header)));
                }
                Phase::Body => {
                    let Some(&b) = self.buf.get(self.pos) else {
                        return Ok(None);
                    };
                    if is_xml_space(b) {
                        // Whitespace keepalives (RFC 6120 §4.6.1) are dropped.
                        self.consume_to(self.pos + 1);
                        continue;
                    }
                    if b != b'<' {
                        return Err(nwf("character data at stream level"));
                    }
                    self.mark = self.pos;
                    self.pos += 1;
                    self.phase = Phase::TopTag;
                }
                Phase::TopTag => {
                    let Some(&b) = self.buf.get(self.pos) else {
                        return Ok(None);
                    };
                    match b {
                        b'/' => {
                            self.pos += 1;
                            self.scanner = Scanner::new(Unit::Close, Lex::EndTag);
                            self.phase = Phase::CloseTag;
                        }
                        b'?' => return Err(restricted("processing instruction")),
                        b'!' => {
                            let Some(&c) = self.buf.get(self.pos + 1) else {
                                return Ok(None);
                            };
                            if c == b'-' || c.is_ascii_uppercase() {
                                return Err(restricted("comment or markup declaration"));
                            }
                            return Err(nwf("character data at stream level"));
                        }
                        _ => {
                            self.scanner = Scanner::new(
                                Unit::Element,
                                Lex::StartTag {
                                    quote: None,
                                    slash: false,
                                },
                            );
                            self.phase = Phase::Element;
                        }
                    }
                }
                Phase::Element => {
                    let Scan::Complete { end, .. } =
                        self.scanner
                            .scan(&self.buf, &mut self.pos, self.mark, &self.limits)?
                    else {
                        return Ok(None);
                    };
                    let raw = self.buf.get(self.mark..end).unwrap_or_default();
                    let element = match &self.header {
                        Some(h) => build_element(raw, &h.bindings, self.limits.max_depth)?,
                        None => build_element(raw, &Bindings::new(), self.limits.max_depth)?,
                    };
                    self.consume_to(end);
                    self.phase = Phase::Body;
                    return Ok(Some(StreamEvent::Element(element)));
                }
                Phase::CloseTag => {
                    let Scan::Complete { end, .. } =
                        self.scanner
                            .scan(&self.buf, &mut self.pos, self.mark, &self.limits)?
                    else {
                        return Ok(None);
                    };
                    // "</" + name + optional whitespace + ">"
                    let name = self
                        .buf
                        .get(self.mark + 2..end - 1)
                        .and_then(|n| std::str::from_utf8(n).ok())
                        .map(|n| n.trim_end_matches([' ', '\t', '\r', '\n']));
                    let expected = self.header.as_ref().map(|h| h.qname.as_str());
                    if name.is_none() || name != expected {
                        return Err(nwf("end tag does not match the stream header"));
                    }
                    return Ok(Some(self.close()));
                }
            }
        }
    }

    fn close(&mut self) -> StreamEvent {
        self.phase = Phase::Closed;
        self.buf = Vec::new();
        self.head = 0;
        self.pos = 0;
        self.mark = 0;
        StreamEvent::Close
    }

    /// Finds the `?>` ending the XML declaration that starts at `mark`.
    fn find_decl_end(&mut self) -> Result<Option<usize>, XmlError> {
        while let Some(&b) = self.buf.get(self.pos) {
            if self.pos - self.mark >= MAX_DECL {
                return Err(nwf("XML declaration too long"));
            }
            if b == b'>' && self.pos > 0 && self.buf.get(self.pos - 1) == Some(&b'?') {
                return Ok(Some(self.pos + 1));
            }
            self.pos += 1;
        }
        Ok(None)
    }
}

/// Checks the XML declaration: version 1.x, and UTF-8 if an encoding is
/// named (RFC 6120 §11.6).
fn check_decl(raw: &[u8]) -> Result<(), XmlError> {
    let text = decode(raw)?;
    let mut reader = Reader::from_str(text);
    let Event::Decl(decl) = reader.read_event().map_err(|e| nwf(e.to_string()))? else {
        return Err(nwf("malformed XML declaration"));
    };
    let version = decl.version().map_err(|e| nwf(e.to_string()))?;
    if !version.starts_with(b"1.") {
        return Err(nwf("unsupported XML version"));
    }
    if let Some(encoding) = decl.encoding() {
        let encoding = encoding.map_err(|e| nwf(e.to_string()))?;
        if !encoding.eq_ignore_ascii_case(b"UTF-8") {
            return Err(XmlError::UnsupportedEncoding);
        }
    }
    Ok(())
}

/// UTF-8 decoding plus the XML `Char` check (XML 1.0 §2.2).
fn decode(raw: &[u8]) -> Result<&str, XmlError> {
    let text = std::str::from_utf8(raw).map_err(|_| nwf("invalid UTF-8"))?;
    if let Some(c) = first_illegal_char(text) {
        return Err(nwf(format!("illegal character U+{:04X}", u32::from(c))));
    }
    Ok(text)
}

/// The first character of `text` that XML 1.0 does not allow.
fn first_illegal_char(text: &str) -> Option<char> {
    let bytes = text.as_bytes();
    // Every illegal character starts with a control byte or 0xEF (U+FFFE, U+FFFF): a
    // branch-free pass over the whole text (which the compiler vectorizes) finds none in
    // nearly every stanza, and only a text that has one is searched byte by byte.
    let suspect = bytes
        .iter()
        .fold(false, |any, &b| any | is_forbidden_control(b) | (b == 0xef));
    if !suspect {
        return None;
    }
    let at = (0..bytes.len()).find(|&i| illegal_char_len(bytes, i).is_some())?;
    text.get(at..)?.chars().next()
}

fn parse_header(raw: &[u8]) -> Result<(StreamHeader, HeaderCtx), XmlError> {
    let text = decode(raw)?;
    let mut reader = Reader::from_str(text);
    let start = match reader.read_event().map_err(|e| nwf(e.to_string()))? {
        Event::Start(s) | Event::Empty(s) => s,
        _ => return Err(nwf("malformed stream header")),
    };
    let empty = Bindings::new();
    let mut scopes = Scopes::new(&empty);
    let root = scopes.open(&start)?;
    // RFC 6120 §4.8.1: the root must be <stream> in the streams namespace;
    // an unbound prefix was already reported as bad-namespace-prefix.
    if !root.is("stream", ns::STREAM) {
        return Err(XmlError::InvalidNamespace);
    }
    let qname = std::str::from_utf8(start.name().as_ref())
        .map_err(|_| nwf("invalid UTF-8"))?
        .to_owned();
    let header = StreamHeader {
        default_ns: scopes
            .lookup("")
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default(),
        to: root.attr("to").map(str::to_owned),
        from: root.attr("from").map(str::to_owned),
        id: root.attr("id").map(str::to_owned),
        version: root.attr("version").map(str::to_owned),
        lang: root.attr("xml:lang").map(str::to_owned),
    };
    Ok((
        header,
        HeaderCtx {
            bindings: scopes.into_bindings(),
            qname,
        },
    ))
}

/// Parses one complete element with namespace bindings `seed` in scope.
fn build_element(raw: &[u8], seed: &Bindings, max_depth: usize) -> Result<Element, XmlError> {
    build_from_str(decode(raw)?, seed, max_depth)
}

/// Entry point for [`Element::parse`].
pub(crate) fn parse_element(xml: &str) -> Result<Element, XmlError> {
    build_from_str(
        decode(xml.as_bytes())?,
        &Bindings::new(),
        ParserLimits::default().max_depth,
    )
}

fn build_from_str(text: &str, seed: &Bindings, max_depth: usize) -> Result<Element, XmlError> {
    let mut reader = Reader::from_str(text);
    let config = reader.config_mut();
    config.check_end_names = true;
    config.expand_empty_elements = false;
    config.trim_text(false);
    let mut scopes = Scopes::new(seed);
    // The open elements, each with where its children start in `pending`: children are
    // collected there and moved into their parent once, at its end tag, into a list of
    // exactly their number (no growth by doubling, nothing to shrink afterwards).
    let mut stack: Vec<(Element, usize)> = Vec::new();
    let mut pending: Vec<Node> = Vec::new();
    let mut root: Option<Element> = None;
    // What the tree costs so far, counted before it is built further: never more than
    // the budget, whatever the input's shape (see TREE_BYTES_PER_INPUT_BYTE).
    let budget = text
        .len()
        .saturating_mul(TREE_BYTES_PER_INPUT_BYTE)
        .max(MIN_TREE_BYTES);
    let mut cost = std::mem::size_of::<Element>();
    let mut charge = |bytes: usize| {
        cost = cost.saturating_add(bytes);
        if cost > budget {
            Err(XmlError::TooComplex)
        } else {
            Ok(())
        }
    };
    loop {
        let event = reader.read_event().map_err(|e| nwf(e.to_string()))?;
        match event {
            Event::Start(start) | Event::Empty(start) if root.is_some() => {
                let _ = start;
                return Err(nwf("more than one root element"));
            }
            Event::Start(start) => {
                if stack.len() >= max_depth {
                    return Err(XmlError::TooDeep);
                }
                let element = scopes.open(&start)?;
                charge(element.node_cost())?;
                stack.push((element, pending.len()));
            }
            Event::Empty(start) => {
                if stack.len() >= max_depth {
                    return Err(XmlError::TooDeep);
                }
                let element = scopes.open(&start)?;
                charge(element.node_cost())?;
                scopes.close();
                attach(&stack, &mut pending, &mut root, element);
            }
            Event::End(_) => {
                let (mut element, first) = stack.pop().ok_or_else(|| nwf("unexpected end tag"))?;
                scopes.close();
                element.set_children(pending.split_off(first));
                attach(&stack, &mut pending, &mut root, element);
            }
            Event::Text(t) => {
                let raw = std::str::from_utf8(&t).map_err(|_| nwf("invalid UTF-8"))?;
                let value = unescape(raw, false)?;
                match stack.last() {
                    Some(&(_, first)) => {
                        charge(Element::text_cost(value.len()))?;
                        push_text(&mut pending, first, value);
                    }
                    None if value.bytes().all(is_xml_space) => {}
                    None => return Err(nwf("text outside the element")),
                }
            }
            Event::CData(c) => {
                let raw = std::str::from_utf8(&c).map_err(|_| nwf("invalid UTF-8"))?;
                match stack.last() {
                    Some(&(_, first)) => {
                        charge(Element::text_cost(raw.len()))?;
                        push_text(&mut pending, first, normalize_eol(raw));
                    }
                    None => return Err(nwf("CDATA outside the element")),
                }
            }
            Event::Comment(_) => return Err(restricted("comment")),
            Event::PI(_) | Event::Decl(_) => return Err(restricted("processing instruction")),
            Event::DocType(_) => return Err(restricted("DOCTYPE")),
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(nwf("unclosed element"));
    }
    root.ok_or_else(|| nwf("no element"))
}

/// A finished element goes to its parent's pending children, or is the root.
fn attach(
    stack: &[(Element, usize)],
    pending: &mut Vec<Node>,
    root: &mut Option<Element>,
    element: Element,
) {
    if stack.is_empty() {
        *root = Some(element);
    } else {
        pending.push(Node::Element(element));
    }
}

/// Adds text to the open element whose children start at `first`, merged with text just
/// before it (CDATA sections and references split text), as [`Element::append_text`] does.
fn push_text(pending: &mut Vec<Node>, first: usize, text: String) {
    if text.is_empty() {
        return;
    }
    if pending.len() > first {
        if let Some(Node::Text(t)) = pending.last_mut() {
            t.push_str(&text);
            return;
        }
    }
    pending.push(Node::Text(text));
}

/// Prefix → namespace URI; the prefix "" is the default namespace. A URI is allocated
/// once per declaration and shared by every element in its scope ([`Namespace`]).
type Bindings = HashMap<String, Arc<str>>;

/// Namespace bindings in scope (XML Namespaces 1.0 §6).
///
/// Lookups are hash lookups, and the stream header's bindings are borrowed
/// rather than copied for each stanza: a peer declaring thousands of prefixes
/// must not make every later stanza expensive.
struct Scopes<'a> {
    /// Declarations of the stream header.
    seed: &'a Bindings,
    /// Declarations of the open elements, innermost last for each prefix.
    local: HashMap<String, Vec<Arc<str>>>,
    /// Prefixes declared by each open element, to undo at its end.
    marks: Vec<Vec<String>>,
}

const XMLNS_NS: &str = "http://www.w3.org/2000/xmlns/";

impl<'a> Scopes<'a> {
    fn new(seed: &'a Bindings) -> Self {
        Scopes {
            seed,
            local: HashMap::new(),
            marks: Vec::new(),
        }
    }

    fn lookup(&self, prefix: &str) -> Option<Namespace> {
        if prefix == "xml" {
            return Some(Namespace::from(ns::XML));
        }
        match self.local.get(prefix).and_then(|uris| uris.last()) {
            Some(uri) => Some(Namespace::from(uri.clone())),
            None => self
                .seed
                .get(prefix)
                .map(|uri| Namespace::from(uri.clone())),
        }
    }

    fn declare(&mut self, prefix: String, uri: String) {
        if let Some(mark) = self.marks.last_mut() {
            mark.push(prefix.clone());
        }
        self.local.entry(prefix).or_default().push(uri.into());
    }

    fn close(&mut self) {
        for prefix in self.marks.pop().unwrap_or_default() {
            if let Some(uris) = self.local.get_mut(&prefix) {
                uris.pop();
            }
        }
    }

    /// The innermost bindings, flattened (used for the stream header).
    fn into_bindings(self) -> Bindings {
        let mut out = self.seed.clone();
        for (prefix, mut uris) in self.local {
            if let Some(uri) = uris.pop() {
                out.insert(prefix, uri);
            }
        }
        out
    }

    /// Opens an element: records its declarations, resolves its name and
    /// attributes.
    fn open(&mut self, start: &BytesStart<'_>) -> Result<Element, XmlError> {
        self.marks.push(Vec::new());
        let qname =
            std::str::from_utf8(start.name().into_inner()).map_err(|_| nwf("invalid UTF-8"))?;
        let mut plain: Vec<(&str, String)> = Vec::new();
        let mut raw_keys: Vec<&str> = Vec::new();
        let mut attributes = start.attributes();
        // quick-xml's duplicate check is quadratic in the number of
        // attributes; `first_duplicate` keeps a hostile tag linear.
        attributes.with_checks(false);
        for attr in attributes {
            let attr = attr.map_err(|e| nwf(e.to_string()))?;
            let key =
                std::str::from_utf8(attr.key.into_inner()).map_err(|_| nwf("invalid UTF-8"))?;
            raw_keys.push(key);
            let raw = std::str::from_utf8(&attr.value).map_err(|_| nwf("invalid UTF-8"))?;
            let value = unescape(raw, true)?;
            if key == "xmlns" {
                if value == ns::XML || value == XMLNS_NS {
                    return Err(nwf("reserved namespace as default namespace"));
                }
                self.declare(String::new(), value);
            } else if let Some(prefix) = key.strip_prefix("xmlns:") {
                check_ncname(prefix)?;
                // XML Namespaces 1.0 §3: `xml` is bound to its namespace
                // forever, `xmlns` is never declared, prefixes cannot be
                // undeclared.
                let ok = match prefix {
                    "xmlns" => false,
                    "xml" => value == ns::XML,
                    _ => !value.is_empty() && value != ns::XML && value != XMLNS_NS,
                };
                if !ok {
                    return Err(nwf(format!("illegal declaration of prefix '{prefix}'")));
                }
                self.declare(prefix.to_owned(), value);
            } else {
                plain.push((key, value));
            }
        }
        if let Some(key) = first_duplicate(&raw_keys) {
            return Err(nwf(format!("duplicate attribute '{key}'")));
        }
        let (prefix, local) = split_qname(qname)?;
        let uri = match prefix {
            None => self.lookup("").unwrap_or_else(|| Namespace::from("")),
            // The reserved prefixes never qualify elements (XML Namespaces
            // 1.0 §3); an element in the xml namespace could not be written
            // back with a default namespace declaration either.
            Some(p @ ("xmlns" | "xml")) => {
                return Err(nwf(format!("element with the reserved prefix '{p}'")))
            }
            Some(p) => self
                .lookup(p)
                .ok_or_else(|| XmlError::BadNamespacePrefix(p.to_owned()))?,
        };
        let mut element = Element::new(local, uri);
        let mut attrs = Vec::with_capacity(plain.len());
        for (key, value) in plain {
            let name = match split_qname(key)? {
                (None, local) => local.to_owned(),
                (Some("xml"), local) => format!("xml:{local}"),
                (Some(p), local) => {
                    let uri = self
                        .lookup(p)
                        .ok_or_else(|| XmlError::BadNamespacePrefix(p.to_owned()))?;
                    format!("{{{}}}{local}", uri.as_str())
                }
            };
            attrs.push((name, value));
        }
        // Two prefixes bound to one namespace can still collide
        // (XML Namespaces 1.0 §6.3).
        let names: Vec<&str> = attrs.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(name) = first_duplicate(&names) {
            return Err(nwf(format!("duplicate attribute '{name}'")));
        }
        element.set_attrs_unchecked(attrs);
        Ok(element)
    }
}

/// A name that occurs more than once in `names`: compared pairwise when there are few
/// (the usual case, no allocation), through a hash set when there are many.
fn first_duplicate<'n>(names: &[&'n str]) -> Option<&'n str> {
    if names.len() <= 16 {
        names
            .iter()
            .enumerate()
            .find(|&(i, n)| names.get(..i).is_some_and(|before| before.contains(n)))
            .map(|(_, n)| *n)
    } else {
        let mut seen = HashSet::with_capacity(names.len());
        names.iter().find(|n| !seen.insert(**n)).copied()
    }
}

/// Splits `prefix:local`, checking both are NCNames.
fn split_qname(qname: &str) -> Result<(Option<&str>, &str), XmlError> {
    // ':' is ASCII: found as a byte, it is on a character boundary.
    let split = qname
        .bytes()
        .position(|b| b == b':')
        .and_then(|i| Some((qname.get(..i)?, qname.get(i + 1..)?)));
    match split {
        Some((prefix, local)) => {
            check_ncname(prefix)?;
            check_ncname(local)?;
            Ok((Some(prefix), local))
        }
        None => {
            check_ncname(qname)?;
            Ok((None, qname))
        }
    }
}

/// XML 1.0 §2.3 [4] NameStartChar, without ':' (XML Namespaces NCName).
fn is_name_start(c: char) -> bool {
    matches!(c,
        'A'..='Z' | '_' | 'a'..='z'
        | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}' | '\u{F8}'..='\u{2FF}'
        | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}' | '\u{200C}'..='\u{200D}'
        | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}' | '\u{3001}'..='\u{D7FF}'
        | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}' | '\u{10000}'..='\u{EFFFF}')
}

/// XML 1.0 §2.3 [4a] NameChar, without ':'.
fn is_name_char(c: char) -> bool {
    is_name_start(c)
        || matches!(c,
            '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
}

fn check_ncname(name: &str) -> Result<(), XmlError> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(is_name_start) && chars.all(is_name_char);
    if valid {
        Ok(())
    } else {
        Err(nwf(format!("invalid name '{name}'")))
    }
}

/// Resolves the reference `&name;`. Only the predefined entities and
/// character references to legal characters exist in XMPP (RFC 6120 §11.1
/// forbids DTDs, so nothing else can be declared).
fn resolve_reference(name: &str) -> Result<char, XmlError> {
    let code = if let Some(hex) = name.strip_prefix("#x") {
        parse_code(hex, 16)?
    } else if let Some(dec) = name.strip_prefix('#') {
        parse_code(dec, 10)?
    } else {
        return match name {
            "amp" => Ok('&'),
            "lt" => Ok('<'),
            "gt" => Ok('>'),
            "quot" => Ok('"'),
            "apos" => Ok('\''),
            _ if check_ncname(name).is_ok() => {
                Err(restricted(format!("undefined entity reference &{name};")))
            }
            _ => Err(nwf("malformed entity reference")),
        };
    };
    char::from_u32(code)
        .filter(|c| is_xml_char(*c))
        .ok_or_else(|| {
            nwf(format!(
                "character reference to illegal character {code:#X}"
            ))
        })
}

fn parse_code(digits: &str, radix: u32) -> Result<u32, XmlError> {
    // from_str_radix accepts a leading '+', XML does not.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(nwf("malformed character reference"));
    }
    u32::from_str_radix(digits, radix).map_err(|_| nwf("character reference out of range"))
}

/// End-of-line handling (XML 1.0 §2.11): CRLF and lone CR become LF.
fn normalize_eol(raw: &str) -> String {
    if !raw.contains('\r') {
        return raw.to_owned();
    }
    raw.replace("\r\n", "\n").replace('\r', "\n")
}

/// Expands references, with end-of-line handling and, for attribute values,
/// attribute-value normalization of literal whitespace (XML 1.0 §3.3.3; the
/// serializer writes tabs and newlines as references so they survive).
fn unescape(raw: &str, attr: bool) -> Result<String, XmlError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    loop {
        // Every special character is ASCII, so a byte search finds it on a character
        // boundary without decoding the text.
        let found = if attr {
            rest.bytes()
                .position(|b| matches!(b, b'&' | b'\r' | b'<' | b'\t' | b'\n'))
        } else {
            memchr::memchr3(b'&', b'\r', b'<', rest.as_bytes())
        };
        let Some(i) = found else {
            out.push_str(rest);
            return Ok(out);
        };
        out.push_str(rest.get(..i).unwrap_or_default());
        let tail = rest.get(i..).unwrap_or_default();
        if tail.starts_with('&') {
            let end = tail
                .find(';')
                .ok_or_else(|| nwf("unterminated reference"))?;
            out.push(resolve_reference(tail.get(1..end).unwrap_or_default())?);
            rest = tail.get(end + 1..).unwrap_or_default();
        } else if tail.starts_with('<') {
            return Err(nwf("'<' in an attribute value"));
        } else if let Some(after) = tail.strip_prefix("\r\n") {
            out.push(if attr { ' ' } else { '\n' });
            rest = after;
        } else if let Some(after) = tail.strip_prefix('\r') {
            out.push(if attr { ' ' } else { '\n' });
            rest = after;
        } else {
            out.push(' ');
            rest = tail.get(1..).unwrap_or_default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C2S: &str = "<?xml version='1.0'?>\
        <stream:stream to='example.com' xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' version='1.0' xml:lang='en' id='s1'>\
        <stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>\
        </stream:features>\n \
        <message to='juliet@example.com' type='chat' id='m1'><body>Hi &amp; &#x263A; &lt;3</body>\
        <x:data xmlns:x='urn:x' x:attr='v' plain='p'><x:inner/><own xmlns='urn:own'/></x:data></message>\
        \r\n\t <iq type='get' id='i1'><ping xmlns='urn:xmpp:ping'/></iq>\
        <presence><status><![CDATA[<not markup> & ]]]]></status></presence>\
        </stream:stream>";

    fn parse_all(chunks: &[&[u8]]) -> Result<Vec<StreamEvent>, XmlError> {
        let mut p = StreamParser::new(ParserLimits::default());
        let mut events = Vec::new();
        for chunk in chunks {
            p.feed(chunk);
            while let Some(ev) = p.next_event()? {
                events.push(ev);
            }
        }
        Ok(events)
    }

    fn parse_one(input: &str) -> Result<Vec<StreamEvent>, XmlError> {
        parse_all(&[input.as_bytes()])
    }

    fn bytewise(input: &[u8]) -> Result<Vec<StreamEvent>, XmlError> {
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        parse_all(&chunks)
    }

    const HEAD: &str = "<stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

    /// One stanza after HEAD: the element, or the error.
    fn one_stanza(stanza: &str) -> Result<Element, XmlError> {
        let mut p = StreamParser::new(ParserLimits {
            max_stanza_size: 4 * 1024 * 1024,
            max_depth: 64,
        });
        p.feed(HEAD.as_bytes());
        p.feed(stanza.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Open(_)))));
        match p.next_event()? {
            Some(StreamEvent::Element(e)) => Ok(e),
            other => panic!("expected an element, got {other:?}"),
        }
    }

    fn ratio(e: &Element, input: &str) -> f64 {
        e.footprint() as f64 / input.len() as f64
    }

    /// The shapes of a memory amplification attack (a long namespace on an element with
    /// thousands of children, prefixed attributes naming a long namespace): either
    /// refused, or a tree within the bound — never a copy of the URI per element.
    #[test]
    fn a_long_namespace_is_not_copied_into_every_element() {
        let long = "urn:".to_string() + &"x".repeat(16 * 1024);
        let bound = |input: &str| (input.len() * TREE_BYTES_PER_INPUT_BYTE).max(MIN_TREE_BYTES);
        let attacks = [
            // Empty children, the densest shape: ~25 bytes of tree per byte.
            format!(
                "<message xmlns='{long}'>{}</message>",
                "<a/>".repeat(12_000)
            ),
            // Children with a little text: shared namespace, within the bound.
            format!(
                "<message xmlns='{long}'>{}</message>",
                "<a>hello</a>".repeat(4_000)
            ),
            // Every child redeclaring the namespace costs what it sends.
            format!(
                "<message>{}</message>",
                format!("<a xmlns='{long}'/>").repeat(8)
            ),
            // Prefixed attributes each naming the long namespace: refused.
            format!(
                "<message xmlns:p='{long}'>{}</message>",
                (0..2_000)
                    .map(|i| format!("<a p:x{i}='1'/>"))
                    .collect::<String>()
            ),
            format!(
                "<message xmlns:p='{long}'><a {}/></message>",
                (0..2_000)
                    .map(|i| format!("p:x{i}='1' "))
                    .collect::<String>()
            ),
        ];
        eprintln!(
            "Element {} bytes, Node {} bytes",
            std::mem::size_of::<Element>(),
            std::mem::size_of::<crate::Node>()
        );
        for input in &attacks {
            match one_stanza(input) {
                Ok(e) => assert!(
                    e.footprint() <= bound(input),
                    "{} bytes of tree for {} bytes",
                    e.footprint(),
                    input.len()
                ),
                Err(err) => assert_eq!(err, XmlError::TooComplex),
            }
        }
        assert!(ratio(&one_stanza(&attacks[0]).unwrap(), &attacks[0]) < 28.0);
        assert!(ratio(&one_stanza(&attacks[1]).unwrap(), &attacks[1]) < 20.0);
        assert_eq!(one_stanza(&attacks[3]).unwrap_err(), XmlError::TooComplex);
        // The children share the one URI.
        let e = one_stanza(&attacks[1]).unwrap();
        assert!(e.children().all(|c| c.ns() == long));
        // Element::parse (stored stanzas) shares and bounds the same way.
        assert_eq!(
            Element::parse(&attacks[3]).unwrap_err(),
            XmlError::TooComplex
        );
        let e = Element::parse(&attacks[0]).unwrap();
        assert!(e.footprint() <= bound(&attacks[0]));
    }

    /// What real stanzas cost: well inside the bound, so none of them is refused.
    #[test]
    fn ordinary_stanzas_are_far_from_the_tree_bound() {
        let roster = format!(
            "<iq type='result' id='r1'><query xmlns='jabber:iq:roster' ver='v1'>{}</query></iq>",
            (0..500)
                .map(|i| format!(
                    "<item jid='contact{i}@example.org' name='Contact {i}' subscription='both'>\
                     <group>Friends</group></item>"
                ))
                .collect::<String>()
        );
        let disco = format!(
            "<iq type='result' id='d1'><query xmlns='http://jabber.org/protocol/disco#items'>{}</query></iq>",
            (0..2_000)
                .map(|i| format!("<item jid='room{i}@conference.example.org' name='Room {i}'/>"))
                .collect::<String>()
        );
        let chat = "<message to='juliet@example.com' type='chat' id='m1'>\
            <body>Wherefore art thou, Romeo?</body><active xmlns='http://jabber.org/protocol/chatstates'/>\
            <request xmlns='urn:xmpp:receipts'/><origin-id xmlns='urn:xmpp:sid:0' id='abc'/></message>"
            .to_string();
        let vcard = format!(
            "<iq type='set' id='v1'><vCard xmlns='vcard-temp'><FN>Juliet</FN><PHOTO><TYPE>image/png</TYPE>\
             <BINVAL>{}</BINVAL></PHOTO></vCard></iq>",
            "QUJD".repeat(20_000)
        );
        for (what, input, most) in [
            ("roster", &roster, 12.0),
            ("disco items", &disco, 12.0),
            ("chat message", &chat, 12.0),
            ("vCard with a photo", &vcard, 1.5),
        ] {
            let e = one_stanza(input).unwrap_or_else(|err| panic!("{what}: {err}"));
            let r = ratio(&e, input);
            eprintln!("{what}: {r:.1} bytes of tree per byte");
            assert!(r < most, "{what}: {r:.1} bytes of tree per byte");
        }
    }

    /// The error raised by `body` after a valid header.
    fn err_after_header(body: &str) -> XmlError {
        match parse_one(&format!("{HEAD}{body}")) {
            Err(e) => e,
            Ok(evs) => panic!("expected an error for {body:?}, got {evs:?}"),
        }
    }

    fn check_c2s(events: &[StreamEvent]) {
        assert_eq!(events.len(), 6, "{events:?}");
        let StreamEvent::Open(h) = &events[0] else {
            panic!("no header")
        };
        assert_eq!(
            h,
            &StreamHeader {
                default_ns: ns::CLIENT.into(),
                to: Some("example.com".into()),
                from: None,
                id: Some("s1".into()),
                version: Some("1.0".into()),
                lang: Some("en".into()),
            }
        );
        let StreamEvent::Element(features) = &events[1] else {
            panic!()
        };
        assert!(features.is("features", ns::STREAM));
        let tls = features.get_child("starttls", ns::TLS).expect("starttls");
        assert!(tls.has_child("required", ns::TLS));
        let StreamEvent::Element(msg) = &events[2] else {
            panic!()
        };
        assert!(msg.is("message", ns::CLIENT));
        assert_eq!(msg.attr("to"), Some("juliet@example.com"));
        let body = msg.get_child("body", ns::CLIENT).expect("body");
        assert_eq!(body.text(), "Hi & \u{263A} <3");
        let data = msg.get_child("data", "urn:x").expect("prefixed child");
        assert_eq!(data.attr("{urn:x}attr"), Some("v"));
        assert_eq!(data.attr("plain"), Some("p"));
        assert!(data.has_child("inner", "urn:x"));
        assert!(data.has_child("own", "urn:own"));
        let StreamEvent::Element(iq) = &events[3] else {
            panic!()
        };
        assert!(iq.is("iq", ns::CLIENT));
        assert!(iq.has_child("ping", ns::PING));
        let StreamEvent::Element(pres) = &events[4] else {
            panic!()
        };
        assert_eq!(
            pres.get_child("status", ns::CLIENT).map(Element::text),
            Some("<not markup> & ]]".to_string())
        );
        assert_eq!(events[5], StreamEvent::Close);
    }

    #[test]
    fn full_stream_in_one_chunk() {
        check_c2s(&parse_one(C2S).expect("parse"));
    }

    #[test]
    fn full_stream_byte_by_byte() {
        check_c2s(&bytewise(C2S.as_bytes()).expect("parse"));
    }

    #[test]
    fn utf8_split_across_chunks() {
        let input = format!("{HEAD}<message><body>é☃𝄞</body></message>");
        let evs = bytewise(input.as_bytes()).expect("parse");
        let StreamEvent::Element(m) = &evs[1] else {
            panic!()
        };
        assert_eq!(
            m.get_child("body", ns::CLIENT).map(Element::text),
            Some("é☃𝄞".into())
        );
    }

    #[test]
    fn reserialized_stanzas_reparse_equal() {
        let evs = parse_one(C2S).expect("parse");
        for ev in &evs {
            if let StreamEvent::Element(e) = ev {
                let xml = e.to_xml(ns::CLIENT);
                let again = parse_one(&format!("{HEAD}{xml}")).expect("reparse");
                assert_eq!(again.get(1), Some(ev), "{xml}");
            }
        }
    }

    #[test]
    fn header_variants() {
        // No declaration, other prefix, server namespace, double quotes.
        let evs = parse_one(
            "<s:stream xmlns=\"jabber:server\" xmlns:s=\"http://etherx.jabber.org/streams\" \
             from=\"a.example\" to=\"b.example\" version=\"1.0\"><s:features/></s:stream>",
        )
        .expect("parse");
        let StreamEvent::Open(h) = &evs[0] else {
            panic!()
        };
        assert_eq!(h.default_ns, ns::SERVER);
        assert_eq!(h.from.as_deref(), Some("a.example"));
        let StreamEvent::Element(f) = &evs[1] else {
            panic!()
        };
        assert!(f.is("features", ns::STREAM));
        assert_eq!(evs[2], StreamEvent::Close);

        // Unprefixed stream element in the streams namespace, no default ns
        // for stanzas: they end up in the streams namespace too.
        let evs = parse_one("<stream xmlns='http://etherx.jabber.org/streams'><a/></stream>")
            .expect("parse");
        let StreamEvent::Open(h) = &evs[0] else {
            panic!()
        };
        assert_eq!(h.default_ns, ns::STREAM);

        // Declaration with encoding, BOM, whitespace; self-closing header.
        let evs = parse_all(&[
            b"\xEF\xBB\xBF<?xml version=\"1.0\" encoding=\"utf-8\"?>\n",
            b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>",
        ])
        .expect("parse");
        assert_eq!(evs.len(), 2);
        assert_eq!(
            evs[0],
            StreamEvent::Open(StreamHeader {
                default_ns: String::new(),
                ..StreamHeader::default()
            })
        );
        assert_eq!(evs[1], StreamEvent::Close);
    }

    #[test]
    fn header_errors() {
        assert_eq!(
            parse_one("<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong'>"),
            Err(XmlError::InvalidNamespace)
        );
        assert_eq!(
            parse_one("<stream xmlns='jabber:client'>"),
            Err(XmlError::InvalidNamespace)
        );
        assert_eq!(
            parse_one("<stream:stream xmlns='jabber:client'>"),
            Err(XmlError::BadNamespacePrefix("stream".into()))
        );
        assert_eq!(
            parse_one("<?xml version='1.0' encoding='ISO-8859-1'?><stream/>"),
            Err(XmlError::UnsupportedEncoding)
        );
        assert_eq!(
            XmlError::UnsupportedEncoding.condition(),
            StreamErrorCondition::UnsupportedEncoding
        );
        assert!(matches!(
            parse_one("hello"),
            Err(XmlError::NotWellFormed(_))
        ));
        assert!(matches!(
            parse_one("<?xml-stylesheet href='x'?><stream/>"),
            Err(XmlError::RestrictedXml(_))
        ));
    }

    #[test]
    fn keepalives_and_close() {
        let mut p = StreamParser::new(ParserLimits::default());
        p.feed(HEAD.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Open(_)))));
        for _ in 0..1000 {
            p.feed(b" \n");
            assert_eq!(p.next_event(), Ok(None));
        }
        assert_eq!(p.buffered(), 0);
        p.feed(b"</stream:stream  >");
        assert_eq!(p.next_event(), Ok(Some(StreamEvent::Close)));
        p.feed(b"<message/>");
        assert_eq!(p.next_event(), Ok(None));
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn released_buffer_keeps_a_partial_stanza_and_frees_a_consumed_one() {
        let mut p = StreamParser::new(ParserLimits::default());
        p.feed(HEAD.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Open(_)))));
        for round in 0..3 {
            // Half a stanza: nothing to release.
            p.feed(b"<message id='a'><body>hel");
            assert_eq!(p.next_event(), Ok(None));
            p.release_buffer();
            assert!(p.buffered() > 0);
            p.feed(b"lo</body></message><iq");
            let Ok(Some(StreamEvent::Element(e))) = p.next_event() else {
                panic!("no message in round {round}");
            };
            assert_eq!(
                e.get_child("body", e.ns()).map(|b| b.text()).as_deref(),
                Some("hello")
            );
            p.feed(b" type='get' id='p'/>");
            assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Element(_)))));
            assert_eq!(p.next_event(), Ok(None));
            // All consumed: the buffer goes.
            p.release_buffer();
            assert_eq!(p.buffered(), 0);
            assert_eq!(p.buf.capacity(), 0);
        }
        p.feed(b"</stream:stream>");
        assert_eq!(p.next_event(), Ok(Some(StreamEvent::Close)));
    }

    #[test]
    fn close_must_match_header() {
        assert!(matches!(
            err_after_header("</stream>"),
            XmlError::NotWellFormed(_)
        ));
    }

    #[test]
    fn top_level_text_is_rejected() {
        assert!(matches!(
            err_after_header("hello"),
            XmlError::NotWellFormed(_)
        ));
        assert!(matches!(
            err_after_header("<![CDATA[x]]>"),
            XmlError::NotWellFormed(_)
        ));
    }

    #[test]
    fn restricted_constructs() {
        let cases = [
            "<!DOCTYPE foo>",
            "<!ENTITY x 'y'>",
            "<!-- hi -->",
            "<?pi x?>",
            "<message><!-- hi --></message>",
            "<message><?pi?></message>",
            "<message><!DOCTYPE x></message>",
            "<message><body>&xxe;</body></message>",
            "<message to='&xxe;'/>",
        ];
        for case in cases {
            assert!(
                matches!(err_after_header(case), XmlError::RestrictedXml(_)),
                "{case}"
            );
        }
        // Before the header too.
        let doctype = "<?xml version='1.0'?><!DOCTYPE stream [<!ENTITY a 'b'>]><stream/>";
        assert!(matches!(
            parse_one(doctype),
            Err(XmlError::RestrictedXml(_))
        ));
        assert!(matches!(
            Element::parse("<a><!--x--></a>"),
            Err(XmlError::RestrictedXml(_))
        ));
        assert!(matches!(
            Element::parse("<a>&foo;</a>"),
            Err(XmlError::RestrictedXml(_))
        ));
        assert!(matches!(
            Element::parse("<!DOCTYPE a><a/>"),
            Err(XmlError::RestrictedXml(_))
        ));
    }

    #[test]
    fn illegal_characters() {
        for case in [
            "<message><body>\u{0}</body></message>",
            "<message><body>\u{1B}</body></message>",
            "<message><body>&#0;</body></message>",
            "<message><body>&#x0;</body></message>",
            "<message><body>&#xFFFE;</body></message>",
            "<message><body>&#x110000;</body></message>",
            "<message><body>&#99999999999999;</body></message>",
            "<message><body>&#xD800;</body></message>",
            "<message to='&#x1;'/>",
            "<message to='\u{C}'/>",
            "<message><body>a\u{FFFE}</body></message>",
            "<message to='\u{FFFF}'/>",
            "<message><body>\u{7F}\u{FFFD}\u{10FFFF}\u{0}</body></message>",
            "<message><body>&#X41;</body></message>",
            "<message><body>&#;</body></message>",
            "<message><body>& amp;</body></message>",
        ] {
            assert!(
                matches!(err_after_header(case), XmlError::NotWellFormed(_)),
                "{case}"
            );
        }
        // Raw invalid UTF-8, and a UTF-16 encoded stream.
        let mut bad = HEAD.as_bytes().to_vec();
        bad.extend_from_slice(b"<message><body>\xC3\x28</body></message>");
        assert!(matches!(bytewise(&bad), Err(XmlError::NotWellFormed(_))));
        assert!(matches!(
            parse_all(&[b"\xFF\xFE<\x00s\x00"]),
            Err(XmlError::NotWellFormed(_))
        ));
        // Characters next to the illegal ones are legal.
        assert!(parse_one(&format!(
            "{HEAD}<message a='\u{7F}\u{9F}\u{FFFD}\u{FFFC}\u{EFFF}'><body>\u{FFFD}\u{F8FF}\u{10000}\u{10FFFF}\t\n</body></message>"
        ))
        .is_ok());
        // Legal references still work.
        let evs = parse_one(&format!(
            "{HEAD}<message><body>&#65;&#x42;&#x0043;&#9;&quot;&apos;</body></message>"
        ))
        .expect("parse");
        let StreamEvent::Element(m) = &evs[1] else {
            panic!()
        };
        assert_eq!(
            m.get_child("body", ns::CLIENT).map(Element::text),
            Some("ABC\t\"'".into())
        );
    }

    #[test]
    fn malformed_xml() {
        for case in [
            "<message></presence>",
            "<message><body></message></body>",
            "<message to='a' to='b'/>",
            "<message x:to='a' xmlns:x='urn:a' y:to='b' xmlns:y='urn:a'/>",
            "<message to='a<b'/>",
            "<message to=a/>",
            "<1message/>",
            "<message><a:b:c xmlns:a='urn:a'/></message>",
            "<message xmlns:p=''/>",
            "<message xmlns:xmlns='urn:a'/>",
            "<message xmlns:xml='urn:a'/>",
            "<message><xml:body/></message>",
            "<message><</message>",
            "</message>",
            // The mismatch is refused when it arrives, not once the depth is back to 0.
            "<message><body>x</message>",
            "<message><body>x</bodyx>",
        ] {
            assert!(
                matches!(err_after_header(case), XmlError::NotWellFormed(_)),
                "{case}"
            );
        }
        // Duplicates among many attributes (checked through a hash set), and among few.
        let many: String = (0..20).map(|i| format!(" a{i}='v'")).collect();
        for case in [
            format!("<message{many} a7='again'/>"),
            format!("<message{many} x:a='1' xmlns:x='urn:a' y:a='2' xmlns:y='urn:a'/>"),
            "<message xmlns='urn:a' xmlns='urn:b'/>".to_string(),
            "<message xmlns:x='urn:a' xmlns:x='urn:b'/>".to_string(),
        ] {
            assert!(
                matches!(err_after_header(&case), XmlError::NotWellFormed(_)),
                "{case}"
            );
        }
        // Many distinct attributes are fine.
        let evs = parse_one(&format!("{HEAD}<message{many}/>")).expect("parse");
        let StreamEvent::Element(m) = &evs[1] else {
            panic!()
        };
        assert_eq!(m.attr("a19"), Some("v"));
        assert_eq!(
            err_after_header("<message><p:x/></message>"),
            XmlError::BadNamespacePrefix("p".into())
        );
        assert_eq!(
            err_after_header("<message p:a='1'/>"),
            XmlError::BadNamespacePrefix("p".into())
        );
    }

    #[test]
    fn stanza_size_limit() {
        let limits = ParserLimits {
            max_stanza_size: 1024,
            max_depth: 8,
        };
        let mut p = StreamParser::new(limits.clone());
        p.feed(HEAD.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Open(_)))));
        let ok = format!("<message><body>{}</body></message>", "a".repeat(900));
        p.feed(ok.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Element(_)))));
        let big = format!("<message><body>{}</body></message>", "a".repeat(1024));
        p.feed(big.as_bytes());
        assert_eq!(p.next_event(), Err(XmlError::TooBig));
        // Errors are sticky and the buffer is released.
        assert_eq!(p.next_event(), Err(XmlError::TooBig));
        assert_eq!(p.buffered(), 0);
        assert_eq!(
            XmlError::TooBig.condition(),
            StreamErrorCondition::PolicyViolation
        );
    }

    #[test]
    fn limits_raised_mid_stream_apply_to_the_element_in_progress() {
        let small = ParserLimits {
            max_stanza_size: 1024,
            max_depth: 8,
        };
        let mut p = StreamParser::new(small.clone());
        p.feed(HEAD.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Open(_)))));
        // Half of an element larger than the small limit, then the limit is raised (the
        // peer authenticated): the element completes, the header's namespaces still hold.
        let big = format!("<message><body>{}</body></message>", "a".repeat(2000));
        p.feed(&big.as_bytes()[..900]);
        assert_eq!(p.next_event(), Ok(None));
        p.set_limits(ParserLimits {
            max_stanza_size: 4096,
            ..small.clone()
        });
        p.feed(&big.as_bytes()[900..]);
        match p.next_event() {
            Ok(Some(StreamEvent::Element(e))) => assert_eq!(e.ns(), "jabber:client"),
            other => panic!("{other:?}"),
        }
        // A reset keeps the limits in force.
        p.reset();
        assert_eq!(p.limits().max_stanza_size, 4096);
    }

    #[test]
    fn stanza_size_limit_is_exact_in_text_and_attributes() {
        let limits = ParserLimits {
            max_stanza_size: 200,
            max_depth: 8,
        };
        let run = |stanza: &str, chunk: usize| {
            let mut p = StreamParser::new(limits.clone());
            p.feed(HEAD.as_bytes());
            assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Open(_)))));
            let mut last = Ok(None);
            for c in stanza.as_bytes().chunks(chunk) {
                p.feed(c);
                last = p.next_event();
                if !matches!(last, Ok(None)) {
                    break;
                }
            }
            last
        };
        for (open, close) in [
            ("<message><body>", "</body></message>"),
            ("<message to='", "'/>"),
        ] {
            let fill =
                |n: usize| format!("{open}{}{close}", "x".repeat(n - open.len() - close.len()));
            for chunk in [1, 7, 64, 1000] {
                let at_limit = run(&fill(200), chunk);
                assert!(
                    matches!(at_limit, Ok(Some(StreamEvent::Element(_)))),
                    "{open} {chunk}: {at_limit:?}"
                );
                assert_eq!(
                    run(&fill(201), chunk),
                    Err(XmlError::TooBig),
                    "{open} {chunk}"
                );
            }
        }
    }

    #[test]
    fn endless_element_keeps_memory_bounded() {
        let limits = ParserLimits {
            max_stanza_size: 4096,
            max_depth: 8,
        };
        for (start, filler) in [
            ("<message><body>", "x"),
            ("<message to='", "x"),
            ("<message><![CDATA[", "x"),
            ("<message><body>&", "a"),
            ("", " "),
        ] {
            let mut p = StreamParser::new(limits.clone());
            p.feed(HEAD.as_bytes());
            assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Open(_)))));
            p.feed(start.as_bytes());
            let chunk = filler.repeat(100);
            let mut failed = false;
            for _ in 0..1000 {
                p.feed(chunk.as_bytes());
                assert!(p.buffered() <= limits.max_stanza_size + chunk.len());
                match p.next_event() {
                    Ok(None) => {}
                    Ok(Some(ev)) => panic!("unexpected {ev:?}"),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            // Endless whitespace is legal and consumed; everything else fails.
            assert_eq!(failed, filler != " ", "{start:?}");
            assert!(p.buffered() <= limits.max_stanza_size + chunk.len());
        }
        // An endless header.
        let mut p = StreamParser::new(limits.clone());
        p.feed(b"<stream:stream xmlns='jabber:client' to='");
        let mut result = Ok(None);
        for _ in 0..1000 {
            p.feed(&[b'a'; 100]);
            result = p.next_event();
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(XmlError::TooBig));
    }

    #[test]
    fn depth_limit() {
        let limits = ParserLimits {
            max_stanza_size: 65536,
            max_depth: 4,
        };
        let ok = format!("{HEAD}<a><b><c><d/></c></b></a>");
        let mut p = StreamParser::new(limits.clone());
        p.feed(ok.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Open(_)))));
        assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Element(_)))));
        for deep in [
            format!("{HEAD}<a><b><c><d><e/></d></c></b></a>"),
            format!("{HEAD}{}", "<a>".repeat(10_000)),
        ] {
            let mut p = StreamParser::new(limits.clone());
            p.feed(deep.as_bytes());
            assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Open(_)))));
            assert_eq!(p.next_event(), Err(XmlError::TooDeep));
        }
        let nested = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        assert_eq!(Element::parse(&nested), Err(XmlError::TooDeep));
    }

    #[test]
    fn reset_starts_a_new_stream() {
        let mut p = StreamParser::new(ParserLimits::default());
        p.feed(HEAD.as_bytes());
        p.feed(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><garbage");
        assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Open(_)))));
        let Ok(Some(StreamEvent::Element(e))) = p.next_event() else {
            panic!()
        };
        assert!(e.is("proceed", ns::TLS));
        p.reset();
        assert_eq!(p.buffered(), 0);
        // The new stream may use other declarations; the old ones are gone.
        p.feed(
            b"<?xml version='1.0'?><s:stream xmlns:s='http://etherx.jabber.org/streams' \
              xmlns='jabber:server'><message/>",
        );
        let Ok(Some(StreamEvent::Open(h))) = p.next_event() else {
            panic!()
        };
        assert_eq!(h.default_ns, ns::SERVER);
        let Ok(Some(StreamEvent::Element(m))) = p.next_event() else {
            panic!()
        };
        assert!(m.is("message", ns::SERVER));
        p.feed(b"<stream:features/>");
        assert_eq!(
            p.next_event(),
            Err(XmlError::BadNamespacePrefix("stream".into()))
        );
        // Reset also clears a failure.
        p.reset();
        p.feed(HEAD.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(StreamEvent::Open(_)))));
    }

    #[test]
    fn garbage() {
        for input in [
            &b"\x00\x01\x02"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>>>",
            b"<<<<",
            b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' a b c>",
        ] {
            let r = parse_all(&[input]);
            assert!(r.is_err(), "{:?}: {r:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn whitespace_in_text_and_attributes() {
        let evs = parse_one(&format!(
            "{HEAD}<message a='x\ty\r\nz'><body>l1\r\nl2\rl3</body></message>"
        ))
        .expect("parse");
        let StreamEvent::Element(m) = &evs[1] else {
            panic!()
        };
        assert_eq!(m.attr("a"), Some("x y z"));
        assert_eq!(
            m.get_child("body", ns::CLIENT).map(Element::text),
            Some("l1\nl2\nl3".into())
        );
    }

    #[test]
    fn header_prefixes_are_inherited() {
        let evs = parse_one(
            "<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' \
             xmlns:stream='http://etherx.jabber.org/streams'>\
             <db:result from='a.example' to='b.example' xml:lang='de'>key</db:result>\
             <message xmlns='jabber:client' xmlns:stream='urn:shadow'><stream:x/></message>\
             <stream:features/>",
        )
        .expect("parse");
        let StreamEvent::Element(r) = &evs[1] else {
            panic!()
        };
        assert!(r.is("result", ns::DIALBACK));
        assert_eq!(r.attr("xml:lang"), Some("de"));
        assert_eq!(r.text(), "key");
        // A stanza may shadow the header's prefixes, only for its own subtree.
        let StreamEvent::Element(m) = &evs[2] else {
            panic!()
        };
        assert!(m.is("message", ns::CLIENT));
        assert!(m.has_child("x", "urn:shadow"));
        let StreamEvent::Element(f) = &evs[3] else {
            panic!()
        };
        assert!(f.is("features", ns::STREAM));
    }

    #[test]
    fn chunking_does_not_change_the_result() {
        // Deterministic pseudo-random chunk sizes (xorshift).
        let mut state: u32 = 0x9E37_79B9;
        for _ in 0..50 {
            let mut chunks = Vec::new();
            let mut rest = C2S.as_bytes();
            while !rest.is_empty() {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let n = (state % 17 + 1) as usize;
                let (a, b) = rest.split_at(n.min(rest.len()));
                chunks.push(a);
                rest = b;
            }
            check_c2s(&parse_all(&chunks).expect("parse"));
        }
    }

    #[test]
    fn errors_are_the_same_bytewise() {
        for case in [
            "<!-- x -->",
            "<message><!DOCTYPE x></message>",
            "<message>&xxe;</message>",
            "<message>&#0;</message>",
            "<message>\u{1}</message>",
            "<message></presence>",
            "<message to='a<'/>",
            "<message><p:x/></message>",
            "<message><![CDATA[x]]><!-x></message>",
            "hello",
            "</stream>",
        ] {
            let input = format!("{HEAD}{case}");
            let whole = parse_one(&input).map_err(|e| e.condition());
            let bytes = bytewise(input.as_bytes()).map_err(|e| e.condition());
            assert!(whole.is_err(), "{case}");
            assert_eq!(whole, bytes, "{case}");
        }
    }

    #[test]
    fn large_stanza_byte_by_byte_is_linear() {
        let body = "x".repeat(200_000);
        let input = format!("{HEAD}<message><body>{body}</body></message>");
        let start = std::time::Instant::now();
        let evs = bytewise(input.as_bytes()).expect("parse");
        assert_eq!(evs.len(), 2);
        // Quadratic rescanning would take minutes here, even in release mode.
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
    }

    #[test]
    fn adversarial_content_survives_the_stream() {
        let nasty = "</body></message><message to='evil'>&amp;]]>\"'\t\r\n";
        let msg = Element::new("message", ns::CLIENT)
            .with_attr("id", nasty)
            .with_child(Element::new("body", ns::CLIENT).with_text(nasty));
        let input = format!("{HEAD}{}", msg.to_xml(ns::CLIENT));
        let evs = bytewise(input.as_bytes()).expect("parse");
        assert_eq!(evs, vec![evs[0].clone(), StreamEvent::Element(msg)]);
    }

    /// Mutated streams in random chunks: any result is fine, a panic is not,
    /// and the one-chunk and chunked parses must agree.
    #[test]
    fn mutations_never_panic() {
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        const INTERESTING: &[u8] = b"<>/!?&;#x'\"=:[]- \0\xC3\xFF";
        let limits = ParserLimits {
            max_stanza_size: 512,
            max_depth: 5,
        };
        for _ in 0..3000 {
            let mut input = C2S.as_bytes().to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % input.len() as u64) as usize;
                let byte = INTERESTING[(next() % INTERESTING.len() as u64) as usize];
                match next() % 3 {
                    0 => input[at] = byte,
                    1 => input.insert(at, byte),
                    _ => {
                        input.remove(at);
                    }
                }
            }
            let run = |chunk: usize| {
                let mut p = StreamParser::new(limits.clone());
                let mut events = Vec::new();
                for c in input.chunks(chunk) {
                    p.feed(c);
                    loop {
                        match p.next_event() {
                            Ok(Some(ev)) => events.push(ev),
                            Ok(None) => break,
                            Err(e) => return Err(e.condition()),
                        }
                    }
                }
                Ok(events)
            };
            let whole = run(input.len());
            let split = run((next() % 7 + 1) as usize);
            assert_eq!(whole, split, "{:?}", String::from_utf8_lossy(&input));
            // Whatever was accepted re-serializes to XML that parses back equal.
            for ev in whole.unwrap_or_default() {
                if let StreamEvent::Element(e) = ev {
                    assert_eq!(Element::parse(&e.to_string()), Ok(e));
                }
            }
        }
    }

    #[test]
    fn element_parse_rejects_trailing_content() {
        assert!(Element::parse("  <a/>\n").is_ok());
        assert!(Element::parse("<a/><b/>").is_err());
        assert!(Element::parse("<a/>text").is_err());
        assert!(Element::parse("<a>").is_err());
        assert!(Element::parse("").is_err());
    }

    #[test]
    fn names_follow_the_ncname_rules_in_and_beyond_ascii() {
        for ok in [
            "a",
            "_x",
            "message",
            "x-y.z_1",
            "A9",
            "\u{e9}l\u{e9}ment",
            "a\u{b7}b",
            "\u{4e2d}",
        ] {
            assert!(check_ncname(ok).is_ok(), "{ok:?} is a name");
        }
        for bad in [
            "", "1a", "-a", ".a", "a:b", "a b", "a\u{d7}", "a/", "\u{b7}a",
        ] {
            assert!(check_ncname(bad).is_err(), "{bad:?} is not a name");
        }
        assert!(matches!(split_qname("p:local"), Ok((Some("p"), "local"))));
        assert!(matches!(split_qname("local"), Ok((None, "local"))));
        for bad in [":a", "a:", "a:b:c", "1:a"] {
            assert!(split_qname(bad).is_err(), "{bad:?} is not a qualified name");
        }
    }

    #[test]
    fn illegal_characters_are_found_past_legal_lookalikes() {
        // U+FF01 and U+FFFD start with 0xEF like the illegal U+FFFE and U+FFFF.
        assert_eq!(first_illegal_char("tab\tnl\ncr\r \u{ff01}\u{fffd}"), None);
        assert_eq!(first_illegal_char("\u{ff01}x\u{fffe}"), Some('\u{fffe}'));
        assert_eq!(first_illegal_char("ok \u{ffff}"), Some('\u{ffff}'));
        assert_eq!(first_illegal_char("a\u{1}b"), Some('\u{1}'));
        assert_eq!(
            first_illegal_char(&format!("{}\u{1f}", "x".repeat(100))),
            Some('\u{1f}')
        );
        assert_eq!(first_illegal_char(""), None);
    }

    #[test]
    fn unescaping_finds_specials_among_multibyte_text() {
        assert_eq!(
            unescape("\u{e9}&amp;\u{263a}", false).ok().as_deref(),
            Some("\u{e9}&\u{263a}")
        );
        assert_eq!(
            unescape("\u{e9}\r\n\u{e9}\r", false).ok().as_deref(),
            Some("\u{e9}\n\u{e9}\n")
        );
        assert_eq!(
            unescape("a\tb\nc\r\nd", true).ok().as_deref(),
            Some("a b c d")
        );
        assert_eq!(unescape("a\tb", false).ok().as_deref(), Some("a\tb"));
        assert!(unescape("\u{e9}<", true).is_err());
        assert!(unescape("\u{e9}&amp", false).is_err());
    }
}
