//! What a store remembers of the sessions it wrote: the base of a write that
//! is given no state.
//!
//! `update`, `touch`, `modify`, `increment` and `switch_platform` take a
//! session id and no state. Read first, each costs two round trips, a `GET`
//! and the script. A store that wrote the session a moment ago already knows
//! its state: the JSON it stored. It keeps that JSON for the last
//! `SESSION_STATE_CACHE` sessions it created or wrote (bounded, evicting the
//! least useful first) and folds such a write on it, so it writes at once.
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

use std::sync::Arc;

use quick_cache::sync::Cache;

use crate::id::SessionId;
use crate::session::Record;

/// The last state this store wrote of each of a bounded number of sessions.
pub(super) struct States(Option<Cache<SessionId, Arc<str>>>);

impl States {
    /// Remembers up to `capacity` sessions (none when 0).
    pub(super) fn new(capacity: usize) -> Self {
        States((capacity > 0).then(|| Cache::new(capacity)))
    }

    /// `json` is the session's state as this store just wrote or read it.
    pub(super) fn remember(&self, id: &SessionId, json: String) {
        if let Some(c) = &self.0 {
            c.insert(id.clone(), Arc::from(json));
        }
    }

    /// The session ended, or its state here is not worth keeping.
    pub(super) fn forget(&self, id: &SessionId) {
        if let Some(c) = &self.0 {
            c.remove(id);
        }
    }

    /// The session's state as this store last wrote it, if it remembers it.
    pub(super) fn recall(&self, id: &SessionId) -> Option<Record> {
        let c = self.0.as_ref()?;
        let json = c.get(id)?;
        match Record::from_json(&json) {
            Ok(s) => Some(s),
            Err(_) => {
                c.remove(id);
                None
            }
        }
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
