//! The benchmark's receiver in a process of its own, as subscribers run in production: the
//! bench binary starts itself again with `--serve-receiver`, and that child serves the tests'
//! receiver plus a small control API on loopback. So the receiver's CPU is not counted in
//! the relay's process, and the relay's scheduler is not shared with it.
//!
//! Control API (the child's second listener): `GET /received?path=P` → JSON list of
//! `{webhook_id, seq, at_unix_ns}`; `POST /delay?path=P&ms=D&status=S` → every request to P
//! is answered S after D ms. The child exits when its stdin closes (the parent is gone).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use testkit::receiver::{Receiver, Reply};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// One request as the parent sees it; `at` is on the parent's own clock.
pub struct Arrival {
    pub webhook_id: Option<String>,
    pub seq: Option<i64>,
    pub at: Instant,
}

#[derive(Serialize, Deserialize)]
struct WireArrival {
    webhook_id: Option<String>,
    seq: Option<i64>,
    at_unix_ns: u128,
}

pub struct RemoteReceiver {
    addr: SocketAddr,
    control: SocketAddr,
    http: reqwest::Client,
    /// The child; killed when this value drops (`kill_on_drop`).
    _child: tokio::process::Child,
}

impl RemoteReceiver {
    pub async fn start() -> anyhow::Result<RemoteReceiver> {
        let exe = std::env::current_exe().context("finding the bench binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--serve-receiver")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the receiver process")?;
        let stdout = child.stdout.take().context("receiver stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .await
            .context("reading the receiver's addresses")?;
        let mut parts = line.split_whitespace();
        let addr = parts
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("the receiver printed {line:?}, not its addresses"))?;
        let control = parts
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("the receiver printed {line:?}, not its addresses"))?;
        Ok(RemoteReceiver {
            addr,
            control,
            http: reqwest::Client::new(),
            _child: child,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every request that reached `path`, in arrival order.
    pub async fn received(&self, path: &str) -> anyhow::Result<Vec<Arrival>> {
        let body = self
            .http
            .get(format!("http://{}/received", self.control))
            .query(&[("path", path)])
            .send()
            .await
            .context("asking the receiver what arrived")?
            .error_for_status()?
            .bytes()
            .await
            .context("reading what arrived")?;
        let wire: Vec<WireArrival> =
            serde_json::from_slice(&body).context("decoding what arrived")?;
        // Map the child's wall-clock stamps onto this process's monotonic clock.
        let (now_wall, now_mono) = (unix_ns(SystemTime::now()), Instant::now());
        Ok(wire
            .into_iter()
            .map(|w| {
                let ago = Duration::from_nanos(
                    u64::try_from(now_wall.saturating_sub(w.at_unix_ns)).unwrap_or(u64::MAX),
                );
                Arrival {
                    webhook_id: w.webhook_id,
                    seq: w.seq,
                    at: now_mono.checked_sub(ago).unwrap_or(now_mono),
                }
            })
            .collect())
    }

    /// Requests to `path` are answered `status` after `delay`.
    pub async fn set_delay(&self, path: &str, delay: Duration, status: u16) -> anyhow::Result<()> {
        self.http
            .post(format!("http://{}/delay", self.control))
            .query(&[
                ("path", path.to_string()),
                ("ms", delay.as_millis().to_string()),
                ("status", status.to_string()),
            ])
            .send()
            .await
            .context("scripting the receiver")?
            .error_for_status()?;
        Ok(())
    }
}

fn unix_ns(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

#[derive(Deserialize)]
struct PathQuery {
    path: String,
}

#[derive(Deserialize)]
struct DelayQuery {
    path: String,
    ms: u64,
    status: u16,
}

/// The child: serves until its stdin closes.
pub async fn serve() -> anyhow::Result<()> {
    let receiver = Arc::new(Receiver::start().await.context("starting the receiver")?);
    // Received.at is this process's Instant; stamps go out as wall-clock time.
    let (wall, mono) = (unix_ns(SystemTime::now()), Instant::now());
    let to_wall = move |at: Instant| -> u128 {
        if at >= mono {
            wall + at.duration_since(mono).as_nanos()
        } else {
            wall.saturating_sub(mono.duration_since(at).as_nanos())
        }
    };
    let received = move |State(receiver): State<Arc<Receiver>>, Query(q): Query<PathQuery>| async move {
        let list: Vec<WireArrival> = receiver
            .received(&q.path)
            .iter()
            .map(|r| WireArrival {
                webhook_id: r.header("webhook-id").map(str::to_owned),
                seq: r.json()["data"]["seq"].as_i64(),
                at_unix_ns: to_wall(r.at),
            })
            .collect();
        Json(list)
    };
    let delay = |State(receiver): State<Arc<Receiver>>, Query(q): Query<DelayQuery>| async move {
        receiver.set_default(&q.path, Reply::Delay(Duration::from_millis(q.ms), q.status));
        "ok"
    };
    let control = Router::new()
        .route("/received", get(received))
        .route("/delay", post(delay))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the control listener")?;
    let control_addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, control).await;
    });
    println!("{} {}", receiver.addr, control_addr);
    // Until the parent closes our stdin (or dies).
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    Ok(())
}
