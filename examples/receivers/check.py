"""Checks the example receivers against a real relay. Run by examples/check:

    python check.py --relay target/debug/outbox-relay --database-url postgres://…/fresh_db \
        --python venv/bin/python --node node

On a fresh, empty database: `outbox-relay migrate`; start each receiver on a free loopback
port; subscribe each (`outbox-relay subscription add`, secret chosen here); start
`outbox-relay run`; then, for each receiver:

- forged requests (another key, a changed body, a stale timestamp, a malformed or missing
  signature) are refused with 400/401 and processed never, even when they carry the id of
  an event that arrives for real later;
- events published with psql (committed ones, and one in a transaction that rolls back)
  are each processed exactly once, with the payload that was published; the rolled-back
  one never;
- a duplicate webhook-id is answered 2xx and not processed again: once re-sent by the relay
  (`outbox-relay replay --status delivered`, which re-sends with the same webhook-id, as
  SPEC.md says), once sent by hand, signed with the right secret.

Prints one line per check ("ok …" or "FAIL …") and exits non-zero if any failed. Only the
standard library: the signatures of the hand-made requests are computed here from the
formula in SPEC.md, not with the library the receivers use.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEADLINE = 30.0  # seconds for something to happen; a deadline, never a pause relied on


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


class Process:
    """A child process whose stdout lines are collected as they come."""

    def __init__(self, name: str, argv: list[str], env: dict, cwd: Path | None = None) -> None:
        self.name = name
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, what: str, predicate) -> None:
        deadline = time.monotonic() + DEADLINE
        with self.changed:
            while not predicate(self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not predicate(self.lines)):
                    raise Failure(f"{self.name}: {what}: not within {DEADLINE:.0f}s", self.output())
                self.changed.wait(min(left, 0.5))

    def output(self, last: int = 60) -> str:
        with self.changed:
            return "\n".join(self.lines[-last:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Failure(Exception):
    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class Receiver(Process):
    def __init__(self, name: str, argv: list[str], env: dict, cwd: Path) -> None:
        self.secret = new_secret()
        super().__init__(name, argv, {**env, "PORT": "0", "WEBHOOK_SECRET": self.secret}, cwd)
        self.wait_for("print its address", lambda lines: any(l.startswith("listening on ") for l in lines))
        first = next(l for l in self.lines if l.startswith("listening on "))
        self.url = first.removeprefix("listening on ").strip()

    def events(self, kind: str) -> list[tuple[str, str]]:
        """(webhook_id, event_type) of every 'processed' or 'duplicate' line so far."""
        with self.changed:
            return [
                (parts[1], parts[2])
                for parts in (line.split() for line in self.lines)
                if len(parts) >= 3 and parts[0] == kind
            ]

    def post(self, body: bytes, headers: dict) -> int:
        request = urllib.request.Request(
            self.url, data=body, method="POST",
            headers={"content-type": "application/json", **headers},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def run(self, description: str, check) -> None:
        try:
            note = check()
        except Failure as failure:
            self.failed += 1
            print(f"FAIL  {description}: {failure}", flush=True)
            if failure.detail:
                print("      " + failure.detail.replace("\n", "\n      "), flush=True)
        except AssertionError as failure:
            self.failed += 1
            print(f"FAIL  {description}: {failure}", flush=True)
        else:
            self.passed += 1
            print(f"ok    {description}{f' ({note})' if note else ''}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relay", required=True, help="the outbox-relay binary")
    parser.add_argument("--database-url", required=True, help="a fresh, empty database")
    parser.add_argument("--python", default=sys.executable, help="Python with requirements.txt")
    parser.add_argument("--node", default="node", help="Node.js, with npm ci done in node/")
    parser.add_argument("--only", choices=["python", "node"], help="check one receiver")
    args = parser.parse_args()

    env = {
        **os.environ,
        "DATABASE_URL": args.database_url,
        "OUTBOX_HTTP_ADDR": "127.0.0.1:0",
        "OUTBOX_ALLOW_PRIVATE_TARGETS": "127.0.0.1/32",  # the receivers are on loopback
        "NO_COLOR": "1",
    }

    def relay_cli(*argv: str) -> str:
        done = subprocess.run([args.relay, *argv], env=env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise Failure(f"outbox-relay {' '.join(argv)} exited {done.returncode}", done.stderr)
        return done.stdout

    def psql(sql: str) -> list[str]:
        done = subprocess.run(
            ["psql", args.database_url, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            raise Failure("psql failed", done.stderr)
        return [line for line in done.stdout.splitlines() if line]

    checks = Checks()
    receivers: list[Receiver] = []
    relay: Process | None = None
    try:
        relay_cli("migrate")
        workdir = Path(tempfile.mkdtemp(prefix="outbox-receivers-"))
        if args.only in (None, "python"):
            receivers.append(Receiver(
                "python", [args.python, str(HERE / "python" / "receiver.py")],
                {**env, "RECEIVER_DB": str(workdir / "python-receiver.sqlite3")}, workdir,
            ))  # fmt: skip
        if args.only in (None, "node"):
            receivers.append(Receiver("node", [args.node, str(HERE / "node" / "receiver.js")], env, HERE / "node"))
        for receiver in receivers:
            relay_cli(
                "subscription", "add", f"{receiver.name}-receiver", "--url", receiver.url,
                "--secret", receiver.secret, "--retry-schedule", "1s,1s,1s",
            )  # fmt: skip
        relay = Process("relay", [args.relay, "run"], env)

        # Forged requests first, with the id of an event that is published only later: a
        # receiver that recorded ids before verifying them would drop that real event.
        later_id = str(uuid.uuid4())
        for receiver in receivers:
            checks.run(f"{receiver.name}: forged requests refused with 400/401", lambda r=receiver: forged(r, later_id))

        ids = psql(
            # Three events in one transaction, one with its own event_id (SPEC: a producer
            # may set it) and a tenant; then one in a transaction that rolls back.
            f"""BEGIN;
            SELECT outbox.publish('lead.created', '{{"lead_id": 1, "email": "ada@example.com"}}',
                                  ordering_key => 'lead:1');
            SELECT outbox.publish('lead.qualified', '{{"lead_id": 1, "score": 0.9}}', ordering_key => 'lead:1');
            INSERT INTO outbox.events (event_id, event_type, payload, tenant_id)
                 VALUES ('{later_id}', 'invoice.paid', '{{"invoice_id": 7}}', 'acme') RETURNING event_id;
            COMMIT;"""
        )
        rolled_back = psql(
            """BEGIN; SELECT outbox.publish('lead.rolled_back', '{"lead_id": 2}'); ROLLBACK;"""
        )
        published = {ids[0]: "lead.created", ids[1]: "lead.qualified", ids[2]: "invoice.paid"}
        # A marker after the rollback: once it is processed and nothing is left open, the
        # rolled-back event, had it committed, would have arrived too.
        marker = psql("SELECT outbox.publish('check.marker', '{}')")[0]
        published[marker] = "check.marker"

        for receiver in receivers:
            checks.run(
                f"{receiver.name}: {len(published)} committed events processed exactly once, rolled-back one never",
                lambda r=receiver: exactly_once(r, published, rolled_back, psql, relay),
            )  # fmt: skip
        replayed = ids[0]
        out = relay_cli("replay", "--status", "delivered", "--event-id", replayed, "--reason", "examples/check: duplicate")
        for receiver in receivers:
            checks.run(
                f"{receiver.name}: relay replay (same webhook-id) answered 2xx, not processed again",
                lambda r=receiver: replay_not_reprocessed(r, replayed, psql, relay, out),
            )  # fmt: skip
            checks.run(
                f"{receiver.name}: duplicate webhook-id sent by hand answered 2xx, not processed again",
                lambda r=receiver: hand_duplicate(r, ids[1]),
            )  # fmt: skip
    except Failure as failure:
        checks.failed += 1
        print(f"FAIL  setting up: {failure}\n{failure.detail}", flush=True)
    finally:
        for process in [relay, *receivers]:
            if process:
                process.stop()
    if checks.failed and relay:
        print("relay log (last lines):\n" + relay.output(), flush=True)
    print(f"receivers: {checks.passed} passed, {checks.failed} failed", flush=True)
    return 1 if checks.failed else 0


def forged(receiver: Receiver, webhook_id: str) -> str:
    body = json.dumps({"event_id": webhook_id, "event_type": "invoice.paid", "data": {"forged": True}}).encode()
    now = int(time.time())
    good = {"webhook-id": webhook_id, "webhook-timestamp": str(now)}
    cases = {
        "signed with another secret": (body, {**good, "webhook-signature": sign(new_secret(), webhook_id, now, body)}),
        "body changed after signing": (
            body.replace(b"true", b"false"),
            {**good, "webhook-signature": sign(receiver.secret, webhook_id, now, body)},
        ),
        "timestamp 10 minutes old": (
            body,
            {**good, "webhook-timestamp": str(now - 600), "webhook-signature": sign(receiver.secret, webhook_id, now - 600, body)},
        ),
        "malformed signature": (body, {**good, "webhook-signature": "v1,not-base64!! garbage"}),
        "no signature header": (body, good),
    }
    for case, (data, headers) in cases.items():
        status = receiver.post(data, headers)
        assert status in (400, 401), f"{case}: answered {status}, expected 400 or 401"
    receiver.wait_for(
        f"log {len(cases)} refusals", lambda lines: sum(l.startswith("refused ") for l in lines) >= len(cases)
    )
    assert not receiver.events("processed"), f"processed a forged request: {receiver.events('processed')}"
    return f"{len(cases)} kinds"


def exactly_once(receiver: Receiver, published: dict, rolled_back: list, psql, relay: Process) -> None:
    receiver.wait_for(
        "process every committed event",
        lambda lines: set(published) <= {i for i, _ in receiver.events("processed")},
    )
    wait_until(f"{receiver.name}: every delivery recorded as delivered", lambda: open_deliveries(psql, receiver) == 0, relay)
    got = receiver.events("processed")
    ids = [i for i, _ in got]
    assert sorted(ids) == sorted(published), f"processed {got}, published {published}"
    assert dict(got) == published, f"event types differ: processed {got}, published {published}"
    assert not receiver.events("duplicate"), f"duplicates without a crash: {receiver.events('duplicate')}"
    assert "lead.rolled_back" not in {t for _, t in got}, f"rolled-back event processed ({rolled_back})"


def replay_not_reprocessed(receiver: Receiver, replayed: str, psql, relay: Process, replay_output: str) -> str:
    # Wait for the re-sent request to be seen: as a duplicate (right), or processed again.
    receiver.wait_for(
        f"receive the replayed {replayed}",
        lambda lines: (replayed, "lead.created") in receiver.events("duplicate") or times_processed(receiver, replayed) > 1,
    )
    assert times_processed(receiver, replayed) == 1, f"processed {replayed} {times_processed(receiver, replayed)} times"
    name = f"{receiver.name}-receiver"
    wait_until(f"{name}: the replayed delivery recorded", lambda: open_deliveries(psql, receiver) == 0, relay)
    # The relay's own record: the replay's attempt got a 2xx.
    codes = psql(
        f"""SELECT a.status_code FROM outbox.delivery_attempts a
              JOIN outbox.deliveries d ON d.id = a.delivery_id
              JOIN outbox.subscriptions s ON s.id = d.subscription_id
              JOIN outbox.events e ON e.id = d.event_id
             WHERE s.name = '{name}' AND e.event_id = '{replayed}' AND a.replay_id IS NOT NULL"""
    )
    assert codes and all(200 <= int(c) < 300 for c in codes), f"replayed attempts answered {codes}"
    assert times_processed(receiver, replayed) == 1, f"processed {replayed} {times_processed(receiver, replayed)} times"
    return f"replay: {replay_output.strip().splitlines()[0] if replay_output.strip() else 'done'}"


def hand_duplicate(receiver: Receiver, webhook_id: str) -> None:
    body = json.dumps({"event_id": webhook_id, "event_type": "lead.qualified", "data": {"lead_id": 1}}).encode()
    now = int(time.time())
    before = len(receiver.events("duplicate"))
    status = receiver.post(body, {
        "webhook-id": webhook_id, "webhook-timestamp": str(now),
        "webhook-signature": sign(receiver.secret, webhook_id, now, body),
    })  # fmt: skip
    assert 200 <= status < 300, f"answered {status} to a duplicate; the relay would retry it"
    receiver.wait_for(
        "log the duplicate",
        lambda lines: len(receiver.events("duplicate")) > before or times_processed(receiver, webhook_id) > 1,
    )
    assert times_processed(receiver, webhook_id) == 1, f"processed {webhook_id} {times_processed(receiver, webhook_id)} times"


def times_processed(receiver: Receiver, webhook_id: str) -> int:
    return [i for i, _ in receiver.events("processed")].count(webhook_id)


def open_deliveries(psql, receiver: Receiver) -> int:
    return int(psql(
        f"""SELECT count(*) FROM outbox.deliveries d JOIN outbox.subscriptions s ON s.id = d.subscription_id
             WHERE s.name = '{receiver.name}-receiver' AND d.status <> 'delivered'"""
    )[0])  # fmt: skip


def wait_until(what: str, condition, relay: Process) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise Failure(f"{what}: not within {DEADLINE:.0f}s", relay.output())
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
