//! Every metric the processor emits, described in one place. Names follow
//! `forest_<noun>_<unit>[_total]`; labels are bounded (topic index names, rejection codes,
//! behaviours, species), never a user id.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const EVENTS_CONSUMED: &str = "forest_events_consumed_total";
pub const EVENTS_APPLIED: &str = "forest_events_applied_total";
pub const EVENTS_REJECTED: &str = "forest_events_rejected_total";
pub const EVENTS_DEDUPLICATED: &str = "forest_events_deduplicated_total";
pub const DLQ_RECORDS: &str = "forest_dlq_records_total";
pub const DLQ_TRUNCATED: &str = "forest_dlq_truncated_records_total";
pub const GRAMS_CREDITED: &str = "forest_energy_credited_grams_total";
pub const TREES_MATURED: &str = "forest_trees_matured_total";
pub const OUTBOX_DEPTH: &str = "forest_outbox_depth_entries";
pub const BATCH_SIZE: &str = "forest_batch_size_events";
pub const BATCH_DURATION: &str = "forest_batch_duration_seconds";
pub const STORE_WRITES: &str = "forest_store_writes_total";
pub const REBALANCES: &str = "forest_rebalances_total";
pub const MERGE_BUFFERED: &str = "forest_merge_buffered_records";
pub const EVENT_LATENCY: &str = "forest_event_latency_seconds";
pub const OFFSET_GAPS: &str = "forest_input_offset_gaps_total";
pub const MERGE_EARLY_RELEASES: &str = "forest_merge_early_releases_total";
pub const MERGE_LANE_PAUSES: &str = "forest_merge_lane_pauses_total";
pub const RECORDS_FETCHED: &str = "forest_consumer_fetched_records_total";
pub const KAFKA_COMMIT: &str = "forest_kafka_commit_duration_seconds";
pub const RESTORED_USERS: &str = "forest_restored_projections_total";
pub const RESTORE_DURATION: &str = "forest_restore_duration_seconds";
pub const TRANSACTIONS: &str = "forest_transactions_total";
pub const FORGOTTEN_USERS: &str = "forest_forgotten_projections_total";
pub const RESTORE_READ: &str = "forest_restore_read_records";
pub const PROJECTIONS_WRITTEN: &str = "forest_projections_written_total";
pub const EVENTS_REPLAYED: &str = "forest_events_replayed_total";

/// Registers descriptions with the installed recorder (call once at start-up).
pub fn describe() {
    describe_counter!(
        PROJECTIONS_WRITTEN,
        Unit::Count,
        "Projections written to RocksDB: each user a batch changed, or with --projection-interval-ms above 0 each user changed since it was last written, once it has been unwritten that long."
    );
    describe_counter!(
        EVENTS_REPLAYED,
        Unit::Count,
        "Input records folded again after a restart or reassignment because their batch stored offsets and outputs but not projections (--projection-interval-ms above 0); their outputs are not sent again."
    );
    describe_counter!(
        TRANSACTIONS,
        Unit::Count,
        "Kafka transactions committed (--exactly-once=transactions): one per batch."
    );
    describe_counter!(
        FORGOTTEN_USERS,
        Unit::Count,
        "Projections deleted from the local store because their partition has been owned elsewhere for longer than the state retention."
    );
    describe_gauge!(
        RESTORE_READ,
        Unit::Count,
        "Changelog records read so far by the restore in progress (0 when none runs)."
    );
    describe_counter!(
        RESTORED_USERS,
        Unit::Count,
        "Projections restored from the changelog onto newly assigned partitions."
    );
    describe_histogram!(
        RESTORE_DURATION,
        Unit::Seconds,
        "Time to restore one input partition from the changelog."
    );
    describe_histogram!(
        KAFKA_COMMIT,
        Unit::Seconds,
        "Time from committing offsets to Kafka (for lag tools) to the broker's answer."
    );
    describe_counter!(
        EVENTS_CONSUMED,
        Unit::Count,
        "Input records read from Kafka, by topic kind."
    );
    describe_counter!(
        EVENTS_APPLIED,
        Unit::Count,
        "Input events accepted by the fold."
    );
    describe_counter!(
        EVENTS_REJECTED,
        Unit::Count,
        "Input records rejected, by reason code (duplicates included)."
    );
    describe_counter!(
        EVENTS_DEDUPLICATED,
        Unit::Count,
        "Input events dropped as already-applied duplicates."
    );
    describe_counter!(
        DLQ_RECORDS,
        Unit::Count,
        "Records written to the dead-letter topic, by reason code."
    );
    describe_counter!(
        GRAMS_CREDITED,
        Unit::Count,
        "Grams of green energy credited, by behaviour."
    );
    describe_counter!(
        DLQ_TRUNCATED,
        Unit::Count,
        "Dead letters whose value (or key) was cut to fit Kafka's record size limit; header forest.truncated holds the original length."
    );
    describe_counter!(
        TREES_MATURED,
        Unit::Count,
        "Trees matured, by species; counted when the batch that matured them is durable."
    );
    describe_gauge!(
        OUTBOX_DEPTH,
        Unit::Count,
        "Entries in the store's outbox (all workers): outputs durably written and not yet acknowledged by Kafka, including those a previous run left."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Events per committed batch.");
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time to commit a batch: store write, outbox flush."
    );
    describe_counter!(
        STORE_WRITES,
        Unit::Count,
        "Keys written to RocksDB (puts and deletes): projections, offsets, outbox entries and their deletion once acknowledged, replay records."
    );
    describe_counter!(
        REBALANCES,
        Unit::Count,
        "Consumer-group rebalances, by kind (assign, revoke; lost: a revoke of partitions the group had already given to another member)."
    );
    describe_counter!(
        MERGE_LANE_PAUSES,
        Unit::Count,
        "Input lanes paused because the merge buffer was near its bound. Each pause discards what librdkafka had prefetched for the lane, which is fetched again on resume (compare forest_consumer_fetched_records_total with forest_events_consumed_total)."
    );
    describe_counter!(
        RECORDS_FETCHED,
        Unit::Count,
        "Input records the consumers received from the brokers (librdkafka statistics, every statistics.interval.ms): above forest_events_consumed_total by what was fetched again after a lane pause, a seek or a rebalance."
    );
    describe_counter!(
        MERGE_EARLY_RELEASES,
        Unit::Count,
        "Records the co-partition merge released while a lane of their partition was empty and behind its high watermark, by reason (idle: the lane delivered nothing for max_idle; buffer_full: the merge buffer was over its bound). Their order is not the canonical one a replay gives: non-zero means events may have been rejected as too late that a replay would accept."
    );
    describe_counter!(
        OFFSET_GAPS,
        Unit::Count,
        "Input records that arrived past their partition's next expected offset (transaction markers, retention; anything else is a bug)."
    );
    describe_histogram!(
        EVENT_LATENCY,
        Unit::Seconds,
        "Per committed batch: time from its oldest record's Kafka timestamp to the batch being durable and delivered (produce-to-projection latency when producers stamp send time)."
    );
    describe_gauge!(
        MERGE_BUFFERED,
        Unit::Count,
        "Records consumed and waiting in the co-partition merge."
    );
}
