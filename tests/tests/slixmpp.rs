//! Interoperability with a third-party client: slixmpp (Python), driven by
//! `tests/python/slixmpp_client.py`. CI installs it (`apt-get install python3-slixmpp`);
//! when it is missing this test fails with a message saying so, it never skips.
//!
//! The interpreter is `$CONFAB_PYTHON` when set, else the first of `python3` and
//! `/usr/bin/python3` that can import slixmpp (a pyenv `python3` first on PATH does
//! not see Debian's packages).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use confab_protocol::{ns, Element};
use confab_storage::{RosterItem, Subscription};
use confab_tests::*;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/slixmpp_client.py")
}

async fn python_with_slixmpp() -> String {
    let candidates: Vec<String> = match std::env::var("CONFAB_PYTHON") {
        Ok(p) => vec![p],
        Err(_) => vec!["python3".into(), "/usr/bin/python3".into()],
    };
    let mut tried = Vec::new();
    for py in candidates {
        let out = tokio::process::Command::new(&py)
            .args(["-c", "import slixmpp; print(slixmpp.__version__)"])
            .stdin(Stdio::null())
            .output();
        match tokio::time::timeout(TIMEOUT, out).await {
            Ok(Ok(o)) if o.status.success() => return py,
            Ok(Ok(o)) => tried.push(format!(
                "{py}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(Err(e)) => tried.push(format!("{py}: {e}")),
            Err(_) => tried.push(format!("{py}: timed out")),
        }
    }
    panic!(
        "slixmpp is required for this test (install it with `apt-get install -y python3-slixmpp`, \
         or point CONFAB_PYTHON at an interpreter that has it); tried: {}",
        tried.join("; ")
    );
}

fn item(jid: &str, subscription: Subscription) -> RosterItem {
    RosterItem {
        jid: jid.to_string(),
        name: None,
        subscription,
        ask: false,
        approved: false,
        groups: Vec::new(),
    }
}

/// What one run of the slixmpp client printed: its JSON events, and its output for messages.
struct SlixRun {
    events: Vec<serde_json::Value>,
    output: String,
}

impl SlixRun {
    fn find(&self, name: &str) -> &serde_json::Value {
        self.events
            .iter()
            .find(|e| e["event"] == name)
            .unwrap_or_else(|| panic!("no {name} event in:\n{}", self.output))
    }

    fn all(&self, name: &str) -> Vec<&serde_json::Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }
}

/// Runs slixmpp as alice (with `extra` arguments; none is slixmpp at its defaults) against
/// `server`, with bob online answering its message; checks everything the script does.
async fn run_slixmpp(
    server: &TestServer,
    resource: &str,
    extra: &[&str],
) -> anyhow::Result<SlixRun> {
    let python = python_with_slixmpp().await;
    let alice = format!("alice@{DOMAIN}");
    let bob_bare = format!("bob@{DOMAIN}");
    let carol = format!("carol@{DOMAIN}");
    let mut bob = server.online("bob", "builder", resource).await?;

    let ca = server.dir.path().join("ca.pem");
    std::fs::write(&ca, &server.pki.ca_pem)?;
    let slix_jid = format!("{alice}/{resource}");
    let mut child = tokio::process::Command::new(&python)
        .arg(script())
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &server.addr().port().to_string(),
        ])
        .args(["--jid", &slix_jid, "--password", "slix pass ☃"])
        .arg("--ca")
        .arg(&ca)
        .args(["--to", &bob_bare, "--contact", &carol])
        .args(["--body", "hello from slixmpp <&> ✓", "--timeout", "20"])
        .args(extra)
        .args(
            std::env::var("CONFAB_SLIXMPP_DEBUG")
                .ok()
                .map(|_| "--debug"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;

    // Our side: slixmpp's presence, then its message, which we answer.
    let side = bob_side(&mut bob, &slix_jid).await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let status = match status {
        Ok(s) => s?,
        Err(_) => {
            child.kill().await?;
            child.wait().await?
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut stdout).await?;
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr).await?;
    }
    if let Err(e) = side {
        panic!("our client: {e:#}\nslixmpp stdout:\n{stdout}\nstderr:\n{stderr}");
    }
    assert!(
        status.success(),
        "slixmpp client failed ({status}):\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let run = SlixRun {
        events: stdout
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?,
        output: format!("stdout:\n{stdout}\nstderr:\n{stderr}"),
    };
    assert_eq!(run.find("session_start")["jid"], slix_jid.as_str());
    // Bob from the start; carol once an earlier run added her.
    let items = run.find("roster")["items"].clone();
    assert!(
        items == serde_json::json!([bob_bare]) || items == serde_json::json!([bob_bare, carol]),
        "{}",
        run.output
    );
    assert_eq!(run.find("roster_added")["jid"], carol.as_str());
    let reply = run.find("reply");
    assert_eq!(reply["from"], bob.jid.as_str());
    assert_eq!(reply["body"], "hi slixmpp, bob here");
    run.find("done");
    // slixmpp's clean logout reached bob as unavailable presence.
    bob.expect(|e| {
        e.name() == "presence"
            && e.attr("from") == Some(slix_jid.as_str())
            && e.attr("type") == Some("unavailable")
    })
    .await?;
    Ok(run)
}

/// Sets up alice (slixmpp) with bob subscribed to her presence, so he sees her come online.
async fn server_for_slixmpp() -> anyhow::Result<TestServer> {
    let server = TestServer::start().await?;
    server.add_user("alice", "slix pass ☃").await?;
    server.add_user("bob", "builder").await?;
    let alice = format!("alice@{DOMAIN}");
    let bob_bare = format!("bob@{DOMAIN}");
    let storage = server.storage();
    storage
        .put_roster_item(&alice, item(&bob_bare, Subscription::From))
        .await?;
    storage
        .put_roster_item(&bob_bare, item(&alice, Subscription::To))
        .await?;
    Ok(server)
}

/// Debian 12's slixmpp 1.8 with no options at all: it tries the -PLUS mechanisms with
/// `tls-unique` (which TLS 1.3 lacks), then SCRAM with the flag "y" (refused: we offer
/// -PLUS, RFC 5802 §6), then PLAIN over TLS. Every refusal says why, none counts as a
/// failed login, so it logs in — twice in a row, more attempts than one address may fail
/// in a minute.
#[tokio::test]
async fn stock_slixmpp_logs_in_uses_roster_and_chats() -> anyhow::Result<()> {
    let server = server_for_slixmpp().await?;
    for round in 0..2 {
        let run = run_slixmpp(&server, &format!("stock{round}"), &[]).await?;
        let failures = run.all("failed_auth");
        for f in &failures {
            let mech = f["mechanism"].as_str().unwrap_or_default();
            let (condition, needle) = if mech.ends_with("-PLUS") {
                ("malformed-request", "tls-server-end-point")
            } else {
                ("not-authorized", "server-does-support-channel-binding")
            };
            assert_eq!(f["condition"], condition, "{f}\n{}", run.output);
            assert!(
                f["text"].as_str().unwrap_or_default().contains(needle),
                "{f}\n{}",
                run.output
            );
        }
        // The mechanism it ended on is one it could use over TLS 1.3 without tls-unique.
        let mech = run.find("session_start")["mechanism"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            mech == "PLAIN" || (mech.starts_with("SCRAM-") && !mech.ends_with("-PLUS")),
            "{mech}\n{}",
            run.output
        );
        assert!(
            failures
                .iter()
                .any(|f| f["condition"] == "malformed-request"),
            "slixmpp 1.8 starts with a -PLUS mechanism: {}",
            run.output
        );
    }
    // The stored roster item slixmpp added has its name and group.
    let added = server
        .storage()
        .roster_item(&format!("alice@{DOMAIN}"), &format!("carol@{DOMAIN}"))
        .await?
        .unwrap_or_else(|| panic!("carol not in alice's roster"));
    assert_eq!(added.name.as_deref(), Some("Added by slixmpp"));
    assert_eq!(added.groups, ["Interop"]);
    Ok(())
}

/// SCRAM interop: slixmpp limited to SCRAM and told it has no channel binding ("n").
#[tokio::test]
async fn slixmpp_logs_in_with_scram() -> anyhow::Result<()> {
    let server = server_for_slixmpp().await?;
    let run = run_slixmpp(
        &server,
        "scram",
        &[
            "--mechs",
            "SCRAM-SHA-256,SCRAM-SHA-1",
            "--no-channel-binding",
        ],
    )
    .await?;
    let mech = run.find("session_start")["mechanism"]
        .as_str()
        .unwrap_or_default();
    assert!(
        mech.starts_with("SCRAM-"),
        "mechanism {mech:?}: {}",
        run.output
    );
    assert!(run.all("failed_auth").is_empty(), "{}", run.output);
    Ok(())
}

async fn bob_side(bob: &mut Client, slix_jid: &str) -> anyhow::Result<()> {
    let p = bob
        .expect(|e| e.name() == "presence" && e.attr("from") == Some(slix_jid))
        .await?;
    assert_eq!(p.attr("type"), None, "{p}");
    let m = bob.expect_body("hello from slixmpp <&> ✓").await?;
    assert_eq!(m.attr("from"), Some(slix_jid));
    assert_eq!(m.attr("type"), Some("chat"));
    bob.send(
        &Element::new("message", ns::CLIENT)
            .with_attr("to", slix_jid)
            .with_attr("type", "chat")
            .with_child(Element::new("body", ns::CLIENT).with_text("hi slixmpp, bob here")),
    )
    .await?;

    Ok(())
}
