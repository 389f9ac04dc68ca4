//! Deterministic workloads of Forest input records, for the demo, the load generator, tests and
//! benchmarks.
//!
//! A [`Generator`] yields Kafka-ready records (topic, key, encoded protobuf value, record
//! timestamp). Users are Zipf-distributed, the behaviour mix follows how Ant Forest is used
//! (walking once a day, offline payments often, bills monthly), and configurable shares of the
//! records are producer-retry duplicates, late events or malformed bytes.
//!
//! Guarantee: the same [`WorkloadConfig`] (seed included) yields the same records, byte for
//! byte, on every run and machine (ChaCha8 RNG, no clock reads).

use forest_domain::Event;
use forest_proto::v1 as pb;
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Zipf};

pub use forest_domain::InputKind as Topic;

pub mod hostile;

/// What the generator meant a record to be (tests compare this with what Forest did).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Good,
    /// A byte-identical copy of an earlier record (a producer retry).
    Duplicate,
    /// A valid event dated 73 h to 5 days before the simulated clock.
    Late,
    /// Bytes or fields that break the contract.
    Malformed,
}

#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Topic,
    pub key: String,
    pub value: Vec<u8>,
    /// The Kafka record timestamp (CreateTime) to produce with.
    pub timestamp_ms: i64,
    pub kind: Kind,
}

impl Record {
    /// Decodes and validates like the processor does.
    pub fn to_event(&self) -> Result<Event, forest_domain::Rejection> {
        Event::decode(self.topic, &self.value, self.timestamp_ms)
    }
}

#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub seed: u64,
    pub users: u64,
    pub events: u64,
    /// Zipf exponent of user activity; 0 = uniform, ~1 = a few very active users.
    pub zipf_exponent: f64,
    pub duplicate_rate: f64,
    pub late_rate: f64,
    pub malformed_rate: f64,
    /// Simulated start (UTC ms) and simulated duration the events spread over.
    pub start_ms: i64,
    pub span_ms: i64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            users: 10_000,
            events: 100_000,
            zipf_exponent: 0.9,
            duplicate_rate: 0.01,
            late_rate: 0.005,
            malformed_rate: 0.002,
            start_ms: 1_764_000_000_000, // 2025-11-24 UTC
            span_ms: 30 * 86_400_000,
        }
    }
}

/// Relative frequency of each behaviour in the generated mix.
const MIX: [(Mix, u32); 18] = [
    (Mix::OfflinePayment, 300),
    (Mix::Walking, 120),
    (Mix::BusRide, 110),
    (Mix::SubwayRide, 110),
    (Mix::BikeRide, 80),
    (Mix::EBikeRide, 40),
    (Mix::CarpoolRide, 20),
    (Mix::EInvoice, 60),
    (Mix::EReceipt, 60),
    (Mix::EtcToll, 30),
    (Mix::ReusableCup, 30),
    (Mix::MovieTicket, 15),
    (Mix::TrainTicket, 15),
    (Mix::UtilityBill, 12),
    (Mix::HospitalAppointment, 5),
    (Mix::TrafficFine, 3),
    (Mix::EStatement, 5),
    (Mix::ChooseSpecies, 3),
];

#[derive(Debug, Clone, Copy)]
enum Mix {
    OfflinePayment,
    Walking,
    BusRide,
    SubwayRide,
    BikeRide,
    EBikeRide,
    CarpoolRide,
    EInvoice,
    EReceipt,
    EtcToll,
    ReusableCup,
    MovieTicket,
    TrainTicket,
    UtilityBill,
    HospitalAppointment,
    TrafficFine,
    EStatement,
    ChooseSpecies,
}

/// An iterator of [`Record`]s; see the crate docs.
pub struct Generator {
    cfg: WorkloadConfig,
    rng: ChaCha8Rng,
    zipf: Zipf<f64>,
    mix_total: u32,
    emitted: u64,
    /// A small ring of recent good records, the pool duplicates are copied from.
    recent: Vec<Record>,
}

impl Generator {
    /// # Panics
    /// If `users` is 0 or the Zipf exponent is negative: both are caller bugs, checked by the
    /// CLI before it gets here.
    pub fn new(cfg: WorkloadConfig) -> Self {
        assert!(cfg.users > 0, "users must be > 0");
        let zipf = Zipf::new(cfg.users as f64, cfg.zipf_exponent).expect("zipf exponent >= 0");
        Self {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            zipf,
            mix_total: MIX.iter().map(|(_, w)| w).sum(),
            emitted: 0,
            recent: Vec::with_capacity(256),
            cfg,
        }
    }

    fn now_ms(&self) -> i64 {
        let frac = self.emitted as f64 / self.cfg.events.max(1) as f64;
        self.cfg.start_ms + (frac * self.cfg.span_ms as f64) as i64
    }

    fn envelope(&mut self, user: &str, occurred_at_ms: i64) -> Option<pb::Envelope> {
        Some(pb::Envelope {
            event_id: format!("ev-{}-{}", self.cfg.seed, self.emitted),
            user_id: user.to_string(),
            occurred_at_ms,
            source: "forest-loadgen".into(),
            schema_version: 1,
        })
    }

    fn good(&mut self, occurred_at_ms: i64, timestamp_ms: i64, kind: Kind) -> Record {
        let user = format!("user-{:07}", self.zipf.sample(&mut self.rng) as u64);
        let mut pick = self.rng.random_range(0..self.mix_total);
        let mut which = Mix::OfflinePayment;
        for (m, w) in MIX {
            if pick < w {
                which = m;
                break;
            }
            pick -= w;
        }
        let env = self.envelope(&user, occurred_at_ms);
        let pay = |rng: &mut ChaCha8Rng, kind: pb::PaymentKind, lo: i64, hi: i64| {
            let amount_minor = rng.random_range(lo..hi);
            (
                Topic::Payment,
                pb::PaymentEvent {
                    envelope: env.clone(),
                    kind: kind as i32,
                    amount: Some(pb::Money {
                        amount_minor,
                        currency: "CNY".into(),
                    }),
                    merchant_id: String::new(),
                }
                .encode_to_vec(),
            )
        };
        use pb::PaymentKind as P;
        use pb::mobility_event::Activity as A;
        let mobility = |activity| {
            (
                Topic::Mobility,
                pb::MobilityEvent {
                    envelope: env.clone(),
                    activity: Some(activity),
                }
                .encode_to_vec(),
            )
        };
        let rng = &mut self.rng;
        let (topic, value) = match which {
            Mix::OfflinePayment => pay(rng, P::OfflinePayment, 50, 50_000),
            Mix::EInvoice => pay(rng, P::EInvoice, 100, 100_000),
            Mix::EReceipt => pay(rng, P::EReceipt, 100, 20_000),
            Mix::EtcToll => pay(rng, P::EtcToll, 500, 30_000),
            Mix::ReusableCup => pay(rng, P::ReusableCup, 1_000, 5_000),
            Mix::MovieTicket => pay(rng, P::MovieTicket, 3_000, 20_000),
            Mix::TrainTicket => pay(rng, P::TrainTicket, 2_000, 100_000),
            Mix::UtilityBill => pay(rng, P::UtilityBill, 1_000, 50_000),
            Mix::HospitalAppointment => pay(rng, P::HospitalAppointment, 500, 30_000),
            Mix::TrafficFine => pay(rng, P::TrafficFine, 5_000, 20_000),
            Mix::EStatement => pay(rng, P::EStatement, 0, 1),
            Mix::Walking => mobility(A::Walking(pb::Walking {
                steps: rng.random_range(500..25_000),
                period: if rng.random_bool(0.7) { 1 } else { 2 },
            })),
            Mix::BusRide => mobility(A::BusRide(pb::BusRide {
                line: String::new(),
                distance_m: rng.random_range(0..15_000),
            })),
            Mix::SubwayRide => mobility(A::SubwayRide(pb::SubwayRide {
                line: String::new(),
                distance_m: rng.random_range(0..30_000),
            })),
            Mix::BikeRide => mobility(A::BikeRide(pb::BikeRide {
                distance_m: rng.random_range(300..8_000),
            })),
            Mix::EBikeRide => mobility(A::EBikeRide(pb::EBikeRide {
                distance_m: rng.random_range(500..12_000),
            })),
            Mix::CarpoolRide => mobility(A::CarpoolRide(pb::CarpoolRide {
                distance_m: rng.random_range(2_000..40_000),
            })),
            Mix::ChooseSpecies => {
                let species = ["saxaul", "red_willow", "sand_willow"][rng.random_range(0..3)];
                (
                    Topic::Command,
                    pb::UserCommand {
                        envelope: env,
                        command: Some(pb::user_command::Command::ChooseSpecies(
                            pb::ChooseSpecies {
                                species_id: species.into(),
                            },
                        )),
                    }
                    .encode_to_vec(),
                )
            }
        };
        Record {
            topic,
            key: user,
            value,
            timestamp_ms,
            kind,
        }
    }

    fn malformed(&mut self, now: i64) -> Record {
        let user = format!("user-{:07}", self.zipf.sample(&mut self.rng) as u64);
        let mut topic = Topic::Payment;
        let value = match self.rng.random_range(0..6) {
            // Random bytes after a tag that cannot start any of our messages (field 0).
            0 => std::iter::once(0u8)
                .chain((0..self.rng.random_range(1..64)).map(|_| self.rng.random()))
                .collect(),
            // A valid record cut short, inside its envelope.
            1 => {
                let r = self.good(now, now, Kind::Good);
                topic = r.topic;
                let mut v = r.value;
                v.truncate(v.len() / 4);
                v
            }
            // Valid protobuf, broken contract: empty user id.
            2 => pb::PaymentEvent {
                envelope: Some(pb::Envelope {
                    user_id: String::new(),
                    ..self.envelope(&user, now).unwrap_or_default()
                }),
                kind: pb::PaymentKind::OfflinePayment as i32,
                amount: Some(pb::Money {
                    amount_minor: 100,
                    currency: "CNY".into(),
                }),
                merchant_id: String::new(),
            }
            .encode_to_vec(),
            // Negative amount.
            3 => pb::PaymentEvent {
                envelope: self.envelope(&user, now),
                kind: pb::PaymentKind::UtilityBill as i32,
                amount: Some(pb::Money {
                    amount_minor: -500,
                    currency: "CNY".into(),
                }),
                merchant_id: String::new(),
            }
            .encode_to_vec(),
            // Absurd step count.
            4 => {
                topic = Topic::Mobility;
                pb::MobilityEvent {
                    envelope: self.envelope(&user, now),
                    activity: Some(pb::mobility_event::Activity::Walking(pb::Walking {
                        steps: 5_000_000,
                        period: 1,
                    })),
                }
                .encode_to_vec()
            }
            // Unknown behaviour value.
            _ => pb::PaymentEvent {
                envelope: self.envelope(&user, now),
                kind: 77,
                amount: Some(pb::Money {
                    amount_minor: 100,
                    currency: "CNY".into(),
                }),
                merchant_id: String::new(),
            }
            .encode_to_vec(),
        };
        Record {
            topic,
            key: user,
            value,
            timestamp_ms: now,
            kind: Kind::Malformed,
        }
    }
}

impl Iterator for Generator {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        if self.emitted >= self.cfg.events {
            return None;
        }
        let now = self.now_ms();
        let roll: f64 = self.rng.random();
        let c = &self.cfg;
        let rec = if roll < c.duplicate_rate && !self.recent.is_empty() {
            let i = self.rng.random_range(0..self.recent.len());
            Record {
                kind: Kind::Duplicate,
                ..self.recent[i].clone()
            }
        } else if roll < c.duplicate_rate + c.late_rate {
            let back = self.rng.random_range(73 * 3_600_000..5 * 86_400_000);
            self.good(now - back, now, Kind::Late)
        } else if roll < c.duplicate_rate + c.late_rate + c.malformed_rate {
            self.malformed(now)
        } else {
            let jitter = self.rng.random_range(0..60_000);
            let r = self.good(now - jitter, now, Kind::Good);
            if self.recent.len() < 256 {
                self.recent.push(r.clone());
            } else {
                let i = self.rng.random_range(0..256);
                self.recent[i] = r.clone();
            }
            r
        };
        self.emitted += 1;
        Some(rec)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.cfg.events - self.emitted) as usize;
        (left, Some(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seed: u64) -> WorkloadConfig {
        WorkloadConfig {
            seed,
            events: 20_000,
            users: 500,
            duplicate_rate: 0.05,
            late_rate: 0.02,
            malformed_rate: 0.02,
            ..Default::default()
        }
    }

    #[test]
    fn same_seed_same_records() {
        let a: Vec<_> = Generator::new(cfg(7))
            .map(|r| (r.key, r.value, r.timestamp_ms))
            .collect();
        let b: Vec<_> = Generator::new(cfg(7))
            .map(|r| (r.key, r.value, r.timestamp_ms))
            .collect();
        let c: Vec<_> = Generator::new(cfg(8))
            .map(|r| (r.key, r.value, r.timestamp_ms))
            .collect();
        assert_eq!(a.len(), 20_000);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn mix_has_every_kind_and_good_records_decode() {
        let recs: Vec<_> = Generator::new(cfg(1)).collect();
        for k in [Kind::Good, Kind::Duplicate, Kind::Late, Kind::Malformed] {
            let n = recs.iter().filter(|r| r.kind == k).count();
            assert!(n > 100, "{k:?}: {n}");
        }
        for r in recs.iter().filter(|r| r.kind == Kind::Good) {
            let e = r.to_event().expect("good records are valid");
            assert_eq!(e.user_id, r.key);
        }
        // Every malformed record is rejected, at decode or by the rules on a fresh projection.
        let rules = forest_domain::RuleSet::default();
        for r in recs.iter().filter(|r| r.kind == Kind::Malformed) {
            if let Ok(e) = r.to_event() {
                let mut s = forest_domain::UserState::new(&e.user_id);
                assert!(rules.apply(&mut s, &e).is_err(), "{r:?} was accepted");
            }
        }
        let behaviours: std::collections::HashSet<_> = recs
            .iter()
            .filter_map(|r| r.to_event().ok())
            .filter_map(|e| match e.action {
                forest_domain::Action::Credit { behaviour, .. } => Some(behaviour),
                _ => None,
            })
            .collect();
        assert_eq!(behaviours.len(), forest_domain::Behaviour::COUNT);
    }

    #[test]
    fn every_behaviour_is_credited_by_the_default_rules() {
        // Folded the way the processor folds them: the new mobility behaviours (carpool and
        // e-bike rides) and walking's day totals earn energy end to end, not just decode.
        use forest_domain::{Action, Behaviour, RuleSet, UserState};
        let rules = RuleSet::default();
        let mut users: std::collections::HashMap<String, UserState> = Default::default();
        let mut grams = [0u64; Behaviour::COUNT];
        for r in Generator::new(cfg(3)) {
            let Ok(e) = r.to_event() else { continue };
            let s = users
                .entry(e.user_id.clone())
                .or_insert_with(|| UserState::new(&e.user_id));
            if let (Ok(o), Action::Credit { behaviour, .. }) = (rules.apply(s, &e), &e.action) {
                grams[behaviour.index()] += o.credit.map_or(0, |c| c.credited_g);
            }
        }
        for b in Behaviour::ALL {
            assert!(grams[b.index()] > 0, "{b} earned nothing");
        }
    }
}
