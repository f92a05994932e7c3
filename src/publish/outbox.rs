//! A disk outbox: every result is written (and fsynced) here before it is published,
//! and removed only once the broker has acknowledged it. Files are named by a
//! zero-padded sequence number, so the oldest is first and order survives restarts.
//! A record that can never be published moves to the dead-letter folder beside it,
//! with a `SEQ.reason.txt`, so it never blocks the records behind it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

pub struct Outbox {
    dir: PathBuf,
    dead: PathBuf,
    max: usize,
    state: Mutex<u64>,
    wake: Condvar,
}

/// One stored message: its sequence number and JSON payload.
pub struct Entry {
    pub seq: u64,
    pub payload: Vec<u8>,
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
        let next = Self::seqs(dir)?.last().map_or(0, |s| s + 1);
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

    pub fn oldest(&self) -> Option<Entry> {
        let seqs = Self::seqs(&self.dir).ok()?;
        seqs.into_iter().find_map(|seq| {
            fs::read(self.path(seq))
                .ok()
                .map(|payload| Entry { seq, payload })
        })
    }

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

    pub fn len(&self) -> usize {
        Self::seqs(&self.dir).map_or(0, |s| s.len())
    }

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
        let first = ob.oldest().unwrap();
        assert_eq!(first.payload, b"1");
        ob.remove(first.seq);
        assert_eq!(ob.oldest().unwrap().payload, b"2");
        assert_eq!(
            ob.push(b"x").unwrap(),
            4,
            "numbering continues after a restart"
        );
        let head = ob.oldest().unwrap().seq;
        ob.dead_letter(head, "too big");
        assert_eq!(ob.dead_letters(), 1);
        assert_ne!(
            ob.oldest().unwrap().seq,
            head,
            "the next record is the head now"
        );
        assert_eq!(
            fs::read_to_string(dead.join(format!("{head:016}.reason.txt"))).unwrap(),
            "too big\n"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
