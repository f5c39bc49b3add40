//! Command line: `migrate`, `run`, `subscription …`, `replay`, `status`, `demo`. Parsing and
//! printing only; the work is in the library (`outbox_relay::admin` for the admin commands).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, anyhow};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Parser, Subcommand};
use futures::StreamExt as _;
use serde::Serialize;
use uuid::Uuid;

use outbox_relay::admin::{
    self, AdminError, NewSubscription, ReplayCriteria, SecretText, SubscriptionInfo,
    SubscriptionSettings, SubscriptionUpdate,
};
use outbox_relay::config::RelayConfig;
use outbox_relay::secret::SecretUrl;
use outbox_relay::telemetry::LogFormat;

/// `println!` that stops quietly when stdout is closed (`outbox-relay status | head`)
/// instead of panicking, and returns other write errors.
macro_rules! say {
    ($($arg:tt)*) => {
        write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` with the same care as [`say!`].
macro_rules! emit {
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*))
    };
}

fn write_stdout(text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("writing to stdout"),
    }
}

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
    fn require(&self) -> anyhow::Result<&str> {
        self.database_url
            .as_ref()
            .map(SecretUrl::expose_secret)
            .context(
                "DATABASE_URL is not set: export DATABASE_URL=postgres://user@host/db or pass --database-url",
            )
    }

    /// One connection for an admin command.
    async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
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
        /// Where events are POSTed: an http:// or https:// URL.
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
        /// New URL to POST to (http:// or https://).
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
    fn to_settings(&self) -> SubscriptionSettings {
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

fn parse_header(raw: &str) -> Result<Header, String> {
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

fn parse_json_object(raw: &str) -> Result<serde_json::Value, String> {
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

fn parse_schedule(raw: &str) -> Result<Schedule, String> {
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

fn parse_timestamp(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|error| {
            format!("{raw:?} is not an RFC 3339 time ({error}); e.g. 2026-11-23T12:00:00Z")
        })
}

pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate { database } => {
            let url = database.require()?;
            let report = outbox_relay::db::migrate(url).await?;
            let applied = report.applied_migrations();
            if applied.is_empty() {
                say!("schema outbox is up to date")?;
            } else {
                for migration in applied {
                    say!("applied {migration}")?;
                }
            }
            Ok(())
        }
        Command::Run {
            database,
            migrate,
            config,
        } => {
            let url = database.require()?;
            if migrate {
                outbox_relay::db::migrate(url).await?;
            }
            let listener = tokio::net::TcpListener::bind(config.http_addr)
                .await
                .with_context(|| {
                    format!(
                        "binding the HTTP listener on {} (OUTBOX_HTTP_ADDR)",
                        config.http_addr
                    )
                })?;
            let mut relay = outbox_relay::relay::start(config, url, listener).await?;
            let stop = relay.shutdown_token();
            tokio::spawn(async move {
                outbox_relay::shutdown::signal().await;
                stop.cancel();
            });
            relay.wait().await;
            Ok(())
        }
        Command::Subscription { database, command } => {
            let client = database.connect().await?;
            subscription(&client, command).await
        }
        Command::Replay { database, args } => {
            let client = database.connect().await?;
            replay(&client, args).await
        }
        Command::Status { database, json } => {
            let client = database.connect().await?;
            let report = admin::status(&client).await.map_err(explain)?;
            if json {
                print_json(&report)
            } else {
                emit!("{}", render_status(&report))?;
                Ok(())
            }
        }
        Command::Demo { database_url, once } => {
            let database_url = database_url.map(|url| url.expose_secret().to_owned());
            outbox_relay::demo::run(database_url, once).await
        }
    }
}

async fn subscription(
    client: &tokio_postgres::Client,
    command: SubscriptionCommand,
) -> anyhow::Result<()> {
    match command {
        SubscriptionCommand::Add {
            name,
            url,
            settings,
            secret,
            json,
        } => {
            let new = NewSubscription {
                name,
                url,
                secret: secret.map(SecretText::new),
                settings: settings.to_settings(),
            };
            let created = admin::create_subscription(client, &new)
                .await
                .map_err(explain)?;
            if json {
                return print_json(&created);
            }
            say!("created subscription {} (id {})", created.name, created.id)?;
            say!("secret: {}", created.secret.expose())?;
            say!(
                "Give this secret to the subscriber: it verifies the webhook-signature header with it. \
                 It is not shown again; `outbox-relay subscription rotate-secret {}` issues a new one.",
                created.name
            )?;
            Ok(())
        }
        SubscriptionCommand::List { json } => {
            let subscriptions = admin::list_subscriptions(client).await.map_err(explain)?;
            if json {
                print_json(&subscriptions)
            } else {
                emit!("{}", render_list(&subscriptions))?;
                Ok(())
            }
        }
        SubscriptionCommand::Show { name, json } => {
            let subscription = admin::get_subscription(client, &name)
                .await
                .map_err(explain)?;
            if json {
                print_json(&subscription)
            } else {
                emit!("{}", render_details(&subscription))?;
                Ok(())
            }
        }
        SubscriptionCommand::Update {
            name,
            url,
            settings,
            unordered,
            all_tenants,
            no_filter,
            no_rate_limit,
            no_headers,
        } => {
            let mut settings = settings.to_settings();
            if unordered {
                settings.ordered = Some(false);
            }
            if all_tenants {
                settings.tenant_id = Some(None);
            }
            if no_filter {
                settings.filter = Some(None);
            }
            if no_rate_limit {
                settings.rate_limit_per_second = Some(None);
            }
            if no_headers {
                settings.headers = Some(BTreeMap::new());
            }
            let update = SubscriptionUpdate { url, settings };
            if update.is_empty() {
                return Err(anyhow!(
                    "nothing to change: pass at least one setting, e.g. --url or --event-type \
                     (`outbox-relay subscription update --help` lists them)"
                ));
            }
            let updated = admin::update_subscription(client, &name, &update)
                .await
                .map_err(explain)?;
            say!("updated subscription {} (id {})", updated.name, updated.id)?;
            emit!("{}", render_details(&updated))?;
            Ok(())
        }
        SubscriptionCommand::Disable { name, reason } => {
            let disabled = admin::disable_subscription(client, &name, reason.as_deref())
                .await
                .map_err(explain)?;
            say!(
                "disabled subscription {} (id {}): events published from now on are not sent to it, \
                 and its open deliveries wait until `outbox-relay subscription enable {}`",
                disabled.name,
                disabled.id,
                disabled.name
            )?;
            Ok(())
        }
        SubscriptionCommand::Enable { name } => {
            let enabled = admin::enable_subscription(client, &name)
                .await
                .map_err(explain)?;
            say!(
                "enabled subscription {} (id {}): running relays resume delivering to it within a second",
                enabled.name,
                enabled.id
            )?;
            Ok(())
        }
        SubscriptionCommand::Remove { name, yes } => {
            if !yes {
                let open = admin::open_deliveries(client, &name)
                    .await
                    .map_err(explain)?;
                let consequence = if open == 0 {
                    "it would receive no further events".to_owned()
                } else {
                    format!(
                        "it would receive no further events and its {open} open {} (pending, in flight \
                         or failing) would become dead (their history is kept)",
                        plural(open, "delivery", "deliveries")
                    )
                };
                return Err(anyhow!(
                    "not removing subscription {name:?} without --yes: {consequence}. Pass --yes to \
                     remove it, or pause it instead with `outbox-relay subscription disable {name}`"
                ));
            }
            let removed = admin::remove_subscription(client, &name)
                .await
                .map_err(explain)?;
            say!(
                "removed subscription {} (id {}); {} open {} marked dead",
                removed.name,
                removed.id,
                removed.deliveries_ended,
                plural(removed.deliveries_ended, "delivery", "deliveries")
            )?;
            Ok(())
        }
        SubscriptionCommand::RotateSecret {
            name,
            overlap,
            secret,
            json,
        } => {
            let secret = secret.map(SecretText::new);
            let rotated = admin::rotate_secret(client, &name, overlap, secret.as_ref())
                .await
                .map_err(explain)?;
            if json {
                return print_json(&rotated);
            }
            say!(
                "rotated the secret of subscription {} (id {})",
                rotated.name,
                rotated.id
            )?;
            say!("new secret: {}", rotated.secret.expose())?;
            match rotated.previous_secret_expires_at {
                Some(until) => say!(
                    "Until {} ({} from now) every request is signed with both the new and the previous secret; \
                     give the new secret to the subscriber before then. It is not shown again.",
                    until.to_rfc3339_opts(SecondsFormat::Secs, true),
                    age(Some(overlap.as_secs_f64()))
                )?,
                None => say!(
                    "The previous secret no longer signs requests (no overlap); give the new secret to the \
                     subscriber now. It is not shown again."
                )?,
            }
            Ok(())
        }
    }
}

async fn replay(client: &tokio_postgres::Client, args: ReplayArgs) -> anyhow::Result<()> {
    let criteria = ReplayCriteria {
        statuses: args.statuses,
        subscription: args.subscription,
        event_type: args.event_type,
        tenant_id: args.tenant_id,
        created_after: args.created_after,
        created_before: args.created_before,
        event_ids: args.event_ids,
        max_events: args.max_events,
        requested_by: args.requested_by.filter(|who| !who.trim().is_empty()),
        reason: args.reason,
        dry_run: args.dry_run,
    };
    let outcome = admin::replay(client, &criteria).await.map_err(explain)?;
    if args.json {
        return print_json(&outcome);
    }
    let deliveries = plural(outcome.matched, "delivery", "deliveries");
    if outcome.dry_run {
        say!(
            "replay {}: would re-queue {} {deliveries} (dry run: nothing changed)",
            outcome.replay_id,
            outcome.matched
        )?;
    } else {
        say!(
            "replay {}: {} {deliveries} re-queued",
            outcome.replay_id,
            outcome.matched
        )?;
    }
    Ok(())
}

/// Adds what a person at a terminal can do about an admin error; database failures keep
/// their cause chain.
fn explain(error: AdminError) -> anyhow::Error {
    match &error {
        AdminError::NotFound { .. } => {
            anyhow!("{error}; `outbox-relay subscription list` shows the existing subscriptions")
        }
        AdminError::Duplicate { name } => anyhow!(
            "{error}; choose another name, or change the existing one with `outbox-relay subscription update {name}`"
        ),
        AdminError::Invalid { field, .. } => match flag_for(field) {
            Some(flag) => anyhow!("{error} (check {flag})"),
            None => anyhow!("{error}"),
        },
        AdminError::SchemaOutdated { .. } | AdminError::Db(_) => anyhow::Error::new(error),
    }
}

fn flag_for(field: &str) -> Option<&'static str> {
    Some(match field {
        "name" => "NAME",
        "url" => "--url",
        "event_types" => "--event-type",
        "tenant_id" => "--tenant-id",
        "filter" => "--filter",
        "headers" => "--header",
        "timeout" => "--timeout",
        "max_in_flight" => "--max-in-flight",
        "rate_limit_per_second" => "--rate-limit",
        "retry_schedule" => "--retry-schedule",
        "secret" => "--secret",
        "status" => "--status",
        _ => return None,
    })
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("serializing the output as JSON")?;
    say!("{text}")?;
    Ok(())
}

fn plural(n: i64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

fn render_list(subscriptions: &[SubscriptionInfo]) -> String {
    if subscriptions.is_empty() {
        return "no subscriptions yet; create one with `outbox-relay subscription add NAME --url URL`\n"
            .to_owned();
    }
    let mut table = Table::new([
        "ID",
        "NAME",
        "ENABLED",
        "URL",
        "EVENT TYPES",
        "TENANT",
        "MAX IN FLIGHT",
    ]);
    for s in subscriptions {
        table.row([
            s.id.to_string(),
            s.name.clone(),
            yes_no(s.enabled).to_owned(),
            s.url.clone(),
            s.event_types.join(","),
            s.tenant_id.clone().unwrap_or_else(|| "(all)".to_owned()),
            s.max_in_flight.to_string(),
        ]);
    }
    table.render()
}

fn render_details(s: &SubscriptionInfo) -> String {
    let schedule = if s.retry_schedule.is_empty() {
        "none (a single attempt)".to_owned()
    } else {
        s.retry_schedule
            .iter()
            .map(|wait| humantime::format_duration(*wait).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let enabled = match (&s.enabled, &s.disabled_reason) {
        (true, _) => "yes".to_owned(),
        (false, Some(reason)) => format!("no ({reason})"),
        (false, None) => "no".to_owned(),
    };
    let headers = if s.headers.is_empty() {
        "(none)".to_owned()
    } else {
        s.headers
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut fields = vec![
        ("id", s.id.to_string()),
        ("name", s.name.clone()),
        ("url", s.url.clone()),
        ("enabled", enabled),
        ("event types", s.event_types.join(",")),
        (
            "tenant",
            s.tenant_id.clone().unwrap_or_else(|| "(all)".to_owned()),
        ),
        (
            "filter",
            s.filter
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), ToString::to_string),
        ),
        ("headers", headers),
        ("timeout", humantime::format_duration(s.timeout).to_string()),
        ("max in flight", s.max_in_flight.to_string()),
        (
            "rate limit",
            s.rate_limit_per_second
                .map_or_else(|| "unlimited".to_owned(), |r| format!("{r}/s")),
        ),
        ("retry schedule", schedule),
        ("ordered", yes_no(s.ordered).to_owned()),
    ];
    if let Some(until) = s.previous_secret_expires_at {
        fields.push((
            "previous secret",
            format!(
                "still signing until {}",
                until.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
        ));
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in fields {
        let _ = writeln!(out, "  {key:<width$}  {value}");
    }
    out
}

fn render_status(report: &admin::StatusReport) -> String {
    let mut out = String::new();
    let backlog = &report.backlog;
    let _ = writeln!(
        out,
        "Backlog: {} {} waiting to be dispatched{}, {} scheduled for later",
        backlog.undispatched_events,
        plural(backlog.undispatched_events, "event", "events"),
        backlog
            .oldest_undispatched_age_seconds
            .map_or_else(String::new, |oldest| format!(
                " (oldest {})",
                age(Some(oldest))
            )),
        backlog.scheduled_events,
    );
    out.push('\n');
    if report.subscriptions.is_empty() {
        out.push_str("Subscriptions: none\n");
    } else {
        let mut table = Table::new([
            "SUBSCRIPTION",
            "ENABLED",
            "PENDING",
            "IN FLIGHT",
            "FAILING",
            "DEAD",
            "OLDEST PENDING",
        ]);
        for s in &report.subscriptions {
            table.row([
                s.name.clone(),
                yes_no(s.enabled).to_owned(),
                s.pending.to_string(),
                s.in_flight.to_string(),
                s.failing.to_string(),
                s.dead.to_string(),
                age(s.oldest_pending_age_seconds),
            ]);
        }
        out.push_str(&table.render());
    }
    out.push('\n');
    if report.recent_replays.is_empty() {
        out.push_str("Recent replays: none\n");
    } else {
        out.push_str("Recent replays:\n");
        let mut table = Table::new(["ID", "REQUESTED AT", "BY", "MATCHED", "DRY RUN", "REASON"]);
        for r in &report.recent_replays {
            table.row([
                r.id.to_string(),
                r.requested_at.to_rfc3339_opts(SecondsFormat::Secs, true),
                r.requested_by.clone(),
                r.matched.to_string(),
                yes_no(r.dry_run).to_owned(),
                r.reason.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&table.render());
    }
    out
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

/// A compact age with its two largest units, a zero second one left out: `45s`, `3m 12s`,
/// `2h 5m`, `1d`, `3d 4h`; `-` for none.
fn age(seconds: Option<f64>) -> String {
    let Some(seconds) = seconds else {
        return "-".to_owned();
    };
    // Saturating float-to-int cast: negative (clock skew) becomes 0.
    let total = seconds.max(0.0) as u64;
    let (days, hours, minutes, secs) = (
        total / 86_400,
        total % 86_400 / 3_600,
        total % 3_600 / 60,
        total % 60,
    );
    let units = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")];
    let largest = units.iter().position(|(n, _)| *n > 0).unwrap_or(3);
    let (n, unit) = units[largest];
    match units.get(largest + 1) {
        Some((next, next_unit)) if *next > 0 => format!("{n}{unit} {next}{next_unit}"),
        _ => format!("{n}{unit}"),
    }
}

/// Left-aligned columns separated by two spaces; enough for a terminal, no dependency.
struct Table<const N: usize> {
    header: [&'static str; N],
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    fn new(header: [&'static str; N]) -> Self {
        Self {
            header,
            rows: Vec::new(),
        }
    }

    fn row(&mut self, row: [String; N]) {
        self.rows.push(row);
    }

    fn render(&self) -> String {
        let mut widths = self.header.map(|h| h.chars().count());
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header = self.header.map(str::to_owned);
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (cell, width) in row.iter().zip(widths) {
                let _ = write!(line, "{cell:<width$}  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_use_their_two_largest_units() {
        assert_eq!(age(None), "-");
        assert_eq!(age(Some(-3.0)), "0s");
        assert_eq!(age(Some(45.9)), "45s");
        assert_eq!(age(Some(192.0)), "3m 12s");
        assert_eq!(age(Some(7_500.0)), "2h 5m");
        assert_eq!(age(Some(273_600.0)), "3d 4h");
        assert_eq!(age(Some(86_400.0)), "1d");
        assert_eq!(age(Some(7_205.0)), "2h");
        assert_eq!(age(Some(0.2)), "0s");
    }

    #[test]
    fn tables_align_columns() {
        let mut table = Table::new(["ID", "NAME"]);
        table.row(["1".to_owned(), "crm".to_owned()]);
        table.row(["1234".to_owned(), "x".to_owned()]);
        assert_eq!(table.render(), "ID    NAME\n1     crm\n1234  x\n");
    }

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
