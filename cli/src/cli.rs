//! The operator CLI, `vedfolnir-sessions`.
//!
//! Every command prints JSON on stdout. On failure it prints one line on
//! stderr (`error: …`) and exits non-zero: 1 when the thing asked about does
//! not exist or is unhealthy, 2 for every other failure (bad configuration,
//! Redis unreachable, invalid input).

mod import_legacy;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value, json};

use vedfolnir_sessions::config::Config;
use vedfolnir_sessions::error::Error;
use vedfolnir_sessions::event::{DestroyReason, Platform};
use vedfolnir_sessions::id::SessionId;
use vedfolnir_sessions::session::{Changes, NewSession};
use vedfolnir_sessions::store::SessionStore;

/// Operate the vedfolnir session store.
#[derive(Debug, Parser)]
#[command(name = "vedfolnir-sessions", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, inspect, change and end single sessions.
    #[command(subcommand)]
    Session(SessionCmd),
    /// A user's sessions.
    #[command(subcommand)]
    User(UserCmd),
    /// Active sessions, stream length, the users with most sessions.
    Stats {
        /// How many users to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Redis reachability and latency; exits 1 when unhealthy.
    Health,
    /// Apply the audit database migrations (`DATABASE_URL`).
    Migrate,
    /// The audit trail of a session, or of a user over a time range.
    History(HistoryArgs),
    /// Rebuild Redis from the audit database; with `--at`, write the state
    /// of sessions as of an instant to a file instead (Redis untouched).
    Replay(ReplayArgs),
    /// Compare Redis, the snapshots and the event history; exit 1 on any
    /// divergence (with `--repair`: on any that could not be put right).
    Verify(VerifyArgs),
    /// The audit snapshots.
    #[command(subcommand)]
    Snapshots(SnapshotsCmd),
    /// Load benchmarks with a baseline measured in the same run.
    Bench(crate::bench::BenchArgs),
    /// Stream entries the audit consumer set aside: list them, retry them
    /// once the cause is fixed, or discard them explicitly.
    #[command(subcommand)]
    DeadLetters(DeadLettersCmd),
    /// Turn the Vedfolnir application's previous sessions
    /// (`<REDIS_SESSION_PREFIX><uuid4>` keys) into event-sourced ones whose
    /// cookies keep working; idempotent, resumable.
    ImportLegacy(import_legacy::ImportLegacyArgs),
    /// A scripted day of simulated app servers, a loss of Redis data and
    /// the healing (needs a running worker on the same configuration).
    Demo {
        /// Simulated app servers.
        #[arg(long, default_value_t = 4)]
        app_servers: usize,
        /// Simulated users.
        #[arg(long, default_value_t = 40)]
        users: usize,
        /// Length of the scripted day, seconds.
        #[arg(long, default_value_t = 12)]
        day: u64,
        /// Print the closing report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `snapshots …` commands.
#[derive(Debug, Subcommand)]
pub enum SnapshotsCmd {
    /// Refold `session_snapshots` from `session_events` alone (the log is
    /// the truth): every snapshot becomes the fold of its events. For
    /// snapshots that are damaged or lost; idempotent. Then `replay` and
    /// `verify` work as before.
    Rebuild {
        /// Only this session.
        #[arg(long)]
        session: Option<String>,
    },
}

/// Arguments of `replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Point in time (RFC 3339): fold history up to this instant.
    #[arg(long)]
    pub at: Option<String>,
    /// With `--at`: only this session.
    #[arg(long, requires = "at")]
    pub session: Option<String>,
    /// With `--at`: only this user's sessions.
    #[arg(long, requires = "at")]
    pub user: Option<String>,
    /// With `--at`: where to write the JSON (default: stdout).
    #[arg(long, requires = "at")]
    pub output: Option<std::path::PathBuf>,
}

/// Arguments of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Put right what the log determines (ledgers, indexes, TTLs, keys,
    /// snapshots, missing ends) and report what was done.
    #[arg(long)]
    pub repair: bool,
    /// Seconds a gap in the audit trail, or an overdue end, may be old
    /// before it counts as a divergence.
    #[arg(long, default_value_t = 60)]
    pub grace: u64,
}

/// Arguments of `history`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["session_id", "user"])))]
pub struct HistoryArgs {
    /// The session id.
    pub session_id: Option<String>,
    /// A user's events instead of one session's.
    #[arg(long)]
    pub user: Option<String>,
    /// From this instant (RFC 3339), inclusive.
    #[arg(long)]
    pub since: Option<String>,
    /// Until this instant (RFC 3339), exclusive.
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many events (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: u64,
    /// A JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `dead-letters …` commands.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCmd {
    /// The dead letters awaiting a decision, oldest first, as a JSON array
    /// (with the session and seq each leaves a gap at, when valid).
    List(DeadLetterListArgs),
    /// Decode each dead letter's raw fields again and write the event with
    /// its original id and seq; a dead letter written is deleted, one still
    /// refused is kept with the new reason. Prints a summary.
    Retry(DeadLetterSelect),
    /// Set dead letters aside explicitly: they are marked discarded, no
    /// longer listed or retried by default (`list --discarded` shows them).
    Discard {
        /// Which ones.
        #[command(flatten)]
        select: DeadLetterSelect,
        /// Confirm: without it nothing is discarded (exit 2).
        #[arg(long)]
        yes: bool,
    },
}

/// Arguments of `dead-letters list`.
#[derive(Debug, Args)]
pub struct DeadLetterListArgs {
    /// Only those of this stream.
    #[arg(long)]
    pub stream: Option<String>,
    /// Only those of this session.
    #[arg(long)]
    pub session: Option<String>,
    /// Include the discarded ones.
    #[arg(long)]
    pub discarded: bool,
    /// At most this many (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: u64,
}

/// Which dead letters `retry` and `discard` act on.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all"])))]
pub struct DeadLetterSelect {
    /// This dead letter, by the `id` that `list` prints (repeatable).
    #[arg(long = "id")]
    pub id: Vec<i64>,
    /// Every dead letter awaiting a decision.
    #[arg(long)]
    pub all: bool,
    /// With `--all`: only those of this stream.
    #[arg(long)]
    pub stream: Option<String>,
}

/// `session …` commands.
#[derive(Debug, Subcommand)]
pub enum SessionCmd {
    /// Create a session for a user; prints the token once.
    Create {
        /// The user's id (a number is stored as a number).
        #[arg(long)]
        user_id: String,
        /// The user's name.
        #[arg(long)]
        username: String,
        /// The user's email.
        #[arg(long)]
        email: Option<String>,
        /// The user's role.
        #[arg(long)]
        role: Option<String>,
    },
    /// Print a session's JSON; exits 1 when there is none.
    Show {
        /// The session id (64 hex characters).
        session_id: String,
    },
    /// Set keys: `KEY=JSON_VALUE` (a value that is not JSON is taken as a string).
    Set {
        /// The session id.
        session_id: String,
        /// `KEY=JSON_VALUE` pairs.
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Remove keys.
    Unset {
        /// The session id.
        session_id: String,
        /// Keys to remove.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Switch the session's platform connection.
    SwitchPlatform(SwitchPlatformArgs),
    /// End a session (reason `admin` unless given).
    Destroy {
        /// The session id.
        session_id: String,
        /// logout, rotated, logout_all, evicted, fingerprint or admin.
        #[arg(long, default_value = "admin")]
        reason: String,
    },
}

/// Arguments of `session switch-platform`.
#[derive(Debug, Args)]
pub struct SwitchPlatformArgs {
    /// The session id.
    pub session_id: String,
    /// The platform connection's id.
    #[arg(long)]
    pub platform_connection_id: i64,
    /// Display name.
    #[arg(long)]
    pub platform_name: String,
    /// Platform type (mastodon, pixelfed, …).
    #[arg(long)]
    pub platform_type: String,
    /// Instance URL.
    #[arg(long)]
    pub platform_instance_url: String,
}

/// `user …` commands.
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// The user's live sessions as a JSON list.
    Sessions {
        /// The user's id.
        user_id: String,
    },
    /// End every session of the user.
    LogoutAll {
        /// The user's id.
        user_id: String,
    },
}

/// A command failure: the exit code and the message for stderr.
#[derive(Debug)]
pub struct Failure {
    /// 1: not found or unhealthy; 2: anything else.
    pub code: u8,
    /// One line.
    pub message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match e {
            Error::NotFound(_) | Error::Ended { .. } => 1,
            _ => 2,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

impl From<vedfolnir_sessions::config::ConfigError> for Failure {
    fn from(e: vedfolnir_sessions::config::ConfigError) -> Self {
        Failure {
            code: 2,
            message: e.to_string(),
        }
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn session_id(text: &str) -> Result<SessionId, Failure> {
    text.parse().map_err(|e| {
        invalid(format!(
            "{e}: {:?}",
            text.chars().take(80).collect::<String>()
        ))
    })
}

/// A user id argument: a whole number is stored as a JSON number, as the
/// seed application does; anything else as a string.
pub fn user_id_value(text: &str) -> Value {
    text.parse::<i64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::String(text.to_owned()))
}

fn parse_reason(text: &str) -> Result<DestroyReason, Failure> {
    serde_json::from_value(Value::String(text.to_owned())).map_err(|_| {
        invalid(format!(
            "unknown reason {text:?}: logout, rotated, logout_all, evicted, fingerprint or admin"
        ))
    })
}

/// What a command prints: JSON, or text for people.
#[derive(Debug)]
pub enum Output {
    /// Printed as pretty JSON.
    Json(Value),
    /// Printed as is.
    Text(String),
}

fn timestamp_arg(
    name: &str,
    text: Option<String>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, Failure> {
    text.map(|t| {
        t.parse::<vedfolnir_sessions::time::Timestamp>()
            .map(|t| t.datetime())
            .map_err(|_| invalid(format!("--{name} must be an RFC 3339 timestamp, got {t:?}")))
    })
    .transpose()
}

/// Runs the parsed command and returns what to print.
pub async fn run(cli: Cli, config: Config) -> Result<Output, Failure> {
    match cli.command {
        Command::Migrate => {
            let db = vedfolnir_sessions::audit::db::connect(&config.database_url).await?;
            let applied = vedfolnir_sessions::audit::db::migrate(&db).await?;
            return Ok(Output::Json(json!({"applied": applied, "pending": 0})));
        }
        Command::History(h) => {
            let query = vedfolnir_sessions::audit::history::HistoryQuery {
                session_id: h
                    .session_id
                    .as_deref()
                    .map(session_id)
                    .transpose()?
                    .map(|s| s.to_string()),
                user_id: h.user,
                since: timestamp_arg("since", h.since)?,
                until: timestamp_arg("until", h.until)?,
                limit: h.limit,
            };
            let db = vedfolnir_sessions::audit::db::connect(&config.database_url).await?;
            vedfolnir_sessions::audit::db::require_current_schema(&db).await?;
            let rows = vedfolnir_sessions::audit::history::history(&db, &query).await?;
            // Not found is 1, as everywhere in the CLI; a known session with
            // nothing in the window is an empty answer.
            if rows.is_empty()
                && let Some(id) = &query.session_id
                && !vedfolnir_sessions::recovery::session_known(&db, id).await?
            {
                return Err(not_in_audit_trail(id));
            }
            return Ok(if h.json {
                Output::Json(serde_json::to_value(&rows).map_err(|e| invalid(e.to_string()))?)
            } else {
                Output::Text(vedfolnir_sessions::audit::history::render_table(&rows))
            });
        }
        Command::Replay(r) => return replay(r, config).await,
        Command::ImportLegacy(args) => return import_legacy::run(args, config).await,
        Command::Snapshots(SnapshotsCmd::Rebuild { session }) => {
            return rebuild_snapshots(session, config).await;
        }
        Command::DeadLetters(cmd) => return dead_letters(cmd, config).await,
        Command::Bench(args) => {
            return crate::bench::run(args, config).await.map_err(Failure::from);
        }
        Command::Demo {
            app_servers,
            users,
            day,
            json,
        } => {
            let db = vedfolnir_sessions::audit::db::connect(&config.database_url).await?;
            vedfolnir_sessions::audit::db::require_current_schema(&db).await?;
            let store = SessionStore::connect(&config).await?;
            let cfg = crate::demo::DemoConfig {
                app_servers: app_servers.max(1),
                users: users.max(1),
                day: std::time::Duration::from_secs(day.max(1)),
            };
            let report = crate::demo::run(store, db, cfg, |line| println!("{line}")).await?;
            return Ok(if json {
                Output::Json(serde_json::to_value(&report).map_err(|e| invalid(e.to_string()))?)
            } else {
                Output::Text(crate::demo::render(&report))
            });
        }
        Command::Verify(v) => return verify(v, config).await,
        _ => {}
    }
    run_store(cli, config).await.map(Output::Json)
}

/// The failure for a session id the audit database has never seen.
fn not_in_audit_trail(id: &str) -> Failure {
    Failure {
        code: 1,
        message: format!("session {id} not found in the audit trail"),
    }
}

async fn verify(v: VerifyArgs, config: Config) -> Result<Output, Failure> {
    let db = vedfolnir_sessions::audit::db::connect(&config.database_url).await?;
    vedfolnir_sessions::audit::db::require_current_schema(&db).await?;
    let store = SessionStore::connect(&config).await?;
    let opts = vedfolnir_sessions::recovery::VerifyOptions {
        repair: v.repair,
        grace: std::time::Duration::from_secs(v.grace),
        ..vedfolnir_sessions::recovery::VerifyOptions::default()
    };
    let report = vedfolnir_sessions::recovery::verify_with(&store, &db, &opts).await?;
    let out = serde_json::to_value(&report).map_err(|e| invalid(e.to_string()))?;
    if report.ok {
        return Ok(Output::Json(out));
    }
    println!("{out:#}");
    let repaired = if v.repair {
        format!(" ({} repaired)", report.repaired.len())
    } else {
        String::new()
    };
    Err(Failure {
        code: 1,
        message: format!(
            "{} divergence(s) between Redis and the audit database{repaired}",
            report.divergences.len()
        ),
    })
}

async fn replay(r: ReplayArgs, config: Config) -> Result<Output, Failure> {
    let db = vedfolnir_sessions::audit::db::connect(&config.database_url).await?;
    vedfolnir_sessions::audit::db::require_current_schema(&db).await?;
    if let Some(at) = timestamp_arg("at", r.at)? {
        let selection = vedfolnir_sessions::recovery::Selection {
            session_id: r
                .session
                .as_deref()
                .map(session_id)
                .transpose()?
                .map(|s| s.to_string()),
            user_id: r.user,
        };
        let report = vedfolnir_sessions::recovery::point_in_time(&db, at, &selection).await?;
        if report.sessions.is_empty()
            && report.skipped.is_empty()
            && let Some(id) = &selection.session_id
            && !vedfolnir_sessions::recovery::session_known(&db, id).await?
        {
            return Err(not_in_audit_trail(id));
        }
        if !report.skipped.is_empty() {
            // One bad row must not stop the answer, and must not go unsaid.
            eprintln!(
                "warning: skipped {} audit row(s) that do not decode (listed under \"skipped\")",
                report.skipped.len()
            );
        }
        let doc = json!({
            "at": vedfolnir_sessions::time::Timestamp::from_datetime(at),
            "sessions": report.sessions,
            "skipped": report.skipped,
        });
        return match r.output {
            Some(path) => {
                let text =
                    serde_json::to_string_pretty(&doc).map_err(|e| invalid(e.to_string()))?;
                std::fs::write(&path, text + "\n")
                    .map_err(|e| invalid(format!("cannot write {}: {e}", path.display())))?;
                Ok(Output::Json(json!({
                    "at": doc["at"],
                    "sessions": doc["sessions"].as_array().map_or(0, Vec::len),
                    "skipped": doc["skipped"].as_array().map_or(0, Vec::len),
                    "output": path.display().to_string(),
                })))
            }
            None => Ok(Output::Json(doc)),
        };
    }
    let store = SessionStore::connect(&config).await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "replay {bar:40} {pos}/{len} sessions ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let summary = vedfolnir_sessions::recovery::replay(&store, &db, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await?;
    bar.finish_and_clear();
    Ok(Output::Json(
        serde_json::to_value(&summary).map_err(|e| invalid(e.to_string()))?,
    ))
}

async fn rebuild_snapshots(session: Option<String>, config: Config) -> Result<Output, Failure> {
    if let Some(s) = &session {
        session_id(s)?;
    }
    let db = vedfolnir_sessions::audit::db::connect(&config.database_url).await?;
    vedfolnir_sessions::audit::db::require_current_schema(&db).await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "rebuild {bar:40} {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let summary = vedfolnir_sessions::audit::rebuild::rebuild(
        &db,
        config.session_timeout,
        session.as_deref(),
        |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )
    .await?;
    bar.finish_and_clear();
    if session.is_some() && summary.sessions == 0 {
        return Err(Failure {
            code: 1,
            message: "no events for that session".to_owned(),
        });
    }
    Ok(Output::Json(
        serde_json::to_value(&summary).map_err(|e| invalid(e.to_string()))?,
    ))
}

/// `dead-letters list | retry | discard`.
async fn dead_letters(cmd: DeadLettersCmd, config: Config) -> Result<Output, Failure> {
    use vedfolnir_sessions::audit::sink::{DeadLetterFilter, RetryOutcome, list_dead_letters};
    let db = vedfolnir_sessions::audit::db::connect(&config.database_url).await?;
    vedfolnir_sessions::audit::db::require_current_schema(&db).await?;
    match cmd {
        DeadLettersCmd::List(a) => {
            let filter = DeadLetterFilter {
                stream: a.stream,
                session_id: a.session,
                discarded: a.discarded,
                limit: a.limit,
                ..DeadLetterFilter::default()
            };
            let rows = list_dead_letters(&db, &filter).await?;
            Ok(Output::Json(Value::Array(
                rows.iter().map(dead_letter_json).collect(),
            )))
        }
        DeadLettersCmd::Retry(select) => {
            let mut rows = selected_dead_letters(&db, &select).await?;
            // In stream order, so a session's events go in oldest first.
            rows.sort_by_key(|r| (r.stream.clone(), stream_order(&r.stream_id)));
            let mut sinks: std::collections::HashMap<String, vedfolnir_sessions::audit::AuditSink> =
                std::collections::HashMap::new();
            let (mut written, mut duplicates, mut kept) = (0u64, 0u64, 0u64);
            let mut results = Vec::with_capacity(rows.len());
            for row in &rows {
                let sink = sinks.entry(row.stream.clone()).or_insert_with(|| {
                    vedfolnir_sessions::audit::AuditSink::new(
                        db.clone(),
                        config.session_timeout,
                        row.stream.clone(),
                    )
                });
                let outcome = sink.retry_dead_letter(row).await?;
                let (name, reason) = match outcome {
                    RetryOutcome::Written => {
                        written += 1;
                        ("written", None)
                    }
                    RetryOutcome::Duplicate => {
                        duplicates += 1;
                        ("duplicate", None)
                    }
                    RetryOutcome::Kept { reason } => {
                        kept += 1;
                        ("kept", Some(reason))
                    }
                };
                results.push(json!({
                    "id": row.id,
                    "stream_id": row.stream_id,
                    "outcome": name,
                    "reason": reason,
                }));
            }
            Ok(Output::Json(json!({
                "retried": rows.len(),
                "written": written,
                "duplicates": duplicates,
                "kept": kept,
                "results": results,
            })))
        }
        DeadLettersCmd::Discard { select, yes } => {
            let rows = selected_dead_letters(&db, &select).await?;
            if !yes {
                return Err(invalid(format!(
                    "discarding sets {} dead letter(s) aside for good; add --yes to confirm",
                    rows.len()
                )));
            }
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            let n = vedfolnir_sessions::audit::sink::discard_dead_letters(&db, &ids).await?;
            Ok(Output::Json(json!({"discarded": n, "ids": ids})))
        }
    }
}

/// The dead letters `--id …` names (exit 1 when one does not exist), or
/// every one awaiting a decision with `--all`.
async fn selected_dead_letters(
    db: &sea_orm::DatabaseConnection,
    select: &DeadLetterSelect,
) -> Result<Vec<vedfolnir_sessions::audit::entity::dead_letters::Model>, Failure> {
    use vedfolnir_sessions::audit::sink::{DeadLetterFilter, list_dead_letters};
    let filter = DeadLetterFilter {
        ids: select.id.clone(),
        stream: select.stream.clone(),
        ..DeadLetterFilter::default()
    };
    let rows = list_dead_letters(db, &filter).await?;
    let missing: Vec<String> = select
        .id
        .iter()
        .filter(|id| !rows.iter().any(|r| r.id == **id))
        .map(i64::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(Failure {
            code: 1,
            message: format!("no dead letter with id {}", missing.join(", ")),
        });
    }
    Ok(rows)
}

/// A stream id's place in its stream (`<ms>-<seq>`); fallback ids last.
fn stream_order(id: &str) -> (u64, u64) {
    id.split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .unwrap_or((u64::MAX, u64::MAX))
}

/// One dead letter as `list` prints it: the raw fields as the JSON object
/// they are stored as.
fn dead_letter_json(r: &vedfolnir_sessions::audit::entity::dead_letters::Model) -> Value {
    json!({
        "id": r.id,
        "stream": r.stream,
        "stream_id": r.stream_id,
        "session_id": r.session_id,
        "seq": r.seq,
        "reason": r.reason,
        "deliveries": r.deliveries,
        "recorded_at": vedfolnir_sessions::time::Timestamp::from_datetime(r.recorded_at),
        "discarded_at": r.discarded_at.map(vedfolnir_sessions::time::Timestamp::from_datetime),
        "fields": serde_json::from_str::<Value>(&r.fields)
            .unwrap_or_else(|_| Value::String(r.fields.clone())),
    })
}

async fn run_store(cli: Cli, config: Config) -> Result<Value, Failure> {
    let store = match SessionStore::connect(&config).await {
        Ok(s) => s,
        Err(e) if matches!(cli.command, Command::Health) => {
            println!(
                "{:#}",
                json!({"healthy": false, "redis_reachable": false, "error": e.to_string()})
            );
            return Err(Failure {
                code: 1,
                message: format!("unhealthy: {e}"),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let store = if matches!(
        cli.command,
        Command::Session(_) | Command::User(_) | Command::Stats { .. }
    ) {
        attach_audit(store, &config).await
    } else {
        store
    };
    match cli.command {
        Command::Session(cmd) => session(&store, cmd).await,
        Command::User(UserCmd::Sessions { user_id }) => {
            let list = store.user_sessions(&user_id).await?;
            Ok(Value::Array(
                list.into_iter()
                    .map(|(id, s)| json!({"session_id": id, "session": s}))
                    .collect(),
            ))
        }
        Command::User(UserCmd::LogoutAll { user_id }) => {
            let ended = store
                .destroy_all_for_user(&user_id, DestroyReason::LogoutAll)
                .await?;
            Ok(json!({"user_id": user_id, "destroyed": ended}))
        }
        Command::Stats { top } => Ok(
            serde_json::to_value(store.stats(top).await?).map_err(|e| invalid(e.to_string()))?
        ),
        Command::Migrate
        | Command::History(_)
        | Command::Replay(_)
        | Command::Verify(_)
        | Command::Snapshots(_)
        | Command::Demo { .. }
        | Command::Bench(_)
        | Command::ImportLegacy(_)
        | Command::DeadLetters(_) => Err(invalid("not a store command")),
        Command::Health => {
            let h = store.health().await;
            let v = serde_json::to_value(&h).map_err(|e| invalid(e.to_string()))?;
            if h.healthy {
                Ok(v)
            } else {
                println!("{v:#}");
                Err(Failure {
                    code: 1,
                    message: format!(
                        "unhealthy: {}",
                        h.error.unwrap_or_else(|| "redis unreachable".to_owned())
                    ),
                })
            }
        }
    }
}

/// With `DATABASE_URL` set, the session and user commands attach the audit
/// database, as app servers do: ends then reach sessions the database knows
/// that Redis does not hold (while it recovers, or is unreachable), reads
/// during a recovery are served from it, and with `DB_SESSION_SYNC` the
/// command's events are committed to it. Without it they act on Redis only.
/// A database that cannot be opened is reported and left out.
async fn attach_audit(store: SessionStore, config: &Config) -> SessionStore {
    if std::env::var_os("DATABASE_URL").is_none() {
        return store;
    }
    let db = match vedfolnir_sessions::audit::db::connect(&config.database_url).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!(
                "warning: the audit database (DATABASE_URL) is unreachable: {e}; acting on Redis only"
            );
            return store;
        }
    };
    if let Err(e) = vedfolnir_sessions::audit::db::require_current_schema(&db).await {
        eprintln!("warning: {e}; acting on Redis only");
        return store;
    }
    // A replay this command started in the background would end with it,
    // and leave its healing lock to hold up the worker and the app servers.
    store
        .with_audit(vedfolnir_sessions::audit::AuditSink::new(
            db,
            config.session_timeout,
            config.event_stream.clone(),
        ))
        .without_background_healing()
}

async fn session(store: &SessionStore, cmd: SessionCmd) -> Result<Value, Failure> {
    match cmd {
        SessionCmd::Create {
            user_id,
            username,
            email,
            role,
        } => {
            let mut new = NewSession::for_user(user_id_value(&user_id), username);
            if let Some(e) = email {
                new = new.with("email", e);
            }
            if let Some(r) = role {
                new = new.with("role", r);
            }
            let c = store.create(new).await?;
            Ok(json!({
                "session_id": c.session_id,
                "token": c.token.expose(),
                "session": c.session,
                "evicted": c.evicted,
            }))
        }
        SessionCmd::Show { session_id: id } => {
            let id = session_id(&id)?;
            match store.get(&id).await? {
                Some(s) => Ok(serde_json::to_value(&s).map_err(|e| invalid(e.to_string()))?),
                None => match store.tombstone(&id).await? {
                    Some(status) => Err(Error::Ended {
                        session_id: id,
                        status,
                    }
                    .into()),
                    None => Err(Error::NotFound(id).into()),
                },
            }
        }
        SessionCmd::Set {
            session_id: id,
            pairs,
        } => {
            let id = session_id(&id)?;
            let mut set = Map::new();
            for p in pairs {
                let (k, v) = p
                    .split_once('=')
                    .ok_or_else(|| invalid(format!("expected KEY=JSON_VALUE, got {p:?}")))?;
                if k.is_empty() {
                    return Err(invalid(format!("empty key in {p:?}")));
                }
                let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
                set.insert(k.to_owned(), value);
            }
            let s = store
                .update(
                    &id,
                    Changes {
                        set,
                        ..Changes::default()
                    },
                )
                .await?;
            Ok(serde_json::to_value(&s).map_err(|e| invalid(e.to_string()))?)
        }
        SessionCmd::Unset {
            session_id: id,
            keys,
        } => {
            let id = session_id(&id)?;
            let s = store
                .update(
                    &id,
                    Changes {
                        unset: keys,
                        ..Changes::default()
                    },
                )
                .await?;
            Ok(serde_json::to_value(&s).map_err(|e| invalid(e.to_string()))?)
        }
        SessionCmd::SwitchPlatform(a) => {
            let id = session_id(&a.session_id)?;
            let s = store
                .switch_platform(
                    &id,
                    Platform {
                        platform_connection_id: a.platform_connection_id,
                        platform_name: a.platform_name,
                        platform_type: a.platform_type,
                        platform_instance_url: a.platform_instance_url,
                    },
                )
                .await?;
            Ok(serde_json::to_value(&s).map_err(|e| invalid(e.to_string()))?)
        }
        SessionCmd::Destroy {
            session_id: id,
            reason,
        } => {
            let id = session_id(&id)?;
            let reason = parse_reason(&reason)?;
            if store.destroy(&id, reason).await? {
                Ok(json!({"session_id": id, "destroyed": true, "reason": reason}))
            } else {
                Err(Error::NotFound(id).into())
            }
        }
    }
}

/// The binary's entry point: parse, configure, run, print.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    vedfolnir_exporters::init_cli_logging();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return fail(&e.into()),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&invalid(format!("cannot start the runtime: {e}"))),
    };
    match rt.block_on(run(cli, config)) {
        Ok(Output::Json(v)) => {
            println!("{v:#}");
            ExitCode::SUCCESS
        }
        Ok(Output::Text(t)) => {
            print!("{t}");
            ExitCode::SUCCESS
        }
        Err(f) => fail(&f),
    }
}

fn fail(f: &Failure) -> ExitCode {
    eprintln!("error: {}", f.message.replace('\n', " "));
    ExitCode::from(f.code)
}
