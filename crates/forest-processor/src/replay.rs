//! Projections written less often than offsets and outputs, and the replay that makes it
//! safe ([`crate::ProcessorConfig::projection_interval`]).
//!
//! **Why.** A batch that writes every user it changed costs as many RocksDB writes as the
//! batch has distinct users: about 0.5 per event with batches of 5,000 events over 100,000
//! Zipf users. Writing a user once it has been changed and unwritten for the interval writes
//! a hot user once per interval instead of once per batch, without longer batches.
//!
//! **How.**
//! - Every batch still stores, in its one `WriteBatch`, its input offsets and outputs (the
//!   outbox), and the users whose turn has come: those dirty since a batch that closed at least
//!   the interval ago, oldest first (more when the dirty ones pass half the cache's bounds).
//!   So the write load is spread over batches: no batch serialises a whole interval's users,
//!   which stalled the polling thread for ~75 ms per 40,000 users when all were written at
//!   once (session 8 in BENCHMARKS.md).
//! - Optionally ([`crate::ProcessorConfig::pace_projection_writes`]) the writes are also
//!   paced: each batch writes, oldest first, at least the share of the dirty users that the
//!   time since the previous batch is of the interval (see `Checkpoints::paced`). In a steady
//!   state that is about the users whose turn has come anyway; after a start it spreads the
//!   first interval's writes instead of letting every user first changed in one second fall
//!   due together. The price is writes: users written early change again, about 0.02 more
//!   writes per event at full speed (BENCHMARKS.md, session 20).
//! - Each stored projection carries the *position* it reflects: the next offset of each lane
//!   of its partition at the batch that wrote it (the store's value prefix).
//! - A batch after which some user stays dirty also stores, per partition number it
//!   advanced, a *replay record*: where each lane stood when the batch began (`from`) and the
//!   order, as runs of (lane, records), in which it folded the partition's records.
//! - A replay record is deleted, in a later batch, once every user dirtied up to its batch has
//!   been written.
//!
//! So for every partition, at every moment, the store holds offsets and outputs of everything
//! folded, and projections that, folded further with the partition's records from the first
//! replay record's `from` in the recorded order, skipping each user's records below its
//! stored position, give the live state.
//!
//! On assignment, a partition with replay records seeks its lanes to the first record's
//! `from`, and the merge follows the records' runs exactly ([`crate::merge::Merger::set_script`]).
//! Each record is folded again unless its user's stored position is past it (the stored state
//! has it: a position marks a prefix of the recorded order). Outputs and offsets of replayed
//! records are not stored again: the outbox holds or has sent them. Then the partition goes on
//! live from its stored offsets. Its previous run's replay records are deleted like the
//! others once the users the replay dirtied are written.
//!
//! **Why the order is recorded, not recomputed.** The live merge does not wait for a lane that
//! is caught up (see [`crate::merge`]), so the order records were folded in is not always a
//! function of the logs. Folding them again in another order could mature a tree from
//! different credits, or reject a different event at a daily cap, than the run whose outputs
//! were sent. Following the record, the replay rebuilds exactly the state whose outputs are
//! already out.
//!
//! **Also.**
//! - Revocation and shutdown write every dirty user. A partition revoked mid-replay keeps its
//!   replay records, and whoever gets it next replays the rest (users written meanwhile carry
//!   their positions, so nothing is folded twice).
//! - A replayed record counts in the consumed, applied and replayed counters again. Its trees
//!   and dead letters are not counted again: their batch counted them when it was durable.
//! - With an interval of 0 every batch writes every user it changed and stores no replay
//!   record, but replay records an earlier run left are still followed and deleted.
//!
//! **Limits.** Only in the outbox mode without the changelog (changelog records carry every
//! batch's projections, which is the write this saves); a store with replay records is refused
//! in the other modes. Projections read from the store (`forest user`, `forest inspect`) lag by
//! up to the interval, and after a crash until the partition's replay has run (offsets at the
//! log's end do not mean every projection is written while replay records remain). A replay
//! needs the records since its first replay record still in Kafka: keep the input topics'
//! retention far above the interval; a replay that meets a record at or past its lane's stored
//! offset (the log changed under it) stops with [`crate::ProcessorError::Replay`] rather than
//! fold it without its outputs. Positions assume a user's partition never changes (a fixed
//! input partition count, which the co-partitioned merge assumes too).

use forest_store::{Flush, ProjectionCache, StoreError};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

/// A lane position meaning "the log's beginning": the lane had no stored offset.
pub const BEGINNING: i64 = -2;

/// One batch's fold order for one partition number (stored postcard-encoded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayRecord {
    /// Next offset of each lane (by topic index) when the batch began, or [`BEGINNING`].
    pub from: [i64; 3],
    /// (lane, records) in the order the batch folded them.
    pub runs: Vec<(u8, u32)>,
}

impl ReplayRecord {
    pub fn encode(&self) -> Vec<u8> {
        // Plain integers and a vector: postcard cannot fail on them.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8], partition: i32, seq: u64) -> Result<Self, StoreError> {
        postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
            key: format!("replay/{partition}/{seq}"),
            reason: e.to_string(),
        })
    }
}

/// What a partition's stored replay records ask of its assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// Where each lane must start: the first record's `from`.
    pub from: [i64; 3],
    /// Every record's runs, in order.
    pub runs: Vec<(u8, u32)>,
    /// The records' sequence numbers.
    pub seqs: Range<u64>,
}

/// Joins a partition's stored replay records, in sequence order, into one replay. `None`:
/// there are none, the stored projections are current.
pub fn plan(partition: i32, log: &[(u64, Vec<u8>)]) -> Result<Option<Replay>, StoreError> {
    let (Some((first, _)), Some((last, _))) = (log.first(), log.last()) else {
        return Ok(None);
    };
    let mut from = None;
    let mut runs = Vec::new();
    for (seq, bytes) in log {
        let r = ReplayRecord::decode(bytes, partition, *seq)?;
        from.get_or_insert(r.from);
        runs.extend(r.runs);
    }
    Ok(from.map(|from| Replay {
        from,
        runs,
        seqs: *first..last + 1,
    }))
}

/// When a worker writes projections, and the replay records of the batches whose users are
/// not all written yet.
pub(crate) struct Checkpoints {
    interval: Duration,
    max_dirty_users: usize,
    max_dirty_bytes: usize,
    /// Closed batches' tickets and when they closed, oldest first (back to the newest one
    /// closed at least `interval` ago).
    closed: VecDeque<(u64, Instant)>,
    /// The open batch's fold order per partition number (live records only).
    runs: FxHashMap<i32, Vec<(u8, u32)>>,
    /// Next replay record sequence number per partition number.
    next_seq: FxHashMap<i32, u64>,
    /// Stored replay records not yet deleted, in ticket order: (the ticket of the batch whose
    /// users they rebuild, partition, sequence numbers).
    pending: VecDeque<(u64, i32, Range<u64>)>,
    /// A previous run's replay records of partitions still replaying: they join `pending`
    /// when the partition's replay ends.
    held: FxHashMap<i32, Range<u64>>,
    /// Where live folding of each lane began in this assignment: its stored offset, or
    /// [`BEGINNING`].
    starts: FxHashMap<(u8, i32), i64>,
    /// Write every dirty user with the next commit (revocation, shutdown).
    force: bool,
    /// [`crate::ProcessorConfig::pace_projection_writes`].
    pace: bool,
}

/// The fewest users a paced write takes ahead of their turn (see `Checkpoints::paced`).
const PACE_MIN_USERS: usize = 32;

impl Checkpoints {
    pub(crate) fn new(interval: Duration, cache_users: usize, cache_bytes: usize) -> Self {
        Self {
            interval,
            max_dirty_users: (cache_users / 2).max(1),
            max_dirty_bytes: cache_bytes / 2,
            closed: VecDeque::new(),
            runs: FxHashMap::default(),
            next_seq: FxHashMap::default(),
            pending: VecDeque::new(),
            held: FxHashMap::default(),
            starts: FxHashMap::default(),
            force: false,
            pace: false,
        }
    }

    /// Paces the writes (see `Checkpoints::paced`).
    pub(crate) fn with_pace(mut self, pace: bool) -> Self {
        self.pace = pace;
        self
    }

    /// Whether projections are written later than their batch.
    pub(crate) fn spaced(&self) -> bool {
        !self.interval.is_zero()
    }

    /// A live record of `lane` in `partition` was folded into the open batch.
    pub(crate) fn folded(&mut self, lane: u8, partition: i32) {
        let runs = self.runs.entry(partition).or_default();
        match runs.last_mut() {
            Some((l, n)) if *l == lane && *n < u32::MAX => *n += 1,
            _ => runs.push((lane, 1)),
        }
    }

    /// A lane was assigned: live folding starts at its stored offset.
    pub(crate) fn assigned(&mut self, lane: u8, partition: i32, stored: Option<i64>) {
        self.starts
            .insert((lane, partition), stored.unwrap_or(BEGINNING));
    }

    /// A partition was assigned with these stored replay records (`None`: none).
    pub(crate) fn resumed(&mut self, partition: i32, seqs: Option<Range<u64>>) {
        match seqs {
            Some(s) => {
                self.next_seq.insert(partition, s.end);
                self.held.insert(partition, s);
            }
            None => {
                self.next_seq.remove(&partition);
                self.held.remove(&partition);
            }
        }
    }

    /// Partitions whose previous run's replay records are held.
    pub(crate) fn held(&self) -> Vec<i32> {
        self.held.keys().copied().collect()
    }

    /// The partition's replay is over: its previous run's records can go once the users
    /// the replay dirtied (in batch `ticket` at the latest) are written.
    pub(crate) fn replay_done(&mut self, partition: i32, ticket: u64) {
        if let Some(seqs) = self.held.remove(&partition) {
            self.pending.push_back((ticket, partition, seqs));
        }
    }

    /// Partitions were revoked: the next assignment reads everything back from the store.
    pub(crate) fn revoked(&mut self) {
        self.runs.clear();
        self.next_seq.clear();
        self.pending.clear();
        self.held.clear();
        self.starts.clear();
        self.force = false;
    }

    pub(crate) fn force(&mut self) {
        self.force = true;
    }

    /// Which users the next batch writes: all of them when forced or not spaced; else those
    /// dirty since a batch closed at least `interval` ago, and more while the dirty ones are
    /// over half the cache's bounds.
    pub(crate) fn flush(&mut self, cache: &ProjectionCache, now: Instant) -> Flush {
        if self.force || !self.spaced() {
            return Flush::ALL;
        }
        let Some(cut) = now.checked_sub(self.interval) else {
            return Flush {
                before: 0,
                max_dirty: self.max_dirty(cache),
            };
        };
        // Keep only the newest batch closed before the cut, and those after it.
        while self.closed.get(1).is_some_and(|&(_, t)| t <= cut) {
            self.closed.pop_front();
        }
        let before = match self.closed.front() {
            Some(&(ticket, t)) if t <= cut => ticket + 1,
            _ => 0,
        };
        Flush {
            before,
            max_dirty: self.max_dirty(cache).min(self.paced(cache, now)),
        }
    }

    /// How many users may stay dirty after this batch when the writes are paced: every batch
    /// writes, oldest first, at least the share of the dirty users that the time since the
    /// last batch is of the interval (why, and its price: see
    /// [`crate::ProcessorConfig::pace_projection_writes`]). In a steady state, with users
    /// becoming dirty at a constant rate, the dirty set is that rate times the interval and
    /// the pace writes each user about an interval after it became dirty, as the rule alone
    /// does. Writing a user early is always safe: it is what the cache's bounds already do.
    fn paced(&self, cache: &ProjectionCache, now: Instant) -> usize {
        if !self.pace {
            return usize::MAX;
        }
        let Some(&(_, last)) = self.closed.back() else {
            return usize::MAX;
        };
        let since = now.saturating_duration_since(last).min(self.interval);
        let dirty = cache.dirty_len();
        let due = (dirty as u128 * since.as_nanos() / self.interval.as_nanos()) as usize;
        // Not for a handful: an idle processor would otherwise commit a batch of one or two
        // users every few milliseconds. The share left out is not carried over, so with
        // batches `dt` apart this acts only above 32 x interval / `dt` dirty users.
        if due < PACE_MIN_USERS {
            return usize::MAX;
        }
        dirty - due.min(dirty)
    }

    fn max_dirty(&self, cache: &ProjectionCache) -> usize {
        let by_bytes = match cache.dirty_bytes() {
            b if b > self.max_dirty_bytes => {
                (cache.dirty_len() as u128 * self.max_dirty_bytes as u128 / b as u128) as usize
            }
            _ => usize::MAX,
        };
        self.max_dirty_users.min(by_bytes)
    }

    /// The batch `ticket` was prepared. `dirty_left`: whether users stay dirty after it, so
    /// its records must be kept for a replay; `watermark`: the ticket of the batch in which
    /// the longest-dirty user became dirty (every user dirtied before is written). Returns
    /// the replay records to put, (partition, sequence, bytes), and to delete. `lane_at(lane,
    /// partition)` is where a lane stood after the batches closed before (`None`: none
    /// advanced it in this assignment).
    pub(crate) fn prepared(
        &mut self,
        ticket: u64,
        now: Instant,
        dirty_left: bool,
        watermark: Option<u64>,
        lane_at: impl Fn(u8, i32) -> Option<i64>,
    ) -> Replays {
        self.force = false;
        if self.spaced() {
            // (Pruned by `flush`; not needed when every batch writes every user.)
            self.closed.push_back((ticket, now));
        }
        let mut out = Replays::default();
        if dirty_left {
            for (p, runs) in self.runs.drain() {
                let lane = |t: u8| {
                    lane_at(t, p)
                        .or_else(|| self.starts.get(&(t, p)).copied())
                        .unwrap_or(BEGINNING)
                };
                let record = ReplayRecord {
                    from: [lane(0), lane(1), lane(2)],
                    runs,
                };
                let seq = self.next_seq.entry(p).or_insert(0);
                out.put.push((p, *seq, record.encode()));
                self.pending.push_back((ticket, p, *seq..*seq + 1));
                *seq += 1;
            }
        } else {
            // Every user this batch changed is written with it: nothing to replay.
            self.runs.clear();
        }
        let watermark = watermark.unwrap_or(u64::MAX);
        while self.pending.front().is_some_and(|(t, _, _)| *t < watermark) {
            if let Some((_, p, seqs)) = self.pending.pop_front() {
                out.delete.push((p, seqs));
            }
        }
        out
    }

    /// Whether stored replay records wait for a batch to delete them.
    pub(crate) fn deletes_due(&self, watermark: Option<u64>) -> bool {
        let watermark = watermark.unwrap_or(u64::MAX);
        self.pending.front().is_some_and(|(t, _, _)| *t < watermark)
    }
}

/// Replay records a batch puts and deletes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Replays {
    pub put: Vec<(i32, u64, Vec<u8>)>,
    pub delete: Vec<(i32, Range<u64>)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(put: &[(i32, u64, Vec<u8>)]) -> Vec<(i32, u64, ReplayRecord)> {
        let mut v: Vec<_> = put
            .iter()
            .map(|(p, s, b)| (*p, *s, ReplayRecord::decode(b, *p, *s).unwrap()))
            .collect();
        v.sort_by_key(|(p, s, _)| (*p, *s));
        v
    }

    #[test]
    fn runs_of_one_lane_coalesce_and_records_say_where_each_lane_began() {
        let now = Instant::now();
        let mut c = Checkpoints::new(Duration::from_secs(3600), 100, 1 << 20);
        c.assigned(0, 4, Some(100));
        c.assigned(1, 4, None);
        c.assigned(2, 4, Some(7));
        for lane in [0, 0, 1, 0, 2, 2, 2] {
            c.folded(lane, 4);
        }
        c.folded(1, 5);
        let r = c.prepared(1, now, true, Some(1), |t, p| {
            (t == 2 && p == 4).then_some(9)
        });
        assert!(r.delete.is_empty());
        assert_eq!(
            decoded(&r.put),
            vec![
                (
                    4,
                    0,
                    ReplayRecord {
                        from: [100, BEGINNING, 9],
                        runs: vec![(0, 2), (1, 1), (0, 1), (2, 3)],
                    }
                ),
                (
                    5,
                    0,
                    ReplayRecord {
                        from: [BEGINNING; 3],
                        runs: vec![(1, 1)],
                    }
                ),
            ]
        );
        // Batch 2: users of batch 1 still dirty; the next record of partition 4 is seq 1.
        c.folded(0, 4);
        let r = c.prepared(2, now, true, Some(1), |_, _| None);
        assert_eq!((r.put.len(), r.put[0].0, r.put[0].1), (1, 4, 1));
        assert!(r.delete.is_empty());
        // Batch 3 writes the users dirtied in batch 1: its records go, batch 2's stay.
        let r = c.prepared(3, now, true, Some(2), |_, _| None);
        assert!(r.put.is_empty(), "no live records in batch 3");
        let mut deleted = r.delete;
        deleted.sort_by_key(|(p, _)| *p);
        assert_eq!(deleted, vec![(4, 0..1), (5, 0..1)]);
        // Batch 4 leaves nothing dirty: its own records are not written, the rest go.
        c.folded(1, 5);
        let r = c.prepared(4, now, false, None, |_, _| None);
        assert_eq!(
            r,
            Replays {
                put: vec![],
                delete: vec![(4, 1..2)],
            }
        );
        assert!(!c.deletes_due(None));
        // Numbering goes on after the deleted records.
        c.folded(1, 5);
        assert_eq!(c.prepared(5, now, true, Some(5), |_, _| None).put[0].1, 1);
    }

    #[test]
    fn a_previous_runs_records_go_once_the_replay_is_over_and_its_users_written() {
        let now = Instant::now();
        let mut c = Checkpoints::new(Duration::from_secs(3600), 100, 1 << 20);
        c.resumed(2, Some(3..6));
        assert_eq!(c.held(), vec![2]);
        // Mid-replay, nothing dirty: the held records stay.
        assert!(
            c.prepared(1, now, false, None, |_, _| None)
                .delete
                .is_empty()
        );
        c.replay_done(2, 2);
        assert!(c.held().is_empty());
        assert!(!c.deletes_due(Some(2)), "users of batch 2 are still dirty");
        assert!(
            c.prepared(2, now, true, Some(2), |_, _| None)
                .delete
                .is_empty()
        );
        assert!(c.deletes_due(Some(3)));
        assert_eq!(
            c.prepared(3, now, false, None, |_, _| None).delete,
            vec![(2, 3..6)]
        );
        // New records of that partition continue its numbering.
        c.folded(0, 2);
        assert_eq!(c.prepared(4, now, true, Some(4), |_, _| None).put[0].1, 6);
    }

    #[test]
    fn a_plan_joins_the_records_and_starts_where_the_first_began() {
        let a = ReplayRecord {
            from: [5, BEGINNING, 0],
            runs: vec![(0, 3), (2, 1)],
        };
        let b = ReplayRecord {
            from: [8, BEGINNING, 1],
            runs: vec![(2, 2)],
        };
        assert_eq!(plan(3, &[]).unwrap(), None);
        let log = vec![(4, a.encode()), (5, b.encode())];
        assert_eq!(
            plan(3, &log).unwrap(),
            Some(Replay {
                from: [5, BEGINNING, 0],
                runs: vec![(0, 3), (2, 1), (2, 2)],
                seqs: 4..6,
            })
        );
        let err = plan(3, &[(9, vec![0xff; 3])]).unwrap_err();
        assert!(err.to_string().contains("replay/3/9"), "{err}");
    }

    #[test]
    fn the_flush_takes_users_dirty_since_batches_closed_an_interval_ago_or_all_when_forced() {
        let cache = ProjectionCache::new(10);
        let t0 = Instant::now();
        let mut c = Checkpoints::new(Duration::from_millis(100), 10, 1 << 20);
        assert_eq!(c.flush(&cache, t0).before, 0, "no batch closed yet");
        c.prepared(1, t0, true, None, |_, _| None);
        c.prepared(2, t0 + Duration::from_millis(50), true, None, |_, _| None);
        c.prepared(3, t0 + Duration::from_millis(120), true, None, |_, _| None);
        assert_eq!(c.flush(&cache, t0 + Duration::from_millis(99)).before, 0);
        assert_eq!(c.flush(&cache, t0 + Duration::from_millis(100)).before, 2);
        assert_eq!(c.flush(&cache, t0 + Duration::from_millis(160)).before, 3);
        let f = c.flush(&cache, t0 + Duration::from_millis(160));
        assert_eq!(f.max_dirty, 5, "half the cache's users");
        c.force();
        assert_eq!(c.flush(&cache, t0).before, u64::MAX);
        let mut every = Checkpoints::new(Duration::ZERO, 10, 1 << 20);
        assert_eq!(every.flush(&cache, t0).before, u64::MAX);
    }

    /// Paced: each batch writes at least the share of the dirty users that the time since the
    /// last batch is of the interval, oldest first (not a handful, and never past the cache's
    /// own bound), so the users first changed in one second are not all due together.
    #[test]
    fn paced_writes_take_the_dirty_users_share_of_the_time_since_the_last_batch() {
        let dir = crate::core::tests::Scratch::new("pace");
        let store =
            forest_store::Store::open(&dir.0, &forest_store::StoreConfig::default()).unwrap();
        let mut cache = ProjectionCache::new(100_000);
        for i in 0..1_000 {
            cache
                .update(&store, &format!("u{i}"), |_| Ok::<_, ()>(()))
                .unwrap()
                .unwrap();
        }
        assert_eq!(cache.dirty_len(), 1_000);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let unpaced = 50_000; // half the cache's users
        let mut off = Checkpoints::new(Duration::from_secs(5), 100_000, 1 << 40);
        off.prepared(1, t0, true, None, |_, _| None);
        assert_eq!(off.flush(&cache, at(1_000)).max_dirty, unpaced, "not paced");
        let mut c = Checkpoints::new(Duration::from_secs(5), 100_000, 1 << 40).with_pace(true);
        assert_eq!(
            c.flush(&cache, t0).max_dirty,
            unpaced,
            "no batch closed yet"
        );
        c.prepared(1, t0, true, None, |_, _| None);
        // 1 s of 5: a fifth of the 1,000 dirty users, so 800 stay dirty.
        assert_eq!(c.flush(&cache, at(1_000)).max_dirty, 800);
        assert_eq!(c.flush(&cache, at(2_500)).max_dirty, 500);
        // 150 ms: 30 users, fewer than PACE_MIN_USERS; 160 ms: 32.
        assert_eq!(c.flush(&cache, at(150)).max_dirty, unpaced);
        assert_eq!(c.flush(&cache, at(160)).max_dirty, 1_000 - PACE_MIN_USERS);
        // An interval or more since the last batch: every dirty user.
        assert_eq!(c.flush(&cache, at(9_000)).max_dirty, 0);
        // Measured from the newest closed batch.
        c.prepared(2, at(4_000), true, None, |_, _| None);
        assert_eq!(c.flush(&cache, at(5_000)).max_dirty, 800);
        // The cache's bound still applies when it is the lower one.
        let mut small = Checkpoints::new(Duration::from_secs(5), 1_000, 1 << 40).with_pace(true);
        small.prepared(1, t0, true, None, |_, _| None);
        assert_eq!(small.flush(&cache, at(1_000)).max_dirty, 500);
    }
}
