//! Forest's event contract: Rust types generated from `proto/forest/v1/*.proto`.
//!
//! The `.proto` files are the contract with upstream producers and downstream consumers; read
//! them for the meaning of each field, which topic each message goes to and which values are
//! rejected. This crate only compiles them (with protox, so no `protoc` is needed) and adds the
//! contract constants below.
//!
//! Guarantee: the wire format is pinned by golden-bytes tests (`tests/golden.rs`); a change
//! that alters the encoding of an existing message fails them.

/// Generated types for package `forest.v1`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/forest.v1.rs"));
}

/// The only `Envelope.schema_version` this build accepts.
pub const SCHEMA_VERSION: u32 = 1;

/// Default topic names. Every one is configurable at run time; these are the defaults.
pub mod topics {
    pub const PAYMENTS: &str = "forest.payments.v1";
    pub const MOBILITY: &str = "forest.mobility.v1";
    pub const COMMANDS: &str = "forest.commands.v1";
    pub const TREES: &str = "forest.trees.v1";
    pub const DLQ: &str = "forest.dlq.v1";
    pub const PLANTING_ORDERS: &str = "forest.planting-orders.v1";
    pub const PLANTING_CONFIRMATIONS: &str = "forest.planting-confirmations.v1";
    pub const CERTIFICATES: &str = "forest.certificates.v1";
    /// Compacted: the latest projection of each user, keyed by user id and partitioned like
    /// the inputs, plus one checkpoint per partition (the input offsets the projections
    /// reflect). Written by the processor with `--changelog`; read to restore a partition's
    /// state on an instance that lacks it.
    pub const CHANGELOG: &str = "forest.projections-changelog.v1";
}
