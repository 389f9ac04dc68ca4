//! Hostile input through the running processor: a corpus of at least 10,000 records that break
//! the contract in every documented way (truncated, wrong wire types, huge fields, negative and
//! overflowing amounts, absurd steps, i64-extreme timestamps, unknown enums, invalid UTF-8,
//! look-alike unicode keys, empty ids, missing envelopes, oversized values, one value of
//! ~1.04 MB near the broker's record limit), produced between two slices of valid traffic.
//! Every hostile record must land in the DLQ with a reason, the processor must not crash, and
//! the valid records after them must still be folded exactly as the pure fold says. The
//! near-limit record's dead letter cannot be produced whole (librdkafka's default
//! `message.max.bytes` is 1,000,000): it must arrive cut, with `forest.truncated`, and its
//! partition must move on.

use forest_kafka::{client_config, headers};
use forest_tests::*;
use forest_workload::hostile::{Hostility, NEAR_BROKER_LIMIT_BYTES, corpus};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Records over librdkafka's default `message.max.bytes` need a producer that allows them
/// (Apache Kafka's own default limit, 1,048,588, is above them).
const LARGE: usize = 900_000;

/// Produces records too large for the shared test producer, one by one, without
/// compression (so they reach the broker at full size), partitioned like Forest's producers.
fn produce_large(b: &TestBroker, topic: &str, records: &[(Vec<u8>, Vec<u8>)]) {
    let producer: BaseProducer = client_config(&b.bootstrap, &[])
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("message.max.bytes", "1048576")
        .create()
        .expect("producer");
    for (k, v) in records {
        producer
            .send(BaseRecord::to(topic).key(k).payload(v))
            .map_err(|(e, _)| e)
            .expect("a large record is accepted locally");
        producer
            .flush(Duration::from_secs(60))
            .expect("a large record is acknowledged");
    }
}

fn hostile_count() -> usize {
    std::env::var("FOREST_HOSTILE_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

#[test]
fn ten_thousand_hostile_records_all_dead_lettered_and_nothing_stalls() {
    let b = TestBroker::new("hostile");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    // Valid traffic before the hostile records...
    produce(&b, workload(21, 10_000, 1_000));
    // ...the corpus, per input topic...
    let hostile = corpus(21, hostile_count(), now);
    let mut by_topic: BTreeMap<&str, Vec<(Vec<u8>, Vec<u8>)>> = BTreeMap::new();
    let mut category: HashMap<(Vec<u8>, Vec<u8>), Hostility> = HashMap::new();
    for (h, r) in &hostile {
        let kv = (r.key.clone().into_bytes(), r.value.clone());
        by_topic
            .entry(b.input_topic(r.topic))
            .or_default()
            .push(kv.clone());
        category.insert(kv, *h);
    }
    for (topic, records) in &by_topic {
        let (large, small): (Vec<_>, Vec<_>) =
            records.iter().cloned().partition(|(_, v)| v.len() > LARGE);
        produce_raw(&b, topic, &small);
        produce_large(&b, topic, &large);
    }
    // ...and valid traffic after them, dated after the first slice.
    let mut after = workload(22, 10_000, 1_000);
    after.start_ms = now - 3_600_000;
    after.span_ms = 3_000_000;
    produce(&b, after);

    let records = input_records(&b);
    let want = expected(&Default::default(), &records);
    // The pure fold itself rejects every hostile record...
    let mut per_category: BTreeMap<Hostility, usize> = BTreeMap::new();
    for r in &records {
        if let Some(h) = category.get(&(r.key.clone(), r.value.clone())) {
            let kind = match r.kind {
                forest_domain::InputKind::Payment => 0,
                forest_domain::InputKind::Mobility => 1,
                forest_domain::InputKind::Command => 2,
            };
            assert!(
                want.dead_letters.contains(&(kind, r.partition, r.offset)),
                "{h:?} record at {}/{} not rejected by the pure fold",
                r.partition,
                r.offset
            );
            *per_category.entry(*h).or_default() += 1;
        }
    }
    eprintln!(
        "found by category: {per_category:?}; records {}",
        records.len()
    );
    assert_eq!(
        per_category.values().sum::<usize>(),
        hostile.len(),
        "every hostile record is in Kafka"
    );
    assert_eq!(per_category.len(), Hostility::ALL.len());

    // ...and the processor, which must reach the end of every partition (nothing stalls) and
    // stop cleanly (nothing crashed).
    let dir = run_processor_to_end(&b, &records, std::sync::Arc::new(Default::default()));
    // Projections equal the pure fold; the DLQ holds exactly the rejected records (hostile
    // and the workload's own malformed/late ones), each with a reason and an error text.
    let summary = check(&b, dir.path(), &want);
    // The near-limit record: its dead letter arrived, cut below the producer's limit, with
    // the original length in a header and the original bytes as its prefix; and the records
    // after it in its partition were applied (check above: the fold includes them).
    let near = records
        .iter()
        .find(|r| {
            category.get(&(r.key.clone(), r.value.clone())) == Some(&Hostility::NearBrokerLimit)
        })
        .expect("the near-limit record is in Kafka");
    assert!(near.value.len() > NEAR_BROKER_LIMIT_BYTES);
    let dlq = read_topic(&b, &b.topics.dlq);
    let header = |hdrs: &[(String, Vec<u8>)], k: &str| {
        hdrs.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let (_, value, hdrs) = dlq
        .iter()
        .find(|(_, _, h)| {
            header(h, headers::SOURCE_TOPIC).as_deref() == Some(b.input_topic(near.kind))
                && header(h, headers::SOURCE_PARTITION) == Some(near.partition.to_string())
                && header(h, headers::SOURCE_OFFSET) == Some(near.offset.to_string())
        })
        .expect("the near-limit record's dead letter");
    assert_eq!(
        header(hdrs, headers::TRUNCATED),
        Some(near.value.len().to_string()),
        "forest.truncated holds the original length"
    );
    assert!(
        value.len() < 1_000_000 && value.len() > 900_000,
        "{}",
        value.len()
    );
    assert!(
        near.value.starts_with(value),
        "the dead letter is a prefix of the record"
    );
    let later_in_partition = records
        .iter()
        .filter(|r| r.kind == near.kind && r.partition == near.partition && r.offset > near.offset)
        .count();
    assert!(
        later_in_partition > 0,
        "valid traffic follows the near-limit record"
    );
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, hdrs) in &dlq {
        let reason = hdrs
            .iter()
            .find(|(k, _)| k == headers::REASON)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        *reasons.entry(reason).or_default() += 1;
    }
    assert!(reasons.values().sum::<usize>() >= hostile.len());
    eprintln!(
        "hostile: {} hostile records by category {per_category:?}; DLQ by reason {reasons:?}; {summary}",
        hostile.len()
    );
}
