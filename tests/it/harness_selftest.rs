//! Checks the test harness itself: per-test databases are separate, migrated and cleaned up.

use crate::harness::db::TestDb;

async fn admin(db: &TestDb) -> tokio_postgres::Client {
    testkit::pg::connect(&db.server_admin_url())
        .await
        .expect("connect to the admin database")
}

async fn database_exists(admin: &tokio_postgres::Client, name: &str) -> bool {
    admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("query pg_database")
        .is_some()
}

#[tokio::test]
async fn test_dbs_are_separate_migrated_and_dropped() {
    let first = TestDb::new().await;
    let second = TestDb::new().await;
    assert_ne!(first.name, second.name);
    assert_ne!(first.url, second.url);

    for db in [&first, &second] {
        let client = db.client().await;
        let current: String = client
            .query_one("SELECT current_database()", &[])
            .await
            .expect("current_database")
            .get(0);
        assert_eq!(current, db.name);
        let has_outbox: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'outbox')",
                &[],
            )
            .await
            .expect("look up the outbox schema")
            .get(0);
        assert!(has_outbox, "schema outbox missing in {}", db.name);
    }

    // Writes in one database must not show in the other.
    first
        .pool()
        .get()
        .await
        .expect("pool connection")
        .batch_execute("CREATE TABLE public.only_in_first (id int)")
        .await
        .expect("create a table");
    let in_second: bool = second
        .client()
        .await
        .query_one(
            "SELECT to_regclass('public.only_in_first') IS NOT NULL",
            &[],
        )
        .await
        .expect("look up the table")
        .get(0);
    assert!(!in_second);

    let admin = admin(&first).await;
    let (first_name, second_name) = (first.name.clone(), second.name.clone());
    assert!(database_exists(&admin, &first_name).await);
    // Dropped while a pooled connection is still open: DROP ... WITH (FORCE) must cope.
    let held = first.client().await;
    drop(first);
    drop(second);
    drop(held);
    assert!(!database_exists(&admin, &first_name).await);
    assert!(!database_exists(&admin, &second_name).await);
}

#[tokio::test]
async fn terminate_connections_cuts_only_matching_sessions() {
    let db = TestDb::new().await;
    let mut config: tokio_postgres::Config = db.url.parse().expect("test db url parses");
    config.application_name("selftest_victim");
    let (victim, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect the victim");
    let connection = tokio::spawn(connection);
    victim
        .batch_execute("SELECT 1")
        .await
        .expect("victim works before");
    let bystander = db.client().await;

    assert_eq!(db.terminate_connections("selftest_vic%").await, 1);
    assert!(victim.batch_execute("SELECT 1").await.is_err());
    let _ = connection.await;
    bystander
        .batch_execute("SELECT 1")
        .await
        .expect("other sessions survive");
    assert_eq!(db.terminate_connections("selftest_vic%").await, 0);
}
