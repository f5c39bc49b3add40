-- outbox-relay schema, version 1: the tables of the public contract (SPEC.md) plus the
-- internal columns the relay needs. Forward-only: later changes are new V<n> files.

CREATE SCHEMA IF NOT EXISTS outbox;
COMMENT ON SCHEMA outbox IS 'Transactional outbox: producers INSERT into outbox.events; outbox-relay delivers them as signed webhooks.';

-- Limits that CHECK constraints use. They are functions, not literals, so an operator can
-- change a limit with CREATE OR REPLACE FUNCTION without rewriting the constraint.
CREATE FUNCTION outbox.max_payload_bytes() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT 1048576 $$;
COMMENT ON FUNCTION outbox.max_payload_bytes() IS
    'Largest accepted events.payload, in bytes of its JSON text (default 1 MiB). Replace this function to change the limit for new rows.';

-- Event types: letters, digits and ._:- only, 1 to 255 characters.
CREATE FUNCTION outbox.is_valid_event_type(event_type text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT event_type ~ '^[A-Za-z0-9._:-]{1,255}$' $$;

-- Subscription patterns: an event type that may also contain '*' (any run of characters).
CREATE FUNCTION outbox.are_valid_event_type_patterns(patterns text[]) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT cardinality(patterns) > 0
           AND array_position(patterns, NULL) IS NULL
           AND NOT EXISTS (SELECT 1 FROM unnest(patterns) p WHERE p !~ '^[A-Za-z0-9._:*-]{1,255}$')
    $$;

-- Glob matching for subscriptions.event_types. '*' is the only wildcard; every other
-- character (including '_' and '%', which LIKE would treat specially) matches itself.
CREATE FUNCTION outbox.event_type_matches(patterns text[], event_type text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT EXISTS (
            SELECT 1 FROM unnest(patterns) p
            WHERE p = '*'
               OR p = event_type
               OR (strpos(p, '*') > 0
                   AND event_type LIKE replace(replace(replace(p, '\', '\\'), '_', '\_'), '*', '%'))
        )
    $$;
COMMENT ON FUNCTION outbox.event_type_matches(text[], text) IS
    'True when event_type matches one of the subscription patterns (exact names or globs with *).';

CREATE TABLE outbox.events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid NOT NULL DEFAULT gen_random_uuid(),
    event_type      text NOT NULL,
    payload         jsonb NOT NULL,
    tenant_id       text,
    source_service  text,
    ordering_key    text,
    target_services text[],
    metadata        jsonb NOT NULL DEFAULT '{}',
    priority        integer NOT NULL DEFAULT 0,
    deliver_after   timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- internal: set when the dispatcher has fanned the event out into deliveries
    dispatched_at   timestamptz,

    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT event_type_format CHECK (outbox.is_valid_event_type(event_type)),
    CONSTRAINT payload_size CHECK (octet_length(payload::text) <= outbox.max_payload_bytes()),
    CONSTRAINT metadata_is_object CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT target_services_not_empty CHECK (target_services IS NULL OR cardinality(target_services) > 0),
    CONSTRAINT ordering_key_length CHECK (ordering_key IS NULL OR length(ordering_key) BETWEEN 1 AND 255)
);
COMMENT ON TABLE outbox.events IS
    'Producers INSERT here inside their own transaction; the relay delivers each committed row to every matching subscription.';
COMMENT ON COLUMN outbox.events.id IS 'Internal order (identity). Not the webhook id: that is event_id.';
COMMENT ON COLUMN outbox.events.event_id IS 'Webhook id sent to subscribers; a producer may set its own for idempotency (duplicates fail).';
COMMENT ON COLUMN outbox.events.dispatched_at IS 'Internal: when the relay fanned this event out into outbox.deliveries. NULL = not yet.';

-- What the dispatcher claims: undispatched rows, highest priority first, then insert order.
CREATE INDEX events_undispatched_idx ON outbox.events (priority DESC, id) WHERE dispatched_at IS NULL;
CREATE INDEX events_created_at_idx ON outbox.events (created_at);
CREATE INDEX events_type_created_idx ON outbox.events (event_type, created_at);

-- Subscription secrets: 'whsec_' + base64 of 32 random bytes. Built from two v4 UUIDs so no
-- extension (pgcrypto) is needed; that is 244 random bits, well above HMAC-SHA256's needs.
CREATE FUNCTION outbox.generate_secret() RETURNS text
    LANGUAGE sql VOLATILE
    AS $$
        SELECT 'whsec_' || encode(decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'), 'base64')
    $$;

-- retry_schedule: at most 50 waits, each between 0 and 7 days.
CREATE FUNCTION outbox.is_sane_retry_schedule(schedule interval[]) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT cardinality(schedule) <= 50
           AND array_position(schedule, NULL) IS NULL
           AND NOT EXISTS (SELECT 1 FROM unnest(schedule) w WHERE w < interval '0' OR w > interval '7 days')
    $$;

-- headers: a JSON object of string values, none of which may override what the relay signs.
CREATE FUNCTION outbox.are_valid_headers(headers jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT jsonb_typeof(headers) = 'object'
           AND NOT EXISTS (
               SELECT 1 FROM jsonb_each(headers) h
               WHERE jsonb_typeof(h.value) <> 'string'
                  OR h.key !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]{1,128}$'
                  OR lower(h.key) IN ('content-type', 'content-length', 'host', 'user-agent', 'transfer-encoding',
                                      'connection', 'webhook-id', 'webhook-timestamp', 'webhook-signature')
           )
    $$;

CREATE TABLE outbox.subscriptions (
    id                    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                  text NOT NULL,
    url                   text NOT NULL,
    event_types           text[] NOT NULL DEFAULT '{*}',
    tenant_id             text,
    filter                jsonb,
    secret                text NOT NULL DEFAULT outbox.generate_secret(),
    enabled               boolean NOT NULL DEFAULT true,
    disabled_reason       text,
    ordered               boolean NOT NULL DEFAULT false,
    retry_schedule        interval[] NOT NULL DEFAULT '{5 seconds,5 minutes,30 minutes,2 hours,5 hours,10 hours,10 hours}',
    timeout               interval NOT NULL DEFAULT '15 seconds',
    max_in_flight         integer NOT NULL DEFAULT 64,
    rate_limit_per_second real,
    headers               jsonb NOT NULL DEFAULT '{}',
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT subscriptions_name_key UNIQUE (name),
    CONSTRAINT name_format CHECK (name ~ '^[A-Za-z0-9._:-]{1,255}$'),
    CONSTRAINT url_scheme CHECK (url ~* '^https?://[^/?#[:space:]]+' AND url !~ '[[:space:]]' AND length(url) <= 2048),
    CONSTRAINT event_types_format CHECK (outbox.are_valid_event_type_patterns(event_types)),
    CONSTRAINT filter_is_object CHECK (filter IS NULL OR jsonb_typeof(filter) = 'object'),
    CONSTRAINT secret_format CHECK (secret ~ '^whsec_[A-Za-z0-9+/]{22,}={0,2}$'),
    CONSTRAINT retry_schedule_sane CHECK (outbox.is_sane_retry_schedule(retry_schedule)),
    CONSTRAINT timeout_sane CHECK (timeout >= interval '100 milliseconds' AND timeout <= interval '5 minutes'),
    CONSTRAINT max_in_flight_sane CHECK (max_in_flight BETWEEN 1 AND 10000),
    CONSTRAINT rate_limit_sane CHECK (rate_limit_per_second IS NULL OR (rate_limit_per_second > 0 AND rate_limit_per_second <= 100000)),
    CONSTRAINT headers_valid CHECK (outbox.are_valid_headers(headers))
);
COMMENT ON TABLE outbox.subscriptions IS
    'Who receives what. Inserts, updates and disables take effect in running relays within a second.';
COMMENT ON COLUMN outbox.subscriptions.secret IS 'Signing key: whsec_ + base64 of the HMAC key. Never shown to producers.';
COMMENT ON COLUMN outbox.subscriptions.retry_schedule IS 'Waits between attempts (each with ±20% jitter); attempts = 1 + cardinality.';

CREATE FUNCTION outbox.touch_updated_at() RETURNS trigger
    LANGUAGE plpgsql
    AS $$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
CREATE TRIGGER subscriptions_touch_updated_at BEFORE UPDATE ON outbox.subscriptions
    FOR EACH ROW EXECUTE FUNCTION outbox.touch_updated_at();

CREATE TABLE outbox.replays (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    requested_by  text NOT NULL DEFAULT current_user,
    reason        text,
    criteria      jsonb NOT NULL DEFAULT '{}',
    matched       bigint NOT NULL DEFAULT 0,
    dry_run       boolean NOT NULL DEFAULT false
);
COMMENT ON TABLE outbox.replays IS 'Every replay and backfill: who asked, why, with which criteria, and how many deliveries it re-queued.';

CREATE TABLE outbox.deliveries (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id          bigint NOT NULL REFERENCES outbox.events (id) ON DELETE CASCADE,
    -- SET NULL, not CASCADE: removing a subscription keeps its delivery history (marked dead).
    subscription_id   bigint REFERENCES outbox.subscriptions (id) ON DELETE SET NULL,
    status            text NOT NULL DEFAULT 'pending',
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    last_status_code  integer,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- internal: the relay holding this delivery while in_flight, and until when
    lease_owner       text,
    lease_expires_at  timestamptz,
    -- internal: the replay that last re-queued this delivery; copied onto its attempts
    replay_id         bigint REFERENCES outbox.replays (id) ON DELETE SET NULL,
    -- the event's ordering_key, for ordered subscriptions only (see V5__ordered_subscriptions.sql)
    ordering_key      text,
    -- internal: all but the head of an ordered key wait here, outside the claim index
    blocked           boolean NOT NULL DEFAULT false,

    CONSTRAINT deliveries_event_subscription_key UNIQUE (event_id, subscription_id),
    CONSTRAINT status_known CHECK (status IN ('pending', 'in_flight', 'delivered', 'failing', 'dead')),
    CONSTRAINT lease_only_in_flight CHECK ((status = 'in_flight') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL))
);
COMMENT ON TABLE outbox.deliveries IS 'One row per (event, subscription). status: pending, in_flight, delivered, failing (will be retried), dead.';
COMMENT ON COLUMN outbox.deliveries.event_id IS 'outbox.events.id (the bigint row id, not the uuid).';
COMMENT ON COLUMN outbox.deliveries.attempts IS 'Attempts made since creation or the last replay.';
COMMENT ON COLUMN outbox.deliveries.lease_owner IS 'Internal: relay id (host:pid:start) holding this in_flight delivery.';
COMMENT ON COLUMN outbox.deliveries.lease_expires_at IS 'Internal: renewed by the owner''s heartbeat; once past, any relay may reclaim the delivery.';
COMMENT ON COLUMN outbox.deliveries.ordering_key IS 'The event''s ordering_key, set only for ordered subscriptions (NULL = no ordering constraint).';
COMMENT ON COLUMN outbox.deliveries.blocked IS 'Internal: true while an earlier delivery of the same ordered subscription and key is not yet delivered or dead.';

-- What the deliverer claims, per subscription, in due order. Blocked rows (behind the head
-- of an ordered key) are left out, so a key stuck behind a failing head costs the claim
-- nothing however many deliveries wait behind it.
CREATE INDEX deliveries_due_idx ON outbox.deliveries (subscription_id, next_attempt_at, id)
    WHERE status IN ('pending', 'failing') AND NOT blocked;
-- Ordered keys: "is an earlier delivery of this key open?" and "which one is next?".
CREATE INDEX deliveries_ordering_idx ON outbox.deliveries (subscription_id, ordering_key, event_id)
    WHERE ordering_key IS NOT NULL AND status IN ('pending', 'in_flight', 'failing');
-- Leases: heartbeats, expiry sweeps and per-subscription in-flight counts.
CREATE INDEX deliveries_in_flight_idx ON outbox.deliveries (subscription_id, lease_expires_at)
    WHERE status = 'in_flight';
CREATE INDEX deliveries_failed_idx ON outbox.deliveries (subscription_id, updated_at)
    WHERE status IN ('failing', 'dead');

CREATE TABLE outbox.delivery_attempts (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id    bigint NOT NULL REFERENCES outbox.deliveries (id) ON DELETE CASCADE,
    attempt        integer NOT NULL,
    started_at     timestamptz NOT NULL,
    duration_ms    integer NOT NULL,
    status_code    integer,
    error          text,
    response_body  text,
    replay_id      bigint REFERENCES outbox.replays (id) ON DELETE SET NULL
);
COMMENT ON TABLE outbox.delivery_attempts IS
    'Failed and replayed attempts (a first-attempt success is recorded on the delivery row alone). response_body holds at most 4 KiB.';
CREATE INDEX delivery_attempts_delivery_idx ON outbox.delivery_attempts (delivery_id, attempt);
CREATE INDEX delivery_attempts_started_idx ON outbox.delivery_attempts (started_at);

-- Removing a subscription ends its open deliveries as dead, so nothing waits for a subscriber
-- that no longer exists and the history says why.
CREATE FUNCTION outbox.end_deliveries_of_removed_subscription() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        UPDATE outbox.deliveries
           SET status = 'dead', lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
               last_error = 'subscription ' || OLD.name || ' was removed'
         WHERE subscription_id = OLD.id AND status IN ('pending', 'failing', 'in_flight');
        RETURN OLD;
    END
    $$;
CREATE TRIGGER subscriptions_end_deliveries BEFORE DELETE ON outbox.subscriptions
    FOR EACH ROW EXECUTE FUNCTION outbox.end_deliveries_of_removed_subscription();
