-- Producers NOTIFY only while a relay is waiting for one.
--
-- NOTIFY takes a cluster-wide lock at commit and holds it through the commit's WAL flush, so
-- every transaction that notifies commits one at a time: with V3's unconditional NOTIFY,
-- 8 producers inserting into outbox.events got half the rate of a plain table. A relay that
-- is already busy needs no wake-up: it looks again on its own within OUTBOX_BUSY_POLL_INTERVAL.
--
-- The "wake-up gate" is advisory lock (1869575540, 0), 'outw'. A relay that has run out of
-- work and wants to sleep until the next NOTIFY takes it exclusively on a connection of its
-- own (src/db/wake_gate.rs; tried, never waited for) and keeps it while it sleeps; a busy
-- relay holds nothing. The trigger tries to take it shared for the producer's transaction:
-- * it cannot (a relay holds the gate): a relay wants waking, so NOTIFY;
-- * it can: no relay is asleep, so no NOTIFY. The producer now holds the gate shared until
--   its transaction ends, so a relay can take the gate only after that transaction has
--   committed or rolled back; until then the relay keeps looking for work, and once it has
--   the gate it looks once more before it sleeps. So every event is seen by a wake-up, by a
--   relay's next look, or by the look after taking the gate; only while a relay's gate
--   session is down is it left for the fallback poll.
-- No row is written and nothing is shared but the lock table: producers never wait on the
-- gate (a try, never a wait) and never on each other.
--
-- One statement trigger now does both jobs of V3's and V5's (one trigger call per INSERT
-- statement instead of two). It runs BEFORE the statement, as V5's must: the transaction gets
-- its xid before any row draws an id (see V5__ordered_subscriptions.sql). A NOTIFY from a
-- statement that then fails is discarded with the statement's (sub)transaction.

DROP TRIGGER events_notify_relay ON outbox.events;
DROP TRIGGER events_assign_producer_xid ON outbox.events;
DROP FUNCTION outbox.notify_events_inserted();
DROP FUNCTION outbox.assign_producer_xid();

CREATE FUNCTION outbox.before_events_insert() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        PERFORM pg_current_xact_id();
        IF NOT pg_try_advisory_xact_lock_shared(1869575540, 0) THEN
            PERFORM pg_notify('outbox_events', '');
        END IF;
        RETURN NULL;
    END
    $$;
COMMENT ON FUNCTION outbox.before_events_insert() IS
    'Internal: gives the inserting transaction its xid before rows draw ids, and wakes relays (channel outbox_events) when one waits on the wake-up gate; see V10__quiet_producers.sql.';

CREATE TRIGGER events_before_insert BEFORE INSERT ON outbox.events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.before_events_insert();
