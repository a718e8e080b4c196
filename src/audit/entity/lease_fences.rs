//! `lease_fences`: the fencing token of each `(stream, role)`.
//!
//! A worker that takes a partition's lease bumps the token here and keeps
//! the value; each of its transactions checks it is still current before it
//! commits, so a worker that lost its lease cannot commit (see
//! [`crate::lease::Fence`]). Tokens only grow, whatever happens to Redis.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// The current token of one stream and role.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "lease_fences")]
pub struct Model {
    /// The partition's stream key.
    #[sea_orm(primary_key, auto_increment = false)]
    pub stream: String,
    /// The worker role (`audit`).
    #[sea_orm(primary_key, auto_increment = false)]
    pub role: String,
    /// The token of the worker that took the lease last; only grows.
    pub token: i64,
    /// That worker's name, for operators.
    pub holder: Option<String>,
    /// When the token was last bumped.
    pub updated_at: DateTimeUtc,
}

/// `lease_fences` has no foreign keys.
#[derive(Clone, Copy, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
