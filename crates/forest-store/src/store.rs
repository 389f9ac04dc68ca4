//! The RocksDB layer. Column families and their keys:
//! - `projections`: UTF-8 user id -> the input position the projection reflects (its
//!   partition's three lane offsets, 8-byte big-endian each; see [`Position`]) followed by the
//!   postcard-encoded `UserState`;
//! - `offsets`: `<topic>\0<partition as 4-byte big-endian>` -> next offset (8-byte big-endian);
//! - `outbox`: sequence number (8-byte big-endian, so iteration is in order) -> `OutboxEntry`;
//! - `kv`: other services' state (fulfilment orders, capacity, backlog), opaque bytes;
//! - `replay`: `<partition as 4-byte big-endian><sequence as 8-byte big-endian>` -> the
//!   processor's record of the order it folded a batch's records in, for partitions whose
//!   projections are stored less often than their offsets (opaque bytes here; see
//!   `forest-processor`'s `replay` module). None means every projection is as current as
//!   its offsets;
//! - `meta`: format version.

use forest_domain::UserState;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Env, IteratorMode,
    Options, WriteBatch, WriteBufferManager, WriteOptions,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CF_PROJECTIONS: &str = "projections";
const CF_OFFSETS: &str = "offsets";
const CF_OUTBOX: &str = "outbox";
const CF_META: &str = "meta";
const CF_KV: &str = "kv";
const CF_REPLAY: &str = "replay";
/// Every column family, in the order they are opened.
const CFS: [&str; 6] = [
    CF_PROJECTIONS,
    CF_OFFSETS,
    CF_OUTBOX,
    CF_META,
    CF_KV,
    CF_REPLAY,
];
const FORMAT_KEY: &[u8] = b"format";
/// Bump when the on-disk encoding changes; a store of another format is refused at open.
// v2: projections keep recent credits; v3: outbox entries may pin a partition; v4: projections
// keep each credit's rule id and rules version, and walking's per-day step counts; v5: each
// projection is prefixed with the input position it reflects; v6: a projection's recent
// event ids are one byte string (time deltas and fixed-width hashes).
const FORMAT: &[u8] = b"forest-store-v6";

/// Where in its partition's input a stored projection stands: the next offset of each of
/// the partition's lanes (by topic index) as of the write, or a negative value for a lane
/// the writer had not read. A replay skips a user's records below its position: they are in
/// the stored state already (see `forest-processor`'s `replay` module).
pub type Position = [i64; 3];

/// The position of a projection that reflects no input offsets (restored, or new).
pub const NO_POSITION: Position = [-2; 3];

/// A store operation that failed. Each variant says whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error(
        "{path} holds a store of format {found:?}, this build reads {expected:?}: point --store at a new directory or rebuild"
    )]
    Format {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path} is not a Forest store (no RocksDB data there); check --store")]
    Missing { path: PathBuf },
    #[error(
        "{path} is not empty but holds no Forest store ({why}); check --store, or move the directory away to start a new store"
    )]
    NotAStore { path: PathBuf, why: &'static str },
    #[error("reading the store failed: {0}")]
    Read(rocksdb::Error),
    #[error("writing a batch to the store failed: {0}")]
    Write(rocksdb::Error),
    #[error("stored value under {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("invalid store settings: {0}")]
    Config(String),
    #[error(
        "RocksDB's background work at {path} failed ({errors} errors: a flush or compaction could not write; RocksDB's LOG there says why). Without the write-ahead log, batches since the last flush are in memory only: stop, make room, restart (the input is read again from the last flush)"
    )]
    Background { path: PathBuf, errors: u64 },
}

impl StoreError {
    /// `Write` and `Read` may succeed later (disk space freed, transient I/O); the others need
    /// an operator (`Background` at least a reopen of the store).
    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Read(_) | Self::Write(_))
    }
}

/// Memory and durability settings.
///
/// RocksDB's memory is `block_cache_bytes`, which the memtables (`write_buffer_bytes`) are
/// charged to, plus small unbounded parts (table readers of unpinned files are in the cache
/// too; iterators and compaction buffers are transient). Two choices make the bound real:
///
/// - **Write stalls on** (`allow_stall` of the write-buffer manager): when memtables reach
///   `write_buffer_bytes`, writes wait for a flush instead of allocating past the budget.
///   Without it the manager only *asks* for flushes, and a disk slower than the input lets
///   memtables grow without limit. A stalled write is the backpressure the services want
///   anyway: the batch waits, consumption slows, memory stays put.
/// - **Block cache not strict** (`strict_capacity_limit` off): with a strict cache, an
///   insert into a full cache fails and RocksDB fails the *read* that needed the block, which
///   would stop the service on a busy moment rather than let the cache exceed its capacity
///   briefly (pinned L0 index/filter blocks and the memtables' reservations are not
///   evictable). The cache evicts down to capacity as soon as pins are released, so the
///   overshoot is bounded by what is pinned at once.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Block cache shared by every column family, index and filter blocks included, and the
    /// memtables' reservation.
    pub block_cache_bytes: usize,
    /// Total memtable budget, charged against the block cache so the two together stay
    /// bounded; writes stall at it (see above). Must be below `block_cache_bytes`, or the
    /// memtables' reservations would leave no room for blocks.
    pub write_buffer_bytes: usize,
    /// fsync the WAL on every batch. Off by default: the WAL survives a process crash without
    /// it (it is in the OS page cache); turn it on to survive power loss too, at a latency cost.
    /// Needs `wal`.
    pub sync_writes: bool,
    /// Keep RocksDB's write-ahead log (the default). Off, a batch goes to the memtables only,
    /// and a crash loses every batch written since the last memtable flush. Every column
    /// family is flushed together (RocksDB's atomic flush, on in both cases), so the store
    /// then reopens at an older state that is still whole: the offsets, projections, outbox
    /// and replay records of one moment, as if the later batches had never been written.
    /// Only for a writer that can redo those batches from a log of its own. The processor
    /// can: it re-reads its input from the stored offsets and re-sends outputs under the
    /// same ids, so the input topics are its write-ahead log, as the changelog is for Kafka
    /// Streams' state stores, which run with RocksDB's WAL off. Why bother: with the WAL,
    /// every batch is also copied into the log's file; that copy (in the kernel) and its
    /// checksums were more than half of the committer threads' samples in a profile at about
    /// 1 M events/s, and leaving them out cut the committers from 0.18-0.23 to 0.14-0.17
    /// CPU-s per M events (BENCHMARKS.md, session 18). A graceful close still flushes
    /// everything.
    pub wal: bool,
    /// Without the WAL: the longest a written batch may stay in memtables only. The first
    /// write (or [`Store::flush_if_due`] call) after that starts a flush of every column
    /// family in the background. At full speed memtables fill and flush sooner by
    /// themselves; this bounds what a crash makes the writer redo when input is slow.
    pub max_unflushed: Duration,
    /// A cap on the bytes per second RocksDB's flushes and compactions write (its rate
    /// limiter, one for the whole store; flushes are served first). `None` (the default): no
    /// cap. Why: flushes and compactions come in bursts of CPU (sorting, checksums, LZ4). A
    /// compaction that rewrites the projection store ran 0.8-1.9 s at 1 M users, the core it
    /// shared with the processor 97-100 % busy meanwhile, and the records arriving then
    /// waited: that is the latency tail. Capped, the same work is spread over a longer time.
    /// With the processor on one core at 215 K events/s, 32 MiB/s gave a lower p99 in 5 of 8
    /// alternated pairs, the same in 2 and a higher one in 1 (BENCHMARKS.md, session 23).
    /// Too low a cap and flushes fall behind the writes: the memtables fill and the writes
    /// wait at their budget. At full speed the store wrote about 52 MiB/s, and 32 MiB/s cost
    /// the processor 30-36 % of its throughput. Set it well above the store's sustained rate
    /// (`forest_store_flush_bytes_total` plus `forest_store_compaction_bytes_total` per
    /// second at the highest input rate expected). With a cap, RocksDB also syncs table files
    /// every MiB written (its `bytes_per_sync`).
    pub background_write_bytes_per_sec: Option<u64>,
    /// At most how many flushed files wait in level 0 before RocksDB compacts them into the level
    /// below (its `level0_file_num_compaction_trigger`; RocksDB's default is 4). RocksDB also
    /// compacts level 0 by size, once its files outgrow the level below (or 256 MiB, its
    /// `max_bytes_for_level_base`): level-0 files are uncompressed here and memtables are a quarter
    /// of `write_buffer_bytes`, so by RocksDB's rules (not measured here) about 8 full memtables
    /// start a compaction whatever this says, and high values mostly matter when flushes are small
    /// (timed, or at moderate rates). Writes slow down at 20 files or three times this many,
    /// whichever is more, and stop at 36 or four times. Why it matters: user keys are spread evenly
    /// over the key range, so each flushed file overlaps the whole of the level below, and every L0
    /// compaction rewrites the entire projection store, however few files it takes in. Fewer,
    /// larger compactions do the same job with less rewriting. With the processor on one core for
    /// 150 s, 16 instead of 4 cut the compactions' output from 2,111 to 851 MiB at 215 K events/s
    /// and from 1,538 to 535 MiB at 150 K; at full speed (2 workers) from about 200 to 105 MiB per
    /// (b) run, with (b) unchanged within the runs' spread (BENCHMARKS.md, session 24). Not the
    /// default: each compaction is longer, and at 150 K events/s the latency tail was mixed
    /// (one run each). The price: a read of a key that is in no memtable probes up to this many
    /// more files (their bloom filters first), every level-0 file's filter and index blocks stay
    /// pinned in the block cache (memory it cannot evict, in every column family), and more data
    /// waits uncompressed on disk.
    pub l0_compaction_files: u32,
    /// Run RocksDB's compactions at the lowest CPU priority (nice 19, on Linux; elsewhere
    /// RocksDB ignores it). That is its `LOW` thread pool, which runs compactions only:
    /// flushes have a pool of their own and keep the normal priority, since writes wait for
    /// them. Why: a compaction of the projection store is seconds of CPU in one burst, and on
    /// a core it shares with the processor's threads, the records arriving meanwhile wait
    /// behind it. At the lowest priority it takes the CPU the processor leaves idle instead,
    /// so it runs longer but delays records less. Compactions must still keep up on average:
    /// starved, they let level 0 fill until RocksDB slows the writes down, and a compaction
    /// thread preempted while it holds RocksDB's database mutex (briefly, to install its
    /// result) delays the writes waiting for that mutex. Process-wide: the thread pool
    /// belongs to RocksDB's default environment, which every store in the process shares, and
    /// once lowered it stays lowered until the process exits.
    pub low_priority_compactions: bool,
}

impl StoreConfig {
    /// Checks the memory, durability, background-write and compaction settings fit together;
    /// the error says which and why.
    pub fn validate(&self) -> Result<(), String> {
        if self.sync_writes && !self.wal {
            return Err("syncing writes needs the write-ahead log: turn the WAL on".into());
        }
        if !self.wal && self.max_unflushed.is_zero() {
            return Err(
                "without the write-ahead log the longest unflushed time must be above zero".into(),
            );
        }
        if let Some(rate) = self.background_write_bytes_per_sec {
            if rate < 1 << 20 {
                return Err(format!(
                    "background write cap of {rate} bytes/s (--store-background-write-mib) is below 1 MiB/s: flushes would fall behind the writes, which would then stall"
                ));
            }
        }
        if !(2..=64).contains(&self.l0_compaction_files) {
            return Err(format!(
                "an L0 compaction trigger of {} files (--store-l0-compaction-files) is outside 2-64: at 1 every flush would rewrite the whole store, and past 64 reads would probe too many files",
                self.l0_compaction_files
            ));
        }
        if self.write_buffer_bytes < 1 << 20 {
            return Err(format!(
                "write buffer budget of {} bytes is below 1 MiB",
                self.write_buffer_bytes
            ));
        }
        if self.write_buffer_bytes >= self.block_cache_bytes {
            return Err(format!(
                "write buffer budget ({} MiB) must be below the block cache ({} MiB): the memtables are charged to the cache",
                self.write_buffer_bytes >> 20,
                self.block_cache_bytes >> 20
            ));
        }
        Ok(())
    }
}

/// [`StoreConfig::l0_compaction_files`]'s default.
pub const DEFAULT_L0_COMPACTION_FILES: u32 = 4;

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            block_cache_bytes: 256 << 20,
            write_buffer_bytes: 128 << 20,
            sync_writes: false,
            wal: true,
            max_unflushed: Duration::from_secs(10),
            background_write_bytes_per_sec: None,
            l0_compaction_files: DEFAULT_L0_COMPACTION_FILES,
            low_priority_compactions: false,
        }
    }
}

/// An output waiting to be produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub topic: String,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// A fixed partition, for records that belong to a partition rather than to a key (the
    /// changelog's checkpoints); `None`: the key's partition, as the input producers pick it.
    pub partition: Option<i32>,
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Write batches committed.
    pub batches: AtomicU64,
    /// Key writes (puts and deletes) inside those batches.
    pub writes: AtomicU64,
}

/// One atomic store write, serialised and not yet written (see [`Store::prepare`]).
pub struct PreparedBatch {
    batch: WriteBatch,
    seqs: std::ops::Range<u64>,
}

impl PreparedBatch {
    /// Key writes (puts) the batch holds.
    pub fn writes(&self) -> u64 {
        self.batch.len() as u64
    }
}

pub struct Store {
    db: DB,
    path: PathBuf,
    write_opts: WriteOptions,
    next_seq: AtomicU64,
    /// Entries in the outbox, kept as a running count (the outbox's length at open, plus
    /// entries committed, minus entries removed) so that the outbox-depth metric costs an
    /// atomic load instead of a scan of the column family.
    outbox_entries: AtomicU64,
    pub stats: StoreStats,
    cache: Cache,
    /// The options the DB was opened with: they hold RocksDB's statistics (tickers).
    opts: Options,
    /// Without the WAL: see [`StoreConfig::max_unflushed`]. `None` with it.
    max_unflushed: Option<Duration>,
    /// When the store was opened, and when the last flush was started, in milliseconds since
    /// then (several writers share the store: an atomic, so one of them starts the flush).
    opened: Instant,
    last_flush_ms: AtomicU64,
}

/// Splits a stored projection value into its position and the postcard-encoded state.
fn split_value<'v>(v: &'v [u8], user: &[u8]) -> Result<(Position, &'v [u8]), StoreError> {
    let corrupt = || StoreError::Corrupt {
        key: format!("projections/{}", String::from_utf8_lossy(user)),
        reason: format!(
            "value of {} bytes, shorter than its 24-byte position",
            v.len()
        ),
    };
    let (head, state) = v.split_at_checked(24).ok_or_else(corrupt)?;
    let mut pos = [0i64; 3];
    for (i, chunk) in head.chunks_exact(8).enumerate() {
        pos[i] = i64::from_be_bytes(chunk.try_into().map_err(|_| corrupt())?);
    }
    Ok((pos, state))
}

/// Leads every [`encode_state`] value: its encoding's version (6, as [`FORMAT`]). Records
/// outside the store (the changelog topic) carry no format marker otherwise, and an older
/// encoding could decode into a wrong state rather than fail. No v5 value begins with this:
/// its first byte would start the length of a user id over 128 bytes.
const STATE_TAG: [u8; 2] = [0xF5, 6];

/// A projection in the store's encoding (postcard, after [`STATE_TAG`]), e.g. for the
/// changelog topic.
pub fn encode_state(s: &UserState) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(s, STATE_TAG.to_vec()).map_err(|e| StoreError::Corrupt {
        key: format!("projections/{}", s.user_id),
        reason: e.to_string(),
    })
}

/// The inverse of [`encode_state`]; `what` names the source in the error.
pub fn decode_state(bytes: &[u8], what: &str) -> Result<UserState, StoreError> {
    let state = bytes
        .strip_prefix(&STATE_TAG)
        .ok_or_else(|| StoreError::Corrupt {
            key: what.to_string(),
            reason: "not a forest-store-v6 projection (a record of an older Forest? recreate the changelog topic)".into(),
        })?;
    postcard::from_bytes(state).map_err(|e| StoreError::Corrupt {
        key: what.to_string(),
        reason: e.to_string(),
    })
}

/// Store metrics, exported by [`Store::export_metrics`].
pub mod metrics {
    pub const MEMORY: &str = "forest_store_memory_bytes";
    pub const FLUSH_BYTES: &str = "forest_store_flush_bytes_total";
    pub const COMPACTION_BYTES: &str = "forest_store_compaction_bytes_total";
    pub const RUNNING_FLUSHES: &str = "forest_store_running_flushes";
    pub const RUNNING_COMPACTIONS: &str = "forest_store_running_compactions";
    pub const PENDING_COMPACTION_BYTES: &str = "forest_store_pending_compaction_bytes";

    pub fn describe() {
        use ::metrics::{Unit, describe_counter, describe_gauge};
        describe_gauge!(
            MEMORY,
            Unit::Bytes,
            "RocksDB memory by kind: memtables, block_cache (includes index and filter blocks), table_readers."
        );
        describe_counter!(
            FLUSH_BYTES,
            Unit::Bytes,
            "Bytes RocksDB wrote flushing memtables to SST files."
        );
        describe_counter!(
            COMPACTION_BYTES,
            Unit::Bytes,
            "Bytes RocksDB wrote compacting SST files."
        );
        describe_gauge!(
            RUNNING_FLUSHES,
            Unit::Count,
            "Memtable flushes running now."
        );
        describe_gauge!(RUNNING_COMPACTIONS, Unit::Count, "Compactions running now.");
        describe_gauge!(
            PENDING_COMPACTION_BYTES,
            Unit::Bytes,
            "RocksDB's estimate of bytes compaction still has to rewrite (write stalls start when it grows)."
        );
    }
}

fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 5);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

impl Store {
    /// Opens (creating if absent) the store at `path`.
    pub fn open(path: &Path, cfg: &StoreConfig) -> Result<Self, StoreError> {
        Self::open_with(path, cfg, false)
    }

    /// Sets the RocksDB gauges and counters of [`metrics`] (a few property reads: call it
    /// every few seconds, not per batch).
    pub fn export_metrics(&self) {
        use rocksdb::statistics::Ticker;
        let sum = |name: &str| -> u64 {
            CFS.iter()
                .filter_map(|cf| self.db.cf_handle(cf))
                .filter_map(|cf| self.db.property_int_value_cf(cf, name).ok().flatten())
                .sum()
        };
        let db_prop = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        let m = |kind: &'static str, v: u64| {
            ::metrics::gauge!(metrics::MEMORY, "kind" => kind).set(v as f64)
        };
        m("memtables", sum("rocksdb.cur-size-all-mem-tables"));
        m("block_cache", self.cache.get_usage() as u64);
        m("table_readers", sum("rocksdb.estimate-table-readers-mem"));
        ::metrics::counter!(metrics::FLUSH_BYTES)
            .absolute(self.opts.get_ticker_count(Ticker::FlushWriteBytes));
        ::metrics::counter!(metrics::COMPACTION_BYTES)
            .absolute(self.opts.get_ticker_count(Ticker::CompactWriteBytes));
        ::metrics::gauge!(metrics::RUNNING_FLUSHES)
            .set(db_prop("rocksdb.num-running-flushes") as f64);
        ::metrics::gauge!(metrics::RUNNING_COMPACTIONS)
            .set(db_prop("rocksdb.num-running-compactions") as f64);
        ::metrics::gauge!(metrics::PENDING_COMPACTION_BYTES)
            .set(sum("rocksdb.estimate-pending-compaction-bytes") as f64);
    }

    /// Opens an existing store for reading only, even while a service has it open (RocksDB's
    /// lock is not taken): a snapshot as of the open, for inspection tools (`forest user`).
    /// Of a store written without the WAL, as of its last flush: what is only in the writer's
    /// memtables is not in the files.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        if !path.join("CURRENT").exists() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        Self::open_with(path, &StoreConfig::default(), true)
    }

    fn open_with(path: &Path, cfg: &StoreConfig, read_only: bool) -> Result<Self, StoreError> {
        cfg.validate().map_err(StoreError::Config)?;
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        // RocksDB would happily create a new database inside any directory: refuse a
        // non-empty one without RocksDB's CURRENT file (a wrong --store, or a store whose
        // files were lost), instead of silently starting from nothing.
        if !read_only && !path.join("CURRENT").exists() {
            if let Ok(mut entries) = std::fs::read_dir(path) {
                if entries.next().is_some() {
                    return Err(StoreError::NotAStore {
                        path: path.to_path_buf(),
                        why: "no RocksDB CURRENT file",
                    });
                }
            }
        }
        // Not strict: see StoreConfig on why a full cache must not fail reads.
        let cache = Cache::new_lru_cache(cfg.block_cache_bytes);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        // Point lookups of users dominate: a bloom filter skips SST files that lack the key.
        table.set_bloom_filter(10.0, false);
        // Index and filter blocks live in the bounded cache instead of unbounded heap.
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        let mut cf_opts = Options::default();
        cf_opts.set_block_based_table_factory(&table);
        // LZ4: cheap enough for the write path, and projections (ids, counters) compress well.
        cf_opts.set_compression_type(DBCompressionType::Lz4);
        // Except L0: its files are flushed memtables, read once by the next compaction, so
        // compressing them is paid twice (LZ4 in and out) on the same 2 cores as the fold.
        cf_opts.set_compression_per_level(&[
            DBCompressionType::None,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
        ]);
        cf_opts.set_level_compaction_dynamic_level_bytes(true);
        // Validated to 2-64 above, so the products fit. RocksDB's own slowdown and stop
        // points (20 and 36 files) unless the trigger needs more room than that.
        let l0 = cfg.l0_compaction_files as i32;
        cf_opts.set_level_zero_file_num_compaction_trigger(l0);
        cf_opts.set_level_zero_slowdown_writes_trigger((3 * l0).max(20));
        cf_opts.set_level_zero_stop_writes_trigger((4 * l0).max(36));
        cf_opts.set_write_buffer_size(cfg.write_buffer_bytes / 4);
        cf_opts.set_max_write_buffer_number(3);

        let mut db_opts = cf_opts.clone();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_paranoid_checks(true);
        // Tickers only (flush and compaction bytes for metrics); no timers on the write path.
        db_opts.enable_statistics();
        db_opts.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptTimers);
        db_opts.set_max_background_jobs(2);
        if cfg.low_priority_compactions {
            // The default environment (a process-wide singleton, see StoreConfig); a thread
            // lowers itself before the next job it runs.
            let mut env = Env::new().map_err(open_err)?;
            env.lower_thread_pool_cpu_priority();
            db_opts.set_env(&env);
        }
        if let Some(rate) = cfg.background_write_bytes_per_sec {
            // Tokens refilled every 50 ms (RocksDB's default is 100): finer-grained waits.
            db_opts.set_ratelimiter(i64::try_from(rate).unwrap_or(i64::MAX), 50_000, 10);
        }
        // Every column family flushed at once: without the WAL a crash reopens the store at
        // its last flush, which must hold the offsets, projections and outbox of one moment.
        db_opts.set_atomic_flush(true);
        // allow_stall: writes wait at the budget instead of growing past it (see StoreConfig).
        let wbm = WriteBufferManager::new_write_buffer_manager_with_cache(
            cfg.write_buffer_bytes,
            true,
            cache.clone(),
        );
        db_opts.set_write_buffer_manager(&wbm);

        // Projections: a whole-key bloom filter in each memtable. Why: a user the cache has
        // not seen is looked up before its first fold, and most such users are in no memtable
        // (new, or written long ago); without the filter every such lookup walked the
        // memtables' skip lists, key compare by key compare (5.4 % of a profile's samples at
        // 1 M users). Costs 1/20 of each memtable's size.
        let mut projection_opts = cf_opts.clone();
        projection_opts.set_memtable_prefix_bloom_ratio(0.05);
        projection_opts.set_memtable_whole_key_filtering(true);
        let cfs = CFS.map(|name| {
            let opts = if name == CF_PROJECTIONS {
                projection_opts.clone()
            } else {
                cf_opts.clone()
            };
            ColumnFamilyDescriptor::new(name, opts)
        });
        let db = if read_only {
            DB::open_cf_descriptors_read_only(&db_opts, path, cfs, false).map_err(open_err)?
        } else {
            DB::open_cf_descriptors(&db_opts, path, cfs).map_err(open_err)?
        };

        let meta = db.cf_handle(CF_META).expect("meta cf was just opened");
        match db.get_cf(meta, FORMAT_KEY).map_err(StoreError::Read)? {
            None if read_only => {
                return Err(StoreError::Missing {
                    path: path.to_path_buf(),
                });
            }
            None => {
                // A new store is empty; data without a format marker is someone else's.
                for cf in [CF_PROJECTIONS, CF_OFFSETS, CF_OUTBOX, CF_KV, CF_REPLAY] {
                    let handle = db.cf_handle(cf).expect("cf was just opened");
                    if db.iterator_cf(handle, IteratorMode::Start).next().is_some() {
                        return Err(StoreError::NotAStore {
                            path: path.to_path_buf(),
                            why: "RocksDB data without Forest's format marker",
                        });
                    }
                }
                db.put_cf(meta, FORMAT_KEY, FORMAT)
                    .map_err(StoreError::Write)?
            }
            Some(found) if found == FORMAT => {}
            Some(found) => {
                return Err(StoreError::Format {
                    path: path.to_path_buf(),
                    found: String::from_utf8_lossy(&found).into_owned(),
                    expected: String::from_utf8_lossy(FORMAT).into_owned(),
                });
            }
        }
        let outbox = db.cf_handle(CF_OUTBOX).expect("outbox cf was just opened");
        let next_seq = match db.iterator_cf(outbox, IteratorMode::End).next() {
            Some(Ok((k, _))) => seq_of(&k)? + 1,
            Some(Err(e)) => return Err(StoreError::Read(e)),
            None => 0,
        };
        // Normally empty or a few batches' outputs left by a crash: a short scan.
        let mut outbox_entries = 0u64;
        for item in db.iterator_cf(outbox, IteratorMode::Start) {
            item.map_err(StoreError::Read)?;
            outbox_entries += 1;
        }
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(cfg.sync_writes);
        write_opts.disable_wal(!cfg.wal);
        Ok(Self {
            db,
            path: path.to_path_buf(),
            write_opts,
            next_seq: AtomicU64::new(next_seq),
            outbox_entries: AtomicU64::new(outbox_entries),
            stats: StoreStats::default(),
            cache,
            opts: db_opts,
            max_unflushed: (!cfg.wal && !read_only).then_some(cfg.max_unflushed),
            opened: Instant::now(),
            last_flush_ms: AtomicU64::new(0),
        })
    }

    /// Without the WAL: starts a flush of every column family (in the background, not
    /// waiting for it to finish, though RocksDB may first wait for room if memtables are
    /// full) if none was started for [`StoreConfig::max_unflushed`]. Called after
    /// each batch write, and by an idle writer now and then, so that a crash never takes
    /// more than about that long of batches with it. Returns whether it started one; a
    /// flush RocksDB is already running or has queued when one is due counts as that one
    /// (so the bound is `max_unflushed` plus that flush's age).
    ///
    /// It fails if RocksDB reported a failed flush or compaction since the store was opened
    /// (checked when a flush is due, so within about `max_unflushed` of the failure): without
    /// the WAL, what such a store holds past its last flush is in memory only, and a writer
    /// that went on, or sat idle, would not learn its disk is full until its next write.
    pub fn flush_if_due(&self) -> Result<bool, StoreError> {
        let Some(every) = self.max_unflushed else {
            return Ok(false);
        };
        let now = self.opened.elapsed().as_millis() as u64;
        let last = self.last_flush_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < every.as_millis() as u64
            || self
                .last_flush_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Ok(false);
        }
        let errors = self
            .db
            .property_int_value("rocksdb.background-errors")
            .map_err(StoreError::Read)?
            .unwrap_or(0);
        if errors > 0 {
            return Err(StoreError::Background {
                path: self.path.clone(),
                errors,
            });
        }
        // A flush already running or queued (a memtable filled up) holds every batch written
        // before its memtables were switched, a moment ago: it counts as this round's flush.
        // Why not ask for one anyway: the request switches the memtables again on the thread
        // that asked (the committer, mid-batch; 0.2-18.5 ms in the latency runs), and its small
        // flush adds an L0 file that brings the next compaction forward (BENCHMARKS.md,
        // session 20).
        let running = self
            .db
            .property_int_value("rocksdb.num-running-flushes")
            .map_err(StoreError::Read)?
            .unwrap_or(0);
        let pending = self
            .db
            .property_int_value_cf(self.cf(CF_PROJECTIONS), "rocksdb.mem-table-flush-pending")
            .map_err(StoreError::Read)?
            .unwrap_or(0);
        if running > 0 || pending > 0 {
            return Ok(false);
        }
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(false);
        let cfs: Vec<_> = CFS.iter().map(|cf| self.cf(cf)).collect();
        match self.db.flush_cfs_opt(&cfs, &opts) {
            Ok(()) => Ok(true),
            // Refused, typically while writes are stalled ("try again"): memtables are full
            // and flushing already. Not a failure of the store; the next call tries again.
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "flush not started");
                self.last_flush_ms.store(last, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    pub fn get_user(&self, user_id: &str) -> Result<Option<UserState>, StoreError> {
        Ok(self.get_user_at(user_id)?.map(|(s, _)| s))
    }

    /// A stored projection and the input position it reflects.
    pub fn get_user_at(&self, user_id: &str) -> Result<Option<(UserState, Position)>, StoreError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_PROJECTIONS), user_id)
            .map_err(StoreError::Read)?
        {
            None => Ok(None),
            Some(bytes) => {
                let (pos, state) = split_value(&bytes, user_id.as_bytes())?;
                postcard::from_bytes(state)
                    .map(|s| Some((s, pos)))
                    .map_err(|e| StoreError::Corrupt {
                        key: format!("projections/{user_id}"),
                        reason: e.to_string(),
                    })
            }
        }
    }

    /// Every stored projection, in user-id byte order.
    pub fn users(&self) -> impl Iterator<Item = Result<UserState, StoreError>> + '_ {
        self.db
            .iterator_cf(self.cf(CF_PROJECTIONS), IteratorMode::Start)
            .map(|item| {
                let (k, v) = item.map_err(StoreError::Read)?;
                let (_, state) = split_value(&v, &k)?;
                postcard::from_bytes(state).map_err(|e| StoreError::Corrupt {
                    key: format!("projections/{}", String::from_utf8_lossy(&k)),
                    reason: e.to_string(),
                })
            })
    }

    /// Every stored user id, in byte order, without decoding the projections (a scan for
    /// [`Store::forget`]).
    pub fn user_ids(&self) -> impl Iterator<Item = Result<Vec<u8>, StoreError>> + '_ {
        self.db
            .iterator_cf(self.cf(CF_PROJECTIONS), IteratorMode::Start)
            .map(|item| item.map(|(k, _)| k.into_vec()).map_err(StoreError::Read))
    }

    /// Deletes `users`' projections and the `offsets` entries in one batch: the state of
    /// partitions another instance now owns. Offsets and users go together, so the store never
    /// claims a position whose state it dropped. Returns how many users were deleted.
    pub fn forget<'o>(
        &self,
        users: &[Vec<u8>],
        offsets: impl IntoIterator<Item = (&'o str, i32)>,
    ) -> Result<usize, StoreError> {
        self.replace(users, offsets, std::iter::empty(), std::iter::empty())?;
        Ok(users.len())
    }

    /// Replaces local state in one atomic batch: deletes `forget_users`' projections and the
    /// `forget_offsets` entries, then writes `states` and `offsets` (a key in both ends up
    /// written). Why one batch: a restore must leave either the old state of a partition or
    /// the new one, never new projections beside old offsets, nor old users the new state does
    /// not have beside the new offsets.
    pub fn replace<'s, 'o>(
        &self,
        forget_users: &[Vec<u8>],
        forget_offsets: impl IntoIterator<Item = (&'o str, i32)>,
        states: impl IntoIterator<Item = (&'s UserState, Position)>,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let proj = self.cf(CF_PROJECTIONS);
        for u in forget_users {
            batch.delete_cf(proj, u);
        }
        let offs = self.cf(CF_OFFSETS);
        for (topic, partition) in forget_offsets {
            batch.delete_cf(offs, offset_key(topic, partition));
        }
        self.put_states(&mut batch, states)?;
        let prepared = self.seal(batch, offsets, &[])?;
        self.write_prepared(prepared)?;
        Ok(())
    }

    /// The partitions of `topic` this store has an offset for.
    pub fn partitions(&self, topic: &str) -> Result<Vec<i32>, StoreError> {
        let mut prefix = topic.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        let mode = IteratorMode::From(&prefix, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_OFFSETS), mode) {
            let (k, _) = item.map_err(StoreError::Read)?;
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            if let Ok(b) = <[u8; 4]>::try_from(rest) {
                out.push(i32::from_be_bytes(b));
            }
        }
        Ok(out)
    }

    /// The next offset to consume for a partition, if this store has processed it before.
    pub fn offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        match self
            .db
            .get_cf(self.cf(CF_OFFSETS), offset_key(topic, partition))
            .map_err(StoreError::Read)?
        {
            None => Ok(None),
            Some(v) => {
                let b: [u8; 8] = v.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    key: format!("offsets/{topic}/{partition}"),
                    reason: format!("{} bytes, expected 8", v.len()),
                })?;
                Ok(Some(i64::from_be_bytes(b)))
            }
        }
    }

    /// Writes projections, next offsets and new outbox entries atomically. Returns the outbox
    /// sequence numbers assigned, in order.
    pub fn commit<'s, 'o>(
        &self,
        states: impl IntoIterator<Item = (&'s UserState, Position)>,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
        outbox: &[OutboxEntry],
    ) -> Result<std::ops::Range<u64>, StoreError> {
        let prepared = self.prepare(states, offsets, outbox)?;
        self.write_prepared(prepared)
    }

    /// Serialises a [`Store::commit`] without writing it: the processor folds the next batch
    /// on one thread while another writes this one, and serialising needs the states the fold
    /// goes on changing. The outbox sequence numbers are reserved now.
    pub fn prepare<'s, 'o>(
        &self,
        states: impl IntoIterator<Item = (&'s UserState, Position)>,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
        outbox: &[OutboxEntry],
    ) -> Result<PreparedBatch, StoreError> {
        let mut batch = WriteBatch::default();
        self.put_states(&mut batch, states)?;
        self.seal(batch, offsets, outbox)
    }

    /// Adds each state, prefixed with its position, to `batch`.
    fn put_states<'s>(
        &self,
        batch: &mut WriteBatch,
        states: impl IntoIterator<Item = (&'s UserState, Position)>,
    ) -> Result<(), StoreError> {
        let mut buf = Vec::with_capacity(512);
        let proj = self.cf(CF_PROJECTIONS);
        for (s, pos) in states {
            buf.clear();
            for o in pos {
                buf.extend_from_slice(&o.to_be_bytes());
            }
            let bytes = postcard::to_extend(s, std::mem::take(&mut buf)).map_err(|e| {
                StoreError::Corrupt {
                    key: format!("projections/{}", s.user_id),
                    reason: e.to_string(),
                }
            })?;
            batch.put_cf(proj, s.user_id.as_bytes(), &bytes);
            buf = bytes;
        }
        Ok(())
    }

    /// Like [`Store::commit`], for services whose state is opaque key-value pairs: `None`
    /// deletes the key.
    pub fn commit_kv<'k, 'o>(
        &self,
        kv: impl IntoIterator<Item = (&'k [u8], Option<&'k [u8]>)>,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
        outbox: &[OutboxEntry],
    ) -> Result<std::ops::Range<u64>, StoreError> {
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_KV);
        for (k, v) in kv {
            match v {
                Some(v) => batch.put_cf(cf, k, v),
                None => batch.delete_cf(cf, k),
            }
        }
        let prepared = self.seal(batch, offsets, outbox)?;
        self.write_prepared(prepared)
    }

    pub fn get_kv(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.cf(CF_KV), key)
            .map_err(StoreError::Read)
    }

    /// Every key-value pair whose key starts with `prefix`, in key order.
    pub fn scan_kv(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        let mode = IteratorMode::From(prefix, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_KV), mode) {
            let (k, v) = item.map_err(StoreError::Read)?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// Adds offsets and new outbox entries to a batch of state writes.
    fn seal<'o>(
        &self,
        mut batch: WriteBatch,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
        outbox: &[OutboxEntry],
    ) -> Result<PreparedBatch, StoreError> {
        let offs = self.cf(CF_OFFSETS);
        for (topic, partition, next) in offsets {
            batch.put_cf(offs, offset_key(topic, partition), next.to_be_bytes());
        }
        // Reserved up front: several writers (the processor's workers) share one store. A
        // failed or dropped batch just leaves its range unused.
        let first = self
            .next_seq
            .fetch_add(outbox.len() as u64, Ordering::Relaxed);
        let ob = self.cf(CF_OUTBOX);
        for (i, entry) in outbox.iter().enumerate() {
            let bytes = postcard::to_allocvec(entry).map_err(|e| StoreError::Corrupt {
                key: "outbox/new".into(),
                reason: e.to_string(),
            })?;
            batch.put_cf(ob, (first + i as u64).to_be_bytes(), bytes);
        }
        Ok(PreparedBatch {
            batch,
            seqs: first..first + outbox.len() as u64,
        })
    }

    /// Writes a [`PreparedBatch`] atomically. Returns the outbox sequence numbers its entries
    /// got, in order. Without the WAL it may fail after the batch is in the memtables, from
    /// [`Store::flush_if_due`]: the store cannot persist, and the writer must stop.
    pub fn write_prepared(
        &self,
        prepared: PreparedBatch,
    ) -> Result<std::ops::Range<u64>, StoreError> {
        let PreparedBatch { batch, seqs } = prepared;
        let n = batch.len() as u64;
        self.db
            .write_opt(batch, &self.write_opts)
            .map_err(StoreError::Write)?;
        self.outbox_entries
            .fetch_add(seqs.end - seqs.start, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.writes.fetch_add(n, Ordering::Relaxed);
        self.flush_if_due()?;
        Ok(seqs)
    }

    /// Adds the replay record `seq` of `partition` to a prepared batch, so it is stored with
    /// the batch's offsets and outputs or not at all.
    pub fn put_replay(&self, b: &mut PreparedBatch, partition: i32, seq: u64, bytes: &[u8]) {
        b.batch
            .put_cf(self.cf(CF_REPLAY), replay_key(partition, seq), bytes);
    }

    /// Deletes the replay records `seqs` of `partition` in a prepared batch (the batch that
    /// stores the projections they would rebuild).
    pub fn delete_replay(&self, b: &mut PreparedBatch, partition: i32, seqs: std::ops::Range<u64>) {
        let cf = self.cf(CF_REPLAY);
        for seq in seqs {
            b.batch.delete_cf(cf, replay_key(partition, seq));
        }
    }

    /// The replay records of `partition`, in sequence order.
    pub fn replay_log(&self, partition: i32) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let prefix = partition.to_be_bytes();
        let mode = IteratorMode::From(&prefix, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_REPLAY), mode) {
            let (k, v) = item.map_err(StoreError::Read)?;
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            out.push((replay_seq(partition, rest)?, v.into_vec()));
        }
        Ok(out)
    }

    /// Partitions with replay records, i.e. whose stored projections are older than their
    /// stored offsets (for tests and `forest inspect`).
    pub fn replay_partitions(&self) -> Result<Vec<i32>, StoreError> {
        let mut out: Vec<i32> = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_REPLAY), IteratorMode::Start) {
            let (k, _) = item.map_err(StoreError::Read)?;
            let p = k
                .get(..4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(i32::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt {
                    key: "replay".into(),
                    reason: format!("key of {} bytes, expected 12", k.len()),
                })?;
            if out.last() != Some(&p) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Outbox entries not yet delivered, oldest first, at most `limit`.
    pub fn outbox(&self, limit: usize) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_OUTBOX), IteratorMode::Start)
            .take(limit)
        {
            let (k, v) = item.map_err(StoreError::Read)?;
            let seq = seq_of(&k)?;
            let entry = postcard::from_bytes(&v).map_err(|e| StoreError::Corrupt {
                key: format!("outbox/{seq}"),
                reason: e.to_string(),
            })?;
            out.push((seq, entry));
        }
        Ok(out)
    }

    /// Number of undelivered outbox entries, from the running count: the length found at
    /// open plus entries committed since, minus entries removed. Cheap (an atomic load), for
    /// the outbox-depth metric. [`Store::outbox_len`] counts by scanning.
    pub fn outbox_depth(&self) -> u64 {
        self.outbox_entries.load(Ordering::Relaxed)
    }

    /// Number of undelivered outbox entries, counted by scanning the outbox.
    pub fn outbox_len(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.db.iterator_cf(self.cf(CF_OUTBOX), IteratorMode::Start) {
            item.map_err(StoreError::Read)?;
            n += 1;
        }
        Ok(n)
    }

    /// Deletes delivered outbox entries. Each sequence must name an entry in the outbox
    /// (an acknowledged delivery of an entry read from it or committed to it) and be removed
    /// once: the running count of [`Store::outbox_depth`] relies on it.
    pub fn remove_outbox(&self, seqs: impl IntoIterator<Item = u64>) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let ob = self.cf(CF_OUTBOX);
        for s in seqs {
            batch.delete_cf(ob, s.to_be_bytes());
        }
        let n = batch.len() as u64;
        if n == 0 {
            return Ok(());
        }
        self.db
            .write_opt(batch, &self.write_opts)
            .map_err(StoreError::Write)?;
        // Saturating: a miscounted removal must not wrap the gauge to 2^64.
        let _ = self
            .outbox_entries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.writes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

fn replay_key(partition: i32, seq: u64) -> [u8; 12] {
    let mut k = [0; 12];
    k[..4].copy_from_slice(&partition.to_be_bytes());
    k[4..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn replay_seq(partition: i32, rest: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = rest.try_into().map_err(|_| StoreError::Corrupt {
        key: format!("replay/{partition}"),
        reason: format!("key of {} bytes, expected 12", rest.len() + 4),
    })?;
    Ok(u64::from_be_bytes(b))
}

fn seq_of(k: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = k.try_into().map_err(|_| StoreError::Corrupt {
        key: "outbox".into(),
        reason: format!("key of {} bytes, expected 8", k.len()),
    })?;
    Ok(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(v: u8) -> OutboxEntry {
        OutboxEntry {
            partition: None,
            topic: "t".into(),
            key: vec![v],
            value: vec![v; 3],
            headers: vec![("h".into(), vec![v])],
        }
    }

    #[test]
    fn encoded_states_are_tagged_and_an_untagged_one_is_refused() {
        let mut s = UserState::new("u-1");
        s.balance_g = 42;
        s.recent_ids = [(1_700_000_000_000, 9), (1_700_000_060_000, 10)].into();
        let bytes = encode_state(&s).unwrap();
        assert_eq!(bytes[..2], STATE_TAG);
        assert_eq!(decode_state(&bytes, "x").unwrap(), s);
        // A v5-style value: postcard alone, no tag.
        let old = postcard::to_allocvec(&s).unwrap();
        let err = decode_state(&old, "changelog/0/u-1").unwrap_err();
        assert!(err.to_string().contains("recreate the changelog"), "{err}");
    }

    /// A restore replaces a partition's local state: the users and offsets it forgets are
    /// gone, what it writes is there (also a user in both), and the rest is untouched.
    #[test]
    fn replace_forgets_and_writes_in_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        let state = |u: &str, g: u64| {
            let mut s = UserState::new(u);
            s.balance_g = g;
            s.lifetime_g = g;
            s
        };
        let (a, b, c) = (state("a", 1), state("b", 2), state("c", 3));
        store
            .commit(
                [(&a, NO_POSITION), (&b, NO_POSITION), (&c, NO_POSITION)],
                [("pay", 0, 10), ("mob", 0, 20), ("pay", 1, 30)],
                &[],
            )
            .unwrap();
        let b2 = state("b", 5);
        store
            .replace(
                &[b"a".to_vec(), b"b".to_vec()],
                [("pay", 0), ("mob", 0)],
                [(&b2, [4, -1, -1])],
                [("pay", 0, 4)],
            )
            .unwrap();
        assert_eq!(store.get_user("a").unwrap(), None, "forgotten");
        assert_eq!(store.get_user_at("b").unwrap(), Some((b2, [4, -1, -1])));
        assert_eq!(store.get_user("c").unwrap(), Some(c), "untouched");
        assert_eq!(store.offset("pay", 0).unwrap(), Some(4), "rewritten");
        assert_eq!(store.offset("mob", 0).unwrap(), None, "forgotten");
        assert_eq!(store.offset("pay", 1).unwrap(), Some(30), "untouched");
    }

    #[test]
    fn commit_is_atomic_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = UserState::new("alice");
        s.balance_g = 42;
        s.lifetime_g = 42;
        {
            let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
            let seqs = store
                .commit([(&s, [7, -2, 9])], [("pay", 3, 100)], &[entry(1), entry(2)])
                .unwrap();
            assert_eq!(seqs, 0..2);
            store.remove_outbox([0]).unwrap();
        }
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        assert_eq!(store.get_user("alice").unwrap(), Some(s.clone()));
        assert_eq!(store.get_user_at("alice").unwrap(), Some((s, [7, -2, 9])));
        assert_eq!(store.get_user("bob").unwrap(), None);
        assert_eq!(store.offset("pay", 3).unwrap(), Some(100));
        assert_eq!(store.offset("pay", 4).unwrap(), None);
        assert_eq!(store.offset("pa", 3).unwrap(), None);
        assert_eq!(store.outbox(10).unwrap(), vec![(1, entry(2))]);
        // Sequence numbers continue after the highest stored one.
        assert_eq!(store.commit([], [], &[entry(3)]).unwrap(), 2..3);
        assert_eq!(store.outbox_len().unwrap(), 2);
    }

    /// Copies a live store's files as a process crash would leave them: what is only in
    /// memtables is in none of them.
    fn crash_copy(from: &Path, to: &Path) {
        for f in std::fs::read_dir(from).unwrap() {
            let f = f.unwrap();
            if f.file_name() != "LOCK" {
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        }
    }

    /// Flushes every column family and waits for it.
    fn flush_all_and_wait(store: &Store) {
        let mut wait = rocksdb::FlushOptions::default();
        wait.set_wait(true);
        let cfs: Vec<_> = CFS.iter().map(|cf| store.cf(cf)).collect();
        store.db.flush_cfs_opt(&cfs, &wait).unwrap();
    }

    #[test]
    fn without_the_wal_a_crash_reopens_at_the_last_flush_whole_and_a_close_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            wal: false,
            max_unflushed: Duration::from_secs(3),
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), &cfg).unwrap();
        let state = |g| {
            let mut s = UserState::new("alice");
            s.balance_g = g;
            s
        };
        // Batch A: a projection, an offset and an output.
        store
            .commit([(&state(1), [1, -2, -2])], [("pay", 0, 1)], &[entry(1)])
            .unwrap();
        assert!(
            !store.flush_if_due().unwrap(),
            "not due within 3 s of the open"
        );
        std::thread::sleep(Duration::from_millis(3100));
        assert!(store.flush_if_due().unwrap(), "due after max_unflushed");
        assert!(!store.flush_if_due().unwrap(), "just started one");
        // Wait for it (a waiting flush of every column family waits for the pending one).
        flush_all_and_wait(&store);
        // Batch B changes all three, and A's output is delivered; then the process "dies".
        store
            .commit([(&state(2), [2, -2, -2])], [("pay", 0, 2)], &[entry(2)])
            .unwrap();
        store.remove_outbox([0]).unwrap();
        let crashed = tempfile::tempdir().unwrap();
        crash_copy(dir.path(), crashed.path());

        // Batch `n` (1 = A, 2 = B) whole: its projection, its offset, and its output alone in
        // the outbox.
        let holds_batch = |s: &Store, n: u8| {
            let pos = i64::from(n);
            assert_eq!(
                s.get_user_at("alice").unwrap(),
                Some((state(u64::from(n)), [pos, -2, -2]))
            );
            assert_eq!(s.offset("pay", 0).unwrap(), Some(pos));
            assert_eq!(s.outbox(10).unwrap(), vec![(u64::from(n) - 1, entry(n))]);
        };
        // The crash copy holds batch A whole and nothing of B, A's output back in the outbox
        // to be sent again.
        holds_batch(&Store::open(crashed.path(), &cfg).unwrap(), 1);
        // A graceful close flushes what the memtables held.
        drop(store);
        holds_batch(&Store::open(dir.path(), &cfg).unwrap(), 2);
    }

    #[test]
    fn without_the_wal_a_full_memtable_flushes_every_column_family_with_it() {
        // Only batch writes fill memtables here (no timed flush). Projections fill theirs
        // first; if the offsets were not flushed with them, a crash would reopen at
        // projections newer than the offsets they are stored with.
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            wal: false,
            max_unflushed: Duration::from_secs(3600),
            write_buffer_bytes: 1 << 20,
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), &cfg).unwrap();
        let user = |i: i64| {
            let mut s = UserState::new(format!("{i:05}-{}", "x".repeat(1000)));
            s.balance_g = i as u64;
            s
        };
        let n = 2_000;
        for i in 1..=n {
            store
                .commit([(&user(i), NO_POSITION)], [("pay", 0, i)], &[])
                .unwrap();
        }
        // Let the flushes the writes started finish, and the compactions they started: a
        // compaction finishing mid-copy would delete or add files under the copy.
        let busy = |prop: &str| {
            CFS.iter()
                .map(|cf| store.db.property_int_value_cf(store.cf(cf), prop).unwrap())
                .any(|v| v != Some(0))
        };
        let t0 = Instant::now();
        while [
            "rocksdb.num-immutable-mem-table",
            "rocksdb.num-running-flushes",
            "rocksdb.num-running-compactions",
            "rocksdb.compaction-pending",
        ]
        .iter()
        .any(|p| busy(p))
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "flushes did not finish"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let crashed = tempfile::tempdir().unwrap();
        crash_copy(dir.path(), crashed.path());
        drop(store);

        let c = Store::open(crashed.path(), &cfg).unwrap();
        let k = c
            .offset("pay", 0)
            .unwrap()
            .expect("a flush of the projections took the offsets with it");
        assert!(k < n, "2 MB of projections cannot all be flushed yet: {k}");
        for i in [1, k / 2, k] {
            let u = user(i);
            assert_eq!(c.get_user(&u.user_id).unwrap(), Some(u), "user {i} of {k}");
        }
        assert_eq!(c.get_user(&user(k + 1).user_id).unwrap(), None);
    }

    #[test]
    fn durability_settings_that_cannot_hold_are_refused() {
        let sync_without_wal = StoreConfig {
            wal: false,
            sync_writes: true,
            ..StoreConfig::default()
        };
        assert!(
            sync_without_wal
                .validate()
                .unwrap_err()
                .contains("write-ahead log")
        );
        let never_flushed = StoreConfig {
            wal: false,
            max_unflushed: Duration::ZERO,
            ..StoreConfig::default()
        };
        assert!(never_flushed.validate().unwrap_err().contains("above zero"));
        // With the WAL the interval is not used.
        let with_wal = StoreConfig {
            max_unflushed: Duration::ZERO,
            ..StoreConfig::default()
        };
        assert!(with_wal.validate().is_ok());
    }

    #[test]
    fn a_cap_on_background_writes_puts_the_flushes_through_the_limiter_and_none_does_not() {
        use rocksdb::statistics::Ticker;
        // Bytes the rate limiter granted to the flush of one committed batch.
        let metered = |cap: Option<u64>| {
            let dir = tempfile::tempdir().unwrap();
            let cfg = StoreConfig {
                background_write_bytes_per_sec: cap,
                ..StoreConfig::default()
            };
            let store = Store::open(dir.path(), &cfg).unwrap();
            store
                .commit(
                    [(&UserState::new("alice"), NO_POSITION)],
                    [("pay", 0, 1)],
                    &[],
                )
                .unwrap();
            flush_all_and_wait(&store);
            // The test checks the limiter is in the path, not the rate it keeps.
            store.opts.get_ticker_count(Ticker::RateLimiterBytesWrite)
        };
        assert!(
            metered(Some(64 << 20)) > 0,
            "the capped flush went through the limiter"
        );
        assert_eq!(metered(None), 0, "no limiter without a cap");
        let too_low = StoreConfig {
            background_write_bytes_per_sec: Some(512 << 10),
            ..StoreConfig::default()
        };
        assert!(too_low.validate().unwrap_err().contains("below 1 MiB/s"));
    }

    #[test]
    fn the_l0_trigger_sets_how_many_flushed_files_wait_for_a_compaction() {
        // Level-0 files of the projections after `flushes` flushes of one batch each, once
        // RocksDB has no compaction left to do.
        let l0_files = |trigger: u32, flushes: i64| {
            let dir = tempfile::tempdir().unwrap();
            let cfg = StoreConfig {
                l0_compaction_files: trigger,
                ..StoreConfig::default()
            };
            let store = Store::open(dir.path(), &cfg).unwrap();
            for i in 0..flushes {
                let mut s = UserState::new("alice");
                s.balance_g = i as u64;
                store
                    .commit([(&s, NO_POSITION)], [("pay", 0, i + 1)], &[])
                    .unwrap();
                flush_all_and_wait(&store);
            }
            let cf = store.cf(CF_PROJECTIONS);
            let prop = |name| store.db.property_int_value_cf(cf, name).unwrap().unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while prop("rocksdb.compaction-pending") > 0
                || store
                    .db
                    .property_int_value("rocksdb.num-running-compactions")
                    .unwrap()
                    .unwrap()
                    > 0
            {
                assert!(Instant::now() < deadline, "compactions did not finish");
                std::thread::sleep(Duration::from_millis(20));
            }
            prop("rocksdb.num-files-at-level0")
        };
        assert!(
            l0_files(4, 5) < 4,
            "with RocksDB's default of 4, the fourth file starts a compaction"
        );
        assert_eq!(l0_files(8, 5), 5, "with 8, five files wait in level 0");
        let too_few = StoreConfig {
            l0_compaction_files: 1,
            ..StoreConfig::default()
        };
        assert!(too_few.validate().unwrap_err().contains("outside 2-64"));
        for (files, ok) in [(2, true), (64, true), (65, false)] {
            let cfg = StoreConfig {
                l0_compaction_files: files,
                ..StoreConfig::default()
            };
            assert_eq!(cfg.validate().is_ok(), ok, "{files} files");
        }
    }

    /// The nice values of this process's threads named `name`, read from /proc. RocksDB
    /// names its pools' threads (`rocksdb:low` for compactions, `rocksdb:high` for flushes)
    /// with glibc only.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn thread_nices(name: &str) -> Vec<i64> {
        let mut nices = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
                continue; // the thread ended meanwhile
            };
            if comm.trim() != name {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
                continue;
            };
            // Fields after the parenthesised name start at the state (field 3); nice is 19.
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            nices.push(after.split(' ').nth(16).unwrap().parse().unwrap());
        }
        nices
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn low_priority_compactions_run_at_nice_19_and_flushes_at_0() {
        // The thread pool is process-wide and stays lowered: no other test in this binary
        // lowers it, so before this test's store opens no compaction thread runs at 19, and
        // after it the others' compactions run at 19 too. Harmless here: only the L0 trigger
        // test waits for compactions, up to 60 s, and nice only matters on a busy core.
        assert!(
            !thread_nices("rocksdb:low").contains(&19),
            "no compaction thread at 19 before"
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            low_priority_compactions: true,
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), &cfg).unwrap();
        for i in 0..2 {
            let mut s = UserState::new("alice");
            s.balance_g = i;
            store
                .commit([(&s, NO_POSITION)], [("pay", 0, i as i64 + 1)], &[])
                .unwrap();
            flush_all_and_wait(&store);
        }
        // A manual compaction runs on the same pool as RocksDB's own.
        store
            .db
            .compact_range_cf(store.cf(CF_PROJECTIONS), None::<&[u8]>, None::<&[u8]>);
        let low = thread_nices("rocksdb:low");
        assert!(
            low.contains(&19),
            "a compaction thread ran at nice 19: {low:?}"
        );
        let high = thread_nices("rocksdb:high");
        assert!(
            !high.is_empty() && high.iter().all(|&n| n == 0),
            "flush threads at the normal priority: {high:?}"
        );
        assert_eq!(store.get_user("alice").unwrap().unwrap().balance_g, 1);
    }

    #[test]
    fn replay_records_are_stored_with_their_batch_kept_per_partition_and_deleted_by_range() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
            let mut b = store.prepare([], [("t", 1, 10)], &[]).unwrap();
            store.put_replay(&mut b, 1, 0, b"one");
            store.put_replay(&mut b, -1, 7, b"minus one");
            // Not written: a dropped batch leaves nothing behind.
            let mut dropped = store.prepare([], [("t", 2, 10)], &[]).unwrap();
            store.put_replay(&mut dropped, 2, 0, b"lost");
            drop(dropped);
            assert_eq!(b.writes(), 3);
            store.write_prepared(b).unwrap();
            let mut b = store.prepare([], [("t", 1, 20)], &[]).unwrap();
            store.put_replay(&mut b, 1, 1, b"two");
            store.put_replay(&mut b, 256, 0, b"other");
            store.write_prepared(b).unwrap();
        }
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        assert_eq!(
            store.replay_log(1).unwrap(),
            vec![(0, b"one".to_vec()), (1, b"two".to_vec())]
        );
        assert_eq!(store.replay_log(2).unwrap(), vec![]);
        assert_eq!(
            store.replay_log(-1).unwrap(),
            vec![(7, b"minus one".to_vec())]
        );
        assert_eq!(store.replay_partitions().unwrap(), vec![1, 256, -1]);
        let mut b = store.prepare([], [], &[]).unwrap();
        store.delete_replay(&mut b, 1, 0..2);
        store.write_prepared(b).unwrap();
        assert_eq!(store.replay_log(1).unwrap(), vec![]);
        assert_eq!(store.replay_log(256).unwrap(), vec![(0, b"other".to_vec())]);
        assert_eq!(store.replay_partitions().unwrap(), vec![256, -1]);
    }

    #[test]
    fn the_outbox_depth_counts_entries_across_commits_removals_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
            assert_eq!(store.outbox_depth(), 0);
            store
                .commit([], [("t", 0, 1)], &[entry(1), entry(2), entry(3)])
                .unwrap();
            store.commit([], [("t", 0, 2)], &[]).unwrap();
            assert_eq!(store.outbox_depth(), 3);
            store.remove_outbox([1]).unwrap();
            assert_eq!(store.outbox_depth(), 2);
            // A crash here: two entries are left for the next run.
        }
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        assert_eq!(
            store.outbox_depth(),
            2,
            "initialised from the outbox at open"
        );
        assert_eq!(store.outbox_len().unwrap(), 2);
        store.commit([], [], &[entry(4)]).unwrap();
        assert_eq!(store.outbox_depth(), 3);
        let seqs: Vec<u64> = store.outbox(10).unwrap().iter().map(|(s, _)| *s).collect();
        store.remove_outbox(seqs).unwrap();
        assert_eq!(store.outbox_depth(), 0);
        assert_eq!(store.outbox_len().unwrap(), 0);
        drop(store);
        let ro = Store::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.outbox_depth(), 0);
    }

    #[test]
    fn a_store_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
            store
                .db
                .put_cf(store.cf(CF_META), FORMAT_KEY, b"forest-store-v0")
                .unwrap();
        }
        let err = Store::open(dir.path(), &StoreConfig::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("forest-store-v0"), "{err}");
        assert!(!err.is_retriable());
    }

    #[test]
    fn memory_settings_that_cannot_hold_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            block_cache_bytes: 64 << 20,
            write_buffer_bytes: 64 << 20,
            ..StoreConfig::default()
        };
        let err = Store::open(dir.path(), &cfg).err().unwrap();
        assert!(matches!(err, StoreError::Config(_)), "{err}");
        assert!(err.to_string().contains("below the block cache"), "{err}");
        assert!(!err.is_retriable());
        let tiny = StoreConfig {
            write_buffer_bytes: 1000,
            ..cfg.clone()
        };
        assert!(tiny.validate().unwrap_err().contains("1 MiB"));
        let ok = StoreConfig {
            write_buffer_bytes: 16 << 20,
            ..cfg
        };
        let store = Store::open(dir.path(), &ok).unwrap();
        // The memtables' reservation is charged to the block cache: writing fills it.
        let big = UserState::new("x".repeat(100));
        for i in 0..2_000 {
            store
                .commit([(&big, NO_POSITION)], [("t", 0, i)], &[])
                .unwrap();
        }
        assert!(store.cache.get_usage() > 0);
        assert!(store.cache.get_usage() <= (64 << 20) + (1 << 20));
    }

    #[test]
    fn a_directory_that_is_not_a_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a store").unwrap();
        let err = Store::open(dir.path(), &StoreConfig::default())
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
        assert!(err.to_string().contains("check --store"), "{err}");
        // An empty directory, or none at all, is a new store.
        let empty = tempfile::tempdir().unwrap();
        Store::open(empty.path(), &StoreConfig::default()).unwrap();
        Store::open(&empty.path().join("new"), &StoreConfig::default()).unwrap();
    }

    #[test]
    fn corrupt_store_files_are_detected_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
            store.commit([], [("t", 0, 5)], &[]).unwrap();
        }
        // Lost CURRENT file: RocksDB data without its entry point.
        let moved = dir.path().join("CURRENT.bak");
        std::fs::rename(dir.path().join("CURRENT"), &moved).unwrap();
        let err = Store::open(dir.path(), &StoreConfig::default())
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
        std::fs::rename(&moved, dir.path().join("CURRENT")).unwrap();
        // A MANIFEST overwritten with garbage.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let p = entry.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("MANIFEST")
            {
                std::fs::write(&p, vec![0xA5; 4096]).unwrap();
            }
        }
        let err = Store::open(dir.path(), &StoreConfig::default())
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
        assert!(!err.is_retriable());
    }

    #[test]
    fn corrupt_values_are_reported_not_panicked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        store
            .db
            .put_cf(store.cf(CF_PROJECTIONS), "mallory", [0xff, 0xff, 0xff])
            .unwrap();
        store
            .db
            .put_cf(store.cf(CF_OFFSETS), offset_key("t", 0), [1, 2])
            .unwrap();
        assert!(matches!(
            store.get_user("mallory"),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.offset("t", 0),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
