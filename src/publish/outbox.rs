//! A disk outbox: every result is written (and fsynced) here before it is published,
//! and removed only once the broker has acknowledged it. Files are named by a
//! zero-padded sequence number, so the oldest is first and order survives restarts.
//! A record that can never be published moves to the dead-letter folder beside it,
//! with a `SEQ.reason.txt`, so it never blocks the records behind it.

use crate::util::limited::{ReadError, read_file};
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

/// Results on disk, oldest first, until the broker acknowledges them.
pub struct Outbox {
    dir: PathBuf,
    dead: PathBuf,
    max: usize,
    index: Mutex<Index>,
    wake: Condvar,
}

/// The records on disk, kept in memory so that no step reads the directory: a
/// backlog of n results drains in O(n log n), not O(n²).
struct Index {
    /// The next record's number.
    next: u64,
    /// The records waiting, oldest first.
    seqs: BTreeSet<u64>,
}

/// One stored message: its sequence number and JSON payload, or why it cannot be
/// read (too large).
pub struct Entry {
    /// The entry's number.
    pub seq: u64,
    /// Its bytes, or why they could not be read.
    pub payload: Result<Vec<u8>, String>,
}

impl Outbox {
    /// Opens (or makes) the outbox and rebuilds its index from the files. `max` is
    /// at least 1 (the config check enforces it; 0 would drop every result).
    pub fn open(dir: &Path, dead: &Path, max: usize) -> std::io::Result<Arc<Self>> {
        fs::create_dir_all(dir)?;
        fs::create_dir_all(dead)?;
        let mut seqs = BTreeSet::new();
        // Numbering goes past every name that looks like a record, a folder
        // included, so that a write never lands on one.
        let mut next = 0;
        for e in fs::read_dir(dir)?.flatten() {
            let name = e.file_name().into_string().unwrap_or_default();
            if name.ends_with(".tmp") {
                // A half-written leftover of a crash.
                let _ = fs::remove_file(e.path());
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".json")
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            next = next.max(seq + 1);
            // Only plain files are records (a folder named like one is not).
            if e.file_type().is_ok_and(|t| t.is_file()) {
                seqs.insert(seq);
            }
        }
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            dead: dead.to_path_buf(),
            max: max.max(1),
            index: Mutex::new(Index { next, seqs }),
            wake: Condvar::new(),
        }))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016}.json"))
    }

    /// Appends a payload durably. When full, the oldest entry is dropped (and logged):
    /// a bounded disk beats an appliance that stops.
    pub fn push(&self, payload: &[u8]) -> std::io::Result<u64> {
        let mut index = self.index();
        // Never onto something already there (a folder named like a record).
        while fs::symlink_metadata(self.path(index.next)).is_ok() {
            index.next += 1;
        }
        let seq = index.next;
        let tmp = self.dir.join(format!("{seq:016}.tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(payload)?;
        f.sync_all()?;
        fs::rename(&tmp, self.path(seq))?;
        index.next += 1;
        index.seqs.insert(seq);
        while index.seqs.len() > self.max {
            let Some(old) = index.seqs.pop_first() else {
                break;
            };
            tracing::warn!(seq = old, "outbox full: dropping the oldest result");
            let _ = fs::remove_file(self.path(old));
        }
        self.wake.notify_all();
        Ok(seq)
    }

    /// The oldest readable record, read through the bounded reader: one over
    /// `max_bytes` comes back as an error (to be dead-lettered) without being read
    /// whole. A record that is gone or is no file (changed by hand) leaves the index;
    /// one that cannot be read now is passed over and tried again next time.
    pub fn oldest(&self, max_bytes: usize) -> Option<Entry> {
        use std::ops::Bound::{Excluded, Unbounded};
        let mut after = None;
        loop {
            let seq = {
                let index = self.index();
                match after {
                    None => index.seqs.first().copied(),
                    Some(a) => index.seqs.range((Excluded(a), Unbounded)).next().copied(),
                }
            }?;
            let payload = match read_file(&self.path(seq), max_bytes) {
                Ok(payload) => Ok(payload),
                Err(ReadError::TooLarge { max, .. }) => {
                    Err(format!("record over the {max}-byte payload budget"))
                }
                Err(ReadError::NotAFile { .. }) => {
                    self.index().seqs.remove(&seq);
                    continue;
                }
                Err(ReadError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    self.index().seqs.remove(&seq);
                    continue;
                }
                Err(ReadError::Io { .. }) => {
                    after = Some(seq);
                    continue;
                }
            };
            return Some(Entry { seq, payload });
        }
    }

    /// Whether a record could be written now (a small file written, synced and
    /// removed): how a full disk is seen to have room again.
    pub fn probe(&self) -> std::io::Result<()> {
        let tmp = self.dir.join("probe.tmp");
        let out = fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&[b'{'; 4096]).and_then(|()| f.sync_all()));
        let _ = fs::remove_file(&tmp);
        out
    }

    /// Removes entry `seq` (delivered).
    pub fn remove(&self, seq: u64) {
        self.index().seqs.remove(&seq);
        let _ = fs::remove_file(self.path(seq));
    }

    /// Moves a record that cannot be published to the dead-letter folder, with its
    /// reason beside it. If even that fails, the record is removed: a stuck head
    /// would stop every later result.
    pub fn dead_letter(&self, seq: u64, why: &str) {
        self.index().seqs.remove(&seq);
        let name = format!("{seq:016}");
        let _ = fs::write(
            self.dead.join(format!("{name}.reason.txt")),
            format!("{why}\n"),
        );
        if fs::rename(self.path(seq), self.dead.join(format!("{name}.json"))).is_err() {
            let _ = fs::remove_file(self.path(seq));
        }
    }

    /// Records in the dead-letter folder (a listing of that folder: for the stats).
    pub fn dead_letters(&self) -> usize {
        fs::read_dir(&self.dead).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.index().seqs.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for a push, or the timeout.
    pub fn wait(&self, timeout: std::time::Duration) {
        let guard = self.index();
        let _ = self.wake.wait_timeout(guard, timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_across_reopen_and_bounds_its_size() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("outbox");
        let dead = dir.join("dead");
        let ob = Outbox::open(&dir, &dead, 3).unwrap();
        for i in 0..4 {
            ob.push(format!("{i}").as_bytes()).unwrap();
        }
        assert_eq!(ob.len(), 3, "the oldest was dropped");
        drop(ob);
        let ob = Outbox::open(&dir, &dead, 3).unwrap();
        let first = ob.oldest(100).unwrap();
        assert_eq!(first.payload.unwrap(), b"1");
        ob.remove(first.seq);
        assert_eq!(ob.oldest(100).unwrap().payload.unwrap(), b"2");
        assert_eq!(
            ob.push(b"x").unwrap(),
            4,
            "numbering continues after a restart"
        );
        let head = ob.oldest(100).unwrap().seq;
        ob.dead_letter(head, "too big");
        assert_eq!(ob.dead_letters(), 1);
        assert_ne!(
            ob.oldest(100).unwrap().seq,
            head,
            "the next record is the head now"
        );
        assert_eq!(
            fs::read_to_string(dead.join(format!("{head:016}.reason.txt"))).unwrap(),
            "too big\n"
        );
    }

    #[test]
    fn an_oversized_record_is_refused_unread_and_a_folder_is_no_record() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("outbox");
        let ob = Outbox::open(&dir, &dir.join("dead"), 10).unwrap();
        fs::create_dir_all(dir.join(format!("{:016}.json", 0))).unwrap();
        assert_eq!(ob.len(), 0, "a folder named like a record is not one");
        let seq = ob.push(&[b' '; 64]).unwrap();
        // A sparse 4 GiB record: refused after reading one byte past the budget.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(ob.path(seq))
            .unwrap();
        f.set_len(4 << 30).unwrap();
        let e = ob.oldest(1024).unwrap();
        assert!(e.payload.unwrap_err().contains("1024-byte"));
        ob.probe().unwrap();
    }

    #[test]
    fn a_backlog_of_100k_drains_in_order_from_the_index_built_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, dead) = (dir.path().join("outbox"), dir.path().join("dead"));
        fs::create_dir_all(&inbox).unwrap();
        // A long outage's backlog, as a restart finds it (written without fsync:
        // only the reading side is under test).
        const N: u64 = 100_000;
        for seq in 0..N {
            fs::write(
                inbox.join(format!("{:016}.json", seq + 10)),
                seq.to_string(),
            )
            .unwrap();
        }
        let ob = Outbox::open(&inbox, &dead, 200_000).unwrap();
        assert_eq!(ob.len(), N as usize);
        // A file that appears behind the outbox's back is not seen until the next
        // open: no step lists the folder again.
        fs::write(inbox.join(format!("{:016}.json", 1)), "stray").unwrap();
        let late = ob.push(b"late").unwrap();
        assert_eq!(late, N + 10, "numbering continues after the backlog");
        let mut expected = 10;
        while let Some(e) = ob.oldest(100) {
            let want = if e.seq == late {
                "late".to_string()
            } else {
                (e.seq - 10).to_string()
            };
            assert_eq!(e.seq, expected, "in order");
            assert_eq!(e.payload.unwrap(), want.as_bytes());
            ob.remove(e.seq);
            expected += 1;
        }
        assert_eq!(expected, N + 11, "every record came out once");
        assert!(ob.is_empty());
        drop(ob);
        let ob = Outbox::open(&inbox, &dead, 10).unwrap();
        assert_eq!(ob.oldest(100).unwrap().payload.unwrap(), b"stray");
    }
}
