//! Property tests of the fulfilment ledger: random trees (with re-deliveries), partner reports
//! (planted, rejected, re-sent, stale), capacity reloads and restarts from the persisted
//! state. After every step the ledger's books must balance.

use forest_fulfilment::ledger::{Effect, Ledger, OrderRecord, OrderState, keys};
use forest_fulfilment::{Partners, ledger::idempotency_key};
use forest_proto::v1::planting_confirmed::Result as Report;
use forest_proto::v1::{Planted, PlantingConfirmed, PlantingRejected, TreeMatured};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const SPECIES: [&str; 3] = ["saxaul", "red_willow", "mongolian_pine"];
const Y2026: i64 = 1_780_000_000_000;
const YEAR_MS: i64 = 365 * 86_400_000;

#[derive(Debug, Clone)]
enum Op {
    Tree {
        user: u8,
        seq: u8,
        species: u8,
        year: u8,
    },
    Report {
        pick: u16,
        planted: bool,
        other_attempt: bool,
    },
    /// Raise every capacity by this much (capacity only grows, so "used <= capacity" holds).
    Reload { more: u8 },
    /// Rebuild the ledger from what it persisted.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..25, 1u8..4, 0u8..3, 0u8..3).prop_map(|(user, seq, species, year)| Op::Tree { user, seq, species, year }),
        4 => (any::<u16>(), any::<bool>(), prop::bool::weighted(0.2)).prop_map(|(pick, planted, other_attempt)| Op::Report { pick, planted, other_attempt }),
        1 => (0u8..3).prop_map(|more| Op::Reload { more }),
        1 => Just(Op::Restart),
    ]
}

fn partners(cap: u32) -> Partners {
    let text = format!(
        r#"version = "cap-{cap}"
[[partners]]
id = "p1"
name = "P1"
active = true
sites = [ {{ id = "s1", region = "R1", capacity = {{ saxaul = {cap}, red_willow = {cap} }} }},
          {{ id = "s2", region = "R2", capacity = {{ saxaul = {cap} }} }} ]
[[partners]]
id = "p2"
name = "P2"
active = true
sites = [ {{ id = "s3", region = "R3", capacity = {{ saxaul = {cap}, mongolian_pine = {cap} }} }} ]
"#
    );
    Partners::from_toml(&text, "prop").unwrap()
}

fn capacity(cap: u32, site: &str, species: &str) -> u32 {
    match (site, species) {
        ("s1", "saxaul" | "red_willow")
        | ("s2", "saxaul")
        | ("s3", "saxaul" | "mongolian_pine") => cap,
        _ => 0,
    }
}

fn persist(kv: &mut BTreeMap<Vec<u8>, Vec<u8>>, ledger: &mut Ledger) {
    for (k, v) in ledger.take_changes() {
        match v {
            Some(v) => kv.insert(k, v),
            None => kv.remove(&k),
        };
    }
}

fn scan(kv: &BTreeMap<Vec<u8>, Vec<u8>>, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    kv.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn report(rec: &OrderRecord, planted: bool, other_attempt: bool) -> PlantingConfirmed {
    let partner = match &rec.state {
        OrderState::Allocated { partner_id, .. } | OrderState::Planted { partner_id, .. } => {
            partner_id.clone()
        }
        OrderState::Backlog { .. } => "p1".into(),
    };
    let attempt = if other_attempt {
        rec.attempt.saturating_sub(1).max(1) + u32::from(rec.attempt <= 1)
    } else {
        rec.attempt
    };
    PlantingConfirmed {
        order_id: rec.order_id.clone(),
        partner_id: partner,
        result: Some(if planted {
            Report::Planted(Planted {
                tree_code: "T".into(),
                planted_on: "2026-06-01".into(),
                ..Default::default()
            })
        } else {
            Report::Rejected(PlantingRejected { reason: "r".into() })
        }),
        reported_at_ms: 0,
        idempotency_key: idempotency_key(&rec.order_id, attempt),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn the_books_balance_after_every_step(ops in prop::collection::vec(op(), 1..120)) {
        let mut cap = 1u32;
        let mut ledger = Ledger::new(partners(cap));
        let mut book: BTreeMap<String, OrderRecord> = BTreeMap::new();
        let mut kv = BTreeMap::new();
        let mut trees = BTreeSet::new();
        let mut keys_sent = BTreeSet::new();
        let mut certified = BTreeSet::new();
        for op in ops {
            let mut out = Vec::new();
            match op {
                Op::Tree { user, seq, species, year } => {
                    let user = format!("u{user}");
                    let t = TreeMatured {
                        tree_id: forest_domain::tree_id(&user, u64::from(seq)),
                        user_id: user,
                        tree_seq: u64::from(seq),
                        species_id: SPECIES[usize::from(species)].into(),
                        energy_spent_g: 1,
                        matured_at_ms: Y2026 + i64::from(year) * YEAR_MS,
                        rules_version: "t".into(),
                        trigger_event_id: "e".into(),
                    };
                    trees.insert(t.tree_id.clone());
                    ledger.on_tree(&mut book, &t, &mut out).unwrap();
                }
                Op::Report { pick, planted, other_attempt } => {
                    if book.is_empty() {
                        continue;
                    }
                    let rec = book.values().nth(usize::from(pick) % book.len()).unwrap().clone();
                    let c = report(&rec, planted, other_attempt);
                    ledger.on_confirmation(&mut book, &c, &mut out).unwrap();
                }
                Op::Reload { more } => {
                    cap += u32::from(more);
                    ledger.set_partners(partners(cap), &mut book, &mut out).unwrap();
                }
                Op::Restart => {
                    ledger = Ledger::load(
                        partners(cap),
                        &scan(&kv, keys::USED),
                        &scan(&kv, keys::BACKLOG),
                        kv.get(keys::META).map(Vec::as_slice),
                    ).unwrap();
                }
            }
            persist(&mut kv, &mut ledger);
            for e in &out {
                match e {
                    Effect::Order(o) => {
                        prop_assert!(keys_sent.insert(o.idempotency_key.clone()), "allocation {} sent twice", o.idempotency_key);
                        prop_assert_eq!(&book[&o.order_id].attempt, &o.attempt);
                    }
                    Effect::Certificate(c) => {
                        prop_assert!(certified.insert(c.order_id.clone()), "second certificate for {}", c.order_id);
                    }
                }
            }

            // One order per distinct tree, nothing else.
            let ids: BTreeSet<String> = book.values().map(|r| r.tree_id.clone()).collect();
            prop_assert_eq!(&ids, &trees);
            // Capacity used = trees allocated or planted there, and never above capacity.
            let mut holding: BTreeMap<(i32, String, String), u32> = BTreeMap::new();
            for r in book.values() {
                if let OrderState::Allocated { site_id, season, .. } | OrderState::Planted { site_id, season, .. } = &r.state {
                    *holding.entry((*season, site_id.clone(), r.species_id.clone())).or_insert(0) += 1;
                }
            }
            let used: BTreeMap<(i32, String, String), u32> = ledger
                .used_entries()
                .filter(|e| e.3 > 0)
                .map(|(y, s, sp, n)| ((y, s.to_string(), sp.to_string()), n))
                .collect();
            prop_assert_eq!(&used, &holding);
            for ((_, site, species), n) in &used {
                prop_assert!(*n <= capacity(cap, site, species), "{site}/{species}: {n} > {cap}");
            }
            // The backlog is exactly the trees in the Backlog state, and no tree waits while a
            // site that never rejected it has room in the current season.
            let waiting: BTreeSet<&str> = ledger.backlog_ids().collect();
            let in_state: BTreeSet<&str> = book
                .values()
                .filter(|r| matches!(r.state, OrderState::Backlog { .. }))
                .map(|r| r.order_id.as_str())
                .collect();
            prop_assert_eq!(&waiting, &in_state);
            if let Some(season) = ledger.season() {
                for id in &waiting {
                    let r = &book[*id];
                    for site in ["s1", "s2", "s3"] {
                        let room = capacity(cap, site, &r.species_id) > ledger.used(season, site, &r.species_id);
                        prop_assert!(!room || r.rejected_by.iter().any(|x| x == site),
                            "{} waits while {site} has room for {}", id, r.species_id);
                    }
                }
            }
            // Certificates exactly for the planted orders.
            let planted: BTreeSet<String> = book
                .values()
                .filter(|r| matches!(r.state, OrderState::Planted { .. }))
                .map(|r| r.order_id.clone())
                .collect();
            prop_assert_eq!(&planted, &certified);
        }
    }
}
