//! A real PgBouncer in transaction mode in front of one test database.
//!
//! [`PgBouncer::start`] runs the `pgbouncer` binary (Debian package `pgbouncer`) on 127.0.0.1
//! on a free port, with its config, user list and log in a temporary directory, and kills it
//! when dropped. It has few server connections on purpose: with more clients than server
//! connections, consecutive round trips of one client really land on different server
//! connections, which is what breaks session state.
//!
//! When the binary is missing, the test fails, unless `OUTBOX_ALLOW_MISSING_TOOLS=1`: then
//! it prints a loud `SKIPPED` line and returns (see [`super::tools`]).

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tokio_postgres::config::Host;

use super::db::TestDb;

const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The free port we pick can be taken before pgbouncer binds it.
const BIND_ATTEMPTS: usize = 5;
const LOG_FILE: &str = "pgbouncer.log";

pub struct PgBouncer {
    child: Child,
    port: u16,
    database: String,
    user: String,
    password: Option<String>,
    /// Holds the config and log; deleted after the process is gone (field order).
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// A transaction-mode PgBouncer in front of `db` with at most `server_connections`
    /// connections to PostgreSQL. Panics when pgbouncer is not installed, unless
    /// `OUTBOX_ALLOW_MISSING_TOOLS=1`: then `None` (after printing why), and the caller
    /// returns at once.
    pub fn start(db: &TestDb, server_connections: u32, test: &str) -> Option<PgBouncer> {
        let Some(binary) = find_binary() else {
            super::tools::missing_tool(
                "pgbouncer",
                test,
                "`apt-get install -y pgbouncer`",
                "not found on PATH nor in /usr/sbin",
            );
            return None;
        };
        match Self::try_start(&binary, db, server_connections) {
            Ok(bouncer) => Some(bouncer),
            Err(error) => panic!(
                "{test}: starting pgbouncer ({}): {error:#}",
                binary.display()
            ),
        }
    }

    fn try_start(binary: &Path, db: &TestDb, server_connections: u32) -> anyhow::Result<Self> {
        let server: tokio_postgres::Config = db
            .url
            .parse()
            .with_context(|| format!("parsing the test database URL {}", db.url))?;
        let host = match server.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(dir)) => dir.display().to_string(),
            None => "127.0.0.1".to_string(),
        };
        let server_port = server.get_ports().first().copied().unwrap_or(5432);
        let user = server
            .get_user()
            .context("the test database URL names no user")?
            .to_string();
        let password = server
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());

        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pgbouncer-")
            .tempdir()
            .context("creating pgbouncer's directory")?;
        // pgbouncer refuses to run as root; run it as the `postgres` user, which must be able
        // to write its log here.
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .context("looking up the `postgres` user")?
                .ok_or_else(|| {
                    anyhow!("running as root and there is no `postgres` user to run pgbouncer as")
                })?;
            nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid))
                .context("handing pgbouncer's directory to `postgres`")?;
            Some(user)
        } else {
            None
        };

        // Trust: the password (if any) is only what pgbouncer logs in to PostgreSQL with.
        fs::write(
            dir.path().join("userlist.txt"),
            format!(
                "{} {}\n",
                quote(&user),
                quote(password.as_deref().unwrap_or(""))
            ),
        )
        .context("writing pgbouncer's user list")?;

        let mut failures = Vec::new();
        for _ in 0..BIND_ATTEMPTS {
            let port = free_port()?;
            let config = format!(
                "[databases]\n\
                 {name} = host={host} port={server_port} dbname={name}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {dir}/userlist.txt\n\
                 logfile = {dir}/{LOG_FILE}\n\
                 pool_mode = transaction\n\
                 default_pool_size = {server_connections}\n\
                 max_db_connections = {server_connections}\n\
                 min_pool_size = 0\n\
                 reserve_pool_size = 0\n\
                 max_client_conn = 200\n\
                 ignore_startup_parameters = extra_float_digits\n",
                name = db.name,
                dir = dir.path().display(),
            );
            let config_path = dir.path().join("pgbouncer.ini");
            fs::write(&config_path, config).context("writing pgbouncer.ini")?;

            let mut command = Command::new(binary);
            command
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(user) = &run_as {
                command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
            }
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            // If the test binary dies without running Drop, pgbouncer goes with it. (Set
            // after the uid switch above, which would otherwise clear it.)
            unsafe {
                command.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                        .map_err(std::io::Error::from)
                });
            }
            let mut child = command.spawn().context("spawning pgbouncer")?;
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    return Ok(PgBouncer {
                        child,
                        port,
                        database: db.name.clone(),
                        user,
                        password,
                        _dir: dir,
                    });
                }
                Err(error) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = log_tail(dir.path());
                    let port_taken = log.contains("Address already in use");
                    failures.push(format!("{error:#}; log:\n{log}"));
                    if !port_taken {
                        bail!("{}", failures.join("\n"));
                    }
                }
            }
        }
        bail!(
            "no free port in {BIND_ATTEMPTS} attempts: {}",
            failures.join("\n")
        )
    }

    /// Connection string of the test database through the pooler (key=value form).
    pub fn url(&self) -> String {
        let mut url = format!(
            "host=127.0.0.1 port={} dbname={} user={}",
            self.port,
            quote_value(&self.database),
            quote_value(&self.user)
        );
        if let Some(password) = &self.password {
            url.push_str(&format!(" password={}", quote_value(password)));
        }
        url
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // SIGKILL: nothing of pgbouncer's state is worth a graceful stop in a test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_ready(child: &mut Child, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("polling pgbouncer")? {
            bail!("pgbouncer exited at startup ({status})");
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("pgbouncer did not accept connections within {READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The end of pgbouncer's log, for failure messages.
fn log_tail(dir: &Path) -> String {
    let mut tail = String::new();
    if let Ok(mut file) = fs::File::open(dir.join(LOG_FILE)) {
        let length = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(4096)));
        let _ = file.read_to_string(&mut tail);
    }
    tail
}

fn find_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    // Debian installs it in /usr/sbin, which is not on every PATH.
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener
        .local_addr()
        .context("reading a bound port")?
        .port())
}

/// A userlist.txt field: double-quoted, inner quotes doubled.
fn quote(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

/// A libpq key=value value: single-quoted, backslash-escaped.
fn quote_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}
