//! What each command does: connect, call the library, print the outcome or explain the error.

use super::*;

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

pub(super) async fn subscription(
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

pub(super) async fn replay(
    client: &tokio_postgres::Client,
    args: ReplayArgs,
) -> anyhow::Result<()> {
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
pub(super) fn explain(error: AdminError) -> anyhow::Error {
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

pub(super) fn flag_for(field: &str) -> Option<&'static str> {
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
