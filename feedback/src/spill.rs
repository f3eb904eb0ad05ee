//! The on-disk spill: where feedback events wait, durably and in order, while
//! Redis is unreachable, so that an outage never loses a label.
//!
//! A bounded, append-only queue of [`Entry`] values in one file. An append
//! returns only once the record is on disk (`write_all` + `sync_data`), so an
//! entry the gateway has answered "spilled" survives a crash of the process or
//! the machine.
//!
//! # File format
//!
//! One record per line: eight lowercase hex digits of the CRC-32 (IEEE) of the
//! JSON text, one space, the entry as compact JSON, a newline:
//!
//! ```text
//! 3f1c9a0e {"stream":"instructd:feedback","event_id":"e1","fields":[["event","{…}"]]}\n
//! ```
//!
//! Compact JSON never holds a raw newline (string newlines are escaped), so a
//! newline only ever ends a record. A crash mid-append can leave a torn last
//! record (no newline, or a checksum that does not match); opening the file
//! drops it by truncating the file to the end of the last good record, so that
//! later appends never follow a torn line. A bad record *between* good ones
//! (disk corruption, not a crash) is skipped and logged; the good records after
//! it are kept.
//!
//! Removing the first records ([`Spill::remove_first`]) rewrites the rest to
//! `<path>.tmp`, fsyncs it, renames it over the file and fsyncs the directory,
//! so a crash leaves either the old or the new file, never a mix; when every
//! record goes, the file is truncated to zero in place. A crash before the
//! removal is durable can only bring back records that were already replayed,
//! which the event log's dedupe makes harmless.
//!
//! An exclusive advisory lock on `<path>.lock` keeps two processes (or two
//! `Spill`s in one process) from appending to the same file.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::event_log::Entry;

#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// The record would take the file past its capacity.
    #[error("the spill file is full ({capacity_bytes} bytes)")]
    Full { capacity_bytes: u64 },
    #[error("spill file I/O failed: {0}")]
    Io(#[from] io::Error),
}

pub struct Spill {
    path: PathBuf,
    tmp_path: PathBuf,
    capacity_bytes: u64,
    inner: Mutex<Inner>,
    /// Held (flock) for the spill's lifetime; released when it drops.
    _lock: File,
}

struct Inner {
    /// The append handle; `None` after a rewrite whose reopen failed (the next
    /// operation reopens it).
    file: Option<File>,
    records: VecDeque<Entry>,
    /// The file's length as far as good data goes.
    bytes: u64,
    /// A failed append could not be rolled back: the file may be longer than
    /// `bytes` and must be cut back before the next append.
    dirty: bool,
}

impl Spill {
    /// Opens (or creates) the spill at `path`, keeping the good records of an
    /// existing file and dropping a torn last record. The file may be larger
    /// than `capacity_bytes` (capacity lowered in the config): appends then
    /// fail until replay drains it.
    pub fn open(path: &Path, capacity_bytes: u64) -> io::Result<Spill> {
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(with_suffix(path, ".lock"))?;
        lock.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("spill {} is in use by another process or handle", path.display()),
            ),
            std::fs::TryLockError::Error(e) => e,
        })?;

        let tmp_path = with_suffix(path, ".tmp");
        match std::fs::remove_file(&tmp_path) {
            Ok(()) => {
                tracing::info!(path = %tmp_path.display(), "removed the leftover of an interrupted spill rewrite")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }

        let mut file = OpenOptions::new().create(true).read(true).append(true).open(path)?;
        let mut contents = Vec::new();
        file.read_to_end(&mut contents)?;
        let scan = scan(&contents);
        if scan.skipped > 0 {
            tracing::error!(
                path = %path.display(),
                skipped = scan.skipped,
                "spill: skipped corrupt records between good ones"
            );
        }
        if scan.good_end < contents.len() as u64 {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = contents.len() as u64 - scan.good_end,
                "spill: dropped a torn last record"
            );
            file.set_len(scan.good_end)?;
            file.sync_all()?;
        }
        // A newly created file must survive a crash too.
        sync_dir(path)?;
        Ok(Spill {
            path: path.to_path_buf(),
            tmp_path,
            capacity_bytes,
            inner: Mutex::new(Inner { file: Some(file), records: scan.records, bytes: scan.good_end, dirty: false }),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Bytes the file holds now.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().records.is_empty()
    }

    /// Every waiting entry, oldest first.
    pub fn pending(&self) -> Vec<Entry> {
        self.front(usize::MAX)
    }

    /// The first `n` waiting entries, oldest first.
    pub fn front(&self, n: usize) -> Vec<Entry> {
        self.lock().records.iter().take(n).cloned().collect()
    }

    /// Appends `entry` and returns once it is on disk. Fails with
    /// [`SpillError::Full`] (writing nothing) when it would not fit.
    pub fn append(&self, entry: &Entry) -> Result<(), SpillError> {
        let line = encode(entry)?;
        let len = line.len() as u64;
        let mut inner = self.lock();
        if inner.bytes.saturating_add(len) > self.capacity_bytes {
            return Err(SpillError::Full { capacity_bytes: self.capacity_bytes });
        }
        let bytes = inner.bytes;
        if inner.dirty {
            let file = self.file(&mut inner)?;
            file.set_len(bytes)?;
            file.sync_all()?;
            inner.dirty = false;
        }
        let file = self.file(&mut inner)?;
        if let Err(e) = file.write_all(&line).and_then(|()| file.sync_data()) {
            // Cut a partial record off, or the next append would follow it
            // and be read back as part of one corrupt line.
            let rolled_back = file.set_len(bytes).and_then(|()| file.sync_all()).is_ok();
            inner.dirty = !rolled_back;
            return Err(SpillError::Io(e));
        }
        inner.bytes += len;
        inner.records.push_back(entry.clone());
        Ok(())
    }

    /// Removes the first `n` entries (fewer if fewer wait) durably; returns how
    /// many went. If this fails before the file was replaced nothing changed;
    /// if it fails after (syncing the directory, reopening), the entries are
    /// gone here and the error says their removal may not survive a crash.
    pub fn remove_first(&self, n: usize) -> io::Result<usize> {
        self.remove_where(|i, _| i < n)
    }

    /// Removes, durably, every waiting entry logged under `user`'s consent (a
    /// withdrawal reaches what is still on this disk); returns how many went.
    pub fn remove_user(&self, user: &str) -> io::Result<usize> {
        self.remove_where(|_, entry| entry.consent.as_ref().is_some_and(|c| c.user == user))
    }

    /// Removes the entries `doomed(position, entry)` picks, rewriting the file
    /// (see the module docs); the same failure semantics as [`remove_first`](Self::remove_first).
    fn remove_where(&self, doomed: impl Fn(usize, &Entry) -> bool) -> io::Result<usize> {
        let mut inner = self.lock();
        let keep: Vec<bool> = inner.records.iter().enumerate().map(|(i, e)| !doomed(i, e)).collect();
        let n = keep.iter().filter(|k| !**k).count();
        if n == 0 {
            return Ok(0);
        }
        if n == inner.records.len() {
            let file = self.file(&mut inner)?;
            file.set_len(0)?;
            file.sync_all()?;
            inner.records.clear();
            inner.bytes = 0;
            inner.dirty = false;
            return Ok(n);
        }

        let mut tmp = OpenOptions::new().create(true).write(true).truncate(true).open(&self.tmp_path)?;
        let mut kept = 0u64;
        for (entry, _) in inner.records.iter().zip(&keep).filter(|(_, k)| **k) {
            let line = encode(entry)?;
            tmp.write_all(&line)?;
            kept += line.len() as u64;
        }
        tmp.sync_all()?;
        drop(tmp);
        std::fs::rename(&self.tmp_path, &self.path)?;

        // The file is replaced: the old handle points at the unlinked inode.
        inner.file = None;
        let mut keep = keep.into_iter();
        inner.records.retain(|_| keep.next().unwrap_or(true));
        inner.bytes = kept;
        inner.dirty = false;
        sync_dir(&self.path)?;
        self.file(&mut inner)?;
        Ok(n)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file<'a>(&self, inner: &'a mut Inner) -> io::Result<&'a mut File> {
        if inner.file.is_none() {
            inner.file = Some(OpenOptions::new().create(true).append(true).open(&self.path)?);
        }
        inner.file.as_mut().ok_or_else(|| io::Error::other("spill file handle missing"))
    }
}

/// One record's bytes: `crc32hex SP json LF`.
fn encode(entry: &Entry) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(entry).map_err(io::Error::other)?;
    let mut line = format!("{:08x} ", crc32(&json)).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    Ok(line)
}

/// A record's entry, if the line (without its newline) is intact.
fn decode(line: &[u8]) -> Option<Entry> {
    let (head, json) = (line.get(..8)?, line.get(9..)?);
    if line.get(8) != Some(&b' ') {
        return None;
    }
    let crc = u32::from_str_radix(std::str::from_utf8(head).ok()?, 16).ok()?;
    if crc != crc32(json) {
        return None;
    }
    serde_json::from_slice(json).ok()
}

struct Scan {
    records: VecDeque<Entry>,
    /// Where the last good record ends: everything after it is torn.
    good_end: u64,
    /// Bad records followed by good ones.
    skipped: usize,
}

fn scan(contents: &[u8]) -> Scan {
    let mut scan = Scan { records: VecDeque::new(), good_end: 0, skipped: 0 };
    let mut bad_since_good = 0;
    let mut pos = 0;
    while pos < contents.len() {
        let Some(newline) = contents[pos..].iter().position(|&b| b == b'\n') else {
            break; // torn: no newline
        };
        let end = pos + newline + 1;
        match decode(&contents[pos..end - 1]) {
            Some(entry) => {
                scan.records.push_back(entry);
                scan.good_end = end as u64;
                scan.skipped += bad_since_good;
                bad_since_good = 0;
            }
            None => bad_since_good += 1,
        }
        pos = end;
    }
    scan
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Makes a create, rename or truncate of a file in `path`'s directory durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// CRC-32 (IEEE 802.3, reflected, as in zlib).
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |crc, &b| TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> Entry {
        Entry {
            stream: "s".to_string(),
            event_id: format!("e{i}"),
            fields: vec![("event".to_string(), format!("{{\"n\":{i},\"text\":\"line\\nbreak\"}}"))],
            consent: None,
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn survives_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let spill = Spill::open(&path, 1 << 20).unwrap();
        for i in 0..5 {
            spill.append(&entry(i)).unwrap();
        }
        let bytes = spill.bytes();
        drop(spill);
        let spill = Spill::open(&path, 1 << 20).unwrap();
        assert_eq!(spill.pending(), (0..5).map(entry).collect::<Vec<_>>());
        assert_eq!(spill.bytes(), bytes);
        spill.append(&entry(5)).unwrap();
        assert_eq!(spill.len(), 6);
    }

    #[test]
    fn a_second_handle_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let _spill = Spill::open(&path, 1 << 20).unwrap();
        let err = Spill::open(&path, 1 << 20).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_appends_continue_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let spill = Spill::open(&path, 1 << 20).unwrap();
        spill.append(&entry(0)).unwrap();
        spill.append(&entry(1)).unwrap();
        let good = spill.bytes();
        drop(spill);
        // A crash halfway through writing the third record.
        let third = encode(&entry(2)).unwrap();
        OpenOptions::new().append(true).open(&path).unwrap().write_all(&third[..third.len() / 2]).unwrap();

        let spill = Spill::open(&path, 1 << 20).unwrap();
        assert_eq!(spill.pending(), vec![entry(0), entry(1)]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good, "the torn tail is cut off");
        spill.append(&entry(3)).unwrap();
        drop(spill);
        let spill = Spill::open(&path, 1 << 20).unwrap();
        assert_eq!(spill.pending(), vec![entry(0), entry(1), entry(3)]);
    }

    #[test]
    fn a_torn_line_ending_in_a_newline_is_caught_by_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let spill = Spill::open(&path, 1 << 20).unwrap();
        spill.append(&entry(0)).unwrap();
        drop(spill);
        let mut third = encode(&entry(1)).unwrap();
        let mid = third.len() / 2;
        third[mid] ^= 0x01; // a flipped bit in the JSON
        OpenOptions::new().append(true).open(&path).unwrap().write_all(&third).unwrap();
        let spill = Spill::open(&path, 1 << 20).unwrap();
        assert_eq!(spill.pending(), vec![entry(0)]);
    }

    #[test]
    fn a_corrupt_record_between_good_ones_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let mut contents = encode(&entry(0)).unwrap();
        contents.extend_from_slice(b"deadbeef {\"garbage\":true}\n");
        contents.extend_from_slice(&encode(&entry(1)).unwrap());
        std::fs::write(&path, &contents).unwrap();
        let spill = Spill::open(&path, 1 << 20).unwrap();
        assert_eq!(spill.pending(), vec![entry(0), entry(1)]);
        // A rewrite leaves the corrupt record behind.
        spill.remove_first(1).unwrap();
        drop(spill);
        let spill = Spill::open(&path, 1 << 20).unwrap();
        assert_eq!(spill.pending(), vec![entry(1)]);
        assert_eq!(spill.bytes(), encode(&entry(1)).unwrap().len() as u64);
    }

    #[test]
    fn capacity_refuses_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let one = encode(&entry(0)).unwrap().len() as u64;
        let spill = Spill::open(&path, one * 2 + 1).unwrap();
        spill.append(&entry(0)).unwrap();
        spill.append(&entry(1)).unwrap();
        assert!(
            matches!(spill.append(&entry(2)), Err(SpillError::Full { capacity_bytes }) if capacity_bytes == one * 2 + 1)
        );
        assert_eq!(spill.pending(), vec![entry(0), entry(1)]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), spill.bytes());
    }

    #[test]
    fn remove_first_is_durable_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let spill = Spill::open(&path, 1 << 20).unwrap();
        for i in 0..5 {
            spill.append(&entry(i)).unwrap();
        }
        assert_eq!(spill.remove_first(2).unwrap(), 2);
        spill.append(&entry(5)).unwrap();
        assert_eq!(spill.pending(), vec![entry(2), entry(3), entry(4), entry(5)]);
        drop(spill);
        let spill = Spill::open(&path, 1 << 20).unwrap();
        assert_eq!(spill.pending(), vec![entry(2), entry(3), entry(4), entry(5)]);
        assert!(!with_suffix(&path, ".tmp").exists());
        assert_eq!(spill.remove_first(10).unwrap(), 4);
        assert!(spill.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        spill.append(&entry(6)).unwrap();
        drop(spill);
        assert_eq!(Spill::open(&path, 1 << 20).unwrap().pending(), vec![entry(6)]);
    }

    #[test]
    fn a_leftover_rewrite_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let spill = Spill::open(&path, 1 << 20).unwrap();
        spill.append(&entry(0)).unwrap();
        drop(spill);
        // A crash after writing the temp file, before the rename.
        std::fs::write(with_suffix(&path, ".tmp"), encode(&entry(9)).unwrap()).unwrap();
        let spill = Spill::open(&path, 1 << 20).unwrap();
        assert_eq!(spill.pending(), vec![entry(0)]);
        assert!(!with_suffix(&path, ".tmp").exists());
    }
}
