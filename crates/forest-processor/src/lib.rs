//! Forest's processor: consumes the input topics in a consumer group, folds each event into the
//! user's projection with the pure domain, keeps projections in RocksDB, and emits TreeMatured
//! (and dead letters) through a transactional outbox.
//!
//! Guarantees (effectively once):
//! - Projections, each partition's next offset, and the outputs a batch produced are written in
//!   one RocksDB batch. On start and on every assignment the consumer seeks to the offsets in
//!   RocksDB, not Kafka's committed offsets, so after any crash the store and the input position
//!   agree and no event is lost or counted twice. (Kafka's committed offsets still follow the
//!   written batches, at most a second behind, for lag tools.)
//! - The store runs without RocksDB's write-ahead log by default: the input topics are the
//!   log. A crash reopens the store at its last memtable flush, which is whole (every column
//!   family flushed together), and the processor reads the input again from the offsets
//!   stored there, as after any crash (see [`ProcessorConfig::store`]). With the changelog
//!   in the outbox mode the WAL stays on ([`ProcessorConfig::store_config`]).
//! - Outputs are produced from the outbox by an idempotent producer and deleted only once Kafka
//!   acknowledged them: never lost, possibly re-sent after a crash, always with the same
//!   deterministic ids (`tree_id`; the source coordinates of a dead letter) for downstream
//!   dedupe.
//! - A record that cannot be decoded or is rejected goes to the dead-letter topic with the
//!   reason in its headers, is counted, and the partition moves on. Duplicates are counted,
//!   not dead-lettered: a producer retry is not bad input.
//! - The input topics are merged per partition number in a deterministic order (see
//!   [`merge`]), so a replay folds one user's events in the same order.
//! - With [`ProcessorConfig::projection_interval`] above zero, projections are written later
//!   than offsets and outputs; each batch stores the order it folded its records in, and a
//!   restart folds the records since the oldest unwritten change again in that order, without
//!   re-sending their outputs (see [`replay`]).
//! - With [`ExactlyOnce::Transactions`], outputs are exactly once for read_committed
//!   consumers instead: each batch's outputs, changelog records and input offsets commit in one
//!   Kafka transaction, RocksDB is written after it, and a crash in between is repaired from
//!   the changelog (see [`changelog`]).
//! - With the changelog ([`ProcessorConfig::changelog`]), state follows partitions between
//!   instances: a newly assigned partition whose local state is missing or behind is restored
//!   from the compacted changelog topic first, and local state of partitions owned elsewhere is
//!   deleted after [`ProcessorConfig::state_retention`].
//! - Backpressure: batches are written, and their outputs acknowledged, one at a time and in
//!   order, on a committer thread beside each worker (optionally, `max_outputs_in_flight` lets
//!   outputs overlap the next batch's write). The worker folds the next batch meanwhile, and
//!   blocks once two closed batches wait for the committer, so a slow store or output topic
//!   slows consumption instead of growing memory. Before partitions are revoked and on
//!   shutdown, everything folded is written and every output acknowledged.
//! - Records are read many per librdkafka call ([`forest_kafka::FetchQueue`]): the assign
//!   callback routes each assigned partition to the worker's batch queue before fetching
//!   starts, so each partition's records still arrive in offset order.

pub mod changelog;
mod core;
pub mod merge;
pub mod metrics;
pub mod replay;
mod runtime;
mod sink;

pub use forest_store::CrashPoint;
pub use runtime::run;

use forest_domain::RuleSet;
use forest_store::{StoreConfig, StoreError};
use rdkafka::error::KafkaError;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Names of the topics the processor reads and writes.
#[derive(Debug, Clone)]
pub struct Topics {
    pub payments: String,
    pub mobility: String,
    pub commands: String,
    pub trees: String,
    pub dlq: String,
    /// The projection changelog (written and read only with [`ProcessorConfig::changelog`]).
    pub changelog: String,
}

impl Default for Topics {
    fn default() -> Self {
        use forest_proto::topics as t;
        Self {
            payments: t::PAYMENTS.into(),
            mobility: t::MOBILITY.into(),
            commands: t::COMMANDS.into(),
            trees: t::TREES.into(),
            dlq: t::DLQ.into(),
            changelog: t::CHANGELOG.into(),
        }
    }
}

/// Checks one Kafka topic name the way the broker does: 1 to 249 characters from
/// `[a-zA-Z0-9._-]`, and not `.` or `..`. Checked at start-up so a typo fails with the option's
/// name instead of a broker error (or a silently auto-created topic) later.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 249 {
        return Err(format!(
            "{:?}... is {} characters long; Kafka allows at most 249",
            &name[..name.char_indices().nth(20).map_or(name.len(), |(i, _)| i)],
            name.chars().count()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not allowed as a topic name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?} contains {c:?}; Kafka topic names use only ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

impl Topics {
    /// The topics by role, with the role's name (`payments`, ..., `changelog`), the same
    /// names the command line's `--<role>-topic` options use.
    pub fn by_role(&self) -> [(&'static str, &str); 6] {
        [
            ("payments", &self.payments),
            ("mobility", &self.mobility),
            ("commands", &self.commands),
            ("trees", &self.trees),
            ("dlq", &self.dlq),
            ("changelog", &self.changelog),
        ]
    }

    /// Every name is a valid Kafka topic name and no two roles share a topic (two roles on
    /// one topic would, say, read the processor's own dead letters back as input). The error
    /// names the role(s).
    pub fn validate(&self) -> Result<(), TopicError> {
        let roles = self.by_role();
        for (role, name) in roles {
            check_topic_name(name).map_err(|reason| TopicError::Invalid { role, reason })?;
        }
        for (i, (a, name)) in roles.iter().enumerate() {
            if let Some((b, _)) = roles[i + 1..].iter().find(|(_, n)| n == name) {
                return Err(TopicError::Shared {
                    first: a,
                    second: b,
                    name: name.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Every topic name with a prefix, e.g. for tests that each need their own topics.
    pub fn prefixed(prefix: &str) -> Self {
        let d = Self::default();
        let p = |s: String| format!("{prefix}{s}");
        Self {
            payments: p(d.payments),
            mobility: p(d.mobility),
            commands: p(d.commands),
            trees: p(d.trees),
            dlq: p(d.dlq),
            changelog: p(d.changelog),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    pub brokers: String,
    pub group_id: String,
    pub topics: Topics,
    pub store_path: PathBuf,
    /// RocksDB's settings. [`ProcessorConfig::new`] turns the store's write-ahead log off
    /// ([`StoreConfig::wal`]): the input topics are the processor's log. A crash then reopens
    /// the store at its last memtable flush, whole (offsets, projections, outbox and replay
    /// records of one moment; when input is slow, from about [`StoreConfig::max_unflushed`]
    /// before the crash, plus the 5 s between an idle worker's checks), and the processor
    /// reads the input again from those offsets, as after any crash: the same state, and
    /// outputs re-sent under the same ids (in transactions mode a store the changelog has
    /// moved past is restored from it first). What it costs is a longer replay after a
    /// crash; what it saves is the WAL's copy of every batch (BENCHMARKS.md, session 18).
    /// With the changelog in the outbox mode the WAL stays on: see
    /// [`ProcessorConfig::store_config`].
    pub store: StoreConfig,
    /// Commit a batch after this many records... 20,000 by default: the bound matters only
    /// while the committer is busy (a due batch keeps taking records until it is free), that
    /// is, when catching up; there 20,000 instead of 5,000 wrote 0.40 instead of 0.52
    /// projections per event and read 36 % more events/s at projection interval 0 (the default then),
    /// with p99 at a quarter of the maximum rate no worse (BENCHMARKS.md, session 10).
    pub batch_max_records: usize,
    /// ...or when this long has passed since the batch's first record. 5 ms by default: at
    /// ~130 K events/s on Apache Kafka, 10 ms kept p99 produce-to-projection above 50 ms in 7
    /// of 8 phases, 5 ms in 6 of 18 (BENCHMARKS.md, session 9).
    pub batch_max_wait: Duration,
    /// Projections kept in memory between batches, at most...
    pub cache_users: usize,
    /// ...and at most this many estimated bytes (`forest_store::ProjectionCache`).
    pub cache_bytes: usize,
    /// Bound on records waiting in the co-partition merge.
    pub max_buffered: usize,
    /// Dead letters (key + value + headers) are cut to at most this many bytes, with header
    /// `forest.truncated` holding the value's original length. `None`: just below what the
    /// output producer accepts (its `message.max.bytes`, less framing margin); set it lower
    /// when the dead-letter topic's `max.message.bytes` is below the producer's limit.
    pub dead_letter_max_bytes: Option<usize>,
    /// How long an empty lane that is behind its high watermark (a slow or failing fetch) may
    /// hold back its partition's other lanes. Long by default: giving up early applies records
    /// out of the canonical order. (Known limit: a lane whose last records are transaction
    /// markers looks "behind" and holds the others for this long; inputs from transactional
    /// producers arrive with the transactions issue.)
    pub max_idle: Duration,
    /// librdkafka settings passed through (`--kafka-config key=value`); they win over ours.
    pub kafka: Vec<(String, String)>,
    pub rules: Arc<RuleSet>,
    pub crash_at: Option<CrashPoint>,
    /// Fault injection for tests: milliseconds to sleep before each store write (0: none).
    /// Shared, so a test can make RocksDB "slow" for a while and then fast again, and check
    /// that consumption waits rather than buffering the backlog. One relaxed load per batch.
    pub store_write_delay_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Consumer-group members in this process, each on its own thread, sharing the store. The
    /// fold of one partition is sequential; more workers use more cores.
    pub workers: usize,
    /// Outputs sent but not yet acknowledged before the processor waits (backpressure on a
    /// slow output topic). 0 (the default) waits for every batch's outputs before the next
    /// batch is written. KNOWN ISSUE: with more than 0, the broker-fault test on the mock
    /// cluster lost a TreeMatured in about half the runs (acknowledged, yet not in the topic);
    /// until that is explained, pipelined delivery stays off.
    pub max_outputs_in_flight: usize,
    /// Write each batch and deliver its outputs on a committer thread beside the worker, so
    /// the worker polls and folds the next batch meanwhile (see the `sink` module). Off: the
    /// worker does both itself, between polls. Transactions mode always runs inline.
    pub overlap_commits: bool,
    /// BENCHMARK BASELINE ONLY: plain at-least-once, to measure what effectively-once costs.
    /// Offsets are Kafka's committed ones (not in the store) and outputs go straight to Kafka
    /// (no outbox), so a crash re-applies events since the last Kafka commit. (With the
    /// store's WAL off, as `forest bench` runs it to compare like with like, a crash would
    /// also lose projections written since the last flush; the bench never crashes it.)
    pub at_least_once_baseline: bool,
    /// Fold and store, but emit nothing: `forest rebuild` replays the log into a fresh store
    /// without re-sending TreeMatured or dead letters.
    pub dry_run: bool,
    /// Also write every committed projection, and a checkpoint of each partition's input
    /// offsets, to the compacted changelog topic (through the outbox, in the same batch), and
    /// restore a newly assigned partition whose offsets this store lacks from it. See
    /// [`changelog`].
    pub changelog: bool,
    /// How outputs, state and input offsets are kept together. See [`ExactlyOnce`].
    pub exactly_once: ExactlyOnce,
    /// `transactional.id` prefix for [`ExactlyOnce::Transactions`]; worker `i` uses
    /// `{prefix}-{i}`. It must be stable across restarts of one instance (so the restarted
    /// instance fences its predecessor) and differ between instances. `None`: derived from the
    /// group, the host name and the store path, which is both in a StatefulSet.
    pub transactional_id: Option<String>,
    /// With the changelog on, the local state of a partition no worker of this process owns
    /// is deleted once it has been unowned this long (another instance owns it, and the
    /// changelog has it). `None` keeps it forever. Without the changelog local state is the
    /// only copy and is never deleted.
    pub state_retention: Option<Duration>,
    /// How long a changed projection may stay unwritten. Zero (the default): every batch
    /// writes the users it changed. Above zero: every batch still stores its input offsets
    /// and outputs, plus a small replay record of the order it folded its records in, and
    /// writes the users changed at least this long ago (oldest first; all of them before
    /// partitions are revoked and at shutdown). A user changed many times meanwhile is
    /// written once, which is what cuts RocksDB writes per event. After a crash, the records
    /// since the oldest unwritten change are folded again in the recorded order, skipping
    /// what each user's stored projection already holds, their outputs (already stored) not
    /// sent again: see the [`replay`] module. Only with the outbox mode and without the
    /// changelog, whose records carry each batch's projections. The at-least-once baseline
    /// takes it too: it then writes every changed projection once per interval and commits
    /// Kafka offsets only that far.
    pub projection_interval: Duration,
    /// With a projection interval: also write, with each batch, the share of the changed
    /// users that the time since the previous batch is of the interval (oldest first), so the
    /// writes stay spread over time after a start. Without it, every user first changed in a
    /// processor's first second falls due an interval later, together: in 6 latency runs
    /// that second had 94-110 K projection writes, against 44-68 K a second from 8 s on.
    /// Off by default: the users written early change again, and at full speed it cost about
    /// 0.02 more RocksDB writes per event; (b) read 8.4 % and 12.0 % below the (never paced)
    /// at-least-once baseline in 2 runs, against 0.1 % and -1.8 % without it, partly the
    /// baseline's own spread (BENCHMARKS.md, session 20). A batch's share is left out
    /// below 32 users and not carried over, so with batches `dt` apart the pace acts only
    /// above about 32 x interval / `dt` changed users (32 K at 5 s and 5 ms batches).
    pub pace_projection_writes: bool,
}

/// The input consumers' prefetch: `queued.min.messages` and `max.partition.fetch.bytes`
/// (before the `kafka` settings, which may override them). Public for `forest bench`'s plain
/// consumers, which share the first.
///
/// The fetch size is librdkafka's default, said out loud because a larger one was costly: a
/// partition's fetch of 10 MiB of compressed records (about 280,000 of the benchmark's)
/// overfilled the merge buffer (200,000) by itself, so lanes were paused and rewound, and
/// what librdkafka had prefetched for them was fetched again: 1.26-1.31 records fetched per
/// record consumed and 127-137 pauses in 16 M-event runs, against 1.006-1.026 and 12-34 at
/// 1 MiB (BENCHMARKS.md, session 30; `forest_consumer_fetched_records_total`).
pub const INPUT_PREFETCH: (&str, &str) = ("100000", "1048576");

/// The projection interval `forest processor` and `forest bench` use where spaced writes
/// work (the outbox mode without the changelog) and none is given. A user is then written at
/// most about once in 5 s instead of after every batch. Why 5 s and not 1 s (session 13): with
/// a 1 s interval and many users, much of the CPU went on writing the same active users again
/// every second. At the benchmark's own workload (16 M events over 1 M Zipf users, 2
/// workers) 5 s gave 1.02 M events/s at 1.80 CPU-s per M and 0.135 RocksDB writes per event,
/// 1 s 0.70 M at 2.69 and 0.294 (BENCHMARKS.md, session 13). The price: a projection
/// read from the store (`forest user`) may be up to this much behind, and a restart after a
/// crash folds up to this much input again (outputs are not re-sent). The library's own
/// default ([`ProcessorConfig::new`]) stays 0.
pub const DEFAULT_PROJECTION_INTERVAL: Duration = Duration::from_secs(5);

/// The projection interval for a configuration that did not choose one: see
/// [`DEFAULT_PROJECTION_INTERVAL`]; zero where spaced writes do not work.
pub fn default_projection_interval(exactly_once: ExactlyOnce, changelog: bool) -> Duration {
    if exactly_once == ExactlyOnce::Outbox && !changelog {
        DEFAULT_PROJECTION_INTERVAL
    } else {
        Duration::ZERO
    }
}

/// The delivery guarantee's mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExactlyOnce {
    /// Effectively once: state, offsets and outputs in one RocksDB batch, outputs then sent
    /// from the outbox by an idempotent producer. Downstream may see an output twice after a
    /// crash (same id, so it dedupes).
    #[default]
    Outbox,
    /// Exactly once for read_committed consumers: each batch's outputs, changelog records and
    /// input offsets go in one Kafka transaction; RocksDB is written after it commits and, if
    /// a crash lands in between, the partition is restored from the changelog. Implies the
    /// changelog.
    Transactions,
}

impl std::str::FromStr for ExactlyOnce {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "outbox" => Ok(Self::Outbox),
            "transactions" => Ok(Self::Transactions),
            other => Err(format!(
                "unknown exactly-once mode {other:?}: use `outbox` or `transactions`"
            )),
        }
    }
}

impl ProcessorConfig {
    /// The store settings the processor opens its store with: [`ProcessorConfig::store`],
    /// except that the WAL stays on with the changelog in the outbox mode. There a batch's
    /// outputs and its changelog records go out together, to different partitions, so its
    /// checkpoint can be acknowledged before one of its trees. A store reopened at a flush
    /// before that batch would then be restored from the changelog past the batch, and the
    /// tree would never be sent; with the WAL the batch and its outbox survive the crash, and
    /// the tree is sent from there. (Transactions mode commits both in one transaction.)
    pub fn store_config(&self) -> StoreConfig {
        let mut s = self.store.clone();
        s.wal |= self.changelog && self.exactly_once == ExactlyOnce::Outbox;
        s
    }

    pub fn new(brokers: impl Into<String>, store_path: impl Into<PathBuf>) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: "forest-processor".into(),
            topics: Topics::default(),
            store_path: store_path.into(),
            store: StoreConfig {
                wal: false,
                ..StoreConfig::default()
            },
            batch_max_records: 20_000,
            batch_max_wait: Duration::from_millis(5),
            cache_users: 1_000_000,
            cache_bytes: 1 << 30,
            max_buffered: 200_000,
            dead_letter_max_bytes: None,
            max_idle: Duration::from_secs(30),
            kafka: Vec::new(),
            rules: Arc::new(RuleSet::default()),
            crash_at: None,
            store_write_delay_ms: Arc::default(),
            dry_run: false,
            workers: 1,
            at_least_once_baseline: false,
            max_outputs_in_flight: 0,
            overlap_commits: true,
            changelog: false,
            exactly_once: ExactlyOnce::Outbox,
            transactional_id: None,
            state_retention: Some(Duration::from_secs(600)),
            projection_interval: Duration::ZERO,
            pace_projection_writes: false,
        }
    }
}

/// A topic configuration that cannot work; never retriable, the configuration must change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("the {role} topic name is invalid: {reason}")]
    Invalid { role: &'static str, reason: String },
    #[error("the {first} and {second} topics are both {name:?}; each role needs its own topic")]
    Shared {
        first: &'static str,
        second: &'static str,
        name: String,
    },
}

/// A processor run that failed. Each variant says whether a restart can help.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("invalid processor configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kafka {op} failed: {source}")]
    Kafka {
        op: &'static str,
        source: KafkaError,
    },
    #[error(transparent)]
    Outbox(#[from] forest_kafka::DeliveryError),
    /// An assigned partition could not be routed to the batch queue.
    #[error("routing an assigned partition to the batch queue failed: {0}")]
    Route(#[from] forest_kafka::RouteError),
    #[error("injected crash at {0:?}")]
    InjectedCrash(CrashPoint),
    #[error("restoring input partition {partition} from the changelog failed: {reason}")]
    Restore { partition: i32, reason: String },
    /// The group took partitions away while this instance still held them (no heartbeat
    /// within `session.timeout.ms`, or polls further apart than `max.poll.interval.ms`), with
    /// the changelog on in outbox mode. Their new owner may have restored them already, so the
    /// in-flight batch is not committed and its changelog records are not sent (they would
    /// land after the new owner's): the processor stops, and the restart drops what the
    /// outbox still holds for the changelog and restores on its next assignments.
    #[error(
        "the consumer group took partitions {partitions:?} away while this instance still held them (no heartbeat within session.timeout.ms, or polls further apart than max.poll.interval.ms): stopped without committing its open batch; restart the processor"
    )]
    AssignmentLost { partitions: Vec<i32> },
    /// The committer thread ended without reporting a failure (it panicked, or could not
    /// start).
    #[error("the committer thread {0}")]
    Committer(&'static str),
    /// The operating system refused a worker thread (out of threads or memory).
    #[error("cannot start a processor worker thread: {0}")]
    WorkerThread(std::io::Error),
    /// A replay read a record its replay records do not cover: the input log no longer holds
    /// what the previous run folded (retention, compaction or truncation since), so the
    /// unwritten projections cannot be rebuilt exactly. Rebuild the store (`forest rebuild`).
    #[error(
        "replaying {topic}/{partition} reached offset {offset}, at or past the stored offset {stored:?}: the log no longer holds the records the replay records describe; rebuild the store with `forest rebuild`"
    )]
    Replay {
        topic: String,
        partition: i32,
        offset: i64,
        stored: Option<i64>,
    },
}

impl ProcessorError {
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Config(_) | Self::Committer(_) | Self::Replay { .. } => false,
            Self::Store(e) => e.is_retriable(),
            Self::Outbox(e) => e.is_retriable(),
            Self::Route(e) => e.is_retriable(),
            // A restore reads Kafka: a broker back up answers a retry.
            Self::Kafka { .. } | Self::InjectedCrash(_) | Self::Restore { .. } => true,
            // The restart rejoins the group and restores.
            Self::AssignmentLost { .. } => true,
            // A resource shortage of the moment: a restart may find the thread.
            Self::WorkerThread(_) => true,
        }
    }
}

/// Live counters, for tests and progress displays (metrics go to the `metrics` recorder too).
#[derive(Debug, Default)]
pub struct ProcessorStats {
    pub consumed: AtomicU64,
    pub applied: AtomicU64,
    pub rejected: AtomicU64,
    pub deduplicated: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub trees: AtomicU64,
    pub batches: AtomicU64,
    pub outputs_delivered: AtomicU64,
    /// RocksDB key writes: every put and delete of the batches, and the outbox deletions once
    /// outputs are acknowledged.
    pub store_writes: AtomicU64,
    /// Input records applied or rejected and durably committed.
    pub committed_records: AtomicU64,
    pub rebalances: AtomicU64,
    /// Workers (consumer-group members of this process) that currently hold at least one
    /// partition: at most `min(workers, partitions)`, fewer if other instances share the
    /// group. A benchmark measures only once every worker has joined and this is at its
    /// maximum, because a worker joining late revokes and reassigns everything.
    pub workers_assigned: AtomicU64,
    /// Workers that have had an assignment (possibly empty) since they started.
    pub workers_joined: AtomicU64,
    /// Workers whose shutdown write (every changed projection still unwritten) is durable.
    /// With a projection interval that write is deferred work of the batches before it, so a
    /// benchmark's throughput window ends here rather than at the last offsets.
    pub shutdown_written: AtomicU64,
    /// Records the co-partition merge released out of the canonical order (a lane idle past
    /// `max_idle`, or the merge buffer over its bound): 0 in a healthy run.
    pub merge_early_releases: AtomicU64,
    /// Input lanes paused because the merge buffer was near its bound (see the runtime's
    /// `LanePauses`): each discards the lane's prefetched records, fetched again later.
    pub lane_pauses: AtomicU64,
    /// Input records the workers' consumers received from the brokers, from librdkafka's
    /// statistics (so up to `statistics.interval.ms` late): what the consumed records cost in
    /// fetching, counting refetches after pauses, seeks and rebalances.
    pub fetched: AtomicU64,
    /// Offset commits sent to Kafka: at most one per worker per second while running, plus
    /// one at each revocation and shutdown (see the runtime's `KAFKA_COMMIT_INTERVAL`).
    pub kafka_commits: AtomicU64,
    /// Time from each record's Kafka timestamp to its batch being durable in the store (the
    /// projection updated and readable): produce-to-projection latency when producers stamp
    /// records with the time they send them.
    pub latency_durable: LatencyHistogram,
    /// Time from each record's Kafka timestamp to its batch being durable and its outputs
    /// acknowledged (produce to TreeMatured and dead letters in Kafka).
    pub latency: LatencyHistogram,
    /// Where that latency goes, for the benchmark's breakdown (milliseconds):
    /// each record's age (from its Kafka timestamp) when a poll round handed it over...
    pub stage_polled: LatencyHistogram,
    /// ...per batch, from its first record being applied to the batch's commit starting (the
    /// batch filling up to its size or its `batch_max_wait`)...
    pub stage_batch: LatencyHistogram,
    /// ...per batch, from its closing to its store write being durable (WriteBatch with
    /// projections, offsets and outbox; with overlapped commits, waiting for the committer
    /// thread included)...
    pub stage_store: LatencyHistogram,
    /// ...and per batch, delivering its outputs until acknowledged. Also per batch, how long
    /// the worker was blocked handing it to a committer thread that already held two (it
    /// neither polls nor folds meanwhile).
    pub stage_deliver: LatencyHistogram,
    pub stage_handoff: LatencyHistogram,
    /// Rejected records by reason code (duplicates included).
    pub rejections: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Next offset per (topic, partition) as last committed to the store by this instance.
    pub committed_offsets: std::sync::Mutex<std::collections::BTreeMap<(String, i32), i64>>,
    /// Store open, partitions owned, consumer lag: what `/readyz` reports.
    pub health: forest_kafka::Health,
    /// Projections restored from the changelog, and partitions restored.
    pub restored_users: AtomicU64,
    pub restored_partitions: AtomicU64,
    /// Time spent restoring, in milliseconds.
    pub restore_millis: AtomicU64,
    /// Partitions whose local state was deleted after `state_retention`, and their users.
    pub forgotten_partitions: AtomicU64,
    pub forgotten_users: AtomicU64,
    /// Kafka transactions committed ([`ExactlyOnce::Transactions`]).
    pub transactions: AtomicU64,
    /// Projections written (see [`ProcessorConfig::projection_interval`]), and replay
    /// records stored for the batches whose users were not all written with them.
    pub projections_written: AtomicU64,
    pub replay_records: AtomicU64,
    /// Records folded again from replay records (see [`replay`]), and of those, records
    /// skipped because their user's stored projection already held them.
    pub replayed: AtomicU64,
    pub replay_skipped: AtomicU64,
}

impl ProcessorStats {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }

    pub fn committed_offsets(&self) -> std::collections::BTreeMap<(String, i32), i64> {
        self.committed_offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A lock-free log-scale histogram of milliseconds: bucket `i >= 1` holds
/// `[2^((i-1)/4), 2^(i/4))` ms (about 19 % wide), bucket 0 holds 0 ms. Cheap enough to record
/// every record; quantiles are bucket upper bounds.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; Self::BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LatencyHistogram {
    const BUCKETS: usize = 100;

    /// In integers: `floor(4 * log2(ms))` is `log2(ms^4)` rounded down, the position of its
    /// highest set bit. The float `log2` and `floor` it replaced were a tenth of a committer
    /// thread's samples, which record every record twice (BENCHMARKS.md, session 28).
    fn index(ms: u64) -> usize {
        if ms == 0 {
            return 0;
        }
        // From 2^25 ms (4 * 25 + 1 > the last bucket) every value is in the last bucket, and
        // below it `ms^4` (under 2^100) fits in a u128.
        if ms >= 1 << 25 {
            return Self::BUCKETS - 1;
        }
        let i = u128::from(ms).pow(4).ilog2() as usize + 1;
        i.min(Self::BUCKETS - 1)
    }

    /// Bucket `i`'s bounds, `[lower_ms(i), upper_ms(i))` ms (bucket 0 holds 0 ms only).
    fn lower_ms(i: usize) -> f64 {
        if i == 0 {
            0.0
        } else {
            2f64.powf((i - 1) as f64 / 4.0)
        }
    }

    fn upper_ms(i: usize) -> f64 {
        if i == 0 {
            0.0
        } else {
            2f64.powf(i as f64 / 4.0)
        }
    }

    pub fn record_ms(&self, ms: u64) {
        self.buckets[Self::index(ms)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records many values with one atomic add per bucket they fall in, not one per value: a
    /// batch's records fall in a few buckets, and the histograms are shared by every worker's
    /// committer thread, whose adds contended for the same cache lines.
    pub fn record_all_ms(&self, values: impl IntoIterator<Item = u64>) {
        let mut counts = [0u64; Self::BUCKETS];
        for ms in values {
            counts[Self::index(ms)] += 1;
        }
        for (bucket, n) in self.buckets.iter().zip(counts) {
            if n > 0 {
                bucket.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0..=1) in ms, as its bucket's upper bound; `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        self.snapshot().quantile_ms(q)
    }

    /// The counts so far. Two snapshots' difference ([`HistogramSnapshot::since`]) is the
    /// histogram of what was recorded between them: how `forest bench` finds *when* a
    /// latency tail happened, not only how large it was.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
        }
    }

    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
    }
}

/// The counts of a [`LatencyHistogram`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    buckets: [u64; LatencyHistogram::BUCKETS],
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        Self {
            buckets: [0; LatencyHistogram::BUCKETS],
        }
    }
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram with no reset in
    /// between: across a reset the result is meaningless, though never below 0 per bucket).
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            buckets: std::array::from_fn(|i| self.buckets[i].saturating_sub(earlier.buckets[i])),
        }
    }

    /// Records of at least `ms` milliseconds, counted by whole buckets: those whose lower
    /// bound is at least `ms`, so from [`HistogramSnapshot::whole_buckets_from_ms`]`(ms)`.
    pub fn at_least_ms(&self, ms: u64) -> u64 {
        (0..LatencyHistogram::BUCKETS)
            .filter(|&i| LatencyHistogram::lower_ms(i) >= ms as f64)
            .map(|i| self.buckets[i])
            .sum()
    }

    /// Where [`HistogramSnapshot::at_least_ms`]`(ms)` starts counting: the lowest bucket
    /// lower bound at or above `ms` (53.8 for 50).
    pub fn whole_buckets_from_ms(ms: u64) -> f64 {
        (0..LatencyHistogram::BUCKETS)
            .map(LatencyHistogram::lower_ms)
            .find(|&l| l >= ms as f64)
            .unwrap_or(f64::INFINITY)
    }

    /// Both snapshots' records together (of two windows of one histogram).
    pub fn plus(&self, other: &Self) -> Self {
        Self {
            buckets: std::array::from_fn(|i| self.buckets[i] + other.buckets[i]),
        }
    }

    /// As [`LatencyHistogram::quantile_ms`].
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b;
            if seen >= rank {
                return Some(LatencyHistogram::upper_ms(i));
            }
        }
        Some(LatencyHistogram::upper_ms(LatencyHistogram::BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::{HistogramSnapshot, LatencyHistogram};

    #[test]
    fn quantiles_are_bucket_upper_bounds_within_a_fifth() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_ms(0.99), None);
        for ms in 1..=1000 {
            h.record_ms(ms);
        }
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((500.0..=500.0 * 1.2).contains(&p50), "{p50}");
        assert!((990.0..=990.0 * 1.2).contains(&p99), "{p99}");
        h.record_ms(0);
        assert_eq!(h.quantile_ms(0.0), Some(0.0));
        h.reset();
        assert_eq!(h.count(), 0);
    }

    /// Every value lands in the bucket whose bounds hold it, by the buckets' definition
    /// (`ms` in `[2^((i-1)/4), 2^(i/4))`, checked as `2^(i-1) <= ms^4 < 2^i` in integers), and
    /// in the one the float formula it replaced gave.
    #[test]
    fn bucket_index_follows_the_bounds() {
        let last = LatencyHistogram::BUCKETS - 1;
        let values = (0..200_000u64)
            .chain((0..=40).flat_map(|e| [(1u64 << e) - 1, 1 << e, (1 << e) + 1]))
            .chain([u64::MAX]);
        for ms in values {
            let i = LatencyHistogram::index(ms);
            if ms == 0 {
                assert_eq!(i, 0);
                continue;
            }
            let float = ((4.0 * (ms as f64).log2()).floor() as usize + 1).min(last);
            assert_eq!(i, float, "{ms} ms");
            if ms < 1 << 25 {
                let p = u128::from(ms).pow(4);
                assert!(p >= 1u128 << (i - 1), "{ms} ms below bucket {i}");
                if i < last {
                    assert!(p < 1u128 << i, "{ms} ms above bucket {i}");
                }
            } else {
                assert_eq!(i, last, "{ms} ms");
            }
        }
    }

    /// Each bucket's exact lower edge: the smallest `ms` with `ms^4 >= 2^k` is in bucket
    /// `k + 1` or later (later where no whole number of ms falls in that bucket, as for the
    /// first few), and the value below it in bucket `k` or earlier. Most edges lie far from
    /// any power of two, where the other test's values do not reach.
    #[test]
    fn every_bucket_edge_is_exact() {
        let last = LatencyHistogram::BUCKETS - 1;
        for k in 0..LatencyHistogram::BUCKETS as u32 {
            let reaches = |m: u64| u128::from(m).pow(4) >= 1u128 << k;
            let mut m = 2f64.powf(f64::from(k) / 4.0) as u64;
            while !reaches(m) {
                m += 1;
            }
            while m > 0 && reaches(m - 1) {
                m -= 1;
            }
            let k = k as usize;
            let (at, below) = (LatencyHistogram::index(m), LatencyHistogram::index(m - 1));
            assert!(
                at >= (k + 1).min(last),
                "{m} ms in bucket {at}, below edge {k}"
            );
            assert!(
                below <= k.min(last),
                "{} ms in bucket {below}, past edge {k}",
                m - 1
            );
        }
    }

    #[test]
    fn recording_a_batch_counts_as_recording_each() {
        let (one_by_one, batched) = (LatencyHistogram::default(), LatencyHistogram::default());
        let values: Vec<u64> = (0..5_000)
            .map(|i| (i * 7919) % 3_000)
            .chain([u64::MAX])
            .collect();
        for &ms in &values {
            one_by_one.record_ms(ms);
        }
        batched.record_all_ms(values.iter().copied());
        assert_eq!(one_by_one.snapshot(), batched.snapshot());
        assert_eq!(batched.count(), values.len() as u64);
    }

    #[test]
    fn snapshots_tell_what_was_recorded_between_them() {
        let h = LatencyHistogram::default();
        for ms in 1..=100 {
            h.record_ms(ms);
        }
        let first = h.snapshot();
        for _ in 0..10 {
            h.record_ms(300);
        }
        let window = h.snapshot().since(&first);
        assert_eq!(window.count(), 10);
        assert_eq!(window.plus(&first), h.snapshot());
        // 300 ms lies in [2^(32/4), 2^(33/4)) = [256, 304.4): its bucket's upper bound.
        assert_eq!(window.quantile_ms(0.99).map(f64::round), Some(304.0));
        assert_eq!(window.at_least_ms(50), 10);
        assert_eq!(window.at_least_ms(305), 0);
        // Whole buckets only: 50..=100 ms starts in the bucket [45.3, 53.8), which is left
        // out; the buckets from 53.8 ms hold 54..=100.
        assert_eq!(first.at_least_ms(50), 47);
        assert_eq!(first.at_least_ms(0), 100);
        assert_eq!(
            (10.0 * HistogramSnapshot::whole_buckets_from_ms(50)).round(),
            538.0
        );
        // Across a reset, a shrunken bucket counts as 0, not a wrapped-around count.
        h.reset();
        h.record_ms(700);
        assert_eq!(h.snapshot().since(&first).count(), 1);
    }
}

/// Set to stop the processor gracefully: it finishes and commits its batch, flushes the outbox
/// and commits Kafka offsets, then returns.
pub type Shutdown = Arc<AtomicBool>;
