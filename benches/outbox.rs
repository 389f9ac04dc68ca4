//! Outbox flush: writing a batch's outputs to the store's outbox, producing them with the
//! idempotent producer to the embedded broker, waiting for every acknowledgement and deleting
//! the acknowledged entries, the processor's and fulfilment's delivery path.
//!
//! Run (shares the test build): `cargo bench --workspace --profile test --bench outbox`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use forest_kafka::{EmbeddedBroker, OutboxProducer, ensure_topics};
use forest_store::{OutboxEntry, Store, StoreConfig};

fn bench(c: &mut Criterion) {
    let broker = EmbeddedBroker::start(1).expect("embedded broker");
    let brokers = broker.bootstrap_servers();
    ensure_topics(Some(&broker), &brokers, &[], &[("bench.trees", 4)], 1).expect("topic");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &StoreConfig::default()).expect("store");
    let mut producer = OutboxProducer::new(&brokers, &[]).expect("producer");
    let mut g = c.benchmark_group("outbox");
    g.sample_size(20);
    for n in [100usize, 1_000, 10_000] {
        let entries: Vec<OutboxEntry> = (0..n)
            .map(|i| OutboxEntry {
                partition: None,
                topic: "bench.trees".into(),
                key: format!("user-{i:08}").into_bytes(),
                // A TreeMatured is about 120-150 bytes.
                value: vec![7u8; 140],
                headers: vec![],
            })
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("write_produce_ack_delete_{n}"), |b| {
            b.iter_batched(
                || entries.clone(),
                |batch| {
                    let seqs = store
                        .commit_kv(std::iter::empty(), std::iter::empty(), &batch)
                        .expect("outbox write");
                    let staged: Vec<(u64, OutboxEntry)> = seqs.zip(batch).collect();
                    producer.deliver(&store, &staged).expect("delivered")
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
