//! End-to-end tests of fulfilment: input events -> processor -> TreeMatured -> fulfilment ->
//! planting orders -> (simulated) partner reports -> certificates. On the broker from
//! `FOREST_TEST_BROKERS` (real Apache Kafka in CI) or on the embedded mock cluster; each test
//! has its own topics.

use forest_fulfilment::sim::{SimPartner, SimStats, run_partner};
use forest_fulfilment::{CrashPoint, FulfilmentError, FulfilmentStats, PartnersSource};
use forest_kafka::headers;
use forest_proto::v1::{Certificate, PlantingConfirmed, TreeMatured, planting_confirmed};
use forest_tests::*;
use prost::Message as _;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(300);

fn get(v: &std::sync::atomic::AtomicU64) -> u64 {
    FulfilmentStats::get(v)
}

#[test]
fn every_matured_tree_gets_exactly_one_order_across_crashes_and_redelivery() {
    let b = TestBroker::new("fulfil-once");
    let records = produce(&b, workload(11, 60_000, 5_000));
    let rules = cheap_tree_rules();
    let want = expected(&rules, &records);
    let _processed = run_processor_to_end(&b, &records, rules);
    assert!(want.trees.len() > 100, "{} trees", want.trees.len());

    // Re-deliver the first 150 TreeMatured records, as a processor replay would.
    let trees = read_topic(&b, &b.topics.trees);
    let again: Vec<(Vec<u8>, Vec<u8>)> = trees
        .iter()
        .take(150)
        .map(|(k, v, _)| (k.clone(), v.clone()))
        .collect();
    produce_raw(&b, &b.topics.trees, &again);
    let ends = topic_ends(&b, &b.topics.trees);

    let dir = tempfile::tempdir().unwrap();
    // Abrupt stops: mid-batch (applied, nothing written) and right after a batch was written
    // but before its orders were sent.
    for crash in [
        CrashPoint::AfterApplied(300),
        CrashPoint::AfterStoreWrite(2),
        CrashPoint::AfterApplied(1),
        CrashPoint::AfterStoreWrite(1),
        CrashPoint::AfterApplied(777),
    ] {
        let mut cfg = b.fulfilment_config(dir.path(), PartnersSource::Builtin);
        cfg.batch_max_records = 100;
        cfg.crash_at = Some(crash);
        match start_fulfilment(cfg).join_within(WAIT) {
            Err(FulfilmentError::InjectedCrash(c)) => assert_eq!(c, crash),
            other => panic!("expected the injected crash {crash:?}, got {other:?}"),
        }
    }
    let f = start_fulfilment(b.fulfilment_config(dir.path(), PartnersSource::Builtin));
    wait_fulfilment_at(&f.stats, &ends, WAIT);
    let duplicates = get(&f.stats.duplicate_trees);
    f.stop().expect("graceful stop");
    let (distinct, sent) = check_one_order_per_tree(&b, &want.trees);
    assert!(
        duplicates >= 150,
        "the re-delivered trees were seen as duplicates: {duplicates}"
    );
    let dead = read_topic(&b, &b.topics.dlq)
        .into_iter()
        .filter(|(_, _, h)| {
            h.iter()
                .any(|(k, v)| k == headers::SOURCE_TOPIC && v == b.topics.trees.as_bytes())
        })
        .count();
    assert_eq!(dead, 0, "valid trees are never dead-lettered");
    eprintln!(
        "fulfilment after 5 crashes and 150 re-delivered trees on {}: {} trees, {distinct} orders ({sent} records, {} re-sent)",
        broker_name(&b),
        want.trees.len(),
        sent - distinct
    );
}

/// Broker faults while the fulfilment runs (mock cluster only: produce, fetch and commit
/// request errors, the broker down for two seconds, slow round trips): still exactly one
/// order per matured tree.
#[test]
fn broker_faults_on_the_mock_cluster_lose_no_order() {
    let b = TestBroker::embedded("fulfil-faults");
    let records = produce(&b, workload(14, 60_000, 5_000));
    let rules = cheap_tree_rules();
    let want = expected(&rules, &records);
    let _processed = run_processor_to_end(&b, &records, rules);
    let ends = topic_ends(&b, &b.topics.trees);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = b.fulfilment_config(dir.path(), PartnersSource::Builtin);
    cfg.batch_max_records = 100;
    let f = start_fulfilment(cfg);
    inject_broker_faults(
        b.embedded.as_ref().expect("embedded broker"),
        Duration::from_millis(200),
    );
    wait_fulfilment_at(&f.stats, &ends, WAIT);
    f.stop().expect("graceful stop after faults");
    let (distinct, sent) = check_one_order_per_tree(&b, &want.trees);
    eprintln!(
        "fulfilment under broker faults: {} trees, {distinct} orders ({sent} records, {} re-sent)",
        want.trees.len(),
        sent - distinct
    );
}

#[test]
fn capacity_runs_out_then_a_new_season_and_a_reload_allocate_the_backlog() {
    let b = TestBroker::new("fulfil-capacity");
    let records = produce(&b, workload(12, 60_000, 5_000));
    let rules = cheap_tree_rules();
    let want = expected(&rules, &records);
    let _processed = run_processor_to_end(&b, &records, rules);
    let n = want.trees.len() as u64;
    // Trees per species, to know how many fit: two sites of 5 = 10 per species and season.
    let by_tree: BTreeMap<String, String> = read_topic(&b, &b.topics.trees)
        .into_iter()
        .map(|(_, v, _)| TreeMatured::decode(v.as_slice()).unwrap())
        .map(|t| (t.tree_id, t.species_id))
        .collect();
    let mut species: BTreeMap<String, u64> = BTreeMap::new();
    for s in by_tree.values() {
        *species.entry(s.clone()).or_insert(0) += 1;
    }
    let fits: u64 = species.values().map(|c| (*c).min(10)).sum();
    assert!(
        n > fits + 10,
        "the workload overflows capacity: {n} trees, {species:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let pdir = tempfile::tempdir().unwrap();
    let path = partners_file(pdir.path(), "partners.toml", 5);
    let f = start_fulfilment(b.fulfilment_config(dir.path(), PartnersSource::File(path.clone())));
    wait_fulfilment_at(&f.stats, &topic_ends(&b, &b.topics.trees), WAIT);
    let ordered = get(&f.stats.orders);
    assert_eq!(
        ordered, fits,
        "orders = what fits in two sites of 5 per species"
    );
    assert_eq!(
        get(&f.stats.backlog),
        n - ordered,
        "the rest waits in the backlog"
    );

    // A tree matured in the next season brings that season's capacity: the backlog goes
    // first, oldest first.
    let next_year = TreeMatured {
        tree_id: "season-user/1".into(),
        user_id: "season-user".into(),
        tree_seq: 1,
        species_id: "saxaul".into(),
        energy_spent_g: 17_900,
        matured_at_ms: 4_102_444_800_000, // 2100-01-01: always a later season than "now"
        rules_version: "test".into(),
        trigger_event_id: "e".into(),
    };
    produce_raw(
        &b,
        &b.topics.trees,
        &[(b"season-user".to_vec(), next_year.encode_to_vec())],
    );
    wait_fulfilment_at(&f.stats, &topic_ends(&b, &b.topics.trees), WAIT);
    let after_season = get(&f.stats.orders);
    // The new season's 10 per species go to the backlog first, then the new saxaul tree if a
    // saxaul slot is left.
    let left = |s: &str| species.get(s).map_or(0, |c| c.saturating_sub(10));
    let season_takes: u64 = species.keys().map(|s| left(s).min(10)).sum();
    let newcomer = u64::from(left("saxaul") < 10);
    assert_eq!(
        after_season,
        fits + season_takes + newcomer,
        "a fresh season's capacity, used by the backlog first"
    );
    let backlog = get(&f.stats.backlog);
    assert_eq!(backlog, n + 1 - after_season);
    assert!(backlog > 0, "still more than a season can take");

    // Operators raise capacity: the reload allocates the rest.
    write_partners(&path, 1_000_000);
    wait_until("the backlog to empty after the reload", WAIT, || {
        get(&f.stats.backlog) == 0
    });
    assert!(get(&f.stats.reloads) >= 1);
    f.stop().expect("graceful stop");
    let mut all = want.trees.clone();
    all.insert("season-user/1".into());
    let (distinct, _) = check_one_order_per_tree(&b, &all);
    eprintln!(
        "capacity on {}: {n} trees + 1 next-season; {ordered} fit at first, {after_season} after the new season, {distinct} after the reload",
        broker_name(&b)
    );
}

#[test]
fn confirmations_make_certificates_and_rejections_reallocate() {
    let b = TestBroker::new("fulfil-confirm");
    let records = produce(&b, workload(13, 60_000, 5_000));
    let rules = cheap_tree_rules();
    let want = expected(&rules, &records);
    let _processed = run_processor_to_end(&b, &records, rules);
    let n = want.trees.len() as u64;

    let dir = tempfile::tempdir().unwrap();
    // Two sites for every species, so a rejected tree always has somewhere else to go.
    let pdir = tempfile::tempdir().unwrap();
    let path = partners_file(pdir.path(), "partners.toml", 1_000_000);
    let f = start_fulfilment(b.fulfilment_config(dir.path(), PartnersSource::File(path)));
    // The partner rejects 20% of first attempts.
    let sim_stats = Arc::new(SimStats::default());
    let sim_stop = Arc::new(AtomicBool::new(false));
    let sim = {
        let (bootstrap, topics) = (b.bootstrap.clone(), b.fulfilment.clone());
        let (st, stop) = (sim_stats.clone(), sim_stop.clone());
        std::thread::spawn(move || {
            let p = SimPartner {
                seed: 1,
                reject_per_mille: 200,
            };
            run_partner(&bootstrap, &[], "sim-partner", &topics, p, stop, &st)
        })
    };
    wait_until("a certificate for every tree", WAIT, || {
        get(&f.stats.certificates) >= n
    });
    sim_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sim.join().unwrap().expect("partner simulator ran");
    let rejected = FulfilmentStats::get(&sim_stats.rejected);
    assert!(rejected > 0, "the partner rejected some");
    assert_eq!(
        get(&f.stats.reallocations),
        rejected,
        "each rejection re-allocated"
    );

    // Hostile and repeated reports: re-sent (duplicate) reports, an unknown order, garbage.
    let reports = read_topic(&b, &b.fulfilment.confirmations);
    let mut bad: Vec<(Vec<u8>, Vec<u8>)> = reports
        .iter()
        .take(40)
        .map(|(k, v, _)| (k.clone(), v.clone()))
        .collect();
    let unknown = PlantingConfirmed {
        order_id: "order:nobody/1".into(),
        partner_id: "see-alxa".into(),
        result: Some(planting_confirmed::Result::Rejected(Default::default())),
        reported_at_ms: 0,
        idempotency_key: "order:nobody/1#1".into(),
    };
    bad.push((b"order:nobody/1".to_vec(), unknown.encode_to_vec()));
    bad.push((b"x".to_vec(), vec![0xff, 0xff, 0xff]));
    produce_raw(&b, &b.fulfilment.confirmations, &bad);
    wait_fulfilment_at(&f.stats, &topic_ends(&b, &b.fulfilment.confirmations), WAIT);
    assert!(
        get(&f.stats.duplicate_confirmations) >= 40,
        "re-sent reports are duplicates"
    );
    assert_eq!(get(&f.stats.unknown_confirmations), 1);
    assert_eq!(
        get(&f.stats.certificates),
        n,
        "no second certificate from a re-sent report"
    );
    f.stop().expect("graceful stop");

    // Certificates: exactly one per tree.
    let certs: BTreeSet<String> = read_topic(&b, &b.fulfilment.certificates)
        .into_iter()
        .map(|(k, v, _)| {
            let c = Certificate::decode(v.as_slice()).expect("certificate decodes");
            assert_eq!(k, c.user_id.as_bytes());
            assert!(!c.tree_code.is_empty() && !c.planted_on.is_empty());
            c.tree_id
        })
        .collect();
    assert_eq!(certs, want.trees, "one certificate per tree");
    // Re-allocated orders went to another site, with attempt 2 and a new idempotency key.
    let all = orders(&b);
    let mut sites: BTreeMap<&str, BTreeMap<u32, &str>> = BTreeMap::new();
    for (o, _) in &all {
        sites
            .entry(&o.order_id)
            .or_default()
            .insert(o.attempt, &o.site_id);
    }
    let moved = sites.values().filter(|a| a.len() == 2).count() as u64;
    assert_eq!(moved, rejected, "every rejected tree has a second attempt");
    for a in sites.values().filter(|a| a.len() == 2) {
        assert_ne!(a[&1], a[&2], "re-allocated to another site");
    }
    // Unknown and undecodable reports are in the DLQ with their reason.
    let reasons: Vec<String> = read_topic(&b, &b.topics.dlq)
        .into_iter()
        .filter_map(|(_, _, h)| {
            let src = h.iter().find(|(k, _)| k == headers::SOURCE_TOPIC)?;
            (src.1 == b.fulfilment.confirmations.as_bytes()).then(|| {
                let r = h
                    .iter()
                    .find(|(k, _)| k == headers::REASON)
                    .expect("reason");
                String::from_utf8(r.1.clone()).unwrap()
            })
        })
        .collect();
    let mut reasons_sorted = reasons.clone();
    reasons_sorted.sort();
    assert_eq!(reasons_sorted, ["undecodable", "unknown_order"]);
    eprintln!(
        "confirmations on {}: {n} trees, {rejected} rejected and re-allocated, {} certificates",
        broker_name(&b),
        certs.len()
    );
}

#[test]
fn orders_per_second() {
    // Throughput figure for the closing note (a measurement, not an assertion on time).
    let b = TestBroker::new("fulfil-rate");
    let n = 50_000u64;
    let trees: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
        .map(|i| {
            let user = format!("u{i:07}");
            let species = SPECIES[(i % 5) as usize];
            let t = TreeMatured {
                tree_id: format!("{user}/1"),
                user_id: user.clone(),
                tree_seq: 1,
                species_id: species.into(),
                energy_spent_g: 17_900,
                matured_at_ms: 1_780_000_000_000 + i as i64,
                rules_version: "test".into(),
                trigger_event_id: format!("e{i}"),
            };
            (user.into_bytes(), t.encode_to_vec())
        })
        .collect();
    produce_raw(&b, &b.topics.trees, &trees);
    let pdir = tempfile::tempdir().unwrap();
    let path = partners_file(pdir.path(), "partners.toml", 1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let f = start_fulfilment(b.fulfilment_config(dir.path(), PartnersSource::File(path)));
    wait_fulfilment_at(&f.stats, &topic_ends(&b, &b.topics.trees), WAIT);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(get(&f.stats.orders), n);
    f.stop().expect("graceful stop");
    eprintln!(
        "fulfilment on {}: {n} trees -> {n} orders in {secs:.2} s = {:.0} orders/s",
        broker_name(&b),
        n as f64 / secs
    );
}

fn broker_name(b: &TestBroker) -> &'static str {
    if b.is_real() {
        "Apache Kafka"
    } else {
        "mock cluster"
    }
}
