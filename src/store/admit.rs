//! The one rule by which stored state becomes a session someone is served.
//!
//! Redis keeps a session key only while the session lives: every end deletes
//! it and leaves a tombstone in the same script. Every *other* place where
//! stored state turns into a session goes through this rule — a read from
//! the audit database while Redis is recovering or unreachable, the healer's
//! replay, the base of a projection of staged events — and its Redis half,
//! the `restore` operation of `src/lua/session.lua`:
//!
//! 1. the state is `live` (no `destroyed` or `expired` folded into it);
//! 2. its deadline is in the future;
//! 3. nothing newer is known: the event table holds no event after the
//!    snapshot (a gap, or a write still committing), and Redis holds no
//!    ledger that has ended or moved past it (checked by `restore`, which
//!    refuses and reports `ended` or `newer`).
//!
//! Ending is absorbing: once any of these says the session ended, no read and
//! no write anywhere brings it back.

use chrono::{DateTime, Utc};

use crate::audit::outbox::View;
use crate::session::{Record, Status};

/// The session a database view may be served as, under the rule above
/// (Redis's half is checked by `restore`).
pub(crate) fn admit(view: &View, now: DateTime<Utc>) -> Option<Record> {
    let refused = if view.session.status() != Status::Live {
        "it has ended"
    } else if view.deadline.is_none_or(|d| d <= now) {
        "its deadline has passed"
    } else if view.behind_the_log() {
        "the event table holds events its snapshot has not folded"
    } else {
        return Some(view.session.clone());
    };
    tracing::debug!(
        seq = view.session.version(),
        snapshot_seq = view.snapshot_seq(),
        newest_logged = view.newest_logged,
        staged = view.staged.len(),
        "not serving a stored state: {refused}"
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::entity::session_snapshots::{Model, SnapshotStatus};

    fn view(status: SnapshotStatus, deadline_in: i64, newest_logged: u64) -> View {
        let now = Utc::now();
        let state = r#"{"user_id":1,"_version":3}"#;
        let session = Record::from_json(state)
            .expect("json")
            .with_status(crate::audit::sink::status_of(status));
        View {
            deadline: (status == SnapshotStatus::Live)
                .then(|| now + chrono::Duration::seconds(deadline_in)),
            session,
            snapshot: Some(Model {
                session_id: "ab".repeat(32),
                user_id: Some("1".to_owned()),
                state: state.to_owned(),
                seq: 3,
                status,
                expires_at: None,
                updated_at: now,
            }),
            newest_logged,
            staged: Vec::new(),
        }
    }

    #[test]
    fn only_a_live_current_unexpired_state_is_served() {
        let now = Utc::now();
        assert!(admit(&view(SnapshotStatus::Live, 60, 3), now).is_some());
        // Ended, in any way.
        assert!(admit(&view(SnapshotStatus::Destroyed, 60, 3), now).is_none());
        assert!(admit(&view(SnapshotStatus::Expired, 60, 3), now).is_none());
        // Past its deadline, not yet expired by the reaper.
        assert!(admit(&view(SnapshotStatus::Live, -1, 3), now).is_none());
        // The log holds an event the snapshot has not folded (it may be the end).
        assert!(admit(&view(SnapshotStatus::Live, 60, 4), now).is_none());
    }
}
