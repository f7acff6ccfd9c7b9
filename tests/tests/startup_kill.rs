//! A kill at any point of the server's start-up (a crash loop, the OOM killer, systemd's
//! stop timeout) leaves a store that the next start opens, with all its data.
//!
//! sled 0.34 writes a snapshot at each open that follows writes; a kill while that file
//! (`snap.<lsn>.generating`) is unfinished used to leave a store that never opened again.
//! Each round here makes a write (an account, with the server stopped), starts
//! `confab serve` and SIGKILLs it during its start-up: in half of the rounds after a
//! random delay within the start-up time measured at the beginning, in the other half as
//! soon as a snapshot file is being written, the point where that failure happened.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use confab_protocol::sasl::ScramHash;
use confab_protocol::{ns, Element};
use confab_tests::bin::*;
use confab_tests::crash::Rng;
use confab_tests::*;

const ROUNDS: usize = 50;
/// The rounds stop early (after at least [`MIN_ROUNDS`]) once this much time has gone.
const ROUNDS_BUDGET: Duration = Duration::from_secs(40);
const MIN_ROUNDS: usize = 10;
/// Offline messages stored for each recipient before the rounds.
const MESSAGES: usize = 10;

fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

fn password(user: &str) -> String {
    format!("{user}-password")
}

async fn add_user(config: &Path, user: &str) -> Result<()> {
    let out = run_cli(config, &["user", "add", &bare(user)], &password(user)).await?;
    if !out.status.success() {
        bail!(
            "confab user add {user} failed: {}",
            text(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn login(addr: std::net::SocketAddr, pki: &TestPki, user: &str) -> Result<Client> {
    let mut c = Client::connect(addr).await?;
    c.starttls(pki).await?;
    c.authenticate(ScramHash::Sha256, false, user, &password(user))
        .await?;
    c.bind(Some("test")).await?;
    Ok(c)
}

/// SIGTERM, and a successful exit.
async fn stop(served: &mut Served) -> Result<()> {
    let pid = served.child.id().context("already exited")?.to_string();
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

fn unfinished_snapshots(store: &Path) -> Vec<String> {
    std::fs::read_dir(store)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("snap.") && n.ends_with(".generating"))
                .collect()
        })
        .unwrap_or_default()
}

/// How a round kills the server.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// After this many milliseconds.
    After(u64),
    /// As soon as a snapshot file is being written, or after this many milliseconds.
    AtSnapshot(u64),
}

/// Starts `confab serve` and SIGKILLs it as `kill` says; whether it was killed while a
/// snapshot was being written. Polling and killing happen on one thread, so the kill
/// follows the sight of the file by microseconds.
async fn start_and_kill(config: PathBuf, store: PathBuf, kill: Kill) -> Result<bool> {
    tokio::task::spawn_blocking(move || -> Result<bool> {
        let mut child = std::process::Command::new(confab_bin())
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut seen = false;
        match kill {
            Kill::After(ms) => std::thread::sleep(Duration::from_millis(ms)),
            Kill::AtSnapshot(ms) => {
                let deadline = Instant::now() + Duration::from_millis(ms);
                while !seen && Instant::now() < deadline {
                    seen = !unfinished_snapshots(&store).is_empty();
                }
            }
        }
        let early = child.try_wait()?;
        child.kill()?;
        let deadline = Instant::now() + TIMEOUT;
        while child.try_wait()?.is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the server did not die of SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(status) = early {
            bail!("the server exited by itself ({status}) before the kill");
        }
        Ok(seen)
    })
    .await?
}

/// Leaves what a kill between the creation of the next snapshot file and the end of its
/// writes leaves: an empty file, or the first half of the snapshot. An unfinished file that
/// the kill left (`unfinished`) is cut short so; without one, the file is made next to the
/// newest finished snapshot.
fn leave_unfinished_snapshot(store: &Path, unfinished: &[String], empty: bool) -> Result<String> {
    let (name, whole) = match unfinished.first() {
        Some(name) => (name.clone(), std::fs::read(store.join(name))?),
        None => {
            let mut finished: Vec<String> = std::fs::read_dir(store)?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("snap.") && !n.ends_with(".generating"))
                .collect();
            finished.sort();
            let newest = finished.last().context("no snapshot in the store")?;
            let lsn = u64::from_str_radix(newest.trim_start_matches("snap."), 16)?;
            let name = format!("snap.{:016X}.generating", lsn + 1);
            (name, std::fs::read(store.join(newest))?)
        }
    };
    let keep = if empty { 0 } else { whole.len() / 2 };
    std::fs::write(store.join(&name), &whole[..keep])?;
    Ok(format!("{name}: cut to {keep} of {} bytes", whole.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_opens_after_kills_at_random_points_of_start_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::create(dir.path(), &[DOMAIN])?;
    let config = dir.path().join("confab.toml");
    let data = dir.path().join("data");
    let store = data.join("store");
    write_loopback_config(&config, &data, dir.path(), "", "")?;
    let seed = std::env::var("CONFAB_STARTUP_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0012);
    let mut rng = Rng::new(seed);

    // A store with data: accounts, and offline messages that the server acknowledged.
    for user in ["alice", "bob", "carol"] {
        add_user(&config, user).await?;
    }
    let started = Instant::now();
    let mut served = spawn_serve(&config).await?;
    let startup = started.elapsed();
    {
        let mut alice = login(served.addr, &pki, "alice").await?;
        for i in 0..MESSAGES {
            for to in ["bob", "carol"] {
                alice.chat(&bare(to), &format!("to {to} {i}")).await?;
            }
        }
        // Answered after the messages' writes are durable (docs/durability.md).
        alice.ping().await?;
    }
    stop(&mut served).await?;

    // Kill points within the start-up measured just now (a debug build takes tens of
    // milliseconds to open the store, a release build a few).
    let window_ms = (startup.as_millis() as u64).clamp(5, 2_000);
    let rounds_started = Instant::now();
    let (mut rounds, mut left_unfinished, mut seen_in_progress) = (0, 0, 0);
    let mut added = Vec::new();
    for round in 0..ROUNDS {
        if round >= MIN_ROUNDS && rounds_started.elapsed() > ROUNDS_BUDGET {
            break;
        }
        // A write, so that the next open writes a snapshot; it must open the store that
        // the previous round's kill left.
        let user = format!("round{round}");
        add_user(&config, &user).await.with_context(|| {
            format!("round {round}: the store does not open after the last kill")
        })?;
        added.push(user);

        let kill = match round % 4 {
            0 | 2 => Kill::After(rng.range(0, window_ms)),
            _ => Kill::AtSnapshot(window_ms * 2),
        };
        let seen = start_and_kill(config.clone(), store.clone(), kill)
            .await
            .with_context(|| format!("round {round} ({kill:?})"))?;
        seen_in_progress += usize::from(seen);
        let unfinished = unfinished_snapshots(&store);
        left_unfinished += usize::from(!unfinished.is_empty());
        let mut left: Vec<String> = unfinished
            .iter()
            .map(|n| {
                let bytes = std::fs::metadata(store.join(n)).map_or(0, |m| m.len());
                format!("{n}: {bytes} bytes")
            })
            .collect();
        // The kill mostly lands in the snapshot file's fsync, when the file is whole and
        // sled can read it; one a few microseconds earlier, between the file's creation
        // and its last write, leaves a file that sled refuses. Every fourth round leaves
        // that.
        if round % 4 == 3 {
            left.push(leave_unfinished_snapshot(
                &store,
                &unfinished,
                round % 8 == 3,
            )?);
        }
        println!("round {round}: {kill:?}, during a snapshot: {seen}; unfinished: {left:?}");
        rounds += 1;
    }
    println!(
        "{rounds} rounds in {:?} (start-up {startup:?}); {seen_in_progress} kills while a \
         snapshot was written, {left_unfinished} left an unfinished snapshot file; seed {seed}",
        rounds_started.elapsed()
    );
    anyhow::ensure!(rounds >= MIN_ROUNDS, "only {rounds} rounds");

    // It starts, and everything is there.
    let mut served = spawn_serve(&config)
        .await
        .context("the server does not start after the kills")?;
    let out = run_cli(&config, &["user", "list"], "").await?;
    anyhow::ensure!(out.status.success(), "user list: {}", text(&out.stderr));
    let listed = text(&out.stdout);
    for user in ["alice", "bob", "carol"]
        .into_iter()
        .chain(added.iter().map(String::as_str))
    {
        anyhow::ensure!(
            listed.lines().any(|l| l.trim() == bare(user)),
            "{user} is missing: {listed}"
        );
    }
    for to in ["bob", "carol"] {
        let mut c = login(served.addr, &pki, to).await?;
        c.send(&Element::new("presence", ns::CLIENT)).await?;
        for i in 0..MESSAGES {
            c.expect_body(&format!("to {to} {i}"))
                .await
                .with_context(|| format!("{to}'s offline message {i}"))?;
        }
    }
    let bad: Vec<_> = served
        .log
        .iter()
        .filter(|l| l.contains("panicked") || l.contains(" ERROR "))
        .collect();
    anyhow::ensure!(bad.is_empty(), "{bad:#?}");
    stop(&mut served).await?;
    Ok(())
}
