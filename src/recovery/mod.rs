//! Recovery: rebuilding Redis from the audit database, reading a session as
//! it was at any moment, and checking that Redis, the snapshots and the event
//! history agree.
//!
//! - [`replay`] re-materializes every live session (status `live`, deadline
//!   in the future) from its snapshot with its remaining TTL, rebuilds the
//!   ledger and both indexes, and lets versions continue from the database.
//!   It is idempotent and safe while app servers run: the `restore` script
//!   never overwrites a session whose Redis `seq` is the same or newer.
//! - [`state_at`] folds `session_events` up to an instant, without touching
//!   Redis (forensics).
//! - [`verify`] compares the three views and names every divergence; events
//!   still on their way from the stream to the database are reported as lag.
//!   [`verify_with`] can also repair what the log determines.
//! - [`Healer`] notices a loss of Redis data and runs the replay by itself.
//!
//! # Layout
//!
//! - `replay`: [`replay`] and its [`ReplaySummary`].
//! - `state_at`: [`state_at`], [`point_in_time`], [`Selection`] and
//!   [`PointInTime`]; reading the audit trail without letting a bad row
//!   stop the reader.
//! - `verify`: [`verify`], [`verify_with`], [`VerifyReport`], [`Divergence`]
//!   and [`Repair`].
//! - `layout`: one session's derived Redis state (key, TTL, ledger, expiry
//!   and user index) read and put right atomically, with `src/lua/repair.lua`;
//!   the one place outside the store that knows the key layout.
//! - `healer`: [`Healer`] and [`HealerTotals`].

mod healer;
pub(crate) mod layout;
mod replay;
mod state_at;
mod verify;

pub use healer::{Healer, HealerTotals};
pub use replay::{PAGE, ReplaySummary, replay};
pub use state_at::{
    PointInTime, PointInTimeReport, Selection, SkippedRow, point_in_time, session_known, state_at,
};
pub use verify::{Divergence, Repair, VerifyOptions, VerifyReport, verify, verify_with};
