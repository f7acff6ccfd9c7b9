//! Certificates from the administrator's side: `confab check certs`, `confab cert
//! generate` and `confab cert import`.
//!
//! Name checks are RFC 6125 DNS-ID matching by rustls-webpki
//! (`EndEntityCert::verify_is_valid_for_subject_name`), never a search in the subject.
//! Dates, issuer and subject are read with x509-parser. Nothing here talks to a server:
//! the command line asks a running one to reload after installing a certificate.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context};
use rustls_pki_types::{CertificateDer, ServerName};

use crate::config::Config;

/// A certificate that expires within this many days gets a warning.
pub const WARN_DAYS: i64 = 14;

/// The findings are the same type `check dns` and `check connectivity` print.
pub use confab_federation::check::{Finding, Level};

/// Where the server takes a domain's certificate from.
#[derive(Clone, Debug)]
pub struct CertLocation {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// From a `[tls."DOMAIN"]` entry (else `data_dir/certs/DOMAIN.crt` and `.key`).
    pub configured: bool,
}

/// The files the server uses for `domain` (the same rule as [`crate::tls::CertStore::load`]).
pub fn location(config: &Config, domain: &str) -> CertLocation {
    match config.tls.get(domain) {
        Some(files) => CertLocation {
            cert: files.cert.clone(),
            key: files.key.clone(),
            configured: true,
        },
        None => {
            let (cert, key) = generated_paths(config, domain);
            CertLocation {
                cert,
                key,
                configured: false,
            }
        }
    }
}

/// `data_dir/certs/DOMAIN.crt` and `.key`: where generated and imported certificates go.
pub fn generated_paths(config: &Config, domain: &str) -> (PathBuf, PathBuf) {
    let dir = config.cert_dir();
    (
        dir.join(format!("{domain}.crt")),
        dir.join(format!("{domain}.key")),
    )
}

/// What a loaded certificate says about itself.
#[derive(Clone, Debug)]
pub struct CertFacts {
    pub chain_len: usize,
    pub leaf: CertificateDer<'static>,
    pub subject: String,
    pub issuer: String,
    /// Issuer and subject are the same name.
    pub self_signed: bool,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// The DNS names of the subjectAltName extension (what RFC 6125 matching uses).
    pub dns_names: Vec<String>,
    /// Each certificate of the chain is followed by its issuer.
    pub chain_in_order: bool,
}

/// Loads a PEM chain and key as the server does, checks that the key belongs to the
/// certificate and reads the leaf. The error is one line naming the file.
pub fn inspect(cert_path: &Path, key_path: &Path) -> Result<CertFacts, String> {
    let loaded = crate::tls::load_domain_cert(cert_path, key_path).map_err(|e| e.to_string())?;
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        loaded.key.keys_match()
    {
        return Err(format!(
            "the private key in {} does not belong to the certificate in {}",
            key_path.display(),
            cert_path.display()
        ));
    }
    let chain = &loaded.key.cert;
    let leaf = chain[0].clone().into_owned();
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("{}: cannot parse the certificate: {e}", cert_path.display()))?;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                dns_names.push(n.to_string());
            }
        }
    }
    let mut chain_in_order = true;
    let mut previous_issuer = parsed.issuer().as_raw().to_vec();
    for c in chain.iter().skip(1) {
        match x509_parser::parse_x509_certificate(c.as_ref()) {
            Ok((_, p)) => {
                if p.subject().as_raw() != previous_issuer.as_slice() {
                    chain_in_order = false;
                }
                previous_issuer = p.issuer().as_raw().to_vec();
            }
            Err(e) => {
                return Err(format!(
                    "{}: cannot parse a certificate of the chain: {e}",
                    cert_path.display()
                ))
            }
        }
    }
    Ok(CertFacts {
        chain_len: chain.len(),
        subject: parsed.subject().to_string(),
        issuer: parsed.issuer().to_string(),
        self_signed: parsed.subject().as_raw() == parsed.issuer().as_raw(),
        not_before: parsed.validity().not_before.timestamp(),
        not_after: parsed.validity().not_after.timestamp(),
        dns_names,
        chain_in_order,
        leaf,
    })
}

/// The RFC 6125 reference identifier for `domain`: A-labels, no trailing dot.
fn reference_name(domain: &str) -> Result<ServerName<'static>, String> {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let ascii = if domain.is_ascii() {
        domain.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(domain)
            .map_err(|_| format!("{domain:?} is not a valid internationalized domain name"))?
    };
    ServerName::try_from(ascii).map_err(|_| format!("{domain:?} is not a valid domain name"))
}

/// Whether the certificate is valid for `domain` (RFC 6125 DNS-ID, wildcards included).
/// `Ok(false)` is a mismatch; `Err` says why no answer could be had.
pub fn valid_for(leaf: &CertificateDer<'_>, domain: &str) -> Result<bool, String> {
    let cert =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("malformed certificate: {e}"))?;
    let name = reference_name(domain)?;
    match cert.verify_is_valid_for_subject_name(&name) {
        Ok(()) => Ok(true),
        Err(webpki::Error::CertNotValidForName(_)) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// A date for people: `2025-06-01 12:00 UTC`.
pub fn date(unix: i64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| unix.to_string())
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn days(n: i64) -> String {
    if n == 1 {
        "1 day".into()
    } else {
        format!("{n} days")
    }
}

/// Judges a loaded certificate for `domain` at time `now`: names, dates, issuer, chain.
pub fn assess(facts: &CertFacts, domain: &str, path: &Path, now: i64) -> Vec<Finding> {
    let mut out = Vec::new();
    let p = path.display();
    let names = if facts.dns_names.is_empty() {
        "no DNS names".to_string()
    } else {
        facts.dns_names.join(", ")
    };
    match valid_for(&facts.leaf, domain) {
        Ok(true) => out.push(Finding::ok(format!(
            "{domain}: the certificate is valid for {domain} (names: {names})"
        ))),
        Ok(false) => out.push(Finding::problem(format!(
            "{domain}: the certificate in {p} is not valid for {domain} (names: {names}): \
             get one that names {domain} (e.g. certbot certonly -d {domain}), \
             or run `confab cert generate {domain}` for a self-signed one"
        ))),
        Err(e) => out.push(Finding::problem(format!(
            "{domain}: cannot check the names of the certificate in {p}: {e}"
        ))),
    }
    if now < facts.not_before {
        out.push(Finding::problem(format!(
            "{domain}: the certificate in {p} is not valid before {}: check the system clock, \
             or wait until then",
            date(facts.not_before)
        )));
    } else if now >= facts.not_after {
        out.push(Finding::problem(format!(
            "{domain}: the certificate in {p} expired on {}: renew it (e.g. certbot renew, \
             then `confab cert import`) or run `confab cert generate {domain} --force`",
            date(facts.not_after)
        )));
    } else {
        let secs = facts.not_after - now;
        // Rounded: a certificate issued for 90 days says 90, not 89, a second later.
        let left = (secs + 43_200) / 86_400;
        if secs < WARN_DAYS * 86_400 {
            let when = if secs < 86_400 {
                "in less than a day".to_string()
            } else {
                format!("in {}", days(left))
            };
            out.push(Finding::warning(format!(
                "{domain}: the certificate in {p} expires on {}, {when}: renew it soon",
                date(facts.not_after),
            )));
        } else {
            out.push(Finding::ok(format!(
                "{domain}: valid until {} ({} left)",
                date(facts.not_after),
                days(left)
            )));
        }
    }
    if facts.self_signed {
        out.push(Finding::warning(format!(
            "{domain}: the certificate is self-signed: clients warn about it and other servers \
             authenticate us only by dialback; install one from a CA with `confab cert import`"
        )));
    } else if facts.chain_len == 1 {
        out.push(Finding::warning(format!(
            "{domain}: {p} holds only the server's certificate, not the intermediate ones: \
             use the full chain (Let's Encrypt's fullchain.pem), or clients may not trust it"
        )));
    }
    if !facts.chain_in_order {
        out.push(Finding::warning(format!(
            "{domain}: the chain in {p} is not in order: put the server's certificate first, \
             each followed by its issuer"
        )));
    }
    out
}

/// `confab check certs` for one served domain, without changing any file.
pub fn check_domain(config: &Config, domain: &str, now: i64) -> Vec<Finding> {
    let loc = location(config, domain);
    if !loc.configured && !loc.cert.exists() && !loc.key.exists() {
        return vec![Finding::warning(format!(
            "{domain}: no certificate yet in {}: the server generates a self-signed one when it \
             starts; `confab cert generate {domain}` makes one now, `confab cert import` installs \
             one from a CA",
            loc.cert.display()
        ))];
    }
    let facts = match inspect(&loc.cert, &loc.key) {
        Ok(f) => f,
        Err(e) => {
            let fix = if loc.configured {
                format!("fix the files named in [tls.\"{domain}\"]")
            } else {
                format!(
                    "run `confab cert generate {domain} --force` or `confab cert import` \
                     to replace them"
                )
            };
            return vec![Finding::problem(format!(
                "{domain}: cannot load the certificate: {e}: {fix}"
            ))];
        }
    };
    let mut out = vec![Finding::ok(format!(
        "{domain}: certificate {} and key {} load (chain of {}; subject {}; issued by {})",
        loc.cert.display(),
        loc.key.display(),
        facts.chain_len,
        facts.subject,
        facts.issuer
    ))];
    out.extend(key_mode_finding(domain, &loc.key));
    out.extend(assess(&facts, domain, &loc.cert, now));
    out
}

#[cfg(unix)]
fn key_mode_finding(domain: &str, key: &Path) -> Option<Finding> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(key).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        Finding::warning(format!(
            "{domain}: the private key {} can be read by other users (mode {mode:03o}): \
             chmod 600 {}",
            key.display(),
            key.display()
        ))
    })
}

#[cfg(not(unix))]
fn key_mode_finding(_domain: &str, _key: &Path) -> Option<Finding> {
    None
}

/// `confab check certs [DOMAIN]`.
pub fn check(config: &Config, domain: Option<&str>) -> anyhow::Result<Vec<Finding>> {
    let domains = match domain {
        Some(d) => {
            let d = served_domain(config, d)?;
            vec![d]
        }
        None => config.domains.clone(),
    };
    let now = now_unix();
    Ok(domains
        .iter()
        .flat_map(|d| check_domain(config, d, now))
        .collect())
}

/// `domain` as the configuration spells it, or an error if it is not served.
fn served_domain(config: &Config, domain: &str) -> anyhow::Result<String> {
    let d = domain.trim_end_matches('.').to_lowercase();
    if !config.is_local_domain(&d) {
        bail!(
            "{domain} is not a domain this server serves (domains: {})",
            config.domains.join(", ")
        );
    }
    Ok(d)
}

/// A line saying that a `[tls."DOMAIN"]` entry makes the server ignore `data_dir/certs`.
fn configured_elsewhere(config: &Config, domain: &str) -> Option<String> {
    config.tls.get(domain).map(|files| {
        format!(
            "warning: [tls.\"{domain}\"] in the configuration names {}: the server uses that \
             file for {domain}, not this one; remove the entry to use this certificate",
            files.cert.display()
        )
    })
}

/// `confab cert generate DOMAIN [--force]`: a self-signed certificate in `data_dir/certs`.
pub fn generate(config: &Config, domain: &str, force: bool) -> anyhow::Result<Vec<String>> {
    let domain = served_domain(config, domain)?;
    let (cert, key) = generated_paths(config, &domain);
    for existing in [&cert, &key] {
        if existing.exists() && !force {
            bail!(
                "{} exists: pass --force to replace it with a new self-signed certificate",
                existing.display()
            );
        }
    }
    let dir = config.cert_dir();
    create_private_dir(&dir)?;
    give_to_owner_of(&config.data_dir, &[&dir])?;
    // Generated next to the final files, then renamed over them, so a server starting
    // meanwhile never reads half a file.
    let tmp_cert = temp_path(&cert);
    let tmp_key = temp_path(&key);
    let _cleanup = Cleanup(vec![tmp_cert.clone(), tmp_key.clone()]);
    for t in [&tmp_cert, &tmp_key] {
        let _ = fs::remove_file(t);
    }
    crate::tls::generate_self_signed(&domain, &tmp_cert, &tmp_key)?;
    let facts = inspect(&tmp_cert, &tmp_key).map_err(anyhow::Error::msg)?;
    sync_file(&tmp_cert)?;
    give_to_owner_of(&config.data_dir, &[&tmp_cert, &tmp_key])?;
    rename(&tmp_key, &key)?;
    rename(&tmp_cert, &cert)?;
    sync_dir(&dir);
    let mut lines = vec![format!(
        "generated a self-signed certificate for {domain}: {} (key {}, mode 0600), valid until {}",
        cert.display(),
        key.display(),
        date(facts.not_after)
    )];
    lines.extend(configured_elsewhere(config, &domain));
    Ok(lines)
}

/// `confab cert import DIR [--domain DOMAIN]`: installs `DIR/fullchain.pem` and
/// `DIR/privkey.pem` (a certbot `live/DOMAIN/` directory) as `data_dir/certs/DOMAIN.crt`
/// and `.key`, after checking that they load, match and are valid for the domain now.
pub fn import(config: &Config, dir: &Path, domain: Option<&str>) -> anyhow::Result<Vec<String>> {
    let domain = match domain {
        Some(d) => served_domain(config, d)?,
        None => {
            let name = dir
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{} has no directory name", dir.display()))?;
            served_domain(config, name).map_err(|_| {
                anyhow::anyhow!(
                    "the directory {} is named {name:?}, which is not a domain this server \
                     serves (domains: {}): pass --domain DOMAIN",
                    dir.display(),
                    config.domains.join(", ")
                )
            })?
        }
    };
    let src_cert = dir.join("fullchain.pem");
    let src_key = dir.join("privkey.pem");
    if !src_cert.exists() {
        bail!(
            "no fullchain.pem in {}: give the certbot live/DOMAIN directory (with fullchain.pem \
             and privkey.pem)",
            dir.display()
        );
    }
    let cert_pem =
        fs::read(&src_cert).with_context(|| format!("cannot read {}", src_cert.display()))?;
    let key_pem =
        fs::read(&src_key).with_context(|| format!("cannot read {}", src_key.display()))?;

    let (cert, key) = generated_paths(config, &domain);
    let certs_dir = config.cert_dir();
    create_private_dir(&certs_dir)?;
    give_to_owner_of(&config.data_dir, &[&certs_dir])?;
    let tmp_cert = temp_path(&cert);
    let tmp_key = temp_path(&key);
    let _cleanup = Cleanup(vec![tmp_cert.clone(), tmp_key.clone()]);
    // What is checked is exactly what gets installed: the copies, not the sources
    // (which certbot may be replacing meanwhile).
    write_new(&tmp_key, &key_pem, 0o600)?;
    write_new(&tmp_cert, &cert_pem, 0o644)?;
    let facts = inspect(&tmp_cert, &tmp_key).map_err(|e| {
        anyhow::anyhow!(
            "{} and {} cannot be used: {}",
            src_cert.display(),
            src_key.display(),
            e.replace(
                &tmp_cert.display().to_string(),
                &src_cert.display().to_string()
            )
            .replace(
                &tmp_key.display().to_string(),
                &src_key.display().to_string()
            )
        )
    })?;
    let findings = assess(&facts, &domain, &src_cert, now_unix());
    if let Some(p) = findings.iter().find(|f| f.level == Level::Problem) {
        bail!("not imported: {}", p.text);
    }
    give_to_owner_of(&config.data_dir, &[&tmp_cert, &tmp_key])?;
    rename(&tmp_key, &key)?;
    rename(&tmp_cert, &cert)?;
    sync_dir(&certs_dir);
    let mut lines = vec![format!(
        "imported the certificate for {domain} from {} into {} (key {}, mode 0600): \
         issued by {}, valid until {}",
        dir.display(),
        cert.display(),
        key.display(),
        facts.issuer,
        date(facts.not_after)
    )];
    lines.extend(
        findings
            .iter()
            .filter(|f| f.level == Level::Warning)
            .map(|f| f.to_string()),
    );
    lines.extend(configured_elsewhere(config, &domain));
    Ok(lines)
}

/// `.NAME.tmp-PID` next to `path`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Removes leftover temporary files however the command ends.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes a new file with `mode` (refusing to follow or reuse an existing one), synced.
fn write_new(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn sync_file(path: &Path) -> anyhow::Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn sync_dir(dir: &Path) {
    // Makes the renames durable; not every platform can open a directory.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn rename(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::rename(from, to).with_context(|| format!("cannot replace {}", to.display()))
}

/// Run as root (a certbot deploy hook), new files would belong to root and the key,
/// mode 0600, would be unreadable by the server: give them to the data directory's owner.
#[cfg(unix)]
fn give_to_owner_of(data_dir: &Path, files: &[&Path]) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(owner) = fs::metadata(data_dir) else {
        return Ok(());
    };
    for f in files {
        let meta = fs::metadata(f).with_context(|| format!("cannot read {}", f.display()))?;
        if meta.uid() != owner.uid() || meta.gid() != owner.gid() {
            std::os::unix::fs::chown(f, Some(owner.uid()), Some(owner.gid())).with_context(
                || {
                    format!(
                        "cannot give {} to the owner of {} (uid {}): run this as root or as \
                         the server's user",
                        f.display(),
                        data_dir.display(),
                        owner.uid()
                    )
                },
            )?;
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn give_to_owner_of(_data_dir: &Path, _files: &[&Path]) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_for(names: &[&str], from_days: i64, to_days: i64) -> CertificateDer<'static> {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from_days);
        params.not_after = now + time::Duration::days(to_days);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn facts(leaf: CertificateDer<'static>) -> CertFacts {
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        CertFacts {
            chain_len: 1,
            subject: parsed.subject().to_string(),
            issuer: parsed.issuer().to_string(),
            self_signed: true,
            not_before: parsed.validity().not_before.timestamp(),
            not_after: parsed.validity().not_after.timestamp(),
            dns_names: Vec::new(),
            chain_in_order: true,
            leaf: leaf.clone(),
        }
    }

    #[test]
    fn names_are_matched_by_rfc_6125_rules() {
        let leaf = cert_for(&["*.example.org", "example.org"], -1, 30);
        assert_eq!(valid_for(&leaf, "example.org"), Ok(true));
        assert_eq!(valid_for(&leaf, "chat.example.org"), Ok(true));
        assert_eq!(valid_for(&leaf, "Example.ORG."), Ok(true));
        // A wildcard covers one label only.
        assert_eq!(valid_for(&leaf, "a.b.example.org"), Ok(false));
        assert_eq!(valid_for(&leaf, "example.net"), Ok(false));
        // A name that merely contains the domain does not match.
        let leaf = cert_for(&["example.org.evil.test"], -1, 30);
        assert_eq!(valid_for(&leaf, "example.org"), Ok(false));
    }

    #[test]
    fn dates_give_ok_warning_or_problem() {
        let p = Path::new("x.pem");
        let level_of = |from, to| {
            let f = facts(cert_for(&["a.test"], from, to));
            assess(&f, "a.test", p, now_unix())
                .into_iter()
                .find(|f| {
                    f.text.contains("valid until")
                        || f.text.contains("expire")
                        || f.text.contains("not valid before")
                })
                .map(|f| f.level)
        };
        assert_eq!(level_of(-10, 100), Some(Level::Ok));
        assert_eq!(level_of(-10, 3), Some(Level::Warning));
        assert_eq!(level_of(-10, -1), Some(Level::Problem));
        assert_eq!(level_of(2, 100), Some(Level::Problem));
    }

    #[test]
    fn findings_print_in_the_style_of_check_dns() {
        assert_eq!(Finding::ok("x").to_string(), "ok: x");
        assert_eq!(Finding::warning("y").to_string(), "warning: y");
        assert_eq!(Finding::problem("z").to_string(), "problem: z");
        assert_eq!(date(0), "1970-01-01 00:00 UTC");
    }
}
