//! Shared harness of Forest's end-to-end tests.
//!
//! Every test gets its own topics (a unique prefix) on the broker named by
//! `FOREST_TEST_BROKERS` (a real Apache Kafka, started by `scripts/test`), or, without it, on a
//! fresh embedded mock cluster. Expected results are computed here, independently of the
//! processor, by folding the produced records with the pure domain in the documented merge
//! order.

use forest_domain::{Behaviour, Event, InputKind, Malformed, Rejection, RuleSet, UserState};
use forest_fulfilment::{FulfilmentConfig, FulfilmentStats, FulfilmentTopics, PartnersSource};
use forest_kafka::{EmbeddedBroker, client_config, ensure_topics, headers};
use forest_processor::{ProcessorConfig, ProcessorStats, Shutdown, Topics};
use forest_workload::{Generator, WorkloadConfig};
use prost::Message as _;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const PARTITIONS: i32 = 4;

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FOREST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A broker for one test, with its own topic names.
pub struct TestBroker {
    pub embedded: Option<EmbeddedBroker>,
    pub bootstrap: String,
    pub topics: Topics,
    /// The fulfilment's topics; trees and DLQ are the processor's.
    pub fulfilment: FulfilmentTopics,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl TestBroker {
    /// The real broker if `FOREST_TEST_BROKERS` is set, else a new embedded one.
    pub fn new(test: &str) -> Self {
        Self::create(test, false)
    }

    /// Always a new embedded broker: fault injection needs the mock cluster.
    pub fn embedded(test: &str) -> Self {
        Self::create(test, true)
    }

    /// A new embedded cluster of `brokers` brokers (for faults that hit one broker only).
    pub fn embedded_cluster(test: &str, brokers: i32) -> Self {
        Self::create_on_cluster(unique_prefix(test), None, true, brokers)
    }

    /// A broker running in another process, with this test's topics under `prefix` (from
    /// [`unique_prefix`]). `create_topics`: false when that broker created them itself
    /// (`forest broker --topic-prefix`; the mock cluster has no CreateTopics API).
    pub fn external(prefix: &str, bootstrap: &str, create_topics: bool) -> Self {
        Self::create_on(
            prefix.to_string(),
            Some(bootstrap.to_string()),
            create_topics,
        )
    }

    fn create(test: &str, force_embedded: bool) -> Self {
        let from_env = std::env::var("FOREST_TEST_BROKERS")
            .ok()
            .filter(|b| !b.is_empty() && !force_embedded);
        Self::create_on(unique_prefix(test), from_env, true)
    }

    /// The topic-name prefix of this test (for `forest --topic-prefix`).
    pub fn prefix(&self) -> &str {
        self.topics.payments.trim_end_matches("forest.payments.v1")
    }

    fn create_on(unique: String, bootstrap: Option<String>, create_topics: bool) -> Self {
        Self::create_on_cluster(unique, bootstrap, create_topics, 1)
    }

    fn create_on_cluster(
        unique: String,
        bootstrap: Option<String>,
        create_topics: bool,
        brokers: i32,
    ) -> Self {
        init_logs();
        let topics = Topics::prefixed(&unique);
        let (embedded, bootstrap) = match bootstrap {
            Some(b) => (None, b),
            None => {
                let e = EmbeddedBroker::start(brokers).expect("embedded broker starts");
                let b = e.bootstrap_servers();
                (Some(e), b)
            }
        };
        let mut fulfilment = FulfilmentTopics::prefixed(&unique);
        fulfilment.trees = topics.trees.clone();
        fulfilment.dlq = topics.dlq.clone();
        let t = &topics;
        let f = &fulfilment;
        if create_topics {
            ensure_topics(
                embedded.as_ref(),
                &bootstrap,
                &[],
                &[
                    (&t.payments, PARTITIONS),
                    (&t.mobility, PARTITIONS),
                    (&t.commands, PARTITIONS),
                    (&t.trees, PARTITIONS),
                    (&t.dlq, PARTITIONS),
                    (&t.changelog, PARTITIONS),
                    (&f.confirmations, PARTITIONS),
                    (&f.orders, PARTITIONS),
                    (&f.certificates, PARTITIONS),
                ],
                1,
            )
            .expect("topics created");
        }
        Self {
            embedded,
            bootstrap,
            topics,
            fulfilment,
        }
    }

    pub fn is_real(&self) -> bool {
        self.embedded.is_none()
    }

    pub fn processor_config(&self, store: &std::path::Path, group: &str) -> ProcessorConfig {
        let mut c = ProcessorConfig::new(self.bootstrap.clone(), store);
        c.topics = self.topics.clone();
        c.group_id = format!(
            "{}{group}",
            self.topics.payments.trim_end_matches("forest.payments.v1")
        );
        c.batch_max_records = 2_000;
        c.kafka = vec![
            ("session.timeout.ms".into(), "6000".into()),
            ("heartbeat.interval.ms".into(), "500".into()),
        ];
        c
    }

    pub fn fulfilment_config(
        &self,
        store: &std::path::Path,
        partners: PartnersSource,
    ) -> FulfilmentConfig {
        let mut c = FulfilmentConfig::new(self.bootstrap.clone(), store);
        c.topics = self.fulfilment.clone();
        c.group_id = format!(
            "{}fulfilment",
            self.topics.payments.trim_end_matches("forest.payments.v1")
        );
        c.partners = partners;
        c.reload_interval = Duration::from_millis(200);
        c
    }

    pub fn input_topic(&self, kind: InputKind) -> &str {
        match kind {
            InputKind::Payment => &self.topics.payments,
            InputKind::Mobility => &self.topics.mobility,
            InputKind::Command => &self.topics.commands,
        }
    }
}

/// A topic-name prefix no other test (or earlier run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!(
        "{test}-{}-{}-{}.",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    )
}

/// One produced input record and where Kafka put it.
#[derive(Debug, Clone)]
pub struct Produced {
    pub kind: InputKind,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: i64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

#[derive(Default)]
struct Reports(Mutex<HashMap<usize, (i32, i64)>>);
impl ClientContext for Reports {}
impl ProducerContext for Reports {
    type DeliveryOpaque = Box<usize>;
    fn delivery(&self, r: &DeliveryResult<'_>, i: Box<usize>) {
        let m = r.as_ref().expect("test produce succeeds");
        self.0
            .lock()
            .unwrap()
            .insert(*i, (m.partition(), m.offset()));
    }
}

/// Produces a generated workload and returns every record with its partition and offset.
pub fn produce(b: &TestBroker, cfg: WorkloadConfig) -> Vec<Produced> {
    let producer: ThreadedProducer<Reports> = client_config(&b.bootstrap, &[])
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random")
        .set("queue.buffering.max.messages", "2000000")
        .create_with_context(Reports::default())
        .expect("producer");
    let records: Vec<_> = Generator::new(cfg).collect();
    for (i, r) in records.iter().enumerate() {
        let mut rec = BaseRecord::with_opaque_to(b.input_topic(r.topic), Box::new(i))
            .key(r.key.as_bytes())
            .payload(&r.value)
            .timestamp(r.timestamp_ms);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    rec = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
    let reports = producer.context().0.lock().unwrap();
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let (partition, offset) = reports[&i];
            Produced {
                kind: r.topic,
                partition,
                offset,
                timestamp: r.timestamp_ms,
                key: r.key.into_bytes(),
                value: r.value,
            }
        })
        .collect()
}

fn kind_index(k: InputKind) -> u8 {
    match k {
        InputKind::Payment => 0,
        InputKind::Mobility => 1,
        InputKind::Command => 2,
    }
}

/// What the processor must end with, from the pure fold of the records in merge order.
pub struct Expected {
    pub states: BTreeMap<String, UserState>,
    pub trees: BTreeSet<String>,
    /// (source topic kind, partition, offset) of every record that must be dead-lettered.
    pub dead_letters: BTreeSet<(u8, i32, i64)>,
    pub duplicates: u64,
    /// Records the fold applied (credits and commands).
    pub applied: u64,
    /// Trees the fold matured, counting repeats (equals `trees.len()`: tree ids are unique).
    pub tree_count: u64,
    /// Rejected records by reason code, duplicates included (as `ProcessorStats::rejections`).
    pub rejections: BTreeMap<&'static str, u64>,
    /// Applied credit events by behaviour.
    pub credits_by_behaviour: BTreeMap<Behaviour, u64>,
}

impl Expected {
    /// Asserts the workload exercises what the issue asks for: every behaviour among the
    /// applied credits, duplicates, too-late events and each kind of malformed record the
    /// generator makes, and some trees.
    pub fn assert_covers_the_workload(&self) {
        let missing: Vec<_> = Behaviour::ALL
            .iter()
            .filter(|b| self.credits_by_behaviour.get(b).copied().unwrap_or(0) == 0)
            .collect();
        assert!(
            missing.is_empty(),
            "behaviours never credited: {missing:?} (credited: {:?})",
            self.credits_by_behaviour
        );
        for code in [
            "duplicate",
            "too_late",
            "undecodable",
            "malformed",
            "negative_amount",
            "absurd_value",
            "unknown_behaviour",
        ] {
            assert!(
                self.rejections.get(code).copied().unwrap_or(0) > 0,
                "the workload has no {code} rejection: {:?}",
                self.rejections
            );
        }
        assert_eq!(
            self.rejections.get("duplicate").copied().unwrap_or(0),
            self.duplicates
        );
        assert!(!self.trees.is_empty(), "the workload matures trees");
        assert!(
            !self.dead_letters.is_empty(),
            "the workload has dead letters"
        );
    }
}

pub fn expected(rules: &RuleSet, records: &[Produced]) -> Expected {
    // The processor's merge, re-implemented: per partition number, each topic's records in
    // offset order form a lane; repeatedly take the lane head with the smallest
    // (record timestamp, topic index, offset). (A lane is never reordered: a record with an
    // older timestamp behind a newer one in the same partition waits its turn.)
    let mut lanes: BTreeMap<(i32, u8), std::collections::VecDeque<&Produced>> = BTreeMap::new();
    let mut by_offset: Vec<&Produced> = records.iter().collect();
    by_offset.sort_by_key(|r| (r.partition, kind_index(r.kind), r.offset));
    for r in by_offset {
        lanes
            .entry((r.partition, kind_index(r.kind)))
            .or_default()
            .push_back(r);
    }
    let mut sorted: Vec<&Produced> = Vec::with_capacity(records.len());
    for p in 0..PARTITIONS {
        loop {
            let best = (0..3u8)
                .filter_map(|t| {
                    lanes
                        .get(&(p, t))
                        .and_then(|l| l.front())
                        .map(|h| ((h.timestamp, t, h.offset), t))
                })
                .min();
            let Some((_, t)) = best else { break };
            if let Some(r) = lanes.get_mut(&(p, t)).and_then(|l| l.pop_front()) {
                sorted.push(r);
            }
        }
    }
    let mut states: BTreeMap<String, UserState> = BTreeMap::new();
    let mut trees = BTreeSet::new();
    let mut dead_letters = BTreeSet::new();
    let mut duplicates = 0;
    let (mut applied, mut tree_count) = (0u64, 0u64);
    let mut rejections: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut credits_by_behaviour: BTreeMap<Behaviour, u64> = BTreeMap::new();
    for r in sorted {
        let decoded = Event::decode(r.kind, &r.value, r.timestamp).and_then(|e| {
            if e.user_id.as_bytes() == r.key.as_slice() {
                Ok(e)
            } else {
                Err(Rejection::Malformed(Malformed::KeyMismatch {
                    key: String::new(),
                    user_id: String::new(),
                }))
            }
        });
        let result = decoded.and_then(|e| {
            let s = states
                .entry(e.user_id.clone())
                .or_insert_with(|| UserState::new(&e.user_id));
            rules
                .apply(s, &e)
                .map(|o| (o.credit.map(|c| c.behaviour), o.trees))
        });
        match result {
            Ok((credit, t)) => {
                applied += 1;
                if let Some(b) = credit {
                    *credits_by_behaviour.entry(b).or_default() += 1;
                }
                for t in t {
                    tree_count += 1;
                    assert!(
                        trees.insert(t.tree_id.clone()),
                        "the fold matured tree {} twice",
                        t.tree_id
                    );
                }
            }
            Err(e) => {
                *rejections.entry(e.code()).or_default() += 1;
                if e == Rejection::Duplicate {
                    duplicates += 1;
                } else {
                    dead_letters.insert((kind_index(r.kind), r.partition, r.offset));
                }
            }
        }
    }
    states.retain(|_, s| s.newest_event_ms.is_some());
    Expected {
        states,
        trees,
        dead_letters,
        duplicates,
        applied,
        tree_count,
        rejections,
        credits_by_behaviour,
    }
}

/// Asserts a single uninterrupted run's counters equal what the pure fold predicts: every
/// record consumed, applied, rejected (by reason), deduplicated and dead-lettered exactly once,
/// every tree counted once, every record committed.
pub fn check_stats(stats: &ProcessorStats, want: &Expected, records: usize) {
    let get = ProcessorStats::get;
    let rejections = stats
        .rejections
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let got = [
        ("consumed", get(&stats.consumed)),
        ("committed_records", get(&stats.committed_records)),
        ("applied", get(&stats.applied)),
        ("rejected", get(&stats.rejected)),
        ("deduplicated", get(&stats.deduplicated)),
        ("dead_lettered", get(&stats.dead_lettered)),
        ("trees", get(&stats.trees)),
        ("merge_early_releases", get(&stats.merge_early_releases)),
    ];
    let want_counts = [
        ("consumed", records as u64),
        ("committed_records", records as u64),
        ("applied", want.applied),
        ("rejected", want.rejections.values().sum()),
        ("deduplicated", want.duplicates),
        ("dead_lettered", want.dead_letters.len() as u64),
        ("trees", want.tree_count),
        // Every record in the canonical merge order, which is what the fold assumes.
        ("merge_early_releases", 0),
    ];
    assert_eq!(got, want_counts, "processor counters vs the pure fold");
    assert_eq!(rejections, want.rejections, "rejections by reason");
}

/// A service (processor by default, or fulfilment) running in a thread.
pub struct Running<S = ProcessorStats, E = forest_processor::ProcessorError> {
    pub stats: Arc<S>,
    pub shutdown: Shutdown,
    pub handle: JoinHandle<Result<(), E>>,
}

pub type RunningFulfilment = Running<FulfilmentStats, forest_fulfilment::FulfilmentError>;

pub fn start(cfg: ProcessorConfig) -> Running {
    let stats = Arc::new(ProcessorStats::default());
    let shutdown: Shutdown = Arc::new(AtomicBool::new(false));
    let (s, d) = (stats.clone(), shutdown.clone());
    let handle = std::thread::spawn(move || forest_processor::run(cfg, d, s));
    Running {
        stats,
        shutdown,
        handle,
    }
}

impl<S, E> Running<S, E> {
    pub fn stop(self) -> Result<(), E> {
        self.shutdown.store(true, Ordering::Relaxed);
        self.handle.join().expect("service thread does not panic")
    }

    /// Waits for a run that is expected to end by itself (an injected crash).
    pub fn join_within(self, timeout: Duration) -> Result<(), E> {
        let deadline = Instant::now() + timeout;
        while !self.handle.is_finished() {
            assert!(
                Instant::now() < deadline,
                "service did not stop within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.handle.join().expect("service thread does not panic")
    }
}

pub fn start_fulfilment(cfg: FulfilmentConfig) -> RunningFulfilment {
    let stats = Arc::new(FulfilmentStats::default());
    let shutdown: Shutdown = Arc::new(AtomicBool::new(false));
    let (s, d) = (stats.clone(), shutdown.clone());
    let handle = std::thread::spawn(move || forest_fulfilment::run(cfg, d, s));
    Running {
        stats,
        shutdown,
        handle,
    }
}

/// Current end offset of every partition of `topic`.
pub fn topic_ends(b: &TestBroker, topic: &str) -> BTreeMap<(String, i32), i64> {
    forest_kafka::end_offsets(&b.bootstrap, topic)
        .unwrap_or_else(|e| panic!("end offsets of {topic}: {e}"))
        .into_iter()
        .map(|(p, end)| ((topic.to_string(), p), end))
        .collect()
}

/// Waits until the fulfilment committed every partition in `ends` to at least its end.
pub fn wait_fulfilment_at(
    stats: &FulfilmentStats,
    ends: &BTreeMap<(String, i32), i64>,
    timeout: Duration,
) {
    let start = Instant::now();
    loop {
        let got = stats.committed_offsets();
        if ends
            .iter()
            .all(|(tp, end)| *end == 0 || got.get(tp).is_some_and(|o| o >= end))
        {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "fulfilment did not reach {ends:?} within {timeout:?}: at {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `cond` holds, polling.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Produces raw records (key, value) to a topic, partitioned like Forest's producers.
pub fn produce_raw(b: &TestBroker, topic: &str, records: &[(Vec<u8>, Vec<u8>)]) {
    let producer: ThreadedProducer<Reports> = client_config(&b.bootstrap, &[])
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .create_with_context(Reports::default())
        .expect("producer");
    for (i, (k, v)) in records.iter().enumerate() {
        let mut rec = BaseRecord::with_opaque_to(topic, Box::new(i))
            .key(k)
            .payload(v);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    rec = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
    assert_eq!(
        producer.context().0.lock().unwrap().len(),
        records.len(),
        "all produced"
    );
}

/// The default rules with every species 100 times cheaper, so a short test workload matures
/// many trees (with the real costs a user needs weeks of activity for one).
pub fn cheap_tree_rules() -> Arc<RuleSet> {
    Arc::new(RuleSet::from_toml(&cheap_tree_rules_toml()).expect("cheap rules are valid"))
}

/// The text of [`cheap_tree_rules`], for `forest --rules FILE`.
pub fn cheap_tree_rules_toml() -> String {
    let mut text = forest_domain::DEFAULT_RULES_TOML.to_string();
    for (real, cheap) in [
        ("17900", "179"),
        ("22400", "224"),
        ("19680", "196"),
        ("146210", "1462"),
        ("215680", "2156"),
    ] {
        let from = format!("cost_g = {real}");
        assert!(
            text.contains(&from),
            "default rules still price a species at {real} g"
        );
        text = text.replace(&from, &format!("cost_g = {cheap}"));
    }
    text
}

/// Runs the processor over the produced records until it caught up, then stops it.
pub fn run_processor_to_end(
    b: &TestBroker,
    records: &[Produced],
    rules: Arc<RuleSet>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = b.processor_config(dir.path(), "g");
    cfg.rules = rules;
    let p = start(cfg);
    wait_caught_up(
        &[&p.stats],
        &end_offsets(b, records),
        Duration::from_secs(300),
    );
    p.stop().expect("processor stops gracefully");
    dir
}

/// The end offset of every input partition, from the produced records.
pub fn end_offsets(b: &TestBroker, records: &[Produced]) -> BTreeMap<(String, i32), i64> {
    let mut ends = BTreeMap::new();
    for r in records {
        let e = ends
            .entry((b.input_topic(r.kind).to_string(), r.partition))
            .or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    ends
}

/// Waits until the instances together have committed every input partition to its end.
pub fn wait_caught_up(
    instances: &[&Arc<ProcessorStats>],
    ends: &BTreeMap<(String, i32), i64>,
    timeout: Duration,
) {
    let start = Instant::now();
    loop {
        let mut done = true;
        for (tp, end) in ends {
            let best = instances
                .iter()
                .filter_map(|s| s.committed_offsets().get(tp).copied())
                .max()
                .unwrap_or(-1);
            if best < *end {
                done = false;
                break;
            }
        }
        if done {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "processor did not catch up within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sum of the offsets in `offsets` over the partitions of `ends` (a partition missing from
/// `offsets` counts as 0): with `ends` itself, the total to reach.
pub fn offsets_total(
    offsets: &BTreeMap<(String, i32), i64>,
    ends: &BTreeMap<(String, i32), i64>,
) -> i64 {
    ends.keys()
        .map(|tp| offsets.get(tp).copied().unwrap_or(0).max(0))
        .sum()
}

/// The best committed offset per partition over several instances' stats.
pub fn committed_union(instances: &[&Arc<ProcessorStats>]) -> BTreeMap<(String, i32), i64> {
    let mut all: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for s in instances {
        for (tp, o) in s.committed_offsets() {
            let e = all.entry(tp).or_insert(o);
            *e = (*e).max(o);
        }
    }
    all
}

/// A plain consumer in `group` (not subscribed): reads and writes the group's Kafka offsets.
fn group_client(b: &TestBroker, group: &str) -> BaseConsumer {
    client_config(&b.bootstrap, &[])
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("group client")
}

/// The offsets Kafka holds for `group` on the partitions of `ends` (missing when none).
pub fn kafka_committed_offsets(
    b: &TestBroker,
    group: &str,
    ends: &BTreeMap<(String, i32), i64>,
) -> BTreeMap<(String, i32), i64> {
    let c = group_client(b, group);
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (t, p) in ends.keys() {
        tpl.add_partition(t, *p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(30))
        .expect("read the group's committed offsets");
    got.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
            _ => None,
        })
        .collect()
}

/// Commits `offsets` to Kafka for `group` while no processor runs: joins the group with a
/// plain consumer (a commit from outside the group is refused by the mock cluster once the
/// group exists), waits for the assignment of every partition in `offsets`, commits, leaves,
/// and reads the offsets back.
pub fn commit_kafka_offsets(b: &TestBroker, group: &str, offsets: &BTreeMap<(String, i32), i64>) {
    let c: BaseConsumer = client_config(&b.bootstrap, &[])
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .expect("group client");
    let topics: BTreeSet<&str> = offsets.keys().map(|(t, _)| t.as_str()).collect();
    c.subscribe(&topics.into_iter().collect::<Vec<_>>())
        .expect("subscribe");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for ((t, p), o) in offsets {
        tpl.add_partition_offset(t, *p, rdkafka::Offset::Offset(*o))
            .expect("offset");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Polling serves the group protocol; records it returns are ignored.
        let _ = c.poll(Duration::from_millis(100));
        let assigned = c.assignment().map(|a| a.count()).unwrap_or(0);
        if assigned == offsets.len() {
            match c.commit(&tpl, CommitMode::Sync) {
                Ok(()) => break,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "could not commit offsets for {group}: {e}"
                ),
            }
        }
        assert!(
            Instant::now() < deadline,
            "the offset committer never got all {} partitions of {group} (has {assigned})",
            offsets.len()
        );
    }
    c.unsubscribe();
    drop(c);
    assert_eq!(
        &kafka_committed_offsets(b, group, offsets),
        offsets,
        "the group's Kafka offsets read back"
    );
}

/// This process's resident set size in bytes (`VmRSS` of /proc/self/status).
/// What a backpressure test saw while something downstream of the consumer was slow.
/// The most records a processor with `cfg` holds consumed but not durably committed: the open
/// batch (plus, with overlapped commits, the two closed batches the committer thread may hold:
/// one being written or delivered, one waiting), the merge buffer's hard bound (its bound plus
/// one minimal poll round per lane, see `Merger::hard_bound`) and one poll round (the consumer
/// loop reads up to max(batch, 5,000) records per round).
pub fn uncommitted_bound(cfg: &forest_processor::ProcessorConfig) -> u64 {
    let lanes = 3 * PARTITIONS as usize;
    let batches = if cfg.overlap_commits { 3 } else { 1 };
    (batches * cfg.batch_max_records
        + cfg.max_buffered
        + lanes * forest_processor::merge::LANE_ROUND_MIN
        + cfg.batch_max_records.max(5_000)) as u64
}

/// The backpressure campaign both slow-phase tests run: produce a 300,000-record workload
/// (`seed`), start the processor with `cfg`, and once 20,000 records are committed make the
/// system slow (`slow`) for 12 s while sampling it ([`SlowPhase`]), then `normal` again. After
/// catching up, the slow phase must have held consumption within [`uncommitted_bound`] and RSS
/// growth within 48 MiB, and the counters and every output must equal the pure fold's.
///
/// The RSS bound: the processor's buffers hold at most the bound in records (~200 B each with
/// their allocations, ~13 MB) and librdkafka's prefetch is capped here at 8 MiB
/// (`queued.max.messages.kbytes`), while the whole input buffered in the process would take
/// ~60 MB more. (The counter bound is the precise check.) With librdkafka's default 64 MiB
/// prefetch, growth varied from 5 to 64 MiB between runs and once failed CI against a 64 MiB
/// bound; with the cap it was 11-15 MiB in 6 runs (session 24, both brokers), and session 24
/// set the bound to 32 MiB. Session 25's CI then saw 39 MB once (the mock cluster's slow-store
/// run, whose broker, block cache and projection cache all live in this process), so the bound
/// is 48 MiB: still below what buffering the rest of the input would add.
pub fn slow_phase_campaign(
    b: &TestBroker,
    store: &std::path::Path,
    mut cfg: ProcessorConfig,
    seed: u64,
    what: &str,
    slow: impl FnOnce(),
    normal: impl FnOnce(),
) {
    const CATCH_UP: Duration = Duration::from_secs(300);
    const RSS_GROWTH_BOUND: u64 = 48 << 20;
    const PREFETCH_KBYTES: u64 = 8 << 10;
    let started = Instant::now();
    let records = produce(b, workload(seed, 300_000, 30_000));
    let want = expected(&Default::default(), &records);
    let ends = end_offsets(b, &records);
    let bound = uncommitted_bound(&cfg);
    // librdkafka's own prefetch, capped well under the backlog (its default, 64 MiB, would
    // hold the whole rest of the input, so RSS would say nothing about the processor's own
    // buffering, and varied by tens of MB with where its queue stood when the phase began).
    // librdkafka lowers `fetch.max.bytes` to it, so the queue overshoots by one fetch at most.
    // (The processor's producers get the setting too; they ignore it, with a log line.)
    cfg.kafka.push((
        "queued.max.messages.kbytes".into(),
        PREFETCH_KBYTES.to_string(),
    ));
    let get = ProcessorStats::get;
    let p = start(cfg);
    wait_until("the processor is under way", CATCH_UP, || {
        get(&p.stats.committed_records) >= 20_000
    });
    let phase = SlowPhase::run(&p.stats, Duration::from_secs(12), slow, normal);
    wait_caught_up(&[&p.stats], &ends, CATCH_UP);
    let stats = p.stats.clone();
    p.stop().expect("graceful stop");
    phase.check(what, records.len() as u64, bound, RSS_GROWTH_BOUND);
    check_stats(&stats, &want, records.len());
    eprintln!(
        "{what}: {}; {:.1} s",
        check_exact(b, store, &want),
        started.elapsed().as_secs_f64()
    );
}

pub struct SlowPhase {
    pub committed0: u64,
    pub committed1: u64,
    pub consumed1: u64,
    /// The most records held consumed but not durably committed.
    pub max_lag: u64,
    pub rss0: u64,
    pub max_rss: u64,
    pub samples: u32,
}

impl SlowPhase {
    /// Calls `slow`, samples the processor and this process's RSS every 50 ms for `phase`,
    /// then calls `normal`.
    pub fn run(
        stats: &ProcessorStats,
        phase: Duration,
        slow: impl FnOnce(),
        normal: impl FnOnce(),
    ) -> Self {
        let get = ProcessorStats::get;
        let rss0 = rss_bytes();
        let committed0 = get(&stats.committed_records);
        slow();
        let started = Instant::now();
        let (mut max_lag, mut max_rss, mut samples) = (0u64, rss0, 0);
        while started.elapsed() < phase {
            max_lag =
                max_lag.max(get(&stats.consumed).saturating_sub(get(&stats.committed_records)));
            max_rss = max_rss.max(rss_bytes());
            samples += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        let (committed1, consumed1) = (get(&stats.committed_records), get(&stats.consumed));
        normal();
        Self {
            committed0,
            committed1,
            consumed1,
            max_lag,
            rss0,
            max_rss,
            samples,
        }
    }

    /// Prints the phase and asserts it: input was still waiting at its end, progress slowed
    /// (less than half the rest committed), the consumed-but-uncommitted records stayed within
    /// `bound`, and RSS grew by at most `rss_growth_bound`.
    pub fn check(&self, what: &str, records: u64, bound: u64, rss_growth_bound: u64) {
        let Self {
            committed0,
            committed1,
            consumed1,
            max_lag,
            rss0,
            max_rss,
            samples,
        } = *self;
        eprintln!(
            "{what}: {samples} samples: committed {committed0} -> {committed1}, consumed {consumed1} of {records}; consumed-uncommitted at most {max_lag} (bound {bound}); RSS {} MB -> at most {} MB (growth bound {} MB)",
            rss0 >> 20,
            max_rss >> 20,
            rss_growth_bound >> 20
        );
        assert!(
            consumed1 < records && committed1 < records,
            "{what}: the slow phase ended with input still waiting (consumed {consumed1})"
        );
        assert!(
            committed1 - committed0 < (records - committed0) / 2,
            "{what}: not slow: {} records committed in the slow phase",
            committed1 - committed0
        );
        assert!(
            max_lag <= bound,
            "{what}: consumed but uncommitted records reached {max_lag}, above {bound}"
        );
        assert!(
            max_rss.saturating_sub(rss0) <= rss_growth_bound,
            "{what}: RSS grew by {} MB in the slow phase",
            (max_rss - rss0) >> 20
        );
    }
}

pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/self/status")
        * 1024
}

/// Reads a whole topic from the beginning to its current end: (key, value, headers).
pub fn read_topic(b: &TestBroker, topic: &str) -> Vec<(Vec<u8>, Vec<u8>, Vec<(String, Vec<u8>)>)> {
    forest_kafka::read_topic(&b.bootstrap, topic, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("reading {topic}: {e}"))
        .into_iter()
        .map(|r| (r.key, r.value, r.headers))
        .collect()
}

/// Checks every invariant of the processor against the expectation; returns a summary line.
/// Outputs may repeat (a crash re-sends the outbox), but every repeated tree or dead letter
/// must be byte-identical to its first copy.
pub fn check(b: &TestBroker, store_dir: &std::path::Path, want: &Expected) -> String {
    check_with(b, store_dir, want, Copies::IdenticalRepeats)
}

/// [`check`] for a run without crashes: additionally, each tree and each dead letter is on its
/// topic exactly once (tree records == distinct tree ids, DLQ records == expected dead letters).
pub fn check_exact(b: &TestBroker, store_dir: &std::path::Path, want: &Expected) -> String {
    check_with(b, store_dir, want, Copies::ExactlyOnce)
}

/// How many copies of an output a run may leave on its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copies {
    /// No crash: one record per tree and per dead letter.
    ExactlyOnce,
    /// After crashes: repeats allowed, each byte-identical to the first copy.
    IdenticalRepeats,
}

pub fn check_with(
    b: &TestBroker,
    store_dir: &std::path::Path,
    want: &Expected,
    copies: Copies,
) -> String {
    let store = forest_store::Store::open(store_dir, &Default::default()).expect("store opens");
    let users = check_projections(&store, want);
    assert_eq!(store.outbox_len().expect("outbox"), 0, "outbox drained");
    check_outputs(b, want, users, copies)
}

/// Checks that the store's projections are exactly the expected ones; returns how many.
pub fn check_projections(store: &forest_store::Store, want: &Expected) -> usize {
    let got: BTreeMap<String, UserState> = store
        .users()
        .map(|s| s.expect("state decodes"))
        .map(|s| (s.user_id.to_string(), s))
        .collect();
    let mut wrong = 0;
    // Differences by input partition and by kind: the first thing to look at when this fails.
    let mut by_partition: BTreeMap<i32, usize> = BTreeMap::new();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for (u, s) in &want.states {
        let g = got.get(u);
        if g != Some(s) {
            if wrong < 3 {
                eprintln!("user {u}: want {s:?}\n got {g:?}");
            }
            wrong += 1;
            let p = forest_kafka::partition_of(u.as_bytes(), PARTITIONS).unwrap_or(-1);
            *by_partition.entry(p).or_default() += 1;
            let kind = match g {
                None => "missing",
                Some(g) if g.lifetime_g > s.lifetime_g => "more credit",
                Some(g) if g.lifetime_g < s.lifetime_g => "less credit",
                Some(_) => "same credit, other fields",
            };
            *kinds.entry(kind).or_default() += 1;
        }
    }
    assert_eq!(
        wrong,
        0,
        "{wrong} of {} projections differ from the pure fold (by partition {by_partition:?}, by kind {kinds:?})",
        want.states.len()
    );
    assert_eq!(got.len(), want.states.len(), "stored users");
    got.len()
}

/// Checks the trees topic and the DLQ against the expectation; returns a summary line.
fn check_outputs(b: &TestBroker, want: &Expected, users: usize, copies: Copies) -> String {
    let trees = read_topic(b, &b.topics.trees);
    // First copy of each tree: (key, value).
    let mut first: BTreeMap<String, (&[u8], &[u8])> = BTreeMap::new();
    for (key, value, _) in &trees {
        let t =
            forest_proto::v1::TreeMatured::decode(value.as_slice()).expect("TreeMatured decodes");
        assert_eq!(
            key.as_slice(),
            t.user_id.as_bytes(),
            "trees are keyed by user"
        );
        if let Some(prev) = first.insert(t.tree_id.clone(), (key, value)) {
            assert_eq!(
                prev,
                (key.as_slice(), value.as_slice()),
                "tree {} was re-sent with different bytes",
                t.tree_id
            );
        }
    }
    let ids: BTreeSet<String> = first.into_keys().collect();
    assert_eq!(ids, want.trees, "tree ids after dedupe");

    let dlq = read_topic(b, &b.topics.dlq);
    let mut coords: BTreeMap<(u8, i32, i64), (&[u8], &[u8], &[(String, Vec<u8>)])> =
        BTreeMap::new();
    for (key, value, hdrs) in &dlq {
        let h = |k: &str| {
            String::from_utf8(
                hdrs.iter()
                    .find(|(n, _)| n == k)
                    .unwrap_or_else(|| panic!("DLQ header {k}"))
                    .1
                    .clone(),
            )
            .expect("utf8")
        };
        assert!(!h(headers::REASON).is_empty() && !h(headers::ERROR).is_empty());
        let kind = [&b.topics.payments, &b.topics.mobility, &b.topics.commands]
            .iter()
            .position(|t| **t == h(headers::SOURCE_TOPIC))
            .expect("DLQ source topic is an input") as u8;
        let at = (
            kind,
            h(headers::SOURCE_PARTITION).parse().expect("partition"),
            h(headers::SOURCE_OFFSET).parse().expect("offset"),
        );
        let this = (key.as_slice(), value.as_slice(), hdrs.as_slice());
        if let Some(prev) = coords.insert(at, this) {
            assert_eq!(
                prev, this,
                "dead letter {at:?} was re-sent with different bytes"
            );
        }
    }
    let coords: BTreeSet<(u8, i32, i64)> = coords.into_keys().collect();
    assert_eq!(
        coords, want.dead_letters,
        "dead letters (by source coordinates)"
    );
    if copies == Copies::ExactlyOnce {
        assert_eq!(
            trees.len(),
            ids.len(),
            "tree records on the topic vs distinct tree ids (a run without crashes sends each once)"
        );
        assert_eq!(
            dlq.len(),
            want.dead_letters.len(),
            "DLQ records vs expected dead letters (a run without crashes sends each once)"
        );
    }
    format!(
        "{} users, {} trees ({} records, {} re-sent), {} dead letters ({} records), {} duplicates",
        users,
        ids.len(),
        trees.len(),
        trees.len() - ids.len(),
        coords.len(),
        dlq.len(),
        want.duplicates
    )
}

/// A test workload over the 20 simulated days before now. Its records are up to 20 days old,
/// so the real broker from `scripts/kafka.sh` runs without time-based retention (with the
/// default 7 days its retention check deleted them mid-test).
pub fn workload(seed: u64, events: u64, users: u64) -> WorkloadConfig {
    let span_ms = 20 * 86_400_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    WorkloadConfig {
        start_ms: now - span_ms,
        seed,
        events,
        users,
        duplicate_rate: 0.02,
        late_rate: 0.01,
        malformed_rate: 0.005,
        span_ms,
        ..WorkloadConfig::default()
    }
}

/// Every record of the three input topics as they are in Kafka (for workloads produced by
/// another process, such as `forest loadgen`).
pub fn input_records(b: &TestBroker) -> Vec<Produced> {
    let mut all = Vec::new();
    for kind in [InputKind::Payment, InputKind::Mobility, InputKind::Command] {
        let topic = b.input_topic(kind);
        for r in forest_kafka::read_topic(&b.bootstrap, topic, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("reading {topic}: {e}"))
        {
            all.push(Produced {
                kind,
                partition: r.partition,
                offset: r.offset,
                timestamp: r.timestamp.unwrap_or(0),
                key: r.key,
                value: r.value,
            });
        }
    }
    all
}

/// Every order record on the orders topic, decoded, with its raw bytes.
pub fn orders(b: &TestBroker) -> Vec<(forest_proto::v1::PlantingOrder, Vec<u8>)> {
    read_topic(b, &b.fulfilment.orders)
        .into_iter()
        .map(|(key, value, _)| {
            let o =
                forest_proto::v1::PlantingOrder::decode(value.as_slice()).expect("order decodes");
            assert_eq!(key, o.partner_id.as_bytes(), "orders are keyed by partner");
            (o, value)
        })
        .collect()
}

/// Checks the one-order-per-tree invariant on the topic; returns (distinct orders, records).
pub fn check_one_order_per_tree(b: &TestBroker, trees: &BTreeSet<String>) -> (usize, usize) {
    let records = orders(b);
    let mut by_key: BTreeMap<String, &Vec<u8>> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for (o, bytes) in &records {
        assert_eq!(o.order_id, forest_fulfilment::ledger::order_id(&o.tree_id));
        // A re-sent allocation is byte-identical: partners dedupe by its idempotency key.
        if let Some(prev) = by_key.insert(o.idempotency_key.clone(), bytes) {
            assert_eq!(prev, bytes, "re-sent order {} differs", o.idempotency_key);
        }
        ids.insert(o.tree_id.clone());
    }
    assert_eq!(&ids, trees, "one order per distinct matured tree");
    (ids.len(), records.len())
}

/// A partner file at `dir/name`: one partner, two sites, `capacity` per species per site.
pub fn partners_file(dir: &std::path::Path, name: &str, capacity: u32) -> std::path::PathBuf {
    let path = dir.join(name);
    write_partners(&path, capacity);
    path
}

/// The species of the default rules.
pub const SPECIES: [&str; 5] = [
    "saxaul",
    "red_willow",
    "sand_willow",
    "mongolian_pine",
    "populus_euphratica",
];

/// One partner, two sites, `capacity` per species per site.
pub fn write_partners(path: &std::path::Path, capacity: u32) {
    let cap: Vec<String> = SPECIES
        .iter()
        .map(|s| format!("{s} = {capacity}"))
        .collect();
    let cap = cap.join(", ");
    let text = format!(
        "version = \"test-{capacity}\"\n\
         [[partners]]\nid = \"p1\"\nname = \"P1\"\nactive = true\n\
         sites = [ {{ id = \"s1\", region = \"R1\", capacity = {{ {cap} }} }},\n\
                   {{ id = \"s2\", region = \"R2\", capacity = {{ {cap} }} }} ]\n"
    );
    // Write then rename, so the reloading service never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write partners");
    std::fs::rename(&tmp, path).expect("rename partners");
}

/// The mock cluster's faults, in sequence while a service runs: 20 NOT_LEADER errors on
/// Produce and on Fetch, 10 timeouts on OffsetCommit, the broker down for 2 s, then 1 s of
/// 50 ms round trips. `settle` is how long to let the service work before the first fault.
pub fn inject_broker_faults(broker: &EmbeddedBroker, settle: Duration) {
    inject_broker_faults_observed(broker, settle, |_| {});
}

/// A fault of [`inject_broker_faults`], announced to its observer just before it is injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    RequestErrors,
    BrokerDown,
    BrokerUp,
    SlowRoundTrips,
    Cleared,
}

/// [`inject_broker_faults`], calling `before` just before each fault is injected (and once
/// after the last one cleared), so a test can check the service was mid-stream then.
pub fn inject_broker_faults_observed(
    broker: &EmbeddedBroker,
    settle: Duration,
    mut before: impl FnMut(Fault),
) {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = broker.cluster();
    let errs = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 20];
    std::thread::sleep(settle);
    before(Fault::RequestErrors);
    cluster.request_errors(RDKafkaApiKey::Produce, &errs);
    cluster.request_errors(RDKafkaApiKey::Fetch, &errs);
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 10],
    );
    std::thread::sleep(Duration::from_millis(500));
    before(Fault::BrokerDown);
    cluster.broker_down(1).expect("broker down");
    std::thread::sleep(Duration::from_secs(2));
    before(Fault::BrokerUp);
    cluster.broker_up(1).expect("broker up");
    before(Fault::SlowRoundTrips);
    cluster
        .broker_round_trip_time(1, Duration::from_millis(50))
        .expect("rtt");
    std::thread::sleep(Duration::from_secs(1));
    cluster
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("rtt");
    before(Fault::Cleared);
}

/// Transactions mode's promise to read_committed consumers: every tree and every dead letter
/// appears exactly once in its topic (no re-sent copies, even after a crash). Returns the
/// number of trees.
pub fn check_outputs_exactly_once(b: &TestBroker) -> usize {
    let trees = read_topic(b, &b.topics.trees);
    let mut ids = BTreeSet::new();
    for (_, value, _) in &trees {
        let t =
            forest_proto::v1::TreeMatured::decode(value.as_slice()).expect("TreeMatured decodes");
        assert!(
            ids.insert(t.tree_id.clone()),
            "tree {} seen twice",
            t.tree_id
        );
    }
    let dlq = read_topic(b, &b.topics.dlq);
    let mut coords = BTreeSet::new();
    for (_, _, hdrs) in &dlq {
        let src: Vec<&Vec<u8>> = hdrs
            .iter()
            .filter(|(k, _)| k.starts_with("forest.source."))
            .map(|(_, v)| v)
            .collect();
        assert!(
            coords.insert(format!("{src:?}")),
            "dead letter {src:?} seen twice"
        );
    }
    ids.len()
}
