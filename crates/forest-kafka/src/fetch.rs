//! Reading a consumer's fetched records many at a time.
//!
//! Why: rust-rdkafka's `BaseConsumer::poll` returns one record per call, and each call is a
//! queue lock, four clock reads, an event wrapper and an `Arc` allocation and free. In the
//! processor's profile that was 12-16 % of all CPU at 600 K records/s, more than the
//! protobuf decode. librdkafka's `rd_kafka_consume_batch_queue` takes a whole batch per call;
//! rust-rdkafka does not wrap it, so this module does, with the unsafe code kept here.
//!
//! How: [`Router::route`] forwards a partition's fetch queue to a queue of ours, and
//! [`FetchQueue::poll`] reads that in batches. Everything else (rebalances, offset commit
//! results, errors, statistics) stays on the consumer's own queue, which the caller must still
//! poll (`BaseConsumer::poll`): that is where the rebalance callback runs.
//!
//! Routing rules, from librdkafka 2.12's queue code (the unit test below pins them):
//! - Route a partition in the rebalance callback, before `assign`: fetching starts inside
//!   `assign`, and records fetched before the routing would go to the consumer queue, where
//!   they could be read after later records of the same partition.
//! - Route it again on every assignment: stopping a partition's fetching (revoke, unassign)
//!   drops its routing, and a partition routed once no longer goes to the consumer queue by
//!   itself, so an unrouted one stalls.
//! - Records fetched before a revoke or a seek are discarded by librdkafka itself (its
//!   per-partition op version), whichever queue holds them.
//! - A routed partition's records are lost once the [`FetchQueue`] is dropped: drop it only
//!   when the consumer stops reading.

use rdkafka::bindings as rd;
use rdkafka::client::{Client, ClientContext};
use rdkafka::types::RDKafkaErrorCode;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Routing a partition to a [`FetchQueue`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The queue was dropped (the consumer is closing).
    #[error("the batch queue is closed")]
    Closed,
    #[error("librdkafka has no handle for partition {partition} of {topic}")]
    NoPartition { topic: String, partition: i32 },
}

impl RouteError {
    /// Neither goes away by retrying: the queue stays closed, and librdkafka refuses a
    /// partition handle only to a non-consumer client.
    pub fn is_retriable(&self) -> bool {
        false
    }
}

/// The queue's handles, shared with [`Router`]s; `None` once the queue is dropped.
struct Target {
    queue: NonNull<rd::rd_kafka_queue_t>,
    rk: NonNull<rd::rd_kafka_t>,
}

// SAFETY: librdkafka's client and queue handles may be used from any thread.
unsafe impl Send for Target {}

/// Routes partitions to a [`FetchQueue`] from wherever the rebalance callback runs. Cheap to
/// clone; does nothing (`RouteError::Closed`) once the queue is dropped.
#[derive(Clone)]
pub struct Router {
    target: Arc<Mutex<Option<Target>>>,
}

/// A queue that assigned partitions' fetched records are routed to, read in batches. Borrows
/// the client so that it is destroyed before the client is.
pub struct FetchQueue<'c> {
    queue: NonNull<rd::rd_kafka_queue_t>,
    router: Router,
    /// Message pointers of the batch being read (kept to reuse the allocation).
    batch: Vec<*mut rd::rd_kafka_message_t>,
    _client: PhantomData<&'c ()>,
}

/// One record, or a per-partition consumer error, as librdkafka delivered it. Valid only
/// inside the [`FetchQueue::poll`] callback.
pub struct Fetched<'m> {
    msg: &'m rd::rd_kafka_message_t,
}

impl<'c> FetchQueue<'c> {
    /// A new, empty queue on `client`'s handle. `None` if librdkafka could not make one.
    pub fn new<C: ClientContext>(client: &'c Client<C>) -> Option<Self> {
        let rk = NonNull::new(client.native_ptr())?;
        // SAFETY: `rk` is a live client handle for as long as `'c`; the queue is destroyed in
        // `Drop`, within that lifetime.
        let queue = NonNull::new(unsafe { rd::rd_kafka_queue_new(rk.as_ptr()) })?;
        Some(Self {
            queue,
            router: Router {
                target: Arc::new(Mutex::new(Some(Target { queue, rk }))),
            },
            batch: Vec::new(),
            _client: PhantomData,
        })
    }

    /// A handle that routes partitions here (for the rebalance callback).
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Hands up to `max` queued records to `on_record`, in queue order (each partition's in
    /// offset order), and returns how many it handed. With a non-zero `timeout` it waits that
    /// long for the first record if none is queued; it never waits for more once it has one.
    pub fn poll(
        &mut self,
        timeout: Duration,
        max: usize,
        mut on_record: impl FnMut(Fetched<'_>),
    ) -> usize {
        if max == 0 {
            return 0;
        }
        let mut n = self.read(0, max, &mut on_record);
        if n == 0 && !timeout.is_zero() {
            // librdkafka's batch call waits until the batch is full or the timeout passes, so
            // wait for one record, then take what else is queued without waiting.
            let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
            n = self.read(ms, 1, &mut on_record);
            if n > 0 {
                n += self.read(0, max - 1, &mut on_record);
            }
        }
        n
    }

    fn read(
        &mut self,
        timeout_ms: i32,
        max: usize,
        on_record: &mut impl FnMut(Fetched<'_>),
    ) -> usize {
        if max == 0 {
            return 0;
        }
        self.batch.clear();
        self.batch.reserve(max);
        // SAFETY: the array has room for `max` pointers; librdkafka writes at most that many
        // and returns how many (or -1 on error, when it writes none).
        let got = unsafe {
            rd::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                timeout_ms,
                self.batch.as_mut_ptr(),
                max,
            )
        };
        let got = usize::try_from(got).unwrap_or(0).min(max);
        // SAFETY: librdkafka initialised the first `got` entries.
        unsafe { self.batch.set_len(got) };
        // Every message is destroyed exactly once, the one being handed over included, even
        // if `on_record` panics.
        struct Destroy<'a> {
            batch: &'a [*mut rd::rd_kafka_message_t],
            next: usize,
        }
        impl Drop for Destroy<'_> {
            fn drop(&mut self) {
                for &m in &self.batch[self.next..] {
                    if !m.is_null() {
                        // SAFETY: each pointer came from the batch call; `next` moves past a
                        // pointer before it is destroyed, so none is destroyed twice.
                        unsafe { rd::rd_kafka_message_destroy(m) };
                    }
                }
            }
        }
        let mut guard = Destroy {
            batch: &self.batch,
            next: 0,
        };
        while let Some(&m) = guard.batch.get(guard.next) {
            // SAFETY: a non-null message from librdkafka stays valid until destroyed, which
            // happens after the callback (the callback cannot keep `Fetched`).
            if let Some(msg) = unsafe { m.as_ref() } {
                on_record(Fetched { msg });
            }
            guard.next += 1;
            if !m.is_null() {
                // SAFETY: as in `Destroy`.
                unsafe { rd::rd_kafka_message_destroy(m) };
            }
        }
        got
    }
}

impl Drop for FetchQueue<'_> {
    fn drop(&mut self) {
        // Routers stop using the queue first (under their lock), then it is destroyed.
        *self
            .router
            .target
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        // SAFETY: created in `new` and destroyed once; the client is still live (`'c`).
        // Partitions still forwarding here hold their own references; librdkafka discards
        // what they forward once the owner is gone.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

impl Router {
    /// Routes `partition` of `topic` to the queue: its records fetched from now on (and those
    /// it holds and has not handed to the consumer queue) are read with [`FetchQueue::poll`].
    /// Idempotent. See the module's routing rules for when to call it.
    pub fn route(&self, topic: &CStr, partition: i32) -> Result<(), RouteError> {
        let target = self.target.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(t) = target.as_ref() else {
            return Err(RouteError::Closed);
        };
        // SAFETY: while the target is set, the queue and (through the queue's borrow) the
        // client are live, and the lock keeps the queue from being destroyed meanwhile. The
        // topic is NUL-terminated. The partition queue handle is a reference-counted view of
        // the partition's fetch queue, released right after forwarding (the forward keeps its
        // own reference to our queue).
        unsafe {
            let part = rd::rd_kafka_queue_get_partition(t.rk.as_ptr(), topic.as_ptr(), partition);
            if part.is_null() {
                return Err(RouteError::NoPartition {
                    topic: topic.to_string_lossy().into_owned(),
                    partition,
                });
            }
            rd::rd_kafka_queue_forward(part, t.queue.as_ptr());
            rd::rd_kafka_queue_destroy(part);
        }
        Ok(())
    }
}

impl<'m> Fetched<'m> {
    /// `Some` for a consumer error librdkafka reports on this partition instead of a record
    /// (the text is librdkafka's).
    pub fn error(&self) -> Option<(RDKafkaErrorCode, String)> {
        if self.msg.err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        let text = self
            .payload()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        Some((self.msg.err.into(), text))
    }

    /// The topic's name (empty if librdkafka gave none).
    pub fn topic(&self) -> &'m [u8] {
        if self.msg.rkt.is_null() {
            return b"";
        }
        // SAFETY: a message's topic handle lives as long as the message; its name is a
        // NUL-terminated string owned by the handle.
        unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(self.msg.rkt)) }.to_bytes()
    }

    pub fn partition(&self) -> i32 {
        self.msg.partition
    }

    pub fn offset(&self) -> i64 {
        self.msg.offset
    }

    /// The record's timestamp, ms; `None` if it has none (as rust-rdkafka's
    /// `Timestamp::to_millis`).
    pub fn timestamp(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: reads the message and writes the out-parameter only.
        let ts = unsafe { rd::rd_kafka_message_timestamp(self.msg, &mut kind) };
        (ts != -1 && kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE)
            .then_some(ts)
    }

    pub fn key(&self) -> Option<&'m [u8]> {
        // SAFETY: librdkafka's key pointer and length describe one buffer owned by the
        // message.
        (!self.msg.key.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(self.msg.key.cast(), self.msg.key_len) })
    }

    pub fn payload(&self) -> Option<&'m [u8]> {
        // SAFETY: as for the key.
        (!self.msg.payload.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(self.msg.payload.cast(), self.msg.len) })
    }
}

#[cfg(test)]
mod tests {
    use super::FetchQueue;
    use crate::{ClientConfigExt, EmbeddedBroker, client_config};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{Offset, TopicPartitionList};
    use std::collections::BTreeMap;
    use std::ffi::CString;
    use std::time::{Duration, Instant};

    /// (partition, offset, key, payload, timestamp) of what a consumer read.
    type Got = Vec<(i32, i64, Vec<u8>, Vec<u8>, Option<i64>)>;

    /// Reads `want` records: the consumer queue first (records fetched before routing), then
    /// the batch queue, as the processor does.
    fn read(consumer: &BaseConsumer, fetch: &mut FetchQueue<'_>, want: usize) -> Got {
        let mut got = Got::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < want {
            assert!(Instant::now() < deadline, "read {} of {want}", got.len());
            while let Some(m) = consumer.poll(Duration::ZERO) {
                let m = m.expect("no consumer error");
                got.push((
                    m.partition(),
                    m.offset(),
                    m.key().unwrap_or_default().to_vec(),
                    m.payload().unwrap_or_default().to_vec(),
                    m.timestamp().to_millis(),
                ));
            }
            // Small batches, so a round takes several calls.
            fetch.poll(Duration::from_millis(100), 7, |r| {
                assert!(r.error().is_none(), "{:?}", r.error());
                assert_eq!(r.topic(), b"fetch-t");
                got.push((
                    r.partition(),
                    r.offset(),
                    r.key().unwrap_or_default().to_vec(),
                    r.payload().unwrap_or_default().to_vec(),
                    r.timestamp(),
                ));
            });
        }
        got
    }

    /// Checks each partition's records are consecutive from `from[p]`, in order, with the
    /// key, value and timestamp they were produced with.
    fn check(got: &Got, from: &BTreeMap<i32, i64>, count: i64) {
        let mut next = from.clone();
        for (p, o, k, v, ts) in got {
            let want = next.get_mut(p).expect("only routed partitions' records");
            assert_eq!(*o, *want, "partition {p} in offset order, no gap or repeat");
            *want += 1;
            let i = o * 3 + i64::from(*p);
            assert_eq!(k, format!("k{i}").as_bytes());
            assert_eq!(v, format!("v{i}").as_bytes());
            assert_eq!(*ts, Some(1_700_000_000_000 + i));
        }
        for (p, o) in next {
            assert_eq!(o, count, "partition {p} read to its end");
        }
    }

    #[test]
    fn routed_partitions_are_read_in_batches_in_offset_order_and_again_after_reassignment() {
        let broker = EmbeddedBroker::start(1).expect("mock cluster");
        broker
            .cluster()
            .create_topic("fetch-t", 3, 1)
            .expect("topic");
        let brokers = broker.bootstrap_servers();
        let producer: BaseProducer = client_config(&brokers, &[]).create().expect("producer");
        let per_partition = 100i64;
        for i in 0..per_partition * 3 {
            let (k, v) = (format!("k{i}"), format!("v{i}"));
            producer
                .send(
                    BaseRecord::to("fetch-t")
                        .partition((i % 3) as i32)
                        .key(&k)
                        .payload(&v)
                        .timestamp(1_700_000_000_000 + i),
                )
                .expect("queued");
        }
        producer.flush(Duration::from_secs(10)).expect("flushed");

        let consumer: BaseConsumer = client_config(&brokers, &[])
            .consumer_defaults()
            .set("group.id", "fetch-test")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut fetch = FetchQueue::new(consumer.client()).expect("queue");
        let router = fetch.router();
        let topic = CString::new("fetch-t").expect("no NUL");

        // Each partition is routed before the assignment, as the processor's rebalance
        // callback does.
        let assign = |parts: &[(i32, Offset)]| {
            let mut tpl = TopicPartitionList::new();
            for &(p, from) in parts {
                tpl.add_partition_offset("fetch-t", p, from).expect("tpl");
                router.route(&topic, p).expect("routed");
            }
            consumer.assign(&tpl).expect("assign");
        };

        // Partitions 0 and 1 from the start.
        assign(&[(0, Offset::Beginning), (1, Offset::Beginning)]);
        let got = read(&consumer, &mut fetch, 200);
        check(&got, &BTreeMap::from([(0, 0), (1, 0)]), per_partition);
        assert_eq!(got.len(), 200);

        // A new assignment: partition 0 again from the middle, and partition 2. Stopping a
        // partition dropped its routing, and a partition once routed no longer goes to the
        // consumer queue by itself: without routing again, partition 0 would stall.
        consumer.unassign().expect("unassign");
        // Stopping is asynchronous (a group member's next assignment waits for it; here, a
        // second is ample), and a stop landing after the routing below would undo it.
        std::thread::sleep(Duration::from_secs(1));
        assign(&[(0, Offset::Offset(40)), (2, Offset::Offset(70))]);
        let got = read(&consumer, &mut fetch, 90);
        check(&got, &BTreeMap::from([(0, 40), (2, 70)]), per_partition);
        assert_eq!(got.len(), 90);
        // Nothing more arrives.
        assert_eq!(fetch.poll(Duration::from_millis(300), 10, |_| {}), 0);
        assert!(consumer.poll(Duration::ZERO).is_none());

        // Once the queue is gone, routing says so.
        drop(fetch);
        assert!(matches!(
            router.route(&topic, 1),
            Err(super::RouteError::Closed)
        ));
    }
}
