//! Shared harness of Forest's end-to-end tests.
//!
//! Every test gets its own topics (a unique prefix) on the broker named by
//! `FOREST_TEST_BROKERS` (a real Apache Kafka, started by `scripts/test`), or, without it, on a
//! fresh embedded mock cluster. Expected results are computed here, independently of the
//! processor, by folding the produced records with the pure domain in the documented merge
//! order.

use forest_domain::{Event, InputKind, Malformed, Rejection, RuleSet, UserState};
use forest_fulfilment::{FulfilmentConfig, FulfilmentStats, FulfilmentTopics, PartnersSource};
use forest_kafka::{EmbeddedBroker, client_config, ensure_topics, headers};
use forest_processor::{ProcessorConfig, ProcessorStats, Shutdown, Topics};
use forest_workload::{Generator, WorkloadConfig};
use prost::Message as _;
use rdkafka::ClientContext;
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
        init_logs();
        let topics = Topics::prefixed(&unique);
        let (embedded, bootstrap) = match bootstrap {
            Some(b) => (None, b),
            None => {
                let e = EmbeddedBroker::start(1).expect("embedded broker starts");
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
                .or_insert_with(|| UserState::new(e.user_id.clone()));
            rules.apply(s, &e).map(|o| o.trees)
        });
        match result {
            Ok(t) => trees.extend(t.into_iter().map(|t| t.tree_id)),
            Err(Rejection::Duplicate) => duplicates += 1,
            Err(_) => {
                dead_letters.insert((kind_index(r.kind), r.partition, r.offset));
            }
        }
    }
    states.retain(|_, s| s.newest_event_ms.is_some());
    Expected {
        states,
        trees,
        dead_letters,
        duplicates,
    }
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

/// Reads a whole topic from the beginning to its current end: (key, value, headers).
pub fn read_topic(b: &TestBroker, topic: &str) -> Vec<(Vec<u8>, Vec<u8>, Vec<(String, Vec<u8>)>)> {
    forest_kafka::read_topic(&b.bootstrap, topic, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("reading {topic}: {e}"))
        .into_iter()
        .map(|r| (r.key, r.value, r.headers))
        .collect()
}

/// Checks every invariant of the processor against the expectation; returns a summary line.
pub fn check(b: &TestBroker, store_dir: &std::path::Path, want: &Expected) -> String {
    let store = forest_store::Store::open(store_dir, &Default::default()).expect("store opens");
    let users = check_projections(&store, want);
    assert_eq!(store.outbox_len().expect("outbox"), 0, "outbox drained");
    check_outputs(b, want, users)
}

/// Checks that the store's projections are exactly the expected ones; returns how many.
pub fn check_projections(store: &forest_store::Store, want: &Expected) -> usize {
    let got: BTreeMap<String, UserState> = store
        .users()
        .map(|s| s.expect("state decodes"))
        .map(|s| (s.user_id.clone(), s))
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
fn check_outputs(b: &TestBroker, want: &Expected, users: usize) -> String {
    let trees = read_topic(b, &b.topics.trees);
    let mut ids = BTreeSet::new();
    for (key, value, _) in &trees {
        let t =
            forest_proto::v1::TreeMatured::decode(value.as_slice()).expect("TreeMatured decodes");
        assert_eq!(
            key.as_slice(),
            t.user_id.as_bytes(),
            "trees are keyed by user"
        );
        ids.insert(t.tree_id);
    }
    assert_eq!(ids, want.trees, "tree ids after dedupe");

    let dlq = read_topic(b, &b.topics.dlq);
    let mut coords = BTreeSet::new();
    for (_, _, hdrs) in &dlq {
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
        coords.insert((
            kind,
            h(headers::SOURCE_PARTITION).parse().expect("partition"),
            h(headers::SOURCE_OFFSET).parse().expect("offset"),
        ));
    }
    assert_eq!(
        coords, want.dead_letters,
        "dead letters (by source coordinates)"
    );
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
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = broker.cluster();
    let errs = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 20];
    std::thread::sleep(settle);
    cluster.request_errors(RDKafkaApiKey::Produce, &errs);
    cluster.request_errors(RDKafkaApiKey::Fetch, &errs);
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 10],
    );
    std::thread::sleep(Duration::from_millis(500));
    cluster.broker_down(1).expect("broker down");
    std::thread::sleep(Duration::from_secs(2));
    cluster.broker_up(1).expect("broker up");
    cluster
        .broker_round_trip_time(1, Duration::from_millis(50))
        .expect("rtt");
    std::thread::sleep(Duration::from_secs(1));
    cluster
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("rtt");
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
