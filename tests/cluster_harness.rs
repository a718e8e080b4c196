//! The cluster test infrastructure on its own, with plain redis-rs: keys
//! spread over the shared local cluster (`VEDFOLNIR_TEST_CLUSTER_NODES`, from
//! `bash scripts/cluster.sh nodes`), and a script that keeps working through
//! the failover of its key's primary on a private cluster.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use redis::AsyncCommands as _;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use tokio::time::Instant;
use vedfolnir_tests::cluster::{self, PrivateCluster, Shard};

/// The shared cluster's seed list as URLs, or `None` (and a note) when the
/// variable is unset.
fn shared_cluster(test: &str) -> Option<Vec<String>> {
    match std::env::var("VEDFOLNIR_TEST_CLUSTER_NODES") {
        Ok(v) if !v.trim().is_empty() => Some(
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if s.contains("://") {
                        s.to_owned()
                    } else {
                        format!("redis://{s}")
                    }
                })
                .collect(),
        ),
        _ => {
            eprintln!(
                "{test}: skipped, VEDFOLNIR_TEST_CLUSTER_NODES is unset \
                 (bash scripts/cluster.sh start; \
                 export VEDFOLNIR_TEST_CLUSTER_NODES=$(bash scripts/cluster.sh nodes))"
            );
            None
        }
    }
}

fn host_port(url: &str) -> &str {
    url.trim_start_matches("redis://").trim_end_matches('/')
}

async fn connect(client: &ClusterClient) -> ClusterConnection {
    tokio::time::timeout(Duration::from_secs(10), client.get_async_connection())
        .await
        .expect("connect to the cluster in time")
        .expect("connect to the cluster")
}

fn namespace() -> String {
    format!("vtest:{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn sixteen_hash_tags_land_on_all_three_primaries() {
    let Some(seeds) = shared_cluster("sixteen_hash_tags_land_on_all_three_primaries") else {
        return;
    };
    let client = ClusterClient::new(seeds.clone()).expect("cluster client");
    let mut conn = connect(&client).await;
    let ns = namespace();
    let keys: Vec<String> = (0..16).map(|i| format!("{ns}:{{{i}}}:k")).collect();
    for (i, key) in keys.iter().enumerate() {
        let _: () = conn
            .set_ex(key, i, 60)
            .await
            .expect("SET through the cluster");
        let back: usize = conn.get(key).await.expect("GET through the cluster");
        assert_eq!(back, i, "{key}");
    }

    let seed = host_port(&seeds[0]);
    let shards = cluster::shards_seen_by(seed).await.expect("CLUSTER NODES");
    assert_eq!(shards.len(), 3, "three primaries: {shards:?}");
    let mut used = BTreeSet::new();
    for (i, key) in keys.iter().enumerate() {
        let slot = cluster::keyslot(seed, key).await;
        let shard = shards.iter().find(|s| s.serves(slot)).expect("a primary");
        // The key is really on that primary: a plain connection to it reads
        // it (another node would answer MOVED).
        let mut direct = cluster::node_connection(&shard.primary).await.unwrap();
        let there: usize = direct.get(key).await.expect("GET on the owning primary");
        assert_eq!(there, i, "{key} on {}", shard.primary);
        used.insert(shard.primary.clone());
    }
    assert_eq!(used.len(), 3, "16 hash tags used only {used:?}");

    // DEL with keys of many slots: redis-rs splits it per slot.
    let deleted: usize = conn.del(&keys).await.expect("multi-slot DEL");
    assert_eq!(deleted, keys.len());
}

/// Quick facts about redis-rs cluster connections that a store on Redis
/// Cluster depends on; each assertion names the behaviour it pins.
#[tokio::test]
async fn cluster_connection_behaviours_the_store_relies_on() {
    let Some(seeds) = shared_cluster("cluster_connection_behaviours_the_store_relies_on") else {
        return;
    };
    let ns = namespace();
    let client = ClusterClient::new(seeds.clone()).expect("cluster client");
    let mut conn = connect(&client).await;

    // A script whose keys share a hash tag runs; one whose keys do not is
    // refused by the server (CROSSSLOT).
    let script =
        redis::Script::new("redis.call('SET', KEYS[1], 1); return redis.call('SET', KEYS[2], 2)");
    let same: redis::RedisResult<String> = script
        .key(format!("{ns}:{{t}}:a"))
        .key(format!("{ns}:{{t}}:b"))
        .invoke_async(&mut conn)
        .await;
    assert_eq!(same.expect("same-slot script"), "OK");
    let cross: redis::RedisResult<String> = script
        .key(format!("{ns}:{{t}}:a"))
        .key(format!("{ns}:{{u}}:b"))
        .invoke_async(&mut conn)
        .await;
    let e = cross.expect_err("a cross-slot script is refused");
    assert_eq!(e.code(), Some("CROSSSLOT"), "{e}");

    // A pipeline goes to one node: same-slot works, cross-slot is refused by
    // redis-rs before it is sent.
    let (a, b): (i64, i64) = redis::pipe()
        .incr(format!("{ns}:{{t}}:n"), 1)
        .incr(format!("{ns}:{{t}}:n"), 1)
        .query_async(&mut conn)
        .await
        .expect("same-slot pipeline");
    assert_eq!((a, b), (1, 2));
    let cross: redis::RedisResult<(i64, i64)> = redis::pipe()
        .incr(format!("{ns}:{{t}}:n"), 1)
        .incr(format!("{ns}:{{u}}:n"), 1)
        .query_async(&mut conn)
        .await;
    let e = cross.expect_err("a cross-slot pipeline is refused");
    eprintln!("cross-slot pipeline: {e}");

    // MGET across slots is split per slot and reassembled in order.
    let _: () = conn.set(format!("{ns}:{{u}}:a"), "u").await.unwrap();
    let got: Vec<Option<String>> = conn
        .mget(&[format!("{ns}:{{t}}:a"), format!("{ns}:{{u}}:a")])
        .await
        .expect("multi-slot MGET");
    assert_eq!(got, [Some("1".to_owned()), Some("u".to_owned())]);

    // SCAN is not cluster-aware: it goes to one node, so a SCAN over a
    // cluster connection does not see the keys of the other primaries.
    let keys: Vec<String> = (0..16).map(|i| format!("{ns}:{{{i}}}:s")).collect();
    for k in &keys {
        let _: () = conn.set_ex(k, 1, 60).await.unwrap();
    }
    let mut seen = BTreeSet::new();
    {
        let mut it: redis::AsyncIter<'_, String> = conn
            .scan_match(format!("{ns}:*:s"))
            .await
            .expect("SCAN through the cluster connection");
        while let Some(k) = futures::StreamExt::next(&mut it).await {
            seen.insert(k.expect("key"));
        }
    }
    eprintln!(
        "SCAN over the cluster connection saw {} of {} keys",
        seen.len(),
        keys.len()
    );
    assert!(
        seen.len() < keys.len(),
        "SCAN saw every key: it became cluster-aware"
    );

    // XREADGROUP BLOCK: on a client without response_timeout it blocks for
    // its full time and returns nil; a command for the same node on the same
    // connection waits behind it (one multiplexed connection per node).
    let stream = format!("{ns}:{{t}}:stream");
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .expect("XGROUP CREATE");
    let block = Duration::from_millis(1500);
    let mut blocked = conn.clone();
    let stream2 = stream.clone();
    let reader = tokio::spawn(async move {
        let started = Instant::now();
        let r: redis::RedisResult<redis::Value> = xreadgroup_blocking(&stream2, block)
            .query_async(&mut blocked)
            .await;
        (r, started.elapsed())
    });
    // Wait (bounded) until the stream's primary holds a blocked client.
    let seed = host_port(&seeds[0]).to_owned();
    let slot = cluster::keyslot(&seed, &stream).await;
    let owner = cluster::shards_seen_by(&seed)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.serves(slot))
        .unwrap()
        .primary;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let clients = cluster::info_section(&owner, "clients").await.unwrap();
        if clients.get("blocked_clients").is_some_and(|n| n != "0") {
            break;
        }
        assert!(Instant::now() < deadline, "the XREADGROUP never blocked");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let _: Option<String> = conn.get(format!("{ns}:{{t}}:a")).await.unwrap();
    let same_node_get = started.elapsed();
    let (r, took) = reader.await.unwrap();
    assert_eq!(
        r.expect("XREADGROUP BLOCK without response_timeout"),
        redis::Value::Nil
    );
    assert!(took >= block, "BLOCK returned after {took:?}");
    eprintln!(
        "XREADGROUP BLOCK {block:?} returned nil after {took:?}; a GET for the same node \
         on the same connection meanwhile took {same_node_get:?}"
    );

    // With response_timeout shorter than the BLOCK, the read fails.
    let short = ClusterClientBuilder::new(seeds)
        .response_timeout(Duration::from_millis(500))
        .build()
        .expect("cluster client");
    let mut short_conn = connect(&short).await;
    let started = Instant::now();
    let r: redis::RedisResult<redis::Value> = xreadgroup_blocking(&stream, block)
        .query_async(&mut short_conn)
        .await;
    eprintln!(
        "XREADGROUP BLOCK {block:?} with response_timeout 500ms: {r:?} after {:?}",
        started.elapsed()
    );
    assert!(r.is_err(), "a BLOCK longer than response_timeout times out");

    let mut all = keys;
    for suffix in ["{t}:a", "{t}:b", "{t}:n", "{u}:n", "{u}:a", "{t}:stream"] {
        all.push(format!("{ns}:{suffix}"));
    }
    let _: usize = conn.del(&all).await.expect("clean up");
}

/// `XREADGROUP GROUP g c BLOCK <block> STREAMS <stream> >`.
fn xreadgroup_blocking(stream: &str, block: Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg("g")
        .arg("c")
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(stream)
        .arg(">");
    cmd
}

/// Whether the node at `address` holds the script `sha` in its cache.
async fn script_cached(address: &str, sha: &str) -> bool {
    let mut conn = cluster::node_connection(address).await.unwrap();
    let cached: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(sha)
        .query_async(&mut conn)
        .await
        .unwrap();
    cached[0]
}

/// One counter of an `INFO commandstats` line (`calls=3,usec=..,failed_calls=1`).
fn stat(line: &str, name: &str) -> u64 {
    line.split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// What one client configuration did through a failover.
#[derive(Debug)]
struct FailoverRun {
    promotion: Duration,
    first_success: Duration,
    failed_attempts: Vec<String>,
    noscript_on_new_primary: bool,
}

/// Loads a script on a key, kills the key's primary, waits for the replica to
/// take over, and invokes the same script again through the same cluster
/// connection until it succeeds.
async fn failover_run(
    label: &str,
    builder: impl FnOnce(ClusterClientBuilder) -> ClusterClientBuilder,
) -> FailoverRun {
    let mut cluster = PrivateCluster::start().await;
    let client = builder(ClusterClientBuilder::new(cluster.nodes()))
        .build()
        .expect("cluster client");
    let mut conn = connect(&client).await;

    let key = "vtest:{failover}:counter";
    let script = redis::Script::new("return redis.call('INCR', KEYS[1])");
    let n: i64 = script
        .key(key)
        .invoke_async(&mut conn)
        .await
        .expect("first invocation");
    assert_eq!(n, 1);
    // WAIT goes to every primary; ours waits until its replica has the INCR.
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .expect("WAIT");
    assert_eq!(acked, 1, "the replica acknowledged the write");

    let slot = cluster.keyslot(key).await;
    let shard: Shard = cluster
        .primaries()
        .await
        .into_iter()
        .find(|s| s.serves(slot))
        .expect("the key's primary");
    let replica = shard.replica.clone().expect("the primary has a replica");
    let cached_on_replica = script_cached(&replica, script.get_hash()).await;

    let killed = cluster.kill_primary_for_slot(slot).await;
    assert_eq!(killed, shard.primary);
    let kill_at = Instant::now();

    // Keep invoking the script through the same connection, as an app server
    // would, while the cluster fails over.
    let mut invoker = conn.clone();
    let invoking = tokio::spawn(async move {
        let script = redis::Script::new("return redis.call('INCR', KEYS[1])");
        let mut failed = Vec::new();
        loop {
            let attempt_at = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                script.key(key).invoke_async::<i64>(&mut invoker),
            )
            .await;
            match r {
                Ok(Ok(n)) => return (n, kill_at.elapsed(), failed),
                Ok(Err(e)) => failed.push(format!(
                    "{:?} after {:?}: {e}",
                    kill_at.elapsed(),
                    attempt_at.elapsed()
                )),
                Err(_) => failed.push(format!("{:?}: no answer in 30s", kill_at.elapsed())),
            }
            assert!(
                kill_at.elapsed() < Duration::from_secs(60),
                "no success within 60s: {failed:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let promotion = cluster
        .wait_for_promotion(&killed, Duration::from_secs(30))
        .await;
    assert_eq!(promotion.new_primary, replica);
    let (n, first_success, failed_attempts) = invoking.await.expect("the invoking task");
    assert_eq!(n, 2, "the INCR before the kill survived the failover");

    // After the failover the same connection keeps working.
    let n: i64 = script
        .key(key)
        .invoke_async(&mut conn)
        .await
        .expect("invocation after failover");
    assert_eq!(n, 3);

    // Redis does not replicate the script cache: the former replica had to
    // be given the script after it took over (redis-rs reloads on NOSCRIPT).
    assert!(
        script_cached(&replica, script.get_hash()).await,
        "the new primary has the script after the reload"
    );

    // NOSCRIPT counts as a failed EVALSHA; MOVED answers (while it was
    // still a replica) count as rejected ones.
    let stats = cluster::info_section(&replica, "commandstats")
        .await
        .unwrap();
    let evalsha = stats.get("cmdstat_evalsha").cloned().unwrap_or_default();
    let load = stats
        .get("cmdstat_script|load")
        .cloned()
        .unwrap_or_default();
    let noscript_on_new_primary = stat(&evalsha, "failed_calls") > 0 && stat(&load, "calls") > 0;
    let run = FailoverRun {
        promotion: promotion.took,
        first_success,
        failed_attempts,
        noscript_on_new_primary,
    };
    eprintln!(
        "[{label}] script cached on the replica before the kill: {cached_on_replica}; \
         promotion took {:?}; first success {:?} after the kill; failed attempts: {:?}; \
         NOSCRIPT then reload on the new primary: {} (evalsha: {evalsha}; script|load: {load})",
        run.promotion, run.first_success, run.failed_attempts, run.noscript_on_new_primary
    );
    run
}

/// Defaults: no response timeout, 16 retries waiting at least 1280 ms each.
/// The failover never reaches the caller, but the first success comes up to
/// a retry wait after the promotion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_survives_the_failover_of_its_primary_with_default_settings() {
    let run = failover_run("defaults", |b| b).await;
    assert!(run.failed_attempts.is_empty(), "{run:?}");
}

/// The settings recommended for a store that follows failovers: short
/// retry waits, enough retries to span a failover, each attempt bounded and
/// the whole request bounded well above node timeout plus election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_survives_the_failover_of_its_primary_with_tuned_settings() {
    let run = failover_run("tuned", |b| {
        b.connection_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_secs(2))
            .overall_response_timeout(Some(Duration::from_secs(15)))
            .retries(60)
            .min_retry_wait(50)
            .max_retry_wait(500)
    })
    .await;
    assert!(run.failed_attempts.is_empty(), "{run:?}");
}
