//! The alert rules (promtool check and unit tests) and the Grafana dashboard, against what a
//! real relay exposes.

use super::*;

pub(super) const ALERTS: &str = "prometheus/alerts.yml";

pub(super) const ALERT_TESTS: &str = "prometheus/alerts.test.yml";

pub(super) const DASHBOARD: &str = "grafana/outbox-relay.json";

/// Series Prometheus itself adds to every target: never on /metrics, always queryable.
pub(super) const SYNTHETIC_SERIES: &[&str] = &["up"];

/// Runs promtool; `None` when it cannot run and OUTBOX_ALLOW_MISSING_TOOLS=1 says to skip.
pub(super) fn promtool(args: &[&str]) -> Option<Output> {
    match Command::new("promtool").args(args).output() {
        Ok(output) => Some(output),
        Err(error) => {
            crate::harness::tools::missing_tool(
                "promtool",
                "the alert rule tests",
                "`apt-get install -y --no-install-recommends prometheus`",
                &error.to_string(),
            );
            None
        }
    }
}

/// False when promtool is missing and the check was skipped.
pub(super) fn assert_promtool_succeeds(args: &[&str]) -> bool {
    let Some(output) = promtool(args) else {
        return false;
    };
    assert!(
        output.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    true
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let alerts = deploy_file(ALERTS);
    let tests = deploy_file(ALERT_TESTS);
    let alerts = alerts.to_str().expect("UTF-8 path");
    let tests = tests.to_str().expect("UTF-8 path");
    if assert_promtool_succeeds(&["check", "rules", alerts]) {
        assert_promtool_succeeds(&["test", "rules", tests]);
    }
}

/// The metric names a PromQL expression selects: not functions, aggregations, keywords,
/// label names (in `{…}` or `by (…)`), strings, ranges (`[5m]`, `[$__rate_interval]`) or
/// numbers.
pub(super) fn metric_names(expr: &str) -> BTreeSet<String> {
    // Blank out strings, label matchers and ranges; what is left are names and operators.
    let mut outside = String::with_capacity(expr.len());
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.saturating_sub(1),
            _ if depth > 0 => continue,
            _ => {
                outside.push(c);
                continue;
            }
        }
        outside.push(' ');
    }

    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = outside.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || c == '.' {
            // A number or a duration (1e3, 0.95, 5m): letters after digits belong to it.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !(c.is_ascii_alphabetic() || c == '_' || c == ':') {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
        {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let mut next = i;
        while next < chars.len() && chars[next].is_whitespace() {
            next += 1;
        }
        let called = chars.get(next) == Some(&'(');
        if called && LABEL_LISTS.contains(&word.as_str()) {
            // Skip the label list `(le, subscription)`.
            i = next;
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            continue;
        }
        if called || KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
            continue;
        }
        names.insert(word);
    }
    names
}

#[test]
fn metric_names_are_what_an_expression_selects() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"sum by (outcome) (rate(outbox_deliveries_total{instance=~"$instance", outcome="dead"}[$__rate_interval]))"#,
            &["outbox_deliveries_total"],
        ),
        (
            "histogram_quantile(0.95, sum by (le, subscription) (rate(outbox_delivery_lag_seconds_bucket[5m])))",
            &["outbox_delivery_lag_seconds_bucket"],
        ),
        (r#"absent(up{job="outbox-relay"})"#, &["up"]),
        (
            "max(a_gauge) > 600 and on (instance) b_total offset 5m",
            &["a_gauge", "b_total"],
        ),
        (
            "process_resident_memory_bytes / 1e6",
            &["process_resident_memory_bytes"],
        ),
        (
            r#"label_replace(x:recorded, "dst", "not_a_metric } { [", "src", "(.*)")"#,
            &["x:recorded"],
        ),
        (
            r#"max without (instance) (outbox_subscription_disabled) == bool 1"#,
            &["outbox_subscription_disabled"],
        ),
    ];
    for (expr, expected) in cases {
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(metric_names(expr), expected, "{expr}");
    }
}

/// The `expr:` of every rule in alerts.yml. Only one-line expressions are read: a block
/// scalar (`expr: |`) fails here rather than being checked by half.
pub(super) fn alert_exprs() -> Vec<String> {
    let text = read(&deploy_file(ALERTS));
    let exprs: Vec<String> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("expr:"))
        .map(|expr| {
            let expr = expr.trim();
            assert!(
                !expr.is_empty() && !expr.starts_with('|') && !expr.starts_with('>'),
                "{ALERTS}: write each expr on one line so this test can read it: {expr:?}"
            );
            expr.to_string()
        })
        .collect();
    let rules = text
        .lines()
        .filter(|line| line.trim().starts_with("- alert:"))
        .count();
    assert!(rules > 0, "{ALERTS} has no alerts");
    assert_eq!(exprs.len(), rules, "one expr per alert in {ALERTS}");
    exprs
}

/// Checks the dashboard's shape and returns (panel title, expr) of every query. Rows only
/// group panels (a collapsed row holds them in its own `panels`): they need no query.
pub(super) fn dashboard_exprs() -> Vec<(String, String)> {
    let dashboard: Value =
        serde_json::from_str(&read(&deploy_file(DASHBOARD))).expect("dashboard is JSON");
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 39,
        "schemaVersion"
    );
    assert!(
        dashboard["__inputs"]
            .as_array()
            .is_some_and(|inputs| inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS")),
        "the dashboard asks for its Prometheus data source on import (DS_PROMETHEUS)"
    );
    fn walk(panels: &Value, ids: &mut BTreeSet<u64>, exprs: &mut Vec<(String, String)>) {
        for panel in panels.as_array().expect("panels is a list") {
            let id = panel["id"].as_u64().expect("every panel has a numeric id");
            assert!(ids.insert(id), "panel id {id} is used twice");
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(!title.trim().is_empty(), "panel {id} has no title");
            if panel["type"] == "row" {
                if let Some(nested) = panel.get("panels") {
                    walk(nested, ids, exprs);
                }
                continue;
            }
            let targets = panel["targets"].as_array().map(Vec::as_slice);
            assert!(
                targets.is_some_and(|t| !t.is_empty()),
                "panel {id} {title:?} has no target"
            );
            for target in targets.unwrap_or_default() {
                let expr = target["expr"].as_str().unwrap_or_default();
                assert!(
                    !expr.trim().is_empty(),
                    "panel {id} {title:?} has a target without expr"
                );
                exprs.push((title.to_string(), expr.to_string()));
            }
        }
    }
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    walk(&dashboard["panels"], &mut ids, &mut exprs);
    assert!(!exprs.is_empty(), "the dashboard queries nothing");
    exprs
}

#[test]
fn dashboard_panels_have_unique_ids_titles_and_queries() {
    let exprs = dashboard_exprs();
    for (title, expr) in &exprs {
        assert!(
            !metric_names(expr).is_empty(),
            "panel {title:?} selects no metric: {expr}"
        );
    }
}

/// Names of the series in a Prometheus text exposition.
pub(super) fn scraped_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

pub(super) async fn scrape(url: &str) -> String {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .expect("metrics body")
}

/// A relay that has delivered, failed, given up, seen a disabled subscription and a
/// database error: then every labelled series exists, and every name an alert or a panel
/// queries must be among them.
#[tokio::test]
async fn every_metric_the_alerts_and_dashboard_query_is_exposed_by_a_real_relay() {
    let db = TestDb::new().await;
    let receiver = ok_and_broken_subscribers(&db).await;
    add_subscription(
        &db,
        "paused",
        &receiver.url("/ok"),
        &[
            ("enabled", "false"),
            ("disabled_reason", "'deploy kit test'"),
        ],
    )
    .await;
    let relay = spawn_default_relay(&db).await;
    publish(&db, "lead.created", json!({ "n": 1 })).await;
    wait_for_statuses(&db, "delivered", 1).await;
    wait_for_statuses(&db, "dead", 1).await;

    let url = format!("http://{}/metrics", relay.http_addr);
    wait_until("the gauges show the dead delivery", DEADLINE, || async {
        let text = scrape(&url).await;
        text.contains("outbox_dead_deliveries{subscription=\"broken\"} 1")
            && text.contains("outbox_subscription_disabled{subscription=\"paused\"} 1")
    })
    .await;

    // A real database error, so outbox_db_errors_total has a series: the gauge refresh
    // fails while the table it reads is gone.
    let client = db.client().await;
    client
        .batch_execute("ALTER TABLE outbox.subscriptions RENAME TO subscriptions_away")
        .await
        .expect("hide subscriptions");
    wait_until("a database error is counted", DEADLINE, || async {
        scrape(&url).await.contains("outbox_db_errors_total{")
    })
    .await;
    client
        .batch_execute("ALTER TABLE outbox.subscriptions_away RENAME TO subscriptions")
        .await
        .expect("restore subscriptions");

    let scraped = scraped_names(&scrape(&url).await);
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for expr in alert_exprs() {
        for name in metric_names(&expr) {
            used.entry(name)
                .or_default()
                .insert(format!("{ALERTS}: {expr}"));
        }
    }
    for (title, expr) in dashboard_exprs() {
        for name in metric_names(&expr) {
            used.entry(name)
                .or_default()
                .insert(format!("{DASHBOARD} {title:?}: {expr}"));
        }
    }
    let unknown: Vec<String> = used
        .iter()
        .filter(|(name, _)| {
            !scraped.contains(name.as_str()) && !SYNTHETIC_SERIES.contains(&name.as_str())
        })
        .map(|(name, places)| {
            format!(
                "{name}, used in:\n    {}",
                Vec::from_iter(places.iter().cloned()).join("\n    ")
            )
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "not on /metrics of a relay:\n{}\nscraped: {scraped:?}",
        unknown.join("\n")
    );
    relay.shutdown().await;
}

// --- The deployment files against the relay they deploy -------------------------------
//
// deploy/check validates these files against their formats' schemas; the tests below check
// what no schema knows: every environment variable they set is one the subcommand they run
// reads, the probes ask a real relay's endpoints, and ports, user ids and stop timeouts
// agree with each other and with the relay's shutdown grace.
