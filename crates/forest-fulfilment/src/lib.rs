//! Forest's fulfilment: turns each TreeMatured into exactly one PlantingOrder to a partner that
//! plants the species and has capacity left, follows the partner's report, and issues the
//! user's Certificate once the tree is in the ground.
//!
//! Guarantees:
//! - One order per tree. `order_id` is derived from `tree_id`; a re-delivered TreeMatured finds
//!   its order and makes no second one. Orders, capacity used, the backlog and the consumer
//!   offsets are written in one RocksDB batch, and on start the consumer seeks to the offsets
//!   in RocksDB, so a crash at any point neither loses nor repeats an allocation.
//! - Outputs (orders, certificates, dead letters) go through the same outbox as the processor:
//!   delivered at least once, with ids (`order_id` + `idempotency_key`, `certificate_id`) that
//!   are equal on every re-delivery.
//! - Never dropped: a tree no partner can take waits in the backlog (with its reason, in a
//!   metric) and is allocated, oldest first, when capacity appears: a partner-file reload, a
//!   new season, or a rejection that frees a slot.
//! - Deterministic allocation (see [`ledger`]): the site with the most capacity left.
//! - Bad input (undecodable or invalid trees and reports, reports for unknown orders or that
//!   contradict the order) goes to the dead-letter topic with the reason in its headers and is
//!   counted; duplicates are counted. Nothing stalls a partition.
//!
//! Capacity is global, so fulfilment runs as a single instance: it assigns itself every
//! partition of its two input topics instead of joining a group rebalance (a second instance
//! would double-allocate capacity). RocksDB's lock stops a second instance on the same data
//! directory; across machines, deploy one replica (the StatefulSet in `deploy/` does).

pub mod ledger;
pub mod metrics;
pub mod partners;
mod runtime;
pub mod sim;

pub use forest_store::CrashPoint;
pub use ledger::{Ledger, OrderRecord, OrderState};
pub use partners::{Partners, PartnersError, PartnersSource};
pub use runtime::run;

use forest_store::{StoreConfig, StoreError};
use rdkafka::error::KafkaError;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Topics the fulfilment reads and writes.
#[derive(Debug, Clone)]
pub struct FulfilmentTopics {
    pub trees: String,
    pub confirmations: String,
    pub orders: String,
    pub certificates: String,
    pub dlq: String,
}

impl Default for FulfilmentTopics {
    fn default() -> Self {
        use forest_proto::topics as t;
        Self {
            trees: t::TREES.into(),
            confirmations: t::PLANTING_CONFIRMATIONS.into(),
            orders: t::PLANTING_ORDERS.into(),
            certificates: t::CERTIFICATES.into(),
            dlq: t::DLQ.into(),
        }
    }
}

impl FulfilmentTopics {
    /// Every topic name with a prefix (tests give each run its own topics).
    pub fn prefixed(prefix: &str) -> Self {
        let d = Self::default();
        let p = |s: String| format!("{prefix}{s}");
        Self {
            trees: p(d.trees),
            confirmations: p(d.confirmations),
            orders: p(d.orders),
            certificates: p(d.certificates),
            dlq: p(d.dlq),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FulfilmentConfig {
    pub brokers: String,
    /// Used only to commit offsets to Kafka for lag tools; the store holds the real ones.
    pub group_id: String,
    pub topics: FulfilmentTopics,
    pub store_path: PathBuf,
    pub store: StoreConfig,
    pub partners: PartnersSource,
    /// How often the partner file is re-read; a changed, valid file is applied.
    pub reload_interval: Duration,
    pub batch_max_records: usize,
    pub batch_max_wait: Duration,
    /// librdkafka settings passed through (`--kafka-config key=value`); they win over ours.
    pub kafka: Vec<(String, String)>,
    pub crash_at: Option<CrashPoint>,
}

impl FulfilmentConfig {
    pub fn new(brokers: impl Into<String>, store_path: impl Into<PathBuf>) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: "forest-fulfilment".into(),
            topics: FulfilmentTopics::default(),
            store_path: store_path.into(),
            store: StoreConfig::default(),
            partners: PartnersSource::Builtin,
            reload_interval: Duration::from_secs(5),
            batch_max_records: 2_000,
            batch_max_wait: Duration::from_millis(20),
            kafka: Vec::new(),
            crash_at: None,
        }
    }
}

/// A fulfilment run that failed. Each variant says whether a restart can help.
#[derive(Debug, thiserror::Error)]
pub enum FulfilmentError {
    #[error("invalid fulfilment configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Partners(#[from] PartnersError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Corrupt(#[from] ledger::CorruptState),
    #[error("kafka {op} failed: {source}")]
    Kafka {
        op: &'static str,
        source: KafkaError,
    },
    #[error("topic {topic} does not exist or has no partitions; create it first")]
    MissingTopic { topic: String },
    #[error(transparent)]
    Outbox(#[from] forest_kafka::DeliveryError),
    #[error("injected crash at {0:?}")]
    InjectedCrash(CrashPoint),
}

impl FulfilmentError {
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Config(_) | Self::Partners(_) | Self::Corrupt(_) => false,
            Self::Store(e) => e.is_retriable(),
            Self::Outbox(e) => e.is_retriable(),
            Self::Kafka { .. } | Self::MissingTopic { .. } | Self::InjectedCrash(_) => true,
        }
    }
}

/// Live counters, for tests and progress displays (metrics go to the `metrics` recorder too).
#[derive(Debug, Default)]
pub struct FulfilmentStats {
    pub trees: AtomicU64,
    pub duplicate_trees: AtomicU64,
    /// Orders emitted: first allocations, re-allocations and backlog allocations.
    pub orders: AtomicU64,
    pub backlog: AtomicU64,
    pub confirmations: AtomicU64,
    pub certificates: AtomicU64,
    pub reallocations: AtomicU64,
    pub duplicate_confirmations: AtomicU64,
    pub unknown_confirmations: AtomicU64,
    pub stale_confirmations: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub reloads: AtomicU64,
    pub batches: AtomicU64,
    /// Next offset per (topic, partition) as last committed to the store.
    pub committed_offsets: std::sync::Mutex<BTreeMap<(String, i32), i64>>,
    /// Store open, partitions owned, consumer lag: what `/readyz` reports.
    pub health: forest_kafka::Health,
}

impl FulfilmentStats {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }

    pub fn committed_offsets(&self) -> BTreeMap<(String, i32), i64> {
        self.committed_offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Set to stop gracefully: the batch is committed and its outputs delivered, then `run` returns.
pub type Shutdown = Arc<AtomicBool>;
