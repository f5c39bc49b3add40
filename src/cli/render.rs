//! How results look on a terminal: tables, details, status, ages; `--json` for scripts.

use super::*;

pub(super) fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("serializing the output as JSON")?;
    say!("{text}")?;
    Ok(())
}

pub(super) fn plural(n: i64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

pub(super) fn render_list(subscriptions: &[SubscriptionInfo]) -> String {
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

pub(super) fn render_details(s: &SubscriptionInfo) -> String {
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

pub(super) fn render_status(report: &admin::StatusReport) -> String {
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

pub(super) fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

/// A compact age with its two largest units, a zero second one left out: `45s`, `3m 12s`,
/// `2h 5m`, `1d`, `3d 4h`; `-` for none.
pub(super) fn age(seconds: Option<f64>) -> String {
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
pub(super) struct Table<const N: usize> {
    header: [&'static str; N],
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    pub(super) fn new(header: [&'static str; N]) -> Self {
        Self {
            header,
            rows: Vec::new(),
        }
    }

    pub(super) fn row(&mut self, row: [String; N]) {
        self.rows.push(row);
    }

    pub(super) fn render(&self) -> String {
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
}
