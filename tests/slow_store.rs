//! Backpressure from a slow RocksDB, on both brokers: while every store write takes a second,
//! consumption waits and memory stays bounded. Its own test binary (one test, one process), so
//! the process's RSS it samples is not another test's.

use forest_tests::*;
use std::sync::atomic::Ordering;

/// Every store write is delayed by 1 s for 12 s (the processor's fault-injection knob
/// `store_write_delay_ms`) while plenty of input is waiting. The processor folds, writes and
/// delivers a batch before it reads on, and the merge pauses full lanes, so the records it
/// has consumed but not committed stay within its configuration ([`uncommitted_bound`]), and
/// its memory does not grow with the backlog. Then the delay goes and every invariant holds.
#[test]
fn a_slow_store_holds_consumption_back_and_memory_stays_bounded() {
    let b = TestBroker::new("slow-store");
    let dir = tempfile::tempdir().unwrap();
    // A merge bound well under the backlog, as tests/backpressure.rs uses, so the slow phase
    // runs the merge against its bound (with the default 200,000 it would never get there).
    let mut cfg = b.processor_config(dir.path(), "g");
    cfg.max_buffered = 50_000;
    let delay = cfg.store_write_delay_ms.clone();
    let broker = if b.is_real() {
        "Apache Kafka"
    } else {
        "mock cluster"
    };
    slow_phase_campaign(
        &b,
        dir.path(),
        cfg,
        83,
        &format!("slow store on {broker} (12 s of 1 s store writes)"),
        || delay.store(1_000, Ordering::Relaxed),
        || delay.store(0, Ordering::Relaxed),
    );
}
