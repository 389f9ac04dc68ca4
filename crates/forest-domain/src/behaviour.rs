//! The low-carbon behaviours Forest credits, and the unit each one's quantity is measured in.

use serde::{Deserialize, Serialize};

/// One credited behaviour. Each maps to exactly one rule in a [`crate::RuleSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    Walking,
    BusRide,
    SubwayRide,
    BikeRide,
    OfflinePayment,
    UtilityBill,
    MovieTicket,
    TrainTicket,
    HospitalAppointment,
    EInvoice,
    TrafficFine,
    EtcToll,
    EReceipt,
    ReusableCup,
    EStatement,
    // Appended, not inserted: the stored projection encodes a behaviour by its position.
    /// A shared ride-hailing trip (carpool) with another passenger, per metre.
    CarpoolRide,
    /// A shared electric-bike (e-bike) ride, per metre.
    EBikeRide,
}

/// What an event's `quantity` counts, per behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Step,
    Metre,
    MinorUnit,
}

impl Behaviour {
    pub const COUNT: usize = 17;

    pub const ALL: [Behaviour; Self::COUNT] = [
        Self::Walking,
        Self::BusRide,
        Self::SubwayRide,
        Self::BikeRide,
        Self::OfflinePayment,
        Self::UtilityBill,
        Self::MovieTicket,
        Self::TrainTicket,
        Self::HospitalAppointment,
        Self::EInvoice,
        Self::TrafficFine,
        Self::EtcToll,
        Self::EReceipt,
        Self::ReusableCup,
        Self::EStatement,
        Self::CarpoolRide,
        Self::EBikeRide,
    ];

    /// Dense index, for per-behaviour tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The unit of the event's quantity. Rides carry a distance in metres (optional for bus and
    /// subway); every payment carries an amount in minor units.
    pub fn unit(self) -> Unit {
        match self {
            Self::Walking => Unit::Step,
            Self::BusRide
            | Self::SubwayRide
            | Self::BikeRide
            | Self::CarpoolRide
            | Self::EBikeRide => Unit::Metre,
            _ => Unit::MinorUnit,
        }
    }

    /// Stable snake_case name, used in rules files and as a bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Walking => "walking",
            Self::BusRide => "bus_ride",
            Self::SubwayRide => "subway_ride",
            Self::BikeRide => "bike_ride",
            Self::OfflinePayment => "offline_payment",
            Self::UtilityBill => "utility_bill",
            Self::MovieTicket => "movie_ticket",
            Self::TrainTicket => "train_ticket",
            Self::HospitalAppointment => "hospital_appointment",
            Self::EInvoice => "e_invoice",
            Self::TrafficFine => "traffic_fine",
            Self::EtcToll => "etc_toll",
            Self::EReceipt => "e_receipt",
            Self::ReusableCup => "reusable_cup",
            Self::EStatement => "e_statement",
            Self::CarpoolRide => "carpool_ride",
            Self::EBikeRide => "e_bike_ride",
        }
    }
}

impl std::fmt::Display for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_dense_and_in_index_order() {
        for (i, b) in Behaviour::ALL.iter().enumerate() {
            assert_eq!(b.index(), i, "{b}");
        }
    }

    #[test]
    fn names_are_distinct_and_round_trip_through_serde() {
        let names: std::collections::BTreeSet<_> =
            Behaviour::ALL.iter().map(|b| b.as_str()).collect();
        assert_eq!(names.len(), Behaviour::COUNT);
        for b in Behaviour::ALL {
            #[derive(Deserialize)]
            struct W {
                b: Behaviour,
            }
            let w: W = toml::from_str(&format!("b = \"{b}\"")).unwrap();
            assert_eq!(w.b, b);
        }
    }
}
