//! Forest's RocksDB store: per-user projections, each input partition's next offset, and the
//! outbox of outputs not yet delivered to Kafka.
//!
//! Guarantees:
//! - [`Store::commit`] writes projections, partition offsets and new outbox entries in ONE
//!   `WriteBatch`: after a crash the store holds all of a batch or none of it, so the stored
//!   offsets always describe exactly the events the stored projections reflect. With the
//!   write-ahead log (the default) a process crash loses no written batch; without it
//!   ([`StoreConfig::wal`], for a writer whose input is its log) it loses the batches since
//!   the last memtable flush, all column families together, so the store reopens at an
//!   older state that is still whole. That is what makes a replay from the stored offsets exact. (A
//!   caller may write projections later than their offsets if it stores, in the same batches,
//!   what rebuilds them: each projection then carries the input [`Position`] it reflects,
//!   and the `replay` column family holds the caller's records.)
//! - Outbox entries get increasing sequence numbers and stay until [`Store::remove_outbox`]
//!   deletes them after Kafka acknowledged them: an output is never lost, and may be delivered
//!   more than once (downstream dedupes by its deterministic id).
//! - Memory is bounded by [`StoreConfig`]: one block cache shared by all column families (index
//!   and filter blocks included), and a write-buffer budget charged to the same cache, at
//!   which writes stall rather than grow (see [`StoreConfig`] for why, and why the cache is
//!   not strict).
//!
//! [`ProjectionCache`] sits in front as a write-back cache of hot users, so a batch writes each
//! touched user once however many of its events it held. It is bounded by users and by
//! estimated bytes, and evicts with CLOCK (an approximation of least-recently-used).

mod cache;
mod slot_map;
mod store;

pub use cache::{Flush, ProjectionCache, TRIM_SLACK, WRITE_AHEAD, estimate_bytes};
pub use store::{
    DEFAULT_L0_COMPACTION_FILES, NO_POSITION, OutboxEntry, Position, PreparedBatch, Store,
    StoreConfig, StoreError, StoreStats, decode_state, encode_state, metrics,
};

/// Where a service stops abruptly, without committing, so tests can prove recovery. Never set
/// in production. Lives here because both points are defined by the store's batch writes, and
/// the processor and fulfilment share them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After this many input records were applied in memory, before their batch is written.
    AfterApplied(u64),
    /// Right after the N-th batch (1-based) is written to the store, before its outbox is sent.
    AfterStoreWrite(u64),
    /// Processor in transactions mode: right after the N-th batch's Kafka transaction
    /// committed, before the store is written (the window the changelog restore covers).
    AfterTransaction(u64),
    /// Processor: once it has applied records, read every assigned lane to its high
    /// watermark, and every batch is durable with its outputs delivered; projections not yet
    /// written stay unwritten (the quiet end of a run with spaced projection writes).
    WhenCaughtUp,
}
