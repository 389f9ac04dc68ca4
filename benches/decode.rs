//! Decode + validate of input records: protobuf bytes to a domain `Event`.
//!
//! Run: `cargo bench -p forest-benches --bench decode`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forest_benches::records;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let recs = records(200_000, 100_000);
    let bytes: usize = recs.iter().map(|r| r.value.len()).sum();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(recs.len() as u64));
    g.bench_function(
        format!("200k_records_avg_{}_bytes", bytes / recs.len()),
        |b| {
            b.iter(|| {
                recs.iter()
                    .filter(|r| black_box(r.to_event()).is_ok())
                    .count()
            })
        },
    );
    // As the processor decodes: every record into one event that keeps its buffers.
    g.bench_function(
        format!(
            "200k_records_avg_{}_bytes_into_one_event",
            bytes / recs.len()
        ),
        |b| {
            let mut event = forest_domain::Event::placeholder();
            b.iter(|| {
                recs.iter()
                    .filter(|r| {
                        let ok = event.decode_into(r.topic, &r.value, r.timestamp_ms).is_ok();
                        black_box(&event);
                        ok
                    })
                    .count()
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
