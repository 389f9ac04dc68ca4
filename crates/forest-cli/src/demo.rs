//! `forest demo`: the whole pipeline in one process, on the embedded Kafka-protocol broker
//! unless `--brokers` names a cluster: load generator -> processor -> fulfilment -> simulated
//! partner -> certificates. It shows live progress, serves metrics, and ends with a summary
//! and a check of the invariants read back from the topics.

use crate::common::{self, Shutdown};
use crate::fulfilment::PartnersArg;
use crate::loadgen::{self, WorkloadArgs};
use anyhow::{Context, bail, ensure};
use forest_domain::RuleSet;
use forest_fulfilment::sim::{SimPartner, SimStats};
use forest_fulfilment::{FulfilmentConfig, FulfilmentStats, FulfilmentTopics};
use forest_kafka::{EmbeddedBroker, Watermarks, ensure_topics, read_topic};
use forest_processor::{ProcessorConfig, ProcessorStats, Topics};
use forest_proto::v1::{Certificate, PlantingOrder, TreeMatured};
use prost::Message as _;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Run on this Kafka cluster instead of the embedded broker.
    #[arg(long, env = "FOREST_BROKERS")]
    brokers: Option<String>,
    /// Prefix for every topic name. Default: none on the embedded broker, a fresh
    /// `demo-<time>.` on a cluster (so runs never mix).
    #[arg(long, env = "FOREST_TOPIC_PREFIX")]
    topic_prefix: Option<String>,
    /// Partitions of each topic the demo creates.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[command(flatten)]
    partners: PartnersArg,
    /// Share of first planting attempts the simulated partner rejects, in thousandths.
    #[arg(long, default_value_t = 50)]
    reject_per_mille: u32,
    /// Load generator rate, records per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Keep the stores here. Default: a temporary directory, removed at the end.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Serve Prometheus metrics here while running; `off` to disable.
    #[arg(long, env = "FOREST_METRICS_ADDR", default_value = "127.0.0.1:9898")]
    metrics_addr: String,
    /// Plain log lines instead of a live progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Give up if the pipeline has not drained after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// A service thread and its stop flag.
struct Service<T> {
    name: &'static str,
    stop: Shutdown,
    handle: JoinHandle<anyhow::Result<T>>,
}

impl<T> Service<T> {
    fn spawn(
        name: &'static str,
        f: impl FnOnce(Shutdown) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<Self>
    where
        T: Send + 'static,
    {
        let stop: Shutdown = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(s))
            .with_context(|| format!("cannot start the {name} thread"))?;
        Ok(Self { name, stop, handle })
    }

    fn failed(&self) -> bool {
        self.handle.is_finished()
    }

    fn stop(self) -> anyhow::Result<T> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.join() {
            Ok(r) => r.with_context(|| format!("{} failed", self.name)),
            Err(_) => bail!("{} panicked", self.name),
        }
    }
}

pub fn run(args: DemoArgs, rules: RuleSet) -> anyhow::Result<()> {
    let workload = args.workload.config()?;
    let total_events = workload.events;
    ensure!(args.partitions >= 1, "--partitions must be at least 1");
    ensure!(
        args.reject_per_mille <= 1000,
        "--reject-per-mille is at most 1000"
    );
    let partners = args.partners.source();
    partners.load()?;
    let started = Instant::now();

    let embedded = match &args.brokers {
        None => Some(EmbeddedBroker::start(1).context("cannot start the embedded broker")?),
        Some(_) => None,
    };
    let brokers = match (&args.brokers, &embedded) {
        (Some(b), _) => b.clone(),
        (None, Some(e)) => e.bootstrap_servers(),
        (None, None) => unreachable!("an embedded broker was started"),
    };
    let prefix = args.topic_prefix.clone().unwrap_or_else(|| {
        if embedded.is_some() {
            String::new()
        } else {
            format!("demo-{}.", chrono::Utc::now().format("%Y%m%d-%H%M%S"))
        }
    });
    let topics = Topics::prefixed(&prefix);
    let ftopics = FulfilmentTopics::prefixed(&prefix);
    let names = common::all_topics(&topics, &ftopics);
    let spec: Vec<(&str, i32)> = names
        .iter()
        .map(|n| (n.as_str(), args.partitions))
        .collect();
    ensure_topics(embedded.as_ref(), &brokers, &[], &spec, 1)
        .context("cannot create the demo's topics")?;
    let pstats = Arc::new(ProcessorStats::default());
    let fstats = Arc::new(FulfilmentStats::default());
    {
        // Ready when both services are: stores open, partitions owned (no lag bound: the demo
        // preloads on purpose).
        let (p, f) = (pstats.clone(), fstats.clone());
        common::install_metrics(
            &args.metrics_addr,
            Arc::new(move || {
                p.health
                    .readiness(i64::MAX)
                    .map_err(|e| format!("processor: {e}"))?;
                f.health
                    .readiness(i64::MAX)
                    .map_err(|e| format!("fulfilment: {e}"))
            }),
        )?;
    }

    let tmp;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    eprintln!(
        "forest demo: {} on {brokers}, topics {prefix}forest.*, {} events over {} users (seed {}), rules {}",
        if embedded.is_some() {
            "embedded broker"
        } else {
            "Kafka cluster"
        },
        workload.events,
        workload.users,
        workload.seed,
        rules.version
    );

    // Load generator.
    let produced = Arc::new(AtomicU64::new(0));
    let loadgen = {
        let (b, t, p, rate) = (brokers.clone(), topics.clone(), produced.clone(), args.rate);
        let consumed = pstats.clone();
        // On the embedded broker, stay at most 200 K records ahead of the processor: its
        // bounded log would otherwise drop records before they are read.
        let ahead = embedded.is_some();
        Service::spawn("load generator", move |stop| {
            let pace = loadgen::Pace {
                rate,
                ahead_of: ahead.then_some((&consumed.consumed, 200_000)),
                ..loadgen::Pace::default()
            };
            loadgen::produce(&b, &[], &t, workload, pace, &p, &stop)
        })?
    };
    // Processor.
    let processor = {
        let mut cfg = ProcessorConfig::new(brokers.clone(), data_dir.join("processor"));
        cfg.topics = topics.clone();
        cfg.group_id = format!("{prefix}forest-processor");
        cfg.rules = Arc::new(rules.clone());
        // As `forest processor` runs by default.
        cfg.projection_interval =
            forest_processor::default_projection_interval(cfg.exactly_once, cfg.changelog);
        let s = pstats.clone();
        Service::spawn("processor", move |stop| {
            forest_processor::run(cfg, stop, s).map_err(anyhow::Error::from)
        })?
    };
    // Fulfilment.
    let fulfilment = {
        let mut cfg = FulfilmentConfig::new(brokers.clone(), data_dir.join("fulfilment"));
        cfg.topics = ftopics.clone();
        cfg.group_id = format!("{prefix}forest-fulfilment");
        cfg.partners = partners;
        let s = fstats.clone();
        Service::spawn("fulfilment", move |stop| {
            forest_fulfilment::run(cfg, stop, s).map_err(anyhow::Error::from)
        })?
    };
    // Simulated partner.
    let sstats = Arc::new(SimStats::default());
    let partner = {
        let (b, t, s) = (brokers.clone(), ftopics.clone(), sstats.clone());
        let group = format!("{prefix}forest-sim-partner");
        let sim = SimPartner {
            seed: args.workload.seed,
            reject_per_mille: args.reject_per_mille,
        };
        Service::spawn("simulated partner", move |stop| {
            forest_fulfilment::sim::run_partner(&b, &[], &group, &t, sim, stop, &s)
                .map_err(anyhow::Error::from)
        })?
    };

    // Progress until the pipeline has drained.
    let progress = Progress::new(args.no_progress, total_events);
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut produced_total = None;
    let mut loadgen = Some(loadgen);
    let mut drained_checks = 0;
    let marks = Watermarks::new(&brokers)?;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        if loadgen.as_ref().is_some_and(|l| l.failed()) {
            if let Some(l) = loadgen.take() {
                produced_total = Some(l.stop()?);
            }
        }
        for (name, failed) in [
            ("processor", processor.failed()),
            ("fulfilment", fulfilment.failed()),
            ("simulated partner", partner.failed()),
        ] {
            if failed {
                progress.finish();
                bail!("the {name} stopped unexpectedly; see the log above");
            }
        }
        let committed = ProcessorStats::get(&pstats.committed_records);
        progress.update(
            produced.load(Ordering::Relaxed),
            committed,
            ProcessorStats::get(&pstats.trees),
            FulfilmentStats::get(&fstats.orders),
            FulfilmentStats::get(&fstats.certificates),
        );
        let drained = match produced_total {
            Some(total) if committed >= total => {
                // Everything the processor emitted has been read by fulfilment, every order
                // has been answered and every answer read.
                let trees_done = caught_up(&marks, &topics.trees, &fstats)?;
                let answered = FulfilmentStats::get(&fstats.orders)
                    <= sstats.orders_seen.load(Ordering::Relaxed)
                    && caught_up(&marks, &ftopics.confirmations, &fstats)?;
                trees_done && answered
            }
            _ => false,
        };
        drained_checks = if drained { drained_checks + 1 } else { 0 };
        if drained_checks >= 2 {
            break;
        }
        if Instant::now() > deadline {
            progress.finish();
            bail!(
                "the pipeline did not drain within {} s (raise --timeout-secs for big runs)",
                args.timeout_secs
            );
        }
    }
    progress.finish();
    let secs = started.elapsed().as_secs_f64();
    partner.stop()?;
    fulfilment.stop()?;
    processor.stop()?;
    let produced_total = produced_total.unwrap_or(0);

    // Read the outputs back and check the invariants.
    let read = |t: &str| read_topic(&brokers, t, Duration::from_secs(120));
    let mut tree_ids = BTreeSet::new();
    let tree_records = read(&topics.trees)?;
    for r in &tree_records {
        tree_ids.insert(TreeMatured::decode(r.value.as_slice())?.tree_id);
    }
    let mut ordered: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
    let mut order_records = 0;
    for r in read(&ftopics.orders)? {
        let o = PlantingOrder::decode(r.value.as_slice())?;
        order_records += 1;
        ordered
            .entry(o.tree_id.clone())
            .or_default()
            .insert(r.value.clone());
    }
    let mut certified: BTreeMap<String, u64> = BTreeMap::new();
    for r in read(&ftopics.certificates)? {
        *certified
            .entry(Certificate::decode(r.value.as_slice())?.tree_id)
            .or_insert(0) += 1;
    }
    let dlq = read(&topics.dlq)?.len();
    let backlog = FulfilmentStats::get(&fstats.backlog);
    let rejections = pstats
        .rejections
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();

    let orders_ok = ordered.keys().all(|t| tree_ids.contains(t))
        && ordered.len() as u64 + backlog == tree_ids.len() as u64;
    let certs_ok =
        certified.values().all(|n| *n == 1) && certified.keys().all(|t| ordered.contains_key(t));
    let trees_ok = tree_ids.len() as u64 == ProcessorStats::get(&pstats.trees);
    let consumed_ok = ProcessorStats::get(&pstats.committed_records) == produced_total;

    println!("Forest demo summary ({secs:.1} s)");
    println!("  events in            {produced_total}");
    println!(
        "  credits              {}",
        ProcessorStats::get(&pstats.applied)
    );
    println!(
        "  rejections           {}",
        rejections.values().sum::<u64>()
    );
    for (code, n) in &rejections {
        println!("    {code:<20} {n}");
    }
    println!("  dead letters         {dlq}");
    println!(
        "  trees matured        {} ({} records on the topic)",
        tree_ids.len(),
        tree_records.len()
    );
    println!(
        "  orders placed        {} ({} records; {} re-allocations after partner rejections)",
        ordered.len(),
        order_records,
        FulfilmentStats::get(&fstats.reallocations)
    );
    println!("  backlog              {backlog}");
    println!("  certificates         {}", certified.len());
    println!(
        "  throughput           {:.0} events/s end to end",
        produced_total as f64 / secs
    );
    let ok = orders_ok && certs_ok && trees_ok && consumed_ok;
    println!(
        "  check                {}: every event consumed once ({}), orders + backlog == matured trees ({} + {} == {}), no tree with two orders or two certificates ({}), trees on the topic == trees matured ({})",
        if ok { "OK" } else { "FAILED" },
        yes(consumed_ok),
        ordered.len(),
        backlog,
        tree_ids.len(),
        yes(orders_ok && certs_ok),
        yes(trees_ok)
    );
    ensure!(ok, "demo invariants do not hold");
    // Clients first: a client that outlives the embedded broker logs connection errors.
    drop(marks);
    drop(embedded);
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

/// Whether fulfilment has committed `topic` to its current end.
fn caught_up(marks: &Watermarks, topic: &str, stats: &FulfilmentStats) -> anyhow::Result<bool> {
    let ends = marks.ends(topic)?;
    let got = stats.committed_offsets();
    Ok(ends
        .iter()
        .all(|(p, end)| *end == 0 || got.get(&(topic.to_string(), *p)).is_some_and(|o| o >= end)))
}

/// The live display: an indicatif bar on a terminal, a log line every 2 s otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    fn new(plain: bool, events: u64) -> Self {
        let bar = (!plain && console_is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(events);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} processed {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            started: Instant::now(),
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    fn update(&self, produced: u64, processed: u64, trees: u64, orders: u64, certs: u64) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let msg = format!(
            "| produced {produced} ({:.0}/s) processed {:.0}/s lag {} | trees {trees} orders {orders} certificates {certs}",
            produced as f64 / secs,
            processed as f64 / secs,
            produced.saturating_sub(processed)
        );
        match &self.bar {
            Some(b) => {
                b.set_position(processed);
                b.set_message(msg);
            }
            None => {
                if self.last_line.get().elapsed() >= Duration::from_secs(2) {
                    self.last_line.set(Instant::now());
                    eprintln!("  processed {processed} {msg}");
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn console_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
