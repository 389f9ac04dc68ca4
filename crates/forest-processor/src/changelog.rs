//! The projection changelog: state that follows partitions between instances.
//!
//! With `ProcessorConfig::changelog`, each committed batch also puts into the outbox (so in
//! the same RocksDB batch as the state and offsets) the new projection of every user it
//! changed, keyed by user id (so partitioned like the inputs), and then one **checkpoint** per
//! input partition it advanced: the next offsets of that partition's three input lanes. The
//! outbox sends them after the batch's trees and dead letters, in order, with the idempotent
//! producer, so within a changelog partition a checkpoint follows the projections it covers.
//!
//! When an instance is assigned a partition for which its store has no offsets, it restores
//! the partition from the changelog before consuming: the latest projection of each user (the
//! topic is compacted) and the latest checkpoint's offsets replace whatever the store held
//! for the partition (its users and offsets are deleted in the same batch). Why this is
//! exact:
//! - Projections up to the last checkpoint are what that checkpoint's offsets reflect.
//! - Projections after it (a batch whose checkpoint never reached Kafka: its instance lost its
//!   disk mid-delivery) are newer than the offsets. The new owner re-reads that batch from the
//!   checkpoint; for the users already updated, its events are in their dedupe window and are
//!   rejected as duplicates (their trees were delivered before their projection, by the
//!   outbox order); the other users get them applied. The result is the state as if every
//!   event had been applied once.
//! - Compaction may drop a user's older projection once a newer one exists, so the restore
//!   never relies on anything but the latest one.
//! - No checkpoint at all: the partition's local state is deleted, and the partition is
//!   replayed from the start of the log.
//! - A lane the checkpoint's writer had not read yet (-1) has no offset after the restore, so
//!   it is read from its beginning, as the projections reflect.
//! - A user the store held but the changelog lacks has no events before the checkpoint (the
//!   checkpoint's writer wrote every user it changed), so deleting it loses nothing; its events
//!   after the checkpoint are read again. Kept, it could hold events the changelog never had.
//!
//! Users are matched to partitions with the producers' partitioner (`forest_kafka::
//! partition_of`): the changelog itself relies on input records being partitioned by user id
//! that way, since each projection goes to its user's partition number. A record found in
//! another partition is dead-lettered, never folded (`Malformed::WrongPartition`).
//!
//! When is local state stale? The store records, next to the input offsets, the changelog end
//! its state reflects: the offset after this instance's last acknowledged checkpoint of the
//! partition (after its transaction's commit marker in transactions mode), or the end a
//! restore read to. On assignment, a partition whose recorded end is not the changelog
//! partition's current end was written by someone else since (another owner; or, in
//! transactions mode, this instance's own transaction that committed before a crash kept the
//! store from recording it) and is restored. An end that cannot be recorded (a crash after the
//! delivery) only costs an unnecessary restore.
//!
//! Leftovers: changelog records a crashed run left in the outbox are dropped at the next
//! start, never sent late (the partition may have moved, and a stale projection after the new
//! owner's checkpoints would be restored as the latest), and the store's recorded ends are
//! invalidated so each partition restores on its next assignment (`runtime::
//! drop_changelog_leftovers`), even from a changelog partition still empty (which deletes the
//! local state and replays the partition from the log's start). Before session 16 local state
//! was kept there, and kept beside every restore for users the changelog lacked: users of a
//! dropped batch who never changed again then lacked a changelog projection while later
//! checkpoints covered their events.
//!
//! Transactions mode (`ExactlyOnce::Transactions`): the projections and checkpoints go in the
//! batch's Kafka transaction, and restores read `read_committed` up to the last stable offset,
//! so a restore never sees projections after the last committed checkpoint, nor a killed
//! instance's open or aborted transaction.

use crate::ProcessorError;
use crate::metrics as m;
use forest_domain::UserState;
use forest_store::{OutboxEntry, Store, decode_state, encode_state};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Key of a partition's checkpoint record: not UTF-8, so never a user id.
pub const CHECKPOINT_KEY: &[u8] = &[0xFF, b'c', b'p'];

/// The changelog record of one projection.
pub fn projection(topic: &str, s: &UserState) -> Result<OutboxEntry, ProcessorError> {
    Ok(OutboxEntry {
        topic: topic.to_string(),
        key: s.user_id.as_bytes().to_vec(),
        value: encode_state(s)?,
        headers: vec![],
        partition: None,
    })
}

/// The checkpoint of input partition `partition`: its lanes' next offsets (-1: unknown).
pub fn checkpoint(topic: &str, partition: i32, lanes: [i64; 3]) -> OutboxEntry {
    OutboxEntry {
        topic: topic.to_string(),
        key: CHECKPOINT_KEY.to_vec(),
        value: lanes.iter().flat_map(|o| o.to_le_bytes()).collect(),
        headers: vec![],
        partition: Some(partition),
    }
}

/// The lanes of a checkpoint record's value; `None` if it is not one.
pub fn decode_checkpoint(v: &[u8]) -> Option<[i64; 3]> {
    if v.len() != 24 {
        return None;
    }
    let mut lanes = [0i64; 3];
    for (i, chunk) in v.chunks_exact(8).enumerate() {
        lanes[i] = i64::from_le_bytes(chunk.try_into().ok()?);
    }
    Some(lanes)
}

/// What a restore did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Restored {
    pub users: u64,
    pub records: u64,
    pub lanes: Option<[i64; 3]>,
    /// Users of the partition the store held before, all deleted (those the changelog has
    /// are written again).
    pub forgotten: u64,
}

/// Replaces the local state of input partition `partition` with the changelog's, in one
/// batch: `local_users` (the users of the partition the store holds) and the partition's
/// offsets are deleted, then the latest projection of each user and the latest checkpoint's
/// offsets for `inputs` (the three input topic names, in lane order) are written. Without a
/// checkpoint only the deletion happens, so the partition is replayed from the start of the
/// log.
pub fn restore(
    store: &Store,
    brokers: &str,
    changelog: &str,
    inputs: [&str; 3],
    partition: i32,
    local_users: &[Vec<u8>],
) -> Result<Restored, ProcessorError> {
    let started = Instant::now();
    let mut end = 0;
    let mut progress = |read: usize, until: i64| {
        end = until;
        metrics::gauge!(m::RESTORE_READ).set(read as f64);
        if read > 0 && read % 100_000 == 0 {
            tracing::info!(
                changelog,
                partition,
                read,
                until,
                "restoring from the changelog"
            );
        }
    };
    let records = forest_kafka::read_partition(
        brokers,
        changelog,
        partition,
        Duration::from_secs(600),
        &mut progress,
    )
    .map_err(|e| ProcessorError::Restore {
        partition,
        reason: e.to_string(),
    })?;
    metrics::gauge!(m::RESTORE_READ).set(0.0);
    let mut latest: HashMap<&[u8], &[u8]> = HashMap::new();
    let mut lanes = None;
    for r in &records {
        if r.key == CHECKPOINT_KEY {
            lanes = decode_checkpoint(&r.value).or(lanes);
        } else {
            latest.insert(&r.key, &r.value);
        }
    }
    let mut done = Restored {
        users: 0,
        records: records.len() as u64,
        lanes,
        forgotten: local_users.len() as u64,
    };
    // Every offset of the partition goes: a lane the checkpoint has not read (-1) starts
    // from the beginning of its log, like the state the checkpoint's projections reflect.
    let forget_offsets = inputs
        .iter()
        .chain(std::iter::once(&changelog))
        .map(|t| (*t, partition));
    let Some(lanes) = lanes else {
        store.forget(local_users, forget_offsets)?;
        tracing::info!(
            changelog,
            partition,
            records = records.len(),
            forgotten = local_users.len(),
            "no changelog checkpoint: the partition's local state is deleted and replayed from the start of the log"
        );
        return Ok(done);
    };
    let states = latest
        .iter()
        .map(|(k, v)| {
            decode_state(
                v,
                &format!("{changelog}/{partition}/{}", String::from_utf8_lossy(k)),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The input offsets the checkpoint reflects, and the changelog end this state reflects
    // (so the next assignment can tell whether another instance wrote after it).
    let offsets: Vec<(&str, i32, i64)> = inputs
        .iter()
        .zip(lanes)
        .filter(|(_, o)| *o >= 0)
        .map(|(t, o)| (*t, partition, o))
        .chain(std::iter::once((changelog, partition, end)))
        .collect();
    // No replay runs where the changelog is on, so no position is needed.
    store.replace(
        local_users,
        forget_offsets,
        states.iter().map(|s| (s, forest_store::NO_POSITION)),
        offsets,
    )?;
    done.users = states.len() as u64;
    let secs = started.elapsed().as_secs_f64();
    metrics::counter!(m::RESTORED_USERS).increment(done.users);
    metrics::histogram!(m::RESTORE_DURATION).record(secs);
    tracing::info!(changelog, partition, users = done.users, records = done.records, forgotten = done.forgotten, lanes = ?lanes, secs, "partition restored from the changelog");
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_are_not_user_ids() {
        let e = checkpoint("c", 3, [10, -1, 7]);
        assert_eq!(e.partition, Some(3));
        assert_eq!(decode_checkpoint(&e.value), Some([10, -1, 7]));
        let key: Vec<u8> = CHECKPOINT_KEY.to_vec();
        assert!(String::from_utf8(key).is_err(), "never a user id");
        assert_eq!(decode_checkpoint(b"short"), None);
    }
}
