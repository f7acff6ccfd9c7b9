//! The XMPP stream parser fed arbitrary bytes in arbitrary chunkings.
//!
//! Input layout: byte 0 picks the limits, byte 1 how many chunk sizes follow
//! (1..=8), then the chunk sizes, then the stream bytes. Asserts:
//! - no panic, whatever the bytes and chunking;
//! - chunking does not matter: the events and the final error are the same as
//!   when the whole input is fed at once (the scanner keeps its state between
//!   calls, `protocol/src/parser.rs`);
//! - an error is final: the parser keeps reporting it;
//! - the parser never holds more than one unit's worth of unconsumed bytes
//!   (the size limit is enforced while an element is still incomplete);
//! - no element tree takes more memory than `TREE_BYTES_PER_INPUT_BYTE` bytes per
//!   byte of input (an element's own bytes are at most the whole input's).
#![no_main]

use confab_protocol::parser::{MIN_TREE_BYTES, TREE_BYTES_PER_INPUT_BYTE};
use confab_protocol::{ParserLimits, StreamEvent, StreamParser, XmlError};
use libfuzzer_sys::fuzz_target;

/// Longest XML declaration plus the few bytes the parser may hold back while
/// deciding what a `<!`, `<?xml` or BOM prefix is.
const SLACK: usize = 256 + 16;

fn limits(selector: u8) -> ParserLimits {
    // Small limits make TooBig and TooDeep reachable by short inputs.
    let sizes = [64, 256, 1024, 4096, 65_536, 262_144, 17, 1];
    let depths = [1, 2, 3, 8, 64, 64, 16, 4];
    ParserLimits {
        max_stanza_size: sizes[usize::from(selector & 7)],
        max_depth: depths[usize::from((selector >> 3) & 7)],
    }
}

/// Pulls events until more input is needed or the parser fails.
fn drain(parser: &mut StreamParser, out: &mut Vec<StreamEvent>) -> Option<XmlError> {
    loop {
        match parser.next_event() {
            Ok(Some(ev)) => out.push(ev),
            Ok(None) => return None,
            Err(e) => {
                // Errors are final (RFC 6120 §4.9.1.1).
                assert_eq!(parser.next_event(), Err(e.clone()));
                return Some(e);
            }
        }
    }
}

fn run(
    limits: &ParserLimits,
    chunks: &mut dyn Iterator<Item = &[u8]>,
) -> (Vec<StreamEvent>, Option<XmlError>) {
    let mut parser = StreamParser::new(limits.clone());
    let mut events = Vec::new();
    for chunk in chunks {
        parser.feed(chunk);
        if let Some(e) = drain(&mut parser, &mut events) {
            // Input after an error is ignored.
            parser.feed(chunk);
            assert_eq!(parser.next_event(), Err(e.clone()));
            return (events, Some(e));
        }
        assert!(
            parser.buffered() <= limits.max_stanza_size + SLACK,
            "{} bytes buffered with a limit of {}",
            parser.buffered(),
            limits.max_stanza_size
        );
    }
    (events, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Some((&count, rest)) = rest.split_first() else {
        return;
    };
    let count = usize::from(count % 8) + 1;
    if rest.len() < count {
        return;
    }
    let (sizes, input) = rest.split_at(count);
    // 0 stands for a large chunk; otherwise 1..=255 bytes.
    let sizes: Vec<usize> = sizes
        .iter()
        .map(|&b| if b == 0 { 4096 } else { usize::from(b) })
        .collect();
    let limits = limits(selector);

    let mut remaining = input;
    let mut i = 0;
    let mut chunked = std::iter::from_fn(|| {
        if remaining.is_empty() {
            return None;
        }
        let n = sizes[i % sizes.len()].min(remaining.len());
        i += 1;
        let (chunk, tail) = remaining.split_at(n);
        remaining = tail;
        Some(chunk)
    });
    let by_chunks = run(&limits, &mut chunked);
    let whole = run(&limits, &mut std::iter::once(input));
    assert_eq!(by_chunks, whole, "chunking changed the result");
    let bound = (input.len() * TREE_BYTES_PER_INPUT_BYTE).max(MIN_TREE_BYTES);
    for ev in &whole.0 {
        if let StreamEvent::Element(e) = ev {
            assert!(
                e.footprint() <= bound,
                "a tree of {} bytes from {} bytes of input",
                e.footprint(),
                input.len()
            );
        }
    }
});
