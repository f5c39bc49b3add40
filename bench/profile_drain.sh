#!/usr/bin/env bash
# Where a drain's CPU goes: samples (perf, software clock, with call graphs) the bench process
# (the relay), its receiver process and the PostgreSQL backends of the bench's database while
# the `drain` scenario runs, then prints the share of each process and PostgreSQL's hottest
# functions. Run by hand, on a quiet machine, as a user that may perf the server's processes:
#
#   bench/profile_drain.sh                       # DATABASE_URL or the local server
#   EVENTS=200000 SECONDS_SAMPLED=10 bench/profile_drain.sh
#
# Needs perf (Debian package linux-perf) and psql. The report is in $OUT (default
# target/profile-drain/).
set -euo pipefail
cd "$(dirname "$0")/.."

DB=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
EVENTS=${EVENTS:-150000}
SECONDS_SAMPLED=${SECONDS_SAMPLED:-8}
OUT=${OUT:-target/profile-drain}
mkdir -p "$OUT"

for tool in perf psql; do
  command -v "$tool" >/dev/null || { echo "$tool is missing" >&2; exit 1; }
done

bench=$(cargo bench --bench drain --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4)
[ -x "$bench" ] || { echo "could not build the drain bench" >&2; exit 1; }

"$bench" --database-url "$DB" --scenario drain --events "$EVENTS" >"$OUT/bench.txt" 2>&1 &
bench_pid=$!
trap 'kill "$bench_pid" 2>/dev/null || true' EXIT

# Wait until the relay's sessions work on the bench's database, then sample for a while.
for _ in $(seq 1 600); do
  sessions=$(psql "$DB" -Atc "SELECT count(*) FROM pg_stat_activity
                               WHERE datname LIKE 'outbox_bench_%' AND application_name LIKE 'outbox-relay%'" \
             2>/dev/null || echo 0)
  [ "${sessions:-0}" -gt 2 ] && break
  sleep 0.2
done
sleep 1
backends=$(psql "$DB" -Atc "SELECT string_agg(pid::text, ',') FROM pg_stat_activity
                             WHERE datname LIKE 'outbox_bench_%'")
receiver=$(pgrep -f -- '--serve-receiver' | head -n 1 || true)
pids="$bench_pid${receiver:+,$receiver},$backends"
echo "sampling $SECONDS_SAMPLED s of: bench/relay $bench_pid, receiver ${receiver:-?}, backends $backends"
perf record -F 997 -g -o "$OUT/perf.data" -p "$pids" -- sleep "$SECONDS_SAMPLED" 2>"$OUT/perf-record.txt"
wait "$bench_pid"
trap - EXIT

grep -E "deliveries_per_s|drain_s" "$OUT/bench.txt" || true
echo "--- share of the sampled CPU per process"
perf report -i "$OUT/perf.data" --no-children --sort pid --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | head -n 16
echo "--- PostgreSQL, inclusive, by function (names PostgreSQL exports)"
perf report -i "$OUT/perf.data" --children --comm postgres --sort sym --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | grep -v ' 0x0000' | head -n 40
