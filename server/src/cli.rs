//! The command line (clap derive): `serve`, account management, checks, certificates,
//! and the commands that talk to a running server over the admin socket.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use confab_storage::{SledStorage, Storage};

use crate::admin::Request;
use crate::certs::{Finding, Level};
use crate::config::Config;
use crate::server::RunningServer;

#[derive(Parser, Debug)]
#[command(name = "confab", version, about = "A federated XMPP server")]
pub struct Cli {
    /// Configuration file (TOML). Without it, confab serves `localhost` with data in ./data.
    #[arg(long, short, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve,
    /// Manage accounts (through the running server; when it is stopped, in the store directly).
    #[command(subcommand)]
    User(UserCommand),
    /// Check the configuration, certificates, DNS records and links to other servers; each
    /// finding is one line (`ok:`, `warning:` or `problem:`), and the exit status is
    /// non-zero when there is a problem. Without a subcommand: the configuration and the
    /// certificates.
    Check {
        #[command(subcommand)]
        what: Option<CheckCommand>,
    },
    /// Install or create the certificate a domain is served with (in DATA_DIR/certs).
    #[command(subcommand)]
    Cert(CertCommand),
    /// Back up the whole store (accounts, rosters, offline messages, vCards, private data)
    /// into FILE, while the server runs or not; see docs/admin.md for the format.
    Backup { file: PathBuf },
    /// Restore a backup made by `confab backup` into an empty store (a new data directory),
    /// while the server runs or not; a damaged file or a store with data is refused.
    Restore { file: PathBuf },
    /// Whether the server runs: version, uptime, domains, sessions, links.
    Status,
    /// The connected sessions (JID, address, TLS, since), optionally of one domain.
    Sessions { domain: Option<String> },
    /// Disconnect a session (full JID) or all sessions of an account (bare JID).
    Kick { jid: String },
    /// Server-to-server links (direction, remote domain, authentication, since).
    S2s,
    /// Counters of the running server: sessions, links, stanzas, failed logins, offline
    /// messages stored, memory and store size.
    Stats,
    /// Apply the configuration file and certificates again without dropping anyone
    /// (as SIGHUP does); a bad configuration is refused and the old one keeps running.
    Reload,
    /// Stop the running server (as SIGTERM does).
    Stop,
    /// Print a shell completion script (e.g. `confab completions bash > /etc/bash_completion.d/confab`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) of confab; with --dir, write one page per command there.
    Man {
        /// Write confab.1, confab-user.1, ... into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Create a self-signed certificate for a served domain (DATA_DIR/certs/DOMAIN.crt
    /// and .key, key mode 0600).
    Generate {
        domain: String,
        /// Replace an existing certificate and key.
        #[arg(long)]
        force: bool,
    },
    /// Install fullchain.pem and privkey.pem from a certbot `live/DOMAIN/` directory as
    /// DATA_DIR/certs/DOMAIN.crt and .key, after checking they match and are valid for
    /// DOMAIN. Works as a deploy hook: certbot --deploy-hook 'confab cert import $RENEWED_LINEAGE'.
    Import {
        /// The directory holding fullchain.pem and privkey.pem.
        path: PathBuf,
        /// The domain (default: the directory's name).
        #[arg(long)]
        domain: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CheckCommand {
    /// The configuration file, and whether each domain's certificate and key load.
    Config,
    /// Each domain's certificate: loads, valid for the domain, expiry, issuer.
    Certs { domain: Option<String> },
    /// The SRV and address records of a domain (default: every served domain).
    Dns { domain: Option<String> },
    /// Whether a link to a remote domain can be established, step by step.
    Connectivity {
        /// The remote domain; without it, whether our own ports answer.
        remote: Option<String>,
        /// Our domain to connect as (default: the first served domain).
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create an account; the password is read from a prompt on a terminal, else from stdin.
    Add { jid: String },
    /// Change an account's password (prompt or stdin, as for `add`).
    Passwd { jid: String },
    /// Delete an account with its roster, offline messages and stored data.
    Del { jid: String },
    /// List accounts, optionally of one domain.
    List { domain: Option<String> },
    /// Show an account: roster size, offline messages waiting, sessions.
    Show { jid: String },
    /// Create many accounts from stdin, one `JID PASSWORD` per line (a migration, a test
    /// population). Works on the store, so the server must be stopped. Existing accounts
    /// are left as they are and counted.
    Import,
}

pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::default()),
    }
}

/// Every file and directory this process creates from now on is private to its user (mode 0600 for
/// files, 0700 for directories), whatever the umask it was started with: the quickstart starts the
/// server from a shell, whose umask is usually 022, and sled creates its files (the log with the
/// password keys, vCards, private XML) with mode 0666 less the umask. Files meant for others (the
/// manual pages) are written before this, by commands that need no configuration.
#[cfg(unix)]
fn private_umask() {
    // SAFETY: umask(2) only replaces the process's file mode creation mask; it has no failure mode
    // and touches no memory.
    unsafe {
        libc::umask(0o077);
    }
}

#[cfg(not(unix))]
fn private_umask() {}

/// Creates the data directory (mode 0700 on Unix, whatever the umask), and tightens an existing one
/// that other users can read to 0700, with a warning (one that cannot be changed, such as another
/// user's, is only warned about).
fn private_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)
            .with_context(|| format!("cannot read the data directory {}", dir.display()))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
                Ok(()) => tracing::warn!(
                    path = %dir.display(),
                    "the data directory was mode {mode:04o}, open to other users: changed to 0700"
                ),
                Err(e) => tracing::warn!(
                    path = %dir.display(),
                    error = %e,
                    "the data directory is mode {mode:04o}, open to other users, and cannot be changed to 0700"
                ),
            }
        }
    }
    Ok(())
}

fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    private_data_dir(&config.data_dir)?;
    let dir = config.store_dir();
    let store = SledStorage::open(&dir).with_context(|| {
        format!(
            "cannot open the store in {} (is the server running? stop it first)",
            dir.display()
        )
    })?;
    Ok(Arc::new(store))
}

/// Reads a password: from a prompt on a terminal (asked twice), else one line of stdin.
fn read_password() -> anyhow::Result<String> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Repeat password: ")?;
        if first != again {
            bail!("the passwords do not match");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    if password.is_empty() {
        bail!("the password must not be empty");
    }
    Ok(password)
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // These need no configuration: they describe the command line itself.
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "confab",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Command::Man { dir } => return man(dir.as_deref()),
        _ => {}
    }
    private_umask();
    let config = load_config(cli.config.as_ref())?;
    match cli.command {
        Command::Serve => serve(config, cli.config.clone()).await,
        Command::Reload => live(config, Request::Reload).await,
        Command::User(cmd) => user(config, cmd).await,
        Command::Backup { file } => backup_or_restore(config, file, false).await,
        Command::Restore { file } => backup_or_restore(config, file, true).await,
        Command::Check { what } => check(config, what).await,
        Command::Cert(cmd) => cert(config, cmd).await,
        Command::Status => live(config, Request::Status).await,
        Command::Sessions { domain } => live(config, Request::Sessions { domain }).await,
        Command::Kick { jid } => live(config, Request::Kick { jid }).await,
        Command::S2s => live(config, Request::S2s).await,
        Command::Stats => live(config, Request::Stats).await,
        Command::Stop => live(config, Request::Stop).await,
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
    }
}

fn man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), dir)
                .with_context(|| format!("cannot write the pages into {}", dir.display()))?;
            println!("wrote the manual pages into {}", dir.display());
        }
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?,
    }
    Ok(())
}

async fn cert(config: Config, cmd: CertCommand) -> anyhow::Result<()> {
    let lines = match cmd {
        CertCommand::Generate { domain, force } => crate::certs::generate(&config, &domain, force)?,
        CertCommand::Import { path, domain } => {
            crate::certs::import(&config, &path, domain.as_deref())?
        }
    };
    for line in lines {
        println!("{line}");
    }
    // A running server picks the new files up at once (as `confab reload`), so this
    // works as a certbot deploy hook on its own.
    if !via_server(&config, &Request::Reload).await? {
        println!("the server uses it when it starts");
    }
    Ok(())
}

/// `check config`: the file is valid (loading it checked every key) and each domain's
/// certificate loads. Unlike starting the server, this generates nothing.
fn check_config(config: &Config) -> Vec<Finding> {
    let mut f = vec![Finding::ok(format!(
        "configuration is valid; domains: {}",
        config.domains.join(", ")
    ))];
    f.extend(config.derived.iter().map(|d| Finding::ok(d.clone())));
    let mut problems = Vec::new();
    for domain in &config.domains {
        let loc = crate::certs::location(config, domain);
        if !loc.configured && !loc.cert.exists() && !loc.key.exists() {
            continue; // generated on first start
        }
        if let Err(e) = crate::certs::inspect(&loc.cert, &loc.key) {
            problems.push(Finding::problem(format!("{domain}: {e}")));
        }
    }
    if problems.is_empty() {
        f.push(Finding::ok("certificates and keys load for every domain"));
    }
    f.extend(problems);
    f
}

async fn check(config: Config, what: Option<CheckCommand>) -> anyhow::Result<()> {
    use confab_federation::check::{check_connectivity, check_dns};
    let findings: Vec<Finding> = match what {
        None => {
            // The certificate section says more than `check config`'s loading line.
            let mut f = check_config(&config);
            f.truncate(1 + config.derived.len());
            f.extend(crate::certs::check(&config, None)?);
            f
        }
        Some(CheckCommand::Config) => check_config(&config),
        Some(CheckCommand::Certs { domain }) => crate::certs::check(&config, domain.as_deref())?,
        Some(CheckCommand::Dns { domain }) => {
            let fed = config.federation()?;
            let resolver = if fed.nameservers.is_empty() {
                confab_federation::dns::Resolver::system()?
            } else {
                confab_federation::dns::Resolver::with_nameservers(&fed.nameservers)?
            };
            let domains = domain
                .map(|d| vec![d])
                .unwrap_or_else(|| config.domains.clone());
            let mut all = Vec::new();
            for d in domains {
                all.extend(check_dns(&resolver, &d).await);
            }
            all
        }
        Some(CheckCommand::Connectivity { remote: None, .. }) => {
            crate::selfcheck::check_own_ports(&config).await
        }
        Some(CheckCommand::Connectivity {
            remote: Some(remote),
            from,
        }) => {
            let local = from
                .or_else(|| config.domains.first().cloned())
                .unwrap_or_default();
            if !config.is_local_domain(&local) {
                bail!("{local} is not a domain this server serves");
            }
            let certs = Arc::new(crate::tls::CertStore::load(&config)?);
            let host = Arc::new(CheckHost {
                domains: config.domains.clone(),
                certs: certs.clone(),
            });
            let service = confab_federation::FederationService::new(
                config.federation()?,
                host,
                certs.resolver(),
            )?;
            check_connectivity(&service, &local, &remote).await
        }
    };
    let problems = findings
        .iter()
        .filter(|f| f.level == Level::Problem)
        .count();
    for f in &findings {
        println!("{f}");
    }
    if problems > 0 {
        bail!("{problems} problem(s) found");
    }
    Ok(())
}

/// What `check connectivity` lends federation: our domains and certificates; it
/// carries no stanzas.
struct CheckHost {
    domains: Vec<String>,
    certs: Arc<crate::tls::CertStore>,
}

#[async_trait::async_trait]
impl confab_federation::Host for CheckHost {
    fn is_local_domain(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| d == domain)
    }
    fn default_domain(&self) -> Option<String> {
        self.domains.first().cloned()
    }
    fn certificate(&self, domain: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.certs.get(domain).map(|c| c.key.clone())
    }
    async fn deliver(&self, _stanza: confab_protocol::Element) {}
    async fn bounce(
        &self,
        _stanza: confab_protocol::Element,
        _error: confab_federation::FederationError,
    ) {
    }
}

/// Sends `req` to a running server; `Ok(false)` when none is running.
async fn via_server(config: &Config, req: &Request) -> anyhow::Result<bool> {
    match crate::admin::request(&config.data_dir, req).await? {
        None => Ok(false),
        Some(resp) if resp.ok => {
            for line in resp.lines {
                println!("{line}");
            }
            Ok(true)
        }
        Some(resp) => bail!(resp.error.unwrap_or_else(|| "the server refused".into())),
    }
}

async fn user(config: Config, cmd: UserCommand) -> anyhow::Result<()> {
    let domains = config.domains.clone();
    let iterations = config.auth.scram_iterations;
    match cmd {
        UserCommand::Add { jid } => {
            crate::accounts::account_jid(&jid, &domains)?;
            let password = read_password()?;
            let req = Request::UserAdd {
                jid: jid.clone(),
                password: password.clone(),
            };
            if via_server(&config, &req).await? {
                return Ok(());
            }
            let store = open_store(&config)?;
            let bare =
                crate::accounts::add_user(store.as_ref(), &domains, &jid, &password, iterations)
                    .await?;
            println!("created {bare}");
        }
        UserCommand::Passwd { jid } => {
            crate::accounts::account_jid(&jid, &domains)?;
            let password = read_password()?;
            let req = Request::UserPasswd {
                jid: jid.clone(),
                password: password.clone(),
            };
            if via_server(&config, &req).await? {
                return Ok(());
            }
            let store = open_store(&config)?;
            let bare = crate::accounts::set_password(
                store.as_ref(),
                &domains,
                &jid,
                &password,
                iterations,
            )
            .await?;
            println!("changed the password of {bare}");
        }
        UserCommand::Del { jid } => {
            if via_server(&config, &Request::UserDel { jid: jid.clone() }).await? {
                return Ok(());
            }
            let store = open_store(&config)?;
            let bare = crate::accounts::delete_user(store.as_ref(), &domains, &jid).await?;
            println!("deleted {bare}");
        }
        UserCommand::List { domain } => {
            let req = Request::UserList {
                domain: domain.clone(),
            };
            if via_server(&config, &req).await? {
                return Ok(());
            }
            let store = open_store(&config)?;
            for jid in store.list_accounts(domain.as_deref()).await? {
                println!("{jid}");
            }
        }
        UserCommand::Show { jid } => {
            crate::accounts::account_jid(&jid, &domains)?;
            if via_server(&config, &Request::UserShow { jid: jid.clone() }).await? {
                return Ok(());
            }
            let store = open_store(&config)?;
            let (_, lines) = crate::admin::account_summary(store.as_ref(), &domains, &jid).await?;
            for line in lines {
                println!("{line}");
            }
            println!("sessions: 0 (the server is not running)");
        }
        UserCommand::Import => {
            let store = open_store(&config)?;
            let mut lines = Vec::new();
            for (n, line) in std::io::stdin().lock().lines().enumerate() {
                let line = line?;
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((jid, password)) = line.split_once(char::is_whitespace) else {
                    bail!("line {}: expected `JID PASSWORD`", n + 1);
                };
                lines.push((n + 1, jid.to_string(), password.trim().to_string()));
            }
            let report = crate::accounts::import(store, &domains, lines, iterations).await?;
            println!(
                "imported {} accounts, {} already existed",
                report.created, report.existed
            );
        }
    }
    Ok(())
}

/// `backup FILE` and `restore FILE`: done by the running server (as its user, so FILE is
/// made absolute first), else on the store directly.
async fn backup_or_restore(config: Config, file: PathBuf, restore: bool) -> anyhow::Result<()> {
    let path = std::path::absolute(&file)
        .with_context(|| format!("cannot resolve the path {}", file.display()))?;
    let req = if restore {
        Request::Restore { path: path.clone() }
    } else {
        Request::Backup { path: path.clone() }
    };
    if via_server(&config, &req).await? {
        return Ok(());
    }
    let store = open_store(&config)?;
    let line = if restore {
        crate::backup::restore_line(crate::backup::restore(store.as_ref(), &path).await?, &path)
    } else {
        crate::backup::backup_line(crate::backup::backup(store.clone(), &path).await?, &path)
    };
    store.flush().await?;
    println!("{line}");
    Ok(())
}

/// Commands that only make sense with a running server.
async fn live(config: Config, req: Request) -> anyhow::Result<()> {
    if via_server(&config, &req).await? {
        return Ok(());
    }
    bail!(
        "the server is not running (nothing answers on {})",
        crate::admin::socket_path(&config.data_dir).display()
    )
}

/// Applies a new log level after a reload; set by the binary, which owns the logger.
static LOG_RELOADER: std::sync::OnceLock<LogReloader> = std::sync::OnceLock::new();

/// Sets the log filter to a new level.
pub type LogReloader = Box<dyn Fn(&str) + Send + Sync>;

/// Lets `serve` change the log level when the configuration is reloaded.
pub fn set_log_reloader(f: LogReloader) {
    let _ = LOG_RELOADER.set(f);
}

async fn serve(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    // Creates the data directory, private (see `private_data_dir`).
    let store = open_store(&config)?;
    let running = RunningServer::start(config.clone(), store).await?;
    if let Some(p) = path {
        let _ = running.server.config_path.set(p);
    }
    let _ = running.server.on_reload.set(Box::new(|c: &Config| {
        if let Some(f) = LOG_RELOADER.get() {
            f(&c.log_level);
        }
    }));
    let admin = crate::admin::bind(&config.data_dir).with_context(|| {
        format!(
            "cannot create the admin socket {}",
            crate::admin::socket_path(&config.data_dir).display()
        )
    })?;
    let stop = Arc::new(tokio::sync::Notify::new());
    let admin_task = tokio::spawn(crate::admin::serve(
        running.server.clone(),
        admin,
        stop.clone(),
    ));
    tracing::info!(domains = ?config.domains, "confab {} is running", env!("CARGO_PKG_VERSION"));
    // systemd (Type=notify): listeners and the admin socket are up.
    crate::ops::sd_notify(&format!(
        "READY=1\nSTATUS=serving {}\nMAINPID={}",
        config.domains.join(", "),
        std::process::id()
    ));
    let watchdog = crate::ops::watchdog_interval().map(|i| tokio::spawn(crate::ops::watchdog(i)));
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        #[cfg(unix)]
        let reload = hup.recv();
        #[cfg(not(unix))]
        let reload = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = wait_for_stop() => break,
            _ = stop.notified() => break,
            _ = reload => {
                // SIGHUP: the same as `confab reload`.
                match running.server.reload_from_file() {
                    Ok(notes) => {
                        for n in notes {
                            tracing::info!("{n}");
                        }
                    }
                    Err(e) => tracing::error!("{e}"),
                }
            }
        }
    }
    crate::ops::sd_notify("STOPPING=1");
    if let Some(w) = watchdog {
        w.abort();
    }
    admin_task.abort();
    let _ = std::fs::remove_file(crate::admin::socket_path(&config.data_dir));
    tracing::info!("shutting down");
    // A failed final flush is an exit with failure, so that a supervisor (systemd's
    // Restart=on-failure, a script checking `$?`) sees that data may be lost.
    running.close().await.map_err(|e| {
        tracing::error!(error = %e, "flushing storage at shutdown failed");
        anyhow::anyhow!(
            "flushing the store at shutdown failed ({e}): writes made since the last successful flush may be lost"
        )
    })
}

async fn wait_for_stop() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
