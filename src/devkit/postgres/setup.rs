//! Making a throwaway cluster's data directory: finding the server binaries, `initdb` (as the
//! postgres user when run as root), private files, a free port.

use super::*;

pub(super) fn url_for_port(port: u16, database: &str) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{port}/{}",
        percent_encode(database)
    )
}

/// Database names may hold any character; the URL path must not carry `/`, `?`, `%` and friends raw.
pub(super) fn percent_encode(text: &str) -> String {
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
pub(super) struct RunAs {
    pub(super) uid: Uid,
    pub(super) gid: Gid,
}

/// initdb and postgres refuse to run as root, so as root we become the `postgres` user.
pub(super) fn run_as_user() -> anyhow::Result<Option<RunAs>> {
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

pub(super) async fn find_bindir() -> anyhow::Result<PathBuf> {
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

pub(super) async fn initdb(
    bindir: &Path,
    dir: &Path,
    run_as: Option<&RunAs>,
) -> anyhow::Result<()> {
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
pub(super) fn write_private(
    path: &Path,
    contents: &[u8],
    run_as: Option<&RunAs>,
) -> anyhow::Result<()> {
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
pub(super) fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener
        .local_addr()
        .context("reading the port of a bound listener")?
        .port())
}
