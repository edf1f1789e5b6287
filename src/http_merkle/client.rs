//! `HttpSlots`: a peer's merkle tree read through its `GET /merkle/<path>` endpoint, as a
//! `SlotRead`, so `MerkleDiff::between` compares a local L3 with a remote one unchanged
//! (`sync-engine diff --against-peer`). Each slot key the diff asks for is turned back into its
//! path and kind and fetched with one request; a node's answer also carries its leaf and the
//! root's carries the root hash, so the last node answer is kept for the read that follows it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::request::{percent_decode, percent_encode, Query};
use crate::config::{redact_url, Secret};
use crate::merkle::{depth_of, encode_children, encode_entries, Hash, MerkleError, SlotRead, ROOT_SLOT};
use crate::storage::StoreError;

/// One request's deadline, connection to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A bucket2 slot is a MEDIUMBLOB (16 MiB); its text is at most about twice that.
const MAX_RESPONSE_BYTES: usize = 40 << 20;

/// A slot key taken apart (`crate::merkle`'s storage table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SlotKey {
    Root,
    Node(usize, String),
    Bucket1(usize, String, u8),
    Bucket2(usize, String, u8, u8),
}

fn corrupt(why: &str) -> MerkleError {
    MerkleError::Corrupt(why.to_owned())
}

/// The inverse of `path_key` + `node_slot` / `bucket_slot` / `bucket2_slot`, and `ROOT_SLOT`.
pub(crate) fn decode_slot_key(key: &[u8]) -> Result<SlotKey, MerkleError> {
    if key == ROOT_SLOT {
        return Ok(SlotKey::Root);
    }
    let depth = u16::from_be_bytes(key.get(..2).ok_or_else(|| corrupt("short slot key"))?.try_into().unwrap_or([0; 2]));
    let mut rest = &key[2..];
    let mut segments = Vec::with_capacity(depth as usize);
    for _ in 0..depth {
        let (&len, tail) = rest.split_first().ok_or_else(|| corrupt("truncated slot key"))?;
        let segment = tail.get(..len as usize).ok_or_else(|| corrupt("truncated slot key"))?;
        segments.push(std::str::from_utf8(segment).map_err(|_| corrupt("a segment is not UTF-8"))?);
        rest = &tail[len as usize..];
    }
    let (depth, path) = (depth as usize, segments.join("."));
    match rest {
        [0] => Ok(SlotKey::Node(depth, path)),
        [1, b1] => Ok(SlotKey::Bucket1(depth, path, *b1)),
        [2, b1, b2] => Ok(SlotKey::Bucket2(depth, path, *b1, *b2)),
        _ => Err(corrupt("unknown slot kind")),
    }
}

/// A node's answer: its hash, leaf and bucket1 entries.
#[derive(Clone, Debug, Default)]
struct NodeReply {
    node: Option<Hash>,
    leaf: Option<Hash>,
    entries: BTreeMap<u8, Hash>,
}

pub struct HttpSlots {
    /// `host:port`.
    authority: String,
    token: Secret,
    /// Requests sent so far.
    pub requests: u64,
    /// The last node answer, by `(depth, path)` (`None`: the path has no node there).
    last_node: Option<((usize, String), Option<NodeReply>)>,
}

fn unavailable(why: String) -> MerkleError {
    MerkleError::Store(StoreError::Unavailable(why))
}

fn parse_hash(text: &str) -> Result<Hash, MerkleError> {
    if text.len() != 64 {
        return Err(corrupt("a hash is not 64 hex digits"));
    }
    let mut hash = [0u8; 32];
    for (index, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).map_err(|_| corrupt("a hash is not hex"))?;
    }
    Ok(hash)
}

fn parse_byte(text: &str) -> Result<u8, MerkleError> {
    u8::from_str_radix(text, 16).map_err(|_| corrupt("a bucket is not two hex digits"))
}

impl HttpSlots {
    /// A peer at `http://host:port` (a trailing `/` allowed; no TLS: put the endpoint behind a
    /// TLS-terminating proxy or a private network).
    pub fn new(url: &str, token: Secret) -> Result<HttpSlots, String> {
        let authority = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("expected http://host:port, got {:?}", redact_url(url)))?
            .trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!("expected http://host:port, got {:?}", redact_url(url)));
        }
        Ok(HttpSlots { authority: authority.to_owned(), token, requests: 0, last_node: None })
    }

    /// The body of `GET /merkle/<path>[query]` (`None`: 404).
    async fn fetch(&mut self, path: &str, query: Query) -> Result<Option<String>, MerkleError> {
        let query = match query {
            Query::Node => String::new(),
            Query::Bucket1(b1) => format!("?b1={b1:02x}"),
            Query::Bucket2(b1, b2) => format!("?b1={b1:02x}&b2={b2:02x}"),
        };
        let request = format!(
            "GET /merkle/{}{query} HTTP/1.0\r\nhost: {}\r\nauthorization: Bearer {}\r\n\r\n",
            percent_encode(path.as_bytes()),
            self.authority,
            self.token.expose()
        );
        self.requests += 1;
        let exchange = async {
            let mut stream = TcpStream::connect(&self.authority).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.take(MAX_RESPONSE_BYTES as u64 + 1).read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Err(unavailable(format!("merkle peer {}: {error}", self.authority))),
            Err(_) => return Err(unavailable(format!("merkle peer {}: no answer within 30 s", self.authority))),
        };
        if response.len() > MAX_RESPONSE_BYTES {
            return Err(corrupt("the peer's answer is too large"));
        }
        let response = String::from_utf8(response).map_err(|_| corrupt("the peer's answer is not UTF-8"))?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| corrupt("the peer's answer has no head"))?;
        let status = head.split_whitespace().nth(1).unwrap_or("");
        match status {
            "200" => Ok(Some(body.to_owned())),
            "404" => Ok(None),
            "401" => Err(unavailable(format!("merkle peer {}: the token was refused (401)", self.authority))),
            _ => Err(unavailable(format!(
                "merkle peer {}: {} {}",
                self.authority,
                head.lines().next().unwrap_or(""),
                body.lines().next().unwrap_or("")
            ))),
        }
    }

    async fn node(&mut self, depth: usize, path: &str) -> Result<Option<NodeReply>, MerkleError> {
        if let Some(((d, p), reply)) = &self.last_node {
            if *d == depth && p == path {
                return Ok(reply.clone());
            }
        }
        // The root is `/merkle/`; a path of depth 1 that is empty (the empty id) has no address.
        if depth != 0 && (path.is_empty() || depth_of(path) != depth) {
            return Err(corrupt("a path with no HTTP address (the empty id)"));
        }
        let reply = match self.fetch(path, Query::Node).await? {
            None => None,
            Some(body) => {
                let mut reply = NodeReply::default();
                for line in body.lines() {
                    let fields: Vec<&str> = line.split(' ').collect();
                    match fields[..] {
                        ["node", hash] => reply.node = Some(parse_hash(hash)?),
                        ["leaf", hash] => reply.leaf = Some(parse_hash(hash)?),
                        ["b1", b1, hash] => {
                            reply.entries.insert(parse_byte(b1)?, parse_hash(hash)?);
                        }
                        // `built`, `pending` and lines a newer peer may add.
                        _ => {}
                    }
                }
                Some(reply)
            }
        };
        self.last_node = Some(((depth, path.to_owned()), reply.clone()));
        Ok(reply)
    }

    /// The slot's value as the SQL store would hold it (`None`: absent).
    async fn slot(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, MerkleError> {
        Ok(match decode_slot_key(key)? {
            SlotKey::Root => self.node(0, "").await?.and_then(|reply| reply.node).map(|root| root.to_vec()),
            SlotKey::Node(depth, path) => self
                .node(depth, &path)
                .await?
                .filter(|reply| !reply.entries.is_empty())
                .map(|reply| encode_entries(&reply.entries)),
            SlotKey::Bucket1(_, path, b1) => match self.fetch(&path, Query::Bucket1(b1)).await? {
                None => None,
                Some(body) => {
                    let mut entries = BTreeMap::new();
                    for line in body.lines() {
                        let fields: Vec<&str> = line.split(' ').collect();
                        if let ["b2", b2, hash] = fields[..] {
                            entries.insert(parse_byte(b2)?, parse_hash(hash)?);
                        }
                    }
                    Some(encode_entries(&entries))
                }
            },
            SlotKey::Bucket2(_, path, b1, b2) => match self.fetch(&path, Query::Bucket2(b1, b2)).await? {
                None => None,
                Some(body) => {
                    let mut children = BTreeMap::new();
                    for line in body.lines() {
                        let fields: Vec<&str> = line.split(' ').collect();
                        if let ["child", segment, hash] = fields[..] {
                            let segment = percent_decode(segment).map_err(|_| corrupt("a segment is badly encoded"))?;
                            if segment.len() > 255 {
                                return Err(corrupt("a segment is over 255 bytes"));
                            }
                            children.insert(segment, parse_hash(hash)?);
                        }
                    }
                    Some(encode_children(&children))
                }
            },
        })
    }
}

impl SlotRead for HttpSlots {
    async fn get(&mut self, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, Vec<u8>>, MerkleError> {
        let mut values = HashMap::with_capacity(keys.len());
        for key in keys {
            if let Some(value) = self.slot(key).await? {
                values.insert(key.clone(), value);
            }
        }
        Ok(values)
    }

    async fn leaves(&mut self, ids: &[String]) -> Result<HashMap<String, Hash>, MerkleError> {
        let mut leaves = HashMap::with_capacity(ids.len());
        for id in ids {
            if let Some(leaf) = self.node(depth_of(id), id).await?.and_then(|reply| reply.leaf) {
                leaves.insert(id.clone(), leaf);
            }
        }
        Ok(leaves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{bucket2_slot, bucket_slot, node_slot, path_key};

    #[test]
    fn slot_keys_decode_back_to_their_path_and_kind() {
        let key = path_key(3, "uk.nhs.");
        assert_eq!(decode_slot_key(&node_slot(&key)).unwrap(), SlotKey::Node(3, "uk.nhs.".into()));
        assert_eq!(decode_slot_key(&bucket_slot(&key, 7)).unwrap(), SlotKey::Bucket1(3, "uk.nhs.".into(), 7));
        assert_eq!(
            decode_slot_key(&bucket2_slot(&key, 7, 255)).unwrap(),
            SlotKey::Bucket2(3, "uk.nhs.".into(), 7, 255)
        );
        assert_eq!(decode_slot_key(&node_slot(&path_key(0, ""))).unwrap(), SlotKey::Node(0, String::new()));
        assert_eq!(decode_slot_key(ROOT_SLOT).unwrap(), SlotKey::Root);
        assert!(decode_slot_key(&key[..key.len() - 1]).is_err());
        assert!(decode_slot_key(&[key.as_slice(), &[9]].concat()).is_err());
    }

    #[test]
    fn only_plain_http_peers_are_accepted() {
        assert_eq!(HttpSlots::new("http://10.0.0.1:9091/", "t".into()).unwrap().authority, "10.0.0.1:9091");
        for bad in ["https://h:1", "h:1", "http://", "http://u:p@h:1", "http://h:1/merkle"] {
            assert!(HttpSlots::new(bad, "t".into()).is_err(), "{bad}");
        }
    }
}
