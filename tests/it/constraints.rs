//! Bad rows are refused at INSERT, so the producer's own transaction fails loudly instead of
//! an event being lost later. Each case names the constraint an operator will see.

use crate::harness::db::TestDb;

/// Runs `sql` expecting a CHECK/unique violation whose message names `constraint`.
async fn refused(db: &TestDb, sql: &str, constraint: &str) {
    refused_in(&db.client().await, sql, constraint).await;
}

/// [`refused`], in a given session.
async fn refused_in(client: &deadpool_postgres::Client, sql: &str, constraint: &str) {
    let error = client
        .batch_execute(sql)
        .await
        .expect_err(&format!("accepted: {sql}"));
    let db_error = error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a database error: {error}"));
    assert_eq!(
        db_error.constraint(),
        Some(constraint),
        "{sql}: {}",
        db_error.message()
    );
}

#[tokio::test]
async fn bad_events_are_refused_at_insert() {
    let db = TestDb::new().await;
    let cases = [
        (
            "INSERT INTO outbox.events (event_type, payload) VALUES ('lead created', '{}')",
            "event_type_format",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload) VALUES ('', '{}')",
            "event_type_format",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload) VALUES (repeat('a', 256), '{}')",
            "event_type_format",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload) VALUES ('lead/created', '{}')",
            "event_type_format",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload) VALUES ('big', jsonb_build_object('blob', repeat('x', 1048576)))",
            "payload_size",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload, metadata) VALUES ('a', '{}', '[1]')",
            "metadata_is_object",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload, target_services) VALUES ('a', '{}', '{}')",
            "target_services_not_empty",
        ),
        (
            "INSERT INTO outbox.events (event_type, payload, ordering_key) VALUES ('a', '{}', '')",
            "ordering_key_length",
        ),
    ];
    for (sql, constraint) in cases {
        refused(&db, sql, constraint).await;
    }
    // outbox.publish goes through the same checks.
    refused(
        &db,
        "SELECT outbox.publish('bad type', '{}')",
        "event_type_format",
    )
    .await;
    // A producer's own event_id makes a retried publish idempotent: the duplicate fails.
    db.client()
        .await
        .batch_execute("INSERT INTO outbox.events (event_id, event_type, payload) VALUES ('6f1c1f5e-1d7a-4d43-9a57-6a0f8e0f2a11', 'a', '{}')")
        .await
        .expect("first insert");
    refused(
        &db,
        "INSERT INTO outbox.events (event_id, event_type, payload) VALUES ('6f1c1f5e-1d7a-4d43-9a57-6a0f8e0f2a11', 'a', '{}')",
        "events_event_id_key",
    )
    .await;
    // Good rows still go in: letters, digits and ._:- are all allowed.
    db.client()
        .await
        .batch_execute("INSERT INTO outbox.events (event_type, payload) VALUES ('Lead_v2.created:eu-1', '[1, 2]')")
        .await
        .expect("valid event accepted");
}

#[tokio::test]
async fn bad_subscriptions_are_refused_at_creation() {
    let db = TestDb::new().await;
    let insert = |columns: &str, values: &str| {
        format!(
            "INSERT INTO outbox.subscriptions (name, url{columns}) VALUES ('s', 'https://hooks.example.com/x'{values})"
        )
    };
    let cases = [
        (
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('s', 'ftp://example.com/x')"
                .to_string(),
            "url_scheme",
        ),
        (
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('s', 'http://')".to_string(),
            "url_scheme",
        ),
        (
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('s', 'http://a b/')".to_string(),
            "url_scheme",
        ),
        (
            "INSERT INTO outbox.subscriptions (name, url) VALUES ('has space', 'http://x/')"
                .to_string(),
            "name_format",
        ),
        (insert(", event_types", ", '{}'"), "event_types_format"),
        (
            insert(", event_types", ", '{\"lead.%\"}'"),
            "event_types_format",
        ),
        (
            insert(", event_types", ", '{\"lead created\"}'"),
            "event_types_format",
        ),
        (insert(", filter", ", '[1]'"), "filter_is_object"),
        (insert(", secret", ", 'not-a-secret'"), "secret_format"),
        (
            insert(", retry_schedule", ", '{-5 seconds}'"),
            "retry_schedule_sane",
        ),
        (
            insert(", retry_schedule", ", '{30 days}'"),
            "retry_schedule_sane",
        ),
        (insert(", timeout", ", '0 seconds'"), "timeout_sane"),
        (insert(", timeout", ", '1 hour'"), "timeout_sane"),
        (insert(", max_in_flight", ", 0"), "max_in_flight_sane"),
        (insert(", rate_limit_per_second", ", 0"), "rate_limit_sane"),
        (insert(", headers", ", '{\"x-n\": 1}'"), "headers_valid"),
        (
            insert(", headers", ", '{\"Webhook-Signature\": \"forged\"}'"),
            "headers_valid",
        ),
        (
            insert(", headers", ", '{\"bad header\": \"v\"}'"),
            "headers_valid",
        ),
    ];
    for (sql, constraint) in cases {
        refused(&db, &sql, constraint).await;
    }
    // Names are unique.
    db.client()
        .await
        .batch_execute(&insert("", ""))
        .await
        .expect("first subscription");
    refused(&db, &insert("", ""), "subscriptions_name_key").await;
    // A generated secret is whsec_ + base64 of 32 bytes.
    let secret: String = db
        .client()
        .await
        .query_one("SELECT secret FROM outbox.subscriptions", &[])
        .await
        .expect("read")
        .get(0);
    let key = secret.strip_prefix("whsec_").expect("prefix");
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .expect("base64");
    assert_eq!(decoded.len(), 32);
}

/// The format checks accept exactly their documented lengths, at the edges: 1 to 255
/// characters for event types and subscription patterns, 1 to 128 for header names.
#[tokio::test]
async fn format_checks_accept_exactly_their_lengths() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let accepted: bool = client
        .query_one(
            "SELECT outbox.is_valid_event_type(repeat('a', 255))
                AND outbox.is_valid_event_type('a')
                AND outbox.are_valid_event_type_patterns(ARRAY[repeat('*', 255)])
                AND outbox.are_valid_headers(jsonb_build_object(repeat('h', 128), 'v'))",
            &[],
        )
        .await
        .expect("evaluate")
        .get(0);
    assert!(accepted, "a longest valid value was refused");
    for refused in [
        "outbox.is_valid_event_type(repeat('a', 256))",
        "outbox.is_valid_event_type('')",
        "outbox.is_valid_event_type(E'lead\\n')",
        "outbox.are_valid_event_type_patterns(ARRAY[repeat('*', 256)])",
        "outbox.are_valid_event_type_patterns(ARRAY[''])",
        "outbox.are_valid_headers(jsonb_build_object(repeat('h', 129), 'v'))",
        "outbox.are_valid_headers(jsonb_build_object('', 'v'))",
    ] {
        let valid: bool = client
            .query_one(&format!("SELECT {refused}"), &[])
            .await
            .expect("evaluate")
            .get(0);
        assert!(!valid, "{refused} accepted");
    }
}

/// The checks a producer's INSERT runs (and, for CHECK constraints, every UPDATE of the row)
/// use no bounded repetition such as `{1,255}`: PostgreSQL's regex engine expands it into that
/// many copies, about 70 times slower than a `+` class with a length bound (see
/// migrations/V11__cheap_format_checks.sql). Found by reading their definitions, since a
/// timing would be flaky.
#[tokio::test]
async fn checks_on_every_event_use_no_bounded_repetition() {
    let db = TestDb::new().await;
    let rows = db
        .client()
        .await
        .query(
            "SELECT c.conname, pg_get_constraintdef(c.oid)
               FROM pg_constraint c
              WHERE c.conrelid = 'outbox.events'::regclass AND c.contype = 'c'
             UNION ALL
             SELECT p.proname, pg_get_functiondef(p.oid)
               FROM pg_proc p
              WHERE p.pronamespace = 'outbox'::regnamespace
                AND p.proname IN ('is_valid_event_type', 'before_events_insert', 'publish')",
            &[],
        )
        .await
        .expect("read the definitions");
    assert!(rows.len() >= 4, "definitions not found: {}", rows.len());
    let bounded = regex_lite_bounded_repetition();
    for row in rows {
        let (name, definition): (String, String) = (row.get(0), row.get(1));
        assert!(
            !bounded(&definition),
            "{name} uses a bounded repetition: {definition}"
        );
    }
}

/// True when `text` holds a regex quantifier `{n}`, `{n,}` or `{n,m}`.
fn regex_lite_bounded_repetition() -> impl Fn(&str) -> bool {
    |text: &str| {
        let bytes = text.as_bytes();
        bytes.iter().enumerate().any(|(i, b)| {
            *b == b'{' && {
                let rest = &text[i + 1..];
                let digits = rest.chars().take_while(char::is_ascii_digit).count();
                digits > 0 && matches!(rest[digits..].chars().next(), Some('}' | ','))
            }
        })
    }
}

/// `outbox.max_payload_bytes()` is the documented knob for the payload limit: a replacement
/// holds from the next statement, also in a session whose `outbox.publish` already ran (and
/// so keeps its INSERT's plan).
#[tokio::test]
async fn a_replaced_payload_limit_holds_from_the_next_statement() {
    let db = TestDb::new().await;
    let producer = db.client().await;
    let publish =
        "SELECT outbox.publish('lead.created', jsonb_build_object('note', repeat('x', 100)))";
    producer
        .batch_execute(publish)
        .await
        .expect("100 bytes are within the default limit");
    db.client()
        .await
        .batch_execute(
            "CREATE OR REPLACE FUNCTION outbox.max_payload_bytes() RETURNS integer
                 LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$ BEGIN RETURN 64; END $$",
        )
        .await
        .expect("replace the limit");
    for sql in [
        publish,
        "INSERT INTO outbox.events (event_type, payload) VALUES ('a', jsonb_build_object('note', repeat('x', 100)))",
    ] {
        refused_in(&producer, sql, "payload_size").await;
    }
    producer
        .batch_execute("SELECT outbox.publish('a', '{\"n\": 1}')")
        .await
        .expect("a payload within the new limit");
}

/// What a producer's INSERT runs on every statement is written in PL/pgSQL, never as a
/// SQL-language function: PostgreSQL prepares CHECK constraints per statement, and a SQL
/// function in them is inlined or folded by parsing and planning its body again each time
/// (a quarter of the producers' backend CPU; see
/// migrations/V17__producer_inserts_without_sql_functions.sql). `outbox.publish` likewise:
/// as SQL it planned its INSERT on every call. Found by reading the catalog, since a timing
/// would be flaky.
#[tokio::test]
async fn producer_inserts_run_no_sql_language_functions() {
    let db = TestDb::new().await;
    let rows = db
        .client()
        .await
        .query(
            "SELECT p.oid::regprocedure::text, l.lanname
               FROM pg_depend d
               JOIN pg_constraint c ON d.classid = 'pg_constraint'::regclass AND d.objid = c.oid
               JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND d.refobjid = p.oid
               JOIN pg_language l ON l.oid = p.prolang
              WHERE c.conrelid = 'outbox.events'::regclass AND c.contype = 'c'
             UNION
             SELECT p.oid::regprocedure::text, l.lanname
               FROM pg_trigger t
               JOIN pg_proc p ON p.oid = t.tgfoid
               JOIN pg_language l ON l.oid = p.prolang
              WHERE t.tgrelid = 'outbox.events'::regclass AND NOT t.tgisinternal
             UNION
             SELECT p.oid::regprocedure::text, l.lanname
               FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
              WHERE p.oid = 'outbox.publish'::regproc",
            &[],
        )
        .await
        .expect("read the functions");
    let functions: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for expected in [
        "outbox.is_valid_event_type(text)",
        "outbox.max_payload_bytes()",
        "outbox.before_events_insert()",
    ] {
        assert!(
            functions.iter().any(|(name, _)| name == expected),
            "{expected} not found among {functions:?}"
        );
    }
    for (name, language) in &functions {
        assert_ne!(language, "sql", "{name} is a SQL-language function");
    }
}
