//! Tests of the `forest` binary itself: flag errors, the demo, the load generator's seed.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn forest() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_forest"));
    c.env_remove("FOREST_BROKERS")
        .env_remove("FOREST_TOPIC_PREFIX")
        .env_remove("FOREST_TREES_TOPIC")
        .env_remove("FOREST_DLQ_TOPIC")
        .env("FOREST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    forest().args(args).output().expect("forest runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_flags_and_config_fail_with_what_to_fix() {
    let cases: &[(&[&str], &str)] = &[
        (&["processor"], "--brokers"),
        (
            &["demo", "--events", "many"],
            "invalid value 'many' for '--events",
        ),
        (
            &["processor", "--brokers", "b", "--kafka-config", "linger.ms"],
            "expected key=value",
        ),
        // The default interval (5 s) applies only where spaced writes work; one given with
        // the changelog is refused.
        (
            &[
                "processor",
                "--brokers",
                "b",
                "--changelog",
                "--projection-interval-ms",
                "500",
            ],
            "a projection interval above 0 works in the outbox mode only",
        ),
        (
            &[
                "processor",
                "--brokers",
                "b",
                "--projection-pace",
                "--projection-interval-ms",
                "0",
            ],
            "pacing projection writes needs a projection interval above 0",
        ),
        (
            &["loadgen", "--brokers", "b", "--duplicate-rate", "2"],
            "--duplicate-rate is a share between 0 and 1",
        ),
        (
            &["loadgen", "--brokers", "b", "--users", "0"],
            "--users must be at least 1",
        ),
        (
            &["partners", "--partners", "/nonexistent/partners.toml"],
            "cannot read the partner file /nonexistent/partners.toml",
        ),
        (
            &["demo", "--metrics-addr", "everywhere"],
            "--metrics-addr \"everywhere\" is not HOST:PORT",
        ),
        (
            &["fulfilment", "--brokers", "b", "--batch-size", "0"],
            "--batch-size must be at least 1",
        ),
        (
            &["--rules", "/nonexistent/rules.toml", "rules"],
            "/nonexistent/rules.toml",
        ),
        // Checked before any broker starts or record is made.
        (
            &["bench", "--load-core", "1000"],
            "--load-core 1000: cannot run on CPU 1000",
        ),
        (
            &["bench", "--load-core", "5000"],
            "--load-core 5000: CPUs are numbered from 0 to at most 1023",
        ),
    ];
    for (args, want) in cases {
        let o = run(args);
        assert!(!o.status.success(), "{args:?} should fail");
        let e = stderr(&o);
        assert!(
            e.contains(want),
            "{args:?}: stderr should say {want:?}, got:\n{e}"
        );
    }
    // A partner file with a mistake names the file and the problem.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(&p, "version = \"x\"\n[[partners]]\nid = \"a\"\nname = \"A\"\nactive = true\nsites = []\nmotto = \"plant\"\n").unwrap();
    let o = run(&["partners", "--partners", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("p.toml") && e.contains("motto"), "{e}");
}

/// Topic names from the per-topic options, the environment and the config file are checked
/// at start-up (Kafka's characters and length, no role sharing a topic), before any broker
/// is contacted, and the error names the option to fix.
#[test]
fn topic_options_are_validated_and_errors_name_the_option() {
    let long = "t".repeat(250);
    let cases: &[(&[&str], &str)] = &[
        (
            &["processor", "--brokers", "b", "--trees-topic", "my trees"],
            "--trees-topic: the trees topic name is invalid: \"my trees\" contains ' '",
        ),
        (
            &["processor", "--brokers", "b", "--payments-topic", ""],
            "--payments-topic: the payments topic name is invalid: must not be empty",
        ),
        (
            &["processor", "--brokers", "b", "--changelog-topic", &long],
            "--changelog-topic: the changelog topic name is invalid",
        ),
        (
            &["processor", "--brokers", "b", "--dlq-topic", ".."],
            "--dlq-topic",
        ),
        (
            &[
                "processor",
                "--brokers",
                "b",
                "--trees-topic",
                "same",
                "--dlq-topic",
                "same",
            ],
            "--trees-topic and --dlq-topic: the trees and dlq topics are both \"same\"",
        ),
        (
            &[
                "processor",
                "--brokers",
                "b",
                "--dlq-topic",
                "forest.payments.v1",
            ],
            "--topic-prefix (the payments topic's default name) and --dlq-topic",
        ),
        (
            &["processor", "--brokers", "b", "--topic-prefix", "env/"],
            "--topic-prefix (the payments topic's default name): the payments topic name is invalid",
        ),
        (
            &["fulfilment", "--brokers", "b", "--trees-topic", "trees?"],
            "--trees-topic: \"trees?\" contains '?'",
        ),
        (
            &["processor", "--brokers", "b", "--write-buffer-mb", "256"],
            "--write-buffer-mb must be at least 1 and below --block-cache-mb (256)",
        ),
        (
            &["processor", "--brokers", "b", "--merge-buffer-records", "0"],
            "--merge-buffer-records must be at least 1",
        ),
        (
            &[
                "processor",
                "--brokers",
                "b",
                "--dead-letter-max-bytes",
                "10",
            ],
            "--dead-letter-max-bytes must be at least 4096",
        ),
    ];
    for (args, want) in cases {
        let o = run(args);
        assert!(!o.status.success(), "{args:?} should fail");
        let e = stderr(&o);
        assert!(
            e.contains(want),
            "{args:?}: stderr should say {want:?}, got:\n{e}"
        );
    }
    // The environment fallback...
    let o = forest()
        .args(["processor", "--brokers", "b"])
        .env("FOREST_DLQ_TOPIC", "dead letters")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--dlq-topic: the dlq topic name is invalid"),
        "{}",
        stderr(&o)
    );
    // ...and the config file's keys, which are the long option names.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("forest.toml");
    std::fs::write(
        &p,
        "[processor]\nbrokers = \"b\"\nmobility-topic = \"m\"\ncommands-topic = \"m\"\n",
    )
    .unwrap();
    let o = run(&["--config", p.to_str().unwrap(), "processor"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--mobility-topic and --commands-topic"),
        "{}",
        stderr(&o)
    );
    // Every option is documented with its environment variable.
    let help = String::from_utf8_lossy(&run(&["processor", "--help"]).stdout).into_owned();
    for (flag, env) in [
        ("--payments-topic", "FOREST_PAYMENTS_TOPIC"),
        ("--mobility-topic", "FOREST_MOBILITY_TOPIC"),
        ("--commands-topic", "FOREST_COMMANDS_TOPIC"),
        ("--trees-topic", "FOREST_TREES_TOPIC"),
        ("--dlq-topic", "FOREST_DLQ_TOPIC"),
        ("--changelog-topic", "FOREST_CHANGELOG_TOPIC"),
        ("--write-buffer-mb", "FOREST_WRITE_BUFFER_MB"),
        ("--merge-buffer-records", "FOREST_MERGE_BUFFER_RECORDS"),
        ("--cache-mb", "FOREST_CACHE_MB"),
    ] {
        assert!(
            help.contains(flag) && help.contains(env),
            "{flag} {env}:\n{help}"
        );
    }
    let help = String::from_utf8_lossy(&run(&["fulfilment", "--help"]).stdout).into_owned();
    assert!(help.contains("--trees-topic") && help.contains("FOREST_TREES_TOPIC"));
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(addr: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

#[test]
fn the_demo_runs_the_pipeline_and_its_invariants_hold() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = forest()
        .args([
            "demo",
            "--events",
            "30000",
            "--users",
            "3000",
            "--no-progress",
            "--metrics-addr",
            &addr,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("demo starts");
    // Metrics are served while it runs.
    let mut scraped = None;
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(120) {
        if let Some(body) = scrape(&addr) {
            if body.contains("forest_events_consumed_total") {
                scraped = Some(body);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "demo failed:\n{out}\n{}", stderr(&o));
    let body = scraped.expect("metrics were served during the run");
    assert!(
        body.contains("# TYPE forest_events_consumed_total counter"),
        "{body}"
    );
    let line = |name: &str| -> u64 {
        out.lines()
            .find(|l| l.trim_start().starts_with(name))
            .and_then(|l| l.trim_start()[name.len()..].split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("summary line {name:?} in:\n{out}"))
    };
    assert_eq!(line("events in"), 30_000);
    let trees = line("trees matured");
    assert!(trees > 0, "{out}");
    assert_eq!(line("orders placed") + line("backlog"), trees);
    assert_eq!(
        line("certificates"),
        line("orders placed"),
        "every order planted in the end"
    );
    assert!(line("dead letters") > 0, "the workload has bad records");
    assert!(out.contains("check                OK"), "{out}");
}

/// Starts `forest broker` and returns it with its bootstrap address.
fn broker() -> (Child, String) {
    let mut child = forest()
        .arg("broker")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("broker starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("bootstrap line");
    (child, line.trim().to_string())
}

fn workload_on_fresh_broker(seed: &str) -> Vec<(String, i32, i64, Option<i64>, Vec<u8>, Vec<u8>)> {
    let (mut b, addr) = broker();
    assert!(!addr.is_empty());
    let o = run(&[
        "loadgen",
        "--brokers",
        &addr,
        "--events",
        "5000",
        "--users",
        "300",
        "--seed",
        seed,
        "--until-ms",
        "1767225600000",
    ]);
    assert!(o.status.success(), "loadgen: {}", stderr(&o));
    let mut all = Vec::new();
    for t in [
        "forest.payments.v1",
        "forest.mobility.v1",
        "forest.commands.v1",
    ] {
        for r in forest_kafka::read_topic(&addr, t, Duration::from_secs(60)).expect("read") {
            all.push((
                t.to_string(),
                r.partition,
                r.offset,
                r.timestamp,
                r.key,
                r.value,
            ));
        }
    }
    b.kill().ok();
    b.wait().ok();
    all.sort();
    all
}

#[test]
fn the_load_generator_seed_gives_the_same_workload_twice() {
    let a = workload_on_fresh_broker("7");
    let b = workload_on_fresh_broker("7");
    assert_eq!(a.len(), 5_000);
    assert!(
        a == b,
        "same seed, same records, partitions, offsets and timestamps"
    );
    let c = workload_on_fresh_broker("8");
    assert_eq!(c.len(), 5_000);
    assert!(a != c, "another seed, another workload");
}

#[test]
fn rebuild_replays_the_log_and_user_explains_a_projection() {
    let (mut b, addr) = broker();
    let o = run(&[
        "loadgen",
        "--brokers",
        &addr,
        "--events",
        "8000",
        "--users",
        "200",
        "--seed",
        "3",
    ]);
    assert!(o.status.success(), "loadgen: {}", stderr(&o));
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b2 = dir.path().join("b");
    let (a_s, b_s) = (a.to_str().unwrap(), b2.to_str().unwrap());
    let o = run(&["rebuild", "--brokers", &addr, "--out", a_s]);
    assert!(o.status.success(), "rebuild: {}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("rebuilt 8000 records"));
    // The same log and rules rebuild the same projections.
    let o = run(&[
        "rebuild",
        "--brokers",
        &addr,
        "--out",
        b_s,
        "--compare-with",
        a_s,
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        out.contains("users equal, 0 differ") && out.contains("0 only rebuilt, 0 only live"),
        "{out}"
    );
    // Different rules: the report shows the difference.
    let rules = dir.path().join("rules.toml");
    let text = forest_domain::DEFAULT_RULES_TOML.replace("version = \"", "version = \"double-");
    let text = text.replacen("cost_g = 17900", "cost_g = 179", 1);
    std::fs::write(&rules, text).unwrap();
    let c = dir.path().join("c");
    let o = run(&[
        "--rules",
        rules.to_str().unwrap(),
        "rebuild",
        "--brokers",
        &addr,
        "--out",
        c.to_str().unwrap(),
        "--compare-with",
        a_s,
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !out.contains(" 0 differ"),
        "cheaper trees change projections: {out}"
    );
    b.kill().ok();
    b.wait().ok();
    // `forest user` on a user from the workload.
    let user = forest_workload::Generator::new(forest_workload::WorkloadConfig {
        seed: 3,
        users: 200,
        events: 10,
        ..Default::default()
    })
    .find_map(|r| r.to_event().ok().map(|e| e.user_id))
    .expect("a valid record");
    let o = run(&["user", &user, "--store", a_s]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        out.contains(&format!("user {user}"))
            && out.contains("recent credits")
            && out.contains(" g of "),
        "{out}"
    );
    let o = run(&["user", "nobody-at-all", "--store", a_s]);
    assert!(!o.status.success() && stderr(&o).contains("no user \"nobody-at-all\""));
}

/// `forest bench` on the embedded broker, small: every throughput phase runs and gets its row
/// (the raw phases count from their first poll, so up to one poll's records fewer), and the
/// durable floor (g) and the processor (b) both write to RocksDB. (How fast is the
/// benchmarks' business, not a test's.)
#[test]
fn the_bench_runs_every_phase_on_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&[
        "bench",
        "--events",
        "20000",
        "--users",
        "2000",
        "--latency-secs",
        "0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "bench failed:\n{out}\n{}", stderr(&o));
    // | phase | events | seconds | events/s | CPU-s per M events | writes per event | peak RSS |
    let row = |phase: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.starts_with(&format!("| {phase}")))
            .unwrap_or_else(|| panic!("no row for {phase:?} in:\n{out}"))
            .split('|')
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect()
    };
    let events = |phase: &str| -> u64 { row(phase)[1].parse().unwrap() };
    let writes = |phase: &str| -> f64 { row(phase)[5].parse().unwrap() };
    assert_eq!(events("preload (produce)"), 20_000);
    for phase in [
        "(a) raw consume",
        "(a') raw consume",
        "(f) ceiling",
        "(g) durable floor",
    ] {
        let n = events(phase);
        assert!(n > 0 && n <= 20_000, "{phase}: {n} in:\n{out}");
    }
    assert_eq!(events("(b) processor, from its first record"), 20_000);
    assert!(writes("(g) durable floor") > 0.0, "{out}");
    assert!(
        writes("(b) processor, from its first record") > 0.0,
        "{out}"
    );
    assert!(out.contains("(g)/(a) = "), "{out}");
    assert!(out.contains("(b)/(g) = "), "{out}");
    // The fetch line of each processor phase (its figure may be 0 in a phase shorter than
    // librdkafka's statistics interval, so only its presence is checked here; the e2e test
    // checks the count).
    // The shutdown commit alone makes at least one Kafka offset commit per phase.
    for p in ["(b): ", "(b'): "] {
        let line = out
            .lines()
            .find(|l| l.starts_with(p) && l.contains("records fetched per record consumed"))
            .unwrap_or_else(|| panic!("no {p} fetch line in:\n{out}"));
        let commits: u64 = line
            .split("; ")
            .find_map(|f| f.strip_suffix(" Kafka offset commits"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no commit count in {line}"));
        assert!(commits >= 1, "{line}");
    }
}
