//! A TCP relay between the outbox relay and a broker, so a test can break the relay's
//! connection mid-drain (as a broker restart or a network cut would) and see what it does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
    links: Arc<Mutex<Vec<Link>>>,
    /// While set, bytes are read and dropped in both directions: what the relay sends then is
    /// lost on the way, as on a network that fails before the connection is seen to break.
    blackhole: Arc<AtomicBool>,
}

struct Link {
    /// The proxy's own address towards the broker: how the broker sees this connection.
    upstream_local: SocketAddr,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let links: Arc<Mutex<Vec<Link>>> = Arc::default();
        let blackhole = Arc::new(AtomicBool::new(false));
        let accepted = Arc::clone(&links);
        let dropping = Arc::clone(&blackhole);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let upstream_local = server.local_addr().expect("upstream local address");
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let (up, down) = (Arc::clone(&dropping), Arc::clone(&dropping));
                let task = tokio::spawn(async move {
                    tokio::select! {
                        () = forward(client_read, server_write, up) => {}
                        () = forward(server_read, client_write, down) => {}
                    }
                });
                let mut links = accepted.lock().expect("proxy links");
                links.retain(|link| !link.task.is_finished());
                links.push(Link {
                    upstream_local,
                    task,
                });
            }
        });
        Proxy {
            addr,
            accept,
            links,
            blackhole,
        }
    }

    /// From now on, drops what either side sends (see [`Proxy::cut`] to end it).
    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }

    /// Forwards again (after [`Proxy::blackhole`]).
    pub fn resume(&self) {
        self.blackhole.store(false, Ordering::SeqCst);
    }

    /// Drops every open connection (both sides see it closed); new ones are still accepted,
    /// as after a broker restart. Returns how many were open.
    pub fn cut(&self) -> usize {
        self.resume();
        let mut links = self.links.lock().expect("proxy links");
        let open = links.iter().filter(|link| !link.task.is_finished()).count();
        for link in links.drain(..) {
            link.task.abort();
        }
        open
    }

    /// How the broker sees the open connections (its `CLIENT LIST` `addr`).
    pub fn upstream_addrs(&self) -> Vec<SocketAddr> {
        self.links
            .lock()
            .expect("proxy links")
            .iter()
            .filter(|link| !link.task.is_finished())
            .map(|link| link.upstream_local)
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies `from` to `to` until either closes, dropping the bytes while `blackhole` is set.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => {
                if !blackhole.load(Ordering::SeqCst) && to.write_all(&buffer[..read]).await.is_err()
                {
                    return;
                }
            }
        }
    }
}
