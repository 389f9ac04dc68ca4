//! Reading a whole topic back, for checks: the demo's summary, `forest rebuild`, the tests.

use crate::{ClientConfigExt, client_config};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A record read back.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    /// Record timestamp (ms), if the record has one.
    pub timestamp: Option<i64>,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("kafka {op} on {topic} failed: {source}")]
    Kafka {
        op: &'static str,
        topic: String,
        source: KafkaError,
    },
    #[error("topic {0} does not exist")]
    NoTopic(String),
    #[error("reading {topic} timed out after {waited:?} at {read} of {want} records")]
    Timeout {
        topic: String,
        waited: Duration,
        read: usize,
        want: i64,
    },
}

impl ReadError {
    /// A broker that is slow or briefly away may answer a retry.
    pub fn is_retriable(&self) -> bool {
        !matches!(self, Self::NoTopic(_))
    }
}

/// The current end offset (high watermark) of every partition of `topic`.
pub fn end_offsets(brokers: &str, topic: &str) -> Result<BTreeMap<i32, i64>, ReadError> {
    Watermarks::new(brokers)?.ends(topic)
}

/// A consumer for metadata and offset queries under `group` (it never commits).
/// Read_uncommitted, so that end offsets are high watermarks (not last stable offsets) and
/// committed offsets are answered at once, not after a pending transaction settles.
fn reader(brokers: &str, group: &str) -> Result<BaseConsumer, ReadError> {
    client_config(brokers, &[])
        .set("group.id", group)
        .set("isolation.level", "read_uncommitted")
        .create()
        .map_err(|source| ReadError::Kafka {
            op: "create consumer",
            topic: String::new(),
            source,
        })
}

/// The offsets consumer group `group` has committed on the partitions of `topics` (those
/// with a committed offset only): what lag tools see. Used at start-up to notice a store that
/// is new although the group has already made progress.
pub fn group_committed(
    brokers: &str,
    group: &str,
    topics: &[&str],
    timeout: Duration,
) -> Result<Vec<(String, i32, i64)>, ReadError> {
    use rdkafka::TopicPartitionList;
    let consumer = reader(brokers, group)?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..partition_count(&consumer, t)? {
            tpl.add_partition(t, p);
        }
    }
    let got = consumer
        .committed_offsets(tpl, timeout)
        .map_err(|source| ReadError::Kafka {
            op: "fetch committed offsets",
            topic: topics.join(","),
            source,
        })?;
    Ok(got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some((e.topic().to_string(), e.partition(), o)),
            _ => None,
        })
        .collect())
}

/// One client for repeated watermark queries (a progress loop), instead of a new client
/// per query.
pub struct Watermarks {
    consumer: BaseConsumer,
}

impl Watermarks {
    pub fn new(brokers: &str) -> Result<Self, ReadError> {
        Ok(Self {
            consumer: reader(brokers, "forest-reader")?,
        })
    }

    /// End offset of every partition of `topic`.
    pub fn ends(&self, topic: &str) -> Result<BTreeMap<i32, i64>, ReadError> {
        Ok(marks(&self.consumer, topic)?
            .into_iter()
            .map(|(p, (_, high))| (p, high))
            .collect())
    }
}

/// (log start, end) offsets of every partition of `topic`. The start is above 0 once
/// retention deleted old records (the embedded broker keeps a bounded log per partition).
pub fn watermarks(brokers: &str, topic: &str) -> Result<BTreeMap<i32, (i64, i64)>, ReadError> {
    marks(&Watermarks::new(brokers)?.consumer, topic)
}

/// Turns a client error of operation `op` on `topic` into a [`ReadError`].
fn kafka_err<'t>(op: &'static str, topic: &'t str) -> impl Fn(KafkaError) -> ReadError + 't {
    move |source| ReadError::Kafka {
        op,
        topic: topic.to_string(),
        source,
    }
}

/// How many partitions `topic` has, from the broker's metadata.
fn partition_count<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Result<i32, ReadError> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .map_err(kafka_err("fetch metadata", topic))?;
    md.topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .and_then(|t| i32::try_from(t.partitions().len()).ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| ReadError::NoTopic(topic.into()))
}

fn marks<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Result<BTreeMap<i32, (i64, i64)>, ReadError> {
    let err = |op| kafka_err(op, topic);
    let partitions = partition_count(consumer, topic)?;
    // A topic created a moment ago can answer "not leader" until its leader is elected,
    // longer on a busy broker (seen with the broker held to one CPU: `forest bench
    // --load-core`); so does a partition during a leader failover. Waited out for up to 30 s
    // in all, by the processor at start-up and on assignment, the tools and the tests.
    let deadline = Instant::now() + Duration::from_secs(30);
    (0..partitions)
        .map(|p| {
            loop {
                match consumer.fetch_watermarks(topic, p, Duration::from_secs(30)) {
                    Ok(marks) => return Ok((p, marks)),
                    Err(e) if leader_pending(&e) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => return Err(err("fetch watermarks")(e)),
                }
            }
        })
        .collect()
}

/// Whether a partition's error is the broker still electing its leader (a new topic, or a
/// failover).
fn leader_pending(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::NotLeaderForPartition | C::LeaderNotAvailable | C::UnknownTopicOrPartition)
    )
}

/// A reader's context: the end-of-partition events it asks for are how it knows it is done,
/// not errors to log (rdkafka's default context logs every client error at ERROR level).
struct EofIsNotAnError;

impl rdkafka::ClientContext for EofIsNotAnError {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EofIsNotAnError {}

/// Reads every record of `topic` from the beginning to its end offsets at the time of the
/// call. Read_committed (librdkafka's default, set explicitly): records of aborted or still
/// open transactions are skipped, and a partition whose end is a transaction marker (which is
/// never delivered as a record) counts as read once the consumer reports reaching its end.
pub fn read_topic(brokers: &str, topic: &str, timeout: Duration) -> Result<Vec<Record>, ReadError> {
    read_from(brokers, topic, None, timeout, &mut |_, _| {})
}

/// Reads one partition of `topic` from its beginning to its current end (e.g. restoring state
/// from a changelog partition). `progress(read, end)` is called every 10,000 records and at
/// the end, with the records read so far and the end offset being read up to.
pub fn read_partition(
    brokers: &str,
    topic: &str,
    partition: i32,
    timeout: Duration,
    progress: &mut dyn FnMut(usize, i64),
) -> Result<Vec<Record>, ReadError> {
    read_from(brokers, topic, Some(partition), timeout, progress)
}

fn read_from(
    brokers: &str,
    topic: &str,
    only: Option<i32>,
    timeout: Duration,
    progress: &mut dyn FnMut(usize, i64),
) -> Result<Vec<Record>, ReadError> {
    let err = |op| kafka_err(op, topic);
    let consumer: BaseConsumer<EofIsNotAnError> = client_config(brokers, &[])
        .consumer_defaults()
        .set("group.id", "forest-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        // A partition that ends in a transaction marker is done only at the end-of-partition
        // event, which comes with a fetch that found nothing (`consumer_defaults` keeps that
        // fetch's wait short).
        .set("enable.partition.eof", "true")
        .create_with_context(EofIsNotAnError)
        .map_err(err("create consumer"))?;
    let ends: BTreeMap<i32, i64> = marks(&consumer, topic)?
        .into_iter()
        .map(|(p, (_, high))| (p, high))
        .filter(|(p, _)| only.is_none_or(|o| o == *p))
        .collect();
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(err("assign"))?;
    }
    consumer.assign(&tpl).map_err(err("assign"))?;
    let want: i64 = ends.values().sum();
    let mut pos: BTreeMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
    let mut out = Vec::new();
    let start = Instant::now();
    while pos.iter().any(|(p, o)| *o < ends[p]) {
        if start.elapsed() > timeout {
            return Err(ReadError::Timeout {
                topic: topic.into(),
                waited: timeout,
                read: out.len(),
                want,
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                if m.offset() >= ends[&m.partition()] {
                    continue;
                }
                pos.insert(m.partition(), m.offset() + 1);
                if out.len() % 10_000 == 9_999 {
                    progress(out.len() + 1, want);
                }
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis(),
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // Everything below the end offsets was delivered, or is a transaction marker
                // or an uncommitted record, which read_committed never delivers.
                if let Some(end) = ends.get(&p) {
                    pos.insert(p, *end);
                }
            }
            Some(Err(e)) => return Err(err("read")(e)),
            None => {}
        }
    }
    progress(out.len(), want);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode as C;

    #[test]
    fn only_leader_election_errors_are_waited_out() {
        for code in [
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::UnknownTopicOrPartition,
        ] {
            assert!(leader_pending(&KafkaError::MetadataFetch(code)), "{code:?}");
        }
        for code in [C::TopicAuthorizationFailed, C::BrokerTransportFailure] {
            assert!(
                !leader_pending(&KafkaError::MetadataFetch(code)),
                "{code:?}"
            );
        }
    }
}
