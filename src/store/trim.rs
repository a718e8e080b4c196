//! The bound of the event stream where no audit consumer reads it.
//!
//! The audit consumer trims the stream below what its group acknowledged.
//! A deployment without one (no worker, or none yet) would see the stream
//! grow until Redis is full, so the store trims it itself while no consumer
//! group exists, to about `SESSION_STREAM_MAXLEN` entries in all
//! (`XTRIM MAXLEN ~`, spread over the partitions). Once a group exists the
//! store never trims: an entry the group has not acknowledged may not be
//! lost, and trimming what it acknowledged is the consumer's work.
//!
//! Cost on the write path: none in the common case. Every
//! `SESSION_STREAM_MAXLEN / 100` events (at least 1, at most 1000) a process
//! appends, it trims the partition it just wrote, in a task of its own and
//! one at a time: one script call that checks for a group and trims in one
//! atomic step (a group created meanwhile is never raced).

use std::sync::LazyLock;
use std::sync::atomic::Ordering;

use redis::Script;

use super::SessionStore;
use crate::error::Result;
use crate::keys::Keys;

/// Trims `KEYS[1]` to about `ARGV[1]` entries unless a consumer group reads
/// it; the number of entries removed, or -1 when a group exists.
static TRIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if #redis.call('XINFO', 'GROUPS', KEYS[1]) > 0 then
  return -1
end
return redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[1])
",
    )
});

impl SessionStore {
    /// Entries each partition's stream keeps, about, without a consumer
    /// group; 0 when the store never trims.
    fn per_partition_maxlen(&self) -> u64 {
        let max = self.config.stream_maxlen;
        if max == 0 {
            return 0;
        }
        max.div_ceil(u64::from(self.keys.partitions())).max(1)
    }

    /// Trims every partition's stream to about `SESSION_STREAM_MAXLEN`
    /// entries in all, where no consumer group reads it (see `store::trim`);
    /// the number of entries removed. Streams that a group reads are left
    /// alone. The store also does this by itself as it writes.
    pub async fn trim_stream(&self) -> Result<u64> {
        let mut removed = 0;
        for part in self.keys.all() {
            removed += self.trim_partition(part).await?;
        }
        Ok(removed)
    }

    async fn trim_partition(&self, part: &Keys) -> Result<u64> {
        let maxlen = self.per_partition_maxlen();
        if maxlen == 0 {
            return Ok(0);
        }
        let n: i64 = TRIM
            .key(&part.stream)
            .arg(maxlen)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n.max(0) as u64)
    }

    /// Counts one event Redis appended to `part`'s stream; every so many,
    /// trims that stream in the background.
    pub(super) fn appended(&self, part: &Keys) {
        let maxlen = self.per_partition_maxlen();
        if maxlen == 0 {
            return;
        }
        let every = (maxlen / 100).clamp(1, 1000);
        let n = self.shared.appended.fetch_add(1, Ordering::Relaxed) + 1;
        if !n.is_multiple_of(every) || self.shared.trimming.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = self.clone();
        let part = part.clone();
        tokio::spawn(async move {
            if let Err(e) = store.trim_partition(&part).await {
                tracing::debug!(err = %e, stream = %part.stream, "trimming the event stream failed");
            }
            store.shared.trimming.store(false, Ordering::Release);
        });
    }
}
