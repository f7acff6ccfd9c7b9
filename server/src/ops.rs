//! Operations: counters behind `confab stats` and the Prometheus endpoint
//! ([`crate::metrics`]), and the systemd notification protocol (`sd_notify`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::server::Server;
use crate::stanza::Kind;

const KINDS: [(Kind, &str); 3] = [
    (Kind::Message, "message"),
    (Kind::Presence, "presence"),
    (Kind::Iq, "iq"),
];

fn index(kind: Kind) -> usize {
    match kind {
        Kind::Message => 0,
        Kind::Presence => 1,
        Kind::Iq => 2,
    }
}

/// Counters since the start of the process. Relaxed atomics: each is a tally read for
/// display, nothing is ordered by them.
#[derive(Default)]
pub struct Stats {
    /// Stanzas received from clients and from other servers, by kind.
    stanzas_in: [AtomicU64; 3],
    /// Stanzas written to clients and handed to links to other servers, by kind.
    stanzas_out: [AtomicU64; 3],
    auth_failures: AtomicU64,
    /// Logins refused because their address failed too often (`limits.auth_failures_per_minute`).
    auth_refused: AtomicU64,
    offline_stored: AtomicU64,
}

/// A consistent-enough copy of everything `confab stats` and `/metrics` show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub sessions: usize,
    pub s2s_out: usize,
    pub s2s_in: usize,
    /// (kind, in, out)
    pub stanzas: Vec<(&'static str, u64, u64)>,
    pub auth_failures: u64,
    pub auth_refused: u64,
    pub offline_stored: u64,
    pub resident_memory: Option<u64>,
    pub store_bytes: Option<u64>,
    pub uptime_secs: u64,
}

impl Stats {
    pub fn stanza_in(&self, kind: Kind) {
        self.stanzas_in[index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn stanza_out(&self, kind: Kind) {
        self.stanzas_out[index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an outgoing element if it is a stanza.
    pub fn element_out(&self, e: &confab_protocol::Element) {
        if let Some(kind) = crate::stanza::kind(e) {
            self.stanza_out(kind);
        }
    }

    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn auth_refused(&self) {
        self.auth_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn offline_stored(&self) {
        self.offline_stored.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads every counter and gauge of a running server.
pub fn snapshot(server: &Arc<Server>) -> Snapshot {
    let s = &server.stats;
    let fed = server.federation.get();
    Snapshot {
        sessions: server.router.session_count(),
        s2s_out: fed.map(|f| f.links().len()).unwrap_or(0),
        s2s_in: fed.map(|f| f.incoming_links().len()).unwrap_or(0),
        stanzas: KINDS
            .iter()
            .map(|(k, name)| {
                let i = index(*k);
                (
                    *name,
                    s.stanzas_in[i].load(Ordering::Relaxed),
                    s.stanzas_out[i].load(Ordering::Relaxed),
                )
            })
            .collect(),
        auth_failures: s.auth_failures.load(Ordering::Relaxed),
        auth_refused: s.auth_refused.load(Ordering::Relaxed),
        offline_stored: s.offline_stored.load(Ordering::Relaxed),
        resident_memory: resident_memory_bytes(),
        store_bytes: server.storage.size_on_disk(),
        uptime_secs: server.started.elapsed().as_secs(),
    }
}

/// The process's resident set size, from `/proc/self/status` (`VmRSS`, in kB: unlike
/// `statm` it needs no page size). None where there is no procfs.
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Bytes in a human unit: `512 B`, `1.5 KiB`, `23.4 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// What `confab stats` prints: one `name: value` a line.
pub fn stats_lines(s: &Snapshot) -> Vec<String> {
    let sum = |f: fn(&(&'static str, u64, u64)) -> u64| s.stanzas.iter().map(f).sum::<u64>();
    let by_kind = |f: fn(&(&'static str, u64, u64)) -> u64| {
        s.stanzas
            .iter()
            .map(|k| format!("{} {}", k.0, f(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let unknown = || "unknown".to_string();
    vec![
        format!("sessions: {}", s.sessions),
        format!("s2s links: {} outgoing, {} incoming", s.s2s_out, s.s2s_in),
        format!("stanzas in: {} ({})", sum(|k| k.1), by_kind(|k| k.1)),
        format!("stanzas out: {} ({})", sum(|k| k.2), by_kind(|k| k.2)),
        format!("offline messages stored: {}", s.offline_stored),
        format!("auth failures: {}", s.auth_failures),
        format!("logins refused (too many failures): {}", s.auth_refused),
        format!(
            "memory (resident): {}",
            s.resident_memory.map(human_bytes).unwrap_or_else(unknown)
        ),
        format!(
            "store size: {}",
            s.store_bytes.map(human_bytes).unwrap_or_else(unknown)
        ),
        format!("uptime seconds: {}", s.uptime_secs),
    ]
}

/// The Prometheus text exposition format (version 0.0.4) of a snapshot.
pub fn prometheus_text(s: &Snapshot) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    metric(
        "confab_sessions",
        "gauge",
        "Bound client sessions.",
        &one(s.sessions as u64),
    );
    metric(
        "confab_s2s_links",
        "gauge",
        "Server-to-server links.",
        &[
            ("{direction=\"out\"}".to_string(), s.s2s_out as u64),
            ("{direction=\"in\"}".to_string(), s.s2s_in as u64),
        ],
    );
    let mut stanzas = Vec::new();
    for (kind, i, o) in &s.stanzas {
        stanzas.push((format!("{{kind=\"{kind}\",direction=\"in\"}}"), *i));
        stanzas.push((format!("{{kind=\"{kind}\",direction=\"out\"}}"), *o));
    }
    metric(
        "confab_stanzas_total",
        "counter",
        "Stanzas received from (in) and sent to (out) clients and servers.",
        &stanzas,
    );
    metric(
        "confab_auth_failures_total",
        "counter",
        "Failed SASL authentication attempts.",
        &one(s.auth_failures),
    );
    metric(
        "confab_auth_refused_total",
        "counter",
        "Logins refused because their address failed too often.",
        &one(s.auth_refused),
    );
    metric(
        "confab_offline_stored_total",
        "counter",
        "Messages stored for offline accounts.",
        &one(s.offline_stored),
    );
    if let Some(b) = s.store_bytes {
        metric(
            "confab_store_bytes",
            "gauge",
            "Size of the store on disk.",
            &one(b),
        );
    }
    if let Some(b) = s.resident_memory {
        metric(
            "confab_resident_memory_bytes",
            "gauge",
            "Resident memory of the process.",
            &one(b),
        );
    }
    metric(
        "confab_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        &one(s.uptime_secs),
    );
    out
}

// ---- systemd ---------------------------------------------------------------------------

/// Sends a state to the service manager (sd_notify(3)): `READY=1`, `STOPPING=1`,
/// `WATCHDOG=1`, `STATUS=...`. Does nothing when not started by one (no
/// `$NOTIFY_SOCKET`); a failure to send is logged, never fatal.
pub fn sd_notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(&target, state) {
        tracing::warn!(error = %e, socket = ?target, "cannot notify the service manager");
    }
}

#[cfg(unix)]
fn send_notify(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let bytes = target.as_bytes();
    let socket = UnixDatagram::unbound()?;
    // "@name" is a socket in the abstract namespace (Linux).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
        return Ok(());
    }
    if !bytes.starts_with(b"/") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither a path nor an abstract socket name",
        ));
    }
    socket.send_to(state.as_bytes(), target)?;
    Ok(())
}

#[cfg(not(unix))]
fn send_notify(_target: &std::ffi::OsStr, _state: &str) -> std::io::Result<()> {
    Ok(())
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` (sd_watchdog_enabled(3)),
/// when it is set and `$WATCHDOG_PID`, if set, names this process.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec / 2))
}

/// Pings the watchdog until the task is aborted. It runs on the server's runtime, so a
/// runtime that stops making progress stops the pings and systemd restarts the service.
pub async fn watchdog(interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval.max(std::time::Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sd_notify("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            sessions: 2,
            s2s_out: 1,
            s2s_in: 0,
            stanzas: vec![("message", 5, 4), ("presence", 3, 6), ("iq", 7, 7)],
            auth_failures: 1,
            auth_refused: 0,
            offline_stored: 2,
            resident_memory: Some(3 * 1024 * 1024),
            store_bytes: None,
            uptime_secs: 9,
        }
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tconfab\nVmPeak:\t  999 kB\nVmRSS:\t   2048 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert!(resident_memory_bytes().is_none_or(|b| b > 0));
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn stats_lines_sum_by_kind() {
        let lines = stats_lines(&sample());
        assert!(lines.contains(&"sessions: 2".to_string()), "{lines:?}");
        assert!(
            lines.contains(&"stanzas in: 15 (message 5, presence 3, iq 7)".to_string()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"store size: unknown".to_string()),
            "{lines:?}"
        );
    }

    #[test]
    fn prometheus_text_is_well_formed() {
        let text = prometheus_text(&sample());
        assert!(text.contains("confab_sessions 2\n"), "{text}");
        assert!(
            text.contains("confab_stanzas_total{kind=\"presence\",direction=\"out\"} 6\n"),
            "{text}"
        );
        assert!(text.contains("confab_s2s_links{direction=\"out\"} 1\n"));
        assert!(!text.contains("confab_store_bytes"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<u64>().unwrap();
        }
    }

    #[test]
    fn notify_reaches_a_datagram_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send_notify(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(send_notify(std::ffi::OsStr::new("relative"), "READY=1").is_err());
    }
}
