-- The wake-up signal from producers to relays. This file is the only place the mechanism
-- lives, so tuning it (NOTIFY takes a global lock at commit) changes nothing else.
--
-- One NOTIFY per statement, not per row: a bulk INSERT of 10 000 events wakes the relay once.
-- The notification is a hint only; relays also poll, which is the truth when a NOTIFY is lost
-- (a relay that was disconnected at commit time never hears it).

CREATE FUNCTION outbox.notify_events_inserted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        PERFORM pg_notify('outbox_events', '');
        RETURN NULL;
    END
    $$;
COMMENT ON FUNCTION outbox.notify_events_inserted() IS
    'Wakes listening relays (channel outbox_events) once per INSERT statement into outbox.events.';

CREATE TRIGGER events_notify_relay AFTER INSERT ON outbox.events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_events_inserted();

-- Subscription changes wake relays too, so a new or changed subscription is used at once.
CREATE FUNCTION outbox.notify_subscriptions_changed() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        PERFORM pg_notify('outbox_subscriptions', '');
        RETURN NULL;
    END
    $$;
CREATE TRIGGER subscriptions_notify_relay AFTER INSERT OR UPDATE OR DELETE ON outbox.subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_subscriptions_changed();
