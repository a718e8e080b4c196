//! The Redis key layout.
//!
//! With the default configuration (standalone Redis):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `vedfolnir:session:<id>` | string, PX TTL | the session JSON |
//! | `vedfolnir:events` | stream | every event |
//! | `vedfolnir:seq:<id>` | string, PX TTL | the ledger: `<seq>\|<status>\|<user_id>` |
//! | `vedfolnir:expiry` | sorted set | session id → deadline (ms, Redis clock) |
//! | `vedfolnir:user:<user_id>` | sorted set | session id → creation time (µs, Redis clock) |
//! | `vedfolnir:marker` | string | set by the worker; its absence means Redis lost its data |
//! | `vedfolnir:recovering` | string, PX TTL | set while the worker replays after a loss |
//!
//! The session prefix comes from `REDIS_SESSION_PREFIX` and the stream from
//! `REDIS_EVENT_STREAM`. The other keys live in the namespace of the session
//! prefix: the prefix without its trailing `session:` (`vedfolnir:`).
//!
//! The ledger outlives the session key: while the session is live it expires
//! `SESSION_TOMBSTONE_TTL` after the session does, so the expiry reaper still
//! knows the last `seq` and the user when it writes the `expired` event; once
//! the session has ended it is the tombstone that refuses any in-flight write.

use crate::config::Config;
use crate::id::SessionId;

/// Key names for one store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// `REDIS_SESSION_PREFIX`.
    pub session_prefix: String,
    /// Ledger and tombstone prefix, `<ns>seq:`.
    pub ledger_prefix: String,
    /// Per-user index prefix, `<ns>user:`.
    pub user_prefix: String,
    /// `REDIS_EVENT_STREAM`.
    pub stream: String,
    /// Expiry index, `<ns>expiry`.
    pub expiry: String,
    /// Loss-detection marker, `<ns>marker`: set by the worker, gone when
    /// Redis lost its data.
    pub marker: String,
    /// Set while the worker rebuilds Redis after a loss, `<ns>recovering`.
    pub recovering: String,
    /// Namespace of the non-session keys.
    pub namespace: String,
}

impl Keys {
    /// The layout for a configuration.
    pub fn new(config: &Config) -> Self {
        let prefix = &config.session_prefix;
        let namespace = prefix
            .strip_suffix("session:")
            .unwrap_or(prefix.as_str())
            .to_owned();
        Keys {
            session_prefix: prefix.clone(),
            ledger_prefix: format!("{namespace}seq:"),
            user_prefix: format!("{namespace}user:"),
            stream: config.event_stream.clone(),
            expiry: format!("{namespace}expiry"),
            marker: format!("{namespace}marker"),
            recovering: format!("{namespace}recovering"),
            namespace,
        }
    }

    /// `vedfolnir:session:<id>`.
    pub fn session(&self, id: &SessionId) -> String {
        format!("{}{}", self.session_prefix, id)
    }

    /// `vedfolnir:seq:<id>`.
    pub fn ledger(&self, id: &SessionId) -> String {
        format!("{}{}", self.ledger_prefix, id)
    }

    /// `vedfolnir:user:<user_id>`.
    pub fn user(&self, user_id: &str) -> String {
        format!("{}{}", self.user_prefix, user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_matches_the_design() {
        let k = Keys::new(&Config::default());
        let id: SessionId = "a".repeat(64).parse().expect("valid");
        assert_eq!(k.session(&id), format!("vedfolnir:session:{id}"));
        assert_eq!(k.stream, "vedfolnir:events");
        assert_eq!(k.ledger(&id), format!("vedfolnir:seq:{id}"));
        assert_eq!(k.user("1"), "vedfolnir:user:1");
        assert_eq!(k.expiry, "vedfolnir:expiry");
    }
}
