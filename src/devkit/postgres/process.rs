//! Running the postmaster: start it supervised, signal it, read its log, and clear out the
//! directories of clusters whose owner died.

use super::*;

pub(super) enum LaunchError {
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

/// Starts the postmaster and waits until it accepts connections.
pub(super) async fn launch(
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

pub(super) fn postmaster_command(
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
pub(super) async fn spawn_supervised(
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
pub(super) fn has_exited(exited: &watch::Receiver<Option<String>>) -> bool {
    exited.borrow().is_some() || exited.has_changed().is_err()
}

pub(super) async fn wait_exit(exited: &mut watch::Receiver<Option<String>>) {
    while !has_exited(exited) {
        if exited.changed().await.is_err() {
            return;
        }
    }
}

pub(super) fn signal_postmaster(pid: Pid, signal: Signal) -> anyhow::Result<()> {
    match kill(pid, signal) {
        // Already gone between our check and the signal: that is what we wanted.
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(error) => Err(error).with_context(|| format!("sending {signal} to postmaster {pid}")),
    }
}

pub(super) fn log_tail(path: &Path) -> String {
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
pub(super) fn remove_stale_dirs(base: &Path) {
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

pub(super) fn is_stale(dir: &Path) -> bool {
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
pub(super) fn read_pid(path: &Path) -> Option<Pid> {
    let text = fs::read_to_string(path).ok()?;
    let pid = text.lines().next()?.trim().parse::<i32>().ok()?;
    (pid > 0).then(|| Pid::from_raw(pid))
}

pub(super) fn is_running(pid: Pid) -> bool {
    match kill(pid, None) {
        // EPERM: it exists but belongs to someone else.
        Ok(()) | Err(Errno::EPERM) => !is_zombie(pid),
        Err(_) => false,
    }
}

/// Orphans are reparented to pid 1, which in containers often never reaps them; a zombie
/// still answers kill(pid, 0) but holds nothing.
pub(super) fn is_zombie(pid: Pid) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z")
}
