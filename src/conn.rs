//! One Redis connection type for standalone Redis and Redis Cluster.
//!
//! [`RedisConn`] is a multiplexed, self-reconnecting connection: a
//! [`ConnectionManager`] on standalone Redis, a cluster connection (which
//! follows `MOVED`/`ASK` and refreshes the slot map after a failover) when
//! `REDIS_CLUSTER_NODES` is set. Both implement redis-rs's `ConnectionLike`,
//! so every command, script and pipeline works on either; on a cluster a
//! pipeline must stay within one slot, which every pipeline of the product
//! does (they are built per partition).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::{Config, RedisTarget};
use crate::error::{Error, Result};

/// How a connection behaves; see [`RedisConn::connect`].
#[derive(Debug, Clone, Copy)]
pub struct ConnOptions {
    /// Longest wait for one reply.
    pub response_timeout: Duration,
    /// Reconnect attempts of a standalone connection before a command fails.
    pub retries: usize,
}

impl ConnOptions {
    /// The store's: fail fast (the fallback answers while Redis is down).
    pub fn store(config: &Config) -> Self {
        ConnOptions {
            response_timeout: config.redis_timeout,
            retries: 0,
        }
    }
}

/// A Redis connection: standalone or cluster.
#[derive(Clone)]
pub enum RedisConn {
    /// Standalone Redis (`REDIS_URL`).
    Standalone(ConnectionManager),
    /// Redis Cluster (`REDIS_CLUSTER_NODES`).
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisConn::Standalone(_) => "RedisConn::Standalone",
            RedisConn::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl RedisConn {
    /// Connects to the configured Redis, failing when it does not answer
    /// within `REDIS_TIMEOUT_MS`.
    ///
    /// A failure names where Redis was looked for ([`Error::Connect`]:
    /// `host:port`, or the cluster's seed nodes; never a password).
    pub async fn connect(config: &Config, opts: ConnOptions) -> Result<Self> {
        if config.cluster_nodes.is_empty() {
            let (client, cm) = standalone(config, opts)?;
            let conn = ConnectionManager::new_with_config(client, cm)
                .await
                .map_err(|e| connect_error(config, e))?;
            Ok(RedisConn::Standalone(conn))
        } else {
            let client = cluster_builder(config, opts)?.build()?;
            let conn = tokio::time::timeout(
                config.redis_timeout.max(Duration::from_secs(1)),
                client.get_async_connection(),
            )
            .await
            .map_err(|_| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "timed out connecting to the cluster",
                ))
            })
            .and_then(|c| c)
            .map_err(|e| connect_error(config, e))?;
            Ok(RedisConn::Cluster(conn))
        }
    }

    /// Like [`RedisConn::connect`], but connects on first use.
    pub fn connect_lazy(config: &Config, opts: ConnOptions) -> Result<Self> {
        if config.cluster_nodes.is_empty() {
            let (client, cm) = standalone(config, opts)?;
            Ok(RedisConn::Standalone(
                ConnectionManager::new_lazy_with_config(client, cm)?,
            ))
        } else {
            let client = cluster_builder(config, opts)?.build()?;
            Ok(RedisConn::Cluster(
                client.get_pending_async_connection_with_config(Default::default()),
            ))
        }
    }

    /// True on a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// The addresses (`host:port`) of the cluster's primaries, from
    /// `CLUSTER NODES`; empty on standalone Redis.
    pub async fn primaries(&mut self) -> Result<Vec<(String, u16)>> {
        let RedisConn::Cluster(c) = self else {
            return Ok(Vec::new());
        };
        let text: String = c
            .route_command(
                redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
            .and_then(|v| redis::from_redis_value(v).map_err(Into::into))?;
        Ok(parse_primaries(&text))
    }

    /// Every key matching `pattern`: one `SCAN` on standalone Redis, one per
    /// primary on a cluster.
    pub async fn scan_all(&mut self, pattern: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for server in self.servers().await? {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, keys): (u64, Vec<String>) = self.on_server(server.as_ref(), cmd).await?;
                out.extend(keys);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(out)
    }

    /// `used_memory` from `INFO memory`, summed over the primaries of a
    /// cluster.
    pub async fn used_memory(&mut self) -> Result<Option<u64>> {
        let mut total = None;
        for server in self.servers().await? {
            let mut cmd = redis::cmd("INFO");
            cmd.arg("memory");
            let info: String = self.on_server(server.as_ref(), cmd).await?;
            if let Some(n) = info
                .lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                total = Some(total.unwrap_or(0) + n);
            }
        }
        Ok(total)
    }

    /// The servers a per-server command (`SCAN`, `INFO`) must visit: each
    /// primary of a cluster, or `None` for this connection's own server.
    async fn servers(&mut self) -> Result<Vec<Option<(String, u16)>>> {
        let nodes = self.primaries().await?;
        Ok(if nodes.is_empty() {
            vec![None]
        } else {
            nodes.into_iter().map(Some).collect()
        })
    }

    /// Runs `cmd` on one server of [`RedisConn::servers`].
    async fn on_server<T: redis::FromRedisValue>(
        &mut self,
        server: Option<&(String, u16)>,
        cmd: Cmd,
    ) -> Result<T> {
        match (self, server) {
            (RedisConn::Cluster(c), Some((host, port))) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                let v = c.route_command(cmd, route).await?;
                Ok(redis::from_redis_value(v).map_err(redis::RedisError::from)?)
            }
            (conn, _) => Ok(cmd.query_async(conn).await?),
        }
    }

    /// `WAIT replicas timeout_ms` on the server that holds `key`: this
    /// connection's server, or on a cluster the primary of `key`'s slot (its
    /// connection carried the writes to wait for). Returns how many replicas
    /// acknowledged.
    pub async fn wait_replicas(
        &mut self,
        key: &str,
        replicas: u32,
        timeout_ms: u64,
    ) -> Result<u32> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout_ms);
        match self {
            RedisConn::Standalone(c) => Ok(cmd.query_async(c).await?),
            RedisConn::Cluster(c) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                let v = c.route_command(cmd, route).await?;
                Ok(redis::from_redis_value(v).map_err(redis::RedisError::from)?)
            }
        }
    }
}

/// Where Redis was looked for, safe to log.
fn address(config: &Config) -> String {
    if config.cluster_nodes.is_empty() {
        config.redis.address()
    } else {
        let nodes: Vec<String> = config.cluster_nodes.iter().map(|n| n.address()).collect();
        format!("cluster {}", nodes.join(","))
    }
}

fn connect_error(config: &Config, source: redis::RedisError) -> Error {
    let text = source.to_string();
    let hint = if text.contains("certificate") || text.contains("UnknownIssuer") {
        " (the server's certificate is not trusted: REDIS_SSL_CA_CERTS names the PEM file of \
         a private CA)"
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
        " (does the server speak TLS on this port? rediss:// and REDIS_SSL=true need its TLS port)"
    } else {
        ""
    };
    Error::Connect {
        address: address(config),
        source,
        hint: hint.to_owned(),
    }
}

fn standalone(
    config: &Config,
    opts: ConnOptions,
) -> Result<(redis::Client, ConnectionManagerConfig)> {
    let client = client(&config.redis, config)?;
    let cm = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.redis_timeout))
        .set_response_timeout(Some(opts.response_timeout))
        .set_number_of_retries(opts.retries)
        .set_max_delay(Duration::from_millis(500));
    Ok((client, cm))
}

/// The client of one standalone server: plain, or TLS as configured.
fn client(target: &RedisTarget, config: &Config) -> Result<redis::Client> {
    if !target.is_tls() {
        return Ok(redis::Client::open(target.expose_url())?);
    }
    #[cfg(feature = "tls")]
    {
        let url = tls::url(target, &config.tls);
        match tls::certificates(&config.tls)? {
            Some(certs) => Ok(redis::Client::build_with_tls(url.as_str(), certs)?),
            None => Ok(redis::Client::open(url.as_str())?),
        }
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = config;
        Err(no_tls(target))
    }
}

#[cfg(not(feature = "tls"))]
fn no_tls(target: &RedisTarget) -> Error {
    Error::Config(crate::config::ConfigError {
        var: "REDIS_URL",
        value: target.redacted(),
        reason: crate::config::NO_TLS.to_owned(),
    })
}

fn cluster_builder(config: &Config, opts: ConnOptions) -> Result<ClusterClientBuilder> {
    let nodes: Vec<&str> = config
        .cluster_nodes
        .iter()
        .map(|n| n.expose_url())
        .collect();
    let tls = config.cluster_nodes.iter().any(RedisTarget::is_tls);
    // A failover must not reach the caller: while the dead primary refuses
    // connections and until its replica is promoted (cluster-node-timeout plus
    // the election), redis-rs refreshes the slot map and sends the command
    // again. Measured on a local cluster with a 2 s node timeout: promotion
    // 3.6–4.4 s after the kill; with 20 retries a caller still saw
    // "connection refused", with 60 none did. The overall bound keeps a
    // request from waiting forever on a node that hangs.
    let builder = ClusterClientBuilder::new(nodes)
        .connection_timeout(config.redis_timeout.min(Duration::from_millis(500)))
        .response_timeout(opts.response_timeout)
        .overall_response_timeout(Some(opts.response_timeout.max(Duration::from_secs(15))))
        .retries(60)
        .min_retry_wait(50)
        .max_retry_wait(500);
    if !tls {
        return Ok(builder);
    }
    #[cfg(feature = "tls")]
    {
        // Every node the cluster names is reached with the seeds' settings.
        let mut builder = builder;
        if !config.tls.verify {
            tls::warn_unverified();
            builder = builder.tls(redis::TlsMode::Insecure);
        }
        if let Some(certs) = tls::certificates(&config.tls)? {
            builder = builder.certs(certs);
        }
        Ok(builder)
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = builder;
        Err(no_tls(&config.cluster_nodes[0]))
    }
}

/// TLS with rustls (feature `tls`).
#[cfg(feature = "tls")]
mod tls {
    use std::sync::Once;

    use redis::TlsCertificates;

    use crate::config::{ConfigError, RedisTarget, TlsConfig};
    use crate::error::{Error, Result};

    /// rustls needs one process-wide crypto provider; redis-rs brings none
    /// of its own. Installed once, unless the application installed one.
    fn provider() {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
    }

    /// Says once per process that certificates are not checked. Never
    /// names the server (its URL may hold a password).
    pub(super) fn warn_unverified() {
        static WARNED: Once = Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "REDIS_SSL_CERT_REQS=none: the Redis server's TLS certificate is not verified; \
                 anyone between this process and Redis can read and change sessions"
            );
        });
    }

    /// The URL redis-rs is given: `#insecure` when certificates are not
    /// checked.
    pub(super) fn url(target: &RedisTarget, tls: &TlsConfig) -> String {
        provider();
        let url = target.expose_url();
        if tls.verify || url.contains("#insecure") {
            return url.to_owned();
        }
        warn_unverified();
        match url.split_once('#') {
            Some((base, _)) => format!("{base}#insecure"),
            None => format!("{url}#insecure"),
        }
    }

    /// The private CA of `REDIS_SSL_CA_CERTS`, read now (a missing or
    /// empty file is a configuration error naming the variable).
    pub(super) fn certificates(tls: &TlsConfig) -> Result<Option<TlsCertificates>> {
        provider();
        let Some(path) = tls.ca_certs.as_ref().filter(|_| tls.verify) else {
            return Ok(None);
        };
        let refuse = |reason: String| {
            Error::Config(ConfigError {
                var: "REDIS_SSL_CA_CERTS",
                value: path.display().to_string(),
                reason,
            })
        };
        let pem = std::fs::read(path).map_err(|e| refuse(format!("cannot read it: {e}")))?;
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            return Err(refuse("no PEM certificate in the file".to_owned()));
        }
        Ok(Some(TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }))
    }
}

/// The primaries in `CLUSTER NODES` output that hold slots and are not failed.
fn parse_primaries(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let flags = cols.get(2)?;
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") || cols.len() < 9
            {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let addr = cols.get(1)?.split('@').next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Standalone(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_come_from_cluster_nodes() {
        let text = "\
a1 127.0.0.1:7100@17100 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7103@17103 slave a1 0 1 4 connected
c3 127.0.0.1:7101@17101 master - 0 1 2 connected 5461-10922
d4 127.0.0.1:7102@17102 master,fail - 0 1 3 disconnected
e5 127.0.0.1:7104@17104 master - 0 1 5 connected 10923-16383
";
        assert_eq!(
            parse_primaries(text),
            [
                ("127.0.0.1".to_owned(), 7100),
                ("127.0.0.1".to_owned(), 7101),
                ("127.0.0.1".to_owned(), 7104)
            ]
        );
    }
}
