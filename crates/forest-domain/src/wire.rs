//! A borrowing reader for the two hot input messages, `PaymentEvent` and `MobilityEvent`.
//!
//! Why: prost decodes every string field into a `String` of its own, so each record cost
//! up to five allocations (event id, user id, source; currency and merchant id, or a line
//! name) and as many frees, only for [`crate::Event`] to keep two of them and drop the rest. This reader
//! returns views whose strings point into the record's bytes, and the event is filled from
//! them into buffers it keeps (`Event::decode_into`).
//!
//! What it guarantees: it either returns exactly what prost's decode of the same bytes holds
//! (the property tests in `event.rs` compare the two on generated and mangled records), or
//! `None`, and the caller then decodes with prost. It reads only the common shape: each
//! known field at most once and with its declared wire type, no unknown fields, at most one
//! `activity`. Anything else (a repeated field, which protobuf merges; an unknown field,
//! which prost skips; a broken record, whose error prost words) goes to prost, so errors and
//! rare encodings keep prost's exact behaviour without this module reimplementing it.

/// An `Envelope`, borrowing its strings.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EnvelopeRef<'a> {
    pub event_id: &'a str,
    pub user_id: &'a str,
    pub occurred_at_ms: i64,
    pub source: &'a str,
    pub schema_version: u32,
}

/// A `Money`, borrowing its currency.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MoneyRef<'a> {
    pub amount_minor: i64,
    pub currency: &'a str,
}

/// A `PaymentEvent`, borrowing its strings.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PaymentRef<'a> {
    pub envelope: Option<EnvelopeRef<'a>>,
    pub kind: i32,
    pub amount: Option<MoneyRef<'a>>,
    pub merchant_id: &'a str,
}

/// A `MobilityEvent`'s `activity`, borrowing its strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActivityRef<'a> {
    Walking { steps: i64, period: i32 },
    BusRide { line: &'a str, distance_m: i64 },
    SubwayRide { line: &'a str, distance_m: i64 },
    BikeRide { distance_m: i64 },
    CarpoolRide { distance_m: i64 },
    EBikeRide { distance_m: i64 },
}

/// A `MobilityEvent`, borrowing its strings.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MobilityRef<'a> {
    pub envelope: Option<EnvelopeRef<'a>>,
    pub activity: Option<ActivityRef<'a>>,
}

const VARINT: u8 = 0;
const LEN: u8 = 2;

/// The bytes not read yet. Every method returns `None` where prost would fail or where this
/// reader does not follow (see the module's docs).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.0.is_empty()
    }

    /// A base-128 varint of at most 10 bytes whose value fits in 64 bits, as prost reads it.
    /// Integer fields take it truncated to their type, as prost does (`as i64`, `as i32`,
    /// `as u32`).
    #[inline]
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            if i == 9 && b > 1 {
                return None;
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.0 = &self.0[i + 1..];
                return Some(value);
            }
        }
        None
    }

    /// A field key: (field number, wire type).
    #[inline]
    fn key(&mut self) -> Option<(u32, u8)> {
        let key = u32::try_from(self.varint()?).ok()?;
        let tag = key >> 3;
        (tag != 0).then_some((tag, (key & 7) as u8))
    }

    /// A length-delimited field's bytes.
    #[inline]
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        let (field, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(field)
    }

    #[inline]
    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
}

/// Marks field `tag` (1..=31) as read; `None` if it was already: protobuf merges a repeated
/// field, which this reader leaves to prost.
#[inline]
fn once(seen: &mut u32, tag: u32) -> Option<()> {
    let bit = 1u32 << tag;
    if *seen & bit != 0 {
        return None;
    }
    *seen |= bit;
    Some(())
}

/// Reads a message's fields in turn: `field` gets each one's number, wire type and the
/// reader positioned at its value, and returns `None` for a field it does not take. A field
/// number seen twice is `None` too (see [`once`]).
#[inline]
fn fields<'a>(
    bytes: &'a [u8],
    mut field: impl FnMut(u32, u8, &mut Reader<'a>) -> Option<()>,
) -> Option<()> {
    let mut r = Reader(bytes);
    let mut seen = 0;
    while !r.done() {
        let (tag, wire) = r.key()?;
        once(&mut seen, tag.min(31))?;
        field(tag, wire, &mut r)?;
    }
    Some(())
}

fn envelope(bytes: &[u8]) -> Option<EnvelopeRef<'_>> {
    let mut e = EnvelopeRef::default();
    fields(bytes, |tag, wire, r| {
        match (tag, wire) {
            (1, LEN) => e.event_id = r.str()?,
            (2, LEN) => e.user_id = r.str()?,
            (3, VARINT) => e.occurred_at_ms = r.varint()? as i64,
            (4, LEN) => e.source = r.str()?,
            (5, VARINT) => e.schema_version = r.varint()? as u32,
            _ => return None,
        }
        Some(())
    })?;
    Some(e)
}

fn money(bytes: &[u8]) -> Option<MoneyRef<'_>> {
    let mut m = MoneyRef::default();
    fields(bytes, |tag, wire, r| {
        match (tag, wire) {
            (1, VARINT) => m.amount_minor = r.varint()? as i64,
            (2, LEN) => m.currency = r.str()?,
            _ => return None,
        }
        Some(())
    })?;
    Some(m)
}

/// A `PaymentEvent`'s view, or `None`: decode it with prost instead.
pub(crate) fn payment(bytes: &[u8]) -> Option<PaymentRef<'_>> {
    let mut p = PaymentRef::default();
    fields(bytes, |tag, wire, r| {
        match (tag, wire) {
            (1, LEN) => p.envelope = Some(envelope(r.bytes()?)?),
            (2, VARINT) => p.kind = r.varint()? as i32,
            (3, LEN) => p.amount = Some(money(r.bytes()?)?),
            (4, LEN) => p.merchant_id = r.str()?,
            _ => return None,
        }
        Some(())
    })?;
    Some(p)
}

/// The fields of a ride message: a line name (tag 1, for bus and subway rides only) and a
/// distance (tag 2 with a line, tag 1 without).
fn ride(bytes: &[u8], has_line: bool) -> Option<(&str, i64)> {
    let (mut line, mut distance_m) = ("", 0);
    fields(bytes, |tag, wire, r| {
        match (tag, wire, has_line) {
            (1, LEN, true) => line = r.str()?,
            (2, VARINT, true) | (1, VARINT, false) => distance_m = r.varint()? as i64,
            _ => return None,
        }
        Some(())
    })?;
    Some((line, distance_m))
}

fn walking(bytes: &[u8]) -> Option<ActivityRef<'_>> {
    let (mut steps, mut period) = (0, 0);
    fields(bytes, |tag, wire, r| {
        match (tag, wire) {
            (1, VARINT) => steps = r.varint()? as i64,
            (2, VARINT) => period = r.varint()? as i32,
            _ => return None,
        }
        Some(())
    })?;
    Some(ActivityRef::Walking { steps, period })
}

/// A `MobilityEvent`'s view, or `None`: decode it with prost instead.
pub(crate) fn mobility(bytes: &[u8]) -> Option<MobilityRef<'_>> {
    let mut m = MobilityRef::default();
    fields(bytes, |tag, wire, r| {
        if tag >= 2 && m.activity.is_some() {
            // A second `activity`: prost keeps the last one (or merges a repeated one).
            return None;
        }
        let field = match (tag, wire) {
            (1, LEN) => {
                m.envelope = Some(envelope(r.bytes()?)?);
                return Some(());
            }
            (2..=7, LEN) => r.bytes()?,
            _ => return None,
        };
        m.activity = Some(match tag {
            2 => walking(field)?,
            3 => {
                let (line, distance_m) = ride(field, true)?;
                ActivityRef::BusRide { line, distance_m }
            }
            4 => {
                let (line, distance_m) = ride(field, true)?;
                ActivityRef::SubwayRide { line, distance_m }
            }
            5 => ActivityRef::BikeRide {
                distance_m: ride(field, false)?.1,
            },
            6 => ActivityRef::CarpoolRide {
                distance_m: ride(field, false)?.1,
            },
            _ => ActivityRef::EBikeRide {
                distance_m: ride(field, false)?.1,
            },
        });
        Some(())
    })?;
    Some(m)
}

/// Views of prost's messages, for records this reader leaves to prost: both paths then share
/// one validation.
mod from_prost {
    use super::*;
    use forest_proto::v1 as pb;

    impl<'a> From<&'a pb::Envelope> for EnvelopeRef<'a> {
        fn from(e: &'a pb::Envelope) -> Self {
            Self {
                event_id: &e.event_id,
                user_id: &e.user_id,
                occurred_at_ms: e.occurred_at_ms,
                source: &e.source,
                schema_version: e.schema_version,
            }
        }
    }

    impl<'a> From<&'a pb::PaymentEvent> for PaymentRef<'a> {
        fn from(p: &'a pb::PaymentEvent) -> Self {
            Self {
                envelope: p.envelope.as_ref().map(EnvelopeRef::from),
                kind: p.kind,
                amount: p.amount.as_ref().map(|m| MoneyRef {
                    amount_minor: m.amount_minor,
                    currency: &m.currency,
                }),
                merchant_id: &p.merchant_id,
            }
        }
    }

    impl<'a> From<&'a pb::MobilityEvent> for MobilityRef<'a> {
        fn from(m: &'a pb::MobilityEvent) -> Self {
            use pb::mobility_event::Activity as A;
            Self {
                envelope: m.envelope.as_ref().map(EnvelopeRef::from),
                activity: m.activity.as_ref().map(|a| match a {
                    A::Walking(w) => ActivityRef::Walking {
                        steps: w.steps,
                        period: w.period,
                    },
                    A::BusRide(r) => ActivityRef::BusRide {
                        line: &r.line,
                        distance_m: r.distance_m,
                    },
                    A::SubwayRide(r) => ActivityRef::SubwayRide {
                        line: &r.line,
                        distance_m: r.distance_m,
                    },
                    A::BikeRide(r) => ActivityRef::BikeRide {
                        distance_m: r.distance_m,
                    },
                    A::CarpoolRide(r) => ActivityRef::CarpoolRide {
                        distance_m: r.distance_m,
                    },
                    A::EBikeRide(r) => ActivityRef::EBikeRide {
                        distance_m: r.distance_m,
                    },
                }),
            }
        }
    }
}
