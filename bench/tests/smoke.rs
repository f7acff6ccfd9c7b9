//! A short run of every scenario against a real confab server (CI keeps the generator
//! working; the figures themselves come from `bench/run`).

use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result};
use confab_tests::{TestServer, DOMAIN};

async fn bench(server: &TestServer, args: &[&str]) -> Result<Output> {
    let port = server.addr().port().to_string();
    let pid = std::process::id().to_string();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab-bench"))
        .args(["--port", &port, "--domain", DOMAIN, "--server-pid", &pid])
        .args(["--sources", "4"])
        .args(args)
        .kill_on_drop(true)
        .output();
    Ok(tokio::time::timeout(Duration::from_secs(60), child).await??)
}

/// The `key=value` fields of the RESULT line.
fn result(out: &Output) -> Result<Vec<(String, String)>> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "confab-bench failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .context("no RESULT line")?;
    Ok(line
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn number(fields: &[(String, String)], key: &str) -> f64 {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key} in {fields:?}"))
}

#[tokio::test]
async fn every_scenario_runs_against_confab() -> Result<()> {
    let server = TestServer::start_with(|c| c.c2s.require_encryption = false).await?;
    for i in 0..4 {
        server.add_user(&format!("bench{i}"), "bench").await?;
    }
    for i in 0..2 {
        server.add_user(&format!("off{i}"), "bench").await?;
    }

    let idle = result(
        &bench(
            &server,
            &["--starttls", "idle", "--sessions", "4", "--settle", "0"],
        )
        .await?,
    )?;
    assert_eq!(number(&idle, "sessions"), 4.0);
    assert!(number(&idle, "rss_after_kib") > 0.0);

    let login = result(
        &bench(
            &server,
            &[
                "login",
                "--concurrency",
                "2",
                "--users",
                "2",
                "--duration",
                "1",
            ],
        )
        .await?,
    )?;
    assert!(number(&login, "logins") >= 1.0, "{login:?}");
    assert_eq!(number(&login, "failed"), 0.0);

    let chat = result(
        &bench(
            &server,
            &[
                "chat",
                "--pairs",
                "2",
                "--warmup",
                "0",
                "--duration",
                "1",
                "--rate",
                "200",
            ],
        )
        .await?,
    )?;
    // 200/s offered for one second over two pairs: most of them arrive in the window.
    assert!(number(&chat, "msgs_per_sec") >= 100.0, "{chat:?}");
    assert!(number(&chat, "p99_us") > 0.0);

    let offline = result(
        &bench(
            &server,
            &[
                "offline",
                "--senders",
                "2",
                "--recipient-count",
                "2",
                "--messages",
                "100",
                "--batch",
                "10",
            ],
        )
        .await?,
    )?;
    assert_eq!(number(&offline, "acked"), 100.0);
    // Acknowledged means stored: both recipients have their share waiting.
    for i in 0..2 {
        let waiting = server
            .storage()
            .offline_count(&format!("off{i}@{DOMAIN}"))
            .await?;
        assert_eq!(waiting, 50, "off{i}");
    }
    Ok(())
}

#[tokio::test]
async fn refuses_targets_off_loopback_and_unknown_accounts() -> Result<()> {
    let server = TestServer::start_with(|c| c.c2s.require_encryption = false).await?;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab-bench"))
        .args(["--host", "192.0.2.1", "idle", "--sessions", "1"])
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only targets loopback"));

    // No such account: the login fails and the generator says so instead of hanging.
    let out = bench(&server, &["idle", "--sessions", "1", "--settle", "0"]).await?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("login of bench0"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
