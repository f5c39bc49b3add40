//! The OpenAPI document against the server it describes: schemathesis generates requests from
//! `/admin/v1/openapi.json` (valid ones, and ones that break exactly one rule) and fails on
//! any mismatch: a schema-valid request refused, a schema-violating one accepted, a status or
//! an answer the document does not describe, a 5xx. A constraint dropped from the document,
//! or a check loosened in the server, shows up here.
//!
//! Needs `st` (schemathesis, pinned in `.ci/run`): `OUTBOX_SCHEMATHESIS`, else `st` on PATH,
//! else the venv `.ci/run` makes. Missing, the test fails unless
//! `OUTBOX_ALLOW_MISSING_TOOLS=1`.
//!
//! The fuzzer creates subscriptions with URLs it makes up, publishes events and replays
//! deliveries. This relay can never send them anywhere: a trigger of this test's database
//! makes every delivery, created or re-queued, due in the year 9999, so none is ever claimed
//! (not even a DNS lookup happens); and its SSRF guard allows no private or loopback address
//! either. The test checks at the end that no delivery was attempted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use outbox_relay::config::{CidrList, RelayConfig};

use crate::admin_api::TOKEN;
use crate::harness::db::TestDb;
use crate::harness::relay::*;

/// The schemathesis version `.ci/run` installs.
const SCHEMATHESIS_VERSION: &str = "4.32.5";
/// Names the `st` to run.
const SCHEMATHESIS_ENV: &str = "OUTBOX_SCHEMATHESIS";
/// Fixed, so a failure is reproducible (`st run … --seed 1`) and a run does not pass or fail
/// by luck; bounded, so the run takes seconds, not minutes (200 per operation also pass).
const SEED: &str = "1";
const MAX_EXAMPLES: &str = "30";
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// The `st` to run: `$OUTBOX_SCHEMATHESIS`, `st` on PATH, or the venv of `.ci/run`.
fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os(SCHEMATHESIS_ENV) {
        return PathBuf::from(path);
    }
    let venv = std::env::var_os("HOME").map(|home| {
        Path::new(&home)
            .join(".cache/outbox-relay")
            .join(format!("schemathesis-{SCHEMATHESIS_VERSION}"))
            .join("bin/st")
    });
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("st"))
        .find(|st| st.is_file());
    on_path
        .or(venv.filter(|st| st.is_file()))
        .unwrap_or_else(|| PathBuf::from("st"))
}

#[tokio::test]
async fn schemathesis_finds_no_mismatch_between_the_document_and_the_server() {
    let st = schemathesis();
    let version = std::process::Command::new(&st).arg("--version").output();
    if let Err(error) = version
        .as_ref()
        .map_err(ToString::to_string)
        .and_then(|out| {
            out.status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
        })
    {
        crate::harness::tools::missing_tool(
            &format!("schemathesis ({})", st.display()),
            "the OpenAPI fuzz test",
            &format!(
                "`python3 -m venv ~/.cache/outbox-relay/schemathesis-{SCHEMATHESIS_VERSION} && \
                 ~/.cache/outbox-relay/schemathesis-{SCHEMATHESIS_VERSION}/bin/pip install \
                 schemathesis=={SCHEMATHESIS_VERSION}`, or point {SCHEMATHESIS_ENV} at an st"
            ),
            &error,
        );
        return;
    }

    let db = TestDb::new().await;
    // No delivery of this database ever comes due, whoever writes it (see above).
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION public.fuzz_never_due() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN NEW.next_attempt_at := '9999-01-01'; RETURN NEW; END $$;
             CREATE TRIGGER fuzz_never_due BEFORE INSERT OR UPDATE ON outbox.deliveries
                 FOR EACH ROW EXECUTE FUNCTION public.fuzz_never_due();",
        )
        .await
        .expect("make deliveries never due");
    let mut config = RelayConfig::for_tests();
    config.admin_token = Some(TOKEN.into());
    config.allow_private_targets = CidrList(Vec::new());
    let relay = spawn_relay(&db, config).await;
    let document = format!("http://{}/admin/v1/openapi.json", relay.http_addr);

    // In a directory of its own: hypothesis keeps its example database in the working dir.
    let workdir = tempfile::tempdir().expect("temp dir");
    let hooks_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it");
    let run = tokio::process::Command::new(&st)
        .args(["--no-color", "run", &document])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        // Every check, none excluded: each one holds for this API.
        .args(["--checks", "all"])
        .args(["--seed", SEED, "--max-examples", MAX_EXAMPLES])
        // One worker: the stateful phase then sends the same sequence on every run.
        .args(["--workers", "1", "--request-timeout", "10"])
        // Cross-field rules a JSON Schema cannot state (see the hooks file).
        .env("SCHEMATHESIS_HOOKS", "openapi_fuzz_hooks")
        .env("PYTHONPATH", &hooks_dir)
        .current_dir(workdir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(RUN_DEADLINE, run)
        .await
        .unwrap_or_else(|_| panic!("schemathesis did not finish within {RUN_DEADLINE:?}"))
        .expect("run schemathesis");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found mismatches between /admin/v1/openapi.json and the server \
         (reproduce: {} run <url>/admin/v1/openapi.json -H 'Authorization: Bearer …' \
         --checks all --seed {SEED} --max-examples {MAX_EXAMPLES}):\n{report}",
        st.display()
    );
    assert!(!report.contains(TOKEN), "schemathesis printed the token");

    assert_eq!(
        count(
            &db,
            "SELECT (SELECT count(*) FROM outbox.delivery_attempts)
                  + (SELECT count(*) FROM outbox.deliveries
                      WHERE next_attempt_at < '9999-01-01' OR attempts > 0
                         OR status NOT IN ('pending', 'dead'))"
        )
        .await,
        0,
        "a delivery of the fuzzed relay came due or was attempted"
    );
    relay.shutdown().await;
}
