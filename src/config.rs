//! Configuration from the environment, with the Vedfolnir application's names
//! and defaults.
//!
//! [`Config::from_env`] reads every variable once at start and validates it;
//! a bad value is a [`ConfigError`] that names the variable and the value
//! (secrets are shown redacted). [`Config::default`] is the same as an empty
//! environment. The README's configuration table lists every variable.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

/// A configuration variable with a value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}={value:?}: {reason}")]
pub struct ConfigError {
    /// The environment variable.
    pub var: &'static str,
    /// The offending value (redacted when it holds a secret).
    pub value: String,
    /// What a valid value looks like.
    pub reason: String,
}

/// `SameSite` cookie attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    /// `SameSite=Strict`.
    Strict,
    /// `SameSite=Lax` (the default).
    Lax,
    /// `SameSite=None` (requires `Secure`).
    None,
}

impl SameSite {
    /// The attribute's value as written in `Set-Cookie`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

/// The session cookie's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieConfig {
    /// `SESSION_COOKIE_NAME` (`session`).
    pub name: String,
    /// `SESSION_COOKIE_HTTPONLY` (true).
    pub http_only: bool,
    /// `SESSION_COOKIE_SECURE` (true).
    pub secure: bool,
    /// `SESSION_COOKIE_SAMESITE` (`Lax`).
    pub same_site: SameSite,
    /// `SESSION_COOKIE_MAX_AGE` (7200 s).
    pub max_age: Duration,
}

/// Where Redis is. Holds the password; its `Debug` and [`RedisTarget::redacted`]
/// forms never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    url: Url,
}

impl RedisTarget {
    /// Parses a `redis://` or `rediss://` URL.
    pub fn parse(var: &'static str, text: &str) -> Result<Self, ConfigError> {
        let url = Url::parse(text).map_err(|e| ConfigError {
            var,
            value: redact_text(text),
            reason: format!("not a URL ({e})"),
        })?;
        if !matches!(url.scheme(), "redis" | "rediss" | "unix" | "redis+unix") {
            return Err(ConfigError {
                var,
                value: redact_url(&url),
                reason: "the scheme must be redis://, rediss:// or unix://".to_owned(),
            });
        }
        let target = RedisTarget { url };
        if target.is_network() {
            let db = target.url.path().trim_start_matches('/');
            if !db.is_empty() && db.parse::<u32>().is_err() {
                return Err(ConfigError {
                    var,
                    value: target.redacted(),
                    reason: format!(
                        "the path is the database index, a number (redis://host:6379/0), not {db:?}"
                    ),
                });
            }
        }
        Ok(target)
    }

    /// True for `rediss://`: the connection uses TLS.
    pub fn is_tls(&self) -> bool {
        self.url.scheme() == "rediss"
    }

    fn is_network(&self) -> bool {
        matches!(self.url.scheme(), "redis" | "rediss")
    }

    /// Where the server is, safe to log: `host:port` (the port Redis
    /// listens on by default when the URL names none), or a socket path.
    pub fn address(&self) -> String {
        if !self.is_network() {
            return self.url.path().to_owned();
        }
        let host = self.url.host_str().unwrap_or("localhost");
        format!("{host}:{}", self.url.port().unwrap_or(6379))
    }

    /// The full URL, password included, for the Redis client only.
    pub fn expose_url(&self) -> &str {
        self.url.as_str()
    }

    /// The URL with any password replaced by `***`, safe to log.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisTarget({})", self.redacted())
    }
}

fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    u.to_string()
}

fn redact_text(text: &str) -> String {
    // An unparseable URL may still hold a password before its last '@'.
    match text.rfind('@') {
        Some(at) => {
            let start = text
                .find("://")
                .map(|s| s + 3)
                .filter(|s| *s <= at)
                .unwrap_or(0);
            format!("{}***{}", &text[..start], &text[at..])
        }
        None => text.to_owned(),
    }
}

/// TLS to Redis, for `rediss://` URLs (`REDIS_SSL=true`). Needs the `tls`
/// feature (on by default); the connection uses rustls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// `REDIS_SSL_CA_CERTS`: a PEM file of the CA certificates the server's
    /// certificate must chain to (a private CA). Unset, the system's roots.
    pub ca_certs: Option<PathBuf>,
    /// `REDIS_SSL_CERT_REQS` (`required`): with `none`, the server's
    /// certificate is not checked at all (a warning is logged once).
    pub verify: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca_certs: None,
            verify: true,
        }
    }
}

/// How live sessions are kept in Redis (`SESSION_LAYOUT`). Both layouts
/// read each other's keys; see `docs/keys.md` for the rolling upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// An update writes the session key and the stream and nothing else:
    /// the expiry index holds a lower bound of each deadline, a session's
    /// version and user are recorded only near its deadline, user index
    /// members are the 32 bytes of the id and expiry index members its first
    /// 30 (the last two in the score, [`crate::SessionId::expiry_score`]).
    #[default]
    Lean,
    /// What the release before the lean layout wrote and reads: a ledger
    /// for every live session, exact deadlines, hex index members. For a
    /// rolling upgrade from that release.
    Ledger,
}

impl Layout {
    /// `lean` or `ledger`, as the scripts take it.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Lean => "lean",
            Layout::Ledger => "ledger",
        }
    }
}

/// Everything the library, the worker and the CLI need to know.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// `REDIS_URL`, or built from `REDIS_HOST`, `REDIS_PORT`, `REDIS_DB`,
    /// `REDIS_PASSWORD`, `REDIS_SSL`.
    pub redis: RedisTarget,
    /// `REDIS_SSL_CA_CERTS`, `REDIS_SSL_CERT_REQS`: how a `rediss://`
    /// connection checks the server.
    pub tls: TlsConfig,
    /// `REDIS_CLUSTER_NODES`: seed nodes of a Redis Cluster (`host:port` or
    /// URLs, comma-separated). When set, the store, the worker and the CLI use
    /// the cluster and `redis` is not used.
    pub cluster_nodes: Vec<RedisTarget>,
    /// `REDIS_PARTITIONS`: how many partitions (streams, indexes, hash tags)
    /// the sessions are spread over. 1 on standalone Redis (the key names of
    /// `docs/design.md`), 16 on a cluster.
    pub partitions: u32,
    /// `SESSION_STORAGE`: only `redis` is supported.
    pub session_storage: String,
    /// `REDIS_SESSION_PREFIX` (`vedfolnir:session:`).
    pub session_prefix: String,
    /// `REDIS_EVENT_STREAM` (`vedfolnir:events`).
    pub event_stream: String,
    /// `REDIS_SESSION_TIMEOUT` (7200 s): idle lifetime of a session.
    pub session_timeout: Duration,
    /// `SESSION_TOUCH_INTERVAL` (60 s, or half a shorter timeout): at most one
    /// `touched` event per interval.
    pub touch_interval: Duration,
    /// `SESSION_MAX_BYTES` (65536): largest session JSON accepted.
    pub max_bytes: usize,
    /// `SESSION_MAX_PER_USER` (0 = unlimited).
    pub max_per_user: u32,
    /// `SESSION_TOMBSTONE_TTL` (86400 s): how long an ended session's id is
    /// remembered, so no in-flight request can bring it back.
    pub tombstone_ttl: Duration,
    /// `SESSION_LAYOUT` (`lean`): how live sessions are kept in Redis (see
    /// [`Layout`] and `docs/keys.md`).
    pub layout: Layout,
    /// `SESSION_EXPIRY_LOOKAHEAD_MS` (300000): in the lean layout, how long
    /// before a session's deadline the reaper records its version and user,
    /// which it needs to write `expired` once Redis has dropped the key.
    /// Sessions whose timeout is no longer than this keep that record all
    /// their life.
    pub expiry_lookahead: Duration,
    /// `SESSION_MAX_RETRIES` (100): attempts on version conflicts before `Conflict`.
    pub max_retries: u32,
    /// `SESSION_STATE_CACHE_BYTES` (33554432, 32 MiB; 0 = off): the memory a
    /// store may spend remembering, per session, the state its last write
    /// given no state (`update`, `touch`, `modify`, `increment`,
    /// `switch_platform`) left, so that the next such write of the session
    /// folds on it without reading first (estimated from each session's
    /// fields; some 20,000 sessions of 15 short fields). The script's version
    /// check stands behind it: a state that another writer moved on costs
    /// one round trip, whose answer is the current state. Reads never use it.
    pub state_cache_bytes: usize,
    /// `SESSION_STREAM_MAXLEN` (100000; 0 = never): while no consumer group
    /// reads the event stream (no audit worker), the store trims it to about
    /// this many entries in all, so that Redis does not fill up. A stream
    /// that a group reads is never trimmed by the store: the audit consumer
    /// trims what its group acknowledged.
    pub stream_maxlen: u64,
    /// `REDIS_TIMEOUT_MS` (2000): connect and response timeout for store commands.
    pub redis_timeout: Duration,
    /// `REDIS_WAIT_REPLICAS` (0 = off): after each mutation, wait until this
    /// many replicas acknowledged it (`WAIT`), so a failover cannot lose it.
    pub wait_replicas: u32,
    /// `REDIS_WAIT_TIMEOUT_MS` (100): how long a mutation waits for replicas.
    pub wait_timeout: Duration,
    /// Cookie attributes.
    pub cookie: CookieConfig,
    /// `DB_SESSION_FALLBACK` (true): serve sessions from the audit database
    /// while Redis is unreachable (feature `audit`).
    #[cfg(feature = "audit")]
    pub db_fallback: bool,
    /// `DB_SESSION_SYNC` (true): commit every mutation to the audit database
    /// before returning (feature `audit`).
    #[cfg(feature = "audit")]
    pub db_sync: bool,
    /// `DATABASE_URL` (feature `audit`): the audit database the binaries
    /// open. Unset, the SQLite file `audit.sqlite` in the data directory
    /// (see [`data_dir`]); empty when there is no data directory. A library
    /// user attaches the database explicitly
    /// (`SessionStore::with_audit`).
    #[cfg(feature = "audit")]
    pub database_url: String,
}

impl Default for Config {
    fn default() -> Self {
        // An empty environment is always valid.
        match Config::from_lookup(|_| None) {
            Ok(c) => c,
            Err(e) => unreachable!("defaults are valid: {e}"),
        }
    }
}

impl Config {
    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads and validates variables from a map (tests, embedding).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Config::from_lookup(|k| vars.get(k).cloned())
    }

    /// Reads and validates variables through a lookup function.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = non_empty(&get);
        let ssl = parse_bool(&var, "REDIS_SSL", false)?;
        let redis = match var("REDIS_URL") {
            Some(u) => {
                let mut target = RedisTarget::parse("REDIS_URL", &u)?;
                // TLS asked for explicitly is never silently dropped.
                if ssl && target.url.scheme() == "redis" {
                    let _ = target.url.set_scheme("rediss");
                }
                target
            }
            None => {
                let host = var("REDIS_HOST").unwrap_or_else(|| "localhost".to_owned());
                let port: u16 = parse(&var, "REDIS_PORT", 6379, "a TCP port (1-65535)")?;
                let db: u32 = parse(&var, "REDIS_DB", 0, "a database index (0, 1, …)")?;
                let scheme = if ssl { "rediss" } else { "redis" };
                let mut url =
                    Url::parse(&format!("{scheme}://placeholder/")).map_err(|e| ConfigError {
                        var: "REDIS_HOST",
                        value: host.clone(),
                        reason: e.to_string(),
                    })?;
                url.set_host(Some(&host)).map_err(|e| ConfigError {
                    var: "REDIS_HOST",
                    value: host.clone(),
                    reason: format!("not a host name ({e})"),
                })?;
                let _ = url.set_port(Some(port));
                url.set_path(&db.to_string());
                if let Some(pw) = get("REDIS_PASSWORD").filter(|p| !p.is_empty()) {
                    let _ = url.set_password(Some(&pw));
                }
                RedisTarget { url }
            }
        };
        let cluster_nodes = match var("REDIS_CLUSTER_NODES") {
            None => Vec::new(),
            Some(list) => {
                let password = get("REDIS_PASSWORD").filter(|p| !p.is_empty());
                parse_cluster_nodes(&list, ssl, password.as_deref())?
            }
        };
        let tls = TlsConfig {
            ca_certs: var("REDIS_SSL_CA_CERTS").map(PathBuf::from),
            verify: match var("REDIS_SSL_CERT_REQS")
                .map(|v| v.to_ascii_lowercase())
                .as_deref()
            {
                None | Some("required") => true,
                Some("none") => false,
                Some(_) => {
                    return Err(ConfigError {
                        var: "REDIS_SSL_CERT_REQS",
                        value: var("REDIS_SSL_CERT_REQS").unwrap_or_default(),
                        reason: "`required` (check the server's certificate) or `none`".to_owned(),
                    });
                }
            },
        };
        let uses_tls = if cluster_nodes.is_empty() {
            redis.is_tls()
        } else {
            cluster_nodes.iter().any(RedisTarget::is_tls)
        };
        if uses_tls && !cfg!(feature = "tls") {
            let (var_name, value) = if ssl {
                ("REDIS_SSL", "true".to_owned())
            } else if cluster_nodes.is_empty() {
                ("REDIS_URL", redis.redacted())
            } else {
                (
                    "REDIS_CLUSTER_NODES",
                    var("REDIS_CLUSTER_NODES").unwrap_or_default(),
                )
            };
            return Err(ConfigError {
                var: var_name,
                value: redact_text(&value),
                reason: NO_TLS.to_owned(),
            });
        }
        let partitions: u32 = parse(
            &var,
            "REDIS_PARTITIONS",
            if cluster_nodes.is_empty() { 1 } else { 16 },
            "a number of partitions (1-16384)",
        )?;
        if !(1..=16384).contains(&partitions) {
            return Err(ConfigError {
                var: "REDIS_PARTITIONS",
                value: partitions.to_string(),
                reason: "a number of partitions (1-16384)".to_owned(),
            });
        }
        let session_storage = var("SESSION_STORAGE").unwrap_or_else(|| "redis".to_owned());
        if session_storage != "redis" {
            return Err(ConfigError {
                var: "SESSION_STORAGE",
                value: session_storage,
                reason: "only `redis` is supported".to_owned(),
            });
        }
        let session_prefix =
            var("REDIS_SESSION_PREFIX").unwrap_or_else(|| "vedfolnir:session:".to_owned());
        let event_stream =
            var("REDIS_EVENT_STREAM").unwrap_or_else(|| "vedfolnir:events".to_owned());
        let partitioned = partitions > 1 || !cluster_nodes.is_empty();
        for (name, value) in [
            ("REDIS_SESSION_PREFIX", &session_prefix),
            ("REDIS_EVENT_STREAM", &event_stream),
        ] {
            if partitioned && value.contains(['{', '}']) {
                return Err(ConfigError {
                    var: name,
                    value: value.clone(),
                    reason: "no `{` or `}` with partitions: the partition's hash tag must be \
                             the first braces in every key"
                        .to_owned(),
                });
            }
        }
        let secs = |name: &'static str, default: u64| -> Result<Duration, ConfigError> {
            let n: u64 = parse(&var, name, default, "a whole number of seconds, at least 1")?;
            if n == 0 {
                return Err(ConfigError {
                    var: name,
                    value: "0".to_owned(),
                    reason: "a whole number of seconds, at least 1".to_owned(),
                });
            }
            Ok(Duration::from_secs(n))
        };
        let session_timeout = secs("REDIS_SESSION_TIMEOUT", 7200)?;
        // Unset, the interval follows a short timeout down to half of it.
        let touch_interval = match var("SESSION_TOUCH_INTERVAL") {
            Some(_) => secs("SESSION_TOUCH_INTERVAL", 60)?,
            None => Duration::from_secs(60).min(session_timeout / 2),
        };
        let tombstone_ttl = secs("SESSION_TOMBSTONE_TTL", 86_400)?;
        if touch_interval >= session_timeout {
            return Err(ConfigError {
                var: "SESSION_TOUCH_INTERVAL",
                value: touch_interval.as_secs().to_string(),
                reason: format!(
                    "must be shorter than REDIS_SESSION_TIMEOUT ({} s): reads extend a session \
                     at most once per interval, so an interval as long as the timeout lets \
                     active sessions expire",
                    session_timeout.as_secs()
                ),
            });
        }
        let max_bytes: usize = parse(&var, "SESSION_MAX_BYTES", 65_536, "a number of bytes")?;
        if max_bytes < 256 {
            return Err(ConfigError {
                var: "SESSION_MAX_BYTES",
                value: max_bytes.to_string(),
                reason: "at least 256 bytes".to_owned(),
            });
        }
        let max_per_user: u32 = parse(
            &var,
            "SESSION_MAX_PER_USER",
            0,
            "a whole number (0 = unlimited)",
        )?;
        let max_retries: u32 = parse(&var, "SESSION_MAX_RETRIES", 100, "a whole number")?;
        let state_cache_bytes: usize = parse(
            &var,
            "SESSION_STATE_CACHE_BYTES",
            32 * 1024 * 1024,
            "a number of bytes (0 = off)",
        )?;
        let stream_maxlen: u64 = parse(
            &var,
            "SESSION_STREAM_MAXLEN",
            100_000,
            "a number of stream entries (0 = never trim)",
        )?;
        let layout = match var("SESSION_LAYOUT").as_deref() {
            None | Some("lean") => Layout::Lean,
            Some("ledger") => Layout::Ledger,
            Some(other) => {
                return Err(ConfigError {
                    var: "SESSION_LAYOUT",
                    value: other.to_owned(),
                    reason: "`lean` or `ledger`".to_owned(),
                });
            }
        };
        let lookahead_ms: u64 = parse(
            &var,
            "SESSION_EXPIRY_LOOKAHEAD_MS",
            300_000,
            "milliseconds, at least 1",
        )?;
        if lookahead_ms == 0 {
            return Err(ConfigError {
                var: "SESSION_EXPIRY_LOOKAHEAD_MS",
                value: "0".to_owned(),
                reason: "milliseconds, at least 1".to_owned(),
            });
        }
        let timeout_ms: u64 = parse(&var, "REDIS_TIMEOUT_MS", 2000, "milliseconds")?;
        let same_site = match var("SESSION_COOKIE_SAMESITE")
            .unwrap_or_else(|| "Lax".to_owned())
            .to_ascii_lowercase()
            .as_str()
        {
            "lax" => SameSite::Lax,
            "strict" => SameSite::Strict,
            "none" => SameSite::None,
            _ => {
                return Err(ConfigError {
                    var: "SESSION_COOKIE_SAMESITE",
                    value: var("SESSION_COOKIE_SAMESITE").unwrap_or_default(),
                    reason: "one of Lax, Strict, None".to_owned(),
                });
            }
        };
        // Without the audit database there is nothing to fall back to or to
        // commit to: asking for either is a mistake worth stopping for.
        #[cfg(not(feature = "audit"))]
        for name in ["DB_SESSION_FALLBACK", "DB_SESSION_SYNC"] {
            if parse_bool(&var, name, false)? {
                return Err(ConfigError {
                    var: name,
                    value: var(name).unwrap_or_default(),
                    reason: "needs the audit database: build vedfolnir-sessions with the \
                             `audit` feature, or set it to false"
                        .to_owned(),
                });
            }
        }
        let cookie = CookieConfig {
            name: var("SESSION_COOKIE_NAME").unwrap_or_else(|| "session".to_owned()),
            http_only: parse_bool(&var, "SESSION_COOKIE_HTTPONLY", true)?,
            secure: parse_bool(&var, "SESSION_COOKIE_SECURE", true)?,
            same_site,
            max_age: Duration::from_secs(parse(
                &var,
                "SESSION_COOKIE_MAX_AGE",
                7200,
                "a whole number of seconds",
            )?),
        };
        if !cookie
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(ConfigError {
                var: "SESSION_COOKIE_NAME",
                value: cookie.name,
                reason: "a cookie name (letters, digits and !#$%&'*+-.^_`|~)".to_owned(),
            });
        }
        Ok(Config {
            redis,
            tls,
            cluster_nodes,
            partitions,
            session_storage,
            session_prefix,
            event_stream,
            session_timeout,
            touch_interval,
            max_bytes,
            max_per_user,
            tombstone_ttl,
            layout,
            expiry_lookahead: Duration::from_millis(lookahead_ms),
            max_retries,
            state_cache_bytes,
            stream_maxlen,
            redis_timeout: Duration::from_millis(timeout_ms.max(1)),
            wait_replicas: parse(&var, "REDIS_WAIT_REPLICAS", 0, "a number of replicas")?,
            wait_timeout: Duration::from_millis(parse(
                &var,
                "REDIS_WAIT_TIMEOUT_MS",
                100,
                "milliseconds",
            )?),
            cookie,
            #[cfg(feature = "audit")]
            db_fallback: parse_bool(&var, "DB_SESSION_FALLBACK", true)?,
            #[cfg(feature = "audit")]
            db_sync: parse_bool(&var, "DB_SESSION_SYNC", true)?,
            #[cfg(feature = "audit")]
            database_url: var("DATABASE_URL").unwrap_or_else(|| default_database_url(&var)),
        })
    }

    /// Builder: another key namespace (session prefix and stream), as tests
    /// and the demo use to keep their keys apart.
    pub fn with_namespace(mut self, namespace: &str) -> Self {
        self.session_prefix = format!("{namespace}session:");
        self.event_stream = format!("{namespace}events");
        self
    }

    /// Builder: another idle timeout.
    pub fn with_session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// Builder: another touch interval.
    pub fn with_touch_interval(mut self, interval: Duration) -> Self {
        self.touch_interval = interval;
        self
    }

    /// Builder: another layout of live sessions in Redis.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Builder: another expiry look-ahead (lean layout).
    pub fn with_expiry_lookahead(mut self, lookahead: Duration) -> Self {
        self.expiry_lookahead = lookahead;
        self
    }

    /// Builder: another bound of the event stream without a consumer group
    /// (0 = never trim).
    pub fn with_stream_maxlen(mut self, entries: u64) -> Self {
        self.stream_maxlen = entries;
        self
    }

    /// Builder: another per-user limit.
    pub fn with_max_per_user(mut self, max: u32) -> Self {
        self.max_per_user = max;
        self
    }

    /// Builder: the memory a store may spend remembering states
    /// (`SESSION_STATE_CACHE_BYTES`; 0 = none).
    pub fn with_state_cache_bytes(mut self, bytes: usize) -> Self {
        self.state_cache_bytes = bytes;
        self
    }

    /// Builder: another size limit.
    pub fn with_max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max;
        self
    }

    /// Builder: another Redis.
    pub fn with_redis(mut self, target: RedisTarget) -> Self {
        self.redis = target;
        self
    }

    /// Builder: how `rediss://` connections check the server.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = tls;
        self
    }

    /// Builder: a Redis Cluster (seed nodes) with `partitions` partitions.
    pub fn with_cluster(mut self, nodes: Vec<RedisTarget>, partitions: u32) -> Self {
        self.cluster_nodes = nodes;
        self.partitions = partitions.max(1);
        self
    }

    /// Builder: another number of partitions on the same Redis.
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions.max(1);
        self
    }

    /// True when the keys carry partition hash tags (a cluster, or more than
    /// one partition).
    pub fn partitioned(&self) -> bool {
        self.partitions > 1 || !self.cluster_nodes.is_empty()
    }

    /// Where Redis is, safe to log: the URL, or the cluster's seed nodes.
    pub fn redis_redacted(&self) -> String {
        if self.cluster_nodes.is_empty() {
            self.redis.redacted()
        } else {
            let nodes: Vec<String> = self.cluster_nodes.iter().map(|n| n.redacted()).collect();
            format!("cluster {}", nodes.join(","))
        }
    }

    /// Builder: another connect and response timeout for store commands.
    pub fn with_redis_timeout(mut self, timeout: Duration) -> Self {
        self.redis_timeout = timeout;
        self
    }

    /// Builder: wait for `replicas` replicas (up to `timeout`) after each
    /// mutation.
    pub fn with_wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = replicas;
        self.wait_timeout = timeout;
        self
    }
}

/// Where the binaries keep files nobody named: `$XDG_DATA_HOME/vedfolnir-sessions`,
/// else `$HOME/.local/share/vedfolnir-sessions`; `None` when neither is set
/// (an `XDG_DATA_HOME` that is not an absolute path is ignored, as the XDG
/// base directory rules say).
pub fn data_dir(get: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let var = non_empty(get);
    let base = match var("XDG_DATA_HOME").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        _ => PathBuf::from(var("HOME")?).join(".local").join("share"),
    };
    Some(base.join("vedfolnir-sessions"))
}

/// `DATABASE_URL` when unset: `sqlite://<data dir>/audit.sqlite?mode=rwc`
/// (the file and its directory are created on first use), or empty when
/// there is no data directory.
#[cfg(feature = "audit")]
fn default_database_url(var: &impl Fn(&str) -> Option<String>) -> String {
    match data_dir(var) {
        Some(dir) => format!("sqlite://{}?mode=rwc", dir.join("audit.sqlite").display()),
        None => String::new(),
    }
}

/// Why a `rediss://` target is refused by a build without TLS.
pub(crate) const NO_TLS: &str = "TLS to Redis needs the `tls` feature of vedfolnir-sessions, \
     which this build was compiled without";

/// A comma-separated list of cluster seed nodes (`host:port` or URLs), as in
/// `REDIS_CLUSTER_NODES`. With `ssl`, `host:port` entries use `rediss://`;
/// nodes without a password of their own get `password`.
pub fn parse_cluster_nodes(
    list: &str,
    ssl: bool,
    password: Option<&str>,
) -> Result<Vec<RedisTarget>, ConfigError> {
    list.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| cluster_node(n, ssl, password))
        .collect()
}

/// One seed node of `REDIS_CLUSTER_NODES`: a URL, or `host:port`.
fn cluster_node(text: &str, ssl: bool, password: Option<&str>) -> Result<RedisTarget, ConfigError> {
    let var = "REDIS_CLUSTER_NODES";
    let mut target = if text.contains("://") {
        RedisTarget::parse(var, text)?
    } else {
        let scheme = if ssl { "rediss" } else { "redis" };
        RedisTarget::parse(var, &format!("{scheme}://{text}"))?
    };
    if target.url.host_str().is_none() || target.url.port().is_none() {
        return Err(ConfigError {
            var,
            value: target.redacted(),
            reason: "each node is host:port (or a redis:// URL with a port)".to_owned(),
        });
    }
    if let Some(pw) = password.filter(|_| target.url.password().is_none()) {
        let _ = target.url.set_password(Some(pw));
    }
    Ok(target)
}

/// A lookup that trims values and treats empty ones as unset.
pub(crate) fn non_empty(get: impl Fn(&str) -> Option<String>) -> impl Fn(&str) -> Option<String> {
    move |k| {
        get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }
}

pub(crate) fn parse<T: std::str::FromStr>(
    var: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
    expected: &str,
) -> Result<T, ConfigError> {
    match var(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| ConfigError {
            var: name,
            value: v,
            reason: format!("expected {expected}"),
        }),
    }
}

pub(crate) fn parse_bool(
    var: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match var(name) {
        None => Ok(default),
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(ConfigError {
                var: name,
                value: v,
                reason: "expected true or false".to_owned(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_map(&m)
    }

    #[test]
    fn defaults_are_the_seed_applications() {
        let c = Config::default();
        assert_eq!(c.redis.expose_url(), "redis://localhost:6379/0");
        assert_eq!(c.session_prefix, "vedfolnir:session:");
        assert_eq!(c.event_stream, "vedfolnir:events");
        assert_eq!(c.session_timeout, Duration::from_secs(7200));
        assert_eq!(c.cookie.name, "session");
        assert!(c.cookie.http_only && c.cookie.secure);
        assert_eq!(c.cookie.same_site, SameSite::Lax);
        assert_eq!(c.cookie.max_age, Duration::from_secs(7200));
        #[cfg(feature = "audit")]
        assert!(c.db_fallback && c.db_sync);
        assert!(c.cluster_nodes.is_empty());
        assert_eq!(c.partitions, 1);
        assert!(!c.partitioned());
        assert_eq!(c.tls, TlsConfig::default());
        assert!(c.tls.verify);
    }

    #[cfg(feature = "audit")]
    #[test]
    fn the_default_audit_file_lives_in_the_data_directory() {
        // Never in the current directory.
        let c = cfg(&[("HOME", "/home/ada")]).expect("valid");
        assert_eq!(
            c.database_url,
            "sqlite:///home/ada/.local/share/vedfolnir-sessions/audit.sqlite?mode=rwc"
        );
        let c = cfg(&[("HOME", "/home/ada"), ("XDG_DATA_HOME", "/srv/data")]).expect("valid");
        assert_eq!(
            c.database_url,
            "sqlite:///srv/data/vedfolnir-sessions/audit.sqlite?mode=rwc"
        );
        // A relative XDG_DATA_HOME is ignored.
        let c = cfg(&[("HOME", "/home/ada"), ("XDG_DATA_HOME", "data")]).expect("valid");
        assert!(
            c.database_url.starts_with("sqlite:///home/ada/"),
            "{}",
            c.database_url
        );
        // No data directory at all: nothing is opened unless DATABASE_URL says.
        let c = cfg(&[]).expect("valid");
        assert_eq!(c.database_url, "");
        let c = cfg(&[("DATABASE_URL", "postgres://db/audit")]).expect("valid");
        assert_eq!(c.database_url, "postgres://db/audit");
    }

    #[test]
    fn a_database_that_is_not_a_number_names_redis_url() {
        let e = cfg(&[("REDIS_URL", "redis://:ZkjBdCsoodbvY6EpXF@cache:6379/abc")])
            .expect_err("refused");
        assert_eq!(e.var, "REDIS_URL");
        assert_eq!(e.value, "redis://:***@cache:6379/abc");
        let text = e.to_string();
        assert!(text.contains("REDIS_URL") && text.contains("abc"), "{text}");
        assert!(!text.contains("ZkjBdCsoodbvY6EpXF"), "{text}");
        for ok in [
            "redis://cache:6379",
            "redis://cache:6379/",
            "redis://cache/3",
        ] {
            cfg(&[("REDIS_URL", ok)]).expect(ok);
        }
        let e = cfg(&[("REDIS_CLUSTER_NODES", "redis://h:7000/x")]).expect_err("refused");
        assert_eq!(e.var, "REDIS_CLUSTER_NODES");
    }

    #[test]
    fn the_address_names_host_and_port_only() {
        let c =
            cfg(&[("REDIS_URL", "redis://:ZkjBdCsoodbvY6EpXF@cache.internal/2")]).expect("valid");
        assert_eq!(c.redis.address(), "cache.internal:6379");
        let c = cfg(&[("REDIS_HOST", "10.1.2.3"), ("REDIS_PORT", "6380")]).expect("valid");
        assert_eq!(c.redis.address(), "10.1.2.3:6380");
    }

    #[test]
    fn tls_settings_are_read_and_checked() {
        let c = cfg(&[
            ("REDIS_URL", "redis://cache:6380/0"),
            ("REDIS_SSL", "true"),
            ("REDIS_SSL_CA_CERTS", "/etc/ssl/private-ca.pem"),
        ]);
        #[cfg(feature = "tls")]
        {
            let c = c.expect("valid");
            // TLS asked for is never dropped: the URL becomes rediss://.
            assert!(c.redis.is_tls());
            assert_eq!(c.redis.expose_url(), "rediss://cache:6380/0");
            assert_eq!(
                c.tls.ca_certs.as_deref(),
                Some(std::path::Path::new("/etc/ssl/private-ca.pem"))
            );
            assert!(c.tls.verify);
            let c = cfg(&[("REDIS_SSL_CERT_REQS", "NONE")]).expect("valid");
            assert!(!c.tls.verify);
        }
        #[cfg(not(feature = "tls"))]
        drop(c);
        let e = cfg(&[("REDIS_SSL_CERT_REQS", "sometimes")]).expect_err("refused");
        assert_eq!(e.var, "REDIS_SSL_CERT_REQS");
        assert_eq!(e.value, "sometimes");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn without_the_tls_feature_tls_is_a_config_error_naming_it() {
        let e = cfg(&[("REDIS_SSL", "true")]).expect_err("refused");
        assert_eq!(e.var, "REDIS_SSL");
        assert!(e.to_string().contains("`tls` feature"), "{e}");
        let e = cfg(&[("REDIS_URL", "rediss://:ZkjBdCsoodbvY6EpXF@cache:6380/0")])
            .expect_err("refused");
        assert_eq!(e.var, "REDIS_URL");
        assert!(e.to_string().contains("`tls` feature"), "{e}");
        assert!(!e.to_string().contains("ZkjBdCsoodbvY6EpXF"), "{e}");
        let e = cfg(&[("REDIS_CLUSTER_NODES", "rediss://h:7000")]).expect_err("refused");
        assert_eq!(e.var, "REDIS_CLUSTER_NODES");
    }

    /// Without the audit database, asking for the fallback or for
    /// synchronous audit writes names the variable and the missing feature;
    /// turning them off is fine.
    #[cfg(not(feature = "audit"))]
    #[test]
    fn audit_settings_without_the_audit_feature_are_refused() {
        for name in ["DB_SESSION_FALLBACK", "DB_SESSION_SYNC"] {
            let e = cfg(&[(name, "true")]).expect_err("refused");
            assert_eq!(e.var, name);
            assert!(e.to_string().contains("`audit` feature"), "{e}");
            cfg(&[(name, "false")]).expect("off is fine");
        }
    }

    #[test]
    fn a_touch_interval_as_long_as_the_timeout_is_refused() {
        // Reads extend a session at most once per interval: with an interval
        // as long as the timeout, an active session would expire.
        for (interval, timeout) in [("7200", "7200"), ("60", "30")] {
            let e = cfg(&[
                ("SESSION_TOUCH_INTERVAL", interval),
                ("REDIS_SESSION_TIMEOUT", timeout),
            ])
            .expect_err("refused");
            assert_eq!(e.var, "SESSION_TOUCH_INTERVAL");
            assert_eq!(e.value, interval);
            let text = e.to_string();
            assert!(
                text.contains("SESSION_TOUCH_INTERVAL") && text.contains("REDIS_SESSION_TIMEOUT"),
                "{text}"
            );
        }
        let c = cfg(&[
            ("SESSION_TOUCH_INTERVAL", "1"),
            ("REDIS_SESSION_TIMEOUT", "2"),
        ])
        .expect("shorter is fine");
        assert_eq!(c.touch_interval, Duration::from_secs(1));
        // Unset, it follows a short timeout down to half of it.
        let c = cfg(&[("REDIS_SESSION_TIMEOUT", "1")]).expect("derived interval");
        assert_eq!(c.touch_interval, Duration::from_millis(500));
        let c = cfg(&[]).expect("defaults");
        assert_eq!(c.touch_interval, Duration::from_secs(60));
    }

    #[test]
    fn cluster_nodes_switch_to_sixteen_partitions() {
        let c = cfg(&[
            (
                "REDIS_CLUSTER_NODES",
                "127.0.0.1:7100, redis://10.0.0.2:7101 ,",
            ),
            ("REDIS_PASSWORD", "ZkjBdCsoodbvY6EpXF"),
        ])
        .expect("valid");
        assert_eq!(c.partitions, 16);
        assert!(c.partitioned());
        let urls: Vec<&str> = c.cluster_nodes.iter().map(|n| n.expose_url()).collect();
        assert_eq!(
            urls,
            [
                "redis://:ZkjBdCsoodbvY6EpXF@127.0.0.1:7100",
                "redis://:ZkjBdCsoodbvY6EpXF@10.0.0.2:7101"
            ]
        );
        assert!(!c.redis_redacted().contains("ZkjBdCsoodbvY6EpXF"));
        let c = cfg(&[
            ("REDIS_CLUSTER_NODES", "127.0.0.1:7100"),
            ("REDIS_PARTITIONS", "4"),
        ])
        .expect("valid");
        assert_eq!(c.partitions, 4);
    }

    #[test]
    fn bad_partition_settings_name_the_variable() {
        for (pairs, var) in [
            (vec![("REDIS_PARTITIONS", "0")], "REDIS_PARTITIONS"),
            (vec![("REDIS_PARTITIONS", "many")], "REDIS_PARTITIONS"),
            (vec![("REDIS_PARTITIONS", "16385")], "REDIS_PARTITIONS"),
            (
                vec![("REDIS_CLUSTER_NODES", "127.0.0.1")],
                "REDIS_CLUSTER_NODES",
            ),
            (
                vec![
                    ("REDIS_PARTITIONS", "2"),
                    ("REDIS_SESSION_PREFIX", "a{b}:session:"),
                ],
                "REDIS_SESSION_PREFIX",
            ),
            (
                vec![
                    ("REDIS_CLUSTER_NODES", "h:1"),
                    ("REDIS_EVENT_STREAM", "ev{x}"),
                ],
                "REDIS_EVENT_STREAM",
            ),
        ] {
            let e = cfg(&pairs).expect_err("invalid");
            assert_eq!(e.var, var, "{pairs:?}");
        }
    }

    #[test]
    fn bad_values_name_the_variable_and_value() {
        let e = cfg(&[("REDIS_SESSION_TIMEOUT", "soon")]).expect_err("invalid");
        assert_eq!(e.var, "REDIS_SESSION_TIMEOUT");
        assert!(
            e.to_string().contains("REDIS_SESSION_TIMEOUT=\"soon\""),
            "{e}"
        );
        let e = cfg(&[("SESSION_COOKIE_SECURE", "maybe")]).expect_err("invalid");
        assert_eq!(e.var, "SESSION_COOKIE_SECURE");
        let e = cfg(&[("SESSION_COOKIE_SAMESITE", "sideways")]).expect_err("invalid");
        assert_eq!(e.value, "sideways");
        let e = cfg(&[("REDIS_PORT", "99999")]).expect_err("invalid");
        assert_eq!(e.var, "REDIS_PORT");
        let e = cfg(&[("REDIS_SESSION_TIMEOUT", "0")]).expect_err("invalid");
        assert_eq!(e.var, "REDIS_SESSION_TIMEOUT");
    }

    #[test]
    fn passwords_never_show() {
        let ssl = if cfg!(feature = "tls") {
            "true"
        } else {
            "false"
        };
        let scheme = if cfg!(feature = "tls") {
            "rediss"
        } else {
            "redis"
        };
        let c = cfg(&[
            ("REDIS_HOST", "cache.internal"),
            ("REDIS_PORT", "6380"),
            ("REDIS_DB", "2"),
            ("REDIS_PASSWORD", "ZkjBdCsoodbvY6EpXF"),
            ("REDIS_SSL", ssl),
        ])
        .expect("valid");
        assert_eq!(
            c.redis.expose_url(),
            format!("{scheme}://:ZkjBdCsoodbvY6EpXF@cache.internal:6380/2")
        );
        assert!(!format!("{c:?}").contains("ZkjBdCsoodbvY6EpXF"));
        assert_eq!(
            c.redis.redacted(),
            format!("{scheme}://:***@cache.internal:6380/2")
        );
        let e =
            cfg(&[("REDIS_URL", "http://:ZkjBdCsoodbvY6EpXF@localhost/0")]).expect_err("scheme");
        assert!(!e.to_string().contains("ZkjBdCsoodbvY6EpXF"), "{e}");
        let e = cfg(&[("REDIS_URL", "redis//:ZkjBdCsoodbvY6EpXF@local host")]).expect_err("url");
        assert!(!e.to_string().contains("ZkjBdCsoodbvY6EpXF"), "{e}");
    }
}
