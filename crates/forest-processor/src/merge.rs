//! Deterministic merge of co-partitioned input topics.
//!
//! One user's events arrive on up to three topics (payments, mobility, commands), all keyed by
//! user id, so they share a partition *number* but not a partition: Kafka orders each partition,
//! not the three together. The fold is order-sensitive across them (a species choice before or
//! after a credit; a late event before or after a newer one), so the processor must pick one
//! order that a replay will pick again. It takes, within each partition number, the record with
//! the smallest (record timestamp, topic index, offset) among the lanes' heads, and only once
//! every lane either has a buffered record or has been read up to its high watermark. With the
//! data present (catch-up, replay after a crash), that order is a pure function of the logs.
//! Live, a lane that is caught up does not hold the others back, so a record produced later
//! with an older timestamp is applied when it arrives (as Kafka Streams does with
//! `max.task.idle.ms` = 0). A lane that is behind its high watermark but not delivering (broker
//! trouble) blocks its partition for up to `max_idle` (30 s by default) of polling that found
//! the consumer's local queue empty, then stops blocking; so does every lane once the merge
//! buffer is over its hard bound ([`Merger::hard_bound`]): memory and latency stay bounded, at the cost of the canonical
//! order in those cases (counted in `forest_merge_early_releases_total`). The buffer rarely
//! gets there: from three quarters of the bound the runtime pauses fetching for the lanes
//! that already hold records, so the fetches go to the lanes the merge waits for (runtime's
//! `LanePauses`). The idle clock only runs while the consumer has nothing queued: a
//! busy processor (slow batches, small polls) whose lane's records are still queued locally
//! behind other partitions' is not waiting on the broker. (It once was counted so: with 50-record
//! transactions, lanes "idled" 30 s while their records sat in the local queue, the merge gave
//! up, and late-applied events were rejected as too late.)

use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The fewest records a poll round takes while the merge buffer is over its pause mark: enough
/// for the lanes the merge waits for to arrive (see [`Merger::hard_bound`]).
pub const LANE_ROUND_MIN: usize = 500;

/// One consumed record, owned.
#[derive(Debug, Clone)]
pub struct Rec {
    pub topic: u8,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    /// The key, then the value, in one allocation: one copy out of librdkafka's buffer per
    /// record instead of two, and the key (checked against the decoded user id) sits beside
    /// the value the decoder has just read rather than in a block of its own that has gone
    /// cold in the merge buffer (BENCHMARKS.md, session 9: that compare was a visible share of
    /// the processor's profile).
    bytes: Box<[u8]>,
    /// The key's length in `bytes`; `None`: the record has no key.
    key_len: Option<usize>,
    /// Whether the record has a value (it may be empty).
    has_value: bool,
    /// [`forest_store::ProjectionCache::user_hash`] of the key (of no bytes if it has none),
    /// computed once, while the bytes are being copied in. Before session 15 the fold's three
    /// look-ahead stages each UTF-8 checked and hashed the key, and the cache update hashed
    /// the user id once more.
    pub user_hash: u64,
    /// Released by a replay script (see [`Merger::set_script`]): folded again to rebuild
    /// projections, its outputs already stored.
    pub replay: bool,
}

impl Rec {
    pub fn new(
        topic: u8,
        partition: i32,
        offset: i64,
        timestamp: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Self {
        let (k, v) = (key.unwrap_or_default(), value.unwrap_or_default());
        let mut bytes = Vec::with_capacity(k.len() + v.len());
        bytes.extend_from_slice(k);
        bytes.extend_from_slice(v);
        Self {
            topic,
            partition,
            offset,
            timestamp,
            bytes: bytes.into_boxed_slice(),
            key_len: key.map(<[u8]>::len),
            has_value: value.is_some(),
            user_hash: forest_store::ProjectionCache::user_hash(k),
            replay: false,
        }
    }

    /// Starts loading the record's bytes (key and value, at most 256 bytes) into the CPU
    /// cache. Why: a record is copied out of librdkafka when fetched and read again only when
    /// folded, a batch (megabytes) later, by which time its bytes have left the CPU's caches;
    /// the key check and the decoder then waited on them (the key's UTF-8 check and the
    /// decode were 17 % of a worker's samples at 100 K users).
    #[inline]
    pub fn prefetch(&self) {
        forest_domain::prefetch_lines(self.bytes.as_ptr(), self.bytes.len().min(256));
    }

    pub fn key(&self) -> Option<&[u8]> {
        self.key_len.and_then(|n| self.bytes.get(..n))
    }

    pub fn value(&self) -> Option<&[u8]> {
        let start = self.key_len.unwrap_or(0);
        if self.has_value {
            self.bytes.get(start..)
        } else {
            None
        }
    }

    fn order_key(&self) -> (i64, u8, i64) {
        (self.timestamp.unwrap_or(i64::MIN), self.topic, self.offset)
    }
}

struct Lane {
    buf: VecDeque<Rec>,
    /// Next offset this lane will receive from Kafka.
    position: i64,
    /// When the lane last became empty while not caught up.
    starved_since: Option<Instant>,
}

#[derive(Default)]
pub struct Merger {
    /// partition number -> lanes indexed by topic index (None: not assigned here).
    groups: FxHashMap<i32, Vec<Option<Lane>>>,
    buffered: usize,
    n_topics: usize,
    gaps: u64,
    early: u64,
    /// partition number -> the lane order (lane, records) a replay must follow first.
    scripts: FxHashMap<i32, VecDeque<(u8, u32)>>,
}

impl Merger {
    pub fn new(n_topics: usize) -> Self {
        Self {
            n_topics,
            ..Self::default()
        }
    }

    /// Records that arrived past their lane's next expected offset (see [`Merger::push`]).
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Records released out of the canonical order (see [`Merger::drain`]).
    pub fn early_releases(&self) -> u64 {
        self.early
    }

    /// Past this many buffered records the merge stops waiting for empty lanes and releases
    /// out of the canonical order. `max_buffered` is where the runtime starts holding fetching
    /// back (pausing, from three quarters of it, every lane that holds records; above it a poll
    /// round takes at most [`LANE_ROUND_MIN`] records, which only the empty lanes can deliver).
    /// An empty lane can still deliver one such round before it is paused in turn, so the
    /// buffer may legitimately pass `max_buffered` by up to one round per assigned lane while
    /// the merge waits for the lanes it needs; forcing a release there (as a bound of exactly
    /// `max_buffered` did) broke the order in a backpressure test with 12 lanes and a 50,000
    /// bound. Memory stays bounded by configuration: `max_buffered` + lanes x 500 records.
    pub fn hard_bound(&self, max_buffered: usize) -> usize {
        let lanes: usize = self
            .groups
            .values()
            .map(|l| l.iter().flatten().count())
            .sum();
        max_buffered.saturating_add(lanes.saturating_mul(LANE_ROUND_MIN))
    }

    /// Buffered records of one lane (0 if the lane is not assigned).
    pub fn lane_len(&self, topic: u8, partition: i32) -> usize {
        self.groups
            .get(&partition)
            .and_then(|l| l.get(topic as usize))
            .and_then(Option::as_ref)
            .map_or(0, |l| l.buf.len())
    }

    /// The next offset a lane expects (None if the lane is not assigned).
    pub fn lane_position(&self, topic: u8, partition: i32) -> Option<i64> {
        self.groups
            .get(&partition)
            .and_then(|l| l.get(topic as usize))
            .and_then(Option::as_ref)
            .map(|l| l.position)
    }

    /// (topic, partition) of every lane holding buffered records: the ones to pause when the
    /// buffer is filling up, so that fetching goes to the lanes the merge waits for.
    pub fn lanes_with_records(&self) -> impl Iterator<Item = (u8, i32)> + '_ {
        self.groups.iter().flat_map(|(&p, lanes)| {
            lanes.iter().enumerate().filter_map(move |(t, l)| {
                l.as_ref()
                    .filter(|l| !l.buf.is_empty())
                    .map(|_| (t as u8, p))
            })
        })
    }

    /// (topic, partition, next offset to receive, buffered) of every lane, for progress logs.
    pub fn lanes(&self) -> Vec<(u8, i32, i64, usize)> {
        let mut v: Vec<_> = self
            .groups
            .iter()
            .flat_map(|(&p, lanes)| {
                lanes.iter().enumerate().filter_map(move |(t, l)| {
                    l.as_ref().map(|l| (t as u8, p, l.position, l.buf.len()))
                })
            })
            .collect();
        v.sort_unstable();
        v
    }

    pub fn assign(&mut self, topic: u8, partition: i32, start: i64) {
        let lanes = self
            .groups
            .entry(partition)
            .or_insert_with(|| (0..self.n_topics).map(|_| None).collect());
        if let Some(old) = lanes[topic as usize].take() {
            self.buffered -= old.buf.len();
        }
        lanes[topic as usize] = Some(Lane {
            buf: VecDeque::new(),
            position: start,
            starved_since: None,
        });
    }

    /// Forgets every lane and its buffered (not yet applied) records.
    pub fn clear(&mut self) {
        self.groups.clear();
        self.scripts.clear();
        self.buffered = 0;
    }

    /// Makes the partition's next releases follow `runs` (lane, number of records) exactly,
    /// whatever the records' timestamps and however long a lane takes to deliver: the order a
    /// previous run folded them in, which a replay must repeat to rebuild the same state. The
    /// released records carry [`Rec::replay`]. Then the merge goes on as usual.
    pub fn set_script(&mut self, partition: i32, runs: impl IntoIterator<Item = (u8, u32)>) {
        let script: VecDeque<(u8, u32)> = runs.into_iter().filter(|&(_, n)| n > 0).collect();
        if script.is_empty() {
            self.scripts.remove(&partition);
        } else {
            self.scripts.insert(partition, script);
        }
    }

    /// Whether the partition still has a replay script to follow.
    pub fn replaying_partition(&self, partition: i32) -> bool {
        self.scripts.contains_key(&partition)
    }

    /// Whether some partition still has a replay script to follow.
    pub fn replaying(&self) -> bool {
        !self.scripts.is_empty()
    }

    /// Buffers a record. Records of lanes not assigned (a stale fetch after revocation) or
    /// already seen are dropped: they will be read again by whoever owns the partition.
    pub fn push(&mut self, rec: Rec) -> bool {
        let Some(Some(lane)) = self
            .groups
            .get_mut(&rec.partition)
            .map(|l| &mut l[rec.topic as usize])
        else {
            return false;
        };
        if rec.offset < lane.position {
            return false;
        }
        if rec.offset > lane.position {
            // Legitimate after transaction markers, compaction, retention (a log start past
            // 0) or at-least-once starts; otherwise records were skipped, which must never
            // happen: counted and logged so it is seen.
            self.gaps += 1;
            metrics::counter!(crate::metrics::OFFSET_GAPS).increment(1);
            tracing::warn!(
                topic = rec.topic,
                partition = rec.partition,
                expected = lane.position,
                got = rec.offset,
                "offset gap in an input partition"
            );
        }
        lane.position = rec.offset + 1;
        lane.starved_since = None;
        lane.buf.push_back(rec);
        self.buffered += 1;
        true
    }

    /// Hands the records that are ready, in merge order and at most `max` of them, to `f`. `caught_up(topic, partition,
    /// position)` says whether a lane has been read to its high watermark; `consumer_idle`
    /// whether the last poll emptied the consumer's local queue (only then does an empty lane's
    /// idle clock run).
    pub fn drain(
        &mut self,
        mut caught_up: impl FnMut(u8, i32, i64) -> bool,
        max_idle: Duration,
        max_buffered: usize,
        consumer_idle: bool,
        max: usize,
        mut f: impl FnMut(Rec),
    ) {
        let now = Instant::now();
        let mut released = 0;
        let force = self.buffered > self.hard_bound(max_buffered);
        let mut warned = false;
        let Self {
            groups,
            buffered,
            early,
            scripts,
            ..
        } = self;
        for (&partition, lanes) in groups.iter_mut() {
            if let Some(script) = scripts.get_mut(&partition) {
                // A replay: the recorded lane order, nothing else; a lane that has not
                // delivered yet holds the partition (its records are below the offsets the
                // previous run stored, so they exist).
                while let Some((t, n)) = script.front_mut() {
                    let Some(rec) = lanes
                        .get_mut(*t as usize)
                        .and_then(Option::as_mut)
                        .and_then(|l| l.buf.pop_front())
                    else {
                        break;
                    };
                    *n -= 1;
                    if *n == 0 {
                        script.pop_front();
                    }
                    *buffered -= 1;
                    f(Rec {
                        replay: true,
                        ..rec
                    });
                    released += 1;
                    if released >= max {
                        if script.is_empty() {
                            scripts.remove(&partition);
                        }
                        return;
                    }
                }
                if !script.is_empty() {
                    continue;
                }
                scripts.remove(&partition);
            }
            loop {
                let mut blocked = false;
                // Why this release would not be canonical, if an empty lane is behind.
                let mut early_reason = None;
                let mut waiting_for = None;
                for (t, lane) in lanes.iter_mut().enumerate() {
                    let Some(lane) = lane else { continue };
                    if !lane.buf.is_empty() {
                        continue;
                    }
                    if caught_up(t as u8, partition, lane.position) {
                        lane.starved_since = None;
                    } else if force {
                        lane.starved_since = None;
                        early_reason = Some("buffer_full");
                        waiting_for = Some((t, lane.position));
                    } else if !consumer_idle {
                        // Its records may be queued locally behind others': not idle.
                        lane.starved_since = None;
                        blocked = true;
                    } else {
                        let since = *lane.starved_since.get_or_insert(now);
                        if now.duration_since(since) < max_idle {
                            blocked = true;
                        } else {
                            early_reason.get_or_insert("idle");
                            waiting_for.get_or_insert((t, lane.position));
                        }
                    }
                }
                if blocked {
                    break;
                }
                let best = lanes
                    .iter()
                    .enumerate()
                    .filter_map(|(t, l)| {
                        l.as_ref()
                            .and_then(|l| l.buf.front())
                            .map(|h| (h.order_key(), t))
                    })
                    .min();
                let Some((_, t)) = best else { break };
                let Some(rec) = lanes[t].as_mut().and_then(|l| l.buf.pop_front()) else {
                    break;
                };
                *buffered -= 1;
                if let Some(reason) = early_reason {
                    if !warned {
                        // Once per call: enough to see which lane held the merge up.
                        warned = true;
                        tracing::warn!(
                            reason,
                            partition,
                            waiting_for = ?waiting_for,
                            buffered = *buffered,
                            "merge releasing records out of the canonical order"
                        );
                    }
                    *early += 1;
                    metrics::counter!(crate::metrics::MERGE_EARLY_RELEASES, "reason" => reason)
                        .increment(1);
                }
                f(rec);
                released += 1;
                if released >= max {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(topic: u8, offset: i64, ts: i64) -> Rec {
        Rec::new(topic, 0, offset, Some(ts), None, None)
    }

    #[test]
    fn a_record_keeps_its_key_and_value_apart_in_one_block() {
        let r = Rec::new(1, 2, 3, Some(4), Some(b"alice"), Some(b"payload"));
        assert_eq!(r.key(), Some(&b"alice"[..]));
        assert_eq!(r.value(), Some(&b"payload"[..]));
        let r = Rec::new(1, 2, 3, None, None, Some(b""));
        assert_eq!((r.key(), r.value()), (None, Some(&b""[..])));
        let r = Rec::new(1, 2, 3, None, Some(b""), None);
        assert_eq!((r.key(), r.value()), (Some(&b""[..]), None));
    }

    fn drain(m: &mut Merger, caught_up: bool) -> Vec<(u8, i64)> {
        drain_with(m, caught_up, usize::MAX)
            .into_iter()
            .map(|(t, o, _)| (t, o))
            .collect()
    }

    /// Up to `max` records: (topic, offset, replayed).
    fn drain_with(m: &mut Merger, caught_up: bool, max: usize) -> Vec<(u8, i64, bool)> {
        let mut got = vec![];
        m.drain(
            |_, _, _| caught_up,
            Duration::from_secs(60),
            1_000,
            true,
            max,
            |r| got.push((r.topic, r.offset, r.replay)),
        );
        got
    }

    #[test]
    fn merges_by_timestamp_then_topic_and_waits_for_lagging_lanes() {
        let mut m = Merger::new(2);
        m.assign(0, 0, 0);
        m.assign(1, 0, 0);
        for (o, ts) in [(0, 10), (1, 30)] {
            m.push(rec(0, o, ts));
        }
        // Lane 1 is empty and not caught up: nothing may go yet.
        assert!(drain(&mut m, false).is_empty());
        for (o, ts) in [(0, 10), (1, 20)] {
            m.push(rec(1, o, ts));
        }
        // Ties on timestamp go to the lower topic index; the lane that empties first blocks.
        assert_eq!(drain(&mut m, false), [(0, 0), (1, 0), (1, 1)]);
        // Once the empty lane is caught up, the rest flows.
        assert_eq!(drain(&mut m, true), [(0, 1)]);
        assert_eq!(m.buffered(), 0);
    }

    #[test]
    fn a_replay_script_overrides_the_timestamp_order_then_the_merge_goes_on() {
        let mut m = Merger::new(2);
        m.assign(0, 0, 0);
        m.assign(1, 0, 0);
        // The previous run folded lane 1's first record, then two of lane 0's, then lane
        // 1's second: not the timestamp order.
        m.set_script(0, [(1, 1), (0, 2), (1, 1)]);
        assert!(m.replaying());
        for (o, ts) in [(0, 10), (1, 20), (2, 30)] {
            m.push(rec(0, o, ts));
        }
        // Lane 1 has not delivered: the script waits for it, even with every lane caught up.
        assert!(drain(&mut m, true).is_empty());
        m.push(rec(1, 0, 40));
        assert_eq!(
            drain_with(&mut m, true, 2),
            [(1, 0, true), (0, 0, true)],
            "at most `max` at a time"
        );
        m.push(rec(1, 1, 5));
        // The script ends; then lane 1, empty and behind its high watermark, holds the rest.
        assert_eq!(drain(&mut m, false), [(0, 1), (1, 1)]);
        assert!(!m.replaying(), "the script is done");
        // Then the usual order, and records are no longer marked as replayed.
        m.push(rec(1, 2, 25));
        assert_eq!(
            drain_with(&mut m, true, usize::MAX),
            [(1, 2, false), (0, 2, false)]
        );
        assert_eq!(m.buffered(), 0);
    }

    #[test]
    fn stale_and_unassigned_records_are_dropped() {
        let mut m = Merger::new(2);
        m.assign(0, 0, 5);
        assert!(!m.push(rec(0, 4, 1)), "before the start offset");
        assert!(!m.push(rec(1, 0, 1)), "lane not assigned");
        assert!(m.push(rec(0, 5, 1)));
        assert_eq!(
            drain(&mut m, false),
            [(0, 5)],
            "an unassigned lane does not block"
        );
    }

    #[test]
    fn releases_past_a_lagging_lane_are_counted_as_early() {
        let mut m = Merger::new(2);
        m.assign(0, 0, 0);
        m.assign(1, 0, 0);
        // Two lanes: the hard bound is max_buffered + 2 rounds.
        assert_eq!(m.hard_bound(2), 2 + 2 * LANE_ROUND_MIN);
        let n = 2 + 2 * LANE_ROUND_MIN as i64;
        for o in 0..n {
            m.push(rec(0, o, o));
        }
        assert_eq!(m.lanes_with_records().collect::<Vec<_>>(), [(0, 0)]);
        assert_eq!(
            (m.lane_len(0, 0), m.lane_len(1, 0), m.lane_len(1, 9)),
            (n as usize, 0, 0)
        );
        let mut out = vec![];
        let mut drain = |m: &mut Merger, caught_up: bool, max_buffered: usize| {
            m.drain(
                |_, _, _| caught_up,
                Duration::from_secs(60),
                max_buffered,
                false,
                usize::MAX,
                |r| out.push(r.offset),
            )
        };
        // Under the bound, lane 1 (behind, not idle) blocks; nothing is early.
        drain(&mut m, false, n as usize);
        // Over max_buffered but within one round per lane of it, it still waits: the lane
        // it needs may be in the round that comes next.
        drain(&mut m, false, 2);
        assert_eq!(m.early_releases(), 0);
        // Past the hard bound, lane 0 is released past the lagging lane 1: counted.
        m.push(rec(0, n, n));
        drain(&mut m, false, 2);
        assert_eq!(m.early_releases(), n as u64 + 1);
        // Releases past a caught-up lane are canonical: not counted.
        m.push(rec(0, n + 1, n + 1));
        drain(&mut m, true, 2);
        assert_eq!(out, (0..n + 2).collect::<Vec<_>>());
        assert_eq!(m.early_releases(), n as u64 + 1);
    }

    #[test]
    fn an_idle_lane_stops_blocking_after_max_idle() {
        let mut m = Merger::new(2);
        m.assign(0, 0, 0);
        m.assign(1, 0, 0);
        m.push(rec(0, 0, 1));
        let mut out = vec![];
        // While the consumer still has records queued locally, the lane is not idle, however
        // long it has been empty.
        m.drain(
            |_, _, _| false,
            Duration::ZERO,
            1_000,
            false,
            usize::MAX,
            |r| out.push(r.offset),
        );
        assert!(out.is_empty());
        m.drain(
            |_, _, _| false,
            Duration::ZERO,
            1_000,
            true,
            1,
            |r| out.push(r.offset),
        );
        assert_eq!(out, [0]);
    }
}
