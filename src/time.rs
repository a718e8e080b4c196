//! Timestamps as the session JSON and the event log write them: RFC 3339, UTC,
//! microsecond precision, `+00:00` offset (`2025-08-20T16:38:25.802836+00:00`).
//!
//! Values are truncated to microseconds when made, so encoding and decoding
//! round-trip exactly.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A UTC instant with microsecond precision.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(DateTime<Utc>);

impl Timestamp {
    /// The writer's clock, now. Ordering never depends on it: `seq` orders
    /// events within a session and Redis's clock sets deadlines.
    pub fn now() -> Self {
        Timestamp(Utc::now().trunc_subsecs(6))
    }

    /// From a chrono instant, truncated to microseconds.
    pub fn from_datetime(t: DateTime<Utc>) -> Self {
        Timestamp(t.trunc_subsecs(6))
    }

    /// From milliseconds since the Unix epoch (Redis `TIME`-based deadlines).
    pub fn from_millis(ms: i64) -> Option<Self> {
        DateTime::from_timestamp_millis(ms).map(Timestamp)
    }

    /// The chrono instant.
    pub fn datetime(&self) -> DateTime<Utc> {
        self.0
    }

    /// Milliseconds since the Unix epoch.
    pub fn millis(&self) -> i64 {
        self.0.timestamp_millis()
    }
}

/// Text that is not an RFC 3339 timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an RFC 3339 timestamp: {0:?}")]
pub struct InvalidTimestamp(pub String);

impl FromStr for Timestamp {
    type Err = InvalidTimestamp;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| Timestamp::from_datetime(t.with_timezone(&Utc)))
            .map_err(|_| InvalidTimestamp(s.chars().take(64).collect()))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(SecondsFormat::Micros, false))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_seed_application() {
        let t: Timestamp = "2025-08-20T16:38:25.802836+00:00".parse().expect("parses");
        assert_eq!(t.to_string(), "2025-08-20T16:38:25.802836+00:00");
        let z: Timestamp = "2025-08-20T18:38:25.802836123+02:00"
            .parse()
            .expect("parses");
        assert_eq!(z.to_string(), "2025-08-20T16:38:25.802836+00:00");
        assert!("yesterday".parse::<Timestamp>().is_err());
    }

    #[test]
    fn now_round_trips() {
        let t = Timestamp::now();
        assert_eq!(t.to_string().parse::<Timestamp>(), Ok(t));
    }
}
