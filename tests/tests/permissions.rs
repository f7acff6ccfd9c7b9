//! The data directory and everything the server writes in it are private to the server's
//! user (directories 0700, files 0600) whatever the umask it is started with: the real
//! binary, started by a shell with the usual umask 022 as in the quickstart.

#![cfg(unix)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use anyhow::{anyhow, Context, Result};
use confab_tests::bin::*;
use confab_tests::*;
use tokio::io::AsyncWriteExt;

/// `confab ARGS` through `sh`, with umask 022.
fn umask_022(args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg("umask 022 && exec \"$@\"")
        .arg("sh")
        .arg(confab_bin())
        .args(args);
    c
}

async fn cli_umask_022(config: &Path, args: &[&str], stdin: &str) -> Result<Output> {
    let config = config.to_str().context("config path")?;
    let mut all = vec!["--config", config];
    all.extend_from_slice(args);
    let mut child = umask_022(&all)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut input = child.stdin.take().context("no stdin pipe")?;
    input.write_all(stdin.as_bytes()).await?;
    drop(input);
    let out = tokio::time::timeout(TIMEOUT * 3, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("confab {args:?} did not finish in time"))??;
    anyhow::ensure!(
        out.status.success(),
        "confab {args:?} failed: {}",
        text(&out.stderr)
    );
    Ok(out)
}

/// A configuration without a `[tls]` entry, so that the server generates its certificate
/// into the data directory as in the quickstart.
fn write_config(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let data = dir.join("data");
    let config = dir.join("confab.toml");
    std::fs::write(
        &config,
        format!(
            r#"domains = ["{DOMAIN}"]
data_dir = "{data}"
log_level = "info"

[c2s]
listen = ["127.0.0.1:0"]
tls_listen = []

[s2s]
listen = ["127.0.0.1:0"]
tls_listen = []

[auth]
scram_iterations = 4096
"#,
            data = data.display()
        ),
    )?;
    Ok((config, data))
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(p)
        .with_context(|| format!("{}", p.display()))?
        .permissions()
        .mode()
        & 0o777)
}

/// Every entry under `dir` (itself included) whose mode is not 0700 for a directory or
/// 0600 for anything else, with its mode; and how many entries were looked at.
fn loose_entries(dir: &Path) -> Result<(Vec<String>, usize)> {
    let mut loose = Vec::new();
    let mut seen = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        seen += 1;
        anyhow::ensure!(seen < 10_000, "too many entries under {}", dir.display());
        let meta = std::fs::symlink_metadata(&p)?;
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        let m = meta.permissions().mode() & 0o777;
        if m != want {
            loose.push(format!("{} {m:04o}", p.display()));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)? {
                todo.push(e?.path());
            }
        }
    }
    Ok((loose, seen))
}

/// SIGTERM, and the exit status.
async fn stop(served: &mut Served) -> Result<std::process::ExitStatus> {
    let pid = served.child.id().context("already exited")?.to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill -TERM failed");
    tokio::time::timeout(TIMEOUT * 2, served.child.wait())
        .await
        .map_err(|_| anyhow!("the server did not stop on SIGTERM"))?
        .map_err(Into::into)
}

#[tokio::test]
async fn the_data_dir_and_its_files_are_private_under_umask_022() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (config, data) = write_config(dir.path())?;
    let config_arg = config.to_str().context("config path")?;

    // The quickstart: create an account, the server stopped (the CLI creates the store)...
    cli_umask_022(
        &config,
        &["user", "add", &format!("alice@{DOMAIN}")],
        "secret\n",
    )
    .await?;
    assert_eq!(mode(&data)?, 0o700, "data dir");
    assert_eq!(mode(&data.join("store"))?, 0o700, "store dir");
    let (loose, seen) = loose_entries(&data)?;
    assert!(loose.is_empty(), "after user add: {loose:#?}");
    assert!(seen >= 4, "the store should have files: {seen} entries");

    // ...then start the server: it generates its certificate, the dialback secret and the
    // admin socket, and sled writes a new snapshot.
    let mut served = spawn_serve_command(umask_022(&["--config", config_arg, "serve"])).await?;
    let (loose, seen) = loose_entries(&data)?;
    assert!(loose.is_empty(), "while serving: {loose:#?}");
    assert!(
        data.join("admin.sock").exists() && data.join("certs").exists(),
        "{seen} entries, no admin socket or certificate"
    );
    let status = stop(&mut served).await?;
    assert!(status.success(), "exit status {status}");
    let (loose, _) = loose_entries(&data)?;
    assert!(loose.is_empty(), "after the server stopped: {loose:#?}");
    Ok(())
}

#[tokio::test]
async fn an_existing_data_dir_open_to_others_is_made_private() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (config, data) = write_config(dir.path())?;
    let store = data.join("store");
    std::fs::create_dir_all(&store)?;
    for d in [&data, &store] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let out = cli_umask_022(
        &config,
        &["user", "add", &format!("bob@{DOMAIN}")],
        "secret\n",
    )
    .await?;
    let err = text(&out.stderr);
    assert_eq!(mode(&data)?, 0o700, "data dir; stderr: {err}");
    assert_eq!(mode(&store)?, 0o700, "store dir; stderr: {err}");
    assert!(
        err.contains("data directory was mode 0755") && err.contains("changed to 0700"),
        "a warning about the data directory: {err}"
    );
    assert!(
        err.contains("store directory was mode 0755"),
        "a warning about the store directory: {err}"
    );
    Ok(())
}
