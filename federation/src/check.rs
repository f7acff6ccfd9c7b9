//! Diagnostics for operators: what DNS says about a domain, and whether a link to a
//! remote domain can be established — each finding in one line, problems with the fix.

use std::sync::Arc;

use tokio::net::TcpStream;

use crate::dns::{Resolver, SrvAnswer, Target, DIRECT_TLS_SERVICE, STARTTLS_SERVICE};
use crate::outgoing::{connect, Purpose};
use crate::service::{AuthMethod, FederationService};
use crate::verify::CertStatus;
use crate::LinkError;

/// How bad a finding is: `warning` keeps the exit status at 0, `problem` does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warning,
    Problem,
}

/// One line of a check: `ok: …`, `warning: …` or `problem: … what to do`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub text: String,
}

impl Finding {
    pub fn ok(text: impl Into<String>) -> Finding {
        Finding {
            level: Level::Ok,
            text: text.into(),
        }
    }
    pub fn warning(text: impl Into<String>) -> Finding {
        Finding {
            level: Level::Warning,
            text: text.into(),
        }
    }
    pub fn problem(text: impl Into<String>) -> Finding {
        Finding {
            level: Level::Problem,
            text: text.into(),
        }
    }
    pub fn is_problem(&self) -> bool {
        self.level == Level::Problem
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Problem => "problem",
        };
        write!(f, "{tag}: {}", self.text)
    }
}

/// The SRV records of `domain` for servers (RFC 6120 §3.2, XEP-0368) and the addresses
/// of their targets.
pub async fn check_dns(resolver: &Resolver, domain: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut targets = Vec::new();
    for (service, direct) in [(DIRECT_TLS_SERVICE, true), (STARTTLS_SERVICE, false)] {
        let name = format!("{service}.{domain}");
        match resolver.srv_answer(service, domain).await {
            SrvAnswer::Records(records) => {
                if records.len() == 1 && records.iter().all(|r| r.3.is_empty()) {
                    let line = format!("SRV {name} says the service is not offered (target \".\")");
                    out.push(if direct { Finding::ok(line) } else { Finding::problem(format!("{line}: other servers cannot reach {domain}")) });
                    continue;
                }
                for (prio, weight, port, target) in records.into_iter().filter(|r| !r.3.is_empty()) {
                    out.push(Finding::ok(format!("SRV {name}: priority {prio}, weight {weight}, {target}:{port}")));
                    targets.push(Target { host: target, port, direct_tls: direct });
                }
            }
            SrvAnswer::NoRecords if direct => out.push(Finding::ok(format!(
                "no SRV record {name} (optional: direct TLS, XEP-0368)"
            ))),
            SrvAnswer::NoRecords => out.push(Finding::problem(format!(
                "missing SRV record {name}: add e.g. \"{name}. 3600 IN SRV 0 5 5269 xmpp.{domain}.\" (peers now fall back to {domain}:5269)"
            ))),
            SrvAnswer::Failed(e) => out.push(Finding::problem(format!("SRV lookup of {name} failed: {e}"))),
        }
    }
    if targets.is_empty() {
        targets.push(Target {
            host: domain.to_string(),
            port: 5269,
            direct_tls: false,
        });
    }
    for t in targets {
        match resolver.endpoints(&t).await {
            Ok(eps) => {
                let addrs: Vec<String> = eps.iter().map(|e| e.addr.to_string()).collect();
                out.push(Finding::ok(format!(
                    "{} has address {}",
                    t.host,
                    addrs.join(", ")
                )));
            }
            Err(e) => out.push(Finding::problem(format!(
                "{}: {e}: add an A and/or AAAA record",
                t.host
            ))),
        }
    }
    out
}

/// Tries to reach `remote` from our `local` domain step by step: DNS, TCP to each
/// address, TLS and the peer's certificate, then authentication.
pub async fn check_connectivity(
    svc: &Arc<FederationService>,
    local: &str,
    remote: &str,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let endpoints = match svc.resolver.resolve(remote, 5269).await {
        Ok(e) => e,
        Err(e) => {
            out.push(Finding::problem(format!("DNS: {e}")));
            return out;
        }
    };
    let mut reachable = false;
    for ep in &endpoints {
        let kind = if ep.direct_tls {
            "direct TLS"
        } else {
            "STARTTLS"
        };
        match tokio::time::timeout(svc.config.connect_timeout, TcpStream::connect(ep.addr)).await {
            Ok(Ok(_)) => {
                reachable = true;
                out.push(Finding::ok(format!(
                    "{} ({}, {kind}) accepts connections",
                    ep.addr, ep.host
                )));
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                out.push(Finding::problem(format!(
                    "{} ({}, {kind}): port closed (connection refused)",
                    ep.addr, ep.host
                )))
            }
            Ok(Err(e)) => out.push(Finding::problem(format!("{} ({}): {e}", ep.addr, ep.host))),
            Err(_) => out.push(Finding::problem(format!(
                "{} ({}): no answer within {:?} (firewall?)",
                ep.addr, ep.host, svc.config.connect_timeout
            ))),
        }
    }
    if !reachable {
        return out;
    }
    match connect(svc, local, remote, Purpose::Verify).await {
        Ok(est) => {
            out.push(match &est.peer_cert {
                CertStatus::Valid => Finding::ok(format!("TLS: the certificate is valid for {remote}")),
                CertStatus::NameMismatch => Finding::problem(format!("TLS: certificate name mismatch: it is not valid for {remote} (dialback may still work)")),
                CertStatus::Expired => Finding::problem("TLS: the certificate has expired"),
                CertStatus::NotYetValid => Finding::problem("TLS: the certificate is not valid yet (clock?)"),
                CertStatus::UntrustedIssuer => Finding::problem("TLS: the certificate is not issued by a trusted CA (add it with s2s.ca_files if you trust it)"),
                CertStatus::Missing => Finding::problem("TLS: no certificate (the link is not encrypted)"),
                CertStatus::Invalid(why) => Finding::problem(format!("TLS: invalid certificate: {why}")),
            });
            let mut s = est.stream;
            s.close_with(None).await;
        }
        Err(e) => {
            out.push(Finding::problem(format!("stream: {}", describe(&e))));
            return out;
        }
    }
    match connect(svc, local, remote, Purpose::Link).await {
        Ok(est) => {
            out.push(Finding::ok(match est.method {
                AuthMethod::External => {
                    format!("authenticated {local} to {remote} by certificate (SASL EXTERNAL)")
                }
                AuthMethod::Dialback => format!("authenticated {local} to {remote} by dialback"),
                AuthMethod::None => format!("connected to {remote}"),
            }));
            let mut s = est.stream;
            s.close_with(None).await;
        }
        Err(e) => out.push(Finding::problem(format!(
            "authentication: {}",
            describe(&e)
        ))),
    }
    out
}

fn describe(e: &LinkError) -> String {
    match e {
        LinkError::NotAuthenticated(m) if m.contains("refused our dialback key") => {
            format!("dialback refused: {m} (is this server running and reachable from the peer on port 5269?)")
        }
        other => other.to_string(),
    }
}
