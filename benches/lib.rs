//! Shared set-up for Forest's criterion benchmarks (`cargo bench -p forest-benches`).
//!
//! The workload is the same generator the demo and load generator use: Zipf users and the Ant
//! Forest behaviour mix, with the default shares of duplicates, late and malformed records.

use forest_domain::{Event, RuleSet, UserState};
use forest_workload::{Generator, Record, WorkloadConfig};
use rustc_hash::FxHashMap;

/// `events` records over `users` Zipf-distributed users.
pub fn records(events: u64, users: u64) -> Vec<Record> {
    Generator::new(WorkloadConfig {
        events,
        users,
        ..WorkloadConfig::default()
    })
    .collect()
}

/// The records that decode and validate, as domain events.
pub fn events(records: &[Record]) -> Vec<Event> {
    records.iter().filter_map(|r| r.to_event().ok()).collect()
}

/// Folds events into an in-memory map of projections, the way the processor's cache does.
/// Returns the number of events applied (accepted).
pub fn fold(rules: &RuleSet, states: &mut FxHashMap<String, UserState>, events: &[Event]) -> usize {
    let mut applied = 0;
    for e in events {
        let s = match states.get_mut(&e.user_id) {
            Some(s) => s,
            None => states
                .entry(e.user_id.clone())
                .or_insert_with(|| UserState::new(e.user_id.clone())),
        };
        applied += usize::from(rules.apply(s, e).is_ok());
    }
    applied
}

/// Projections in a slab, found through a map from user id to slot.
#[derive(Default)]
pub struct Slab {
    pub index: FxHashMap<String, u32>,
    pub states: Vec<UserState>,
}

/// Starts loading every cache line of `*p`.
#[inline]
fn touch<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that reads nothing and never faults, and every address is
    // inside `*p`. (`unsafe` is needed before Rust 1.87; the workspace's MSRV is 1.85.)
    #[allow(unused_unsafe)]
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let base = std::ptr::from_ref(p).cast::<i8>();
        let size = std::mem::size_of::<T>();
        let mut off = 0;
        while off < size {
            _mm_prefetch::<_MM_HINT_T0>(base.add(off));
            off += 64;
        }
        // `*p` need not start a cache line: its last byte may be on one the loop missed.
        if size > 0 {
            _mm_prefetch::<_MM_HINT_T0>(base.add(size - 1));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The same fold with look-ahead, to measure how much of the fold is waiting for memory: all
/// of a batch's users are found first (independent lookups the CPU overlaps), then each
/// event's projection is prefetched 8 events ahead, and the parts its rules touch
/// ([`RuleSet::prefetch`]) 3 events ahead. The processor folds record by record and does not
/// do this (see BENCHMARKS.md, session 9).
pub fn fold_ahead(rules: &RuleSet, slab: &mut Slab, events: &[Event]) -> usize {
    let ix: Vec<u32> = events
        .iter()
        .map(|e| match slab.index.get(&e.user_id) {
            Some(&i) => i,
            None => {
                let i = slab.states.len() as u32;
                slab.states.push(UserState::new(e.user_id.clone()));
                slab.index.insert(e.user_id.clone(), i);
                i
            }
        })
        .collect();
    const FAR: usize = 8;
    const NEAR: usize = 3;
    let mut applied = 0;
    for (i, e) in events.iter().enumerate() {
        if let Some(&j) = ix.get(i + FAR) {
            touch(&slab.states[j as usize]);
        }
        if let (Some(&j), Some(n)) = (ix.get(i + NEAR), events.get(i + NEAR)) {
            rules.prefetch(&slab.states[j as usize], n);
        }
        applied += usize::from(rules.apply(&mut slab.states[ix[i] as usize], e).is_ok());
    }
    applied
}
