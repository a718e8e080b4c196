//! The store without the audit database (the feature `audit` is off):
//! Redis is the only place a session lives. Nothing is staged while Redis
//! is unreachable (operations answer unavailable), nothing is committed
//! synchronously, and a key missing in Redis is a missing session: there is
//! no database to recover it from.

use crate::error::{Error, Result};
use crate::event::{DestroyReason, Incoming};
use crate::id::SessionId;

use super::SessionStore;

impl SessionStore {
    /// Never: there is no database to stand in for Redis.
    pub(super) fn fallback_enabled(&self) -> bool {
        false
    }

    /// Nothing to remember: no other process stages writes anywhere.
    pub(super) fn note_unavailable(&self) {}

    /// Nothing to catch up on: writes are only ever made in Redis.
    pub(super) async fn catch_up(&self) {}

    /// Nothing is ever staged, so every session is settled.
    pub(super) async fn settle(&self, _id: &SessionId) -> Result<()> {
        Ok(())
    }

    /// No synchronous audit write: the events are in the stream only.
    pub(super) async fn sync(&self, _events: Vec<Incoming>) -> Result<()> {
        Ok(())
    }

    /// A session Redis does not hold is not known anywhere else.
    pub(super) async fn bring_back(&self, _id: &SessionId) -> Result<bool> {
        Ok(false)
    }

    /// Logout everywhere ends what Redis holds; there is nothing else.
    pub(super) async fn end_sessions_known_to_audit(
        &self,
        _user_id: &str,
        _reason: DestroyReason,
        ended: Vec<SessionId>,
        _redis_down: Option<Error>,
    ) -> Result<Vec<SessionId>> {
        Ok(ended)
    }
}
