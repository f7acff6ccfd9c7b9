//! The real `confab` binary: account management from the command line, `serve` with
//! port 0 (bound ports read from its log), SIGTERM shutdown, config errors.
//!
//! The binary is found by [`confab_tests::confab_bin`].

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use confab_protocol::sasl::ScramHash;
use confab_tests::bin::*;
use confab_tests::*;

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    pki: TestPki,
}

fn setup(extra: &str) -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::create(dir.path(), &[DOMAIN])?;
    let p = dir.path();
    let config = p.join("confab.toml");
    write_loopback_config(&config, &p.join("data"), p, extra, "")?;
    Ok(Setup { dir, config, pki })
}

/// Runs `confab --config F <args>` with `stdin` as its input; waits with a timeout.
async fn run(s: &Setup, args: &[&str], stdin: &str) -> anyhow::Result<Output> {
    run_cli(&s.config, args, stdin).await
}

#[tokio::test]
async fn user_add_list_passwd_del() -> anyhow::Result<()> {
    let s = setup("")?;
    let alice = format!("alice@{DOMAIN}");
    let out = run(&s, &["user", "add", &alice], "secret one\n").await?;
    assert!(
        out.status.success(),
        "user add failed: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains(&alice), "{}", text(&out.stdout));

    // Refusals: empty password, bad JID, other domain, duplicate.
    let out = run(&s, &["user", "add", &format!("bob@{DOMAIN}")], "\n").await?;
    assert_refused(&out, "empty");
    let out = run(&s, &["user", "add", "not a jid@@"], "pw\n").await?;
    assert!(!out.status.success(), "a bad JID was accepted");
    assert_eq!(
        text(&out.stderr).trim().lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
    let out = run(&s, &["user", "add", "carol@elsewhere.example"], "pw\n").await?;
    assert!(
        !out.status.success(),
        "a JID of a domain we do not serve was accepted"
    );
    let out = run(&s, &["user", "add", &alice], "other\n").await?;
    assert!(!out.status.success(), "a duplicate account was accepted");
    assert_eq!(
        text(&out.stderr).trim().lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("alice"), "{}", text(&out.stderr));

    let out = run(&s, &["user", "add", &format!("Bob@{DOMAIN}")], "builder\n").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&s, &["user", "list"], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Localparts are prepared (case-folded) before storing.
    let listed: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(listed, [alice.clone(), format!("bob@{DOMAIN}")]);

    let out = run(&s, &["user", "passwd", &alice], "secret two\n").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&s, &["user", "passwd", &format!("nobody@{DOMAIN}")], "pw\n").await?;
    assert!(
        !out.status.success(),
        "passwd of a missing account succeeded"
    );

    // The new password works against the real server, the old one does not.
    let mut config = confab::Config::load(&s.config)?;
    config.normalize()?;
    let storage = std::sync::Arc::new(confab_storage::SledStorage::open(&config.store_dir())?);
    let running = confab::RunningServer::start(config, storage).await?;
    let addr = running.c2s_addrs[0];
    let mut c = Client::connect(addr).await?;
    c.starttls(&s.pki).await?;
    assert!(c
        .authenticate(ScramHash::Sha256, false, "alice", "secret one")
        .await
        .is_err());
    let mut c = Client::connect(addr).await?;
    c.starttls(&s.pki).await?;
    c.authenticate(ScramHash::Sha256, false, "alice", "secret two")
        .await?;
    drop(c);
    running.shutdown().await;

    let out = run(&s, &["user", "del", &format!("bob@{DOMAIN}")], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&s, &["user", "del", &format!("bob@{DOMAIN}")], "").await?;
    assert!(
        !out.status.success(),
        "deleting a missing account succeeded"
    );
    let out = run(&s, &["user", "list"], "").await?;
    assert_eq!(text(&out.stdout).trim(), alice);
    drop(s.dir);
    Ok(())
}

#[tokio::test]
async fn serve_logs_ports_accepts_logins_and_stops_on_sigterm() -> anyhow::Result<()> {
    let s = setup("")?;
    let alice = format!("alice@{DOMAIN}");
    let out = run(&s, &["user", "add", &alice], "wonderland\n").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));

    let Served {
        mut child,
        addr,
        drain,
        log,
    } = spawn_serve(&s.config).await?;

    let mut c = Client::connect(addr).await?;
    c.starttls(&s.pki).await?;
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    let jid = c.bind(Some("cli")).await?;
    assert_eq!(jid, format!("{alice}/cli"));
    let reply = c
        .iq(
            confab_protocol::Element::new("iq", confab_protocol::ns::CLIENT)
                .with_attr("type", "get")
                .with_attr("to", DOMAIN)
                .with_child(confab_protocol::Element::new(
                    "ping",
                    confab_protocol::ns::PING,
                )),
        )
        .await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");

    // While serving, the store is held by the server: the CLI asks the server.
    let out = run(&s, &["user", "list"], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), alice);

    let pid = child.id().expect("child pid").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()?;
    assert!(status.success(), "kill -TERM failed");
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("system-shutdown".into())
    );
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    let rest = tokio::time::timeout(TIMEOUT, drain).await??;
    assert!(
        exit.success(),
        "confab exited with {exit}; log: {log:#?} {rest:#?}"
    );

    // After a clean stop the CLI opens the store again.
    let out = run(&s, &["user", "list"], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), alice);
    Ok(())
}

async fn login(
    s: &Setup,
    addr: std::net::SocketAddr,
    user: &str,
    pw: &str,
    resource: &str,
) -> anyhow::Result<Client> {
    let mut c = Client::connect(addr).await?;
    c.starttls(&s.pki).await?;
    c.authenticate(ScramHash::Sha256, false, user, pw).await?;
    c.bind(Some(resource)).await?;
    Ok(c)
}

/// A running server is managed entirely from the shell: accounts, status, sessions,
/// kick, links, stop — over the admin socket, which only the server's user may open.
#[tokio::test]
async fn admin_commands_manage_a_running_server() -> anyhow::Result<()> {
    let s = setup("")?;
    let out = run(&s, &["status"], "").await?;
    assert_refused(&out, "not running");

    let Served {
        mut child,
        addr,
        drain,
        ..
    } = spawn_serve(&s.config).await?;
    let socket = s.dir.path().join("data").join("admin.sock");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "admin socket mode {mode:o}");
    }

    // A user created while the server runs can log in at once.
    let bob = format!("bob@{DOMAIN}");
    let out = run(&s, &["user", "add", &bob], "builder\n").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("created {bob}"));
    let out = run(&s, &["user", "add", &bob], "again\n").await?;
    assert_refused(&out, "already exists");
    let mut bob_client = login(&s, addr, "bob", "builder", "cli").await?;

    let out = run(&s, &["status"], "").await?;
    let status = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(status.contains("status: running"), "{status}");
    assert!(status.contains(&format!("domains: {DOMAIN}")), "{status}");
    assert!(status.contains("sessions: 1"), "{status}");

    let out = run(&s, &["sessions"], "").await?;
    let sessions = text(&out.stdout);
    assert!(
        sessions.contains(&format!("{bob}/cli  127.0.0.1  TLSv1.3")),
        "{sessions}"
    );

    // Password change while running: the new one works.
    let out = run(&s, &["user", "passwd", &bob], "newpass\n").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second = login(&s, addr, "bob", "newpass", "second").await;
    assert!(second.is_ok(), "new password refused");
    drop(second);

    let out = run(&s, &["kick", &format!("{bob}/cli")], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        bob_client.expect_closed().await?,
        Closed::StreamError("policy-violation".into())
    );
    let out = run(&s, &["kick", &format!("nobody@{DOMAIN}")], "").await?;
    assert_refused(&out, "no session");

    // Deleting an account ends its sessions.
    let mut again = login(&s, addr, "bob", "newpass", "again").await?;
    let out = run(&s, &["user", "del", &bob], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        again.expect_closed().await?,
        Closed::StreamError("not-authorized".into())
    );
    assert!(login(&s, addr, "bob", "newpass", "late").await.is_err());

    let out = run(&s, &["s2s"], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = run(&s, &["stop"], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    assert!(exit.success(), "confab exited with {exit}");
    let _ = tokio::time::timeout(TIMEOUT, drain).await?;
    assert!(!socket.exists(), "the admin socket is removed at exit");
    Ok(())
}

#[tokio::test]
async fn serve_refuses_an_unknown_config_key() -> anyhow::Result<()> {
    let s = setup("listen_everywhere = true\n")?;
    let out = run(&s, &["serve"], "").await?;
    assert!(!out.status.success(), "started with an unknown key");
    let err = text(&out.stderr);
    assert!(
        err.contains("listen_everywhere"),
        "the key is not named: {err}"
    );
    // A typo in a section is named too.
    let s = setup("")?;
    let toml =
        std::fs::read_to_string(&s.config)?.replace("[auth]", "[auth]\nscram_iteration = 5000");
    std::fs::write(&s.config, toml)?;
    let out = run(&s, &["serve"], "").await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("scram_iteration"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

/// `confab reload` and SIGHUP apply new certificates and configuration to a running
/// server without dropping connected clients; a bad configuration is refused and the
/// old one keeps running.
#[tokio::test]
async fn reload_swaps_certificates_and_refuses_a_bad_config() -> anyhow::Result<()> {
    let s = setup("")?;
    let out = run(&s, &["user", "add", &format!("alice@{DOMAIN}")], "pw\n").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let Served {
        mut child,
        addr,
        drain,
        ..
    } = spawn_serve(&s.config).await?;
    let mut before = login(&s, addr, "alice", "pw", "before").await?;

    // New certificate files from another CA, in place of the configured ones.
    let other = tempfile::tempdir()?;
    let pki2 = TestPki::create(other.path(), &[DOMAIN])?;
    for ext in ["pem", "key"] {
        std::fs::copy(
            other.path().join(format!("{DOMAIN}.{ext}")),
            s.dir.path().join(format!("{DOMAIN}.{ext}")),
        )?;
    }
    let out = run(&s, &["reload"], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("configuration and certificates reloaded"),
        "{}",
        text(&out.stdout)
    );
    // A new client trusting only the new CA gets through: the new certificate is served.
    let mut c = Client::connect(addr).await?;
    c.starttls(&pki2).await?;
    c.authenticate(ScramHash::Sha256, false, "alice", "pw")
        .await?;
    c.bind(Some("after")).await?;
    // The client connected before the reload is still there.
    let before_jid = before.jid.clone();
    before.send(&presence(None, None)).await?;
    before
        .expect(|e| e.name() == "presence" && e.attr("from") == Some(before_jid.as_str()))
        .await?;

    // A broken configuration is refused and changes nothing.
    let good = std::fs::read_to_string(&s.config)?;
    std::fs::write(&s.config, format!("no_such_key = 1\n{good}"))?;
    let out = run(&s, &["reload"], "").await;
    std::fs::write(&s.config, &good)?;
    let out = out?;
    assert_refused(&out, "no_such_key");
    let out = run(&s, &["status"], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // SIGHUP reloads too: a domain added to the file becomes servable.
    let pki3 = TestPki::create(s.dir.path(), &["extra.test"])?;
    let with_extra = good.replacen(
        &format!("domains = [\"{DOMAIN}\"]"),
        &format!("domains = [\"{DOMAIN}\", \"extra.test\"]"),
        1,
    ) + &format!(
        "\n[tls.\"extra.test\"]\ncert = \"{}\"\nkey = \"{}\"\n",
        s.dir.path().join("extra.test.pem").display(),
        s.dir.path().join("extra.test.key").display()
    );
    std::fs::write(&s.config, with_extra)?;
    let pid = child.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()?
        .success());
    // Wait for the event (the new domain answering), bounded.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let attempt = async {
            let mut c = Client::connect_raw(addr).await?;
            c.domain = "extra.test".into();
            c.open_stream().await?;
            c.starttls(&pki3).await
        };
        match attempt.await {
            Ok(()) => break,
            // Not reloaded yet (host-unknown): the signal is handled asynchronously.
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.context("the added domain never became servable")),
        }
    }
    let out = run(&s, &["stop"], "").await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    assert!(exit.success());
    let _ = tokio::time::timeout(TIMEOUT, drain).await?;
    Ok(())
}

/// A config that names only `listen` gets its direct-TLS listeners on the same address
/// (port 0 stays 0 here), not on every interface: two instances bound to loopback run side
/// by side, and each says where direct TLS went and why.
#[tokio::test]
async fn direct_tls_listens_where_listen_was_configured() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::create(dir.path(), &[DOMAIN])?;
    let mut running = Vec::new();
    for n in 0..2 {
        let config = dir.path().join(format!("confab{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "domains = [\"{DOMAIN}\"]\ndata_dir = \"{data}\"\n\
                 [c2s]\nlisten = [\"127.0.0.1:0\"]\n[s2s]\nlisten = [\"127.0.0.1:0\"]\n\
                 [tls.\"{DOMAIN}\"]\ncert = \"{cert}\"\nkey = \"{key}\"\n",
                data = dir.path().join(format!("data{n}")).display(),
                cert = dir.path().join(format!("{DOMAIN}.pem")).display(),
                key = dir.path().join(format!("{DOMAIN}.key")).display(),
            ),
        )?;
        running.push(spawn_serve(&config).await?);
    }
    for served in &running {
        let listening: Vec<&String> = served
            .log
            .iter()
            .filter(|l| l.contains("listening for"))
            .collect();
        // c2s and s2s, each plain and direct TLS.
        assert_eq!(listening.len(), 4, "{:#?}", served.log);
        for line in &listening {
            assert!(line.contains("addr=127.0.0.1:"), "{line}");
        }
        assert_eq!(
            listening
                .iter()
                .filter(|l| l.contains("direct_tls=true"))
                .count(),
            2,
            "{listening:#?}"
        );
        assert!(
            served
                .log
                .iter()
                .any(|l| l.contains("c2s.tls_listen is not set")),
            "{:#?}",
            served.log
        );
        // Direct TLS really is there: a TLS client gets a stream on it.
        let line = listening
            .iter()
            .find(|l| l.contains("listening for clients") && l.contains("direct_tls=true"))
            .expect("direct-TLS client listener");
        let addr: std::net::SocketAddr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .expect("addr=")
            .parse()?;
        let c = Client::connect_tls(addr, &pki).await?;
        assert!(c.is_tls() && c.features.is_some());
    }
    Ok(())
}
