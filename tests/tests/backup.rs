//! `confab backup` and `confab restore` with the real binary: a backup of a running
//! server, taken while its clients keep working, restored into a fresh data directory
//! that a second server then serves with every account, roster, offline message,
//! vCard and private record intact; and the refusals (a store with data, damaged,
//! truncated and unknown-version files), which change nothing.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use confab_protocol::sasl::ScramHash;
use confab_protocol::{ns, Element};
use confab_tests::bin::*;
use confab_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const USERS: [(&str, &str); 4] = [
    ("alice", "wonderland"),
    ("bob", "builder"),
    ("carol", "singer"),
    ("dave", "diver"),
];

fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

struct Setup {
    dir: tempfile::TempDir,
    pki: TestPki,
}

impl Setup {
    fn new() -> anyhow::Result<Setup> {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::create(dir.path(), &[DOMAIN])?;
        Ok(Setup { dir, pki })
    }

    /// A configuration `NAME.toml` whose data directory is `NAME-data`.
    fn config(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.dir.path();
        let config = p.join(format!("{name}.toml"));
        write_loopback_config(&config, &p.join(format!("{name}-data")), p, "", "")?;
        Ok(config)
    }
}

/// Runs `confab --config CONFIG ARGS` in `cwd` with `stdin`; waits with a timeout.
async fn run_in(config: &Path, cwd: &Path, args: &[&str], stdin: &str) -> anyhow::Result<Output> {
    run_cli_with(
        confab_bin(),
        config,
        Some(cwd),
        args,
        stdin,
        Duration::from_secs(30),
    )
    .await
}

async fn run(config: &Path, args: &[&str], stdin: &str) -> anyhow::Result<Output> {
    run_in(config, &std::env::temp_dir(), args, stdin).await
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "failed: {}", text(&out.stderr));
}

/// The accounts a store holds, as `confab user list` prints them.
async fn accounts(config: &Path) -> anyhow::Result<Vec<String>> {
    let out = run(config, &["user", "list"], "").await?;
    assert_ok(&out);
    Ok(text(&out.stdout).lines().map(str::to_string).collect())
}

struct Serve {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
    drain: tokio::task::JoinHandle<()>,
}

/// Starts `confab serve` and reads its client port from the log; ready once the admin
/// socket is (the "is running" line).
async fn serve(config: &Path) -> anyhow::Result<Serve> {
    let mut child = tokio::process::Command::new(confab_bin())
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let (mut addr, mut running, mut log) = (None, false, Vec::new());
    while addr.is_none() || !running {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .map_err(|_| anyhow::anyhow!("confab did not start in time; log: {log:#?}"))??
            .ok_or_else(|| anyhow::anyhow!("confab exited early; log: {log:#?}"))?;
        running |= line.contains("is running");
        if line.contains("listening for clients") {
            let a = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .ok_or_else(|| anyhow::anyhow!("no addr= in {line}"))?;
            // Strip a colour code a terminal-less run should not have, just in case.
            let a: String = a.chars().take_while(|c| *c != '\u{1b}').collect();
            addr = Some(a.parse()?);
        }
        log.push(line);
    }
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Serve {
        child,
        addr: addr.expect("address"),
        drain,
    })
}

async fn stop(config: &Path, mut s: Serve) -> anyhow::Result<()> {
    assert_ok(&run(config, &["stop"], "").await?);
    let exit = tokio::time::timeout(Duration::from_secs(15), s.child.wait()).await??;
    assert!(exit.success(), "confab exited with {exit}");
    let _ = tokio::time::timeout(TIMEOUT, s.drain).await;
    Ok(())
}

async fn login(
    s: &Setup,
    addr: std::net::SocketAddr,
    user: &str,
    pw: &str,
    res: &str,
) -> anyhow::Result<Client> {
    let mut c = Client::connect(addr).await?;
    c.starttls(&s.pki).await?;
    c.authenticate(ScramHash::Sha256, false, user, pw).await?;
    c.bind(Some(res)).await?;
    Ok(c)
}

/// Logged in, roster fetched, initial presence sent and reflected.
async fn online(
    s: &Setup,
    addr: std::net::SocketAddr,
    user: &str,
    pw: &str,
    res: &str,
) -> anyhow::Result<Client> {
    let mut c = login(s, addr, user, pw, res).await?;
    c.roster_get().await?;
    c.send(&presence(None, None)).await?;
    let full = c.jid.clone();
    c.expect(|e| e.name() == "presence" && e.attr("from") == Some(full.as_str()))
        .await?;
    Ok(c)
}

fn is_push_for(e: &Element, jid: &str, sub: &str, ask: bool) -> bool {
    e.name() == "iq"
        && e.attr("type") == Some("set")
        && e.get_child("query", ns::ROSTER).is_some_and(|q| {
            q.children().any(|i| {
                i.attr("jid") == Some(jid)
                    && i.attr("subscription") == Some(sub)
                    && (i.attr("ask") == Some("subscribe")) == ask
            })
        })
}

fn is_presence_from(e: &Element, ty: &str, from: &str) -> bool {
    e.name() == "presence" && e.attr("type") == Some(ty) && e.attr("from") == Some(from)
}

/// `from` subscribes to `to` and `to` approves: `from` ends with `to` (or `both`).
async fn subscribe(from: &mut Client, to: &mut Client, from_ends: &str) -> anyhow::Result<()> {
    let (f, t) = (from.bare(), to.bare());
    from.send(&presence(Some("subscribe"), Some(&t))).await?;
    to.expect(|e| is_presence_from(e, "subscribe", &f)).await?;
    to.send(&presence(Some("subscribed"), Some(&f))).await?;
    from.expect(|e| is_push_for(e, &t, from_ends, false))
        .await?;
    Ok(())
}

/// The roster as comparable strings (jid, name, subscription, ask, groups), and its `ver`.
async fn roster(c: &mut Client) -> anyhow::Result<(Vec<String>, String)> {
    let q = c.roster_get().await?;
    let mut items: Vec<String> = q
        .children()
        .filter(|i| i.is("item", ns::ROSTER))
        .map(|i| {
            let groups: Vec<String> = i.children().map(|g| g.text()).collect();
            format!(
                "{} {:?} {:?} {:?} {groups:?}",
                i.attr("jid").unwrap_or_default(),
                i.attr("name"),
                i.attr("subscription"),
                i.attr("ask")
            )
        })
        .collect();
    items.sort();
    Ok((items, q.attr("ver").unwrap_or_default().to_string()))
}

fn iq(ty: &str, payload: Element) -> Element {
    Element::new("iq", ns::CLIENT)
        .with_attr("type", ty)
        .with_child(payload)
}

fn vcard() -> Element {
    Element::new("vCard", ns::VCARD)
        .with_child(Element::new("FN", ns::VCARD).with_text("Alice Liddell ✓ & <co>"))
}

fn prefs() -> Element {
    Element::new("prefs", "urn:example:prefs")
        .with_attr("theme", "dark")
        .with_child(Element::new("item", "urn:example:prefs").with_text("a < b"))
}

async fn vcard_of(c: &mut Client) -> anyhow::Result<Option<Element>> {
    let reply = c.iq(iq("get", Element::new("vCard", ns::VCARD))).await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    Ok(reply.get_child("vCard", ns::VCARD).cloned())
}

async fn prefs_of(c: &mut Client) -> anyhow::Result<Option<Element>> {
    let q =
        Element::new("query", ns::PRIVATE).with_child(Element::new("prefs", "urn:example:prefs"));
    let reply = c.iq(iq("get", q)).await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    Ok(reply
        .get_child("query", ns::PRIVATE)
        .and_then(|q| q.get_child("prefs", "urn:example:prefs"))
        .cloned())
}

/// Waits (bounded) until `confab user show USER` counts `n` offline messages: the
/// sender's stream writes them to the store asynchronously.
async fn wait_offline(config: &Path, user: &str, n: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let want = format!("offline messages: {n}");
    loop {
        let out = run(config, &["user", "show", &bare(user)], "").await?;
        assert_ok(&out);
        if text(&out.stdout).lines().any(|l| l == want) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{user} never had {n} offline messages: {}",
            text(&out.stdout)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn body(e: &Element) -> Option<String> {
    (e.name() == "message")
        .then(|| e.get_child("body", ns::CLIENT).map(|b| b.text()))
        .flatten()
}

#[tokio::test]
async fn backup_of_a_running_server_restores_into_a_fresh_store() -> anyhow::Result<()> {
    let s = Setup::new()?;
    let old = s.config("old")?;
    let new = s.config("new")?;
    for (user, pw) in USERS {
        assert_ok(&run(&old, &["user", "add", &bare(user)], &format!("{pw}\n")).await?);
    }
    let server = serve(&old).await?;
    let addr = server.addr;
    let (a, b, d) = (bare("alice"), bare("bob"), bare("dave"));

    // alice ⇄ bob: both; alice → carol: to; bob → dave (never online): a pending request.
    let mut alice = online(&s, addr, "alice", "wonderland", "laptop").await?;
    let mut bob = online(&s, addr, "bob", "builder", "phone").await?;
    let mut carol = online(&s, addr, "carol", "singer", "tab").await?;
    subscribe(&mut alice, &mut bob, "to").await?;
    subscribe(&mut bob, &mut alice, "both").await?;
    subscribe(&mut alice, &mut carol, "to").await?;
    carol.close().await?;
    bob.send(&presence(Some("subscribe"), Some(&d))).await?;
    bob.expect(|e| is_push_for(e, &d, "none", true)).await?;

    // Offline messages for dave, a vCard and private data for alice.
    for m in ["m1", "m2", "m3"] {
        alice.chat(&d, m).await?;
    }
    assert_eq!(
        alice.iq(iq("set", vcard())).await?.attr("type"),
        Some("result")
    );
    let set = iq(
        "set",
        Element::new("query", ns::PRIVATE).with_child(prefs()),
    );
    assert_eq!(alice.iq(set).await?.attr("type"), Some("result"));
    wait_offline(&old, "dave", 3).await?;

    let mut before = Vec::new();
    for (user, pw) in USERS {
        let mut c = login(&s, addr, user, pw, "peek").await?;
        before.push(roster(&mut c).await?);
    }

    // The backup, with a relative path (made absolute for the server), while alice and
    // bob keep talking.
    let backup = tokio::spawn({
        let old = old.clone();
        let cwd = s.dir.path().to_owned();
        async move { run_in(&old, &cwd, &["backup", "nightly.confab"], "").await }
    });
    for i in 0..5 {
        let body = format!("during {i}");
        alice.chat(&b, &body).await?;
        bob.expect_body(&body).await?;
    }
    let out = backup.await??;
    assert_ok(&out);
    let file = s.dir.path().join("nightly.confab");
    let said = text(&out.stdout);
    let records = said
        .strip_prefix("backed up 4 account(s) in ")
        .and_then(|r| {
            r.trim_end()
                .strip_suffix(&format!(" record(s) to {}", file.display()))
        })
        .unwrap_or_else(|| panic!("{said}"));
    // 4 accounts; rosters of alice (2 items), bob (2) and carol (1) with their versions;
    // dave's offline counter and 3 messages; alice's vCard and private data, and bob's
    // request pending for dave. Not the messages alice and bob exchange meanwhile.
    assert_eq!(records, "19", "{said}");
    assert!(!s.dir.path().join("nightly.confab.tmp").exists());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "backup file mode {mode:o}");
    }
    assert!(std::fs::read_to_string(&file)?.starts_with("confab-backup 1\n"));

    // The running server and its clients go on; a message after the backup is not in it.
    alice.chat(&b, "after").await?;
    bob.expect_body("after").await?;
    alice.chat(&d, "m4 after the backup").await?;
    wait_offline(&old, "dave", 4).await?;

    // Restore into a fresh data directory (no server on it), then serve it.
    let out = run(&new, &["restore", file.to_str().unwrap()], "").await?;
    assert_ok(&out);
    assert_eq!(
        text(&out.stdout).trim(),
        format!(
            "restored 4 account(s) in {records} record(s) from {}",
            file.display()
        )
    );
    let restored = serve(&new).await?;
    let addr2 = restored.addr;

    // Every account logs in with its password and finds its roster as it was, versions
    // included: a client's cached roster is still current.
    for ((user, pw), (items, ver)) in USERS.iter().zip(&before) {
        let mut c = login(&s, addr2, user, pw, "again").await?;
        assert_eq!(
            &roster(&mut c).await?,
            &(items.clone(), ver.clone()),
            "{user}"
        );
        let cached = c
            .iq(iq(
                "get",
                Element::new("query", ns::ROSTER).with_attr("ver", ver),
            ))
            .await?;
        assert_eq!(cached.attr("type"), Some("result"), "{cached}");
        assert!(cached.first_child().is_none(), "{user}: {cached}");
    }
    assert!(before[0]
        .0
        .iter()
        .any(|i| i.starts_with(&format!("{b} ")) && i.contains("\"both\"")));
    assert!(before[0]
        .0
        .iter()
        .any(|i| i.starts_with("carol@") && i.contains("\"to\"")));
    assert!(before[1]
        .0
        .iter()
        .any(|i| i.starts_with("dave@") && i.contains("Some(\"subscribe\")")));
    // A wrong password is still wrong.
    assert!(login(&s, addr2, "alice", "builder", "x").await.is_err());

    // vCard and private data.
    let mut alice2 = online(&s, addr2, "alice", "wonderland", "laptop").await?;
    assert_eq!(vcard_of(&mut alice2).await?, Some(vcard()));
    assert_eq!(prefs_of(&mut alice2).await?, Some(prefs()));

    // dave gets bob's request and his three messages, in order, with their delay stamps,
    // and not the one sent after the backup.
    let mut dave = login(&s, addr2, "dave", "diver", "home").await?;
    dave.roster_get().await?;
    dave.send(&presence(None, None)).await?;
    let mut got = Vec::new();
    let mut asked = false;
    while got.len() < 3 || !asked {
        let e = dave
            .expect(|e| e.name() == "message" || is_presence_from(e, "subscribe", &b))
            .await?;
        if e.name() == "presence" {
            asked = true;
            continue;
        }
        let delay = e.get_child("delay", ns::DELAY).expect("delay stamp");
        assert_eq!(delay.attr("from"), Some(DOMAIN), "{e}");
        assert!(delay.attr("stamp").is_some_and(|t| t.ends_with('Z')), "{e}");
        assert_eq!(e.attr("from").map(|f| f.starts_with(&a)), Some(true), "{e}");
        got.push(body(&e).unwrap_or_default());
    }
    assert_eq!(got, ["m1", "m2", "m3"]);
    dave.expect_none(|e| e.name() == "message").await?;
    dave.close().await?;
    // Delivered once.
    let mut dave = online(&s, addr2, "dave", "diver", "home").await?;
    dave.expect_none(|e| e.name() == "message").await?;

    // The restored server works: alice and bob talk there too.
    let mut bob2 = online(&s, addr2, "bob", "builder", "phone").await?;
    alice2.chat(&b, "hello again").await?;
    bob2.expect_body("hello again").await?;

    // Restoring into it again (running, not empty) is refused and changes nothing.
    let out = run(&new, &["restore", file.to_str().unwrap()], "").await?;
    assert_refused(&out, "not empty");
    assert_eq!(accounts(&new).await?.len(), 4);

    drop((alice, bob, alice2, bob2, dave));
    stop(&new, restored).await?;
    stop(&old, server).await?;
    Ok(())
}

/// A backup made with the server stopped; damaged copies of it are refused with a
/// one-line reason and leave the target store empty; a store with data refuses a
/// restore, stopped or running.
#[tokio::test]
async fn damaged_files_and_stores_with_data_are_refused() -> anyhow::Result<()> {
    let s = Setup::new()?;
    let old = s.config("old")?;
    let new = s.config("new")?;
    assert_ok(&run(&old, &["user", "add", &bare("alice")], "wonderland\n").await?);
    assert_ok(&run(&old, &["user", "add", &bare("bob")], "builder\n").await?);
    let file = s.dir.path().join("b.confab");
    let out = run(&old, &["backup", file.to_str().unwrap()], "").await?;
    assert_ok(&out);
    assert!(
        text(&out.stdout).starts_with("backed up 2 account(s)"),
        "{}",
        text(&out.stdout)
    );
    let good = std::fs::read(&file)?;
    let good_text = String::from_utf8(good.clone())?;

    let flipped = {
        // One character of a stored key changed: still valid base64 and JSON.
        let at = good_text.find("\"stored_key\":\"").expect("a stored key") + 15;
        let mut v = good.clone();
        v[at] = if v[at] == b'A' { b'B' } else { b'A' };
        v
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            good[..good.len() * 2 / 3].to_vec(),
            "truncated",
        ),
        (
            "truncated at a line end",
            good[..=good_text[..good_text.len() - 1].rfind('\n').unwrap()].to_vec(),
            "truncated",
        ),
        ("flipped", flipped, "checksum"),
        (
            "newer",
            good_text
                .replacen("confab-backup 1", "confab-backup 2", 1)
                .into_bytes(),
            "version 2",
        ),
        (
            "garbage",
            b"PK\x03\x04 not a backup\n".to_vec(),
            "not a confab backup",
        ),
        ("empty", Vec::new(), "not a confab backup"),
    ];
    for (name, bytes, reason) in cases {
        let path = s.dir.path().join(name);
        std::fs::write(&path, bytes)?;
        let out = run(&new, &["restore", path.to_str().unwrap()], "").await?;
        assert_refused(&out, reason);
        assert!(
            accounts(&new).await?.is_empty(),
            "{name}: something was restored"
        );
    }
    let out = run(&new, &["restore", "/nonexistent/b.confab"], "").await?;
    assert_refused(&out, "cannot open");

    // Into the store it came from (stopped, with data): refused, unchanged.
    let out = run(&old, &["restore", file.to_str().unwrap()], "").await?;
    assert_refused(&out, "not empty");
    assert_eq!(accounts(&old).await?, [bare("alice"), bare("bob")]);

    // The good file into an empty store running a server: restored there and usable at
    // once; the restore is refused while the account it brought exists.
    let server = serve(&new).await?;
    let out = run(&new, &["restore", file.to_str().unwrap()], "").await?;
    assert_ok(&out);
    let mut c = login(&s, server.addr, "bob", "builder", "x").await?;
    c.roster_get().await?;
    let out = run(&new, &["restore", file.to_str().unwrap()], "").await?;
    assert_refused(&out, "not empty");
    // A corrupt file is named as such even when the store is not empty: the file is read first.
    let out = run(
        &new,
        &["restore", s.dir.path().join("flipped").to_str().unwrap()],
        "",
    )
    .await?;
    assert_refused(&out, "checksum");
    assert_eq!(accounts(&new).await?, [bare("alice"), bare("bob")]);
    drop(c);
    stop(&new, server).await?;
    Ok(())
}
