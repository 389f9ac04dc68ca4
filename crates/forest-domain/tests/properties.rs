//! Property tests of the fold. Each property is a check that fails on a counter-example, and
//! each one also counts, over all its cases, how often the situation it is about actually
//! happened (a cap reached, a tree matured, the dedupe bound passed...) and fails if that was
//! too rare for the property to mean anything. Those tests drive proptest's `TestRunner` by
//! hand so the counts can be checked once every case has run.
//!
//! Generated streams include too-early events (dated more than the allowed skew after their
//! record time), late ones (some beyond the grace window) and rejected values.
//!
//! Where order matters (property 5's documentation): within one local day, the final
//! balance, lifetime grams, trees matured, cap counters, walking day quantities and remembered
//! ids do not depend on the order of credit events, because every default rule with a count
//! cap earns a fixed number of grams per event, every gram cap credits the part that fits, and
//! a walking day's quantity is a sum and a maximum (see `QuantityScope::Day`). What DOES depend
//! on order:
//! - which event's explanation shows the cap (the first ones earn, the later ones are capped);
//! - how many events a gram-capped behaviour counted in its bucket (the grams are order-free,
//!   but the event that fills the cap exactly stops later ones from counting);
//! - which walking report is rejected as ABSURD_VALUE when the day's reports add up to more
//!   than the limit (the one that crosses it), and so whether a later day total is accepted:
//!   property 5 keeps each day's walking within the limit;
//! - a tree's `matured_at_ms` and `trigger_event_id` (the event that completed it);
//! - species and timezone commands (they change what later events do);
//! - events spanning more than the grace window (a late one may be rejected or not);
//! - the dedupe floor, once a user has more ids in the window than `dedupe_max_ids`;
//! - a per-unit rule with a count cap, if a rules file defines one (the default has none).

use chrono::TimeZone;
use forest_domain::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

const NOON: i64 = 1_764_043_200_000; // 2026-11-25 12:00 Asia/Shanghai
const H: i64 = 3_600_000;
const DAY: i64 = 24 * H;
const MIN: i64 = 60_000;
/// Walking's day limit in the default rules.
const WALK_MAX: i64 = 100_000;

fn quantity(b: Behaviour) -> BoxedStrategy<i64> {
    match b {
        Behaviour::Walking
        | Behaviour::BikeRide
        | Behaviour::EBikeRide
        | Behaviour::CarpoolRide => prop_oneof![
            8 => 0..20_000i64,
            1 => 90_000..320_000i64,
            1 => -5..0i64,
        ]
        .boxed(),
        _ => prop_oneof![9 => 0..100_000i64, 1 => -5..0i64].boxed(),
    }
}

fn credit_of(behaviours: Vec<Behaviour>) -> impl Strategy<Value = Action> {
    proptest::sample::select(behaviours).prop_flat_map(|b| {
        let tally = if b == Behaviour::Walking {
            prop_oneof![Just(Tally::Add), Just(Tally::DayTotal)].boxed()
        } else {
            Just(Tally::Add).boxed()
        };
        (quantity(b), tally).prop_map(move |(q, tally)| Action::Credit {
            behaviour: b,
            quantity: q,
            tally,
        })
    })
}

fn credit_action() -> impl Strategy<Value = Action> {
    credit_of(Behaviour::ALL.to_vec())
}

/// Credits mostly (4 in 5) of one or two behaviours, as a busy user's day looks.
fn focused_credit_action() -> impl Strategy<Value = BoxedStrategy<Action>> {
    proptest::sample::subsequence(Behaviour::ALL.to_vec(), 1..=2)
        .prop_map(|focus| prop_oneof![4 => credit_of(focus), 1 => credit_action()].boxed())
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        20 => credit_action(),
        1 => proptest::sample::select(vec!["saxaul", "red_willow", "sand_willow", "oak"])
            .prop_map(|s| Action::ChooseSpecies { species_id: s.to_string() }),
    ]
}

/// Record time minus event time: mostly a normal delay (the record is up to 20 min after the
/// event, or stamped up to the allowed 10 min skew before it), sometimes too early (the event is
/// dated more than the skew after its record time).
fn record_offset() -> impl Strategy<Value = i64> {
    prop_oneof![
        14 => -10 * MIN..20 * MIN,
        1 => -3 * H..-10 * MIN - 1,
    ]
}

fn event(i: usize, occurred_at_ms: i64, received_at_ms: i64, action: Action) -> Event {
    Event {
        event_id: format!("e{i}"),
        user_id: "u".into(),
        occurred_at_ms,
        received_at_ms,
        action,
    }
}

/// Events of one user over `span_ms`, in arbitrary (not sorted) time order, with distinct ids.
fn events(
    span_ms: i64,
    actions: impl Strategy<Value = Action>,
    max: usize,
) -> impl Strategy<Value = Vec<Event>> {
    proptest::collection::vec((0..span_ms, record_offset(), actions), 1..max).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (dt, off, action))| event(i, NOON + dt, NOON + dt + off, action))
            .collect()
    })
}

/// Events of one user over `span_ms` as a live stream delivers them: in record-time order,
/// with about one in ten dated up to four days back (late; beyond 72 h, too late) and some
/// too early.
fn timeline(
    span_ms: i64,
    actions: impl Strategy<Value = Action>,
    max: usize,
) -> impl Strategy<Value = Vec<Event>> {
    let back = prop_oneof![9 => Just(0i64), 1 => 0..4 * DAY];
    proptest::collection::vec((0..span_ms, back, record_offset(), actions), 1..max).prop_map(
        |mut v| {
            v.sort_by_key(|(dt, ..)| *dt);
            v.into_iter()
                .enumerate()
                .map(|(i, (dt, back, off, action))| {
                    let occurred = NOON + dt - back;
                    event(i, occurred, occurred + back + off, action)
                })
                .collect()
        },
    )
}

/// An empty projection, or one that already holds `balance` grams (credited earlier).
fn user_with(balance: u64) -> UserState {
    let mut s = UserState::new("u");
    s.balance_g = balance;
    s.lifetime_g = balance;
    s
}

type Outs = Vec<Result<(Option<u64>, Vec<String>), Rejection>>;

fn fold_from(r: &RuleSet, mut s: UserState, evs: &[Event]) -> (UserState, Outs) {
    let outs = evs
        .iter()
        .map(|e| {
            r.apply(&mut s, e).map(|o| {
                (
                    o.credit.map(|c| c.credited_g),
                    o.trees.into_iter().map(|t| t.tree_id).collect(),
                )
            })
        })
        .collect();
    (s, outs)
}

fn fold(r: &RuleSet, evs: &[Event]) -> (UserState, Outs) {
    fold_from(r, UserState::new("u"), evs)
}

/// Runs `test` on `cases` generated values and panics with the (shrunk) counter-example if
/// it fails once; else returns the number of cases.
fn run_cases<S: Strategy>(
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u32
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
    cases
}

/// Fails unless `hits` is at least `share` of `cases`.
fn assert_often(what: &str, hits: u32, cases: u32, share: f64) {
    assert!(
        f64::from(hits) >= share * f64::from(cases),
        "{what}: only {hits} of {cases} cases, the property hardly tested it"
    );
}

/// What [`check_caps`] saw reach a cap.
#[derive(Default)]
struct CapsHit {
    count: bool,
    grams: bool,
}

/// Applies `evs` and checks, with buckets recomputed here independently, that no credit takes
/// a cap's bucket over its limit.
fn check_caps(r: &RuleSet, evs: &[Event]) -> Result<CapsHit, TestCaseError> {
    let mut s = UserState::new("u");
    let mut hit = CapsHit::default();
    // (behaviour, period, bucket) -> (events, grams)
    let mut used: BTreeMap<(Behaviour, CapPeriod, (i32, u32, u32)), (u32, u64)> = BTreeMap::new();
    for e in evs {
        let Ok(o) = r.apply(&mut s, e) else { continue };
        let c = o.credit.expect("credit events give a credit");
        match c.limited_by {
            Some(Limit::Cap(Cap {
                limit: CapLimit::Events(_),
                ..
            })) => hit.count = true,
            Some(Limit::Cap(Cap {
                limit: CapLimit::Grams(_),
                ..
            })) => hit.grams = true,
            _ => {}
        }
        if c.credited_g == 0 {
            continue;
        }
        let local = chrono_tz::Asia::Shanghai
            .timestamp_millis_opt(e.occurred_at_ms)
            .unwrap();
        let day = (
            chrono::Datelike::year(&local),
            chrono::Datelike::month(&local),
            chrono::Datelike::day(&local),
        );
        let month = (day.0, day.1, 0);
        for cap in &r.rule(c.behaviour).unwrap().caps {
            let key = match cap.period {
                CapPeriod::Day => day,
                CapPeriod::Month => month,
            };
            let u = used.entry((c.behaviour, cap.period, key)).or_default();
            u.0 += 1;
            u.1 += c.credited_g;
            match cap.limit {
                CapLimit::Events(n) => prop_assert!(
                    u.0 <= n,
                    "{} {:?} {:?}: {} events",
                    c.behaviour,
                    cap.period,
                    key,
                    u.0
                ),
                CapLimit::Grams(g) => prop_assert!(
                    u.1 <= g,
                    "{} {:?} {:?}: {} g",
                    c.behaviour,
                    cap.period,
                    key,
                    u.1
                ),
            }
        }
    }
    Ok(hit)
}

/// 1. No sequence of events exceeds a cap: events in any order over 40 days.
#[test]
fn caps_are_never_exceeded() {
    let r = RuleSet::default();
    run_cases(256, events(40 * DAY, credit_action(), 400), |evs| {
        check_caps(&r, &evs).map(drop)
    });
}

/// 1b. The same on busy streams: time-sorted, over 1 to 3 days, mostly one or two behaviours,
/// so caps are reached, which the test checks happens.
#[test]
fn caps_are_never_exceeded_on_busy_days() {
    let r = RuleSet::default();
    let (count, grams) = (Cell::new(0), Cell::new(0));
    let strategy = (1..=3i64, focused_credit_action())
        .prop_flat_map(|(days, actions)| timeline(days * DAY, actions, 250));
    let cases = run_cases(256, strategy, |evs| {
        let hit = check_caps(&r, &evs)?;
        count.set(count.get() + u32::from(hit.count));
        grams.set(grams.get() + u32::from(hit.grams));
        Ok(())
    });
    assert_often("a count cap reached", count.get(), cases, 0.25);
    assert_often("a gram cap reached", grams.get(), cases, 0.25);
}

/// 2. Conservation after every event: lifetime == balance + spent on trees, on live-ordered
/// streams over 60 days from a balance already part-way to a tree; trees must mature in most
/// cases for this to test the spending side.
#[test]
fn energy_is_conserved() {
    let r = RuleSet::default();
    let matured = Cell::new(0);
    let strategy = (timeline(60 * DAY, action(), 600), 0..18_000u64);
    let cases = run_cases(256, strategy, |(evs, start)| {
        let mut s = user_with(start);
        let mut credited = start;
        let mut spent = 0u64;
        let mut trees = 0u64;
        for e in &evs {
            if let Ok(o) = r.apply(&mut s, e) {
                credited += o.credit.map_or(0, |c| c.credited_g);
                spent += o.trees.iter().map(|t| t.energy_spent_g).sum::<u64>();
                trees += o.trees.len() as u64;
            }
            prop_assert_eq!(s.lifetime_g, s.balance_g + s.spent_g);
            prop_assert_eq!(
                (s.lifetime_g, s.spent_g, s.trees_matured),
                (credited, spent, trees)
            );
        }
        matured.set(matured.get() + u32::from(trees > 0));
        Ok(())
    });
    assert_often("a tree matured", matured.get(), cases, 0.5);
}

/// 3. Determinism: the same sequence from empty, twice, gives equal states and outcomes. The
/// second run is on a fresh thread (so the per-thread day memo starts cold) and stores and
/// reloads the projection (the store's encoding) part-way through, as a processor restart does.
#[test]
fn the_fold_is_deterministic() {
    let r = RuleSet::default();
    let strategy = (
        timeline(10 * DAY, action(), 300),
        any::<prop::sample::Index>(),
    );
    run_cases(256, strategy, |(evs, cut)| {
        let straight = fold(&r, &evs);
        let k = cut.index(evs.len() + 1);
        let restarted = std::thread::scope(|sc| {
            sc.spawn(|| {
                let (s, mut outs) = fold(&r, &evs[..k]);
                let bytes = postcard::to_allocvec(&s).expect("a projection encodes");
                let back: UserState = postcard::from_bytes(&bytes).expect("and decodes");
                let (s, rest) = fold_from(&r, back, &evs[k..]);
                outs.extend(rest);
                (s, outs)
            })
            .join()
            .expect("the fold does not panic")
        });
        prop_assert_eq!(straight, restarted);
        Ok(())
    });
}

/// Re-delivers copies of `evs` at random later positions; checks that every copy is rejected
/// without changing the state and that the end state equals the clean run's. Returns whether
/// a copy of an ACCEPTED event was rejected as too late (its id had left the dedupe window).
fn check_redelivery(
    r: &RuleSet,
    evs: &[Event],
    dups: &[(prop::sample::Index, prop::sample::Index)],
) -> Result<bool, TestCaseError> {
    let (clean, _) = fold(r, evs);
    // (position, is a copy, event); each copy of event i goes somewhere after i.
    let mut with: Vec<(usize, bool, &Event)> = evs
        .iter()
        .enumerate()
        .map(|(i, e)| (2 * i, false, e))
        .collect();
    for (a, b) in dups {
        let i = a.index(evs.len());
        let after = 2 * i + 1 + 2 * b.index(evs.len() - i);
        with.push((after, true, &evs[i]));
    }
    with.sort_by_key(|(k, ..)| *k);
    let mut s = UserState::new("u");
    let mut accepted = std::collections::HashSet::new();
    let mut too_late = false;
    for (_, copy, e) in with {
        if !copy {
            if r.apply(&mut s, e).is_ok() {
                accepted.insert(e.event_id.as_str());
            }
            continue;
        }
        let before = s.clone();
        match r.apply(&mut s, e) {
            Ok(o) => prop_assert!(false, "re-delivered {} was accepted: {:?}", e.event_id, o),
            Err(Rejection::TooLate { .. }) if accepted.contains(e.event_id.as_str()) => {
                too_late = true;
            }
            Err(_) => {}
        }
        prop_assert_eq!(&s, &before);
    }
    prop_assert_eq!(s, clean);
    Ok(too_late)
}

/// 4. Re-delivered events, interleaved anywhere after their original, never change the state.
#[test]
fn redelivery_never_changes_the_state() {
    let r = RuleSet::default();
    let strategy = (
        events(5 * DAY, action(), 200),
        proptest::collection::vec(any::<(prop::sample::Index, prop::sample::Index)>(), 0..100),
    );
    run_cases(256, strategy, |(evs, dups)| {
        check_redelivery(&r, &evs, &dups).map(drop)
    });
}

/// 4b. The same past the dedupe bound: with `dedupe_max_ids` = 16, most users remember fewer
/// ids than they sent. As documented on `UserState`, the floor then rises, and a re-delivery
/// of a forgotten id is rejected as too late, never credited twice; the test checks that the
/// floor is reached and such rejections happen.
#[test]
fn redelivery_past_the_dedupe_bound_is_too_late_not_a_second_credit() {
    let mut r = RuleSet::default();
    r.dedupe_max_ids = 16;
    let (floors, late) = (Cell::new(0), Cell::new(0));
    let strategy = (
        timeline(2 * DAY, credit_action(), 200),
        proptest::collection::vec(any::<(prop::sample::Index, prop::sample::Index)>(), 0..100),
    );
    let cases = run_cases(256, strategy, |(evs, dups)| {
        let (clean, _) = fold(&r, &evs);
        prop_assert!(clean.recent_ids.len() <= 16);
        floors.set(floors.get() + u32::from(clean.dedupe_floor_ms.is_some()));
        let too_late = check_redelivery(&r, &evs, &dups)?;
        late.set(late.get() + u32::from(too_late));
        Ok(())
    });
    assert_often("the dedupe floor raised", floors.get(), cases, 0.5);
    assert_often("a forgotten id re-delivered", late.get(), cases, 0.4);
}

/// Keeps every day's walking within the absurd limit in any order (see the module docs): the
/// interval reports' sum and each day total at most [`WALK_MAX`].
fn within_walking_limit(mut evs: Vec<Event>) -> Vec<Event> {
    let mut added = 0i64;
    for e in &mut evs {
        if let Action::Credit {
            behaviour: Behaviour::Walking,
            quantity,
            tally,
        } = &mut e.action
        {
            if *quantity < 0 {
                continue;
            }
            match tally {
                Tally::Add => {
                    *quantity = (*quantity).min(WALK_MAX - added);
                    added += *quantity;
                }
                Tally::DayTotal => *quantity = (*quantity).min(WALK_MAX),
            }
        }
    }
    evs
}

/// 5. Within one local day, the order of credit events does not change the totals, from a
/// balance close to a tree, so that trees mature and their count is compared too.
#[test]
fn order_within_a_day_does_not_matter() {
    let r = RuleSet::default();
    let (credited, matured) = (Cell::new(0), Cell::new(0));
    let strategy = (
        // NOON..NOON+11h stays within 2026-11-25 in Shanghai.
        events(11 * H, credit_action(), 200).prop_map(within_walking_limit),
        any::<u64>(),
        10_000..17_900u64,
    );
    let key = |s: &UserState| {
        // A gram-capped behaviour's event count is not order-free (see the module docs).
        let counts_events = |b: Behaviour| {
            r.rule(b)
                .unwrap()
                .caps
                .iter()
                .any(|c| matches!(c.limit, CapLimit::Events(_)))
        };
        let counters: BTreeSet<_> = s
            .counters
            .iter()
            .map(|c| {
                (
                    c.behaviour,
                    format!("{:?}", c.bucket),
                    counts_events(c.behaviour).then_some(c.events),
                    c.grams,
                )
            })
            .collect();
        let days: BTreeSet<_> = s
            .day_quantities
            .iter()
            .map(|q| (q.behaviour, q.day, q.added, q.day_total))
            .collect();
        let ids: BTreeSet<_> = s.recent_ids.iter().copied().collect();
        (
            (s.balance_g, s.lifetime_g, s.spent_g, s.trees_matured),
            s.newest_event_ms,
            counters,
            days,
            ids,
        )
    };
    let cases = run_cases(256, strategy, |(evs, seed, start)| {
        let mut shuffled = evs.clone();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let (a, _) = fold_from(&r, user_with(start), &evs);
        let (b, _) = fold_from(&r, user_with(start), &shuffled);
        prop_assert_eq!(key(&a), key(&b));
        credited.set(credited.get() + u32::from(a.lifetime_g > start));
        matured.set(matured.get() + u32::from(a.trees_matured > 0));
        Ok(())
    });
    assert_often("energy credited", credited.get(), cases, 0.8);
    assert_often("a tree matured", matured.get(), cases, 0.4);
}
