//! Micro benchmarks of the pure hot-path pieces: decoding a record, the offset tracker, the
//! version ordering and the batcher. The end-to-end benchmark is `scripts/bench.sh`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use sync_engine::batch::{BatchConfig, HybridBatcher, SizedItem};
use sync_engine::decode::{decode, DecodeLimits, RawRecord};
use sync_engine::item::{supersedes, Origin};
use sync_engine::kafka::offsets::PartitionOffsets;

fn record() -> RawRecord {
    RawRecord {
        topic: Arc::from("items"),
        partition: 3,
        offset: 1_000,
        timestamp_ms: Some(1),
        key: Some(Bytes::from_static(b"uk.nhs.patient.record.12345")),
        value: Some(Bytes::from(vec![b'b'; 1024])),
        headers: vec![("sync-version".into(), Some(Bytes::from_static(b"1700000000000")))],
    }
}

fn benchmarks(c: &mut Criterion) {
    let input = record();
    let limits = DecodeLimits { max_item_bytes: 1 << 20 };
    c.bench_function("decode a 1 KiB record", |b| b.iter(|| decode(&input, limits).unwrap()));

    c.bench_function("track and settle 1,000 offsets", |b| {
        b.iter(|| {
            let mut offsets = PartitionOffsets::default();
            for offset in 0..1_000 {
                offsets.track(offset, None);
            }
            for offset in (0..1_000).rev() {
                offsets.settle(offset);
            }
            offsets.committable()
        })
    });

    // Invariant 2's ordering, as every tier's guard applies it: versions, then offsets of
    // the same partition at equal versions.
    let topic: Arc<str> = Arc::from("items");
    let pairs: Vec<(u64, Origin, u64, Origin)> = (0..1_000u64)
        .map(|n| {
            let origin =
                |offset: u64| Origin { topic: topic.clone(), partition: (n % 8) as i32, offset: offset as i64 };
            (n % 7, origin(n), n % 5, origin(n / 2))
        })
        .collect();
    c.bench_function("order 1,000 version pairs", |b| {
        b.iter(|| {
            pairs
                .iter()
                .filter(|(new, new_origin, old, old_origin)| supersedes(*new, Some(new_origin), *old, Some(old_origin)))
                .count()
        })
    });

    let limits = BatchConfig { max_items: 1_000, max_bytes: 8 << 20, max_delay: Duration::from_millis(50) };
    c.bench_function("batch 10,000 items", |b| {
        b.iter(|| {
            let now = Instant::now();
            let mut batcher = HybridBatcher::new(limits);
            let mut batches = 0;
            for item in 0..10_000u32 {
                batches += usize::from(batcher.push(Kib(item), now).is_some());
            }
            batches
        })
    });
}

/// A 1 KiB item.
struct Kib(#[allow(dead_code)] u32);

impl SizedItem for Kib {
    fn size_bytes(&self) -> usize {
        1024
    }
}

criterion_group!(benches, benchmarks);
criterion_main!(benches);
