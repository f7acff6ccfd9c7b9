//! The four scenarios. Every count and duration is bounded by its arguments.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::stats::{own_cpu, process_cpu, process_rss_kib, Latencies};
use crate::xmpp::{Session, Target};
use crate::TargetArgs;

/// CPU use of the generator and of the server over a measured interval.
struct CpuMeter {
    wall: Instant,
    own: Duration,
    server: Option<(u32, Duration)>,
}

impl CpuMeter {
    fn start(pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            wall: Instant::now(),
            own: own_cpu(),
            server: pid.and_then(|p| process_cpu(p).map(|c| (p, c))),
        }
    }

    /// (generator %, server %) of one core.
    fn percent(&self) -> (f64, Option<f64>) {
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        let own = (own_cpu().saturating_sub(self.own)).as_secs_f64() / wall * 100.0;
        let server = self.server.and_then(|(pid, before)| {
            process_cpu(pid).map(|now| now.saturating_sub(before).as_secs_f64() / wall * 100.0)
        });
        (own, server)
    }

    fn fields(&self) -> String {
        let (own, server) = self.percent();
        match server {
            Some(s) => format!("gen_cpu={own:.0} server_cpu={s:.0}"),
            None => format!("gen_cpu={own:.0}"),
        }
    }
}

/// Logs in accounts `first..first+count` with at most `concurrency` logins at once.
async fn login_many(
    target: &Arc<Target>,
    t: &TargetArgs,
    first: usize,
    count: usize,
    concurrency: usize,
    presence: bool,
) -> Result<Vec<Session>> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for i in first..first + count {
        let target = target.clone();
        let user = t.account(i);
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let s = target
                .login(&user, "bench", presence)
                .await
                .with_context(|| format!("login of {user}"))?;
            anyhow::Ok((i, s))
        });
    }
    let mut sessions = Vec::with_capacity(count);
    while let Some(r) = set.join_next().await {
        sessions.push(r??);
    }
    // In account order, so that callers can pair sessions by account number.
    sessions.sort_by_key(|(i, _)| *i);
    Ok(sessions.into_iter().map(|(_, s)| s).collect())
}

#[derive(Args)]
pub struct IdleArgs {
    /// Sessions to open.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Logins in flight at once while opening them.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Seconds to wait after the last login before reading the server's memory.
    #[arg(long, default_value_t = 3)]
    settle: u64,
}

pub async fn idle(t: &TargetArgs, target: Target, a: IdleArgs) -> Result<()> {
    let target = Arc::new(target);
    let before = t.server_pid.and_then(process_rss_kib);
    let cpu = CpuMeter::start(t.server_pid);
    let sessions = login_many(&target, t, 0, a.sessions, a.concurrency, true).await?;
    let took = cpu.wall.elapsed();
    let cpu_fields = cpu.fields();
    tokio::time::sleep(Duration::from_secs(a.settle)).await;
    let after = t.server_pid.and_then(process_rss_kib);
    let mut line = format!(
        "RESULT scenario=idle tls={} sessions={} login_secs={:.2} {cpu_fields}",
        t.starttls,
        sessions.len(),
        took.as_secs_f64()
    );
    println!(
        "{} idle sessions open ({}) in {:.2} s",
        sessions.len(),
        if t.starttls { "STARTTLS" } else { "plaintext" },
        took.as_secs_f64()
    );
    if let (Some(b), Some(a)) = (before, after) {
        let per = (a.saturating_sub(b)) as f64 * 1024.0 / sessions.len().max(1) as f64;
        println!(
            "server RSS {b} KiB before, {a} KiB after: {:.1} KB per session",
            per / 1000.0
        );
        line.push_str(&format!(
            " rss_before_kib={b} rss_after_kib={a} bytes_per_session={per:.0}"
        ));
    }
    println!("{line}");
    let mut set = JoinSet::new();
    for s in sessions {
        set.spawn(s.close());
    }
    while set.join_next().await.is_some() {}
    Ok(())
}

#[derive(Args)]
pub struct LoginArgs {
    /// Logins in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Accounts to log in as (numbers 0..N), round robin.
    #[arg(long, default_value_t = 100)]
    users: usize,
}

pub async fn login(t: &TargetArgs, target: Target, a: LoginArgs) -> Result<()> {
    let target = Arc::new(target);
    // Once per account first: the client's SaltedPassword cache is filled, as a real
    // client's is after its first login.
    for s in login_many(&target, t, 0, a.users, a.concurrency, true).await? {
        s.close().await;
    }
    let cpu = CpuMeter::start(t.server_pid);
    let end = Instant::now() + Duration::from_secs(a.duration);
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for w in 0..a.concurrency.max(1) {
        let (target, next) = (target.clone(), next.clone());
        let users: Vec<String> = (0..a.users.max(1)).map(|i| t.account(i)).collect();
        set.spawn(async move {
            let mut lat = Latencies::default();
            let mut failures = 0u64;
            while Instant::now() < end {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let user = users.get(n % users.len()).cloned().unwrap_or_default();
                let started = Instant::now();
                match target.login(&user, &format!("l{w}-{n}"), true).await {
                    Ok(s) => {
                        lat.add(started.elapsed());
                        s.close().await;
                    }
                    Err(e) => {
                        failures += 1;
                        if failures <= 3 {
                            eprintln!("login failed: {e:#}");
                        }
                    }
                }
            }
            (lat, failures)
        });
    }
    let mut lat = Latencies::default();
    let mut failures = 0;
    while let Some(r) = set.join_next().await {
        let (l, f) = r?;
        lat.merge(l);
        failures += f;
    }
    let secs = cpu.wall.elapsed().as_secs_f64();
    let count = lat.0.len();
    let (p50, p99, max) = lat.summary();
    println!(
        "{count} logins in {secs:.2} s: {:.0} logins/s at concurrency {}; login latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {failures} failed",
        count as f64 / secs,
        a.concurrency,
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0,
        max as f64 / 1000.0
    );
    println!(
        "RESULT scenario=login tls={} logins={count} secs={secs:.2} logins_per_sec={:.0} p50_us={p50} p99_us={p99} max_us={max} failed={failures} {}",
        t.starttls,
        count as f64 / secs,
        cpu.fields()
    );
    Ok(())
}

#[derive(Args)]
pub struct ChatArgs {
    /// Pairs of sessions; the first of each pair sends to the second.
    #[arg(long, default_value_t = 50)]
    pairs: usize,
    /// Seconds to measure (after the warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of sending before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Messages per pair in flight at once (peak mode).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Total messages per second, spread evenly over the senders (open loop); without
    /// it, every pair sends as fast as its window allows.
    #[arg(long)]
    rate: Option<f64>,
    /// Characters of text in each body besides the timestamp.
    #[arg(long, default_value_t = 100)]
    body: usize,
}

/// How often the open loop's pacing thread wakes.
const PACE_TICK: Duration = Duration::from_micros(100);

/// Open-loop pacing finer than tokio's millisecond timer: one slot per sender. A thread
/// wakes every [`PACE_TICK`] and tells each sender how many messages it should have sent by
/// then; sender `p` runs `p / pairs` of its interval behind the first, so the senders write
/// spread over time as independent clients would, not all at once on a timer tick.
struct PaceSlot {
    /// Messages due from this sender since the start.
    due: AtomicU64,
    wake: tokio::sync::Notify,
}

fn start_pacer(pairs: usize, per_pair: f64, end: Instant) -> Vec<Arc<PaceSlot>> {
    let slots: Vec<Arc<PaceSlot>> = (0..pairs)
        .map(|_| {
            Arc::new(PaceSlot {
                due: AtomicU64::new(0),
                wake: tokio::sync::Notify::new(),
            })
        })
        .collect();
    let shared = slots.clone();
    std::thread::spawn(move || {
        let started = Instant::now();
        while Instant::now() < end {
            std::thread::sleep(PACE_TICK);
            let t = started.elapsed().as_secs_f64() * per_pair;
            for (p, slot) in shared.iter().enumerate() {
                let due = (t + p as f64 / pairs as f64) as u64;
                if due > slot.due.load(Ordering::Relaxed) {
                    slot.due.store(due, Ordering::Release);
                    slot.wake.notify_one();
                }
            }
        }
    });
    slots
}

fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Finds `#T<digits>#` timestamps in a byte stream, across reads.
#[derive(Default)]
struct MarkerScanner {
    state: u8,
    value: u64,
}

impl MarkerScanner {
    fn feed(&mut self, data: &[u8], mut found: impl FnMut(u64)) {
        for &b in data {
            self.state = match (self.state, b) {
                (_, b'#') if self.state == 2 => {
                    found(self.value);
                    0
                }
                (_, b'#') => 1,
                (1, b'T') => {
                    self.value = 0;
                    2
                }
                (2, d) if d.is_ascii_digit() => {
                    self.value = self
                        .value
                        .wrapping_mul(10)
                        .wrapping_add(u64::from(d - b'0'));
                    2
                }
                _ => 0,
            };
        }
    }
}

pub async fn chat(t: &TargetArgs, target: Target, a: ChatArgs) -> Result<()> {
    let target = Arc::new(target);
    let pairs = a.pairs.max(1);
    let sessions = login_many(&target, t, 0, 2 * pairs, 100, true).await?;

    let start = now_ns();
    let measure_from = start + a.warmup * 1_000_000_000;
    let measure_to = measure_from + a.duration * 1_000_000_000;
    let end = Instant::now() + Duration::from_secs(a.warmup + a.duration);
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let filler = "x".repeat(a.body);
    let mut receivers = JoinSet::new();
    let mut senders = JoinSet::new();
    let mut it = sessions.into_iter();
    let pace = a.rate.map(|r| start_pacer(pairs, r / pairs as f64, end));
    for p in 0..pairs {
        let (Some(from), Some(to)) = (it.next(), it.next()) else {
            bail!("fewer sessions than pairs");
        };
        let to_jid = format!("{}@{}", t.account(2 * p + 1), t.domain);
        let window = Arc::new(Semaphore::new(a.window.max(1)));
        let (mut rd, wr_to) = tokio::io::split(to.io);
        let (mut rd_from, mut wr) = tokio::io::split(from.io);
        let received = received.clone();
        let w2 = window.clone();
        receivers.spawn(async move {
            let _keep_open = wr_to;
            let mut lat = Latencies::default();
            let mut scan = MarkerScanner::default();
            let mut buf = vec![0u8; 65536];
            let drain_until = end + Duration::from_secs(2);
            while let Ok(Ok(n)) =
                tokio::time::timeout_at(drain_until.into(), rd.read(&mut buf)).await
            {
                let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
                    break;
                };
                let now = now_ns();
                scan.feed(chunk, |sent_at| {
                    w2.add_permits(1);
                    if (measure_from..measure_to).contains(&sent_at) {
                        received.fetch_add(1, Ordering::Relaxed);
                        lat.add(Duration::from_nanos(now.saturating_sub(sent_at)));
                    }
                });
                if now > measure_to && Instant::now() > end {
                    break;
                }
            }
            lat
        });
        // Whatever the server sends the sender (errors, if any) is read and counted.
        receivers.spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut errors = 0usize;
            while let Ok(Ok(n)) = tokio::time::timeout_at(
                (end + Duration::from_secs(2)).into(),
                rd_from.read(&mut buf),
            )
            .await
            {
                let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
                    break;
                };
                errors += chunk
                    .windows(12)
                    .filter(|w| w == b"type='error'" || w == b"type=\"error\"")
                    .count();
            }
            if errors > 0 {
                eprintln!("a sender got {errors} errors");
            }
            Latencies::default()
        });
        let sent = sent.clone();
        let prefix = format!("<message to='{to_jid}' type='chat'><body>#T");
        let suffix = format!("# {filler}</body></message>");
        let due = pace.as_ref().and_then(|slots| slots.get(p).cloned());
        senders.spawn(async move {
            let mut buf = Vec::with_capacity(64 * 1024);
            let mut count = 0u64;
            loop {
                let n = match &due {
                    None => {
                        let Ok(Ok(p)) = tokio::time::timeout_at(end.into(), window.acquire()).await
                        else {
                            break;
                        };
                        p.forget();
                        let mut n = 1;
                        while n < 64 {
                            match window.try_acquire() {
                                Ok(p) => {
                                    p.forget();
                                    n += 1;
                                }
                                Err(_) => break,
                            }
                        }
                        n
                    }
                    Some(slot) => {
                        if tokio::time::timeout_at(end.into(), slot.wake.notified())
                            .await
                            .is_err()
                        {
                            break;
                        }
                        let n = slot.due.load(Ordering::Acquire).saturating_sub(count);
                        if n == 0 {
                            continue;
                        }
                        n.min(1024) as usize
                    }
                };
                buf.clear();
                let ts = now_ns().to_string();
                for _ in 0..n {
                    buf.extend_from_slice(prefix.as_bytes());
                    buf.extend_from_slice(ts.as_bytes());
                    buf.extend_from_slice(suffix.as_bytes());
                }
                match tokio::time::timeout_at(end.into(), wr.write_all(&buf)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
                count += n as u64;
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            let _ = wr.flush().await;
            wr
        });
    }
    // CPU is measured over the measured window only.
    tokio::time::sleep_until(
        (Instant::now() + Duration::from_nanos(measure_from.saturating_sub(now_ns()))).into(),
    )
    .await;
    let meter = CpuMeter::start(t.server_pid);
    tokio::time::sleep_until(end.into()).await;
    let cpu_fields = meter.fields();
    let mut writers = Vec::new();
    while let Some(r) = senders.join_next().await {
        writers.push(r?);
    }
    let mut lat = Latencies::default();
    while let Some(r) = receivers.join_next().await {
        lat.merge(r?);
    }
    drop(writers);
    let count = received.load(Ordering::Relaxed);
    let rate = count as f64 / a.duration.max(1) as f64;
    let (p50, p99, max) = lat.summary();
    let mode = match a.rate {
        Some(r) => format!("offered {r:.0} msgs/s"),
        None => format!("window {} per pair", a.window),
    };
    println!(
        "{pairs} pairs, {mode}: {rate:.0} msgs/s delivered; latency p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} sent in all)",
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0,
        max as f64 / 1000.0,
        sent.load(Ordering::Relaxed)
    );
    println!(
        "RESULT scenario=chat tls={} pairs={pairs} offered={} msgs_per_sec={rate:.0} p50_us={p50} p99_us={p99} max_us={max} {cpu_fields}",
        t.starttls,
        a.rate.map(|r| format!("{r:.0}")).unwrap_or_else(|| "peak".into()),
    );
    Ok(())
}

#[derive(Args)]
pub struct OfflineArgs {
    /// Online senders (accounts 0..S).
    #[arg(long, default_value_t = 32)]
    senders: usize,
    /// Offline recipients: account names with `{}` for the number.
    #[arg(long, default_value = "off{}")]
    recipients: String,
    /// How many offline recipients (numbers 0..R) the messages are spread over.
    #[arg(long, default_value_t = 1000)]
    recipient_count: usize,
    /// Messages a sender sends before the ping that acknowledges them.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Messages in all (the run ends at this count or the duration, whichever first).
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Seconds at most.
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

/// A message to an offline user counts once the server answered a ping sent after it on
/// the same stream: stanzas of one stream are handled in order, and an offline message
/// is durable before anything later on its stream is answered (docs/durability.md).
pub async fn offline(t: &TargetArgs, target: Target, a: OfflineArgs) -> Result<()> {
    let target = Arc::new(target);
    let sessions = login_many(&target, t, 0, a.senders.max(1), 100, true).await?;
    let meter = CpuMeter::start(t.server_pid);
    let end = Instant::now() + Duration::from_secs(a.duration);
    let budget = Arc::new(AtomicU64::new(a.messages));
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for mut s in sessions {
        let (budget, next) = (budget.clone(), next.clone());
        let recipients: Vec<String> = (0..a.recipient_count.max(1))
            .map(|i| {
                format!(
                    "{}@{}",
                    a.recipients.replace("{}", &i.to_string()),
                    t.domain
                )
            })
            .collect();
        let batch = a.batch.max(1) as u64;
        set.spawn(async move {
            let mut acked = 0u64;
            let mut lat = Latencies::default();
            let mut buf = String::new();
            let mut round = 0u64;
            while Instant::now() < end {
                let n = budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| Some(left.saturating_sub(batch)))
                    .map(|left| left.min(batch))
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.clear();
                for _ in 0..n {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let to = recipients.get(k % recipients.len()).map(String::as_str).unwrap_or("");
                    buf.push_str(&format!(
                        "<message to='{to}' type='chat' id='o{k}'><body>offline message {k}</body></message>"
                    ));
                }
                round += 1;
                let id = format!("ack{round}");
                buf.push_str(&format!("<iq type='get' id='{id}'><ping xmlns='urn:xmpp:ping'/></iq>"));
                let started = Instant::now();
                s.write(buf.as_bytes()).await?;
                let reply = tokio::time::timeout_at(end.into(), async {
                    loop {
                        let e = s.element().await?;
                        if e.attr("type") == Some("error") {
                            bail!("error reply: {e}");
                        }
                        if e.name() == "iq" && e.attr("id") == Some(id.as_str()) {
                            return anyhow::Ok(());
                        }
                    }
                })
                .await;
                match reply {
                    Ok(r) => r?,
                    Err(_) => break,
                }
                acked += n;
                lat.add(started.elapsed());
            }
            s.close().await;
            anyhow::Ok((acked, lat))
        });
    }
    let mut acked = 0;
    let mut lat = Latencies::default();
    while let Some(r) = set.join_next().await {
        let (n, l) = r??;
        acked += n;
        lat.merge(l);
    }
    let secs = meter.wall.elapsed().as_secs_f64();
    let (p50, p99, max) = lat.summary();
    println!(
        "{acked} offline messages acknowledged in {secs:.2} s: {:.0} msgs/s ({} senders, batches of {}; batch latency p50 {:.2} ms, p99 {:.2} ms)",
        acked as f64 / secs,
        a.senders,
        a.batch,
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0
    );
    println!(
        "RESULT scenario=offline tls={} acked={acked} secs={secs:.2} msgs_per_sec={:.0} batch_p50_us={p50} batch_p99_us={p99} batch_max_us={max} {}",
        t.starttls,
        acked as f64 / secs,
        meter.fields()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::MarkerScanner;

    #[test]
    fn markers_across_reads() {
        let mut s = MarkerScanner::default();
        let mut found = Vec::new();
        for chunk in [&b"<body>#T12"[..], b"34# x#x #T5#", b"#T", b"9# ##T7#"] {
            s.feed(chunk, |v| found.push(v));
        }
        assert_eq!(found, vec![1234, 5, 9, 7]);
    }
}
