//! Every metric the fulfilment emits, described in one place. Names follow
//! `forest_fulfilment_<noun>_<unit>[_total]`; labels are bounded (outcome and reason codes, and
//! partner ids, which come from the partner file), never a user, tree or order id.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const TREES: &str = "forest_fulfilment_trees_total";
pub const ORDERS: &str = "forest_fulfilment_orders_total";
pub const BACKLOG: &str = "forest_fulfilment_backlog_trees";
pub const BACKLOGGED: &str = "forest_fulfilment_backlogged_total";
pub const CONFIRMATIONS: &str = "forest_fulfilment_confirmations_total";
pub const CERTIFICATES: &str = "forest_fulfilment_certificates_total";
pub const DLQ_RECORDS: &str = "forest_fulfilment_dlq_records_total";
pub const RELOADS: &str = "forest_fulfilment_partner_reloads_total";
pub const BATCH_DURATION: &str = "forest_fulfilment_batch_duration_seconds";

/// Registers descriptions with the installed recorder (call once at start-up).
pub fn describe() {
    describe_counter!(
        TREES,
        Unit::Count,
        "TreeMatured records read, by result (ordered, backlogged, duplicate, invalid)."
    );
    describe_counter!(
        ORDERS,
        Unit::Count,
        "Planting orders emitted (first allocations and re-allocations), by partner."
    );
    describe_gauge!(
        BACKLOG,
        Unit::Count,
        "Trees waiting for a partner with capacity."
    );
    describe_counter!(
        BACKLOGGED,
        Unit::Count,
        "Trees sent to the backlog, by reason (no_partner_for_species, capacity_exhausted, all_sites_rejected)."
    );
    describe_counter!(
        CONFIRMATIONS,
        Unit::Count,
        "Partner reports read, by result (planted, reallocated, backlogged, duplicate, unknown_order, stale, invalid, undecodable)."
    );
    describe_counter!(CERTIFICATES, Unit::Count, "Certificates issued.");
    describe_counter!(
        DLQ_RECORDS,
        Unit::Count,
        "Fulfilment inputs written to the dead-letter topic, by reason code."
    );
    describe_counter!(
        RELOADS,
        Unit::Count,
        "Partner-file changes seen, by result (applied, invalid)."
    );
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time to commit a fulfilment batch: store write, outbox delivery."
    );
}
