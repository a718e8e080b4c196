//! What a store remembers of the sessions it wrote: the base of a write that
//! is given no state.
//!
//! `update`, `touch`, `modify`, `increment` and `switch_platform` take a
//! session id and no state. Read first, each costs two round trips, a `GET`
//! and the script. A store that wrote the session with such a call a moment
//! ago already knows its state: the one it stored. It keeps such states
//! within `SESSION_STATE_CACHE_BYTES` of memory (estimated per session from
//! its fields, evicting the least useful first) and folds the next such
//! write on it, so it writes at once.
//! Writes on a state the caller holds (`update_from`, the web layer) need
//! none of it and leave nothing.
//!
//! Nothing rests on the remembered state being current. The script checks
//! the version, the tombstone and the key, exactly as for a state a web
//! request holds (`update_from`):
//! - a state another writer moved on is a conflict, and the script's answer
//!   is the current state, which the change is folded on again: one round
//!   trip more, the price of the read it saved;
//! - an ended or missing session, a change the remembered state refuses (a
//!   precondition, an `increment` of something else), or a database that
//!   moved on in fallback is not taken as the answer: the write reads the
//!   session and starts again, as it would have without the state.
//!
//! Reads never use it: a load is always one `GET`. Nothing of it outlives
//! the process, and a store keeps it per process, not per partition.

use quick_cache::Weighter;
use quick_cache::sync::Cache;
use serde_json::Value;

use crate::id::SessionId;
use crate::session::Record;

/// A remembered state and the memory it is estimated to take.
#[derive(Clone)]
struct Held {
    bytes: u64,
    state: Record,
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<SessionId, Held> for ByBytes {
    fn weight(&self, _: &SessionId, held: &Held) -> u64 {
        held.bytes
    }
}

/// About what a decoded session takes in memory: per field its key, a
/// value and the map's share, plus what strings and nested values hold,
/// plus the id it is filed under.
fn estimated_bytes(state: &Record) -> u64 {
    fn value(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.len() as u64,
            Value::Array(a) => a.iter().map(|v| 32 + value(v)).sum(),
            Value::Object(m) => m.iter().map(|(k, v)| 72 + k.len() as u64 + value(v)).sum(),
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        }
    }
    let fields: u64 = state
        .data()
        .iter()
        .map(|(k, v)| 72 + k.len() as u64 + value(v))
        .sum();
    160 + fields
}

/// The state this store's last write given no state left, for as many
/// sessions as fit in a memory budget. A state is taken out when a write
/// folds on it, and the write puts back the state it leaves: two concurrent
/// writes of one session in one process never fold on the same remembered
/// state (the second reads), and a remembered state is never decoded, only
/// moved.
pub(super) struct States(Option<(Cache<SessionId, Held, ByBytes>, u64)>);

impl States {
    /// Remembers states within `bytes` of estimated memory (none when 0).
    pub(super) fn new(bytes: usize) -> Self {
        States((bytes > 0).then(|| {
            // Sessions of about 2 KiB decoded, for the table's first size.
            let items = (bytes / 2048).max(16);
            let c = Cache::with_weighter(items, bytes as u64, ByBytes);
            // The most one session may weigh: the share of one shard.
            let most = c.shard_capacity();
            (c, most)
        }))
    }

    /// `state` is the session as this store just wrote it: a copy is kept,
    /// unless it is larger than a shard of the budget (or there is none).
    pub(super) fn remember(&self, id: &SessionId, state: &Record) {
        if let Some((c, most)) = &self.0 {
            let bytes = estimated_bytes(state);
            if bytes <= *most {
                let state = state.clone();
                c.insert(id.clone(), Held { bytes, state });
            } else {
                c.remove(id);
            }
        }
    }

    /// The session ended, or its state here is not worth keeping.
    pub(super) fn forget(&self, id: &SessionId) {
        if let Some((c, _)) = &self.0 {
            c.remove(id);
        }
    }

    /// Takes the session's state as this store last wrote it, if it
    /// remembers it.
    pub(super) fn take(&self, id: &SessionId) -> Option<Record> {
        self.0.as_ref()?.0.remove(id).map(|(_, h)| h.state)
    }
}

impl std::fmt::Debug for States {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("States")
            .field(
                "budget_bytes",
                &self.0.as_ref().map_or(0, |c| c.0.capacity()),
            )
            .field("bytes", &self.0.as_ref().map_or(0, |c| c.0.weight()))
            .field("held", &self.0.as_ref().map_or(0, |c| c.0.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn id(n: u64) -> SessionId {
        format!("{n:064x}").parse().expect("64 hex characters")
    }

    fn session(filler: usize) -> Record {
        let mut data = serde_json::Map::new();
        data.insert("user_id".to_owned(), json!(42));
        data.insert("blob".to_owned(), json!("x".repeat(filler)));
        Record::from_parts(data, 3)
    }

    #[test]
    fn the_budget_bounds_the_memory_not_the_count() {
        let states = States::new(64 * 1024);
        // 1,000 sessions of about 1.3 KiB: far more than fit.
        for n in 0..1000 {
            states.remember(&id(n), &session(1000));
        }
        let (c, _) = states.0.as_ref().expect("on");
        assert!(c.weight() <= 64 * 1024, "{} bytes held", c.weight());
        assert!(c.len() < 64, "{} sessions held", c.len());
        assert!(c.len() >= 16, "it keeps what fits: {}", c.len());
        // One larger than the budget allows a session is not kept.
        states.remember(&id(5000), &session(100_000));
        assert!(states.take(&id(5000)).is_none());
        // A state taken is gone until it is put back.
        let kept = (0..1000)
            .map(id)
            .find(|i| c.get(i).is_some())
            .expect("one kept");
        let s = states.take(&kept).expect("taken");
        assert_eq!(s.version(), 3);
        assert!(states.take(&kept).is_none(), "taken once");
    }

    #[test]
    fn none_is_kept_without_a_budget() {
        let states = States::new(0);
        states.remember(&id(1), &session(10));
        assert!(states.0.is_none());
        assert!(states.take(&id(1)).is_none());
    }
}
