//! The admin socket: how the command line manages a running server.
//!
//! sled lets one process open the store, so while `confab serve` runs, `confab user add`
//! and friends talk to it over a Unix socket in the data directory (mode 0600: only the
//! server's user may connect). One request per connection, one JSON line each way.
//! When no server answers on the socket, the command line opens the store itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::accounts;
use crate::server::Server;

/// Largest request line accepted (a JID and a password fit many times over).
const MAX_REQUEST: u64 = 64 * 1024;

/// How long a connection may take to send its request line. The command line writes it
/// at once (a password is read before it connects), so a connection that says nothing for
/// this long is stuck or hostile and is closed.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the answer may take to be written to a command line that does not read it.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Admin connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    UserAdd { jid: String, password: String },
    UserPasswd { jid: String, password: String },
    UserDel { jid: String },
    UserList { domain: Option<String> },
    UserShow { jid: String },
    Backup { path: PathBuf },
    Restore { path: PathBuf },
    Sessions { domain: Option<String> },
    Kick { jid: String },
    S2s,
    Stats,
    Reload,
    Stop,
}

/// The answer: lines to print, or an error in one line.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub lines: Vec<String>,
}

impl Response {
    fn lines(lines: Vec<String>) -> Response {
        Response {
            ok: true,
            error: None,
            lines,
        }
    }
    fn error(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            lines: Vec::new(),
        }
    }
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Binds the admin socket (replacing a stale one) with mode 0600.
pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Created under a restrictive umask-independent mode right after bind; the data
    // directory itself should not be world-accessible either.
    let listener = UnixListener::bind(&path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(listener)
}

/// Serves admin requests until the task is aborted. `stop` is notified by `Stop`.
pub async fn serve(server: Arc<Server>, listener: UnixListener, stop: Arc<tokio::sync::Notify>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and similar: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!("too many admin connections at once, refusing one");
            continue;
        };
        let server = server.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(server, stream, stop).await {
                tracing::debug!(error = %e, "admin connection failed");
            }
        });
    }
}

async fn connection(
    server: Arc<Server>,
    stream: UnixStream,
    stop: Arc<tokio::sync::Notify>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no request line in time")
        })??;
    let response = match serde_json::from_str::<Request>(line.trim_end()) {
        Ok(req) => {
            let is_stop = req == Request::Stop;
            let r = handle(&server, req).await;
            if is_stop {
                stop.notify_one();
            }
            r
        }
        Err(e) => Response::error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    tokio::time::timeout(WRITE_TIMEOUT, async {
        write.write_all(&out).await?;
        write.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "answer not read in time"))?
}

fn ago(t: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    human_duration(secs)
}

fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

/// One session as `confab sessions` shows it: JID, address, TLS, connected for.
fn session_line(s: &crate::router::SessionHandle) -> String {
    format!(
        "{}  {}  {}  {}",
        s.full_jid(),
        s.info.peer.ip(),
        s.info.tls.as_deref().unwrap_or("plaintext"),
        ago(s.info.since)
    )
}

/// What `confab user show` prints from the store (sessions are added by the caller):
/// the prepared bare JID and the lines `account:`, `roster items:`, `offline messages:`.
pub async fn account_summary(
    storage: &dyn confab_storage::Storage,
    domains: &[String],
    jid: &str,
) -> Result<(String, Vec<String>), accounts::AccountError> {
    let bare = accounts::account_jid(jid, domains)?.bare();
    if storage.account(&bare).await?.is_none() {
        return Err(accounts::AccountError::NotFound(bare));
    }
    let (_, roster) = storage.roster(&bare).await?;
    let offline = storage.offline_count(&bare).await?;
    let lines = vec![
        format!("account: {bare}"),
        format!("roster items: {}", roster.len()),
        format!("offline messages: {offline}"),
    ];
    Ok((bare, lines))
}

pub async fn handle(server: &Arc<Server>, req: Request) -> Response {
    let domains = &server.config().domains;
    let iterations = server.config().auth.scram_iterations;
    let storage = server.storage.as_ref();
    match req {
        Request::Status => {
            let fed = server.federation.get();
            Response::lines(vec![
                "status: running".to_string(),
                format!("version: {}", env!("CARGO_PKG_VERSION")),
                format!(
                    "uptime: {}",
                    human_duration(server.started.elapsed().as_secs())
                ),
                format!("domains: {}", domains.join(", ")),
                format!("sessions: {}", server.router.session_count()),
                format!(
                    "s2s links: {} outgoing, {} incoming",
                    fed.map(|f| f.links().len()).unwrap_or(0),
                    fed.map(|f| f.incoming_links().len()).unwrap_or(0)
                ),
            ])
        }
        Request::UserAdd { jid, password } => {
            match accounts::add_user(storage, domains, &jid, &password, iterations).await {
                Ok(bare) => Response::lines(vec![format!("created {bare}")]),
                Err(e) => Response::error(e),
            }
        }
        Request::UserPasswd { jid, password } => {
            match accounts::set_password(storage, domains, &jid, &password, iterations).await {
                Ok(bare) => Response::lines(vec![format!("changed the password of {bare}")]),
                Err(e) => Response::error(e),
            }
        }
        Request::UserDel { jid } => match accounts::delete_user(storage, domains, &jid).await {
            Ok(bare) => {
                // Its sessions end with the account.
                for s in server.router.resources(&bare) {
                    s.handle.kill(
                        confab_protocol::StreamError::new(
                            confab_protocol::StreamErrorCondition::NotAuthorized,
                        )
                        .with_text("the account was deleted"),
                    );
                }
                Response::lines(vec![format!("deleted {bare}")])
            }
            Err(e) => Response::error(e),
        },
        Request::UserList { domain } => match storage.list_accounts(domain.as_deref()).await {
            Ok(list) => Response::lines(list),
            Err(e) => Response::error(e),
        },
        Request::UserShow { jid } => match account_summary(storage, domains, &jid).await {
            Ok((bare, mut lines)) => {
                let mut sessions: Vec<_> = server
                    .router
                    .resources(&bare)
                    .into_iter()
                    .map(|r| r.handle)
                    .collect();
                sessions.sort_by_key(|s| s.full_jid());
                lines.push(format!("sessions: {}", sessions.len()));
                lines.extend(sessions.iter().map(|s| format!("  {}", session_line(s))));
                Response::lines(lines)
            }
            Err(e) => Response::error(e),
        },
        Request::Sessions { domain } => {
            let mut sessions = server.router.all_sessions();
            sessions.retain(|s| {
                domain
                    .as_deref()
                    .is_none_or(|d| s.bare.rsplit('@').next() == Some(d))
            });
            sessions.sort_by_key(|s| s.full_jid());
            Response::lines(sessions.iter().map(session_line).collect())
        }
        Request::Kick { jid } => {
            let Ok(addr) = crate::jid::Addr::parse(&jid) else {
                return Response::error(format!("{jid:?} is not a valid JID"));
            };
            let mut kicked = Vec::new();
            for r in server.router.resources(&addr.bare()) {
                if addr
                    .resource
                    .as_deref()
                    .is_none_or(|res| res == r.handle.resource)
                {
                    r.handle.kill(
                        confab_protocol::StreamError::new(
                            confab_protocol::StreamErrorCondition::PolicyViolation,
                        )
                        .with_text("disconnected by the administrator"),
                    );
                    kicked.push(format!("kicked {}", r.handle.full_jid()));
                }
            }
            if kicked.is_empty() {
                Response::error(format!("no session of {addr}"))
            } else {
                Response::lines(kicked)
            }
        }
        Request::S2s => {
            let Some(fed) = server.federation.get() else {
                return Response::lines(vec!["federation is disabled".into()]);
            };
            let mut lines = Vec::new();
            for l in fed.links().into_iter().chain(fed.incoming_links()) {
                let method = match l.method {
                    Some(confab_federation::AuthMethod::External) => "certificate",
                    Some(confab_federation::AuthMethod::Dialback) => "dialback",
                    Some(confab_federation::AuthMethod::None) => "none",
                    None => "connecting",
                };
                let dir = if l.outgoing { "out" } else { "in" };
                lines.push(format!("{dir}  {}  {method}  {}", l.remote, ago(l.since)));
            }
            Response::lines(lines)
        }
        Request::Stats => Response::lines(crate::ops::stats_lines(&crate::ops::snapshot(server))),
        // Absolute paths, read and written by the server's user.
        Request::Backup { path } => match crate::backup::admin_backup(server, &path).await {
            Ok(line) => Response::lines(vec![line]),
            Err(e) => Response::error(e),
        },
        Request::Restore { path } => match crate::backup::admin_restore(server, &path).await {
            Ok(line) => Response::lines(vec![line]),
            Err(e) => Response::error(e),
        },
        Request::Reload => match server.reload_from_file() {
            Ok(notes) => Response::lines(notes),
            Err(e) => Response::error(e),
        },
        Request::Stop => Response::lines(vec!["stopping".into()]),
    }
}

/// The command line's side: sends one request to a running server. `Ok(None)` when no
/// server is listening (the caller then opens the store itself).
pub async fn request(data_dir: &Path, req: &Request) -> anyhow::Result<Option<Response>> {
    let path = socket_path(data_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            anyhow::bail!(
                "permission denied on {}: run this as the user the server runs as",
                path.display()
            )
        }
        Err(e) => anyhow::bail!("cannot reach the server at {}: {e}", path.display()),
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.shutdown().await?;
    let mut answer = String::new();
    BufReader::new(read).read_line(&mut answer).await?;
    Ok(Some(serde_json::from_str(answer.trim_end())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_object() {
        let r = Request::UserAdd {
            jid: "a@b".into(),
            password: "p".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"user_add","jid":"a@b","password":"p"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"rm -rf"}"#).is_err());
        let show = Request::UserShow { jid: "a@b".into() };
        assert_eq!(
            serde_json::to_string(&show).unwrap(),
            r#"{"cmd":"user_show","jid":"a@b"}"#
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(65), "1m 5s");
        assert_eq!(human_duration(3700), "1h 1m");
        assert_eq!(human_duration(90000), "1d 1h 0m");
    }
}
