//! Fuzzing decode + validate + apply with proptest (cargo-fuzz needs a nightly compiler and
//! libFuzzer, which CI does not have; proptest runs everywhere and shrinks failures).
//!
//! Inputs are arbitrary bytes, and valid workload records and hostile records mutated by byte
//! flips, insertions, deletions and truncation, so most cases get past the first tag. The
//! properties: nothing panics; a rejected event leaves the projection unchanged; an accepted
//! one adds exactly its credit to lifetime grams, and grams are conserved between the balance
//! and matured trees.
//! More cases: `PROPTEST_CASES=100000 cargo test -p forest-workload --test fuzz`.

use forest_domain::{Event, InputKind, RuleSet, UserState};
use forest_workload::hostile::corpus;
use forest_workload::{Generator, WorkloadConfig};
use proptest::prelude::*;
use std::sync::LazyLock;

/// (topic kind, value, record timestamp) of valid, malformed and hostile records.
static SEEDS: LazyLock<Vec<(InputKind, Vec<u8>, i64)>> = LazyLock::new(|| {
    let good = Generator::new(WorkloadConfig {
        events: 300,
        users: 20,
        malformed_rate: 0.05,
        ..WorkloadConfig::default()
    })
    .map(|r| (r.topic, r.value, r.timestamp_ms));
    let hostile = corpus(5, 200, 1_764_000_000_000)
        .into_iter()
        .filter(|(_, r)| r.value.len() < 4_096)
        .map(|(_, r)| (r.topic, r.value, r.timestamp_ms));
    good.chain(hostile).collect()
});

static RULES: LazyLock<RuleSet> = LazyLock::new(RuleSet::default);

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut v: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let n = v.len();
        match *m {
            Mutation::Flip(i, b) if n > 0 => v[i % n] ^= b,
            Mutation::Insert(i, b) => v.insert(i % (n + 1), b),
            Mutation::Delete(i) if n > 0 => {
                v.remove(i % n);
            }
            Mutation::Truncate(i) => v.truncate(i % (n + 1)),
            _ => {}
        }
    }
    v
}

fn kind(i: u8) -> InputKind {
    [InputKind::Payment, InputKind::Mobility, InputKind::Command][usize::from(i % 3)]
}

/// Decodes, validates and applies to a projection that already holds some history; checks
/// the fold's promises. Returns whether the event was accepted.
fn fold_one(kind: InputKind, bytes: &[u8], received_at_ms: i64) -> bool {
    let Ok(e) = Event::decode(kind, bytes, received_at_ms) else {
        return false;
    };
    let mut s = UserState::new(&e.user_id);
    for (k, v, ts) in SEEDS.iter().take(20) {
        if let Ok(mut seed) = Event::decode(*k, v, *ts) {
            seed.user_id.clone_from(&e.user_id);
            let _ = RULES.apply(&mut s, &seed);
        }
    }
    let before = s.clone();
    match RULES.apply(&mut s, &e) {
        Err(_) => {
            assert_eq!(s, before, "a rejected event changed the projection");
            false
        }
        Ok(o) => {
            let credited = o.credit.map_or(0, |c| c.credited_g);
            assert_eq!(s.lifetime_g, before.lifetime_g + credited);
            assert_eq!(
                s.balance_g + s.spent_g,
                before.balance_g + before.spent_g + credited,
                "grams are conserved between balance and trees"
            );
            assert_eq!(s.lifetime_g, s.balance_g + s.spent_g);
            true
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn arbitrary_bytes_never_panic(
        k in any::<u8>(),
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        received in any::<i64>(),
    ) {
        fold_one(kind(k), &bytes, received);
    }

    #[test]
    fn mutated_records_never_panic_and_keep_the_fold_promises(
        pick in any::<prop::sample::Index>(),
        k in any::<u8>(),
        ms in proptest::collection::vec(mutation(), 1..6),
        own_time in any::<bool>(),
        received in any::<i64>(),
    ) {
        let (orig_kind, v, ts) = &SEEDS[pick.index(SEEDS.len())];
        // Mostly the record's own timestamp (so the fold is reached); sometimes any i64.
        let received = if own_time { *ts } else { received };
        // Mostly the record's own topic; sometimes the wrong one.
        let kind = if k % 8 == 0 { kind(k / 8) } else { *orig_kind };
        fold_one(kind, &mutate(v.clone(), &ms), received);
    }
}

/// The mutation strategy reaches the fold, not only the decoder: a sizeable share of mutated
/// records still decode and are accepted (else the properties above would test little).
#[test]
fn mutations_reach_the_fold() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let (mut decoded, mut accepted) = (0, 0);
    for i in 0..2_000 {
        let (k, v, ts) = &SEEDS[i % SEEDS.len()];
        let ms: Vec<Mutation> = (0..rng.random_range(1..3))
            .map(|_| Mutation::Flip(rng.random::<u32>() as usize, rng.random::<u8>() & 0x0f))
            .collect();
        let bytes = mutate(v.clone(), &ms);
        decoded += usize::from(Event::decode(*k, &bytes, *ts).is_ok());
        accepted += usize::from(fold_one(*k, &bytes, *ts));
    }
    eprintln!("{decoded} of 2000 mutated records decoded, {accepted} accepted");
    assert!(
        decoded > 200,
        "only {decoded} of 2000 mutated records decoded"
    );
    assert!(
        accepted > 50,
        "only {accepted} of 2000 mutated records were accepted"
    );
}
