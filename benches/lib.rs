//! Shared set-up for Forest's criterion benchmarks (`cargo bench -p forest-benches`).
//!
//! The workload is the same generator the demo and load generator use: Zipf users and the Ant
//! Forest behaviour mix, with the default shares of duplicates, late and malformed records.

use compact_str::CompactString;
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

/// Folds events into an in-memory map of projections, the way the processor's cache does
/// (keyed by inline ids, as its cache is: the key compare reads no heap block).
/// Returns the number of events applied (accepted).
pub fn fold(
    rules: &RuleSet,
    states: &mut FxHashMap<CompactString, UserState>,
    events: &[Event],
) -> usize {
    let mut applied = 0;
    for e in events {
        let s = match states.get_mut(e.user_id.as_str()) {
            Some(s) => s,
            None => states
                .entry(CompactString::new(&e.user_id))
                .or_insert_with(|| UserState::new(&e.user_id)),
        };
        applied += usize::from(rules.apply(s, e).is_ok());
    }
    applied
}

/// The look-ahead fold (`fold/ahead_`) lives in the domain crate, where `forest bench`'s
/// ceiling phase uses it too.
pub use forest_domain::batch::{Slab, fold_ahead};
