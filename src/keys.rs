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
//! | `vedfolnir:epoch` | string | the id of this Redis data set; the audit database records the epoch it knows complete (see `docs/recovery.md`) |
//! | `vedfolnir:recovered` | string | the epoch the audit database recorded complete, copied beside it: a data set that holds its own epoch here is complete, with no database read |
//! | `vedfolnir:seq:~<event_id>` | string, PX TTL | an event staged while Redis was unreachable has been applied (projection runs at most once) |
//!
//! The session prefix comes from `REDIS_SESSION_PREFIX` and the stream from
//! `REDIS_EVENT_STREAM`. The other keys live in the namespace of the session
//! prefix: the prefix without its trailing `session:` (`vedfolnir:`).
//!
//! The ledger outlives the session key: while the session is live it expires
//! `SESSION_TOMBSTONE_TTL` after the session does, so the expiry reaper still
//! knows the last `seq` and the user when it writes the `expired` event; once
//! the session has ended it is the tombstone that refuses any in-flight write.
//!
//! ## Partitions
//!
//! With `REDIS_PARTITIONS` above 1, or on a Redis Cluster
//! (`REDIS_CLUSTER_NODES`), the sessions are spread over partitions and every
//! key carries its partition's hash tag `{<p>}`: each prefix gets `{<p>}:`
//! appended and each single key `:{<p>}`. Partition 3 of the default layout:
//!
//! | key | |
//! |---|---|
//! | `vedfolnir:session:{3}:<id>` | session JSON |
//! | `vedfolnir:events:{3}` | the partition's stream |
//! | `vedfolnir:seq:{3}:<id>` | ledger |
//! | `vedfolnir:expiry:{3}` | expiry index |
//! | `vedfolnir:user:{3}:<user_id>` | the user's sessions in this partition |
//! | `vedfolnir:epoch:{3}` | the partition's epoch |
//! | `vedfolnir:recovered:{3}` | the partition's epoch known complete |
//!
//! So a session, its ledger, its partition's stream and the indexes one
//! script call touches share one slot. A session's partition is the first 32
//! bits of its id (hex of SHA-256 of the token) modulo the partition count,
//! and a rotation picks a new token in the same partition. See
//! `docs/cluster.md`.

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
    /// The epoch of this partition's data set, `<ns>epoch`: a random id set
    /// once beside the data. Gone or changed means Redis lost the data the
    /// audit database knows (see `audit::partition`, feature `audit`).
    pub epoch: String,
    /// The epoch the audit database recorded complete, `<ns>recovered`,
    /// written beside the data set once it did: equal to `epoch`, it tells
    /// a process that Redis holds a complete data set without a database
    /// read (lost with the data, like the epoch; epochs are never reused,
    /// so a copy that lands in a later data set matches nothing).
    pub recovered: String,
    /// Held while a process replays this partition after a loss,
    /// `<ns>healing`.
    pub healing: String,
    /// The worker lease on this partition, `<ns>lease` (same slot as its
    /// stream).
    pub lease: String,
    /// The marks of outages whose staged writes no projection has read
    /// since, `<ns>outage` (a set): each added by a process that reaches
    /// Redis again after it found it unreachable, removed by the next
    /// projection.
    pub outage: String,
    /// The sessions whose writes staged during an outage a projection left
    /// waiting, `<ns>staged` (a set of session ids).
    pub staged: String,
    /// Namespace of the non-session keys.
    pub namespace: String,
    /// The partition these keys belong to (0 without partitions).
    pub partition: u32,
}

fn namespace_of(config: &Config) -> String {
    let prefix = &config.session_prefix;
    prefix
        .strip_suffix("session:")
        .unwrap_or(prefix.as_str())
        .to_owned()
}

impl Keys {
    /// The layout for a configuration without partitions (the key names of
    /// `docs/design.md`, "Formats"). With partitions, use [`KeySpace`].
    pub fn new(config: &Config) -> Self {
        Self::build(config, None)
    }

    /// The keys of partition `p`, every one carrying the hash tag `{p}`.
    pub fn tagged(config: &Config, p: u32) -> Self {
        Self::build(config, Some(p))
    }

    /// Prefixes end with the tag (`…:{p}:`), whole keys with `:{p}`.
    fn build(config: &Config, tag: Option<u32>) -> Self {
        let namespace = namespace_of(config);
        let (pre, suf) = match tag {
            Some(p) => (format!("{{{p}}}:"), format!(":{{{p}}}")),
            None => (String::new(), String::new()),
        };
        Keys {
            session_prefix: format!("{}{pre}", config.session_prefix),
            ledger_prefix: format!("{namespace}seq:{pre}"),
            user_prefix: format!("{namespace}user:{pre}"),
            stream: format!("{}{suf}", config.event_stream),
            expiry: format!("{namespace}expiry{suf}"),
            epoch: format!("{namespace}epoch{suf}"),
            recovered: format!("{namespace}recovered{suf}"),
            healing: format!("{namespace}healing{suf}"),
            lease: format!("{namespace}lease{suf}"),
            outage: format!("{namespace}outage{suf}"),
            staged: format!("{namespace}staged{suf}"),
            namespace,
            partition: tag.unwrap_or(0),
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

/// Every partition's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpace {
    parts: Vec<Keys>,
    tagged: bool,
    /// `REDIS_SESSION_PREFIX`, before any tag.
    session_base: String,
}

impl KeySpace {
    /// The layout for a configuration: one partition with the key names of
    /// `docs/design.md` ("Formats"), or `REDIS_PARTITIONS` tagged partitions.
    pub fn new(config: &Config) -> Self {
        let parts = if config.partitioned() {
            (0..config.partitions)
                .map(|p| Keys::tagged(config, p))
                .collect()
        } else {
            vec![Keys::new(config)]
        };
        KeySpace {
            parts,
            tagged: config.partitioned(),
            session_base: config.session_prefix.clone(),
        }
    }

    /// True when the keys carry partition hash tags.
    pub fn tagged(&self) -> bool {
        self.tagged
    }

    /// Number of partitions.
    pub fn partitions(&self) -> u32 {
        self.parts.len() as u32
    }

    /// The partition a session belongs to.
    pub fn partition_of(&self, id: &SessionId) -> u32 {
        partition_of(id, self.partitions())
    }

    /// The keys of a session's partition.
    pub fn for_session(&self, id: &SessionId) -> &Keys {
        &self.parts[self.partition_of(id) as usize]
    }

    /// The keys of partition `p` (`p` below [`KeySpace::partitions`]).
    pub fn part(&self, p: u32) -> &Keys {
        &self.parts[p as usize % self.parts.len()]
    }

    /// Every partition, in order.
    pub fn all(&self) -> &[Keys] {
        &self.parts
    }

    /// The namespace of the non-session keys (`vedfolnir:`).
    pub fn namespace(&self) -> &str {
        &self.parts[0].namespace
    }

    /// A glob matching the session keys of every partition, for one `SCAN`
    /// of them all (sort the keys with [`KeySpace::split_key`]).
    pub fn session_pattern(&self) -> String {
        format!("{}*", self.session_base)
    }

    /// A glob matching the user indexes of every partition.
    pub fn user_pattern(&self) -> String {
        format!("{}user:*", self.namespace())
    }

    /// The partition a key belongs to (by its hash tag) and the key's rest
    /// after that partition's `prefix` (a session id, a user id), when the
    /// key has that prefix.
    pub fn split_key<'k>(
        &self,
        key: &'k str,
        prefix: impl Fn(&Keys) -> &str,
    ) -> Option<(&Keys, &'k str)> {
        let p = if self.tagged {
            let open = key.find('{')?;
            let len = key[open + 1..].find('}')?;
            key[open + 1..open + 1 + len].parse::<u32>().ok()?
        } else {
            0
        };
        let part = self.parts.get(p as usize)?;
        let rest = key.strip_prefix(prefix(part))?;
        Some((part, rest))
    }

    /// A session's key.
    pub fn session(&self, id: &SessionId) -> String {
        self.for_session(id).session(id)
    }

    /// A session's ledger key.
    pub fn ledger(&self, id: &SessionId) -> String {
        self.for_session(id).ledger(id)
    }

    /// The workers' liveness set, `<ns>workers` (one key, outside the
    /// partitions).
    pub fn workers(&self) -> String {
        format!("{}workers", self.namespace())
    }

    /// The lease key of partition `p` (same slot as its stream).
    pub fn lease(&self, p: u32) -> &str {
        &self.part(p).lease
    }
}

/// The partition of a session id among `partitions`: its first 32 bits.
pub fn partition_of(id: &SessionId, partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    let head = id.as_str().get(..8).unwrap_or("0");
    u32::from_str_radix(head, 16).unwrap_or(0) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_tag_every_key_of_a_session_alike() {
        let config = Config::default().with_partitions(8);
        let space = KeySpace::new(&config);
        assert_eq!(space.partitions(), 8);
        let mut seen = std::collections::BTreeSet::new();
        for n in 0..200u32 {
            let id = crate::id::Token::generate().session_id();
            let p = space.partition_of(&id);
            seen.insert(p);
            let k = space.for_session(&id);
            let tag = format!("{{{p}}}");
            for key in [
                k.session(&id),
                k.ledger(&id),
                k.user("u1"),
                k.stream.clone(),
                k.expiry.clone(),
                k.epoch.clone(),
                k.recovered.clone(),
                k.healing.clone(),
                space.lease(p).to_owned(),
            ] {
                let first = key.find('{').expect("tagged");
                assert!(
                    key[first..].starts_with(&tag),
                    "{key} for partition {p} ({n})"
                );
            }
        }
        assert_eq!(seen.len(), 8, "200 ids reach every partition");
        let id = crate::id::Token::generate().session_id();
        let key = space.session(&id);
        let (part, rest) = space
            .split_key(&key, |k| &k.session_prefix)
            .expect("a session key");
        assert_eq!(
            (part.partition, rest),
            (space.partition_of(&id), id.as_str())
        );
        assert!(space.split_key(&key, |k| &k.user_prefix).is_none());
        assert!(
            space
                .split_key("vedfolnir:session:{99}:x", |k| &k.session_prefix)
                .is_none()
        );
        let k = space.part(3);
        assert_eq!(k.session_prefix, "vedfolnir:session:{3}:");
        assert_eq!(k.stream, "vedfolnir:events:{3}");
        assert_eq!(k.expiry, "vedfolnir:expiry:{3}");
        assert_eq!(k.user("7"), "vedfolnir:user:{3}:7");
    }

    #[test]
    fn one_partition_keeps_the_design_names() {
        let space = KeySpace::new(&Config::default());
        assert_eq!(space.partitions(), 1);
        assert_eq!(space.part(0), &Keys::new(&Config::default()));
        assert_eq!(space.lease(0), "vedfolnir:lease");
        assert_eq!(space.session_pattern(), "vedfolnir:session:*");
        assert_eq!(space.user_pattern(), "vedfolnir:user:*");
        let (part, rest) = space
            .split_key("vedfolnir:user:42", |k| &k.user_prefix)
            .expect("a user key");
        assert_eq!((part.partition, rest), (0, "42"));
    }

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
