//! Routing rules of RFC 6121 §8: where a stanza goes, given its `to`.
//!
//! Every stanza that reaches these functions has a `from` stamped by us (client
//! sessions) or checked by us (later: federation links).

use std::sync::Arc;

use confab_protocol::{ns, Element, StanzaErrorCondition as Cond};

use crate::jid::Addr;
use crate::modules::{self, presence, IqTarget};
use crate::router::SessionHandle;
use crate::server::Server;
use crate::stanza::{self, Kind};

impl Server {
    /// A stanza from a bound client session, `from` already stamped with its full JID.
    pub async fn handle_client_stanza(
        self: &Arc<Self>,
        session: &SessionHandle,
        mut stanza: Element,
    ) {
        let Some(kind) = stanza::kind(&stanza) else {
            return;
        };
        self.stats.stanza_in(kind);
        // An absent `to` means the account itself (RFC 6120 §10.3 / RFC 6121 §8.5.1 note).
        let to = match stanza.attr("to") {
            Some(t) => match Addr::parse(t) {
                Ok(a) => Some(a),
                Err(_) => {
                    self.send_error(&stanza, Cond::JidMalformed);
                    return;
                }
            },
            None => None,
        };
        if let Some(to) = &to {
            // Stanzas travel with prepared addresses.
            stanza.set_attr("to", to.to_string());
        }
        match kind {
            Kind::Presence => presence::outbound(self, session, stanza, to).await,
            Kind::Iq => {
                let own = match &to {
                    None => true,
                    Some(a) => a.is_bare() && a.bare() == session.bare,
                };
                let own_domain = to.as_ref().filter(|a| {
                    a.node.is_none() && a.resource.is_none() && self.is_local_domain(&a.domain)
                });
                if let Some(domain) = own_domain {
                    // Handled for the session itself, so session-bound requests (the
                    // legacy <session/> of RFC 3921, sent to the domain) know who asks.
                    let target = IqTarget::Server(domain.domain.clone());
                    self.handle_iq(stanza, target, Some(session)).await;
                } else if own {
                    self.handle_iq(
                        stanza,
                        IqTarget::Account(session.bare.clone()),
                        Some(session),
                    )
                    .await;
                } else {
                    self.route(stanza).await;
                }
            }
            Kind::Message => match to {
                // Parsed and prepared above: no second parse.
                Some(to) => self.route_to(kind, stanza, to).await,
                None => {
                    stanza.set_attr("to", session.bare.clone());
                    self.route(stanza).await;
                }
            },
        }
    }

    /// Routes a stanza with `from` and `to` set, from any origin. Boxed: presence
    /// handling routes further stanzas (probes, replies) from inside a route.
    pub fn route<'a>(
        self: &'a Arc<Self>,
        stanza: Element,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(self.route_inner(stanza))
    }

    async fn route_inner(self: &Arc<Self>, stanza: Element) {
        let Some(kind) = stanza::kind(&stanza) else {
            return;
        };
        let Some(to) = stanza.attr("to").and_then(|t| Addr::parse(t).ok()) else {
            self.send_error(&stanza, Cond::JidMalformed);
            return;
        };
        self.route_to(kind, stanza, to).await;
    }

    /// [`Server::route`] for a stanza of `kind` whose `to` is already parsed as `to`.
    async fn route_to(self: &Arc<Self>, kind: Kind, stanza: Element, to: Addr) {
        if !self.is_local_domain(&to.domain) {
            let remote = to.domain.clone();
            self.send_remote(&remote, stanza).await;
            return;
        }
        let Some(_) = &to.node else {
            self.to_server(kind, stanza, to).await;
            return;
        };
        let bare = to.bare();
        // An account with a bound resource exists; only others need the store.
        let exists = if self.router.has_resources(&bare) {
            Ok(true)
        } else {
            self.storage.account_exists(&bare).await
        };
        match exists {
            Ok(true) => {}
            Ok(false) => {
                // RFC 6121 §8.5.1: no such account.
                match kind {
                    Kind::Presence => {
                        if stanza::stanza_type(&stanza) == "subscribe" {
                            // §3.1.3: a subscription request to a non-existent user
                            // SHOULD be answered with unsubscribed.
                            if let Some(from) =
                                stanza.attr("from").and_then(|f| Addr::parse(f).ok())
                            {
                                let reply =
                                    stanza::presence(Some("unsubscribed"), &bare, &from.bare());
                                self.route(reply).await;
                            }
                        }
                    }
                    _ => self.send_error(&stanza, Cond::ServiceUnavailable),
                }
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "account lookup failed");
                self.send_error(&stanza, Cond::InternalServerError);
                return;
            }
        }
        match (kind, &to.resource) {
            (Kind::Message, None) => self.message_to_bare(&bare, stanza).await,
            (Kind::Message, Some(res)) => match self.router.resource(&bare, res) {
                Some(r) => {
                    r.handle.send(stanza);
                }
                None => match stanza::stanza_type(&stanza) {
                    // §8.5.3.2.1: treat as addressed to the bare JID.
                    "normal" | "chat" | "headline" => self.message_to_bare(&bare, stanza).await,
                    "error" => {}
                    _ => self.send_error(&stanza, Cond::ServiceUnavailable),
                },
            },
            (Kind::Presence, _) => {
                presence::inbound(self, &bare, to.resource.as_deref(), stanza).await
            }
            (Kind::Iq, None) => {
                self.handle_iq(stanza, IqTarget::Account(bare), None).await;
            }
            (Kind::Iq, Some(res)) => match self.router.resource(&bare, res) {
                Some(r) => {
                    r.handle.send(stanza);
                }
                None => self.send_error(&stanza, Cond::ServiceUnavailable),
            },
        }
    }

    async fn to_server(self: &Arc<Self>, kind: Kind, stanza: Element, to: Addr) {
        match kind {
            Kind::Iq => {
                if to.resource.is_some() {
                    self.send_error(&stanza, Cond::ServiceUnavailable);
                } else {
                    self.handle_iq(stanza, IqTarget::Server(to.domain), None)
                        .await;
                }
            }
            Kind::Message => {
                // RFC 6120 §10.4.1: a message to the domain itself is handled by the server or
                // answered with an error; no module handles messages yet.
                if !matches!(
                    stanza::stanza_type(&stanza),
                    "error" | "headline" | "groupchat"
                ) {
                    self.send_error(&stanza, Cond::ServiceUnavailable);
                }
            }
            Kind::Presence => {}
        }
    }

    /// RFC 6121 §8.5.2: a message to an existing local account's bare JID.
    async fn message_to_bare(self: &Arc<Self>, bare: &str, stanza: Element) {
        let ty = stanza::stanza_type(&stanza).to_string();
        let available: Vec<_> = self
            .router
            .resources(bare)
            .into_iter()
            .filter(|r| r.presence.available && r.presence.priority >= 0)
            .collect();
        match ty.as_str() {
            "normal" | "chat" => {
                if let Some(top) = available.iter().map(|r| r.presence.priority).max() {
                    // §8.5.2.1.1: the highest-priority resources; all of them on a tie.
                    for r in available.iter().filter(|r| r.presence.priority == top) {
                        r.handle.send(stanza.clone());
                    }
                } else {
                    modules::offline::store(self, bare, stanza).await;
                }
            }
            "headline" => {
                for r in &available {
                    r.handle.send(stanza.clone());
                }
            }
            "groupchat" => self.send_error(&stanza, Cond::ServiceUnavailable),
            // Errors for an unavailable account are dropped (never answer an error).
            _ => {
                if let Some(r) = available.iter().max_by_key(|r| r.presence.priority) {
                    r.handle.send(stanza);
                }
            }
        }
    }

    /// Sends the error reply for `stanza` back to its sender (if it is not an error itself).
    pub fn send_error(self: &Arc<Self>, stanza: &Element, condition: Cond) {
        if let Some(reply) = stanza::error_reply(stanza, condition) {
            self.deliver_reply(reply);
        }
    }

    pub fn send_error_text(self: &Arc<Self>, stanza: &Element, condition: Cond, text: &str) {
        if let Some(reply) = stanza::error_reply_text(stanza, condition, text) {
            self.deliver_reply(reply);
        }
    }

    /// Delivers a server-generated reply straight to a local full JID (no offline storage,
    /// no further error on failure: errors about errors would loop).
    pub fn deliver_reply(self: &Arc<Self>, reply: Element) {
        let Some(to) = reply.attr("to").and_then(|t| Addr::parse(t).ok()) else {
            return;
        };
        if !self.is_local_domain(&to.domain) {
            // A reply to a remote entity goes over its link; if that fails there is no
            // one to tell (errors about errors would loop).
            let local = reply
                .attr("from")
                .and_then(|f| Addr::parse(f).ok())
                .map(|a| a.domain)
                .filter(|d| self.is_local_domain(d));
            if let (Some(local), Some(fed)) = (local, self.federation.get()) {
                self.stats.element_out(&reply);
                let _ = fed.enqueue(&local, &to.domain, reply);
            }
            return;
        }
        match &to.resource {
            Some(res) => {
                if let Some(r) = self.router.resource(&to.bare(), res) {
                    r.handle.send(reply);
                }
            }
            None => {
                for r in self.router.resources(&to.bare()) {
                    if r.presence.available {
                        r.handle.send(reply.clone());
                    }
                }
            }
        }
    }

    /// Dispatches an iq addressed to the server or to an account (handled on its behalf).
    pub async fn handle_iq(
        self: &Arc<Self>,
        stanza: Element,
        target: IqTarget,
        session: Option<&SessionHandle>,
    ) {
        let ty = stanza.attr("type").unwrap_or("");
        if ty == "result" || ty == "error" {
            return;
        }
        if ty != "get" && ty != "set" || stanza.attr("id").is_none() {
            self.send_error(&stanza, Cond::BadRequest);
            return;
        }
        // RFC 6120 §8.2.3: get/set carry exactly one payload element.
        let mut payloads = stanza.children();
        let (Some(payload), None) = (payloads.next(), payloads.next()) else {
            self.send_error(&stanza, Cond::BadRequest);
            return;
        };
        let Some(handler) = self.modules.iq_handler(payload.name(), payload.ns()) else {
            self.send_error(&stanza, Cond::ServiceUnavailable);
            return;
        };
        let req = modules::IqRequest {
            server: self,
            stanza: &stanza,
            payload,
            set: ty == "set",
            target: &target,
            session,
        };
        let reply = match handler.handle(req).await {
            Ok(payload) => stanza::iq_result(&stanza, payload),
            Err(e) => match confab_protocol::error::error_reply(&stanza, &e) {
                Some(r) => r,
                None => return,
            },
        };
        match session {
            Some(s) if stanza.attr("from").is_none() || reply.attr("to") == Some(&s.full_jid()) => {
                s.send(reply);
            }
            _ => self.deliver_reply(reply),
        }
    }
}

/// Whether an element is a stanza in the client namespace.
pub fn is_stanza(e: &Element) -> bool {
    e.ns() == ns::CLIENT && matches!(e.name(), "message" | "presence" | "iq")
}
