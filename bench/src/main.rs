//! `confab-bench`: a load generator for XMPP servers (confab, Prosody, any RFC 6120 server
//! with SCRAM-SHA-1), on loopback only. Each scenario prints a human summary and one
//! `RESULT key=value ...` line that `bench/run` collects into its table.

mod scenarios;
mod scram;
mod stats;
mod xmpp;

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "confab-bench",
    about = "Load generator for XMPP servers (loopback only)"
)]
struct Cli {
    #[command(flatten)]
    target: TargetArgs,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
pub struct TargetArgs {
    /// Server address (must be a loopback address).
    #[arg(long, default_value = "127.0.0.1", global = true)]
    host: String,
    /// Client port.
    #[arg(long, default_value_t = 5222, global = true)]
    port: u16,
    /// The XMPP domain the accounts live on.
    #[arg(long, default_value = "localhost", global = true)]
    domain: String,
    /// Account names: `{}` is replaced by the account's number.
    #[arg(long, default_value = "bench{}", global = true)]
    accounts: String,
    /// The password of every account.
    #[arg(long, default_value = "bench", global = true)]
    password: String,
    /// Negotiate TLS with STARTTLS before logging in.
    #[arg(long, global = true)]
    starttls: bool,
    /// The server's process id: its CPU time and resident memory are reported.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Worker threads of the generator (pin the generator to one core and keep 1).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1, .2, ...).
    #[arg(long, default_value_t = 32, global = true)]
    sources: usize,
}

impl TargetArgs {
    fn addr(&self) -> Result<SocketAddr> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .context("the host has no address")
    }

    pub fn account(&self, n: usize) -> String {
        self.accounts.replace("{}", &n.to_string())
    }
}

#[derive(Subcommand)]
enum Scenario {
    /// K sessions log in, send initial presence and stay idle; memory per session.
    Idle(scenarios::IdleArgs),
    /// Logins (connect, STARTTLS or not, SCRAM, bind, presence, close) at a fixed concurrency.
    Login(scenarios::LoginArgs),
    /// P pairs of online users send 1:1 messages; delivered msgs/s and latency.
    Chat(scenarios::ChatArgs),
    /// Messages to offline users, acknowledged by a later reply on the same stream.
    Offline(scenarios::OfflineArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = if cli.target.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.target.threads)
            .enable_all()
            .build()?
    };
    stats::raise_fd_limit();
    runtime.block_on(async move {
        let target = xmpp::Target::new(
            cli.target.addr()?,
            cli.target.domain.clone(),
            cli.target.starttls,
            cli.target.password.clone(),
            cli.target.sources,
        )?;
        let t = &cli.target;
        match cli.scenario {
            Scenario::Idle(a) => scenarios::idle(t, target, a).await,
            Scenario::Login(a) => scenarios::login(t, target, a).await,
            Scenario::Chat(a) => scenarios::chat(t, target, a).await,
            Scenario::Offline(a) => scenarios::offline(t, target, a).await,
        }
    })
}
