//! Stanza → element → bytes → element round trip.
//!
//! The input is parsed as an XMPP stream (seeds start with a stream header).
//! Every element the parser yields is serialized the two ways the server does
//! it — standalone (`to_xml("")`, as stored) and inside a stream with the
//! stream's default namespace (`write_to`, as forwarded) — and parsed back.
//! Asserts: the re-parsed element equals the original, and serializing it
//! again gives identical bytes (serialization is a fixed point).
#![no_main]

use confab_protocol::{Element, ParserLimits, StreamEvent, StreamParser};
use libfuzzer_sys::fuzz_target;

const STREAMS_NS: &str = "http://etherx.jabber.org/streams";

fn reparse_in_stream(element: &Element, default_ns: &str) -> Vec<u8> {
    // Whitespace other than a space would be normalized to a space in an attribute
    // value (XML 1.0 §3.3.3): written as references, like the serializer does.
    let declared = default_ns
        .replace('\t', "&#9;")
        .replace('\n', "&#10;")
        .replace('\r', "&#13;");
    let mut bytes =
        format!("<stream:stream xmlns='{declared}' xmlns:stream='{STREAMS_NS}' version='1.0'>")
            .into_bytes();
    let start = bytes.len();
    element.write_to(&mut bytes, default_ns);
    let written = bytes[start..].to_vec();
    let mut parser = StreamParser::new(ParserLimits {
        max_stanza_size: usize::MAX,
        ..ParserLimits::default()
    });
    parser.feed(&bytes);
    assert!(matches!(
        parser.next_event(),
        Ok(Some(StreamEvent::Open(_)))
    ));
    let again = match parser.next_event() {
        Ok(Some(StreamEvent::Element(e))) => e,
        other => panic!(
            "serialized stanza does not parse back: {other:?}\n{}",
            String::from_utf8_lossy(&written)
        ),
    };
    assert_eq!(&again, element, "{}", String::from_utf8_lossy(&written));
    let mut rewritten = Vec::new();
    again.write_to(&mut rewritten, default_ns);
    assert_eq!(rewritten, written, "serialization is not a fixed point");
    written
}

fn check(element: &Element, default_ns: &str) {
    let standalone = element.to_xml("");
    let again = Element::parse(&standalone)
        .unwrap_or_else(|e| panic!("{standalone:?} does not parse back: {e}"));
    assert_eq!(&again, element, "{standalone}");
    assert_eq!(
        again.to_xml(""),
        standalone,
        "serialization is not a fixed point"
    );

    // Only namespaces a header can declare as the default (the parser refuses
    // the reserved ones there as everywhere).
    if !default_ns.contains(['\'', '&', '<']) {
        reparse_in_stream(element, default_ns);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut parser = StreamParser::new(ParserLimits::default());
    parser.feed(data);
    let mut default_ns = String::new();
    loop {
        match parser.next_event() {
            Ok(Some(StreamEvent::Open(header))) => default_ns = header.default_ns,
            Ok(Some(StreamEvent::Element(element))) => check(&element, &default_ns),
            Ok(Some(StreamEvent::Close)) | Ok(None) | Err(_) => break,
        }
    }
});
