//! Sessions carried over from another store, under ids the caller derives.
//!
//! `vedfolnir-sessions import-legacy` turns each session of the Vedfolnir
//! application's previous store into an event-sourced one whose token is the
//! cookie value browsers already hold. [`SessionStore::import`] writes it:
//! one `created` event marked with its [`Import`], through the same script
//! as every other creation, with the remaining lifetime it had there.

use std::time::Duration;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::SessionStore;
use super::script::{self, Operation as _, Reply};
use crate::error::{Error, Result};
use crate::event::{Event, EventKind, Import, Incoming, SCHEMA_VERSION};
use crate::id::Token;
use crate::session::{RESERVED_KEYS, Record, user_id_of};
use crate::time::Timestamp;

/// What [`SessionStore::import`] did.
#[derive(Debug, Clone)]
pub enum Imported {
    /// The session was created, as stored.
    Created(Record),
    /// The id is taken: the session was imported before (it may have been
    /// used, or have ended, since). Nothing was written.
    Exists,
}

impl SessionStore {
    /// Creates the session `token` stands for, with these fields and `ttl`
    /// to live, as one `created` event carrying `import`. Keys the store
    /// maintains are refused, as in [`SessionStore::create`]. The per-user
    /// limit does not evict anyone for an import. Idempotent: an id that
    /// exists, live or ended (while its tombstone lasts), is
    /// [`Imported::Exists`] and nothing is written.
    #[tracing::instrument(skip_all, fields(session_id), err)]
    pub async fn import(
        &self,
        token: &Token,
        fields: Map<String, Value>,
        ttl: Duration,
        import: Import,
    ) -> Result<Imported> {
        if let Some(k) = fields.keys().find(|k| RESERVED_KEYS.contains(&k.as_str())) {
            return Err(Error::InvalidInput(format!(
                "`{k}` is maintained by the store"
            )));
        }
        crate::session::check_fields(&fields)?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let id = token.session_id();
        tracing::Span::current().record("session_id", tracing::field::display(&id));
        let user = user_id_of(&fields);
        let event = Event {
            event_id: Uuid::now_v7(),
            session_id: id.clone(),
            seq: 1,
            occurred_at: Timestamp::now(),
            user_id: user.clone(),
            schema: SCHEMA_VERSION,
            kind: EventKind::Created {
                fields,
                imported: Some(import),
                rotated_from: None,
            },
            traceparent: crate::telemetry::current_traceparent(),
        };
        let session = Record::default().apply(&event);
        let json = session.to_json();
        if json.len() > self.config.max_bytes {
            return Err(Error::TooLarge {
                size: json.len(),
                max: self.config.max_bytes,
            });
        }
        let part = self.keys.for_session(&id);
        let inv = script::Create {
            id: &id,
            json: &json,
            ttl_ms,
            tomb_ms: self.config.tombstone_ttl.as_millis() as u64,
            user: user.as_deref().unwrap_or(""),
            // No eviction: an import never ends another session.
            max_per_user: 0,
            event_id: event.event_id,
            payload: &event.kind.payload_json(),
            stamp: script::Stamp {
                occurred_at: event.occurred_at,
                schema: SCHEMA_VERSION,
                traceparent: event.traceparent.as_deref(),
            },
            spare_ids: &[],
        }
        .invocation(part, self.shape());
        match script::run_retrying(&inv, &mut self.conn.clone()).await? {
            (Reply::Ok(xid, _), _) => {
                self.replicate(part).await?;
                self.sync(vec![Incoming {
                    stream_id: Some(xid),
                    event,
                }])
                .await?;
                Ok(Imported::Created(session))
            }
            // A retried attempt whose first try went through.
            (Reply::Exists, true) if self.holds(&id, &json).await => Ok(Imported::Created(session)),
            (Reply::Exists, _) => Ok(Imported::Exists),
            (other, _) => Err(Error::Corrupt(format!(
                "import: unexpected reply {other:?}"
            ))),
        }
    }
}
