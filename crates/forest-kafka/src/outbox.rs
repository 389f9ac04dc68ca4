//! Delivers a service's RocksDB outbox to Kafka, for the processor and fulfilment alike.
//!
//! Why here: both services write outputs into the outbox in the same RocksDB batch as their
//! state and offsets, then need the same thing: produce them with an idempotent producer, wait
//! until Kafka acknowledged each one, and delete exactly the acknowledged entries. An entry
//! Kafka did not acknowledge stays in the outbox and is re-sent by the next run, with the same
//! bytes, so downstream dedupes it by the id it carries.

use crate::client_config;
use forest_store::{OutboxEntry, Store, StoreError};
use rdkafka::ClientContext;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
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
            Self::Produce { .. } | Self::Timeout { .. } | Self::Rejected { .. } => true,
            // A fenced producer (another instance took over its id) must not retry.
            Self::Transaction { source, .. } => !matches!(
                source,
                KafkaError::Transaction(e) if e.is_fatal()
            ),
        }
    }
}

/// Collects delivery reports: which outbox entries Kafka acknowledged.
#[derive(Default)]
pub struct DeliveryCtx {
    /// (outbox sequence, offset Kafka gave the record).
    acked: Mutex<Vec<(u64, i64)>>,
    failed: Mutex<Vec<(u64, KafkaError)>>,
}

impl ClientContext for DeliveryCtx {}

impl ProducerContext for DeliveryCtx {
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: Box<u64>) {
        match result {
            Ok(m) => lock(&self.acked).push((*seq, m.offset())),
            Err((e, _)) => lock(&self.failed).push((*seq, e.clone())),
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
}

impl OutboxProducer {
    /// Idempotent, acks=all, lz4; `overrides` (`--kafka-config`) win.
    pub fn new(brokers: &str, overrides: &[(String, String)]) -> Result<Self, DeliveryError> {
        let mut c = client_config(brokers, &[]);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
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
        let producer = c
            .create_with_context(DeliveryCtx::default())
            .map_err(DeliveryError::CreateProducer)?;
        Ok(Self {
            producer,
            timeout: Duration::from_secs(120),
            in_flight: 0,
            track_offsets: false,
            acked_offsets: Vec::new(),
        })
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
            send_retrying(&self.producer, record).map_err(|source| DeliveryError::Produce {
                topic: e.topic.clone(),
                source,
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
            self.producer.poll(Duration::from_millis(1));
        }
        let acked: Vec<(u64, i64)> = std::mem::take(&mut *lock(&ctx.acked));
        let failed: Vec<(u64, KafkaError)> = std::mem::take(&mut *lock(&ctx.failed));
        self.in_flight -= acked.len() + failed.len();
        let delivered = acked.len();
        if let Some(store) = store {
            store.remove_outbox(acked.iter().map(|&(seq, _)| seq))?;
        }
        if self.track_offsets {
            self.acked_offsets.extend(acked);
        }
        if let Some((_, first)) = failed.first() {
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
