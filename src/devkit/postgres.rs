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

fn url_for_port(port: u16, database: &str) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{port}/{}",
        percent_encode(database)
    )
}

/// Database names may hold any character; the URL path must not carry `/`, `?`, `%` and friends raw.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[derive(Clone, Copy)]
struct RunAs {
    uid: Uid,
    gid: Gid,
}

/// initdb and postgres refuse to run as root, so as root we become the `postgres` user.
fn run_as_user() -> anyhow::Result<Option<RunAs>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = User::from_name("postgres")
        .context("looking up the `postgres` system user")?
        .ok_or_else(|| {
            anyhow!(
                "running as root, where initdb and postgres refuse to run, and there is no \
                 `postgres` system user to run them as: create one (e.g. `useradd --system \
                 postgres`, or install the postgresql server package) or run as a non-root user"
            )
        })?;
    Ok(Some(RunAs {
        uid: user.uid,
        gid: user.gid,
    }))
}

async fn find_bindir() -> anyhow::Result<PathBuf> {
    // pg_config may come from a client-only package (libpq-dev) whose bindir lacks the server.
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();

    if let Ok(output) = tokio::process::Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .output()
        .await
        && output.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }

    let mut newest: Option<(Vec<u32>, PathBuf)> = None;
    for entry in fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name();
        // Versions look like "15" or "9.6"; compare them numerically, not as strings.
        let Ok(version) = name
            .to_string_lossy()
            .split('.')
            .map(str::parse::<u32>)
            .collect::<Result<Vec<_>, _>>()
        else {
            continue;
        };
        let bin = entry.path().join("bin");
        if has_server(&bin) && newest.as_ref().is_none_or(|(best, _)| version > *best) {
            newest = Some((version, bin));
        }
    }
    newest.map(|(_, bin)| bin).ok_or_else(|| {
        anyhow!(
            "PostgreSQL server binaries (initdb, postgres) not found: neither `pg_config --bindir` \
             nor /usr/lib/postgresql/*/bin has them. Install the PostgreSQL server (e.g. \
             `apt-get install postgresql`) or put the server's pg_config on PATH"
        )
    })
}

async fn initdb(bindir: &Path, dir: &Path, run_as: Option<&RunAs>) -> anyhow::Result<()> {
    let program = bindir.join("initdb");
    let mut command = tokio::process::Command::new(&program);
    command
        .arg("-D")
        .arg(dir.join(DATA_SUBDIR))
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--no-locale",
        ])
        // As another user, the inherited working directory (often /root) may be unreadable.
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(user) = run_as {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let output = command
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}):\n{}{}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Writes a file only the server's user may read (PostgreSQL refuses a key others can read).
fn write_private(path: &Path, contents: &[u8], run_as: Option<&RunAs>) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    io::Write::write_all(&mut file, contents)
        .with_context(|| format!("writing {}", path.display()))?;
    if let Some(user) = run_as {
        nix::unistd::chown(path, Some(user.uid), Some(user.gid))
            .with_context(|| format!("handing {} to the `postgres` user", path.display()))?;
    }
    Ok(())
}

/// The OS hands out a port nobody listens on; it stays free until someone else grabs it,
/// which is why `start` retries when the postmaster cannot bind.
fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener
        .local_addr()
        .context("reading the port of a bound listener")?
        .port())
}

enum LaunchError {
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

/// Starts the postmaster and waits until it accepts connections.
async fn launch(
    bindir: &Path,
    dir: &Path,
    port: u16,
    run_as: Option<&RunAs>,
    settings: &[(String, String)],
) -> Result<(Pid, watch::Receiver<Option<String>>), LaunchError> {
    let log_path = dir.join(LOG_FILE);
    let program = bindir.join("postgres");
    let command = postmaster_command(&program, dir, port, run_as, &log_path, settings)
        .map_err(LaunchError::Other)?;
    let (pid, mut exited) = spawn_supervised(command)
        .await
        .with_context(|| format!("starting {}", program.display()))
        .map_err(LaunchError::Other)?;

    let url = url_for_port(port, "postgres");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if has_exited(&exited) {
            let status = exited.borrow().clone().unwrap_or_default();
            let log = log_tail(&log_path);
            let error = anyhow!("postgres exited during startup ({status}); log tail:\n{log}");
            return Err(
                if log.contains("could not bind") || log.contains("Address already in use") {
                    LaunchError::PortTaken(error)
                } else {
                    LaunchError::Other(error)
                },
            );
        }
        let last_error = match tokio::time::timeout(
            Duration::from_secs(2),
            tokio_postgres::connect(&url, tokio_postgres::NoTls),
        )
        .await
        {
            Ok(Ok(_)) => return Ok((pid, exited)),
            // The server answered: a pg_hba.conf of the caller's (say, TLS-only) may refuse
            // this plain-text probe, but only a running server can refuse. Still starting
            // up is the one answer that means "not yet".
            Ok(Err(error))
                if error.code().is_some_and(|code| {
                    *code != tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW
                }) =>
            {
                return Ok((pid, exited));
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => String::from("connect timed out"),
        };
        if Instant::now() >= deadline {
            let _ = signal_postmaster(pid, Signal::SIGQUIT);
            let _ = tokio::time::timeout(Duration::from_secs(5), wait_exit(&mut exited)).await;
            return Err(LaunchError::Other(anyhow!(
                "postgres did not accept connections on {url} within {READY_TIMEOUT:?} \
                 (last error: {last_error}); log tail:\n{}",
                log_tail(&log_path)
            )));
        }
        tokio::select! {
            _ = exited.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

fn postmaster_command(
    program: &Path,
    dir: &Path,
    port: u16,
    run_as: Option<&RunAs>,
    log_path: &Path,
    settings: &[(String, String)],
) -> anyhow::Result<Command> {
    let log = File::create(log_path)
        .with_context(|| format!("creating the server log {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .context("duplicating the server log handle")?;

    let mut command = Command::new(program);
    command
        .arg("-D")
        .arg(dir.join(DATA_SUBDIR))
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(dir)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            // Throwaway data: durability only costs time here.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ]);
    for (name, value) in settings {
        command.arg("-c").arg(format!("{name}={value}"));
    }
    command
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    if let Some(user) = run_as {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    // Its own process group: Ctrl-C in a terminal signals the whole foreground group, and the
    // postmaster must outlive the relay's graceful stop, which still writes to it.
    command.process_group(0);

    let parent = std::process::id();
    // SAFETY: the hook runs between fork and exec, so it may only make async-signal-safe calls:
    // prctl and getppid are plain syscalls, and the errors are built without allocating.
    // std runs hooks after setuid/setgid, which matters because changing credentials clears
    // the parent-death signal.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGQUIT).map_err(io::Error::from)?;
            // If the parent died before prctl, no signal will ever come: give up instead.
            if nix::unistd::getppid().as_raw().cast_unsigned() != parent {
                return Err(io::Error::from(Errno::ESRCH));
            }
            Ok(())
        });
    }
    Ok(command)
}

/// Spawns `command` from a dedicated thread that then waits for it, and reports the exit.
///
/// Linux delivers the parent-death signal when the *thread* that forked the child exits, not
/// the process. Spawning from an async worker or a `spawn_blocking` thread would kill the
/// postmaster whenever the runtime retires that thread (tests keep one cluster in a static
/// while many short-lived runtimes come and go). This thread instead lives exactly as long as
/// the postmaster: it blocks in `wait` until the postmaster exits, so the signal can only fire
/// when the whole process dies, which is the one case where we want it.
async fn spawn_supervised(
    mut command: Command,
) -> anyhow::Result<(Pid, watch::Receiver<Option<String>>)> {
    let (spawned_tx, spawned_rx) = oneshot::channel::<io::Result<u32>>();
    let (exited_tx, exited_rx) = watch::channel(None);
    std::thread::Builder::new()
        .name("temp-postgres".into())
        .spawn(move || {
            let mut child = match command.spawn() {
                Ok(child) => child,
                Err(error) => {
                    let _ = spawned_tx.send(Err(error));
                    return;
                }
            };
            let _ = spawned_tx.send(Ok(child.id()));
            let status = match child.wait() {
                Ok(status) => status.to_string(),
                Err(error) => format!("could not wait for postgres: {error}"),
            };
            exited_tx.send_replace(Some(status));
        })
        .context("spawning the postmaster supervisor thread")?;
    let pid = spawned_rx
        .await
        .context("the postmaster supervisor thread died before spawning")??;
    let pid = i32::try_from(pid).context("child pid does not fit a pid_t")?;
    Ok((Pid::from_raw(pid), exited_rx))
}

/// A dropped sender (the supervisor thread died) counts as exited: nobody can tell us more.
fn has_exited(exited: &watch::Receiver<Option<String>>) -> bool {
    exited.borrow().is_some() || exited.has_changed().is_err()
}

async fn wait_exit(exited: &mut watch::Receiver<Option<String>>) {
    while !has_exited(exited) {
        if exited.changed().await.is_err() {
            return;
        }
    }
}

fn signal_postmaster(pid: Pid, signal: Signal) -> anyhow::Result<()> {
    match kill(pid, signal) {
        // Already gone between our check and the signal: that is what we wanted.
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(error) => Err(error).with_context(|| format!("sending {signal} to postmaster {pid}")),
    }
}

fn log_tail(path: &Path) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    read().unwrap_or_else(|error| format!("(could not read {}: {error})", path.display()))
}

/// Best effort: removes cluster directories of processes that died without cleaning up
/// (a static `TempPostgres` is never dropped, and SIGKILL skips every destructor).
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX)
            || !entry.file_type().is_ok_and(|kind| kind.is_dir())
        {
            continue;
        }
        let path = entry.path();
        if is_stale(&path)
            && let Err(error) = fs::remove_dir_all(&path)
        {
            tracing::debug!(%error, path = %path.display(), "could not remove a stale PostgreSQL directory");
        }
    }
}

fn is_stale(dir: &Path) -> bool {
    let owner = read_pid(&dir.join(OWNER_FILE));
    let postmaster = read_pid(&dir.join(DATA_SUBDIR).join("postmaster.pid"));
    if owner.is_some_and(is_running) || postmaster.is_some_and(is_running) {
        return false;
    }
    if owner.is_none() {
        let age = fs::metadata(dir)
            .and_then(|meta| meta.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok());
        return age.is_some_and(|age| age > UNOWNED_DIR_GRACE);
    }
    true
}

/// Reads the pid on the first line (the format of both our owner file and postmaster.pid).
fn read_pid(path: &Path) -> Option<Pid> {
    let text = fs::read_to_string(path).ok()?;
    let pid = text.lines().next()?.trim().parse::<i32>().ok()?;
    (pid > 0).then(|| Pid::from_raw(pid))
}

fn is_running(pid: Pid) -> bool {
    match kill(pid, None) {
        // EPERM: it exists but belongs to someone else.
        Ok(()) | Err(Errno::EPERM) => !is_zombie(pid),
        Err(_) => false,
    }
}

/// Orphans are reparented to pid 1, which in containers often never reaps them; a zombie
/// still answers kill(pid, 0) but holds nothing.
fn is_zombie(pid: Pid) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z")
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
