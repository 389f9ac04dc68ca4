//! `forest loadgen`: produces a generated workload (forest-workload) to the input topics.
//!
//! The workload is a pure function of its configuration and `--seed`: the same flags give the
//! same records, in the same order, with the same keys and record timestamps. What Kafka makes
//! of them (partition by murmur2 of the key, like Java producers; offsets) is deterministic too
//! for a fresh topic.

use anyhow::{Context, ensure};
use forest_kafka::{ClientConfigExt, client_config};
use forest_processor::Topics;
use forest_workload::{Generator, Topic, WorkloadConfig};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::borrow::Borrow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct WorkloadArgs {
    /// Number of input records to produce [default: 300000; `forest bench`: 16000000].
    #[arg(long, env = "FOREST_EVENTS")]
    pub events: Option<u64>,
    /// Number of distinct users [default: 5000; `forest bench`: 1000000].
    #[arg(long, env = "FOREST_USERS")]
    pub users: Option<u64>,
    /// Seed: the same seed (and flags) gives the same records.
    #[arg(long, env = "FOREST_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Zipf exponent of user activity: 0 = uniform, ~1 = a few very active users.
    #[arg(long, env = "FOREST_SKEW", default_value_t = 0.9)]
    pub skew: f64,
    /// Share of records re-sent as producer retries (same event id).
    #[arg(long, env = "FOREST_DUPLICATE_RATE", default_value_t = 0.01)]
    pub duplicate_rate: f64,
    /// Share of events dated before the user's grace window.
    #[arg(long, env = "FOREST_LATE_RATE", default_value_t = 0.005)]
    pub late_rate: f64,
    /// Share of malformed records (truncated, wrong fields, bad keys).
    #[arg(long, env = "FOREST_MALFORMED_RATE", default_value_t = 0.002)]
    pub malformed_rate: f64,
    /// Simulated days the events spread over.
    #[arg(long, env = "FOREST_DAYS", default_value_t = 180)]
    pub days: u32,
    /// Simulated end (UTC ms since the epoch). Default: the start of the current hour.
    #[arg(long, env = "FOREST_UNTIL_MS")]
    pub until_ms: Option<i64>,
}

impl WorkloadArgs {
    /// The workload, with the defaults of `forest loadgen` and `forest demo`.
    pub fn config(&self) -> anyhow::Result<WorkloadConfig> {
        self.config_with(300_000, 5_000)
    }

    /// The workload, with these defaults for the flags not given: `forest bench` preloads a
    /// few million records over a million users by default, as its issue asks (a demo stays
    /// small).
    pub fn config_with(&self, events: u64, users: u64) -> anyhow::Result<WorkloadConfig> {
        let (events, users) = (self.events.unwrap_or(events), self.users.unwrap_or(users));
        ensure!(users > 0, "--users must be at least 1");
        ensure!(self.days > 0, "--days must be at least 1");
        ensure!(
            (0.0..=10.0).contains(&self.skew),
            "--skew must be between 0 (uniform) and 10, got {}",
            self.skew
        );
        for (name, v) in [
            ("--duplicate-rate", self.duplicate_rate),
            ("--late-rate", self.late_rate),
            ("--malformed-rate", self.malformed_rate),
        ] {
            ensure!(
                (0.0..=1.0).contains(&v),
                "{name} is a share between 0 and 1, got {v}"
            );
        }
        let span_ms = i64::from(self.days) * 86_400_000;
        let now = chrono::Utc::now().timestamp_millis();
        let end = self.until_ms.unwrap_or(now - now % 3_600_000);
        ensure!(
            end <= now,
            "--until-ms {end} is in the future; records dated after now are rejected as too_early"
        );
        Ok(WorkloadConfig {
            seed: self.seed,
            users,
            events,
            zipf_exponent: self.skew,
            duplicate_rate: self.duplicate_rate,
            late_rate: self.late_rate,
            malformed_rate: self.malformed_rate,
            start_ms: end - span_ms,
            span_ms,
        })
    }
}

#[derive(clap::Args)]
pub struct LoadgenArgs {
    /// Kafka bootstrap servers (e.g. from `forest broker`).
    #[arg(long, env = "FOREST_BROKERS")]
    brokers: String,
    /// Prefix for every topic name.
    #[arg(long, env = "FOREST_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// Records per second; 0 = as fast as the broker takes them.
    #[arg(long, env = "FOREST_RATE", default_value_t = 0)]
    rate: u64,
    #[command(flatten)]
    workload: WorkloadArgs,
    /// librdkafka setting passed through, repeatable: --kafka-config key=value.
    #[arg(long = "kafka-config", value_parser = crate::common::parse_kv)]
    kafka_config: Vec<(String, String)>,
}

pub fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let cfg = args.workload.config()?;
    let topics = Topics::prefixed(&args.topic_prefix);
    let produced = AtomicU64::new(0);
    let stop = crate::common::shutdown_on_signal()?;
    let started = Instant::now();
    let n = produce(
        &args.brokers,
        &args.kafka_config,
        &topics,
        cfg,
        Pace {
            rate: args.rate,
            ..Pace::default()
        },
        &produced,
        &stop,
    )?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "produced {n} records in {secs:.1} s ({:.0} records/s) to {}, {}, {}",
        n as f64 / secs,
        topics.payments,
        topics.mobility,
        topics.commands
    );
    Ok(())
}

/// How the load generator paces itself.
#[derive(Clone, Copy, Default)]
pub struct Pace<'a> {
    /// Records per second; 0 = unpaced.
    pub rate: u64,
    /// Leave record timestamps to the producer's clock (send time) instead of the workload's
    /// simulated times, to measure produce-to-projection latency.
    pub stamp_now: bool,
    /// Stay at most this many records ahead of a consumer's progress counter (the demo: the
    /// embedded broker keeps a bounded log per partition, so an unread backlog that grows
    /// without bound would be truncated before it is read).
    pub ahead_of: Option<(&'a AtomicU64, u64)>,
}

/// Produces the workload; returns how many records Kafka acknowledged.
pub fn produce(
    brokers: &str,
    kafka: &[(String, String)],
    topics: &Topics,
    cfg: WorkloadConfig,
    pace: Pace<'_>,
    produced: &AtomicU64,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    produce_records(
        brokers,
        kafka,
        topics,
        Generator::new(cfg),
        pace,
        produced,
        stop,
    )
}

/// [`produce`] from records made beforehand: `forest bench` generates its latency phases'
/// records before the clock starts, so that the generator's work (a third of the load
/// generator's CPU) does not compete with the processor it measures.
pub fn produce_records(
    brokers: &str,
    kafka: &[(String, String)],
    topics: &Topics,
    records: impl IntoIterator<Item = impl Borrow<forest_workload::Record>>,
    pace: Pace<'_>,
    produced: &AtomicU64,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let Pace {
        rate,
        stamp_now,
        ahead_of,
    } = pace;
    let producer: BaseProducer<Acks> = client_config(brokers, &[])
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("linger.ms", "10")
        // Java producers' partitioner: upstream systems and Forest agree where a user lives.
        .set("partitioner", "murmur2_random")
        .set("queue.buffering.max.messages", "1000000")
        .set_all(kafka)
        .create_with_context(Acks::default())
        .context("cannot create the load generator's producer")?;
    let started = Instant::now();
    let mut sent = 0u64;
    for rec in records {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let rec = rec.borrow();
        let topic = match rec.topic {
            Topic::Payment => &topics.payments,
            Topic::Mobility => &topics.mobility,
            Topic::Command => &topics.commands,
        };
        let mut record = BaseRecord::to(topic)
            .key(rec.key.as_bytes())
            .payload(&rec.value);
        if !stamp_now {
            record = record.timestamp(rec.timestamp_ms);
        }
        forest_kafka::send_retrying(&producer, record)
            .with_context(|| format!("producing to {topic} failed"))?;
        sent += 1;
        // Paced runs check the clock every 100 records, so a fixed rate is a steady stream
        // rather than bursts of 1,000 (which showed up as latency in `forest bench`).
        if sent % if rate > 0 { 100 } else { 1_000 } == 0 {
            producer.poll(Duration::ZERO);
            produced.store(sent, Ordering::Relaxed);
            if rate > 0 {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            if let Some((consumed, max_ahead)) = ahead_of {
                while sent.saturating_sub(consumed.load(Ordering::Relaxed)) > max_ahead
                    && !stop.load(Ordering::Relaxed)
                {
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("the broker did not acknowledge every record within 120 s")?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    ensure!(failed == 0, "{failed} of {sent} records were not delivered");
    produced.store(sent, Ordering::Relaxed);
    Ok(sent)
}

/// Counts records Kafka refused after librdkafka's retries.
#[derive(Default)]
struct Acks {
    failed: AtomicU64,
}

impl rdkafka::ClientContext for Acks {}

impl rdkafka::producer::ProducerContext for Acks {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            if self.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::error!(error = %e, "a record was not delivered");
            }
        }
    }
}
