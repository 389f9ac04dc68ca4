//! Golden-bytes tests: the encoded form of fixed messages is committed under `tests/golden/`.
//! A change to the .proto files that alters the wire format of an existing message (a field
//! renumbered, a type changed) makes these fail. Decoding the committed bytes must also give
//! back the same message, so old producers' records stay readable.
//!
//! To accept an intended change (a NEW field, say), run with `FOREST_BLESS=1` and review the diff.

use forest_proto::v1::*;
use prost::Message;
use std::path::PathBuf;

fn envelope(id: &str) -> Option<Envelope> {
    Some(Envelope {
        event_id: id.into(),
        user_id: "user-42".into(),
        occurred_at_ms: 1_764_000_000_000,
        source: "alipay-pay".into(),
        schema_version: 1,
    })
}

fn check<M: Message + Default + PartialEq + std::fmt::Debug>(name: &str, msg: M) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/{name}.hex"));
    let encoded = hex::encode(msg.encode_to_vec());
    if std::env::var_os("FOREST_BLESS").is_some() {
        std::fs::write(&path, format!("{encoded}\n")).expect("write golden file");
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with FOREST_BLESS=1 to create it",
            path.display()
        )
    });
    assert_eq!(encoded, golden.trim(), "wire format of {name} changed");
    let bytes = hex::decode(golden.trim()).expect("golden file is hex");
    assert_eq!(
        M::decode(bytes.as_slice()).expect("golden bytes decode"),
        msg
    );
}

#[test]
fn payment_event() {
    check(
        "payment_event",
        PaymentEvent {
            envelope: envelope("pay-1"),
            kind: PaymentKind::UtilityBill as i32,
            amount: Some(Money {
                amount_minor: 12_345,
                currency: "CNY".into(),
            }),
            merchant_id: "state-grid".into(),
        },
    );
}

#[test]
fn mobility_walking() {
    check(
        "mobility_walking",
        MobilityEvent {
            envelope: envelope("walk-1"),
            activity: Some(mobility_event::Activity::Walking(Walking {
                steps: 12_000,
                period: walking::Period::Day as i32,
            })),
        },
    );
}

#[test]
fn mobility_bike_ride() {
    check(
        "mobility_bike_ride",
        MobilityEvent {
            envelope: envelope("bike-1"),
            activity: Some(mobility_event::Activity::BikeRide(BikeRide {
                distance_m: 3_250,
            })),
        },
    );
}

#[test]
fn command_choose_species() {
    check(
        "command_choose_species",
        UserCommand {
            envelope: envelope("cmd-1"),
            command: Some(user_command::Command::ChooseSpecies(ChooseSpecies {
                species_id: "red_willow".into(),
            })),
        },
    );
}

#[test]
fn tree_matured() {
    check(
        "tree_matured",
        TreeMatured {
            tree_id: "user-42/3".into(),
            user_id: "user-42".into(),
            tree_seq: 3,
            species_id: "saxaul".into(),
            energy_spent_g: 17_900,
            matured_at_ms: 1_764_000_000_000,
            rules_version: "2026.11-1".into(),
            trigger_event_id: "walk-1".into(),
        },
    );
}

#[test]
fn planting_confirmed() {
    check(
        "planting_confirmed",
        PlantingConfirmed {
            order_id: "order:user-42/3".into(),
            partner_id: "see-alxa".into(),
            result: Some(planting_confirmed::Result::Planted(Planted {
                site_id: "alxa-1".into(),
                plot: "A-17".into(),
                latitude: 38.85,
                longitude: 105.7,
                planted_on: "2026-04-12".into(),
                tree_code: "SX-000123".into(),
            })),
            reported_at_ms: 1_764_000_000_000,
            // Field 6 came later; left empty, the message encodes exactly as before it existed.
            idempotency_key: String::new(),
        },
    );
}

#[test]
fn command_set_timezone() {
    check(
        "command_set_timezone",
        UserCommand {
            envelope: envelope("cmd-2"),
            command: Some(user_command::Command::SetTimezone(SetTimezone {
                iana_name: "Europe/Paris".into(),
            })),
        },
    );
}

#[test]
fn mobility_bus_ride() {
    check(
        "mobility_bus_ride",
        MobilityEvent {
            envelope: envelope("bus-1"),
            activity: Some(mobility_event::Activity::BusRide(BusRide {
                line: "Line 1".into(),
                distance_m: 4_200,
            })),
        },
    );
}

#[test]
fn mobility_subway_ride() {
    check(
        "mobility_subway_ride",
        MobilityEvent {
            envelope: envelope("subway-1"),
            activity: Some(mobility_event::Activity::SubwayRide(SubwayRide {
                line: "Line 2".into(),
                distance_m: 9_800,
            })),
        },
    );
}

#[test]
fn mobility_carpool_ride() {
    check(
        "mobility_carpool_ride",
        MobilityEvent {
            envelope: envelope("carpool-1"),
            activity: Some(mobility_event::Activity::CarpoolRide(CarpoolRide {
                distance_m: 12_500,
            })),
        },
    );
}

#[test]
fn mobility_e_bike_ride() {
    check(
        "mobility_e_bike_ride",
        MobilityEvent {
            envelope: envelope("ebike-1"),
            activity: Some(mobility_event::Activity::EBikeRide(EBikeRide {
                distance_m: 2_750,
            })),
        },
    );
}

#[test]
fn planting_order() {
    check(
        "planting_order",
        PlantingOrder {
            order_id: "order:user-42/3".into(),
            tree_id: "user-42/3".into(),
            user_id: "user-42".into(),
            species_id: "saxaul".into(),
            partner_id: "see-alxa".into(),
            site_id: "alxa-1".into(),
            region: "Alxa, Inner Mongolia".into(),
            idempotency_key: "order:user-42/3#1".into(),
            attempt: 1,
            created_at_ms: 1_764_000_000_000,
        },
    );
}

#[test]
fn certificate() {
    check(
        "certificate",
        Certificate {
            certificate_id: "certificate:order:user-42/3".into(),
            user_id: "user-42".into(),
            tree_id: "user-42/3".into(),
            order_id: "order:user-42/3".into(),
            species_id: "saxaul".into(),
            partner_id: "see-alxa".into(),
            site_id: "alxa-1".into(),
            tree_code: "SX-000123".into(),
            planted_on: "2026-04-12".into(),
        },
    );
}
