//! A fold of a batch of decoded events into projections held in memory, with look-ahead:
//! what the fold alone can reach when nothing waits for memory that could have been asked
//! for earlier. The criterion fold benchmark (`fold/ahead_`) and `forest bench`'s ceiling
//! phase (f) measure it; the processor folds through its projection cache instead, with its
//! own staged prefetching.

use crate::{Event, RuleSet, UserState};
use compact_str::CompactString;
use rustc_hash::FxHashMap;

/// Projections in a slab, found through a map from user id to slot. The ids are inline, as
/// the processor's cache keeps them: a lookup's key compare reads no heap block.
#[derive(Default)]
pub struct Slab {
    pub index: FxHashMap<CompactString, u32>,
    pub states: Vec<UserState>,
}

impl Slab {
    /// A slab with room for `users` projections.
    pub fn with_capacity(users: usize) -> Self {
        Self {
            index: FxHashMap::with_capacity_and_hasher(users, Default::default()),
            states: Vec::with_capacity(users),
        }
    }
}

/// Folds `events` in order into `slab` (a user's projection is created by their first
/// event) and returns how many were applied (accepted).
///
/// All of the batch's users are found first: independent lookups, whose misses the CPU
/// overlaps. Then each event's projection is prefetched 8 events ahead, and the parts its
/// rules touch ([`RuleSet::prefetch`]) 3 events ahead.
pub fn fold_ahead(rules: &RuleSet, slab: &mut Slab, events: &[Event]) -> usize {
    let ix: Vec<u32> = events
        .iter()
        .map(|e| match slab.index.get(e.user_id.as_str()) {
            Some(&i) => i,
            None => {
                // A slab past u32::MAX users would not fit in memory anyway.
                let i = u32::try_from(slab.states.len()).unwrap_or(u32::MAX);
                slab.states.push(UserState::new(&e.user_id));
                slab.index.insert(CompactString::new(&e.user_id), i);
                i
            }
        })
        .collect();
    const FAR: usize = 8;
    const NEAR: usize = 3;
    let mut applied = 0;
    for (i, e) in events.iter().enumerate() {
        if let Some(s) = ix.get(i + FAR).and_then(|&j| slab.states.get(j as usize)) {
            let size = std::mem::size_of::<UserState>();
            crate::prefetch_lines(std::ptr::from_ref(s).cast(), size);
        }
        if let (Some(s), Some(n)) = (
            ix.get(i + NEAR).and_then(|&j| slab.states.get(j as usize)),
            events.get(i + NEAR),
        ) {
            rules.prefetch(s, n);
        }
        if let Some(s) = slab.states.get_mut(ix[i] as usize) {
            applied += usize::from(rules.apply(s, e).is_ok());
        }
    }
    applied
}
