//! End-to-end tests of the processor, on the broker from `FOREST_TEST_BROKERS` (real Apache
//! Kafka in CI) or on the embedded mock cluster. Each test has its own topics.

use forest_processor::{CrashPoint, ProcessorError};
use forest_tests::*;
use std::time::{Duration, Instant};

const CATCH_UP: Duration = Duration::from_secs(300);

#[test]
fn projections_trees_and_dead_letters_match_the_pure_fold() {
    let b = TestBroker::new("e2e");
    let records = produce(&b, workload(1, 200_000, 20_000));
    let want = expected(&Default::default(), &records);
    assert!(
        !want.trees.is_empty() && !want.dead_letters.is_empty() && want.duplicates > 0,
        "workload exercises everything"
    );
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let p = start(b.processor_config(dir.path(), "g"));
    wait_caught_up(&[&p.stats], &end_offsets(&b, &records), CATCH_UP);
    let secs = started.elapsed().as_secs_f64();
    p.stop().expect("graceful stop");
    let summary = check(&b, dir.path(), &want);
    eprintln!(
        "e2e on {}: {} records in {secs:.1} s = {:.0} records/s; {summary}",
        if b.is_real() {
            "Apache Kafka"
        } else {
            "mock cluster"
        },
        records.len(),
        records.len() as f64 / secs
    );
}

#[test]
fn two_workers_in_one_process_share_the_store_and_match_the_pure_fold() {
    let b = TestBroker::new("workers");
    let records = produce(&b, workload(5, 200_000, 20_000));
    let want = expected(&Default::default(), &records);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = b.processor_config(dir.path(), "g");
    cfg.workers = 2;
    cfg.batch_max_records = 500;
    let p = start(cfg);
    wait_caught_up(&[&p.stats], &end_offsets(&b, &records), CATCH_UP);
    let rebalances = forest_processor::ProcessorStats::get(&p.stats.rebalances);
    p.stop().expect("graceful stop");
    // Both workers joined: each saw at least one assignment.
    assert!(
        rebalances >= 2,
        "two members, {rebalances} rebalance callbacks"
    );
    eprintln!("two workers: {}", check(&b, dir.path(), &want));
}

#[test]
fn crash_at_several_points_then_restart_loses_and_doubles_nothing() {
    let b = TestBroker::new("crash");
    let records = produce(&b, workload(2, 60_000, 5_000));
    let want = expected(&Default::default(), &records);
    let dir = tempfile::tempdir().unwrap();
    // Each run stops abruptly: mid-batch (applied, nothing written), and right after a batch
    // was written but before its outputs were sent.
    for crash in [
        CrashPoint::AfterApplied(7_000),
        CrashPoint::AfterStoreWrite(3),
        CrashPoint::AfterApplied(1),
        CrashPoint::AfterStoreWrite(1),
        CrashPoint::AfterApplied(12_345),
    ] {
        let mut cfg = b.processor_config(dir.path(), "g");
        cfg.crash_at = Some(crash);
        let p = start(cfg);
        let deadline = Instant::now() + CATCH_UP;
        while !p.handle.is_finished() {
            assert!(
                Instant::now() < deadline,
                "crash point {crash:?} never reached"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        match p.handle.join().unwrap() {
            Err(ProcessorError::InjectedCrash(c)) => assert_eq!(c, crash),
            other => panic!("expected the injected crash {crash:?}, got {other:?}"),
        }
    }
    let p = start(b.processor_config(dir.path(), "g"));
    wait_caught_up(&[&p.stats], &end_offsets(&b, &records), CATCH_UP);
    p.stop().expect("graceful stop");
    eprintln!("crash recovery: {}", check(&b, dir.path(), &want));
}

#[test]
fn two_instances_split_the_partitions_and_one_leaves_mid_stream() {
    let b = TestBroker::new("rebalance");
    let records = produce(&b, workload(3, 100_000, 10_000));
    let want = expected(&Default::default(), &records);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ca = b.processor_config(da.path(), "g");
    let mut cb = b.processor_config(db.path(), "g");
    // Small batches, so both instances are mid-stream when A leaves.
    ca.batch_max_records = 200;
    cb.batch_max_records = 200;
    let a = start(ca);
    let bb = start(cb);
    // Wait until both own partitions and have committed something.
    let deadline = Instant::now() + CATCH_UP;
    while a.stats.committed_offsets().is_empty() || bb.stats.committed_offsets().is_empty() {
        assert!(
            Instant::now() < deadline,
            "both instances never got partitions"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    a.stop().expect("A leaves gracefully");
    wait_caught_up(&[&bb.stats], &end_offsets(&b, &records), CATCH_UP);
    let rebalances = forest_processor::ProcessorStats::get(&bb.stats.rebalances);
    bb.stop().expect("B stops gracefully");
    assert!(
        rebalances >= 3,
        "B saw assign, revoke, assign: {rebalances}"
    );
    eprintln!("rebalance: {}", check(&b, db.path(), &want));
}

#[test]
fn broker_faults_on_the_mock_cluster_lose_nothing() {
    // Always the mock cluster, even when FOREST_TEST_BROKERS names a real broker: only the mock
    // cluster can inject these faults.
    let b = TestBroker::embedded("faults");
    let embedded = b.embedded.as_ref().expect("embedded broker");
    let records = produce(&b, workload(4, 60_000, 5_000));
    let want = expected(&Default::default(), &records);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = b.processor_config(dir.path(), "g");
    cfg.batch_max_records = 500;
    let p = start(cfg);
    inject_broker_faults(embedded, Duration::from_millis(300));
    wait_caught_up(&[&p.stats], &end_offsets(&b, &records), CATCH_UP);
    p.stop().expect("graceful stop after faults");
    eprintln!("broker faults: {}", check(&b, dir.path(), &want));
}

/// State follows a partition to an instance that never had it: instance A writes the
/// changelog and crashes right after a batch was written but before its outputs (and so its
/// changelog records) reached Kafka; instance B, on an empty store in the same group, restores
/// every partition from the changelog, resumes at the checkpointed offsets and finishes. B's
/// projections, the trees and the dead letters equal the pure fold, and B did not replay the
/// log from the start.
#[test]
fn changelog_moves_state_to_an_instance_with_an_empty_store() {
    let b = TestBroker::new("changelog");
    let records = produce(&b, workload(51, 40_000, 4_000));
    let want = expected(&Default::default(), &records);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = b.processor_config(dir_a.path(), "g");
    cfg.changelog = true;
    cfg.crash_at = Some(CrashPoint::AfterStoreWrite(8));
    let a = start(cfg);
    match a.join_within(CATCH_UP) {
        Err(ProcessorError::InjectedCrash(_)) => {}
        other => panic!("expected the injected crash, got {other:?}"),
    }
    let mut cfg = b.processor_config(dir_b.path(), "g");
    cfg.changelog = true;
    let started = Instant::now();
    let p = start(cfg);
    wait_caught_up(&[&p.stats], &end_offsets(&b, &records), CATCH_UP);
    let took = started.elapsed();
    let stats = p.stats.clone();
    p.stop().expect("graceful stop");
    let restored = forest_processor::ProcessorStats::get(&stats.restored_users);
    let consumed = forest_processor::ProcessorStats::get(&stats.consumed);
    // Partitions A never checkpointed (it may not have reached them) are replayed instead.
    let partitions = forest_processor::ProcessorStats::get(&stats.restored_partitions);
    assert!(
        restored > 0 && partitions >= 1,
        "B restored projections from the changelog"
    );
    assert!(
        consumed < records.len() as u64,
        "B resumed at the checkpoints instead of replaying all {} records (it read {consumed})",
        records.len()
    );
    eprintln!(
        "changelog: B restored {restored} projections on {partitions} of {PARTITIONS} partitions, read {consumed} of {} records, caught up in {:.1} s; {}",
        records.len(),
        took.as_secs_f64(),
        check(&b, dir_b.path(), &want)
    );
}

/// Transactions mode: each batch's outputs, changelog records and input offsets commit in one
/// Kafka transaction, and RocksDB is written after it. A crash right after the transaction
/// committed leaves the store a batch behind the changelog; the restart notices (the store's
/// recorded changelog end is not the partition's end), restores those partitions from the
/// changelog instead of re-reading the batch, and finishes. Read_committed readers then see
/// every tree and dead letter exactly once, and the projections equal the pure fold.
#[test]
fn transactions_mode_outputs_exactly_once_across_a_crash_after_the_kafka_commit() {
    let b = TestBroker::new("txn");
    let records = produce(&b, workload(61, 40_000, 4_000));
    let want = expected(&Default::default(), &records);
    let dir = tempfile::tempdir().unwrap();
    let txn = |crash| {
        let mut cfg = b.processor_config(dir.path(), "g");
        cfg.exactly_once = forest_processor::ExactlyOnce::Transactions;
        cfg.batch_max_records = 1_000;
        cfg.crash_at = crash;
        cfg
    };
    let a = start(txn(Some(CrashPoint::AfterTransaction(6))));
    match a.join_within(CATCH_UP) {
        Err(ProcessorError::InjectedCrash(_)) => {}
        other => panic!("expected the injected crash, got {other:?}"),
    }
    let p = start(txn(None));
    wait_caught_up(&[&p.stats], &end_offsets(&b, &records), CATCH_UP);
    let stats = p.stats.clone();
    p.stop().expect("graceful stop");
    let get = forest_processor::ProcessorStats::get;
    assert!(
        get(&stats.restored_partitions) >= 1,
        "the restart restored the partition(s) the crash left behind"
    );
    assert!(
        get(&stats.transactions) > 0,
        "batches went through transactions"
    );
    let trees = check_outputs_exactly_once(&b);
    eprintln!(
        "transactions: {} transactions after the restart, {} partitions restored, {trees} trees each once; {}",
        get(&stats.transactions),
        get(&stats.restored_partitions),
        check(&b, dir.path(), &want)
    );
}

/// Scale-out and in with the changelog: A processes the whole log alone, then B joins and takes
/// half of the partitions (restoring them from A's changelog). After the (short) retention A
/// deletes the state of the partitions it lost: every user left in its store belongs to a
/// partition it still has offsets for, and it holds fewer users than the workload has. Then B
/// leaves: A gets those partitions back, finds no offsets for them, restores them from the
/// changelog, and ends with every projection equal to the pure fold.
#[test]
fn state_of_partitions_owned_elsewhere_is_deleted_after_the_retention_and_restored_on_return() {
    let b = TestBroker::new("retention");
    let records = produce(&b, workload(71, 60_000, 6_000));
    let want = expected(&Default::default(), &records);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = |dir: &std::path::Path| {
        let mut c = b.processor_config(dir, "g");
        c.changelog = true;
        c.batch_max_records = 300;
        c.state_retention = Some(Duration::from_millis(500));
        c
    };
    let a = start(cfg(da.path()));
    wait_caught_up(&[&a.stats], &end_offsets(&b, &records), CATCH_UP);
    let bb = start(cfg(db.path()));
    let get = forest_processor::ProcessorStats::get;
    wait_until("A forgets the partitions B took", CATCH_UP, || {
        get(&a.stats.forgotten_partitions) >= 1
    });
    {
        // Read-only view of A's store while it runs.
        let store = forest_store::Store::open_read_only(da.path()).expect("read-only open");
        let input_parts: std::collections::BTreeSet<i32> =
            [&b.topics.payments, &b.topics.mobility, &b.topics.commands]
                .iter()
                .flat_map(|t| store.partitions(t).expect("offsets"))
                .collect();
        let mut users = 0;
        for id in store.user_ids() {
            let id = id.expect("user id");
            let p = forest_kafka::partition_of(&id, PARTITIONS).expect("partitions");
            assert!(
                input_parts.contains(&p),
                "A still holds user {} of partition {p}, whose offsets it dropped",
                String::from_utf8_lossy(&id)
            );
            users += 1;
        }
        assert!(
            users < want.states.len(),
            "A dropped the users of B's partitions ({users} of {} left)",
            want.states.len()
        );
    }
    bb.stop().expect("B leaves gracefully");
    // A's shown offsets still hold what it committed before B came, so wait for the
    // reassignment itself: every partition of the three inputs back, restored.
    wait_until("A owns every partition again", CATCH_UP, || {
        a.stats.health.assigned() == 3 * i64::from(PARTITIONS)
    });
    wait_caught_up(&[&a.stats], &end_offsets(&b, &records), CATCH_UP);
    let stats = a.stats.clone();
    a.stop().expect("A stops gracefully");
    assert!(
        get(&stats.forgotten_users) > 0 && get(&stats.restored_partitions) >= 1,
        "A forgot users and restored the partitions it had forgotten"
    );
    eprintln!(
        "retention: A forgot {} users on {} partitions, restored {} users on {} partitions; {}",
        get(&stats.forgotten_users),
        get(&stats.forgotten_partitions),
        get(&stats.restored_users),
        get(&stats.restored_partitions),
        check(&b, da.path(), &want)
    );
}

/// Wrong changelog set-up fails at start-up with what to fix, before anything is consumed: a
/// missing changelog topic, and one whose partition count differs from the inputs' (a restore
/// of partition N reads changelog partition N).
#[test]
fn a_missing_or_mispartitioned_changelog_topic_fails_at_start_up() {
    let b = TestBroker::new("badchangelog");
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("{}missing.{}", b.prefix(), forest_kafka::CHANGELOG_SUFFIX);
    let narrow = format!("{}narrow.{}", b.prefix(), forest_kafka::CHANGELOG_SUFFIX);
    forest_kafka::ensure_topics(b.embedded.as_ref(), &b.bootstrap, &[], &[(&narrow, 1)], 1)
        .expect("create the one-partition changelog");
    for (topic, why) in [(&missing, "does not exist"), (&narrow, "has 1 partitions")] {
        let mut cfg = b.processor_config(dir.path(), "g");
        cfg.changelog = true;
        cfg.topics.changelog = topic.clone();
        match start(cfg).join_within(CATCH_UP) {
            Err(ProcessorError::Config(msg)) => {
                assert!(
                    msg.contains(topic.as_str())
                        && msg.contains(why)
                        && msg.contains(&format!("create it with {PARTITIONS} partitions")),
                    "{msg}"
                );
            }
            other => panic!("expected a configuration error for {topic}, got {other:?}"),
        }
    }
}
