//! Validated input events: what [`crate::RuleSet::apply`] folds.
//!
//! Decoded protobufs are checked against the contract in `proto/forest/v1` here, once, and
//! turned into an [`Event`]. The conversion takes the protobuf by value and moves its strings,
//! so it does not copy them.

use crate::Behaviour;
use crate::rejection::{Malformed, Rejection};
use chrono_tz::Tz;
use forest_proto::v1 as pb;

/// Longest `event_id` / `user_id` accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest `source`, in bytes.
pub const MAX_SOURCE_BYTES: usize = 64;
/// Longest informational string (merchant id, line name, species id), in bytes.
pub const MAX_TEXT_BYTES: usize = 128;

/// Which input message type a record holds: one per input topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    Payment,
    Mobility,
    Command,
}

/// One validated input event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event_id: String,
    pub user_id: String,
    /// Event time, UTC ms.
    pub occurred_at_ms: i64,
    /// The Kafka record's timestamp, UTC ms: the fold's only notion of "now", so a replay of
    /// the same log gives the same result.
    pub received_at_ms: i64,
    pub action: Action,
}

/// How a report's quantity relates to the other reports of the same user and local day.
///
/// It matters only for rules whose `quantity_scope` is `day` (walking in the default rules):
/// there the day's quantity is kept, so that a step counter that reports both a day total and
/// intervals, or re-sends its day total with a new event id, is not credited twice for the same
/// steps. For every other rule each report is credited on its own and this is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tally {
    /// The quantity comes on top of what the day already has (an interval's steps, a ride).
    Add,
    /// The quantity is the day's cumulative total so far (`Walking.PERIOD_DAY`): only what it
    /// adds over the day's quantity already counted earns energy.
    DayTotal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A behaviour to credit. `quantity` is in the behaviour's [`crate::behaviour::Unit`]:
    /// steps, metres or minor units of money. Checked `>= 0` at validation.
    Credit {
        behaviour: Behaviour,
        quantity: i64,
        tally: Tally,
    },
    ChooseSpecies {
        species_id: String,
    },
    SetTimezone {
        timezone: Tz,
    },
}

fn check_text(field: &'static str, s: &str, max: usize, required: bool) -> Result<(), Malformed> {
    if required && s.is_empty() {
        return Err(Malformed::Empty { field });
    }
    if s.len() > max {
        return Err(Malformed::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

struct Header {
    event_id: String,
    user_id: String,
    occurred_at_ms: i64,
}

fn envelope(env: Option<pb::Envelope>) -> Result<Header, Malformed> {
    let env = env.ok_or(Malformed::MissingEnvelope)?;
    check_text("event_id", &env.event_id, MAX_ID_BYTES, true)?;
    check_text("user_id", &env.user_id, MAX_ID_BYTES, true)?;
    check_text("source", &env.source, MAX_SOURCE_BYTES, true)?;
    if env.occurred_at_ms <= 0 {
        return Err(Malformed::NonPositiveTime(env.occurred_at_ms));
    }
    if env.schema_version != forest_proto::SCHEMA_VERSION {
        return Err(Malformed::SchemaVersion(env.schema_version));
    }
    Ok(Header {
        event_id: env.event_id,
        user_id: env.user_id,
        occurred_at_ms: env.occurred_at_ms,
    })
}

fn non_negative(behaviour: Behaviour, value: i64) -> Result<i64, Rejection> {
    if value < 0 {
        Err(Rejection::NegativeAmount { behaviour, value })
    } else {
        Ok(value)
    }
}

impl Event {
    /// Decodes a record value of the given kind and validates it against the contract.
    pub fn decode(kind: InputKind, value: &[u8], received_at_ms: i64) -> Result<Self, Rejection> {
        use prost::Message;
        match kind {
            InputKind::Payment => {
                Self::from_payment(pb::PaymentEvent::decode(value)?, received_at_ms)
            }
            InputKind::Mobility => {
                Self::from_mobility(pb::MobilityEvent::decode(value)?, received_at_ms)
            }
            InputKind::Command => {
                Self::from_command(pb::UserCommand::decode(value)?, received_at_ms)
            }
        }
    }

    fn new(h: Header, received_at_ms: i64, action: Action) -> Self {
        Self {
            event_id: h.event_id,
            user_id: h.user_id,
            occurred_at_ms: h.occurred_at_ms,
            received_at_ms,
            action,
        }
    }

    pub fn from_payment(p: pb::PaymentEvent, received_at_ms: i64) -> Result<Self, Rejection> {
        use pb::PaymentKind as K;
        let h = envelope(p.envelope)?;
        let behaviour = match K::try_from(p.kind) {
            Ok(K::OfflinePayment) => Behaviour::OfflinePayment,
            Ok(K::UtilityBill) => Behaviour::UtilityBill,
            Ok(K::MovieTicket) => Behaviour::MovieTicket,
            Ok(K::TrainTicket) => Behaviour::TrainTicket,
            Ok(K::HospitalAppointment) => Behaviour::HospitalAppointment,
            Ok(K::EInvoice) => Behaviour::EInvoice,
            Ok(K::TrafficFine) => Behaviour::TrafficFine,
            Ok(K::EtcToll) => Behaviour::EtcToll,
            Ok(K::EReceipt) => Behaviour::EReceipt,
            Ok(K::ReusableCup) => Behaviour::ReusableCup,
            Ok(K::EStatement) => Behaviour::EStatement,
            Ok(K::Unspecified) | Err(_) => {
                return Err(Rejection::UnknownBehaviour(format!(
                    "payment kind {}",
                    p.kind
                )));
            }
        };
        check_text("merchant_id", &p.merchant_id, MAX_TEXT_BYTES, false)?;
        let money = p.amount.ok_or(Malformed::MissingAmount)?;
        let c = money.currency.as_bytes();
        if c.len() != 3 || !c.iter().all(u8::is_ascii_uppercase) {
            return Err(Malformed::Currency(money.currency).into());
        }
        let quantity = non_negative(behaviour, money.amount_minor)?;
        Ok(Self::new(
            h,
            received_at_ms,
            Action::Credit {
                behaviour,
                quantity,
                tally: Tally::Add,
            },
        ))
    }

    pub fn from_mobility(m: pb::MobilityEvent, received_at_ms: i64) -> Result<Self, Rejection> {
        use pb::mobility_event::Activity;
        let h = envelope(m.envelope)?;
        let (behaviour, quantity, tally) = match m.activity {
            None => return Err(Malformed::MissingVariant("activity").into()),
            Some(Activity::Walking(w)) => {
                let tally = match pb::walking::Period::try_from(w.period) {
                    Ok(pb::walking::Period::Day) => Tally::DayTotal,
                    Ok(pb::walking::Period::Interval) => Tally::Add,
                    _ => return Err(Malformed::WalkingPeriod(w.period).into()),
                };
                (Behaviour::Walking, w.steps, tally)
            }
            Some(Activity::BusRide(r)) => {
                check_text("bus_ride.line", &r.line, MAX_TEXT_BYTES, false)?;
                (Behaviour::BusRide, r.distance_m, Tally::Add)
            }
            Some(Activity::SubwayRide(r)) => {
                check_text("subway_ride.line", &r.line, MAX_TEXT_BYTES, false)?;
                (Behaviour::SubwayRide, r.distance_m, Tally::Add)
            }
            Some(Activity::BikeRide(r)) => (Behaviour::BikeRide, r.distance_m, Tally::Add),
            Some(Activity::CarpoolRide(r)) => (Behaviour::CarpoolRide, r.distance_m, Tally::Add),
            Some(Activity::EBikeRide(r)) => (Behaviour::EBikeRide, r.distance_m, Tally::Add),
        };
        let quantity = non_negative(behaviour, quantity)?;
        Ok(Self::new(
            h,
            received_at_ms,
            Action::Credit {
                behaviour,
                quantity,
                tally,
            },
        ))
    }

    pub fn from_command(c: pb::UserCommand, received_at_ms: i64) -> Result<Self, Rejection> {
        use pb::user_command::Command;
        let h = envelope(c.envelope)?;
        let action = match c.command {
            None => return Err(Malformed::MissingVariant("command").into()),
            Some(Command::ChooseSpecies(s)) => {
                check_text("species_id", &s.species_id, MAX_TEXT_BYTES, false)?;
                Action::ChooseSpecies {
                    species_id: s.species_id,
                }
            }
            Some(Command::SetTimezone(t)) => match t.iana_name.parse::<Tz>() {
                Ok(timezone) => Action::SetTimezone { timezone },
                Err(_) => return Err(Malformed::Timezone(t.iana_name).into()),
            },
        };
        Ok(Self::new(h, received_at_ms, action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Option<pb::Envelope> {
        Some(pb::Envelope {
            event_id: "e1".into(),
            user_id: "u1".into(),
            occurred_at_ms: 1_764_000_000_000,
            source: "test".into(),
            schema_version: 1,
        })
    }

    fn payment(kind: pb::PaymentKind, amount: i64, currency: &str) -> pb::PaymentEvent {
        pb::PaymentEvent {
            envelope: env(),
            kind: kind as i32,
            amount: Some(pb::Money {
                amount_minor: amount,
                currency: currency.into(),
            }),
            merchant_id: String::new(),
        }
    }

    #[test]
    fn valid_payment_becomes_a_credit() {
        let e = Event::from_payment(payment(pb::PaymentKind::UtilityBill, 500, "CNY"), 7).unwrap();
        assert_eq!(
            e.action,
            Action::Credit {
                behaviour: Behaviour::UtilityBill,
                quantity: 500,
                tally: Tally::Add,
            }
        );
        assert_eq!((e.user_id.as_str(), e.received_at_ms), ("u1", 7));
    }

    #[test]
    fn payment_rejections_are_typed() {
        let r = |p| Event::from_payment(p, 0).unwrap_err();
        assert_eq!(
            r(payment(pb::PaymentKind::OfflinePayment, -1, "CNY")).code(),
            "negative_amount"
        );
        assert_eq!(
            r(payment(pb::PaymentKind::Unspecified, 1, "CNY")).code(),
            "unknown_behaviour"
        );
        let mut p = payment(pb::PaymentKind::OfflinePayment, 1, "CNY");
        p.kind = 99;
        assert_eq!(r(p).code(), "unknown_behaviour");
        assert_eq!(
            r(payment(pb::PaymentKind::OfflinePayment, 1, "cny")),
            Rejection::Malformed(Malformed::Currency("cny".into()))
        );
        let mut p = payment(pb::PaymentKind::OfflinePayment, 1, "CNY");
        p.amount = None;
        assert_eq!(r(p), Rejection::Malformed(Malformed::MissingAmount));
    }

    #[test]
    fn envelope_rules() {
        let mk = |f: &dyn Fn(&mut pb::Envelope)| {
            let mut p = payment(pb::PaymentKind::OfflinePayment, 100, "CNY");
            f(p.envelope.as_mut().unwrap());
            Event::from_payment(p, 0).unwrap_err()
        };
        assert_eq!(
            mk(&|e| e.event_id.clear()),
            Malformed::Empty { field: "event_id" }.into()
        );
        assert_eq!(
            mk(&|e| e.user_id.clear()),
            Malformed::Empty { field: "user_id" }.into()
        );
        assert_eq!(
            mk(&|e| e.schema_version = 2),
            Malformed::SchemaVersion(2).into()
        );
        assert_eq!(
            mk(&|e| e.occurred_at_ms = i64::MIN),
            Malformed::NonPositiveTime(i64::MIN).into()
        );
        assert_eq!(
            mk(&|e| e.user_id = "x".repeat(129)),
            Malformed::TooLong {
                field: "user_id",
                len: 129,
                max: 128
            }
            .into()
        );
        let mut p = payment(pb::PaymentKind::OfflinePayment, 100, "CNY");
        p.envelope = None;
        assert_eq!(
            Event::from_payment(p, 0).unwrap_err(),
            Malformed::MissingEnvelope.into()
        );
    }

    #[test]
    fn mobility_and_commands() {
        use pb::mobility_event::Activity;
        let walk = |steps, period: i32| pb::MobilityEvent {
            envelope: env(),
            activity: Some(Activity::Walking(pb::Walking { steps, period })),
        };
        let ok = Event::from_mobility(walk(3000, 1), 0).unwrap();
        assert_eq!(
            ok.action,
            Action::Credit {
                behaviour: Behaviour::Walking,
                quantity: 3000,
                tally: Tally::DayTotal,
            }
        );
        let ok = Event::from_mobility(walk(400, 2), 0).unwrap();
        assert_eq!(
            ok.action,
            Action::Credit {
                behaviour: Behaviour::Walking,
                quantity: 400,
                tally: Tally::Add,
            }
        );
        assert_eq!(
            Event::from_mobility(walk(3000, 0), 0).unwrap_err(),
            Malformed::WalkingPeriod(0).into()
        );
        assert_eq!(
            Event::from_mobility(walk(-5, 2), 0).unwrap_err().code(),
            "negative_amount"
        );
        let ride = |activity| {
            Event::from_mobility(
                pb::MobilityEvent {
                    envelope: env(),
                    activity: Some(activity),
                },
                0,
            )
        };
        assert_eq!(
            ride(Activity::CarpoolRide(pb::CarpoolRide {
                distance_m: 12_000
            }))
            .unwrap()
            .action,
            Action::Credit {
                behaviour: Behaviour::CarpoolRide,
                quantity: 12_000,
                tally: Tally::Add,
            }
        );
        assert_eq!(
            ride(Activity::EBikeRide(pb::EBikeRide { distance_m: 2_500 }))
                .unwrap()
                .action,
            Action::Credit {
                behaviour: Behaviour::EBikeRide,
                quantity: 2_500,
                tally: Tally::Add,
            }
        );
        assert_eq!(
            ride(Activity::EBikeRide(pb::EBikeRide { distance_m: -1 }))
                .unwrap_err()
                .code(),
            "negative_amount"
        );
        // Line names: up to MAX_TEXT_BYTES (128), as mobility.proto says.
        let bus = |len: usize| {
            ride(Activity::BusRide(pb::BusRide {
                line: "x".repeat(len),
                distance_m: 0,
            }))
        };
        assert!(bus(MAX_TEXT_BYTES).is_ok());
        assert_eq!(
            bus(MAX_TEXT_BYTES + 1).unwrap_err(),
            Malformed::TooLong {
                field: "bus_ride.line",
                len: MAX_TEXT_BYTES + 1,
                max: MAX_TEXT_BYTES
            }
            .into()
        );
        let none = pb::MobilityEvent {
            envelope: env(),
            activity: None,
        };
        assert_eq!(
            Event::from_mobility(none, 0).unwrap_err(),
            Malformed::MissingVariant("activity").into()
        );

        use pb::user_command::Command;
        let tz = pb::UserCommand {
            envelope: env(),
            command: Some(Command::SetTimezone(pb::SetTimezone {
                iana_name: "Europe/Paris".into(),
            })),
        };
        assert_eq!(
            Event::from_command(tz, 0).unwrap().action,
            Action::SetTimezone {
                timezone: chrono_tz::Europe::Paris
            }
        );
        let bad = pb::UserCommand {
            envelope: env(),
            command: Some(Command::SetTimezone(pb::SetTimezone {
                iana_name: "Nowhere".into(),
            })),
        };
        assert_eq!(
            Event::from_command(bad, 0).unwrap_err(),
            Malformed::Timezone("Nowhere".into()).into()
        );
    }
}
