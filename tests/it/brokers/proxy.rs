//! A TCP relay between the outbox relay and a broker, so a test can break the relay's
//! connection mid-drain (as a broker restart or a network cut would) and see what it does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
    links: Arc<Mutex<Vec<Link>>>,
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
        let accepted = Arc::clone(&links);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let upstream_local = server.local_addr().expect("upstream local address");
                let task = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
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
        }
    }

    /// Drops every open connection (both sides see it closed); new ones are still accepted,
    /// as after a broker restart. Returns how many were open.
    pub fn cut(&self) -> usize {
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
