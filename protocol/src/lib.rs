//! XMPP protocol building blocks shared by the confab server and federation:
//! an incremental XML stream parser, an owned element tree, stanza and stream
//! errors, SASL message handling, JIDs, and the accounting of what one peer may take
//! that both listeners share (`limits`). Nothing here does I/O.

pub mod element;
pub mod error;
pub mod limits;
pub mod ns;
pub mod parser;
pub mod prep;
pub mod sasl;

pub use element::{Element, Namespace, Node};
pub use error::{ErrorType, StanzaError, StanzaErrorCondition, StreamError, StreamErrorCondition};
pub use parser::{ParserLimits, StreamEvent, StreamHeader, StreamParser, XmlError};
pub use prep::prepare_jid;

/// JIDs are prepared (RFC 7622 / stringprep profiles) by the `jid` crate of xmpp-rs.
pub use jid;
