//! A TCP proxy the test controls, in front of Redis and of PostgreSQL.
//!
//! - [`Proxy::cut`] closes every live connection (with a reset) and closes
//!   every new one at once until [`Proxy::restore`];
//! - [`Proxy::reset`] closes every live connection once and keeps accepting;
//! - [`Proxy::delay`] adds latency to every chunk forwarded, both ways.
//!
//! Each accepted connection belongs to a generation: a cancellation token
//! that a cut or a reset fires and replaces under one lock, so no connection
//! accepted before a cut survives it and none accepted after it is lost.
//! Tasks wait on sockets and tokens only: no polling loop.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Proxy {
    port: u16,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    target: String,
    /// Whether new connections are refused, and the current generation.
    gate: Mutex<(bool, CancellationToken)>,
    delay_ms: AtomicU64,
    accepted: AtomicUsize,
    refused: AtomicUsize,
    live: AtomicUsize,
}

impl State {
    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))
    }

    /// Fires the current generation and starts a new one; returns how many
    /// connections were live.
    fn close_all(&self, refuse: Option<bool>) -> usize {
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = refuse {
            gate.0 = r;
        }
        let live = self.live.load(Ordering::SeqCst);
        std::mem::take(&mut gate.1).cancel();
        live
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`
    /// (`host:port`).
    pub async fn start(target: impl Into<String>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State {
            target: target.into(),
            gate: Mutex::new((false, CancellationToken::new())),
            delay_ms: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
        });
        let s = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let inbound = match listener.accept().await {
                    Ok((inbound, _)) => inbound,
                    Err(_) => {
                        // Out of descriptors or the like: wait, do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let token = {
                    let gate = s.gate.lock().unwrap_or_else(|e| e.into_inner());
                    if gate.0 {
                        s.refused.fetch_add(1, Ordering::SeqCst);
                        let _ = inbound.set_zero_linger();
                        drop(inbound);
                        continue;
                    }
                    gate.1.clone()
                };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(forward(s.clone(), inbound, token));
            }
        });
        Ok(Proxy {
            port,
            state,
            accept,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every live connection and refuses new ones until
    /// [`Proxy::restore`]. Returns how many were live.
    pub fn cut(&self) -> usize {
        self.state.close_all(Some(true))
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.state.gate.lock().unwrap_or_else(|e| e.into_inner()).0 = false;
    }

    /// Closes every live connection once; new ones are accepted.
    pub fn reset(&self) -> usize {
        self.state.close_all(None)
    }

    /// Adds `d` of latency to every chunk forwarded (zero: none).
    pub fn delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    pub fn live(&self) -> usize {
        self.state.live.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.state.close_all(Some(true));
    }
}

/// Forwards one connection until either side closes both ways or its
/// generation is fired.
async fn forward(state: Arc<State>, mut inbound: TcpStream, token: CancellationToken) {
    state.live.fetch_add(1, Ordering::SeqCst);
    let outbound = tokio::select! {
        _ = token.cancelled() => None,
        c = TcpStream::connect(&state.target) => c.ok(),
    };
    if let Some(mut outbound) = outbound {
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        let fired = {
            let (mut ri, mut wi) = inbound.split();
            let (mut ro, mut wo) = outbound.split();
            tokio::select! {
                _ = token.cancelled() => true,
                _ = async {
                    tokio::join!(
                        pump(&state, &mut ri, &mut wo),
                        pump(&state, &mut ro, &mut wi)
                    )
                } => false,
            }
        };
        if fired {
            // A reset, as a network failure would look to both ends.
            let _ = inbound.set_zero_linger();
            let _ = outbound.set_zero_linger();
        }
    } else {
        let _ = inbound.set_zero_linger();
    }
    state.live.fetch_sub(1, Ordering::SeqCst);
}

/// Copies one direction, chunk by chunk, with the configured delay before
/// each chunk; passes the end of the stream on.
async fn pump<R, W>(state: &State, r: &mut R, w: &mut W)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let d = state.delay();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// An echo server on a free port.
    async fn echo() -> (String, JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = l.local_addr().expect("addr").to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, task)
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("timed out"))??;
        Ok(buf)
    }

    /// The connection is closed: a read returns the end or an error.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    #[tokio::test]
    async fn cut_restore_reset_and_delay_do_what_they_say() {
        // Proves: traffic passes; a cut closes live connections and closes
        // new ones until restored; a reset closes live connections once and
        // keeps accepting; a delay adds latency per chunk each way.
        let (addr, _echo) = echo().await;
        let p = Proxy::start(addr).await.expect("proxy");
        let to = format!("127.0.0.1:{}", p.port());
        let mut a = TcpStream::connect(&to).await.expect("connect");
        assert_eq!(roundtrip(&mut a, b"ping").await.expect("echo"), b"ping");

        assert_eq!(p.live(), 1);
        assert_eq!(p.cut(), 1, "one live connection closed by the cut");
        assert!(closed(&mut a).await, "the cut closed the live connection");
        let mut b = TcpStream::connect(&to)
            .await
            .expect("the port still accepts");
        assert!(
            closed(&mut b).await,
            "a new connection is closed during the cut"
        );
        assert_eq!(p.refused(), 1);

        p.restore();
        let mut c = TcpStream::connect(&to).await.expect("connect");
        assert_eq!(roundtrip(&mut c, b"again").await.expect("echo"), b"again");

        assert_eq!(p.reset(), 1);
        assert!(closed(&mut c).await, "the reset closed the live connection");
        let mut d = TcpStream::connect(&to).await.expect("connect");
        assert_eq!(roundtrip(&mut d, b"after").await.expect("echo"), b"after");

        p.delay(Duration::from_millis(150));
        let t = Instant::now();
        assert_eq!(roundtrip(&mut d, b"slow").await.expect("echo"), b"slow");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "two chunks, 150 ms each: {:?}",
            t.elapsed()
        );
        p.delay(Duration::ZERO);
        let t = Instant::now();
        assert_eq!(roundtrip(&mut d, b"fast").await.expect("echo"), b"fast");
        assert!(
            t.elapsed() < Duration::from_millis(150),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(p.accepted(), 3);
    }
}
