//! Backpressure on the mock cluster: a slow output topic holds consumption back and memory
//! stays bounded. Its own test binary (one test, one process), so the process's RSS it samples
//! is not another test's.

use forest_tests::*;
use std::time::{Duration, Instant};

const CATCH_UP: Duration = Duration::from_secs(300);

/// Backpressure: the output topics' broker becomes slow (1 s round trips) for 12 s while
/// plenty of input is waiting. The processor waits for each batch's outputs before reading
/// on, so the records it has consumed but not committed stay within what its configuration
/// allows ([`uncommitted_bound`]), and the process's memory
/// does not grow with the backlog. Afterwards it catches up and every invariant holds.
#[test]
fn a_slow_output_broker_holds_consumption_back_and_memory_stays_bounded() {
    use rdkafka::mocking::MockCoordinator;
    // Always the mock cluster (two brokers: inputs and the group on broker 1, outputs on 2).
    let b = TestBroker::embedded_cluster("backpressure", 2);
    let started = Instant::now();
    let cluster = b.embedded.as_ref().expect("embedded broker").cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = b.processor_config(dir.path(), "g");
    cfg.max_buffered = 50_000;
    for (topics, broker) in [
        (
            vec![&b.topics.payments, &b.topics.mobility, &b.topics.commands],
            1,
        ),
        (vec![&b.topics.trees, &b.topics.dlq, &b.topics.changelog], 2),
    ] {
        for t in topics {
            for p in 0..PARTITIONS {
                cluster
                    .partition_leader(t, p, Some(broker))
                    .expect("partition leader");
            }
        }
    }
    cluster
        .coordinator(MockCoordinator::Group(cfg.group_id.clone()), 1)
        .expect("group coordinator");
    let records = produce(&b, workload(81, 300_000, 30_000));
    let want = expected(&Default::default(), &records);
    let ends = end_offsets(&b, &records);
    let bound = uncommitted_bound(&cfg);
    // Memory: the processor's buffers hold at most `bound` records (~200 B each with their
    // allocations: ~11 MB) and librdkafka's prefetch is capped by its queue settings; the
    // 240,000-record backlog buffered in the process would take ~50 MB more. Measured growth
    // was ~20 MB; the bound allows 64 MB. (The counter check above is the precise one.)
    const RSS_GROWTH_BOUND: u64 = 64 << 20;
    let get = forest_processor::ProcessorStats::get;
    let p = start(cfg);
    wait_until("the processor is under way", CATCH_UP, || {
        get(&p.stats.committed_records) >= 20_000
    });
    let phase = SlowPhase::run(
        &p.stats,
        Duration::from_secs(12),
        || {
            cluster
                .broker_round_trip_time(2, Duration::from_millis(1_000))
                .expect("slow output broker")
        },
        || {
            cluster
                .broker_round_trip_time(2, Duration::ZERO)
                .expect("output broker back to normal")
        },
    );
    wait_caught_up(&[&p.stats], &ends, CATCH_UP);
    let stats = p.stats.clone();
    p.stop().expect("graceful stop");
    phase.check(
        "backpressure (12 s of 1 s output round trips)",
        records.len() as u64,
        bound,
        RSS_GROWTH_BOUND,
    );
    check_stats(&stats, &want, records.len());
    eprintln!(
        "backpressure: {}; {:.1} s",
        check_exact(&b, dir.path(), &want),
        started.elapsed().as_secs_f64()
    );
}
