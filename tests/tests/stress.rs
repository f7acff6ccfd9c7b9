//! Bounded under stress: the real `confab` binary, run as a process of its own so that its
//! resident memory (`/proc/PID/status`) is its own, abused four ways — a client that stops
//! reading while another floods it, a client that sends as fast as it can, far more
//! connections than `limits.max_connections`, failed logins beyond
//! `limits.auth_failures_per_minute`. Each test checks the limit's visible behaviour, that
//! another client keeps getting prompt answers, and that the server's peak resident memory
//! grew by far less than the abuse would make it hold without the limit. The figures are in
//! docs/admin.md ("Under stress"); run with `--nocapture` to see them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use confab_protocol::sasl::{encode_payload, ScramHash};
use confab_protocol::{ns, Element, StreamEvent};
use confab_tests::bin::*;
use confab_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// A `confab serve` process with its own data directory and test CA.
struct Stress {
    served: Served,
    pid: u32,
    pki: Arc<TestPki>,
    _dir: tempfile::TempDir,
}

impl Stress {
    /// Creates `users` with `confab user import`, then starts `confab serve` with these
    /// `[limits]` keys (loopback, port 0).
    async fn start(limits: &str, users: &[(&str, &str)]) -> Result<Stress> {
        let dir = tempfile::tempdir()?;
        let p = dir.path();
        let pki = Arc::new(TestPki::create(p, &[DOMAIN])?);
        let config = p.join("confab.toml");
        write_loopback_config(
            &config,
            &p.join("data"),
            p,
            "",
            &format!("\n[limits]\n{limits}\n"),
        )?;
        let accounts: String = users
            .iter()
            .map(|(user, pw)| format!("{user}@{DOMAIN} {pw}\n"))
            .collect();
        let out = run_cli(&config, &["user", "import"], &accounts).await?;
        ensure!(out.status.success(), "user import: {}", text(&out.stderr));
        let served = spawn_serve(&config).await?;
        let pid = served.child.id().context("the server has no pid")?;
        Ok(Stress {
            served,
            pid,
            pki,
            _dir: dir,
        })
    }

    fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    fn rss(&self) -> Result<Rss> {
        rss_of(self.pid)
    }

    /// The baseline: resets the peak to what is resident now and returns that.
    fn baseline(&self) -> Result<u64> {
        reset_peak_rss(self.pid)?;
        Ok(self.rss()?.now)
    }

    /// Logs in over STARTTLS with SCRAM-SHA-256 and binds `resource`.
    async fn login(&self, user: &str, password: &str, resource: &str) -> Result<Client> {
        let mut c = Client::connect(self.addr()).await?;
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

/// What the server's resident memory did over one abuse.
#[derive(Debug)]
struct Growth {
    baseline: u64,
    peak: u64,
    after: u64,
}

impl Growth {
    fn since(baseline: u64, s: &Stress) -> Result<Growth> {
        let now = s.rss()?;
        Ok(Growth {
            baseline,
            peak: now.peak,
            after: now.now,
        })
    }

    /// The peak over the abuse, above the baseline.
    fn peak_growth(&self) -> u64 {
        self.peak.saturating_sub(self.baseline)
    }

    fn assert_below(&self, bound: u64, what: &str) {
        assert!(
            self.peak_growth() < bound,
            "{what}: the server's resident memory grew by {} (baseline {}, peak {}), \
             the bound is {}",
            mib(self.peak_growth()),
            mib(self.baseline),
            mib(self.peak),
            mib(bound)
        );
    }
}

impl std::fmt::Display for Growth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RSS baseline {}, peak +{}, after +{}",
            mib(self.baseline),
            mib(self.peak_growth()),
            mib(self.after.saturating_sub(self.baseline))
        )
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / MIB as f64)
}

/// A logged-in client that pings the server every 100 ms until it is stopped, and
/// records the slowest answer.
struct Probe {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(Client, ProbeStats)>>,
}

#[derive(Debug)]
struct ProbeStats {
    pings: u32,
    slowest: Duration,
}

impl Probe {
    fn start(mut c: Client) -> Probe {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut stats = ProbeStats {
                pings: 0,
                slowest: Duration::ZERO,
            };
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            // At most a minute's worth; every test ends well before.
            for _ in 0..600 {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    _ = tick.tick() => {}
                }
                let t = Instant::now();
                c.ping().await.context("the probe's ping")?;
                stats.slowest = stats.slowest.max(t.elapsed());
                stats.pings += 1;
            }
            Ok((c, stats))
        });
        Probe { stop, task }
    }

    /// Stops pinging; fails unless every ping was answered within `within`.
    async fn finish(self, within: Duration) -> Result<(Client, ProbeStats)> {
        self.stop.send_replace(true);
        let (mut c, stats) = tokio::time::timeout(TIMEOUT, self.task).await???;
        // One more, after the abuse.
        let t = Instant::now();
        c.ping().await?;
        let stats = ProbeStats {
            pings: stats.pings + 1,
            slowest: stats.slowest.max(t.elapsed()),
        };
        assert!(
            stats.pings >= 2,
            "the other client was hardly pinging: {stats:?}"
        );
        assert!(
            stats.slowest < within,
            "another client waited too long for an answer: {stats:?}"
        );
        Ok((c, stats))
    }
}

/// A headline message: delivered to the sessions that are there, dropped when there are
/// none (RFC 6121 §8.5.2.2.1), so a flood of them stores nothing offline.
fn headline(to: &str, body: &str) -> String {
    Element::new("message", ns::CLIENT)
        .with_attr("to", to)
        .with_attr("type", "headline")
        .with_child(Element::new("body", ns::CLIENT).with_text(body))
        .to_xml(ns::CLIENT)
}

fn ping_xml(id: &str) -> String {
    Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("id", id)
        .with_attr("to", DOMAIN)
        .with_child(Element::new("ping", ns::PING))
        .to_xml(ns::CLIENT)
}

// ---- 1. a slow reader ------------------------------------------------------------------

/// Alice binds and never reads; Bob sends her 32 MiB of 4 KiB messages. With
/// `session_queue = 64` her session is disconnected once its queue is full (the log says
/// so, her stream ends), Bob and another client keep being answered, and the server's
/// memory grows by a small fraction of what it would hold had it queued the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_memory_stays_bounded() -> Result<()> {
    const QUEUE: usize = 64;
    const BODY: usize = 4096;
    const BATCH: usize = 16;
    const PING_EVERY: usize = 256;
    const MESSAGES: usize = 8192;
    const BOUND: u64 = 3 * MIB;
    // The test's time, not the build of the binary it runs.
    let _ = confab_bin();
    let started = Instant::now();
    let s = Stress::start(
        &format!("session_queue = {QUEUE}\nclient_read_rate = 0"),
        &[
            ("alice", "wonderland"),
            ("bob", "builder"),
            ("carol", "probing"),
        ],
    )
    .await?;
    let mut alice = s.login("alice", "wonderland", "slow").await?;
    let mut bob = s.login("bob", "builder", "flood").await?;
    let mut carol = s.login("carol", "probing", "probe").await?;
    let body = "x".repeat(BODY);

    // Warm-up: the same traffic to a client that reads it.
    let to_carol = headline(&carol.jid, &body).repeat(BATCH);
    for _ in 0..(2 * QUEUE / BATCH) {
        bob.send_str(&to_carol).await?;
        for _ in 0..BATCH {
            carol.expect(|e| e.name() == "message").await?;
        }
    }
    bob.ping().await?;
    let baseline = s.baseline()?;

    let probe = Probe::start(carol);
    let to_alice = headline(&alice.jid, &body).repeat(BATCH);
    let flood_bytes = (MESSAGES / BATCH * to_alice.len()) as u64;
    assert!(flood_bytes >= 10 * BOUND, "the flood is too small to tell");
    let mut bob_slowest = Duration::ZERO;
    let flood = Instant::now();
    for sent in (0..MESSAGES).step_by(BATCH) {
        bob.send_str(&to_alice).await?;
        if (sent + BATCH).is_multiple_of(PING_EVERY) {
            let t = Instant::now();
            bob.ping().await?;
            bob_slowest = bob_slowest.max(t.elapsed());
        }
    }
    let flood_time = flood.elapsed();
    let growth = Growth::since(baseline, &s)?;
    growth.assert_below(BOUND, "a slow reader");

    // Alice's stream was cut off: after what the socket buffers held, it ends.
    let closed = alice.expect_closed().await?;
    assert!(
        matches!(closed, Closed::Eof | Closed::StreamError(_)),
        "{closed:?}"
    );
    bob.ping().await?;
    let (_carol, carol_stats) = probe.finish(Duration::from_secs(1)).await?;

    let log = s.stop().await?;
    let kills: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("disconnecting slow reader"))
        .collect();
    assert!(
        !kills.is_empty() && kills.iter().all(|l| l.contains("alice@")),
        "only the slow reader is disconnected: {kills:#?}"
    );
    println!(
        "slow reader: {} sent to it in {flood_time:.1?}; {growth}; sender's slowest ping \
         {bob_slowest:.1?}, other client's {:.1?} over {} pings; test {:.1?}",
        mib(flood_bytes),
        carol_stats.slowest,
        carol_stats.pings,
        started.elapsed()
    );
    Ok(())
}

// ---- 2. a flood --------------------------------------------------------------------------

/// A bound client over STARTTLS, held as a raw stream so that it can be split into a
/// writer and a reader.
async fn raw_session(
    addr: SocketAddr,
    pki: &TestPki,
    user: &str,
    password: &str,
) -> Result<RawStream<tokio_rustls::client::TlsStream<TcpStream>>> {
    let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await??;
    let mut plain = RawStream::new(tcp);
    plain.open().await?;
    plain
        .send_str(&format!("<starttls xmlns='{}'/>", ns::TLS))
        .await?;
    let proceed = plain.element().await?;
    ensure!(proceed.is("proceed", ns::TLS), "{proceed}");
    let connector = tokio_rustls::TlsConnector::from(pki.client_config());
    let name = rustls_pki_types::ServerName::try_from(DOMAIN.to_string())?;
    let tls = tokio::time::timeout(TIMEOUT, connector.connect(name, plain.io)).await??;
    let mut raw = RawStream::new(tls);
    raw.open().await?;
    raw.send(
        &Element::new("auth", ns::SASL)
            .with_attr("mechanism", "PLAIN")
            .with_text(encode_payload(format!("\0{user}\0{password}").as_bytes())),
    )
    .await?;
    let outcome = raw.element().await?;
    ensure!(outcome.is("success", ns::SASL), "{outcome}");
    raw.open().await?;
    raw.send(
        &Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("id", "bind")
            .with_child(
                Element::new("bind", ns::BIND)
                    .with_child(Element::new("resource", ns::BIND).with_text("flood")),
            ),
    )
    .await?;
    let bound = raw.element().await?;
    ensure!(bound.attr("type") == Some("result"), "{bound}");
    Ok(raw)
}

/// Mallory writes 4 KiB messages to an offline contact, each followed by a ping, as fast as
/// TCP lets her, and reads the answers as they come. With `client_read_rate` at 64 KiB/s
/// (burst 64 KiB), the pings answered show what the server read: no more than
/// rate × elapsed + burst (+ one read of 16 KiB); her writes are held back by TCP (most
/// of the flood is still unwritten), another client's pings are answered within a second,
/// and memory does not grow with what she tries to send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_throttled_by_pausing_reads_and_memory_stays_bounded() -> Result<()> {
    const RATE: u64 = 64 * KIB;
    const BURST: u64 = 64 * KIB;
    const READ: u64 = 16 * KIB;
    const BODY: usize = 4096;
    // The server must have read this much before the figures are taken.
    const TARGET: u64 = 320 * KIB;
    const FLOOD: u64 = 32 * MIB;
    const BOUND: u64 = 3 * MIB;
    // The test's time, not the build of the binary it runs.
    let _ = confab_bin();
    let started = Instant::now();
    let s = Stress::start(
        &format!("client_read_rate = {RATE}\nmax_stanza_size = 16384"),
        &[
            ("mallory", "flooding"),
            ("carol", "probing"),
            ("dave", "offline"),
        ],
    )
    .await?;
    let carol = s.login("carol", "probing", "probe").await?;
    let raw = raw_session(s.addr(), &s.pki, "mallory", "flooding").await?;
    // Warm-up: the same units, at a pace the limit lets through at once.
    let message = headline(&format!("dave@{DOMAIN}"), &"x".repeat(BODY));
    let unit = {
        let message = message.clone();
        move |k: u64| format!("{message}{}", ping_xml(&format!("f{k:08}")))
    };
    let unit_len = unit(0).len() as u64;
    let units = FLOOD / unit_len;
    let RawStream { io, mut parser } = raw;
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut buf = vec![0u8; 16384];
    for k in 0..4 {
        let id = format!("w{k:08}");
        wr.write_all(format!("{message}{}", ping_xml(&id)).as_bytes())
            .await?;
        loop {
            match parser.next_event()? {
                Some(StreamEvent::Element(e)) if e.attr("id") == Some(id.as_str()) => break,
                Some(_) => {}
                None => {
                    let n = tokio::time::timeout(TIMEOUT, rd.read(&mut buf)).await??;
                    ensure!(n > 0, "the server closed the warm-up");
                    parser.feed(&buf[..n]);
                }
            }
        }
    }
    let baseline = s.baseline()?;
    let probe = Probe::start(carol);

    // The reader: the number of units whose ping has been answered.
    let (answered_tx, mut answered) = watch::channel(0u64);
    let reader: tokio::task::JoinHandle<Result<()>> = tokio::spawn(async move {
        loop {
            while let Some(ev) = parser.next_event()? {
                if let StreamEvent::Element(e) = ev {
                    let k = e
                        .attr("id")
                        .and_then(|id| id.strip_prefix('f'))
                        .and_then(|k| k.parse::<u64>().ok());
                    match (e.attr("type"), k) {
                        (Some("result"), Some(k)) => {
                            answered_tx.send_replace(k + 1);
                        }
                        _ => bail!("unexpected {e}"),
                    }
                }
            }
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                bail!("the server closed the flooding connection");
            }
            parser.feed(&buf[..n]);
        }
    });
    // The writer: as fast as the connection takes it.
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    let flood = Instant::now();
    let writer = tokio::spawn(async move {
        for k in 0..units {
            let u = unit(k);
            wr.write_all(u.as_bytes()).await?;
            counter.fetch_add(u.len() as u64, Ordering::Relaxed);
        }
        anyhow::Ok(wr)
    });
    let target_units = TARGET.div_ceil(unit_len);
    tokio::time::timeout(
        Duration::from_secs(20),
        answered.wait_for(|n| *n >= target_units),
    )
    .await
    .map_err(|_| anyhow!("the server read under {} in 20 s", mib(TARGET)))??;
    let elapsed = flood.elapsed();
    let read = *answered.borrow() * unit_len;
    let offered = written.load(Ordering::Relaxed);
    let growth = Growth::since(baseline, &s)?;
    let (_carol, carol_stats) = probe.finish(Duration::from_secs(1)).await?;

    // What the server read is what the limit allows, not what was sent.
    let allowed = BURST + (RATE as f64 * elapsed.as_secs_f64()) as u64 + READ + unit_len;
    assert!(
        read <= allowed,
        "the server read {read} bytes in {elapsed:?}; the limit allows {allowed}"
    );
    assert!(
        !writer.is_finished() && offered < units * unit_len,
        "the whole flood was written: nothing held the sender back"
    );
    growth.assert_below(BOUND, "a flood");
    writer.abort();
    reader.abort();
    s.stop().await?;
    println!(
        "flood: the server read {} in {elapsed:.1?} ({:.1} KiB/s) while the client had \
         written {} of {}; {growth}; other client's slowest ping {:.1?} over {} pings; \
         test {:.1?}",
        mib(read),
        read as f64 / KIB as f64 / elapsed.as_secs_f64(),
        mib(offered),
        mib(units * unit_len),
        carol_stats.slowest,
        carol_stats.pings,
        started.elapsed()
    );
    Ok(())
}

// ---- 3. too many connections -------------------------------------------------------------

/// Opens a TCP connection, sends a stream header and expects the connection to be closed
/// without a byte in answer; returns how long that took.
async fn expect_refused_connection(addr: SocketAddr) -> Result<Duration> {
    let t = Instant::now();
    let mut tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await??;
    let header = format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='{}' to='{DOMAIN}' version='1.0'>",
        ns::STREAM
    );
    // The server may have closed it already (then the write fails).
    let _ = tcp.write_all(header.as_bytes()).await;
    let mut buf = [0u8; 256];
    match tokio::time::timeout(TIMEOUT, tcp.read(&mut buf)).await {
        Err(_) => bail!("a connection over the limit was kept open"),
        Ok(Ok(0)) | Ok(Err(_)) => Ok(t.elapsed()),
        Ok(Ok(n)) => bail!(
            "a connection over the limit was answered: {}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

/// With `max_connections = 50`, 49 connections (TLS) are held beside a logged-in client,
/// then 1000 more are opened, 50 at a time: each is closed at once without an answer, the
/// logged-in client keeps being answered, and the server's memory grows with the 50 it
/// serves, not the 1050 it was offered. Once the 49 close, a new login works. (All come
/// from 127.0.0.1: the per-address limit is off here, `connection_limits.rs` tests it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_at_once_and_memory_stays_bounded() -> Result<()> {
    const MAX: usize = 50;
    const EXTRA: usize = 1000;
    const AT_ONCE: usize = 50;
    const BOUND: u64 = 2 * MIB;
    // The test's time, not the build of the binary it runs.
    let _ = confab_bin();
    let started = Instant::now();
    let s = Stress::start(
        &format!("max_connections = {MAX}\nmax_connections_per_address = 0"),
        &[("carol", "probing"), ("erin", "again")],
    )
    .await?;
    let carol = s.login("carol", "probing", "probe").await?;
    // Warm-up: a few connections opened and closed.
    for _ in 0..5 {
        let mut c = Client::connect(s.addr()).await?;
        c.starttls(&s.pki).await?;
        assert_eq!(c.close().await?, Closed::Clean);
    }
    let baseline = s.baseline()?;
    let probe = Probe::start(carol);

    let mut held = Vec::new();
    for _ in 1..MAX {
        let mut c = Client::connect(s.addr()).await?;
        c.starttls(&s.pki).await?;
        held.push(c);
    }
    let with_held = s.rss()?.now;
    reset_peak_rss(s.pid)?;

    let mut slowest = Duration::ZERO;
    for _ in 0..EXTRA / AT_ONCE {
        let mut batch = JoinSet::new();
        for _ in 0..AT_ONCE {
            batch.spawn(expect_refused_connection(s.addr()));
        }
        while let Some(r) = batch.join_next().await {
            slowest = slowest.max(r??);
        }
    }
    let refused = Growth::since(with_held, &s)?;
    let total = Growth {
        baseline,
        peak: refused.peak.max(with_held),
        after: refused.after,
    };
    let (_carol, carol_stats) = probe.finish(Duration::from_secs(1)).await?;
    assert!(
        slowest < Duration::from_secs(2),
        "a connection over the limit took {slowest:?} to be closed"
    );
    refused.assert_below(BOUND, "connections over the limit");
    total.assert_below(4 * BOUND, "connections up to and over the limit");

    // Places freed are places to log in again (the server notices the closes
    // asynchronously, so try until it has).
    for c in held {
        assert_eq!(c.close().await?, Closed::Clean);
    }
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut erin = loop {
        match s.login("erin", "again", "back").await {
            Ok(c) => break c,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.context("no login after the connections closed")),
        }
    };
    erin.ping().await?;
    let log = s.stop().await?;
    let refusals = log
        .iter()
        .filter(|l| l.contains("connection limit reached"))
        .count();
    assert_eq!(refusals, EXTRA, "one refusal logged per extra connection");
    println!(
        "max connections: {} held cost +{} ({} KiB each); {EXTRA} more refused, slowest \
         close {slowest:.1?}, peak +{} over the held; overall {total}; other client's \
         slowest ping {:.1?}; test {:.1?}",
        MAX - 1,
        mib(with_held.saturating_sub(baseline)),
        with_held.saturating_sub(baseline) / (MAX as u64 - 1) / KIB,
        mib(refused.peak_growth()),
        carol_stats.slowest,
        started.elapsed()
    );
    Ok(())
}

// ---- 4. failed logins ---------------------------------------------------------------------

/// A new TLS connection that starts SCRAM with the right password and must be closed with
/// `policy-violation` before any challenge; returns how long the refusal took.
async fn expect_refused_login(addr: SocketAddr, pki: Arc<TestPki>) -> Result<Duration> {
    let t = Instant::now();
    let mut c = Client::connect(addr).await?;
    c.starttls(&pki).await?;
    c.expect_login_refused("alice", "wonderland").await?;
    Ok(t.elapsed())
}

/// With `auth_failures_per_minute = 5`, five wrong passwords from 127.0.0.1 (over two
/// connections, the per-stream limit being 3) are answered `not-authorized`; then 500
/// more logins from that address, even with the right password, are each closed with
/// `policy-violation` before a challenge, a logged-in client keeps being answered, and
/// memory does not grow with the attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_beyond_the_failure_limit_are_refused_and_memory_stays_bounded() -> Result<()> {
    const PER_MINUTE: usize = 5;
    const ATTEMPTS: usize = 500;
    const AT_ONCE: usize = 10;
    const BOUND: u64 = 2 * MIB;
    // The test's time, not the build of the binary it runs.
    let _ = confab_bin();
    let started = Instant::now();
    let s = Stress::start(
        &format!("auth_failures_per_minute = {PER_MINUTE}"),
        &[("alice", "wonderland"), ("carol", "probing")],
    )
    .await?;
    let carol = s.login("carol", "probing", "probe").await?;
    // Warm-up: logins that succeed, through the same TLS and SASL paths.
    for i in 0..5 {
        let c = s.login("alice", "wonderland", &format!("w{i}")).await?;
        assert_eq!(c.close().await?, Closed::Clean);
    }
    let baseline = s.baseline()?;
    let probe = Probe::start(carol);

    // Five failures: three on one connection (which closes it), two on another.
    let mut first = Client::connect(s.addr()).await?;
    first.starttls(&s.pki).await?;
    for _ in 0..3 {
        first.expect_not_authorized("alice", "guess").await?;
    }
    assert_eq!(
        first.expect_closed().await?,
        Closed::StreamError("policy-violation".into())
    );
    let mut second = Client::connect(s.addr()).await?;
    second.starttls(&s.pki).await?;
    for _ in 3..PER_MINUTE {
        second.expect_not_authorized("alice", "guess").await?;
    }

    let mut slowest = Duration::ZERO;
    for _ in 0..ATTEMPTS / AT_ONCE {
        let mut batch = JoinSet::new();
        for _ in 0..AT_ONCE {
            batch.spawn(expect_refused_login(s.addr(), s.pki.clone()));
        }
        while let Some(r) = batch.join_next().await {
            slowest = slowest.max(r??);
        }
    }
    let growth = Growth::since(baseline, &s)?;
    let (_carol, carol_stats) = probe.finish(Duration::from_secs(1)).await?;
    growth.assert_below(BOUND, "failed logins");
    let log = s.stop().await?;
    let refused = log.iter().filter(|l| l.contains("login refused")).count();
    assert_eq!(refused, ATTEMPTS, "one refusal logged per attempt");
    let failed = log
        .iter()
        .filter(|l| l.contains("authentication failed"))
        .count();
    assert_eq!(failed, PER_MINUTE, "failures checked against the password");
    println!(
        "failed logins: {PER_MINUTE} failures then {ATTEMPTS} refusals, slowest {slowest:.1?}; \
         {growth}; other client's slowest ping {:.1?}; test {:.1?}",
        carol_stats.slowest,
        started.elapsed()
    );
    Ok(())
}

// ---- 5. memory amplification in the parser ---------------------------------------------

/// A stanza built to make its tree far larger than its bytes: a 16 KiB namespace on an
/// element with thousands of empty children (each child used to keep its own copy of the
/// URI: 130 KiB of input took the server past 1 GiB).
fn amplifier(total: usize) -> String {
    let long = "urn:".to_string() + &"x".repeat(16 * 1024);
    let head = format!("<message to='nobody@{DOMAIN}'><x xmlns='{long}'>");
    let tail = "</x></message>";
    let children = total.saturating_sub(head.len() + tail.len()) / 4;
    format!("{head}{}{tail}", "<a/>".repeat(children))
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

/// Three connections on c2s and three on s2s, none authenticated, each sending one
/// 130 KiB amplifier right after its stream header: the server's peak grows by a small
/// multiple of what was sent (it was 2.3 GiB), each gets a stream error or its stanza
/// refused, and another client keeps being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_amplifier_before_login_costs_a_small_multiple_of_its_size() -> Result<()> {
    let s = Stress::start("", &[("probe", "probing")]).await?;
    let probe = Probe::start(s.login("probe", "probing", "probe").await?);
    let s2s = s2s_addr(&s.served.log)?;
    let packet = amplifier(130 * 1024);
    let baseline = s.baseline()?;
    let mut attackers = JoinSet::new();
    for (addr, stream_ns) in [(s.addr(), "jabber:client"), (s2s, "jabber:server")] {
        for _ in 0..3 {
            let packet = packet.clone();
            attackers.spawn(async move {
                let mut tcp = TcpStream::connect(addr).await?;
                let header = format!(
                    "<?xml version='1.0'?><stream:stream xmlns='{stream_ns}' \
                     xmlns:stream='http://etherx.jabber.org/streams' to='{DOMAIN}' version='1.0'>"
                );
                tcp.write_all(header.as_bytes()).await?;
                tcp.write_all(packet.as_bytes()).await?;
                // The server answers (features, then an error) and closes; read to the end.
                let mut got = Vec::new();
                tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut got)).await??;
                let got = String::from_utf8_lossy(&got).into_owned();
                ensure!(
                    got.contains("stream:error") || got.contains("<error"),
                    "{got}"
                );
                Ok::<_, anyhow::Error>(())
            });
        }
    }
    while let Some(r) = attackers.join_next().await {
        r??;
    }
    let growth = Growth::since(baseline, &s)?;
    println!("6 amplifiers of {} KiB: {growth}", packet.len() / 1024);
    // Six trees of at most 32 bytes per byte received would be 26 MiB; they are not all
    // alive at once, and ~25 bytes per byte is what the densest shape takes.
    growth.assert_below(40 * MIB, "six 130 KiB amplifiers");
    probe.finish(Duration::from_secs(2)).await?;
    s.stop().await?;
    Ok(())
}

/// The stored variant: twelve 51 KiB amplifiers sent to a user who is offline. When she
/// logs in, her queue is read and parsed a page at a time (it was parsed whole: 2.4 GiB),
/// and every message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_amplifiers_are_delivered_a_page_at_a_time() -> Result<()> {
    let s = Stress::start("", &[("mallory", "mallory pw"), ("alice", "alice pw")]).await?;
    let mut mallory = s.login("mallory", "mallory pw", "m").await?;
    let alice = format!("alice@{DOMAIN}");
    let packet = amplifier(51 * 1024).replace(&format!("nobody@{DOMAIN}"), &alice);
    for _ in 0..12 {
        mallory.send_str(&packet).await?;
    }
    mallory.ping().await?; // every message stored before the answer
    let baseline = s.baseline()?;
    let mut c = s.login("alice", "alice pw", "phone").await?;
    c.send_str("<presence/>").await?;
    let mut delivered = 0;
    while delivered < 12 {
        let e = c.next().await?;
        if e.name() == "message" {
            assert!(e.children().any(|x| x.name() == "x"), "{}", e.name());
            delivered += 1;
        }
    }
    let growth = Growth::since(baseline, &s)?;
    println!("12 stored amplifiers of 51 KiB delivered: {growth}");
    growth.assert_below(64 * MIB, "twelve stored 51 KiB amplifiers");
    s.stop().await?;
    Ok(())
}

// ---- 6. fairness: a fast sender is slowed, a healthy recipient is not cut ---------------

fn chat(to: &str, body: &str) -> String {
    Element::new("message", ns::CLIENT)
        .with_attr("to", to)
        .with_attr("type", "chat")
        .with_child(Element::new("body", ns::CLIENT).with_text(body))
        .to_xml(ns::CLIENT)
}

/// Reads `n` messages on `c`, within the usual timeout for each.
async fn receive_messages(c: &mut Client, n: usize) -> Result<()> {
    for i in 0..n {
        c.expect(|e| e.name() == "message")
            .await
            .with_context(|| format!("message {i} of {n}"))?;
    }
    Ok(())
}

/// Bob writes 5,000 small chat messages to Alice in one write (1,100 used to cut her off
/// with "too many unread stanzas" although she was reading). Bob is slowed instead: Alice
/// gets every message, nobody is disconnected, and the same holds when both flood each
/// other at once (each one's stream keeps writing its own queue while it waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_sender_is_slowed_and_a_reading_recipient_keeps_up() -> Result<()> {
    const N: usize = 5_000;
    let s = Stress::start(
        "client_read_rate = 0",
        &[("alice", "wonderland"), ("bob", "builder")],
    )
    .await?;
    let mut alice = s.login("alice", "wonderland", "reader").await?;
    let mut bob = s.login("bob", "builder", "flood").await?;
    let flood = chat(&alice.jid, "hello").repeat(N);
    let (sent, got) = tokio::join!(bob.send_str(&flood), receive_messages(&mut alice, N));
    sent?;
    got?;
    bob.ping().await?;
    alice.ping().await?;

    drop((alice, bob));

    // Both ways at once, each client reading while it writes.
    let a = raw_session(s.addr(), &s.pki, "alice", "wonderland").await?;
    let b = raw_session(s.addr(), &s.pki, "bob", "builder").await?;
    let to_bob = chat(&format!("bob@{DOMAIN}/flood"), "hi bob").repeat(N);
    let to_alice = chat(&format!("alice@{DOMAIN}/flood"), "hi alice").repeat(N);
    let (a_done, b_done) = tokio::join!(
        flood_and_count(a, to_bob, N),
        flood_and_count(b, to_alice, N)
    );
    a_done.context("alice")?;
    b_done.context("bob")?;
    let log = s.stop().await?;
    let kills: Vec<&String> = log.iter().filter(|l| l.contains("slow reader")).collect();
    assert!(kills.is_empty(), "a reading client was cut off: {kills:#?}");
    Ok(())
}

/// Writes `flood` on `raw` while reading from it until `n` messages have arrived.
async fn flood_and_count(
    raw: RawStream<tokio_rustls::client::TlsStream<TcpStream>>,
    flood: String,
    n: usize,
) -> Result<()> {
    let RawStream { io, mut parser } = raw;
    let (mut rd, mut wr) = tokio::io::split(io);
    let writer = async move {
        wr.write_all(flood.as_bytes()).await?;
        wr.flush().await?;
        Ok::<_, anyhow::Error>(wr)
    };
    let reader = async move {
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        while got < n {
            match parser.next_event()? {
                Some(StreamEvent::Element(e)) if e.name() == "message" => got += 1,
                Some(StreamEvent::Element(_)) => {}
                Some(other) => bail!("unexpected {other:?} after {got} messages"),
                None => {
                    let r = tokio::time::timeout(TIMEOUT, rd.read(&mut buf)).await;
                    let read = r.map_err(|_| anyhow!("no message for 10 s after {got}"))??;
                    ensure!(read > 0, "closed after {got} of {n} messages");
                    parser.feed(&buf[..read]);
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    let (w, r) = tokio::join!(writer, reader);
    w?;
    r
}

/// A client that asks for large replies without reading them. Mallory stores a 90 KiB
/// vCard and sends 200 requests for it in one write (18 MiB of replies: 350 requests for a
/// large roster took 1.45 GiB). Her stream writes her replies out before it handles more
/// of her requests (her session queue is bounded in bytes too), so the server holds a few
/// MiB, not the replies; when she reads, all 400 arrive, and another client is answered
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_large_replies_are_not_queued_beyond_a_bound() -> Result<()> {
    const ASKS: usize = 200;
    let s = Stress::start(
        "client_read_rate = 0",
        &[("mallory", "mallory pw"), ("carol", "probing")],
    )
    .await?;
    let probe = Probe::start(s.login("carol", "probing", "probe").await?);
    let mut mallory = raw_session(s.addr(), &s.pki, "mallory", "mallory pw").await?;
    let photo = "QUJD".repeat(22 * 1024);
    let set = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("id", "v")
        .with_child(
            Element::new("vCard", "vcard-temp")
                .with_child(Element::new("FN", "vcard-temp").with_text("Mallory"))
                .with_child(Element::new("DESC", "vcard-temp").with_text(photo)),
        );
    mallory.send(&set).await?;
    let reply = mallory.element().await?;
    ensure!(reply.attr("type") == Some("result"), "{reply}");
    let get = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_child(Element::new("vCard", "vcard-temp"));
    let asks: String = (0..ASKS)
        .map(|i| {
            get.clone()
                .with_attr("id", format!("g{i}"))
                .to_xml(ns::CLIENT)
        })
        .collect();
    let baseline = s.baseline()?;
    let RawStream { io, mut parser } = mallory;
    let (mut rd, mut wr) = tokio::io::split(io);
    // Her requests go out while she reads nothing (the socket buffers take them, or the
    // server stops reading and TCP holds the rest back).
    let writer = tokio::spawn(async move {
        wr.write_all(asks.as_bytes()).await?;
        wr.flush().await?;
        Ok::<_, anyhow::Error>(wr)
    });
    let writer = match tokio::time::timeout(Duration::from_secs(3), writer).await {
        Ok(done) => Some(done??),
        Err(_) => None, // held back by TCP: the server stopped reading her
    };
    let unread = Growth::since(baseline, &s)?;
    // Now she reads: every reply arrives.
    let mut buf = vec![0u8; 1 << 16];
    let mut replies = 0;
    while replies < ASKS {
        match parser.next_event()? {
            Some(StreamEvent::Element(e)) => {
                ensure!(e.attr("type") == Some("result"), "{}", e.name());
                replies += 1;
            }
            Some(other) => bail!("unexpected {other:?} after {replies} replies"),
            None => {
                let n = tokio::time::timeout(TIMEOUT, rd.read(&mut buf)).await??;
                ensure!(n > 0, "closed after {replies} of {ASKS} replies");
                parser.feed(&buf[..n]);
            }
        }
    }
    drop(writer);
    let growth = Growth::since(baseline, &s)?;
    println!("{ASKS} requests for 90 KiB replies left unread: {unread}; all read: {growth}");
    unread.assert_below(12 * MIB, "unread large replies");
    growth.assert_below(12 * MIB, "large replies read late");
    probe.finish(Duration::from_secs(2)).await?;
    s.stop().await?;
    Ok(())
}

/// Several senders fill the queue of a recipient who reads nothing with large messages:
/// her queue is bounded in bytes (`limits.session_queue_bytes`, here 4 MiB) as well as in
/// stanzas, she is cut off as a slow reader, and the server grows by a few MiB although
/// 12 MiB were sent to her.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_is_bounded_in_bytes_as_well_as_stanzas() -> Result<()> {
    let s = Stress::start(
        "session_queue_bytes = 4194304\nclient_read_rate = 0",
        &[
            ("alice", "wonderland"),
            ("bob", "builder"),
            ("dave", "dave pw"),
            ("erin", "erin pw"),
        ],
    )
    .await?;
    let alice = s.login("alice", "wonderland", "asleep").await?;
    let baseline = s.baseline()?;
    let big = headline(&alice.jid, &"x".repeat(100 * 1024));
    let mut senders = JoinSet::new();
    for (user, pw) in [("bob", "builder"), ("dave", "dave pw"), ("erin", "erin pw")] {
        let mut c = s.login(user, pw, "sender").await?;
        let big = big.clone();
        senders.spawn(async move {
            // 40 × 100 KiB each; the server may stop reading a paced sender for a while.
            for _ in 0..40 {
                c.send_str(&big).await?;
            }
            c.ping().await?;
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = senders.join_next().await {
        r??;
    }
    let growth = Growth::since(baseline, &s)?;
    println!("12 MiB sent to a client that reads nothing: {growth}");
    growth.assert_below(10 * MIB, "large messages to a slow reader");
    drop(alice);
    let log = s.stop().await?;
    assert!(
        log.iter()
            .any(|l| l.contains("slow reader") && l.contains("alice@")),
        "alice was not cut off as a slow reader: {log:#?}"
    );
    Ok(())
}
