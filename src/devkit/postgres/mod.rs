//! Throwaway PostgreSQL clusters for the demo, the integration tests and the benchmark.
//!
//! [`TempPostgres`] owns one cluster from `initdb` to deletion: a temporary directory holding
//! the data directory, the unix socket and the server log, and the postmaster process bound to
//! 127.0.0.1 on a free port with trust authentication. It also owns making sure the cluster
//! does not outlive its process (parent-death signal) and sweeping directories that earlier,
//! killed processes left behind.
//!
//! [`ClusterSetup`] adds what a test needs beyond that: server settings, files in the data
//! directory (a TLS certificate and key) and its own `pg_hba.conf` (say, TLS-only).
//!
//! Two parts here serve only tests: [`ClusterSetup`] (the TLS tests' clusters) and
//! [`TempPostgres::restart`] (a server restart under a running relay). They stay in the
//! shipped crate, unlike the receiver's failure scripting (`crates/testkit`), because they
//! are the cluster's own start-up and stop steps: the demo's start runs through
//! `start_with(ClusterSetup::default())`, and both need the postmaster's process handling,
//! which would otherwise have to be made public for another crate.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User};
use tokio::sync::{oneshot, watch};

mod process;
mod setup;

use process::*;
use setup::*;

/// Every cluster directory starts with this, so the stale sweep can find them.
const DIR_PREFIX: &str = "outbox-relay-pg-";

/// Pid of the process that created the directory; the sweep spares directories whose owner lives.
const OWNER_FILE: &str = "owner.pid";

const DATA_SUBDIR: &str = "data";

const LOG_FILE: &str = "postgres.log";

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The free port we pick can be taken by someone else before the postmaster binds it.
const BIND_ATTEMPTS: usize = 5;

const FAST_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Drop may run on an async worker thread, so it only waits this long for the postmaster.
const DROP_WAIT: Duration = Duration::from_secs(2);

/// A directory without an owner file may be one another process is creating right now.
const UNOWNED_DIR_GRACE: Duration = Duration::from_secs(600);

const LOG_TAIL_BYTES: u64 = 4096;

/// What a cluster gets on top of the defaults. `Default` is the plain cluster of
/// [`TempPostgres::start`].
#[derive(Clone, Default)]
pub struct ClusterSetup {
    /// `-c name=value` settings for the postmaster, e.g. `("ssl", "on")`.
    pub settings: Vec<(String, String)>,
    /// Files written into the data directory after initdb, readable by the server's user
    /// only (PostgreSQL refuses a private key others can read), e.g. `server.crt` and
    /// `server.key`, which `ssl = on` reads by default.
    pub data_files: Vec<(String, Vec<u8>)>,
    /// Replaces `pg_hba.conf`. The readiness check then accepts an authentication refusal
    /// as proof the server is up (it connects in plain text, as `postgres`).
    pub hba: Option<String>,
}

impl std::fmt::Debug for ClusterSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // File contents may be private keys: only their names are shown.
        let files: Vec<&str> = self
            .data_files
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        f.debug_struct("ClusterSetup")
            .field("settings", &self.settings)
            .field("data_files", &files)
            .field("hba", &self.hba)
            .finish()
    }
}

/// A running throwaway cluster. Stop it with [`TempPostgres::stop`]; dropping it shuts it down
/// the fast and rough way, and if the process dies first the postmaster gets SIGQUIT.
pub struct TempPostgres {
    /// `None` only after `stop`, which tells `Drop` there is nothing left to do.
    dir: Option<tempfile::TempDir>,
    port: u16,
    pid: Pid,
    /// Becomes `Some(exit status)` once the supervisor thread has reaped the postmaster.
    exited: watch::Receiver<Option<String>>,
    /// Kept for `restart`, which must start the same server.
    settings: Vec<(String, String)>,
}

impl TempPostgres {
    /// Starts a fresh cluster in a temporary directory, listening on 127.0.0.1 on a free port
    /// (and a unix socket inside the temp dir), trust auth. Finds binaries via `pg_config --bindir`,
    /// else the newest /usr/lib/postgresql/*/bin; clear error naming what to install if none.
    pub async fn start() -> anyhow::Result<TempPostgres> {
        Self::start_with(ClusterSetup::default()).await
    }

    /// [`TempPostgres::start`], with `setup`'s settings, data files and `pg_hba.conf`.
    pub async fn start_with(setup: ClusterSetup) -> anyhow::Result<TempPostgres> {
        let base = std::env::temp_dir();
        remove_stale_dirs(&base);

        let bindir = find_bindir().await?;
        let run_as = run_as_user()?;

        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(&base)
            .with_context(|| format!("creating a cluster directory in {}", base.display()))?;
        fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .with_context(|| format!("writing the owner file in {}", dir.path().display()))?;
        if let Some(user) = &run_as {
            nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid)).with_context(|| {
                format!(
                    "handing {} to the `postgres` user (uid {})",
                    dir.path().display(),
                    user.uid
                )
            })?;
        }

        initdb(&bindir, dir.path(), run_as.as_ref()).await?;
        let data = dir.path().join(DATA_SUBDIR);
        for (name, contents) in &setup.data_files {
            write_private(&data.join(name), contents, run_as.as_ref())?;
        }
        if let Some(hba) = &setup.hba {
            write_private(&data.join("pg_hba.conf"), hba.as_bytes(), run_as.as_ref())?;
        }

        let mut port_errors = Vec::new();
        for _ in 0..BIND_ATTEMPTS {
            let port = free_port()?;
            match launch(&bindir, dir.path(), port, run_as.as_ref(), &setup.settings).await {
                Ok((pid, exited)) => {
                    return Ok(TempPostgres {
                        dir: Some(dir),
                        port,
                        pid,
                        exited,
                        settings: setup.settings,
                    });
                }
                Err(LaunchError::PortTaken(error)) => port_errors.push(error),
                Err(LaunchError::Other(error)) => return Err(error),
            }
        }
        Err(anyhow!(
            "postgres could not bind a free port in {BIND_ATTEMPTS} attempts; last failure: {}",
            port_errors
                .last()
                .map(|error| format!("{error:#}"))
                .unwrap_or_default()
        ))
    }

    /// URL of the `postgres` database as superuser, e.g. postgres://postgres@127.0.0.1:PORT/postgres
    pub fn admin_url(&self) -> String {
        self.url_for("postgres")
    }

    /// URL of another database on this cluster.
    pub fn url_for(&self, database: &str) -> String {
        url_for_port(self.port, database)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Fast shutdown (SIGINT to postmaster), wait for exit, delete the directory.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if !has_exited(&self.exited) {
            signal_postmaster(self.pid, Signal::SIGINT)?;
        }
        let mut exited = self.exited.clone();
        if tokio::time::timeout(FAST_SHUTDOWN_TIMEOUT, wait_exit(&mut exited))
            .await
            .is_err()
        {
            // Fast shutdown waits for nothing but checkpoints; if even that hangs, stop asking.
            signal_postmaster(self.pid, Signal::SIGQUIT)?;
            tokio::time::timeout(Duration::from_secs(10), wait_exit(&mut exited))
                .await
                .map_err(|_| {
                    anyhow!(
                        "postmaster {} ignored SIGINT for {FAST_SHUTDOWN_TIMEOUT:?} and SIGQUIT for 10s",
                        self.pid
                    )
                })?;
        }
        let dir = self
            .dir
            .take()
            .expect("only stop and drop take the dir, and stop consumes self");
        let path = dir.path().to_owned();
        dir.close()
            .with_context(|| format!("removing cluster directory {}", path.display()))
    }

    /// Stops the server (fast shutdown), waits `downtime`, and starts it again on the same
    /// port and data, which is what a database restart or failover looks like to clients.
    pub async fn restart(&mut self, downtime: Duration) -> anyhow::Result<()> {
        if !has_exited(&self.exited) {
            signal_postmaster(self.pid, Signal::SIGINT)?;
        }
        let mut exited = self.exited.clone();
        tokio::time::timeout(FAST_SHUTDOWN_TIMEOUT, wait_exit(&mut exited))
            .await
            .map_err(|_| anyhow!("postmaster {} did not stop for a restart", self.pid))?;
        tokio::time::sleep(downtime).await;
        let bindir = find_bindir().await?;
        let run_as = run_as_user()?;
        let dir = self
            .dir
            .as_ref()
            .context("restarting a cluster that was already stopped")?
            .path()
            .to_owned();
        let (pid, exited) = launch(&bindir, &dir, self.port, run_as.as_ref(), &self.settings)
            .await
            .map_err(|error| match error {
                LaunchError::PortTaken(error) | LaunchError::Other(error) => {
                    error.context("starting PostgreSQL again after a restart")
                }
            })?;
        self.pid = pid;
        self.exited = exited;
        Ok(())
    }

    /// The directory holding the data directory, socket and log (for tests and diagnostics).
    #[cfg(test)]
    fn dir_path(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the dir is only taken by stop, which consumes self")
            .path()
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else {
            return;
        };
        if !has_exited(&self.exited) {
            // Immediate shutdown: nobody will read the data again, and Drop must be quick.
            let _ = signal_postmaster(self.pid, Signal::SIGQUIT);
            let deadline = Instant::now() + DROP_WAIT;
            while !has_exited(&self.exited) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Err(error) = dir.close() {
            tracing::warn!(%error, "could not remove a temporary PostgreSQL directory");
        }
    }
}

impl std::fmt::Debug for TempPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempPostgres")
            .field("dir", &self.dir.as_ref().map(|dir| dir.path()))
            .field("port", &self.port)
            .field("pid", &self.pid)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set on the child process of `postmaster_dies_with_its_process`.
    const CHILD_ENV: &str = "OUTBOX_RELAY_TEMP_PG_CHILD";
    const READY_MARKER: &str = "TEMP_PG_READY";

    #[tokio::test]
    async fn starts_answers_and_stops() {
        let pg = TempPostgres::start().await.expect("start a cluster");
        let dir = pg.dir_path().to_owned();
        assert!(dir.join(DATA_SUBDIR).join("PG_VERSION").is_file());

        let (client, connection) = tokio_postgres::connect(&pg.admin_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the cluster");
        let connection = tokio::spawn(connection);
        let row = client.query_one("select 1", &[]).await.expect("select 1");
        assert_eq!(row.get::<_, i32>(0), 1);
        drop(client);
        connection
            .await
            .expect("connection task")
            .expect("connection closes cleanly");

        pg.stop().await.expect("stop the cluster");
        assert!(!dir.exists(), "{} still exists after stop", dir.display());
    }

    #[test]
    fn url_for_encodes_the_database_name() {
        assert_eq!(
            url_for_port(5433, "a b/c"),
            "postgres://postgres@127.0.0.1:5433/a%20b%2Fc"
        );
        assert_eq!(
            url_for_port(5433, "outbox_test_1"),
            "postgres://postgres@127.0.0.1:5433/outbox_test_1"
        );
    }

    /// Runs this test binary again as a child that starts a cluster and then gets SIGKILLed,
    /// so no destructor runs: the parent-death signal alone must take the postmaster down, and
    /// the stale sweep must then remove the directory.
    #[test]
    fn postmaster_dies_with_its_process() {
        use std::io::{BufRead, BufReader};

        let exe = std::env::current_exe().expect("path of the test binary");
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "devkit::postgres::tests::child_holds_a_cluster",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ENV, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child test process");
        let stdout = child.stdout.take().expect("stdout is piped");
        let ready = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix(READY_MARKER).map(str::to_owned));
        let Some(ready) = ready else {
            let status = child.wait();
            panic!("the child exited before reporting a cluster: {status:?}");
        };
        let (pid, dir) = ready
            .trim()
            .split_once(' ')
            .expect("marker line is `pid dir`");
        let postmaster = Pid::from_raw(pid.parse().expect("numeric pid"));
        let dir = PathBuf::from(dir);
        assert!(is_running(postmaster));

        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");

        let deadline = Instant::now() + Duration::from_secs(15);
        while is_running(postmaster) {
            assert!(
                Instant::now() < deadline,
                "postmaster {postmaster} outlived its process"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(dir.exists(), "nobody should have cleaned up after SIGKILL");
        remove_stale_dirs(dir.parent().expect("cluster dir has a parent"));
        assert!(!dir.exists(), "stale sweep left {} behind", dir.display());
    }

    /// Only does something as the child of `postmaster_dies_with_its_process`.
    #[tokio::test]
    #[ignore = "helper process for postmaster_dies_with_its_process"]
    async fn child_holds_a_cluster() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let pg = TempPostgres::start().await.expect("start a cluster");
        println!("{READY_MARKER} {} {}", pg.pid, pg.dir_path().display());
        // The parent kills us long before this; the bound only keeps a lost child from lingering.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(pg);
    }
}
