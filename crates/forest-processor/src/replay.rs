//! Projection checkpoints less often than offsets and outputs, and the replay that makes them
//! safe ([`crate::ProcessorConfig::projection_interval`]).
//!
//! **Why.** A batch writes every user it changed, so RocksDB writes per event are the batch's
//! distinct users over its events: about 0.5 with batches of 5,000 events over 100,000 Zipf
//! users. Writing a user once per checkpoint interval instead of once per batch cuts that to
//! the interval's distinct users, without making batches (and latency) longer.
//!
//! **How.** Every batch still stores, in its one `WriteBatch`, its input offsets and its
//! outputs (the outbox), and per partition number it advanced a *replay record*: where each of
//! the partition's lanes stood when the batch began (`from`) and the order, as runs of
//! (lane, records), in which the batch folded the partition's records. A *checkpoint* batch
//! writes every changed projection instead and deletes the replay records of the worker's
//! partitions in the same `WriteBatch`. So for every partition, at every moment, the store
//! holds:
//! - projections equal to the fold of the records below the first replay record's `from`
//!   (below the stored offsets if there is none);
//! - offsets and outputs of everything folded, as before.
//!
//! On assignment, a partition with replay records seeks its lanes to the first record's
//! `from`, and the merge follows the records' runs exactly ([`crate::merge::Merger::set_script`]).
//! Those records are folded again into the projections, but their outputs and offsets are not
//! stored again: the outbox already holds or has sent them. Then the partition goes on live
//! from its stored offsets.
//!
//! **Why the order is recorded, not recomputed.** The live merge does not wait for a lane that
//! is caught up (see [`crate::merge`]), so the order records were folded in is not always a
//! function of the logs. Folding them again in another order could mature a tree from
//! different credits, or reject a different event at a daily cap, than the run whose outputs
//! were sent. Following the record, the replay rebuilds exactly the state whose outputs are
//! already out.
//!
//! **Rules that keep it exact.**
//! - No checkpoint while any of the worker's partitions is still replaying. Its users would be
//!   stored halfway through the replay, and the replay records, deleted with the same
//!   checkpoint, could not finish them. A replay reads records that are already in Kafka, so
//!   it normally finishes within a few poll rounds.
//! - Partitions revoked or a shutdown mid-replay: an offsets-only batch, and the cached
//!   projections are dropped. Whoever gets the partition next replays it.
//! - A replayed record is counted in the consumed and applied counters again. Its trees and
//!   dead letters are not counted again, because their batch counted them when it was durable.
//!
//! **Limits.** Only in the outbox mode and without the changelog: changelog records carry
//! every batch's projections, which is the write this saves. Projections read from the store
//! (`forest user`, `forest inspect`) lag by up to the interval. The unwritten projections must
//! stay in the cache until the checkpoint, so a checkpoint also comes when they reach half of
//! the cache's bounds, unless a replay is running.

use forest_store::{ProjectionCache, StoreError};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
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

/// The checkpoint state of one worker.
pub(crate) struct Checkpoints {
    interval: Duration,
    last: Instant,
    max_dirty_users: usize,
    max_dirty_bytes: usize,
    /// The open batch's fold order per partition number (live records only).
    runs: FxHashMap<i32, Vec<(u8, u32)>>,
    /// Per partition number: the replay records stored since its last checkpoint (an empty
    /// range once checkpointed; the next record takes `end`).
    stored: FxHashMap<i32, Range<u64>>,
    /// Where live folding of each lane began in this assignment: its stored offset, or
    /// [`BEGINNING`].
    starts: FxHashMap<(u8, i32), i64>,
    /// Checkpoint with the next commit (revocation, shutdown).
    force: bool,
}

impl Checkpoints {
    pub(crate) fn new(interval: Duration, cache_users: usize, cache_bytes: usize) -> Self {
        Self {
            interval,
            last: Instant::now(),
            max_dirty_users: (cache_users / 2).max(1),
            max_dirty_bytes: cache_bytes / 2,
            runs: FxHashMap::default(),
            stored: FxHashMap::default(),
            starts: FxHashMap::default(),
            force: false,
        }
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

    /// A partition's stored replay records (a replay is under way, or none left: `None`).
    pub(crate) fn resumed(&mut self, partition: i32, seqs: Option<Range<u64>>) {
        match seqs {
            Some(s) => self.stored.insert(partition, s),
            None => self.stored.remove(&partition),
        };
    }

    /// Partitions were revoked: the next assignment reads everything back from the store.
    pub(crate) fn revoked(&mut self) {
        self.runs.clear();
        self.stored.clear();
        self.starts.clear();
        self.force = false;
    }

    /// Whether projections are stored less often than every batch.
    pub(crate) fn spaced(&self) -> bool {
        !self.interval.is_zero()
    }

    pub(crate) fn force(&mut self) {
        self.force = true;
    }

    /// Whether the next commit is a checkpoint.
    pub(crate) fn due(&self, cache: &ProjectionCache, replaying: bool) -> bool {
        !replaying
            && (self.force
                || self.last.elapsed() >= self.interval
                || cache.dirty_len() >= self.max_dirty_users
                || cache.dirty_bytes() >= self.max_dirty_bytes)
    }

    /// Whether some replay record waits for a checkpoint to delete it.
    pub(crate) fn has_records(&self) -> bool {
        self.stored.values().any(|r| !r.is_empty())
    }

    /// A checkpoint: the replay records to delete with it, by partition number.
    pub(crate) fn checkpointed(&mut self) -> Vec<(i32, Range<u64>)> {
        self.last = Instant::now();
        self.force = false;
        self.runs.clear();
        self.stored
            .iter_mut()
            .filter(|(_, r)| !r.is_empty())
            .map(|(&p, r)| {
                let done = r.clone();
                r.start = r.end;
                (p, done)
            })
            .collect()
    }

    /// A batch without projections: its replay records, (partition, sequence, bytes).
    /// `lane_at(lane, partition)` is where a lane stood after the batches closed before
    /// (`None`: none advanced it in this assignment).
    pub(crate) fn records(
        &mut self,
        lane_at: impl Fn(u8, i32) -> Option<i64>,
    ) -> Vec<(i32, u64, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.runs.len());
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
            let seqs = self.stored.entry(p).or_insert(0..0);
            out.push((p, seqs.end, record.encode()));
            seqs.end += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_one_lane_coalesce_and_records_say_where_each_lane_began() {
        let mut c = Checkpoints::new(Duration::from_secs(3600), 100, 1 << 20);
        c.assigned(0, 4, Some(100));
        c.assigned(1, 4, None);
        c.assigned(2, 4, Some(7));
        for lane in [0, 0, 1, 0, 2, 2, 2] {
            c.folded(lane, 4);
        }
        c.folded(1, 5);
        let mut recs = c.records(|t, p| (t == 2 && p == 4).then_some(9));
        recs.sort();
        let decoded: Vec<(i32, u64, ReplayRecord)> = recs
            .iter()
            .map(|(p, s, b)| (*p, *s, ReplayRecord::decode(b, *p, *s).unwrap()))
            .collect();
        assert_eq!(
            decoded,
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
        assert!(c.has_records());
        // The next record of partition 4 takes the next sequence number.
        c.folded(0, 4);
        let recs = c.records(|_, _| None);
        assert_eq!(recs.len(), 1);
        assert_eq!((recs[0].0, recs[0].1), (4, 1));
        // A checkpoint deletes them all, and numbering goes on after them.
        let mut deleted = c.checkpointed();
        deleted.sort_by_key(|(p, _)| *p);
        assert_eq!(deleted, vec![(4, 0..2), (5, 0..1)]);
        assert!(!c.has_records());
        c.folded(0, 4);
        assert_eq!(c.records(|_, _| None)[0].1, 2);
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
    fn a_checkpoint_is_due_on_time_on_force_or_on_dirty_users_but_never_mid_replay() {
        let cache = ProjectionCache::new(10);
        let mut c = Checkpoints::new(Duration::from_secs(3600), 10, 1 << 20);
        assert!(!c.due(&cache, false));
        c.force();
        assert!(c.due(&cache, false));
        assert!(!c.due(&cache, true), "mid-replay");
        c.checkpointed();
        assert!(!c.due(&cache, false), "a checkpoint resets the force");
        let c = Checkpoints::new(Duration::ZERO, 10, 1 << 20);
        assert!(c.due(&cache, false));
    }
}
