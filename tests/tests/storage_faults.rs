//! The store's file cannot grow (as on a full disk): writes fail, what was acknowledged
//! before is kept, and a server whose last flush at shutdown failed says so and exits
//! with failure instead of 0.
//!
//! The limit is the process's file size limit (`ulimit -f`, with SIGXFSZ ignored so that
//! a write past it fails with EFBIG instead of killing the process): like ENOSPC on a
//! full disk it fails sled's write of its log, and it needs no privileges or small
//! filesystem. What a real full disk does is in docs/durability.md.

#![cfg(unix)]

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use confab_protocol::sasl::ScramHash;
use confab_protocol::{ns, Element};
use confab_tests::bin::*;
use confab_tests::*;

fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

async fn add_user(config: &Path, user: &str) -> Result<()> {
    let out = run_cli(config, &["user", "add", &bare(user)], "password\n").await?;
    anyhow::ensure!(
        out.status.success(),
        "user add {user}: {}",
        text(&out.stderr)
    );
    Ok(())
}

async fn login(addr: std::net::SocketAddr, pki: &TestPki, user: &str) -> Result<Client> {
    let mut c = Client::connect(addr).await?;
    c.starttls(pki).await?;
    c.authenticate(ScramHash::Sha256, false, user, "password")
        .await?;
    c.bind(Some("test")).await?;
    Ok(c)
}

fn ping(id: &str) -> Element {
    Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("id", id)
        .with_attr("to", DOMAIN)
        .with_child(Element::new("ping", ns::PING))
}

/// Sends a message to `to` and a ping: whether the ping's result came back, with no
/// error for the message before it (the message is then acknowledged,
/// docs/durability.md). An error, a closed stream or no answer mean it was not.
async fn acknowledged(c: &mut Client, to: &str, body: &str) -> bool {
    let (msg_id, ping_id) = (c.new_id(), c.new_id());
    let msg = chat(to, body).with_attr("id", &msg_id);
    if c.send(&msg).await.is_err() || c.send(&ping(&ping_id)).await.is_err() {
        return false;
    }
    let reply = c
        .expect(|e| {
            e.attr("id") == Some(ping_id.as_str())
                || (e.attr("id") == Some(msg_id.as_str()) && e.attr("type") == Some("error"))
        })
        .await;
    matches!(reply, Ok(e) if e.name() == "iq" && e.attr("type") == Some("result"))
}

/// SIGTERM, and the exit status with the rest of the log.
async fn stop(served: Served) -> Result<(std::process::ExitStatus, Vec<String>)> {
    let Served {
        mut child, drain, ..
    } = served;
    let pid = child.id().context("already exited")?.to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill -TERM failed");
    let exit = tokio::time::timeout(TIMEOUT * 2, child.wait())
        .await
        .map_err(|_| anyhow!("the server did not stop on SIGTERM"))??;
    let log = tokio::time::timeout(TIMEOUT, drain).await??;
    Ok((exit, log))
}

#[tokio::test]
async fn serve_exits_with_failure_when_its_final_flush_fails() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::create(dir.path(), &[DOMAIN])?;
    let config = dir.path().join("confab.toml");
    let data = dir.path().join("data");
    write_loopback_config(
        &config,
        &data,
        dir.path(),
        "",
        "\n[limits]\nmax_offline_messages = 100000\n",
    )?;
    add_user(&config, "alice").await?;
    add_user(&config, "bob").await?;
    // Files of at most one segment of sled's log (512 KiB: 1024 blocks of 512 bytes),
    // which the two accounts fit in; the first write of the log's next segment fails.
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 1024 && exec \"$@\"")
        .arg("sh")
        .arg(confab_bin())
        .arg("--config")
        .arg(&config)
        .arg("serve");
    let served = spawn_serve_command(command).await?;

    // Messages of 8 KiB to offline bob until one is not acknowledged: the log is full
    // (at 512 KiB; 200 of them would take 1.6 MiB).
    let mut alice = login(served.addr, &pki, "alice").await?;
    let filler = "x".repeat(8 * 1024);
    let mut acked = Vec::new();
    let mut refused = false;
    for i in 0..200 {
        let body = format!("{i} {filler}");
        if !acknowledged(&mut alice, &bare("bob"), &body).await {
            refused = true;
            break;
        }
        acked.push(body);
    }
    anyhow::ensure!(
        refused,
        "every message was stored: the size limit did not apply"
    );
    anyhow::ensure!(!acked.is_empty(), "nothing was stored before the limit");
    drop(alice);

    let (exit, log) = stop(served).await?;
    println!(
        "{} messages acknowledged before the limit; exit {exit}; errors logged: {:#?}",
        acked.len(),
        log.iter()
            .filter(|l| l.contains("ERROR"))
            .collect::<Vec<_>>()
    );
    assert!(
        !exit.success(),
        "the final flush failed, yet the exit status is {exit}; log: {log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("flushing the store at shutdown failed")),
        "the exit should say why: {log:#?}"
    );

    // Without the limit it starts again, with every acknowledged message, and writes.
    let served = spawn_serve(&config).await?;
    let mut bob = login(served.addr, &pki, "bob").await?;
    bob.send(&Element::new("presence", ns::CLIENT)).await?;
    for body in &acked {
        bob.expect_body(body)
            .await
            .with_context(|| format!("acknowledged message {:?}", &body[..8]))?;
    }
    let mut alice = login(served.addr, &pki, "alice").await?;
    let vcard = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_child(
            Element::new("vCard", ns::VCARD)
                .with_child(Element::new("FN", ns::VCARD).with_text("Alice")),
        );
    let reply = alice.iq(vcard).await?;
    assert_eq!(
        reply.attr("type"),
        Some("result"),
        "a write after the restart: {reply}"
    );
    let (exit, log) = stop(served).await?;
    assert!(exit.success(), "{exit}; log: {log:#?}");
    Ok(())
}
