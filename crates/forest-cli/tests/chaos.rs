//! The crash campaign: the load generator, the processor and the fulfilment run as separate
//! `forest` processes; the processor and the fulfilment are killed with SIGKILL (and now and
//! then stopped with SIGTERM) at seeded random moments and restarted. Afterwards every
//! projection must equal the pure fold of the log, every matured tree must have exactly one
//! planting order, and the DLQ must hold exactly the bad records.
//!
//! Broker: `FOREST_TEST_BROKERS` (the real Apache Kafka from `scripts/test`), else the
//! embedded broker run as its own process (`forest broker`).
//!
//! Size: CI runs the defaults (12 kills, 30,000 records). A full run:
//! `FOREST_CHAOS_KILLS=100 FOREST_CHAOS_EVENTS=300000 cargo test -p forest-cli --test chaos -- --nocapture`
//! (`FOREST_CHAOS_SEED` picks the kill schedule and the workload).

use forest_tests::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Short consumer-group sessions: a killed member leaves the group after 6 s instead of 45 s.
const FAST_GROUP: [&str; 4] = [
    "--kafka-config",
    "session.timeout.ms=6000",
    "--kafka-config",
    "heartbeat.interval.ms=500",
];

/// `forest loadgen`'s workload flags shared by the campaigns: 20 days of events with 1 %
/// malformed records.
fn loadgen_workload(events: u64, users: u64, seed: u64) -> Vec<String> {
    [
        "--events".to_string(),
        events.to_string(),
        "--users".into(),
        users.to_string(),
        "--seed".into(),
        seed.to_string(),
        "--days".into(),
        "20".into(),
        "--malformed-rate".into(),
        "0.01".into(),
    ]
    .to_vec()
}

fn forest() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_forest"));
    c.env_remove("FOREST_BROKERS")
        .env_remove("FOREST_TOPIC_PREFIX")
        .env("FOREST_LOG", "info");
    c
}

/// One service run as a child process, restarted after every kill; each incarnation logs to
/// its own file.
struct Service {
    name: &'static str,
    args: Vec<String>,
    logs: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Environment of the next start (settings that change between incarnations).
    env: Vec<(&'static str, String)>,
}

impl Service {
    fn new(name: &'static str, args: Vec<String>, logs: &Path) -> Self {
        Self {
            name,
            args,
            logs: logs.to_path_buf(),
            child: None,
            starts: 0,
            env: Vec::new(),
        }
    }

    fn start(&mut self) {
        self.starts += 1;
        let log =
            std::fs::File::create(self.logs.join(format!("{}-{}.log", self.name, self.starts)))
                .expect("log file");
        let child = forest()
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", self.name));
        self.child = Some(child);
    }

    /// Starts the service and waits for it to exit successfully (the load generator).
    fn run_to_completion(&mut self) {
        self.start();
        let st = self.child.take().expect("started").wait().expect("it runs");
        assert!(st.success(), "{} failed:\n{}", self.name, self.tail());
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Fails the test if the service exited on its own (it must only stop when told).
    fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!(
                    "{} exited by itself with {st}; log:\n{}",
                    self.name,
                    self.tail()
                );
            }
        }
    }

    fn kill(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().expect("SIGKILL");
        c.wait().expect("reaped");
    }

    /// SIGTERM, then waits for a clean exit within `bound`.
    fn terminate(&mut self, bound: Duration) -> Duration {
        let start = Instant::now();
        let st = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(st.success());
        let mut c = self.child.take().expect("running");
        let status: ExitStatus = loop {
            if let Some(s) = c.try_wait().expect("wait") {
                break s;
            }
            if start.elapsed() > bound {
                let _ = c.kill();
                panic!(
                    "{} did not exit within {bound:?} of SIGTERM; log:\n{}",
                    self.name,
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM; log:\n{}",
            self.name,
            self.tail()
        );
        start.elapsed()
    }

    fn tail(&self) -> String {
        let path = self.logs.join(format!("{}-{}.log", self.name, self.starts));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Reads a store's offsets without disturbing the process that owns it.
/// Also requires no replay records: with spaced projection writes, offsets at the ends do not
/// mean every projection is written (a processor killed before writing them leaves replay
/// records, which only its next assignment folds).
fn stored_offsets_reach(store: &Path, ends: &[(String, i32, i64)]) -> bool {
    let Ok(s) = forest_store::Store::open_read_only(store) else {
        return false;
    };
    s.replay_partitions().is_ok_and(|r| r.is_empty())
        && ends.iter().all(|(t, p, end)| {
            *end == 0 || s.offset(t, *p).ok().flatten().is_some_and(|o| o >= *end)
        })
}

/// Waits until `store` has stored offsets at `ends`; fails with the service's log if it exits
/// or the deadline passes.
fn wait_store_reaches(
    service: &mut Service,
    store: &Path,
    ends: &[(String, i32, i64)],
    deadline: Instant,
) {
    while !stored_offsets_reach(store, ends) {
        service.assert_running();
        assert!(
            Instant::now() < deadline,
            "{} did not catch up; log:\n{}",
            service.name,
            service.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sum of a store's next offsets over every partition of `topics` (0 if it cannot be read
/// yet): a progress counter.
fn stored_sum(store: &Path, topics: &[String]) -> i64 {
    let Ok(s) = forest_store::Store::open_read_only(store) else {
        return 0;
    };
    let mut sum = 0;
    for t in topics {
        for p in 0..PARTITIONS {
            sum += s.offset(t, p).ok().flatten().unwrap_or(0);
        }
    }
    sum
}

fn ends(b: &TestBroker, topics: &[&str]) -> Vec<(String, i32, i64)> {
    let mut all = Vec::new();
    for t in topics {
        for ((topic, p), end) in topic_ends(b, t) {
            all.push((topic, p, end));
        }
    }
    all
}

/// The real broker from `FOREST_TEST_BROKERS`, else `forest broker` as a child process
/// (returned, to be killed at the end).
fn broker(prefix: &str) -> (Option<Child>, String) {
    if let Ok(b) = std::env::var("FOREST_TEST_BROKERS") {
        if !b.is_empty() {
            return (None, b);
        }
    }
    let mut child = forest()
        .args(["broker", "--topic-prefix", prefix])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("forest broker starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("bootstrap line");
    (Some(child), line.trim().to_string())
}

fn stop_broker(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Kafka's committed offsets of a consumer group (what lag tools see), in the order of
/// `ends`; 0 where the group committed nothing.
fn kafka_committed(bootstrap: &str, group: &str, ends: &[(String, i32, i64)]) -> Vec<i64> {
    let mut topics: Vec<&str> = ends.iter().map(|(t, _, _)| t.as_str()).collect();
    topics.dedup();
    let got = forest_kafka::group_committed(bootstrap, group, &topics, Duration::from_secs(30))
        .expect("committed offsets");
    ends.iter()
        .map(|(t, p, _)| {
            got.iter()
                .find(|(gt, gp, _)| gt == t && gp == p)
                .map_or(0, |(_, _, o)| *o)
        })
        .collect()
}

/// A full disk, for real: the processor runs with a file-size limit (`ulimit -f`, with
/// SIGXFSZ ignored so the write fails with EFBIG instead of killing the process). With the
/// WAL, RocksDB's write fails; the processor must stop with an error, its stored offsets must
/// describe exactly the state it stored (the pure fold of the records before them), Kafka's
/// committed offsets must not be ahead of them, and a restart with room must finish with
/// nothing lost.
#[test]
fn a_failed_store_write_stops_the_processor_without_moving_offsets_past_it() {
    disk_full(true);
}

/// The same without the WAL (the processor's default): the writes go to memtables, and what
/// fails is a flush or compaction writing an SST file. The processor must learn of it (it
/// checks whenever a flush is due, here every second) and stop, even once it has caught up
/// and no write comes; the store must reopen at its last good flush, whole (projections the
/// pure fold of the records below its offsets), and a restart must finish exactly. Kafka's
/// committed offsets may be ahead of that flush: they follow the writes, and the processor
/// never reads them back.
#[test]
fn without_the_wal_a_failed_flush_stops_the_processor_and_a_restart_goes_on_from_the_last_flush() {
    disk_full(false);
}

fn disk_full(wal: bool) {
    let prefix = unique_prefix(if wal { "diskfull" } else { "diskfull-nowal" });
    let (broker_child, bootstrap) = broker(&prefix);
    let b = TestBroker::external(&prefix, &bootstrap, broker_child.is_none());
    let records = produce(&b, workload(31, 40_000, 20_000));
    let rules = cheap_tree_rules();
    let dir = tempfile::tempdir().expect("tempdir");
    let rules_file = dir.path().join("rules.toml");
    std::fs::write(&rules_file, cheap_tree_rules_toml()).expect("rules");
    let store = dir.path().join("processor");
    let group = format!("{}processor", b.prefix());
    let mut args: Vec<String> = [
        "--rules",
        rules_file.to_str().unwrap(),
        "processor",
        "--brokers",
        &bootstrap,
        "--topic-prefix",
        b.prefix(),
        "--store",
        store.to_str().unwrap(),
        "--group",
        &group,
        "--batch-size",
        "1000",
        // Every batch writes its users with its offsets, so that the stored projections are
        // the pure fold of the records below the stored offsets, as checked below. (With the
        // default 5 s interval they are that only after the replay a restart does.)
        "--projection-interval-ms",
        "0",
        "--metrics-addr",
        "off",
    ]
    .map(String::from)
    .to_vec();
    if wal {
        args.push("--store-wal".into());
    } else {
        // Memtables of 256 KiB, whose flushes fit under the limit, so the store holds some
        // of the input before a larger compaction output fails.
        args.extend(
            ["--store-max-unflushed-secs", "1", "--write-buffer-mb", "1"].map(String::from),
        );
    }

    // 1024 blocks of 512 bytes (dash) or 1 KiB (bash): the WAL, or without it the SST files of
    // the flushes and compactions, outgrow it within the run.
    let limited = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 1024; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_forest"))
        .args(&args)
        .env("FOREST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("limited processor runs");
    let err = String::from_utf8_lossy(&limited.stderr);
    assert!(!limited.status.success(), "the processor must stop: {err}");
    let write_failed = err.contains("store")
        && (err.contains("too large")
            || err.contains("File too large")
            || err.contains("IO error"));
    let flush_failed = err.contains("background work") && err.contains("failed");
    assert!(
        write_failed || (!wal && flush_failed),
        "the error names the failed store write (or, without the WAL, the failed flush): {err}"
    );

    // What it stored is consistent: projections == pure fold of the records below the stored
    // offsets, and Kafka's committed offsets are not ahead of the store's.
    let input_ends = ends(
        &b,
        &[&b.topics.payments, &b.topics.mobility, &b.topics.commands],
    );
    let stored: Vec<i64> = {
        let s = forest_store::Store::open(&store, &Default::default()).expect("store reopens");
        let stored: Vec<i64> = input_ends
            .iter()
            .map(|(t, p, _)| s.offset(t, *p).expect("offset").unwrap_or(0))
            .collect();
        let prefix: Vec<Produced> = records
            .iter()
            .filter(|r| {
                let i = input_ends
                    .iter()
                    .position(|(t, p, _)| t == b.input_topic(r.kind) && *p == r.partition)
                    .expect("known partition");
                r.offset < stored[i]
            })
            .cloned()
            .collect();
        // Without the WAL the failure may be a compaction's after the last flush took every
        // record: then the store holds them all. But some flush must have succeeded, or the
        // check below would compare an empty store with an empty fold.
        assert!(
            wal || !prefix.is_empty(),
            "no flush succeeded before the failure"
        );
        assert!(
            prefix.len() < records.len() || !wal,
            "the write limit hit before the end ({} of {} records stored)",
            prefix.len(),
            records.len()
        );
        let users = check_projections(&s, &expected(&rules, &prefix));
        eprintln!(
            "disk full: stopped after {} of {} records with {users} users stored, consistent with its offsets",
            prefix.len(),
            records.len()
        );
        stored
    };
    // Without the WAL Kafka's committed offsets follow the writes, not the flushes (see
    // above): compared only with it.
    if wal {
        let committed = kafka_committed(&bootstrap, &group, &input_ends);
        for (i, (t, p, _)) in input_ends.iter().enumerate() {
            assert!(
                committed[i] <= stored[i],
                "{t}/{p}: Kafka committed {} past the store's {}",
                committed[i],
                stored[i]
            );
        }
    }

    // With room again, a restart finishes the log exactly.
    let mut svc = Service::new("processor", args, dir.path());
    svc.start();
    let start = Instant::now();
    while !stored_offsets_reach(&store, &input_ends) {
        svc.assert_running();
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "restart did not catch up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    svc.terminate(Duration::from_secs(30));
    eprintln!(
        "disk full, after restart: {}",
        check(&b, &store, &expected(&rules, &records))
    );
    stop_broker(broker_child);
}

#[test]
fn sigkill_campaign_loses_nothing_and_doubles_nothing() {
    let kills_wanted = env_or("FOREST_CHAOS_KILLS", 12);
    let events = env_or("FOREST_CHAOS_EVENTS", 30_000);
    let seed = env_or("FOREST_CHAOS_SEED", 1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);

    let prefix = unique_prefix("chaos");
    let (mut broker_child, bootstrap) = broker(&prefix);
    let b = TestBroker::external(&prefix, &bootstrap, broker_child.is_none());
    let real = broker_child.is_none();
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, cheap_tree_rules_toml()).expect("rules");
    let partners = partners_file(dir.path(), "partners.toml", 1_000_000);
    let (proc_store, ful_store) = (dir.path().join("processor"), dir.path().join("fulfilment"));
    let common = |sub: &str| -> Vec<String> {
        let mut a: Vec<String> = vec!["--rules".into(), rules.display().to_string(), sub.into()];
        a.extend(["--brokers", &bootstrap, "--topic-prefix", b.prefix()].map(String::from));
        a
    };
    let mut processor_args = common("processor");
    processor_args.extend(
        [
            "--store",
            proc_store.to_str().unwrap(),
            "--group",
            &format!("{}processor", b.prefix()),
            "--batch-size",
            "50",
            "--metrics-addr",
            "off",
            // The kills below are timed by the stored offsets, which a reader sees at the
            // writer's flushes: flush often, so kills land between flushes too.
            "--store-max-unflushed-secs",
            "1",
        ]
        .map(String::from),
    );
    processor_args.extend(FAST_GROUP.map(String::from));

    let mut fulfilment_args = common("fulfilment");
    fulfilment_args.extend(
        [
            "--store",
            ful_store.to_str().unwrap(),
            "--group",
            &format!("{}fulfilment", b.prefix()),
            "--partners",
            partners.to_str().unwrap(),
            "--batch-size",
            "20",
            "--metrics-addr",
            "off",
        ]
        .map(String::from),
    );
    fulfilment_args.extend(FAST_GROUP.map(String::from));
    let mut loadgen_args = common("loadgen");
    loadgen_args.extend(loadgen_workload(events, 2_000, seed));

    let mut services = [
        Service::new("processor", processor_args, dir.path()),
        Service::new("fulfilment", fulfilment_args, dir.path()),
    ];
    // The load generator runs first, as its own process, and writes the whole log: the merge
    // order of the three input topics is a pure function of the log only when the records are
    // there when read (see forest_processor::merge; live, a record that arrives late relative
    // to its partition's other topics is applied when it arrives), and the pure fold this test
    // compares with is that function. Small batches keep the services busy long enough to be
    // killed mid-work many times.
    let mut loadgen = Service::new("loadgen", loadgen_args, dir.path());
    loadgen.run_to_completion();
    // Each processor incarnation stores projections with every batch, or (spaced) every
    // 300 ms or 3 s, so kills leave replay records, kills land during replays, and a run may
    // follow replay records another setting left.
    let mut intervals = Vec::new();
    let mut pick_interval = |s: &mut Service, rng: &mut rand_chacha::ChaCha8Rng| {
        let ms = ["0", "300", "3000"][rng.random_range(0..3)];
        intervals.push(ms);
        s.env = vec![("FOREST_PROJECTION_INTERVAL_MS", ms.to_string())];
    };
    pick_interval(&mut services[0], &mut rng);
    for s in &mut services {
        s.start();
    }

    // The campaign. Each service gets a random deadline after it first makes progress
    // (stored offsets move) following a (re)start, so kills land mid-work rather than during
    // the consumer-group join; when it comes, the service is killed with SIGKILL (or, one time
    // in five, stopped with SIGTERM, which must commit and exit in time) and restarted. Once
    // a service has made no progress for 15 s (nothing left to do; a restarted processor may wait
    // several seconds for the group to drop its killed predecessor), its deadline applies from
    // then.
    let stores = [proc_store.clone(), ful_store.clone()];
    let topics_of = [
        vec![
            b.topics.payments.clone(),
            b.topics.mobility.clone(),
            b.topics.commands.clone(),
        ],
        vec![b.topics.trees.clone()],
    ];
    let progress = |i: usize| stored_sum(&stores[i], &topics_of[i]);
    let started = Instant::now();
    let (mut kills, mut terms, mut mid_work) = ([0u32; 2], [0u32; 2], 0u32);
    let mut term_times = Vec::new();
    // (progress at the last start, when progress was first seen, when last changed, delay)
    let mut watch: Vec<(i64, Option<Instant>, Instant, Duration)> = (0..2)
        .map(|i| (progress(i), None, Instant::now(), Duration::ZERO))
        .collect();
    while u64::from(kills[0] + kills[1]) < kills_wanted {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "campaign took over 15 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
        if u64::from(kills[0] + kills[1]) >= kills_wanted {
            continue;
        }
        for victim in 0..2 {
            services[victim].assert_running();
            let now_progress = progress(victim);
            let w = &mut watch[victim];
            if w.1.is_none() {
                let idle = w.2.elapsed() > Duration::from_secs(15);
                if now_progress != w.0 || idle {
                    w.1 = Some(Instant::now());
                    // Mostly soon (during the catch-up after a restart), sometimes later.
                    w.3 = Duration::from_millis(if rng.random_bool(0.6) {
                        rng.random_range(0..250)
                    } else {
                        rng.random_range(250..2_000)
                    });
                } else {
                    continue;
                }
            }
            if now_progress != w.0 {
                w.2 = Instant::now();
            }
            if w.1.is_some_and(|t| t.elapsed() >= w.3) {
                let s = &mut services[victim];
                if w.2.elapsed() < Duration::from_millis(500) {
                    mid_work += 1;
                }
                eprintln!(
                    "kill {victim} at {:.1}s: progress {now_progress}, last moved {:?} ago",
                    started.elapsed().as_secs_f64(),
                    w.2.elapsed()
                );
                if rng.random_range(0..5) == 0 {
                    term_times.push(s.terminate(Duration::from_secs(30)));
                    terms[victim] += 1;
                } else {
                    s.kill();
                    kills[victim] += 1;
                }
                if victim == 0 {
                    pick_interval(s, &mut rng);
                }
                s.start();
                *w = (progress(victim), None, Instant::now(), Duration::ZERO);
            } else {
                w.0 = now_progress;
            }
        }
    }
    // How many processor incarnations started by folding records again from replay records.
    let replays = (1..=services[0].starts)
        .filter(|i| {
            std::fs::read_to_string(dir.path().join(format!("processor-{i}.log")))
                .is_ok_and(|l| l.contains("folding again the records since"))
        })
        .count();
    eprintln!(
        "processor projection intervals by incarnation (ms): {intervals:?}; {replays} incarnations replayed"
    );
    eprintln!(
        "chaos: {} SIGKILLs (processor {}, fulfilment {}), {} SIGTERMs (max exit {:?}), {mid_work} of them while the victim's offsets were moving, in {:.1} s",
        kills[0] + kills[1],
        kills[0],
        kills[1],
        terms[0] + terms[1],
        term_times.iter().max(),
        started.elapsed().as_secs_f64()
    );

    // Let both catch up with the whole log, then stop them gracefully.
    let input_ends = ends(
        &b,
        &[&b.topics.payments, &b.topics.mobility, &b.topics.commands],
    );
    let catch_up = Instant::now();
    wait_store_reaches(
        &mut services[0],
        &proc_store,
        &input_ends,
        catch_up + Duration::from_secs(300),
    );
    // The processor delivers its outbox right after each batch; give the last one time to land
    // by stopping it before reading the trees topic's end.
    services[0].terminate(Duration::from_secs(30));
    let tree_ends = ends(&b, &[&b.topics.trees]);
    wait_store_reaches(
        &mut services[1],
        &ful_store,
        &tree_ends,
        catch_up + Duration::from_secs(300),
    );
    services[1].terminate(Duration::from_secs(30));

    // The invariants, against the pure fold of what is in the input topics.
    let records = input_records(&b);
    assert_eq!(
        records.len() as u64,
        events,
        "every generated record is in Kafka"
    );
    let rules = cheap_tree_rules();
    let want = expected(&rules, &records);
    assert!(!want.trees.is_empty() && !want.dead_letters.is_empty());
    let summary = check(&b, &proc_store, &want);
    let (orders, order_records) = check_one_order_per_tree(&b, &want.trees);
    eprintln!(
        "chaos on {}: {summary}; {orders} orders ({order_records} records, {} re-sent)",
        if real {
            "Apache Kafka"
        } else {
            "forest broker (mock cluster)"
        },
        order_records - orders
    );
    stop_broker(broker_child.take());
}

/// GET `path` on `addr`: (status code, body), or `None` if nothing answers.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

/// Sum of every sample of `name` (all label sets) in a Prometheus text body, if present.
fn sample_sum(body: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let series = line.split_whitespace().next().unwrap_or("");
        let metric = series.split('{').next().unwrap_or("");
        if metric == name {
            let v: f64 = line.rsplit(' ').next()?.parse().ok()?;
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr").to_string()
}

/// The processor's and fulfilment's /metrics, /healthz and /readyz during an end-to-end run
/// (separate processes, both brokers): probes answer, readiness turns 200 once partitions are
/// assigned, and the key series exist with values that match the run.
#[test]
fn endpoints_serve_health_readiness_and_sane_metrics_during_a_run() {
    let prefix = unique_prefix("observe");
    let (broker_child, bootstrap) = broker(&prefix);
    let b = TestBroker::external(&prefix, &bootstrap, broker_child.is_none());
    let records = produce(&b, workload(41, 20_000, 2_000));
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, cheap_tree_rules_toml()).expect("rules");
    let (paddr, faddr) = (free_addr(), free_addr());
    let common = |sub: &str, store: &str, addr: &str| -> Vec<String> {
        [
            "--rules",
            rules.to_str().unwrap(),
            sub,
            "--brokers",
            &bootstrap,
            "--topic-prefix",
            b.prefix(),
            "--store",
            dir.path().join(store).to_str().unwrap(),
            "--group",
            &format!("{}{sub}", b.prefix()),
            "--metrics-addr",
            addr,
        ]
        .map(String::from)
        .to_vec()
    };
    let mut processor = Service::new("processor", common("processor", "p", &paddr), dir.path());
    let partners = partners_file(dir.path(), "partners.toml", 1_000_000);
    let mut fulfilment_args = common("fulfilment", "f", &faddr);
    fulfilment_args.extend(["--partners".to_string(), partners.display().to_string()]);
    let mut fulfilment = Service::new("fulfilment", fulfilment_args, dir.path());
    processor.start();
    fulfilment.start();

    // Alive at once; ready only once it owns partitions (503 with the reason until then).
    let start = Instant::now();
    let mut saw = Vec::new();
    loop {
        processor.assert_running();
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "never ready: {saw:?}"
        );
        if let Some((code, body)) = http_get(&paddr, "/readyz") {
            if saw.last() != Some(&code) {
                saw.push(code);
            }
            assert!(
                code == 200 || (code == 503 && body.starts_with("not ready: ")),
                "{code} {body}"
            );
            if code == 200 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http_get(&paddr, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(http_get(&faddr, "/healthz").map(|r| r.0), Some(200));

    // Wait until the processor has consumed everything, then check the series.
    let events = records.len() as f64;
    let mut body = String::new();
    while start.elapsed() < Duration::from_secs(180) {
        body = http_get(&paddr, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default();
        let lag = sample_sum(&body, "forest_consumer_lag_records");
        if sample_sum(&body, "forest_events_consumed_total") == Some(events)
            && lag == Some(0.0)
            && body.contains("forest_store_memory_bytes")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let v = |name: &str| {
        sample_sum(&body, name).unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
    };
    assert_eq!(v("forest_events_consumed_total"), events);
    let applied = v("forest_events_applied_total");
    let rejected = v("forest_events_rejected_total");
    assert_eq!(
        applied + rejected,
        events,
        "every record applied or rejected"
    );
    assert!(v("forest_dlq_records_total") > 0.0 && v("forest_dlq_records_total") < rejected);
    assert!(v("forest_energy_credited_grams_total") > 0.0);
    assert!(v("forest_trees_matured_total") > 0.0);
    assert_eq!(v("forest_assigned_partitions"), 3.0 * f64::from(PARTITIONS));
    assert_eq!(v("forest_consumer_lag_records"), 0.0);
    assert_eq!(v("forest_ready"), 1.0);
    assert!(v("forest_store_memory_bytes") > 0.0);
    assert!(v("forest_batch_duration_seconds_count") >= 1.0);
    assert!(
        body.contains("forest_batch_duration_seconds_bucket{le=\"0.01\"}"),
        "histograms have buckets"
    );
    assert!(v("forest_event_latency_seconds_count") >= 1.0);
    assert!(v("forest_store_writes_total") > 0.0);
    assert!(v("forest_rebalances_total") >= 1.0);
    assert!(body.contains("forest_events_rejected_total{reason=\"duplicate\"}"));
    assert!(!body.contains("user-0"), "no user ids in labels");

    // The fulfilment turns the trees into orders.
    let trees = v("forest_trees_matured_total");
    let mut fbody = String::new();
    while start.elapsed() < Duration::from_secs(180) {
        fbody = http_get(&faddr, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default();
        if sample_sum(&fbody, "forest_fulfilment_orders_total") == Some(trees) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        sample_sum(&fbody, "forest_fulfilment_orders_total"),
        Some(trees),
        "{fbody}"
    );
    assert_eq!(
        sample_sum(&fbody, "forest_fulfilment_backlog_trees"),
        Some(0.0)
    );
    assert_eq!(http_get(&faddr, "/readyz").map(|r| r.0), Some(200));
    eprintln!(
        "observe: /readyz went {saw:?}; {events} events, {applied} applied, {trees} trees, orders {trees}"
    );
    processor.terminate(Duration::from_secs(30));
    fulfilment.terminate(Duration::from_secs(30));

    // A processor of the same group on a new (empty) store: a lost data directory, or a
    // replica without state. It starts, and says so.
    let mut lost = Service::new("lost", common("processor", "p-new", "off"), dir.path());
    lost.start();
    let log = dir.path().join("lost-1.log");
    let warned = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::read_to_string(&log).is_ok_and(|l| {
            l.contains("the store is new but the consumer group has committed offsets")
        })
    });
    lost.terminate(Duration::from_secs(30));
    assert!(warned, "no warning about the new store:\n{}", lost.tail());
    stop_broker(broker_child);
}

/// Every "partition restored from the changelog" line of a service's logs: (users, seconds).
fn restores_logged(logs: &Path, name: &str) -> Vec<(u64, f64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(logs).expect("log dir").flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if !file.starts_with(name) || !file.ends_with(".log") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.contains("partition restored from the changelog"))
        {
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .and_then(|v| v.parse::<f64>().ok())
            };
            if let (Some(users), Some(secs)) = (field("users="), field("secs=")) {
                out.push((users as u64, secs));
            }
        }
    }
    out
}

/// When the last store differs from the pure fold, prints what a post-mortem needs (CI keeps
/// only a failed run's output, not its logs or topics): for the first differing user, the
/// recent events the pure fold accepted that the store lacks and the reverse (event time, id
/// hash), the user's input records, the changelog's records of its partition (the user's
/// projections with their lifetime credit, every checkpoint) and the services' log lines about
/// that partition.
fn explain_differences(b: &TestBroker, store_dir: &Path, want: &Expected, logs: &Path) {
    let store = forest_store::Store::open_read_only(store_dir).expect("store opens");
    let Some((user, want_state, got)) = want.states.iter().find_map(|(u, s)| {
        let got = store.get_user(u).expect("user reads");
        (got.as_ref() != Some(s)).then(|| (u.clone(), s.clone(), got))
    }) else {
        return;
    };
    let p = forest_kafka::partition_of(user.as_bytes(), PARTITIONS).unwrap_or(-1);
    let ids = |s: &forest_domain::UserState| -> BTreeSet<(i64, u64)> {
        s.recent_ids.iter().copied().collect()
    };
    let got_ids = got.as_ref().map(ids).unwrap_or_default();
    let want_ids = ids(&want_state);
    eprintln!(
        "--- first differing user {user} (partition {p}): lifetime {} g, want {} g; events the fold accepted and the store lacks {:?}; the reverse {:?}",
        got.as_ref().map_or(0, |g| g.lifetime_g),
        want_state.lifetime_g,
        want_ids.difference(&got_ids).collect::<Vec<_>>(),
        got_ids.difference(&want_ids).collect::<Vec<_>>(),
    );
    for r in input_records(b).iter().filter(|r| r.key == user.as_bytes()) {
        eprintln!(
            "input {:?} p{} @{} ts {}",
            r.kind, r.partition, r.offset, r.timestamp
        );
    }
    let changelog = forest_kafka::read_partition(
        &b.bootstrap,
        &b.topics.changelog,
        p,
        Duration::from_secs(60),
        &mut |_, _| {},
    )
    .expect("changelog reads");
    for r in &changelog {
        if r.key == forest_processor::changelog::CHECKPOINT_KEY {
            let lanes = forest_processor::changelog::decode_checkpoint(&r.value);
            eprintln!("changelog @{} checkpoint {lanes:?}", r.offset);
        } else if r.key == user.as_bytes() {
            let s = forest_store::decode_state(&r.value, "changelog").expect("projection");
            eprintln!(
                "changelog @{} {user}: lifetime {} g, newest event {:?}",
                r.offset, s.lifetime_g, s.newest_event_ms
            );
        }
    }
    let token = format!("partition={p}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(logs)
        .expect("log dir")
        .flatten()
        .map(|e| e.path())
        .filter(|f| f.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let name = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        for line in text.lines().filter(|l| {
            l.split_whitespace().any(|w| w == token)
                || l.contains("dropped changelog")
                || l.contains("revoked")
                || l.contains("out of the canonical order")
        }) {
            eprintln!("{name}: {line}");
        }
    }
}

/// Scale-out on real Kafka: three processor instances (separate processes, each with its own
/// store, one consumer group, the changelog on) work through a preloaded log while partitions
/// move again and again: instances join, one is SIGKILLed and comes back on its old store,
/// one leaves with SIGTERM, one is SIGKILLed and comes back with its store deleted (a lost
/// disk). Then the last instance standing alone takes every partition, restores from the
/// changelog what its store lacks or has stale, and finishes. Its projections must equal the
/// pure fold of the log, the trees and dead letters must match it (in transactions mode each
/// exactly once for read_committed readers), and the restore times are reported.
fn scale_out_campaign(mode: &str) {
    let Ok(bootstrap) = std::env::var("FOREST_TEST_BROKERS") else {
        eprintln!(
            "scale-out campaign ({mode}): skipped, it needs real Kafka (FOREST_TEST_BROKERS)"
        );
        return;
    };
    let events = env_or("FOREST_SCALE_EVENTS", 200_000);
    let prefix = unique_prefix(&format!("scale-{mode}"));
    let b = TestBroker::external(&prefix, &bootstrap, true);
    let dir = tempfile::tempdir().expect("tempdir");
    let group = format!("{}processor", b.prefix());
    let stores: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("store-{i}")))
        .collect();
    // In outbox mode every store write of p0-p2 waits SLOW_WRITE_MS: with 10-record batches an
    // instance then does at most 1,250 records/s, so the ~40 s of moves below end with input
    // still waiting however fast the machine is (without it, a faster outbox finished the log
    // before p0 was killed). The last run, p1 alone, goes at full speed.
    const SLOW_WRITE_MS: &str = "8";
    let args = |i: usize, slow: bool| -> Vec<String> {
        let mut a: Vec<String> = [
            "processor",
            "--brokers",
            &bootstrap,
            "--topic-prefix",
            b.prefix(),
            "--store",
            stores[i].to_str().unwrap(),
            "--group",
            &group,
            "--changelog",
            "--exactly-once",
            mode,
            "--batch-size",
            // A transaction per batch costs ~100 ms on this broker (send_offsets and commit
            // markers): tiny transactions would leave librdkafka's prefetched queue, and the
            // rebalance events queued behind it, minutes long.
            // Small batches (and, in outbox mode, slow writes) keep the instances busy through
            // every move.
            if mode == "transactions" { "200" } else { "10" },
            "--state-retention-secs",
            "3",
            "--metrics-addr",
            "off",
        ]
        .map(String::from)
        .to_vec();
        a.extend(FAST_GROUP.map(String::from));
        // Each instance its own transactional id (they share a host).
        a.extend(["--transactional-id".to_string(), format!("{group}-{i}")]);
        if slow && mode != "transactions" {
            a.extend(["--fault-store-write-delay-ms", SLOW_WRITE_MS].map(String::from));
        }
        a
    };
    let names = ["p0", "p1", "p2"];
    let mut p: Vec<Service> = (0..3)
        .map(|i| Service::new(names[i], args(i, true), dir.path()))
        .collect();

    let mut loadgen = Service::new(
        "loadgen",
        [
            "loadgen",
            "--brokers",
            &bootstrap,
            "--topic-prefix",
            b.prefix(),
        ]
        .map(String::from)
        .into_iter()
        .chain(loadgen_workload(events, 3_000, 9))
        .collect(),
        dir.path(),
    );
    loadgen.run_to_completion();

    let input_ends = ends(
        &b,
        &[&b.topics.payments, &b.topics.mobility, &b.topics.commands],
    );
    let total: i64 = input_ends.iter().map(|(_, _, e)| e).sum();
    // The group's committed input offsets (after each batch in outbox mode, inside each
    // transaction in transactions mode): how much of the log is done. -1 while they cannot be
    // read (a transaction of a killed instance still pending).
    let progress = || -> i64 {
        let mut topics: Vec<&str> = input_ends.iter().map(|(t, _, _)| t.as_str()).collect();
        topics.dedup();
        match forest_kafka::group_committed(&bootstrap, &group, &topics, Duration::from_secs(5)) {
            Ok(got) => got.iter().map(|(_, _, o)| o).sum(),
            Err(_) => -1,
        }
    };
    let started = Instant::now();
    let step = |what: &str| {
        eprintln!(
            "{:6.1}s {what} (progress {})",
            started.elapsed().as_secs_f64(),
            progress()
        );
    };
    let wait_moving = |p: &mut Vec<Service>, secs: u64| {
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            for s in p.iter_mut().filter(|s| s.child.is_some()) {
                s.assert_running();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    p[0].start();
    step("p0 started");
    while progress() <= 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "p0 never made progress:\n{}",
            p[0].tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p[1].start();
    step("p1 joins");
    wait_moving(&mut p, 4);
    p[2].start();
    step("p2 joins");
    wait_moving(&mut p, 5);
    p[0].kill();
    step("p0 SIGKILLed");
    wait_moving(&mut p, 4);
    p[1].terminate(Duration::from_secs(30));
    step("p1 leaves (SIGTERM)");
    wait_moving(&mut p, 2);
    p[0].start();
    step("p0 back on its old store");
    wait_moving(&mut p, 5);
    p[2].kill();
    std::fs::remove_dir_all(&stores[2]).expect("delete p2's store");
    p[2].start();
    step("p2 SIGKILLed, back with its store deleted");
    wait_moving(&mut p, 5);
    let moved_at = progress();
    p[0].terminate(Duration::from_secs(30));
    p[2].terminate(Duration::from_secs(30));
    step("p0 and p2 leave");
    // p1 again, on the same store, without the slow writes.
    p[1].args = args(1, false);
    p[1].start();
    step("p1 back alone on its old store");

    assert!(
        (0..total).contains(&moved_at),
        "the moves happened under load: {moved_at} of {total} input offsets were done after the last"
    );
    wait_store_reaches(
        &mut p[1],
        &stores[1],
        &input_ends,
        started + Duration::from_secs(600),
    );
    p[1].terminate(Duration::from_secs(30));
    step("p1 caught up and stopped");

    let records = input_records(&b);
    assert_eq!(
        records.len() as u64,
        events,
        "every generated record is in Kafka"
    );
    let want = expected(&Default::default(), &records);
    explain_differences(&b, &stores[1], &want, dir.path());
    let summary = check(&b, &stores[1], &want);
    if mode == "transactions" {
        check_outputs_exactly_once(&b);
    }
    let restores: Vec<(u64, f64)> = names
        .iter()
        .flat_map(|n| restores_logged(dir.path(), n))
        .collect();
    assert!(
        !restores.is_empty(),
        "partitions were restored from the changelog"
    );
    let mut secs: Vec<f64> = restores.iter().map(|r| r.1).collect();
    secs.sort_by(f64::total_cmp);
    eprintln!(
        "scale-out ({mode}) on Apache Kafka: {} restores of {} projections in all, restore time median {:.3} s, max {:.3} s; moves done with {moved_at} of {total} input offsets processed; {summary}",
        restores.len(),
        restores.iter().map(|r| r.0).sum::<u64>(),
        secs[secs.len() / 2],
        secs[secs.len() - 1],
    );
}

#[test]
fn three_instances_join_leave_and_crash_with_the_changelog() {
    scale_out_campaign("outbox");
}

#[test]
fn three_instances_join_leave_and_crash_in_transactions_mode() {
    scale_out_campaign("transactions");
}
