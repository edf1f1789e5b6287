//! `sync-engine produce`: a load generator for real brokers, publishing a reproducible
//! workload (updates, deletes, out-of-order versions, duplicates, poison) per the wire
//! contract, optionally at a target rate, with a progress bar.

use std::io::Write;
use std::path::PathBuf;

use sync_engine::kafka::producer::{publish_all, EndOffsets, ItemProducer};
use sync_engine::workload::{Workload, WorkloadSpec};

/// The workload's shape, shared by `produce` and `ceiling` so both write the same rows.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkloadArgs {
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    #[arg(long, default_value_t = 1024)]
    pub item_bytes: usize,
    /// Distinct ids; fewer ids than records means updates.
    #[arg(long, default_value_t = 50_000)]
    pub key_space: u64,
    #[arg(long, default_value = "load")]
    pub id_prefix: String,
    #[arg(long, default_value_t = 0.05)]
    pub delete_share: f64,
    #[arg(long, default_value_t = 0.05)]
    pub out_of_order_share: f64,
    #[arg(long, default_value_t = 0.01)]
    pub duplicate_share: f64,
    #[arg(long, default_value_t = 0.0)]
    pub poison_share: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, env = "SYNC_MAX_ITEM_BYTES", default_value_t = 1 << 20)]
    pub max_item_bytes: usize,
}

impl WorkloadArgs {
    pub fn spec(&self) -> WorkloadSpec {
        WorkloadSpec {
            count: self.count,
            item_bytes: self.item_bytes,
            key_space: self.key_space.max(1),
            id_prefix: self.id_prefix.clone(),
            delete_share: self.delete_share,
            out_of_order_share: self.out_of_order_share,
            duplicate_share: self.duplicate_share,
            poison_share: self.poison_share,
            max_item_bytes: self.max_item_bytes,
            seed: self.seed,
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct ProduceArgs {
    #[arg(long, env = "SYNC_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    #[arg(long)]
    pub topic: String,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Records per second; 0 = as fast as the broker takes them.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Writes the expected final state (`id version sha256-hex|deleted` per line) here.
    #[arg(long)]
    pub expected_out: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
}

pub async fn run(args: ProduceArgs) -> anyhow::Result<EndOffsets> {
    let producer = ItemProducer::new(&args.brokers, &args.topic)?;
    let mut workload = Workload::new(args.workload.spec());
    let count = args.workload.count;
    let bar = super::progress_bar(count, "produced", args.quiet);
    let started = std::time::Instant::now();
    let ends = publish_all(&producer, workload.by_ref(), args.rate, || bar.inc(1)).await?;
    producer.flush();
    bar.finish();
    let elapsed = started.elapsed().as_secs_f64();
    println!("produced {count} records to {} in {elapsed:.1}s ({:.0} records/s)", args.topic, count as f64 / elapsed);
    let mut partitions: Vec<_> = ends.0.iter().collect();
    partitions.sort();
    for (partition, end) in partitions {
        println!("end offset partition={partition} offset={end}");
    }
    if let Some(path) = &args.expected_out {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (id, expected) in workload.expected() {
            let state = expected.content_hash.map_or("deleted".to_owned(), |hash| hex(&hash));
            writeln!(file, "{id} {} {state}", expected.version)?;
        }
    }
    Ok(ends)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
