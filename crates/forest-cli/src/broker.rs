//! `forest broker`: the embedded Kafka-protocol broker (librdkafka's mock cluster) on its own,
//! so other processes (`forest loadgen`, `forest processor`, any Kafka client) can use it.

use crate::common;
use anyhow::Context;
use forest_fulfilment::FulfilmentTopics;
use forest_kafka::{EmbeddedBroker, ensure_topics};
use forest_processor::Topics;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(clap::Args)]
pub struct BrokerArgs {
    /// Number of mock brokers in the cluster.
    #[arg(long, default_value_t = 1)]
    brokers: i32,
    /// Create Forest's topics with this prefix up front.
    #[arg(long, env = "FOREST_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// Partitions of each created topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
}

pub fn run(args: BrokerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.brokers >= 1, "--brokers must be at least 1");
    anyhow::ensure!(args.partitions >= 1, "--partitions must be at least 1");
    let broker = EmbeddedBroker::start(args.brokers)?;
    let bootstrap = broker.bootstrap_servers();
    let names = common::all_topics(
        &Topics::prefixed(&args.topic_prefix),
        &FulfilmentTopics::prefixed(&args.topic_prefix),
    );
    let spec: Vec<(&str, i32)> = names
        .iter()
        .map(|n| (n.as_str(), args.partitions))
        .collect();
    ensure_topics(Some(&broker), &bootstrap, &[], &spec, 1)?;
    // The first line of stdout is the bootstrap address, for scripts: `read -r addr`.
    let mut out = std::io::stdout().lock();
    writeln!(out, "{bootstrap}").context("stdout")?;
    out.flush().context("stdout")?;
    drop(out);
    tracing::info!(%bootstrap, topics = names.len(), "embedded broker running; Ctrl-C or SIGTERM stops it");
    let stop = common::shutdown_on_signal()?;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
