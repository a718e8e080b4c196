//! A Redis Cluster of the test's own, for tests that kill nodes: six
//! `redis-server` processes on free loopback ports (three primaries with one
//! replica each), no persistence, a short node timeout so that a replica takes
//! over quickly. Everything waits by polling against a deadline. The processes
//! are killed and their directory removed when the value drops.
//!
//! Addresses of nodes (`Shard`, `kill_primary_for_slot`) are `127.0.0.1:port`,
//! as Redis writes them in `CLUSTER NODES`; `nodes()` gives the seed list as
//! URLs for `redis::cluster::ClusterClient`.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

/// `cluster-node-timeout` of the private clusters: a primary is marked failed
/// after this long without an answer, and its replica is elected soon after.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(2000);

/// How long a start, a cluster creation or a settling may take.
const STARTUP: Duration = Duration::from_secs(60);

/// How long one query to one node may take.
const QUERY: Duration = Duration::from_secs(2);

const POLL: Duration = Duration::from_millis(20);

const PRIMARIES: usize = 3;
const NODES: usize = PRIMARIES * 2;
const SLOTS: u32 = 16384;

/// One primary, the slots it serves and its replica, as the cluster sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// `127.0.0.1:port` of the primary.
    pub primary: String,
    /// Inclusive slot ranges, ascending.
    pub slots: Vec<(u16, u16)>,
    /// `127.0.0.1:port` of its (first healthy) replica, if it has one.
    pub replica: Option<String>,
}

impl Shard {
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

/// What `wait_for_promotion` saw.
#[derive(Clone, Debug)]
pub struct Promotion {
    /// The former replica, now primary of the killed primary's slots.
    pub new_primary: String,
    /// From the kill to the moment every surviving node reported the new
    /// primary and `cluster_state:ok` (within one poll interval).
    pub took: Duration,
}

#[derive(Debug)]
struct Node {
    port: u16,
    bus_port: u16,
    child: Option<Child>,
}

impl Node {
    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

#[derive(Debug)]
struct Killed {
    shard: Shard,
    at: Instant,
}

#[derive(Debug)]
pub struct PrivateCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    killed: Vec<Killed>,
}

impl PrivateCluster {
    /// Starts six nodes, creates the cluster with `redis-cli --cluster create
    /// ... --cluster-replicas 1`, and waits until every node reports
    /// `cluster_state:ok` and every replica is in sync with its primary.
    pub async fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("vtest-cluster-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the cluster's working directory");
        let mut cluster = PrivateCluster {
            dir,
            nodes: Vec::new(),
            killed: Vec::new(),
        };
        for index in 0..NODES {
            let node = cluster.spawn_node(index).await;
            cluster.nodes.push(node);
        }
        cluster.create().await;
        cluster
            .settle("the new cluster to be ok and its replicas in sync")
            .await;
        cluster
    }

    /// The seed list for `ClusterClient`: `redis://127.0.0.1:port` of every
    /// node, killed ones included (a client must cope with dead seeds).
    pub fn nodes(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://{}", n.address()))
            .collect()
    }

    /// Addresses of the nodes that have not been killed.
    pub fn alive(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(Node::address)
            .collect()
    }

    /// The primaries that serve slots, with their slots and replica, as the
    /// first surviving node that answers sees them.
    pub async fn primaries(&self) -> Vec<Shard> {
        let mut last = String::new();
        for address in self.alive() {
            match shards_seen_by(&address).await {
                Ok(shards) => return shards,
                Err(e) => last = e,
            }
        }
        panic!("no surviving node answered CLUSTER NODES: {last}");
    }

    /// The slot of a key (`CLUSTER KEYSLOT` on a surviving node).
    pub async fn keyslot(&self, key: &str) -> u16 {
        let address = self.alive().into_iter().next().expect("a surviving node");
        keyslot(&address, key).await
    }

    /// Kills (SIGKILL) the primary that serves `slot` and returns its address.
    pub async fn kill_primary_for_slot(&mut self, slot: u16) -> String {
        let shard = self
            .primaries()
            .await
            .into_iter()
            .find(|s| s.serves(slot))
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"));
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.address() == shard.primary)
            .unwrap_or_else(|| panic!("{} is not a node of this cluster", shard.primary));
        let mut child = node.child.take().expect("the primary runs");
        child.kill().expect("SIGKILL the primary");
        let at = Instant::now();
        let _ = child.wait();
        let address = shard.primary.clone();
        self.killed.push(Killed { shard, at });
        address
    }

    /// Waits until the replica of the killed primary `killed` serves all of
    /// its slots in the view of every surviving node, and every surviving
    /// node reports `cluster_state:ok`. Panics after `limit`.
    pub async fn wait_for_promotion(&self, killed: &str, limit: Duration) -> Promotion {
        let record = self
            .killed
            .iter()
            .find(|k| k.shard.primary == killed)
            .unwrap_or_else(|| panic!("{killed} was not killed by this harness"));
        let replica = record
            .shard
            .replica
            .clone()
            .unwrap_or_else(|| panic!("{killed} had no replica to promote"));
        let deadline = Instant::now() + limit;
        loop {
            let last = match self.promoted_everywhere(&record.shard, &replica).await {
                Ok(()) => {
                    return Promotion {
                        new_primary: replica,
                        took: record.at.elapsed(),
                    };
                }
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "{replica} did not take over from {killed} within {limit:?}: {last}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn promoted_everywhere(&self, old: &Shard, replica: &str) -> Result<(), String> {
        for address in self.alive() {
            let info = cluster_info(&address).await?;
            if info.get("cluster_state").map(String::as_str) != Some("ok") {
                return Err(format!("{address}: {:?}", info.get("cluster_state")));
            }
            let shards = shards_seen_by(&address).await?;
            let Some(new) = shards.iter().find(|s| s.primary == replica) else {
                return Err(format!("{address} does not see {replica} as a primary"));
            };
            if !old
                .slots
                .iter()
                .all(|&(a, b)| new.serves(a) && new.serves(b))
            {
                return Err(format!(
                    "{address} sees {replica} with slots {:?}, not {:?}",
                    new.slots, old.slots
                ));
            }
        }
        Ok(())
    }

    /// Waits until every surviving node reports `cluster_state:ok` with all
    /// slots assigned, and every surviving replica is in sync.
    pub async fn settle(&self, what: &str) {
        let deadline = Instant::now() + STARTUP;
        loop {
            let Err(last) = self.settled().await else {
                return;
            };
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {last}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts a killed node again, on its ports and with its node file: it
    /// rejoins as a replica of the primary that took its slots over. Waits
    /// until every replica is in sync.
    pub async fn restart(&mut self, address: &str) {
        let index = self
            .nodes
            .iter()
            .position(|n| n.address() == address && n.child.is_none())
            .unwrap_or_else(|| panic!("{address} is not a killed node of this cluster"));
        let (port, bus_port) = (self.nodes[index].port, self.nodes[index].bus_port);
        let child = spawn_and_wait(&self.dir.join(index.to_string()), port, bus_port)
            .await
            .unwrap_or_else(|e| panic!("restart {address}: {e}"));
        self.nodes[index].child = Some(child);
        self.killed.retain(|k| k.shard.primary != address);
        self.settle("the restarted node to rejoin as a replica")
            .await;
    }

    async fn settled(&self) -> Result<(), String> {
        let alive = self.alive();
        let mut replicas = 0;
        for address in &alive {
            let info = cluster_info(address).await?;
            for (field, want) in [
                ("cluster_state", "ok".to_owned()),
                ("cluster_slots_assigned", SLOTS.to_string()),
                ("cluster_known_nodes", NODES.to_string()),
            ] {
                if info.get(field) != Some(&want) {
                    return Err(format!("{address}: {field} is {:?}", info.get(field)));
                }
            }
            let replication = info_section(address, "replication").await?;
            if replication.get("role").map(String::as_str) == Some("slave") {
                replicas += 1;
                if replication.get("master_link_status").map(String::as_str) != Some("up")
                    || replication
                        .get("master_sync_in_progress")
                        .map(String::as_str)
                        != Some("0")
                {
                    return Err(format!("{address}: replica not in sync: {replication:?}"));
                }
            }
        }
        if self.killed.is_empty() && replicas != PRIMARIES {
            return Err(format!("{replicas} replicas, want {PRIMARIES}"));
        }
        Ok(())
    }

    async fn spawn_node(&self, index: usize) -> Node {
        let node_dir = self.dir.join(index.to_string());
        std::fs::create_dir_all(&node_dir).expect("create a node directory");
        let mut last_error = String::new();
        for _ in 0..10 {
            let port = free_port();
            let bus_port = free_port();
            if port == bus_port
                || self
                    .nodes
                    .iter()
                    .any(|n| [n.port, n.bus_port].contains(&port))
            {
                continue;
            }
            // A node file from a failed attempt would name the wrong ports.
            let _ = std::fs::remove_file(node_dir.join("nodes.conf"));
            match spawn_and_wait(&node_dir, port, bus_port).await {
                Ok(child) => {
                    return Node {
                        port,
                        bus_port,
                        child: Some(child),
                    };
                }
                Err(e) => last_error = e,
            }
        }
        panic!("could not start a cluster node: {last_error}");
    }

    async fn create(&self) {
        let mut command = tokio::process::Command::new("redis-cli");
        command.arg("--cluster").arg("create");
        for node in &self.nodes {
            command.arg(node.address());
        }
        command
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(STARTUP, command.output())
            .await
            .expect("redis-cli --cluster create finishes in time")
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts one cluster-enabled `redis-server` and waits until it answers as
/// itself (its `process_id`), so that a port someone else took in the
/// meantime is noticed and another tried.
async fn spawn_and_wait(dir: &std::path::Path, port: u16, bus_port: u16) -> Result<Child, String> {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--cluster-port", &bus_port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes"])
        .args([
            "--cluster-node-timeout",
            &NODE_TIMEOUT.as_millis().to_string(),
        ])
        .arg("--cluster-config-file")
        .arg(dir.join("nodes.conf"))
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .args(["--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn redis-server: {e}"))?;
    let address = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + STARTUP;
    loop {
        if !matches!(child.try_wait(), Ok(None)) {
            let _ = child.wait();
            return Err(format!("redis-server exited at start on {address}"));
        }
        if let Ok(server) = info_section(&address, "server").await
            && server.get("process_id") == Some(&child.id().to_string())
        {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("redis-server on {address} did not answer"));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A connection of the test's own to one node (`127.0.0.1:port`), not
/// cluster-aware: a command for a slot the node does not serve gets MOVED.
pub async fn node_connection(address: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(format!("redis://{address}")).map_err(|e| e.to_string())?;
    tokio::time::timeout(QUERY, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| format!("{address}: connect timed out"))?
        .map_err(|e| format!("{address}: {e}"))
}

async fn query<T: redis::FromRedisValue>(address: &str, cmd: &redis::Cmd) -> Result<T, String> {
    let mut conn = node_connection(address).await?;
    tokio::time::timeout(QUERY, cmd.query_async(&mut conn))
        .await
        .map_err(|_| format!("{address}: query timed out"))?
        .map_err(|e| format!("{address}: {e}"))
}

fn fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// `CLUSTER INFO` of one node, as fields.
pub async fn cluster_info(address: &str) -> Result<BTreeMap<String, String>, String> {
    let text: String = query(address, &redis::cmd("CLUSTER").arg("INFO").clone()).await?;
    Ok(fields(&text))
}

/// One section of `INFO` of one node, as fields.
pub async fn info_section(
    address: &str,
    section: &str,
) -> Result<BTreeMap<String, String>, String> {
    let text: String = query(address, &redis::cmd("INFO").arg(section).clone()).await?;
    Ok(fields(&text))
}

/// `CLUSTER KEYSLOT key`, asked of the node at `address`.
pub async fn keyslot(address: &str, key: &str) -> u16 {
    query(
        address,
        &redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).clone(),
    )
    .await
    .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key}: {e}"))
}

/// The primaries that serve slots as the node at `address` sees them
/// (`CLUSTER NODES`), ordered by their first slot. Nodes flagged `fail` are
/// left out; so are primaries without slots.
pub async fn shards_seen_by(address: &str) -> Result<Vec<Shard>, String> {
    let text: String = query(address, &redis::cmd("CLUSTER").arg("NODES").clone()).await?;
    Ok(parse_cluster_nodes(&text))
}

/// Parses `CLUSTER NODES`:
/// `<id> <ip:port@cport[,hostname]> <flags> <primary id|-> <ping> <pong> <epoch> <link> <slot>...`
pub fn parse_cluster_nodes(text: &str) -> Vec<Shard> {
    struct Line<'a> {
        id: &'a str,
        address: String,
        primary: bool,
        failed: bool,
        primary_id: &'a str,
        slots: Vec<(u16, u16)>,
    }
    let lines: Vec<Line<'_>> = text
        .lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() < 8 {
                return None;
            }
            let address = parts[1].split(['@', ',']).next()?.to_owned();
            let flags: Vec<&str> = parts[2].split(',').collect();
            let slots = parts[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|one| (one, one)),
                })
                .collect();
            Some(Line {
                id: parts[0],
                address,
                primary: flags.contains(&"master"),
                failed: flags.contains(&"fail") || flags.contains(&"noaddr"),
                primary_id: parts[3],
                slots,
            })
        })
        .collect();
    let mut shards: Vec<Shard> = lines
        .iter()
        .filter(|l| l.primary && !l.failed && !l.slots.is_empty())
        .map(|p| {
            let mut slots = p.slots.clone();
            slots.sort_unstable();
            Shard {
                primary: p.address.clone(),
                slots,
                replica: lines
                    .iter()
                    .filter(|r| !r.primary && !r.failed && r.primary_id == p.id)
                    .map(|r| r.address.clone())
                    .min(),
            }
        })
        .collect();
    shards.sort_by_key(|s| s.slots[0]);
    shards
}

/// A port the kernel just handed out and that nobody listens on now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a probe socket");
    l.local_addr().expect("probe address").port()
}
