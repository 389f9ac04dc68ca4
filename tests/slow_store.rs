//! Backpressure from a slow RocksDB, on both brokers: while every store write takes a second,
//! consumption waits and memory stays bounded. Its own test binary (one test, one process), so
//! the process's RSS it samples is not another test's.

use forest_tests::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const CATCH_UP: Duration = Duration::from_secs(300);

/// Every store write is delayed by 1 s for 12 s (the processor's fault-injection knob
/// `store_write_delay_ms`) while plenty of input is waiting. The processor folds, writes and
/// delivers a batch before it reads on, and the merge pauses full lanes, so the records it
/// has consumed but not committed stay within its configuration ([`uncommitted_bound`]), and its memory does not grow with the backlog. Then the delay
/// goes and every invariant holds.
#[test]
fn a_slow_store_holds_consumption_back_and_memory_stays_bounded() {
    let b = TestBroker::new("slow-store");
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // A merge bound well under the backlog, as tests/backpressure.rs uses, so the slow phase
    // runs the merge against its bound (with the default 200,000 it would never get there).
    let mut cfg = b.processor_config(dir.path(), "g");
    cfg.max_buffered = 50_000;
    let delay = cfg.store_write_delay_ms.clone();
    let records = produce(&b, workload(83, 300_000, 30_000));
    let want = expected(&Default::default(), &records);
    let ends = end_offsets(&b, &records);
    let bound = uncommitted_bound(&cfg);
    // As in tests/backpressure.rs: the processor's buffers hold at most `bound` records, and
    // the whole 300,000-record input is ~60 MB once buffered with its allocations.
    const RSS_GROWTH_BOUND: u64 = 64 << 20;
    let get = forest_processor::ProcessorStats::get;
    let p = start(cfg);
    wait_until("the processor is under way", CATCH_UP, || {
        get(&p.stats.committed_records) >= 20_000
    });
    let phase = SlowPhase::run(
        &p.stats,
        Duration::from_secs(12),
        || delay.store(1_000, Ordering::Relaxed),
        || delay.store(0, Ordering::Relaxed),
    );
    wait_caught_up(&[&p.stats], &ends, CATCH_UP);
    let stats = p.stats.clone();
    p.stop().expect("graceful stop");
    let broker = if b.is_real() {
        "Apache Kafka"
    } else {
        "mock cluster"
    };
    phase.check(
        &format!("slow store on {broker} (12 s of 1 s store writes)"),
        records.len() as u64,
        bound,
        RSS_GROWTH_BOUND,
    );
    check_stats(&stats, &want, records.len());
    eprintln!(
        "slow store: {}; {:.1} s",
        check_exact(&b, dir.path(), &want),
        started.elapsed().as_secs_f64()
    );
}
