"""End-to-end tests of the example: Django's test client → the views → outbox.events →
a REAL outbox-relay process → a real HTTP receiver in this process, which verifies every
request with the `standardwebhooks` package.

What they need: PostgreSQL (DATABASE_URL; Django creates and drops the test database
`test_<NAME>` on that server) and the relay binary (OUTBOX_RELAY_BIN, default
target/debug/outbox-relay: `cargo build --locked --bin outbox-relay`). Missing either is a
failure, not a skip. `examples/check` runs them: `python manage.py test leads`.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import tempfile
import threading
import time
import uuid
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

from django.db import IntegrityError, connection, transaction
from django.test import Client, TransactionTestCase
from django.utils import timezone
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from outbox import PublishOutsideTransaction, publish

from .models import Lead

REPO = Path(__file__).resolve().parents[3]
RELAY_BIN = Path(os.environ.get("OUTBOX_RELAY_BIN", REPO / "target" / "debug" / "outbox-relay"))
SUBSCRIPTION = "django-example-test"
WAIT_SECONDS = 30  # a deadline for things to arrive, never a pause the test relies on


class Receiver:
    """A webhook endpoint on 127.0.0.1: verifies each request with standardwebhooks, answers
    401 to one that does not verify and 204 to one that does, and keeps the verified ones."""

    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)
        self.accepted: list[dict] = []  # {"webhook_id", "headers", "raw", "body"}
        self.refused = 0
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    body = receiver.webhook.verify(raw, headers)
                except (WebhookVerificationError, ValueError):
                    with receiver.changed:
                        receiver.refused += 1
                        receiver.changed.notify_all()
                    self.send_response(401)
                    self.end_headers()
                    return
                with receiver.changed:
                    receiver.accepted.append(
                        {"webhook_id": headers["webhook-id"], "headers": headers, "raw": raw,
                         "body": body}
                    )
                    receiver.changed.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:  # keep the test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/webhooks/outbox"

    def wait_for(self, what: str, predicate, relay: "Relay"):
        """The first accepted request that satisfies predicate, once it has arrived."""
        deadline = time.monotonic() + WAIT_SECONDS
        with self.changed:
            while True:
                for request in self.accepted:
                    if predicate(request):
                        return request
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{what} did not arrive within {WAIT_SECONDS}s; accepted "
                        f"{[r['body'].get('event_type') for r in self.accepted]}, refused "
                        f"{self.refused}; relay log:\n{relay.log_tail()}"
                    )
                self.changed.wait(left)

    def requests_with_id(self, webhook_id: str) -> list[dict]:
        with self.changed:
            return [r for r in self.accepted if r["webhook_id"] == webhook_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Relay:
    """The outbox-relay binary against the test database: CLI commands and `run`."""

    def __init__(self, database_url: str) -> None:
        if not RELAY_BIN.is_file():
            raise RuntimeError(
                f"no relay binary at {RELAY_BIN}: build it with "
                "`cargo build --locked --bin outbox-relay` or set OUTBOX_RELAY_BIN"
            )
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "OUTBOX_HTTP_ADDR": "127.0.0.1:0",
            # The receiver is on loopback, which the relay refuses unless allowed.
            "OUTBOX_ALLOW_PRIVATE_TARGETS": "127.0.0.1/32",
            "OUTBOX_LOG_FORMAT": "text",
            "NO_COLOR": "1",
        }
        self.log = tempfile.NamedTemporaryFile(prefix="outbox-relay-django-", suffix=".log")
        self.process: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [str(RELAY_BIN), *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"outbox-relay {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(RELAY_BIN), "run"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: the relay finishes in-flight work and exits 0
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as log:
            return "".join(log.readlines()[-lines:])


def database_url() -> str:
    """The URL of the database Django's test runner created (test_<NAME>)."""
    s = connection.settings_dict
    auth = quote(s["USER"] or "postgres", safe="")
    if s["PASSWORD"]:
        auth += ":" + quote(s["PASSWORD"], safe="")
    return f"postgres://{auth}@{s['HOST'] or 'localhost'}:{s['PORT'] or 5432}/{quote(s['NAME'])}"


def outbox_rows_where(sql: str, params: list) -> int:
    with connection.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM outbox.events WHERE {sql}", params)
        return cur.fetchone()[0]


# TransactionTestCase, not TestCase: TestCase runs each test inside a transaction that is
# rolled back at the end and never commits, so the relay (another process, reading only
# committed rows) would never see an event, and publish() would always find itself inside
# an atomic block. TransactionTestCase lets each view's transaction.atomic() really commit
# (and really roll back), as in production, and empties the Django tables after each test.
class OutboxEndToEndTests(TransactionTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.relay = Relay(database_url())
        # The outbox schema lives in the same database as the Django tables. The relay owns
        # it: `outbox-relay migrate`, as in production (idempotent).
        cls.relay.cli("migrate")
        cls.secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        cls.receiver = Receiver(cls.secret)
        cls.relay.cli(
            "subscription", "add", SUBSCRIPTION,
            "--url", cls.receiver.url,
            "--event-type", "lead.*",
            "--secret", cls.secret,
            "--retry-schedule", "1s,1s,1s",
        )  # fmt: skip
        cls.relay.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.relay.stop()  # before Django drops the test database, which it is connected to
        cls.receiver.close()
        super().tearDownClass()

    def wait_for_event(self, what: str, predicate) -> dict:
        return self.receiver.wait_for(what, predicate, self.relay)

    def test_committed_view_delivers_lead_created_signed(self) -> None:
        response = Client().post(
            "/leads/", {"email": "ada@example.com", "tenant": "acme"}, HTTP_X_REQUEST_ID="req-42"
        )
        self.assertEqual(response.status_code, 201, response.content)
        lead_id, event_id = response.json()["lead_id"], response.json()["event_id"]
        self.assertTrue(Lead.objects.filter(id=lead_id, email="ada@example.com").exists())

        request = self.wait_for_event(
            "lead.created for lead %s" % lead_id, lambda r: r["webhook_id"] == event_id
        )
        # The receiver accepted it, so it verified; check the signature here too, on the
        # bytes as sent, so this test does not rest on the receiver alone.
        self.assertEqual(request["headers"]["webhook-id"], event_id)
        Webhook(self.secret).verify(request["raw"], request["headers"])
        with self.assertRaises(WebhookVerificationError):
            Webhook(self.secret).verify(request["raw"].replace(b"ada@", b"eve@"), request["headers"])
        body = request["body"]
        self.assertEqual(body["event_id"], event_id)
        self.assertEqual(body["event_type"], "lead.created")
        self.assertEqual(body["tenant_id"], "acme")
        self.assertEqual(body["source_service"], "django-crm")
        self.assertEqual(body["ordering_key"], f"lead:{lead_id}")
        self.assertEqual(body["data"]["lead_id"], lead_id)
        self.assertEqual(body["data"]["email"], "ada@example.com")
        self.assertEqual(body["metadata"], {"correlation_id": "req-42"})

    def test_rolled_back_view_publishes_nothing(self) -> None:
        client = Client(raise_request_exception=False)
        with self.assertLogs("django.request", "ERROR"):  # the 500's traceback, kept quiet
            response = client.post("/leads/create-then-fail/", {"email": "rollback@example.com"})
        self.assertEqual(response.status_code, 500)
        self.assertFalse(Lead.objects.filter(email="rollback@example.com").exists())
        self.assertEqual(outbox_rows_where("payload->>'email' = %s", ["rollback@example.com"]), 0)

        # A marker committed after the failed request. Once it has arrived and the
        # subscription has no delivery left open, everything committed before the marker has
        # been delivered: had the rolled-back event been committed, the receiver would have
        # it by now (it keeps a request before answering 204, and the relay marks a delivery
        # delivered only after the 204).
        marker = client.post("/leads/", {"email": "marker@example.com"})
        self.assertEqual(marker.status_code, 201, marker.content)
        self.wait_for_event(
            "the marker lead.created", lambda r: r["webhook_id"] == marker.json()["event_id"]
        )
        self.wait_until("no open delivery left", lambda: self.open_deliveries() == 0)
        emails = [r["body"]["data"].get("email") for r in self.receiver.accepted]
        self.assertNotIn("rollback@example.com", emails)

    def test_publish_outside_a_transaction_is_refused(self) -> None:
        # No atomic block here: Django is in autocommit mode, as in a view without
        # ATOMIC_REQUESTS, a management command or a Celery task.
        probe = str(uuid.uuid4())
        with self.assertRaises(PublishOutsideTransaction):
            publish("lead.created", {"probe": probe})
        self.assertEqual(outbox_rows_where("payload->>'probe' = %s", [probe]), 0)

        # …unless the caller says the event stands alone.
        event_id = publish("lead.pinged", {"probe": probe}, allow_outside_transaction=True)
        self.wait_for_event("the standalone lead.pinged", lambda r: r["webhook_id"] == str(event_id))

    def test_helper_writes_every_column_it_is_given(self) -> None:
        event_id = uuid.uuid4()
        with transaction.atomic():
            returned = publish(
                "lead.qualified",
                {"lead_id": 7, "score": Decimal("0.75"), "qualified_at": timezone.now()},
                tenant="globex",
                ordering_key="lead:7",
                metadata={"correlation_id": "req-7", "user_id": 3},
                source_service="scoring",
                target_services=[SUBSCRIPTION],
                deliver_after=timezone.now(),
                priority=5,
                event_id=event_id,
            )
        self.assertEqual(returned, event_id)
        body = self.wait_for_event(
            "lead.qualified", lambda r: r["webhook_id"] == str(event_id)
        )["body"]
        self.assertEqual(body["event_type"], "lead.qualified")
        self.assertEqual(body["tenant_id"], "globex")
        self.assertEqual(body["source_service"], "scoring")
        self.assertEqual(body["ordering_key"], "lead:7")
        self.assertEqual(body["metadata"], {"correlation_id": "req-7", "user_id": 3})
        self.assertEqual(body["data"]["score"], "0.75")  # DjangoJSONEncoder: Decimal → str
        with connection.cursor() as cur:
            cur.execute(
                "SELECT priority, target_services FROM outbox.events WHERE event_id = %s",
                [event_id],
            )
            self.assertEqual(cur.fetchone(), (5, [SUBSCRIPTION]))

        # The same event_id twice is refused: a retried publish cannot send an event twice.
        with self.assertRaises(IntegrityError), transaction.atomic():
            publish("lead.qualified", {"lead_id": 7}, event_id=event_id)

    def wait_until(self, what: str, condition) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {WAIT_SECONDS}s\n{self.relay.log_tail()}")
            time.sleep(0.05)

    def open_deliveries(self) -> int:
        with connection.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM outbox.deliveries d "
                "JOIN outbox.subscriptions s ON s.id = d.subscription_id "
                "WHERE s.name = %s AND d.status <> 'delivered'",
                [SUBSCRIPTION],
            )
            return cur.fetchone()[0]
