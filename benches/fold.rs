//! The pure fold over a realistic behaviour mix: events/s of `RuleSet::apply`, including the
//! per-user hash-map lookup the processor's cache does.
//!
//! Run: `cargo bench -p forest-benches --bench fold`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use forest_benches::{events, fold, records};
use forest_domain::RuleSet;
use rustc_hash::FxHashMap;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let rules = RuleSet::default();
    let mut g = c.benchmark_group("fold");
    for users in [10_000u64, 1_000_000] {
        let evs = events(&records(1_000_000, users));
        g.throughput(Throughput::Elements(evs.len() as u64));
        g.sample_size(10);
        g.bench_function(format!("1M_events_{users}_users"), |b| {
            b.iter_batched(
                FxHashMap::default,
                |mut states| {
                    black_box(fold(&rules, &mut states, &evs));
                    states // dropped outside the timed routine
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
