//! End-to-end tests of the processor, on the broker from `FOREST_TEST_BROKERS` (real Apache
//! Kafka in CI) or on the embedded mock cluster. Each test has its own topics.

use forest_processor::{CrashPoint, ProcessorError};
use forest_tests::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const CATCH_UP: Duration = Duration::from_secs(300);

/// The end-to-end test: a few hundred thousand events from 40,000 users, every
/// behaviour, duplicates, late and malformed records; one processor, no crash. Projections,
/// trees and dead letters equal the pure fold, each tree and dead letter is on its topic
/// exactly once, and the processor's counters equal the fold's.
#[test]
fn projections_trees_and_dead_letters_match_the_pure_fold() {
    let b = TestBroker::new("e2e");
    let t0 = Instant::now();
    let records = produce(&b, workload(1, 400_000, 40_000));
    let produced_s = t0.elapsed().as_secs_f64();
    let want = expected(&Default::default(), &records);
    assert_eq!(records.len(), 400_000);
    want.assert_covers_the_workload();
    assert!(
        want.states.len() >= 30_000,
        "many users: {} have a projection",
        want.states.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut cfg = b.processor_config(dir.path(), "g");
    // librdkafka's statistics often enough to check the fetched-records count below.
    cfg.kafka
        .push(("statistics.interval.ms".into(), "200".into()));
    let group = cfg.group_id.clone();
    let p = start(cfg);
    let ends = end_offsets(&b, &records);
    // Records consumed but not yet durably committed, at its largest (for the backpressure
    // test's bound).
    let mut max_uncommitted = 0;
    wait_until("the processor caught up", CATCH_UP, || {
        let get = forest_processor::ProcessorStats::get;
        max_uncommitted = max_uncommitted
            .max(get(&p.stats.consumed).saturating_sub(get(&p.stats.committed_records)));
        offsets_total(&p.stats.committed_offsets(), &ends) == offsets_total(&ends, &ends)
    });
    let secs = started.elapsed().as_secs_f64();
    // Every record consumed was fetched at least once (more if a lane pause discarded
    // prefetched records), as librdkafka's statistics count them.
    wait_until(
        "the statistics to count every record fetched",
        Duration::from_secs(10),
        || forest_processor::ProcessorStats::get(&p.stats.fetched) >= records.len() as u64,
    );
    // Kafka's copy of the offsets (spaced commits) reaches the end too while the processor
    // idles, without waiting for its shutdown commit.
    wait_until(
        "the offsets committed to Kafka to reach the end",
        Duration::from_secs(10),
        || kafka_committed_offsets(&b, &group, &ends) == ends,
    );
    let stats = p.stats.clone();
    p.stop().expect("graceful stop");
    check_stats(&stats, &want, records.len());
    let summary = check_exact(&b, dir.path(), &want);
    eprintln!(
        "e2e on {}: {} records ({} users with a projection; produced in {produced_s:.1} s) processed in {secs:.1} s = {:.0} records/s, at most {max_uncommitted} consumed and uncommitted; credits by behaviour {:?}; rejections {:?}; {summary}; whole test {:.1} s",
        if b.is_real() {
            "Apache Kafka"
        } else {
            "mock cluster"
        },
        records.len(),
        want.states.len(),
        records.len() as f64 / secs,
        want.credits_by_behaviour,
        want.rejections,
        t0.elapsed().as_secs_f64(),
    );
}

#[test]
fn two_workers_in_one_process_share_the_store_and_match_the_pure_fold() {
    two_workers("workers", Duration::ZERO);
}

/// Two workers with projections checkpointed every 300 ms: the second worker's arrival
/// revokes the first's partitions (a forced checkpoint), and timed checkpoints run beside
/// batches that store offsets and replay records only.
#[test]
fn two_workers_with_spaced_projection_checkpoints_match_the_pure_fold() {
    two_workers("workers-spaced", Duration::from_millis(300));
}

fn two_workers(name: &str, projection_interval: Duration) {
    let get = forest_processor::ProcessorStats::get;
    let b = TestBroker::new(name);
    let records = produce(&b, workload(5, 200_000, 20_000));
    let want = expected(&Default::default(), &records);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = b.processor_config(dir.path(), "g");
    cfg.workers = 2;
    cfg.batch_max_records = 500;
    cfg.projection_interval = projection_interval;
    let p = start(cfg);
    wait_caught_up(&[&p.stats], &end_offsets(&b, &records), CATCH_UP);
    // The group settles with both workers holding partitions (what `forest bench` waits for
    // before it measures latency).
    wait_until(
        "both workers to hold partitions",
        Duration::from_secs(30),
        || get(&p.stats.workers_assigned) == 2,
    );
    assert_eq!(get(&p.stats.workers_joined), 2, "workers joined");
    let stats = p.stats.clone();
    p.stop().expect("graceful stop");
    assert_eq!(
        get(&stats.workers_assigned),
        0,
        "a stopped worker revoked its partitions"
    );
    let (rebalances, batches, written, replay_records) = (
        get(&stats.rebalances),
        get(&stats.batches),
        get(&stats.projections_written),
        get(&stats.replay_records),
    );
    // Both workers joined: each saw at least one assignment.
    assert!(
        rebalances >= 2,
        "two members, {rebalances} rebalance callbacks"
    );
    // Spaced, batches leave users unwritten and store replay records for them; otherwise
    // every batch writes every user it changed and needs none.
    assert_eq!(
        replay_records > 0,
        !projection_interval.is_zero(),
        "{replay_records} replay records"
    );
    let store = forest_store::Store::open_read_only(dir.path()).expect("read-only open");
    assert_eq!(
        store.replay_partitions().expect("replay records"),
        Vec::<i32>::new()
    );
    drop(store);
    eprintln!(
        "{name}: {batches} batches wrote {written} projections and {replay_records} replay records, {} store writes for {} records; {}",
        get(&stats.store_writes),
        records.len(),
        check(&b, dir.path(), &want)
    );
}

/// The at-least-once baseline with a projection interval (what `forest bench` compares the
/// effectively-once mode with at that interval) commits Kafka offsets only as far as the
/// projections it has written: with an hour's interval, none while it runs, even once every
/// record is folded; then, at shutdown, every changed projection once and every offset.
#[test]
fn the_spaced_at_least_once_baseline_commits_offsets_only_with_its_projections() {
    let get = forest_processor::ProcessorStats::get;
    let b = TestBroker::new("alo-spaced");
    let records = produce(&b, workload(6, 20_000, 2_000));
    let want = expected(&Default::default(), &records);
    let ends = end_offsets(&b, &records);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = b.processor_config(dir.path(), "g");
    cfg.at_least_once_baseline = true;
    cfg.projection_interval = Duration::from_secs(3600);
    cfg.batch_max_records = 500;
    let group = cfg.group_id.clone();
    let p = start(cfg);
    wait_caught_up(&[&p.stats], &ends, CATCH_UP);
    assert!(
        get(&p.stats.batches) > 1,
        "{} batches",
        get(&p.stats.batches)
    );
    assert_eq!(get(&p.stats.projections_written), 0, "projections written");
    // Kafka commits are asynchronous and spaced (at most one a second per worker): time for
    // a wrong one to land.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        kafka_committed_offsets(&b, &group, &ends),
        std::collections::BTreeMap::new(),
        "offsets committed to Kafka ahead of the projections"
    );
    let stats = p.stats.clone();
    p.stop().expect("graceful stop");
    assert_eq!(kafka_committed_offsets(&b, &group, &ends), ends);
    let written = get(&stats.projections_written) as usize;
    assert!(
        written <= want.states.len(),
        "{written} projections written for {} users: each at most once",
        want.states.len()
    );
    eprintln!(
        "alo-spaced: {written} projections written; {}",
        check_exact(&b, dir.path(), &want)
    );
}

/// Crashes at several points, then a restart on the same store: projections, trees and dead
/// letters equal the pure fold; a re-sent tree or dead letter is byte-identical to its first
/// copy. A crash right after a batch's store write leaves that batch's outputs in the outbox,
/// and the next run delivers them. Before two of the restarts (one mid-way, and the last) the
/// group's Kafka offsets are moved to the topic ends, ahead of the store's: a restart that
/// trusted Kafka's committed offsets would skip the rest of the input and miss it.
#[test]
fn crash_at_several_points_then_restart_loses_and_doubles_nothing() {
    crash_campaign("crash", Duration::ZERO);
}

/// The same campaign with projections checkpointed only at shutdown (an hour's interval): every
/// crash leaves batches whose offsets and outputs are stored but whose projections are not, and
/// the restart folds their records again from the replay records. Nothing may count twice, and
/// no output may be stored twice or differ from its first copy.
#[test]
fn crash_at_several_points_with_spaced_projection_checkpoints_replays_exactly() {
    crash_campaign("crash-spaced", Duration::from_secs(3600));
}

/// The campaign with each user written by the batch after the one that changed it: at each
/// crash, users of the last replay record's batch are stored already, some of them with that
/// batch's records, so the replay must skip exactly those.
#[test]
fn crash_at_several_points_with_a_short_projection_interval_replays_exactly() {
    crash_campaign("crash-short", Duration::from_nanos(1));
}

/// A crash with every record folded and its offsets stored but no user written (an hour's
/// interval), then a restart with a 200 ms interval and no new input: the replay's users are
/// written and its replay records deleted while the processor idles. (They once waited for
/// new input, since a batch of replayed records only did not count as a batch.)
#[test]
fn a_replay_with_no_new_input_writes_its_users_within_the_interval() {
    let get = forest_processor::ProcessorStats::get;
    let b = TestBroker::new("quiet-replay");
    let records = produce(&b, workload(4, 20_000, 2_000));
    let want = expected(&Default::default(), &records);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = b.processor_config(dir.path(), "g");
    cfg.projection_interval = Duration::from_secs(3600);
    cfg.crash_at = Some(CrashPoint::WhenCaughtUp);
    match start(cfg.clone()).join_within(CATCH_UP) {
        Err(ProcessorError::InjectedCrash(CrashPoint::WhenCaughtUp)) => {}
        other => panic!("expected the injected crash when caught up, got {other:?}"),
    }
    let replay_partitions = || {
        let store = forest_store::Store::open_read_only(dir.path()).expect("read-only open");
        store.replay_partitions().expect("replay records")
    };
    let left = replay_partitions();
    assert!(!left.is_empty(), "the crash left replay records");
    cfg.crash_at = None;
    cfg.projection_interval = Duration::from_millis(200);
    let p = start(cfg);
    wait_until(
        "the replay's users written and its replay records deleted, with no new input",
        Duration::from_secs(60),
        || get(&p.stats.replayed) > 0 && replay_partitions().is_empty(),
    );
    let (replayed, consumed) = (get(&p.stats.replayed), get(&p.stats.consumed));
    p.stop().expect("graceful stop");
    assert_eq!(
        replayed, consumed,
        "every record the restart read was a replay"
    );
    assert_eq!(
        consumed as usize,
        records.len(),
        "the replay covered the whole input: no user was written before the crash"
    );
    eprintln!(
        "quiet replay: partitions {left:?} replayed {replayed} of {consumed} records consumed; {}",
        check(&b, dir.path(), &want)
    );
}

fn crash_campaign(name: &str, projection_interval: Duration) {
    let spaced = !projection_interval.is_zero();
    let b = TestBroker::new(name);
    let started = Instant::now();
    let records = produce(&b, workload(2, 60_000, 5_000));
    let want = expected(&Default::default(), &records);
    let ends = end_offsets(&b, &records);
    let dir = tempfile::tempdir().unwrap();
    let group = b.processor_config(dir.path(), "g").group_id;
    let get = forest_processor::ProcessorStats::get;
    // Outbox entries crashes left behind, and how many the next run had to deliver first.
    let mut leftovers: Vec<forest_store::OutboxEntry> = Vec::new();
    let mut left_by_last_crash = 0;
    let mut skipped = 0;
    let mut replayed_total = 0;
    // Each run stops abruptly: mid-batch (applied, nothing written), and right after a batch
    // was written but before its outputs were sent.
    for crash in [
        CrashPoint::AfterApplied(7_000),
        CrashPoint::AfterStoreWrite(3),
        CrashPoint::AfterApplied(1),
        CrashPoint::AfterStoreWrite(1),
        CrashPoint::AfterApplied(12_345),
    ] {
        let t = Instant::now();
        // Joining the group to move its offsets costs seconds per restart: once mid-way (a
        // restart that trusted Kafka would never write a batch, so never reach its crash
        // point) and once before the final run.
        if crash == CrashPoint::AfterStoreWrite(1) {
            commit_kafka_offsets(&b, &group, &ends);
        }
        let committing = t.elapsed();
        let mut cfg = b.processor_config(dir.path(), "g");
        cfg.crash_at = Some(crash);
        cfg.projection_interval = projection_interval;
        let p = start(cfg);
        let stats = p.stats.clone();
        match p.join_within(CATCH_UP) {
            Err(ProcessorError::InjectedCrash(c)) => assert_eq!(c, crash),
            other => panic!("expected the injected crash {crash:?}, got {other:?}"),
        }
        eprintln!(
            "{crash:?}: Kafka offsets moved in {:.1} s, run took {:.1} s",
            committing.as_secs_f64(),
            (t.elapsed() - committing).as_secs_f64()
        );
        assert!(
            get(&stats.outputs_delivered) >= left_by_last_crash,
            "the run after a crash delivered the {left_by_last_crash} outputs it left ({} delivered)",
            get(&stats.outputs_delivered)
        );
        // Runs fold records again only when projections are spaced (whether a run reaches
        // them before its crash point depends on which partition the merge serves first).
        let replayed = get(&stats.replayed);
        replayed_total += replayed;
        skipped += get(&stats.replay_skipped);
        assert!(
            spaced || replayed == 0,
            "{crash:?}: {replayed} records folded again"
        );
        let store = forest_store::Store::open_read_only(dir.path()).expect("read-only open");
        let replaying = store.replay_partitions().expect("replay records");
        // Every crash comes after at least one batch was stored (or, for the crash at the
        // first record, during the replay of the batches before): with spaced checkpoints
        // their projections are not stored, so the restart must replay.
        assert_eq!(
            !replaying.is_empty(),
            spaced,
            "{crash:?}: partitions with replay records: {replaying:?}"
        );
        let outbox: Vec<_> = store
            .outbox(usize::MAX)
            .expect("outbox")
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        drop(store);
        // (With spaced projections, a run's first batches may be replayed records with a few
        // live ones and no output.)
        if matches!(crash, CrashPoint::AfterStoreWrite(_)) {
            assert!(
                spaced || !outbox.is_empty(),
                "{crash:?} left the written batch's outputs in the outbox"
            );
        } else {
            // Mid-batch: every earlier batch's outputs were acknowledged, and so deleted.
            assert!(
                outbox.is_empty(),
                "{crash:?} left {} delivered outputs in the outbox",
                outbox.len()
            );
        }
        left_by_last_crash = outbox.len() as u64;
        leftovers.extend(outbox);
        if spaced && crash == CrashPoint::AfterApplied(7_000) {
            // A mode that cannot follow replay records refuses the store at start-up
            // instead of skipping what they would rebuild.
            let mut cfg = b.processor_config(dir.path(), "g");
            cfg.dry_run = true;
            match forest_processor::run(cfg, Default::default(), Default::default()) {
                Err(ProcessorError::Config(m)) => {
                    assert!(m.contains("replay records"), "{m}")
                }
                other => panic!("a dry run on a store with replay records: {other:?}"),
            }
        }
    }
    commit_kafka_offsets(&b, &group, &ends);
    // The last run stores projections with every batch (the default): it still follows the
    // replay records the crashes left.
    let p = start(b.processor_config(dir.path(), "g"));
    wait_caught_up(&[&p.stats], &ends, CATCH_UP);
    let stats = p.stats.clone();
    p.stop().expect("graceful stop");
    assert_eq!(get(&stats.replayed) > 0, spaced, "the last run replayed");
    replayed_total += get(&stats.replayed);
    skipped += get(&stats.replay_skipped);
    if projection_interval == Duration::from_nanos(1) {
        assert!(
            skipped > 0,
            "no replayed record was in a stored projection already"
        );
    }
    let store = forest_store::Store::open_read_only(dir.path()).expect("read-only open");
    assert_eq!(
        store.replay_partitions().expect("replay records"),
        Vec::<i32>::new(),
        "a graceful stop checkpoints every projection"
    );
    drop(store);
    assert!(
        get(&stats.outputs_delivered) >= left_by_last_crash,
        "the restart delivered the leftovers"
    );
    // Everything re-delivered from the outbox is on its topic.
    let mut on_topics = BTreeSet::new();
    for topic in [&b.topics.trees, &b.topics.dlq] {
        for (k, v, h) in read_topic(&b, topic) {
            on_topics.insert((topic.clone(), k, v, h));
        }
    }
    for e in &leftovers {
        assert!(
            on_topics.contains(&(
                e.topic.clone(),
                e.key.clone(),
                e.value.clone(),
                e.headers.clone()
            )),
            "an output left in the outbox by a crash never reached {}",
            e.topic
        );
    }
    let summary = check(&b, dir.path(), &want);
    eprintln!(
        "{name}: {replayed_total} records folded again, {skipped} of them skipped as already stored; crash recovery: {} outbox entries left by crashes and re-delivered, Kafka offsets set to the ends before two of the restarts; {summary}; {:.1} s",
        leftovers.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn two_instances_split_the_partitions_and_one_leaves_mid_stream() {
    let b = TestBroker::new("rebalance");
    let started = Instant::now();
    let records = produce(&b, workload(3, 200_000, 20_000));
    let want = expected(&Default::default(), &records);
    let ends = end_offsets(&b, &records);
    let total = offsets_total(&ends, &ends);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ca = b.processor_config(da.path(), "g");
    let mut cb = b.processor_config(db.path(), "g");
    // Small batches and 200,000 records, so both instances are mid-stream when A leaves
    // (joining the group can take seconds, while A alone already works).
    ca.batch_max_records = 200;
    cb.batch_max_records = 200;
    let a = start(ca);
    let bb = start(cb);
    // Wait until both own partitions and have committed something, and the group a fifth of
    // the input.
    let deadline = Instant::now() + CATCH_UP;
    while a.stats.committed_offsets().is_empty()
        || bb.stats.committed_offsets().is_empty()
        || a.stats.health.assigned() == 0
        || bb.stats.health.assigned() == 0
        || offsets_total(&committed_union(&[&a.stats, &bb.stats]), &ends) < total / 5
    {
        assert!(
            Instant::now() < deadline,
            "both instances never got partitions"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let both_at = started.elapsed().as_secs_f64();
    let a_owned = a.stats.health.assigned();
    let a_stats = a.stats.clone();
    a.stop().expect("A leaves gracefully");
    // At A's stop (its last batch committed) the group had not finished: A left mid-stream.
    let at_stop = offsets_total(&committed_union(&[&a_stats, &bb.stats]), &ends);
    assert!(
        at_stop < total,
        "A left mid-stream: the group had committed {at_stop} of {total} records when it left"
    );
    // B takes over every partition.
    wait_until(
        "B owns every input partition after A left",
        CATCH_UP,
        || bb.stats.health.assigned() == 3 * i64::from(PARTITIONS),
    );
    wait_caught_up(&[&bb.stats], &ends, CATCH_UP);
    let rebalances = forest_processor::ProcessorStats::get(&bb.stats.rebalances);
    bb.stop().expect("B stops gracefully");
    assert!(
        rebalances >= 3,
        "B saw assign, revoke, assign: {rebalances}"
    );
    eprintln!(
        "rebalance: A owned {a_owned} partitions and left at {at_stop} of {total} records ({both_at:.1} s in); {}; {:.1} s",
        check(&b, db.path(), &want),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn broker_faults_on_the_mock_cluster_lose_nothing() {
    // Always the mock cluster, even when FOREST_TEST_BROKERS names a real broker: only the mock
    // cluster can inject these faults.
    let b = TestBroker::embedded("faults");
    let started = Instant::now();
    let embedded = b.embedded.as_ref().expect("embedded broker");
    // Enough input that the processor (small batches) is still busy when every fault hits.
    let records = produce(&b, workload(4, 200_000, 10_000));
    let want = expected(&Default::default(), &records);
    let ends = end_offsets(&b, &records);
    let total = offsets_total(&ends, &ends);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = b.processor_config(dir.path(), "g");
    cfg.batch_max_records = 500;
    let p = start(cfg);
    // The faults begin once the processor is consuming and committing (joining the group
    // takes seconds on the mock cluster: a fixed delay could let every fault pass first).
    wait_until("the processor is under way", CATCH_UP, || {
        offsets_total(&p.stats.committed_offsets(), &ends) >= total / 10
    });
    let mut seen = Vec::new();
    inject_broker_faults_observed(embedded, Duration::ZERO, |f| {
        seen.push((f, offsets_total(&p.stats.committed_offsets(), &ends)));
    });
    wait_caught_up(&[&p.stats], &ends, CATCH_UP);
    p.stop().expect("graceful stop after faults");
    // Every fault hit a processor in mid-stream, and it still had input to process once they
    // had all cleared.
    for (fault, done) in &seen {
        assert!(
            *done > 0 && *done < total,
            "{fault:?}: the processor was not mid-stream ({done} of {total} committed)"
        );
    }
    eprintln!(
        "broker faults: records committed when each fault began (and when they cleared) {seen:?} of {total}; {}; {:.1} s",
        check(&b, dir.path(), &want),
        started.elapsed().as_secs_f64()
    );
}

/// Outbox mode with the changelog: when the group takes the partitions away from an instance
/// that still holds them (here the embedded broker answers a heartbeat with UNKNOWN_MEMBER_ID,
/// as after a session timeout; librdkafka then reports the assignment lost), the instance
/// stops with `AssignmentLost` mid-stream instead of committing its open batch and sending its
/// changelog records after those of a new owner, which cannot be fenced in this mode.
/// Restarted on its store, it drops the leftovers, restores, finishes, and equals the pure
/// fold. (That nothing is committed after the lost assignment is not observed here: with one
/// instance no other owner's records would show it.)
#[test]
fn an_instance_whose_partitions_were_taken_away_stops_and_its_restart_restores() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let b = TestBroker::embedded("lost-assignment");
    let embedded = b.embedded.as_ref().expect("embedded broker");
    let records = produce(&b, workload(61, 60_000, 6_000));
    let want = expected(&Default::default(), &records);
    let ends = end_offsets(&b, &records);
    let total = offsets_total(&ends, &ends);
    let dir = tempfile::tempdir().unwrap();
    let cfg = |slow: u64| {
        let mut cfg = b.processor_config(dir.path(), "g");
        cfg.changelog = true;
        cfg.batch_max_records = 100;
        // Busy when the heartbeat fails: at most 100 records per 5 ms write.
        cfg.store_write_delay_ms
            .store(slow, std::sync::atomic::Ordering::Relaxed);
        cfg.kafka
            .push(("heartbeat.interval.ms".into(), "200".into()));
        cfg
    };
    let p = start(cfg(5));
    wait_until("the processor is under way", CATCH_UP, || {
        offsets_total(&p.stats.committed_offsets(), &ends) >= total / 10
    });
    embedded.cluster().request_errors(
        RDKafkaApiKey::Heartbeat,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID],
    );
    let stats = std::sync::Arc::clone(&p.stats);
    match p.join_within(Duration::from_secs(60)) {
        Err(ProcessorError::AssignmentLost { partitions }) => {
            assert!(!partitions.is_empty(), "the lost partitions are named")
        }
        other => panic!("expected AssignmentLost, got {other:?}"),
    }
    let done = offsets_total(&stats.committed_offsets(), &ends);
    assert!(
        done < total,
        "stopped mid-stream ({done} of {total} committed)"
    );
    let p = start(cfg(0));
    wait_caught_up(&[&p.stats], &ends, CATCH_UP);
    p.stop().expect("graceful stop");
    eprintln!(
        "lost assignment: stopped with {done} of {total} input offsets committed; after the restart: {}",
        check(&b, dir.path(), &want)
    );
}

/// With the changelog, a user's projections go to the changelog partition its id hashes to,
/// and a restore of input partition N reads changelog partition N: a record produced to
/// another partition (an upstream producer with another partitioner) would be folded into
/// state no restore finds. Such a record is dead-lettered with the reason instead, and the
/// rest equals the pure fold.
#[test]
fn with_the_changelog_a_record_in_the_wrong_partition_is_dead_lettered() {
    use prost::Message as _;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let b = TestBroker::new("wrong-partition");
    let mut records = produce(&b, workload(71, 5_000, 500));
    let mut want = expected(&Default::default(), &records);
    // A copy of a valid payment under a new event id, produced to the next partition.
    let first = records
        .iter()
        .find(|r| r.kind == forest_domain::InputKind::Payment)
        .expect("a payment");
    let mut event =
        forest_proto::v1::PaymentEvent::decode(first.value.as_slice()).expect("payment decodes");
    if let Some(env) = event.envelope.as_mut() {
        env.event_id = "moved-to-the-wrong-partition".into();
    }
    let value = event.encode_to_vec();
    let wrong = (first.partition + 1) % PARTITIONS;
    let producer: BaseProducer = forest_kafka::client_config(&b.bootstrap, &[])
        .create()
        .expect("producer");
    producer
        .send(
            BaseRecord::to(&b.topics.payments)
                .key(&first.key)
                .payload(&value)
                .partition(wrong)
                .timestamp(first.timestamp),
        )
        .map_err(|(e, _)| e)
        .expect("send");
    producer.flush(Duration::from_secs(30)).expect("flush");
    let ends = forest_kafka::end_offsets(&b.bootstrap, &b.topics.payments).expect("ends");
    let offset = ends[&wrong] - 1;
    want.dead_letters.insert((0, wrong, offset));
    records.push(Produced {
        kind: forest_domain::InputKind::Payment,
        partition: wrong,
        offset,
        timestamp: first.timestamp,
        key: first.key.clone(),
        value,
    });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = b.processor_config(dir.path(), "g");
    cfg.changelog = true;
    let p = start(cfg);
    wait_caught_up(&[&p.stats], &end_offsets(&b, &records), CATCH_UP);
    p.stop().expect("graceful stop");
    let dlq = read_topic(&b, &b.topics.dlq);
    let moved = dlq
        .iter()
        .find(|(_, _, h)| {
            h.iter().any(|(k, v)| {
                k == forest_kafka::headers::ERROR
                    && String::from_utf8_lossy(v).contains("the record is in partition")
            })
        })
        .expect("the moved record is dead-lettered with its reason");
    eprintln!(
        "wrong partition: {}; {}",
        String::from_utf8_lossy(
            &moved
                .2
                .iter()
                .find(|(k, _)| k == forest_kafka::headers::ERROR)
                .expect("error header")
                .1
        ),
        check(&b, dir.path(), &want)
    );
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

/// Outbox mode: changelog records a crashed instance left undelivered must not reach the
/// changelog late. A crashes with a written batch's changelog records still in its outbox; B
/// takes every partition over from the changelog, finishes the log and stops; then A comes
/// back on its old store. Sent now, A's leftovers would land after B's newer projections and
/// checkpoints, and a restore would take those stale projections with B's offsets (their
/// events since, lost). A drops them and restores its partitions instead; then C, on an empty
/// store, restores from the changelog. A's and C's projections must both equal the pure fold.
#[test]
fn changelog_leftovers_of_a_crashed_instance_are_not_sent_after_a_newer_owner() {
    changelog_leftovers("changelog-leftovers", &[1, 0, 2], 8);
}

/// The same crash at the first batch, so the changelog is still empty when A comes back on
/// its old store, first: its local state holds the dropped batch, which no changelog record
/// has. Kept (as before session 16), the batch's events were rejected as duplicates when
/// re-read, so its users that never changed again never reached the changelog, and C, restoring
/// from it, lacked them. A must delete the partition's local state and replay it instead.
#[test]
fn changelog_leftovers_of_a_first_batch_are_replayed_from_an_empty_changelog() {
    changelog_leftovers("changelog-leftovers-first", &[0, 2], 1);
}

/// A crashes after writing batch `crash_batch`; then instances `order` (0 is A on its old
/// store, 1 and 2 on empty ones) each process the whole log in turn; A's and C's (2)
/// projections must equal the pure fold.
fn changelog_leftovers(name: &str, order: &[usize], crash_batch: u64) {
    let b = TestBroker::new(name);
    let records = produce(&b, workload(53, 40_000, 4_000));
    let want = expected(&Default::default(), &records);
    let dirs = [(); 3].map(|()| tempfile::tempdir().unwrap());
    let cfg = |i: usize, crash| {
        let mut cfg = b.processor_config(dirs[i].path(), "g");
        cfg.changelog = true;
        cfg.batch_max_records = 1_000;
        cfg.crash_at = crash;
        cfg
    };
    let a = start(cfg(0, Some(CrashPoint::AfterStoreWrite(crash_batch))));
    match a.join_within(CATCH_UP) {
        Err(ProcessorError::InjectedCrash(_)) => {}
        other => panic!("expected the injected crash, got {other:?}"),
    }
    let left = forest_store::Store::open_read_only(dirs[0].path())
        .expect("read-only open")
        .outbox(usize::MAX)
        .expect("outbox read")
        .iter()
        .filter(|(_, e)| e.topic == b.topics.changelog)
        .count();
    assert!(left > 0, "the crash left changelog records in A's outbox");
    let ends = end_offsets(&b, &records);
    for &i in order {
        let p = start(cfg(i, None));
        wait_caught_up(&[&p.stats], &ends, CATCH_UP);
        p.stop().expect("graceful stop");
    }
    eprintln!(
        "{name}: {left} changelog records dropped; A after its restart: {}; C from the changelog: {}",
        check(&b, dirs[0].path(), &want),
        check(&b, dirs[2].path(), &want)
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
    // Created is not necessarily readable yet; a start-up check that cannot read the topic
    // fails with another error than the one this test wants (suspected in one failure in
    // session 16, under the whole suite's load; its message was not kept).
    wait_until("the one-partition changelog is readable", CATCH_UP, || {
        forest_kafka::end_offsets(&b.bootstrap, &narrow).is_ok_and(|e| e.len() == 1)
    });
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
