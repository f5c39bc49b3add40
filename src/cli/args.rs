//! What the command line accepts (clap) and the parsers of its values.

use super::*;

#[derive(Parser, Debug)]
#[command(
    name = "outbox-relay",
    version,
    about = "Transactional outbox relay for PostgreSQL: delivers committed outbox.events rows as signed webhooks."
)]
pub struct Cli {
    /// Log format: text for people, json for log pipelines. Level: RUST_LOG (default info).
    #[arg(
        long,
        env = "OUTBOX_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply the embedded migrations (idempotent; safe to run from several relays at once).
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Run the relay and its HTTP listener (/healthz, /readyz, /metrics) until SIGTERM/SIGINT.
    /// Safe to run several instances against one database.
    Run {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Apply migrations before starting.
        #[arg(long, env = "OUTBOX_MIGRATE_ON_START", default_value_t = false)]
        migrate: bool,
        #[command(flatten)]
        config: RelayConfig,
    },
    /// Manage subscriptions: who receives which events, at which URL, with which limits.
    /// Changes reach running relays within a second.
    Subscription {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        command: SubscriptionCommand,
    },
    /// Re-queue deliveries (by default the dead ones) so they are sent again with a fresh
    /// attempt budget: the same criteria as the SQL function outbox.replay. Every replay,
    /// dry runs included, is recorded in outbox.replays.
    Replay {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        args: ReplayArgs,
    },
    /// Backlog, failures and subscription health at a glance.
    Status {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Print JSON (for scripts) instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Quick start: a throwaway PostgreSQL (unless DATABASE_URL is set), the relay, a
    /// verifying receiver and a few sample events. Runs until Ctrl-C, then cleans up.
    Demo {
        /// Use this database instead of starting a throwaway one.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: Option<SecretUrl>,
        /// Publish the sample events, show them delivered, and exit instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL, e.g. postgres://relay@db.internal/app. TLS as in libpq:
    /// ?sslmode=verify-full&sslrootcert=/path/to/ca.pem (also sslcert, sslkey)
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<SecretUrl>,
}

impl DatabaseArgs {
    /// The URL with its password, to connect with; errors show [`SecretUrl`]'s masked form.
    pub(super) fn require(&self) -> anyhow::Result<&str> {
        self.database_url
            .as_ref()
            .map(SecretUrl::expose_secret)
            .context(
                "DATABASE_URL is not set: export DATABASE_URL=postgres://user@host/db or pass --database-url",
            )
    }

    /// One connection for an admin command.
    pub(super) async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let url = self.require()?;
        let (client, connection) = outbox_relay::db::parse_url(url)?
            .connect()
            .await
            .context(
                "connecting to the database: check that DATABASE_URL is right and PostgreSQL is reachable",
            )?;
        // Drive the connection ourselves so the database's notices (e.g. "only the first N
        // deliveries were re-queued") reach the operator instead of vanishing.
        let mut connection = connection;
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notice(notice)) => {
                        eprintln!("note: {}", notice.message());
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "database connection ended with an error");
                        break;
                    }
                }
            }
        });
        Ok(client)
    }
}

#[derive(Subcommand, Debug)]
pub enum SubscriptionCommand {
    /// Create a subscription and print its signing secret (shown this once).
    ///
    /// Example: outbox-relay subscription add ai-agents --url https://agents.internal/hooks
    /// --event-type 'lead.*' --event-type invoice.paid
    Add {
        /// Unique name of the subscribing service (letters, digits and . _ : -); events with
        /// target_services name subscriptions by it.
        name: String,
        /// Where events go: an http:// or https:// URL (a signed POST per event), or a broker
        /// target: nats://host:4222/subject (JetStream), redis://host:6379/0?stream=S[&maxlen=N]
        /// (or rediss://), amqp://user:pass@host:5672/vhost?exchange=E[&routing_key=K] (or
        /// amqps://), kafka://host:9092[,host:9092...]/topic. A password in it is shown as ***.
        #[arg(long)]
        url: SecretUrl,
        #[command(flatten)]
        settings: SettingsArgs,
        /// Use this signing secret (whsec_ + base64 of at least 16 bytes) instead of
        /// generating one.
        #[arg(long, value_name = "WHSEC")]
        secret: Option<String>,
        /// Print JSON {id, name, secret} instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List subscriptions (never their secrets).
    List {
        /// Print JSON (every setting) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show every setting of one subscription (never its secret).
    Show {
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Change settings of a subscription; settings not given stay as they are. New values
    /// apply to deliveries sent from then on, including retries of earlier events.
    Update {
        /// Name of the subscription to change.
        name: String,
        /// New target URL: http(s)://, nats://, redis(s)://, amqp(s):// (see `add --help`).
        #[arg(long)]
        url: Option<SecretUrl>,
        #[command(flatten)]
        settings: SettingsArgs,
        /// Deliver without ordering again (undoes --ordered).
        #[arg(long, conflicts_with = "ordered")]
        unordered: bool,
        /// Receive the events of every tenant again (undoes --tenant-id).
        #[arg(long, conflicts_with = "tenant_id")]
        all_tenants: bool,
        /// Drop the payload filter (undoes --filter).
        #[arg(long, conflicts_with = "filter")]
        no_filter: bool,
        /// Remove the rate limit (undoes --rate-limit).
        #[arg(long, conflicts_with = "rate_limit")]
        no_rate_limit: bool,
        /// Remove every static header (undoes --header).
        #[arg(long, conflicts_with = "headers")]
        no_headers: bool,
    },
    /// Stop delivering to a subscription. Events published while it is disabled are not
    /// fanned out to it (backfill can catch it up later); its open deliveries wait until it
    /// is enabled again.
    Disable {
        name: String,
        /// Why, kept in disabled_reason for whoever looks next.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume delivering to a subscription (also one the relay disabled after HTTP 410);
    /// clears disabled_reason.
    Enable { name: String },
    /// Delete a subscription. Its open deliveries (pending, in flight, failing) become dead;
    /// its delivery history is kept. Needs --yes.
    Remove {
        name: String,
        /// Confirm: the subscription's open deliveries become dead and it receives nothing
        /// more.
        #[arg(long)]
        yes: bool,
    },
    /// Replace the signing secret and print the new one (shown this once). During the
    /// overlap every request carries two signatures, under the new and the previous
    /// secret, so the subscriber can switch keys without refusing a webhook.
    RotateSecret {
        name: String,
        /// How long the previous secret keeps signing, e.g. 24h, 30m; 0s switches at once.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
        overlap: Duration,
        /// Use this secret (whsec_ + base64 of at least 16 bytes) instead of generating one.
        #[arg(long, value_name = "WHSEC")]
        secret: Option<String>,
        /// Print JSON {id, name, secret, previous_secret_expires_at} instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Settings of `subscription add` and `subscription update`.
#[derive(clap::Args, Debug)]
pub struct SettingsArgs {
    /// Event types to receive: exact names or globs with * (e.g. 'lead.*'). Repeat the flag
    /// or separate with commas. Default on add: every type. On update: replaces the list.
    #[arg(long = "event-type", value_name = "PATTERN", value_delimiter = ',')]
    pub event_types: Vec<String>,
    /// Receive only this tenant's events (default: every tenant).
    #[arg(long, value_name = "TENANT")]
    pub tenant_id: Option<String>,
    /// Receive only events whose payload contains this JSON object, e.g. '{"plan":"pro"}'
    /// (default: every payload).
    #[arg(long, value_name = "JSON", value_parser = parse_json_object)]
    pub filter: Option<serde_json::Value>,
    /// Static request header NAME=VALUE; repeat for more. On update: replaces all headers.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<Header>,
    /// Per-request timeout, 100ms to 5m (default 15s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Concurrent requests to this subscriber, counted across all relays, 1 to 10000
    /// (default 64).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_in_flight: Option<i32>,
    /// Requests per second, per relay (default: unlimited).
    #[arg(long, value_name = "PER_SECOND", allow_negative_numbers = true)]
    pub rate_limit: Option<f32>,
    /// Waits between attempts, comma-separated, each with ±20 % jitter; attempts = 1 + their
    /// number. 'none' = a single attempt. Default 5s,5m,30m,2h,5h,10h,10h.
    #[arg(long, value_name = "WAITS", value_parser = parse_schedule)]
    pub retry_schedule: Option<Schedule>,
    /// Per ordering_key, deliver one event at a time, in order.
    #[arg(long)]
    pub ordered: bool,
}

impl SettingsArgs {
    pub(super) fn to_settings(&self) -> SubscriptionSettings {
        SubscriptionSettings {
            event_types: (!self.event_types.is_empty()).then(|| self.event_types.clone()),
            tenant_id: self.tenant_id.clone().map(Some),
            filter: self.filter.clone().map(Some),
            headers: (!self.headers.is_empty()).then(|| {
                self.headers
                    .iter()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect::<BTreeMap<_, _>>()
            }),
            timeout: self.timeout,
            max_in_flight: self.max_in_flight,
            rate_limit_per_second: self.rate_limit.map(Some),
            retry_schedule: self.retry_schedule.as_ref().map(|s| s.0.clone()),
            ordered: self.ordered.then_some(true),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Header {
    name: String,
    value: String,
}

pub(super) fn parse_header(raw: &str) -> Result<Header, String> {
    let (name, value) = raw
        .split_once('=')
        .ok_or_else(|| format!("{raw:?} is not NAME=VALUE, e.g. --header X-Team=crm"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{raw:?} has no header name before '='"));
    }
    Ok(Header {
        name: name.to_owned(),
        value: value.to_owned(),
    })
}

pub(super) fn parse_json_object(raw: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str(raw) {
        Ok(value @ serde_json::Value::Object(_)) => match admin::nul_path(&value) {
            Some(path) => Err(format!(
                "{} {}",
                if path.is_empty() { "a key" } else { &path },
                admin::NUL_PROBLEM
            )),
            None => Ok(value),
        },
        Ok(_) => Err(format!(
            "{raw:?} is JSON but not an object; give an object such as '{{\"plan\":\"pro\"}}'"
        )),
        Err(error) => Err(format!(
            "not valid JSON ({error}); give an object such as '{{\"plan\":\"pro\"}}'"
        )),
    }
}

/// Waits between attempts.
#[derive(Clone, Debug)]
pub struct Schedule(Vec<Duration>);

pub(super) fn parse_schedule(raw: &str) -> Result<Schedule, String> {
    let raw = raw.trim();
    if raw.is_empty() || raw.eq_ignore_ascii_case("none") {
        return Ok(Schedule(Vec::new()));
    }
    raw.split(',')
        .map(|wait| {
            humantime::parse_duration(wait.trim())
                .map_err(|error| format!("{wait:?} is not a duration like 5s, 5m or 2h ({error})"))
        })
        .collect::<Result<_, _>>()
        .map(Schedule)
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// Delivery statuses to re-queue, comma-separated: dead, failing, delivered, …
    /// (default: dead).
    #[arg(long = "status", value_name = "STATUS", value_delimiter = ',')]
    pub statuses: Vec<String>,
    /// Only deliveries of this subscription.
    #[arg(long, value_name = "NAME")]
    pub subscription: Option<String>,
    /// Only events of this type: an exact name or a glob such as 'lead.*'.
    #[arg(long, value_name = "GLOB")]
    pub event_type: Option<String>,
    /// Only events of this tenant.
    #[arg(long, value_name = "TENANT")]
    pub tenant_id: Option<String>,
    /// Only events created at or after this time (RFC 3339, e.g. 2026-11-23T12:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub created_after: Option<DateTime<Utc>>,
    /// Only events created before this time (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub created_before: Option<DateTime<Utc>>,
    /// Only these events (their event_id); repeat or separate with commas.
    #[arg(long = "event-id", value_name = "UUID", value_delimiter = ',')]
    pub event_ids: Vec<Uuid>,
    /// Re-queue at most this many deliveries (default 10000).
    #[arg(long, value_name = "N")]
    pub max_events: Option<i32>,
    /// Who asks, recorded in outbox.replays (default: $USER, else the database user).
    #[arg(long, value_name = "WHO", env = "USER")]
    pub requested_by: Option<String>,
    /// Why, recorded in outbox.replays.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Count what would be re-queued without changing anything (still recorded).
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON {replay_id, matched, dry_run} instead of text.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn parse_timestamp(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|error| {
            format!("{raw:?} is not an RFC 3339 time ({error}); e.g. 2026-11-23T12:00:00Z")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_durations_or_none() {
        let parsed = parse_schedule("5s, 5m,2h").expect("valid schedule");
        assert_eq!(
            parsed.0,
            [
                Duration::from_secs(5),
                Duration::from_secs(300),
                Duration::from_secs(7200)
            ]
        );
        assert!(parse_schedule("none").expect("none").0.is_empty());
        assert!(parse_schedule("5s,soon").is_err());
    }

    #[test]
    fn headers_and_filters_are_checked_while_parsing() {
        let header = parse_header("X-Team=crm=1").expect("valid header");
        assert_eq!(
            (header.name.as_str(), header.value.as_str()),
            ("X-Team", "crm=1")
        );
        assert!(parse_header("X-Team").is_err());
        assert!(parse_json_object(r#"{"plan":"pro"}"#).is_ok());
        assert!(parse_json_object("[1]").is_err());
        assert!(parse_json_object("{oops").is_err());
        let nul = parse_json_object(r#"{"plan":{"tier":"pro\u0000"}}"#).unwrap_err();
        assert!(nul.contains("plan.tier") && nul.contains("NUL"), "{nul}");
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
