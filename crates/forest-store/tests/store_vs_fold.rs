//! The real store (write-back cache + RocksDB, commits at random points, crashes at random
//! points followed by a replay from the stored offset) must end with exactly the projections of
//! a plain in-memory fold of the same events.

use forest_domain::{Event, RuleSet, UserState};
use forest_store::{OutboxEntry, ProjectionCache, Store, StoreConfig};
use forest_workload::{Generator, WorkloadConfig};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn plain_fold(rules: &RuleSet, events: &[Event]) -> (BTreeMap<String, UserState>, Vec<String>) {
    let mut states: BTreeMap<String, UserState> = BTreeMap::new();
    let mut trees = Vec::new();
    for e in events {
        let s = states
            .entry(e.user_id.clone())
            .or_insert_with(|| UserState::new(&e.user_id));
        if let Ok(o) = rules.apply(s, e) {
            trees.extend(o.trees.into_iter().map(|t| t.tree_id));
        }
    }
    // The store only writes users with at least one accepted event.
    states.retain(|_, s| s.newest_event_ms.is_some());
    (states, trees)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn store_with_crashes_equals_plain_fold(
        seed in 0u64..1_000,
        commit_every in 1usize..300,
        crash_points in proptest::collection::btree_set(0usize..3_000, 0..6),
        cache_capacity in 1usize..200,
    ) {
        let rules = RuleSet::default();
        let events: Vec<Event> = Generator::new(WorkloadConfig {
            seed, users: 150, events: 3_000, duplicate_rate: 0.05, late_rate: 0.02,
            span_ms: 10 * 86_400_000, ..WorkloadConfig::default()
        })
        .filter_map(|r| r.to_event().ok())
        .collect();
        let (want, want_trees) = plain_fold(&rules, &events);

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        let mut cache = ProjectionCache::new(cache_capacity);
        let mut crashes: Vec<usize> = crash_points.into_iter().collect();
        let mut delivered_trees = Vec::new();
        let mut pending: Vec<OutboxEntry> = Vec::new();
        let mut i = 0usize;
        while i < events.len() {
            if crashes.first() == Some(&i) {
                crashes.remove(0);
                // Crash: lose everything in memory, restart from the stored offset.
                cache = ProjectionCache::new(cache_capacity);
                pending.clear();
                i = store.offset("in", 0).unwrap().unwrap_or(0) as usize;
                continue;
            }
            let e = &events[i];
            if let Ok(o) = cache.update(&store, &e.user_id, |s| rules.apply(s, e)).unwrap() {
                for t in o.trees {
                    pending.push(OutboxEntry { topic: "trees".into(), key: vec![], value: t.tree_id.into_bytes(), headers: vec![], partition: None });
                }
            }
            i += 1;
            if i % commit_every == 0 || i == events.len() {
                cache.commit(&store, [("in", 0, i as i64)], &pending).unwrap();
                pending.clear();
                // "Deliver" the outbox, then delete it, as the processor does.
                for (seq, entry) in store.outbox(usize::MAX).unwrap() {
                    delivered_trees.push(String::from_utf8(entry.value).unwrap());
                    store.remove_outbox([seq]).unwrap();
                }
            }
        }
        let got: BTreeMap<String, UserState> =
            store.users().map(|s| s.unwrap()).map(|s| (s.user_id.to_string(), s)).collect();
        prop_assert_eq!(got.len(), want.len());
        for (u, s) in &want {
            prop_assert_eq!(got.get(u), Some(s), "user {}", u);
        }
        // Every predicted tree delivered; after dedupe, exactly the predicted set.
        let mut dedup = delivered_trees.clone();
        dedup.sort();
        dedup.dedup();
        let mut want_sorted = want_trees.clone();
        want_sorted.sort();
        prop_assert_eq!(dedup, want_sorted);
    }
}
