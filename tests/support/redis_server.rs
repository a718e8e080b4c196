//! A Redis server of the test's own, on a free loopback port, without
//! persistence, so that a test can stop it (`SHUTDOWN NOSAVE`) and start it
//! again empty on the same port. The process is killed when the value drops.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long the server may take to answer `PING` after a start, or to exit
/// after `SHUTDOWN NOSAVE`.
const STARTUP: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port and waits until it
    /// answers `PING`. A port taken by someone else between the probe and the
    /// bind makes the server exit; then another port is tried.
    pub async fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("vtest-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the redis working directory");
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                port,
                dir: dir.clone(),
                child: None,
            };
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A connection of the test's own (not the store's).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("redis url");
        tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        .expect("connect in time")
        .expect("connect to the test's redis")
    }

    /// True while the server process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `SHUTDOWN NOSAVE`, then waits for the process to exit: all data is
    /// gone, and the port refuses connections.
    pub async fn shutdown_nosave(&mut self) {
        let mut conn = self.connection().await;
        self.shutdown_on(&mut conn).await;
    }

    /// `SHUTDOWN NOSAVE` on a connection the caller already holds (for
    /// instance one that paused the clients first), then waits for the exit.
    pub async fn shutdown_on(&mut self, conn: &mut redis::aio::MultiplexedConnection) {
        // The server closes the connection instead of answering.
        let _: redis::RedisResult<()> =
            redis::cmd("SHUTDOWN").arg("NOSAVE").query_async(conn).await;
        self.wait_exit().await;
    }

    async fn wait_exit(&mut self) {
        let deadline = tokio::time::Instant::now() + STARTUP;
        while self.running() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not exit after SHUTDOWN NOSAVE"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Starts the server again, empty, on the same port.
    pub async fn restart(&mut self) {
        assert!(!self.running(), "restart of a server that still runs");
        self.spawn_and_wait()
            .await
            .unwrap_or_else(|e| panic!("could not restart redis-server: {e}"));
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn redis-server: {e}"))?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + STARTUP;
        loop {
            if !self.running() {
                self.child = None;
                return Err(format!(
                    "redis-server exited at start on port {}",
                    self.port
                ));
            }
            if self.ping().await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING",
                    self.port
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let attempt = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), attempt).await,
            Ok(Ok(_))
        )
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port the kernel just handed out and that nobody listens on now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a probe socket");
    l.local_addr().expect("probe address").port()
}
