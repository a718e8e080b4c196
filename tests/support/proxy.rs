//! A TCP proxy the test controls, to make a real server unreachable without
//! losing its data: `cut` closes every proxied connection and refuses new
//! ones (they are accepted and closed at once) until `restore`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Replies from the server are read and thrown away (the requests still
    /// reach it): a command is applied and its caller never hears of it.
    drop_replies: Arc<AtomicBool>,
    /// Bumped on every cut: live connections watch it and close.
    generation: watch::Sender<u64>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let drop_replies = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let stop = CancellationToken::new();
        let (c, g, s, d) = (
            cut.clone(),
            generation.clone(),
            stop.clone(),
            drop_replies.clone(),
        );
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = s.cancelled() => break,
                    a = listener.accept() => a,
                };
                let Ok((inbound, _)) = accepted else {
                    continue;
                };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut changed = g.subscribe();
                let s = s.clone();
                let d = d.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = inbound.into_split();
                    let (mut server_read, mut server_write) = outbound.into_split();
                    let up = tokio::io::copy(&mut client_read, &mut server_write);
                    let down = async move {
                        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = server_read.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            if !d.load(Ordering::SeqCst) {
                                client_write.write_all(&buf[..n]).await?;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = changed.changed() => {}
                        () = s.cancelled() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            cut,
            drop_replies,
            generation,
            stop,
        }
    }

    /// A proxy in front of `url`'s host and port.
    pub async fn in_front_of(url: &str) -> Proxy {
        let parsed = url::Url::parse(url).expect("url");
        let upstream = tokio::net::lookup_host((
            parsed.host_str().expect("host"),
            parsed.port_or_known_default().unwrap_or(6379),
        ))
        .await
        .expect("resolve")
        .next()
        .expect("an address");
        Self::start(upstream).await
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let mut u = url::Url::parse(url).expect("url");
        u.set_ip_host(self.addr.ip()).expect("host");
        u.set_port(Some(self.addr.port())).expect("port");
        u.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every proxied connection; new ones are closed at once.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// From now on the server's replies are thrown away (`true`), or
    /// forwarded again (`false`).
    pub fn drop_replies(&self, on: bool) {
        self.drop_replies.store(on, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
