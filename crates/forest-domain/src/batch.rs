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
    fold_ahead_with(rules, slab, events, |_, _| {})
}

/// [`fold_ahead`], calling `accepted` with the slot (in `slab.states`) and the new state of
/// the projection each accepted event changed, just after it was applied (so the state is
/// in the CPU's caches): for a caller that keeps track of which projections changed, as
/// `forest bench`'s durable floor does to write them. A rejected event changes nothing and
/// is not reported.
pub fn fold_ahead_with(
    rules: &RuleSet,
    slab: &mut Slab,
    events: &[Event],
    mut accepted: impl FnMut(u32, &UserState),
) -> usize {
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
            s.prefetch_own_lines();
        }
        if let (Some(s), Some(n)) = (
            ix.get(i + NEAR).and_then(|&j| slab.states.get(j as usize)),
            events.get(i + NEAR),
        ) {
            rules.prefetch(s, n);
        }
        if let Some(s) = slab.states.get_mut(ix[i] as usize) {
            if rules.apply(s, e).is_ok() {
                applied += 1;
                accepted(ix[i], s);
            }
        }
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, Behaviour, Tally};
    use std::collections::HashMap;

    // 2025-11-25 12:00 Asia/Shanghai = 04:00 UTC.
    const NOON: i64 = 1_764_043_200_000;

    /// Rides of three users, then of a fourth, the last a repeat of an earlier one (a
    /// duplicate the rules reject).
    fn events() -> Vec<Event> {
        let mut evs: Vec<Event> = (0..39)
            .map(|i: i64| Event {
                event_id: format!("e{i}"),
                user_id: format!("u{}", if i < 30 { i % 3 } else { 3 }),
                occurred_at_ms: NOON + i * 60_000,
                received_at_ms: NOON + i * 60_000,
                action: Action::Credit {
                    behaviour: Behaviour::SubwayRide,
                    quantity: 1,
                    tally: Tally::Add,
                },
            })
            .collect();
        evs.push(evs[36].clone());
        evs
    }

    /// The batch fold with look-ahead gives what applying each event in turn gives, in one
    /// batch or two (the second making a new projection), and reports exactly the accepted
    /// events, each with its own user's slot.
    #[test]
    fn fold_ahead_matches_applying_in_turn_and_reports_each_accepted_event() {
        let rules = RuleSet::default();
        let evs = events();
        let mut plain: HashMap<String, UserState> = HashMap::new();
        let mut accepted_users = Vec::new();
        for e in &evs {
            let s = plain
                .entry(e.user_id.clone())
                .or_insert_with(|| UserState::new(&e.user_id));
            if rules.apply(s, e).is_ok() {
                accepted_users.push(e.user_id.clone());
            }
        }
        assert!(
            accepted_users.len() < evs.len(),
            "the duplicate is rejected"
        );

        let mut slab = Slab::with_capacity(4);
        let mut reported = Vec::new();
        let (first, rest) = evs.split_at(25);
        let mut applied = 0;
        for part in [first, rest] {
            applied += fold_ahead_with(&rules, &mut slab, part, |j, s| {
                reported.push((j, s.user_id.to_string()));
            });
        }
        assert_eq!(applied, accepted_users.len());
        let users: Vec<&String> = reported.iter().map(|(_, u)| u).collect();
        assert_eq!(users, accepted_users.iter().collect::<Vec<_>>());
        for (j, u) in &reported {
            assert_eq!(slab.states[*j as usize].user_id.as_str(), u);
        }
        assert_eq!(slab.states.len(), 4);
        assert_eq!(slab.states.len(), plain.len());
        for s in &slab.states {
            assert_eq!(Some(s), plain.get(s.user_id.as_str()));
        }
        assert_eq!(
            fold_ahead(&rules, &mut Slab::default(), &evs),
            accepted_users.len()
        );
    }
}
