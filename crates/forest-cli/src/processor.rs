//! `forest processor`: the processor against a real cluster.

use anyhow::{Context, bail};
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
    /// Prefix for every topic name (e.g. an environment name).
    #[arg(long, env = "FOREST_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// Consumer-group members in this process (threads sharing the store); one per core.
    #[arg(long, env = "FOREST_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Records per committed batch.
    #[arg(long, env = "FOREST_BATCH_SIZE", default_value_t = 5_000)]
    batch_size: usize,
    /// Users kept in the in-memory write-back cache.
    #[arg(long, env = "FOREST_CACHE_USERS", default_value_t = 1_000_000)]
    cache_users: usize,
    /// RocksDB block cache, MiB.
    #[arg(long, env = "FOREST_BLOCK_CACHE_MB", default_value_t = 256)]
    block_cache_mb: usize,
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

pub fn run(args: ProcessorArgs, rules: RuleSet) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mut cfg = ProcessorConfig::new(args.brokers, args.store);
    cfg.group_id = args.group;
    cfg.topics = Topics::prefixed(&args.topic_prefix);
    cfg.batch_max_records = args.batch_size;
    cfg.workers = args.workers;
    cfg.changelog = args.changelog;
    cfg.exactly_once = args.exactly_once;
    cfg.transactional_id = args.transactional_id;
    cfg.state_retention = (args.state_retention_secs > 0)
        .then(|| std::time::Duration::from_secs(args.state_retention_secs));
    cfg.cache_users = args.cache_users;
    cfg.store.block_cache_bytes = args.block_cache_mb << 20;
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
