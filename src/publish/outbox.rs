//! A disk outbox: every result is written (and fsynced) here before it is published,
//! and removed only once the broker has acknowledged it. Files are named by a
//! zero-padded sequence number, so the oldest is first and order survives restarts.
//! A record that can never be published moves to the dead-letter folder beside it,
//! with a `SEQ.reason.txt`, so it never blocks the records behind it.

use crate::util::limited::{ReadError, read_file};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

/// Results on disk, oldest first, until the broker acknowledges them.
pub struct Outbox {
    dir: PathBuf,
    dead: PathBuf,
    max: usize,
    state: Mutex<u64>,
    wake: Condvar,
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
    /// `max` is at least 1 (the config check enforces it; 0 would drop every result).
    pub fn open(dir: &Path, dead: &Path, max: usize) -> std::io::Result<Arc<Self>> {
        fs::create_dir_all(dir)?;
        fs::create_dir_all(dead)?;
        // Remove half-written leftovers of a crash.
        for e in fs::read_dir(dir)?.flatten() {
            if e.path().extension().is_some_and(|x| x == "tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
        // Numbering goes past every name that looks like a record, a folder
        // included, so that a write never lands on one.
        let next = fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .into_string()
                    .ok()?
                    .strip_suffix(".json")?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .map_or(0, |s| s + 1);
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            dead: dead.to_path_buf(),
            max: max.max(1),
            state: Mutex::new(next),
            wake: Condvar::new(),
        }))
    }

    fn seqs(dir: &Path) -> std::io::Result<Vec<u64>> {
        let mut v: Vec<u64> = fs::read_dir(dir)?
            .flatten()
            // Only plain files are records (a folder named like one is not).
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".json")?.parse().ok()
            })
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016}.json"))
    }

    /// Appends a payload durably. When full, the oldest entry is dropped (and logged):
    /// a bounded disk beats an appliance that stops.
    pub fn push(&self, payload: &[u8]) -> std::io::Result<u64> {
        let mut next = self.state.lock().expect("outbox lock");
        // Never onto something already there (a folder named like a record).
        while fs::symlink_metadata(self.path(*next)).is_ok() {
            *next += 1;
        }
        let seq = *next;
        let tmp = self.dir.join(format!("{seq:016}.tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(payload)?;
        f.sync_all()?;
        fs::rename(&tmp, self.path(seq))?;
        *next += 1;
        let seqs = Self::seqs(&self.dir)?;
        if seqs.len() > self.max {
            for old in &seqs[..seqs.len() - self.max] {
                tracing::warn!(seq = old, "outbox full: dropping the oldest result");
                let _ = fs::remove_file(self.path(*old));
            }
        }
        self.wake.notify_all();
        Ok(seq)
    }

    /// The oldest record, read through the bounded reader: one over `max_bytes`
    /// comes back as an error (to be dead-lettered) without being read whole.
    pub fn oldest(&self, max_bytes: usize) -> Option<Entry> {
        let seqs = Self::seqs(&self.dir).ok()?;
        seqs.into_iter()
            .find_map(|seq| match read_file(&self.path(seq), max_bytes) {
                Ok(payload) => Some(Entry {
                    seq,
                    payload: Ok(payload),
                }),
                Err(ReadError::TooLarge { max, .. }) => Some(Entry {
                    seq,
                    payload: Err(format!("record over the {max}-byte payload budget")),
                }),
                Err(ReadError::Io { .. } | ReadError::NotAFile { .. }) => None,
            })
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
        let _ = fs::remove_file(self.path(seq));
    }

    /// Moves a record that cannot be published to the dead-letter folder, with its
    /// reason beside it. If even that fails, the record is removed: a stuck head
    /// would stop every later result.
    pub fn dead_letter(&self, seq: u64, why: &str) {
        let name = format!("{seq:016}");
        let _ = fs::write(
            self.dead.join(format!("{name}.reason.txt")),
            format!("{why}\n"),
        );
        if fs::rename(self.path(seq), self.dead.join(format!("{name}.json"))).is_err() {
            let _ = fs::remove_file(self.path(seq));
        }
    }

    /// Records in the dead-letter folder.
    pub fn dead_letters(&self) -> usize {
        Self::seqs(&self.dead).map_or(0, |s| s.len())
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        Self::seqs(&self.dir).map_or(0, |s| s.len())
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for a push, or the timeout.
    pub fn wait(&self, timeout: std::time::Duration) {
        let guard = self.state.lock().expect("outbox lock");
        let _ = self.wake.wait_timeout(guard, timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_across_reopen_and_bounds_its_size() {
        let dir = std::env::temp_dir().join(format!("marquee-outbox-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
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
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_oversized_record_is_refused_unread_and_a_folder_is_no_record() {
        let dir = std::env::temp_dir().join(format!("marquee-outbox-big-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
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
        fs::remove_dir_all(&dir).unwrap();
    }
}
