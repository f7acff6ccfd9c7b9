//! confab, a federated XMPP server: the library behind the `confab` binary.

pub mod accounts;
pub mod admin;
pub mod backup;
pub mod c2s;
pub mod certs;
pub mod cli;
pub mod config;
pub mod durability;
pub mod jid;
pub mod metrics;
pub mod modules;
pub mod ops;
pub mod pacing;
pub mod ratelimit;
pub mod router;
pub mod routing;
pub mod selfcheck;
pub mod server;
pub mod stanza;
pub mod tls;

pub use config::Config;
pub use server::{RunningServer, Server};
