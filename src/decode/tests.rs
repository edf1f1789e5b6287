use super::*;
use proptest::prelude::*;

const LIMITS: DecodeLimits = DecodeLimits { max_item_bytes: 16 };

fn record(key: Option<&[u8]>, value: Option<&[u8]>, headers: &[(&str, &[u8])]) -> RawRecord {
    RawRecord {
        topic: Arc::from("items"),
        partition: 2,
        offset: 40,
        timestamp_ms: Some(1_000),
        key: key.map(Bytes::copy_from_slice),
        value: value.map(Bytes::copy_from_slice),
        headers: headers.iter().map(|(name, value)| (name.to_string(), Some(Bytes::copy_from_slice(value)))).collect(),
    }
}

#[test]
fn a_plain_record_decodes_with_timestamp_version_and_defaults() {
    let (item, options) = decode(&record(Some(b"a.b"), Some(b"{\"x\":1}"), &[]), LIMITS).unwrap();
    assert_eq!(item.id, "a.b");
    assert_eq!(item.version, 1_000);
    assert_eq!(item.content_type, ContentType::Json);
    assert_eq!(item.origin.unwrap().offset, 40);
    assert_eq!(options, SubmitOptions::default());
}

#[test]
fn headers_set_version_type_ttl_and_tiers() {
    let headers: &[(&str, &[u8])] = &[
        ("sync-version", b"18446744073709551615"),
        ("sync-content-type", b"binary"),
        ("sync-ttl-secs", b"0"),
        ("sync-tiers", b"l1,l3"),
        ("unknown", b"ignored"),
    ];
    let (item, options) = decode(&record(Some(b"k"), Some(b"[1]"), headers), LIMITS).unwrap();
    assert_eq!(item.version, u64::MAX);
    assert_eq!(item.content_type, ContentType::Binary);
    assert_eq!(options.redis_ttl, CacheTtl::Forever);
    assert_eq!(options.tiers, Tiers { l1: true, l2: false, l3: true });
}

#[test]
fn a_null_value_or_delete_op_is_a_tombstone() {
    let (item, _) = decode(&record(Some(b"k"), None, &[]), LIMITS).unwrap();
    assert!(item.is_tombstone());
    let (item, _) = decode(&record(Some(b"k"), Some(b"x"), &[("sync-op", b"delete")]), LIMITS).unwrap();
    assert!(item.is_tombstone());
}

#[test]
fn bad_input_is_sorted_into_reasons() {
    let cases: Vec<(RawRecord, &str)> = vec![
        (record(None, Some(b"x"), &[]), "missing_key"),
        (record(Some(b""), Some(b"x"), &[]), "invalid_key"),
        (record(Some(&[0xff, 0xfe]), Some(b"x"), &[]), "invalid_key"),
        (record(Some(b"a\nb"), Some(b"x"), &[]), "invalid_key"),
        (record(Some(&[b'a'; 256]), Some(b"x"), &[]), "invalid_key"),
        (record(Some(b"k"), Some(b"x"), &[("sync-version", b"-1")]), "bad_header"),
        (record(Some(b"k"), Some(b"x"), &[("sync-version", b"+1")]), "bad_header"),
        (record(Some(b"k"), Some(b"x"), &[("sync-version", b"18446744073709551616")]), "bad_header"),
        (record(Some(b"k"), Some(b"x"), &[("sync-op", b"merge")]), "bad_header"),
        (record(Some(b"k"), Some(b"x"), &[("sync-content-type", b"xml")]), "bad_header"),
        (record(Some(b"k"), Some(b"x"), &[("sync-ttl-secs", b"99999999999")]), "bad_header"),
        (record(Some(b"k"), Some(b"x"), &[("sync-tiers", b"l9")]), "bad_header"),
        (record(Some(b"k"), Some(b"{oops"), &[("sync-content-type", b"json")]), "invalid_json"),
        (record(Some(b"k"), Some(&[7u8; 17]), &[]), "oversize"),
    ];
    for (input, code) in cases {
        assert_eq!(decode(&input, LIMITS).unwrap_err().code(), code, "{input:?}");
    }
}

#[test]
fn a_known_header_given_twice_or_with_surrounding_whitespace_is_a_bad_header() {
    type Headers<'h> = &'h [(&'h str, &'h [u8])];
    let cases: Vec<(Headers, &str)> = vec![
        (&[("sync-version", b"5"), ("sync-version", b"5")], "given 2 times"),
        (&[("sync-op", b"upsert"), ("sync-op", b"delete")], "given 2 times"),
        (&[("sync-tiers", b"l1"), ("sync-tiers", b"l3"), ("sync-tiers", b"l2")], "given 3 times"),
        (&[("sync-version", b" 5")], "surrounding whitespace"),
        (&[("sync-ttl-secs", b"60\n")], "surrounding whitespace"),
        (&[("sync-op", b"delete ")], "surrounding whitespace"),
        (&[("sync-content-type", b"\tjson")], "surrounding whitespace"),
        (&[("sync-tiers", b" l1,l3")], "surrounding whitespace"),
        (&[("sync-state", b"a"), ("sync-state", b"a")], "given 2 times"),
        (&[("sync-state", b"active ")], "surrounding whitespace"),
    ];
    for (headers, message) in cases {
        let error = decode(&record(Some(b"k"), Some(b"{}"), headers), LIMITS).unwrap_err();
        assert_eq!(error.code(), "bad_header", "{headers:?}");
        assert!(error.to_string().contains(message), "{headers:?}: {error}");
    }
    // Unknown headers may repeat, and whitespace inside a list is still fine.
    let headers: &[(&str, &[u8])] = &[("trace", b"a"), ("trace", b"b"), ("sync-tiers", b"l1, l3")];
    assert!(decode(&record(Some(b"k"), Some(b"{}"), headers), LIMITS).is_ok());
}

#[test]
fn a_tiers_header_naming_a_tier_the_worker_lacks_is_a_bad_header() {
    let only_l1_l3 = Tiers { l1: true, l2: false, l3: true };
    let routed = |tiers: &[u8]| record(Some(b"k"), Some(b"{}"), &[("sync-tiers", tiers)]);
    let check = |input: &RawRecord| {
        let (_, options) = decode(input, LIMITS).unwrap();
        require_tiers(input, options.tiers, only_l1_l3)
    };
    let error = check(&routed(b"l2")).unwrap_err();
    assert_eq!(error.code(), "bad_header");
    assert_eq!(error.to_string(), "bad header sync-tiers: routes to l2, which this worker does not have");
    assert_eq!(check(&routed(b"l1,l2,l3")).unwrap_err().code(), "bad_header");
    assert_eq!(check(&routed(b"l1,l3")), Ok(()));
    assert_eq!(check(&routed(b"l3")), Ok(()));
    // No header: the default routing (every tier) is the engine's business, not a dead letter.
    let plain = record(Some(b"k"), Some(b"{}"), &[]);
    assert_eq!(require_tiers(&plain, Tiers::default(), Tiers { l1: true, l2: false, l3: false }), Ok(()));
}

#[test]
fn a_state_header_sets_the_items_state_on_upserts_and_deletes() {
    let (item, _) = decode(&record(Some(b"k"), Some(b"x"), &[("sync-state", b"active")]), LIMITS).unwrap();
    assert_eq!(item.state.as_deref(), Some("active"));
    let (item, _) = decode(&record(Some(b"k"), Some(b"x"), &[("sync-state", b"Pending_2.b-c")]), LIMITS).unwrap();
    assert_eq!(item.state.as_deref(), Some("Pending_2.b-c"));
    let (item, _) = decode(&record(Some(b"k"), None, &[("sync-state", b"archived")]), LIMITS).unwrap();
    assert!(item.is_tombstone());
    assert_eq!(item.state.as_deref(), Some("archived"));
    // No header: no state.
    let (item, _) = decode(&record(Some(b"k"), Some(b"x"), &[]), LIMITS).unwrap();
    assert_eq!(item.state, None);
}

#[test]
fn an_invalid_state_header_is_a_bad_header_with_its_reason() {
    let long = vec![b'a'; 65];
    let cases: Vec<(&[u8], &str)> = vec![
        (b"", "0 bytes"),
        (&long, "65 bytes"),
        (b"in review", "' '"),
        (b"a%b", "'%'"),
        (b"a/b", "'/'"),
        ("caf\u{e9}".as_bytes(), "'\u{e9}'"),
        (&[0xff], "not utf-8"),
    ];
    for (value, message) in cases {
        let error = decode(&record(Some(b"k"), Some(b"x"), &[("sync-state", value)]), LIMITS).unwrap_err();
        assert_eq!(error.code(), "bad_header", "{value:?}");
        let text = error.to_string();
        assert!(text.starts_with("bad header sync-state: "), "{text}");
        assert!(text.contains(message), "{value:?}: {text}");
    }
    let mut null = record(Some(b"k"), Some(b"x"), &[]);
    null.headers.push(("sync-state".into(), None));
    assert_eq!(decode(&null, LIMITS).unwrap_err().code(), "bad_header");
}

#[test]
fn ids_of_255_bytes_with_sql_metacharacters_and_unicode_are_accepted() {
    let mut id = String::from("'; DROP TABLE x; -- \"é✓");
    while id.len() < 255 {
        id.push('z');
    }
    assert!(decode(&record(Some(id.as_bytes()), Some(b"x"), &[]), LIMITS).is_ok());
    assert!(decode(&record(Some(b"k"), Some(&[1u8; 16]), &[]), LIMITS).is_ok());
}

#[test]
fn no_version_and_no_timestamp_is_dead_lettered() {
    let mut input = record(Some(b"k"), Some(b"x"), &[]);
    input.timestamp_ms = None;
    assert_eq!(decode(&input, LIMITS).unwrap_err(), DeadLetterReason::MissingVersion);
}

proptest! {
    #[test]
    fn decoding_never_panics(
        key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        header_value in proptest::collection::vec(any::<u8>(), 0..30),
        header_index in 0usize..7,
    ) {
        let names = ["sync-version", "sync-op", "sync-content-type", "sync-ttl-secs", "sync-tiers", "sync-state", "x"];
        let input = record(key.as_deref(), value.as_deref(), &[(names[header_index], &header_value)]);
        let _ = decode(&input, LIMITS);
    }
}

#[test]
fn a_record_in_flight_counts_its_header_list_and_allocations_not_only_its_payloads() {
    let value = vec![b'x'; 1024];
    let bare = record(Some(b"a.b"), Some(&value), &[]);
    let headers: [(&str, &[u8]); 3] = [(HEADER_VERSION, b"7"), (HEADER_OP, b"upsert"), (HEADER_CONTENT_TYPE, b"json")];
    let with_headers = record(Some(b"a.b"), Some(&value), &headers);
    assert!(bare.size_bytes() >= std::mem::size_of::<RawRecord>() + 3 + 1024, "the record itself and its payloads");
    let payloads: usize = headers.iter().map(|(name, value)| name.len() + value.len()).sum();
    let per_header = std::mem::size_of::<(String, Option<Bytes>)>();
    assert!(
        with_headers.size_bytes() >= bare.size_bytes() + payloads + 3 * per_header,
        "each header adds its bytes and its slot in the list: {} vs {}",
        with_headers.size_bytes(),
        bare.size_bytes()
    );
}
