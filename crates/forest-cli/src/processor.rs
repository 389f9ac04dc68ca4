//! `forest processor`: the processor against a real cluster.

use anyhow::{Context, anyhow, bail};
use forest_domain::RuleSet;
use forest_processor::{ProcessorConfig, ProcessorStats, Topics};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct ProcessorArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "FOREST_BROKERS")]
    brokers: String,
    /// Consumer group id; instances with the same id split the partitions.
    #[arg(long, env = "FOREST_GROUP", default_value = "forest-processor")]
    group: String,
    /// RocksDB directory of this instance.
    #[arg(long, env = "FOREST_STORE", default_value = "forest-data/processor")]
    store: PathBuf,
    /// Prefix for every topic name (e.g. an environment name); a topic named with its own
    /// option (--trees-topic, ...) is taken as given, without the prefix.
    #[arg(long, env = "FOREST_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    #[command(flatten)]
    topics: TopicArgs,
    /// Consumer-group members in this process (threads sharing the store); one per core.
    #[arg(long, env = "FOREST_WORKERS", default_value_t = 1)]
    workers: usize,
    /// A batch is committed once it holds this many records...
    #[arg(long, env = "FOREST_BATCH_SIZE", default_value_t = 20_000)]
    batch_size: usize,
    /// ...or after this many milliseconds since the batch's first record, whichever comes
    /// first (the latency floor at low rates; at high rates batches fill up first).
    #[arg(long, env = "FOREST_BATCH_MAX_WAIT_MS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    batch_max_wait_ms: u64,
    /// Write each batch and deliver its outputs on a committer thread beside each worker, so
    /// the worker polls and folds the next batch meanwhile; `false`: the worker does both
    /// between polls. Transactions mode always runs inline.
    #[arg(long, env = "FOREST_OVERLAP_COMMITS", default_value_t = true, action = clap::ArgAction::Set)]
    overlap_commits: bool,
    /// How long a changed projection may stay unwritten in RocksDB, ms. 0 writes every user
    /// with the batch that changed it. Above 0, every batch still stores its offsets and
    /// outputs, plus a record of the order it folded its records in; a user changed many
    /// times meanwhile is written once, cutting RocksDB writes per event. After a crash the
    /// records since the oldest unwritten change are folded again in the recorded order,
    /// their outputs not re-sent. Default: 5000 in the outbox mode without --changelog
    /// (`forest user` may then lag by up to 5 s), 0 otherwise; above 0 only there.
    #[arg(long, env = "FOREST_PROJECTION_INTERVAL_MS", value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    projection_interval_ms: Option<u64>,
    /// With a projection interval: spread the projection writes over time, each batch also
    /// writing the share of the changed users that the time since the previous batch is of
    /// the interval. Smooths the wave of writes an interval after a start, at the price of
    /// more writes at full speed (about 0.02 per event in the benchmark).
    #[arg(long, env = "FOREST_PROJECTION_PACE")]
    projection_pace: bool,
    /// Users kept in the in-memory write-back cache (least recently used evicted first).
    #[arg(long, env = "FOREST_CACHE_USERS", default_value_t = 1_000_000)]
    cache_users: usize,
    /// Estimated memory the write-back cache may keep, MiB (whichever of this and
    /// --cache-users is reached first bounds it).
    #[arg(long, env = "FOREST_CACHE_MB", default_value_t = 1024)]
    cache_mb: usize,
    /// RocksDB block cache, MiB; includes the write buffers.
    #[arg(long, env = "FOREST_BLOCK_CACHE_MB", default_value_t = 256)]
    block_cache_mb: usize,
    /// RocksDB memtable budget, MiB, charged to the block cache (so below --block-cache-mb);
    /// writes wait for a flush when it is full.
    #[arg(long, env = "FOREST_WRITE_BUFFER_MB", default_value_t = 128)]
    write_buffer_mb: usize,
    /// Keep RocksDB's write-ahead log. Off by default: the input topics are the processor's
    /// log, and a crash reopens the store at its last memtable flush (whole: offsets,
    /// projections and outbox of one moment) and reads the input again from there, outputs
    /// re-sent under the same ids. On: a crash loses no written batch, and every batch is
    /// also copied to the WAL (about 0.05 CPU-s per M events at full speed, BENCHMARKS.md
    /// session 18). Always on with --changelog in the outbox mode (see README).
    #[arg(long, env = "FOREST_STORE_WAL")]
    store_wal: bool,
    /// Without the WAL: the longest, in seconds, a written batch may stay in memtables only
    /// before every column family is flushed, so a crash with slow input redoes at most about
    /// this much (at full speed memtables fill and flush sooner).
    #[arg(long, env = "FOREST_STORE_MAX_UNFLUSHED_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    store_max_unflushed_secs: u64,
    /// Cap on what RocksDB's flushes and compactions write, MiB per second (flushes served
    /// first); default: no cap. It spreads their CPU over time instead of bursts that the
    /// processor's own threads wait behind, for a processor running below its maximum rate on
    /// cores it shares with them (BENCHMARKS.md, session 23). Set it well above the store's
    /// sustained rate at the highest expected input (forest_store_flush_bytes_total plus
    /// forest_store_compaction_bytes_total per second): below that, writes stall.
    #[arg(long, env = "FOREST_STORE_BACKGROUND_WRITE_MIB", value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    store_background_write_mib: Option<u64>,
    /// At most how many flushed files RocksDB lets wait in level 0 before compacting them into
    /// the level below (2-64; it also compacts level 0 by size). Each such compaction rewrites
    /// the whole projection store (user keys overlap every file), so a higher count rewrites it
    /// less often: 16 instead of 4 cut what compactions wrote by about half to two thirds, with
    /// throughput within the runs' spread (BENCHMARKS.md, session 24). Each compaction is
    /// longer, and reads of keys in no memtable probe up to this many more files.
    #[arg(long, env = "FOREST_STORE_L0_COMPACTION_FILES", default_value_t = forest_store::DEFAULT_L0_COMPACTION_FILES, value_parser = clap::value_parser!(u32).range(2..=64))]
    store_l0_compaction_files: u32,
    /// Run RocksDB's compactions at the lowest CPU priority (nice 19, Linux only; flushes keep
    /// the normal one). A compaction of the projection store is seconds of CPU in one burst;
    /// at the lowest priority it takes what the processor's threads leave idle, so records
    /// wait less behind it on a shared core. Compactions must still keep up on average, or
    /// writes slow down (BENCHMARKS.md, session 25).
    #[arg(long, env = "FOREST_STORE_LOW_PRIORITY_COMPACTIONS")]
    store_low_priority_compactions: bool,
    /// Bound on records waiting in the co-partition merge: from 3/4 of it, fetching pauses for
    /// the lanes that hold records; past it plus 500 per assigned lane, the merge releases
    /// records without waiting for every lane (out of the canonical order, counted).
    #[arg(long, env = "FOREST_MERGE_BUFFER_RECORDS", default_value_t = 200_000)]
    merge_buffer_records: usize,
    /// Dead letters (key + value + headers) are cut to at most this many bytes, header
    /// forest.truncated holding the original value length. Default: just below the
    /// producer's message.max.bytes; set it lower if the DLQ topic's max.message.bytes is.
    #[arg(long, env = "FOREST_DEAD_LETTER_MAX_BYTES")]
    dead_letter_max_bytes: Option<usize>,
    /// Fault injection for tests: sleep this long before every store write (outbox mode). It
    /// only slows the processor down; the multi-process chaos test uses it so that partitions
    /// move while input is still waiting, however fast the machine is. Hidden from --help.
    #[arg(long, hide = true, default_value_t = 0)]
    fault_store_write_delay_ms: u64,
    /// Serve Prometheus metrics (/metrics) here; `off` to disable.
    #[arg(long, env = "FOREST_METRICS_ADDR", default_value = "0.0.0.0:9898")]
    metrics_addr: String,
    /// /readyz answers 503 while the consumer lag over this instance's partitions exceeds
    /// this many records.
    #[arg(long, env = "FOREST_READY_MAX_LAG", default_value_t = 1_000_000)]
    ready_max_lag: i64,
    /// Write every projection and a per-partition checkpoint to the compacted changelog topic,
    /// and restore partitions this store lacks from it (state follows partitions between
    /// instances).
    #[arg(long, env = "FOREST_CHANGELOG")]
    changelog: bool,
    /// How outputs, state and input offsets are kept together: `outbox` (effectively once:
    /// one RocksDB batch, outputs re-sent with the same ids after a crash) or `transactions`
    /// (exactly once for read_committed consumers: one Kafka transaction per batch with the
    /// input offsets; implies --changelog).
    #[arg(long, env = "FOREST_EXACTLY_ONCE", default_value = "outbox")]
    exactly_once: forest_processor::ExactlyOnce,
    /// transactional.id prefix in transactions mode (worker i uses PREFIX-i). Must be stable
    /// per instance and unique between instances; default: group, host name and store path.
    #[arg(long, env = "FOREST_TRANSACTIONAL_ID")]
    transactional_id: Option<String>,
    /// With the changelog: delete local state of partitions owned elsewhere for this many
    /// seconds (0 keeps it forever).
    #[arg(long, env = "FOREST_STATE_RETENTION_SECS", default_value_t = 600)]
    state_retention_secs: u64,
    /// librdkafka setting passed through, repeatable: --kafka-config key=value.
    #[arg(long = "kafka-config", value_parser = crate::common::parse_kv)]
    kafka_config: Vec<(String, String)>,
}

/// Per-topic names; each overrides the `--topic-prefix` default for its role.
#[derive(clap::Args)]
pub struct TopicArgs {
    /// Payments input topic (default: PREFIX + forest.payments.v1).
    #[arg(long, env = "FOREST_PAYMENTS_TOPIC")]
    payments_topic: Option<String>,
    /// Mobility input topic (default: PREFIX + forest.mobility.v1).
    #[arg(long, env = "FOREST_MOBILITY_TOPIC")]
    mobility_topic: Option<String>,
    /// Commands input topic (default: PREFIX + forest.commands.v1).
    #[arg(long, env = "FOREST_COMMANDS_TOPIC")]
    commands_topic: Option<String>,
    /// TreeMatured output topic (default: PREFIX + forest.trees.v1); the fulfilment's
    /// --trees-topic must match.
    #[arg(long, env = "FOREST_TREES_TOPIC")]
    trees_topic: Option<String>,
    /// Dead-letter topic (default: PREFIX + forest.dlq.v1).
    #[arg(long, env = "FOREST_DLQ_TOPIC")]
    dlq_topic: Option<String>,
    /// Projection changelog topic, with --changelog (default: PREFIX +
    /// forest.projections-changelog.v1).
    #[arg(long, env = "FOREST_CHANGELOG_TOPIC")]
    changelog_topic: Option<String>,
}

/// The topics from `--topic-prefix` and the per-topic options, validated; an error names the
/// option to fix (`--topic-prefix` when the name came from it).
pub fn topics(prefix: &str, args: &TopicArgs) -> anyhow::Result<Topics> {
    let mut t = Topics::prefixed(prefix);
    let given = [
        (&mut t.payments, &args.payments_topic),
        (&mut t.mobility, &args.mobility_topic),
        (&mut t.commands, &args.commands_topic),
        (&mut t.trees, &args.trees_topic),
        (&mut t.dlq, &args.dlq_topic),
        (&mut t.changelog, &args.changelog_topic),
    ];
    let mut explicit = Vec::new();
    for (slot, name) in given {
        explicit.push(name.is_some());
        if let Some(n) = name {
            *slot = n.clone();
        }
    }
    let roles = t.by_role().map(|(role, _)| role);
    let option = |role: &str| {
        let i = roles.iter().position(|r| *r == role).unwrap_or(0);
        if explicit[i] {
            format!("--{role}-topic")
        } else {
            format!("--topic-prefix (the {role} topic's default name)")
        }
    };
    t.validate().map_err(|e| match &e {
        forest_processor::TopicError::Invalid { role, .. } => anyhow!("{}: {e}", option(role)),
        forest_processor::TopicError::Shared { first, second, .. } => {
            anyhow!("{} and {}: {e}", option(first), option(second))
        }
    })?;
    Ok(t)
}

pub fn run(args: ProcessorArgs, rules: RuleSet) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.merge_buffer_records == 0 {
        bail!("--merge-buffer-records must be at least 1");
    }
    if args.cache_mb == 0 {
        bail!("--cache-mb must be at least 1");
    }
    if args.write_buffer_mb == 0 || args.write_buffer_mb >= args.block_cache_mb {
        bail!(
            "--write-buffer-mb must be at least 1 and below --block-cache-mb ({}): the write buffers are charged to the block cache",
            args.block_cache_mb
        );
    }
    if args.dead_letter_max_bytes.is_some_and(|b| b < 4096) {
        bail!("--dead-letter-max-bytes must be at least 4096");
    }
    let topics = topics(&args.topic_prefix, &args.topics)?;
    let mut cfg = ProcessorConfig::new(args.brokers, args.store);
    cfg.group_id = args.group;
    cfg.topics = topics;
    cfg.batch_max_records = args.batch_size;
    cfg.batch_max_wait = std::time::Duration::from_millis(args.batch_max_wait_ms);
    cfg.workers = args.workers;
    cfg.overlap_commits = args.overlap_commits;
    cfg.projection_interval = args.projection_interval_ms.map_or_else(
        || forest_processor::default_projection_interval(args.exactly_once, args.changelog),
        std::time::Duration::from_millis,
    );
    cfg.pace_projection_writes = args.projection_pace;
    cfg.changelog = args.changelog;
    cfg.exactly_once = args.exactly_once;
    cfg.transactional_id = args.transactional_id;
    cfg.state_retention = (args.state_retention_secs > 0)
        .then(|| std::time::Duration::from_secs(args.state_retention_secs));
    cfg.cache_users = args.cache_users;
    cfg.cache_bytes = args.cache_mb << 20;
    cfg.store.block_cache_bytes = args.block_cache_mb << 20;
    cfg.store.write_buffer_bytes = args.write_buffer_mb << 20;
    cfg.store.wal = args.store_wal;
    cfg.store.max_unflushed = std::time::Duration::from_secs(args.store_max_unflushed_secs);
    cfg.store.background_write_bytes_per_sec = args.store_background_write_mib.map(|m| m << 20);
    cfg.store.l0_compaction_files = args.store_l0_compaction_files;
    cfg.store.low_priority_compactions = args.store_low_priority_compactions;
    cfg.max_buffered = args.merge_buffer_records;
    cfg.dead_letter_max_bytes = args.dead_letter_max_bytes;
    cfg.store_write_delay_ms.store(
        args.fault_store_write_delay_ms,
        std::sync::atomic::Ordering::Relaxed,
    );
    cfg.kafka = args.kafka_config;
    cfg.rules = Arc::new(rules);
    let stats = Arc::new(ProcessorStats::default());
    let (s, max_lag) = (stats.clone(), args.ready_max_lag);
    crate::common::install_metrics(
        &args.metrics_addr,
        Arc::new(move || s.health.readiness(max_lag)),
    )?;
    let shutdown = crate::common::shutdown_on_signal()?;
    forest_processor::run(cfg, shutdown, stats).context("processor failed")
}
