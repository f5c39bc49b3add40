//! What the figures were measured on: the machine, its load and the server's settings.

use super::*;

pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

pub(super) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `MemTotal` of /proc/meminfo, e.g. `24105 MiB`.
pub(super) fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| format!("{} MiB", kib / 1024))
        .unwrap_or_else(|| "unknown".into())
}

pub(super) async fn machine_facts(server: &Server) -> anyhow::Result<Vec<(String, String)>> {
    let admin = connect(server.admin_url()).await?;
    let mut facts = vec![
        (
            "nproc".to_string(),
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "unknown".into()),
        ),
        ("cpu".to_string(), cpu_model()),
        ("memory".to_string(), mem_total()),
        (
            "kernel".to_string(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
        ),
        (
            "build profile".to_string(),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .to_string(),
        ),
        ("loadavg at start".to_string(), loadavg()),
        (
            "postgres".to_string(),
            if server.is_throwaway() {
                "throwaway cluster (TempPostgres)".to_string()
            } else {
                "--database-url".to_string()
            },
        ),
    ];
    for setting in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "shared_buffers",
        // Durability and checkpoint pacing set what a write-heavy drain costs the server.
        "wal_level",
        "max_wal_size",
        "checkpoint_timeout",
        "full_page_writes",
        // The sizes `footprint` reports depend on when autovacuum ran.
        "autovacuum",
        // Three relays hold about 3 × (pool + 1) sessions.
        "max_connections",
    ] {
        let value: String = admin
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .with_context(|| format!("SHOW {setting}"))?
            .get(0);
        facts.push((setting.to_string(), value));
    }
    Ok(facts)
}
