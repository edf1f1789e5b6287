//! `GET /merkle/<path>`: a read-only drill-down into L3's merkle tree over HTTP, so a remote
//! peer can compare trees without SQL credentials (issue 8, item 3).
//!
//! Ids name patients, so it is off unless `SYNC_MERKLE_ADDR` is set, listens on that address
//! only (never on the metrics listener, which a cluster scrapes without credentials), and
//! answers nothing but `401` with a fixed body to a request without `Authorization: Bearer
//! <SYNC_MERKLE_TOKEN>`: the token is checked before the method, the path or the tree are
//! looked at, so a refused client cannot tell a path that exists from one that does not. The
//! server keeps only the token's SHA-256 and compares digests in constant time (`request.rs`).
//!
//! # Responses (text, one entry a line, hashes in hex; `request.rs` parses the target)
//!
//! | request | body |
//! | --- | --- |
//! | `/merkle/` (the root) | `node <root>`, `built yes\|no`, `pending <mark rows>`, then `b1 XX <bucket1>` per entry |
//! | `/merkle/<path>` | `node <hash>`, `leaf <hash>` when the path is an id with a row, then `b1 XX <bucket1>` per entry |
//! | `…?b1=XX` | `b2 YY <bucket2>` per entry of that bucket1 |
//! | `…?b1=XX&b2=YY` | `child <segment, percent-encoded> <node hash>` per child in that bucket2 |
//!
//! A node has at most 256 bucket1 entries and a bucket1 at most 256 bucket2 entries; a bucket2
//! holds width/65,536 children on average. So a drill-down to one differing id costs three
//! requests per level (node, bucket1, bucket2), O(drift × depth) in all, even under a node with
//! a million children. A path with nothing there (no node, bucket or children) is `404`.
//! Each request reads one transaction's snapshot; a non-root node's hash is computed from its
//! row's leaf now and its stored buckets, so it matches its parent's entry once the marks are
//! drained (`pending 0`).

mod client;
pub mod request;

pub use client::HttpSlots;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::http::{read_head_within, respond, serve_with};
use crate::merkle::{
    bucket2_slot, bucket_slot, decode_children, decode_entries, empty_root, hex, node_hash, node_slot, path_key, Hash,
    MerkleError, SlotRead, ROOT_SLOT,
};
use crate::storage::sql::SqlStore;
use crate::storage::sql_merkle::BUILT_SLOT;
use request::{bearer_token, parse_target, percent_encode, token_digest, token_matches, Query, Target, TargetError};

/// The body of every refused request, whatever it asked for.
pub const UNAUTHORIZED_BODY: &str = "unauthorized\n";
/// Tree reads in flight at once: each holds an L3 connection (of 8 on MySQL), which the
/// engine's writes need more.
const CONCURRENT_READS: usize = 2;

/// Where the endpoint finds the L3 whose tree it serves.
pub trait MerkleSource: Send + Sync + 'static {
    /// `None` while there is none (the engine not started yet, or no SQL L3): `503`.
    fn sql(&self) -> Option<&SqlStore>;
}

impl MerkleSource for SqlStore {
    fn sql(&self) -> Option<&SqlStore> {
        Some(self)
    }
}

impl MerkleSource for crate::SyncEngine {
    fn sql(&self) -> Option<&SqlStore> {
        self.l3().and_then(|l3| l3.as_sql())
    }
}

/// Set once the source exists: the worker binds the endpoint before its engine connects.
impl<T: MerkleSource> MerkleSource for OnceLock<Arc<T>> {
    fn sql(&self) -> Option<&SqlStore> {
        self.get().and_then(|source| source.sql())
    }
}

#[derive(Clone)]
struct Endpoint {
    /// SHA-256 of the token: the token itself is not kept.
    token: [u8; 32],
    source: Arc<dyn MerkleSource>,
    reads: Arc<Semaphore>,
}

/// Serves `GET /merkle/<path>` on `addr` until `stop` is cancelled; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    token: &Secret,
    source: Arc<dyn MerkleSource>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let endpoint = Endpoint {
        token: token_digest(token.expose().as_bytes()),
        source,
        reads: Arc::new(Semaphore::new(CONCURRENT_READS)),
    };
    serve_with(addr, "merkle", stop, move |stream| answer(stream, endpoint.clone())).await
}

/// Headers of every answer: nobody on the way should keep a copy of ids.
const TEXT: &str = "content-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n";

async fn answer(mut stream: TcpStream, endpoint: Endpoint) {
    let Some(head) = read_head_within(&mut stream).await else {
        return respond(&mut stream, "408 Request Timeout", TEXT, "request timeout\n").await;
    };
    let authorized = bearer_token(&head).is_some_and(|token| token_matches(token.as_bytes(), &endpoint.token));
    if !authorized {
        let headers = format!("{TEXT}www-authenticate: Bearer\r\n");
        return respond(&mut stream, "401 Unauthorized", &headers, UNAUTHORIZED_BODY).await;
    }
    let mut request_line = head.split_whitespace();
    let (method, target) = (request_line.next().unwrap_or(""), request_line.next().unwrap_or(""));
    if method != "GET" {
        let headers = format!("{TEXT}allow: GET\r\n");
        return respond(&mut stream, "405 Method Not Allowed", &headers, "only GET\n").await;
    }
    let (status, body) = match parse_target(target) {
        Err(TargetError::NotFound) => ("404 Not Found", "not found\n".to_owned()),
        Err(TargetError::Bad(why)) => ("400 Bad Request", format!("{why}\n")),
        Ok(target) => endpoint.read(&target).await,
    };
    respond(&mut stream, status, TEXT, &body).await;
}

impl Endpoint {
    async fn read(&self, target: &Target) -> (&'static str, String) {
        let Some(store) = self.source.sql() else {
            return ("503 Service Unavailable", "no SQL L3 (yet)\n".to_owned());
        };
        let Ok(_permit) = self.reads.acquire().await else {
            return ("503 Service Unavailable", "shutting down\n".to_owned());
        };
        match render(store, target).await {
            Ok(Some(body)) => ("200 OK", body),
            Ok(None) => ("404 Not Found", "no such node\n".to_owned()),
            Err(error) => {
                tracing::warn!(%error, "merkle endpoint: the tree could not be read");
                ("500 Internal Server Error", "the tree could not be read\n".to_owned())
            }
        }
    }
}

/// The body for `target` from one snapshot of the tree; `None` when nothing is there.
async fn render(store: &SqlStore, target: &Target) -> Result<Option<String>, MerkleError> {
    let key = path_key(target.depth, &target.path);
    // Counted before the snapshot opens: SQLite's pool has one connection, which it holds.
    let pending = match (target.depth, target.query) {
        (0, Query::Node) => store.merkle_pending().await?,
        _ => 0,
    };
    let mut slots = store.merkle_slots().await?;
    let body = match target.query {
        Query::Node => {
            let node_key = node_slot(&key);
            let mut keys = vec![node_key.clone()];
            if target.depth == 0 {
                keys.extend([ROOT_SLOT.to_vec(), BUILT_SLOT.to_vec()]);
            }
            let values = slots.get(&keys).await?;
            let buckets = match values.get(&node_key) {
                Some(value) => decode_entries(value)?,
                None => BTreeMap::new(),
            };
            let mut body = String::new();
            if target.depth == 0 {
                let root = match values.get(ROOT_SLOT) {
                    Some(value) => Hash::try_from(value.as_slice())
                        .map_err(|_| MerkleError::Corrupt("root of the wrong length".into()))?,
                    None => empty_root(),
                };
                let built = if values.contains_key(BUILT_SLOT) { "yes" } else { "no" };
                body.push_str(&format!("node {}\nbuilt {built}\npending {pending}\n", hex(&root)));
            } else {
                let leaf = slots.leaves(std::slice::from_ref(&target.path)).await?.get(&target.path).copied();
                let Some(node) = node_hash(leaf.as_ref(), &buckets) else {
                    return Ok(None);
                };
                body.push_str(&format!("node {}\n", hex(&node)));
                if let Some(leaf) = leaf {
                    body.push_str(&format!("leaf {}\n", hex(&leaf)));
                }
            }
            for (b1, hash) in &buckets {
                body.push_str(&format!("b1 {b1:02x} {}\n", hex(hash)));
            }
            Some(body)
        }
        Query::Bucket1(b1) => {
            let slot = bucket_slot(&key, b1);
            match slots.get(std::slice::from_ref(&slot)).await?.get(&slot) {
                Some(value) => Some(
                    decode_entries(value)?.iter().map(|(b2, hash)| format!("b2 {b2:02x} {}\n", hex(hash))).collect(),
                ),
                None => None,
            }
        }
        Query::Bucket2(b1, b2) => {
            let slot = bucket2_slot(&key, b1, b2);
            match slots.get(std::slice::from_ref(&slot)).await?.get(&slot) {
                Some(value) => Some(
                    decode_children(value)?
                        .iter()
                        .map(|(segment, hash)| format!("child {} {}\n", percent_encode(segment), hex(hash)))
                        .collect(),
                ),
                None => None,
            }
        }
    };
    slots.commit().await?;
    Ok(body)
}
