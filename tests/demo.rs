//! `sync-engine demo` with items larger than the default 1 KiB. The embedded broker keeps
//! only 5 MiB per partition and drops older records silently, so the demo must bound how
//! far its producer runs ahead in bytes, not in records, or it waits forever for records
//! that no longer exist.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Far above the run's few seconds; a demo that lost records used to wait forever.
const DEADLINE: Duration = Duration::from_secs(180);

#[test]
fn the_demo_with_16_kib_items_passes_its_check_instead_of_waiting_for_records_the_broker_dropped() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sync-engine"))
        .args(["demo", "--items", "6000", "--item-bytes", "16384", "--quiet"])
        .env("SYNC_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut output = String::new();
    child.stdout.take().expect("piped").read_to_string(&mut output).expect("reads stdout");
    let status = status.unwrap_or_else(|| panic!("the demo did not finish within {DEADLINE:?}:\n{output}"));
    assert!(status.success(), "the demo failed ({status}):\n{output}");
    assert!(output.contains("PASS: every id holds its newest version"), "{output}");
    assert!(output.contains("produced        6000"), "{output}");
}
