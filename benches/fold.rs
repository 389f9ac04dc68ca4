//! The pure fold over a realistic behaviour mix: events/s of `RuleSet::apply`, including the
//! per-user hash-map lookup the processor's cache does (`fold/`), the same with look-ahead
//! prefetching (`fold/ahead_`, how much of it is waiting for memory), the floor under any
//! fold with per-user state in a hash map (`floor/`), and the fold through the processor's
//! projection cache (`cache/`).
//!
//! Run: `cargo bench -p forest-benches --bench fold` (the release build, as BENCHMARKS.md uses)

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use forest_benches::{Slab, events, fold, fold_ahead, records};
use forest_domain::{RuleSet, UserState};
use forest_store::{ProjectionCache, Store, StoreConfig};
use rustc_hash::{FxHashMap, FxHashSet};
use std::hint::black_box;
use xxhash_rust::xxh3::xxh3_64;

fn bench(c: &mut Criterion) {
    let rules = RuleSet::default();
    let mut g = c.benchmark_group("fold");
    // 100 users: a small, hot working set (about 2.3 MiB of projections), the fold at its
    // fastest; 10 K and 1 M users spread the events over more state (BENCHMARKS.md,
    // session 17).
    for users in [100u64, 10_000, 1_000_000] {
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
        g.bench_function(format!("ahead_1M_events_{users}_users"), |b| {
            b.iter_batched(
                Slab::default,
                |mut slab| {
                    black_box(fold_ahead(&rules, &mut slab, &evs));
                    slab
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// The floor under any fold that keeps per-user state in a hash map, as the processor's cache
/// does: per event only find the user's (already loaded) projection and bump one field. At
/// 1 M users this is a random memory access per event, and it bounds what the rules can reach.
fn floor(c: &mut Criterion) {
    let mut g = c.benchmark_group("floor");
    for users in [10_000u64, 1_000_000] {
        let evs = events(&records(1_000_000, users));
        g.throughput(Throughput::Elements(evs.len() as u64));
        g.sample_size(10);
        let mut by_id = FxHashMap::<String, UserState>::default();
        let mut by_hash = FxHashMap::<u64, UserState>::default();
        for e in &evs {
            by_id
                .entry(e.user_id.clone())
                .or_insert_with(|| UserState::new(&e.user_id));
            by_hash
                .entry(xxh3_64(e.user_id.as_bytes()))
                .or_insert_with(|| UserState::new(&e.user_id));
        }
        g.bench_function(format!("lookup_only_{users}_users"), |b| {
            b.iter_batched_ref(
                || by_id.clone(),
                |states| {
                    for e in &evs {
                        if let Some(s) = states.get_mut(&e.user_id) {
                            s.balance_g += 1;
                        }
                    }
                },
                BatchSize::PerIteration,
            )
        });
        // The same keyed by a hash of the id: no key string to load and compare.
        let hashes: Vec<u64> = evs.iter().map(|e| xxh3_64(e.user_id.as_bytes())).collect();
        g.bench_function(format!("lookup_only_by_hash_{users}_users"), |b| {
            b.iter_batched_ref(
                || by_hash.clone(),
                |states| {
                    for h in &hashes {
                        if let Some(s) = states.get_mut(h) {
                            s.balance_g += 1;
                        }
                    }
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// The fold as the processor runs it once its users are cached: through
/// [`ProjectionCache::update`], whose map, dirty queue and eviction ring come with every event
/// (the `fold/` group keeps its own plain map). Every user is loaded before the timed part,
/// so no event reads RocksDB.
fn cached(c: &mut Criterion) {
    let rules = RuleSet::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &StoreConfig::default()).expect("store");
    let mut g = c.benchmark_group("cache");
    for users in [10_000u64, 100_000] {
        let evs = events(&records(1_000_000, users));
        let ids: FxHashSet<&str> = evs.iter().map(|e| e.user_id.as_str()).collect();
        g.throughput(Throughput::Elements(evs.len() as u64));
        g.sample_size(10);
        g.bench_function(format!("fold_1M_events_{users}_users_cached"), |b| {
            b.iter_batched(
                || {
                    let mut cache = ProjectionCache::new(usize::MAX);
                    for id in &ids {
                        let _ = cache.update(&store, id, |_| Ok::<_, ()>(())).expect("load");
                    }
                    cache
                },
                |mut cache| {
                    let mut applied = 0usize;
                    for e in &evs {
                        applied += usize::from(matches!(
                            cache.update(&store, &e.user_id, |s| rules.apply(s, e)),
                            Ok(Ok(_))
                        ));
                    }
                    black_box(applied);
                    cache // dropped outside the timed routine
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench, floor, cached);
criterion_main!(benches);
