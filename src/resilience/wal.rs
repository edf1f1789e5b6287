//! The local write-ahead log: where batches bound for L3 go while L3 is unavailable.
//!
//! On disk (`SYNC_WAL_DIR`, which must be a persistent volume per pod): segment files
//! `wal-<sequence>.log`, each the magic `SYNCWAL1` followed by checksummed frames, one per
//! batch (format in `wal_format.rs`). New batches go to the one active segment; a segment is
//! sealed when it reaches `segment_bytes` or when the drain wants it, and only sealed segments
//! are drained, oldest first, then deleted.
//!
//! Invariants:
//! - `append` returns only after the frame is written and fsynced: from then on the batch is
//!   settled (its Kafka offsets may commit). If the write or the fsync fails, the segment is
//!   cut back to its previous length and the error returned: nothing half-written is settled.
//! - The log never holds more than `max_bytes`; when full, `append` refuses (`WalError::Full`)
//!   and the caller waits (Kafka still holds the data). It never drops.
//! - Opening recovers every segment: the valid prefix is kept; a torn tail (a write cut off
//!   before its fsync, so never settled) is truncated; a complete frame whose checksum fails
//!   (disk corruption after settling: outside the guarantee) is reported with the ids and
//!   origins it still shows, and skipped. Opening never fails on content, only on I/O.
//! - Replay streams one frame at a time; the L3 version guard makes replaying a batch twice
//!   (a crash during drain) harmless.
//! - Every I/O call has a named failpoint, so tests can inject errors.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::item::{Origin, SyncItem};
use crate::resilience::wal_format::{
    decode_batch, encode_batch, frame, read_frame, Frame, FRAME_HEADER_BYTES, MAGIC, MAX_PAYLOAD_BYTES,
};

#[derive(Clone, Debug)]
pub struct WalConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub segment_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log full: {bytes} of {max} bytes used")]
    Full { bytes: u64, max: u64 },
    #[error("write-ahead log i/o: {0}")]
    Io(#[from] io::Error),
}

/// Named failpoints: a test enables one and the next I/O call there fails.
#[derive(Clone, Debug, Default)]
pub struct Failpoints(Arc<Mutex<HashSet<&'static str>>>);

impl Failpoints {
    pub fn enable(&self, name: &'static str) {
        if let Ok(mut points) = self.0.lock() {
            points.insert(name);
        }
    }

    pub fn disable(&self, name: &'static str) {
        if let Ok(mut points) = self.0.lock() {
            points.remove(name);
        }
    }

    fn check(&self, name: &'static str) -> io::Result<()> {
        match self.0.lock() {
            Ok(points) if points.contains(name) => Err(io::Error::other(format!("failpoint {name}"))),
            _ => Ok(()),
        }
    }
}

/// A record that failed its checksum: what could still be read of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptRecord {
    pub segment: PathBuf,
    pub position: u64,
    /// Ids and origins, if the payload still decodes; empty if not.
    pub items: Vec<(String, Option<Origin>)>,
}

#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    /// Bytes cut from torn tails (never settled: Kafka redelivers them).
    pub torn_bytes: u64,
    pub corrupt: Vec<CorruptRecord>,
}

struct Active {
    path: PathBuf,
    file: File,
    bytes: u64,
}

/// What the log holds now: `SyncEngine::wal_stats`, `/health/ready`'s `wal_bytes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Bytes waiting to drain into L3.
    pub bytes: u64,
    /// Segment files on disk, the one being appended to included.
    pub segments: usize,
}

pub struct WriteAheadLog {
    config: WalConfig,
    failpoints: Failpoints,
    /// Sealed segments, oldest first, with their sizes.
    sealed: VecDeque<(PathBuf, u64)>,
    active: Option<Active>,
    next_sequence: u64,
    total_bytes: u64,
}

/// What reading the next frame of a segment found.
pub enum Scanned {
    Batch(Vec<SyncItem>),
    Corrupt(CorruptRecord),
}

impl WriteAheadLog {
    pub fn open(config: WalConfig, failpoints: Failpoints) -> Result<(WriteAheadLog, RecoveryReport), WalError> {
        failpoints.check("wal.open")?;
        fs::create_dir_all(&config.dir)?;
        let mut segments: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&config.dir)? {
            let path = entry?.path();
            let sequence = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_prefix("wal-")?.strip_suffix(".log")?.parse().ok());
            if let Some(sequence) = sequence {
                segments.push((sequence, path));
            }
        }
        segments.sort();
        let mut report = RecoveryReport::default();
        let mut log = WriteAheadLog {
            next_sequence: segments.last().map_or(0, |(sequence, _)| sequence + 1),
            config,
            failpoints,
            sealed: VecDeque::new(),
            active: None,
            total_bytes: 0,
        };
        for (_, path) in segments {
            let valid_bytes = log.recover_segment(&path, &mut report)?;
            if valid_bytes <= MAGIC.len() as u64 {
                log.failpoints.check("wal.remove")?;
                fs::remove_file(&path)?;
            } else {
                report.segments += 1;
                report.bytes += valid_bytes;
                log.total_bytes += valid_bytes;
                log.sealed.push_back((path, valid_bytes));
            }
        }
        Ok((log, report))
    }

    /// Scans a segment, truncating a torn or unreadable tail; returns its valid length.
    fn recover_segment(&self, path: &Path, report: &mut RecoveryReport) -> Result<u64, WalError> {
        let length = fs::metadata(path)?.len();
        let Some(mut reader) = SegmentReader::open(path, &self.failpoints)? else {
            // No valid magic: nothing in it was ever settled through us.
            report.torn_bytes += length;
            return Ok(0);
        };
        loop {
            match reader.next_frame()? {
                Some(Scanned::Batch(_)) => report.records += 1,
                Some(Scanned::Corrupt(record)) => report.corrupt.push(record),
                None => break,
            }
        }
        let valid = reader.position;
        if valid < length {
            report.torn_bytes += length - valid;
            self.failpoints.check("wal.truncate")?;
            let file = OpenOptions::new().write(true).open(path)?;
            file.set_len(valid)?;
            file.sync_all()?;
        }
        Ok(valid)
    }

    /// Appends one batch and fsyncs it. On success the batch is durable.
    pub fn append(&mut self, items: &[&SyncItem]) -> Result<u64, WalError> {
        let framed = frame(&encode_batch(items));
        let needed = framed.len() as u64;
        if self.total_bytes + needed > self.config.max_bytes {
            return Err(WalError::Full { bytes: self.total_bytes, max: self.config.max_bytes });
        }
        if self.active.is_none() {
            self.active = Some(self.create_segment()?);
        }
        let failpoints = self.failpoints.clone();
        let Some(active) = self.active.as_mut() else { unreachable!("an active segment was just created") };
        let written = failpoints
            .check("wal.write")
            .and_then(|()| active.file.write_all(&framed))
            .and_then(|()| failpoints.check("wal.fsync"))
            .and_then(|()| active.file.sync_data());
        if let Err(error) = written {
            // Cut back whatever part was written; if even that fails, stop using this segment.
            if active.file.set_len(active.bytes).is_err() {
                self.seal_active();
            }
            return Err(error.into());
        }
        active.bytes += needed;
        self.total_bytes += needed;
        if active.bytes >= self.config.segment_bytes {
            self.seal_active();
        }
        Ok(needed)
    }

    fn create_segment(&mut self) -> Result<Active, WalError> {
        let path = self.config.dir.join(format!("wal-{:016}.log", self.next_sequence));
        self.next_sequence += 1;
        self.failpoints.check("wal.create")?;
        let mut file = OpenOptions::new().create_new(true).append(true).open(&path)?;
        file.write_all(MAGIC)?;
        file.sync_all()?;
        // The new file's directory entry must be durable too.
        self.failpoints.check("wal.sync_dir")?;
        File::open(&self.config.dir)?.sync_all()?;
        self.total_bytes += MAGIC.len() as u64;
        Ok(Active { path, file, bytes: MAGIC.len() as u64 })
    }

    /// Moves the active segment to the sealed queue (it will not be appended to again).
    pub fn seal_active(&mut self) {
        if let Some(active) = self.active.take() {
            self.sealed.push_back((active.path, active.bytes));
        }
    }

    /// The oldest segment to drain, sealing the active one if nothing else is left.
    pub fn next_to_drain(&mut self) -> Option<PathBuf> {
        if self.sealed.is_empty() {
            self.seal_active();
        }
        self.sealed.front().map(|(path, _)| path.clone())
    }

    /// Deletes a drained segment.
    pub fn remove_drained(&mut self, path: &Path) -> Result<(), WalError> {
        self.failpoints.check("wal.remove")?;
        fs::remove_file(path)?;
        if let Some(index) = self.sealed.iter().position(|(sealed, _)| sealed == path) {
            if let Some((_, bytes)) = self.sealed.remove(index) {
                self.total_bytes -= bytes;
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> WalStats {
        WalStats { bytes: self.total_bytes, segments: self.sealed.len() + usize::from(self.active.is_some()) }
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.sealed.is_empty() && self.active.as_ref().is_none_or(|active| active.bytes <= MAGIC.len() as u64)
    }

    pub fn failpoints(&self) -> &Failpoints {
        &self.failpoints
    }
}

/// Streams the frames of one segment.
pub struct SegmentReader {
    path: PathBuf,
    reader: BufReader<File>,
    failpoints: Failpoints,
    /// Bytes of the segment known good so far.
    pub position: u64,
}

impl SegmentReader {
    /// `Ok(None)` if the file does not start with the magic.
    pub fn open(path: &Path, failpoints: &Failpoints) -> Result<Option<SegmentReader>, WalError> {
        failpoints.check("wal.read")?;
        let mut reader = BufReader::new(File::open(path)?);
        let mut magic = [0u8; 8];
        if read_up_to(&mut reader, &mut magic)? < magic.len() || &magic != MAGIC {
            return Ok(None);
        }
        Ok(Some(SegmentReader {
            path: path.to_owned(),
            reader,
            failpoints: failpoints.clone(),
            position: MAGIC.len() as u64,
        }))
    }

    /// The next batch or corrupt record; `None` at the end, at a torn tail or at garbage.
    pub fn next_frame(&mut self) -> Result<Option<Scanned>, WalError> {
        self.failpoints.check("wal.read")?;
        let mut header = [0u8; FRAME_HEADER_BYTES];
        if read_up_to(&mut self.reader, &mut header)? < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        if len > MAX_PAYLOAD_BYTES {
            return Ok(None);
        }
        let mut framed = header.to_vec();
        framed.resize(FRAME_HEADER_BYTES + len as usize, 0);
        if read_up_to(&mut self.reader, &mut framed[FRAME_HEADER_BYTES..])? < len as usize {
            return Ok(None);
        }
        let position = self.position;
        let scanned = match read_frame(&framed) {
            Frame::Valid(payload) => match decode_batch(payload) {
                Some(items) => Scanned::Batch(items),
                None => Scanned::Corrupt(CorruptRecord { segment: self.path.clone(), position, items: Vec::new() }),
            },
            Frame::Corrupt { payload } => {
                let items = decode_batch(payload)
                    .map(|items| items.into_iter().map(|item| (item.id, item.origin)).collect())
                    .unwrap_or_default();
                Scanned::Corrupt(CorruptRecord { segment: self.path.clone(), position, items })
            }
            Frame::Torn | Frame::Garbage => return Ok(None),
        };
        self.position += framed.len() as u64;
        Ok(Some(scanned))
    }
}

/// Reads until `buf` is full or the file ends; returns how much was read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests;
