//! Delivers a service's RocksDB outbox to Kafka, for the processor and fulfilment alike.
//!
//! Why here: both services write outputs into the outbox in the same RocksDB batch as their
//! state and offsets, then need the same thing: produce them with an idempotent producer, wait
//! until Kafka acknowledged each one, and delete exactly the acknowledged entries. An entry
//! Kafka did not acknowledge stays in the outbox and is re-sent by the next run, with the same
//! bytes, so downstream dedupes it by the id it carries.

use crate::{client_config, headers};
use forest_store::{OutboxEntry, Store, StoreError};
use rdkafka::ClientContext;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use std::borrow::Cow;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An outbox delivery that failed. Every variant leaves the unacknowledged entries in the
/// outbox, so a retry (or the next run) re-sends them.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("cannot create the output producer: {0}")]
    CreateProducer(KafkaError),
    #[error("producing an output to {topic} failed: {source}")]
    Produce { topic: String, source: KafkaError },
    #[error("{pending} outputs got no delivery report within {waited:?}; they stay in the outbox")]
    Timeout { pending: usize, waited: Duration },
    #[error(
        "{failed} outputs were not acknowledged by Kafka (first error: {first}); they stay in the outbox"
    )]
    Rejected { failed: usize, first: KafkaError },
    /// Kafka refused an output for good (too large, invalid, not authorised, a bad topic
    /// name): the same bytes would be refused again, so a retry or restart cannot help. The
    /// entry stays in the outbox until an operator changes the limit, the topic or the ACLs.
    #[error(
        "Kafka refused output {seq} to {topic} ({bytes} bytes) for good: {source}; it stays in the outbox and re-sending cannot help: check the producer's message.max.bytes (--kafka-config), the topic's max.message.bytes, the topic name and ACLs"
    )]
    Refused {
        topic: String,
        seq: u64,
        bytes: usize,
        source: KafkaError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A step of a Kafka transaction failed; the transaction was aborted (nothing it carried
    /// is visible to read_committed consumers).
    #[error("kafka transaction {op} failed: {source}")]
    Transaction {
        op: &'static str,
        source: KafkaError,
    },
}

impl DeliveryError {
    /// Kafka-side failures are worth retrying; a bad producer configuration is not.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::CreateProducer(_) => false,
            Self::Store(e) => e.is_retriable(),
            Self::Refused { .. } => false,
            Self::Produce { source, .. } => !is_permanent(source),
            Self::Rejected { first, .. } => !is_permanent(first),
            Self::Timeout { .. } => true,
            // A fenced producer (another instance took over its id) must not retry.
            Self::Transaction { source, .. } => !matches!(
                source,
                KafkaError::Transaction(e) if e.is_fatal()
            ),
        }
    }
}

/// Whether Kafka refusing a record with `e` is final: re-sending the same bytes to the same
/// topic gets the same answer (a record over a size limit, an invalid record or topic, no
/// authorisation). librdkafka reports an over-large record locally with the broker's code
/// (`MSG_SIZE_TOO_LARGE`) and does not retry any of these itself; treating them as retriable
/// made a restart re-send the entry from the outbox and fail again forever.
pub fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::MessageBatchTooLarge
                | C::InvalidRecord
                | C::InvalidTopic
                | C::InvalidRequiredAcks
                | C::UnsupportedForMessageFormat
                | C::PolicyViolation
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
        )
    )
}

/// librdkafka's default `message.max.bytes`, which [`OutboxProducer`] keeps unless
/// `--kafka-config` overrides it. (Apache Kafka's own default record-batch limit,
/// `max.message.bytes`, is 1,048,588, a little above it.)
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Framing counted per header (two varint lengths), generously.
const HEADER_OVERHEAD: usize = 10;

/// Header values above this many bytes are cut: an error text can quote the record's key,
/// which hostile input makes as long as it likes.
pub const MAX_HEADER_VALUE_BYTES: usize = 1024;

/// The size a dead letter (key + value + headers) may have with a producer whose
/// `message.max.bytes` is `message_max_bytes`: 1 % and 1 KiB below it. The margin covers the
/// record and batch framing librdkafka adds, and LZ4's worst-case expansion of incompressible
/// bytes, so a dead letter at the budget is accepted by the producer and by a broker whose
/// limit is at least the producer's.
pub fn dead_letter_budget(message_max_bytes: usize) -> usize {
    message_max_bytes.saturating_sub(message_max_bytes / 100 + 1024)
}

/// Key, value and headers of `e`, with per-header framing: what the size limits compare.
fn record_bytes(e: &OutboxEntry) -> usize {
    e.key.len()
        + e.value.len()
        + e.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + HEADER_OVERHEAD)
            .sum::<usize>()
}

/// Cuts `v` to at most `max` bytes, at a character boundary when it is UTF-8 text (header
/// values are documented as text).
fn truncate_text(v: &mut Vec<u8>, max: usize) {
    if v.len() <= max {
        return;
    }
    let cut = match std::str::from_utf8(v) {
        Ok(s) => (0..=max)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0),
        Err(_) => max,
    };
    v.truncate(cut);
}

/// Makes a dead letter fit in `max_bytes` (see [`dead_letter_budget`]), so that Kafka always
/// accepts it and a poison record never stalls its partition: header values are cut to
/// [`MAX_HEADER_VALUE_BYTES`]; a key over a quarter of the budget is cut to it (header
/// [`headers::TRUNCATED_KEY`] = its original length); then the value is cut to what is left
/// (header [`headers::TRUNCATED`] = its original length). The kept bytes are a prefix of the
/// original, enough to identify and inspect it; the source coordinates headers say where
/// the whole record still is. Deterministic and idempotent: a re-sent dead letter has the
/// same bytes. Returns whether anything was cut.
pub fn fit_dead_letter(e: &mut OutboxEntry, max_bytes: usize) -> bool {
    let mut cut = false;
    for (_, v) in &mut e.headers {
        if v.len() > MAX_HEADER_VALUE_BYTES {
            truncate_text(v, MAX_HEADER_VALUE_BYTES);
            cut = true;
        }
    }
    if record_bytes(e) <= max_bytes {
        return cut;
    }
    // Room for the markers pushed below (name, a 20-digit length, framing).
    let marker = |name: &str| name.len() + 20 + HEADER_OVERHEAD;
    let reserve = marker(headers::TRUNCATED) + marker(headers::TRUNCATED_KEY);
    let key_cap = max_bytes / 4;
    if e.key.len() > key_cap {
        let original = e.key.len();
        e.key.truncate(key_cap);
        e.headers.push((
            headers::TRUNCATED_KEY.into(),
            original.to_string().into_bytes(),
        ));
    }
    let fixed = record_bytes(e) - e.value.len() + reserve;
    let room = max_bytes.saturating_sub(fixed);
    if e.value.len() > room {
        let original = e.value.len();
        e.value.truncate(room);
        e.headers
            .push((headers::TRUNCATED.into(), original.to_string().into_bytes()));
    }
    true
}

/// Whether `e` is a dead letter (it carries a rejection reason): only dead letters may be
/// cut to fit, since they are for inspection and point at their source record; any other
/// output (a TreeMatured, an order) must arrive whole or not at all.
fn is_dead_letter(e: &OutboxEntry) -> bool {
    e.headers.iter().any(|(k, _)| k == headers::REASON)
}

/// A refused delivery: (outbox sequence, error, topic, payload bytes).
type Failure = (u64, KafkaError, String, usize);

/// Collects delivery reports: which outbox entries Kafka acknowledged.
#[derive(Default)]
pub struct DeliveryCtx {
    /// (outbox sequence, offset Kafka gave the record).
    acked: Mutex<Vec<(u64, i64)>>,
    failed: Mutex<Vec<Failure>>,
}

impl ClientContext for DeliveryCtx {
    /// Ignored: the processor reads librdkafka's statistics from its consumers, and a
    /// `statistics.interval.ms` given for them (`--kafka-config` goes to every client) would
    /// otherwise have rdkafka parse the producer's too and log them at info level.
    fn stats_raw(&self, _statistics: &[u8]) {}
}

impl ProducerContext for DeliveryCtx {
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: Box<u64>) {
        match result {
            Ok(m) => lock(&self.acked).push((*seq, m.offset())),
            Err((e, m)) => lock(&self.failed).push((
                *seq,
                e.clone(),
                m.topic().to_string(),
                m.payload_len() + m.key_len(),
            )),
        }
    }
}

/// Sends `record`, waiting while librdkafka's local queue is full (serving delivery reports
/// meanwhile, which is what drains it): the producers' shared backpressure. Any other error
/// is returned.
pub fn send_retrying<'a, C, K, P>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'a, K, P, C::DeliveryOpaque>,
) -> Result<(), KafkaError>
where
    C: ProducerContext,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// A poisoned lock only means another thread panicked mid-push; the Vec is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long [`OutboxProducer::settle`] sleeps when a poll brought no delivery report: short
/// against a batch's round trip (a few ms), long against the poll itself.
const REPORT_WAIT: Duration = Duration::from_micros(200);

/// An idempotent producer that empties an outbox.
pub struct OutboxProducer {
    producer: BaseProducer<DeliveryCtx>,
    /// How long one delivery waits for all its reports before giving up (the entries stay).
    pub timeout: Duration,
    in_flight: usize,
    /// Whether [`settle`](Self::settle) keeps the acknowledged (sequence, offset) pairs for
    /// [`take_acked_offsets`](Self::take_acked_offsets) (the processor records where its
    /// changelog checkpoints landed).
    pub track_offsets: bool,
    acked_offsets: Vec<(u64, i64)>,
    /// The producer's `message.max.bytes`, as configured (Forest's default or
    /// `--kafka-config`).
    message_max_bytes: usize,
    /// Dead letters larger than this are cut before they are produced (see
    /// [`fit_dead_letter`]); [`dead_letter_budget`] of `message.max.bytes` unless lowered
    /// (e.g. for a dead-letter topic whose `max.message.bytes` is below the producer's).
    pub dead_letter_max_bytes: usize,
}

impl OutboxProducer {
    /// Idempotent, acks=all, lz4; `overrides` (`--kafka-config`) win.
    pub fn new(brokers: &str, overrides: &[(String, String)]) -> Result<Self, DeliveryError> {
        let mut c = client_config(brokers, &[]);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            // 0 would save every batch these 5 ms (its outputs are sent together and then
            // awaited), but it splits them over several produce requests in flight, and with
            // that the mock cluster's broker-fault test lost or doubled an order (BENCHMARKS.md,
            // session 6; the same signature as pipelined delivery in the outbox section).
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "1000000")
            // Keyed outputs land in the partition the input producers use for that key (the
            // Java client's murmur2): the projection changelog must be partitioned like the
            // inputs, and trees keyed by user stay with their user.
            .set("partitioner", "murmur2_random");
        for (k, v) in overrides {
            c.set(k, v);
        }
        // librdkafka refuses a bad value when the producer is created, so an unparsable one
        // never gets this far with a working producer.
        let message_max_bytes = c
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        let producer = c
            .create_with_context(DeliveryCtx::default())
            .map_err(DeliveryError::CreateProducer)?;
        Ok(Self {
            producer,
            timeout: Duration::from_secs(120),
            in_flight: 0,
            track_offsets: false,
            acked_offsets: Vec::new(),
            message_max_bytes,
            dead_letter_max_bytes: dead_letter_budget(message_max_bytes),
        })
    }

    /// The producer's `message.max.bytes`: librdkafka refuses a larger record at once.
    pub fn message_max_bytes(&self) -> usize {
        self.message_max_bytes
    }

    /// A transactional producer (`transactional.id` = `id`): outputs are sent between
    /// [`begin`](Self::begin) and [`commit_transaction`](Self::commit_transaction), which also
    /// commits the consumer's offsets, so read_committed consumers see a batch's outputs
    /// exactly when its input offsets move. Initialising fences any earlier producer with the
    /// same id (a zombie of a crashed instance) and aborts its open transaction.
    /// `transaction.timeout.ms` is 10 s, so a transaction left open by a crashed instance with
    /// another id holds read_committed readers of its partitions back for at most that long.
    pub fn transactional(
        brokers: &str,
        overrides: &[(String, String)],
        id: &str,
    ) -> Result<Self, DeliveryError> {
        let mut o = vec![
            ("transactional.id".to_string(), id.to_string()),
            ("transaction.timeout.ms".to_string(), "10000".to_string()),
        ];
        o.extend(overrides.iter().cloned());
        let me = Self::new(brokers, &o)?;
        me.producer
            .init_transactions(Duration::from_secs(60))
            .map_err(|source| DeliveryError::Transaction { op: "init", source })?;
        Ok(me)
    }

    /// Starts a transaction (transactional producers only).
    pub fn begin(&self) -> Result<(), DeliveryError> {
        self.producer
            .begin_transaction()
            .map_err(|source| DeliveryError::Transaction {
                op: "begin",
                source,
            })
    }

    /// Adds the consumer's `offsets` to the open transaction and commits it, then collects
    /// the delivery reports of everything it carried. On any failure the transaction is
    /// aborted and the error returned: none of its outputs or offsets become visible.
    /// Returns how many outputs were delivered.
    pub fn commit_transaction(
        &mut self,
        offsets: &rdkafka::TopicPartitionList,
        group: &ConsumerGroupMetadata,
    ) -> Result<usize, DeliveryError> {
        let t = Duration::from_secs(60);
        let result = self
            .producer
            .send_offsets_to_transaction(offsets, group, t)
            .map_err(|source| DeliveryError::Transaction {
                op: "send offsets",
                source,
            })
            .and_then(|()| {
                self.producer
                    .commit_transaction(t)
                    .map_err(|source| DeliveryError::Transaction {
                        op: "commit",
                        source,
                    })
            });
        if let Err(e) = result {
            if let Err(abort) = self.producer.abort_transaction(t) {
                tracing::warn!(error = %abort, "aborting the failed transaction failed too");
            }
            // Reports of the aborted records: discard them.
            let _ = self.settle(None, 0);
            self.acked_offsets.clear();
            return Err(e);
        }
        self.settle(None, 0)
    }

    /// The (sequence, offset) pairs acknowledged since the last call, when
    /// [`track_offsets`](Self::track_offsets) is on.
    pub fn take_acked_offsets(&mut self) -> Vec<(u64, i64)> {
        std::mem::take(&mut self.acked_offsets)
    }

    /// Produces `entries`, serves delivery reports on this thread until each has one, and
    /// deletes the acknowledged entries from `store`. Blocking is the callers' backpressure.
    /// Returns how many were delivered (by this call and earlier [`send`](Self::send)s).
    pub fn deliver(
        &mut self,
        store: &Store,
        entries: &[(u64, OutboxEntry)],
    ) -> Result<usize, DeliveryError> {
        self.send(entries)?;
        self.settle(Some(store), 0)
    }

    /// Hands `entries` to the producer without waiting for Kafka: the caller goes on with its
    /// next batch while they are in flight, and later calls [`settle`](Self::settle). The
    /// entries stay in the outbox until acknowledged, so a crash meanwhile re-sends them.
    pub fn send(&mut self, entries: &[(u64, OutboxEntry)]) -> Result<(), DeliveryError> {
        for (seq, e) in entries {
            // Normally already cut by the service that wrote it; this also covers entries a
            // store of an older version holds, and a lowered limit.
            let e = if is_dead_letter(e) && record_bytes(e) > self.dead_letter_max_bytes {
                let mut cut = e.clone();
                fit_dead_letter(&mut cut, self.dead_letter_max_bytes);
                Cow::Owned(cut)
            } else {
                Cow::Borrowed(e)
            };
            let mut hdrs = OwnedHeaders::new_with_capacity(e.headers.len());
            for (k, v) in &e.headers {
                hdrs = hdrs.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut record = BaseRecord::with_opaque_to(&e.topic, Box::new(*seq))
                .key(&e.key)
                .payload(&e.value)
                .headers(hdrs);
            if let Some(p) = e.partition {
                record = record.partition(p);
            }
            send_retrying(&self.producer, record).map_err(|source| {
                if is_permanent(&source) {
                    DeliveryError::Refused {
                        topic: e.topic.clone(),
                        seq: *seq,
                        bytes: record_bytes(&e),
                        source,
                    }
                } else {
                    DeliveryError::Produce {
                        topic: e.topic.clone(),
                        source,
                    }
                }
            })?;
            self.in_flight += 1;
        }
        Ok(())
    }

    /// Outputs sent and not yet reported on.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Serves delivery reports until at most `max_in_flight` outputs await one, and deletes the
    /// acknowledged entries from `store`; any refused output is an error (it stays in the
    /// outbox). Returns how many were acknowledged. `settle(store, 0)` is a full flush.
    ///
    /// Reports are polled directly in 1 ms steps: rdkafka's `flush` waits in 100 ms steps,
    /// which cost most of a batch's time.
    /// `store` `None`: the entries were never in an outbox (an at-least-once baseline).
    pub fn settle(
        &mut self,
        store: Option<&Store>,
        max_in_flight: usize,
    ) -> Result<usize, DeliveryError> {
        let started = Instant::now();
        let ctx = self.producer.context();
        self.producer.poll(Duration::ZERO);
        let mut last = 0;
        loop {
            let reported = lock(&ctx.acked).len() + lock(&ctx.failed).len();
            if self.in_flight.saturating_sub(reported) <= max_in_flight {
                break;
            }
            if started.elapsed() >= self.timeout {
                return Err(DeliveryError::Timeout {
                    pending: self.in_flight - reported,
                    waited: self.timeout,
                });
            }
            // Not `poll(1 ms)`: rdkafka hands librdkafka the wait left rounded *down* to whole
            // milliseconds and loops until its deadline, so the last millisecond of every
            // `poll(d)` (all of `poll(1 ms)`) is a busy loop of clock reads. It was 8.8 % of
            // the processor's CPU in a profile (BENCHMARKS.md, session 6), taken from the
            // other worker and the broker on two cores. `poll(0)` serves one event without
            // waiting; when it brought nothing new, sleep briefly instead.
            if reported == last {
                std::thread::sleep(REPORT_WAIT);
            }
            last = reported;
            self.producer.poll(Duration::ZERO);
        }
        let acked: Vec<(u64, i64)> = std::mem::take(&mut *lock(&ctx.acked));
        let failed: Vec<Failure> = std::mem::take(&mut *lock(&ctx.failed));
        self.in_flight -= acked.len() + failed.len();
        let delivered = acked.len();
        if let Some(store) = store {
            store.remove_outbox(acked.iter().map(|&(seq, _)| seq))?;
        }
        if self.track_offsets {
            self.acked_offsets.extend(acked);
        }
        // A permanent refusal is reported as such: the caller must not retry it.
        if let Some((seq, source, topic, bytes)) = failed.iter().find(|f| is_permanent(&f.1)) {
            return Err(DeliveryError::Refused {
                topic: topic.clone(),
                seq: *seq,
                bytes: *bytes,
                source: source.clone(),
            });
        }
        if let Some((_, first, _, _)) = failed.first() {
            return Err(DeliveryError::Rejected {
                failed: failed.len(),
                first: first.clone(),
            });
        }
        Ok(delivered)
    }

    /// Delivers whatever a previous run left in the outbox. Call before consuming.
    pub fn deliver_leftovers(&mut self, store: &Store) -> Result<usize, DeliveryError> {
        let mut total = 0;
        loop {
            let entries = store.outbox(10_000)?;
            if entries.is_empty() {
                return Ok(total);
            }
            tracing::info!(
                entries = entries.len(),
                "delivering outputs left in the outbox by a previous run"
            );
            total += self.deliver(store, &entries)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_letter(key: Vec<u8>, value: Vec<u8>, error: &str) -> OutboxEntry {
        OutboxEntry {
            topic: "dlq".into(),
            key,
            value,
            headers: vec![
                (headers::REASON.into(), b"malformed".to_vec()),
                (headers::ERROR.into(), error.as_bytes().to_vec()),
                (headers::SOURCE_OFFSET.into(), b"7".to_vec()),
            ],
            partition: None,
        }
    }

    fn header<'a>(e: &'a OutboxEntry, name: &str) -> Option<&'a [u8]> {
        e.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    #[test]
    fn a_dead_letter_near_the_broker_limit_is_cut_below_the_producers() {
        let budget = dead_letter_budget(DEFAULT_MESSAGE_MAX_BYTES);
        assert!(
            budget < DEFAULT_MESSAGE_MAX_BYTES && budget > 900_000,
            "{budget}"
        );
        let value: Vec<u8> = (0..1_040_000u32).map(|i| (i % 251) as u8).collect();
        let mut e = dead_letter(b"user-1".to_vec(), value.clone(), "too big");
        assert!(fit_dead_letter(&mut e, budget));
        assert!(record_bytes(&e) <= budget, "{}", record_bytes(&e));
        assert!(value.starts_with(&e.value) && e.value.len() > budget - 1_000);
        assert_eq!(header(&e, headers::TRUNCATED), Some(&b"1040000"[..]));
        assert_eq!(header(&e, headers::TRUNCATED_KEY), None);
        assert_eq!(e.key, b"user-1");
        // Idempotent: a re-sent dead letter has the same bytes.
        let again = e.clone();
        assert!(!fit_dead_letter(&mut e, budget));
        assert_eq!(e, again);
    }

    #[test]
    fn huge_keys_and_error_texts_are_cut_too_and_small_records_are_left_alone() {
        let budget = 10_000;
        let mut small = dead_letter(b"k".to_vec(), vec![1; 100], "short");
        let before = small.clone();
        assert!(!fit_dead_letter(&mut small, budget));
        assert_eq!(small, before);

        // An error text quoting a huge key, with multi-byte characters at the cut.
        let error = "é".repeat(3_000);
        let mut e = dead_letter(vec![b'k'; 50_000], vec![2; 50_000], &error);
        assert!(fit_dead_letter(&mut e, budget));
        assert!(record_bytes(&e) <= budget, "{}", record_bytes(&e));
        assert_eq!(e.key.len(), budget / 4);
        assert_eq!(header(&e, headers::TRUNCATED_KEY), Some(&b"50000"[..]));
        assert_eq!(header(&e, headers::TRUNCATED), Some(&b"50000"[..]));
        let text = std::str::from_utf8(header(&e, headers::ERROR).unwrap()).unwrap();
        assert!(text.len() <= MAX_HEADER_VALUE_BYTES && text.starts_with("éé"));
    }

    #[test]
    fn size_and_validity_refusals_are_permanent_and_not_retriable() {
        use RDKafkaErrorCode as C;
        for code in [
            C::MessageSizeTooLarge,
            C::InvalidRecord,
            C::MessageBatchTooLarge,
        ] {
            let e = KafkaError::MessageProduction(code);
            assert!(is_permanent(&e), "{code:?}");
            let produce = DeliveryError::Produce {
                topic: "t".into(),
                source: e.clone(),
            };
            assert!(!produce.is_retriable(), "{produce}");
            let rejected = DeliveryError::Rejected {
                failed: 1,
                first: e,
            };
            assert!(!rejected.is_retriable());
        }
        for code in [
            C::NotLeaderForPartition,
            C::RequestTimedOut,
            C::MessageTimedOut,
            C::QueueFull,
        ] {
            let e = KafkaError::MessageProduction(code);
            assert!(!is_permanent(&e), "{code:?}");
            assert!(
                DeliveryError::Produce {
                    topic: "t".into(),
                    source: e
                }
                .is_retriable()
            );
        }
    }

    /// librdkafka refuses an over-large record locally, before any broker is involved: an
    /// output that is not a dead letter is refused for good, a dead letter is cut and sent.
    #[test]
    fn an_over_large_output_is_refused_for_good_and_a_dead_letter_is_cut_instead() {
        let mut p = OutboxProducer::new("127.0.0.1:1", &[]).unwrap();
        assert_eq!(p.message_max_bytes(), DEFAULT_MESSAGE_MAX_BYTES);
        let tree = OutboxEntry {
            topic: "trees".into(),
            key: b"u".to_vec(),
            value: vec![0; 1_040_000],
            headers: vec![],
            partition: None,
        };
        let err = p.send(&[(3, tree)]).unwrap_err();
        assert!(
            matches!(err, DeliveryError::Refused { seq: 3, .. }),
            "{err}"
        );
        assert!(!err.is_retriable());
        assert!(err.to_string().contains("message.max.bytes"), "{err}");
        assert_eq!(p.in_flight(), 0);
        let dl = dead_letter(b"u".to_vec(), vec![0; 1_040_000], "big");
        p.send(&[(4, dl)]).unwrap();
        assert_eq!(p.in_flight(), 1);
        let p = OutboxProducer::new(
            "127.0.0.1:1",
            &[("message.max.bytes".into(), "2000000".into())],
        )
        .unwrap();
        assert_eq!(p.dead_letter_max_bytes, dead_letter_budget(2_000_000));
    }
}
