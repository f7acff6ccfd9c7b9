//! The crash test: the real `confab serve` is killed with SIGKILL at random moments while
//! many clients write, restarted, and checked against the durability contract of
//! `docs/durability.md`.
//!
//! One round: the server is running (started fresh, or the one that verified the previous
//! round); senders log in and, each on its own stream, one operation at a time:
//! - send a chat message to an offline recipient, then a ping: the message is
//!   acknowledged when the ping's result arrives (the stream's stanzas are handled in
//!   order, and storing the message is part of handling it);
//! - set a roster item (add or rename a contact): acknowledged by the iq result;
//! - send a subscription request to an offline recipient, then a ping: acknowledged by the
//!   ping's result (the sender's roster item with `ask` and the recipient's pending request);
//! - set private XML storage (XEP-0049): acknowledged by the iq result.
//!
//! After a random delay the server gets SIGKILL. It is started again (the store must open:
//! the server must reach "is running", and no log line may report a panic or an error),
//! and every acknowledged operation of the round is checked: roster items carry their
//! last acknowledged name (or the name of a set still in flight at the kill), private data
//! likewise, each recipient gets every acknowledged message exactly once (unacknowledged
//! ones may or may not be there; none seen in an earlier round may come back), and every
//! acknowledged subscription request. Verification consumes what it checks (offline
//! messages are delivered and deleted, subscription requests are declined), so the store
//! does not grow from round to round.
//!
//! Every wait is an event with a timeout; the only sleep is the random delay before the kill.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use confab_protocol::sasl::ScramHash;
use confab_protocol::{ns, Element};

use crate::bin::{spawn_serve_bin, Served};
use crate::{Client, TestPki, DOMAIN, TIMEOUT};

/// Contacts each sender renames in its roster (a fixed pool keeps rosters bounded).
const CONTACTS: usize = 6;
/// The namespace of the private-storage element the senders overwrite.
const PRIVATE_NS: &str = "urn:confab:crashtest";

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub rounds: usize,
    /// Sending clients, each with an account of its own.
    pub clients: usize,
    /// Recipient accounts, offline while the senders write.
    pub recipients: usize,
    pub seed: u64,
    /// The `confab` binary.
    pub confab: PathBuf,
    /// Range of the delay before the kill, counted from the moment every sender is logged in.
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    /// Print a line per round.
    pub verbose: bool,
    /// The kinds of operation the senders make.
    pub ops: Vec<OpKind>,
}

/// A kind of operation a sender makes, with its share of the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A chat message to an offline recipient, then a ping.
    Message,
    /// A roster set.
    Roster,
    /// A subscription request to an offline recipient, then a ping.
    Subscription,
    /// A private XML set.
    Private,
}

impl OpKind {
    pub const ALL: [OpKind; 4] = [
        OpKind::Message,
        OpKind::Roster,
        OpKind::Subscription,
        OpKind::Private,
    ];

    /// Out of 10 when all kinds are on.
    fn weight(self) -> usize {
        match self {
            OpKind::Message => 5,
            OpKind::Roster => 3,
            OpKind::Subscription | OpKind::Private => 1,
        }
    }

    pub fn parse(s: &str) -> Option<OpKind> {
        match s {
            "messages" | "message" => Some(OpKind::Message),
            "roster" => Some(OpKind::Roster),
            "subscriptions" | "subscription" => Some(OpKind::Subscription),
            "private" => Some(OpKind::Private),
            _ => None,
        }
    }
}

impl Options {
    pub fn new(confab: PathBuf) -> Options {
        Options {
            rounds: 50,
            clients: 20,
            recipients: 10,
            seed: 1,
            confab,
            min_delay_ms: 50,
            max_delay_ms: 1500,
            verbose: true,
            ops: OpKind::ALL.to_vec(),
        }
    }
}

/// Figures of a run.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub rounds: usize,
    /// Operations sent (acknowledged or not).
    pub sent: usize,
    pub acknowledged: usize,
    /// Acknowledged operations found as the contract says after the restart.
    pub verified: usize,
    /// Acknowledged operations missing or wrong after the restart.
    pub lost: usize,
    /// Messages delivered twice, or again in a later round.
    pub duplicates: usize,
    /// Unacknowledged operations that were found done anyway (allowed).
    pub unacked_present: usize,
    pub messages_acked: usize,
    pub roster_acked: usize,
    pub subscriptions_acked: usize,
    pub private_acked: usize,
    /// Problems other than losses: refused operations, errors in the server's log,
    /// client failures before the kill.
    pub problems: Vec<String>,
}

impl Totals {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.problems.is_empty()
    }
}

/// A small deterministic generator (splitmix64), so a seed replays the same choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn sender(i: usize) -> String {
    format!("s{i}")
}
fn recipient(j: usize) -> String {
    format!("r{j}")
}
fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}
fn password(user: &str) -> String {
    format!("pw-{user}")
}
fn contact(k: usize) -> String {
    format!("c{k}@example.net")
}

/// A value written by a sequence of sets on one stream: the value known to be durable
/// (acknowledged, or observed at the last verification; `None`: absent) and the values
/// sent after it without an acknowledgement (at most one, as each stream has one
/// operation in flight).
#[derive(Debug, Default, Clone)]
struct Register {
    durable: Option<String>,
    in_flight: Vec<String>,
    /// Values acknowledged since the last verification, in order.
    acks: Vec<String>,
}

impl Register {
    fn sent(&mut self, v: &str) {
        self.in_flight.push(v.to_string());
    }
    fn acked(&mut self, v: &str) {
        self.durable = Some(v.to_string());
        self.in_flight.clear();
        self.acks.push(v.to_string());
    }
    /// Checks an observed value; returns (verified, lost, unacked_present) and makes the
    /// observation the new baseline.
    fn verify(&mut self, observed: Option<String>) -> (usize, usize, usize, Option<String>) {
        let ok = observed == self.durable
            || observed
                .as_ref()
                .is_some_and(|o| self.in_flight.contains(o));
        let unacked = usize::from(ok && observed != self.durable);
        let problem = (!ok).then(|| {
            format!(
                "expected {:?} (or one of {:?}), found {:?}",
                self.durable, self.in_flight, observed
            )
        });
        let acks = std::mem::take(&mut self.acks);
        // When an older acknowledged value came back, the acknowledgements after it are the
        // ones lost (one, at least: the baseline itself).
        let lost = match observed
            .as_ref()
            .and_then(|o| acks.iter().position(|a| a == o))
        {
            Some(at) => acks.len() - at - 1,
            None => acks.len(),
        }
        .max(1);
        let verified = if ok {
            acks.len()
        } else {
            acks.len().saturating_sub(lost)
        };
        self.durable = observed;
        self.in_flight.clear();
        if ok {
            (verified, 0, unacked, None)
        } else {
            (verified, lost, 0, problem)
        }
    }
}

/// What the clients of the current round record.
#[derive(Debug, Default)]
struct State {
    /// (sender, contact) → roster item name.
    roster: HashMap<(usize, usize), Register>,
    /// sender → private storage value.
    private: HashMap<usize, Register>,
    /// This round: message id → recipient, for every message sent.
    msgs_sent: HashMap<String, usize>,
    /// This round: acknowledged message ids by recipient.
    msgs_acked: HashMap<usize, Vec<String>>,
    /// This round: (sender, recipient) of subscription requests sent / acknowledged.
    subs_sent: HashSet<(usize, usize)>,
    subs_acked: HashSet<(usize, usize)>,
    /// Every message id delivered in any round.
    delivered: HashSet<String>,
    sent: usize,
    acked_msgs: usize,
    acked_roster: usize,
    acked_subs: usize,
    acked_private: usize,
    problems: Vec<String>,
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    confab: PathBuf,
}

fn write_config(dir: &Path) -> Result<PathBuf> {
    let config = dir.join("confab.toml");
    crate::bin::write_loopback_config(
        &config,
        &dir.join("data"),
        dir,
        "",
        "\n[limits]\nmax_offline_messages = 1000000\n",
    )?;
    Ok(config)
}

/// Runs `confab --config F <args>` with `stdin`; fails unless it succeeds in time.
async fn confab_cli(s: &Setup, args: &[&str], stdin: &str) -> Result<String> {
    let out = crate::bin::run_cli_with(
        &s.confab,
        &s.config,
        None,
        args,
        stdin,
        Duration::from_secs(60),
    )
    .await?;
    if !out.status.success() {
        bail!(
            "confab {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Log lines that mean the server did not come through cleanly.
fn bad_lines(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains("panicked") || l.contains(" ERROR "))
        .cloned()
        .collect()
}

async fn login(addr: std::net::SocketAddr, pki: &TestPki, user: &str, res: &str) -> Result<Client> {
    let mut c = Client::connect(addr).await?;
    c.starttls(pki).await?;
    c.authenticate(ScramHash::Sha256, false, user, &password(user))
        .await?;
    c.bind(Some(res)).await?;
    Ok(c)
}

fn ping(id: &str) -> Element {
    Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("id", id)
        .with_attr("to", DOMAIN)
        .with_child(Element::new("ping", ns::PING))
}

fn is_reply(e: &Element, id: &str) -> bool {
    e.name() == "iq"
        && e.attr("id") == Some(id)
        && matches!(e.attr("type"), Some("result") | Some("error"))
}

/// Sends a ping and waits for its result; an error stanza for `watch` (the id of the
/// stanza sent just before) that arrives first is returned as `Err`.
async fn ping_after(c: &mut Client, watch: &str) -> Result<std::result::Result<(), Element>> {
    let id = c.new_id();
    c.send(&ping(&id)).await?;
    let got = c
        .expect(|e| {
            is_reply(e, &id) || (e.attr("type") == Some("error") && e.attr("id") == Some(watch))
        })
        .await?;
    if got.name() == "iq" && got.attr("id") == Some(id.as_str()) {
        if got.attr("type") != Some("result") {
            bail!("ping failed: {got}");
        }
        return Ok(Ok(()));
    }
    c.expect(|e| is_reply(e, &id)).await?;
    Ok(Err(got))
}

/// One sender's stream during a round: operations one at a time until the connection
/// ends (the kill). Errors after the kill are the expected end; before it, a problem.
async fn sender_loop(
    mut c: Client,
    i: usize,
    round: usize,
    recipients: usize,
    ops: &[OpKind],
    mut rng: Rng,
    state: Arc<Mutex<State>>,
) -> Result<()> {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let table: Vec<OpKind> = ops
        .iter()
        .flat_map(|k| std::iter::repeat_n(*k, k.weight()))
        .collect();
    anyhow::ensure!(!table.is_empty(), "no operations to make");
    for n in 0.. {
        let pick = table[rng.below(table.len())];
        if pick == OpKind::Message {
            let j = rng.below(recipients);
            let id = format!("m{round}.{i}.{n}");
            {
                let mut s = lock();
                s.msgs_sent.insert(id.clone(), j);
                s.sent += 1;
            }
            let msg = crate::chat(&bare(&recipient(j)), &id).with_attr("id", id.clone());
            c.send(&msg).await?;
            match ping_after(&mut c, &id).await? {
                Ok(()) => {
                    let mut s = lock();
                    s.msgs_acked.entry(j).or_default().push(id);
                    s.acked_msgs += 1;
                }
                Err(e) => lock().problems.push(format!("message {id} refused: {e}")),
            }
        } else if pick == OpKind::Roster {
            let k = rng.below(CONTACTS);
            let name = format!("n{round}.{i}.{n}");
            {
                let mut s = lock();
                s.roster.entry((i, k)).or_default().sent(&name);
                s.sent += 1;
            }
            let mut item = Element::new("item", ns::ROSTER)
                .with_attr("jid", contact(k))
                .with_attr("name", name.clone());
            if n % 2 == 0 {
                item.append_child(Element::new("group", ns::ROSTER).with_text("crash"));
            }
            let reply = c
                .iq(Element::new("iq", ns::CLIENT)
                    .with_attr("type", "set")
                    .with_child(Element::new("query", ns::ROSTER).with_child(item)))
                .await?;
            let mut s = lock();
            if reply.attr("type") == Some("result") {
                s.roster.entry((i, k)).or_default().acked(&name);
                s.acked_roster += 1;
            } else {
                s.problems
                    .push(format!("roster set {name} refused: {reply}"));
            }
        } else if pick == OpKind::Subscription {
            let j = rng.below(recipients);
            let id = format!("p{round}.{i}.{n}");
            {
                let mut s = lock();
                s.subs_sent.insert((i, j));
                s.sent += 1;
            }
            let p = crate::presence(Some("subscribe"), Some(&bare(&recipient(j))))
                .with_attr("id", id.clone());
            c.send(&p).await?;
            match ping_after(&mut c, &id).await? {
                Ok(()) => {
                    let mut s = lock();
                    // A repeated request for the same pair is one thing to check.
                    if s.subs_acked.insert((i, j)) {
                        s.acked_subs += 1;
                    }
                }
                Err(e) => lock()
                    .problems
                    .push(format!("subscription request {id} refused: {e}")),
            }
        } else {
            let value = format!("v{round}.{i}.{n}");
            {
                let mut s = lock();
                s.private.entry(i).or_default().sent(&value);
                s.sent += 1;
            }
            let reply =
                c.iq(Element::new("iq", ns::CLIENT)
                    .with_attr("type", "set")
                    .with_child(Element::new("query", ns::PRIVATE).with_child(
                        Element::new("exercise", PRIVATE_NS).with_text(value.clone()),
                    )))
                .await?;
            let mut s = lock();
            if reply.attr("type") == Some("result") {
                s.private.entry(i).or_default().acked(&value);
                s.acked_private += 1;
            } else {
                s.problems
                    .push(format!("private set {value} refused: {reply}"));
            }
        }
    }
    Ok(())
}

/// What a sender's verification session saw.
struct SenderView {
    /// contact → (name, ask)
    roster: HashMap<String, (Option<String>, bool)>,
    private: Option<String>,
}

async fn view_sender(
    addr: std::net::SocketAddr,
    pki: Arc<TestPki>,
    i: usize,
) -> Result<SenderView> {
    let user = sender(i);
    let mut c = login(addr, &pki, &user, "verify").await?;
    let query = c.roster_get().await?;
    let roster = query
        .children()
        .filter(|e| e.is("item", ns::ROSTER))
        .filter_map(|e| {
            Some((
                e.attr("jid")?.to_string(),
                (
                    e.attr("name").map(str::to_string),
                    e.attr("ask") == Some("subscribe"),
                ),
            ))
        })
        .collect();
    let reply = c
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_child(
                Element::new("query", ns::PRIVATE).with_child(Element::new("exercise", PRIVATE_NS)),
            ))
        .await?;
    if reply.attr("type") != Some("result") {
        bail!("private get failed for {user}: {reply}");
    }
    let private = reply
        .get_child("query", ns::PRIVATE)
        .and_then(|q| q.get_child("exercise", PRIVATE_NS))
        .map(|e| e.text())
        .filter(|t| !t.is_empty());
    c.close().await?;
    Ok(SenderView { roster, private })
}

/// What a recipient's verification session received: offline messages (id, from, body)
/// and the senders of subscription requests (which it declines, clearing them).
struct RecipientView {
    messages: Vec<(String, String, String)>,
    subscribers: Vec<String>,
}

async fn view_recipient(
    addr: std::net::SocketAddr,
    pki: Arc<TestPki>,
    j: usize,
) -> Result<RecipientView> {
    let user = recipient(j);
    let mut c = login(addr, &pki, &user, "verify").await?;
    // Initial presence: stored messages and subscription requests are handed to the
    // session while the presence is handled, so before the ping's result.
    c.send(&Element::new("presence", ns::CLIENT)).await?;
    let id = c.new_id();
    c.send(&ping(&id)).await?;
    let mut messages = Vec::new();
    let mut subscribers = Vec::new();
    loop {
        let e = c.next().await?;
        if is_reply(&e, &id) {
            break;
        }
        match (e.name(), e.attr("type")) {
            ("message", Some("chat")) => messages.push((
                e.attr("id").unwrap_or_default().to_string(),
                e.attr("from").unwrap_or_default().to_string(),
                e.get_child("body", ns::CLIENT)
                    .map(|b| b.text())
                    .unwrap_or_default(),
            )),
            ("presence", Some("subscribe")) => {
                subscribers.push(e.attr("from").unwrap_or_default().to_string())
            }
            _ => {}
        }
    }
    // Decline every request, so the next round starts from nothing pending (and the
    // sender's `ask` is cleared).
    for from in &subscribers {
        c.send(&crate::presence(Some("unsubscribed"), Some(from)))
            .await?;
    }
    // The delivered messages are deleted once their batch is written; this stream reads
    // its next stanza only after that deletion is flushed, so this ping's answer means
    // they are gone for good (and the declines are stored).
    c.ping().await?;
    c.close().await?;
    Ok(RecipientView {
        messages,
        subscribers,
    })
}

/// Runs the crash test.
pub async fn run(opts: &Options) -> Result<Totals> {
    anyhow::ensure!(
        opts.clients > 0 && opts.recipients > 0,
        "need clients and recipients"
    );
    anyhow::ensure!(opts.min_delay_ms <= opts.max_delay_ms, "bad delay range");
    let dir = tempfile::tempdir()?;
    let pki = Arc::new(TestPki::create(dir.path(), &[DOMAIN])?);
    let setup = Setup {
        config: write_config(dir.path())?,
        dir,
        confab: opts.confab.clone(),
    };

    // Accounts through the real admin path, the server stopped.
    for user in (0..opts.clients)
        .map(sender)
        .chain((0..opts.recipients).map(recipient))
    {
        confab_cli(
            &setup,
            &["user", "add", &bare(&user)],
            &format!("{}\n", password(&user)),
        )
        .await?;
    }

    let mut rng = Rng::new(opts.seed);
    let state = Arc::new(Mutex::new(State::default()));
    let mut totals = Totals::default();
    let started = Instant::now();
    let mut served = start(&setup).await?;

    for round in 1..=opts.rounds {
        let round_start = Instant::now();
        let delay = rng.range(opts.min_delay_ms, opts.max_delay_ms);
        let client_seed = rng.next_u64();
        {
            let mut s = lock(&state);
            s.msgs_sent.clear();
            s.msgs_acked.clear();
            s.subs_sent.clear();
            s.subs_acked.clear();
        }
        let before = snapshot(&state);

        // The senders log in, then write until the kill.
        let killed = Arc::new(AtomicBool::new(false));
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<()>>(opts.clients);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..opts.clients {
            let (pki, state, killed, ready) =
                (pki.clone(), state.clone(), killed.clone(), ready_tx.clone());
            let addr = served.addr;
            let rng = Rng::new(client_seed ^ (i as u64).wrapping_mul(0x100_0000_01b3));
            let recipients = opts.recipients;
            let ops = opts.ops.clone();
            tasks.spawn(async move {
                let c = match login(addr, &pki, &sender(i), "chaos").await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready
                            .send(Err(e.context(format!("login of {}", sender(i)))))
                            .await;
                        return;
                    }
                };
                let _ = ready.send(Ok(())).await;
                if let Err(e) = sender_loop(c, i, round, recipients, &ops, rng, state.clone()).await
                {
                    if !killed.load(Ordering::SeqCst) {
                        lock(&state).problems.push(format!(
                            "round {round}: sender {i} failed before the kill: {e:#}"
                        ));
                    }
                }
            });
        }
        drop(ready_tx);
        for _ in 0..opts.clients {
            match tokio::time::timeout(TIMEOUT * 3, ready_rx.recv()).await {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) | Err(_) => bail!("round {round}: senders did not log in in time"),
            }
        }
        tokio::time::sleep(Duration::from_millis(delay)).await;

        // SIGKILL. The server must still have been running.
        if let Some(status) = served.child.try_wait()? {
            bail!("round {round}: the server exited by itself ({status}) before the kill");
        }
        killed.store(true, Ordering::SeqCst);
        served.child.start_kill()?;
        tokio::time::timeout(TIMEOUT, served.child.wait())
            .await
            .map_err(|_| anyhow!("round {round}: the killed server did not exit"))??;
        let rest = tokio::time::timeout(TIMEOUT, served.drain)
            .await
            .map_err(|_| anyhow!("round {round}: the killed server's log did not end"))??;
        let bad = bad_lines(&rest);
        if !bad.is_empty() {
            lock(&state).problems.push(format!(
                "round {round}: server log before the kill: {bad:#?}"
            ));
        }
        while let Some(r) = tokio::time::timeout(TIMEOUT * 2, tasks.join_next())
            .await
            .map_err(|_| anyhow!("round {round}: senders did not stop after the kill"))?
        {
            r?;
        }

        // Restart: the store must open cleanly.
        served = start(&setup)
            .await
            .with_context(|| format!("round {round}: restart after SIGKILL"))?;
        let (verified, lost, dups, unacked) = verify(opts, &served, &pki, &state, round).await?;
        let after = snapshot(&state);
        let sent = after.0 - before.0;
        let acked = after.1 - before.1;
        totals.rounds = round;
        totals.sent += sent;
        totals.acknowledged += acked;
        totals.verified += verified;
        totals.lost += lost;
        totals.duplicates += dups;
        totals.unacked_present += unacked;
        if opts.verbose {
            println!(
                "round {round:>3}/{}: killed after {delay:>4} ms; sent {sent:>4}, acknowledged {acked:>4}, \
                 verified {verified:>4}, lost {lost}, duplicates {dups}, unacknowledged but present {unacked} ({:.1} s)",
                opts.rounds,
                round_start.elapsed().as_secs_f64()
            );
        }
        if lost > 0 || dups > 0 {
            // Stop at the first round that breaks the contract: its store is the evidence.
            let problems = lock(&state).problems.clone();
            totals.problems = problems;
            let _ = served.child.start_kill();
            let kept = setup.dir.keep();
            totals.problems.push(format!(
                "round {round} broke the contract; its data is kept in {}",
                kept.join("data").display()
            ));
            finish_totals(&mut totals, &state);
            return Ok(totals);
        }
    }

    // A clean stop at the end, and the store opens offline too.
    stop(&mut served).await?;
    let rest = tokio::time::timeout(TIMEOUT, served.drain).await??;
    let bad = bad_lines(&rest);
    if !bad.is_empty() {
        lock(&state)
            .problems
            .push(format!("server log at the end: {bad:#?}"));
    }
    confab_cli(&setup, &["user", "list"], "")
        .await
        .context("opening the store after the last round")?;
    finish_totals(&mut totals, &state);
    if opts.verbose {
        println!(
            "total: {} rounds, {} operations sent, {} acknowledged ({} messages, {} roster sets, \
             {} subscription requests, {} private sets), {} verified, lost {}, duplicates {}, \
             unacknowledged but present {}, problems {}, {:.1} s",
            totals.rounds,
            totals.sent,
            totals.acknowledged,
            totals.messages_acked,
            totals.roster_acked,
            totals.subscriptions_acked,
            totals.private_acked,
            totals.verified,
            totals.lost,
            totals.duplicates,
            totals.unacked_present,
            totals.problems.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(totals)
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// (sent, acknowledged) so far.
fn snapshot(state: &Mutex<State>) -> (usize, usize) {
    let s = lock(state);
    (
        s.sent,
        s.acked_msgs + s.acked_roster + s.acked_subs + s.acked_private,
    )
}

fn finish_totals(totals: &mut Totals, state: &Mutex<State>) {
    let s = lock(state);
    totals.messages_acked = s.acked_msgs;
    totals.roster_acked = s.acked_roster;
    totals.subscriptions_acked = s.acked_subs;
    totals.private_acked = s.acked_private;
    for p in &s.problems {
        if !totals.problems.contains(p) {
            totals.problems.push(p.clone());
        }
    }
}

/// Starts the server; it must reach "is running" with a clean log.
async fn start(setup: &Setup) -> Result<Served> {
    let served = spawn_serve_bin(&setup.confab, &setup.config).await?;
    let bad = bad_lines(&served.log);
    if !bad.is_empty() {
        bail!("the server did not start cleanly: {bad:#?}");
    }
    Ok(served)
}

/// SIGTERM, and a successful exit.
async fn stop(served: &mut Served) -> Result<()> {
    let pid = served
        .child
        .id()
        .ok_or_else(|| anyhow!("the server already exited"))?
        .to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill -TERM failed");
    let exit = tokio::time::timeout(TIMEOUT * 2, served.child.wait())
        .await
        .map_err(|_| anyhow!("the server did not stop on SIGTERM"))??;
    anyhow::ensure!(exit.success(), "the server exited with {exit} on SIGTERM");
    Ok(())
}

/// Checks the round's acknowledged operations; returns (verified, lost, duplicates,
/// unacknowledged but present).
async fn verify(
    opts: &Options,
    served: &Served,
    pki: &Arc<TestPki>,
    state: &Arc<Mutex<State>>,
    round: usize,
) -> Result<(usize, usize, usize, usize)> {
    let (mut verified, mut lost, mut dups, mut unacked) = (0, 0, 0, 0);
    let mut problems = Vec::new();

    // Senders first: their rosters (items and `ask`) and private data. Recipients decline
    // the subscription requests afterwards, which clears `ask`.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..opts.clients {
        let (addr, pki) = (served.addr, pki.clone());
        set.spawn(async move { (i, view_sender(addr, pki, i).await) });
    }
    let mut senders = HashMap::new();
    while let Some(r) = set.join_next().await {
        let (i, view) = r?;
        senders.insert(
            i,
            view.with_context(|| format!("round {round}: verifying {}", sender(i)))?,
        );
    }
    let mut set = tokio::task::JoinSet::new();
    for j in 0..opts.recipients {
        let (addr, pki) = (served.addr, pki.clone());
        set.spawn(async move { (j, view_recipient(addr, pki, j).await) });
    }
    let mut recipients = HashMap::new();
    while let Some(r) = set.join_next().await {
        let (j, view) = r?;
        recipients.insert(
            j,
            view.with_context(|| format!("round {round}: verifying {}", recipient(j)))?,
        );
    }

    let mut s = lock(state);
    let s = &mut *s;
    for i in 0..opts.clients {
        let view = &senders[&i];
        for k in 0..CONTACTS {
            let observed = view.roster.get(&contact(k)).and_then(|(n, _)| n.clone());
            let reg = s.roster.entry((i, k)).or_default();
            let (v, l, u, p) = reg.verify(observed);
            verified += v;
            lost += l;
            unacked += u;
            if let Some(p) = p {
                problems.push(format!(
                    "round {round}: roster of {} item {}: {p}",
                    sender(i),
                    contact(k)
                ));
            }
        }
        let reg = s.private.entry(i).or_default();
        let (v, l, u, p) = reg.verify(view.private.clone());
        verified += v;
        lost += l;
        unacked += u;
        if let Some(p) = p {
            problems.push(format!("round {round}: private data of {}: {p}", sender(i)));
        }
    }
    for j in 0..opts.recipients {
        let view = &recipients[&j];
        let mut seen = HashSet::new();
        for (id, from, body) in &view.messages {
            if !seen.insert(id.clone()) || s.delivered.contains(id) {
                dups += 1;
                problems.push(format!(
                    "round {round}: {} got message {id} again",
                    recipient(j)
                ));
                continue;
            }
            match s.msgs_sent.get(id) {
                Some(to) if *to == j => {}
                _ => {
                    lost += 1;
                    problems.push(format!(
                        "round {round}: {} got an unexpected message {id}",
                        recipient(j)
                    ));
                    continue;
                }
            }
            let i: usize = id
                .split('.')
                .nth(1)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow!("bad id {id}"))?;
            if body != id || from != &format!("{}/chaos", bare(&sender(i))) {
                lost += 1;
                problems.push(format!(
                    "round {round}: message {id} came back altered: from {from}, body {body}"
                ));
            }
        }
        let acked = s.msgs_acked.get(&j).cloned().unwrap_or_default();
        for id in &acked {
            if seen.contains(id) {
                verified += 1;
            } else {
                lost += 1;
                problems.push(format!(
                    "round {round}: acknowledged message {id} to {} lost",
                    recipient(j)
                ));
            }
        }
        let acked: HashSet<&String> = acked.iter().collect();
        unacked += seen.iter().filter(|id| !acked.contains(id)).count();
        s.delivered.extend(seen);
    }
    let mut subs: Vec<_> = s.subs_sent.iter().copied().collect();
    subs.sort_unstable();
    for (i, j) in subs {
        let asked = senders[&i]
            .roster
            .get(&bare(&recipient(j)))
            .is_some_and(|(_, ask)| *ask);
        let pending = recipients[&j]
            .subscribers
            .iter()
            .any(|f| f == &bare(&sender(i)));
        if s.subs_acked.contains(&(i, j)) {
            if asked && pending {
                verified += 1;
            } else {
                lost += 1;
                problems.push(format!(
                    "round {round}: acknowledged subscription request {} → {} lost (ask {asked}, pending {pending})",
                    sender(i),
                    recipient(j)
                ));
            }
        } else if pending {
            unacked += 1;
        }
    }
    s.problems.extend(problems);
    Ok((verified, lost, dups, unacked))
}
