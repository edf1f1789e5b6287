//! `GET /merkle/<path>` (issue 8, item 3): a request without the bearer token, or with a wrong
//! one, gets 401 with a fixed body that names no id and no hash, whatever it asked for; with
//! the token, the root is the store's and a drill-down from it (node → b1 → b2 → child, level
//! by level) reaches the id changed by hand in one of two MariaDB tables, where the leaves
//! differ. `HttpSlots` runs the same diff as SQL does, and `sync-engine diff --against-peer`
//! prints it. The worker serves the endpoint on its own listener only when configured.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{drop_tables, mysql_url, Names};
use sync_engine::config::Secret;
use sync_engine::http_merkle::{self, HttpSlots, MerkleSource, UNAUTHORIZED_BODY};
use sync_engine::merkle::hex;
use sync_engine::storage::sql::SqlStore;
use sync_engine::ArchiveStore;
use sync_engine::SyncItem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "merkle-test-token-0123456789";
const TIMEOUT: Duration = Duration::from_secs(60);
const CHANGED: &str = "uk.nhs.patient.42";

/// A raw HTTP/1.0 exchange: `(status, whole response)`.
async fn request(port: u16, method: &str, target: &str, authorization: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connects");
    let auth = authorization.map(|value| format!("Authorization: {value}\r\n")).unwrap_or_default();
    stream.write_all(format!("{method} {target} HTTP/1.0\r\n{auth}\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await.unwrap().unwrap();
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, response)
}

/// The body of an authorized GET that must succeed.
async fn get(port: u16, target: &str) -> String {
    let (status, response) = request(port, "GET", target, Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(status, 200, "{target}: {response}");
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// `key → rest of line` for the lines of a body that start with `kind`.
fn entries(body: &str, kind: &str) -> BTreeMap<String, String> {
    body.lines()
        .filter_map(|line| line.strip_prefix(kind)?.strip_prefix(' ')?.split_once(' '))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

fn line(body: &str, kind: &str) -> Option<String> {
    body.lines().find_map(|line| line.strip_prefix(kind)?.strip_prefix(' ').map(str::to_owned))
}

/// The keys whose values differ (present on one side only included).
fn differing(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(|key| a.get(*key) != b.get(*key)).cloned().collect()
}

fn item(id: &str, content: &str) -> SyncItem {
    SyncItem::new(id, Bytes::from(content.to_owned())).with_version(1)
}

/// 3,000 wide ids (`bench.NNNNNNNN`, one node with 3,000 children) and 200 four deep.
async fn fill(store: &SqlStore) {
    store.set_merkle_marks(true);
    let mut ids: Vec<String> = (0..3000).map(|n| format!("bench.{n:08}")).collect();
    ids.extend((0..200).map(|n| format!("uk.nhs.patient.{n}")));
    for chunk in ids.chunks(1000) {
        let items: Vec<SyncItem> = chunk.iter().map(|id| item(id, &format!("content of {id}"))).collect();
        let refs: Vec<&SyncItem> = items.iter().collect();
        store.write_batch(&refs, TIMEOUT).await.expect("batch written");
    }
    store.merkle_ensure_built().await.expect("built");
    store.merkle_drain().await.expect("drained");
}

async fn serve(store: Arc<SqlStore>, stop: &CancellationToken) -> u16 {
    let source: Arc<dyn MerkleSource> = store;
    let addr = "127.0.0.1:0".parse().unwrap();
    http_merkle::serve(addr, &Secret::new(TOKEN), source, stop.child_token()).await.expect("listens").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_token_nothing_is_learnt_and_with_it_a_drill_down_finds_the_changed_id_mysql() {
    let (mine, theirs) = (Names::new("merkle_http_a"), Names::new("merkle_http_b"));
    let url = mysql_url();
    let local = Arc::new(SqlStore::connect(&url, &mine.table).await.expect("local L3"));
    let other = Arc::new(SqlStore::connect(&url, &theirs.table).await.expect("other L3"));
    tokio::join!(fill(&local), fill(&other));
    // One row changed behind the engine's back in `other`, then marked and drained.
    let pool = sqlx::MySqlPool::connect(&url).await.unwrap();
    let hash = sync_engine::item::content_hash(b"changed by hand");
    let statement =
        format!("UPDATE {} SET version = version + 1, content = ?, content_hash = ? WHERE id = ?", theirs.table);
    let query = sqlx::query(&statement).bind(&b"changed by hand"[..]).bind(&hash[..]).bind(CHANGED.as_bytes());
    assert_eq!(query.execute(&pool).await.unwrap().rows_affected(), 1);
    pool.close().await;
    other.merkle_mark(&[CHANGED]).await.unwrap();
    other.merkle_drain().await.unwrap();

    let stop = CancellationToken::new();
    let (local_port, port) = (serve(local.clone(), &stop).await, serve(other.clone(), &stop).await);

    // Refused: every request without the right token gets the same bytes, whether its path
    // exists, does not, is malformed or the method is wrong.
    let mut refused = Vec::new();
    for (method, target) in [
        ("GET", "/merkle/"),
        ("GET", format!("/merkle/{CHANGED}").as_str()),
        ("GET", "/merkle/no.such.path?b1=00&b2=00"),
        ("GET", "/merkle/%zz?b3=1"),
        ("GET", "/metrics"),
        ("POST", "/merkle/"),
    ] {
        for authorization in [
            None,
            Some("Bearer wrong-token-0123456789abc".to_owned()),
            Some(format!("Bearer {TOKEN}x")),
            Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
            Some(format!("Basic {TOKEN}")),
            Some(TOKEN.to_owned()),
        ] {
            let (status, response) = request(port, method, target, authorization.as_deref()).await;
            assert_eq!(status, 401, "{method} {target} {authorization:?}: {response}");
            refused.push(response);
        }
    }
    assert!(refused.windows(2).all(|pair| pair[0] == pair[1]), "the 401s differ: {refused:?}");
    let (head, body) = refused[0].split_once("\r\n\r\n").unwrap();
    assert_eq!(body, UNAUTHORIZED_BODY);
    assert!(head.to_ascii_lowercase().contains("\r\nwww-authenticate: bearer"), "{head}");
    assert!(!refused[0].contains("bench") && !refused[0].contains("uk.nhs"), "an id in a 401");
    let hexish = refused[0].split(|c: char| !c.is_ascii_hexdigit()).any(|run| run.len() >= 16);
    assert!(!hexish, "a hash in a 401: {}", refused[0]);

    // Authorized: the root is the store's.
    let root = get(port, "/merkle/").await;
    assert_eq!(line(&root, "node"), Some(hex(&other.merkle_root().await.unwrap())), "{root}");
    assert_eq!((line(&root, "built").as_deref(), line(&root, "pending").as_deref()), (Some("yes"), Some("0")));
    let local_root = get(local_port, "/merkle/").await;
    assert_ne!(line(&root, "node"), line(&local_root, "node"));
    // Bad requests are 400, paths with nothing there 404 (only once the token is right).
    let auth = format!("Bearer {TOKEN}");
    assert_eq!(request(port, "GET", "/merkle/%zz", Some(&auth)).await.0, 400);
    assert_eq!(request(port, "GET", "/merkle/x?b2=00", Some(&auth)).await.0, 400);
    assert_eq!(request(port, "GET", "/merkle/no.such.path", Some(&auth)).await.0, 404);
    assert_eq!(request(port, "POST", "/merkle/", Some(&auth)).await.0, 405);

    // The drill-down: at each differing node, only its differing bucket1, bucket2 and child.
    let (mut path, mut requests) = (String::new(), 0);
    let found = loop {
        let target = |query: &str| format!("/merkle/{}{query}", path.replace('%', "%25"));
        let (a, b) = (get(local_port, &target("")).await, get(port, &target("")).await);
        requests += 2;
        assert_ne!(line(&a, "node"), line(&b, "node"), "{path}: the walk follows differing nodes only");
        if line(&a, "leaf") != line(&b, "leaf") {
            break path;
        }
        let b1s = differing(&entries(&a, "b1"), &entries(&b, "b1"));
        assert_eq!(b1s.len(), 1, "{path}: one changed id, one differing bucket1");
        let query = format!("?b1={}", b1s[0]);
        let (a, b) = (get(local_port, &target(&query)).await, get(port, &target(&query)).await);
        let b2s = differing(&entries(&a, "b2"), &entries(&b, "b2"));
        assert_eq!(b2s.len(), 1, "{path}{query}");
        let query = format!("{query}&b2={}", b2s[0]);
        let (a, b) = (get(local_port, &target(&query)).await, get(port, &target(&query)).await);
        let children = differing(&entries(&a, "child"), &entries(&b, "child"));
        assert_eq!(children.len(), 1, "{path}{query}");
        requests += 4;
        path = if path.is_empty() { children[0].clone() } else { format!("{path}.{}", children[0]) };
    };
    assert_eq!(found, CHANGED);
    eprintln!("drill-down to {found}: {requests} requests over two peers");
    assert_eq!(requests, 6 * 4 + 2, "three requests per side per level, four levels, then the leaf's node");
    let leaf_there = line(&get(port, &format!("/merkle/{CHANGED}")).await, "leaf").unwrap();
    let leaf_here = line(&get(local_port, &format!("/merkle/{CHANGED}")).await, "leaf").unwrap();
    assert_ne!(leaf_there, leaf_here);

    // The same diff as SQL gives, through `HttpSlots`, with no SQL access to the peer.
    let by_sql = local.merkle_diff(&other).await.unwrap();
    let mut peer = HttpSlots::new(&format!("http://127.0.0.1:{port}"), Secret::new(TOKEN)).unwrap();
    let by_http = local.merkle_diff_with(&mut peer).await.unwrap();
    eprintln!(
        "diff over HTTP: {} reads, {} requests; over SQL: {} reads",
        by_http.queries, peer.requests, by_sql.queries
    );
    assert_eq!(by_http.ids, vec![CHANGED.to_owned()]);
    assert_eq!((by_http.ids.clone(), by_http.other_root), (by_sql.ids.clone(), by_sql.other_root));
    assert!(peer.requests < by_http.queries, "a node's answer also carries its leaf");
    let mut wrong = HttpSlots::new(&format!("http://127.0.0.1:{port}"), Secret::new("not-the-token-0123")).unwrap();
    let refused = local.merkle_diff_with(&mut wrong).await.unwrap_err().to_string();
    assert!(refused.contains("401") && !refused.contains("not-the-token"), "{refused}");

    // The command.
    let output = Command::new(env!("CARGO_BIN_EXE_sync-engine"))
        .args(["diff", "--against-peer", &format!("http://127.0.0.1:{port}")])
        .env("SYNC_SQL_URL", &url)
        .env("SYNC_SQL_TABLE", &mine.table)
        .env("SYNC_MERKLE_TOKEN", TOKEN)
        .output()
        .expect("sync-engine diff runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(1), "divergent: exit 1");
    assert!(stdout.contains(&format!("diverges {CHANGED} local=v1")), "{stdout}");
    assert!(stdout.contains("divergent=1 queries="), "{stdout}");
    assert!(!stdout.contains(TOKEN));

    stop.cancel();
    local.close().await;
    other.close().await;
    drop_tables(&url, &[&mine.table, &theirs.table]).await;
}

/// The worker serves the endpoint only on `SYNC_MERKLE_ADDR`, never on the metrics listener,
/// and refuses to start with an address and no (or a short) token, without printing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_serves_the_tree_on_its_own_listener_only_mysql() {
    for token in [None, Some("short-secret")] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sync-engine"));
        command
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SYNC_KAFKA_TOPICS", "t")
            .env("SYNC_SQL_URL", mysql_url())
            .env("SYNC_MERKLE_ADDR", "127.0.0.1:1");
        if let Some(token) = token {
            command.env("SYNC_MERKLE_TOKEN", token);
        }
        let output = command.stdout(Stdio::piped()).stderr(Stdio::piped()).output().expect("runs");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert_eq!(output.status.code(), Some(2), "{text}");
        assert!(text.contains("SYNC_MERKLE_TOKEN") && !text.contains("short-secret"), "{text}");
    }

    let names = Names::new("merkle_http_worker");
    common::create_topic(&names.topic, 1).await;
    let (metrics_port, merkle_port) = (common::free_port(), common::free_port());
    let extra = [("SYNC_MERKLE_ADDR", format!("127.0.0.1:{merkle_port}")), ("SYNC_MERKLE_TOKEN", TOKEN.to_owned())];
    let mut worker = common::spawn_worker(&names, metrics_port, &extra);
    let ready = common::wait_ready(metrics_port, Duration::from_secs(30)).await;
    let on_metrics = request(metrics_port, "GET", "/merkle/", Some(&format!("Bearer {TOKEN}"))).await;
    let refused = request(merkle_port, "GET", "/merkle/", None).await;
    let root = request(merkle_port, "GET", "/merkle/", Some(&format!("Bearer {TOKEN}"))).await;
    let metrics_on_merkle = request(merkle_port, "GET", "/metrics", Some(&format!("Bearer {TOKEN}"))).await;
    common::signal(&worker, "TERM");
    common::wait_exit(&mut worker, Duration::from_secs(30)).await;
    assert!(ready, "the worker became ready");
    assert_eq!(on_metrics.0, 404, "the metrics listener has no /merkle/: {}", on_metrics.1);
    assert_eq!(refused.0, 401);
    assert_eq!(root.0, 200, "{}", root.1);
    assert!(root.1.contains("\r\n\r\nnode "), "{}", root.1);
    assert_eq!(metrics_on_merkle.0, 404, "the merkle listener has no /metrics");
    drop_tables(&mysql_url(), &[&names.table]).await;
}

/// On SQLite (a pool of one connection) every request is answered too, the root's included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_store_is_served_with_its_single_connection() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("items.db").display());
    let store = Arc::new(SqlStore::connect(&url, "items").await.expect("L3"));
    store.set_merkle_marks(true);
    let items = [item("uk.nhs.a", "a"), item("uk.nhs.a.b", "b")];
    store.write_batch(&items.iter().collect::<Vec<_>>(), TIMEOUT).await.expect("written");
    store.merkle_ensure_built().await.unwrap();
    store.merkle_drain().await.unwrap();
    let stop = CancellationToken::new();
    let port = serve(store.clone(), &stop).await;
    let root = tokio::time::timeout(Duration::from_secs(10), get(port, "/merkle/")).await.expect("answered in time");
    assert_eq!(line(&root, "node"), Some(hex(&store.merkle_root().await.unwrap())));
    let node = get(port, "/merkle/uk.nhs.a").await;
    assert!(line(&node, "leaf").is_some() && !entries(&node, "b1").is_empty(), "{node}");
    stop.cancel();
    store.close().await;
}
