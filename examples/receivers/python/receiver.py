"""A webhook receiver for outbox-relay in plain Python: verify, deduplicate, answer fast.

    pip install -r requirements.txt
    WEBHOOK_SECRET=whsec_... PORT=8000 python receiver.py

Each request is verified with the `standardwebhooks` package (Standard Webhooks: headers
webhook-id, webhook-timestamp, webhook-signature; secret whsec_...). A request that does not
verify gets 401 (400 when the headers are missing) and is not processed. The relay delivers
at least once: after a relay crash, an expired lease or an operator's replay, the same event
comes again with the same webhook-id (its event_id). So the receiver records each
webhook-id it processed under a UNIQUE constraint, in the same SQLite transaction as the
event's work; a second request with that id is answered 2xx (so the relay stops sending
it) and not processed again. Keep seen ids durably like this (a unique constraint in your
own database), not in memory: a restarted receiver must still know them.

Answer fast: the relay waits for the answer (15 s timeout by default) and counts the
request against the subscription's max_in_flight meanwhile. The work done here is a row in
`inbox`; do slow work from that table (or a queue) after answering.

Environment: WEBHOOK_SECRET (required), PORT (default 8000; 0 = any free port), HOST
(default 127.0.0.1), RECEIVER_DB (SQLite file, default received-webhooks.sqlite3).
Prints one line per request: processed / duplicate / refused.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

MAX_BODY = 2 * 1024 * 1024  # the relay's payload limit is 1 MiB by default, plus the envelope
REQUIRED_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def log(line: str) -> None:
    print(line, flush=True)


class Store:
    """Seen webhook-ids and the events' work, in one SQLite transaction per event."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.lock = threading.Lock()  # one writer at a time on this connection
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS processed_webhooks (
                webhook_id  TEXT PRIMARY KEY,          -- the dedupe: unique per event
                received_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
            );
            CREATE TABLE IF NOT EXISTS inbox (          -- the work: drained after answering
                webhook_id TEXT PRIMARY KEY REFERENCES processed_webhooks,
                event_type TEXT NOT NULL,
                body       TEXT NOT NULL
            );
            """
        )

    def process_once(self, webhook_id: str, event: dict, body: bytes) -> bool:
        """Record and do the work for this event; False if it was processed before."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                seen = self.db.execute(
                    "INSERT INTO processed_webhooks (webhook_id) VALUES (?) "
                    "ON CONFLICT (webhook_id) DO NOTHING",
                    (webhook_id,),
                ).rowcount == 0
                if not seen:
                    self.db.execute(
                        "INSERT INTO inbox (webhook_id, event_type, body) VALUES (?, ?, ?)",
                        (webhook_id, event.get("event_type", ""), body.decode()),
                    )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return not seen


def make_handler(webhook: Webhook, store: Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the relay reuses its connections

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("content-length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self.close_connection = True  # the body stays unread: drop the connection
                return self.answer(413 if length > MAX_BODY else 400)
            body = self.rfile.read(length)
            if self.path.split("?", 1)[0] != "/webhooks":
                return self.answer(404)
            headers = {name.lower(): value for name, value in self.headers.items()}
            webhook_id = headers.get("webhook-id", "-")

            if not all(headers.get(name) for name in REQUIRED_HEADERS):
                log(f"refused 400 {webhook_id} missing webhook headers")
                return self.answer(400)
            # Verify before anything else, the dedupe included: a forged request carrying a
            # real event's id must not mark that event as processed.
            try:
                event = webhook.verify(body, headers)
            except (WebhookVerificationError, ValueError) as error:
                # ValueError: a malformed signature, bad base64, a body that is not UTF-8
                # or not JSON. All are the sender's fault: 401, not 500.
                log(f"refused 401 {webhook_id} {error}")
                return self.answer(401)

            if store.process_once(webhook_id, event, body):
                log(f"processed {webhook_id} {event.get('event_type')}")
            else:
                log(f"duplicate {webhook_id} {event.get('event_type')}")
            self.answer(204)  # any 2xx acknowledges, duplicates included

        def answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:  # one line per request is printed above
            pass

    return Handler


def main() -> int:
    secret = os.environ.get("WEBHOOK_SECRET")
    if not secret:
        print("set WEBHOOK_SECRET to the subscription's whsec_... secret", file=sys.stderr)
        return 2
    webhook = Webhook(secret)
    store = Store(os.environ.get("RECEIVER_DB", "received-webhooks.sqlite3"))
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer((host, port), make_handler(webhook, store))
    bound_host, bound_port = server.server_address[:2]
    log(f"listening on http://{bound_host}:{bound_port}/webhooks")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
