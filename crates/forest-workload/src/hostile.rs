//! A corpus of hostile input records: every one breaks the contract in `proto/forest/v1`, so
//! the processor must dead-letter every one with a reason, without crashing or stalling.
//!
//! The corpus is deterministic for a seed, like the workload. Each record says which
//! [`Hostility`] it is, so a test can report what happened to each category.

use crate::{Kind, Record, Topic};
use forest_proto::v1 as pb;
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The ways a hostile record breaks the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hostility {
    /// A valid record cut short inside its envelope.
    Truncated,
    /// A known field number sent with another wire type.
    WrongWireType,
    /// Random bytes that start with an invalid tag.
    Garbage,
    /// An id, text field or the whole value far beyond the documented limits.
    HugeField,
    /// A negative amount, up to `i64::MIN`.
    NegativeAmount,
    /// An amount or distance beyond the rule's maximum, up to `i64::MAX`.
    OverflowingAmount,
    /// A step count beyond anything a person walks, or negative.
    AbsurdSteps,
    /// `occurred_at_ms` at or near the ends of `i64`, or zero.
    ExtremeTime,
    /// An enum value the contract does not define.
    UnknownEnum,
    /// Bytes that are not UTF-8 in a string field.
    InvalidUtf8,
    /// Unicode that looks equal but is not (the key is the NFD form of an NFC user id).
    UnicodeKeyMismatch,
    /// An empty event id, user id or source.
    EmptyId,
    /// No envelope, an empty value, or the wrong schema version.
    MissingEnvelope,
    /// A value of several hundred KiB (under Kafka's 1 MB default record limit).
    Oversized,
    /// A value of about 1.04 MB: under Apache Kafka's default record-batch limit
    /// (`max.message.bytes`, 1,048,588), so a producer with a raised `message.max.bytes` can
    /// write it, but over librdkafka's default `message.max.bytes` (1,000,000), so its dead
    /// letter (the value plus headers) cannot be produced whole. One per corpus.
    NearBrokerLimit,
}

/// Length of the [`Hostility::NearBrokerLimit`] record's value, give or take the envelope:
/// 1,040,000 bytes of merchant id.
pub const NEAR_BROKER_LIMIT_BYTES: usize = 1_040_000;

impl Hostility {
    pub const ALL: [Hostility; 15] = [
        Self::Truncated,
        Self::WrongWireType,
        Self::Garbage,
        Self::HugeField,
        Self::NegativeAmount,
        Self::OverflowingAmount,
        Self::AbsurdSteps,
        Self::ExtremeTime,
        Self::UnknownEnum,
        Self::InvalidUtf8,
        Self::UnicodeKeyMismatch,
        Self::EmptyId,
        Self::MissingEnvelope,
        Self::Oversized,
        Self::NearBrokerLimit,
    ];
}

/// `n` hostile records over the categories in turn, dated around `now_ms`. Oversized ones are
/// capped at 1 in 2,000, the near-limit one at one per corpus, and huge fields at 4 KiB, so
/// 10,000 records stay near 6 MiB over the input partitions (the embedded broker keeps at
/// most 5 MiB per partition). Writing the near-limit record needs a producer whose
/// `message.max.bytes` is above 1,040,100.
pub fn corpus(seed: u64, n: usize, now_ms: i64) -> Vec<(Hostility, Record)> {
    let mut g = Hostile {
        rng: ChaCha8Rng::seed_from_u64(seed ^ 0x4057_11e5),
        seq: 0,
        seed,
        now_ms,
    };
    (0..n)
        .map(|i| {
            let mut h = Hostility::ALL[i % Hostility::ALL.len()];
            if h == Hostility::Oversized && i % 2_000 >= Hostility::ALL.len() {
                h = Hostility::HugeField;
            }
            if h == Hostility::NearBrokerLimit && i >= Hostility::ALL.len() {
                h = Hostility::HugeField;
            }
            (h, g.record(h))
        })
        .collect()
}

struct Hostile {
    rng: ChaCha8Rng,
    seq: u64,
    seed: u64,
    now_ms: i64,
}

impl Hostile {
    fn user(&mut self) -> String {
        format!("hostile-user-{:04}", self.rng.random_range(0..500))
    }

    fn envelope(&mut self, user: &str) -> pb::Envelope {
        self.seq += 1;
        pb::Envelope {
            event_id: format!("hostile-{}-{}", self.seed, self.seq),
            user_id: user.to_string(),
            occurred_at_ms: self.now_ms - self.rng.random_range(0..3_600_000),
            source: "forest-hostile".into(),
            schema_version: forest_proto::SCHEMA_VERSION,
        }
    }

    fn payment(&mut self, env: Option<pb::Envelope>, kind: i32, amount: i64) -> Vec<u8> {
        pb::PaymentEvent {
            envelope: env,
            kind,
            amount: Some(pb::Money {
                amount_minor: amount,
                currency: "CNY".into(),
            }),
            merchant_id: String::new(),
        }
        .encode_to_vec()
    }

    /// A valid CNY 10 payment whose merchant id is `len` bytes: too big to be an event, and
    /// big enough to test size limits on the way to the dead-letter topic.
    fn long_merchant_payment(&mut self, user: &str, kind: i32, len: usize) -> Vec<u8> {
        pb::PaymentEvent {
            envelope: Some(self.envelope(user)),
            kind,
            amount: Some(pb::Money {
                amount_minor: 1_000,
                currency: "CNY".into(),
            }),
            merchant_id: "m".repeat(len),
        }
        .encode_to_vec()
    }

    fn walking(&mut self, env: pb::Envelope, steps: i64, period: i32) -> Vec<u8> {
        pb::MobilityEvent {
            envelope: Some(env),
            activity: Some(pb::mobility_event::Activity::Walking(pb::Walking {
                steps,
                period,
            })),
        }
        .encode_to_vec()
    }

    fn record(&mut self, h: Hostility) -> Record {
        use Hostility as H;
        let user = self.user();
        let mut key = user.clone();
        let mut topic = Topic::Payment;
        let utility = pb::PaymentKind::UtilityBill as i32;
        let value = match h {
            H::Truncated => {
                let env = self.envelope(&user);
                let env_len = env.encoded_len();
                let v = self.payment(Some(env), utility, 1_000);
                // Field 1 (the envelope) comes first: a cut before its last byte leaves a
                // length-delimited field shorter than its length.
                let cut = self.rng.random_range(1..env_len + 2);
                v[..cut].to_vec()
            }
            H::WrongWireType => {
                let mut v = Vec::new();
                match self.rng.random_range(0..3) {
                    // Envelope (field 1, a message) as a varint.
                    0 => v.extend([0x08, 0x96, 0x01]),
                    // Envelope as a 64-bit fixed field.
                    1 => v.extend([0x09, 1, 2, 3, 4, 5, 6, 7, 8]),
                    // A valid envelope, then `kind` (field 2, a varint) length-delimited.
                    _ => {
                        let env = self.envelope(&user);
                        pb::PaymentEvent {
                            envelope: Some(env),
                            ..Default::default()
                        }
                        .encode(&mut v)
                        .ok();
                        v.extend([0x12, 0x03, b'a', b'b', b'c']);
                    }
                }
                v
            }
            H::Garbage => {
                // Tag byte 0 (field number 0) never starts a valid protobuf field.
                let len = self.rng.random_range(0..200);
                std::iter::once(0u8)
                    .chain((0..len).map(|_| self.rng.random()))
                    .collect()
            }
            H::HugeField => {
                let mut env = self.envelope(&user);
                let big = "x".repeat(self.rng.random_range(129..4_096));
                match self.rng.random_range(0..4) {
                    0 => env.event_id = big,
                    1 => {
                        env.user_id = big.clone();
                        key = big;
                    }
                    2 => env.source = big,
                    _ => {
                        topic = Topic::Mobility;
                        return self.finish(
                            topic,
                            key,
                            pb::MobilityEvent {
                                envelope: Some(env),
                                activity: Some(pb::mobility_event::Activity::BusRide(
                                    pb::BusRide {
                                        line: big,
                                        distance_m: 1_000,
                                    },
                                )),
                            }
                            .encode_to_vec(),
                        );
                    }
                }
                self.payment(Some(env), utility, 1_000)
            }
            H::NegativeAmount => {
                let env = self.envelope(&user);
                let amount = match self.rng.random_range(0..3) {
                    0 => -1,
                    1 => i64::MIN,
                    _ => -self.rng.random_range(1..i64::MAX),
                };
                self.payment(Some(env), utility, amount)
            }
            H::OverflowingAmount => {
                let env = self.envelope(&user);
                if self.rng.random_bool(0.5) {
                    let amount = [i64::MAX, i64::MAX - 1, 1 << 62][self.rng.random_range(0..3)];
                    self.payment(Some(env), utility, amount)
                } else {
                    topic = Topic::Mobility;
                    pb::MobilityEvent {
                        envelope: Some(env),
                        activity: Some(pb::mobility_event::Activity::BikeRide(pb::BikeRide {
                            distance_m: i64::MAX,
                        })),
                    }
                    .encode_to_vec()
                }
            }
            H::AbsurdSteps => {
                topic = Topic::Mobility;
                let env = self.envelope(&user);
                let steps = match self.rng.random_range(0..3) {
                    0 => self.rng.random_range(10_000_000..i64::MAX),
                    1 => i64::MAX,
                    _ => -self.rng.random_range(1..1_000_000),
                };
                self.walking(env, steps, 1)
            }
            H::ExtremeTime => {
                let mut env = self.envelope(&user);
                env.occurred_at_ms = [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX, i64::MAX - 1]
                    [self.rng.random_range(0..6)];
                self.payment(Some(env), utility, 1_000)
            }
            H::UnknownEnum => {
                let env = self.envelope(&user);
                match self.rng.random_range(0..3) {
                    0 => {
                        let kind = [0, -1, 77, i32::MAX, i32::MIN][self.rng.random_range(0..5)];
                        self.payment(Some(env), kind, 1_000)
                    }
                    1 => {
                        topic = Topic::Mobility;
                        let period = [0, 3, -7, i32::MAX][self.rng.random_range(0..4)];
                        self.walking(env, 5_000, period)
                    }
                    _ => {
                        topic = Topic::Command;
                        pb::UserCommand {
                            envelope: Some(env),
                            command: Some(pb::user_command::Command::ChooseSpecies(
                                pb::ChooseSpecies {
                                    species_id: "baobab-🌳".into(),
                                },
                            )),
                        }
                        .encode_to_vec()
                    }
                }
            }
            H::InvalidUtf8 => {
                // A valid record whose user id bytes are replaced by bytes that are not UTF-8
                // (a lone continuation byte, an overlong encoding, an encoded surrogate).
                let marker = "@@@@@@";
                let mut env = self.envelope(&user);
                env.user_id = marker.into();
                let v = self.payment(Some(env), utility, 1_000);
                let bad: &[u8] = [
                    &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80][..],
                    &[0xC0, 0xAF, 0xC0, 0xAF, 0x41, 0x41][..],
                    &[0xED, 0xA0, 0x80, 0xED, 0xBF, 0xBF][..],
                ][self.rng.random_range(0..3)];
                replace(&v, marker.as_bytes(), bad)
            }
            H::UnicodeKeyMismatch => {
                // "é" precomposed (NFC) in the id, decomposed (NFD) in the key.
                let id = format!("用户-caf\u{e9}-{}", self.rng.random_range(0..100));
                key = id.replace('\u{e9}', "e\u{301}");
                let env = self.envelope(&id);
                self.payment(Some(env), utility, 1_000)
            }
            H::EmptyId => {
                let mut env = self.envelope(&user);
                match self.rng.random_range(0..3) {
                    0 => env.event_id.clear(),
                    1 => {
                        env.user_id.clear();
                        key.clear();
                    }
                    _ => env.source.clear(),
                }
                self.payment(Some(env), utility, 1_000)
            }
            H::MissingEnvelope => match self.rng.random_range(0..3) {
                0 => Vec::new(),
                1 => self.payment(None, utility, 1_000),
                _ => {
                    let mut env = self.envelope(&user);
                    env.schema_version = [0, 2, u32::MAX][self.rng.random_range(0..3)];
                    self.payment(Some(env), utility, 1_000)
                }
            },
            H::Oversized => {
                let len = self.rng.random_range(100_000..600_000);
                self.long_merchant_payment(&user, utility, len)
            }
            H::NearBrokerLimit => {
                self.long_merchant_payment(&user, utility, NEAR_BROKER_LIMIT_BYTES)
            }
        };
        self.finish(topic, key, value)
    }

    fn finish(&self, topic: Topic, key: String, value: Vec<u8>) -> Record {
        Record {
            topic,
            key,
            value,
            timestamp_ms: self.now_ms,
            kind: Kind::Malformed,
        }
    }
}

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    match haystack.windows(needle.len()).position(|w| w == needle) {
        Some(at) => [&haystack[..at], with, &haystack[at + needle.len()..]].concat(),
        None => haystack.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forest_domain::{RuleSet, UserState};

    /// Every record of the corpus is rejected by decode + validate + apply on a fresh
    /// projection (the processor adds one check: the key must equal the user id).
    #[test]
    fn every_hostile_record_is_rejected() {
        let now = 1_764_000_000_000;
        let rules = RuleSet::default();
        let corpus = corpus(3, 3_000, now);
        let mut seen = std::collections::BTreeSet::new();
        for (h, r) in &corpus {
            seen.insert(*h);
            let verdict = r.to_event().and_then(|e| {
                if e.user_id != r.key {
                    return Err(forest_domain::Rejection::Malformed(
                        forest_domain::Malformed::KeyMismatch {
                            key: r.key.clone(),
                            user_id: e.user_id.clone(),
                        },
                    ));
                }
                rules.apply(&mut UserState::new(&e.user_id), &e)
            });
            assert!(verdict.is_err(), "{h:?} was accepted: {r:?}");
        }
        assert_eq!(seen.len(), Hostility::ALL.len(), "every category appears");
        let near: Vec<_> = corpus
            .iter()
            .filter(|(h, _)| *h == Hostility::NearBrokerLimit)
            .collect();
        assert_eq!(near.len(), 1, "one near-limit record per corpus");
        let len = near[0].1.value.len();
        assert!((1_000_000..1_048_000).contains(&len), "{len}");
    }

    #[test]
    fn same_seed_same_corpus() {
        let a = corpus(9, 500, 1);
        let b = corpus(9, 500, 1);
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| x.1.value == y.1.value && x.1.key == y.1.key)
        );
    }
}
