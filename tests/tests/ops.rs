//! Operations: failed logins limited per source address, `confab stats`, the Prometheus
//! endpoint, systemd notifications (READY, WATCHDOG, STOPPING) and JSON logs.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use confab::admin::Request;
use confab_protocol::sasl::ScramHash;
use confab_protocol::{ns, Element};
use confab_tests::bin::*;
use confab_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A loopback proxy whose connections to `target` come from `source` (Linux routes all
/// of 127.0.0.0/8 to the loopback interface), so one test can be several addresses.
async fn proxy_from(source: IpAddr, target: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let socket = TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(source, 0))?;
                let mut outbound = socket.connect(target).await?;
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    Ok(addr)
}

async fn tls_client(addr: SocketAddr, pki: &TestPki) -> Result<Client> {
    let mut c = Client::connect(addr).await?;
    c.starttls(pki).await?;
    Ok(c)
}

async fn ping(c: &mut Client) -> Result<()> {
    let reply = c
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("to", DOMAIN)
            .with_child(Element::new("ping", ns::PING)))
        .await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    Ok(())
}

#[tokio::test]
async fn failed_logins_are_limited_per_address_across_connections() -> Result<()> {
    let server = TestServer::start_with(|c| c.limits.auth_failures_per_minute = 3).await?;
    server.add_user("alice", "wonderland").await?;
    // A session that exists before the failures is not touched by them.
    let mut early = server.login("alice", "wonderland", "early").await?;

    // Three failures from 127.0.0.1, over two connections (the per-stream limit is 3).
    let mut c = tls_client(server.addr(), &server.pki).await?;
    c.expect_not_authorized("alice", "wrong").await?;
    c.expect_not_authorized("alice", "wrong").await?;
    let mut c2 = tls_client(server.addr(), &server.pki).await?;
    c2.expect_not_authorized("alice", "wrong").await?;
    // The next attempt, on an open connection or a new one, with the right password,
    // is refused.
    c.expect_login_refused("alice", "wonderland").await?;
    let mut c3 = tls_client(server.addr(), &server.pki).await?;
    c3.expect_login_refused("alice", "wonderland").await?;

    // Another address logs in as usual.
    let proxy = proxy_from("127.0.0.2".parse()?, server.addr()).await?;
    let mut other = tls_client(proxy, &server.pki).await?;
    other
        .authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    let jid = other.bind(Some("other")).await?;
    let seen = server
        .running()
        .server
        .router
        .all_sessions()
        .into_iter()
        .find(|s| s.full_jid() == jid)
        .context("the session from 127.0.0.2 is not registered")?;
    assert_eq!(seen.info.peer.ip().to_string(), "127.0.0.2");
    ping(&mut other).await?;
    ping(&mut early).await?;

    // Its success does not lift the limit of 127.0.0.1.
    let mut c4 = tls_client(server.addr(), &server.pki).await?;
    c4.expect_login_refused("alice", "wonderland").await?;

    let snap = confab::ops::snapshot(&server.running().server);
    assert_eq!(snap.auth_failures, 3, "{snap:?}");
    assert_eq!(snap.auth_refused, 3, "{snap:?}");

    // 0 turns the limit off, taking effect by a reload.
    let mut config = server.config.clone();
    config.limits.auth_failures_per_minute = 0;
    server.running().server.reload(config)?;
    let mut c5 = server.login("alice", "wonderland", "after").await?;
    ping(&mut c5).await?;
    Ok(())
}

/// One scrape of `/metrics`: the status line and the samples by their full name.
async fn scrape(addr: SocketAddr, method: &str, path: &str) -> Result<(String, String)> {
    let mut tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await??;
    tcp.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nAccept: text/plain\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut raw)).await??;
    let raw = String::from_utf8(raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of header in {raw:?}"))?;
    let status = head.lines().next().unwrap_or_default().to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .context("no Content-Length")?
        .parse()?;
    if method != "HEAD" {
        assert_eq!(length, body.len(), "Content-Length");
    }
    Ok((status, body.to_string()))
}

fn sample(body: &str, name: &str) -> Result<u64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .ok_or_else(|| anyhow!("no sample {name} in:\n{body}"))?
        .parse()
        .map_err(Into::into)
}

async fn metrics(addr: SocketAddr) -> Result<String> {
    let (status, body) = scrape(addr, "GET", "/metrics").await?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    Ok(body)
}

#[tokio::test]
async fn stats_and_metrics_count_sessions_stanzas_failures_and_offline_messages() -> Result<()> {
    let server = TestServer::start_with(|c| c.metrics.listen = vec!["127.0.0.1:0".into()]).await?;
    let addr = server.running().metrics_addrs[0];
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    server.add_user("carol", "singer").await?;

    let body = metrics(addr).await?;
    assert_eq!(sample(&body, "confab_sessions")?, 0);
    assert_eq!(sample(&body, "confab_auth_failures_total")?, 0);
    assert_eq!(sample(&body, "confab_s2s_links{direction=\"out\"}")?, 0);
    assert!(sample(&body, "confab_store_bytes")? > 0);
    assert!(sample(&body, "confab_resident_memory_bytes")? > 0);

    let mut alice = server.online("alice", "wonderland", "a").await?;
    assert_eq!(sample(&metrics(addr).await?, "confab_sessions")?, 1);
    let mut bob = server.online("bob", "builder", "b").await?;
    let before = metrics(addr).await?;
    let in_before = sample(
        &before,
        "confab_stanzas_total{kind=\"message\",direction=\"in\"}",
    )?;
    let out_before = sample(
        &before,
        "confab_stanzas_total{kind=\"message\",direction=\"out\"}",
    )?;

    alice.chat(&format!("bob@{DOMAIN}"), "hello bob").await?;
    bob.expect_body("hello bob").await?;
    alice.chat(&format!("carol@{DOMAIN}"), "for later").await?;
    let mut bad = tls_client(server.addr(), &server.pki).await?;
    bad.expect_not_authorized("alice", "wrong").await?;
    // The offline message is stored once the sender's next stanza is answered.
    ping(&mut alice).await?;

    let body = metrics(addr).await?;
    assert_eq!(sample(&body, "confab_sessions")?, 2);
    assert_eq!(
        sample(
            &body,
            "confab_stanzas_total{kind=\"message\",direction=\"in\"}"
        )? - in_before,
        2
    );
    assert_eq!(
        sample(
            &body,
            "confab_stanzas_total{kind=\"message\",direction=\"out\"}"
        )? - out_before,
        1
    );
    assert!(sample(&body, "confab_stanzas_total{kind=\"iq\",direction=\"in\"}")? >= 3);
    assert!(
        sample(
            &body,
            "confab_stanzas_total{kind=\"presence\",direction=\"out\"}"
        )? >= 2
    );
    assert_eq!(sample(&body, "confab_offline_stored_total")?, 1);
    assert_eq!(sample(&body, "confab_auth_failures_total")?, 1);
    for line in body.lines().filter(|l| l.starts_with("# TYPE")) {
        assert!(
            line.ends_with(" gauge") || line.ends_with(" counter"),
            "{line}"
        );
    }

    // `confab stats` answers from the same counters.
    let stats = confab::admin::handle(&server.running().server, Request::Stats).await;
    assert!(stats.ok, "{stats:?}");
    for expected in [
        "sessions: 2",
        "s2s links: 0 outgoing, 0 incoming",
        "offline messages stored: 1",
        "auth failures: 1",
    ] {
        assert!(
            stats.lines.iter().any(|l| l == expected),
            "{expected:?} missing from {:?}",
            stats.lines
        );
    }
    assert!(
        stats.lines.iter().any(|l| l.starts_with("stanzas in: ")
            && l.contains("message ")
            && l.contains("presence ")
            && l.contains("iq ")),
        "{:?}",
        stats.lines
    );
    assert!(
        stats
            .lines
            .iter()
            .any(|l| l.starts_with("memory (resident): ") && l.ends_with("iB")),
        "{:?}",
        stats.lines
    );

    // Anything but GET/HEAD /metrics is refused; HEAD has no body.
    let (status, _) = scrape(addr, "GET", "/").await?;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = scrape(addr, "POST", "/metrics").await?;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, body) = scrape(addr, "HEAD", "/metrics").await?;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""));
    // A request head without end is cut off, not buffered.
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\n").await?;
    let _ = tcp.write_all(&vec![b'x'; 64 * 1024]).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut answer)).await?;
    assert!(
        answer.starts_with(b"HTTP/1.1 431") || answer.is_empty(),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    alice.close().await?;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while sample(&metrics(addr).await?, "confab_sessions")? != 1 {
        assert!(tokio::time::Instant::now() < deadline, "sessions stayed 2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

// ---- the real binary -----------------------------------------------------------------

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    pki: TestPki,
}

fn setup(extra: &str) -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::create(dir.path(), &[DOMAIN])?;
    let p = dir.path();
    let toml = format!(
        r#"domains = ["{DOMAIN}"]
data_dir = "{data}"
{extra}
[c2s]
listen = ["127.0.0.1:0"]
tls_listen = []

[s2s]
enabled = false

[tls."{DOMAIN}"]
cert = "{cert}"
key = "{key}"
"#,
        data = p.join("data").display(),
        cert = p.join(format!("{DOMAIN}.pem")).display(),
        key = p.join(format!("{DOMAIN}.key")).display(),
    );
    let config = p.join("confab.toml");
    std::fs::write(&config, toml)?;
    Ok(Setup { dir, config, pki })
}

async fn run(s: &Setup, args: &[&str], stdin: &str) -> Result<Output> {
    let mut child = tokio::process::Command::new(confab_bin())
        .arg("--config")
        .arg(&s.config)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut input = child.stdin.take().context("stdin")?;
    input.write_all(stdin.as_bytes()).await?;
    drop(input);
    Ok(tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??)
}

/// The next notification, skipping `WATCHDOG=1` unless that is what is awaited.
async fn notification(
    socket: &tokio::net::UnixDatagram,
    wanted: &str,
    seen: &mut Vec<String>,
) -> Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| anyhow!("no {wanted} from confab; got {seen:?}"))??;
        let msg = text(&buf[..n]);
        seen.push(msg.clone());
        if msg.lines().any(|l| l == wanted) {
            return Ok(msg);
        }
    }
}

#[tokio::test]
async fn systemd_notifications_stats_command_and_json_logs() -> Result<()> {
    let s = setup("log_format = \"json\"\nlog_level = \"info\"")?;
    let out = run(
        &s,
        &["user", "add", &format!("alice@{DOMAIN}")],
        "wonderland\n",
    )
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Stopped: `stats` says so in one line.
    let out = run(&s, &["stats"], "").await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not running"),
        "{}",
        text(&out.stderr)
    );

    let notify_path = s.dir.path().join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path)?;
    let mut child = tokio::process::Command::new(confab_bin())
        .arg("--config")
        .arg(&s.config)
        .arg("serve")
        .env("NOTIFY_SOCKET", &notify_path)
        // Half of it, 100 ms, between pings.
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .env_remove("CONFAB_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("pid")?;
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut stderr = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let drain = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(l)) = stderr.next_line().await {
            let _ = lines_tx.send(l.clone());
            all.push(l);
        }
        all
    });

    let mut seen = Vec::new();
    let ready = notification(&notify, "READY=1", &mut seen).await?;
    assert!(ready.contains(&format!("MAINPID={pid}")), "{ready}");
    assert!(ready.contains("STATUS="), "{ready}");
    notification(&notify, "WATCHDOG=1", &mut seen).await?;

    // READY means the listeners are up: the client port is in the (JSON) log already.
    let mut addr = None;
    while addr.is_none() {
        let line = tokio::time::timeout(TIMEOUT, lines_rx.recv())
            .await?
            .context("confab's log ended")?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("not a JSON log line: {line}"))?;
        if v["message"] == "listening for clients" {
            addr = Some(v["addr"].as_str().context("addr")?.parse::<SocketAddr>()?);
        }
    }
    let mut c = tls_client(addr.context("addr")?, &s.pki).await?;
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    c.bind(Some("ops")).await?;

    let out = run(&s, &["stats"], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stats = text(&out.stdout);
    assert!(stats.lines().any(|l| l == "sessions: 1"), "{stats}");
    assert!(
        stats.lines().any(|l| l.starts_with("store size: ")),
        "{stats}"
    );
    assert!(stats.lines().any(|l| l == "auth failures: 0"), "{stats}");

    let out = run(&s, &["stop"], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    notification(&notify, "STOPPING=1", &mut seen).await?;
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    assert!(exit.success(), "confab exited with {exit}");
    let log = tokio::time::timeout(TIMEOUT, drain).await??;
    assert!(!log.is_empty());
    for line in &log {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON log line: {line}"))?;
        for key in ["timestamp", "level", "target", "message"] {
            if v.get(key).is_none() {
                bail!("{key} missing from {line}");
            }
        }
    }
    assert!(
        log.iter().any(|l| l.contains("\"session started\"")),
        "{log:#?}"
    );
    Ok(())
}
