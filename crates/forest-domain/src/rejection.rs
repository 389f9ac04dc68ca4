//! Why an event was not applied. Every rejection is typed, has a stable code (for dead-letter
//! headers and metric labels) and a human-readable text.

use crate::Behaviour;

/// A field-level reason for [`Rejection::Malformed`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("the envelope is missing")]
    MissingEnvelope,
    #[error("envelope.{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes, more than the {max} allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("envelope.occurred_at_ms must be > 0, got {0}")]
    NonPositiveTime(i64),
    #[error("envelope.schema_version {0} is not supported (this build reads version 1)")]
    SchemaVersion(u32),
    #[error("the amount is missing")]
    MissingAmount,
    #[error("currency {0:?} is not an ISO 4217 code (three upper-case letters)")]
    Currency(String),
    #[error("the {0} is missing: exactly one must be set")]
    MissingVariant(&'static str),
    #[error("walking.period {0} is not PERIOD_DAY or PERIOD_INTERVAL")]
    WalkingPeriod(i32),
    #[error("time {0} ms cannot be placed on a calendar")]
    TimeOutOfRange(i64),
    #[error("timezone {0:?} is not a known IANA name")]
    Timezone(String),
    #[error("the record key {key:?} is not the envelope's user_id {user_id:?}")]
    KeyMismatch { key: String, user_id: String },
    #[error("the Kafka record has no timestamp")]
    NoRecordTimestamp,
    /// Only checked with the processor's changelog, which relies on it.
    #[error(
        "the record is in partition {partition}, but its user id hashes to partition {expected} (murmur2, the Java client's default partitioner for keyed records): with the changelog, input records must be partitioned by user id that way"
    )]
    WrongPartition { partition: i32, expected: i32 },
    #[error("the event is for user {event:?} but was applied to the projection of {state:?}")]
    WrongUser { state: String, event: String },
}

/// Why [`crate::RuleSet::apply`] (or event validation) refused an event. A rejected event never
/// changes the projection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("undecodable record: {0}")]
    Undecodable(#[from] prost::DecodeError),
    #[error("malformed event: {0}")]
    Malformed(Malformed),
    #[error("unknown behaviour: {0}")]
    UnknownBehaviour(String),
    #[error("negative amount {value} for {behaviour}")]
    NegativeAmount { behaviour: Behaviour, value: i64 },
    #[error("absurd value {value} for {behaviour}: the rule's maximum is {max}")]
    AbsurdValue {
        behaviour: Behaviour,
        value: i64,
        max: i64,
    },
    #[error("too late: occurred at {occurred_at_ms} ms, before the user's horizon {horizon_ms} ms")]
    TooLate {
        occurred_at_ms: i64,
        horizon_ms: i64,
    },
    #[error(
        "too early: occurred at {occurred_at_ms} ms, more than the allowed skew after the record time {received_at_ms} ms"
    )]
    TooEarly {
        occurred_at_ms: i64,
        received_at_ms: i64,
    },
    #[error("duplicate event id (already applied for this user)")]
    Duplicate,
    #[error("unknown species {0:?}")]
    UnknownSpecies(String),
}

impl Rejection {
    /// Every code [`Rejection::code`] can return, for pre-registering metric series.
    pub const CODES: [&'static str; 9] = [
        "undecodable",
        "malformed",
        "unknown_behaviour",
        "negative_amount",
        "absurd_value",
        "too_late",
        "too_early",
        "duplicate",
        "unknown_species",
    ];

    /// Stable, bounded code: a dead-letter header value and a metric label.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Undecodable(_) => "undecodable",
            Self::Malformed(_) => "malformed",
            Self::UnknownBehaviour(_) => "unknown_behaviour",
            Self::NegativeAmount { .. } => "negative_amount",
            Self::AbsurdValue { .. } => "absurd_value",
            Self::TooLate { .. } => "too_late",
            Self::TooEarly { .. } => "too_early",
            Self::Duplicate => "duplicate",
            Self::UnknownSpecies(_) => "unknown_species",
        }
    }
}

impl From<Malformed> for Rejection {
    fn from(m: Malformed) -> Self {
        Self::Malformed(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_list_is_complete_and_unique() {
        let samples = [
            Rejection::Undecodable(
                <forest_proto::v1::Envelope as prost::Message>::decode(&[0xff][..]).unwrap_err(),
            ),
            Rejection::Malformed(Malformed::MissingEnvelope),
            Rejection::UnknownBehaviour("x".into()),
            Rejection::NegativeAmount {
                behaviour: Behaviour::Walking,
                value: -1,
            },
            Rejection::AbsurdValue {
                behaviour: Behaviour::Walking,
                value: 2,
                max: 1,
            },
            Rejection::TooLate {
                occurred_at_ms: 1,
                horizon_ms: 2,
            },
            Rejection::TooEarly {
                occurred_at_ms: 2,
                received_at_ms: 1,
            },
            Rejection::Duplicate,
            Rejection::UnknownSpecies("oak".into()),
        ];
        let codes: Vec<_> = samples.iter().map(Rejection::code).collect();
        assert_eq!(codes, Rejection::CODES);
    }
}
