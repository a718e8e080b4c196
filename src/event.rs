//! Session events: the log's vocabulary and its stream codec.
//!
//! Every mutation of a session is one [`Event`]. Its envelope carries the
//! idempotency key (`event_id`, a UUIDv7), the per-session `seq` that orders
//! it, the writer's clock (`occurred_at`, informational only), the user, the
//! event `schema` version and the W3C `traceparent` of the request that caused
//! it. [`EventKind`] is the payload, one variant per event type of the design.
//!
//! On the stream an event is a flat list of fields (`event_id`, `session_id`,
//! `seq`, `type`, `occurred_at`, `user_id`, `schema`, `payload`,
//! `traceparent`, `source`), see [`Event::to_fields`] and
//! [`Event::from_fields`]. `user_id`, `traceparent` and `source` are
//! optional: left out when empty (an anonymous session, no trace, a write
//! that went straight to Redis).
//! Decoding upcasts older schema versions ([`upcast`]) and refuses newer ones
//! with [`DecodeError::UnsupportedSchema`], so a reader never folds what it
//! cannot understand.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::id::SessionId;
use crate::time::Timestamp;

/// The event schema version this build writes.
pub const SCHEMA_VERSION: u32 = 1;

/// One session mutation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Idempotency key, a UUIDv7.
    pub event_id: Uuid,
    /// The session, `hex(SHA-256(token))`.
    pub session_id: SessionId,
    /// Position in the session's history, from 1, contiguous.
    pub seq: u64,
    /// The writer's clock when the event was made.
    pub occurred_at: Timestamp,
    /// The session's user after the event, `None` when anonymous.
    pub user_id: Option<String>,
    /// Schema version the event was written with.
    pub schema: u32,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
    /// W3C trace context of the request that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The event types and their payloads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", rename_all = "snake_case")]
pub enum EventKind {
    /// A new session with its initial fields.
    Created {
        /// The application's initial fields (flat, like a Flask session dict).
        fields: Map<String, Value>,
        /// Where the session was imported from, when it was carried over
        /// from another session store (`vedfolnir-sessions import-legacy`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        imported: Option<Import>,
        /// The session this one replaced, when made by rotation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rotated_from: Option<SessionId>,
    },
    /// Keys set and keys removed.
    Updated {
        /// Keys to set, with their new values.
        #[serde(default)]
        set: Map<String, Value>,
        /// Keys to remove.
        #[serde(default)]
        unset: Vec<String>,
    },
    /// Sliding expiry: the session was used.
    Touched {
        /// When it was used.
        last_activity: Timestamp,
    },
    /// The session moved to another platform connection.
    PlatformSwitched(Platform),
    /// The session was ended on purpose.
    Destroyed {
        /// Why.
        reason: DestroyReason,
    },
    /// The session reached its idle deadline.
    Expired {
        /// The deadline it passed.
        deadline: Timestamp,
    },
}

impl EventKind {
    /// The `type` field's value.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::Created { .. } => "created",
            EventKind::Updated { .. } => "updated",
            EventKind::Touched { .. } => "touched",
            EventKind::PlatformSwitched(_) => "platform_switched",
            EventKind::Destroyed { .. } => "destroyed",
            EventKind::Expired { .. } => "expired",
        }
    }

    /// Whether folding this event can change the session's `user_id`.
    pub fn may_change_user(&self) -> bool {
        match self {
            EventKind::Created { .. } => true,
            EventKind::Updated { set, unset } => {
                set.contains_key("user_id") || unset.iter().any(|k| k == "user_id")
            }
            _ => false,
        }
    }

    /// The payload object as JSON text.
    pub fn payload_json(&self) -> String {
        // `created` and `updated` (every write's event, with the session's
        // fields) declare their fields in sorted order, and `touched`,
        // `destroyed` and `expired` have one, so their payload is the text
        // after the tag in the adjacently tagged form,
        // `{"type":"<name>","payload":<payload>}`: the same text as through a
        // `Value` (which sorts keys), without copying the fields into one.
        if !matches!(self, EventKind::PlatformSwitched(_))
            && let Ok(mut text) = serde_json::to_string(self)
            && let Some(payload) = text
                .strip_prefix(r#"{"type":""#)
                .and_then(|t| t.strip_prefix(self.type_name()))
                .and_then(|t| t.strip_prefix(r#"","payload":"#))
                .filter(|p| p.len() > 1 && p.ends_with('}'))
        {
            let start = text.len() - payload.len();
            text.truncate(text.len() - 1);
            text.drain(..start);
            return text;
        }
        // Serializing maps, strings and numbers into a String cannot fail.
        match serde_json::to_value(self) {
            Ok(Value::Object(mut o)) => o
                .remove("payload")
                .unwrap_or_else(|| Value::Object(Map::new()))
                .to_string(),
            _ => "{}".to_owned(),
        }
    }

    /// Rebuilds the kind from its type name and payload object.
    pub fn from_parts(type_name: &str, payload: Value) -> Result<Self, serde_json::Error> {
        let mut o = Map::with_capacity(2);
        o.insert("type".to_owned(), Value::String(type_name.to_owned()));
        o.insert("payload".to_owned(), payload);
        serde_json::from_value(Value::Object(o))
    }
}

/// The mark of an imported session on its `created` event: the session was
/// not made here but carried over from another store, keeping its cookie.
/// Fields are declared in sorted order (see [`EventKind::payload_json`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    /// The session's `created_at` in the store it came from, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// The format it was read from: `legacy` for the Vedfolnir application's
    /// `vedfolnir:session:<uuid>` keys.
    pub format: String,
}

/// The four platform fields of the seed application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// The platform connection's database id.
    pub platform_connection_id: i64,
    /// Display name.
    pub platform_name: String,
    /// Kind of platform (`mastodon`, `pixelfed`, …).
    pub platform_type: String,
    /// Base URL of the instance.
    pub platform_instance_url: String,
}

/// Why a session was destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestroyReason {
    /// The user logged out.
    Logout,
    /// Replaced by a new id (login, privilege change).
    Rotated,
    /// The user logged out everywhere.
    LogoutAll,
    /// The user's oldest session, dropped for `SESSION_MAX_PER_USER`.
    Evicted,
    /// The request did not match the session's fingerprint.
    Fingerprint,
    /// An operator ended it.
    Admin,
}

impl DestroyReason {
    /// The reason as written in the payload.
    pub fn as_str(&self) -> &'static str {
        match self {
            DestroyReason::Logout => "logout",
            DestroyReason::Rotated => "rotated",
            DestroyReason::LogoutAll => "logout_all",
            DestroyReason::Evicted => "evicted",
            DestroyReason::Fingerprint => "fingerprint",
            DestroyReason::Admin => "admin",
        }
    }
}

/// One event on its way into the audit database, with the id of the stream
/// entry that carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The stream entry id; `None` for events written in fallback mode.
    pub stream_id: Option<String>,
    /// The decoded event.
    pub event: Event,
}

/// A stream entry that cannot be turned into an [`Event`]. The audit worker
/// records the reason with the raw entry in its dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field is present but its value is not valid.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The event was written by a newer version of the product.
    #[error("event schema {found} is newer than the supported {supported}; upgrade this reader")]
    UnsupportedSchema {
        /// The entry's schema.
        found: u32,
        /// The newest schema this build reads.
        supported: u32,
    },
}

/// Brings a payload written with an older schema up to [`SCHEMA_VERSION`].
///
/// Each schema change adds one step here (`1 => 2`, `2 => 3`, …) so that any
/// event ever written still folds. Schema 1 is the first; there is nothing to
/// upcast yet.
pub fn upcast(schema: u32, _type_name: &str, payload: Value) -> Result<Value, DecodeError> {
    match schema {
        0 => Err(DecodeError::InvalidField {
            field: "schema",
            reason: "schema versions start at 1".to_owned(),
        }),
        SCHEMA_VERSION => Ok(payload),
        found => Err(DecodeError::UnsupportedSchema {
            found,
            supported: SCHEMA_VERSION,
        }),
    }
}

impl Event {
    /// The stream entry's fields, in the order the design lists them.
    /// `user_id` and `traceparent` are left out when there are none.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("event_id", self.event_id.to_string()),
            ("session_id", self.session_id.to_string()),
            ("seq", self.seq.to_string()),
            ("type", self.kind.type_name().to_owned()),
            ("occurred_at", self.occurred_at.to_string()),
        ];
        if let Some(u) = &self.user_id {
            f.push(("user_id", u.clone()));
        }
        f.push(("schema", self.schema.to_string()));
        f.push(("payload", self.kind.payload_json()));
        if let Some(tp) = &self.traceparent {
            f.push(("traceparent", tp.clone()));
        }
        f
    }

    /// Decodes a stream entry. Unknown extra fields are ignored; a missing or
    /// invalid field, or a schema newer than this build, is an error.
    pub fn from_fields(fields: &HashMap<String, String>) -> Result<Self, DecodeError> {
        fn get<'a>(
            f: &'a HashMap<String, String>,
            name: &'static str,
        ) -> Result<&'a str, DecodeError> {
            f.get(name)
                .map(String::as_str)
                .ok_or(DecodeError::MissingField(name))
        }
        fn invalid(field: &'static str, reason: impl ToString) -> DecodeError {
            DecodeError::InvalidField {
                field,
                reason: reason.to_string(),
            }
        }
        let event_id = get(fields, "event_id")?
            .parse::<Uuid>()
            .map_err(|e| invalid("event_id", e))?;
        let session_id = get(fields, "session_id")?
            .parse::<SessionId>()
            .map_err(|e| invalid("session_id", e))?;
        let seq = get(fields, "seq")?
            .parse::<u64>()
            .map_err(|e| invalid("seq", e))?;
        if seq == 0 {
            return Err(invalid("seq", "sequence numbers start at 1"));
        }
        // The audit database stores `seq` as a signed 64-bit integer: a
        // larger one would come back negative, so it is refused here, where
        // the entry becomes a dead letter with this reason.
        if i64::try_from(seq).is_err() {
            return Err(invalid(
                "seq",
                format!(
                    "{seq} is above the largest storable sequence number ({})",
                    i64::MAX
                ),
            ));
        }
        let type_name = get(fields, "type")?;
        let occurred_at = get(fields, "occurred_at")?
            .parse::<Timestamp>()
            .map_err(|e| invalid("occurred_at", e))?;
        let user_id = fields.get("user_id").filter(|u| !u.is_empty()).cloned();
        let schema = get(fields, "schema")?
            .parse::<u32>()
            .map_err(|e| invalid("schema", e))?;
        let payload: Value =
            serde_json::from_str(get(fields, "payload")?).map_err(|e| invalid("payload", e))?;
        if !payload.is_object() {
            return Err(invalid("payload", "not a JSON object"));
        }
        let payload = upcast(schema, type_name, payload)?;
        let kind = EventKind::from_parts(type_name, payload).map_err(|e| {
            if matches!(
                type_name,
                "created" | "updated" | "touched" | "platform_switched" | "destroyed" | "expired"
            ) {
                invalid("payload", e)
            } else {
                invalid("type", format!("unknown event type {type_name:?}"))
            }
        })?;
        let traceparent = fields.get("traceparent").filter(|t| !t.is_empty()).cloned();
        Ok(Event {
            event_id,
            session_id,
            seq,
            occurred_at,
            user_id,
            schema: SCHEMA_VERSION,
            kind,
            traceparent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid() -> SessionId {
        "ab".repeat(32).parse().expect("valid id")
    }

    fn fields_of(e: &Event) -> HashMap<String, String> {
        e.to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    fn sample() -> Event {
        Event {
            event_id: Uuid::now_v7(),
            session_id: sid(),
            seq: 3,
            occurred_at: Timestamp::now(),
            user_id: Some("1".to_owned()),
            schema: SCHEMA_VERSION,
            kind: EventKind::Destroyed {
                reason: DestroyReason::LogoutAll,
            },
            traceparent: None,
        }
    }

    #[test]
    fn payload_text_is_the_sorted_payload_object() {
        let fields: Map<String, Value> = serde_json::from_str(
            r#"{"zeta":{"b":[1,2.5,"x"],"a":null},"alpha":"é \"quoted\" }","user_id":7}"#,
        )
        .expect("fields");
        let kinds = [
            EventKind::Created {
                fields: fields.clone(),
                imported: None,
                rotated_from: None,
            },
            EventKind::Created {
                fields: fields.clone(),
                imported: None,
                rotated_from: Some(sid()),
            },
            EventKind::Created {
                fields: Map::new(),
                imported: Some(Import {
                    created_at: Some("2025-08-20T16:38:25.802836+00:00".to_owned()),
                    format: "legacy".to_owned(),
                }),
                rotated_from: None,
            },
            EventKind::Updated {
                set: fields,
                unset: vec!["old".to_owned()],
            },
            EventKind::Updated {
                set: Map::new(),
                unset: Vec::new(),
            },
            EventKind::Touched {
                last_activity: Timestamp::now(),
            },
            EventKind::Destroyed {
                reason: DestroyReason::LogoutAll,
            },
            EventKind::Expired {
                deadline: Timestamp::now(),
            },
            EventKind::PlatformSwitched(Platform {
                platform_connection_id: 7,
                platform_name: "n".to_owned(),
                platform_type: "mastodon".to_owned(),
                platform_instance_url: "https://example.social".to_owned(),
            }),
        ];
        for kind in kinds {
            let Ok(Value::Object(mut whole)) = serde_json::to_value(&kind) else {
                panic!("{kind:?} is an object");
            };
            let expected = whole.remove("payload").expect("payload").to_string();
            assert_eq!(kind.payload_json(), expected, "{kind:?}");
        }
    }

    #[test]
    fn only_a_creation_or_a_change_of_user_id_changes_the_user() {
        let mut set = Map::new();
        set.insert("cart".to_owned(), Value::from(1));
        let other = EventKind::Updated {
            set: set.clone(),
            unset: vec!["theme".to_owned()],
        };
        assert!(!other.may_change_user());
        set.insert("user_id".to_owned(), Value::from(7));
        assert!(EventKind::Updated { set, unset: vec![] }.may_change_user());
        assert!(
            EventKind::Updated {
                set: Map::new(),
                unset: vec!["user_id".to_owned()],
            }
            .may_change_user()
        );
        assert!(
            !EventKind::Touched {
                last_activity: Timestamp::now()
            }
            .may_change_user()
        );
    }

    #[test]
    fn fields_follow_the_design() {
        let e = sample();
        let names: Vec<_> = e.to_fields().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [
                "event_id",
                "session_id",
                "seq",
                "type",
                "occurred_at",
                "user_id",
                "schema",
                "payload"
            ]
        );
        let f = fields_of(&e);
        assert_eq!(f["type"], "destroyed");
        assert_eq!(f["payload"], r#"{"reason":"logout_all"}"#);
        // An anonymous session's events carry no `user_id` field, and decode
        // back without a user.
        let anonymous = Event { user_id: None, ..e };
        let f = fields_of(&anonymous);
        assert!(!f.contains_key("user_id"), "{f:?}");
        assert_eq!(Event::from_fields(&f).expect("decodes"), anonymous);
    }

    #[test]
    fn newer_schema_is_refused_with_a_reason() {
        let mut f = fields_of(&sample());
        f.insert("schema".to_owned(), "99".to_owned());
        assert_eq!(
            Event::from_fields(&f),
            Err(DecodeError::UnsupportedSchema {
                found: 99,
                supported: SCHEMA_VERSION
            })
        );
    }

    #[test]
    fn malformed_entries_name_the_field() {
        let good = fields_of(&sample());
        let mut f = good.clone();
        f.remove("seq");
        assert_eq!(
            Event::from_fields(&f),
            Err(DecodeError::MissingField("seq"))
        );
        let mut f = good.clone();
        f.insert("type".to_owned(), "teleported".to_owned());
        assert!(matches!(
            Event::from_fields(&f),
            Err(DecodeError::InvalidField { field: "type", .. })
        ));
        let mut f = good.clone();
        f.insert("payload".to_owned(), "{not json".to_owned());
        assert!(matches!(
            Event::from_fields(&f),
            Err(DecodeError::InvalidField {
                field: "payload",
                ..
            })
        ));
        let mut f = good.clone();
        f.insert("seq".to_owned(), (i64::MAX as u64 + 1).to_string());
        assert!(matches!(
            Event::from_fields(&f),
            Err(DecodeError::InvalidField { field: "seq", .. })
        ));
        f.insert("seq".to_owned(), i64::MAX.to_string());
        assert_eq!(Event::from_fields(&f).map(|e| e.seq), Ok(i64::MAX as u64));
        let mut f = good;
        f.insert("payload".to_owned(), r#"{"reason":"bored"}"#.to_owned());
        assert!(matches!(
            Event::from_fields(&f),
            Err(DecodeError::InvalidField {
                field: "payload",
                ..
            })
        ));
    }
}
