//! `confab check dns` and `confab check connectivity`: one line per finding, problems
//! named with what to fix, non-zero exit when something is wrong.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::Result;
use confab_tests::bin::write_loopback_config_for;
use confab_tests::dns::TestDns;
use confab_tests::*;

const A: &str = "a.test";
const B: &str = "b.test";

/// Writes a config for a stopped `a.test` server using `dns` and the test CA.
fn config_for_a(pki: &TestPki, dns: &TestDns, dir: &std::path::Path) -> Result<PathBuf> {
    let path = dir.join("confab.toml");
    let s2s = format!(
        "use_system_roots = false\nca_files = [\"{ca}\"]\nnameservers = [\"{ns}\"]\nconnect_timeout_secs = 3",
        ca = pki.dir.join("ca.pem").display(),
        ns = dns.addr,
    );
    write_loopback_config_for(&path, &dir.join("data"), &pki.dir, A, "", &s2s, "")?;
    Ok(path)
}

async fn confab(config: &PathBuf, args: &[&str]) -> Result<Output> {
    let child = tokio::process::Command::new(confab_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    Ok(tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await??)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn check_dns_reports_records_and_missing_ones() -> Result<()> {
    let pki = TestPki::create_temp(&[A])?;
    let dns = TestDns::start().await?;
    let tmp = tempfile::tempdir()?;
    let config = config_for_a(&pki, &dns, tmp.path())?;
    dns.add_srv(
        &format!("_xmpp-server._tcp.{A}"),
        0,
        5,
        5269,
        &format!("xmpp.{A}"),
    );
    dns.add_a(&format!("xmpp.{A}"), IpAddr::V4(Ipv4Addr::LOCALHOST));

    let out = confab(&config, &["check", "dns"]).await?;
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "ok: SRV _xmpp-server._tcp.{A}: priority 0, weight 5, xmpp.{A}:5269"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("ok: xmpp.{A} has address 127.0.0.1:5269")),
        "{text}"
    );

    // b.test has no records at all: two problems, each on its line, and a failure exit.
    let out = confab(&config, &["check", "dns", B]).await?;
    let text = stdout(&out);
    assert!(!out.status.success());
    assert!(
        text.contains(&format!(
            "problem: missing SRV record _xmpp-server._tcp.{B}"
        )),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("problem: ") && l.contains(B) && l.contains("A and/or AAAA")),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn check_connectivity_walks_every_step() -> Result<()> {
    let pki = TestPki::create_temp(&[A, B])?;
    let dns = TestDns::start().await?;
    let ns = dns.addr.to_string();
    let b = TestServer::start_with_pki(pki.clone(), &[B], |c| c.s2s.nameservers = vec![ns.clone()])
        .await?;
    dns.add_srv(
        &format!("_xmpp-server._tcp.{B}"),
        0,
        5,
        b.running().s2s_addrs[0].port(),
        &format!("xmpp.{B}"),
    );
    dns.add_a(&format!("xmpp.{B}"), IpAddr::V4(Ipv4Addr::LOCALHOST));
    let tmp = tempfile::tempdir()?;
    let config = config_for_a(&pki, &dns, tmp.path())?;

    let out = confab(&config, &["check", "connectivity", B]).await?;
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("accepts connections"), "{text}");
    assert!(
        text.contains(&format!("ok: TLS: the certificate is valid for {B}")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "ok: authenticated {A} to {B} by certificate (SASL EXTERNAL)"
        )),
        "{text}"
    );

    // The SRV record points at a closed port: said in one line.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    dns.remove(&format!("_xmpp-server._tcp.{B}"));
    dns.add_srv(
        &format!("_xmpp-server._tcp.{B}"),
        0,
        5,
        closed,
        &format!("xmpp.{B}"),
    );
    let out = confab(&config, &["check", "connectivity", B]).await?;
    let text = stdout(&out);
    assert!(!out.status.success());
    assert!(text.contains("port closed (connection refused)"), "{text}");
    Ok(())
}

#[tokio::test]
async fn check_connectivity_names_a_certificate_mismatch() -> Result<()> {
    let tmp_pki = tempfile::tempdir()?;
    let pki = std::sync::Arc::new(
        TestPki::create_named(tmp_pki.path(), &[(A, A), (B, "elsewhere.test")])?
            .with_lenient_names(),
    );
    let dns = TestDns::start().await?;
    let ns = dns.addr.to_string();
    let b = TestServer::start_with_pki(pki.clone(), &[B], |c| c.s2s.nameservers = vec![ns.clone()])
        .await?;
    dns.add_srv(
        &format!("_xmpp-server._tcp.{B}"),
        0,
        5,
        b.running().s2s_addrs[0].port(),
        &format!("xmpp.{B}"),
    );
    dns.add_a(&format!("xmpp.{B}"), IpAddr::V4(Ipv4Addr::LOCALHOST));
    let tmp = tempfile::tempdir()?;
    let config = config_for_a(&pki, &dns, tmp.path())?;
    let out = confab(&config, &["check", "connectivity", B]).await?;
    let text = stdout(&out);
    assert!(!out.status.success());
    assert!(
        text.contains(&format!(
            "problem: TLS: certificate name mismatch: it is not valid for {B}"
        )),
        "{text}"
    );
    Ok(())
}

/// Without a remote domain, `check connectivity` checks that our own ports answer.
#[tokio::test]
async fn check_connectivity_without_a_domain_checks_our_own_ports() -> Result<()> {
    let pki = TestPki::create_temp(&[A])?;
    let dns = TestDns::start().await?;
    let tmp = tempfile::tempdir()?;
    let config = config_for_a(&pki, &dns, tmp.path())?;
    // Nothing listens yet on these (free) ports: each is a problem, named.
    let c2s = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let s2s = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let text = std::fs::read_to_string(&config)?
        .replacen(
            "[c2s]\nlisten = [\"127.0.0.1:0\"]",
            &format!("[c2s]\nlisten = [\"{c2s}\"]"),
            1,
        )
        .replacen(
            "[s2s]\nlisten = [\"127.0.0.1:0\"]",
            &format!("[s2s]\nlisten = [\"{s2s}\"]"),
            1,
        );
    std::fs::write(&config, text)?;
    let out = confab(&config, &["check", "connectivity"]).await?;
    let report = stdout(&out);
    assert!(!out.status.success());
    assert!(
        report.contains(&format!("problem: c2s {c2s}: connection refused")),
        "{report}"
    );
    assert!(
        report.contains(&format!("problem: s2s {s2s}: connection refused")),
        "{report}"
    );

    // With the server running on them, both answer.
    let served = confab_tests::bin::spawn_serve(&config).await?;
    let out = confab(&config, &["check", "connectivity"]).await?;
    let report = stdout(&out);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains(&format!("ok: c2s {c2s} answers")),
        "{report}"
    );
    assert!(
        report.contains(&format!("ok: s2s {s2s} answers")),
        "{report}"
    );
    drop(served);
    Ok(())
}
