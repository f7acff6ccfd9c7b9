//! The byte and XML level of a server-to-server stream, shared by both directions.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use confab_protocol::limits::BudgetShare;
use confab_protocol::{
    ns, Element, ParserLimits, StreamError, StreamErrorCondition, StreamEvent, StreamParser,
};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::LinkError;

pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest read from a connection. The buffer is on the stack of the task reading, only while
/// data is there to read: an idle link holds no read buffer.
const READ_BUFFER: usize = 16 * 1024;

/// A link's transport, before or after TLS, in either role.
pub(crate) enum Conn {
    Plain(TcpStream),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Gone,
}

impl Conn {
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Conn::Server(_) | Conn::Client(_))
    }

    /// The certificate chain the peer presented, leaf first.
    pub(crate) fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        let certs = match self {
            Conn::Server(s) => s.get_ref().1.peer_certificates(),
            Conn::Client(s) => s.get_ref().1.peer_certificates(),
            _ => None,
        };
        certs
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default()
    }

    pub(crate) fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Conn::Gone) {
            Conn::Plain(tcp) => Some(tcp),
            other => {
                *self = other;
                None
            }
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection is being upgraded")
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// An XML stream over a [`Conn`]: reading events, writing elements in `jabber:server`.
pub(crate) struct XmlStream {
    pub(crate) conn: Conn,
    parser: StreamParser,
    out: Vec<u8>,
    /// An incoming stream's part of the budget every unauthenticated stream shares
    /// (`limits.pre_auth_buffer_total`), until the peer authenticates a domain: while the
    /// stream waits for more input, it holds the bytes of its unfinished element.
    pre_auth: Option<BudgetShare>,
}

impl XmlStream {
    pub(crate) fn new(conn: Conn, limits: ParserLimits) -> XmlStream {
        XmlStream {
            conn,
            parser: StreamParser::new(limits),
            out: Vec::new(),
            pre_auth: None,
        }
    }

    /// An incoming stream before authentication: what it holds of unfinished elements
    /// counts against `share`'s budget.
    pub(crate) fn with_budget(mut self, share: BudgetShare) -> XmlStream {
        self.pre_auth = Some(share);
        self
    }

    /// The peer has authenticated a domain: the stream gets its full limits and no longer
    /// counts against the unauthenticated streams' budget.
    pub(crate) fn authenticated(&mut self, limits: ParserLimits) {
        self.pre_auth = None;
        self.parser.set_limits(limits);
    }

    /// Before reading more into an unauthenticated stream: frees the parser's empty buffer
    /// and holds the budget for what is left of an unfinished element; the stream is
    /// closed when the budget has no room for it.
    fn hold_unfinished(&mut self) -> Result<(), LinkError> {
        let Some(share) = self.pre_auth.as_mut() else {
            return Ok(());
        };
        self.parser.release_buffer();
        if share.hold(self.parser.buffered()) {
            return Ok(());
        }
        tracing::warn!(
            held = self.parser.buffered(),
            "unauthenticated streams hold their whole budget of unfinished input; closing one"
        );
        Err(LinkError::Stream(
            StreamError::new(StreamErrorCondition::ResourceConstraint)
                .with_text("too much unfinished input before authentication; try again later"),
        ))
    }

    /// Forgets parser state for a stream restart (after TLS or SASL).
    pub(crate) fn restart(&mut self) {
        self.parser.reset();
    }

    /// The next event, reading as needed.
    pub(crate) async fn next_event(&mut self) -> Result<StreamEvent, LinkError> {
        loop {
            match self.parser.next_event() {
                Ok(Some(ev)) => return Ok(ev),
                Ok(None) => {}
                Err(e) => {
                    return Err(LinkError::Stream(
                        StreamError::new(e.condition()).with_text(e.to_string()),
                    ))
                }
            }
            self.hold_unfinished()?;
            self.read_more().await?;
        }
    }

    /// The next parsed event if one is already buffered.
    pub(crate) fn buffered_event(&mut self) -> Result<Option<StreamEvent>, LinkError> {
        self.parser.next_event().map_err(|e| {
            LinkError::Stream(StreamError::new(e.condition()).with_text(e.to_string()))
        })
    }

    /// Reads once from the socket into the parser; cancel-safe.
    pub(crate) async fn read_more(&mut self) -> Result<(), LinkError> {
        let (conn, parser) = (&mut self.conn, &mut self.parser);
        // Bytes are taken from the connection only in the poll that hands them to the
        // parser, so cancelling the read loses nothing.
        let n = std::future::poll_fn(|cx| {
            let mut space = [MaybeUninit::<u8>::uninit(); READ_BUFFER];
            let mut rb = ReadBuf::uninit(&mut space);
            Pin::new(&mut *conn).poll_read(cx, &mut rb).map_ok(|()| {
                parser.feed(rb.filled());
                rb.filled().len()
            })
        })
        .await
        .map_err(|e| LinkError::Io(e.to_string()))?;
        if n == 0 {
            return Err(LinkError::Closed);
        }
        Ok(())
    }

    /// The next top-level element (a stream header or close is an error here).
    pub(crate) async fn next_element(&mut self) -> Result<Element, LinkError> {
        match self.next_event().await? {
            StreamEvent::Element(e) => Ok(e),
            StreamEvent::Close => Err(LinkError::Closed),
            StreamEvent::Open(_) => Err(LinkError::Protocol("unexpected stream header".into())),
        }
    }

    pub(crate) async fn write_raw(&mut self, data: &[u8]) -> Result<(), LinkError> {
        let conn = &mut self.conn;
        let write = async {
            conn.write_all(data).await?;
            conn.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(LinkError::Io(e.to_string())),
            Err(_) => Err(LinkError::Io("write timed out".into())),
        }
    }

    /// Writes an element whose namespace is `jabber:server` or a protocol namespace.
    pub(crate) async fn write_element(&mut self, e: &Element) -> Result<(), LinkError> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        e.write_to(&mut out, ns::SERVER);
        let r = self.write_raw(&out).await;
        // The buffer is reused by `queue_stanza`, which appends: leaving this element in it
        // sent it a second time with the first batch of stanzas (a second SASL `<auth/>`
        // after authentication, which Prosody answers with `unsupported-stanza-type`,
        // RFC 6120 §4.9.3.22, closing the link).
        out.clear();
        self.out = out;
        r
    }

    /// Appends a stanza (kept in `jabber:client` inside the server) to the write buffer
    /// in `jabber:server`; [`XmlStream::flush_batch`] writes the batch.
    pub(crate) fn queue_stanza(&mut self, stanza: &Element) {
        let mut copy = stanza.clone();
        copy.map_ns(ns::CLIENT, ns::SERVER);
        copy.write_to(&mut self.out, ns::SERVER);
    }

    pub(crate) async fn flush_batch(&mut self) -> Result<(), LinkError> {
        let out = std::mem::take(&mut self.out);
        let r = self.write_raw(&out).await;
        self.out = out;
        self.out.clear();
        r
    }

    /// `<stream:NAME>children</stream:NAME>` with the stream prefix.
    pub(crate) async fn write_stream_child(
        &mut self,
        name: &str,
        children: &[Element],
    ) -> Result<(), LinkError> {
        let mut out = Vec::new();
        out.extend_from_slice(format!("<stream:{name}>").as_bytes());
        for c in children {
            c.write_to(&mut out, ns::STREAM);
        }
        out.extend_from_slice(format!("</stream:{name}>").as_bytes());
        self.write_raw(&out).await
    }

    /// Opens our side of a stream (RFC 6120 §4.7, with the dialback namespace declared
    /// so peers know we speak XEP-0220).
    pub(crate) async fn write_header(
        &mut self,
        from: &str,
        to: Option<&str>,
        id: Option<&str>,
    ) -> Result<(), LinkError> {
        let mut h = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' xmlns:db='{}' from='{}' version='1.0'",
            ns::SERVER,
            ns::STREAM,
            ns::DIALBACK,
            escape(from)
        );
        if let Some(to) = to {
            h.push_str(&format!(" to='{}'", escape(to)));
        }
        if let Some(id) = id {
            h.push_str(&format!(" id='{}'", escape(id)));
        }
        h.push('>');
        self.write_raw(h.as_bytes()).await
    }

    /// Sends a stream error and closes (best effort, bounded in time).
    pub(crate) async fn close_with(&mut self, error: Option<&StreamError>) {
        let mut data = Vec::new();
        if let Some(err) = error {
            data.extend_from_slice(b"<stream:error>");
            for c in err.to_element().children() {
                c.write_to(&mut data, ns::STREAM);
            }
            data.extend_from_slice(b"</stream:error>");
        }
        data.extend_from_slice(b"</stream:stream>");
        let conn = &mut self.conn;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            conn.write_all(&data).await?;
            conn.flush().await?;
            conn.shutdown().await
        })
        .await;
    }
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// A random stream id.
pub(crate) fn new_id() -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().gen();
    format!("{n:032x}")
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub(crate) async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|down| *down).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// An element written with `write_element` (e.g. SASL `<auth/>`) must not go out
    /// again with the next batch of stanzas (found against Prosody, which closes the
    /// link on a second `<auth/>`).
    #[tokio::test]
    async fn a_written_element_is_not_repeated_in_the_next_batch() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tcp, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let limits = ParserLimits {
            max_stanza_size: 4096,
            max_depth: 16,
        };
        let mut s = XmlStream::new(Conn::Plain(tcp.unwrap()), limits);
        s.write_element(&Element::new("auth", ns::SASL))
            .await
            .unwrap();
        s.queue_stanza(&Element::new("message", ns::CLIENT));
        s.flush_batch().await.unwrap();
        s.close_with(None).await;
        let mut received = String::new();
        accepted
            .unwrap()
            .0
            .read_to_string(&mut received)
            .await
            .unwrap();
        assert_eq!(received.matches("<auth").count(), 1, "{received}");
        assert_eq!(received.matches("<message").count(), 1, "{received}");
    }
}
