//! The demo: a scripted day of simulated app servers, a loss of Redis data,
//! and the healing, with a report at the end.
//!
//! It expects a worker (`vedfolnir-worker`) running on the same configuration:
//! `scripts/run.sh` migrates the audit database, starts the worker and then
//! runs `vedfolnir-sessions demo`. Everything happens in the configured key
//! namespace (the run script uses `vedfolnir-demo:`); no other key is touched.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng as _;
use rand::seq::IndexedRandom as _;
use redis::AsyncCommands as _;
use sea_orm::DatabaseConnection;
use serde::Serialize;
use serde_json::json;

use vedfolnir_sessions::audit::AuditSink;
use vedfolnir_sessions::audit::history::{HistoryQuery, HistoryRow, history};
use vedfolnir_sessions::error::{Error, Result};
use vedfolnir_sessions::event::{DestroyReason, Platform};
use vedfolnir_sessions::id::SessionId;
use vedfolnir_sessions::recovery::{self, VerifyReport};
use vedfolnir_sessions::session::{Changes, NewSession};
use vedfolnir_sessions::store::SessionStore;

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Simulated app servers (tasks).
    pub app_servers: usize,
    /// Simulated users.
    pub users: usize,
    /// Length of the scripted day.
    pub day: Duration,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            app_servers: 4,
            users: 40,
            day: Duration::from_secs(12),
        }
    }
}

/// The demo's closing report.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Mutations made during the day.
    pub mutations: u64,
    /// Logins, logouts, platform switches, data changes during the day.
    pub logins: u64,
    /// Logouts during the day.
    pub logouts: u64,
    /// Sessions that idled out during the day (`expired` events).
    pub idled_out: u64,
    /// Live sessions in Redis just before the wipe.
    pub sessions_before: u64,
    /// Live sessions right after the wipe.
    pub sessions_after_wipe: u64,
    /// Sessions restored by the healing.
    pub restored: u64,
    /// Sessions that were live before the wipe and are gone after healing.
    pub lost: u64,
    /// How long the worker took to notice and heal, seconds.
    pub healing_seconds: f64,
    /// The audit trail of one session.
    pub trail_of: String,
    /// Its events.
    pub trail: Vec<HistoryRow>,
    /// `verify` after healing.
    pub verify: VerifyReport,
}

#[derive(Debug, Default)]
struct Counters {
    mutations: AtomicU64,
    logins: AtomicU64,
    logouts: AtomicU64,
    errors: AtomicU64,
}

const PLATFORMS: [(&str, &str, &str); 3] = [
    ("Main Mastodon", "mastodon", "https://mastodon.example.com"),
    ("Photos", "pixelfed", "https://pixelfed.example.com"),
    ("Backup", "mastodon", "https://backup.example.net"),
];

/// Runs the demo and returns its report. `say` receives the lines to show.
pub async fn run(
    store: SessionStore,
    db: DatabaseConnection,
    cfg: DemoConfig,
    say: impl Fn(&str),
) -> Result<DemoReport> {
    let keys = store.keys().part(0).clone();
    let mut conn = store.connection();
    say(&format!(
        "waiting for the worker (consumer group `audit` on {})",
        keys.stream
    ));
    wait_for(Duration::from_secs(30), || {
        let mut conn = conn.clone();
        let stream = keys.stream.clone();
        let db = db.clone();
        let keys = keys.clone();
        async move {
            let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
                conn.xinfo_groups(&stream).await;
            healed(&mut conn, &db, &keys).await
                && groups.is_ok_and(|g| {
                    g.groups
                        .iter()
                        .any(|g| g.name == "audit" && g.consumers > 0)
                })
        }
    })
    .await
    .map_err(|_| {
        Error::InvalidInput("no worker is consuming; start vedfolnir-worker first".to_owned())
    })?;

    // The day.
    say(&format!(
        "a scripted day: {} app servers, {} users, {:?}; session timeout {:?}",
        cfg.app_servers,
        cfg.users,
        cfg.day,
        store.config().session_timeout
    ));
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for server in 0..cfg.app_servers {
        let store = store.clone();
        let counters = counters.clone();
        let users = cfg.users;
        let day = cfg.day;
        let servers = cfg.app_servers;
        tasks.push(tokio::spawn(async move {
            app_server(server, servers, users, day, store, counters).await
        }));
    }
    let mut last = 0;
    while started.elapsed() < cfg.day {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let stats = store.stats(3).await?;
        let m = counters.mutations.load(Ordering::Relaxed);
        say(&format!(
            "  t={:>4.1}s  mutations {:>6} (+{:>4}/s)  logins {:>4}  logouts {:>4}  live sessions {:>4}  stream {:>5}",
            started.elapsed().as_secs_f64(),
            m,
            m - last,
            counters.logins.load(Ordering::Relaxed),
            counters.logouts.load(Ordering::Relaxed),
            stats.active_sessions,
            stats.stream_length,
        ));
        last = m;
    }
    for t in tasks {
        let _ = t.await;
    }
    let sink = AuditSink::new(
        db.clone(),
        store.config().session_timeout,
        keys.stream.clone(),
    );
    say("the day is over; waiting for the audit trail to catch up");
    wait_for(Duration::from_secs(60), || {
        let store = store.clone();
        let db = db.clone();
        async move {
            recovery::verify(&store, &db)
                .await
                .is_ok_and(|r| r.ok && r.lag.is_empty())
        }
    })
    .await
    .map_err(|_| Error::InvalidInput("the audit trail did not catch up".to_owned()))?;
    let idled_out = count_expired(&db).await?;

    // The loss.
    let before: Vec<SessionId> = live_ids(&store).await?;
    // The session with the longest history makes the most telling trail.
    let mut trail_of: Option<(u64, SessionId)> = None;
    for id in &before {
        if let Some(s) = store.get(id).await?
            && trail_of.as_ref().is_none_or(|(v, _)| s.version() > *v)
        {
            trail_of = Some((s.version(), id.clone()));
        }
    }
    let trail_of = trail_of.map(|(_, id)| id);
    say(&format!(
        "{} live sessions; now wiping every key of {}* (what a Redis restart without persistence does)",
        before.len(),
        keys.namespace
    ));
    let mut wiped = Vec::new();
    {
        let mut it: redis::AsyncIter<'_, String> =
            conn.scan_match(format!("{}*", keys.namespace)).await?;
        while let Some(k) = futures::StreamExt::next(&mut it).await {
            wiped.push(k?);
        }
    }
    for chunk in wiped.chunks(500) {
        let _: () = conn.del(chunk).await?;
    }
    let wiped_at = Instant::now();
    let after_wipe = live_ids(&store).await?.len() as u64;
    say(&format!(
        "wiped {} keys; live sessions now {after_wipe}",
        wiped.len()
    ));
    if let Some(id) = &trail_of {
        // An app server still serves this user: the miss is answered from
        // the audit snapshot while Redis recovers.
        let served = store.clone().with_audit(sink.clone()).get(id).await?;
        say(&format!(
            "a request for session {}… during the outage: {}",
            &id.as_str()[..12],
            if served.is_some() {
                "still logged in (served from the audit database)"
            } else {
                "logged out"
            }
        ));
    }
    say("waiting for the worker to notice and heal");
    wait_for(Duration::from_secs(60), || {
        let mut conn = conn.clone();
        let db = db.clone();
        let keys = keys.clone();
        async move { healed(&mut conn, &db, &keys).await }
    })
    .await
    .map_err(|_| Error::InvalidInput("the worker did not heal Redis".to_owned()))?;
    let healing_seconds = wiped_at.elapsed().as_secs_f64();
    let after: Vec<SessionId> = live_ids(&store).await?;
    let lost = before.iter().filter(|id| !after.contains(id)).count() as u64;
    say(&format!(
        "healed in {healing_seconds:.2}s: {} sessions back, {lost} lost",
        after.len()
    ));
    let trail = match &trail_of {
        Some(id) => {
            history(
                &db,
                &HistoryQuery {
                    session_id: Some(id.to_string()),
                    ..HistoryQuery::default()
                },
            )
            .await?
        }
        None => Vec::new(),
    };
    let verify = recovery::verify(&store, &db).await?;
    Ok(DemoReport {
        mutations: counters.mutations.load(Ordering::Relaxed),
        logins: counters.logins.load(Ordering::Relaxed),
        logouts: counters.logouts.load(Ordering::Relaxed),
        idled_out,
        sessions_before: before.len() as u64,
        sessions_after_wipe: after_wipe,
        restored: after.iter().filter(|id| before.contains(id)).count() as u64,
        lost,
        healing_seconds,
        trail_of: trail_of.map(|i| i.to_string()).unwrap_or_default(),
        trail,
        verify,
    })
}

/// One simulated app server: its share of the users log in, work, switch
/// platforms, and either log out, idle out, or stay.
async fn app_server(
    server: usize,
    servers: usize,
    users: usize,
    day: Duration,
    store: SessionStore,
    counters: Arc<Counters>,
) {
    let started = Instant::now();
    let mine: Vec<usize> = (0..users).filter(|u| u % servers == server).collect();
    let mut sessions: Vec<(usize, SessionId, u8)> = Vec::new();
    let count = |c: &AtomicU64| c.fetch_add(1, Ordering::Relaxed);
    while started.elapsed() < day {
        let (login, user, roll) = {
            let mut rng = rand::rng();
            let user = *mine.choose(&mut rng).unwrap_or(&server);
            (
                sessions.len() < mine.len() && rng.random_bool(0.3),
                user,
                rng.random_range(0..100u8),
            )
        };
        let step = async {
            if login || sessions.is_empty() {
                // Anonymous visit, then login: rotate to a new id with the user's fields.
                let anon = store
                    .create(NewSession::anonymous().with("landing", "/"))
                    .await?;
                let role = if user == 0 { "admin" } else { "user" };
                let c = store
                    .rotate(
                        &anon.session_id,
                        Changes::new()
                            .with_set("user_id", user as i64 + 1)
                            .with_set("username", format!("user{}", user + 1))
                            .with_set("email", format!("user{}@example.com", user + 1))
                            .with_set("role", role)
                            .with_set("csrf_token", uuid::Uuid::new_v4().simple().to_string()),
                    )
                    .await?;
                count(&counters.logins);
                counters.mutations.fetch_add(2, Ordering::Relaxed);
                // A third of the sessions will idle out: they get no more requests.
                sessions.push((user, c.session_id, roll % 3));
                return Ok::<(), Error>(());
            }
            let k = rand::rng().random_range(0..sessions.len());
            let (_, id, kind) = sessions[k].clone();
            if kind == 0 {
                // Idles out: nothing more, the reaper will expire it.
                sessions.remove(k);
                return Ok(());
            }
            match roll {
                0..=9 => {
                    store.destroy(&id, DestroyReason::Logout).await?;
                    sessions.remove(k);
                    count(&counters.logouts);
                }
                10..=29 => {
                    let (name, kind, url) = PLATFORMS[roll as usize % PLATFORMS.len()];
                    store
                        .switch_platform(
                            &id,
                            Platform {
                                platform_connection_id: i64::from(roll),
                                platform_name: name.to_owned(),
                                platform_type: kind.to_owned(),
                                platform_instance_url: url.to_owned(),
                            },
                        )
                        .await?;
                }
                _ => {
                    store
                        .update(
                            &id,
                            Changes::new()
                                .with_set("last_page", format!("/posts/{roll}"))
                                .with_set("items_per_page", json!(10 + roll % 3 * 10)),
                        )
                        .await?;
                    store.load(&id).await?;
                }
            }
            count(&counters.mutations);
            Ok(())
        };
        if step.await.is_err() {
            count(&counters.errors);
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

async fn live_ids(store: &SessionStore) -> Result<Vec<SessionId>> {
    let mut conn = store.connection();
    let prefix = store.keys().part(0).session_prefix.clone();
    let mut out = Vec::new();
    let mut it: redis::AsyncIter<'_, String> = conn.scan_match(format!("{prefix}*")).await?;
    while let Some(k) = futures::StreamExt::next(&mut it).await {
        if let Ok(id) = k?[prefix.len()..].parse() {
            out.push(id);
        }
    }
    out.sort();
    Ok(out)
}

async fn count_expired(db: &DatabaseConnection) -> Result<u64> {
    use sea_orm::{ColumnTrait as _, EntityTrait as _, PaginatorTrait as _, QueryFilter as _};
    use vedfolnir_sessions::audit::entity::session_events;
    Ok(session_events::Entity::find()
        .filter(session_events::Column::EventType.eq("expired"))
        .count(db)
        .await?)
}

async fn wait_for<F, Fut>(limit: Duration, mut cond: F) -> std::result::Result<(), ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(())
}

/// The report as text for people.
pub fn render(r: &DemoReport) -> String {
    let mut out = String::new();
    out.push_str("\n== report\n");
    out.push_str(&format!(
        "the day:         {} mutations, {} logins, {} logouts, {} sessions idled out\n",
        r.mutations, r.logins, r.logouts, r.idled_out
    ));
    out.push_str(&format!(
        "before the wipe: {} live sessions\n",
        r.sessions_before
    ));
    out.push_str(&format!(
        "after the wipe:  {} live sessions\n",
        r.sessions_after_wipe
    ));
    out.push_str(&format!(
        "after healing:   {} restored, {} lost, in {:.2}s\n",
        r.restored, r.lost, r.healing_seconds
    ));
    out.push_str(&format!("\naudit trail of session {}:\n", r.trail_of));
    out.push_str(&vedfolnir_sessions::audit::history::render_table(&r.trail));
    out.push_str(&format!(
        "\nverify: {} ({} sessions checked, {} agree, {} divergences, {} lagging)\n",
        if r.verify.ok { "OK" } else { "DIVERGED" },
        r.verify.checked,
        r.verify.agree,
        r.verify.divergences.len(),
        r.verify.lag.len()
    ));
    out
}

/// Redis holds the data set the audit database knows complete: its epoch is
/// the one the healer recorded (see `store::recovery`).
async fn healed(
    conn: &mut vedfolnir_sessions::conn::RedisConn,
    db: &DatabaseConnection,
    keys: &vedfolnir_sessions::keys::Keys,
) -> bool {
    let redis_epoch: Option<String> = conn.get(&keys.epoch).await.unwrap_or(None);
    let known = vedfolnir_sessions::audit::partition::load(db, &keys.stream)
        .await
        .ok()
        .flatten()
        .and_then(|r| r.redis_epoch);
    redis_epoch.is_some() && redis_epoch == known
}
