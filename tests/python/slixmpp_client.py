#!/usr/bin/env python3
"""A third-party client (slixmpp) against confab, driven by tests/tests/slixmpp.rs.

Connects to --host:--port with STARTTLS (trusting only --ca, checking the certificate
against the JID's domain), authenticates with SCRAM, fetches the roster, sends initial
presence, adds --contact to the roster, sends --body to --to as a chat message and waits
for a reply. Every step is printed as one JSON object per line on stdout; the exit
status is 0 only when every step succeeded before --timeout.
"""

import argparse
import asyncio
import json
import logging
import sys

try:
    import slixmpp
except ImportError as e:  # the Rust test turns this into a clear failure
    print(json.dumps({"event": "error", "error": f"slixmpp is not installed: {e}"}), flush=True)
    sys.exit(3)


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


class Client(slixmpp.ClientXMPP):
    def __init__(self, args):
        super().__init__(args.jid, args.password)
        self.args = args
        self.ca_certs = args.ca
        self.outcome = asyncio.get_event_loop().create_future()
        self.reply = asyncio.get_event_loop().create_future()
        # Stock slixmpp by default: every mechanism it knows, in its own order.
        mechanisms = self["feature_mechanisms"]
        if args.mechs:
            mechanisms.use_mechs = set(args.mechs.split(","))
        if args.no_channel_binding:
            # slixmpp 1.8 knows only tls-unique, which TLS 1.3 does not define (RFC 9266),
            # yet offers its data whenever TLS is up; with a non-PLUS mechanism that makes
            # it send the gs2 flag "y", which a server offering -PLUS must refuse as a
            # downgrade (RFC 5802 §6). Say "n" (no channel binding support) instead.
            default = mechanisms._default_credentials

            def credentials(required, optional):
                values = default(required, optional)
                values["channel_binding"] = None
                return values

            mechanisms.sasl_callback = credentials
        self.add_event_handler("session_start", self.on_session_start)
        self.add_event_handler("message", self.on_message)
        # slixmpp goes on to its next mechanism after a failure; only the end of its
        # list is the end of the login.
        self.add_event_handler("failed_auth", self.on_failed_auth)
        self.add_event_handler("failed_all_auth", lambda _: self.fail("authentication failed"))
        self.add_event_handler("ssl_invalid_chain", lambda e: self.fail(f"invalid certificate chain: {e}"))
        self.add_event_handler("connection_failed", lambda e: self.fail(f"connection failed: {e}"))
        self.add_event_handler("disconnected", lambda _: self.fail("disconnected"))

    def fail(self, why):
        if not self.outcome.done():
            self.outcome.set_exception(RuntimeError(why))

    def on_failed_auth(self, failure):
        mech = getattr(self["feature_mechanisms"].mech, "name", None)
        emit("failed_auth", mechanism=mech, condition=failure["condition"], text=failure["text"])

    def on_message(self, msg):
        if msg["type"] in ("chat", "normal") and not self.reply.done():
            self.reply.set_result(msg)

    async def on_session_start(self, _event):
        try:
            mech = getattr(self["feature_mechanisms"].mech, "name", None)
            emit("session_start", jid=str(self.boundjid), mechanism=mech, tls=self.is_connected())
            roster = await self.get_roster()
            items = [str(j) for j in roster["roster"]["items"].keys()] if roster else []
            emit("roster", items=sorted(items))
            self.send_presence(pstatus="slixmpp here")
            emit("presence_sent")
            await self.update_roster(self.args.contact, name="Added by slixmpp", groups=["Interop"])
            emit("roster_added", jid=self.args.contact)
            self.send_message(mto=self.args.to, mbody=self.args.body, mtype="chat")
            emit("message_sent", to=self.args.to, body=self.args.body)
            reply = await self.reply
            emit("reply", **{"from": str(reply["from"]), "body": reply["body"], "type": reply["type"]})
            if not self.outcome.done():
                self.outcome.set_result(True)
        except Exception as e:  # noqa: BLE001 - reported, then non-zero exit
            self.fail(f"{type(e).__name__}: {e}")


async def main(args):
    xmpp = Client(args)
    xmpp.connect((args.host, args.port), use_ssl=False, force_starttls=True, disable_starttls=False)
    try:
        await asyncio.wait_for(asyncio.shield(xmpp.outcome), args.timeout)
    except asyncio.TimeoutError:
        emit("error", error=f"timed out after {args.timeout}s")
        return 2
    except Exception as e:  # noqa: BLE001
        emit("error", error=str(e))
        return 1
    # A clean end of stream; the server answers with its own </stream:stream>.
    await xmpp.disconnect()
    emit("done")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--jid", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--ca", required=True, help="PEM file of the CA to trust")
    p.add_argument("--to", required=True)
    p.add_argument("--contact", required=True)
    p.add_argument("--body", required=True)
    p.add_argument("--mechs", help="comma-separated mechanisms to allow (default: slixmpp's own)")
    p.add_argument("--no-channel-binding", action="store_true")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--debug", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.DEBUG if a.debug else logging.ERROR, stream=sys.stderr)
    sys.exit(asyncio.run(main(a)))
