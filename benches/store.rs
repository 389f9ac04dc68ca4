//! Store batch apply: folding events and committing batches of 5,000 to RocksDB, with the
//! write-back cache (each touched user written once per batch, hot users served from memory)
//! and without it (every event reads its user from RocksDB and writes it back in the batch).
//!
//! Run (shares the test build, no release RocksDB build needed):
//! `cargo bench --workspace --profile test --bench store`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use forest_benches::{events, records};
use forest_domain::{RuleSet, UserState};
use forest_store::{ProjectionCache, Store, StoreConfig};
use std::hint::black_box;

const BATCH: usize = 5_000;

fn bench(c: &mut Criterion) {
    let rules = RuleSet::default();
    let evs = events(&records(200_000, 50_000));
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(evs.len() as u64));
    g.sample_size(10);
    g.bench_function("200k_events_batches_of_5000_write_back_cache", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("tempdir"),
            |dir| {
                let store = Store::open(dir.path(), &StoreConfig::default()).expect("store");
                let mut cache = ProjectionCache::new(1_000_000);
                for (i, chunk) in evs.chunks(BATCH).enumerate() {
                    for e in chunk {
                        let _ = black_box(
                            cache
                                .update(&store, &e.user_id, |s| rules.apply(s, e))
                                .expect("read"),
                        );
                    }
                    cache
                        .commit(&store, [("t", 0, i as i64)], &[])
                        .expect("commit");
                }
                (store, dir)
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("200k_events_batches_of_5000_no_cache", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("tempdir"),
            |dir| {
                let store = Store::open(dir.path(), &StoreConfig::default()).expect("store");
                for (i, chunk) in evs.chunks(BATCH).enumerate() {
                    // Read-modify-write per event; a batch holds one state per event.
                    let mut states: Vec<UserState> = Vec::with_capacity(chunk.len());
                    for e in chunk {
                        let mut s = match states.iter().rposition(|s| s.user_id == e.user_id) {
                            Some(p) => states[p].clone(),
                            None => store
                                .get_user(&e.user_id)
                                .expect("read")
                                .unwrap_or_else(|| UserState::new(&e.user_id)),
                        };
                        if rules.apply(&mut s, e).is_ok() {
                            states.push(s);
                        }
                    }
                    store
                        .commit(
                            states.iter().map(|s| (s, forest_store::NO_POSITION)),
                            [("t", 0, i as i64)],
                            &[],
                        )
                        .expect("commit");
                }
                (store, dir)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
