//! The library in a dozen lines: configure the tiers, start, submit, read back, shut down.
//!
//! Run it against your own servers (both URLs optional: without them the item lives in L1):
//!
//! ```sh
//! SYNC_QUICKSTART_REDIS_URL=redis://127.0.0.1:6379 \
//! SYNC_QUICKSTART_SQL_URL=mysql://user:pass@127.0.0.1/db \
//!     cargo run --example quickstart
//! ```
//!
//! `redis_url` names a standalone Redis or any node of a Redis Cluster (detected when the
//! engine starts); `sql_url` is `mysql://…` or `sqlite://path?mode=rwc`.

use serde_json::json;
use sync_engine::{SyncEngine, SyncEngineConfig, SyncItem};
use tokio::sync::watch;

#[tokio::main]
async fn main() {
    let config = SyncEngineConfig {
        redis_url: std::env::var("SYNC_QUICKSTART_REDIS_URL").ok().map(Into::into),
        sql_url: std::env::var("SYNC_QUICKSTART_SQL_URL").ok().map(Into::into),
        ..Default::default()
    };

    // Keep the sender to change batch limits while the engine runs.
    let (_config_tx, config_rx) = watch::channel(config.clone());
    let mut engine = SyncEngine::new(config.clone(), config_rx);
    engine.start().await.expect("the engine connects to its tiers");

    // A JSON item, versioned with the current time; `submit` returns once it is durable in
    // the slowest tier it is routed to.
    let id = "uk.nhs.patient.record.12345";
    let record = json!({"name": "John Doe", "nhs_number": "1234567890"});
    let tier = engine.submit(SyncItem::from_json(id.into(), record.clone())).await.expect("submitted");
    println!("settled in {tier:?}");

    // Reads fall back L1 → L2 → L3.
    let found = engine.get(id).await.expect("read").expect("the item is there");
    println!("found: {:?}", found.content_as_json());
    assert_eq!(found.content_as_json(), Some(record.clone()));
    engine.shutdown().await;

    // A second engine starts with an empty L1: what it finds came from L2 or L3.
    if config.redis_url.is_some() || config.sql_url.is_some() {
        let mut reader = SyncEngine::new(config.clone(), watch::channel(config).1);
        reader.start().await.expect("the second engine connects");
        let again = reader.get(id).await.expect("read").expect("durable across engines");
        assert_eq!(again.content_as_json(), Some(record));
        println!("read back by a fresh engine: version {}", again.version);
        reader.shutdown().await;
    }
}
