//! Backpressure on the mock cluster: a slow output topic holds consumption back and memory
//! stays bounded. Its own test binary (one test, one process), so the process's RSS it samples
//! is not another test's.

use forest_tests::*;
use std::time::Duration;

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
    slow_phase_campaign(
        &b,
        dir.path(),
        cfg,
        81,
        "backpressure (12 s of 1 s output round trips)",
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
}
