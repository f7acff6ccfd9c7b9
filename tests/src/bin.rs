//! Driving the real `confab` binary: start `serve` and read its ports from the log, and
//! check a command's output.

use std::path::Path;
use std::process::{Output, Stdio};

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::{confab_bin, TIMEOUT};

/// A `confab serve` child process.
pub struct Served {
    pub child: tokio::process::Child,
    /// The first STARTTLS client address it logged.
    pub addr: std::net::SocketAddr,
    /// The rest of its log, collected until it exits (so it never blocks on a full pipe).
    pub drain: tokio::task::JoinHandle<Vec<String>>,
    /// The log up to "is running".
    pub log: Vec<String>,
}

/// Runs `BIN --config CONFIG ARGS` in `cwd` (this process's own directory when `None`),
/// writes `stdin` to it, and returns its output once it exits, waiting at most `limit`.
pub async fn run_cli_with(
    bin: &Path,
    config: &Path,
    cwd: Option<&Path>,
    args: &[&str],
    stdin: &str,
    limit: std::time::Duration,
) -> Result<Output> {
    let mut command = tokio::process::Command::new(bin);
    command.arg("--config").arg(config).args(args);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let mut child = command
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    let mut input = child.stdin.take().context("no stdin pipe")?;
    input.write_all(stdin.as_bytes()).await?;
    drop(input);
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("confab {args:?} did not finish in time"))?
        .map_err(Into::into)
}

/// [`run_cli_with`] for this build's `confab`, in this process's directory, within 30 s.
pub async fn run_cli(config: &Path, args: &[&str], stdin: &str) -> Result<Output> {
    run_cli_with(
        confab_bin(),
        config,
        None,
        args,
        stdin,
        std::time::Duration::from_secs(30),
    )
    .await
}

/// Starts `confab --config CONFIG serve` and waits (bounded) until it is running: its
/// client port is logged and the admin socket is up.
pub async fn spawn_serve(config: &Path) -> Result<Served> {
    spawn_serve_bin(confab_bin(), config).await
}

/// [`spawn_serve`] with the `confab` binary at `bin`.
pub async fn spawn_serve_bin(bin: &Path, config: &Path) -> Result<Served> {
    let mut command = tokio::process::Command::new(bin);
    command.arg("--config").arg(config).arg("serve");
    spawn_serve_command(command).await
}

/// [`spawn_serve`] with a command of the caller's (say, a shell that sets a umask and
/// `exec`s `confab --config CONFIG serve`).
pub async fn spawn_serve_command(mut command: tokio::process::Command) -> Result<Served> {
    let mut child = command
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("no stderr pipe"))?;
    let mut lines = BufReader::new(stderr).lines();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut log = Vec::new();
    let mut addr = None;
    // The admin socket is ready once the "is running" line is out.
    while addr.is_none() || !log.iter().any(|l: &String| l.contains("is running")) {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .map_err(|_| anyhow!("confab did not start in time; log: {log:#?}"))??
            .ok_or_else(|| anyhow!("confab exited before listening; log: {log:#?}"))?;
        let line = strip_ansi(&line);
        log.push(line.clone());
        if line.contains("listening for clients") {
            let a = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .ok_or_else(|| anyhow!("no addr= in {line}"))?;
            addr = Some(a.parse()?);
        }
    }
    let drain = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            rest.push(strip_ansi(&l));
        }
        rest
    });
    let addr = addr.ok_or_else(|| anyhow!("no client address"))?;
    Ok(Served {
        child,
        addr,
        drain,
        log,
    })
}

/// Removes ANSI escape sequences (log colours) from a line.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts failure with a one-line reason on stderr that mentions `needle`.
pub fn assert_refused(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stdout: {} stderr: {err}",
        text(&out.stdout)
    );
    assert!(
        err.contains(needle),
        "stderr should mention {needle:?}: {err}"
    );
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one-line reason expected: {err}"
    );
}

/// Writes `config` for a `confab serve` of [`crate::DOMAIN`] on loopback port 0 (clients
/// and s2s), with its data in `data` and the domain's certificate `DOMAIN.pem`/`.key` from
/// `pki_dir`. `top` holds extra top-level keys, `tables` extra tables after the rest.
pub fn write_loopback_config(
    config: &Path,
    data: &Path,
    pki_dir: &Path,
    top: &str,
    tables: &str,
) -> Result<()> {
    write_loopback_config_for(config, data, pki_dir, crate::DOMAIN, top, "", tables)
}

/// [`write_loopback_config`] for `domain` (its certificate `domain.pem`/`.key` in
/// `pki_dir`), with `s2s` holding extra keys of the `[s2s]` table.
pub fn write_loopback_config_for(
    config: &Path,
    data: &Path,
    pki_dir: &Path,
    domain: &str,
    top: &str,
    s2s: &str,
    tables: &str,
) -> Result<()> {
    let toml = format!(
        r#"domains = ["{domain}"]
data_dir = "{data}"
log_level = "info"
{top}
[c2s]
listen = ["127.0.0.1:0"]
tls_listen = []

[s2s]
listen = ["127.0.0.1:0"]
tls_listen = []
{s2s}

[auth]
scram_iterations = 4096

[tls."{domain}"]
cert = "{cert}"
key = "{key}"
{tables}"#,
        data = data.display(),
        cert = pki_dir.join(format!("{domain}.pem")).display(),
        key = pki_dir.join(format!("{domain}.key")).display(),
    );
    std::fs::write(config, toml)?;
    Ok(())
}

/// The resident memory of a process, from `/proc/PID/status` (Linux), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    /// `VmRSS`: resident now.
    pub now: u64,
    /// `VmHWM`: the most ever resident, since the start or the last [`reset_peak_rss`].
    pub peak: u64,
}

/// Reads [`Rss`] of the process `pid`.
pub fn rss_of(pid: u32) -> Result<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))?;
        // "VmRSS:\t   12345 kB"
        let kb: u64 = line
            .trim_start_matches(':')
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kb * 1024)
    };
    Ok(Rss {
        now: field("VmRSS")?,
        peak: field("VmHWM")?,
    })
}

/// Resets the peak (`VmHWM`) of the process `pid` to what is resident now, so that a later
/// [`rss_of`] shows the peak of what happened in between.
pub fn reset_peak_rss(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
    Ok(())
}
