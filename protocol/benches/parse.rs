//! The stream parser and the serializer on their own: chat messages as a client sends them,
//! parsed into elements and written back, on one thread without the network around them.
//!
//!     cargo bench -p confab-protocol --bench parse
//!     cargo bench -p confab-protocol --bench parse -- --messages 500000 --per-read 1
//!
//! Options: `--help`.

use std::time::Instant;

use clap::Parser;
use confab_protocol::{ns, ParserLimits, StreamEvent, StreamParser};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
struct Args {
    /// Messages to parse.
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Messages handed to the parser at once.
    #[arg(long, default_value_t = 50)]
    per_read: usize,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let Args {
        messages, per_read, ..
    } = Args::parse();
    let per_read = per_read.max(1);
    let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";
    let chunks: Vec<Vec<u8>> = (0..messages.div_ceil(per_read))
        .map(|c| {
            let mut chunk = String::new();
            for k in c * per_read..((c + 1) * per_read).min(messages) {
                chunk.push_str(&format!(
                    "<message to='off{}@localhost' type='chat' id='o{k}'><body>offline message {k}</body></message>",
                    k % 2000
                ));
            }
            chunk.into_bytes()
        })
        .collect();
    let mut parser = StreamParser::new(ParserLimits::default());
    parser.feed(header.as_bytes());
    match parser.next_event() {
        Ok(Some(StreamEvent::Open(_))) => {}
        other => panic!("no stream header: {other:?}"),
    }
    let started = Instant::now();
    let (mut parsed, mut bytes) = (0usize, 0usize);
    let mut out = Vec::new();
    for chunk in &chunks {
        parser.feed(chunk);
        loop {
            match parser.next_event() {
                Ok(Some(StreamEvent::Element(e))) => {
                    out.clear();
                    e.write_to(&mut out, ns::CLIENT);
                    bytes += out.len();
                    parsed += 1;
                }
                Ok(None) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(parsed, messages, "every message parsed");
    println!(
        "{parsed} messages parsed and serialized ({bytes} bytes out), {per_read} per read: {secs:.2} s, {:.0} msgs/s, {:.2} us each",
        parsed as f64 / secs,
        secs * 1e6 / parsed as f64
    );
}
