//! Kafka plumbing shared by Forest's services: client configuration, the embedded broker
//! (librdkafka's mock cluster), topic creation on either broker, the dead-letter header names,
//! and the outbox producer (idempotent; deletes an outbox entry only once Kafka acknowledged
//! it).
//!
//! Forest talks real Kafka protocol to both brokers. The embedded one lives in this process on
//! loopback, so `forest demo` and the fast tests need nothing installed; the same code runs
//! against Apache Kafka when `--brokers` names one.

pub mod fetch;
pub mod health;
pub mod outbox;
mod read;

pub use fetch::{FetchQueue, Fetched, RouteError, Router};
pub use health::Health;
pub use outbox::{
    DEFAULT_MESSAGE_MAX_BYTES, DeliveryError, OutboxProducer, dead_letter_budget, fit_dead_letter,
    is_permanent, send_retrying,
};
pub use read::{
    ReadError, Record, Watermarks, end_offsets, group_committed, read_partition, read_topic,
    watermarks,
};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

/// Dead-letter record headers. Values are UTF-8 text.
pub mod headers {
    /// Stable rejection code, e.g. `malformed`, `too_late` (see `forest_domain::Rejection`).
    pub const REASON: &str = "forest.reason";
    /// Human-readable error text.
    pub const ERROR: &str = "forest.error";
    /// Where the rejected record was read from.
    pub const SOURCE_TOPIC: &str = "forest.source.topic";
    pub const SOURCE_PARTITION: &str = "forest.source.partition";
    pub const SOURCE_OFFSET: &str = "forest.source.offset";
    /// Present when the dead letter's value was cut to fit Kafka's record size limit: the
    /// original value's length in bytes. The value is then a prefix of the original.
    pub const TRUNCATED: &str = "forest.truncated";
    /// Like [`TRUNCATED`], for the key (only keys far beyond any user id's limit are cut).
    pub const TRUNCATED_KEY: &str = "forest.truncated.key";
}

/// A broker set-up step that failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot start the embedded broker: {0}")]
    Embedded(KafkaError),
    #[error("cannot create Kafka client for {brokers}: {source}")]
    Client { brokers: String, source: KafkaError },
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
}

impl SetupError {
    /// Topic creation and client creation can fail while a broker is still starting.
    pub fn is_retriable(&self) -> bool {
        !matches!(self, Self::Embedded(_))
    }
}

/// librdkafka's in-process mock cluster, listening on loopback.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedBroker {
    pub fn start(brokers: i32) -> Result<Self, SetupError> {
        Ok(Self {
            cluster: MockCluster::new(brokers).map_err(SetupError::Embedded)?,
        })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// For fault injection in tests: broker down/up, request errors, round-trip delays.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}

/// A client configuration for `brokers` with Forest's defaults, then the caller's overrides
/// (`--kafka-config key=value`), which win.
pub fn client_config(brokers: &str, overrides: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    // Loopback and CI machines: fail fast on a dead broker rather than hang for minutes.
    c.set("socket.connection.setup.timeout.ms", "10000");
    for (k, v) in overrides {
        c.set(k, v);
    }
    c
}

/// Applies `--kafka-config key=value` overrides after a service's own settings, so they win.
pub trait ClientConfigExt {
    fn set_all(&mut self, kv: &[(String, String)]) -> &mut Self;

    /// Settings every Forest consumer needs whatever it reads (call before the service's own
    /// settings and the overrides, which win).
    ///
    /// `fetch.queue.backoff.ms` 10 (librdkafka's default is 1000): once a partition's
    /// prefetched records pass `queued.min.messages` or the queue passes
    /// `queued.max.messages.kbytes`, librdkafka postpones that partition's next fetch by this
    /// long. A consumer reading a backlog faster than that empties its queue well within the
    /// second and then sits idle: with the default, a plain consumer read a 1 M-event backlog
    /// on Apache Kafka at 200-255 K events/s, and at 1.07 M events/s with 10 ms
    /// (BENCHMARKS.md, session 9).
    ///
    /// `fetch.wait.max.ms` 10 (default 500): how long the broker may hold a fetch that found
    /// nothing. Forest's consumers wait on it in latency-sensitive places: a batch window of a
    /// few ms, and a restore that is done only at the end-of-partition event, which comes with
    /// an empty fetch (the default wait was most of a restore's time in transactions mode).
    fn consumer_defaults(&mut self) -> &mut Self;
}

impl ClientConfigExt for ClientConfig {
    fn set_all(&mut self, kv: &[(String, String)]) -> &mut Self {
        for (k, v) in kv {
            self.set(k, v);
        }
        self
    }

    fn consumer_defaults(&mut self) -> &mut Self {
        self.set("fetch.queue.backoff.ms", "10")
            .set("fetch.wait.max.ms", "10")
    }
}

/// Name suffix of the projection changelog topic (`forest_proto::topics::CHANGELOG`), which
/// [`ensure_topics`] creates compacted.
pub const CHANGELOG_SUFFIX: &str = "forest.projections-changelog.v1";

/// Creates topics that do not exist yet. On the embedded broker this uses the mock cluster's
/// own call (it has no CreateTopics API); on a real broker, the admin API with replication 1
/// unless `replication` says otherwise.
pub fn ensure_topics(
    embedded: Option<&EmbeddedBroker>,
    brokers: &str,
    overrides: &[(String, String)],
    topics: &[(&str, i32)],
    replication: i32,
) -> Result<(), SetupError> {
    if let Some(e) = embedded {
        for (name, partitions) in topics {
            e.cluster
                .create_topic(name, *partitions, 1)
                .map_err(|err| SetupError::CreateTopic {
                    topic: name.to_string(),
                    reason: err.to_string(),
                })?;
        }
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(brokers, overrides)
        .create()
        .map_err(|source| SetupError::Client {
            brokers: brokers.into(),
            source,
        })?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(n, p)| {
            let t = NewTopic::new(n, *p, TopicReplication::Fixed(replication));
            // The projection changelog keeps the latest state per user: compacted, never
            // deleted by time.
            if n.ends_with(CHANGELOG_SUFFIX) {
                t.set("cleanup.policy", "compact")
            } else {
                t
            }
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SetupError::CreateTopic {
            topic: "*".into(),
            reason: format!("runtime: {e}"),
        })?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results =
        rt.block_on(admin.create_topics(&new, &opts))
            .map_err(|e| SetupError::CreateTopic {
                topic: "*".into(),
                reason: e.to_string(),
            })?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(SetupError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Logs a warning when a service starts on a new store (`is_new`) although its consumer group
/// has committed offsets on its inputs: the data directory was lost, `--store` points at the
/// wrong place, or this is a new replica taking over partitions. The service still starts and
/// rebuilds its partitions' state from the start of the input log (which needs the inputs'
/// full history); the warning makes the cause visible. Best effort: a broker that does not
/// answer within 5 s skips the check.
pub fn warn_if_new_store_but_group_progressed(
    is_new: bool,
    store: &std::path::Path,
    brokers: &str,
    group: &str,
    inputs: &[&str],
) {
    if !is_new {
        return;
    }
    match group_committed(brokers, group, inputs, Duration::from_secs(5)) {
        Ok(committed) => {
            if let Some((t, p, o)) = committed.iter().find(|(_, _, o)| *o > 0) {
                tracing::warn!(
                    store = %store.display(),
                    group,
                    example = format!("{t}/{p} at {o}"),
                    partitions = committed.len(),
                    "the store is new but the consumer group has committed offsets: the data directory was lost, --store points at the wrong place, or this is a new replica; its partitions are rebuilt from the start of the input log"
                );
            }
        }
        Err(e) => tracing::debug!(error = %e, "could not read the group's committed offsets"),
    }
}

/// The partition a keyed record lands in among `partitions`, computed by librdkafka's own
/// `murmur2_random` partitioner (the Java client's default for keyed records), which is what
/// Forest's producers use: the processor uses it to tell which stored users belong to a
/// partition it no longer owns. `None` if `partitions` is not positive.
pub fn partition_of(key: &[u8], partitions: i32) -> Option<i32> {
    if partitions <= 0 {
        return None;
    }
    // SAFETY: for a non-null key the partitioner only hashes `keylen` bytes at `key` (a
    // slice's pointer is never null, even when empty) and never touches the topic or opaque
    // pointers.
    let p = unsafe {
        rdkafka::bindings::rd_kafka_msg_partitioner_murmur2_random(
            std::ptr::null(),
            key.as_ptr().cast(),
            key.len(),
            partitions,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    Some(p)
}

#[cfg(test)]
mod partition_tests {
    use super::partition_of;

    #[test]
    fn partitions_match_the_java_clients_murmur2() {
        // Apache Kafka's UtilsTest.testMurmur2 vectors (Utils.murmur2); the Java partitioner
        // takes the hash's low 31 bits modulo the partition count, so with i32::MAX
        // partitions the partition is the masked hash itself.
        for (key, hash) in [
            (&b"21"[..], -973932308i32),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ] {
            let want = (hash & 0x7fff_ffff) % i32::MAX;
            assert_eq!(partition_of(key, i32::MAX), Some(want), "{key:?}");
            assert_eq!(partition_of(key, 12), Some((hash & 0x7fff_ffff) % 12));
        }
        assert_eq!(partition_of(b"x", 0), None);
    }
}
