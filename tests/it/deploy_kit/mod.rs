//! The monitoring kit in `deploy/`: the Prometheus alert rules pass `promtool check rules`
//! and their unit tests (`promtool test rules`), the Grafana dashboard is well formed, and
//! every metric name an alert or a panel queries is one a real relay exposes on /metrics:
//! a renamed metric breaks this test, not an on-call night.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::harness::db::TestDb;
use crate::harness::relay::*;

mod files;
mod monitoring;

fn deploy_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
