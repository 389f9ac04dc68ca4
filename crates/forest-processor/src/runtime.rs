//! The consumer loop and the rebalance callbacks around [`Core`].

use crate::core::{Core, lock};
use crate::merge::Rec;
use crate::metrics as m;
use crate::{ProcessorConfig, ProcessorError, ProcessorStats, Shutdown};
use forest_kafka::{ClientConfigExt, client_config};
use forest_store::Store;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use rustc_hash::FxHashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which input partitions (by number) some worker of this process owns, and since when each
/// other partition the store has state for has been unowned: the state retention's clock.
/// Shared by the workers. The assign callback holds its lock while it restores and seeks, and
/// the cleanup while it deletes, so a partition is never deleted while it is being assigned.
#[derive(Default)]
pub(crate) struct Ownership {
    owners: FxHashMap<i32, usize>,
    released: FxHashMap<i32, Instant>,
}

impl Ownership {
    fn acquire(&mut self, parts: &[i32]) {
        for p in parts {
            *self.owners.entry(*p).or_insert(0) += 1;
            self.released.remove(p);
        }
    }

    fn release(&mut self, parts: &[i32], now: Instant) {
        for p in parts {
            if let Some(n) = self.owners.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.owners.remove(p);
                    self.released.insert(*p, now);
                }
            }
        }
    }

    /// Partitions unowned for at least `retention`.
    fn due(&self, retention: Duration) -> Vec<i32> {
        let mut due: Vec<i32> = self
            .released
            .iter()
            .filter(|(_, since)| since.elapsed() >= retention)
            .map(|(p, _)| *p)
            .collect();
        due.sort_unstable();
        due
    }
}

/// The distinct partition numbers in a rebalance's list.
fn partition_numbers(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    parts.sort_unstable();
    parts.dedup();
    parts
}

struct Ctx {
    core: Arc<Mutex<Core>>,
    /// Set when the run must stop without committing anything more: an injected crash, or an
    /// error after which the in-memory state may not match the store.
    fatal: Mutex<Option<ProcessorError>>,
    stats: Arc<ProcessorStats>,
    /// Bumped by every rebalance of this consumer, so the poll loop can drop records it polled
    /// before a revoke (the new assignment re-reads them from the stored offsets).
    generation: std::sync::atomic::AtomicU64,
    /// When the oldest unanswered Kafka offset commit was sent (for its latency histogram).
    commit_started: Mutex<Option<std::time::Instant>>,
    ownership: Arc<Mutex<Ownership>>,
    /// Partitions this worker holds (`ProcessorStats::workers_assigned` counts the workers
    /// with any).
    assigned: std::sync::atomic::AtomicI64,
    /// Whether this worker has had an assignment yet, even an empty one
    /// (`ProcessorStats::workers_joined`).
    joined: AtomicBool,
    /// Routes assigned partitions to the consume loop's batch queue (`None` before the loop
    /// starts: records then come through the consumer queue).
    router: Mutex<Option<forest_kafka::Router>>,
    /// librdkafka's count of records this consumer received, as of its last statistics.
    rx_seen: AtomicU64,
}

impl Ctx {
    /// Sets the partitions this worker holds after a rebalance callback (rebalances are eager:
    /// an assignment replaces the whole set, a revoke or an error clears it), and keeps the
    /// process-wide counts in step: partitions for `/readyz`, and the workers holding any,
    /// which `forest bench` waits on so that no member's late join rebalances the group in
    /// the middle of a measurement.
    fn set_assigned(&self, n: i64) {
        let before = self.assigned.swap(n, Ordering::SeqCst);
        self.stats.health.add_assigned(n - before);
        if before <= 0 && n > 0 {
            self.stats.workers_assigned.fetch_add(1, Ordering::SeqCst);
        } else if before > 0 && n <= 0 {
            self.stats.workers_assigned.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn fail(&self, e: ProcessorError) {
        lock(&self.fatal).get_or_insert(e);
    }
    fn failed(&self) -> bool {
        lock(&self.fatal).is_some()
    }
}

impl ClientContext for Ctx {
    /// librdkafka statistics (every `statistics.interval.ms`): per-partition consumer lag,
    /// and the records fetched (`ProcessorStats::fetched`).
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.stats.health.record_lag(&statistics);
        // Cumulative per client: the difference since the last statistics is new.
        // A negative count (none in librdkafka) is skipped; a count that fell (none either:
        // the client lives as long as the worker) adds nothing until it passes the old one.
        let Ok(rx) = u64::try_from(statistics.rxmsgs) else {
            return;
        };
        let new = rx.saturating_sub(self.rx_seen.swap(rx, Ordering::Relaxed));
        if new > 0 {
            self.stats.fetched.fetch_add(new, Ordering::Relaxed);
            metrics::counter!(m::RECORDS_FETCHED).increment(new);
        }
    }
}

impl ConsumerContext for Ctx {
    /// Replaces rdkafka's default so that (a) on revoke the in-flight batch is written and its
    /// outputs delivered before the partitions go, and (b) on assign each partition starts at
    /// the offset stored in RocksDB, or at the log's beginning if this store never processed it
    /// (its users' state must then be rebuilt from the log).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.stats.rebalances.fetch_add(1, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::SeqCst);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                metrics::counter!(m::REBALANCES, "kind" => "assign").increment(1);
                let mut ownership = lock(&self.ownership);
                ownership.acquire(&partition_numbers(tpl));
                let mut core = lock(&self.core);
                if let Err(e) = restore_stale(&mut core, tpl, &self.stats) {
                    self.fail(e);
                    return;
                }
                // Partitions whose projections are older than their offsets fold the records
                // since their last checkpoint again first (see the replay module).
                let replays = match core.resume(&partition_numbers(tpl)) {
                    Ok(r) => r,
                    Err(e) => {
                        self.fail(e);
                        return;
                    }
                };
                let mut starts = Vec::new();
                for el in tpl.elements() {
                    let Some(idx) = core.topic_index(el.topic()) else {
                        continue;
                    };
                    match core.store.offset(el.topic(), el.partition()) {
                        Ok(stored) => {
                            starts.push((el.topic().to_string(), idx, el.partition(), stored))
                        }
                        Err(e) => {
                            self.fail(e.into());
                            return;
                        }
                    }
                }
                let held = starts.len() as i64;
                // Before `assign`, which starts fetching: every record of these partitions
                // then goes to the batch queue, none to the consumer queue ahead of it (see
                // forest_kafka::fetch). Rebalances are eager, so the previous assignment's
                // partitions have stopped (and dropped their routing) by now.
                if let Some(router) = lock(&self.router).as_ref() {
                    for (topic, _, partition, _) in &starts {
                        let routed = std::ffi::CString::new(topic.as_str())
                            .map_err(|_| {
                                ProcessorError::Config(format!("topic {topic:?} contains NUL"))
                            })
                            .and_then(|t| {
                                router.route(&t, *partition).map_err(ProcessorError::from)
                            });
                        match routed {
                            Ok(())
                            | Err(ProcessorError::Route(forest_kafka::RouteError::Closed)) => {}
                            Err(e) => {
                                self.fail(e);
                                return;
                            }
                        }
                    }
                }
                for (topic, idx, partition, stored) in starts {
                    let replay_from = replays
                        .get(&partition)
                        .and_then(|from| from.get(idx as usize))
                        .map(|&o| (o >= 0).then_some(o));
                    let offset = if core.at_least_once {
                        Offset::Stored
                    } else {
                        replay_from
                            .unwrap_or(stored)
                            .map_or(Offset::Beginning, Offset::Offset)
                    };
                    if let Err(e) = tpl.set_partition_offset(&topic, partition, offset) {
                        self.fail(ProcessorError::Kafka {
                            op: "set start offset",
                            source: e,
                        });
                        return;
                    }
                    core.merger
                        .assign(idx, partition, replay_from.unwrap_or(stored).unwrap_or(0));
                    core.lane_assigned(
                        idx,
                        partition,
                        replay_from
                            .unwrap_or(stored)
                            .unwrap_or(crate::replay::BEGINNING),
                        stored,
                    );
                    if let Some(o) = stored {
                        core.committed.insert((idx, partition), o);
                        lock(&self.stats.committed_offsets).insert((topic.clone(), partition), o);
                    }
                    tracing::info!(topic, partition, start = ?offset, "partition assigned");
                }
                drop(core);
                match consumer.assign(tpl) {
                    Ok(()) => {
                        self.set_assigned(held);
                        if !self.joined.swap(true, Ordering::SeqCst) {
                            self.stats.workers_joined.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => self.fail(ProcessorError::Kafka {
                        op: "assign",
                        source: e,
                    }),
                }
                // The membership a transaction commits offsets under changes with every
                // rebalance.
                lock(&self.core).group_meta = consumer.group_metadata();
                drop(ownership);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                metrics::counter!(m::REBALANCES, "kind" => "revoke").increment(1);
                if consumer.assignment_lost() {
                    metrics::counter!(m::REBALANCES, "kind" => "lost").increment(1);
                    let core = lock(&self.core);
                    // Outbox mode cannot fence a late batch: its changelog records would land
                    // after those of a new owner, which a later restore would take as the
                    // latest. Transactions mode is fenced by the group generation, and
                    // without the changelog local state is this instance's own.
                    if core.changelog.is_some() && !core.transactions {
                        drop(core);
                        tracing::error!(
                            partitions = ?partition_numbers(tpl),
                            "the group took this instance's partitions away while it held them: stopping without committing"
                        );
                        self.fail(ProcessorError::AssignmentLost {
                            partitions: partition_numbers(tpl),
                        });
                    }
                }
                if !self.failed() {
                    let mut core = lock(&self.core);
                    core.force_checkpoint();
                    match core.commit().and_then(|_| core.flush_outputs()) {
                        Ok(_) => commit_kafka(consumer, &core, CommitMode::Sync),
                        Err(e) => self.fail(e),
                    }
                    core.revoked();
                    tracing::info!(
                        partitions = tpl.count(),
                        "partitions revoked after committing"
                    );
                }
                lock(&self.ownership).release(&partition_numbers(tpl), Instant::now());
                self.set_assigned(0);
                self.stats.health.forget_lag();
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
                self.set_assigned(0);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Some(started) = lock(&self.commit_started).take() {
            metrics::histogram!(m::KAFKA_COMMIT).record(started.elapsed().as_secs_f64());
        }
        if let Err(e) = result {
            // Kafka's committed offsets are informational (lag tools); the store is the truth.
            tracing::debug!(error = %e, "kafka offset commit failed");
        }
    }
}

/// With the changelog on: restores every assigned partition number whose local state is not
/// the latest, before any of its records is consumed. Local state is the latest when the store
/// has input offsets for the partition and records, as the changelog end it reflects, the
/// changelog partition's current end (nobody wrote to it since this store did), or when the
/// changelog partition is empty and the store's end was not invalidated (a store that ran
/// before the changelog was on). Otherwise (a partition this store never had, had and forgot,
/// that another instance advanced since, whose changelog records a crash dropped, or a crash
/// in transactions mode between the Kafka commit and the store write) the changelog's latest
/// projections and checkpoint replace the partition's local state entirely.
///
/// Why entirely, users the changelog lacks included: a restore that kept them left a user
/// whose only projections were in a batch a crash dropped (`drop_changelog_leftovers`) with
/// that batch's events locally while the changelog never had them; re-read, they were
/// rejected as duplicates, so no projection of the user reached the changelog and the next
/// owner lost them. Kept offsets had the same flaw: a lane the checkpoint had not read (-1)
/// kept a local offset its projections did not reflect.
fn restore_stale(
    core: &mut Core,
    tpl: &TopicPartitionList,
    stats: &ProcessorStats,
) -> Result<(), ProcessorError> {
    let Some(changelog) = core.changelog.clone() else {
        return Ok(());
    };
    let changelog = changelog.as_str();
    let inputs = [
        core.inputs[0].0.as_str(),
        core.inputs[1].0.as_str(),
        core.inputs[2].0.as_str(),
    ];
    let parts = partition_numbers(tpl);
    let ends = forest_kafka::end_offsets(&core.brokers, changelog).map_err(|e| {
        ProcessorError::Restore {
            partition: parts.first().copied().unwrap_or(-1),
            reason: format!("reading the changelog's end offsets: {e}"),
        }
    })?;
    // The changelog has the input topics' partition count (checked at start-up).
    let n = ends.len() as i32;
    if n == 0 {
        return Err(ProcessorError::Restore {
            partition: parts.first().copied().unwrap_or(-1),
            reason: format!("the changelog topic {changelog} reported no partitions"),
        });
    }
    core.partition_count = Some(n);
    let mut stale = Vec::new();
    for p in parts {
        let mut known = false;
        for t in inputs {
            known |= core.store.offset(t, p)?.is_some();
        }
        let end = ends.get(&p).copied().unwrap_or(0);
        let reflected = core.store.offset(changelog, p)?;
        // -1: invalidated by `drop_changelog_leftovers`.
        if known && (reflected == Some(end) || (end == 0 && reflected != Some(-1))) {
            continue;
        }
        if known {
            tracing::info!(
                partition = p,
                changelog_end = end,
                reflected = ?reflected,
                "local state of the partition is behind its changelog: restoring"
            );
        }
        stale.push(p);
    }
    if stale.is_empty() {
        return Ok(());
    }
    let mut local = users_of(&core.store, n, &stale)?;
    for p in stale {
        let started = std::time::Instant::now();
        let users = local.remove(&p).unwrap_or_default();
        let r =
            crate::changelog::restore(&core.store, &core.brokers, changelog, inputs, p, &users)?;
        if r.lanes.is_some() {
            stats.restored_users.fetch_add(r.users, Ordering::Relaxed);
            stats.restored_partitions.fetch_add(1, Ordering::Relaxed);
            stats
                .restore_millis
                .fetch_add(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The ids of the users `store` holds in each of `partitions` (numbers among `n`), matched with
/// the producers' partitioner: one pass over the store for all of them.
fn users_of(
    store: &Store,
    n: i32,
    partitions: &[i32],
) -> Result<rustc_hash::FxHashMap<i32, Vec<Vec<u8>>>, ProcessorError> {
    let mut out: rustc_hash::FxHashMap<i32, Vec<Vec<u8>>> = Default::default();
    for id in store.user_ids() {
        let id = id?;
        if let Some(p) = forest_kafka::partition_of(&id, n).filter(|p| partitions.contains(p)) {
            out.entry(p).or_default().push(id);
        }
    }
    Ok(out)
}

/// Deletes the local state (projections and offsets) of every partition no worker of this
/// process has owned for `retention`: another instance owns it now and the changelog has its
/// state, which a later assignment restores. Users are matched to partitions with the
/// producers' partitioner over the input topics' partition count.
fn forget_unowned(
    core: &Arc<Mutex<Core>>,
    ownership: &Mutex<Ownership>,
    consumer: &BaseConsumer<Ctx>,
    retention: Duration,
    stats: &ProcessorStats,
) -> Result<(), ProcessorError> {
    let mut own = lock(ownership);
    let due = own.due(retention);
    if due.is_empty() {
        return Ok(());
    }
    let (store, topics) = {
        let c = lock(core);
        let Some(changelog) = c.changelog.clone() else {
            return Ok(());
        };
        let mut topics: Vec<String> = c.inputs.iter().map(|(n, _)| n.clone()).collect();
        topics.push(changelog);
        (c.store.clone(), topics)
    };
    let md = consumer
        .fetch_metadata(Some(&topics[0]), Duration::from_secs(10))
        .map_err(|source| ProcessorError::Kafka {
            op: "fetch input partition count",
            source,
        })?;
    let Some(n) = md
        .topics()
        .iter()
        .find(|t| t.name() == topics[0])
        .map(|t| t.partitions().len() as i32)
        .filter(|n| *n > 0)
    else {
        return Ok(());
    };
    let started = Instant::now();
    let users: Vec<Vec<u8>> = users_of(&store, n, &due)?.into_values().flatten().collect();
    let offsets: Vec<(&str, i32)> = topics
        .iter()
        .flat_map(|t| due.iter().map(move |p| (t.as_str(), *p)))
        .collect();
    let forgotten = store.forget(&users, offsets)?;
    for p in &due {
        own.released.remove(p);
    }
    stats
        .forgotten_partitions
        .fetch_add(due.len() as u64, Ordering::Relaxed);
    stats
        .forgotten_users
        .fetch_add(forgotten as u64, Ordering::Relaxed);
    metrics::counter!(m::FORGOTTEN_USERS).increment(forgotten as u64);
    tracing::info!(
        partitions = ?due,
        users = forgotten,
        secs = started.elapsed().as_secs_f64(),
        "deleted the local state of partitions owned elsewhere for longer than the retention"
    );
    Ok(())
}

/// The durable offsets as a partition list for Kafka; `None` in transactions mode (each
/// batch's transaction committed them) or before any.
fn durable_offsets(core: &Core) -> Option<TopicPartitionList> {
    if core.committed.is_empty() || core.transactions {
        return None;
    }
    let mut tpl = TopicPartitionList::with_capacity(core.committed.len());
    for (&(t, p), &o) in &core.committed {
        let _ = tpl.add_partition_offset(&core.inputs[t as usize].0, p, Offset::Offset(o));
    }
    Some(tpl)
}

/// Commits the store's offsets to Kafka too: for lag tools and the group's view in the
/// effectively-once modes, and as the restart point of the at-least-once baseline.
fn commit_kafka(consumer: &BaseConsumer<Ctx>, core: &Core, mode: CommitMode) {
    if let Some(tpl) = durable_offsets(core) {
        commit_offsets(consumer, &tpl, mode);
    }
}

/// [`commit_kafka`] with the list already built.
fn commit_offsets(consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList, mode: CommitMode) {
    lock(&consumer.context().commit_started).get_or_insert_with(std::time::Instant::now);
    match consumer.commit(tpl, mode) {
        Ok(()) => {
            consumer
                .context()
                .stats
                .kafka_commits
                .fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => tracing::debug!(error = %e, "kafka offset commit failed"),
    }
}

/// At most one Kafka offset commit per this long per worker while it runs (revocation and
/// shutdown commit at once, synchronously). Why: in the effectively-once modes the store
/// holds the offsets a restart resumes from, and Kafka's copy is for lag tools, which read it
/// every few seconds at most (the processor's own lag metric and `/readyz` follow every
/// durable batch through the locally stored offsets instead). Committed after every durable
/// batch, that was about 650-690 commits per 16 M events, and each cost the test broker
/// 3.2-3.5 ms of CPU (BENCHMARKS.md, session 30): about 0.14 CPU-s per M events, on the cores
/// the processor shares with it. The at-least-once baseline restarts from Kafka's offsets, so
/// after a crash it re-applies up to this much more input than before: still at least once.
/// A worker that stops on an error does not commit what it owes (the store has it).
const KAFKA_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// How long one drain may fold and commit full batches before the loop polls again and
/// passes the durable offsets on to Kafka (see `Core::drain` and [`KAFKA_COMMIT_INTERVAL`]).
const DRAIN_BUDGET: Duration = Duration::from_millis(100);

/// Poll timeout while a due batch waits for the committer thread to finish the one before.
const COMMITTER_WAIT: Duration = Duration::from_millis(2);

/// librdkafka's cached high watermark of a partition (from the last fetch response); no
/// broker round trip.
/// Per-lane fetch pausing: keeps the merge buffer under its bound without giving up the
/// canonical merge order.
///
/// Lanes fill unevenly (librdkafka fetches some partitions of a broker before others), and the
/// merge holds a partition's full lanes until its empty ones deliver. Past `max_buffered` the
/// merge stops waiting and releases out of order ([`crate::merge::Merger::drain`]), which
/// can reject as too late events that a replay would accept (seen in a 400 K-event test
/// under load). So from three quarters of the bound, the lanes that already hold records are
/// paused and rewound to the offset they expect next (discarding what librdkafka already
/// fetched for them): fetching goes to the lanes the merge waits for, and the buffer drains. A paused
/// lane resumes when its buffer is empty (the merge needs it), or all do once the buffer is
/// down to half the bound. Lanes that are empty are never paused, so this cannot starve the
/// merge; a lane that delivers nothing at all still gives way after `max_idle`.
#[derive(Default)]
struct LanePauses {
    paused: rustc_hash::FxHashSet<(u8, i32)>,
    /// The rebalance generation the pauses were made in: an assignment starts over.
    generation: u64,
}

impl LanePauses {
    fn update(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        merger: &crate::merge::Merger,
        max_buffered: usize,
        topics: &[String],
        generation: u64,
    ) {
        let mut resume: Vec<(u8, i32)> = Vec::new();
        if generation != self.generation {
            self.generation = generation;
            resume.extend(self.paused.drain());
        }
        let buffered = merger.buffered();
        let mut pause = Vec::new();
        if buffered >= max_buffered - max_buffered / 4 {
            pause.extend(
                merger
                    .lanes_with_records()
                    .filter(|l| self.paused.insert(*l)),
            );
        }
        if buffered <= max_buffered / 2 {
            resume.extend(self.paused.drain());
        } else {
            self.paused.retain(|&(t, p)| {
                let keep = merger.lane_len(t, p) > 0;
                if !keep {
                    resume.push((t, p));
                }
                keep
            });
        }
        let tpl = |lanes: &[(u8, i32)]| {
            let mut tpl = TopicPartitionList::new();
            for &(t, p) in lanes {
                tpl.add_partition(&topics[t as usize], p);
            }
            tpl
        };
        if !pause.is_empty() {
            consumer
                .context()
                .stats
                .lane_pauses
                .fetch_add(pause.len() as u64, Ordering::Relaxed);
            metrics::counter!(m::MERGE_LANE_PAUSES).increment(pause.len() as u64);
            if let Err(e) = consumer.pause(&tpl(&pause)) {
                tracing::warn!(error = %e, lanes = pause.len(), "pausing full merge lanes failed");
            }
            // Pausing stops fetching, but records librdkafka already holds for those lanes
            // would still be delivered (a whole partition's backlog, with our prefetch
            // settings) and overflow the buffer. Seeking each paused lane to the offset the
            // merge expects next discards them; they are fetched again on resume.
            let mut seek = TopicPartitionList::new();
            for &(t, p) in &pause {
                if let Some(pos) = merger.lane_position(t, p) {
                    if let Err(e) =
                        seek.add_partition_offset(&topics[t as usize], p, Offset::Offset(pos))
                    {
                        tracing::warn!(error = %e, "seek list");
                    }
                }
            }
            if let Err(e) = consumer.seek_partitions(seek, Duration::from_secs(5)) {
                tracing::warn!(error = %e, lanes = pause.len(), "rewinding paused merge lanes failed");
            }
        }
        if !resume.is_empty() {
            // After a rebalance some of these may no longer be assigned: librdkafka reports
            // them per partition, which is harmless.
            if let Err(e) = consumer.resume(&tpl(&resume)) {
                tracing::warn!(error = %e, lanes = resume.len(), "resuming merge lanes failed");
            }
        }
    }
}

fn cached_high_watermark(
    consumer: &BaseConsumer<Ctx>,
    topic: &CString,
    partition: i32,
) -> Option<i64> {
    let (mut low, mut high) = (0i64, 0i64);
    // SAFETY: the client pointer is valid while `consumer` lives; the topic is NUL-terminated;
    // librdkafka only writes the two out-parameters.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

fn validate(cfg: &ProcessorConfig) -> Result<(), ProcessorError> {
    let bad = |m: &str| Err(ProcessorError::Config(m.to_string()));
    cfg.topics
        .validate()
        .map_err(|e| ProcessorError::Config(e.to_string()))?;
    cfg.store.validate().map_err(ProcessorError::Config)?;
    if cfg.batch_max_records == 0 {
        return bad("batch size must be at least 1");
    }
    if cfg.workers == 0 || cfg.workers > 64 {
        return bad("workers must be between 1 and 64");
    }
    if cfg.cache_users == 0 {
        return bad("the projection cache must hold at least 1 user");
    }
    if cfg.cache_bytes < 1 << 20 {
        return bad("the projection cache must be allowed at least 1 MiB");
    }
    if cfg.max_buffered == 0 {
        return bad("the merge buffer must hold at least 1 record");
    }
    if cfg.dead_letter_max_bytes.is_some_and(|b| b < 4096) {
        return bad("dead letters must be allowed at least 4096 bytes");
    }
    if cfg.group_id.is_empty() {
        return bad("the consumer group id must not be empty");
    }
    if !cfg.projection_interval.is_zero()
        && !crate::core::replays_here(cfg)
        && !cfg.at_least_once_baseline
    {
        return bad(
            "a projection interval above 0 works in the outbox mode only, without the changelog (whose records carry every batch's projections) or a dry run: set it to 0 or drop those options",
        );
    }
    if cfg.pace_projection_writes && cfg.projection_interval.is_zero() {
        return bad(
            "pacing projection writes needs a projection interval above 0 (the outbox mode without the changelog): set one, or drop the pacing",
        );
    }
    if cfg.exactly_once == crate::ExactlyOnce::Transactions {
        if cfg.dry_run || cfg.at_least_once_baseline {
            return bad(
                "transactions mode cannot be combined with a dry run or the at-least-once baseline",
            );
        }
        if cfg.max_outputs_in_flight > 0 {
            return bad(
                "transactions mode sends each batch in its own transaction: outputs in flight must be 0",
            );
        }
        if cfg.transactional_id.as_deref() == Some("") {
            return bad("the transactional id prefix must not be empty");
        }
    }
    Ok(())
}

/// The `transactional.id` of worker `worker`: stable across restarts of one instance (so a
/// restarted instance fences its predecessor's producer and aborts its open transaction),
/// different between instances. Derived, unless configured, from the group, the host name
/// (a StatefulSet pod's stable name) and the store path (two instances on one host have
/// two stores).
fn transactional_id(cfg: &ProcessorConfig, worker: usize) -> String {
    let prefix = cfg.transactional_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_default();
        let path = std::fs::canonicalize(&cfg.store_path).unwrap_or(cfg.store_path.clone());
        let h = xxhash_rust::xxh3::xxh3_64(format!("{host}\0{}", path.display()).as_bytes());
        format!("{}-{host}-{h:016x}", cfg.group_id)
    });
    format!("{prefix}-{worker}")
}

/// With the changelog on, the changelog topic must exist with the input topics' partition
/// count: a projection goes to its user's partition number, and a restore of partition N
/// reads changelog partition N. (Auto-creation would give it the broker's default count and
/// no compaction, so it is checked here, at start-up, with what to do.)
fn check_changelog_topic(cfg: &ProcessorConfig) -> Result<(), ProcessorError> {
    let on = (cfg.changelog || cfg.exactly_once == crate::ExactlyOnce::Transactions)
        && !cfg.dry_run
        && !cfg.at_least_once_baseline;
    if !on {
        return Ok(());
    }
    let t = &cfg.topics;
    let inputs = match forest_kafka::end_offsets(&cfg.brokers, &t.payments) {
        Ok(ends) => ends.len(),
        // Inputs that do not exist yet: nothing to compare with (the group waits for them).
        Err(forest_kafka::ReadError::NoTopic(_)) => return Ok(()),
        Err(e) => {
            return Err(ProcessorError::Restore {
                partition: -1,
                reason: format!("reading {}'s partitions: {e}", t.payments),
            });
        }
    };
    let fix = |what: &str| {
        ProcessorError::Config(format!(
            "the changelog topic {} {what}: create it with {inputs} partitions (as many as {}) and cleanup.policy=compact, or run without --changelog",
            t.changelog, t.payments
        ))
    };
    match forest_kafka::end_offsets(&cfg.brokers, &t.changelog) {
        Ok(ends) if ends.len() == inputs => Ok(()),
        Ok(ends) => Err(fix(&format!("has {} partitions", ends.len()))),
        Err(forest_kafka::ReadError::NoTopic(_)) => Err(fix("does not exist")),
        Err(e) => Err(ProcessorError::Restore {
            partition: -1,
            reason: format!("reading {}'s partitions: {e}", t.changelog),
        }),
    }
}

/// Runs the processor until `shutdown` is set (then commits and returns `Ok`) or a fatal error.
pub fn run(
    cfg: ProcessorConfig,
    shutdown: Shutdown,
    stats: Arc<ProcessorStats>,
) -> Result<(), ProcessorError> {
    validate(&cfg)?;
    let t = &cfg.topics;
    check_changelog_topic(&cfg)?;
    forest_kafka::warn_if_new_store_but_group_progressed(
        !cfg.store_path.join("CURRENT").exists() && !cfg.dry_run,
        &cfg.store_path,
        &cfg.brokers,
        &cfg.group_id,
        &[&t.payments, &t.mobility, &t.commands],
    );
    let store = Arc::new(Store::open(&cfg.store_path, &cfg.store_config())?);
    let replaying = store.replay_partitions()?;
    if !replaying.is_empty() && !crate::core::replays_here(&cfg) {
        return Err(ProcessorError::Config(format!(
            "{} holds replay records for partitions {replaying:?} (a run with --projection-interval-ms above 0 stopped before storing their projections): start once in the outbox mode without --changelog, --dry-run or the at-least-once baseline, let it catch up and stop it, then switch",
            cfg.store_path.display()
        )));
    }
    stats.health.set_store_open(true);
    deliver_leftovers(&cfg, &store, &stats)?;
    // Partitions this store has state for start unowned: the retention clock of those the
    // group gives to other instances starts now.
    let mut ownership = Ownership::default();
    let now = Instant::now();
    for t in [&t.payments, &t.mobility, &t.commands] {
        for p in store.partitions(t)? {
            ownership.released.insert(p, now);
        }
    }
    let ownership = Arc::new(Mutex::new(ownership));
    let halt = AtomicBool::new(false);
    let result = run_workers(&cfg, store, &shutdown, &halt, &stats, &ownership);
    stats.health.set_store_open(false);
    result
}

/// Delivers the outputs a previous run left in the outbox, once, before any worker
/// consumes; the outbox-depth gauge shows them meanwhile (from the store's count, which
/// [`Store::open`] initialised from the outbox) and 0 once they are acknowledged.
pub(crate) fn deliver_leftovers(
    cfg: &ProcessorConfig,
    store: &Store,
    stats: &ProcessorStats,
) -> Result<usize, ProcessorError> {
    let show = || metrics::gauge!(crate::metrics::OUTBOX_DEPTH).set(store.outbox_depth() as f64);
    drop_changelog_leftovers(cfg, store)?;
    show();
    let mut leftovers = forest_kafka::OutboxProducer::new(&cfg.brokers, &cfg.kafka)?;
    if let Some(max) = cfg.dead_letter_max_bytes {
        leftovers.dead_letter_max_bytes = leftovers.dead_letter_max_bytes.min(max);
    }
    let result = leftovers.deliver_leftovers(store);
    show();
    let n = result?;
    stats
        .outputs_delivered
        .fetch_add(n as u64, Ordering::Relaxed);
    Ok(n)
}

/// Changelog records a previous run left undelivered in the outbox are dropped, not sent.
/// Since that run the partition may have moved: if another owner wrote newer projections and
/// checkpoints, a stale projection appended after them would be what a later restore takes as
/// the user's latest state, with a newer checkpoint's offsets (its events since, lost; seen
/// once in the three-instance chaos test). Dropped, the changelog reads as if this instance
/// had stopped just before delivering that batch, the case the restore already handles (see
/// the changelog module). And since the changelog no longer reflects this store's state, every
/// recorded changelog end is invalidated: the next assignment of each partition restores from
/// the changelog instead of trusting local state. Trees and dead letters are still delivered.
fn drop_changelog_leftovers(cfg: &ProcessorConfig, store: &Store) -> Result<(), ProcessorError> {
    let changelog = cfg.topics.changelog.as_str();
    // What a crash leaves: at most the batches written and not yet acknowledged.
    let stale: Vec<u64> = store
        .outbox(usize::MAX)?
        .into_iter()
        .filter(|(_, e)| e.topic == changelog)
        .map(|(seq, _)| seq)
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    // Every partition the store has state for, recorded changelog end or not (a crash before
    // the first checkpoint was acknowledged left none, and an empty changelog partition would
    // otherwise leave the local state trusted).
    let mut parts = store.partitions(changelog)?;
    for topic in [
        &cfg.topics.payments,
        &cfg.topics.mobility,
        &cfg.topics.commands,
    ] {
        parts.extend(store.partitions(topic)?);
    }
    parts.sort_unstable();
    parts.dedup();
    // -1: never a changelog end, so `restore_stale` restores. Before the removal: a crash
    // between the two then leaves the leftovers to drop again, never a store trusted without
    // them.
    store.commit(
        std::iter::empty(),
        parts.iter().map(|&p| (changelog, p, -1)),
        &[],
    )?;
    store.remove_outbox(stale.iter().copied())?;
    tracing::warn!(
        records = stale.len(),
        partitions = parts.len(),
        "dropped changelog records a previous run left undelivered; those partitions restore from the changelog when next assigned"
    );
    Ok(())
}

fn run_workers(
    cfg: &ProcessorConfig,
    store: Arc<Store>,
    shutdown: &AtomicBool,
    halt: &AtomicBool,
    stats: &Arc<ProcessorStats>,
    ownership: &Arc<Mutex<Ownership>>,
) -> Result<(), ProcessorError> {
    if cfg.workers <= 1 {
        return run_worker(
            cfg,
            store,
            shutdown,
            halt,
            stats.clone(),
            0,
            ownership.clone(),
        );
    }
    // Workers are members of the same consumer group sharing one store: the range assignor
    // splits the partition numbers between them, and a partition that moves between them
    // finds its users' state in the shared store.
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..cfg.workers)
            .map(|i| {
                let (store, stats, own) = (store.clone(), stats.clone(), ownership.clone());
                // Named, so that top, perf and `forest bench` can tell the workers apart.
                std::thread::Builder::new()
                    .name(format!("forest-worker-{i}"))
                    .spawn_scoped(s, move || {
                        // One worker failed or panicked: stop the others (they commit what
                        // they did).
                        let mut on_exit = HaltUnlessOk { halt, ok: false };
                        let r = run_worker(cfg, store, shutdown, halt, stats, i, own);
                        on_exit.ok = r.is_ok();
                        r
                    })
            })
            .collect();
        if handles.iter().any(Result::is_err) {
            // A worker that never started: stop those that did, before waiting for them.
            halt.store(true, Ordering::Relaxed);
        }
        let mut result = Ok(());
        for h in handles {
            let r = match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err(ProcessorError::Config("a processor worker panicked".into()))
                }),
                Err(e) => Err(ProcessorError::WorkerThread(e)),
            };
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// Sets `halt` when dropped unless `ok`: a worker that returns an error or panics stops the
/// other workers of its process.
struct HaltUnlessOk<'a> {
    halt: &'a AtomicBool,
    ok: bool,
}

impl Drop for HaltUnlessOk<'_> {
    fn drop(&mut self) {
        if !self.ok {
            self.halt.store(true, Ordering::Relaxed);
        }
    }
}

/// One consumer-group member: its own consumer, cache, merge and producer, over the shared
/// store.
fn run_worker(
    cfg: &ProcessorConfig,
    store: Arc<Store>,
    shutdown: &AtomicBool,
    halt: &AtomicBool,
    stats: Arc<ProcessorStats>,
    worker: usize,
    ownership: Arc<Mutex<Ownership>>,
) -> Result<(), ProcessorError> {
    let producer = if cfg.exactly_once == crate::ExactlyOnce::Transactions {
        let id = transactional_id(cfg, worker);
        tracing::info!(transactional_id = %id, "transactions mode");
        forest_kafka::OutboxProducer::transactional(&cfg.brokers, &cfg.kafka, &id)?
    } else {
        forest_kafka::OutboxProducer::new(&cfg.brokers, &cfg.kafka)?
    };
    let core = Core::new(cfg, store, producer, stats.clone())?;
    let topics: Vec<String> = core.inputs.iter().map(|(n, _)| n.clone()).collect();
    let ctopics: Vec<CString> = topics
        .iter()
        .map(|t| {
            CString::new(t.as_str())
                .map_err(|_| ProcessorError::Config(format!("topic {t:?} contains NUL")))
        })
        .collect::<Result<_, _>>()?;
    let core = Arc::new(Mutex::new(core));
    let ctx = Ctx {
        core: core.clone(),
        fatal: Mutex::new(None),
        stats: stats.clone(),
        generation: std::sync::atomic::AtomicU64::new(0),
        commit_started: Mutex::new(None),
        ownership: ownership.clone(),
        assigned: std::sync::atomic::AtomicI64::new(0),
        joined: AtomicBool::new(false),
        router: Mutex::new(None),
        rx_seen: AtomicU64::new(0),
    };

    let consumer: BaseConsumer<Ctx> = client_config(&cfg.brokers, &[])
        .consumer_defaults()
        .set("group.id", &cfg.group_id)
        .set("client.id", format!("forest-processor-{worker}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Range assigns partition N of every input topic to the same member: the co-partition
        // merge needs all of a user's topics in one place.
        .set("partition.assignment.strategy", "range")
        .set("queued.min.messages", crate::INPUT_PREFETCH.0)
        .set("max.partition.fetch.bytes", crate::INPUT_PREFETCH.1)
        // Consumer lag per partition for metrics and /readyz.
        .set("statistics.interval.ms", "5000")
        .set_all(&cfg.kafka)
        .create_with_context(ctx)
        .map_err(|source| ProcessorError::Kafka {
            op: "create consumer",
            source,
        })?;
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .map_err(|source| ProcessorError::Kafka {
            op: "subscribe",
            source,
        })?;
    tracing::info!(group = %cfg.group_id, topics = ?topics, store = %cfg.store_path.display(), "processor started");

    // One worker deletes the state of partitions owned elsewhere for longer than the
    // retention; only with the changelog, which keeps every partition's state.
    let cleanup = (worker == 0 && lock(&core).changelog.is_some())
        .then_some(cfg.state_retention)
        .flatten()
        .map(|retention| (retention, ownership));
    let result = consume_loop(cfg, &consumer, &core, &ctopics, shutdown, halt, cleanup);
    if let Err(e) = &result {
        // Stop the close-time revoke from committing anything after a failure.
        consumer
            .context()
            .fail(ProcessorError::Config(format!("stopped: {e}")));
        tracing::error!(error = %e, "processor stopped");
        return result;
    }
    // Graceful: the close below revokes the partitions, which commits and flushes.
    let mut c = lock(&core);
    c.force_checkpoint();
    c.commit()?;
    c.flush_outputs()?;
    consumer
        .context()
        .stats
        .shutdown_written
        .fetch_add(1, Ordering::Relaxed);
    commit_kafka(&consumer, &c, CommitMode::Sync);
    drop(c);
    consumer.unsubscribe();
    tracing::info!("processor stopped gracefully");
    Ok(())
}

/// The longest the consume loop waits on the batch queue while the consumer queue is not
/// polled: the most a rebalance or an offset commit result waits for the loop when idle.
const EVENT_WAIT: Duration = Duration::from_millis(10);

fn consume_loop(
    cfg: &ProcessorConfig,
    consumer: &BaseConsumer<Ctx>,
    core: &Arc<Mutex<Core>>,
    ctopics: &[CString],
    shutdown: &AtomicBool,
    halt: &AtomicBool,
    cleanup: Option<(Duration, Arc<Mutex<Ownership>>)>,
) -> Result<(), ProcessorError> {
    let ctx = consumer.context();
    let mut last_cleanup = Instant::now();
    let mut last_report = std::time::Instant::now();
    let mut last_export = std::time::Instant::now() - Duration::from_secs(5);
    // Where the loop's time goes, for the progress log: waiting in poll, folding (drain), and
    // committing partial batches.
    let (mut t_poll, mut t_drain, mut t_commit) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let topics: Vec<String> = lock(core).inputs.iter().map(|(n, _)| n.clone()).collect();
    // Assigned partitions' records, read in batches (one librdkafka call per round instead
    // of one per record); borrowed from the consumer, so dropped before it.
    let mut fetch =
        forest_kafka::FetchQueue::new(consumer.client()).ok_or_else(|| ProcessorError::Kafka {
            op: "create fetch queue",
            source: rdkafka::error::KafkaError::ClientCreation(
                "librdkafka returned no queue".into(),
            ),
        })?;
    // The assign callback routes each new assignment here.
    *lock(&ctx.router) = Some(fetch.router());
    let mut polled: Vec<Rec> = Vec::with_capacity(cfg.batch_max_records);
    let mut pauses = LanePauses::default();
    // Durable offsets not yet committed to Kafka, and when they last were (see
    // KAFKA_COMMIT_INTERVAL).
    let (mut kafka_commit_owed, mut last_kafka_commit) = (false, Instant::now());
    // Records the next poll round may take: unlimited below the pause mark; above it, only the
    // buffer's remaining room (but a few hundred at least, so the lanes the merge waits for
    // still arrive). Pausing alone does not bound the buffer: a lane resumed because it ran
    // empty would refill with a whole poll round while the merge (slow store or outputs)
    // releases only a batch per round.
    let mut poll_budget = usize::MAX;
    let mut early_counted = 0;
    // Whether the last drain stopped at its budget with records still ready.
    let mut backlog = false;
    while !shutdown.load(Ordering::Relaxed) && !halt.load(Ordering::Relaxed) {
        if last_export.elapsed() >= Duration::from_secs(5) {
            last_export = std::time::Instant::now();
            let core = lock(core);
            core.store.export_metrics();
            // Without the WAL, an idle store's last batches are flushed too (writes check
            // for themselves), so a crash after a quiet spell does not replay from before it;
            // and a store whose flushes fail stops the worker even when no write comes.
            core.store.flush_if_due()?;
        }
        if let Some((retention, ownership)) = &cleanup {
            if last_cleanup.elapsed()
                >= (*retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
            {
                last_cleanup = Instant::now();
                forget_unowned(core, ownership, consumer, *retention, &ctx.stats)?;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = std::time::Instant::now();
            let c = lock(core);
            tracing::info!(
                consumed = ctx.stats.consumed.load(Ordering::Relaxed),
                applied = ctx.stats.applied.load(Ordering::Relaxed),
                buffered = c.merger.buffered(),
                offset_gaps = c.merger.gaps(),
                early_releases = c.merger.early_releases(),
                lanes = ?c.merger.lanes(),
                poll_s = t_poll.as_secs_f64(),
                drain_s = t_drain.as_secs_f64(),
                commit_s = t_commit.as_secs_f64(),
                "progress"
            );
        }
        let t0 = std::time::Instant::now();
        if let Some(e) = lock(&ctx.fatal).take() {
            return Err(e);
        }
        // Wait for records at most until the open batch is due, so a partial batch is not
        // held for a whole idle poll (that alone was ~50 ms of produce-to-projection latency).
        // A due batch waits for the committer thread to finish the one before: poll in short
        // steps meanwhile (whole milliseconds: rdkafka spins through a fraction of one).
        let mut timeout = {
            let c = lock(core);
            match c.batch_started {
                Some(s) if c.committer_busy() && s.elapsed() >= cfg.batch_max_wait => {
                    COMMITTER_WAIT
                }
                Some(s) => cfg.batch_max_wait.saturating_sub(s.elapsed()),
                None => Duration::from_millis(50),
            }
        }
        .min(Duration::from_millis(50));
        if backlog {
            // The merge still has records ready: do not wait for more.
            timeout = Duration::ZERO;
        }
        polled.clear();
        let mut generation = ctx.generation.load(Ordering::SeqCst);
        // Whether this round emptied the consumer's local queue (the merge's idle clock only
        // runs then). A round reads at least a few thousand records even with small batches,
        // so every lane's queued records reach the merge.
        let mut consumer_idle = false;
        let round_max = cfg.batch_max_records.max(5_000).min(poll_budget);
        // First the consumer's own queue, without waiting: rebalances (the callback runs
        // inside poll; the core lock is not held here, it is taken once per round below),
        // commit results, errors, and records of partitions not routed to `fetch` yet. It is
        // drained before `fetch` is read, which keeps each partition in offset order (see
        // forest_kafka::fetch).
        let mut drained = false;
        // Holding no partitions, nothing comes to `fetch`: wait here, for the assignment.
        let mut main_wait = if ctx.assigned.load(Ordering::Relaxed) <= 0 {
            timeout
        } else {
            Duration::ZERO
        };
        for _ in 0..round_max {
            let got = consumer.poll(main_wait);
            main_wait = Duration::ZERO;
            let now = ctx.generation.load(Ordering::SeqCst);
            if now != generation {
                // A rebalance ran inside that poll: what was polled before it belongs to the
                // old assignment (already committed and revoked); drop it.
                polled.clear();
                generation = now;
            }
            match got {
                None => {
                    drained = true;
                    break;
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                Some(Ok(msg)) => {
                    let name = msg.topic();
                    let Some(topic) = topics.iter().position(|t| t == name) else {
                        continue;
                    };
                    polled.push(Rec::new(
                        topic as u8,
                        msg.partition(),
                        msg.offset(),
                        msg.timestamp().to_millis(),
                        msg.key(),
                        msg.payload(),
                    ));
                }
            }
        }
        // A rebalance callback in that poll may have failed the worker: a lost assignment
        // must not go on to the merge and the commits below with the batch it holds.
        if let Some(e) = lock(&ctx.fatal).take() {
            return Err(e);
        }
        if drained {
            // Then the routed partitions' records, many per call; waiting only if nothing came
            // from the consumer queue either, and at most EVENT_WAIT: events arriving on the
            // consumer queue meanwhile (a rebalance, a commit result) wait for this.
            let want = round_max.saturating_sub(polled.len());
            let wait = if polled.is_empty() {
                timeout.min(EVENT_WAIT)
            } else {
                Duration::ZERO
            };
            let got = fetch.poll(wait, want, |r| {
                if let Some((code, text)) = r.error() {
                    tracing::warn!(error = %code, detail = %text, partition = r.partition(), "consumer error");
                    return;
                }
                let name = r.topic();
                let Some(topic) = topics.iter().position(|t| t.as_bytes() == name) else {
                    return;
                };
                polled.push(Rec::new(
                    topic as u8,
                    r.partition(),
                    r.offset(),
                    r.timestamp(),
                    r.key(),
                    r.payload(),
                ));
            });
            consumer_idle = got < want;
        }
        let t1 = std::time::Instant::now();
        t_poll += t1 - t0;
        if !polled.is_empty() {
            // One clock read per round; the records' ages for the latency breakdown.
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            ctx.stats.stage_polled.record_all_ms(
                polled
                    .iter()
                    .filter_map(|r| r.timestamp)
                    .map(|ts| now_ms.saturating_sub(ts).max(0) as u64),
            );
        }
        let mut c = lock(core);
        for rec in polled.drain(..) {
            c.push(rec);
        }
        // Full batches are committed inside drain; a partial one once it is old enough.
        let more = c.drain(
            |t, p, pos| {
                cached_high_watermark(consumer, &ctopics[t as usize], p).is_some_and(|h| pos >= h)
            },
            cfg.max_idle,
            cfg.max_buffered,
            consumer_idle,
            DRAIN_BUDGET,
            || shutdown.load(Ordering::Relaxed) || halt.load(Ordering::Relaxed),
        )?;
        backlog = more;
        let t2 = std::time::Instant::now();
        t_drain += t2 - t1;
        let mut progress = c.poll_durable()?;
        // A due partial batch waits while the committer still writes the one before: it
        // takes in what arrives meanwhile and goes as soon as the committer is free, instead of
        // queueing behind it.
        if c.batch_started
            .is_some_and(|s| s.elapsed() >= cfg.batch_max_wait)
            && !c.committer_busy()
        {
            c.commit()?;
        }
        if c.batch_started.is_none() && !c.committer_busy() {
            c.flush_if_due()?;
        }
        if cfg.crash_at == Some(crate::CrashPoint::WhenCaughtUp)
            && consumer_idle
            && c.batch_started.is_none()
            && c.merger.buffered() == 0
            && c.applied_in_run() > 0
            && c.merger.lanes().iter().all(|&(t, p, pos, _)| {
                cached_high_watermark(consumer, &ctopics[t as usize], p).is_some_and(|h| pos >= h)
            })
        {
            c.flush_outputs()?;
            return Err(ProcessorError::InjectedCrash(
                crate::CrashPoint::WhenCaughtUp,
            ));
        }
        t_commit += t2.elapsed();
        progress |= c.poll_durable()?;
        kafka_commit_owed |= progress;
        let commit_due = kafka_commit_owed && last_kafka_commit.elapsed() >= KAFKA_COMMIT_INTERVAL;
        if progress || commit_due {
            if let Some(tpl) = durable_offsets(&c) {
                // Stored in the consumer, locally (no request), with every durable batch:
                // librdkafka's statistics then report each partition's lag from them
                // (`consumer_lag_stored`) while the commits to Kafka are spaced.
                if progress {
                    if let Err(e) = consumer.store_offsets(&tpl) {
                        tracing::debug!(error = %e, "storing offsets in the consumer failed");
                    }
                }
                if commit_due {
                    commit_offsets(consumer, &tpl, CommitMode::Async);
                }
            }
        }
        if commit_due {
            last_kafka_commit = Instant::now();
            kafka_commit_owed = false;
        }
        pauses.update(consumer, &c.merger, cfg.max_buffered, &topics, generation);
        let buffered = c.merger.buffered();
        poll_budget = if buffered >= cfg.max_buffered - cfg.max_buffered / 4 {
            cfg.max_buffered
                .saturating_sub(buffered)
                .max(crate::merge::LANE_ROUND_MIN)
        } else {
            usize::MAX
        };
        let early = c.merger.early_releases();
        if early > early_counted {
            ctx.stats
                .merge_early_releases
                .fetch_add(early - early_counted, Ordering::Relaxed);
            early_counted = early;
        }
    }
    Ok(())
}
