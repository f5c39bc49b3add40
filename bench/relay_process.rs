//! The relay as users run it: the real `outbox-relay run` binary in a process of its own,
//! configured through its environment like a deployment. The scenarios that count relays or
//! measure the relay's memory need this; an in-process relay shares its address space and
//! scheduler with the bench.
//!
//! A relay process never outlives the bench: `RelayGroup::stop_all` sends SIGTERM and waits (SIGKILL
//! after [`STOP_TIMEOUT`]); a dropped handle (an error path, the backstop timeout) kills its
//! child (`kill_on_drop`); and if the bench process dies without dropping anything
//! (`std::process::exit`, a crash), the kernel sends the child SIGTERM (`PR_SET_PDEATHSIG`).

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use testkit::pg::with_params;
use testkit::relay::process_application_name;

use super::{Args, relay_config};

/// SIGTERM gives the relay its shutdown grace (20 s by default) to finish in-flight requests;
/// past this it is killed. At the end of a scenario nothing is in flight, so it exits at once.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RelayProcess {
    pub relay_id: String,
    pub pid: u32,
    pub http_addr: SocketAddr,
    child: tokio::process::Child,
}

impl RelayProcess {
    /// Starts `outbox-relay run` against `url` with the relay settings of the bench flags.
    /// Its pooled sessions carry `application_name=outbox-relay.<relay_id>` (see
    /// [`RELAY_APPLICATION_NAME_LIKE`]).
    pub fn spawn(args: &Args, url: &str, relay_id: &str) -> anyhow::Result<RelayProcess> {
        let http_addr = free_loopback_port()?;
        let config = relay_config(args);
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
        command.arg("run");
        // Settings the user's shell happens to export (OUTBOX_RETENTION, RUST_LOG, …) must not
        // change what is measured: everything the relay reads comes from the flags below.
        for (key, _) in std::env::vars_os() {
            if key
                .to_str()
                .is_some_and(|k| k.starts_with("OUTBOX_") || k == "RUST_LOG" || k == "DATABASE_URL")
            {
                command.env_remove(key);
            }
        }
        command
            .env(
                "DATABASE_URL",
                with_params(
                    url,
                    &[("application_name", &process_application_name(relay_id))],
                ),
            )
            .env("RUST_LOG", "warn")
            .env("OUTBOX_RELAY_ID", relay_id)
            .env("OUTBOX_HTTP_ADDR", http_addr.to_string())
            .env("OUTBOX_ALLOW_PRIVATE_TARGETS", "127.0.0.0/8")
            .env("OUTBOX_POLL_INTERVAL", duration_env(config.poll_interval))
            .env(
                "OUTBOX_BUSY_POLL_INTERVAL",
                duration_env(config.busy_poll_interval),
            )
            .env("OUTBOX_BUSY_LINGER", duration_env(config.busy_linger))
            .env("OUTBOX_LEASE_DURATION", duration_env(config.lease_duration))
            .env(
                "OUTBOX_HEARTBEAT_INTERVAL",
                duration_env(config.heartbeat_interval),
            )
            .env("OUTBOX_FLUSH_INTERVAL", duration_env(config.flush_interval))
            .env(
                "OUTBOX_FLUSH_BATCH_SIZE",
                config.flush_batch_size.to_string(),
            )
            .env("OUTBOX_ASYNC_COMMIT", config.async_commit.to_string())
            .env(
                "OUTBOX_DISPATCH_BATCH_SIZE",
                config.dispatch_batch_size.to_string(),
            )
            .env(
                "OUTBOX_DELIVERY_BATCH_SIZE",
                config.delivery_batch_size.to_string(),
            )
            .env("OUTBOX_MAX_CONCURRENCY", config.max_concurrency.to_string())
            .env("OUTBOX_DB_POOL_SIZE", config.db_pool_size.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Warnings and errors of the relay show up in the bench's output.
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // prctl(2) system call, which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", env!("CARGO_BIN_EXE_outbox-relay")))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("relay {relay_id} exited before its pid was read"))?;
        Ok(RelayProcess {
            relay_id: relay_id.to_string(),
            pid,
            http_addr,
            child,
        })
    }

    /// Fails if the process has exited (it never should while the scenario runs).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self
            .child
            .try_wait()
            .with_context(|| format!("checking on relay {}", self.relay_id))?
        {
            None => Ok(()),
            Some(status) => bail!(
                "relay process {} (pid {}) exited early: {status} (its stderr is above)",
                self.relay_id,
                self.pid
            ),
        }
    }

    /// `/proc/<pid>/status` memory figures, in KiB.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                // A zombie has no memory lines: the relay exited.
                .ok_or_else(|| anyhow!("no {name} in {path}: has relay {} exited?", self.relay_id))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }

    /// The relay's Prometheus text (`/metrics`).
    pub async fn metrics(&self, http: &reqwest::Client) -> anyhow::Result<Metrics> {
        let text = http
            .get(format!("http://{}/metrics", self.http_addr))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("scraping /metrics of relay {}", self.relay_id))?
            .text()
            .await
            .with_context(|| format!("reading /metrics of relay {}", self.relay_id))?;
        Ok(Metrics::parse(&text))
    }

    fn terminate(&mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            // ESRCH means it is gone already; wait() below reaps it either way.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    async fn wait_or_kill(&mut self) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.with_context(|| format!("waiting for relay {}", self.relay_id)),
            Err(_) => {
                eprintln!(
                    "warning: relay {} did not stop within {STOP_TIMEOUT:?} of SIGTERM; killing it",
                    self.relay_id
                );
                self.child
                    .kill()
                    .await
                    .with_context(|| format!("killing relay {}", self.relay_id))?;
                self.child
                    .wait()
                    .await
                    .with_context(|| format!("waiting for relay {}", self.relay_id))
            }
        }
    }
}

/// Relays started together; stopped together (all get SIGTERM first, so their shutdowns
/// overlap instead of adding up).
#[derive(Default)]
pub struct RelayGroup {
    pub relays: Vec<RelayProcess>,
}

impl RelayGroup {
    pub fn spawn(&mut self, args: &Args, url: &str, relay_id: &str) -> anyhow::Result<()> {
        self.relays.push(RelayProcess::spawn(args, url, relay_id)?);
        Ok(())
    }

    /// Resolves (with an error) only when one of the relays exits; run it next to the work
    /// in a `select!` so a relay that died is reported at once, not at the deadline.
    pub async fn watch(&mut self) -> anyhow::Error {
        loop {
            for relay in &mut self.relays {
                if let Err(error) = relay.check_alive() {
                    return error;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every relay; fails if one did not exit cleanly (after SIGTERM the relay exits 0).
    pub async fn stop_all(&mut self) -> anyhow::Result<()> {
        for relay in &mut self.relays {
            relay.terminate();
        }
        let mut problems = Vec::new();
        for mut relay in self.relays.drain(..) {
            match relay.wait_or_kill().await {
                Ok(status) if status.success() => {}
                Ok(status) => {
                    problems.push(format!("relay {} exited with {status}", relay.relay_id))
                }
                Err(error) => problems.push(format!("{error:#}")),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("; "))
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// Resident set now.
    pub rss_kib: u64,
    /// The kernel's high-water mark of the resident set since the process started.
    pub hwm_kib: u64,
}

pub fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The few series the scenarios read from a relay's `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Metrics {
    /// `outbox_deliveries_total{outcome="delivered"}`, all subscriptions.
    pub delivered: f64,
    /// `outbox_deliveries_total` with another outcome (failed, dead).
    pub not_delivered: f64,
    /// `outbox_db_errors_total`, all components.
    pub db_errors: f64,
    /// `outbox_leases_reclaimed_total`.
    pub leases_reclaimed: f64,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut metrics = Metrics::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            match name {
                "outbox_deliveries_total" if series.contains("outcome=\"delivered\"") => {
                    metrics.delivered += value;
                }
                "outbox_deliveries_total" => metrics.not_delivered += value,
                "outbox_db_errors_total" => metrics.db_errors += value,
                "outbox_leases_reclaimed_total" => metrics.leases_reclaimed += value,
                _ => {}
            }
        }
        metrics
    }
}

/// `LIKE` pattern matching the sessions of the relays started here: pooled ones
/// (`outbox-relay.<relay_id>`) and LISTEN (`outbox-relay-listen`).
pub const RELAY_APPLICATION_NAME_LIKE: &str = "outbox-relay%";

/// A port on 127.0.0.1 that was free a moment ago: the relay binds it itself, so /metrics
/// can be found. (With port 0 its address would only be in its log.) Should another process
/// take the port in between, the relay exits and `check_alive` reports it.
fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free port for the relay's HTTP listener")?;
    listener
        .local_addr()
        .context("reading the free port's address")
}

/// A duration as the relay's flags read it (humantime: `1s`, `250ms`, `0s`).
fn duration_env(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}
