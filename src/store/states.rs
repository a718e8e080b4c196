//! What a store remembers of the sessions it wrote: the base of a write that
//! is given no state.
//!
//! `update`, `touch`, `modify`, `increment` and `switch_platform` take a
//! session id and no state. Read first, each costs two round trips, a `GET`
//! and the script. A store that wrote the session with such a call a moment
//! ago already knows its state: the one it stored. It keeps that state for
//! up to `SESSION_STATE_CACHE` sessions (bounded, evicting the least useful
//! first) and folds the next such write on it, so it writes at once.
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

use quick_cache::sync::Cache;

use crate::id::SessionId;
use crate::session::Record;

/// The state this store's last write given no state left, for a bounded
/// number of sessions. A state is taken out when a write folds on it, and
/// the write puts back the state it leaves: two concurrent writes of one
/// session in one process never fold on the same remembered state (the
/// second reads), and a remembered state is never decoded, only moved.
pub(super) struct States(Option<Cache<SessionId, Record>>);

impl States {
    /// Remembers up to `capacity` sessions (none when 0).
    pub(super) fn new(capacity: usize) -> Self {
        States((capacity > 0).then(|| Cache::new(capacity)))
    }

    /// Whether it remembers anything at all.
    pub(super) fn on(&self) -> bool {
        self.0.is_some()
    }

    /// `state` is the session as this store just wrote it.
    pub(super) fn remember(&self, id: &SessionId, state: Record) {
        if let Some(c) = &self.0 {
            c.insert(id.clone(), state);
        }
    }

    /// The session ended, or its state here is not worth keeping.
    pub(super) fn forget(&self, id: &SessionId) {
        if let Some(c) = &self.0 {
            c.remove(id);
        }
    }

    /// Takes the session's state as this store last wrote it, if it
    /// remembers it.
    pub(super) fn take(&self, id: &SessionId) -> Option<Record> {
        self.0.as_ref()?.remove(id).map(|(_, s)| s)
    }
}

impl std::fmt::Debug for States {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("States")
            .field("capacity", &self.0.as_ref().map_or(0, |c| c.capacity()))
            .field("held", &self.0.as_ref().map_or(0, |c| c.len()))
            .finish()
    }
}
