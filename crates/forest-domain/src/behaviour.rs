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
    pub const COUNT: usize = 15;

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
    ];

    /// Dense index, for per-behaviour tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The unit of the event's quantity. Rides carry an optional distance in metres; every
    /// payment carries an amount in minor units.
    pub fn unit(self) -> Unit {
        match self {
            Self::Walking => Unit::Step,
            Self::BusRide | Self::SubwayRide | Self::BikeRide => Unit::Metre,
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
}
