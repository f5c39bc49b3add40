-- outbox.publish: the same INSERT as a function, for producers that prefer named arguments.

CREATE FUNCTION outbox.publish(
    event_type      text,
    payload         jsonb,
    tenant_id       text DEFAULT NULL,
    source_service  text DEFAULT NULL,
    ordering_key    text DEFAULT NULL,
    target_services text[] DEFAULT NULL,
    metadata        jsonb DEFAULT '{}',
    deliver_after   timestamptz DEFAULT now(),
    priority        integer DEFAULT 0
) RETURNS uuid
    LANGUAGE sql VOLATILE
    AS $$
        INSERT INTO outbox.events
            (event_type, payload, tenant_id, source_service, ordering_key, target_services, metadata, deliver_after, priority)
        VALUES
            ($1, $2, $3, $4, $5, $6, COALESCE($7, '{}'), COALESCE($8, now()), COALESCE($9, 0))
        RETURNING event_id
    $$;
COMMENT ON FUNCTION outbox.publish(text, jsonb, text, text, text, text[], jsonb, timestamptz, integer) IS
    'Insert one event (inside the caller''s transaction) and return its event_id. Same checks as a plain INSERT.';
