-- Counting in-flight deliveries without walking every delivery finished since the last VACUUM
-- (issue 8, performance).
--
-- Each claim counts a subscription's in-flight deliveries (max_in_flight holds across
-- relays). A delivery that finishes leaves a dead entry in the in-flight index until VACUUM
-- removes it. A plain or index-only scan marks such entries dead the first time it meets
-- them, and later scans skip them; a bitmap scan never does. Without statistics (a new or
-- busy table, autovacuum behind) the planner chose the bitmap scan, so every count read every
-- delivery finished since the last VACUUM: 42 000 index entries and 1 400 heap pages, 2.9 ms
-- per subscription per claim, 60 000 deliveries into a drain (the drain fell from about
-- 4 000 to 1 400 deliveries/s between 20 000 and 100 000 events). Bitmap scans are off
-- inside the claim: every statement in it is a short index lookup, which a bitmap scan never
-- serves better. (A LIMIT on the count would invite a sequential scan instead: the planner
-- expects to find max_in_flight rows early in the table.) The function's body is V9's.
ALTER FUNCTION outbox.claim_deliveries(bigint[], integer[], integer, text, interval, bigint)
    SET enable_bitmapscan = off;
