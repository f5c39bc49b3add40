//! A TCP relay between the outbox relay and a broker, so a test can break the relay's
//! connection mid-drain (as a broker restart or a network cut would) and see what it does.
//! [`Proxy::start_tls`] also ends TLS in front of a broker that has no TLS port here, so the
//! relay's `rediss://` and `amqps://` connections meet a real certificate check.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

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
        Proxy::start_with(upstream, None).await
    }

    /// [`Proxy::start`], each connection TLS on the listening side (ended here with
    /// `acceptor`'s certificate), plain towards `upstream`. A client whose handshake fails is
    /// dropped.
    pub async fn start_tls(upstream: SocketAddr, acceptor: TlsAcceptor) -> Proxy {
        Proxy::start_with(upstream, Some(acceptor)).await
    }

    async fn start_with(upstream: SocketAddr, tls: Option<TlsAcceptor>) -> Proxy {
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
                let (up, down) = (Arc::clone(&dropping), Arc::clone(&dropping));
                let tls = tls.clone();
                let task = tokio::spawn(async move {
                    match tls {
                        None => pipe(client, server, up, down).await,
                        // The handshake runs in the link's task, so a client that never
                        // finishes it holds up nobody else.
                        Some(acceptor) => {
                            if let Ok(client) = acceptor.accept(client).await {
                                pipe(client, server, up, down).await;
                            }
                        }
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

/// Forwards both ways between `client` and `server` until either side closes.
async fn pipe<C>(client: C, server: TcpStream, up: Arc<AtomicBool>, down: Arc<AtomicBool>)
where
    C: AsyncRead + AsyncWrite + Send + 'static,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = forward(client_read, server_write, up) => {}
        () = forward(server_read, client_write, down) => {}
    }
}

/// Copies `from` to `to` until either closes, dropping the bytes while `blackhole` is set.
async fn forward(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
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
