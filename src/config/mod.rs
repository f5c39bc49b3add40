//! Relay configuration: every knob is a flag and an environment variable (`OUTBOX_…`), with
//! the defaults documented in `outbox-relay run --help` and the README.
//!
//! `validate()` checks the rules that span fields and says how to fix a bad combination.
//!
//! Secrets are held as secret types ([`SecretString`], [`SecretUrl`]), so the derived `Debug`
//! (logged at startup) shows the admin token as `[REDACTED]` and URLs with `***` for their
//! password, and clap never prints their environment values in `--help`.
//!
//! This module imports nothing of the crate but its own [`secret`], so every layer can read
//! the configuration without a cycle. That is why `OUTBOX_DB_POOL_MODE` is held as the name
//! given ([`POOL_MODE_DIRECT`], [`POOL_MODE_TRANSACTION_POOLER`]): `db::PoolMode` says what
//! each name means for how statements are sent.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;

pub mod secret;

use self::secret::{ExposeSecret, SecretString, SecretUrl};

/// How the relay connects and how hard it works. Built from flags/env by clap, or by
/// [`RelayConfig::for_tests`] in tests (tests never set environment variables).
#[derive(Args, Clone, Debug)]
pub struct RelayConfig {
    /// Address of the HTTP listener: /healthz, /readyz, /metrics.
    #[arg(long, env = "OUTBOX_HTTP_ADDR", default_value = "127.0.0.1:8009")]
    pub http_addr: SocketAddr,

    /// CIDRs that subscriber URLs may resolve to although private, loopback or link-local
    /// (comma-separated, e.g. `10.0.0.0/8,127.0.0.1`). Refused by default.
    #[arg(long, env = "OUTBOX_ALLOW_PRIVATE_TARGETS", default_value = "", value_parser = parse_cidrs)]
    pub allow_private_targets: CidrList,

    /// PEM file of the certificate authorities that `rediss://` and `amqps://` broker targets
    /// must be signed by, in place of the system's roots (for brokers with a private CA).
    /// Read at start. Unset: the system's roots.
    #[arg(long, env = "OUTBOX_BROKER_CA_FILE")]
    pub broker_ca_file: Option<PathBuf>,

    /// A broker connection no publish used for this long is closed (a removed or quiet
    /// subscription); the next publish to that broker connects again.
    #[arg(long, env = "OUTBOX_BROKER_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub broker_idle_timeout: Duration,

    /// Fallback poll interval. LISTEN/NOTIFY wakes the relay at once; the poll catches what a
    /// lost notification would miss and retries that come due.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// While events keep coming, the relay looks for more this often on its own and producers
    /// send no NOTIFY (NOTIFY makes their commits queue one behind the other). `0ms`: producers
    /// always NOTIFY while a relay runs, and the relay never polls this way.
    #[arg(long, env = "OUTBOX_BUSY_POLL_INTERVAL", default_value = "1ms", value_parser = humantime::parse_duration)]
    pub busy_poll_interval: Duration,

    /// How long after the last event found (or after two wake-ups within this span) the relay
    /// keeps polling every `OUTBOX_BUSY_POLL_INTERVAL` before it asks producers to NOTIFY it
    /// again. Rarer events each wake the relay by NOTIFY and cost no polling.
    #[arg(long, env = "OUTBOX_BUSY_LINGER", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub busy_linger: Duration,

    /// Events claimed per dispatch transaction.
    #[arg(long, env = "OUTBOX_DISPATCH_BATCH_SIZE", default_value_t = 500)]
    pub dispatch_batch_size: u32,

    /// Deliveries claimed per claim round trip (across all subscriptions).
    #[arg(long, env = "OUTBOX_DELIVERY_BATCH_SIZE", default_value_t = 200)]
    pub delivery_batch_size: u32,

    /// Concurrent HTTP requests of this relay, all subscriptions together. Each subscription
    /// is also capped by its own `max_in_flight`, counted across all relays.
    #[arg(long, env = "OUTBOX_MAX_CONCURRENCY", default_value_t = 256)]
    pub max_concurrency: u32,

    /// How long a claimed delivery stays leased without a heartbeat. A relay killed with -9
    /// has its work reclaimed by another relay about this long after its last heartbeat.
    #[arg(long, env = "OUTBOX_LEASE_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// How often a relay renews the leases it holds; must be well below the lease duration.
    #[arg(long, env = "OUTBOX_HEARTBEAT_INTERVAL", default_value = "3s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// How long the result writer lingers for more results before a write. `0ms` (the
    /// default): write what is waiting as soon as the previous write is done, so batches
    /// grow with load. A longer linger means fewer, larger writes, but request slots stay
    /// taken (and a crash re-sends more) for that long.
    #[arg(long, env = "OUTBOX_FLUSH_INTERVAL", default_value = "0ms", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,

    /// Largest number of results written in one statement.
    #[arg(long, env = "OUTBOX_FLUSH_BATCH_SIZE", default_value_t = 500)]
    pub flush_batch_size: u32,

    /// On SIGTERM/SIGINT, how long in-flight requests may take before they are abandoned
    /// (their deliveries are released for another attempt).
    #[arg(long, env = "OUTBOX_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Database connections the relay's pool may open (LISTEN and the wake-up gate use two more, unpooled).
    #[arg(long, env = "OUTBOX_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,

    /// Identity recorded on the deliveries this relay leases. Default: host:pid:start-time.
    #[arg(long, env = "OUTBOX_RELAY_ID")]
    pub relay_id: Option<String>,

    /// Delete finished events older than this (with their deliveries and attempts), e.g.
    /// `30d`. Finished: dispatched and no delivery pending, in flight or failing; dead ones
    /// count as finished. Unset (the default): keep everything.
    #[arg(long, env = "OUTBOX_RETENTION", value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,

    /// Bearer token for the admin API (`/admin/v1/…`) and the event-bus compatibility
    /// endpoints. Unset: those endpoints are off (404).
    #[arg(long, env = "OUTBOX_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<SecretString>,

    /// How the pooled connections reach PostgreSQL: `direct` (or a session-mode pooler), or
    /// `transaction-pooler` (PgBouncer in transaction mode: no named prepared statements or
    /// other session state on pooled connections; each statement is parsed per call).
    /// With `transaction-pooler`, set `OUTBOX_LISTEN_DATABASE_URL` or `OUTBOX_LISTEN=false`.
    /// `outbox-relay migrate` always needs a direct DATABASE_URL (it holds a session lock).
    //
    // Held as the name given (POOL_MODE_DIRECT or POOL_MODE_TRANSACTION_POOLER; a plain
    // comment, as doc lines here would show in --help): what a mode means for how
    // statements are sent is db::PoolMode's, and the configuration imports nothing of the
    // crate.
    #[arg(long, env = "OUTBOX_DB_POOL_MODE", default_value = POOL_MODE_DIRECT, value_parser = pool_modes())]
    pub db_pool_mode: String,

    /// Where the LISTEN connection goes. Default: `DATABASE_URL`. Behind a transaction-mode
    /// pooler, point this at PostgreSQL itself (LISTEN needs a session), or set
    /// `OUTBOX_LISTEN=false` to rely on polling alone.
    #[arg(long, env = "OUTBOX_LISTEN_DATABASE_URL", hide_env_values = true)]
    pub listen_database_url: Option<SecretUrl>,

    /// Whether to LISTEN for wake-ups at all. `false`: poll-only (every
    /// `OUTBOX_POLL_INTERVAL`); readiness then does not require a LISTEN connection.
    #[arg(long, env = "OUTBOX_LISTEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub listen: bool,

    /// Longest one of the relay's own statements may run (`statement_timeout` on its pooled
    /// connections): a statement stalled by the server fails and is retried instead of
    /// holding up the relay. Not applied with `transaction-pooler` (set it on the role).
    #[arg(long, env = "OUTBOX_STATEMENT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub statement_timeout: Duration,

    /// Longest one of the relay's statements waits for a lock (`lock_timeout`), e.g. on a
    /// row held by a session left idle in a transaction. Not applied with
    /// `transaction-pooler` (set it on the role).
    #[arg(long, env = "OUTBOX_LOCK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub lock_timeout: Duration,

    /// Whether the relay's own bookkeeping (fan-out, claims, results, heartbeats, retention)
    /// commits without waiting for its WAL to reach disk (`synchronous_commit = off` on the
    /// relay's pooled connections). A PostgreSQL crash may then undo the last fraction of a
    /// second of that bookkeeping, never a producer's event: undone fan-out is done again and
    /// a request whose recorded result was undone is sent again (at least once). The admin
    /// API keeps the server's setting (durable by default) either way. Not applied with `transaction-pooler`.
    #[arg(long, env = "OUTBOX_ASYNC_COMMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub async_commit: bool,
}

/// Server-side settings the relay puts on its own pooled connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    /// `synchronous_commit = off`: for bookkeeping that is redone if a crash undoes it.
    pub async_commit: bool,
}

/// `OUTBOX_DB_POOL_MODE=direct`: straight to PostgreSQL, or through a session-mode pooler.
pub const POOL_MODE_DIRECT: &str = "direct";
/// `OUTBOX_DB_POOL_MODE=transaction-pooler`: through a transaction-mode pooler such as
/// PgBouncer.
pub const POOL_MODE_TRANSACTION_POOLER: &str = "transaction-pooler";

/// The names `OUTBOX_DB_POOL_MODE` accepts, each with the line `--help` shows for it.
fn pool_modes() -> clap::builder::PossibleValuesParser {
    use clap::builder::PossibleValue;
    clap::builder::PossibleValuesParser::new([
        PossibleValue::new(POOL_MODE_DIRECT)
            .help("Straight to PostgreSQL, or through a session-mode pooler"),
        PossibleValue::new(POOL_MODE_TRANSACTION_POOLER)
            .help("Through a transaction-mode pooler such as PgBouncer"),
    ])
}

/// `statement_timeout` of the admin API's connections (unless OUTBOX_STATEMENT_TIMEOUT is
/// longer): replays and backfills of many events take longer than the relay's own statements.
pub const ADMIN_STATEMENT_TIMEOUT: Duration = Duration::from_secs(600);

/// Shortest `OUTBOX_RETENTION` accepted.
pub const MIN_RETENTION: Duration = Duration::from_secs(3600);

/// Parsed `OUTBOX_ALLOW_PRIVATE_TARGETS`. A newtype so clap treats the list as one value.
#[derive(Clone, Debug, Default)]
pub struct CidrList(pub Vec<IpNet>);

/// An entry of an allow list that is neither a CIDR nor a bare IP address.
#[derive(Debug, thiserror::Error)]
#[error("invalid CIDR or IP address {entry:?} in private-target allow list")]
pub struct AllowListError {
    pub entry: String,
    #[source]
    pub source: ipnet::AddrParseError,
}

impl CidrList {
    /// `OUTBOX_ALLOW_PRIVATE_TARGETS`-style text: comma-separated CIDRs or bare IPs (taken as
    /// /32 or /128), whitespace around entries ignored, empty text meaning none.
    pub fn parse(s: &str) -> Result<CidrList, AllowListError> {
        s.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| match entry.parse::<IpNet>() {
                Ok(net) => Ok(net),
                Err(source) => {
                    entry
                        .parse::<IpAddr>()
                        .map(IpNet::from)
                        .map_err(|_| AllowListError {
                            entry: entry.to_owned(),
                            source,
                        })
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(CidrList)
    }
}

fn parse_cidrs(raw: &str) -> Result<CidrList, String> {
    CidrList::parse(raw).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl RelayConfig {
    /// The limits for the relay's pooled connections; `None` behind a transaction pooler,
    /// which refuses the startup options that carry them.
    pub fn session_limits(&self) -> Option<SessionLimits> {
        (!self.behind_transaction_pooler()).then_some(SessionLimits {
            statement_timeout: self.statement_timeout,
            lock_timeout: self.lock_timeout,
            async_commit: self.async_commit,
        })
    }

    /// The same for the admin API's connections, which keep the server's commit setting
    /// (durable by default): what an admin was told is done (a new subscription, a replay)
    /// must survive a crash. Their
    /// statements may run longer (a large backfill): [`ADMIN_STATEMENT_TIMEOUT`].
    pub fn admin_session_limits(&self) -> Option<SessionLimits> {
        self.session_limits().map(|limits| SessionLimits {
            async_commit: false,
            statement_timeout: limits.statement_timeout.max(ADMIN_STATEMENT_TIMEOUT),
            ..limits
        })
    }

    /// Whether pooled connections go through a transaction-mode pooler, which allows no
    /// session state (startup options, LISTEN) on them.
    fn behind_transaction_pooler(&self) -> bool {
        self.db_pool_mode == POOL_MODE_TRANSACTION_POOLER
    }

    /// Cross-field rules. Each error names the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // clap accepts only these names; a config built in code could hold another.
        if ![POOL_MODE_DIRECT, POOL_MODE_TRANSACTION_POOLER].contains(&self.db_pool_mode.as_str()) {
            return Err(ConfigError(format!(
                "OUTBOX_DB_POOL_MODE {:?} is not a pool mode: use {POOL_MODE_DIRECT} or \
                 {POOL_MODE_TRANSACTION_POOLER}",
                self.db_pool_mode
            )));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval * 2 > self.lease_duration {
            return Err(ConfigError(format!(
                "heartbeat interval {:?} must be positive and at most half the lease duration {:?}: \
                 lower OUTBOX_HEARTBEAT_INTERVAL or raise OUTBOX_LEASE_DURATION",
                self.heartbeat_interval, self.lease_duration
            )));
        }
        if self.poll_interval.is_zero() {
            return Err(ConfigError("OUTBOX_POLL_INTERVAL must be positive".into()));
        }
        // Shorter would close connections between the publishes of a steady trickle.
        if self.broker_idle_timeout < Duration::from_secs(1) {
            return Err(ConfigError(
                "OUTBOX_BROKER_IDLE_TIMEOUT must be at least 1s".into(),
            ));
        }
        // Zero means "no limit" to PostgreSQL, the opposite of what a small value asks for.
        if self.statement_timeout.as_millis() == 0 || self.lock_timeout.as_millis() == 0 {
            return Err(ConfigError(
                "OUTBOX_STATEMENT_TIMEOUT and OUTBOX_LOCK_TIMEOUT must be at least 1ms".into(),
            ));
        }
        for (name, value) in [
            ("OUTBOX_DISPATCH_BATCH_SIZE", self.dispatch_batch_size),
            ("OUTBOX_DELIVERY_BATCH_SIZE", self.delivery_batch_size),
            ("OUTBOX_MAX_CONCURRENCY", self.max_concurrency),
            ("OUTBOX_FLUSH_BATCH_SIZE", self.flush_batch_size),
            ("OUTBOX_DB_POOL_SIZE", self.db_pool_size),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("{name} must be at least 1")));
            }
        }
        // LISTEN through a transaction pooler "works" but hears nothing: the LISTEN runs on
        // whichever server connection served it, which is then handed to other clients, and
        // the relay silently falls back to polling. Refuse instead of degrading quietly.
        if self.behind_transaction_pooler() && self.listen && self.listen_database_url.is_none() {
            return Err(ConfigError(
                "OUTBOX_DB_POOL_MODE=transaction-pooler: LISTEN cannot work through a \
                 transaction-mode pooler (it would silently never receive notifications). Set \
                 OUTBOX_LISTEN_DATABASE_URL to a direct connection to PostgreSQL for LISTEN, \
                 or OUTBOX_LISTEN=false to rely on polling alone"
                    .into(),
            ));
        }
        if let Some(retention) = self.retention
            && retention < MIN_RETENTION
        {
            return Err(ConfigError(format!(
                "OUTBOX_RETENTION {} is below the minimum of 1h: events must outlive the time \
                 an operator needs to look at them; unset it to keep everything",
                humantime::format_duration(retention)
            )));
        }
        // A blank token would leave the API off although the operator asked for it on.
        if self
            .admin_token
            .as_ref()
            .is_some_and(|token| token.expose_secret().trim().is_empty())
        {
            return Err(ConfigError(
                "OUTBOX_ADMIN_TOKEN is set but blank: give it a secret value to turn the admin \
                 API on, or unset it to keep the API off"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Defaults tuned for tests: short intervals so behaviour shows up quickly, loopback
    /// targets allowed, an ephemeral HTTP port.
    pub fn for_tests() -> RelayConfig {
        RelayConfig {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            allow_private_targets: CidrList(vec![
                "127.0.0.0/8".parse().expect("literal CIDR is valid"),
            ]),
            broker_ca_file: None,
            broker_idle_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_millis(200),
            busy_poll_interval: Duration::from_millis(1),
            busy_linger: Duration::from_millis(200),
            dispatch_batch_size: 100,
            delivery_batch_size: 100,
            max_concurrency: 64,
            lease_duration: Duration::from_secs(3),
            heartbeat_interval: Duration::from_millis(500),
            flush_interval: Duration::ZERO,
            flush_batch_size: 200,
            shutdown_grace: Duration::from_secs(5),
            db_pool_size: 6,
            relay_id: None,
            retention: None,
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(5),
            async_commit: true,
            admin_token: None,
            db_pool_mode: POOL_MODE_DIRECT.to_owned(),
            listen_database_url: None,
            listen: true,
        }
    }
}

/// `host:pid:start` — unique per process, readable in `lease_owner` by an operator.
pub fn default_relay_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".to_string());
    format!(
        "{host}:{}:{}",
        std::process::id(),
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_allow_list_forms() {
        assert!(CidrList::parse("").expect("empty ok").0.is_empty());
        assert!(CidrList::parse(" , ").expect("blank ok").0.is_empty());
        let list = CidrList::parse(" 10.0.0.0/8 ,127.0.0.1,  ::1 ,fd00::/8")
            .expect("valid list")
            .0;
        let expected: Vec<IpNet> = ["10.0.0.0/8", "127.0.0.1/32", "::1/128", "fd00::/8"]
            .iter()
            .map(|s| s.parse().expect("valid net"))
            .collect();
        assert_eq!(list, expected);
        let err = CidrList::parse("10.0.0.0/8, nonsense").expect_err("bad entry");
        assert_eq!(err.entry, "nonsense");
        assert!(CidrList::parse("10.0.0.0/33").is_err());
    }

    #[test]
    fn a_broker_idle_timeout_under_a_second_is_refused() {
        let mut config = RelayConfig::for_tests();
        config.validate().expect("the test settings are valid");
        config.broker_idle_timeout = Duration::from_millis(999);
        let error = config.validate().expect_err("too short");
        assert!(
            error.to_string().contains("OUTBOX_BROKER_IDLE_TIMEOUT"),
            "{error}"
        );
    }
}
