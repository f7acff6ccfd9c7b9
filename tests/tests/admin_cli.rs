//! The real `confab` binary for administration: `check certs`, `cert generate`,
//! `cert import` (then served to clients), `user show`, completions and the man page.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::Result;
use confab_protocol::sasl::ScramHash;
use confab_protocol::{ns, Element};
use confab_tests::bin::*;
use confab_tests::*;

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn certs(&self) -> PathBuf {
        self.data().join("certs")
    }
}

/// A config for `confab.test` in a temp dir; with `tls`, a `[tls."confab.test"]` entry
/// naming those files (else the server uses `data/certs/confab.test.crt`).
fn setup(tls: Option<(&Path, &Path)>) -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let p = dir.path();
    let mut toml = format!(
        r#"domains = ["{DOMAIN}"]
data_dir = "{data}"
log_level = "info"

[c2s]
listen = ["127.0.0.1:0"]
tls_listen = []

[s2s]
enabled = false
listen = []
tls_listen = []

[auth]
scram_iterations = 4096
"#,
        data = p.join("data").display(),
    );
    if let Some((cert, key)) = tls {
        toml.push_str(&format!(
            "\n[tls.\"{DOMAIN}\"]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    let config = p.join("confab.toml");
    std::fs::write(&config, toml)?;
    Ok(Setup { dir, config })
}

/// Runs `confab --config F <args>` with `stdin` as its input; waits with a timeout.
async fn run(s: &Setup, args: &[&str], stdin: &str) -> Result<Output> {
    run_cli(&s.config, args, stdin).await
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "failed: stdout {} stderr {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn lines_with<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A self-signed certificate for `name` valid from `from` to `to` days from now.
fn write_dated_cert(dir: &Path, name: &str, from: i64, to: i64) -> Result<(PathBuf, PathBuf)> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    set_validity(&mut params, from, to);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}

/// Valid from `from` to `to` days from now (built from the epoch, so the tests need not
/// depend on the `time` crate that rcgen uses).
fn set_validity(params: &mut rcgen::CertificateParams, from: i64, to: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |days: i64| {
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs((now + days * 86_400) as u64)
    };
    params.not_before = at(from);
    params.not_after = at(to);
}

/// The DER of the first certificate in a PEM file.
fn leaf_der(pem_path: &Path) -> Result<Vec<u8>> {
    let pem = std::fs::read_to_string(pem_path)?;
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    use base64::Engine;
    Ok(base64::engine::general_purpose::STANDARD.decode(b64)?)
}

#[tokio::test]
async fn check_certs_passes_a_valid_certificate_from_a_ca() -> Result<()> {
    let pki_dir = tempfile::tempdir()?;
    TestPki::create(pki_dir.path(), &[DOMAIN])?;
    let cert = pki_dir.path().join(format!("{DOMAIN}.pem"));
    let key = pki_dir.path().join(format!("{DOMAIN}.key"));
    let s = setup(Some((&cert, &key)))?;
    let out = run(&s, &["check", "certs"], "").await?;
    assert_ok(&out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "ok: {DOMAIN}: the certificate is valid for {DOMAIN} (names: {DOMAIN})"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("chain of 2"), "{stdout}");
    assert!(stdout.contains("issued by CN=confab test CA"), "{stdout}");
    assert!(stdout.contains("days left)"), "{stdout}");
    assert!(lines_with(&stdout, "problem:").is_empty(), "{stdout}");
    assert!(!stdout.contains("self-signed"), "{stdout}");

    // `check` alone: configuration and certificates.
    let out = run(&s, &["check"], "").await?;
    assert_ok(&out);
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("ok: configuration is valid"), "{stdout}");
    assert!(stdout.contains("the certificate is valid for"), "{stdout}");
    Ok(())
}

#[tokio::test]
async fn check_certs_names_a_certificate_for_another_name() -> Result<()> {
    let pki_dir = tempfile::tempdir()?;
    // The file is called confab.test.pem but the certificate names only a name that
    // contains the domain: RFC 6125 matching, not a substring search, must refuse it.
    TestPki::create_named(pki_dir.path(), &[(DOMAIN, "confab.test.elsewhere.test")])?;
    let cert = pki_dir.path().join(format!("{DOMAIN}.pem"));
    let key = pki_dir.path().join(format!("{DOMAIN}.key"));
    let s = setup(Some((&cert, &key)))?;
    let out = run(&s, &["check", "certs"], "").await?;
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let problems = lines_with(&stdout, "problem:");
    assert_eq!(problems.len(), 1, "{stdout}");
    assert!(
        problems[0].contains(&format!("is not valid for {DOMAIN}"))
            && problems[0].contains("names: confab.test.elsewhere.test"),
        "{stdout}"
    );
    assert!(text(&out.stderr).contains("1 problem(s) found"));
    // `check` alone fails the same way.
    let out = run(&s, &["check"], "").await?;
    assert!(!out.status.success());
    Ok(())
}

#[tokio::test]
async fn check_certs_refuses_an_expired_certificate_and_warns_before() -> Result<()> {
    let files = tempfile::tempdir()?;
    let (cert, key) = write_dated_cert(files.path(), DOMAIN, -100, -2)?;
    let s = setup(Some((&cert, &key)))?;
    let out = run(&s, &["check", "certs"], "").await?;
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let problems = lines_with(&stdout, "problem:");
    assert_eq!(problems.len(), 1, "{stdout}");
    assert!(problems[0].contains("expired on"), "{stdout}");
    assert!(problems[0].contains("renew it"), "{stdout}");
    assert!(
        lines_with(&stdout, "warning:")
            .iter()
            .any(|l| l.contains("self-signed")),
        "{stdout}"
    );

    // Expiring in 3 days: a warning, exit 0.
    let files = tempfile::tempdir()?;
    let (cert, key) = write_dated_cert(files.path(), DOMAIN, -100, 3)?;
    let s = setup(Some((&cert, &key)))?;
    let out = run(&s, &["check", "certs"], "").await?;
    assert_ok(&out);
    let stdout = text(&out.stdout);
    assert!(lines_with(&stdout, "problem:").is_empty(), "{stdout}");
    assert!(
        lines_with(&stdout, "warning:")
            .iter()
            .any(|l| l.contains("expires on") && l.contains(", in 3 days: renew it soon")),
        "{stdout}"
    );

    // A key of another certificate is a problem too.
    let other = tempfile::tempdir()?;
    let (_, other_key) = write_dated_cert(other.path(), DOMAIN, -1, 100)?;
    let s = setup(Some((&cert, &other_key)))?;
    let out = run(&s, &["check", "certs"], "").await?;
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("does not belong to the certificate"),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test]
async fn cert_generate_writes_a_private_key_and_refuses_to_overwrite() -> Result<()> {
    let s = setup(None)?;
    // Before the first start there is no certificate: said, but not a problem.
    let out = run(&s, &["check", "certs"], "").await?;
    assert_ok(&out);
    assert!(text(&out.stdout).contains("no certificate yet"));

    let out = run(&s, &["cert", "generate", DOMAIN], "").await?;
    assert_ok(&out);
    let crt = s.certs().join(format!("{DOMAIN}.crt"));
    let key = s.certs().join(format!("{DOMAIN}.key"));
    assert!(
        text(&out.stdout).starts_with(&format!(
            "generated a self-signed certificate for {DOMAIN}: {}",
            crt.display()
        )),
        "{}",
        text(&out.stdout)
    );
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);
    let first = std::fs::read(&crt)?;

    let out = run(&s, &["cert", "generate", DOMAIN], "").await?;
    assert_refused(&out, "--force");
    assert_eq!(std::fs::read(&crt)?, first, "replaced without --force");

    let out = run(&s, &["cert", "generate", DOMAIN, "--force"], "").await?;
    assert_ok(&out);
    assert_ne!(std::fs::read(&crt)?, first, "--force did not replace it");
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);
    // No temporary files are left behind.
    assert_eq!(std::fs::read_dir(s.certs())?.count(), 2);

    let out = run(&s, &["check", "certs"], "").await?;
    assert_ok(&out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "ok: {DOMAIN}: the certificate is valid for {DOMAIN}"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("warning: confab.test: the certificate is self-signed"));

    let out = run(&s, &["cert", "generate", "elsewhere.test"], "").await?;
    assert_refused(&out, "not a domain this server serves");
    Ok(())
}

#[tokio::test]
async fn cert_generate_says_when_the_config_names_other_files() -> Result<()> {
    let pki_dir = tempfile::tempdir()?;
    TestPki::create(pki_dir.path(), &[DOMAIN])?;
    let cert = pki_dir.path().join(format!("{DOMAIN}.pem"));
    let key = pki_dir.path().join(format!("{DOMAIN}.key"));
    let s = setup(Some((&cert, &key)))?;
    let out = run(&s, &["cert", "generate", DOMAIN], "").await?;
    assert_ok(&out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "warning: [tls.\"{DOMAIN}\"] in the configuration names"
        )) && stdout.contains(&cert.display().to_string()),
        "{stdout}"
    );
    Ok(())
}

/// A certbot-style `live/DOMAIN/` directory holding `pki`'s certificate for `file`.
fn live_dir(root: &Path, dir_name: &str, pki_dir: &Path, file: &str) -> Result<PathBuf> {
    let live = root.join("live").join(dir_name);
    std::fs::create_dir_all(&live)?;
    std::fs::copy(
        pki_dir.join(format!("{file}.pem")),
        live.join("fullchain.pem"),
    )?;
    std::fs::copy(
        pki_dir.join(format!("{file}.key")),
        live.join("privkey.pem"),
    )?;
    Ok(live)
}

#[tokio::test]
async fn cert_import_installs_a_lets_encrypt_directory_that_serve_then_uses() -> Result<()> {
    let s = setup(None)?;
    let pki_dir = tempfile::tempdir()?;
    let pki = TestPki::create(pki_dir.path(), &[DOMAIN])?;
    let live = live_dir(pki_dir.path(), DOMAIN, pki_dir.path(), DOMAIN)?;

    let out = run(&s, &["cert", "import", live.to_str().unwrap()], "").await?;
    assert_ok(&out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!("imported the certificate for {DOMAIN}")),
        "{stdout}"
    );
    assert!(stdout.contains("issued by CN=confab test CA"), "{stdout}");
    let crt = s.certs().join(format!("{DOMAIN}.crt"));
    let key = s.certs().join(format!("{DOMAIN}.key"));
    assert_eq!(
        std::fs::read(&crt)?,
        std::fs::read(live.join("fullchain.pem"))?
    );
    assert_eq!(
        std::fs::read(&key)?,
        std::fs::read(live.join("privkey.pem"))?
    );
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);
    assert_eq!(std::fs::read_dir(s.certs())?.count(), 2);

    // Refusals leave the installed files alone.
    // A key that does not belong to the certificate:
    let other = tempfile::tempdir()?;
    TestPki::create(other.path(), &[DOMAIN])?;
    let mixed = pki_dir.path().join("mixed").join(DOMAIN);
    std::fs::create_dir_all(&mixed)?;
    std::fs::copy(live.join("fullchain.pem"), mixed.join("fullchain.pem"))?;
    std::fs::copy(
        other.path().join(format!("{DOMAIN}.key")),
        mixed.join("privkey.pem"),
    )?;
    let out = run(&s, &["cert", "import", mixed.to_str().unwrap()], "").await?;
    assert_refused(&out, "does not belong to the certificate");
    // A directory named after a domain we do not serve:
    let wrong = live_dir(pki_dir.path(), "elsewhere.test", pki_dir.path(), DOMAIN)?;
    let out = run(&s, &["cert", "import", wrong.to_str().unwrap()], "").await?;
    assert_refused(&out, "--domain");
    // A certificate for another name imported for our domain:
    let misnamed_dir = tempfile::tempdir()?;
    TestPki::create_named(misnamed_dir.path(), &[("x", "elsewhere.test")])?;
    let misnamed = live_dir(pki_dir.path(), "misnamed", misnamed_dir.path(), "x")?;
    let out = run(
        &s,
        &[
            "cert",
            "import",
            misnamed.to_str().unwrap(),
            "--domain",
            DOMAIN,
        ],
        "",
    )
    .await?;
    assert_refused(&out, &format!("not valid for {DOMAIN}"));
    // A directory without fullchain.pem:
    let empty = pki_dir.path().join("empty").join(DOMAIN);
    std::fs::create_dir_all(&empty)?;
    let out = run(&s, &["cert", "import", empty.to_str().unwrap()], "").await?;
    assert_refused(&out, "fullchain.pem");
    assert_eq!(
        std::fs::read(&crt)?,
        std::fs::read(live.join("fullchain.pem"))?
    );
    assert_eq!(
        std::fs::read_dir(s.certs())?.count(),
        2,
        "temporary files left"
    );

    // The server serves the imported certificate.
    let Served {
        mut child,
        addr,
        drain: _drain,
        ..
    } = spawn_serve(&s.config).await?;
    let mut c = Client::connect(addr).await?;
    c.starttls(&pki).await?;
    let served = c.peer_certificates();
    assert_eq!(
        served.first(),
        Some(&leaf_der(&live.join("fullchain.pem"))?)
    );
    drop(c);
    // Importing a renewed certificate while it runs (the certbot deploy hook): the
    // running server reloads, and the next client is served the new one.
    let renewed_dir = tempfile::tempdir()?;
    let renewed_pki = TestPki::create(renewed_dir.path(), &[DOMAIN])?;
    let renewed = live_dir(renewed_dir.path(), DOMAIN, renewed_dir.path(), DOMAIN)?;
    let out = run(&s, &["cert", "import", renewed.to_str().unwrap()], "").await?;
    assert_ok(&out);
    assert!(
        text(&out.stdout).contains("configuration and certificates reloaded"),
        "{}",
        text(&out.stdout)
    );
    let mut c = Client::connect(addr).await?;
    c.starttls(&renewed_pki).await?;
    assert_eq!(
        c.peer_certificates().first(),
        Some(&leaf_der(&renewed.join("fullchain.pem"))?)
    );
    drop(c);
    let out = run(&s, &["stop"], "").await?;
    assert_ok(&out);
    tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    Ok(())
}

#[tokio::test]
async fn user_show_offline_and_while_running() -> Result<()> {
    let pki_dir = tempfile::tempdir()?;
    let pki = TestPki::create(pki_dir.path(), &[DOMAIN])?;
    let cert = pki_dir.path().join(format!("{DOMAIN}.pem"));
    let key = pki_dir.path().join(format!("{DOMAIN}.key"));
    let s = setup(Some((&cert, &key)))?;
    let alice = format!("alice@{DOMAIN}");
    let bob = format!("bob@{DOMAIN}");
    assert_ok(&run(&s, &["user", "add", &alice], "wonderland\n").await?);
    assert_ok(&run(&s, &["user", "add", &bob], "builder\n").await?);

    let out = run(&s, &["user", "show", &alice], "").await?;
    assert_ok(&out);
    assert_eq!(
        text(&out.stdout),
        format!(
            "account: {alice}\nroster items: 0\noffline messages: 0\n\
             sessions: 0 (the server is not running)\n"
        )
    );
    let out = run(&s, &["user", "show", &format!("nobody@{DOMAIN}")], "").await?;
    assert_refused(&out, "no account");
    let out = run(&s, &["user", "show", "carol@elsewhere.test"], "").await?;
    assert_refused(&out, "not a domain this server serves");

    let Served {
        mut child,
        addr,
        drain: _drain,
        ..
    } = spawn_serve(&s.config).await?;
    // Bob adds alice to his roster and writes to her while she is away.
    let mut b = login(&pki, addr, "bob", "builder", "desk").await?;
    let set = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_child(
            Element::new("query", ns::ROSTER)
                .with_child(Element::new("item", ns::ROSTER).with_attr("jid", &alice)),
        );
    let reply = b.iq(set).await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    b.chat(&alice, "are you there?").await?;

    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let out = run(&s, &["user", "show", &alice], "").await?;
        assert_ok(&out);
        if text(&out.stdout).contains("offline messages: 1") {
            assert!(
                text(&out.stdout).contains("sessions: 0\n"),
                "{}",
                text(&out.stdout)
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the offline message was not counted: {}",
            text(&out.stdout)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = run(&s, &["user", "show", &bob], "").await?;
    assert_ok(&out);
    let shown = text(&out.stdout);
    assert!(shown.contains("roster items: 1"), "{shown}");
    assert!(shown.contains("sessions: 1\n"), "{shown}");
    assert!(
        shown.contains(&format!("  {bob}/desk  127.0.0.1  TLSv1.3  ")),
        "{shown}"
    );
    let out = run(&s, &["user", "show", &format!("nobody@{DOMAIN}")], "").await?;
    assert_refused(&out, "no account");

    drop(b);
    let out = run(&s, &["stop"], "").await?;
    assert_ok(&out);
    tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    // Stopped: read from the store.
    let out = run(&s, &["user", "show", &bob], "").await?;
    assert_ok(&out);
    assert!(text(&out.stdout).contains("roster items: 1"));
    Ok(())
}

#[tokio::test]
async fn completions_and_man_page_come_from_the_command_definitions() -> Result<()> {
    let s = setup(None)?;
    let out = run(&s, &["completions", "bash"], "").await?;
    assert_ok(&out);
    let script = text(&out.stdout);
    assert!(script.contains("confab"), "{script}");
    assert!(script.contains("import"), "subcommands are completed");
    for shell in ["zsh", "fish"] {
        assert_ok(&run(&s, &["completions", shell], "").await?);
    }
    let out = run(&s, &["man"], "").await?;
    assert_ok(&out);
    let page = text(&out.stdout);
    assert!(page.contains(".TH"), "{page}");
    assert!(page.contains("cert"), "{page}");
    // Neither needs a valid configuration.
    std::fs::write(&s.config, "not valid toml [")?;
    assert_ok(&run(&s, &["man"], "").await?);
    Ok(())
}

#[tokio::test]
async fn user_import_creates_accounts_in_bulk_that_can_log_in() -> Result<()> {
    let pki_dir = tempfile::tempdir()?;
    let pki = TestPki::create(pki_dir.path(), &[DOMAIN])?;
    let cert = pki_dir.path().join(format!("{DOMAIN}.pem"));
    let key = pki_dir.path().join(format!("{DOMAIN}.key"));
    let s = setup(Some((&cert, &key)))?;

    // A bad line anywhere: nothing is written, the line is named.
    let out = run(
        &s,
        &["user", "import"],
        &format!("ann@{DOMAIN} one\nbad@elsewhere.example two\n"),
    )
    .await?;
    assert_refused(&out, "line 2");
    let out = run(&s, &["user", "import"], &format!("ann@{DOMAIN}\n")).await?;
    assert_refused(&out, "line 1: expected `JID PASSWORD`");
    let out = run(&s, &["user", "list"], "").await?;
    assert_ok(&out);
    assert_eq!(text(&out.stdout), "");

    let input = format!("# accounts\nann@{DOMAIN} first pass\n\nbea@{DOMAIN} second\n");
    let out = run(&s, &["user", "import"], &input).await?;
    assert_ok(&out);
    assert_eq!(
        text(&out.stdout),
        "imported 2 accounts, 0 already existed\n"
    );
    let out = run(
        &s,
        &["user", "import"],
        &format!("bea@{DOMAIN} other\ncid@{DOMAIN} third\n"),
    )
    .await?;
    assert_ok(&out);
    assert_eq!(
        text(&out.stdout),
        "imported 1 accounts, 1 already existed\n"
    );
    let out = run(&s, &["user", "list"], "").await?;
    assert_eq!(
        text(&out.stdout),
        format!("ann@{DOMAIN}\nbea@{DOMAIN}\ncid@{DOMAIN}\n")
    );

    let Served {
        mut child,
        addr,
        drain: _drain,
        ..
    } = spawn_serve(&s.config).await?;
    // The password is the rest of the line; an existing account kept its own.
    login(&pki, addr, "ann", "first pass", "a").await?;
    login(&pki, addr, "bea", "second", "b").await?;
    assert!(login(&pki, addr, "bea", "other", "b").await.is_err());
    // The store belongs to the running server.
    let out = run(&s, &["user", "import"], &format!("dan@{DOMAIN} x\n")).await?;
    assert_refused(&out, "stop it first");
    assert_ok(&run(&s, &["stop"], "").await?);
    tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    Ok(())
}

async fn login(
    pki: &TestPki,
    addr: std::net::SocketAddr,
    user: &str,
    pw: &str,
    resource: &str,
) -> Result<Client> {
    let mut c = Client::connect(addr).await?;
    c.starttls(pki).await?;
    c.authenticate(ScramHash::Sha256, false, user, pw).await?;
    c.bind(Some(resource)).await?;
    Ok(c)
}

/// The admin socket reads one request line per connection: a connection that sends
/// nothing used to be kept for ever. Now ten that say nothing are each closed after the
/// read timeout (5 s), and `confab status` is answered while they wait.
#[tokio::test]
async fn silent_admin_connections_are_closed_and_others_are_served() -> Result<()> {
    use tokio::io::AsyncReadExt;
    let s = setup(None)?;
    let Served {
        mut child,
        drain: _drain,
        ..
    } = spawn_serve(&s.config).await?;
    let socket = s.data().join("admin.sock");
    let opened = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(tokio::net::UnixStream::connect(&socket).await?);
    }
    let status = run(&s, &["status"], "").await?;
    assert_ok(&status);
    assert!(text(&status.stdout).contains("status: running"));
    for mut c in silent {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(15), c.read_to_end(&mut got)).await??;
        assert!(got.is_empty(), "a silent connection got {got:?}");
    }
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(12),
        "silent admin connections were closed after {waited:?}"
    );
    assert_ok(&run(&s, &["stop"], "").await?);
    tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    Ok(())
}
