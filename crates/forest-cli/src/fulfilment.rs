//! `forest fulfilment` and `forest partners`: partner fulfilment against a real cluster, and a
//! check of a partner file.

use anyhow::{Context, anyhow, bail};
use forest_fulfilment::{FulfilmentConfig, FulfilmentStats, FulfilmentTopics, PartnersSource};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct FulfilmentArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "FOREST_BROKERS")]
    brokers: String,
    /// Group id under which offsets are committed for lag tools (the store holds the real
    /// ones). Run one fulfilment instance: capacity is global.
    #[arg(
        long,
        env = "FOREST_FULFILMENT_GROUP",
        default_value = "forest-fulfilment"
    )]
    group: String,
    /// RocksDB directory of the fulfilment.
    #[arg(
        long,
        env = "FOREST_FULFILMENT_STORE",
        default_value = "forest-data/fulfilment"
    )]
    store: PathBuf,
    /// Prefix for every topic name (e.g. an environment name).
    #[arg(long, env = "FOREST_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// TreeMatured input topic, as given (default: PREFIX + forest.trees.v1): the
    /// processor's --trees-topic.
    #[arg(long, env = "FOREST_TREES_TOPIC")]
    trees_topic: Option<String>,
    #[command(flatten)]
    partners: PartnersArg,
    /// Seconds between checks of the partner file for changes.
    #[arg(long, env = "FOREST_PARTNERS_RELOAD_SECS", default_value_t = 5)]
    reload_secs: u64,
    /// Records per committed batch.
    #[arg(long, env = "FOREST_FULFILMENT_BATCH_SIZE", default_value_t = 2_000)]
    batch_size: usize,
    /// Serve Prometheus metrics (/metrics) here; `off` to disable.
    #[arg(long, env = "FOREST_METRICS_ADDR", default_value = "0.0.0.0:9899")]
    metrics_addr: String,
    /// /readyz answers 503 while the consumer lag over this instance's partitions exceeds
    /// this many records.
    #[arg(long, env = "FOREST_READY_MAX_LAG", default_value_t = 1_000_000)]
    ready_max_lag: i64,
    /// librdkafka setting passed through, repeatable: --kafka-config key=value.
    #[arg(long = "kafka-config", value_parser = crate::common::parse_kv)]
    kafka_config: Vec<(String, String)>,
}

#[derive(clap::Args)]
pub struct PartnersArg {
    /// Partner file (TOML). Default: the built-in sample partners.
    #[arg(long = "partners", env = "FOREST_PARTNERS")]
    path: Option<PathBuf>,
}

impl PartnersArg {
    pub fn source(&self) -> PartnersSource {
        self.path
            .clone()
            .map_or(PartnersSource::Builtin, PartnersSource::File)
    }
}

pub fn run(args: FulfilmentArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.reload_secs == 0 {
        bail!("--reload-secs must be at least 1");
    }
    let mut cfg = FulfilmentConfig::new(args.brokers, args.store);
    cfg.group_id = args.group;
    // Same prefix as the processor's, so trees and dead letters meet.
    cfg.topics = FulfilmentTopics::prefixed(&args.topic_prefix);
    if let Some(trees) = args.trees_topic {
        forest_processor::check_topic_name(&trees).map_err(|e| anyhow!("--trees-topic: {e}"))?;
        cfg.topics.trees = trees;
    }
    cfg.partners = args.partners.source();
    // Fail at start-up on a bad partner file, with the file's own error.
    cfg.partners.load()?;
    cfg.reload_interval = Duration::from_secs(args.reload_secs);
    cfg.batch_max_records = args.batch_size;
    cfg.kafka = args.kafka_config;
    let stats = Arc::new(FulfilmentStats::default());
    let (s, max_lag) = (stats.clone(), args.ready_max_lag);
    crate::common::install_metrics(
        &args.metrics_addr,
        Arc::new(move || s.health.readiness(max_lag)),
    )?;
    let shutdown = crate::common::shutdown_on_signal()?;
    forest_fulfilment::run(cfg, shutdown, stats).context("fulfilment failed")
}

/// `forest partners`: validates a partner file and prints its capacity table.
pub fn show(args: PartnersArg) -> anyhow::Result<()> {
    let (p, _) = args.source().load()?;
    println!("partner file version {}", p.version);
    for partner in &p.partners {
        println!(
            "{} ({}){}",
            partner.id,
            partner.name,
            if partner.active { "" } else { " [inactive]" }
        );
        for s in &partner.sites {
            let caps: Vec<String> = s.capacity.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  {:<22} {:<40} {}", s.id, s.region, caps.join(", "));
        }
    }
    Ok(())
}
