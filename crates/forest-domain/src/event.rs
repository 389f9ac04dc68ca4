//! Validated input events: what [`crate::RuleSet::apply`] folds.
//!
//! Decoded protobufs are checked against the contract in `proto/forest/v1` here, once, and
//! turned into an [`Event`]. Payments and mobility events, nearly all records, are read
//! without copies where they have the usual shape (`crate::wire`) and copied into an event
//! whose buffers are reused ([`Event::decode_into`]); everything else is decoded by prost,
//! and both go through the same validation.

use crate::Behaviour;
use crate::rejection::{Malformed, Rejection};
use crate::wire::{self, ActivityRef, EnvelopeRef, MobilityRef, PaymentRef};
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

fn envelope(env: Option<EnvelopeRef<'_>>) -> Result<EnvelopeRef<'_>, Malformed> {
    let env = env.ok_or(Malformed::MissingEnvelope)?;
    check_text("event_id", env.event_id, MAX_ID_BYTES, true)?;
    check_text("user_id", env.user_id, MAX_ID_BYTES, true)?;
    check_text("source", env.source, MAX_SOURCE_BYTES, true)?;
    if env.occurred_at_ms <= 0 {
        return Err(Malformed::NonPositiveTime(env.occurred_at_ms));
    }
    if env.schema_version != forest_proto::SCHEMA_VERSION {
        return Err(Malformed::SchemaVersion(env.schema_version));
    }
    Ok(env)
}

fn non_negative(behaviour: Behaviour, value: i64) -> Result<i64, Rejection> {
    if value < 0 {
        Err(Rejection::NegativeAmount { behaviour, value })
    } else {
        Ok(value)
    }
}

fn payment_credit(p: &PaymentRef<'_>) -> Result<Action, Rejection> {
    use pb::PaymentKind as K;
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
    check_text("merchant_id", p.merchant_id, MAX_TEXT_BYTES, false)?;
    let money = p.amount.ok_or(Malformed::MissingAmount)?;
    let c = money.currency.as_bytes();
    if c.len() != 3 || !c.iter().all(u8::is_ascii_uppercase) {
        return Err(Malformed::Currency(money.currency.to_owned()).into());
    }
    let quantity = non_negative(behaviour, money.amount_minor)?;
    Ok(Action::Credit {
        behaviour,
        quantity,
        tally: Tally::Add,
    })
}

fn mobility_credit(m: &MobilityRef<'_>) -> Result<Action, Rejection> {
    let (behaviour, quantity, tally) = match m.activity {
        None => return Err(Malformed::MissingVariant("activity").into()),
        Some(ActivityRef::Walking { steps, period }) => {
            let tally = match pb::walking::Period::try_from(period) {
                Ok(pb::walking::Period::Day) => Tally::DayTotal,
                Ok(pb::walking::Period::Interval) => Tally::Add,
                _ => return Err(Malformed::WalkingPeriod(period).into()),
            };
            (Behaviour::Walking, steps, tally)
        }
        Some(ActivityRef::BusRide { line, distance_m }) => {
            check_text("bus_ride.line", line, MAX_TEXT_BYTES, false)?;
            (Behaviour::BusRide, distance_m, Tally::Add)
        }
        Some(ActivityRef::SubwayRide { line, distance_m }) => {
            check_text("subway_ride.line", line, MAX_TEXT_BYTES, false)?;
            (Behaviour::SubwayRide, distance_m, Tally::Add)
        }
        Some(ActivityRef::BikeRide { distance_m }) => (Behaviour::BikeRide, distance_m, Tally::Add),
        Some(ActivityRef::CarpoolRide { distance_m }) => {
            (Behaviour::CarpoolRide, distance_m, Tally::Add)
        }
        Some(ActivityRef::EBikeRide { distance_m }) => {
            (Behaviour::EBikeRide, distance_m, Tally::Add)
        }
    };
    let quantity = non_negative(behaviour, quantity)?;
    Ok(Action::Credit {
        behaviour,
        quantity,
        tally,
    })
}

impl Event {
    /// An event to decode into ([`Event::decode_into`]): its fields mean nothing until then.
    /// It allocates nothing.
    pub fn placeholder() -> Self {
        Self {
            event_id: String::new(),
            user_id: String::new(),
            occurred_at_ms: 0,
            received_at_ms: 0,
            action: Action::Credit {
                behaviour: Behaviour::Walking,
                quantity: 0,
                tally: Tally::Add,
            },
        }
    }

    /// Decodes a record value of the given kind and validates it against the contract.
    pub fn decode(kind: InputKind, value: &[u8], received_at_ms: i64) -> Result<Self, Rejection> {
        let mut event = Self::placeholder();
        event.decode_into(kind, value, received_at_ms)?;
        Ok(event)
    }

    /// [`Event::decode`] into this event, reusing its strings' buffers: a consumer that
    /// decodes its records one after another into one event allocates nothing per record
    /// for payments and mobility events (see the `wire` module). The result is the same as
    /// `decode`'s. On an error this event's contents are unspecified.
    pub fn decode_into(
        &mut self,
        kind: InputKind,
        value: &[u8],
        received_at_ms: i64,
    ) -> Result<(), Rejection> {
        use prost::Message;
        match kind {
            InputKind::Payment => match wire::payment(value) {
                Some(p) => self.set_payment(&p, received_at_ms),
                None => self.set_payment(
                    &PaymentRef::from(&pb::PaymentEvent::decode(value)?),
                    received_at_ms,
                ),
            },
            InputKind::Mobility => match wire::mobility(value) {
                Some(m) => self.set_mobility(&m, received_at_ms),
                None => self.set_mobility(
                    &MobilityRef::from(&pb::MobilityEvent::decode(value)?),
                    received_at_ms,
                ),
            },
            // A few commands per user: prost's decode is cheap enough there.
            InputKind::Command => {
                *self = Self::from_command(pb::UserCommand::decode(value)?, received_at_ms)?;
                Ok(())
            }
        }
    }

    /// Copies the validated header and action in, keeping the strings' buffers.
    fn set(&mut self, h: &EnvelopeRef<'_>, received_at_ms: i64, action: Action) {
        self.event_id.clear();
        self.event_id.push_str(h.event_id);
        self.user_id.clear();
        self.user_id.push_str(h.user_id);
        self.occurred_at_ms = h.occurred_at_ms;
        self.received_at_ms = received_at_ms;
        self.action = action;
    }

    fn set_payment(&mut self, p: &PaymentRef<'_>, received_at_ms: i64) -> Result<(), Rejection> {
        let h = envelope(p.envelope)?;
        let action = payment_credit(p)?;
        self.set(&h, received_at_ms, action);
        Ok(())
    }

    fn set_mobility(&mut self, m: &MobilityRef<'_>, received_at_ms: i64) -> Result<(), Rejection> {
        let h = envelope(m.envelope)?;
        let action = mobility_credit(m)?;
        self.set(&h, received_at_ms, action);
        Ok(())
    }

    pub fn from_payment(p: pb::PaymentEvent, received_at_ms: i64) -> Result<Self, Rejection> {
        let mut event = Self::placeholder();
        event.set_payment(&PaymentRef::from(&p), received_at_ms)?;
        Ok(event)
    }

    pub fn from_mobility(m: pb::MobilityEvent, received_at_ms: i64) -> Result<Self, Rejection> {
        let mut event = Self::placeholder();
        event.set_mobility(&MobilityRef::from(&m), received_at_ms)?;
        Ok(event)
    }

    pub fn from_command(c: pb::UserCommand, received_at_ms: i64) -> Result<Self, Rejection> {
        use pb::user_command::Command;
        let h = envelope(c.envelope.as_ref().map(EnvelopeRef::from))?;
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
        let mut event = Self::placeholder();
        event.set(&h, received_at_ms, action);
        Ok(event)
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

    /// The borrowing reader against prost, the reference it must equal.
    mod wire_matches_prost {
        use super::*;
        use pb::mobility_event::Activity;
        use proptest::prelude::*;
        use prost::Message;

        /// What `decode_into` must return: prost's decode, then the shared validation.
        fn reference(kind: InputKind, bytes: &[u8]) -> Result<Event, Rejection> {
            match kind {
                InputKind::Payment => Event::from_payment(pb::PaymentEvent::decode(bytes)?, 9),
                _ => Event::from_mobility(pb::MobilityEvent::decode(bytes)?, 9),
            }
        }

        /// Checks one record both ways; returns whether the borrowing reader took it.
        fn check(kind: InputKind, bytes: &[u8]) -> Result<bool, TestCaseError> {
            let fast = match kind {
                InputKind::Payment => wire::payment(bytes).map(|v| {
                    let m = pb::PaymentEvent::decode(bytes);
                    (
                        format!("{v:?}"),
                        m.map(|m| format!("{:?}", PaymentRef::from(&m))),
                    )
                }),
                _ => wire::mobility(bytes).map(|v| {
                    let m = pb::MobilityEvent::decode(bytes);
                    (
                        format!("{v:?}"),
                        m.map(|m| format!("{:?}", MobilityRef::from(&m))),
                    )
                }),
            };
            if let Some((view, prost_view)) = &fast {
                // Whatever the reader accepts, prost decodes to the same fields.
                prop_assert_eq!(prost_view.as_ref().ok(), Some(view));
            }
            // Decoding into a used event (other strings, another action) gives the same
            // result as prost's decode into a fresh one.
            let mut reused = Event::decode(
                InputKind::Mobility,
                &pb::MobilityEvent {
                    envelope: env(),
                    activity: Some(Activity::BikeRide(pb::BikeRide { distance_m: 7 })),
                }
                .encode_to_vec(),
                1,
            )
            .expect("a valid event");
            let got = reused.decode_into(kind, bytes, 9).map(|()| reused);
            prop_assert_eq!(got, reference(kind, bytes));
            Ok(fast.is_some())
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(String::new()),
                "[a-z0-9-]{1,20}",
                // Non-ASCII, and over the 128-byte limits.
                "\\PC{1,40}",
                "[A-Z]{3}",
                "x{120,140}",
            ]
        }

        fn envelope() -> impl Strategy<Value = Option<pb::Envelope>> {
            proptest::option::weighted(
                0.9,
                (
                    text(),
                    text(),
                    any::<i64>(),
                    text(),
                    prop_oneof![Just(1u32), any::<u32>()],
                )
                    .prop_map(
                        |(event_id, user_id, occurred_at_ms, source, schema_version)| {
                            pb::Envelope {
                                event_id,
                                user_id,
                                occurred_at_ms,
                                source,
                                schema_version,
                            }
                        },
                    ),
            )
        }

        /// An envelope that passes validation: without it, nearly every generated record
        /// would be rejected and the accepted path would hardly be compared.
        fn valid_envelope() -> impl Strategy<Value = Option<pb::Envelope>> {
            (
                "[a-z0-9-]{1,20}",
                "[a-z0-9]{1,12}",
                1..i64::MAX,
                "[a-z]{1,10}",
            )
                .prop_map(|(event_id, user_id, occurred_at_ms, source)| {
                    Some(pb::Envelope {
                        event_id,
                        user_id,
                        occurred_at_ms,
                        source,
                        schema_version: forest_proto::SCHEMA_VERSION,
                    })
                })
        }

        fn valid_payment() -> impl Strategy<Value = pb::PaymentEvent> {
            (
                valid_envelope(),
                1..12i32,
                0..i64::MAX,
                "[A-Z]{3}",
                "[a-z0-9]{0,10}",
            )
                .prop_map(|(envelope, kind, amount_minor, currency, merchant_id)| {
                    pb::PaymentEvent {
                        envelope,
                        kind,
                        amount: Some(pb::Money {
                            amount_minor,
                            currency,
                        }),
                        merchant_id,
                    }
                })
        }

        fn valid_mobility() -> impl Strategy<Value = pb::MobilityEvent> {
            let activity = prop_oneof![
                (0..i64::MAX, 1..3i32)
                    .prop_map(|(steps, period)| Activity::Walking(pb::Walking { steps, period })),
                ("[A-Z0-9]{0,5}", 0..i64::MAX).prop_map(|(line, distance_m)| Activity::BusRide(
                    pb::BusRide { line, distance_m }
                )),
                ("[A-Z0-9]{0,5}", 0..i64::MAX).prop_map(|(line, distance_m)| {
                    Activity::SubwayRide(pb::SubwayRide { line, distance_m })
                }),
                (0..i64::MAX)
                    .prop_map(|distance_m| Activity::BikeRide(pb::BikeRide { distance_m })),
                (0..i64::MAX)
                    .prop_map(|distance_m| Activity::CarpoolRide(pb::CarpoolRide { distance_m })),
                (0..i64::MAX)
                    .prop_map(|distance_m| Activity::EBikeRide(pb::EBikeRide { distance_m })),
            ];
            (valid_envelope(), activity).prop_map(|(envelope, activity)| pb::MobilityEvent {
                envelope,
                activity: Some(activity),
            })
        }

        fn payment() -> impl Strategy<Value = pb::PaymentEvent> {
            (
                envelope(),
                prop_oneof![0..12i32, any::<i32>()],
                proptest::option::weighted(0.9, (any::<i64>(), text())),
                text(),
            )
                .prop_map(|(envelope, kind, amount, merchant_id)| pb::PaymentEvent {
                    envelope,
                    kind,
                    amount: amount.map(|(amount_minor, currency)| pb::Money {
                        amount_minor,
                        currency,
                    }),
                    merchant_id,
                })
        }

        fn mobility() -> impl Strategy<Value = pb::MobilityEvent> {
            let activity = prop_oneof![
                (any::<i64>(), prop_oneof![0..3i32, any::<i32>()])
                    .prop_map(|(steps, period)| Activity::Walking(pb::Walking { steps, period })),
                (text(), any::<i64>()).prop_map(|(line, distance_m)| Activity::BusRide(
                    pb::BusRide { line, distance_m }
                )),
                (text(), any::<i64>()).prop_map(|(line, distance_m)| {
                    Activity::SubwayRide(pb::SubwayRide { line, distance_m })
                }),
                any::<i64>().prop_map(|distance_m| Activity::BikeRide(pb::BikeRide { distance_m })),
                any::<i64>()
                    .prop_map(|distance_m| Activity::CarpoolRide(pb::CarpoolRide { distance_m })),
                any::<i64>()
                    .prop_map(|distance_m| Activity::EBikeRide(pb::EBikeRide { distance_m })),
            ];
            (envelope(), proptest::option::weighted(0.9, activity))
                .prop_map(|(envelope, activity)| pb::MobilityEvent { envelope, activity })
        }

        /// A record as an upstream system might send it, or mangled: cut short, a byte
        /// changed, bytes inserted, or another record appended (protobuf then merges the two).
        #[derive(Debug, Clone)]
        enum Mangle {
            None,
            Cut(usize),
            Set(usize, u8),
            Insert(usize, Vec<u8>),
            Append,
        }

        fn mangle() -> impl Strategy<Value = Mangle> {
            prop_oneof![
                4 => Just(Mangle::None),
                1 => any::<usize>().prop_map(Mangle::Cut),
                2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mangle::Set(i, b)),
                1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..6))
                    .prop_map(|(i, b)| Mangle::Insert(i, b)),
                1 => Just(Mangle::Append),
            ]
        }

        fn apply(mut bytes: Vec<u8>, other: &[u8], m: &Mangle) -> Vec<u8> {
            let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
            match m {
                Mangle::None => {}
                Mangle::Cut(i) => bytes.truncate(at(*i, bytes.len())),
                Mangle::Set(i, b) => {
                    let i = at(*i, bytes.len());
                    if let Some(x) = bytes.get_mut(i) {
                        *x = *b;
                    }
                }
                Mangle::Insert(i, b) => {
                    let i = at(*i, bytes.len() + 1);
                    bytes.splice(i..i, b.iter().copied());
                }
                Mangle::Append => bytes.extend_from_slice(other),
            }
            bytes
        }

        /// Checks record `p`, mangled by `m` (with `q` to append); the reader must take it
        /// unmangled, as it takes every record prost itself encodes.
        fn mangled(
            kind: InputKind,
            p: &impl Message,
            q: &impl Message,
            m: &Mangle,
        ) -> Result<(), TestCaseError> {
            let bytes = apply(p.encode_to_vec(), &q.encode_to_vec(), m);
            let taken = check(kind, &bytes)?;
            if matches!(m, Mangle::None) {
                prop_assert!(taken);
            }
            Ok(())
        }

        proptest! {
            #[test]
            fn payments(p in payment(), q in payment(), m in mangle()) {
                mangled(InputKind::Payment, &p, &q, &m)?;
            }

            #[test]
            fn mobility_events(p in mobility(), q in mobility(), m in mangle()) {
                mangled(InputKind::Mobility, &p, &q, &m)?;
            }

            /// Valid records, as upstream sends nearly all of them: each decodes, through the
            /// reader, into a used event, to what prost and the validation give.
            #[test]
            fn valid_records(p in valid_payment(), m in valid_mobility()) {
                for (kind, bytes) in [
                    (InputKind::Payment, p.encode_to_vec()),
                    (InputKind::Mobility, m.encode_to_vec()),
                ] {
                    prop_assert!(check(kind, &bytes)?);
                    prop_assert!(Event::decode(kind, &bytes, 9).is_ok());
                }
            }

            #[test]
            fn any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                check(InputKind::Payment, &bytes)?;
                check(InputKind::Mobility, &bytes)?;
            }
        }

        /// The shapes the reader leaves to prost, each decoded as prost decodes it.
        #[test]
        fn unusual_records_go_to_prost() {
            let p = payment_msg();
            let one = p.encode_to_vec();
            // The same record twice: protobuf merges the two (same values here).
            let twice = [one.clone(), one.clone()].concat();
            // An unknown field (number 15, varint 1), which prost skips.
            let unknown = [one.clone(), vec![15 << 3, 1]].concat();
            // A varint of 11 bytes, and a length past the end.
            let long_varint = [vec![2 << 3], vec![0x80; 10], vec![1]].concat();
            // A 10-byte varint past 64 bits: prost refuses it.
            let overflow = [vec![2 << 3], vec![0xff; 9], vec![2]].concat();
            let past_end = vec![4 << 3 | 2, 5, b'a'];
            for bytes in [&twice, &unknown, &long_varint, &overflow, &past_end] {
                assert_eq!(wire::payment(bytes), None, "{bytes:?}");
                assert!(check(InputKind::Payment, bytes).is_ok());
            }
            assert_eq!(
                Event::decode(InputKind::Payment, &twice, 9),
                reference(InputKind::Payment, &one)
            );
            assert!(Event::decode(InputKind::Payment, &unknown, 9).is_ok());
            assert_eq!(
                Event::decode(InputKind::Payment, &past_end, 9)
                    .unwrap_err()
                    .code(),
                "undecodable"
            );
            // Empty embedded messages are present with their defaults, as in prost.
            for (kind, bytes) in [
                (InputKind::Payment, vec![1 << 3 | 2, 0]),
                (InputKind::Payment, vec![3 << 3 | 2, 0]),
                (InputKind::Mobility, vec![1 << 3 | 2, 0]),
                (InputKind::Mobility, vec![2 << 3 | 2, 0]),
                (InputKind::Mobility, vec![5 << 3 | 2, 0]),
            ] {
                assert!(check(kind, &bytes).unwrap(), "{bytes:?}");
            }
            assert_eq!(
                wire::payment(&[1 << 3 | 2, 0]).and_then(|p| p.envelope),
                Some(EnvelopeRef::default())
            );
            assert_eq!(
                Event::decode(InputKind::Mobility, &[2 << 3 | 2, 0], 9),
                Err(Malformed::MissingEnvelope.into())
            );
            // Two different activities: prost keeps the last.
            let walk = pb::MobilityEvent {
                envelope: env(),
                activity: Some(Activity::Walking(pb::Walking {
                    steps: 10,
                    period: 2,
                })),
            };
            let bike = pb::MobilityEvent {
                envelope: None,
                activity: Some(Activity::BikeRide(pb::BikeRide { distance_m: 3 })),
            };
            let both = [walk.encode_to_vec(), bike.encode_to_vec()].concat();
            assert_eq!(wire::mobility(&both), None);
            assert_eq!(
                Event::decode(InputKind::Mobility, &both, 9).unwrap().action,
                Action::Credit {
                    behaviour: Behaviour::BikeRide,
                    quantity: 3,
                    tally: Tally::Add
                }
            );
        }

        fn payment_msg() -> pb::PaymentEvent {
            pb::PaymentEvent {
                envelope: env(),
                kind: pb::PaymentKind::EInvoice as i32,
                amount: Some(pb::Money {
                    amount_minor: 1_250,
                    currency: "CNY".into(),
                }),
                merchant_id: "m-7".into(),
            }
        }
    }
}
