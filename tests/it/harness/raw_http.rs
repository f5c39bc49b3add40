//! A subscriber that answers with exact bytes, to play the ones the relay must survive:
//! NUL bytes, invalid UTF-8, bodies shorter than their Content-Length, endless or invalid
//! headers, connections reset mid-answer. Each connection reads one request and gets the
//! same answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// What the server sends back.
#[derive(Clone, Debug)]
pub enum Answer {
    /// These bytes, then the connection is closed.
    Bytes(Vec<u8>),
    /// These bytes, then the connection is reset (RST, not FIN).
    BytesThenReset(Vec<u8>),
    /// A status line, then header lines for as long as the client keeps reading.
    EndlessHeaders,
}

impl Answer {
    /// A complete HTTP/1.1 answer with `status`, `body` and a correct Content-Length.
    pub fn status_with_body(status: u16, body: &[u8]) -> Answer {
        let mut bytes = format!(
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        Answer::Bytes(bytes)
    }
}

pub struct RawServer {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    /// Request bodies, in the order the requests were read.
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    /// When set, each answer waits for one permit (tests release them one by one).
    gate: Option<Arc<Semaphore>>,
}

impl RawServer {
    pub async fn start(answer: Answer) -> RawServer {
        Self::start_inner(answer, None).await
    }

    /// Answers only as [`RawServer::release`] allows: the request is read (counted) first.
    pub async fn start_gated(answer: Answer) -> RawServer {
        Self::start_inner(answer, Some(Arc::new(Semaphore::new(0)))).await
    }

    async fn start_inner(answer: Answer, gate: Option<Arc<Semaphore>>) -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw server");
        let addr = listener.local_addr().expect("raw server address");
        let requests = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = Seen {
            requests: requests.clone(),
            bodies: bodies.clone(),
        };
        let gate_for_server = gate.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = answer.clone();
                let seen = seen.clone();
                let gate = gate_for_server.clone();
                tokio::spawn(async move {
                    let _ = serve_one(stream, answer, seen, gate).await;
                });
            }
        });
        RawServer {
            addr,
            requests,
            bodies,
            gate,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Requests read so far (answered or not).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The JSON bodies of the requests read so far, in arrival order.
    pub fn json_bodies(&self) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|body| serde_json::from_slice(body).expect("a JSON request body"))
            .collect()
    }

    /// Lets `answers` more waiting (or future) requests get their answer.
    pub fn release(&self, answers: usize) {
        if let Some(gate) = &self.gate {
            gate.add_permits(answers);
        }
    }
}

#[derive(Clone)]
struct Seen {
    requests: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

async fn serve_one(
    mut stream: TcpStream,
    answer: Answer,
    seen: Seen,
    gate: Option<Arc<Semaphore>>,
) -> std::io::Result<()> {
    let body = read_request(&mut stream).await?;
    seen.bodies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(body);
    seen.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(gate) = gate {
        gate.acquire()
            .await
            .map_err(std::io::Error::other)?
            .forget();
    }
    match answer {
        Answer::Bytes(bytes) => {
            stream.write_all(&bytes).await?;
            stream.shutdown().await?;
        }
        Answer::BytesThenReset(bytes) => {
            stream.write_all(&bytes).await?;
            stream.flush().await?;
            // Linger 0: closing sends RST instead of FIN (and never blocks, which is what
            // the deprecation warns about for a non-zero linger).
            #[allow(deprecated)]
            stream.set_linger(Some(std::time::Duration::ZERO))?;
            drop(stream);
        }
        Answer::EndlessHeaders => {
            stream.write_all(b"HTTP/1.1 200 OK\r\n").await?;
            let line = format!("x-filler: {}\r\n", "a".repeat(1000));
            loop {
                stream.write_all(line.as_bytes()).await?;
            }
        }
    }
    Ok(())
}

/// Reads one request: headers up to the blank line, then Content-Length bytes of body, which
/// it returns.
async fn read_request(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    while buffer.len() < header_end + length {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    Ok(buffer[header_end..].to_vec())
}
