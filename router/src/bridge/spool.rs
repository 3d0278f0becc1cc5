//! Store-and-forward for an upstream bridge: messages wait here while the
//! upstream broker is unreachable or slow, and leave only when it has
//! acknowledged them (PUBACK).
//!
//! With disk durability the spool is an append-only log of segment files.
//! A record is `[len u32][crc32 u32][seq u64][topic_len u16][topic][payload]`
//! (big-endian, CRC over everything after the CRC field). The highest
//! sequence the upstream has acknowledged is kept in `acked` (written
//! atomically); on start the log is replayed from there, stopping at the
//! first torn or corrupt record.
//!
//! Two steps, so that nothing that waits for a disk runs where it must not:
//! `append_deferred` only queues a record in memory (the broker's async
//! callers do this); `sync` writes every queued record to the segment and
//! fdatasyncs it, on a thread that may block (a CoAP worker, the broker's
//! writer thread). Concurrent syncs share one write and one fdatasync
//! (group commit): whoever syncs covers everything queued before it. Only
//! durable records are offered to the upstream.
//!
//! A sync that fails (a full or failing disk) drops every record not yet
//! durable and counts the failure: whoever queued one of them is refused
//! (devices get 5.03 and send again), so a backlog of refused records
//! never stands between a disk that has room again and new messages. The
//! failed write is cut off the segment with `set_len`, so no torn record is ever
//! followed by good ones, also after a failed fdatasync (Linux may have
//! dropped those pages and will not say so again); if even the cut fails,
//! the next write starts a new segment, as does every start of the router.
//!
//! The spool is bounded: past `max_bytes` the oldest messages are evicted
//! and counted, and the router keeps serving. The disk holds at most
//! `max_bytes` of pending records plus one segment (segments are an eighth
//! of the bound, 4 KiB to 4 MiB): a segment is deleted as soon as every
//! record in it is acknowledged or evicted, and replay applies the bound
//! again, so evicted messages do not come back after a restart.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Segment files are rotated at `max_bytes / 8` within these sizes.
const MIN_SEGMENT_BYTES: u64 = 4 << 10;
const MAX_SEGMENT_BYTES: u64 = 4 << 20;
const RECORD_HEADER: usize = 4 + 4 + 8 + 2;
/// After a failed sync, syncs are refused at once for this long instead of
/// rewriting the whole backlog to a disk that just failed, batch after batch.
const RETRY_AFTER: Duration = Duration::from_millis(50);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub topic: Bytes,
    pub payload: Bytes,
}

impl Record {
    fn size(&self) -> u64 {
        (RECORD_HEADER + self.topic.len() + self.payload.len()) as u64
    }
}

#[derive(Debug, Default)]
pub struct SpoolStats {
    pub appended: AtomicU64,
    pub acked: AtomicU64,
    /// Messages dropped, oldest first, because the spool was full.
    pub evicted: AtomicU64,
    pub bytes: AtomicU64,
    pub records: AtomicU64,
    /// Syncs that failed (each refused its callers' messages).
    pub sync_failures: AtomicU64,
}

struct Entry {
    record: Record,
    acked: bool,
}

struct Segment {
    path: PathBuf,
    last_seq: u64,
}

/// The files; held by the one sync or checkpoint at work.
struct Disk {
    dir: PathBuf,
    /// The segment being appended to.
    file: File,
    file_bytes: u64,
    segment_bytes: u64,
    /// A failed write could not be cut off the current segment: the next
    /// write starts a new one, so no good record follows a torn one.
    abandon: bool,
    /// Oldest first; the last one is `file`.
    segments: VecDeque<Segment>,
    /// The watermark last written to `acked`.
    checkpointed: u64,
    /// The number in the newest segment's name: a new segment's name is
    /// its first record's number, or above this if that is taken (a
    /// rewrite after an abandoned segment), so names sort in write order.
    last_name: u64,
    /// Syncs are refused until then (see RETRY_AFTER), with this error.
    failed: Option<(Instant, io::ErrorKind)>,
}

struct Inner {
    queue: VecDeque<Entry>,
    bytes: u64,
    next_seq: u64,
    /// Every record up to here is acknowledged or evicted.
    done_through: u64,
    /// Every record up to here that is still queued is on disk, synced.
    durable_through: u64,
    /// Eviction left segments to delete: the next `sync` checkpoints.
    release_wanted: bool,
    /// Failed syncs so far; each dropped the records not yet durable.
    failures: u64,
}

pub struct Spool {
    inner: Mutex<Inner>,
    /// None for a memory spool.
    disk: Option<Mutex<Disk>>,
    max_bytes: u64,
    pub stats: SpoolStats,
    /// Woken when records become durable (ready for the upstream).
    pub appended: tokio::sync::Notify,
    /// Whether syncs are failing (a full or failing disk): logged when
    /// that begins and when it ends, not once per refused message.
    failing: AtomicBool,
    /// Whether checkpoints are failing (logged like `failing`).
    checkpoint_failing: AtomicBool,
}

impl Spool {
    pub fn memory(max_bytes: u64) -> Spool {
        Spool::with(Inner::new(1), None, max_bytes)
    }

    /// Opens (or creates) the disk spool in `dir` and replays what the
    /// upstream has not acknowledged, at most `max_bytes` of it (the newest).
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        let done_through = fs::read_to_string(dir.join("acked"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        paths.sort();
        let mut queue = VecDeque::new();
        let mut segments = VecDeque::new();
        let mut last_seq = done_through;
        let mut last_record = 0;
        for path in &paths {
            let (records, valid_len, stop) = read_segment(path, last_record)?;
            if let Some(reason) = stop {
                // A torn or corrupt tail: the write it came from failed or
                // never finished, so no device was acknowledged for it.
                let file_len = fs::metadata(path)?.len();
                OpenOptions::new()
                    .write(true)
                    .open(path)?
                    .set_len(valid_len)?;
                tracing::warn!(
                    path = %path.display(),
                    cut_bytes = file_len - valid_len,
                    kept_records = records.len(),
                    last_good_seq = records.last().map_or(0, |r| r.seq),
                    reason,
                    "spool: cut the unreadable end of a segment"
                );
            }
            let seg_last = records.last().map_or(0, |r| r.seq);
            last_record = last_record.max(seg_last);
            for record in records {
                last_seq = last_seq.max(record.seq);
                if record.seq > done_through {
                    queue.push_back(Entry {
                        record,
                        acked: false,
                    });
                }
            }
            segments.push_back(Segment {
                path: path.clone(),
                last_seq: seg_last,
            });
        }
        let next_seq = last_seq + 1;
        // Appends go to a fresh segment, never after what an earlier run
        // left: that may end in bytes whose fdatasync failed, which this
        // file handle would not hear about (and whose name could repeat).
        let name = next_seq.max(
            segments
                .back()
                .map_or(0, |s: &Segment| segment_number(&s.path))
                + 1,
        );
        let path = dir.join(format!("{name:020}.seg"));
        segments.push_back(Segment {
            path: path.clone(),
            last_seq: 0,
        });
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let disk = Disk {
            dir: dir.to_owned(),
            file,
            file_bytes: 0,
            segment_bytes: (max_bytes / 8).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES),
            abandon: false,
            segments,
            checkpointed: done_through,
            failed: None,
            last_name: name,
        };
        let mut inner = Inner::new(next_seq);
        inner.done_through = done_through;
        inner.durable_through = last_seq;
        inner.bytes = queue.iter().map(|e| e.record.size()).sum();
        inner.queue = queue;
        let spool = Spool::with(inner, Some(disk), max_bytes);
        let replayed = {
            let mut inner = spool.inner.lock().unwrap();
            let evicted = spool.evict_over_bound(&mut inner);
            if evicted > 0 {
                tracing::warn!(dir = %dir.display(), evicted, max_bytes, "spool: more on disk than spool_max_bytes; the oldest were evicted at replay");
            }
            inner.queue.len()
        };
        if let Some(disk) = &spool.disk {
            spool.try_checkpoint(&mut disk.lock().unwrap())?;
        }
        if replayed > 0 {
            tracing::info!(dir = %dir.display(), replayed, "spool: replaying messages not yet acknowledged upstream");
        }
        spool.publish_gauges();
        Ok(spool)
    }

    fn with(inner: Inner, disk: Option<Disk>, max_bytes: u64) -> Spool {
        Spool {
            inner: Mutex::new(inner),
            disk: disk.map(Mutex::new),
            max_bytes,
            stats: SpoolStats::default(),
            appended: tokio::sync::Notify::new(),
            failing: AtomicBool::new(false),
            checkpoint_failing: AtomicBool::new(false),
        }
    }

    /// Whether the spool keeps its records on disk (then a sync matters).
    pub fn on_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// The segment directory, for log lines (a memory spool has none).
    fn dir(&self) -> Option<PathBuf> {
        Some(self.disk.as_ref()?.lock().unwrap().dir.clone())
    }

    /// Adds a message; with a disk spool, returns once it is on disk.
    pub fn append(&self, topic: Bytes, payload: Bytes) -> io::Result<()> {
        let failures = self.failures();
        self.append_deferred(topic, payload)?;
        self.sync()?;
        if self.failures() != failures {
            return Err(io::Error::other("refused by a failed sync"));
        }
        Ok(())
    }

    /// How many syncs have failed. Each dropped every record not yet
    /// durable: whoever queued a record before reading a count that has
    /// since grown must take it as refused (see `mqtt::sink::Ticket`).
    pub fn failures(&self) -> u64 {
        self.inner.lock().unwrap().failures
    }

    /// Queues a message without touching the disk; `sync` makes it (and
    /// every other queued one) durable. The broker stages messages this
    /// way; the CoAP workers sync once per receive batch before
    /// acknowledging it.
    pub fn append_deferred(&self, topic: Bytes, payload: Bytes) -> io::Result<()> {
        if topic.len() > usize::from(u16::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a topic longer than 65,535 bytes cannot be spooled",
            ));
        }
        {
            let mut inner = self.inner.lock().unwrap();
            let seq = inner.next_seq;
            let record = Record {
                seq,
                topic,
                payload,
            };
            inner.next_seq += 1;
            if self.disk.is_none() {
                inner.durable_through = seq;
            }
            inner.bytes += record.size();
            inner.queue.push_back(Entry {
                record,
                acked: false,
            });
            if self.evict_over_bound(&mut inner) > 0 {
                // The next sync deletes the segments this emptied, keeping
                // the disk within the bound too.
                inner.release_wanted = true;
            }
        }
        self.stats.appended.fetch_add(1, Ordering::Relaxed);
        self.publish_gauges();
        if self.disk.is_none() {
            self.appended.notify_one();
        }
        Ok(())
    }

    /// Drops the oldest records until the spool is within `max_bytes`
    /// (always keeping the newest); returns how many were unacknowledged.
    fn evict_over_bound(&self, inner: &mut Inner) -> u64 {
        let mut evicted = 0;
        while inner.bytes > self.max_bytes && inner.queue.len() > 1 {
            let old = inner.queue.pop_front().unwrap();
            inner.bytes -= old.record.size();
            inner.done_through = old.record.seq;
            if !old.acked {
                evicted += 1;
            }
        }
        self.stats.evicted.fetch_add(evicted, Ordering::Relaxed);
        evicted
    }

    /// Makes every record queued so far durable: writes what is not yet on
    /// disk and fdatasyncs it. Blocks on the disk. Then, if eviction
    /// emptied segments, deletes them (a checkpoint).
    pub fn sync(&self) -> io::Result<()> {
        let Some(disk) = &self.disk else {
            return Ok(());
        };
        let (target, release) = {
            let mut inner = self.inner.lock().unwrap();
            let release = std::mem::take(&mut inner.release_wanted);
            if inner.durable_through >= inner.next_seq - 1 && !release {
                return Ok(()); // nothing to do: never wait for the disk lock
            }
            (inner.next_seq - 1, release)
        };
        let mut disk = disk.lock().unwrap();
        if release {
            // First make room: segments emptied by eviction go before the
            // backlog is written, so the disk stays within the bound. A
            // failure only delays the release to the next checkpoint.
            let _ = self.checkpoint_with(&mut disk);
        }
        match self.write_and_sync(&mut disk, target) {
            Ok(true) => {
                drop(disk);
                self.write_succeeded();
                self.appended.notify_one();
            }
            Ok(false) => drop(disk), // an earlier sync covered it
            Err(err) => {
                // Refused: every record not yet durable goes (their
                // publishers are told so), in the same step as the count
                // that tells them, so none of them is acknowledged.
                let mut inner = self.inner.lock().unwrap();
                let durable = inner.durable_through;
                while inner.queue.back().is_some_and(|e| e.record.seq > durable) {
                    let e = inner.queue.pop_back().unwrap();
                    inner.bytes -= e.record.size();
                }
                inner.failures += 1;
                drop(inner);
                drop(disk);
                self.stats.sync_failures.fetch_add(1, Ordering::Relaxed);
                self.publish_gauges();
                self.write_failed(&err);
                return Err(err);
            }
        }
        Ok(())
    }

    /// Writes and syncs the queued records not yet durable, if `target` is
    /// not durable already; true if it did. Called with the disk held, so
    /// one sync at a time covers everyone queued before it.
    fn write_and_sync(&self, disk: &mut Disk, target: u64) -> io::Result<bool> {
        let records: Vec<Record> = {
            let inner = self.inner.lock().unwrap();
            if inner.durable_through >= target {
                return Ok(false);
            }
            // Only the tail is not durable: never walk the whole backlog.
            let mut tail: Vec<Record> = inner
                .queue
                .iter()
                .rev()
                .take_while(|e| e.record.seq > inner.durable_through)
                .map(|e| e.record.clone())
                .collect();
            tail.reverse();
            tail
        };
        if let Some((until, kind)) = disk.failed {
            if Instant::now() < until {
                return Err(io::Error::new(
                    kind,
                    "the spool's disk failed a moment ago; retrying shortly",
                ));
            }
        }
        let Some(last) = records.last().map(|r| r.seq) else {
            // Everything after the durable mark was evicted meanwhile.
            self.inner.lock().unwrap().durable_through = target;
            return Ok(false);
        };
        if let Err((err, durable)) = disk.write_and_sync(&records) {
            // Whole segments written before the failure are durable.
            let mut inner = self.inner.lock().unwrap();
            inner.durable_through = inner.durable_through.max(durable);
            disk.failed = Some((Instant::now() + RETRY_AFTER, err.kind()));
            return Err(err);
        }
        disk.failed = None;
        let mut inner = self.inner.lock().unwrap();
        inner.durable_through = inner.durable_through.max(last);
        Ok(true)
    }

    fn write_failed(&self, err: &io::Error) {
        if !self.failing.swap(true, Ordering::Relaxed) {
            let dir = self.dir();
            tracing::warn!(dir = ?dir, %err, "spool: writes fail, so it refuses messages (devices get 5.03, coap.unavailable counts them) until they succeed again");
        }
    }

    /// A write reached the disk and was synced.
    fn write_succeeded(&self) {
        if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed) {
            let dir = self.dir();
            tracing::info!(dir = ?dir, "spool: writes succeed again; it accepts messages again");
        }
    }

    /// Up to `max` durable records after `after_seq`, oldest first, not
    /// yet acknowledged.
    pub fn pending(&self, after_seq: u64, max: usize) -> Vec<Record> {
        let inner = self.inner.lock().unwrap();
        inner
            .queue
            .iter()
            .filter(|e| !e.acked && e.record.seq > after_seq)
            .take_while(|e| e.record.seq <= inner.durable_through)
            .take(max)
            .map(|e| e.record.clone())
            .collect()
    }

    /// The upstream acknowledged `seq`.
    pub fn ack(&self, seq: u64) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(e) = inner.queue.iter_mut().find(|e| e.record.seq == seq) {
            e.acked = true;
            self.stats.acked.fetch_add(1, Ordering::Relaxed);
        }
        while inner.queue.front().is_some_and(|e| e.acked) {
            let e = inner.queue.pop_front().unwrap();
            inner.bytes -= e.record.size();
            inner.done_through = e.record.seq;
        }
        drop(inner);
        self.publish_gauges();
    }

    /// Records the acknowledged watermark on disk and deletes the segments
    /// that hold nothing pending. May block on the disk: the broker's
    /// writer thread calls it now and then, `sync` after an eviction.
    pub fn checkpoint(&self) -> io::Result<()> {
        match &self.disk {
            Some(disk) => self.checkpoint_with(&mut disk.lock().unwrap()),
            None => Ok(()),
        }
    }

    /// [`Spool::checkpoint`] with the disk held; logs an outage once.
    fn checkpoint_with(&self, disk: &mut Disk) -> io::Result<()> {
        match self.try_checkpoint(disk) {
            Ok(()) => {
                if self.checkpoint_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(dir = %disk.dir.display(), "spool: checkpoints succeed again");
                }
                Ok(())
            }
            Err(err) => {
                if !self.checkpoint_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(dir = %disk.dir.display(), %err, "spool: checkpoints fail, so acknowledged segments stay on disk (a restart would send their messages again) until they succeed");
                }
                Err(err)
            }
        }
    }

    fn try_checkpoint(&self, disk: &mut Disk) -> io::Result<()> {
        let done = self.inner.lock().unwrap().done_through;
        if done != disk.checkpointed {
            write_watermark(&disk.dir, done)?;
            disk.checkpointed = done;
        }
        // Only now may the segments below the watermark go.
        while disk.segments.len() > 1 && disk.segments.front().is_some_and(|s| s.last_seq <= done) {
            let seg = disk.segments.pop_front().unwrap();
            let _ = fs::remove_file(&seg.path);
        }
        Ok(())
    }

    /// The sequence before the oldest pending record.
    pub fn done_through(&self) -> u64 {
        self.inner.lock().unwrap().done_through
    }

    fn publish_gauges(&self) {
        let inner = self.inner.lock().unwrap();
        self.stats.bytes.store(inner.bytes, Ordering::Relaxed);
        self.stats
            .records
            .store(inner.queue.len() as u64, Ordering::Relaxed);
    }
}

impl Inner {
    fn new(next_seq: u64) -> Inner {
        Inner {
            queue: VecDeque::new(),
            bytes: 0,
            next_seq,
            done_through: next_seq - 1,
            durable_through: next_seq - 1,
            release_wanted: false,
            failures: 0,
        }
    }
}

/// Every record up to `done` is acknowledged or evicted (atomic rename).
fn write_watermark(dir: &Path, done: u64) -> io::Result<()> {
    let tmp = dir.join("acked.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(format!("{done}\n").as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join("acked"))
}

impl Disk {
    /// Appends `records` (in order) and fdatasyncs them, starting a new
    /// segment whenever one fills. On an error the segment being written is
    /// cut back to what it held before (what earlier syncs made durable);
    /// the error comes with the last sequence number made durable anyway
    /// (in segments completed before it).
    fn write_and_sync(&mut self, records: &[Record]) -> Result<(), (io::Error, u64)> {
        let mut durable = 0;
        let mut buf = Vec::new();
        let mut first = 0;
        for (i, r) in records.iter().enumerate() {
            if self.file_bytes + buf.len() as u64 >= self.segment_bytes || self.abandon {
                self.write_chunk(&buf, &records[first..i])
                    .map_err(|e| (e, durable))?;
                durable = records[..i].last().map_or(durable, |r| r.seq);
                buf.clear();
                first = i;
                self.rotate(r.seq).map_err(|e| (e, durable))?;
            }
            encode_record(r, &mut buf);
        }
        self.write_chunk(&buf, &records[first..])
            .map_err(|e| (e, durable))
    }

    /// Writes `buf` (the encoded `records`) to the current segment and
    /// fdatasyncs it, all or nothing.
    fn write_chunk(&mut self, buf: &[u8], records: &[Record]) -> io::Result<()> {
        let Some(last) = records.last() else {
            return Ok(());
        };
        let before = self.file_bytes;
        let written = (&self.file).write_all(buf).and_then(|()| {
            // If this fails, Linux may have dropped the pages it could not
            // write and will not say so again: cut them off too.
            self.file.sync_data()
        });
        if let Err(err) = written {
            // Part of it may be in the file (ENOSPC after a short write, or
            // unsynced pages): the next record must follow a good one.
            if self.file.set_len(before).is_err() {
                self.abandon = true;
            }
            return Err(err);
        }
        self.file_bytes += buf.len() as u64;
        if let Some(seg) = self.segments.back_mut() {
            seg.last_seq = last.seq;
        }
        Ok(())
    }

    /// Starts a new segment (the old one is durable, or abandoned).
    fn rotate(&mut self, first_seq: u64) -> io::Result<()> {
        let name = first_seq.max(self.last_name + 1);
        let path = self.dir.join(format!("{name:020}.seg"));
        self.file = OpenOptions::new().create(true).append(true).open(&path)?;
        self.last_name = name;
        self.file_bytes = 0;
        self.abandon = false;
        self.segments.push_back(Segment { path, last_seq: 0 });
        Ok(())
    }
}

/// The number a segment file is named by (0 if it is not one of ours).
fn segment_number(path: &Path) -> u64 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn encode_record(r: &Record, out: &mut Vec<u8>) {
    let body_len = 8 + 2 + r.topic.len() + r.payload.len();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]); // the CRC, once the body is in
    out.extend_from_slice(&r.seq.to_be_bytes());
    out.extend_from_slice(&(r.topic.len() as u16).to_be_bytes());
    out.extend_from_slice(&r.topic);
    out.extend_from_slice(&r.payload);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// Reads a segment's records up to the first that is torn, corrupt, or not
/// numbered above the one before it; returns them, the length they cover,
/// and why reading stopped before the end of the file, if it did.
/// Sequence numbers only grow as records are written, so a repeat or a
/// step back within a segment is damage, not data: replaying it would
/// deliver a message twice.
fn read_segment(path: &Path, after: u64) -> io::Result<(Vec<Record>, u64, Option<&'static str>)> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut records = Vec::new();
    let mut at = 0usize;
    let mut stop = None;
    let mut previous = after;
    while at < data.len() {
        let Some(header) = data.get(at..at + 8) else {
            stop = Some("a record header ends early");
            break;
        };
        let len = u32::from_be_bytes(header[0..4].try_into().unwrap()) as usize;
        let crc = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let Some(body) = data.get(at + 8..at + 8 + len) else {
            stop = Some("a record ends early");
            break;
        };
        if len < 10 || crc32fast::hash(body) != crc {
            stop = Some("a record's checksum does not match");
            break;
        }
        let seq = u64::from_be_bytes(body[0..8].try_into().unwrap());
        if seq <= previous {
            stop = Some("a record's sequence number does not increase");
            break;
        }
        previous = seq;
        let tlen = usize::from(u16::from_be_bytes([body[8], body[9]]));
        if 10 + tlen > len {
            stop = Some("a record's topic length exceeds the record");
            break;
        }
        records.push(Record {
            seq,
            topic: Bytes::copy_from_slice(&body[10..10 + tlen]),
            payload: Bytes::copy_from_slice(&body[10 + tlen..]),
        });
        at += 8 + len;
    }
    Ok((records, at as u64, stop))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u32) -> (Bytes, Bytes) {
        (
            Bytes::from(format!("t/{i}")),
            Bytes::from(format!("payload-{i}")),
        )
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("m2m-spool-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn survives_a_restart_and_replays_in_order() {
        let dir = temp_dir("replay");
        {
            let s = Spool::open(&dir, 1 << 20).unwrap();
            for i in 0..10 {
                let (t, p) = msg(i);
                s.append(t, p).unwrap();
            }
            for r in s.pending(0, 4) {
                s.ack(r.seq);
            }
            s.checkpoint().unwrap();
        }
        let s = Spool::open(&dir, 1 << 20).unwrap();
        let pending = s.pending(0, 100);
        let topics: Vec<_> = pending.iter().map(|r| r.topic.clone()).collect();
        assert_eq!(topics, (4..10).map(|i| msg(i).0).collect::<Vec<_>>());
        // New appends continue the sequence.
        s.append(msg(10).0, msg(10).1).unwrap();
        assert_eq!(s.pending(0, 100).last().unwrap().seq, 11);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Found by the spool fuzz target: a whole record written twice (a
    /// repeated sequence number) was replayed twice.
    #[test]
    fn a_record_that_repeats_a_sequence_number_ends_the_replay() {
        let dir = temp_dir("repeat");
        {
            let s = Spool::open(&dir, 1 << 20).unwrap();
            for i in 0..2 {
                s.append(msg(i).0, msg(i).1).unwrap();
            }
        }
        let segment = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .unwrap();
        let mut data = fs::read(&segment).unwrap();
        let first_record = RECORD_HEADER + msg(0).0.len() + msg(0).1.len();
        data.extend_from_within(..first_record);
        fs::write(&segment, &data).unwrap();
        let s = Spool::open(&dir, 1 << 20).unwrap();
        let seqs: Vec<u64> = s.pending(0, 100).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2]);
        s.append(msg(2).0, msg(2).1).unwrap();
        assert_eq!(s.pending(2, 100)[0].seq, 3);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_and_earlier_records_kept() {
        let dir = temp_dir("torn");
        {
            let s = Spool::open(&dir, 1 << 20).unwrap();
            for i in 0..3 {
                let (t, p) = msg(i);
                s.append(t, p).unwrap();
            }
        }
        let seg = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let s = Spool::open(&dir, 1 << 20).unwrap();
        let kept: Vec<_> = s.pending(0, 100).into_iter().map(|r| r.topic).collect();
        assert_eq!(
            kept,
            vec![msg(0).0, msg(1).0],
            "the first two, not the torn third"
        );
        // The next record takes the torn one's sequence number and replays.
        s.append(msg(3).0, msg(3).1).unwrap();
        drop(s);
        let s = Spool::open(&dir, 1 << 20).unwrap();
        let kept: Vec<_> = s
            .pending(0, 100)
            .into_iter()
            .map(|r| (r.seq, r.topic))
            .collect();
        assert_eq!(kept, vec![(1, msg(0).0), (2, msg(1).0), (3, msg(3).0)]);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Finding: a restart with no traffic named the new segment after the
    /// empty newest one, so it was listed twice and the next checkpoint
    /// deleted the file being written.
    #[test]
    fn a_restart_without_traffic_keeps_the_live_segment() {
        let dir = temp_dir("restart-idle");
        drop(Spool::open(&dir, 1 << 20).unwrap());
        {
            let s = Spool::open(&dir, 1 << 20).unwrap();
            s.checkpoint().unwrap(); // a connected bridge does this every 200 ms
            for i in 0..10 {
                let (t, p) = msg(i);
                s.append(t, p).unwrap();
            }
            s.checkpoint().unwrap();
        }
        let s = Spool::open(&dir, 1 << 20).unwrap();
        let seqs: Vec<u64> = s.pending(0, 100).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn disk_bytes(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    /// Finding: with the upstream away, eviction bounded memory only; the
    /// disk kept every record and a restart brought the evicted back.
    #[test]
    fn the_bound_holds_on_disk_and_evicted_messages_stay_gone() {
        const MAX: u64 = 100_000;
        let dir = temp_dir("bound");
        let payload = Bytes::from(vec![b'x'; 300]);
        let size = |i: u32| (RECORD_HEADER + msg(i).0.len() + 300) as u64;
        let (segment, biggest) = (MAX / 8, size(5_999));
        {
            let s = Spool::open(&dir, MAX).unwrap();
            for i in 0..6_000 {
                s.append(msg(i).0, payload.clone()).unwrap();
                let on_disk = disk_bytes(&dir);
                assert!(
                    on_disk <= MAX + segment + biggest,
                    "after {i}: {on_disk} bytes on disk, bound {MAX} + a segment"
                );
            }
            let evicted = s.stats.evicted.load(Ordering::Relaxed);
            let kept = s.pending(0, usize::MAX);
            assert_eq!(evicted as usize + kept.len(), 6_000);
            assert!(s.stats.bytes.load(Ordering::Relaxed) <= MAX);
        }
        let s = Spool::open(&dir, MAX).unwrap();
        let replayed = s.pending(0, usize::MAX);
        let bytes: u64 = replayed.iter().map(Record::size).sum();
        assert!(bytes <= MAX, "replayed {bytes} bytes, bound {MAX}");
        // The newest, in order, ending with the last one appended.
        let topics: Vec<_> = replayed.iter().map(|r| r.topic.clone()).collect();
        let first = 6_000 - topics.len() as u32;
        assert_eq!(topics, (first..6_000).map(|i| msg(i).0).collect::<Vec<_>>());
        assert!(
            topics.len() >= (MAX / biggest) as usize - 1,
            "{} kept",
            topics.len()
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A sync that writes a whole backlog at once (after a slow disk, say)
    /// splits it into segments and deletes the evicted ones first; after it
    /// the disk holds the bound and about a segment.
    #[test]
    fn the_bound_holds_on_disk_when_one_sync_writes_a_backlog() {
        const MAX: u64 = 100_000;
        let dir = temp_dir("backlog");
        let payload = Bytes::from(vec![b'x'; 300]);
        let s = Spool::open(&dir, MAX).unwrap();
        for round in 0..3 {
            for i in 0..2_000 {
                s.append_deferred(msg(round * 2_000 + i).0, payload.clone())
                    .unwrap();
            }
            s.sync().unwrap();
            let on_disk = disk_bytes(&dir);
            let segment = MAX / 8;
            assert!(
                on_disk <= MAX + 2 * segment,
                "round {round}: {on_disk} bytes on disk, bound {MAX} + a segment"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn full_spool_evicts_oldest_and_counts() {
        let s = Spool::memory(300);
        for i in 0..20 {
            let (t, p) = msg(i);
            s.append(t, p).unwrap();
        }
        let evicted = s.stats.evicted.load(Ordering::Relaxed);
        let pending = s.pending(0, 100);
        assert!(evicted > 0);
        assert_eq!(evicted as usize + pending.len(), 20);
        assert_eq!(
            pending.last().unwrap().topic,
            msg(19).0,
            "the newest are kept"
        );
        assert!(s.stats.bytes.load(Ordering::Relaxed) <= 300);
    }
}
