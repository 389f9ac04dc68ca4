//! Hostile input through the running processor: a corpus of at least 10,000 records that break
//! the contract in every documented way (truncated, wrong wire types, huge fields, negative and
//! overflowing amounts, absurd steps, i64-extreme timestamps, unknown enums, invalid UTF-8,
//! look-alike unicode keys, empty ids, missing envelopes, oversized values), produced between
//! two slices of valid traffic. Every hostile record must land in the DLQ with a reason, the
//! processor must not crash, and the valid records after them must still be folded exactly as
//! the pure fold says.

use forest_kafka::headers;
use forest_tests::*;
use forest_workload::hostile::{Hostility, corpus};
use std::collections::{BTreeMap, HashMap};

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
        produce_raw(&b, topic, records);
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
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, hdrs) in read_topic(&b, &b.topics.dlq) {
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
