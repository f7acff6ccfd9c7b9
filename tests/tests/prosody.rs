//! Federation with a real Prosody (Debian's `prosody` 0.12 with `lua-unbound`), as a child
//! process on a loopback address of its own: a confab user and a Prosody user exchange
//! messages and subscribe to each other, both ways, over TLS links authenticated by
//! certificates from the shared test CA. CI installs Prosody (`.ci/run`); when it is
//! missing the tests fail with a message saying so, they never skip.
//!
//! Each server finds the other through the test DNS server: confab through
//! `s2s.nameservers`, Prosody through its libunbound resolver, configured in
//! `tests/prosody/prosody.cfg.lua.in` to forward every query to the test DNS server and to
//! read neither `/etc/resolv.conf` nor `/etc/hosts`.
//!
//! `$CONFAB_PROSODY` names the `prosody` binary when it is not on PATH (`prosodyctl` is
//! looked up next to it); `$CONFAB_PROSODY_KEEP=1` keeps Prosody's directory (and log).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use confab_federation::AuthMethod;
use confab_protocol::sasl::ScramHash;
use confab_protocol::{ns, Element};
use confab_tests::dns::TestDns;
use confab_tests::*;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

const CONFAB: &str = "confab.test";
const PROSODY: &str = "prosody.test";

fn template() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("prosody/prosody.cfg.lua.in")
}

/// The `prosody` and `prosodyctl` binaries, or a panic that says how to install them.
fn prosody_binaries() -> (PathBuf, PathBuf) {
    let prosody = match std::env::var_os("CONFAB_PROSODY") {
        Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
        None => std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("prosody"))
                .find(|p| p.is_file())
        }),
    };
    let prosodyctl = prosody
        .as_ref()
        .and_then(|p| p.parent())
        .map(|d| d.join("prosodyctl"))
        .filter(|p| p.is_file());
    match (prosody, prosodyctl) {
        (Some(p), Some(ctl)) => (p, ctl),
        (p, _) => panic!(
            "Prosody is required for this test: {} (`.ci/run` installs it with \
             `apt-get install -y prosody lua-unbound`; $CONFAB_PROSODY may name the binary)",
            match p {
                None => "no `prosody` on PATH (or at $CONFAB_PROSODY)".to_string(),
                Some(p) => format!("no `prosodyctl` next to {}", p.display()),
            }
        ),
    }
}

/// A random loopback address in 127.100.0.0–127.199.255.255 (other tests use 127.0.0.1
/// and 127.53.x.y), so Prosodies of tests running in parallel never share an address.
fn own_loopback_ip() -> Ipv4Addr {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let n = h.finish();
    Ipv4Addr::new(
        127,
        100 + (n % 100) as u8,
        (n >> 8) as u8,
        ((n >> 16) % 250) as u8 + 2,
    )
}

/// `N` ports free on `ip` (the kernel's choice; all held until all are chosen, so they
/// differ; nobody else listens on this address).
async fn free_ports<const N: usize>(ip: Ipv4Addr) -> Result<[u16; N]> {
    let mut held = Vec::new();
    for _ in 0..N {
        held.push(TcpListener::bind((ip, 0)).await?);
    }
    let mut ports = [0; N];
    for (port, l) in ports.iter_mut().zip(&held) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

/// A Prosody server running as a child process, everything in a temporary directory.
struct Prosody {
    /// Behind a lock so that waits on `&self` can notice that Prosody exited.
    child: std::sync::Mutex<Child>,
    dir: tempfile::TempDir,
    config: PathBuf,
    prosodyctl: PathBuf,
    ip: Ipv4Addr,
    c2s: SocketAddr,
    s2s: SocketAddr,
    /// Direct TLS (XEP-0368).
    s2s_tls: SocketAddr,
}

impl Prosody {
    /// Writes the configuration, registers `users` and starts Prosody for [`PROSODY`];
    /// returns once it listens and its resolver is set up.
    async fn start(
        pki: &TestPki,
        dns: SocketAddr,
        secure_auth: bool,
        users: &[(&str, &str)],
    ) -> Result<Prosody> {
        let (prosody, prosodyctl) = prosody_binaries();
        let dir = tempfile::Builder::new().prefix("prosody-").tempdir()?;
        std::fs::create_dir(dir.path().join("data"))?;
        // Prosody's `certificates` directory: DOMAIN.crt and DOMAIN.key.
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs)?;
        for (from, to) in [("pem", "crt"), ("key", "key")] {
            std::fs::copy(
                pki.dir.join(format!("{PROSODY}.{from}")),
                certs.join(format!("{PROSODY}.{to}")),
            )?;
        }
        let ip = own_loopback_ip();
        let [c2s, s2s, s2s_tls] = free_ports::<3>(ip)
            .await?
            .map(|port| SocketAddr::new(IpAddr::V4(ip), port));
        let pem = |name: &str| pki.dir.join(name).display().to_string();
        let vars = [
            ("DIR", dir.path().display().to_string()),
            ("IP", ip.to_string()),
            ("C2S_PORT", c2s.port().to_string()),
            ("S2S_PORT", s2s.port().to_string()),
            ("S2S_TLS_PORT", s2s_tls.port().to_string()),
            // libunbound's forwarder syntax: address@port.
            ("DNS", format!("{}@{}", dns.ip(), dns.port())),
            ("DOMAIN", PROSODY.to_string()),
            ("CA", pem("ca.pem")),
            ("SECURE_AUTH", secure_auth.to_string()),
        ];
        let mut text = std::fs::read_to_string(template()).context("reading the template")?;
        for (k, v) in vars {
            text = text.replace(&format!("{{{{{k}}}}}"), &v);
        }
        if let Some(rest) = text.find("{{").map(|i| &text[i..]) {
            bail!("unfilled placeholder in the Prosody config: {rest:.40}");
        }
        let config = dir.path().join("prosody.cfg.lua");
        std::fs::write(&config, text)?;
        let child = Command::new(&prosody)
            .arg("--config")
            .arg(&config)
            // Foreground, whatever the configuration says (no mod_posix daemonizing).
            .arg("--no-daemonize")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.txt"))?)
            .stderr(std::fs::File::create(dir.path().join("stderr.txt"))?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", prosody.display()))?;
        let p = Prosody {
            child: std::sync::Mutex::new(child),
            dir,
            config,
            prosodyctl,
            ip,
            c2s,
            s2s,
            s2s_tls,
        };
        for (user, password) in users {
            p.register(user, password).await?;
        }
        // net.unbound sets its resolver up on "server-started", after the listeners.
        p.wait_log("Setting up net.server event handling")
            .await
            .map_err(|e| {
                if p.log().contains("Using legacy DNS API") {
                    anyhow!(
                        "Prosody does not use lua-unbound, so it cannot be pointed at the test \
                         DNS server: `apt-get install -y lua-unbound` (.ci/run does)"
                    )
                } else {
                    e
                }
            })?;
        for addr in [c2s, s2s, s2s_tls] {
            tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| anyhow!("Prosody does not accept connections on {addr}"))??;
        }
        Ok(p)
    }

    /// `prosodyctl register` (works on the data directory, with or without the server).
    async fn register(&self, user: &str, password: &str) -> Result<()> {
        let out = Command::new(&self.prosodyctl)
            .arg("--config")
            .arg(&self.config)
            .args(["register", user, PROSODY, password])
            .stdin(Stdio::null())
            .output();
        let out = tokio::time::timeout(TIMEOUT, out)
            .await
            .map_err(|_| anyhow!("prosodyctl register timed out"))??;
        if !out.status.success() {
            bail!(
                "prosodyctl register {user}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prosody.log")).unwrap_or_default()
    }

    /// Waits until Prosody's log has a line containing `needle` (or Prosody exits).
    async fn wait_log(&self, needle: &str) -> Result<String> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            let exited = self
                .child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_wait()?;
            if let Some(status) = exited {
                bail!(
                    "Prosody exited ({status}) before logging {needle:?}:\n{}\n{}",
                    read(&self.dir.path().join("stderr.txt")),
                    self.log_tail()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("Prosody did not log {needle:?} in time");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of the log, for failure messages.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(120);
        format!(
            "--- Prosody log ({}) ---\n{}",
            self.dir.path().join("prosody.log").display(),
            lines[from..].join("\n")
        )
    }

    /// Logs in over STARTTLS with SCRAM-SHA-1 (Prosody 0.12's strongest SCRAM), binds,
    /// gets the roster and sends initial presence.
    async fn online(
        &self,
        pki: &TestPki,
        user: &str,
        password: &str,
        resource: &str,
    ) -> Result<Client> {
        let mut c = Client::connect_to(self.c2s, PROSODY).await?;
        c.starttls(pki).await?;
        let mechanisms = c.mechanisms();
        if !mechanisms.iter().any(|m| m == "SCRAM-SHA-1") {
            bail!("Prosody offers no SCRAM-SHA-1: {mechanisms:?}");
        }
        c.authenticate(ScramHash::Sha1, false, user, password)
            .await?;
        c.bind(Some(resource)).await?;
        c.roster_get().await?;
        c.send(&presence(None, None)).await?;
        let full = c.jid.clone();
        c.expect(|e| e.name() == "presence" && e.attr("from") == Some(full.as_str()))
            .await?;
        Ok(c)
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.start_kill();
        if std::env::var_os("CONFAB_PROSODY_KEEP").is_some() {
            let path = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("keeping Prosody's directory {}", path.keep().display());
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// confab for [`CONFAB`] and Prosody for [`PROSODY`], each published in the test DNS.
struct Peers {
    dns: TestDns,
    pki: Arc<TestPki>,
    confab: TestServer,
    prosody: Prosody,
}

/// Peers whose certificates are both valid for their domains; Prosody insists on that.
async fn peers() -> Result<Peers> {
    peers_with(TestPki::create_temp(&[CONFAB, PROSODY])?, true).await
}

async fn peers_with(pki: Arc<TestPki>, secure_auth: bool) -> Result<Peers> {
    let dns = TestDns::start().await?;
    let ns_addr = dns.addr.to_string();
    let confab = TestServer::start_with_pki(pki.clone(), &[CONFAB], |c| {
        c.s2s.nameservers = vec![ns_addr.clone()];
        c.s2s.connect_timeout_secs = 5;
    })
    .await?;
    confab
        .add_account(&format!("alice@{CONFAB}"), "pw-alice")
        .await?;
    let prosody = Prosody::start(&pki, dns.addr, secure_auth, &[("romeo", "pw-romeo")]).await?;
    // RFC 6120 §3.2.1: SRV for each domain's s2s STARTTLS port, and the target's A record.
    let confab_host = format!("xmpp.{CONFAB}");
    dns.add_srv(
        &format!("_xmpp-server._tcp.{CONFAB}"),
        0,
        5,
        confab.running().s2s_addrs[0].port(),
        &confab_host,
    );
    dns.add_a(&confab_host, IpAddr::V4(Ipv4Addr::LOCALHOST));
    let prosody_host = format!("xmpp.{PROSODY}");
    dns.add_srv(
        &format!("_xmpp-server._tcp.{PROSODY}"),
        0,
        5,
        prosody.s2s.port(),
        &prosody_host,
    );
    dns.add_a(&prosody_host, IpAddr::V4(prosody.ip));
    Ok(Peers {
        dns,
        pki,
        confab,
        prosody,
    })
}

/// A scenario's outcome; on failure the error carries Prosody's log.
fn explain(outcome: Result<()>, p: &Peers) -> Result<()> {
    outcome.map_err(|e| anyhow!("{e:#}\n{}", p.prosody.log_tail()))
}

/// How confab's (outgoing, incoming) links with Prosody were authenticated.
fn confab_methods(p: &Peers) -> Result<(Option<AuthMethod>, Option<AuthMethod>)> {
    let fed = p
        .confab
        .running()
        .server
        .federation
        .get()
        .context("confab has federation")?;
    Ok((
        auth_method(fed.links(), PROSODY),
        auth_method(fed.incoming_links(), PROSODY),
    ))
}

fn auth_method(links: Vec<confab_federation::LinkInfo>, remote: &str) -> Option<AuthMethod> {
    links
        .into_iter()
        .find(|l| l.remote == remote)
        .and_then(|l| l.method)
}

fn is_presence_from(e: &Element, from_bare: &str, ty: Option<&str>) -> bool {
    e.name() == "presence"
        && e.attr("from")
            .is_some_and(|f| f.split('/').next() == Some(from_bare))
        && e.attr("type") == ty
}

fn is_roster_push(e: &Element, jid: &str, subscription: &str) -> bool {
    e.name() == "iq"
        && e.attr("type") == Some("set")
        && e.get_child("query", ns::ROSTER).is_some_and(|q| {
            q.children()
                .any(|i| i.attr("jid") == Some(jid) && i.attr("subscription") == Some(subscription))
        })
}

#[tokio::test]
async fn messages_flow_both_ways_between_confab_and_prosody() -> Result<()> {
    let p = peers().await?;
    let outcome = messages(&p).await;
    explain(outcome, &p)
}

async fn messages(p: &Peers) -> Result<()> {
    let mut alice = p
        .confab
        .online_at(CONFAB, "alice", "pw-alice", "desk")
        .await?;
    let mut romeo = p
        .prosody
        .online(&p.pki, "romeo", "pw-romeo", "balcony")
        .await?;
    let romeo_bare = format!("romeo@{PROSODY}");

    // confab -> Prosody: confab finds Prosody through the test DNS.
    alice.chat(&romeo_bare, "hello from confab").await?;
    let m = romeo
        .expect_body("hello from confab")
        .await
        .context("romeo waiting for alice's message")?;
    assert_eq!(m.attr("from"), Some(alice.jid.as_str()));
    assert_eq!(m.attr("type"), Some("chat"));

    // Prosody -> confab: Prosody finds confab through the same DNS (libunbound).
    romeo.chat(&alice.jid.clone(), "hello from prosody").await?;
    let m = alice
        .expect_body("hello from prosody")
        .await
        .context("alice waiting for romeo's message")?;
    assert_eq!(m.attr("from"), Some(romeo.jid.as_str()));
    assert_eq!(m.attr("type"), Some("chat"));

    // Both certificates are valid for their domains and come from the CA each side
    // trusts: SASL EXTERNAL (XEP-0178) both ways, as each server sees it.
    assert_eq!(
        confab_methods(p)?,
        (Some(AuthMethod::External), Some(AuthMethod::External))
    );
    // Prosody's view of the same two links.
    p.prosody
        .wait_log(&format!("Accepting SASL EXTERNAL identity from {CONFAB}"))
        .await?;
    p.prosody
        .wait_log(&format!("SASL EXTERNAL with {CONFAB} succeeded"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn subscriptions_both_ways_between_confab_and_prosody() -> Result<()> {
    let p = peers().await?;
    let outcome = subscriptions(&p).await;
    explain(outcome, &p)
}

async fn subscriptions(p: &Peers) -> Result<()> {
    let mut alice = p
        .confab
        .online_at(CONFAB, "alice", "pw-alice", "desk")
        .await?;
    let mut romeo = p
        .prosody
        .online(&p.pki, "romeo", "pw-romeo", "balcony")
        .await?;
    let (alice_bare, romeo_bare) = (format!("alice@{CONFAB}"), format!("romeo@{PROSODY}"));

    // The confab user subscribes to the Prosody user (RFC 6121 §3.1), who approves.
    alice
        .send(&presence(Some("subscribe"), Some(&romeo_bare)))
        .await?;
    let req = romeo
        .expect(|e| is_presence_from(e, &alice_bare, Some("subscribe")))
        .await
        .context("romeo waiting for alice's subscription request")?;
    assert_eq!(req.attr("from"), Some(alice_bare.as_str()));
    romeo
        .send(&presence(Some("subscribed"), Some(&alice_bare)))
        .await?;
    alice
        .expect(|e| is_roster_push(e, &romeo_bare, "to"))
        .await
        .context("alice waiting for the roster push of romeo (to)")?;
    // §3.1.5: Prosody sends romeo's current presence once it approved.
    alice
        .expect(|e| is_presence_from(e, &romeo_bare, None))
        .await
        .context("alice waiting for romeo's presence")?;
    romeo
        .expect(|e| is_roster_push(e, &alice_bare, "from"))
        .await
        .context("romeo waiting for the roster push of alice (from)")?;

    // The Prosody user subscribes back; the confab user approves: both ways now.
    romeo
        .send(&presence(Some("subscribe"), Some(&alice_bare)))
        .await?;
    let req = alice
        .expect(|e| is_presence_from(e, &romeo_bare, Some("subscribe")))
        .await
        .context("alice waiting for romeo's subscription request")?;
    assert_eq!(req.attr("from"), Some(romeo_bare.as_str()));
    alice
        .send(&presence(Some("subscribed"), Some(&romeo_bare)))
        .await?;
    romeo
        .expect(|e| is_roster_push(e, &alice_bare, "both"))
        .await
        .context("romeo waiting for the roster push of alice (both)")?;
    let seen = romeo
        .expect(|e| is_presence_from(e, &alice_bare, None))
        .await
        .context("romeo waiting for alice's presence")?;
    assert_eq!(seen.attr("from"), Some(alice.jid.as_str()));
    alice
        .expect(|e| is_roster_push(e, &romeo_bare, "both"))
        .await
        .context("alice waiting for the roster push of romeo (both)")?;

    // Presence now flows both ways. Each side is told when the other goes offline
    // (while it is itself available: RFC 6121 §4.3.2 drops presence to users without
    // available resources).
    alice.send(&presence(Some("unavailable"), None)).await?;
    romeo
        .expect(|e| is_presence_from(e, &alice_bare, Some("unavailable")))
        .await
        .context("romeo waiting for alice's unavailable presence")?;
    alice.send(&presence(None, None)).await?;
    romeo
        .expect(|e| is_presence_from(e, &alice_bare, None))
        .await
        .context("romeo waiting for alice to be back")?;
    romeo.send(&presence(Some("unavailable"), None)).await?;
    alice
        .expect(|e| is_presence_from(e, &romeo_bare, Some("unavailable")))
        .await
        .context("alice waiting for romeo's unavailable presence")?;
    Ok(())
}

#[tokio::test]
async fn dialback_with_prosody_when_confabs_certificate_does_not_fit() -> Result<()> {
    // confab's certificate is valid for another name: Prosody cannot authenticate confab
    // by certificate, so confab uses dialback (XEP-0220) and Prosody verifies the key
    // with confab as the authoritative server; Prosody's certificate is fine, so it uses
    // SASL EXTERNAL towards confab.
    let tmp = tempfile::tempdir()?;
    let pki = Arc::new(
        TestPki::create_named(
            tmp.path(),
            &[(CONFAB, "elsewhere.test"), (PROSODY, PROSODY)],
        )?
        .with_lenient_names(),
    );
    let p = peers_with(pki, false).await?;
    let outcome = dialback(&p).await;
    explain(outcome, &p)
}

async fn dialback(p: &Peers) -> Result<()> {
    let mut alice = p
        .confab
        .online_at(CONFAB, "alice", "pw-alice", "desk")
        .await?;
    let mut romeo = p
        .prosody
        .online(&p.pki, "romeo", "pw-romeo", "balcony")
        .await?;
    alice
        .chat(&format!("romeo@{PROSODY}"), "via dialback")
        .await?;
    let m = romeo
        .expect_body("via dialback")
        .await
        .context("romeo waiting for alice's message")?;
    assert_eq!(m.attr("from"), Some(alice.jid.as_str()));
    romeo.chat(&alice.jid.clone(), "and back").await?;
    let m = alice
        .expect_body("and back")
        .await
        .context("alice waiting for romeo's message")?;
    assert_eq!(m.attr("from"), Some(romeo.jid.as_str()));
    assert_eq!(
        confab_methods(p)?,
        (Some(AuthMethod::Dialback), Some(AuthMethod::External))
    );
    p.prosody
        .wait_log(&format!("SASL EXTERNAL with {CONFAB} succeeded"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn direct_tls_both_ways_between_confab_and_prosody() -> Result<()> {
    // XEP-0368: each domain publishes only an _xmpps-server SRV record, to its direct
    // TLS port; Prosody 0.12 looks that record up first, confab too.
    let p = peers().await?;
    for (domain, port) in [
        (CONFAB, p.confab.running().s2s_tls_addrs[0].port()),
        (PROSODY, p.prosody.s2s_tls.port()),
    ] {
        p.dns.remove(&format!("_xmpp-server._tcp.{domain}"));
        p.dns.add_srv(
            &format!("_xmpps-server._tcp.{domain}"),
            0,
            5,
            port,
            &format!("xmpp.{domain}"),
        );
    }
    let outcome = direct_tls(&p).await;
    explain(outcome, &p)
}

async fn direct_tls(p: &Peers) -> Result<()> {
    let mut alice = p
        .confab
        .online_at(CONFAB, "alice", "pw-alice", "desk")
        .await?;
    let mut romeo = p
        .prosody
        .online(&p.pki, "romeo", "pw-romeo", "balcony")
        .await?;
    alice
        .chat(&format!("romeo@{PROSODY}"), "over direct TLS")
        .await?;
    romeo
        .expect_body("over direct TLS")
        .await
        .context("romeo waiting for alice's message")?;
    romeo.chat(&alice.jid.clone(), "direct TLS back").await?;
    alice
        .expect_body("direct TLS back")
        .await
        .context("alice waiting for romeo's message")?;
    assert_eq!(
        confab_methods(p)?,
        (Some(AuthMethod::External), Some(AuthMethod::External))
    );
    // Neither link used STARTTLS (Prosody logs every element at debug level), and
    // Prosody's outgoing connection went to confab's direct TLS port.
    let log = p.prosody.log();
    for starttls in [
        "Sending[s2sout_unauthed]: <starttls",
        "Received[s2sin_unauthed]: <starttls",
    ] {
        if log.contains(starttls) {
            bail!("an s2s link used STARTTLS: {starttls}");
        }
    }
    let port = p.confab.running().s2s_tls_addrs[0].port();
    p.prosody
        .wait_log(&format!("Next target to try is 127.0.0.1:{port}"))
        .await
        .context("Prosody's connection to confab's direct TLS port")?;
    Ok(())
}
