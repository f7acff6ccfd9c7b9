//! Account management shared by the command line and the tests: SCRAM keys are derived
//! once here, so a login never runs PBKDF2 (only the stored keys are kept, never the
//! password).

use confab_protocol::sasl::{ScramHash, ScramKeys};
use confab_storage::{Storage, StorageError, StoredCredential};

use crate::jid::{prepare_account, Addr};

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0}")]
    BadJid(String),
    #[error("{0} is not a domain this server serves")]
    UnknownDomain(String),
    #[error("the password must not be empty")]
    EmptyPassword,
    #[error("the password cannot be used: {0}")]
    BadPassword(String),
    #[error("account {0} already exists")]
    Exists(String),
    #[error("no account {0}")]
    NotFound(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

/// Derives stored keys for every SCRAM hash we offer.
pub fn derive_credentials(
    password: &str,
    iterations: u32,
) -> Result<Vec<StoredCredential>, AccountError> {
    if password.is_empty() {
        return Err(AccountError::EmptyPassword);
    }
    ScramHash::ALL
        .iter()
        .map(|h| {
            let keys = ScramKeys::generate(*h, password, iterations)
                .map_err(|e| AccountError::BadPassword(e.to_string()))?;
            Ok(to_stored(&keys))
        })
        .collect()
}

pub fn to_stored(k: &ScramKeys) -> StoredCredential {
    StoredCredential {
        hash: k.hash.name().to_string(),
        salt: k.salt.clone(),
        iterations: k.iterations,
        stored_key: k.stored_key.clone(),
        server_key: k.server_key.clone(),
    }
}

/// The stored keys for one hash, if the account has them.
pub fn keys_for(creds: &[StoredCredential], hash: ScramHash) -> Option<ScramKeys> {
    creds
        .iter()
        .find(|c| c.hash == hash.name())
        .map(|c| ScramKeys {
            hash,
            salt: c.salt.clone(),
            iterations: c.iterations,
            stored_key: c.stored_key.clone(),
            server_key: c.server_key.clone(),
        })
}

/// Parses `user@domain` and checks the domain is served.
pub fn account_jid(jid: &str, domains: &[String]) -> Result<Addr, AccountError> {
    let a = prepare_account(jid).map_err(|e| AccountError::BadJid(e.to_string()))?;
    if !domains.iter().any(|d| d == &a.domain) {
        return Err(AccountError::UnknownDomain(a.domain));
    }
    Ok(a)
}

pub async fn add_user(
    storage: &dyn Storage,
    domains: &[String],
    jid: &str,
    password: &str,
    iterations: u32,
) -> Result<String, AccountError> {
    let a = account_jid(jid, domains)?;
    let creds = derive_credentials(password, iterations)?;
    let bare = a.bare();
    match storage.create_account(&bare, creds).await {
        Ok(()) => Ok(bare),
        Err(StorageError::AccountExists) => Err(AccountError::Exists(bare)),
        Err(e) => Err(e.into()),
    }
}

pub async fn set_password(
    storage: &dyn Storage,
    domains: &[String],
    jid: &str,
    password: &str,
    iterations: u32,
) -> Result<String, AccountError> {
    let a = account_jid(jid, domains)?;
    let creds = derive_credentials(password, iterations)?;
    let bare = a.bare();
    match storage.set_credentials(&bare, creds).await {
        Ok(()) => Ok(bare),
        Err(StorageError::NoSuchAccount) => Err(AccountError::NotFound(bare)),
        Err(e) => Err(e.into()),
    }
}

pub async fn delete_user(
    storage: &dyn Storage,
    domains: &[String],
    jid: &str,
) -> Result<String, AccountError> {
    let a = account_jid(jid, domains)?;
    let bare = a.bare();
    match storage.delete_account(&bare).await {
        Ok(()) => Ok(bare),
        Err(StorageError::NoSuchAccount) => Err(AccountError::NotFound(bare)),
        Err(e) => Err(e.into()),
    }
}

/// What `import` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub created: usize,
    pub existed: usize,
}

/// Creates many accounts: `(line number, JID, password)`. Every line is checked before
/// anything is written. Key derivation (the slow part) runs on every core, and account
/// writes run concurrently so that they share flushes.
pub async fn import(
    storage: std::sync::Arc<dyn Storage>,
    domains: &[String],
    lines: Vec<(usize, String, String)>,
    iterations: u32,
) -> Result<ImportReport, ImportError> {
    let mut accounts = Vec::with_capacity(lines.len());
    for (line, jid, password) in lines {
        let a = account_jid(&jid, domains).map_err(|e| ImportError::Line(line, e))?;
        if password.is_empty() {
            return Err(ImportError::Line(line, AccountError::EmptyPassword));
        }
        accounts.push((a.bare(), password));
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = accounts.len().div_ceil(threads).max(1);
    let mut derivations = Vec::new();
    for part in accounts.chunks(chunk) {
        let part = part.to_vec();
        derivations.push(tokio::task::spawn_blocking(move || {
            part.into_iter()
                .map(|(bare, password)| Ok((bare, derive_credentials(&password, iterations)?)))
                .collect::<Result<Vec<_>, AccountError>>()
        }));
    }
    let mut report = ImportReport::default();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut writes = tokio::task::JoinSet::new();
    for d in derivations {
        let derived = d.await.map_err(|e| ImportError::Task(e.to_string()))??;
        for (bare, creds) in derived {
            let (storage, gate) = (storage.clone(), gate.clone());
            writes.spawn(async move {
                let _permit = gate.acquire_owned().await;
                storage.create_account(&bare, creds).await
            });
        }
    }
    while let Some(r) = writes.join_next().await {
        match r.map_err(|e| ImportError::Task(e.to_string()))? {
            Ok(()) => report.created += 1,
            Err(StorageError::AccountExists) => report.existed += 1,
            Err(e) => return Err(ImportError::Account(e.into())),
        }
    }
    Ok(report)
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("line {0}: {1}")]
    Line(usize, AccountError),
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error("import task failed: {0}")]
    Task(String),
}
