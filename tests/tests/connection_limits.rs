//! Connections per address and what streams not yet authenticated may hold, against the
//! real `confab` binary (a process of its own, so that its resident memory is its own).
//! Loopback is a whole /8 on Linux, so one test is many peers: 127.0.0.1, 127.0.0.2 and so
//! on are each an address of their own to the server. Run with `--nocapture` for the
//! figures.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use confab_protocol::sasl::ScramHash;
use confab_protocol::{ns, ParserLimits, StreamEvent, StreamParser};
use confab_tests::bin::*;
use confab_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;

const KIB: usize = 1024;
const MIB: u64 = 1024 * 1024;

/// 127.0.0.`n` (and on into 127.0.1.x for n over 255).
fn local(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000 + n))
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / MIB as f64)
}

/// Fails early, with the reason, when this process may not open `needed` descriptors.
fn ensure_descriptors(needed: u64) -> Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    ensure!(
        soft >= needed,
        "this test opens about {needed} connections; the open-file limit is {soft} (ulimit -n)"
    );
    Ok(())
}

/// A `confab serve` process with its own data directory, test CA and these keys.
struct Limited {
    served: Served,
    pid: u32,
    pki: Arc<TestPki>,
    s2s: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Limited {
    /// Creates `users`, then starts `confab serve` on loopback with these `[limits]` and
    /// `[s2s]` keys.
    async fn start(limits: &str, s2s: &str, users: &[(&str, &str)]) -> Result<Limited> {
        let dir = tempfile::tempdir()?;
        let p = dir.path();
        let pki = Arc::new(TestPki::create(p, &[DOMAIN])?);
        let config = p.join("confab.toml");
        write_loopback_config_for(
            &config,
            &p.join("data"),
            p,
            DOMAIN,
            "",
            s2s,
            &format!("\n[limits]\n{limits}\n"),
        )?;
        if !users.is_empty() {
            let accounts: String = users
                .iter()
                .map(|(user, pw)| format!("{user}@{DOMAIN} {pw}\n"))
                .collect();
            let out = run_cli(&config, &["user", "import"], &accounts).await?;
            ensure!(out.status.success(), "user import: {}", text(&out.stderr));
        }
        let served = spawn_serve(&config).await?;
        let pid = served.child.id().context("the server has no pid")?;
        let s2s = s2s_addr(&served.log)?;
        Ok(Limited {
            served,
            pid,
            pki,
            s2s,
            _dir: dir,
        })
    }

    fn c2s(&self) -> SocketAddr {
        self.served.addr
    }

    /// What is resident now; the peak is reset to it.
    fn baseline(&self) -> Result<u64> {
        reset_peak_rss(self.pid)?;
        Ok(rss_of(self.pid)?.now)
    }

    /// How far the peak rose above `baseline`.
    fn peak_growth(&self, baseline: u64) -> Result<u64> {
        Ok(rss_of(self.pid)?.peak.saturating_sub(baseline))
    }

    /// Logs in from `source` over STARTTLS with SCRAM-SHA-256 and binds `resource`.
    async fn login_from(
        &self,
        source: IpAddr,
        user: &str,
        password: &str,
        resource: &str,
    ) -> Result<Client> {
        let mut c = Client::connect_from(source, self.c2s()).await?;
        c.starttls(&self.pki).await?;
        c.authenticate(ScramHash::Sha256, false, user, password)
            .await?;
        c.bind(Some(resource)).await?;
        Ok(c)
    }

    /// Kills the server and returns its log from after the start.
    async fn stop(mut self) -> Result<Vec<String>> {
        self.served.child.kill().await?;
        Ok(tokio::time::timeout(TIMEOUT, self.served.drain).await??)
    }
}

/// The address of the first s2s listener in the server's log.
fn s2s_addr(log: &[String]) -> Result<SocketAddr> {
    let line = log
        .iter()
        .find(|l| l.contains("listening for servers"))
        .context("no s2s listener in the log")?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .context("no addr=")?
        .parse()
        .map_err(Into::into)
}

/// A logged-in client that pings every 100 ms until stopped and keeps the slowest answer.
struct Probe {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(u32, Duration)>>,
}

impl Probe {
    fn start(mut c: Client) -> Probe {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let (mut pings, mut slowest) = (0u32, Duration::ZERO);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            // At most a minute's worth; every test ends well before.
            for _ in 0..600 {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    _ = tick.tick() => {}
                }
                let t = Instant::now();
                c.ping().await.context("the probe's ping")?;
                slowest = slowest.max(t.elapsed());
                pings += 1;
            }
            let t = Instant::now();
            c.ping().await.context("the probe's last ping")?;
            Ok((pings + 1, slowest.max(t.elapsed())))
        });
        Probe { stop, task }
    }

    /// Stops; fails unless the client stayed connected and every ping was answered
    /// within `within`.
    async fn finish(self, within: Duration) -> Result<Duration> {
        self.stop.send_replace(true);
        let (pings, slowest) = tokio::time::timeout(TIMEOUT, self.task).await???;
        ensure!(pings >= 2, "the probe hardly pinged");
        ensure!(
            slowest < within,
            "another client waited {slowest:?} for an answer"
        );
        Ok(slowest)
    }
}

fn header(stream_ns: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='{stream_ns}' xmlns:stream='{}' \
         to='{DOMAIN}' version='1.0'>",
        ns::STREAM
    )
}

/// The start of a message of `len` bytes that never ends.
fn unfinished_message(len: usize) -> String {
    let head = format!("<message to='nobody@{DOMAIN}'><body>");
    format!("{head}{}", "x".repeat(len.saturating_sub(head.len())))
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    /// With a stream error of this condition.
    Error(String),
    /// Closed (or reset) without one.
    Eof,
}

/// A connection that opened a stream (its header sent, the server's header and features
/// read) and then does only what the test says.
struct Raw {
    tcp: TcpStream,
    parser: StreamParser,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects from `source` and opens a stream in `stream_ns`; `None` when the server
    /// closes the connection without a byte (refused at accept).
    async fn open(source: IpAddr, addr: SocketAddr, stream_ns: &str) -> Result<Option<Raw>> {
        let mut tcp = connect_from(source, addr).await?;
        // A refused connection may be closed before the header is written.
        let _ = tcp.write_all(header(stream_ns).as_bytes()).await;
        let mut raw = Raw {
            tcp,
            parser: StreamParser::new(ParserLimits {
                max_stanza_size: 1 << 20,
                max_depth: 64,
            }),
            buf: vec![0; 4096],
        };
        let mut received = 0;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            match raw.parser.next_event()? {
                Some(StreamEvent::Open(_)) => {}
                Some(StreamEvent::Element(e)) if e.is("features", ns::STREAM) => {
                    return Ok(Some(raw))
                }
                Some(other) => bail!("expected features, got {other:?}"),
                None => {
                    let n = tokio::time::timeout_at(deadline, raw.tcp.read(&mut raw.buf))
                        .await
                        .map_err(|_| anyhow!("no answer to a stream header"))?
                        .unwrap_or(0);
                    if n == 0 {
                        ensure!(received == 0, "closed after {received} bytes");
                        return Ok(None);
                    }
                    received += n;
                    raw.parser.feed(&raw.buf[..n]);
                }
            }
        }
    }

    /// Writes `data`; a connection the server has closed may refuse it.
    async fn send(&mut self, data: &str) {
        let _ = self.tcp.write_all(data.as_bytes()).await;
    }

    /// Reads until the connection ends, within [`TIMEOUT`].
    async fn ended(&mut self) -> Result<Ended> {
        let (_keep, mut never) = watch::channel(false);
        self.ended_unless(&mut never)
            .await?
            .ok_or_else(|| anyhow!("unreachable"))
    }

    /// Reads until the connection ends (`Some`) or `stop` is set (`None`); at most
    /// [`TIMEOUT`] beyond that.
    async fn ended_unless(&mut self, stop: &mut watch::Receiver<bool>) -> Result<Option<Ended>> {
        let deadline = tokio::time::Instant::now() + 2 * TIMEOUT;
        let mut error = None;
        loop {
            loop {
                match self.parser.next_event() {
                    Ok(Some(StreamEvent::Element(e))) if e.is("error", ns::STREAM) => {
                        error = e
                            .children()
                            .find(|c| c.ns() == ns::STREAMS && c.name() != "text")
                            .map(|c| c.name().to_string());
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => bail!("the server sent bad XML: {e}"),
                }
            }
            let n = tokio::select! {
                r = tokio::time::timeout_at(deadline, self.tcp.read(&mut self.buf)) => {
                    r.map_err(|_| anyhow!("the connection did not end"))?.unwrap_or(0)
                }
                _ = stop.wait_for(|s| *s) => return Ok(None),
            };
            if n == 0 {
                return Ok(Some(error.map(Ended::Error).unwrap_or(Ended::Eof)));
            }
            self.parser.feed(&self.buf[..n]);
        }
    }
}

/// Opens `per_source` streams from each of `sources`, `at_once` at a time; all must be
/// served.
async fn open_all(
    sources: impl Iterator<Item = IpAddr>,
    per_source: usize,
    addr: SocketAddr,
    stream_ns: &'static str,
) -> Result<Vec<Raw>> {
    let mut opened = Vec::new();
    for source in sources {
        let mut batch = JoinSet::new();
        for _ in 0..per_source {
            batch.spawn(Raw::open(source, addr, stream_ns));
        }
        while let Some(r) = batch.join_next().await {
            opened.push(r??.with_context(|| format!("a connection from {source} was refused"))?);
        }
    }
    Ok(opened)
}

/// The attack: `count` connections from `source`, `at_once` at a time, each
/// sending a stream header and the first `len` bytes of a stanza that never ends. Each
/// must end on its own within [`TIMEOUT`] (refused at once, or its stanza refused as too
/// big before authentication); returns (refused at accept, policy-violation).
async fn half_sent_stanzas(
    source: IpAddr,
    addr: SocketAddr,
    stream_ns: &'static str,
    count: usize,
    at_once: usize,
    len: usize,
) -> Result<(usize, usize)> {
    let packet = Arc::new(format!("{}{}", header(stream_ns), unfinished_message(len)));
    let (mut refused, mut too_big) = (0, 0);
    for _ in 0..count.div_ceil(at_once) {
        let mut batch = JoinSet::new();
        for _ in 0..at_once {
            let packet = packet.clone();
            batch.spawn(async move {
                let mut tcp = connect_from(source, addr).await?;
                let _ = tcp.write_all(packet.as_bytes()).await;
                let mut got = Vec::new();
                // A reset (the server closed with bytes unread) ends it as well.
                let _ = tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut got))
                    .await
                    .map_err(|_| anyhow!("a half-sent stanza was kept open"))?;
                let got = String::from_utf8_lossy(&got).into_owned();
                anyhow::Ok((got.is_empty(), got.contains("policy-violation")))
            });
        }
        while let Some(r) = batch.join_next().await {
            let (was_refused, was_too_big) = r??;
            refused += usize::from(was_refused);
            too_big += usize::from(was_too_big);
        }
    }
    Ok((refused, too_big))
}

/// What `streams` did when each sent `partial` bytes of an unfinished stanza before
/// authenticating, with room in the shared budget for `room` of them.
#[derive(Debug)]
struct BudgetOutcome {
    /// Still open once the others were closed: they held their bytes.
    held: usize,
    /// Closed with `resource-constraint`.
    refused: usize,
}

/// Each of `streams` sends `partial` bytes of a stanza and waits. The ones the budget has
/// no room for are closed with `resource-constraint`; once at least all but `room` are, the
/// others finish their stanza, which the server reads and refuses with `not-authorized`
/// (a stanza before authentication): they were open and holding their bytes.
async fn fill_budget(streams: Vec<Raw>, partial: usize, room: usize) -> Result<BudgetOutcome> {
    let n = streams.len();
    let text = Arc::new(unfinished_message(partial));
    let refusals = Arc::new(watch::Sender::new(0usize));
    let (finish, _) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for mut raw in streams {
        let text = text.clone();
        let refusals = refusals.clone();
        let mut finish = finish.subscribe();
        tasks.spawn(async move {
            raw.send(&text).await;
            if let Some(end) = raw.ended_unless(&mut finish).await? {
                refusals.send_modify(|n| *n += 1);
                return anyhow::Ok((true, end));
            }
            raw.send("</body></message>").await;
            Ok((false, raw.ended().await?))
        });
    }
    let mut seen = refusals.subscribe();
    let expected = n.saturating_sub(room);
    tokio::time::timeout(2 * TIMEOUT, seen.wait_for(|r| *r >= expected))
        .await
        .map_err(|_| {
            anyhow!(
                "only {} of {n} streams were refused; the budget has room for {room}",
                *refusals.borrow()
            )
        })??;
    finish.send_replace(true);
    let mut outcome = BudgetOutcome {
        held: 0,
        refused: 0,
    };
    while let Some(r) = tasks.join_next().await {
        match r?? {
            // Refused before the others finished, or as they did.
            (_, Ended::Error(c)) if c == "resource-constraint" => outcome.refused += 1,
            (false, Ended::Error(c)) if c == "not-authorized" => outcome.held += 1,
            (_, other) => bail!("a stream ended with {other:?}"),
        }
    }
    Ok(outcome)
}

// ---- client connections ------------------------------------------------------------------

/// The attack on the client port, then its spread over many addresses:
/// - from one address, 400 connections each with a half-sent 256 KiB stanza (5,000 of them
///   took 1.39 GB until the login timeout): each is refused at accept (16 per address) or
///   closed with `policy-violation` once its stanza passes 64 KiB
///   (`pre_auth_stanza_size`), and memory hardly grows;
/// - from 32 addresses, 16 connections each with 60 KiB of an unfinished stanza: together
///   they may hold 4 MiB (`pre_auth_buffer_total`); the streams beyond it are closed with
///   `resource-constraint`, the server's memory grows by about the budget, not the 30 MiB
///   offered, and a 17th connection from one of the addresses is refused at once.
///
/// Meanwhile a logged-in client keeps being answered, a new login from another address
/// works, and once logged in, a client sends stanzas of the full size (100 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_stanzas_before_login_are_bounded_per_address_and_in_total() -> Result<()> {
    const PER_ADDRESS: usize = 16;
    const PRE_AUTH: usize = 64 * KIB;
    const BUDGET: usize = 4 * MIB as usize;
    const PARTIAL: usize = 60 * KIB;
    const ADDRESSES: u32 = 32;
    ensure_descriptors(2 * (ADDRESSES as u64 * PER_ADDRESS as u64) + 200)?;
    // The test's time, not the build of the binary it runs.
    let _ = confab_bin();
    let started = Instant::now();
    let s = Limited::start(
        &format!(
            "max_connections_per_address = {PER_ADDRESS}\npre_auth_stanza_size = {PRE_AUTH}\n\
             pre_auth_buffer_total = {BUDGET}"
        ),
        "",
        &[
            ("alice", "wonderland"),
            ("bob", "builder"),
            ("carol", "probing"),
        ],
    )
    .await?;
    let probe = Probe::start(
        s.login_from(local(250), "carol", "probing", "probe")
            .await?,
    );
    // Warm-up: the same paths, a few times.
    half_sent_stanzas(local(1), s.c2s(), "jabber:client", 16, 16, 256 * KIB).await?;
    let baseline = s.baseline()?;

    // One address, the 262 KB half-sent stanzas.
    let (refused, too_big) =
        half_sent_stanzas(local(1), s.c2s(), "jabber:client", 400, 50, 256 * KIB).await?;
    let one_address = s.peak_growth(baseline)?;
    assert!(too_big > 0, "no stanza was refused as too big");
    assert!(
        one_address < 16 * MIB,
        "400 half-sent 256 KiB stanzas from one address: the server grew by {}",
        mib(one_address)
    );

    // Many addresses, each within its limit, each stanza within the size before login.
    let streams = open_all(
        (10..10 + ADDRESSES).map(local),
        PER_ADDRESS,
        s.c2s(),
        "jabber:client",
    )
    .await?;
    // The address's 17th connection is refused at accept.
    assert!(
        Raw::open(local(10), s.c2s(), "jabber:client")
            .await?
            .is_none(),
        "a connection over the per-address limit was served"
    );
    let with_streams = s.baseline()?;
    let room = BUDGET / PARTIAL;
    let outcome = fill_budget(streams, PARTIAL, room).await?;
    let budget_growth = s.peak_growth(with_streams)?;
    let offered = (ADDRESSES as usize * PER_ADDRESS * PARTIAL) as u64;
    assert!(
        outcome.held <= room && outcome.held >= room / 2,
        "{outcome:?}: the budget has room for {room}"
    );
    assert_eq!(
        outcome.held + outcome.refused,
        ADDRESSES as usize * PER_ADDRESS
    );
    assert!(
        budget_growth < BUDGET as u64 + 6 * MIB,
        "{} of unfinished stanzas offered against a budget of {}: the server grew by {}",
        mib(offered),
        mib(BUDGET as u64),
        mib(budget_growth)
    );

    // Everyone else is still served, and a session has its full stanza size.
    let mut alice = s
        .login_from(local(200), "alice", "wonderland", "phone")
        .await?;
    let mut bob = s.login_from(local(201), "bob", "builder", "desk").await?;
    let big = "y".repeat(100 * KIB);
    alice.chat(&bob.jid.clone(), &big).await?;
    bob.expect_body(&big).await?;
    alice.ping().await?;
    let slowest = probe.finish(Duration::from_secs(1)).await?;
    let log = s.stop().await?;
    let per_address = log
        .iter()
        .filter(|l| l.contains("too many connections from this address"))
        .count();
    assert!(
        per_address > refused,
        "refusals at accept are logged ({per_address} lines, {refused} in the first part)"
    );
    println!(
        "c2s: 400 half-sent 256 KiB stanzas from one address: {refused} refused at accept, \
         {too_big} closed as too big, peak +{}; {} conns x {} KiB unfinished ({}) against a \
         {} budget: {} held, {} refused, peak +{}; probe's slowest ping {slowest:.1?}; \
         test {:.1?}",
        mib(one_address),
        ADDRESSES as usize * PER_ADDRESS,
        PARTIAL / KIB,
        mib(offered),
        mib(BUDGET as u64),
        outcome.held,
        outcome.refused,
        mib(budget_growth),
        started.elapsed()
    );
    Ok(())
}

/// One address opens streams and says nothing more. Without a per-address limit
/// (`max_connections_per_address = 0`) it takes all 24 places of `max_connections` and
/// everyone else is refused until the login timeout; with a limit of 16 it gets 16, its
/// 200 further attempts are each refused at once, and a client from another address logs
/// in and is answered promptly while a logged-in client stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() -> Result<()> {
    const MAX: usize = 24;
    const PER_ADDRESS: usize = 16;
    const ATTEMPTS: usize = 200;
    const AT_ONCE: usize = 50;
    // The test's time, not the build of the binary it runs.
    let _ = confab_bin();
    let started = Instant::now();
    let users = [("alice", "wonderland"), ("carol", "probing")];

    // The attack as it was: no per-address limit.
    let open = Limited::start(
        &format!("max_connections = {MAX}\nmax_connections_per_address = 0"),
        "",
        &users,
    )
    .await?;
    let idle = open_all([local(1)].into_iter(), MAX, open.c2s(), "jabber:client").await?;
    let locked_out = Raw::open(local(2), open.c2s(), "jabber:client").await?;
    assert!(
        locked_out.is_none(),
        "without a per-address limit the test shows no lock-out"
    );
    drop(idle);
    open.stop().await?;

    let s = Limited::start(
        &format!("max_connections = {MAX}\nmax_connections_per_address = {PER_ADDRESS}"),
        "",
        &users,
    )
    .await?;
    let probe = Probe::start(s.login_from(local(3), "carol", "probing", "probe").await?);
    let idle = open_all(
        [local(1)].into_iter(),
        PER_ADDRESS,
        s.c2s(),
        "jabber:client",
    )
    .await?;
    let mut slowest_refusal = Duration::ZERO;
    for _ in 0..ATTEMPTS / AT_ONCE {
        let mut batch = JoinSet::new();
        for _ in 0..AT_ONCE {
            let addr = s.c2s();
            batch.spawn(async move {
                let t = Instant::now();
                let served = Raw::open(local(1), addr, "jabber:client").await?;
                ensure!(
                    served.is_none(),
                    "a connection over the per-address limit was served"
                );
                Ok(t.elapsed())
            });
        }
        while let Some(r) = batch.join_next().await {
            slowest_refusal = slowest_refusal.max(r??);
        }
    }
    let t = Instant::now();
    let mut alice = s
        .login_from(local(2), "alice", "wonderland", "phone")
        .await?;
    alice.ping().await?;
    let login = t.elapsed();
    let slowest_ping = probe.finish(Duration::from_secs(1)).await?;
    assert!(
        slowest_refusal < Duration::from_secs(2),
        "a refusal took {slowest_refusal:?}"
    );
    assert!(
        login < Duration::from_secs(5),
        "a login from another address took {login:?}"
    );
    drop(idle);
    let log = s.stop().await?;
    let refusals = log
        .iter()
        .filter(|l| l.contains("too many connections from this address"))
        .count();
    assert_eq!(refusals, ATTEMPTS, "one refusal logged per attempt");
    println!(
        "one address: {PER_ADDRESS} idle held of {MAX}, {ATTEMPTS} more refused (slowest \
         {slowest_refusal:.1?}); login from another address {login:.1?}; probe's slowest \
         ping {slowest_ping:.1?}; test {:.1?}",
        started.elapsed()
    );
    Ok(())
}

// ---- server connections ------------------------------------------------------------------

/// The s2s listener had no connection limit at all (300 of 300 served with
/// `max_connections` at 100; 2,000 connections with a 520 KB half-sent stanza each took
/// 1.14 GB). Now, with `s2s.max_connections = 100` and `s2s.max_connections_per_address =
/// 20`: one address gets 20 streams and its 21st is refused; 10 more addresses trying 20
/// each get 80 between them (100 in all); 400 connections with a half-sent 512 KiB stanza
/// each end at once (refused, or `policy-violation` past 16 KiB before authentication) and
/// memory hardly grows; 80 streams with 15 KiB unfinished each, against a budget of 512
/// KiB shared by every unauthenticated stream, are refused beyond it with
/// `resource-constraint`. Once the held streams close, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connections_are_capped_in_total_and_per_address() -> Result<()> {
    const MAX: usize = 100;
    const PER_ADDRESS: usize = 20;
    const BUDGET: usize = 512 * KIB;
    const PARTIAL: usize = 15 * KIB;
    ensure_descriptors(2 * (MAX as u64 + 400) + 200)?;
    // The test's time, not the build of the binary it runs.
    let _ = confab_bin();
    let started = Instant::now();
    let s = Limited::start(
        &format!("pre_auth_buffer_total = {BUDGET}"),
        &format!(
            "max_connections = {MAX}\nmax_connections_per_address = {PER_ADDRESS}\n\
             connect_timeout_secs = 10"
        ),
        &[("carol", "probing")],
    )
    .await?;
    let probe = Probe::start(
        s.login_from(local(250), "carol", "probing", "probe")
            .await?,
    );

    // Per address, then in total.
    let mut held = open_all([local(1)].into_iter(), PER_ADDRESS, s.s2s, "jabber:server").await?;
    assert!(
        Raw::open(local(1), s.s2s, "jabber:server").await?.is_none(),
        "a server connection over the per-address limit was served"
    );
    let mut attempts = JoinSet::new();
    for n in 2..12 {
        for _ in 0..PER_ADDRESS {
            attempts.spawn(Raw::open(local(n), s.s2s, "jabber:server"));
        }
    }
    let mut refused = 0;
    while let Some(r) = attempts.join_next().await {
        match r?? {
            Some(raw) => held.push(raw),
            None => refused += 1,
        }
    }
    assert_eq!(held.len(), MAX, "server connections served at once");
    assert_eq!(refused, 10 * PER_ADDRESS + PER_ADDRESS - MAX);
    drop(held);

    // The half-sent stanzas, once the places are free again (the server sees the closes
    // asynchronously).
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while Raw::open(local(20), s.s2s, "jabber:server")
        .await?
        .is_none()
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "places were not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    half_sent_stanzas(local(21), s.s2s, "jabber:server", 20, 20, 512 * KIB).await?;
    let baseline = s.baseline()?;
    let (at_accept, too_big) =
        half_sent_stanzas(local(21), s.s2s, "jabber:server", 400, 50, 512 * KIB).await?;
    let growth = s.peak_growth(baseline)?;
    assert!(too_big > 0, "no stanza was refused as too big");
    assert!(
        growth < 16 * MIB,
        "400 half-sent 512 KiB stanzas: the server grew by {}",
        mib(growth)
    );

    // The budget of unfinished input before authentication.
    let streams = open_all((30..34).map(local), PER_ADDRESS, s.s2s, "jabber:server").await?;
    let room = BUDGET / PARTIAL;
    let outcome = fill_budget(streams, PARTIAL, room).await?;
    assert!(
        outcome.held <= room && outcome.held >= room / 2,
        "{outcome:?}: the budget has room for {room}"
    );
    assert_eq!(outcome.held + outcome.refused, 4 * PER_ADDRESS);

    // And a server that comes now is served.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while Raw::open(local(40), s.s2s, "jabber:server")
        .await?
        .is_none()
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no server connection after the others closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let slowest = probe.finish(Duration::from_secs(1)).await?;
    let log = s.stop().await?;
    let total = log
        .iter()
        .filter(|l| l.contains("s2s connection limit reached"))
        .count();
    let per_address = log
        .iter()
        .filter(|l| l.contains("too many server connections from this address"))
        .count();
    assert!(
        total >= refused && per_address >= 1,
        "refusals are logged: {total} over the total, {per_address} per address"
    );
    println!(
        "s2s: {MAX} served of {} offered ({refused} refused); 400 half-sent 512 KiB stanzas: \
         {at_accept} refused at accept, {too_big} closed as too big, peak +{}; 80 x {} KiB \
         unfinished against {} KiB: {} held, {} refused; probe's slowest ping {slowest:.1?}; \
         test {:.1?}",
        11 * PER_ADDRESS,
        mib(growth),
        PARTIAL / KIB,
        BUDGET / KIB,
        outcome.held,
        outcome.refused,
        started.elapsed()
    );
    Ok(())
}
