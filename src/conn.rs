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

use crate::config::Config;
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
    pub async fn connect(config: &Config, opts: ConnOptions) -> Result<Self> {
        if config.cluster_nodes.is_empty() {
            let (client, cm) = standalone(config, opts)?;
            Ok(RedisConn::Standalone(
                ConnectionManager::new_with_config(client, cm).await?,
            ))
        } else {
            let client = cluster_builder(config, opts).build()?;
            let conn = tokio::time::timeout(
                config.redis_timeout.max(Duration::from_secs(1)),
                client.get_async_connection(),
            )
            .await
            .map_err(|_| {
                Error::Redis(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "timed out connecting to the cluster",
                )))
            })??;
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
            let client = cluster_builder(config, opts).build()?;
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

fn standalone(
    config: &Config,
    opts: ConnOptions,
) -> Result<(redis::Client, ConnectionManagerConfig)> {
    let client = redis::Client::open(config.redis.expose_url())?;
    let cm = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.redis_timeout))
        .set_response_timeout(Some(opts.response_timeout))
        .set_number_of_retries(opts.retries)
        .set_max_delay(Duration::from_millis(500));
    Ok((client, cm))
}

fn cluster_builder(config: &Config, opts: ConnOptions) -> ClusterClientBuilder {
    let nodes: Vec<&str> = config
        .cluster_nodes
        .iter()
        .map(|n| n.expose_url())
        .collect();
    // A failover must not reach the caller: while the dead primary refuses
    // connections and until its replica is promoted (cluster-node-timeout plus
    // the election), redis-rs refreshes the slot map and sends the command
    // again. Measured on a local cluster with a 2 s node timeout: promotion
    // 3.6–4.4 s after the kill; with 20 retries a caller still saw
    // "connection refused", with 60 none did. The overall bound keeps a
    // request from waiting forever on a node that hangs.
    ClusterClientBuilder::new(nodes)
        .connection_timeout(config.redis_timeout.min(Duration::from_millis(500)))
        .response_timeout(opts.response_timeout)
        .overall_response_timeout(Some(opts.response_timeout.max(Duration::from_secs(15))))
        .retries(60)
        .min_retry_wait(50)
        .max_retry_wait(500)
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
