"""Publish outbox-relay events from Django, in the transaction that changes your data.

Copy this file into your project. It needs nothing beyond Django and a PostgreSQL driver
(psycopg 3 or psycopg2): it inserts one row into `outbox.events` with raw SQL through
Django's own connection, so the event commits or rolls back with your models.

    from django.db import transaction
    from outbox import publish

    with transaction.atomic():
        lead = Lead.objects.create(email=email, tenant=tenant)
        publish("lead.created", {"lead_id": lead.id, "email": lead.email},
                tenant=tenant, ordering_key=f"lead:{lead.id}")

Outside a transaction `publish` raises `PublishOutsideTransaction` instead of inserting.
In autocommit mode the event would commit on its own, apart from the change it announces:
if the change then fails, subscribers hear of something that never happened; if the
process dies between the two, the change stays without its event. Either way the outbox's
guarantee (the event exactly when the change commits) is gone. Call it inside
`transaction.atomic()` (or a view under ATOMIC_REQUESTS). For an event that announces
nothing else in the database, pass `allow_outside_transaction=True`.

The arguments are the columns of `outbox.events` (see SPEC.md); those not given keep the
table's defaults. Bad values (an event type with spaces, a payload over the size limit,
metadata that is not an object) fail at insert, inside your transaction, with the
constraint's name, so the whole transaction fails loudly rather than losing the event later.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DEFAULT_DB_ALIAS, connections

__all__ = ["publish", "OutboxError", "PublishOutsideTransaction"]


class OutboxError(RuntimeError):
    """The event was not published."""


class PublishOutsideTransaction(OutboxError):
    """publish() was called in autocommit mode, where the event would commit on its own."""


def publish(
    event_type: str,
    data: Any,
    *,
    tenant: str | None = None,
    ordering_key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    source_service: str | None = None,
    target_services: Iterable[str] | None = None,
    deliver_after: datetime | None = None,
    priority: int | None = None,
    event_id: uuid.UUID | str | None = None,
    using: str = DEFAULT_DB_ALIAS,
    allow_outside_transaction: bool = False,
) -> uuid.UUID:
    """Insert one event into outbox.events on the `using` connection; return its event_id.

    event_type      `outbox.events.event_type`, e.g. "lead.created" (letters, digits, `._:-`)
    data            the payload (`payload`, the webhook's `data`): anything JSON-serialisable
                    by Django's encoder (dates, decimals and UUIDs included)
    tenant          `tenant_id`; subscriptions with a tenant_id receive only their tenant's
    ordering_key    e.g. "lead:42": ordered subscriptions deliver one key's events in order
    metadata        a dict passed through as the webhook's `metadata` (correlation id, user…)
    source_service  defaults to settings.OUTBOX_SOURCE_SERVICE, if set
    target_services names of the only subscriptions that should receive it
    deliver_after   an aware datetime to schedule the delivery
    priority        higher is dispatched sooner (default 0)
    event_id        your own id makes a retried publish idempotent: the same id twice fails
                    with an IntegrityError; it is also the webhook-id receivers dedupe on
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        raise OutboxError(
            f"database {using!r} is {connection.vendor}; the outbox lives in PostgreSQL"
        )
    # in_atomic_block: inside transaction.atomic() (or ATOMIC_REQUESTS). get_autocommit()
    # False: the caller manages the transaction by hand (transaction.set_autocommit(False)).
    in_transaction = connection.in_atomic_block or not connection.get_autocommit()
    if not in_transaction and not allow_outside_transaction:
        raise PublishOutsideTransaction(
                f"publish({event_type!r}) outside a transaction: the event would commit on its "
                "own, apart from the change it announces. Wrap the change and the publish in "
                "transaction.atomic(), or pass allow_outside_transaction=True for an event "
                "that stands alone."
            )

    if source_service is None:
        source_service = getattr(settings, "OUTBOX_SOURCE_SERVICE", None)
    if isinstance(target_services, str):
        raise TypeError("target_services takes a list of subscription names, not one string")

    columns = ["event_type", "payload"]
    values = ["%s", "%s::jsonb"]
    params: list[Any] = [event_type, json.dumps(data, cls=DjangoJSONEncoder)]

    def add(column: str, cast: str, value: Any) -> None:
        if value is not None:
            columns.append(column)
            values.append(f"%s::{cast}")
            params.append(value)

    add("event_id", "uuid", None if event_id is None else str(event_id))
    add("tenant_id", "text", None if tenant is None else str(tenant))
    add("source_service", "text", source_service)
    add("ordering_key", "text", ordering_key)
    add("target_services", "text[]", None if target_services is None else list(target_services))
    add("metadata", "jsonb", None if metadata is None else json.dumps(metadata, cls=DjangoJSONEncoder))
    add("deliver_after", "timestamptz", deliver_after)
    add("priority", "integer", priority)

    sql = (
        f"INSERT INTO outbox.events ({', '.join(columns)}) "
        f"VALUES ({', '.join(values)}) RETURNING event_id"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        (new_id,) = cursor.fetchone()
    # psycopg returns uuid.UUID; psycopg2 may return str unless its UUID adapter is registered.
    return new_id if isinstance(new_id, uuid.UUID) else uuid.UUID(str(new_id))
