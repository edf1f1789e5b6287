use super::*;
use proptest::prelude::*;

fn config(dir: &Path) -> WalConfig {
    WalConfig { dir: dir.to_owned(), max_bytes: 1 << 20, segment_bytes: 4096 }
}

fn batch(first: u64, count: u64) -> Vec<SyncItem> {
    (first..first + count)
        .map(|n| {
            let origin = Origin { topic: Arc::from("t"), partition: 0, offset: n as i64 };
            SyncItem { origin: Some(origin), ..SyncItem::new(format!("id.{n}"), vec![b'x'; 100]).with_version(n) }
        })
        .collect()
}

fn append(log: &mut WriteAheadLog, items: &[SyncItem]) -> Result<u64, WalError> {
    log.append(&items.iter().collect::<Vec<_>>())
}

/// Drains every segment in order, returning the batches and corrupt records seen.
fn drain(log: &mut WriteAheadLog) -> (Vec<Vec<SyncItem>>, Vec<CorruptRecord>) {
    let (mut batches, mut corrupt) = (Vec::new(), Vec::new());
    while let Some(path) = log.next_to_drain() {
        let mut reader = SegmentReader::open(&path, log.failpoints()).unwrap().unwrap();
        while let Some(scanned) = reader.next_frame().unwrap() {
            match scanned {
                Scanned::Batch(items) => batches.push(items),
                Scanned::Corrupt(record) => corrupt.push(record),
            }
        }
        log.remove_drained(&path).unwrap();
    }
    (batches, corrupt)
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    files.sort();
    files
}

#[test]
fn appended_batches_survive_a_reopen_and_drain_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = WriteAheadLog::open(config(dir.path()), Failpoints::default()).unwrap();
    for first in [0, 10, 20, 30, 40] {
        append(&mut log, &batch(first, 10)).unwrap();
    }
    assert!(segment_files(dir.path()).len() > 1, "4 KiB segments roll over");
    drop(log);
    let (mut log, report) = WriteAheadLog::open(config(dir.path()), Failpoints::default()).unwrap();
    assert_eq!((report.records, report.torn_bytes, report.corrupt.len()), (5, 0, 0));
    let (batches, corrupt) = drain(&mut log);
    assert!(corrupt.is_empty());
    assert_eq!(batches, [0, 10, 20, 30, 40].map(|first| batch(first, 10)).to_vec());
    assert!(log.is_empty());
    assert_eq!(log.total_bytes(), 0);
    assert!(segment_files(dir.path()).is_empty());
}

#[test]
fn a_torn_tail_is_cut_and_the_valid_prefix_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config = WalConfig { segment_bytes: 1 << 20, ..config(dir.path()) };
    let (mut log, _) = WriteAheadLog::open(config.clone(), Failpoints::default()).unwrap();
    for first in [0, 10, 20] {
        append(&mut log, &batch(first, 10)).unwrap();
    }
    drop(log);
    let file = &segment_files(dir.path())[0];
    let length = fs::metadata(file).unwrap().len();
    OpenOptions::new().write(true).open(file).unwrap().set_len(length - 5).unwrap();

    let (mut log, report) = WriteAheadLog::open(config, Failpoints::default()).unwrap();
    assert_eq!(report.records, 2);
    assert!(report.torn_bytes > 0);
    append(&mut log, &batch(30, 1)).unwrap();
    let (batches, _) = drain(&mut log);
    assert_eq!(batches, vec![batch(0, 10), batch(10, 10), batch(30, 1)]);
}

#[test]
fn a_flipped_byte_reports_the_corrupt_record_with_its_ids_and_the_rest_drains() {
    let dir = tempfile::tempdir().unwrap();
    let config = WalConfig { segment_bytes: 1 << 20, ..config(dir.path()) };
    let (mut log, _) = WriteAheadLog::open(config.clone(), Failpoints::default()).unwrap();
    let sizes: Vec<u64> = [0, 10, 20].iter().map(|first| append(&mut log, &batch(*first, 10)).unwrap()).collect();
    drop(log);
    let file = &segment_files(dir.path())[0];
    let mut bytes = fs::read(file).unwrap();
    // Inside the second record's content (past its header and first id).
    let position = MAGIC.len() + sizes[0] as usize + 60;
    bytes[position] ^= 0x01;
    fs::write(file, bytes).unwrap();

    let (mut log, report) = WriteAheadLog::open(config, Failpoints::default()).unwrap();
    assert_eq!(report.records, 2);
    assert_eq!(report.corrupt.len(), 1);
    let ids: Vec<&str> = report.corrupt[0].items.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 10, "the corrupt record still names its items: {ids:?}");
    let (batches, corrupt) = drain(&mut log);
    assert_eq!(batches, vec![batch(0, 10), batch(20, 10)]);
    assert_eq!(corrupt.len(), 1);
}

#[test]
fn a_full_log_refuses_and_never_drops() {
    let dir = tempfile::tempdir().unwrap();
    let config = WalConfig { max_bytes: 3000, ..config(dir.path()) };
    let (mut log, _) = WriteAheadLog::open(config, Failpoints::default()).unwrap();
    append(&mut log, &batch(0, 10)).unwrap();
    assert!(matches!(append(&mut log, &batch(10, 20)), Err(WalError::Full { .. })));
    let (batches, _) = drain(&mut log);
    assert_eq!(batches, vec![batch(0, 10)]);
    append(&mut log, &batch(10, 20)).unwrap();
}

#[test]
fn a_failed_fsync_settles_nothing_and_leaves_no_partial_record() {
    let dir = tempfile::tempdir().unwrap();
    let failpoints = Failpoints::default();
    let (mut log, _) = WriteAheadLog::open(config(dir.path()), failpoints.clone()).unwrap();
    append(&mut log, &batch(0, 5)).unwrap();
    for point in ["wal.write", "wal.fsync"] {
        failpoints.enable(point);
        assert!(matches!(append(&mut log, &batch(5, 5)), Err(WalError::Io(_))));
        failpoints.disable(point);
    }
    drop(log);
    let (mut log, report) = WriteAheadLog::open(config(dir.path()), Failpoints::default()).unwrap();
    assert_eq!((report.records, report.torn_bytes), (1, 0));
    assert_eq!(drain(&mut log).0, vec![batch(0, 5)]);
}

#[test]
fn every_io_failpoint_turns_into_an_error_not_a_panic() {
    for point in ["wal.open", "wal.create", "wal.write", "wal.fsync", "wal.sync_dir", "wal.read", "wal.remove"] {
        let dir = tempfile::tempdir().unwrap();
        let failpoints = Failpoints::default();
        failpoints.enable(point);
        let outcome = (|| -> Result<(), WalError> {
            let (mut log, _) = WriteAheadLog::open(config(dir.path()), failpoints.clone())?;
            append(&mut log, &batch(0, 3))?;
            let path = log.next_to_drain().expect("a sealed segment");
            SegmentReader::open(&path, &failpoints)?;
            log.remove_drained(&path)
        })();
        assert!(outcome.is_err(), "failpoint {point} had no effect");
    }
}

proptest! {
    // Every case fsyncs: a few dozen cases keep the suite fast.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn opening_any_bytes_as_a_segment_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), with_magic: bool) {
        let dir = tempfile::tempdir().unwrap();
        let mut content = if with_magic { MAGIC.to_vec() } else { Vec::new() };
        content.extend(bytes);
        fs::write(dir.path().join("wal-0000000000000000.log"), content).unwrap();
        let (mut log, _) = WriteAheadLog::open(config(dir.path()), Failpoints::default()).unwrap();
        let _ = drain(&mut log);
        append(&mut log, &batch(0, 1)).unwrap();
    }

    // Any interleaving of appends and reopens reads back exactly what was appended.
    #[test]
    fn the_log_matches_a_model_across_reopens(ops in proptest::collection::vec(0u8..4, 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = WriteAheadLog::open(config(dir.path()), Failpoints::default()).unwrap();
        let mut model = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            if op == 0 {
                drop(log);
                log = WriteAheadLog::open(config(dir.path()), Failpoints::default()).unwrap().0;
            } else {
                let items = batch(step as u64 * 10, u64::from(op));
                append(&mut log, &items).unwrap();
                model.push(items);
            }
        }
        prop_assert_eq!(drain(&mut log).0, model);
    }
}
