//! `forest bench`: the end-to-end benchmark harness. In one run, on one preloaded topic set:
//! (a) the raw consume-only throughput of a plain rdkafka consumer (and (a'), the same reading
//! in batches as the processor does), (f) the processor's ceiling (that reading, decoded and
//! folded in memory, nothing durable), (g) the durable floor ((f) plus the processor's
//! projection and offset writes to RocksDB), (b) the processor's end-to-end throughput (decode,
//! fold, RocksDB, outputs), (c) produce-to-projection latency at fixed rates; then one table.
//! Works on the embedded broker and on `--brokers`.

use crate::common;
use crate::loadgen::{self, WorkloadArgs};
use anyhow::{Context, ensure};
use forest_fulfilment::FulfilmentTopics;
use forest_kafka::{
    ClientConfigExt, EmbeddedBroker, client_config, end_offsets, ensure_topics, watermarks,
};
use forest_processor::{ProcessorConfig, ProcessorStats, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Benchmark this Kafka cluster instead of the embedded broker.
    #[arg(long, env = "FOREST_BROKERS")]
    brokers: Option<String>,
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Partitions of each input topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Processor workers (consumer-group members on their own threads, sharing the store).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The processor's exactly-once mechanism in phases (b) and (c): `outbox` or
    /// `transactions` (one Kafka transaction per batch, with the changelog); run the bench once
    /// with each to price transactions.
    #[arg(long, default_value = "outbox")]
    exactly_once: forest_processor::ExactlyOnce,
    /// Write the projection changelog in phases (b) and (c) (transactions mode always does):
    /// compare `outbox` with it against `transactions` to price the transactions alone.
    #[arg(long)]
    changelog: bool,
    /// Processor batch size (records per RocksDB batch).
    #[arg(long, default_value_t = 20_000)]
    batch_size: usize,
    /// Processor batch window: a batch is closed this many milliseconds after its first
    /// record if it has not filled up by then.
    #[arg(long, default_value_t = 5)]
    batch_max_wait_ms: u64,
    /// Write batches and deliver their outputs on a committer thread beside each worker
    /// (the processor's default); `false` for the worker doing both between polls.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    overlap_commits: bool,
    /// How long the processor may leave a changed projection unwritten in phases (b) and
    /// (c), ms: 0 writes it with the batch; above 0 see `forest processor
    /// --projection-interval-ms`, whose default this follows (5000 in the outbox mode
    /// without --changelog, else 0). The at-least-once baseline (b') writes at the same
    /// interval.
    #[arg(long)]
    projection_interval_ms: Option<u64>,
    /// Pace the projection writes in phases (b) and (c): `forest processor
    /// --projection-pace`.
    #[arg(long)]
    projection_pace: bool,
    /// Seconds of load at each fixed rate of the latency phase; 0 skips it. The first 2 s are
    /// warm-up and not measured. The steady-state figure also leaves out the first projection
    /// interval and 1 s more: a processor that starts on a topic has every user it meets in
    /// its first second due for writing together one interval later (BENCHMARKS.md,
    /// session 19). The records are made before each rate's runs and held through them: by
    /// estimate about 160 bytes each, so 1 GiB per 6.7 M (rate x seconds).
    #[arg(long, default_value_t = 20)]
    latency_secs: u64,
    /// Rates of the latency phase, as fractions of the processor's measured throughput from its
    /// first record. The goal is at half; a quarter shows what the machine holds below it.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5")]
    latency_at: Vec<f64>,
    /// Rates of the latency phase in events/s, instead of `--latency-at`'s fractions. For
    /// comparing builds or settings at one rate: the measured throughput, and so any fraction
    /// of it, varies from run to run, and the latency tail grows with the rate (BENCHMARKS.md,
    /// session 20).
    #[arg(long, value_delimiter = ',')]
    latency_rates: Vec<u64>,
    /// Also run a plain consumer beside the processor in the latency phase, recording each
    /// record's age on arrival. Off by default: its own thread took 0.06-0.23 cores, plus its
    /// fetches in librdkafka and the broker, on the cores the processor was measured on
    /// (BENCHMARKS.md, session 13); the run with no processor at the same rate, before it,
    /// says what Kafka alone gives.
    #[arg(long)]
    latency_beside: bool,
    /// Run the latency phase's load generator (its thread, and the librdkafka threads of its
    /// producer, which start on it) on this CPU only. For measuring the processor on cores of
    /// its own: run the bench under `taskset -c` with the other CPUs, and pin the broker to
    /// this one (`taskset -a -p -c N <broker pid>`), so the maximum rate (b) and the latency
    /// phase's processor share no core with the broker or the load (BENCHMARKS.md, session 17).
    #[arg(long)]
    load_core: Option<usize>,
    /// Run the processor once over the log before the measured phases, reported as (w) but
    /// not compared: the first run in a process and on a broker is slower, whatever it runs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    warm_up: bool,
    /// Run the at-least-once baseline (b') before the processor (b) instead of after it: the
    /// two phases' difference is the effectively-once cost only if the order does not move it.
    #[arg(long)]
    baseline_first: bool,
    /// Keep the stores here. Default: a temporary directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// PID of an external broker process (e.g. `cat $TMPDIR/forest-kafka/kafka.pid`), whose
    /// CPU time is then reported per phase too.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// librdkafka setting passed through to every client, repeatable: --kafka-config key=value.
    #[arg(long = "kafka-config", value_parser = crate::common::parse_kv)]
    kafka_config: Vec<(String, String)>,
    /// Keep RocksDB's write-ahead log in every processor phase (`forest processor
    /// --store-wal`), to price it; off by default, as in the processor.
    #[arg(long)]
    store_wal: bool,
    /// Cap RocksDB's flushes and compactions in every processor phase at this many MiB per
    /// second (`forest processor --store-background-write-mib`); default: no cap.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    store_background_write_mib: Option<u64>,
    /// Flushed files in RocksDB's level 0 before a compaction, in every processor phase
    /// (`forest processor --store-l0-compaction-files`).
    #[arg(long, default_value_t = forest_store::DEFAULT_L0_COMPACTION_FILES, value_parser = clap::value_parser!(u32).range(2..=64))]
    store_l0_compaction_files: u32,
    /// RocksDB's compactions at the lowest CPU priority, for the whole run (`forest processor
    /// --store-low-priority-compactions`; process-wide once set).
    #[arg(long)]
    store_low_priority_compactions: bool,
}

impl BenchArgs {
    fn projection_interval(&self) -> Duration {
        self.projection_interval_ms.map_or_else(
            || forest_processor::default_projection_interval(self.exactly_once, self.changelog),
            Duration::from_millis,
        )
    }
}

/// The latency phase's rates, each with the fraction it is of the maximum rate `max`
/// (events/s): `--latency-at`'s fractions of it, or the `--latency-rates` asked for.
fn latency_rates(args: &BenchArgs, max: f64) -> Vec<(f64, u64)> {
    if args.latency_rates.is_empty() {
        args.latency_at
            .iter()
            .map(|f| (*f, (max * f).max(1.0) as u64))
            .collect()
    } else {
        args.latency_rates
            .iter()
            .map(|&r| (r as f64 / max.max(1.0), r))
            .collect()
    }
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|st| stat_seconds(&st))
        .unwrap_or(f64::NAN)
}

/// Peak resident set since the last [`reset_peak_rss`], MiB (VmHWM).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets the peak-RSS mark (Linux: write 5 to /proc/self/clear_refs), so each phase reports
/// its own peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU time by thread group during a phase, sampled every 100 ms from /proc (a thread that
/// ends between samples loses at most its last 100 ms), plus an external broker process.
struct CpuSampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<BTreeMap<&'static str, f64>>>,
}

impl Drop for CpuSampler {
    /// A phase that failed drops its sampler unfinished: stop its thread all the same.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The group a thread's CPU is reported under, by its name. The harness's main thread is a
/// group of its own (it produces the preload), and so is the latency phase's load generator:
/// both compete with the processor for the same cores unless `--load-core` moves the load
/// away. With `--workers 1` the one worker runs on the processor's own (unnamed) thread, so
/// its CPU is under "other forest threads".
fn thread_group(main: bool, comm: &str) -> &'static str {
    if main {
        "harness main thread"
    } else if comm.starts_with("rdk:mock") {
        "embedded broker"
    } else if comm.starts_with("rdk:") {
        "librdkafka clients"
    } else if comm.starts_with("forest-worker") {
        "processor workers"
    } else if comm.starts_with("forest-commit") {
        "processor committers"
    } else if comm.starts_with("forest-load") {
        "load generator"
    } else if comm.starts_with("forest-fold") {
        "fold ceiling threads"
    } else if comm.starts_with("forest-floor") {
        "durable floor writers"
    } else if comm.starts_with("rocksdb:") {
        "RocksDB background"
    } else {
        "other forest threads"
    }
}

/// (utime + stime) seconds from a /proc stat line: the 12th and 13th fields after the
/// command name's closing parenthesis, in clock ticks (100 per second on Linux).
fn stat_seconds(stat: &str) -> Option<f64> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
}

impl CpuSampler {
    fn start(broker_pid: Option<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            // tid -> (group, first seen, last seen)
            let mut seen: BTreeMap<String, (&'static str, f64, f64)> = BTreeMap::new();
            let main = std::process::id().to_string();
            let sample = |seen: &mut BTreeMap<String, (&'static str, f64, f64)>| {
                if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
                    for t in dir.flatten() {
                        let path = t.path();
                        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                        let Some(cpu) = std::fs::read_to_string(path.join("stat"))
                            .ok()
                            .and_then(|st| stat_seconds(&st))
                        else {
                            continue;
                        };
                        let key = t.file_name().to_string_lossy().into_owned();
                        let group = thread_group(key == main, comm.trim());
                        // A new thread names itself after it starts: the group follows its
                        // latest name, or all its CPU could land under its parent's.
                        let e = seen.entry(key).or_insert((group, cpu, cpu));
                        e.0 = group;
                        e.2 = cpu;
                    }
                }
                if let Some(pid) = broker_pid {
                    if let Some(cpu) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .ok()
                        .and_then(|st| stat_seconds(&st))
                    {
                        let e = seen.entry(format!("pid-{pid}")).or_insert((
                            "Kafka broker (JVM)",
                            cpu,
                            cpu,
                        ));
                        e.2 = cpu;
                    }
                }
            };
            sample(&mut seen);
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                sample(&mut seen);
            }
            sample(&mut seen);
            let mut groups = BTreeMap::new();
            for (_, (g, first, last)) in seen {
                *groups.entry(g).or_insert(0.0) += last - first;
            }
            groups
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> BTreeMap<&'static str, f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

struct Phase {
    name: String,
    /// CPU seconds by thread group (and the external broker, if known).
    groups: BTreeMap<&'static str, f64>,
    events: u64,
    secs: f64,
    cpu: f64,
    rss: f64,
    writes: Option<f64>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }
}

fn measure<T>(
    name: &str,
    broker_pid: Option<u32>,
    events: impl FnOnce(&T) -> u64,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(Phase, T)> {
    reset_peak_rss();
    let sampler = CpuSampler::start(broker_pid);
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let out = f()?;
    let secs = t0.elapsed().as_secs_f64();
    let groups = sampler.finish();
    let phase = Phase {
        name: name.into(),
        groups,
        events: events(&out),
        secs,
        cpu: cpu_seconds() - cpu0,
        rss: peak_rss_mib(),
        writes: None,
    };
    eprintln!(
        "  {name}: {} events in {secs:.2} s = {:.0} events/s",
        phase.events,
        phase.rate()
    );
    Ok((phase, out))
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    // 16 M events by default: at about 1 M events/s the processor then runs through three
    // of its default 5 s projection intervals, so (b) includes the steady state's repeated
    // writes of active users, not only the one write per user at shutdown that a shorter
    // run would measure.
    let workload = args.workload.config_with(16_000_000, 1_000_000)?;
    ensure!(args.partitions >= 1, "--partitions must be at least 1");
    ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    ensure!(
        args.latency_secs == 0 || args.latency_secs > WARM_UP.as_secs(),
        "--latency-secs must be 0 (skip) or more than the {} s warm-up",
        WARM_UP.as_secs()
    );
    ensure!(
        args.batch_max_wait_ms > 0,
        "--batch-max-wait-ms must be at least 1"
    );
    ensure!(
        args.latency_at.iter().all(|f| *f > 0.0 && *f <= 2.0),
        "--latency-at takes fractions of the measured throughput, e.g. 0.25,0.5"
    );
    ensure!(
        args.latency_rates.iter().all(|r| *r > 0),
        "--latency-rates takes events per second above 0, e.g. 100000,200000"
    );
    if let Some(id) = args.load_core {
        // Tried now, on a thread that ends, rather than after minutes of earlier phases.
        std::thread::spawn(move || pin_to_cpu(id))
            .join()
            .map_err(|_| anyhow::anyhow!("--load-core check panicked"))??;
    }
    let embedded = match &args.brokers {
        None => Some(EmbeddedBroker::start(1)?),
        Some(_) => None,
    };
    let brokers = args
        .brokers
        .clone()
        .or_else(|| embedded.as_ref().map(|e| e.bootstrap_servers()))
        .context("no broker")?;
    let tmp;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let kafka = &args.kafka_config;
    let create = |prefix: &str| -> anyhow::Result<Topics> {
        let t = Topics::prefixed(prefix);
        let names = common::all_topics(&t, &FulfilmentTopics::prefixed(prefix));
        let spec: Vec<(&str, i32)> = names
            .iter()
            .map(|n| (n.as_str(), args.partitions))
            .collect();
        ensure_topics(embedded.as_ref(), &brokers, kafka, &spec, 1)?;
        Ok(t)
    };
    eprintln!(
        "forest bench on {} ({brokers}): {} events, {} users, {} partitions, batch {}, exactly-once by {:?}{}",
        if embedded.is_some() {
            "the embedded broker"
        } else {
            "a Kafka cluster"
        },
        workload.events,
        workload.users,
        args.partitions,
        args.batch_size,
        args.exactly_once,
        if args.changelog {
            ", with the changelog"
        } else {
            ""
        }
    );
    let interval = args.projection_interval();
    if interval.is_zero() {
        eprintln!("projections written with every batch (--projection-interval-ms 0)");
    } else {
        eprintln!(
            "projections written up to {} ms after they change (replay records meanwhile; --projection-interval-ms)",
            interval.as_millis()
        );
    }

    // Preload.
    let topics = create(&format!("bench-{stamp}."))?;
    eprintln!("  topics bench-{stamp}.forest.*");
    let never = AtomicBool::new(false);
    let produced = AtomicU64::new(0);
    let (preload, n) = measure(
        "preload (produce)",
        args.broker_pid,
        |n: &u64| *n,
        || {
            loadgen::produce(
                &brokers,
                kafka,
                &topics,
                workload.clone(),
                loadgen::Pace::default(),
                &produced,
                &never,
            )
        },
    )?;
    let inputs = [&topics.payments, &topics.mobility, &topics.commands];
    let mut ends = Vec::new();
    let mut lows = Vec::new();
    let mut retained = 0;
    for t in inputs {
        for (p, (low, end)) in watermarks(&brokers, t)? {
            ends.push((t.to_string(), p, end));
            lows.push(low);
            retained += end - low;
        }
    }
    if retained < n as i64 {
        eprintln!(
            "  note: the broker retained {retained} of {n} records (the embedded broker keeps a bounded log per partition); the phases below read what is there"
        );
    }

    // (b) The processor, end to end, and (b') the same as plain at-least-once (Kafka
    // offsets, no outbox): what effectively-once costs. Run in that order unless
    // `--baseline-first`, which shows how much of their difference is the order itself.
    let pstats = Arc::new(ProcessorStats::default());
    let astats = Arc::new(ProcessorStats::default());
    let wstats = Arc::new(ProcessorStats::default());
    let phase_b = |role: &str| {
        let (name, stats, alo) = match role {
            "alo" => ("(b') at-least-once baseline", &astats, true),
            "eo" => ("(b) processor", &pstats, false),
            _ => ("(w) warm-up: the processor's first run", &wstats, false),
        };
        measure(
            name,
            args.broker_pid,
            |_: &Started| ProcessorStats::get(&stats.committed_records),
            || {
                let dir = data_dir.join(format!("processor-{role}"));
                let cfg = processor_config(&args, &brokers, &topics, &dir, alo);
                run_processor(cfg, role, stats, &ends, Duration::from_secs(3600))
            },
        )
    };
    // The first processor run in this process and on this broker was 11-28 % slower than
    // the next one over the same log, whichever mode ran first (session 11 at interval 0: (b)
    // first "cost" 7-16 % against (b'), (b') first -15 to -31 %; the broker used twice the
    // CPU per event in the first run). A comparison needs every phase past that, so a warm-up run goes first,
    // before the raw consumers too (the first reads of the log), reported but not compared.
    let warm_up = if args.warm_up {
        let (w, started) = phase_b("warm-up")?;
        let steady = started.steady.phase(
            "(w) warm-up: the processor's first run, from its first record".into(),
            &w,
        );
        Some((w, steady))
    } else {
        None
    };

    // (a) Raw consume-only throughput, like (b) from its first record: the consumer's start
    // (metadata, connections, the first fetch) was about half of a 1 M-event phase, which made
    // (b)/(a) depend on the log's length (session 11).
    let (mut raw, run) = measure(
        "(a) raw consume, from its first record",
        args.broker_pid,
        |r: &RawRun| r.records,
        || raw_consume(&brokers, kafka, &ends, retained, false),
    )?;
    run.window(&mut raw);

    // (a') The same, read in batches like the processor (forest_kafka::FetchQueue): the
    // ceiling for a consumer that reads the way Forest does.
    let (mut raw_batched, run) = measure(
        "(a') raw consume, batched, from its first record",
        args.broker_pid,
        |r: &RawRun| r.records,
        || raw_consume(&brokers, kafka, &ends, retained, true),
    )?;
    run.window(&mut raw_batched);

    // (f) The ceiling: consume as (a'), decode and fold in memory, nothing durable. With the
    // processor's rules (the bench runs it with the built-in ones) and its worker count.
    let kinds = [
        (topics.payments.as_str(), forest_domain::InputKind::Payment),
        (topics.mobility.as_str(), forest_domain::InputKind::Mobility),
        (topics.commands.as_str(), forest_domain::InputKind::Command),
    ];
    let rules = forest_domain::RuleSet::default();
    let fold_cfg = Ceiling {
        brokers: &brokers,
        kafka,
        kinds: &kinds,
        rules: &rules,
    };
    let lanes = Lanes {
        ends: &ends,
        lows: &lows,
    };
    // (f), and (g) below: the same reading and fold, (g) with its writes.
    let fold_phase = |name: &str, floor: Option<&Floor>| -> anyhow::Result<Phase> {
        let (mut phase, run) = measure(
            name,
            args.broker_pid,
            |r: &RawRun| r.records,
            || fold_ceiling(fold_cfg, lanes, args.workers, workload.users, floor),
        )?;
        run.window(&mut phase);
        Ok(phase)
    };
    let ceiling = fold_phase(
        "(f) ceiling: consume batched, decode, fold in memory; from its first record",
        None,
    )?;

    // (g) The durable floor: (f) plus the processor's projection and offset writes to
    // RocksDB, once per projection interval (see `Floor`).
    let floor_dir = data_dir.join("floor");
    let floor_cfg = processor_config(&args, &brokers, &topics, &floor_dir, false);
    let floor_store =
        forest_store::Store::open(&floor_dir, &floor_cfg.store).with_context(|| {
            format!(
                "opening the durable floor's store in {}",
                floor_dir.display()
            )
        })?;
    let floor = Floor {
        store: Arc::new(floor_store),
        interval,
    };
    let mut durable_floor = fold_phase(
        "(g) durable floor: (f) plus projection and offset writes to RocksDB; from its first record",
        Some(&floor),
    )?;
    let floor_writes = floor.store.stats.writes.load(Ordering::Relaxed);
    durable_floor.writes = Some(floor_writes as f64 / durable_floor.events.max(1) as f64);
    // Closed before (b): its background work is not (b)'s.
    drop(floor);

    // (b) and (b').
    let ((mut proc, started), (alo, alo_started)) = if args.baseline_first {
        let alo = phase_b("alo")?;
        (phase_b("eo")?, alo)
    } else {
        let proc = phase_b("eo")?;
        (proc, phase_b("alo")?)
    };
    proc.writes =
        Some(ProcessorStats::get(&pstats.store_writes) as f64 / proc.events.max(1) as f64);
    // The raw consumer assigns partitions directly; the processor first joins its consumer
    // group (seconds, mostly the broker's rebalance delay). Throughput is compared after that.
    let startup = started.first_record;
    let steady = started
        .steady
        .phase("(b) processor, from its first record".into(), &proc);
    let settled = started.settled.as_ref().map(|w| {
        w.phase(
            format!(
                "(b) processor, once its group settled (after {} rebalance callbacks)",
                w.rebalances
            ),
            &proc,
        )
    });

    let mut alo_steady = alo_started.steady.phase(
        "(b') at-least-once baseline, from its first record".into(),
        &alo,
    );
    alo_steady.writes =
        Some(ProcessorStats::get(&astats.store_writes) as f64 / alo.events.max(1) as f64);

    // (c) Latency at fixed rates.
    let mut latencies = Vec::new();
    let mut timelines = Vec::new();
    // Seconds of the latency timeline before its steady state: the first projection interval
    // (rounded up) and 1 s more, the time the first writes take.
    let steady_skip = interval.as_millis().div_ceil(1000) as usize + 1;
    let mut latency_cpu = Vec::new();
    if args.latency_secs > 0 {
        // From the steady rate (from the first record): the group join is not part of the
        // maximum rate.
        for (i, &(frac, rate)) in latency_rates(&args, steady.rate()).iter().enumerate() {
            let t = create(&format!("bench-{stamp}-lat{i}."))?;
            let events = rate * args.latency_secs;
            let stats = Arc::new(ProcessorStats::default());
            let mut cfg = workload.clone();
            cfg.events = events;
            cfg.seed = workload.seed + 1 + i as u64;
            // Made before the processor starts: generating them as they are sent cost about
            // 1 CPU-s per M events on the cores the processor is measured on.
            let records: Vec<forest_workload::Record> =
                forest_workload::Generator::new(cfg).collect();
            // First the same records at the same pace with no processor running: what the
            // producer, the broker and a plain consumer give on this machine by themselves.
            let alone_topics = create(&format!("bench-{stamp}-lat{i}k."))?;
            let load = |topics| PacedLoad {
                brokers: &brokers,
                kafka,
                topics,
                records: &records,
                rate,
                broker_pid: args.broker_pid,
                load_core: args.load_core,
            };
            let (no_processor, alone_cpu) = load(&alone_topics).kafka_alone()?;
            let stop = Arc::new(AtomicBool::new(false));
            let handle = {
                let mut c = processor_config(
                    &args,
                    &brokers,
                    &t,
                    &data_dir.join(format!("latency-{i}")),
                    false,
                );
                // A group per phase: a member of an earlier phase that has not left yet must not
                // rebalance this one.
                c.group_id = format!("forest-bench-lat-{}-{i}", std::process::id());
                let (s, st) = (stats.clone(), stop.clone());
                std::thread::spawn(move || forest_processor::run(c, st, s))
            };
            // Produce only once every worker owns partitions: the group join is start-up, not
            // latency. Waiting for the first assignment was not enough with several workers:
            // one could take every partition, and the others' join then revoked and
            // reassigned them all about 3 s later (the members' heartbeat interval), inside
            // the measurement: a ~200-300 ms stall that alone made the phase's p99.
            let joined = Instant::now();
            let holders = args.workers.min(args.partitions as usize) as u64;
            while ProcessorStats::get(&stats.workers_joined) < args.workers as u64
                || ProcessorStats::get(&stats.workers_assigned) < holders
            {
                ensure!(!handle.is_finished(), "the latency processor stopped early");
                ensure!(
                    joined.elapsed() < Duration::from_secs(120),
                    "not every latency processor worker got partitions within 120 s"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(200));
            let hists = |s: &ProcessorStats| {
                [
                    &s.latency_durable,
                    &s.latency,
                    &s.stage_polled,
                    &s.stage_batch,
                    &s.stage_store,
                    &s.stage_deliver,
                    &s.stage_handoff,
                ]
                .map(|h| h.reset())
            };
            hists(&stats);
            // With --latency-beside: a plain consumer on the same topics, beside the
            // processor, records each record's age on arrival.
            let kafka_alone = Arc::new(forest_processor::LatencyHistogram::default());
            let raw_stop = Arc::new(AtomicBool::new(false));
            let raw = args.latency_beside.then(|| {
                let (b, k, tt, h, st) = (
                    brokers.clone(),
                    kafka.to_vec(),
                    t.clone(),
                    kafka_alone.clone(),
                    raw_stop.clone(),
                );
                std::thread::spawn(move || raw_latency(&b, &k, &tt, &h, &AtomicU64::new(0), &st))
            });
            // Per second after the warm-up: when the tail happened, and what the processor
            // wrote then.
            let signals = Arc::new(TimelineSignals::default());
            let timeline = {
                let (s, sig) = (stats.clone(), signals.clone());
                std::thread::spawn(move || latency_timeline(&s, &sig))
            };
            let loaded = load(&t).run(|| {
                hists(&stats);
                kafka_alone.reset();
                signals.measuring.store(true, Ordering::Release);
            });
            signals.load_over.store(true, Ordering::Release);
            // Stopped on every path: a failed load must not leave the sampler running.
            let (_, with_cpu) = loaded.inspect_err(|_| signals.stop())?;
            drop(records);
            let committed = (|| {
                let mut lat_ends = Vec::new();
                for tp in [&t.payments, &t.mobility, &t.commands] {
                    for (p, end) in end_offsets(&brokers, tp)? {
                        lat_ends.push((tp.to_string(), p, end));
                    }
                }
                wait_committed(
                    &stats,
                    &lat_ends,
                    args.workers as u64,
                    Duration::from_secs(600),
                    &handle,
                )
            })();
            signals.stop();
            let timeline = timeline
                .join()
                .map_err(|_| anyhow::anyhow!("latency timeline sampler panicked"))?;
            let _ = committed?;
            // Only seconds under load: the drain after it is a backlog, not a rate.
            let steady: Vec<_> = timeline
                .iter()
                .filter(|w| w.under_load)
                .skip(steady_skip)
                .collect();
            let steady = (steady.len() >= STEADY_MIN_SECS).then(|| {
                steady
                    .iter()
                    .fold(forest_processor::HistogramSnapshot::default(), |a, w| {
                        a.plus(&w.latency)
                    })
            });
            timelines.push((rate, timeline));
            raw_stop.store(true, Ordering::Relaxed);
            if let Some(raw) = raw {
                raw.join()
                    .map_err(|_| anyhow::anyhow!("latency raw consumer panicked"))??;
            }
            stop.store(true, Ordering::Relaxed);
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("latency processor panicked"))??;
            let cores = |c: Option<f64>| c.map_or("-".to_string(), |c| format!("{c:.2}"));
            let q = |h: &forest_processor::LatencyHistogram| {
                let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
                format!("{} / {}", f(h.quantile_ms(0.5)), f(h.quantile_ms(0.99)))
            };
            latency_cpu.push((rate, "Kafka with no processor", alone_cpu.groups));
            latency_cpu.push((rate, "with the processor", with_cpu.groups));
            latencies.push((
                frac,
                rate,
                stats.latency_durable.count(),
                stats.latency_durable.quantile_ms(0.5),
                stats.latency_durable.quantile_ms(0.99),
                no_processor.quantile_ms(0.99),
                steady,
                format!(
                    "| {rate} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    q(&stats.latency_durable),
                    q(&stats.latency),
                    q(&no_processor),
                    cores(alone_cpu.machine),
                    cores(with_cpu.machine),
                    q(&kafka_alone),
                    q(&stats.stage_polled),
                    q(&stats.stage_batch),
                    q(&stats.stage_store),
                    q(&stats.stage_deliver),
                    q(&stats.stage_handoff)
                ),
            ));
        }
    }

    println!();
    println!(
        "projection interval of (g), (b), (b') and (c): {} ms; {} workers; batches of up to {} records",
        interval.as_millis(),
        args.workers,
        args.batch_size
    );
    println!();
    println!(
        "| phase | events | seconds | events/s | CPU-s per M events | RocksDB writes per event | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for p in [&preload]
        .into_iter()
        .chain(warm_up.as_ref().map(|(_, steady)| steady))
        .chain([&raw, &raw_batched, &ceiling, &durable_floor, &proc, &steady])
        .chain(settled.as_ref())
        .chain([&alo_steady])
    {
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.2} | {} | {:.0} |",
            p.name,
            p.events,
            p.secs,
            p.rate(),
            p.cpu / (p.events as f64 / 1e6),
            p.writes.map_or("-".to_string(), |w| format!("{w:.3}")),
            p.rss
        );
    }
    println!();
    println!(
        "group join before the first record: {:.2} s; (b)/(a) = {:.2} from the first record ({:.2} including the join and shutdown); (b)/(a') = {:.2}",
        startup.as_secs_f64(),
        steady.rate() / raw.rate(),
        proc.rate() / raw.rate(),
        steady.rate() / raw_batched.rate(),
    );
    println!(
        "(f)/(a) = {:.2}: consuming, decoding and folding alone, in memory, reach this share of (a); (b)/(f) = {:.2} from the first record",
        ceiling.rate() / raw.rate(),
        steady.rate() / ceiling.rate(),
    );
    println!(
        "(g)/(a) = {:.2}: with the projection and offset writes added (the durable floor); (b)/(g) = {:.2}: the rest of the processor",
        durable_floor.rate() / raw.rate(),
        steady.rate() / durable_floor.rate(),
    );
    for (name, st, events) in [("(b)", &pstats, proc.events), ("(b')", &astats, alo.events)] {
        println!(
            "{name}: {:.3} records fetched per record consumed (librdkafka statistics, every second, so up to a second short); {} lane pauses; {} Kafka offset commits; {} trees matured, {} dead letters",
            ProcessorStats::get(&st.fetched) as f64 / events.max(1) as f64,
            ProcessorStats::get(&st.lane_pauses),
            ProcessorStats::get(&st.kafka_commits),
            ProcessorStats::get(&st.trees),
            ProcessorStats::get(&st.dead_lettered),
        );
    }
    match &settled {
        Some(s) => println!(
            "once the group settled: (b)/(a) = {:.2}, (b)/(a') = {:.2}",
            s.rate() / raw.rate(),
            s.rate() / raw_batched.rate()
        ),
        None => println!(
            "the group never settled: the log was done before every worker held partitions"
        ),
    }
    println!();
    println!("CPU-s per M events by thread group (sampled every 100 ms):");
    println!();
    let phases: Vec<&Phase> = [&preload]
        .into_iter()
        .chain(warm_up.as_ref().map(|(whole, _)| whole))
        .chain([&raw, &raw_batched, &ceiling, &durable_floor, &proc, &alo])
        .collect();
    let names: std::collections::BTreeSet<&str> = phases
        .iter()
        .flat_map(|p| p.groups.keys().copied())
        .collect();
    println!(
        "| phase | {} |",
        names.iter().copied().collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}", "---|".repeat(names.len()));
    for p in phases {
        let per_m = |g: &str| {
            p.groups.get(g).map_or("-".to_string(), |c| {
                format!("{:.2}", c / (p.events as f64 / 1e6))
            })
        };
        println!(
            "| {} | {} |",
            p.name,
            names
                .iter()
                .map(|g| per_m(g))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    println!();
    // Compared once both groups settled when they did: a phase whose second worker joined
    // late (or never) is not the same workload as one where both worked throughout.
    let alo_settled = alo_started.settled.as_ref().map(|w| {
        w.phase(
            "(b') at-least-once baseline, once its group settled".into(),
            &alo,
        )
    });
    let (eo, alo_cmp, basis) = match (&settled, &alo_settled) {
        (Some(e), Some(a)) => (e, a, "both once their group settled"),
        _ => (
            &steady,
            &alo_steady,
            "from the first record; in one phase a worker never held partitions, so the two are not the same workload",
        ),
    };
    let order = format!(
        "{}{}",
        if args.warm_up {
            "after a warm-up run, "
        } else {
            "no warm-up run, "
        },
        if args.baseline_first {
            "(b') ran first"
        } else {
            "(b) ran first"
        }
    );
    println!(
        "effectively-once cost: {:.1} % fewer events/s than the at-least-once baseline ({:.0} vs {:.0}), {:.2} vs {:.2} CPU-s per M events ({basis}; {order})",
        100.0 * (1.0 - eo.rate() / alo_cmp.rate()),
        eo.rate(),
        alo_cmp.rate(),
        eo.cpu / (eo.events as f64 / 1e6),
        alo_cmp.cpu / (alo_cmp.events as f64 / 1e6)
    );
    for (frac, rate, count, p50, p99, alone_p99, steady, _) in &latencies {
        let ms = |v: &Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let after = if interval.is_zero() {
            ""
        } else {
            " (after the first projection writes, all due at once)"
        };
        let steady = steady.as_ref().map_or_else(
            || {
                format!(
                    "no steady-state figure: it needs --latency-secs of at least {}",
                    WARM_UP.as_secs() + (steady_skip + STEADY_MIN_SECS) as u64
                )
            },
            |s| {
                format!(
                    "in steady state, from {} s into the load to its end{after}, {} records: p50 {} ms, p99 {} ms",
                    WARM_UP.as_secs() + steady_skip as u64,
                    s.count(),
                    ms(&s.quantile_ms(0.5)),
                    ms(&s.quantile_ms(0.99))
                )
            },
        );
        println!(
            "latency at {rate} events/s ({:.0} % of (b) from its first record), {count} records: p50 {} ms, p99 {} ms (produce to durable projection after a 2 s warm-up, bucket upper bounds); {steady}; Kafka alone at that rate with no processor: p99 {} ms",
            frac * 100.0,
            ms(p50),
            ms(p99),
            ms(alone_p99)
        );
    }
    if !latencies.is_empty() {
        println!();
        println!(
            "Latency breakdown, p50 / p99 ms: produce to projection (the batch durable in the store); produce to outputs (durable and its outputs acknowledged); Kafka with no processor (the same records at the same pace on fresh topics, before the processor starts: a plain consumer's arrival age), and the machine's cores busy then and during the processor's run (every process, from /proc/stat, after the warm-up); Kafka beside the processor (a plain consumer's arrival age, with --latency-beside); the processor's poll (age when polled); per batch: filling, closing to durable (waiting for the committer included), output delivery, the worker blocked handing the batch to a full committer queue."
        );
        println!();
        println!(
            "| rate | to projection | to outputs | Kafka, no processor | cores busy, no processor | cores busy, with it | Kafka beside it | polled | batch fill | store write | delivery | hand-over wait |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (.., row) in &latencies {
            println!("{row}");
        }
        println!();
        println!(
            "Produce to projection, second by second after the warm-up, by when each batch became durable; the second in which the load ended is cut there, and the rows after it are the backlog's drain until every offset was committed. A p99 above the goal in a few seconds only is a stall; one in every second is the steady state:"
        );
        println!();
        println!(
            "| rate | second | ended (UTC) | load | records | p50 / p99 ms | records at {:.1} ms or more | projections written |",
            forest_processor::HistogramSnapshot::whole_buckets_from_ms(GOAL_P99_MS)
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (rate, timeline) in &timelines {
            for (i, w) in timeline.iter().enumerate() {
                let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
                println!(
                    "| {rate} | {} | {} | {} | {} | {} / {} | {} | {} |",
                    i + 1,
                    w.ended.format("%H:%M:%S%.3f"),
                    if w.under_load { "on" } else { "over" },
                    w.latency.count(),
                    ms(w.latency.quantile_ms(0.5)),
                    ms(w.latency.quantile_ms(0.99)),
                    w.latency.at_least_ms(GOAL_P99_MS),
                    w.projections
                );
            }
        }
        println!();
        println!(
            "CPU during the latency phases, cores by thread group (after the warm-up; the load generator's producer threads are among the librdkafka clients):"
        );
        println!();
        let names: std::collections::BTreeSet<&str> = latency_cpu
            .iter()
            .flat_map(|(.., g)| g.keys().copied())
            .collect();
        println!(
            "| rate | run | {} |",
            names.iter().copied().collect::<Vec<_>>().join(" | ")
        );
        println!("|---|---|{}", "---|".repeat(names.len()));
        for (rate, run, groups) in &latency_cpu {
            let cells: Vec<String> = names
                .iter()
                .map(|g| groups.get(g).map_or("-".into(), |c| format!("{c:.2}")))
                .collect();
            println!("| {rate} | {run} | {} |", cells.join(" | "));
        }
    }
    drop(embedded);
    Ok(())
}

/// A plain consumer for the harness's own reads (assigned partitions, never committing), in
/// a group of its own (`forest-bench-<role>-<pid>`): `settings`, then `--kafka-config`, win
/// over the defaults.
fn plain_consumer(
    brokers: &str,
    kafka: &[(String, String)],
    role: &str,
    settings: &[(&str, &str)],
) -> anyhow::Result<BaseConsumer> {
    let mut c = client_config(brokers, &[]);
    c.consumer_defaults()
        .set(
            "group.id",
            format!("forest-bench-{role}-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false");
    for (k, v) in settings {
        c.set(*k, *v);
    }
    Ok(c.set_all(kafka).create()?)
}

/// Until `stop`: reads the latency phase's input topics from the start with a plain consumer
/// and records each record's age on arrival (now minus its Kafka timestamp) in `hist`, and
/// counts the records in `read`.
fn raw_latency(
    brokers: &str,
    kafka: &[(String, String)],
    topics: &Topics,
    hist: &forest_processor::LatencyHistogram,
    read: &AtomicU64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let consumer = plain_consumer(brokers, kafka, "rawlat", &[])?;
    let mut tpl = TopicPartitionList::new();
    for t in [&topics.payments, &topics.mobility, &topics.commands] {
        for (p, _) in end_offsets(brokers, t)? {
            tpl.add_partition_offset(t, p, Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                read.fetch_add(1, Ordering::Relaxed);
                if let Some(ts) = m.timestamp().to_millis() {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    hist.record_ms(now.saturating_sub(ts).max(0) as u64);
                }
            }
            Some(Err(e)) => anyhow::bail!("latency raw consumer: {e}"),
            None => {}
        }
    }
    Ok(())
}

/// Latency is measured after this long at the fixed rate.
const WARM_UP: Duration = Duration::from_secs(2);

/// The fewest seconds under load a steady-state latency figure is given for.
const STEADY_MIN_SECS: usize = 3;

/// The benchmarks issue's p99 goal: the timeline counts, per second, the records above it.
const GOAL_P99_MS: u64 = 50;

/// One second of a latency phase: see [`latency_timeline`].
struct LatencyWindow {
    latency: forest_processor::HistogramSnapshot,
    projections: u64,
    /// When the second ended, to match it with RocksDB's and the broker's logs.
    ended: chrono::DateTime<chrono::Utc>,
    /// Whether the load was still being produced when it ended. The window in which the
    /// load ends is cut short there, so the later ones hold only the backlog's drain.
    under_load: bool,
}

/// What [`latency_timeline`] waits for: the warm-up's end (just after the histograms'
/// reset), the load's end and the end of sampling. Each is set once.
#[derive(Default)]
struct TimelineSignals {
    measuring: AtomicBool,
    load_over: AtomicBool,
    stop: AtomicBool,
}

impl TimelineSignals {
    /// Ends sampling (and any wait for the warm-up): on every path, failed ones included.
    fn stop(&self) {
        for s in [&self.load_over, &self.stop, &self.measuring] {
            s.store(true, Ordering::Release);
        }
    }
}

/// Samples the processor's produce-to-projection histogram once a second from the warm-up's
/// end until `stop`, and returns each second's share. Why: a phase's p99 says how long the
/// tail was, not whether it was one stall or every second. At 200 K events/s the slowest 1 %
/// of 18 s is 36 K records, the arrivals of 0.18 s: a stall of a few hundred ms anywhere
/// makes the p99, however quiet the other seconds were.
fn latency_timeline(stats: &ProcessorStats, signals: &TimelineSignals) -> Vec<LatencyWindow> {
    while !signals.measuring.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut windows = Vec::new();
    let sample = || {
        (
            stats.latency_durable.snapshot(),
            ProcessorStats::get(&stats.projections_written),
        )
    };
    // The histogram was reset just before `measuring` was set: it all belongs to the first
    // second, including what arrived before this thread noticed.
    let mut last = (
        forest_processor::HistogramSnapshot::default(),
        ProcessorStats::get(&stats.projections_written),
    );
    let mut next = Instant::now() + Duration::from_secs(1);
    let mut under_load = true;
    loop {
        let stopping = signals.stop.load(Ordering::Acquire);
        let load_ends = under_load && signals.load_over.load(Ordering::Acquire);
        if !stopping && !load_ends {
            std::thread::sleep(
                next.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50)),
            );
            if Instant::now() < next {
                continue;
            }
            next += Duration::from_secs(1);
        }
        let now = sample();
        windows.push(LatencyWindow {
            latency: now.0.since(&last.0),
            projections: now.1.saturating_sub(last.1),
            ended: chrono::Utc::now(),
            under_load,
        });
        last = now;
        if load_ends {
            under_load = false;
            next = Instant::now() + Duration::from_secs(1);
        }
        if stopping {
            return windows;
        }
    }
}

/// One latency run's load: `records`, produced at `rate` to `topics`.
struct PacedLoad<'a> {
    brokers: &'a str,
    kafka: &'a [(String, String)],
    topics: &'a Topics,
    records: &'a [forest_workload::Record],
    rate: u64,
    broker_pid: Option<u32>,
    /// See `--load-core`.
    load_core: Option<usize>,
}

impl PacedLoad<'_> {
    /// Produces the load with no processor running, and returns the ages a plain consumer
    /// saw on arrival after [`WARM_UP`], with the CPU used meanwhile. Why: on a shared
    /// machine the processor's tail can only be judged against what Kafka alone gives at the
    /// same rate; a tail that is already there without Forest is the machine's, not Forest's.
    fn kafka_alone(&self) -> anyhow::Result<(forest_processor::LatencyHistogram, CpuUse)> {
        let hist = forest_processor::LatencyHistogram::default();
        let (read, stop) = (AtomicU64::new(0), AtomicBool::new(false));
        let busy = std::thread::scope(|s| {
            let consumer =
                s.spawn(|| raw_latency(self.brokers, self.kafka, self.topics, &hist, &read, &stop));
            let load = self.run(|| hist.reset());
            // The consumer reads on until it has every record (or a minute passes), so the
            // tail counts the records that arrived last.
            let deadline = Instant::now() + Duration::from_secs(60);
            while let Ok((n, _)) = &load {
                if read.load(Ordering::Relaxed) >= *n
                    || Instant::now() > deadline
                    || consumer.is_finished()
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, Ordering::Relaxed);
            consumer
                .join()
                .map_err(|_| anyhow::anyhow!("latency raw consumer panicked"))??;
            anyhow::Ok(load?.1)
        })?;
        Ok((hist, busy))
    }

    /// Produces the records, each stamped with its send time, and returns how many were
    /// produced and the CPU used from the end of the [`WARM_UP`] to the end of the load (the
    /// window closes with the load, before anyone drains it). `warmed_up` runs when the
    /// warm-up ends: the first 2 s include the new producer's metadata and connection
    /// set-up, which held the first records for up to ~0.5 s, so histograms are reset then.
    fn run(&self, warmed_up: impl FnOnce() + Send) -> anyhow::Result<(u64, CpuUse)> {
        let pace = loadgen::Pace {
            rate: self.rate,
            stamp_now: true,
            ..loadgen::Pace::default()
        };
        let (sent, never) = (AtomicU64::new(0), AtomicBool::new(false));
        std::thread::scope(|s| {
            let warmed = s.spawn(|| {
                std::thread::sleep(WARM_UP);
                warmed_up();
                CpuWindow::start(self.broker_pid)
            });
            // On a thread of its own, pinned first if asked: the producer it creates starts its
            // librdkafka threads there, and they keep its CPU.
            let produced = std::thread::Builder::new()
                .name("forest-load".into())
                .spawn_scoped(s, || {
                    if let Some(id) = self.load_core {
                        pin_to_cpu(id)?;
                    }
                    loadgen::produce_records(
                        self.brokers,
                        self.kafka,
                        self.topics,
                        self.records,
                        pace,
                        &sent,
                        &never,
                    )
                })
                .context("starting the latency load generator's thread")?
                .join()
                .map_err(|_| anyhow::anyhow!("latency load generator panicked"))?;
            let end = Instant::now();
            let cpu = warmed
                .join()
                .map_err(|_| anyhow::anyhow!("latency warm-up timer panicked"))?
                .finish(end);
            Ok((produced?, cpu))
        })
    }
}

/// Keeps the calling thread, and the threads it starts from now on, on CPU `id` only
/// (`--load-core`).
fn pin_to_cpu(id: usize) -> anyhow::Result<()> {
    // Linux's CPU set (`cpu_set_t`) holds CPUs 0-1023; `core_affinity` would index past it.
    ensure!(
        id < 1024,
        "--load-core {id}: CPUs are numbered from 0 to at most 1023"
    );
    ensure!(
        core_affinity::set_for_current(core_affinity::CoreId { id }),
        "--load-core {id}: cannot run on CPU {id}: the machine has no such CPU, or this \
         process may not use it (CPUs are numbered from 0, as `taskset` and /proc/cpuinfo do)"
    );
    Ok(())
}

/// CPU used from the end of a latency phase's warm-up to the end of its load: the whole
/// machine's (every process) and this process's by thread group, plus the broker's.
struct CpuWindow {
    machine: MachineCpu,
    groups: CpuSampler,
    at: Instant,
}

/// What a [`CpuWindow`] measured, in cores (CPU-seconds per second).
struct CpuUse {
    machine: Option<f64>,
    groups: BTreeMap<&'static str, f64>,
}

impl CpuWindow {
    fn start(broker_pid: Option<u32>) -> Self {
        Self {
            machine: MachineCpu::now(),
            groups: CpuSampler::start(broker_pid),
            at: Instant::now(),
        }
    }

    /// Closes the window at `end` (the load's end; the sampler stops a moment later).
    fn finish(self, end: Instant) -> CpuUse {
        let machine = self.machine.cores_busy_until(&MachineCpu::now());
        let secs = end.saturating_duration_since(self.at).as_secs_f64();
        let groups = self
            .groups
            .finish()
            .into_iter()
            .map(|(g, cpu)| (g, if secs > 0.0 { cpu / secs } else { f64::NAN }))
            .collect();
        CpuUse { machine, groups }
    }
}

/// The whole machine's CPU counters (every process), from the first line of /proc/stat.
struct MachineCpu {
    /// Jiffies spent busy (user, nice, system, irq, softirq, steal) and in all, summed over
    /// every CPU; `None` where /proc/stat cannot be read.
    jiffies: Option<(u64, u64)>,
    cpus: usize,
}

impl MachineCpu {
    fn now() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
    }

    /// From the text of /proc/stat: the first line (`cpu  user nice system idle iowait irq
    /// softirq steal ...`, summed over every CPU) and the count of `cpuN` lines.
    fn parse(stat: &str) -> Self {
        let jiffies = (|| {
            let f: Vec<u64> = stat
                .lines()
                .next()?
                .strip_prefix("cpu ")?
                .split_whitespace()
                .take(8)
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let [user, nice, system, idle, iowait, irq, softirq, steal] = f[..] else {
                return None;
            };
            let busy = user + nice + system + irq + softirq + steal;
            Some((busy, busy + idle + iowait))
        })();
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        Self { jiffies, cpus }
    }

    /// How many of the machine's cores were busy on average from `self` to `end`.
    fn cores_busy_until(&self, end: &Self) -> Option<f64> {
        let ((b0, t0), (b1, t1)) = (self.jiffies?, end.jiffies?);
        let total = t1.checked_sub(t0).filter(|t| *t > 0)?;
        Some(b1.saturating_sub(b0) as f64 / total as f64 * self.cpus as f64)
    }
}

/// A plain consumer, and every input partition from the beginning (to assign). It prefetches
/// as the processor does (`forest_processor::INPUT_PREFETCH`) except for the fetch size: 10 MiB
/// per partition, the processor's own until session 30. A consumer without the processor's
/// merge buffer is never paused, so a large fetch costs it nothing; at 1 MiB the raw consumer
/// read 41-44 bytes per event from the broker instead of 37 (BENCHMARKS.md, session 30). Kept,
/// so that (a) is the consumer as earlier sessions measured it.
fn raw_reader(
    brokers: &str,
    kafka: &[(String, String)],
    ends: &[(String, i32, i64)],
    role: &str,
) -> anyhow::Result<(BaseConsumer, TopicPartitionList)> {
    let consumer = plain_consumer(
        brokers,
        kafka,
        role,
        &[
            ("queued.min.messages", forest_processor::INPUT_PREFETCH.0),
            ("max.partition.fetch.bytes", "10485760"),
        ],
    )?;
    let mut tpl = TopicPartitionList::new();
    for (t, p, _) in ends {
        tpl.add_partition_offset(t, *p, Offset::Beginning)?;
    }
    Ok((consumer, tpl))
}

/// A plain consumer over every input partition from the beginning, counting records: one
/// record per poll (a), or, `batched`, the partitions routed to a [`forest_kafka::FetchQueue`]
/// and read many per call as the processor does (a'). The consumer is returned so that
/// closing it is not timed.
fn raw_consume(
    brokers: &str,
    kafka: &[(String, String)],
    ends: &[(String, i32, i64)],
    want: i64,
    batched: bool,
) -> anyhow::Result<RawRun> {
    let (consumer, tpl) = raw_reader(
        brokers,
        kafka,
        ends,
        if batched { "rawbatch" } else { "raw" },
    )?;
    let mut fetch = if batched {
        let fetch = forest_kafka::FetchQueue::new(consumer.client())
            .context("librdkafka returned no queue")?;
        // Routed before the assignment starts fetching (see forest_kafka::fetch).
        let router = fetch.router();
        for (t, p, _) in ends {
            router.route(&std::ffi::CString::new(t.as_str())?, *p)?;
        }
        Some(fetch)
    } else {
        None
    };
    consumer.assign(&tpl)?;
    let mut n = 0u64;
    let mut bytes = 0usize;
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut first = None;
    while (n as i64) < want {
        if first.is_none() && n > 0 {
            first = Some((Instant::now(), cpu_seconds(), n));
        }
        ensure!(Instant::now() < deadline, "raw consume timed out");
        // Unbatched: one record, waiting up to 100 ms. Batched: only errors and records not
        // routed come through the consumer queue; take them all without waiting.
        let wait = if batched {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        while let Some(m) = consumer.poll(wait) {
            let m = m.map_err(|e| anyhow::anyhow!("raw consume: {e}"))?;
            n += 1;
            bytes += m.payload_len();
            if !batched {
                break;
            }
        }
        if let Some(fetch) = &mut fetch {
            let mut failed = None;
            fetch.poll(Duration::from_millis(100), 10_000, |r| match r.error() {
                Some(e) => failed = Some(e),
                None => {
                    n += 1;
                    bytes += r.payload().map_or(0, <[u8]>::len);
                }
            });
            if let Some((code, text)) = failed {
                anyhow::bail!("raw consume: {code}: {text}");
            }
        }
    }
    let last = (Instant::now(), cpu_seconds());
    std::hint::black_box(bytes);
    drop(fetch);
    Ok(RawRun {
        records: n,
        first: first.unwrap_or((last.0, last.1, n)),
        last,
        _consumers: vec![consumer],
    })
}

/// A raw consumer's run: records read, and (when, process CPU, records read) at the end of
/// the poll round that brought its first records, and at its last.
struct RawRun {
    records: u64,
    first: (Instant, f64, u64),
    last: (Instant, f64),
    /// Closed after the phase's clock stopped: their close is not throughput.
    _consumers: Vec<BaseConsumer>,
}

impl RawRun {
    /// Narrows `phase` to the stretch after the first records arrived, and closes the
    /// consumer (which would otherwise go on fetching beside the next phases).
    fn window(self, phase: &mut Phase) {
        phase.secs = self.last.0.duration_since(self.first.0).as_secs_f64();
        phase.cpu = self.last.1 - self.first.1;
        phase.events = self.records - self.first.2;
    }
}

/// (f) The processor's ceiling on this machine and workload: what is left of it with
/// everything durable taken out. `workers` threads (`forest-fold-N`), each a batched plain
/// consumer (as in (a')) over its share of the input partitions, decode every record and fold
/// it with the processor's rules into projections in memory. No merge across topics, no
/// store, no offsets, no outputs; (f)/(a) says how far decoding and folding alone, at this
/// workload, stay from (a). Partition p of every input topic goes to thread p % workers: a user's
/// records are in one partition number of each topic, so the threads' users are disjoint, as
/// the processor's workers' are.
///
/// Each thread decodes a poll's records (up to 10,000) and folds them as a batch with
/// look-ahead ([`forest_domain::batch::fold_ahead`]: every user of the batch found first, then
/// each projection prefetched a few records ahead), into a slab (projections in one vector,
/// found through a map of user id to index) sized for its share of `users` up front. Until
/// session 15 it folded record by record into a map of projections with no look-ahead, which
/// the processor has, so it was not an upper bound for (b) in principle. The batch fold is
/// meant to wait for memory no more than the processor's fold does (not measured apart: in
/// every run since, (f) ran at more than twice (b)).
///
/// With `floor` this is phase (g) instead (see [`Floor`]): each thread also writes the
/// projections it changed, and the clock stops when the last thread's last write has landed.
fn fold_ceiling(
    ceiling: Ceiling<'_>,
    lanes: Lanes<'_>,
    workers: usize,
    users: u64,
    floor: Option<&Floor>,
) -> anyhow::Result<RawRun> {
    let workers = workers.max(1);
    // A share of the users per thread, bounded so that a huge --users reserves no more than
    // a few GiB of address space (pages are touched only as users arrive).
    let reserve = (users as usize / workers).min(4_000_000);
    let counted = AtomicU64::new(0);
    let first = std::sync::Mutex::new(None);
    let last = std::sync::Mutex::new(None);
    let finished = AtomicU64::new(0);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|i| {
                let (share, share_lows): (Vec<(String, i32, i64)>, Vec<i64>) = lanes
                    .ends
                    .iter()
                    .zip(lanes.lows)
                    .filter(|((_, p, _), _)| *p as usize % workers == i)
                    .map(|(e, low)| (e.clone(), *low))
                    .unzip();
                let (counted, first, last, finished) = (&counted, &first, &last, &finished);
                std::thread::Builder::new()
                    .name(format!("forest-fold-{i}"))
                    .spawn_scoped(s, move || -> anyhow::Result<(BaseConsumer, States)> {
                        let mut states = States::with_capacity(reserve);
                        let lanes = Lanes {
                            ends: &share,
                            lows: &share_lows,
                        };
                        let writer = floor.map(|f| FloorWriter::start(f, i)).transpose();
                        let consumer = writer.and_then(|w| {
                            fold_share(ceiling, lanes, &mut states, w, counted, first)
                        });
                        // The clock stops when the last thread is done; dropping the
                        // states (returned, so that no thread drops them while another
                        // still folds) and closing the consumers are not throughput.
                        if finished.fetch_add(1, Ordering::SeqCst) + 1 == workers as u64 {
                            *last.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some((Instant::now(), cpu_seconds()));
                        }
                        consumer.map(|c| (c, states))
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a fold ceiling thread panicked"))),
                Err(e) => Err(anyhow::Error::from(e).context("starting a fold ceiling thread")),
            })
            .collect::<Vec<_>>()
    });
    let (consumers, states): (Vec<_>, Vec<_>) = results
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    drop(states);
    let records = counted.load(Ordering::SeqCst);
    let last = last
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_else(|| (Instant::now(), cpu_seconds()));
    Ok(RawRun {
        records,
        first: first
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or((last.0, last.1, records)),
        last,
        _consumers: consumers,
    })
}

/// What every [`fold_ceiling`] thread reads and folds with.
#[derive(Clone, Copy)]
struct Ceiling<'a> {
    brokers: &'a str,
    kafka: &'a [(String, String)],
    /// Each input topic's record kind.
    kinds: &'a [(&'a str, forest_domain::InputKind)],
    rules: &'a forest_domain::RuleSet,
}

/// A [`fold_ceiling`] thread's projections.
type States = forest_domain::batch::Slab;

/// Input partitions to read: (topic, partition, end offset), and each one's low watermark
/// (the embedded broker may have trimmed the log's start).
#[derive(Clone, Copy)]
struct Lanes<'a> {
    ends: &'a [(String, i32, i64)],
    lows: &'a [i64],
}

/// One [`fold_ceiling`] thread: reads its lanes from their low watermarks to their end
/// offsets, folding each poll's records into `states` (and, with a `writer`, writing the
/// changed projections once per interval and at the end, before returning). `counted` is
/// every thread's records so far;
/// `first` is set, by the first thread to get records, to (when, process CPU, records
/// counted by then).
fn fold_share(
    ceiling: Ceiling<'_>,
    lanes: Lanes<'_>,
    states: &mut States,
    mut writer: Option<FloorWriter>,
    counted: &AtomicU64,
    first: &std::sync::Mutex<Option<(Instant, f64, u64)>>,
) -> anyhow::Result<BaseConsumer> {
    let Ceiling {
        brokers,
        kafka,
        kinds,
        rules,
    } = ceiling;
    let share = lanes.ends;
    let (consumer, tpl) = raw_reader(brokers, kafka, share, "ceiling")?;
    // Per partition of the share: (topic, partition, kind, next offset to read, end).
    let mut todo = Vec::with_capacity(share.len());
    for ((t, p, end), low) in share.iter().zip(lanes.lows) {
        let kind = kinds
            .iter()
            .find(|(name, _)| name == t)
            .map(|(_, k)| *k)
            .with_context(|| format!("no input kind for topic {t}"))?;
        todo.push((t.as_bytes().to_vec(), *p, kind, *low, *end));
    }
    {
        let mut fetch = forest_kafka::FetchQueue::new(consumer.client())
            .context("librdkafka returned no queue")?;
        let router = fetch.router();
        for (t, p, _) in share {
            router.route(&std::ffi::CString::new(t.as_str())?, *p)?;
        }
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(3600);
        let mut failed = None;
        let mut unknown = None;
        // Each poll's events, decoded, then folded together with look-ahead. The events are
        // decoded into the slots of earlier polls, reusing their strings' buffers, as the
        // processor reuses its one event.
        let mut batch: Vec<forest_domain::Event> = Vec::with_capacity(10_000);
        let mut used = 0;
        while todo.iter().any(|(_, _, _, next, end)| next < end) {
            ensure!(Instant::now() < deadline, "the fold ceiling timed out");
            if let Some(m) = consumer.poll(Duration::ZERO) {
                let m = m.map_err(|e| anyhow::anyhow!("fold ceiling: {e}"))?;
                anyhow::bail!(
                    "fold ceiling: a record of {} [{}] was not routed",
                    m.topic(),
                    m.partition()
                );
            }
            let n = fetch.poll(Duration::from_millis(100), 10_000, |r| {
                if let Some(e) = r.error() {
                    failed = Some(e);
                    return;
                }
                let Some(lane) = todo
                    .iter_mut()
                    .find(|(t, p, ..)| *p == r.partition() && t.as_slice() == r.topic())
                else {
                    unknown = Some((r.partition(), r.offset()));
                    return;
                };
                lane.3 = r.offset() + 1;
                if used == batch.len() {
                    batch.push(forest_domain::Event::placeholder());
                }
                if let Some(event) = batch.get_mut(used) {
                    let (value, ts) = (r.payload().unwrap_or_default(), r.timestamp());
                    if event.decode_into(lane.2, value, ts.unwrap_or(0)).is_ok() {
                        used += 1;
                    } // else the processor dead-letters it
                }
            });
            let folded = batch.get(..used).unwrap_or_default();
            let applied = match writer.as_mut() {
                Some(w) => forest_domain::batch::fold_ahead_with(rules, states, folded, |j, s| {
                    w.touch(j, s);
                }),
                None => forest_domain::batch::fold_ahead(rules, states, folded),
            };
            std::hint::black_box(applied);
            used = 0;
            if let Some((code, text)) = failed {
                anyhow::bail!("fold ceiling: {code}: {text}");
            }
            if let Some((p, o)) = unknown {
                anyhow::bail!(
                    "fold ceiling: a record from partition {p} (offset {o}) outside this thread's share"
                );
            }
            if let Some(w) = writer.as_mut() {
                if Instant::now() >= w.due {
                    w.write(states, next_offsets(share, &todo))?;
                }
            }
            if n > 0 {
                let so_far = counted.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                let mut f = first.lock().unwrap_or_else(|e| e.into_inner());
                if f.is_none() {
                    *f = Some((Instant::now(), cpu_seconds(), so_far));
                }
            }
        }
        // The durable floor's last write, and every write landed, before the clock stops.
        if let Some(mut w) = writer.take() {
            w.write(states, next_offsets(share, &todo))?;
            w.finish()?;
        }
    }
    Ok(consumer)
}

/// A [`fold_share`] thread's partitions with their next offsets to read, for the durable
/// floor's writes: `todo` holds, per partition of `share` and in its order, (topic, partition,
/// kind, next offset, end).
fn next_offsets<'a>(
    share: &'a [(String, i32, i64)],
    todo: &'a [(Vec<u8>, i32, forest_domain::InputKind, i64, i64)],
) -> impl Iterator<Item = (&'a str, i32, i64)> + 'a {
    share
        .iter()
        .zip(todo)
        .map(|((t, p, _), lane)| (t.as_str(), *p, lane.3))
}

/// Phase (g), the durable floor: (f) plus what any design that writes projections once per
/// interval must write, and nothing else: each projection changed in the interval, and the
/// next offsets of the thread's partitions (all of them, advanced or not), in one RocksDB
/// write batch per fold thread and interval. A writer thread per fold thread
/// (`forest-floor-N`) writes it while the fold goes on, as the processor's committers do
/// (whatever `--overlap-commits` says); the processor's store, options and encoding. The
/// write is prepared as the processor's `ProjectionCache::prepare_flush` prepares it: sorted
/// by the user ids copied when each user was first changed (inline, so the sort reads no
/// projection), and serialised loading each projection `WRITE_AHEAD` users ahead and its
/// heap parts half as far.
///
/// Left out, so counted in (b)/(g) as the rest of the processor: the offsets, replay
/// records and outputs the processor writes with every batch (every 20,000 records or 5 ms)
/// between its projection writes; its dirty queue and the lookups that check it; the cache's
/// bounds (every projection stays in memory, so none is reloaded); the merge across topics;
/// outputs to Kafka; the consumer group.
struct Floor {
    store: Arc<forest_store::Store>,
    interval: Duration,
}

/// One fold thread's side of [`Floor`].
struct FloorWriter {
    store: Arc<forest_store::Store>,
    interval: Duration,
    /// When the next write is due.
    due: Instant,
    /// The projections changed since the last write (user id, slot), and a flag per slot.
    touched: Vec<(compact_str::CompactString, u32)>,
    is_touched: Vec<bool>,
    /// To the writer thread: one batch may wait while another is written.
    tx: Option<std::sync::mpsc::SyncSender<forest_store::PreparedBatch>>,
    thread: Option<std::thread::JoinHandle<Result<(), forest_store::StoreError>>>,
}

impl FloorWriter {
    fn start(floor: &Floor, index: usize) -> anyhow::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<forest_store::PreparedBatch>(1);
        let store = floor.store.clone();
        let thread = std::thread::Builder::new()
            .name(format!("forest-floor-{index}"))
            .spawn(move || {
                for batch in rx {
                    store.write_prepared(batch)?;
                }
                Ok(())
            })
            .context("starting a durable floor writer thread")?;
        Ok(Self {
            store: floor.store.clone(),
            interval: floor.interval,
            due: Instant::now() + floor.interval,
            touched: Vec::new(),
            is_touched: Vec::new(),
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Notes that the projection in slot `j` changed (`s`, just folded, so in the CPU's
    /// caches: its id is copied now, not when the write is prepared).
    fn touch(&mut self, j: u32, s: &forest_domain::UserState) {
        let j = j as usize;
        if self.is_touched.len() <= j {
            self.is_touched.resize(j + 1, false);
        }
        if let Some(t) = self.is_touched.get_mut(j) {
            if !*t {
                *t = true;
                self.touched.push((s.user_id.clone(), j as u32));
            }
        }
    }

    /// Serialises the changed projections and `offsets` into one batch and hands it to the
    /// writer thread (waiting while it still writes the one before last). As
    /// `ProjectionCache::prepare_flush` does: in key order, loading ahead.
    fn write<'o>(
        &mut self,
        states: &States,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
    ) -> anyhow::Result<()> {
        const AHEAD: usize = forest_store::WRITE_AHEAD;
        let all = &states.states;
        self.touched.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let slot = |i: usize| self.touched.get(i).and_then(|&(_, j)| all.get(j as usize));
        let changed = (0..self.touched.len()).filter_map(|i| {
            if let Some(s) = slot(i + AHEAD) {
                s.prefetch_own_lines();
            }
            if let Some(s) = slot(i + AHEAD / 2) {
                s.prefetch_stored_parts();
            }
            slot(i).map(|s| (s, forest_store::NO_POSITION))
        });
        let batch = self.store.prepare(changed, offsets, &[])?;
        for (_, j) in self.touched.drain(..) {
            if let Some(t) = self.is_touched.get_mut(j as usize) {
                *t = false;
            }
        }
        self.due = Instant::now() + self.interval;
        if let Some(tx) = &self.tx {
            if tx.send(batch).is_err() {
                // The writer thread stopped, which it does only on an error.
                self.finish()?;
                anyhow::bail!("the durable floor's writer thread stopped");
            }
        }
        Ok(())
    }

    /// Waits for every batch handed over to be written.
    fn finish(&mut self) -> anyhow::Result<()> {
        self.tx = None;
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(anyhow::Error::from(e).context("the durable floor's write")),
            Some(Err(_)) => anyhow::bail!("a durable floor writer thread panicked"),
        }
    }
}

impl Drop for FloorWriter {
    /// On an early exit, the writer thread is not left running with the store.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

#[allow(clippy::too_many_arguments)]
/// The processor's settings from the bench's flags. The at-least-once baseline keeps
/// neither the changelog nor the replay records, which both need the outbox, and writes its
/// projections at the same interval.
fn processor_config(
    args: &BenchArgs,
    brokers: &str,
    topics: &Topics,
    store: &Path,
    at_least_once: bool,
) -> ProcessorConfig {
    let mut cfg = ProcessorConfig::new(brokers, store);
    cfg.overlap_commits = args.overlap_commits;
    cfg.batch_max_wait = Duration::from_millis(args.batch_max_wait_ms);
    cfg.batch_max_records = args.batch_size;
    cfg.workers = args.workers;
    cfg.topics = topics.clone();
    cfg.kafka = args.kafka_config.clone();
    // librdkafka's statistics count the records fetched (`ProcessorStats::fetched`); every
    // second rather than the processor's 5 s, so that little of a phase is missing at its end.
    if !cfg.kafka.iter().any(|(k, _)| k == "statistics.interval.ms") {
        cfg.kafka
            .push(("statistics.interval.ms".into(), "1000".into()));
    }
    // The baseline too: the two differ in where offsets and outputs go, not in RocksDB's log.
    cfg.store.wal = args.store_wal;
    cfg.store.background_write_bytes_per_sec = args.store_background_write_mib.map(|m| m << 20);
    cfg.store.l0_compaction_files = args.store_l0_compaction_files;
    cfg.store.low_priority_compactions = args.store_low_priority_compactions;
    cfg.at_least_once_baseline = at_least_once;
    // The baseline spaces its projection writes too (flushing everything, then committing
    // Kafka offsets, once per interval), or it would be no baseline at that interval.
    cfg.projection_interval = args.projection_interval();
    cfg.pace_projection_writes = args.projection_pace;
    if !at_least_once {
        cfg.exactly_once = args.exactly_once;
        cfg.changelog = args.changelog;
    }
    cfg
}

/// The parts of a processor phase that measure its throughput.
struct Started {
    /// From the start to the first record consumed (mostly the group join).
    first_record: Duration,
    /// From the first record consumed until every input offset is committed and every
    /// worker's shutdown write (the projections a projection interval left unwritten) is
    /// durable. Leaving the group and closing, after that, are not throughput (they were
    /// counted until session 10, ~0.2-0.3 s of a 1 M-event phase).
    steady: Window,
    /// From when the group last settled until the same end; `None` if it
    /// never did (the log was done before a late worker joined). Settled: every worker
    /// joined and holding partitions, with no rebalance after. With several workers one may
    /// join after the others began, and its join then revokes every partition mid-stream
    /// (eager rebalancing): dirty projections are written, caches dropped, prefetched
    /// records fetched again. On the test broker (no initial rebalance delay) whether that
    /// happens is a race between the workers' join requests, which made phase (b) vary by
    /// 1.5 times between runs. Records in flight when the window opens count in it.
    settled: Option<Window>,
}

/// A stretch of a processor phase: its length, the process's CPU and the records committed
/// in it, and the rebalance callbacks before it.
struct Window {
    secs: f64,
    cpu: f64,
    events: u64,
    rebalances: u64,
}

/// Where a [`Window`] opened: (when, process CPU, committed records, rebalance callbacks).
type Mark = (Instant, f64, u64, u64);

/// Where a processor phase's windows open (see [`Started`]); [`Marks::close`] ends them.
struct Marks {
    first_record: Duration,
    from: Mark,
    settle: Option<Mark>,
}

impl Marks {
    fn close(self, stats: &ProcessorStats) -> Started {
        Started {
            first_record: self.first_record,
            steady: Window::since(self.from, stats),
            settled: self.settle.map(|m| Window::since(m, stats)),
        }
    }
}

impl Window {
    fn since((at, cpu, done, rebalances): Mark, stats: &ProcessorStats) -> Self {
        Self {
            secs: at.elapsed().as_secs_f64().max(1e-3),
            cpu: cpu_seconds() - cpu,
            events: ProcessorStats::get(&stats.committed_records) - done,
            rebalances,
        }
    }

    fn phase(&self, name: String, whole: &Phase) -> Phase {
        Phase {
            name,
            groups: BTreeMap::new(),
            secs: self.secs,
            events: self.events,
            cpu: self.cpu,
            rss: whole.rss,
            writes: whole.writes,
        }
    }
}

/// Runs the processor in its own consumer group, `forest-bench-<pid>-<role>`, until every
/// record up to `ends` is committed.
fn run_processor(
    mut cfg: ProcessorConfig,
    role: &str,
    stats: &Arc<ProcessorStats>,
    ends: &[(String, i32, i64)],
    timeout: Duration,
) -> anyhow::Result<Started> {
    let workers = cfg.workers as u64;
    cfg.group_id = format!("forest-bench-{}-{role}", std::process::id());
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let (s, d) = (stats.clone(), stop.clone());
        std::thread::spawn(move || forest_processor::run(cfg, d, s))
    };
    let marks = wait_committed(stats, ends, workers, timeout, &handle)?;
    stop.store(true, Ordering::Relaxed);
    // With a projection interval the batches leave projections unwritten, and the shutdown
    // writes them: work of those batches, so the window ends once every worker's shutdown
    // write is durable (leaving the group and closing, after it, are not counted). Session 11
    // found runs shorter than the interval measured without any of that write.
    while ProcessorStats::get(&stats.shutdown_written) < workers && !handle.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = marks.close(stats);
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("processor panicked"))??;
    Ok(started)
}

fn wait_committed<T>(
    stats: &ProcessorStats,
    ends: &[(String, i32, i64)],
    workers: u64,
    timeout: Duration,
    handle: &std::thread::JoinHandle<T>,
) -> anyhow::Result<Marks> {
    let started = Instant::now();
    let deadline = started + timeout;
    let partitions = ends.iter().map(|(_, p, _)| *p + 1).max().unwrap_or(0) as u64;
    let holders = workers.min(partitions);
    let mark = |rebalances| {
        (
            Instant::now(),
            cpu_seconds(),
            ProcessorStats::get(&stats.committed_records),
            rebalances,
        )
    };
    let mut first: Option<(Duration, Mark)> = None;
    let mut settle: Option<Mark> = None;
    loop {
        let rebalances = ProcessorStats::get(&stats.rebalances);
        if first.is_none() && ProcessorStats::get(&stats.consumed) > 0 {
            first = Some((started.elapsed(), mark(rebalances)));
        }
        if settle.is_none_or(|(.., r)| r != rebalances)
            && ProcessorStats::get(&stats.workers_joined) >= workers
            && ProcessorStats::get(&stats.workers_assigned) >= holders
        {
            settle = Some(mark(rebalances));
        }
        let got = stats.committed_offsets();
        if ends
            .iter()
            .all(|(t, p, end)| *end == 0 || got.get(&(t.clone(), *p)).is_some_and(|o| o >= end))
        {
            let (first_record, from) = first.unwrap_or_else(|| (started.elapsed(), mark(0)));
            return Ok(Marks {
                first_record,
                from,
                settle,
            });
        }
        ensure!(!handle.is_finished(), "the processor stopped early");
        ensure!(
            Instant::now() < deadline,
            "the processor did not catch up in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn latency_rates_are_fractions_of_the_maximum_or_the_rates_asked_for() {
        let args = |a: &[&str]| Cli::try_parse_from([&["bench"], a].concat()).unwrap().bench;
        let by_default = latency_rates(&args(&[]), 400_000.0);
        assert_eq!(by_default, vec![(0.25, 100_000), (0.5, 200_000)]);
        let fixed = latency_rates(&args(&["--latency-rates", "215000,100000"]), 430_000.0);
        assert_eq!(
            fixed,
            vec![(0.5, 215_000), (100_000.0 / 430_000.0, 100_000)]
        );
    }

    fn stat(user: u64, idle: u64) -> String {
        format!(
            "cpu  {user} 0 10 {idle} 5 1 2 3 0 0\ncpu0 1 0 0 1 0 0 0 0 0 0\ncpu1 1 0 0 1 0 0 0 0 0 0\nintr 1 2\nctxt 9\n"
        )
    }

    #[test]
    fn the_latency_timeline_splits_the_records_by_second_and_at_the_loads_end() {
        let stats = Arc::new(ProcessorStats::default());
        let signals = Arc::new(TimelineSignals::default());
        let sampler = {
            let (s, sig) = (stats.clone(), signals.clone());
            std::thread::spawn(move || latency_timeline(&s, &sig))
        };
        // Before the warm-up's end (and the histograms' reset): not in any window.
        stats.latency_durable.record_ms(900);
        std::thread::sleep(Duration::from_millis(100));
        stats.latency_durable.reset();
        signals.measuring.store(true, Ordering::Release);
        for ms in [5, 6, 7] {
            stats.latency_durable.record_ms(ms);
        }
        // (Projections are counted from when the sampler notices: it checks every 5 ms.)
        std::thread::sleep(Duration::from_millis(200));
        stats.projections_written.fetch_add(4, Ordering::Relaxed);
        // The first second has ended (at about 1 s); the load ends in the second one.
        std::thread::sleep(Duration::from_millis(1_300));
        stats.latency_durable.record_ms(200);
        signals.load_over.store(true, Ordering::Release);
        std::thread::sleep(Duration::from_millis(200));
        // The drain: after the load.
        stats.latency_durable.record_ms(300);
        stats.projections_written.fetch_add(2, Ordering::Relaxed);
        signals.stop();
        let windows = sampler.join().expect("sampler");
        let shape: Vec<_> = windows
            .iter()
            .map(|w| {
                (
                    w.latency.count(),
                    w.latency.at_least_ms(50),
                    w.projections,
                    w.under_load,
                )
            })
            .collect();
        assert_eq!(
            shape,
            [(3, 0, 4, true), (1, 1, 0, true), (1, 1, 2, false)],
            "a whole second, the second cut at the load's end, the drain"
        );
    }

    #[test]
    fn machine_cpu_counts_busy_cores_between_two_readings() {
        let a = MachineCpu::parse(&stat(100, 1_000));
        assert_eq!(a.cpus, 2);
        // busy = user + nice + system + irq + softirq + steal; iowait counts as idle.
        assert_eq!(a.jiffies, Some((100 + 10 + 1 + 2 + 3, 116 + 1_000 + 5)));
        // 150 more busy jiffies and 50 more idle ones: 3/4 of the 2 CPUs were busy.
        let b = MachineCpu::parse(&stat(250, 1_050));
        let busy = a.cores_busy_until(&b).expect("two readings");
        assert!((busy - 1.5).abs() < 1e-9, "{busy}");
        // No time passed: no figure rather than a division by zero.
        assert_eq!(a.cores_busy_until(&a), None);
    }

    #[test]
    fn machine_cpu_without_proc_stat_gives_no_figure() {
        let none = MachineCpu::parse("");
        assert_eq!((none.jiffies, none.cpus), (None, 0));
        assert_eq!(none.cores_busy_until(&MachineCpu::parse(&stat(1, 1))), None);
        assert_eq!(MachineCpu::parse("cpu  1 2 x 4 5 6 7 8\n").jiffies, None);
    }

    #[test]
    fn thread_groups_follow_thread_names() {
        assert_eq!(thread_group(true, "forest-worker-0"), "harness main thread");
        assert_eq!(thread_group(false, "forest-worker-1"), "processor workers");
        assert_eq!(thread_group(false, "forest-commit"), "processor committers");
        assert_eq!(thread_group(false, "forest-fold-1"), "fold ceiling threads");
        assert_eq!(
            thread_group(false, "forest-floor-0"),
            "durable floor writers"
        );
        assert_eq!(thread_group(false, "forest-load"), "load generator");
        assert_eq!(thread_group(false, "rocksdb:low"), "RocksDB background");
        assert_eq!(thread_group(false, "rdk:mock"), "embedded broker");
        assert_eq!(thread_group(false, "rdk:broker1"), "librdkafka clients");
        assert_eq!(
            thread_group(false, "tokio-runtime-w"),
            "other forest threads"
        );
    }
}
