-- replay_recipes.sql: how to send deliveries again (outbox.replay) and how to give a new
-- subscriber past events (outbox.backfill).
--
-- Answers: "the subscriber is fixed, how do I resend what it missed?" Running this file
-- changes nothing: it only shows, inside a transaction it rolls back, how many deliveries
-- the common replays would re-queue right now. The recipes below are comments: copy one,
-- adjust it, and run it on its own (autocommit: one short transaction per call).
--
-- Run:
--   psql "$DATABASE_URL" -f sql/replay_recipes.sql
--
-- Both functions record who asked, why, the criteria and the count in outbox.replays, and
-- the relay sends replayed deliveries with the same webhook-id and body bytes as before.
-- Both return (replay_id, matched). The operator role needs only EXECUTE on them
-- (sql/roles.sql); see COMMENT ON FUNCTION outbox.replay / outbox.backfill for the details.
--
-- ---------------------------------------------------------------------------------------
-- outbox.replay: re-queue existing deliveries (status pending, attempts 0, due now)
-- ---------------------------------------------------------------------------------------
--
-- Always count first: a dry run changes no delivery (it does record a replays row with
-- dry_run = true, so the count is on file).
--   SELECT * FROM outbox.replay(subscription => 'ai-agents', dry_run => true);
--
-- Every dead delivery of one subscription, with a reason for the record:
--   SELECT * FROM outbox.replay(subscription => 'ai-agents', reason => 'receiver fixed, INC-1234');
--
-- Dead and still-failing ones (failing ones are retried anyway; this makes them due now
-- with a fresh attempt budget):
--   SELECT * FROM outbox.replay(status => '{dead,failing}', subscription => 'ai-agents');
--
-- One kind of event (exact type or glob), one tenant, one time window (on the event's
-- created_at: created_after <= created_at < created_before):
--   SELECT * FROM outbox.replay(subscription => 'ai-agents', event_type => 'lead.*',
--                               tenant_id => 'acme',
--                               created_after => '2026-11-20 00:00+00',
--                               created_before => '2026-11-21 00:00+00');
--
-- Specific events (the uuids producers got back, webhook-id for subscribers), including
-- ones that were delivered but the subscriber lost:
--   SELECT * FROM outbox.replay(status => '{delivered,dead}',
--                               event_ids => '{6f1c2a9e-0000-4000-8000-000000000000}');
--
-- A large backlog in bounded steps: each call re-queues at most max_events deliveries
-- (lowest delivery id first; a NOTICE says when more matched). Re-queued deliveries are no
-- longer dead, so calling again picks up the next ones. Prefer several calls, each its own
-- transaction, to one huge one: rows stay locked until commit.
--   SELECT * FROM outbox.replay(subscription => 'ai-agents', max_events => 1000, reason => 'batch 1');
-- or window by window:
--   SELECT * FROM outbox.replay(subscription => 'ai-agents',
--                               created_after => '2026-11-01', created_before => '2026-11-08');
--
-- Refused with an error (and a HINT): unknown status, status in_flight (a relay holds
-- those), unknown subscription, max_events < 1, an event_type that is not a type or glob,
-- an empty time window. Deliveries of removed subscriptions are never re-queued.
--
-- What happened afterwards:
--   SELECT * FROM outbox.replays ORDER BY id DESC LIMIT 10;
--   SELECT status, count(*) FROM outbox.deliveries WHERE replay_id = 42 GROUP BY 1;
--   SELECT * FROM outbox.delivery_attempts WHERE replay_id = 42 ORDER BY id;
--
-- ---------------------------------------------------------------------------------------
-- outbox.backfill: create deliveries a (new) subscription never had
-- ---------------------------------------------------------------------------------------
--
-- Everything a new subscriber would have received since the start of the month (its
-- current event_types, tenant_id, filter; events' target_services), at most 100000:
--   SELECT * FROM outbox.backfill('ai-agents', created_after => '2026-11-01');
--
-- Only one event type, a closed window, in bounded steps:
--   SELECT * FROM outbox.backfill(subscription => 'ai-agents', created_after => '2026-11-01',
--                                 created_before => '2026-11-02', event_type => 'lead.created',
--                                 max_events => 10000, reason => 'onboarding ai-agents');
--
-- All history: created_after => '-infinity'. Calling it again creates only what is still
-- missing (an event never gets two deliveries to one subscription).
--
-- There is no dry run; count inside a transaction and roll back:
--   BEGIN;
--   SELECT * FROM outbox.backfill('ai-agents', created_after => '2026-11-01');
--   ROLLBACK;
--
-- Refused: unknown or disabled subscription, NULL or empty window, max_events < 1.

\echo '== What the common replays would re-queue right now (dry runs, rolled back)'
BEGIN;
SELECT 'dead (the default)' AS replay, matched
  FROM outbox.replay(dry_run => true, reason => 'replay_recipes.sql preview')
UNION ALL
SELECT 'dead and failing', matched
  FROM outbox.replay(status => '{dead,failing}', dry_run => true, reason => 'replay_recipes.sql preview');
ROLLBACK;

\echo '== Dead deliveries per subscription (candidates for subscription => ...)'
SELECT coalesce(subscription, '(removed: cannot be replayed)') AS subscription, count(*) AS dead
  FROM outbox.failed_deliveries
 WHERE status = 'dead'
 GROUP BY 1
 ORDER BY dead DESC;
