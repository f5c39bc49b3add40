//! The bench's command line: which scenario, its size, and the relay settings to run it with.

use super::*;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "drain",
    about = "outbox-relay benchmark (throughput, fan-out, latency, slow subscriber, producer cost)"
)]
pub(super) struct Args {
    /// Passed by `cargo bench` to every bench target; accepted and ignored.
    #[arg(long, hide = true)]
    pub(super) bench: bool,

    /// Internal: run as the receiver process (see `remote_receiver`).
    #[arg(long, hide = true)]
    pub(super) serve_receiver: bool,

    /// Which scenario to run; `all` runs each in turn.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    pub(super) scenario: Scenario,

    /// Use this PostgreSQL server (a fresh `outbox_bench_<random>` database is created and
    /// dropped per scenario) instead of a throwaway cluster. Needs CREATEDB.
    #[arg(long)]
    pub(super) database_url: Option<String>,

    /// `drain`, `fanout` and `latency`: where the subscriptions deliver. `webhook` POSTs to the receiver
    /// process; `nats`, `redis` and `amqp` publish to the broker on its default loopback port
    /// (NATS with JetStream, Redis, RabbitMQ as guest), `kafka` to `--kafka-broker`, each
    /// subscription to a sink of its own.
    #[arg(long, value_enum, default_value_t = Target::Webhook)]
    pub(super) target: Target,

    /// `--target kafka`: the Kafka-protocol broker (host:port) the topics are made on.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub(super) kafka_broker: String,

    /// Events for `drain`; `fanout` uses events/4 events × 4 subscriptions (same deliveries).
    #[arg(long, default_value_t = 20_000)]
    pub(super) events: u64,

    /// Subscriptions in `fanout`.
    #[arg(long, default_value_t = 4)]
    pub(super) fanout_subscriptions: u32,

    /// Bytes of padding in each event payload (`{"seq": n, "pad": "xxx…"}`).
    #[arg(long, default_value_t = 200)]
    pub(super) payload_pad: i32,

    /// `max_in_flight` of the benchmark's subscriptions (the column default is 64).
    #[arg(long, default_value_t = 64)]
    pub(super) max_in_flight: i32,

    /// Run ANALYZE on the filled events table before the relay starts (by default the backlog
    /// has no statistics yet, as right after a burst: autovacuum has not looked at it).
    #[arg(long)]
    pub(super) analyze_before: bool,

    /// `drain`/`fanout`: events already dispatched and delivered before the backlog (a
    /// database with history, as production has; then ANALYZEd as autovacuum would). The
    /// plans of the relay's statements depend on the table sizes.
    #[arg(long, default_value_t = 0)]
    pub(super) history_events: u64,

    /// `three_relays`: rounds of (1 relay, 3 relays) phases, alternating ABBA.
    #[arg(long, default_value_t = 1)]
    pub(super) relay_rounds: u32,

    /// `footprint`: after the drain, publish at `--latency-rate` for this long while the
    /// relay's RSS is sampled (0 = no soak). Must fit in `--scenario-timeout`.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub(super) soak_duration: Duration,

    /// `footprint`: events inserted and delivered before the table and index sizes are
    /// taken (0 = skip that part).
    #[arg(long, default_value_t = 1_000_000)]
    pub(super) footprint_events: u64,

    /// `latency`: events published per second, one transaction each.
    #[arg(long, default_value_t = 50.0)]
    pub(super) latency_rate: f64,

    /// `latency`: how long to publish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) latency_duration: Duration,

    /// `slow_subscriber`: events (each goes to the slow and the fast subscriber).
    #[arg(long, default_value_t = 2_000)]
    pub(super) slow_events: u64,

    /// `slow_subscriber`: how long the slow subscriber takes to answer.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub(super) slow_delay: Duration,

    /// `slow_subscriber`: max_in_flight of the slow subscriber.
    #[arg(long, default_value_t = 64)]
    pub(super) slow_max_in_flight: i32,

    /// `producer_cost`: transactions per throughput phase.
    #[arg(long, default_value_t = 5_000)]
    pub(super) producer_transactions: u64,

    /// `producer_cost`: the producer connection counts measured for throughput.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub(super) producer_connections: Vec<u64>,

    /// `producer_cost`: rounds of (outbox, plain) phases, alternating ABBA.
    #[arg(long, default_value_t = 2)]
    pub(super) producer_rounds: u32,

    /// `producer_cost`: warm-up transactions into each table before the measured phases.
    #[arg(long, default_value_t = 500)]
    pub(super) producer_warmup: u64,

    /// `producer_cost`: transactions/s, in total, of the steady commit-latency phases.
    #[arg(long, default_value_t = 300.0)]
    pub(super) producer_steady_rate: f64,

    /// `producer_cost`: connections sharing the steady rate.
    #[arg(long, default_value_t = 4)]
    pub(super) producer_steady_connections: u64,

    /// `producer_cost`: length of each steady phase.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) producer_steady_duration: Duration,

    /// `producer_cost`: what the relay does with the producers' events. `deliver` (the
    /// default) sends each to the receiver; `dispatch-only` gives the subscription an event
    /// type nothing has, so the relay only fans out (marks each event dispatched, creates no
    /// delivery): what the dispatcher alone costs the producers.
    #[arg(long, value_enum, default_value_t = ProducerRelayWork::Deliver)]
    pub(super) producer_relay_work: ProducerRelayWork,

    /// Keep each scenario's database instead of dropping it (with `--database-url`, for
    /// looking at what happened; a throwaway cluster is removed at exit regardless).
    #[arg(long)]
    pub(super) keep_databases: bool,

    /// Each scenario gives up after this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub(super) scenario_timeout: Duration,

    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub(super) json: Option<std::path::PathBuf>,

    // Relay settings: production defaults (README, "Configuration").
    /// Relay: fallback poll interval (OUTBOX_POLL_INTERVAL).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub(super) poll_interval: Duration,
    /// Relay: look for events this often while busy (OUTBOX_BUSY_POLL_INTERVAL).
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    pub(super) busy_poll_interval: Duration,
    /// Relay: how long a busy spell outlasts the last event (OUTBOX_BUSY_LINGER).
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub(super) busy_linger: Duration,
    /// Relay: lease duration (OUTBOX_LEASE_DURATION).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) lease_duration: Duration,
    /// Relay: heartbeat interval (OUTBOX_HEARTBEAT_INTERVAL).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub(super) heartbeat_interval: Duration,
    /// Relay: result flush interval (OUTBOX_FLUSH_INTERVAL).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub(super) flush_interval: Duration,
    /// Relay: bookkeeping commits without waiting for WAL flush (OUTBOX_ASYNC_COMMIT).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(super) async_commit: bool,
    /// Relay: results per write (OUTBOX_FLUSH_BATCH_SIZE).
    #[arg(long, default_value_t = 500)]
    pub(super) flush_batch_size: u32,
    /// Relay: events fanned out per transaction (OUTBOX_DISPATCH_BATCH_SIZE).
    #[arg(long, default_value_t = 500)]
    pub(super) dispatch_batch_size: u32,
    /// Relay: deliveries leased per claim (OUTBOX_DELIVERY_BATCH_SIZE).
    #[arg(long, default_value_t = 200)]
    pub(super) delivery_batch_size: u32,
    /// Relay: concurrent requests, all subscriptions (OUTBOX_MAX_CONCURRENCY).
    #[arg(long, default_value_t = 256)]
    pub(super) max_concurrency: u32,
    /// Relay: pooled connections (OUTBOX_DB_POOL_SIZE).
    #[arg(long, default_value_t = 8)]
    pub(super) db_pool_size: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(super) enum Scenario {
    All,
    Drain,
    Fanout,
    Latency,
    SlowSubscriber,
    ProducerCost,
    ThreeRelays,
    Footprint,
}

impl Scenario {
    pub(super) fn name(self) -> &'static str {
        match self {
            Scenario::All => "all",
            Scenario::Drain => "drain",
            Scenario::Fanout => "fanout",
            Scenario::Latency => "latency",
            Scenario::SlowSubscriber => "slow_subscriber",
            Scenario::ProducerCost => "producer_cost",
            Scenario::ThreeRelays => "three_relays",
            Scenario::Footprint => "footprint",
        }
    }
}

/// `50ms`, `1s`, `1.5s`, `5m`; a bare number is seconds.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    // The relay's own parser (humantime), so every value OUTBOX_* takes works here too
    // (`500us`, `1m30s`); a bare number means seconds, as before.
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("invalid duration {text:?}: seconds must be 0 or more"));
    }
    humantime::parse_duration(text).map_err(|error| {
        format!("invalid duration {text:?} ({error}): expected e.g. 500us, 50ms, 1s, 5m")
    })
}

/// See [`Args::producer_relay_work`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum ProducerRelayWork {
    Deliver,
    DispatchOnly,
}
