//! Surviving backend outages: the local write-ahead log for L3 (`wal.rs`, its byte format in
//! `wal_format.rs`), circuit breakers (`circuit_breaker.rs`) and backoff (`retry.rs`).

pub mod circuit_breaker;
pub mod retry;
pub mod wal;
pub mod wal_format;
