//! Rows the tests and the benchmark write into the outbox schema to set a scene.

use anyhow::Context;

/// Inserts a subscription with extra column assignments given as SQL values, e.g.
/// `("event_types", "'{lead.*}'")` or `("max_in_flight", "64")`. Returns (id, secret).
pub async fn add_subscription(
    client: &tokio_postgres::Client,
    name: &str,
    url: &str,
    columns: &[(&str, &str)],
) -> anyhow::Result<(i64, String)> {
    let mut names = String::from("name, url");
    let mut values = String::from("$1, $2");
    for (column, value) in columns {
        names.push_str(", ");
        names.push_str(column);
        values.push_str(", ");
        values.push_str(value);
    }
    let row = client
        .query_one(
            &format!(
                "INSERT INTO outbox.subscriptions ({names}) VALUES ({values}) RETURNING id, secret"
            ),
            &[&name, &url],
        )
        .await
        .with_context(|| format!("adding subscription {name}"))?;
    Ok((row.get(0), row.get(1)))
}
