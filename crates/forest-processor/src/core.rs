//! The processor's state machine, independent of how records arrive: buffer, merge, fold,
//! commit, flush. The runtime drives it from the consumer loop and the rebalance callback.

use crate::merge::{Merger, Rec};
use crate::metrics as m;
use crate::replay::{self, Checkpoints};
use crate::sink::{Batch, Committer, Meta, Sink};
use crate::{CrashPoint, ProcessorConfig, ProcessorError, ProcessorStats};
use forest_domain::{Event, InputKind, Malformed, Rejection, RuleSet};
use forest_kafka::headers;
use forest_kafka::{OutboxProducer, fit_dead_letter};
use forest_store::{Flush, OutboxEntry, ProjectionCache, Store};
use prost::Message as _;
use rustc_hash::FxHashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many records ahead of the one being folded its user's cache entry is prefetched: enough
/// misses in flight to overlap, few enough that the lines are still in the CPU cache when used.
const LOOK_AHEAD: usize = 16;

/// A poisoned lock only means another thread panicked mid-push; the value is still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Core {
    /// Whatever ends a core (shutdown, revocation, an error) leaves no count unpublished.
    fn drop(&mut self) {
        self.publish_stats();
    }
}

/// See [`Core::publish_stats`].
#[derive(Debug, Default)]
struct Unpublished {
    consumed: u64,
    applied: u64,
    rejected: u64,
    trees: u64,
    deduplicated: u64,
    dead_lettered: u64,
    replayed: u64,
    replay_skipped: u64,
}

pub struct Core {
    rules: Arc<RuleSet>,
    /// Shared by the process's workers: each writes only its own partitions' users and
    /// offsets.
    pub store: Arc<Store>,
    cache: ProjectionCache,
    pub merger: Merger,
    /// Input topic names and kinds, by topic index.
    pub inputs: Vec<(String, InputKind)>,
    trees_topic: String,
    dlq_topic: String,
    /// Next offsets of partitions applied since the last commit.
    offsets: FxHashMap<(u8, i32), i64>,
    /// Next offsets of every assigned partition as of the last durable batch (for Kafka
    /// commits).
    pub committed: FxHashMap<(u8, i32), i64>,
    /// Next offsets as of the last batch closed (durable or still with the committer): what
    /// the next changelog checkpoint records for lanes the batch did not advance.
    pub handed: FxHashMap<(u8, i32), i64>,
    /// Next offset of each lane after the records folded so far, replayed ones included:
    /// the position a projection written now reflects.
    pos: FxHashMap<(u8, i32), i64>,
    /// Whether a batch became durable since [`Core::poll_durable`] last asked.
    progress: bool,
    pending: Vec<OutboxEntry>,
    /// Dead letters are cut to this many bytes (key + value + headers) before they are
    /// stored: the input's own record limit may exceed what the producer accepts once
    /// headers are added, and a dead letter Kafka refuses would stall its partition.
    dead_letter_max_bytes: usize,
    pub batch_records: usize,
    pub batch_started: Option<Instant>,
    /// Record timestamps of the batch, for the latency histogram.
    batch_ts: Vec<i64>,
    /// Every record is decoded into this one event, which keeps its strings' buffers: with
    /// a fresh event per record, prost's strings were up to five allocations and frees per
    /// record (see `Event::decode_into`).
    event: Event,
    /// The merge's released records between [`Core::drain`]'s steps, kept with its capacity:
    /// a fresh vector per call grew to a batch's size each time, and its new pages were a
    /// steady share of the kernel's page zeroing in profiles (session 11).
    ready: Vec<Rec>,
    /// Writes closed batches and delivers their outputs: inline, or on the committer thread.
    out: Output,
    stats: Arc<ProcessorStats>,
    crash_at: Option<CrashPoint>,
    applied_in_run: u64,
    batch_max: usize,
    dry_run: bool,
    pub at_least_once: bool,
    /// Metric increments of the batch, emitted once per commit: a labelled `counter!` looks
    /// its series up in the registry on every call, which cost more per event than the
    /// increment itself.
    tally: Tally,
    /// Per-record counts not yet added to the shared `stats` (see [`Core::publish_stats`]).
    unpublished: Unpublished,
    /// The changelog topic, when the projections are also written there.
    pub changelog: Option<String>,
    pub brokers: String,
    /// Transactions mode: outputs, changelog and input offsets in one Kafka transaction.
    pub transactions: bool,
    /// The consumer's group membership, which a transaction's offsets are committed under
    /// (so the broker fences a member that was rebalanced out). Set on every assignment.
    pub group_meta: Option<rdkafka::consumer::ConsumerGroupMetadata>,
    /// With the changelog: the input topics' partition count, set on assignment. Each record
    /// must then lie in the partition its user id hashes to (`forest_kafka::partition_of`),
    /// where its user's changelog projections go and where restores look for them; one that
    /// does not is dead-lettered (`Malformed::WrongPartition`) rather than folded into state
    /// no restore would find.
    pub partition_count: Option<i32>,
    /// When projections are stored, and the replay records of batches that did not store
    /// them (see [`crate::replay`]); `None` where replays cannot run (see [`replays_here`]).
    checkpoints: Option<Checkpoints>,
    /// The at-least-once baseline with a projection interval: the baseline it is compared
    /// with at that interval (see [`AloSpacing`]).
    alo: Option<AloSpacing>,
}

/// The at-least-once baseline's way of spacing projection writes, as plain at-least-once
/// processors do it (Kafka Streams: flush the state, then commit offsets, every commit
/// interval): a batch writes nothing until `interval` has passed since the last full write
/// (or the dirty users pass half the cache's bounds, or partitions are revoked), then writes
/// every dirty user; Kafka offsets are committed only as far as the last full write. A crash
/// re-applies everything since then. Without it, the baseline wrote every batch's users and
/// was no baseline for the effectively-once mode at an interval (session 11: 0.39 writes per
/// event against 0.10).
struct AloSpacing {
    interval: Duration,
    last_full: Instant,
    force: bool,
    max_dirty_users: usize,
    max_dirty_bytes: usize,
    /// Offsets of durable batches that wrote nothing: committed to Kafka with the next full
    /// write.
    held: Vec<((u8, i32), i64)>,
}

impl AloSpacing {
    fn flush(&mut self, cache: &ProjectionCache, now: Instant) -> (Flush, bool) {
        let full = self.force
            || now.duration_since(self.last_full) >= self.interval
            || cache.dirty_len() > self.max_dirty_users
            || cache.dirty_bytes() > self.max_dirty_bytes;
        if full {
            self.force = false;
            self.last_full = now;
            (Flush::ALL, true)
        } else {
            let none = Flush {
                before: 0,
                max_dirty: usize::MAX,
            };
            (none, false)
        }
    }
}

enum Output {
    Inline(Box<Sink>),
    Thread(Committer),
}

/// The inline sink (transactions mode always has one).
fn inline(out: &mut Output) -> Result<&mut Sink, ProcessorError> {
    match out {
        Output::Inline(s) => Ok(s),
        Output::Thread(_) => Err(ProcessorError::Committer("does not run transactions")),
    }
}

/// Per-batch counts behind the per-event metrics; label sets are small and bounded, so linear
/// scans of short vectors beat hashing.
#[derive(Default)]
pub(crate) struct Tally {
    consumed: [u64; 3],
    applied: u64,
    deduplicated: u64,
    grams: Vec<(&'static str, u64)>,
    rejected: Vec<(&'static str, u64)>,
    dead_lettered: Vec<(&'static str, u64)>,
    /// Trees matured, by species label: counted when the batch that matured them is
    /// durable, so a crash before the write (which replays the events and matures the same
    /// trees again) does not count them twice.
    trees: Vec<(&'static str, u64)>,
    dead_letters_truncated: u64,
    /// Records folded again by a replay (see the replay module).
    replayed: u64,
}

fn bump(v: &mut Vec<(&'static str, u64)>, label: &'static str, by: u64) {
    match v.iter_mut().find(|(l, _)| *l == label) {
        Some((_, n)) => *n += by,
        None => v.push((label, by)),
    }
}

impl Tally {
    pub(crate) fn emit(&mut self) {
        for (i, n) in self.consumed.iter_mut().enumerate() {
            if *n > 0 {
                let kind = [InputKind::Payment, InputKind::Mobility, InputKind::Command][i];
                metrics::counter!(m::EVENTS_CONSUMED, "topic" => kind_label(kind)).increment(*n);
                *n = 0;
            }
        }
        if self.applied > 0 {
            metrics::counter!(m::EVENTS_APPLIED).increment(std::mem::take(&mut self.applied));
        }
        if self.deduplicated > 0 {
            metrics::counter!(m::EVENTS_DEDUPLICATED)
                .increment(std::mem::take(&mut self.deduplicated));
        }
        for (b, g) in self.grams.drain(..) {
            metrics::counter!(m::GRAMS_CREDITED, "behaviour" => b).increment(g);
        }
        for (r, n) in self.rejected.drain(..) {
            metrics::counter!(m::EVENTS_REJECTED, "reason" => r).increment(n);
        }
        for (r, n) in self.dead_lettered.drain(..) {
            metrics::counter!(m::DLQ_RECORDS, "reason" => r).increment(n);
        }
        for (species, n) in self.trees.drain(..) {
            metrics::counter!(m::TREES_MATURED, "species" => species).increment(n);
        }
        if self.replayed > 0 {
            metrics::counter!(m::EVENTS_REPLAYED).increment(std::mem::take(&mut self.replayed));
        }
        if self.dead_letters_truncated > 0 {
            metrics::counter!(m::DLQ_TRUNCATED)
                .increment(std::mem::take(&mut self.dead_letters_truncated));
        }
    }
}

fn kind_slot(k: InputKind) -> usize {
    match k {
        InputKind::Payment => 0,
        InputKind::Mobility => 1,
        InputKind::Command => 2,
    }
}

impl Core {
    pub fn new(
        cfg: &ProcessorConfig,
        store: Arc<Store>,
        producer: OutboxProducer,
        stats: Arc<ProcessorStats>,
    ) -> Result<Self, ProcessorError> {
        let t = &cfg.topics;
        let mut producer = producer;
        // The lower of the configured cap and what this producer can send; the producer
        // cuts to the same bound, so an entry stored by this run is sent as stored.
        let dead_letter_max_bytes = cfg
            .dead_letter_max_bytes
            .unwrap_or(usize::MAX)
            .min(producer.dead_letter_max_bytes);
        producer.dead_letter_max_bytes = dead_letter_max_bytes;
        let transactions = cfg.exactly_once == crate::ExactlyOnce::Transactions;
        let changelog =
            ((cfg.changelog || transactions) && !cfg.dry_run && !cfg.at_least_once_baseline)
                .then(|| t.changelog.clone());
        // Where checkpoints land tells later assignments whether local state is current.
        producer.track_offsets = changelog.is_some();
        let inputs = vec![
            (t.payments.clone(), InputKind::Payment),
            (t.mobility.clone(), InputKind::Mobility),
            (t.commands.clone(), InputKind::Command),
        ];
        let sink = Sink::new(
            store.clone(),
            producer,
            stats.clone(),
            cfg.crash_at,
            Arc::clone(&cfg.store_write_delay_ms),
            cfg.max_outputs_in_flight,
            cfg.at_least_once_baseline,
            changelog.clone(),
        );
        let out = if transactions || !cfg.overlap_commits {
            Output::Inline(Box::new(sink))
        } else {
            Output::Thread(Committer::spawn(sink)?)
        };
        Ok(Self {
            rules: cfg.rules.clone(),
            store,
            cache: ProjectionCache::with_bounds(cfg.cache_users, cfg.cache_bytes),
            merger: Merger::new(inputs.len()),
            inputs,
            trees_topic: t.trees.clone(),
            dlq_topic: t.dlq.clone(),
            offsets: FxHashMap::default(),
            committed: FxHashMap::default(),
            handed: FxHashMap::default(),
            pos: FxHashMap::default(),
            progress: false,
            pending: Vec::new(),
            dead_letter_max_bytes,
            batch_records: 0,
            batch_started: None,
            batch_ts: Vec::new(),
            event: Event::placeholder(),
            ready: Vec::new(),
            out,
            stats,
            crash_at: cfg.crash_at,
            applied_in_run: 0,
            batch_max: cfg.batch_max_records.max(1),
            dry_run: cfg.dry_run,
            at_least_once: cfg.at_least_once_baseline,
            tally: Tally::default(),
            unpublished: Unpublished::default(),
            changelog,
            brokers: cfg.brokers.clone(),
            transactions,
            group_meta: None,
            partition_count: None,
            // Also with an interval of 0: replay records a run with spaced checkpoints left
            // are followed and deleted all the same.
            checkpoints: replays_here(cfg).then(|| {
                Checkpoints::new(cfg.projection_interval, cfg.cache_users, cfg.cache_bytes)
                    .with_pace(cfg.pace_projection_writes)
            }),
            alo: (cfg.at_least_once_baseline && !cfg.projection_interval.is_zero()).then(|| {
                AloSpacing {
                    interval: cfg.projection_interval,
                    last_full: Instant::now(),
                    force: false,
                    max_dirty_users: cfg.cache_users / 2,
                    max_dirty_bytes: cfg.cache_bytes / 2,
                    held: Vec::new(),
                }
            }),
        })
    }

    pub fn topic_index(&self, name: &str) -> Option<u8> {
        self.inputs
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| i as u8)
    }

    /// Buffers a consumed record for the merge.
    pub fn push(&mut self, rec: Rec) {
        self.tally.consumed[kind_slot(self.inputs[rec.topic as usize].1)] += 1;
        self.unpublished.consumed += 1;
        self.merger.push(rec);
    }

    /// Applies the records the merge releases, committing whenever a batch is full (so a
    /// batch never exceeds the configured size, however much the merge has ready). Between
    /// full batches it returns early once `stop` says so (shutdown) or `budget` has passed: a
    /// backlog in the merge buffer can be minutes of work, and until drain returns the loop
    /// neither polls (rebalances, `max.poll.interval.ms`) nor passes the durable offsets on to
    /// Kafka (lag tools saw no progress through a whole backlog). Returns whether records may
    /// still be ready (the caller then polls without waiting and drains again).
    pub fn drain(
        &mut self,
        mut caught_up: impl FnMut(u8, i32, i64) -> bool,
        max_idle: Duration,
        max_buffered: usize,
        consumer_idle: bool,
        budget: Duration,
        stop: impl Fn() -> bool,
    ) -> Result<bool, ProcessorError> {
        // The poll round's records, pushed just before, count as consumed from here.
        self.publish_stats();
        let started = Instant::now();
        let mut more = false;
        // Taken back below; an error ends this core, so its capacity does not matter then.
        let mut ready = std::mem::take(&mut self.ready);
        // Only the first call follows the poll that found the queue empty: by the next one,
        // time has gone on folding and writing (seconds, with a slow store or slow outputs)
        // without polling, which must not count as a lane idling.
        let mut consumer_idle = consumer_idle;
        loop {
            let room = self.batch_max.saturating_sub(self.batch_records).max(1);
            self.merger.drain(
                &mut caught_up,
                max_idle,
                max_buffered,
                consumer_idle,
                room,
                |r| ready.push(r),
            );
            consumer_idle = false;
            if ready.is_empty() {
                break;
            }
            // Each record's user is prefetched in stages, so that every load finds what the
            // stage before started: twice LOOK_AHEAD records on, the record's bytes
            // (`Rec::prefetch`); 3/2 LOOK_AHEAD on, reading its key, the user's map bucket
            // (`ProjectionCache::prefetch_entry`); LOOK_AHEAD on, finding the user there, its
            // cache slot (`ProjectionCache::prefetch`); half LOOK_AHEAD on, with the slot
            // loaded, its heap parts (counters, ids, credits, day quantities:
            // `ProjectionCache::prefetch_parts`). Session 14: the slot lookup waiting for its
            // bucket was the largest item of a 1 M-user profile.
            // Each stage finds the user by the hash the record computed when it was fetched
            // (`Rec::user_hash`). A record without a key is only a useless prefetch.
            for r in ready.iter().take(2 * LOOK_AHEAD) {
                r.prefetch();
            }
            for r in ready.iter().take(3 * LOOK_AHEAD / 2) {
                self.cache.prefetch_entry(r.user_hash);
            }
            for r in ready.iter().take(LOOK_AHEAD) {
                self.cache.prefetch(r.user_hash);
            }
            for (i, rec) in ready.iter().enumerate() {
                if let Some(r) = ready.get(i + 2 * LOOK_AHEAD) {
                    r.prefetch();
                }
                if let Some(r) = ready.get(i + 3 * LOOK_AHEAD / 2) {
                    self.cache.prefetch_entry(r.user_hash);
                }
                if let Some(r) = ready.get(i + LOOK_AHEAD) {
                    self.cache.prefetch(r.user_hash);
                }
                if let Some(r) = ready.get(i + LOOK_AHEAD / 2) {
                    self.cache.prefetch_parts(r.user_hash);
                }
                self.process(rec)?;
            }
            ready.clear();
            if self.batch_records >= self.batch_max {
                self.commit()?;
                if stop() || started.elapsed() >= budget {
                    more = true;
                    break;
                }
            }
        }
        self.ready = ready;
        self.publish_stats();
        metrics::gauge!(m::MERGE_BUFFERED).set(self.merger.buffered() as f64);
        Ok(more)
    }

    fn process(&mut self, rec: &Rec) -> Result<(), ProcessorError> {
        if self.batch_started.is_none() {
            self.batch_started = Some(Instant::now());
        }
        if let Some(ts) = rec.timestamp {
            self.batch_ts.push(ts);
        }
        let (topic_name, kind) = &self.inputs[rec.topic as usize];
        let event = &mut self.event;
        let decoded = match rec.timestamp {
            None => Err(Rejection::Malformed(Malformed::NoRecordTimestamp)),
            Some(ts) => event.decode_into(*kind, rec.value().unwrap_or_default(), ts),
        }
        .and_then(|()| {
            if rec.key() == Some(event.user_id.as_bytes()) {
                Ok(())
            } else {
                Err(Rejection::Malformed(Malformed::KeyMismatch {
                    key: String::from_utf8_lossy(rec.key().unwrap_or_default()).into_owned(),
                    user_id: event.user_id.clone(),
                }))
            }
        })
        .and_then(|()| match self.partition_count {
            Some(n) => match forest_kafka::partition_of(event.user_id.as_bytes(), n) {
                Some(p) if p != rec.partition => {
                    Err(Rejection::Malformed(Malformed::WrongPartition {
                        partition: rec.partition,
                        expected: p,
                    }))
                }
                _ => Ok(()),
            },
            None => Ok(()),
        });
        let event = &self.event;
        let rules = &self.rules;
        // A replayed record's outputs are stored already (see the replay module), and its
        // user's stored projection may hold it already: then it is not folded again.
        let replay = rec.replay;
        if replay {
            // Every replayed record lies below its lane's stored offset (the previous run
            // folded it); one at or past it means the log changed under the replay records,
            // and folding it as a replay would drop its outputs.
            let stored = self.committed.get(&(rec.topic, rec.partition)).copied();
            if stored.is_none_or(|o| rec.offset >= o) {
                return Err(ProcessorError::Replay {
                    topic: topic_name.clone(),
                    partition: rec.partition,
                    offset: rec.offset,
                    stored,
                });
            }
        }
        let replay_at = replay.then_some((rec.topic, rec.offset));
        let result = match decoded {
            // The key is the user id (checked above), so its hash is the user's.
            Ok(()) => self.cache.update_at(
                &self.store,
                &event.user_id,
                rec.user_hash,
                rec.partition,
                replay_at,
                |s| rules.apply(s, event),
            )?,
            Err(r) => Some(Err(r)),
        };
        self.pos.insert((rec.topic, rec.partition), rec.offset + 1);
        if replay {
            self.unpublished.replayed += 1;
            self.tally.replayed += 1;
        }
        let Some(result) = result else {
            // Replayed, and already in the stored projection.
            self.unpublished.replay_skipped += 1;
            return self.counted();
        };
        match result {
            Ok(_) if replay => {
                self.unpublished.applied += 1;
                self.tally.applied += 1;
            }
            Err(r) if replay => {
                self.unpublished.rejected += 1;
                bump(&mut self.tally.rejected, r.code(), 1);
            }
            Ok(outcome) => {
                self.unpublished.applied += 1;
                self.tally.applied += 1;
                if let Some(c) = &outcome.credit {
                    if c.credited_g > 0 {
                        bump(&mut self.tally.grams, c.behaviour.as_str(), c.credited_g);
                    }
                }
                for tree in outcome.trees {
                    self.unpublished.trees += 1;
                    bump(&mut self.tally.trees, species_label(&tree.species_id), 1);
                    self.pending.push(OutboxEntry {
                        partition: None,
                        topic: self.trees_topic.clone(),
                        key: tree.user_id.as_bytes().to_vec(),
                        value: tree.encode_to_vec(),
                        headers: vec![],
                    });
                }
            }
            Err(r) => {
                self.unpublished.rejected += 1;
                *lock(&self.stats.rejections).entry(r.code()).or_insert(0) += 1;
                bump(&mut self.tally.rejected, r.code(), 1);
                if r == Rejection::Duplicate {
                    self.unpublished.deduplicated += 1;
                    self.tally.deduplicated += 1;
                } else {
                    self.unpublished.dead_lettered += 1;
                    bump(&mut self.tally.dead_lettered, r.code(), 1);
                    let mut dead_letter = OutboxEntry {
                        partition: None,
                        topic: self.dlq_topic.clone(),
                        key: rec.key().unwrap_or_default().to_vec(),
                        value: rec.value().unwrap_or_default().to_vec(),
                        headers: vec![
                            (headers::REASON.into(), r.code().as_bytes().to_vec()),
                            (headers::ERROR.into(), r.to_string().into_bytes()),
                            (headers::SOURCE_TOPIC.into(), topic_name.as_bytes().to_vec()),
                            (
                                headers::SOURCE_PARTITION.into(),
                                rec.partition.to_string().into_bytes(),
                            ),
                            (
                                headers::SOURCE_OFFSET.into(),
                                rec.offset.to_string().into_bytes(),
                            ),
                        ],
                    };
                    if fit_dead_letter(&mut dead_letter, self.dead_letter_max_bytes) {
                        self.tally.dead_letters_truncated += 1;
                    }
                    self.pending.push(dead_letter);
                }
            }
        }
        if !replay {
            self.offsets
                .insert((rec.topic, rec.partition), rec.offset + 1);
            if let Some(c) = &mut self.checkpoints {
                // A batch that is not a checkpoint needs its fold order: every batch with
                // spaced checkpoints, and batches during a replay (which defers checkpoints).
                if c.spaced() || self.merger.replaying() {
                    c.folded(rec.topic, rec.partition);
                }
            }
        }
        self.counted()
    }

    /// Records applied (or rejected) by this run so far.
    pub fn applied_in_run(&self) -> u64 {
        self.applied_in_run
    }

    /// One more record of the batch (applied, rejected or skipped by a replay).
    fn counted(&mut self) -> Result<(), ProcessorError> {
        self.batch_records += 1;
        self.applied_in_run += 1;
        if self.crash_at == Some(CrashPoint::AfterApplied(self.applied_in_run)) {
            return Err(ProcessorError::InjectedCrash(CrashPoint::AfterApplied(
                self.applied_in_run,
            )));
        }
        Ok(())
    }

    /// Adds the per-record counts gathered since the last call to the shared
    /// [`ProcessorStats`]. Why not per record: every worker of the process increments the
    /// same atomics, so each increment pulled their cache line from the other core (session
    /// 14: 0.8-3 % of a 1 M-user profile's samples on one such increment). Called once per
    /// poll round (at the start of [`Core::drain`], after that round's records were pushed),
    /// per commit, at the end of `drain`, and on drop, so readers see the counts at most one
    /// poll round or batch late.
    pub fn publish_stats(&mut self) {
        let u = std::mem::take(&mut self.unpublished);
        for (n, counter) in [
            (u.consumed, &self.stats.consumed),
            (u.applied, &self.stats.applied),
            (u.rejected, &self.stats.rejected),
            (u.trees, &self.stats.trees),
            (u.deduplicated, &self.stats.deduplicated),
            (u.dead_lettered, &self.stats.dead_lettered),
            (u.replayed, &self.stats.replayed),
            (u.replay_skipped, &self.stats.replay_skipped),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Closes the batch: serialises its projections, offsets and outbox into one store write
    /// and hands it to the sink (which writes it, then delivers the outputs). Returns true if
    /// there was anything to close. With the committer thread, the batch is durable later:
    /// [`Core::poll_durable`] and [`Core::flush_outputs`] collect that.
    pub fn commit(&mut self) -> Result<bool, ProcessorError> {
        self.publish_stats();
        self.collect(false)?;
        if self.dry_run {
            // A rebuild: fold and store, emit nothing.
            self.pending.clear();
        }
        // Which dirty users this batch writes: all of them, unless projections are spaced.
        let now = Instant::now();
        let next = self.cache.next_ticket();
        // Whether the spaced at-least-once baseline writes everything in this batch.
        let mut alo_full = true;
        let flush = match &mut self.checkpoints {
            Some(c) => {
                for p in c.held() {
                    if !self.merger.replaying_partition(p) {
                        c.replay_done(p, next);
                    }
                }
                c.flush(&self.cache, now)
            }
            None => match &mut self.alo {
                Some(a) => {
                    let (flush, full) = a.flush(&self.cache, now);
                    alo_full = full;
                    flush
                }
                None => Flush::ALL,
            },
        };
        let oldest = self.cache.oldest_dirty();
        let flush_work =
            oldest.is_some_and(|s| s < flush.before) || self.cache.dirty_len() > flush.max_dirty;
        let delete_work = self
            .checkpoints
            .as_ref()
            .is_some_and(|c| c.deletes_due(oldest));
        // A batch of replayed records only still closes (an almost empty write): it takes a
        // ticket, so the users it dirtied get their turn to be written and the replay records
        // their turn to go, even if no new input ever arrives.
        // The spaced baseline's first full write after batches that wrote nothing commits
        // their offsets to Kafka, even if it has nothing else to do.
        let release_work = alo_full && self.alo.as_ref().is_some_and(|a| !a.held.is_empty());
        if self.batch_records == 0
            && self.offsets.is_empty()
            && self.pending.is_empty()
            && !flush_work
            && !delete_work
            && !release_work
        {
            // Nothing to store (and no batch open: a record would have counted).
            return Ok(false);
        }
        let closed = Instant::now();
        if let Some(b) = self.batch_started {
            self.stats
                .stage_batch
                .record_ms(closed.duration_since(b).as_millis() as u64);
        }
        // Index in `pending` of each partition's checkpoint.
        let mut checkpoints: Vec<(usize, i32)> = Vec::new();
        if let Some(topic) = &self.changelog {
            // After the batch's trees and dead letters (see the changelog module on why the
            // order matters): every changed projection, then each advanced partition's
            // checkpoint.
            for s in self.cache.dirty_states() {
                self.pending.push(crate::changelog::projection(topic, s)?);
            }
            let mut parts: Vec<i32> = self.offsets.keys().map(|&(_, p)| p).collect();
            parts.sort_unstable();
            parts.dedup();
            for p in parts {
                // A lane this batch did not advance is where the batches before left it
                // (closed ones: the checkpoint is written after them).
                let lane = |t: u8| {
                    self.offsets
                        .get(&(t, p))
                        .or_else(|| self.handed.get(&(t, p)))
                        .or_else(|| self.committed.get(&(t, p)))
                        .copied()
                        .unwrap_or(-1)
                };
                checkpoints.push((self.pending.len(), p));
                self.pending.push(crate::changelog::checkpoint(
                    topic,
                    p,
                    [lane(0), lane(1), lane(2)],
                ));
            }
        }
        if self.transactions {
            return self.commit_transaction(closed, &checkpoints);
        }
        let inputs = &self.inputs;
        let offsets: Vec<(&str, i32, i64)> = self
            .offsets
            .iter()
            .map(|(&(t, p), &o)| (inputs[t as usize].0.as_str(), p, o))
            .collect();
        // The at-least-once baseline keeps neither offsets nor outputs in the store.
        let (offsets, outbox) = if self.at_least_once {
            (Vec::new(), &[][..])
        } else {
            (offsets, &self.pending[..])
        };
        let pos = &self.pos;
        let position =
            |p: i32| [0u8, 1, 2].map(|t| pos.get(&(t, p)).copied().unwrap_or(replay::BEGINNING));
        let prepared = self
            .cache
            .prepare_flush(&self.store, flush, position, offsets, outbox);
        let (mut prepared, ticket, written) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.discard_batch();
                return Err(e.into());
            }
        };
        if let Some(c) = &mut self.checkpoints {
            let dirty_left = self.cache.dirty_len() > 0;
            let watermark = self.cache.oldest_dirty();
            // Where each lane stood before this batch: the batches closed before it.
            let handed = &self.handed;
            let replays = c.prepared(ticket, now, dirty_left, watermark, |t, p| {
                handed.get(&(t, p)).copied()
            });
            self.stats
                .replay_records
                .fetch_add(replays.put.len() as u64, Ordering::Relaxed);
            for (p, seq, bytes) in replays.put {
                self.store.put_replay(&mut prepared, p, seq, &bytes);
            }
            for (p, seqs) in replays.delete {
                self.store.delete_replay(&mut prepared, p, seqs);
            }
        }
        let writes = prepared.writes();
        let mut meta = self.close_batch(ticket, writes, closed, written as u64);
        meta.full = alo_full;
        let batch = Batch {
            prepared,
            entries: std::mem::take(&mut self.pending),
            checkpoints,
            meta,
        };
        match &mut self.out {
            Output::Inline(sink) => match sink.complete(batch) {
                Ok(meta) => self.on_durable(meta),
                Err(e) => {
                    // What the store holds is the truth; the events are replayed from there.
                    self.cache.forget_undurable();
                    return Err(e);
                }
            },
            Output::Thread(committer) => {
                let t = Instant::now();
                committer.submit(batch)?;
                self.stats
                    .stage_handoff
                    .record_ms(t.elapsed().as_millis() as u64);
            }
        }
        Ok(true)
    }

    /// The batch's bookkeeping, taken out of the core, which starts a fresh batch.
    fn close_batch(&mut self, ticket: u64, writes: u64, closed: Instant, written: u64) -> Meta {
        let offsets: Vec<((u8, i32), i64)> = self.offsets.drain().collect();
        let shown = offsets
            .iter()
            .map(|&((t, p), o)| (self.inputs[t as usize].0.clone(), p, o))
            .collect();
        self.handed.extend(offsets.iter().copied());
        let meta = Meta {
            ticket,
            offsets,
            shown,
            tally: std::mem::take(&mut self.tally),
            records: self.batch_records,
            writes,
            closed,
            batch_ts: std::mem::take(&mut self.batch_ts),
            written,
            full: true,
        };
        self.batch_records = 0;
        self.batch_started = None;
        meta
    }

    /// A batch is durable (and its outputs delivered): its users may leave the cache, and
    /// its offsets go to Kafka with the next commit there.
    fn on_durable(&mut self, meta: Meta) {
        self.cache.durable(meta.ticket);
        if let Some(a) = &mut self.alo {
            if !meta.full {
                a.held.extend(meta.offsets);
                return;
            }
            // Batches are durable in order: this full write covers every batch held.
            self.committed.extend(a.held.drain(..));
        }
        self.committed.extend(meta.offsets);
        self.progress = true;
    }

    /// Collects the batches the committer thread finished (with `wait`, waits for all of
    /// them and for every output to be acknowledged). A failure there is returned here.
    fn collect(&mut self, wait: bool) -> Result<(), ProcessorError> {
        let Output::Thread(committer) = &mut self.out else {
            return Ok(());
        };
        let mut done = Vec::new();
        let result = committer.collect(wait, |meta| done.push(meta));
        for meta in done {
            self.on_durable(meta);
        }
        result
    }

    /// Whether a batch became durable since the last call (then the durable offsets should
    /// go to Kafka), after collecting what the committer finished.
    pub fn poll_durable(&mut self) -> Result<bool, ProcessorError> {
        self.collect(false)?;
        Ok(std::mem::take(&mut self.progress))
    }

    /// Whether a closed batch is still being written or delivered. A partial batch that is
    /// due waits while this holds (and takes in more records) rather than queueing behind it.
    pub fn committer_busy(&self) -> bool {
        matches!(&self.out, Output::Thread(c) if c.busy())
    }

    /// Forgets a batch that did not become durable: its cached changes and its metric
    /// tallies (a restart replays its events and counts them then).
    fn discard_batch(&mut self) {
        self.cache.discard_dirty();
        self.tally = Tally::default();
    }

    /// Transactions mode: the batch's outputs, changelog records and input offsets go in one
    /// Kafka transaction; only once it committed are the projections and offsets written to
    /// RocksDB, with the changelog end the store now reflects. A crash between the two leaves
    /// the store behind the changelog, and the next assignment restores the partition from it
    /// (see `runtime::restore_stale`). A failed transaction was aborted: the batch's state is
    /// dropped and the error stops the worker; a restart resumes from the store, or the
    /// changelog, and re-reads the batch.
    fn commit_transaction(
        &mut self,
        closed: Instant,
        checkpoints: &[(usize, i32)],
    ) -> Result<bool, ProcessorError> {
        let entries: Vec<(u64, OutboxEntry)> = (0..).zip(self.pending.drain(..)).collect();
        let mut tpl = rdkafka::TopicPartitionList::with_capacity(self.offsets.len());
        for (&(t, p), &o) in &self.offsets {
            tpl.add_partition_offset(&self.inputs[t as usize].0, p, rdkafka::Offset::Offset(o))
                .map_err(|source| ProcessorError::Kafka {
                    op: "build the transaction's offsets",
                    source,
                })?;
        }
        let Some(group) = &self.group_meta else {
            self.discard_batch();
            return Err(ProcessorError::Config(
                "transactions mode: no consumer group membership to commit offsets under".into(),
            ));
        };
        let sink = inline(&mut self.out)?;
        let sent = sink
            .producer
            .begin()
            .and_then(|()| sink.producer.send(&entries))
            .and_then(|()| sink.producer.commit_transaction(&tpl, group));
        let delivered = match sent {
            Ok(n) => n,
            Err(e) => {
                self.discard_batch();
                return Err(e.into());
            }
        };
        self.stats.transactions.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::TRANSACTIONS).increment(1);
        self.stats
            .outputs_delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
        let sink = inline(&mut self.out)?;
        sink.batches_in_run += 1;
        if self.crash_at == Some(CrashPoint::AfterTransaction(sink.batches_in_run)) {
            return Err(ProcessorError::InjectedCrash(CrashPoint::AfterTransaction(
                sink.batches_in_run,
            )));
        }
        // Where each checkpoint landed: the changelog partition ends right after it and the
        // transaction's commit marker.
        let acked: FxHashMap<u64, i64> = sink.producer.take_acked_offsets().into_iter().collect();
        let changelog = self.changelog.clone().unwrap_or_default();
        let mut ends: Vec<(i32, i64)> = Vec::with_capacity(checkpoints.len());
        for &(i, p) in checkpoints {
            if let Some(o) = acked.get(&entries[i].0) {
                ends.push((p, o + 2));
            }
        }
        let inputs = &self.inputs;
        let offsets: Vec<(&str, i32, i64)> = self
            .offsets
            .iter()
            .map(|(&(t, p), &o)| (inputs[t as usize].0.as_str(), p, o))
            .chain(ends.iter().map(|&(p, e)| (changelog.as_str(), p, e)))
            .collect();
        let written = self.cache.dirty_len() as u64;
        let writes = written + offsets.len() as u64;
        if let Err(e) = self.cache.commit(&self.store, offsets, &[]) {
            self.discard_batch();
            return Err(e.into());
        }
        // The cache already counts the write durable (ticket 0: nothing to report).
        let mut meta = self.close_batch(0, writes, closed, written);
        let sink = inline(&mut self.out)?;
        sink.durable(&mut meta);
        sink.finish(&mut meta);
        self.on_durable(meta);
        Ok(true)
    }

    /// Partitions are being revoked or the worker stops: the next commit writes every changed
    /// projection (a partition still replaying keeps its replay records; see the replay
    /// module).
    pub fn force_checkpoint(&mut self) {
        if let Some(c) = &mut self.checkpoints {
            c.force();
        }
        if let Some(a) = &mut self.alo {
            a.force = true;
        }
    }

    /// After a revocation: what was assigned is forgotten (the store has it all).
    pub fn revoked(&mut self) {
        self.merger.clear();
        self.committed.clear();
        self.handed.clear();
        self.pos.clear();
        if let Some(c) = &mut self.checkpoints {
            c.revoked();
        }
        if let Some(a) = &mut self.alo {
            a.held.clear();
        }
        // Another worker of this process may get these partitions and change their users in
        // the shared store: cached copies would go stale.
        self.cache.clear();
    }

    /// On assignment of `partitions` (numbers): reads their replay records, scripts the merge
    /// to fold them again, and returns where each replaying partition's lanes must start.
    /// Empty when checkpoints are not spaced.
    pub fn resume(
        &mut self,
        partitions: &[i32],
    ) -> Result<FxHashMap<i32, [i64; 3]>, ProcessorError> {
        let mut starts = FxHashMap::default();
        let Some(c) = &mut self.checkpoints else {
            return Ok(starts);
        };
        for &p in partitions {
            let log = self.store.replay_log(p)?;
            let plan = replay::plan(p, &log)?;
            c.resumed(p, plan.as_ref().map(|r| r.seqs.clone()));
            if let Some(r) = plan {
                let records: u64 = r.runs.iter().map(|&(_, n)| u64::from(n)).sum();
                tracing::info!(
                    partition = p,
                    from = ?r.from,
                    records,
                    "folding again the records since the oldest of its projections not yet written"
                );
                self.merger.set_script(p, r.runs);
                starts.insert(p, r.from);
            }
        }
        Ok(starts)
    }

    /// A lane was assigned with this stored offset (where live folding starts).
    pub fn lane_assigned(&mut self, lane: u8, partition: i32, start: i64, stored: Option<i64>) {
        self.pos.insert((lane, partition), start);
        if let Some(c) = &mut self.checkpoints {
            c.assigned(lane, partition, stored);
        }
    }

    /// With no batch open: writes the users whose turn has come and deletes the replay
    /// records that are done with, so they do not wait for the next record.
    pub fn flush_if_due(&mut self) -> Result<(), ProcessorError> {
        let idle_work = self.batch_records == 0
            && (self
                .checkpoints
                .as_ref()
                .is_some_and(|c| self.cache.dirty_len() > 0 || c.deletes_due(None))
                || self.alo.as_ref().is_some_and(|a| {
                    (self.cache.dirty_len() > 0 || !a.held.is_empty())
                        && a.last_full.elapsed() >= a.interval
                }));
        if idle_work {
            self.commit()?;
        }
        Ok(())
    }

    /// Waits until everything closed is durable and every output sent is acknowledged:
    /// before partitions are revoked and on shutdown.
    pub fn flush_outputs(&mut self) -> Result<(), ProcessorError> {
        match &mut self.out {
            Output::Inline(sink) => sink.flush_outputs(),
            Output::Thread(_) => self.collect(true),
        }
    }
}

/// Whether this configuration keeps projections, offsets and outputs in the store alone, the
/// one in which replay records are written and followed: the outbox mode without the
/// changelog (whose records carry every batch's projections), a dry run or the at-least-once
/// baseline. A store with replay records is refused in the others.
pub(crate) fn replays_here(cfg: &ProcessorConfig) -> bool {
    cfg.exactly_once == crate::ExactlyOnce::Outbox
        && !cfg.changelog
        && !cfg.dry_run
        && !cfg.at_least_once_baseline
}

fn kind_label(k: InputKind) -> &'static str {
    match k {
        InputKind::Payment => "payments",
        InputKind::Mobility => "mobility",
        InputKind::Command => "commands",
    }
}

/// Species ids come from the rules file, a bounded set; anything else is folded into "other".
fn species_label(id: &str) -> &'static str {
    match id {
        "saxaul" => "saxaul",
        "red_willow" => "red_willow",
        "sand_willow" => "sand_willow",
        "mongolian_pine" => "mongolian_pine",
        "populus_euphratica" => "populus_euphratica",
        _ => "other",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The per-batch metrics against a real (embedded) broker: what the gauges and counters
    //! say across a crash and a restart.

    use super::*;
    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
    use std::collections::HashMap;
    use std::sync::atomic::AtomicU64;

    /// Counters and gauges by name (labels summed), for `metrics::with_local_recorder`.
    #[derive(Default)]
    struct TestRecorder(Mutex<HashMap<String, Arc<AtomicU64>>>);

    impl TestRecorder {
        fn slot(&self, key: &Key) -> Arc<AtomicU64> {
            let labels: Vec<String> = key.labels().map(|l| format!("{l:?}")).collect();
            let id = format!("{}{labels:?}", key.name());
            lock(&self.0).entry(id).or_default().clone()
        }

        fn counter(&self, name: &str) -> u64 {
            lock(&self.0)
                .iter()
                .filter(|(k, _)| k.split('[').next() == Some(name))
                .map(|(_, v)| v.load(Ordering::Relaxed))
                .sum()
        }

        fn gauge(&self, name: &str) -> Option<f64> {
            lock(&self.0)
                .get(&format!("{name}[]"))
                .map(|v| f64::from_bits(v.load(Ordering::Relaxed)))
        }
    }

    impl metrics::Recorder for TestRecorder {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.slot(key))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(self.slot(key))
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    /// A scratch directory, removed on drop (no tempfile dependency in this crate).
    pub(crate) struct Scratch(pub(crate) std::path::PathBuf);

    impl Scratch {
        pub(crate) fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "forest-core-{name}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            Self(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cheap_rules() -> Arc<RuleSet> {
        let mut text = forest_domain::DEFAULT_RULES_TOML.to_string();
        for cost in ["17900", "22400", "19680", "146210", "215680"] {
            text = text.replace(&format!("cost_g = {cost}"), "cost_g = 100");
        }
        Arc::new(RuleSet::from_toml(&text).expect("cheap rules"))
    }

    /// Three undecodable payments, then one valid utility bill (262 g: two trees at 100 g).
    fn records(now_ms: i64) -> Vec<Rec> {
        use forest_proto::v1 as pb;
        let mut out: Vec<Rec> = (0..3)
            .map(|i| Rec::new(0, 0, i, Some(now_ms), Some(b"mallory"), Some(&[0, 1, 2, 3])))
            .collect();
        let value = pb::PaymentEvent {
            envelope: Some(pb::Envelope {
                event_id: "e-1".into(),
                user_id: "alice".into(),
                occurred_at_ms: now_ms - 60_000,
                source: "test".into(),
                schema_version: forest_proto::SCHEMA_VERSION,
            }),
            kind: pb::PaymentKind::UtilityBill as i32,
            amount: Some(pb::Money {
                amount_minor: 10_000,
                currency: "CNY".into(),
            }),
            merchant_id: String::new(),
        }
        .encode_to_vec();
        out.push(Rec::new(
            0,
            0,
            3,
            Some(now_ms),
            Some(b"alice"),
            Some(&value),
        ));
        out
    }

    /// Trees are counted once their batch is durable (not when folded: a crash before the
    /// write replays and re-matures them), and the outbox gauge shows the entries the store
    /// holds: N after a crash between the write and the delivery, still N on restart, 0 once
    /// the leftovers are delivered.
    #[test]
    fn trees_count_when_durable_and_the_outbox_gauge_shows_the_stored_entries() {
        let rec = TestRecorder::default();
        metrics::with_local_recorder(&rec, || {
            let broker = forest_kafka::EmbeddedBroker::start(1).unwrap();
            let bootstrap = broker.bootstrap_servers();
            let dir = Scratch::new("metrics");
            let mut cfg = ProcessorConfig::new(&bootstrap, &dir.0);
            cfg.topics = crate::Topics::prefixed("core-test.");
            forest_kafka::ensure_topics(
                Some(&broker),
                &bootstrap,
                &[],
                &[(&cfg.topics.trees, 1), (&cfg.topics.dlq, 1)],
                1,
            )
            .unwrap();
            cfg.rules = cheap_rules();
            // Inline: the local recorder sees this thread's metrics only.
            cfg.overlap_commits = false;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let stats = Arc::new(ProcessorStats::default());
            let core = |cfg: &ProcessorConfig, store: &Arc<Store>| {
                let producer = OutboxProducer::new(&bootstrap, &[]).unwrap();
                Core::new(cfg, store.clone(), producer, stats.clone()).unwrap()
            };

            // A crash after the fold, before the write: nothing is counted.
            let store = Arc::new(Store::open(&dir.0, &cfg.store).unwrap());
            cfg.crash_at = Some(CrashPoint::AfterApplied(4));
            let mut c = core(&cfg, &store);
            let mut crashed = false;
            for r in records(now_ms) {
                crashed |= matches!(c.process(&r), Err(ProcessorError::InjectedCrash(_)));
            }
            assert!(crashed);
            // The run loop publishes per poll round; this test calls `process` directly.
            c.publish_stats();
            assert!(
                ProcessorStats::get(&stats.trees) > 0,
                "the fold matured trees"
            );
            assert_eq!(rec.counter(m::TREES_MATURED), 0, "counted before durable");
            drop(c);

            // The replay, written, then a crash before the outbox is delivered.
            cfg.crash_at = Some(CrashPoint::AfterStoreWrite(1));
            let mut c = core(&cfg, &store);
            for r in records(now_ms) {
                c.process(&r).unwrap();
            }
            let trees = c.pending.len() as u64 - 3;
            assert!(trees > 0);
            assert!(matches!(c.commit(), Err(ProcessorError::InjectedCrash(_))));
            assert_eq!(rec.counter(m::TREES_MATURED), trees);
            let left = 3 + trees;
            assert_eq!(store.outbox_depth(), left);
            assert_eq!(rec.gauge(m::OUTBOX_DEPTH), Some(left as f64));
            drop(c);
            drop(store);

            // Restart: the gauge shows what the store holds until it is delivered.
            let store = Store::open(&dir.0, &cfg.store).unwrap();
            assert_eq!(store.outbox_depth(), left);
            metrics::gauge!(m::OUTBOX_DEPTH).set(-1.0);
            cfg.crash_at = None;
            let delivered = crate::runtime::deliver_leftovers(&cfg, &store, &stats).unwrap();
            assert_eq!(delivered as u64, left);
            assert_eq!(store.outbox_depth(), 0);
            assert_eq!(store.outbox_len().unwrap(), 0);
            assert_eq!(rec.gauge(m::OUTBOX_DEPTH), Some(0.0));
            assert_eq!(rec.counter(m::TREES_MATURED), trees, "not counted again");
        });
    }
}
