//! Finding a remote XMPP server: SRV records per RFC 6120 §3.2 and XEP-0368, ordered per
//! RFC 2782, then the A/AAAA records of each target.
//!
//! Both `_xmpps-server._tcp` (TLS from the first byte, XEP-0368) and `_xmpp-server._tcp`
//! (STARTTLS, RFC 6120) are asked for at once; their records are merged into one list. When
//! neither has records the domain itself on the default port is tried (RFC 6120 §3.2.2).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use rand::Rng;

/// The SRV service of XEP-0368: TLS from the first byte.
pub const DIRECT_TLS_SERVICE: &str = "_xmpps-server._tcp";
/// The SRV service of RFC 6120 §3.2.1: plain TCP then STARTTLS.
pub const STARTTLS_SERVICE: &str = "_xmpp-server._tcp";

/// How long one query to a configured name server may take, and how often it is retried
/// (hickory's `attempts` counts retries: 1 means two tries in all, at most 4 s).
/// Nameservers given explicitly are near (a local resolver, or a test's own server), so a
/// dead one should be noticed quickly rather than after the system default of 2 × 5 s.
const EXPLICIT_TIMEOUT: Duration = Duration::from_secs(2);
const EXPLICIT_ATTEMPTS: usize = 1;

/// One host to try: an SRV target, or the domain itself when there are no SRV records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The host name, without the trailing dot.
    pub host: String,
    pub port: u16,
    /// Whether TLS starts with the first byte (XEP-0368) rather than after STARTTLS.
    pub direct_tls: bool,
}

/// One address to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The target host the address belongs to (not the XMPP domain).
    pub host: String,
    pub direct_tls: bool,
}

/// Why a domain could not be resolved to addresses.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// Every SRV answer was the single record with target "." (RFC 2782).
    #[error("{domain}: the SRV records say the service is not offered (target \".\")")]
    NoService { domain: String },
    /// No SRV records and the domain has no addresses (or is no valid server name).
    #[error("{domain}: no SRV records and no A/AAAA records")]
    NotFound { domain: String },
    /// An SRV target has no addresses.
    #[error("{host}: no A/AAAA records")]
    NoAddress { host: String },
    /// The query itself failed: time-out, refused, server failure, malformed name.
    #[error("{domain}: DNS lookup failed: {message}")]
    Lookup { domain: String, message: String },
    /// The resolver could not be set up (unreadable /etc/resolv.conf, no nameservers).
    #[error("DNS resolver configuration: {message}")]
    Config { message: String },
}

/// (priority, weight, target) of one SRV record, as [`order_srv`] takes them.
type SrvTarget = (u16, u16, Target);

/// What one SRV query said, reduced to what the ordering needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SrvAnswer {
    /// (priority, weight, port, target without trailing dot; "" for the root ".")
    Records(Vec<(u16, u16, u16, String)>),
    /// NXDOMAIN, or the name exists without SRV records.
    NoRecords,
    /// The query failed; we do not know whether records exist.
    Failed(String),
}

/// A DNS resolver for finding XMPP servers.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    /// The system's resolver configuration (`/etc/resolv.conf` on Unix).
    pub fn system() -> Result<Resolver, DnsError> {
        let builder = TokioResolver::builder_tokio().map_err(|e| DnsError::Config {
            message: e.to_string(),
        })?;
        let inner = builder.build().map_err(|e| DnsError::Config {
            message: e.to_string(),
        })?;
        Ok(Resolver { inner })
    }

    /// Queries only `servers` (UDP, and TCP for truncated answers), ignoring the system's
    /// configuration and hosts file. Answers are cached no longer than their TTL.
    pub fn with_nameservers(servers: &[SocketAddr]) -> Result<Resolver, DnsError> {
        if servers.is_empty() {
            return Err(DnsError::Config {
                message: "no nameservers given".into(),
            });
        }
        let name_servers = servers
            .iter()
            .map(|server| {
                let mut config = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut config.connections {
                    connection.port = server.port();
                }
                config
            })
            .collect();
        let mut options = ResolverOpts::default();
        options.timeout = EXPLICIT_TIMEOUT;
        options.attempts = EXPLICIT_ATTEMPTS;
        options.use_hosts_file = ResolveHosts::Never;
        let inner = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(options)
        .build()
        .map_err(|e| DnsError::Config {
            message: e.to_string(),
        })?;
        Ok(Resolver { inner })
    }

    /// The hosts to try for `domain`, best first (RFC 6120 §3.2, XEP-0368).
    ///
    /// Both SRV services are queried concurrently, merged and ordered by [`order_srv`]. A
    /// service whose only record has the target "." is not offered (RFC 2782); if no service
    /// is offered, [`DnsError::NoService`]. Without any SRV records: the domain itself on
    /// `default_port`, STARTTLS (RFC 6120 §3.2.2).
    pub async fn targets(&self, domain: &str, default_port: u16) -> Result<Vec<Target>, DnsError> {
        Ok(self.ordered_targets(domain, default_port).await?.0)
    }

    /// The ordered targets, and whether they are the fallback (no SRV records).
    async fn ordered_targets(
        &self,
        domain: &str,
        default_port: u16,
    ) -> Result<(Vec<Target>, bool), DnsError> {
        let domain = check_domain(domain)?;
        let direct = format!("{DIRECT_TLS_SERVICE}.{domain}.");
        let starttls = format!("{STARTTLS_SERVICE}.{domain}.");
        let (direct, starttls) = tokio::join!(self.srv(&direct), self.srv(&starttls));
        match combine_srv(domain, direct, starttls)? {
            Some(records) => Ok((order_srv(records, &mut rand::thread_rng()), false)),
            None => Ok((
                vec![Target {
                    host: domain.to_string(),
                    port: default_port,
                    direct_tls: false,
                }],
                true,
            )),
        }
    }

    /// The addresses of `target` (IPv6 then IPv4, as the resolver orders them), each with
    /// the target's port.
    pub async fn endpoints(&self, target: &Target) -> Result<Vec<Endpoint>, DnsError> {
        let host = target.host.trim_end_matches('.');
        if host.is_empty() || host.parse::<IpAddr>().is_ok() {
            return Err(DnsError::NoAddress {
                host: target.host.clone(),
            });
        }
        let ips = match self.inner.lookup_ip(format!("{host}.")).await {
            Ok(ips) => ips,
            Err(e) if e.is_no_records_found() => {
                return Err(DnsError::NoAddress {
                    host: host.to_string(),
                })
            }
            Err(e) => {
                return Err(DnsError::Lookup {
                    domain: host.to_string(),
                    message: e.to_string(),
                })
            }
        };
        let endpoints: Vec<Endpoint> = ips
            .iter()
            .map(|ip| Endpoint {
                addr: SocketAddr::new(ip, target.port),
                host: host.to_string(),
                direct_tls: target.direct_tls,
            })
            .collect();
        if endpoints.is_empty() {
            return Err(DnsError::NoAddress {
                host: host.to_string(),
            });
        }
        Ok(endpoints)
    }

    /// All endpoints of all targets of `domain`, in the order to try them. Targets without
    /// addresses are skipped; only if no target has any is the first error returned.
    pub async fn resolve(
        &self,
        domain: &str,
        default_port: u16,
    ) -> Result<Vec<Endpoint>, DnsError> {
        let (targets, fallback) = self.ordered_targets(domain, default_port).await?;
        let mut endpoints = Vec::new();
        let mut first_error = None;
        for target in &targets {
            match self.endpoints(target).await {
                Ok(found) => endpoints.extend(found),
                Err(e) => {
                    tracing::debug!(domain, host = %target.host, error = %e, "SRV target skipped");
                    first_error.get_or_insert(e);
                }
            }
        }
        if !endpoints.is_empty() {
            return Ok(endpoints);
        }
        Err(match first_error {
            Some(DnsError::NoAddress { .. }) if fallback => DnsError::NotFound {
                domain: domain.to_string(),
            },
            Some(e) => e,
            None => DnsError::NotFound {
                domain: domain.to_string(),
            },
        })
    }

    /// The SRV records of `service` (e.g. `_xmpp-server._tcp`) at `domain`, as they are
    /// (for diagnostics; routing uses [`Resolver::resolve`]).
    pub async fn srv_answer(&self, service: &str, domain: &str) -> SrvAnswer {
        match check_domain(domain) {
            Ok(d) => self.srv(&format!("{service}.{d}.")).await,
            Err(e) => SrvAnswer::Failed(e.to_string()),
        }
    }

    async fn srv(&self, name: &str) -> SrvAnswer {
        match self.inner.srv_lookup(name).await {
            Ok(lookup) => {
                let records: Vec<_> = lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::SRV(srv) => Some((
                            srv.priority,
                            srv.weight,
                            srv.port,
                            srv.target.to_ascii().trim_end_matches('.').to_string(),
                        )),
                        _ => None,
                    })
                    .collect();
                if records.is_empty() {
                    SrvAnswer::NoRecords
                } else {
                    SrvAnswer::Records(records)
                }
            }
            Err(e) if e.is_no_records_found() => SrvAnswer::NoRecords,
            Err(e) => SrvAnswer::Failed(e.to_string()),
        }
    }
}

/// The domain without a trailing dot, if it can name an XMPP server: IP literals cannot
/// (RFC 6120 §3.2.1 resolves names; our peers are named by their certificates).
fn check_domain(domain: &str) -> Result<&str, DnsError> {
    let trimmed = domain.trim_end_matches('.');
    let literal =
        trimmed.parse::<IpAddr>().is_ok() || (trimmed.starts_with('[') && trimmed.ends_with(']'));
    if trimmed.is_empty() || literal {
        return Err(DnsError::NotFound {
            domain: domain.to_string(),
        });
    }
    Ok(trimmed)
}

/// Merges the answers of the two SRV services into (priority, weight, target) records;
/// `None` when the domain itself is to be tried.
///
/// A service whose only record has target "." is not offered (RFC 2782); "." records among
/// others are ignored. If either service has usable records, those are the answer, even if
/// the other query failed. Otherwise:
/// - `_xmpp-server` not offered → [`DnsError::NoService`], likewise if both say ".": the
///   service "is decidedly not available at this domain" (RFC 2782), so no fallback;
/// - a failed query → [`DnsError::Lookup`] (we cannot tell whether records exist);
/// - no records for `_xmpp-server` → `None`: the domain itself with STARTTLS
///   (RFC 6120 §3.2.2), even if `_xmpps-server` says ".".
fn combine_srv(
    domain: &str,
    direct_tls: SrvAnswer,
    starttls: SrvAnswer,
) -> Result<Option<Vec<SrvTarget>>, DnsError> {
    enum Service {
        Offered(Vec<SrvTarget>),
        NotOffered,
        Absent,
        Failed(String),
    }
    let classify = |answer: SrvAnswer, direct_tls: bool| match answer {
        SrvAnswer::NoRecords => Service::Absent,
        SrvAnswer::Failed(message) => Service::Failed(message),
        SrvAnswer::Records(records) => {
            if records.len() == 1 && records[0].3.is_empty() {
                return Service::NotOffered;
            }
            let usable: Vec<_> = records
                .into_iter()
                .filter(|(_, _, _, host)| !host.is_empty())
                .map(|(priority, weight, port, host)| {
                    (
                        priority,
                        weight,
                        Target {
                            host,
                            port,
                            direct_tls,
                        },
                    )
                })
                .collect();
            if usable.is_empty() {
                Service::NotOffered
            } else {
                Service::Offered(usable)
            }
        }
    };
    let direct = classify(direct_tls, true);
    let starttls = classify(starttls, false);

    let mut merged = Vec::new();
    for service in [&direct, &starttls] {
        if let Service::Offered(records) = service {
            merged.extend(records.iter().cloned());
        }
    }
    if !merged.is_empty() {
        for service in [&direct, &starttls] {
            if let Service::Failed(message) = service {
                tracing::debug!(domain, %message, "one SRV query failed; using the other");
            }
        }
        return Ok(Some(merged));
    }
    let lookup_failed = |message: &String| DnsError::Lookup {
        domain: domain.to_string(),
        message: message.clone(),
    };
    match (&direct, &starttls) {
        (Service::Failed(message), Service::NotOffered) => Err(lookup_failed(message)),
        (_, Service::NotOffered) => Err(DnsError::NoService {
            domain: domain.to_string(),
        }),
        (Service::Failed(message), _) | (_, Service::Failed(message)) => {
            Err(lookup_failed(message))
        }
        _ => Ok(None),
    }
}

/// Orders SRV records per RFC 2782 §"Usage rules": by priority, lowest first, and within a
/// priority by a weighted random draw. Within one priority, direct-TLS targets
/// (XEP-0368) come before STARTTLS ones, each drawn separately by weight.
pub fn order_srv(mut records: Vec<(u16, u16, Target)>, rng: &mut impl Rng) -> Vec<Target> {
    // Stable sort: the order within a group is the order of the answer, as RFC 2782 allows
    // ("arrange ... in any order"), with zero weights first as it requires.
    records.sort_by_key(|(priority, weight, target)| (*priority, !target.direct_tls, *weight != 0));
    let mut ordered = Vec::with_capacity(records.len());
    let mut rest = records.as_slice();
    while let Some((priority, _, first)) = rest.first() {
        let group_len = rest
            .iter()
            .take_while(|(p, _, t)| p == priority && t.direct_tls == first.direct_tls)
            .count();
        let (group, tail) = rest.split_at(group_len);
        let mut group: Vec<&(u16, u16, Target)> = group.iter().collect();
        while !group.is_empty() {
            let sum: u32 = group.iter().map(|(_, w, _)| u32::from(*w)).sum();
            let draw = rng.gen_range(0..=sum);
            let mut running = 0u32;
            let index = group
                .iter()
                .position(|(_, w, _)| {
                    running += u32::from(*w);
                    running >= draw
                })
                .unwrap_or(group.len() - 1);
            ordered.push(group.remove(index).2.clone());
        }
        rest = tail;
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn t(host: &str, port: u16, direct_tls: bool) -> Target {
        Target {
            host: host.into(),
            port,
            direct_tls,
        }
    }

    #[test]
    fn priority_orders_first() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let ordered = order_srv(
                vec![
                    (20, 100, t("c", 1, false)),
                    (10, 1, t("b", 1, false)),
                    (5, 0, t("a", 1, false)),
                    (30, 0, t("d", 1, true)),
                ],
                &mut rng,
            );
            let hosts: Vec<_> = ordered.iter().map(|t| t.host.as_str()).collect();
            assert_eq!(hosts, ["a", "b", "c", "d"]);
        }
    }

    #[test]
    fn equal_priority_prefers_direct_tls() {
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..100 {
            let ordered = order_srv(
                vec![
                    (10, 65535, t("plain", 5269, false)),
                    (10, 0, t("tls", 5270, true)),
                    (5, 0, t("first", 5269, false)),
                ],
                &mut rng,
            );
            let hosts: Vec<_> = ordered.iter().map(|t| t.host.as_str()).collect();
            assert_eq!(hosts, ["first", "tls", "plain"]);
        }
    }

    #[test]
    fn weights_are_roughly_proportional() {
        let mut rng = StdRng::seed_from_u64(3);
        let records = vec![
            (0, 10, t("light", 1, false)),
            (0, 30, t("heavy", 1, false)),
            (0, 60, t("heaviest", 1, false)),
        ];
        let runs = 20_000;
        let mut first = std::collections::HashMap::new();
        for _ in 0..runs {
            let ordered = order_srv(records.clone(), &mut rng);
            assert_eq!(ordered.len(), 3);
            *first.entry(ordered[0].host.clone()).or_insert(0u32) += 1;
        }
        let share = |host: &str| f64::from(first[host]) / f64::from(runs);
        // Draws are in 0..=100, so the first record also wins on 0: 11/101, 30/101, 60/101.
        assert!((share("light") - 11.0 / 101.0).abs() < 0.02, "{first:?}");
        assert!((share("heavy") - 30.0 / 101.0).abs() < 0.02, "{first:?}");
        assert!((share("heaviest") - 60.0 / 101.0).abs() < 0.02, "{first:?}");
    }

    #[test]
    fn zero_weights_rarely_first_and_never_lost() {
        let mut rng = StdRng::seed_from_u64(4);
        let records = vec![
            (0, 0, t("zero", 1, false)),
            (0, 100, t("weighted", 1, false)),
        ];
        let mut zero_first = 0;
        for _ in 0..10_000 {
            let ordered = order_srv(records.clone(), &mut rng);
            assert_eq!(ordered.len(), 2);
            if ordered[0].host == "zero" {
                zero_first += 1;
            }
        }
        // Only a draw of exactly 0 (1 in 101) picks the zero weight.
        assert!(zero_first > 30 && zero_first < 200, "{zero_first}");

        // All weights zero: every record is kept, in some order.
        let all_zero = vec![
            (0, 0, t("a", 1, false)),
            (0, 0, t("b", 1, false)),
            (0, 0, t("c", 1, false)),
        ];
        let mut ordered: Vec<_> = order_srv(all_zero, &mut rng)
            .into_iter()
            .map(|t| t.host)
            .collect();
        ordered.sort();
        assert_eq!(ordered, ["a", "b", "c"]);
    }

    #[test]
    fn empty_input_gives_empty_order() {
        assert!(order_srv(Vec::new(), &mut StdRng::seed_from_u64(5)).is_empty());
    }

    fn rec(priority: u16, port: u16, host: &str) -> (u16, u16, u16, String) {
        (priority, 0, port, host.to_string())
    }

    #[test]
    fn both_services_merge() {
        let got = combine_srv(
            "b.test",
            SrvAnswer::Records(vec![rec(1, 5270, "x.b.test")]),
            SrvAnswer::Records(vec![rec(2, 5269, "y.b.test")]),
        )
        .unwrap()
        .expect("records");
        assert_eq!(
            got,
            vec![
                (1, 0, t("x.b.test", 5270, true)),
                (2, 0, t("y.b.test", 5269, false))
            ]
        );
    }

    #[test]
    fn dot_target_means_not_offered() {
        let dot = || SrvAnswer::Records(vec![rec(0, 0, "")]);
        assert!(matches!(
            combine_srv("b.test", dot(), dot()),
            Err(DnsError::NoService { .. })
        ));
        assert!(matches!(
            combine_srv("b.test", SrvAnswer::NoRecords, dot()),
            Err(DnsError::NoService { .. })
        ));
        // Only direct TLS not offered: STARTTLS records are used.
        let got = combine_srv(
            "b.test",
            dot(),
            SrvAnswer::Records(vec![rec(0, 5269, "y.b.test")]),
        )
        .unwrap()
        .expect("records");
        assert_eq!(got, vec![(0, 0, t("y.b.test", 5269, false))]);
        // Only STARTTLS not offered: direct TLS records are used.
        let got = combine_srv(
            "b.test",
            SrvAnswer::Records(vec![rec(0, 5270, "x.b.test")]),
            dot(),
        )
        .unwrap()
        .expect("records");
        assert_eq!(got, vec![(0, 0, t("x.b.test", 5270, true))]);
        // `_xmpps-server` says "." and `_xmpp-server` has nothing: RFC 6120 fallback.
        assert_eq!(
            combine_srv("b.test", dot(), SrvAnswer::NoRecords).unwrap(),
            None
        );
    }

    #[test]
    fn no_records_falls_back_to_the_domain() {
        let got = combine_srv("b.test", SrvAnswer::NoRecords, SrvAnswer::NoRecords).unwrap();
        assert_eq!(got, None);
    }

    #[test]
    fn failures_are_not_mistaken_for_absence() {
        let failed = || SrvAnswer::Failed("timed out".into());
        assert!(matches!(
            combine_srv("b.test", failed(), SrvAnswer::NoRecords),
            Err(DnsError::Lookup { .. })
        ));
        assert!(matches!(
            combine_srv("b.test", SrvAnswer::NoRecords, failed()),
            Err(DnsError::Lookup { .. })
        ));
        // Records from the other service are good enough.
        let got = combine_srv(
            "b.test",
            failed(),
            SrvAnswer::Records(vec![rec(0, 5269, "y.b.test")]),
        )
        .unwrap()
        .expect("records");
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn ip_literals_are_not_server_names() {
        for domain in ["127.0.0.1", "::1", "[::1]", "", "."] {
            assert!(
                matches!(check_domain(domain), Err(DnsError::NotFound { .. })),
                "{domain}"
            );
        }
        assert_eq!(check_domain("b.test.").unwrap(), "b.test");
    }
}
