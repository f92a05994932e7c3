//! The hot folder: images dropped into a directory are classified, then moved to
//! `done/` or to `failed/` (with `NAME.reason.txt` saying why). An optional sidecar
//! `NAME.txt` (plain overview) or `NAME.json` (`{"overview": "..."}`) travels with it.
//! A file is read only after its size and mtime have held still for `settle_ms`, so a
//! poster still being copied in is never read half-written. A file that fails to
//! decode is watched a little longer beside the others (a slow writer with long
//! pauses makes it change, and it is tried again once it settles); one that stays
//! unchanged goes to `failed/`. No file ever holds up the ones behind it. Only this
//! thread moves files: the classifier hands each outcome back over a channel.

use crate::config::FolderConfig;
use crate::health::{Health, Heartbeat};
use crate::pipeline::{Job, Poster, Queue, Source};
use crate::preprocess::image::{MAX_BYTES, decode};
use crate::util::limited::read_file;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

const SIDECARS: [&str; 2] = ["txt", "json"];
const TEMP_SUFFIXES: [&str; 4] = [".tmp", ".part", ".partial", ".crdownload"];
/// Largest sidecar read (bytes); the pipeline clips the overview further.
const SIDECAR_MAX: usize = 4 << 20;

/// A hot folder: poster files in, results out, files to done/ or failed/.
pub struct Folder {
    dir: PathBuf,
    done: PathBuf,
    failed: PathBuf,
    poll: Duration,
    settle: Duration,
}

/// A file the classifier is done with, on its way back to the folder thread, which
/// moves it: the classifier thread does no file moves of the folder's.
struct Finished {
    path: PathBuf,
    sidecars: Vec<PathBuf>,
    outcome: Result<(), String>,
}

/// A file that failed to decode, watched for a change until `until`.
struct Junk {
    seen: Seen,
    until: Instant,
    reason: String,
    sidecars: Vec<PathBuf>,
}

/// Where a scan sends a file: the queue, and the way its outcome comes back.
struct Handoff<'a> {
    queue: &'a Queue,
    finished: &'a crossbeam_channel::Sender<Finished>,
    heartbeat: &'a Heartbeat,
    stop: &'a AtomicBool,
}

/// After a stop, how long the folder waits for the next queued poster's outcome
/// before it leaves the rest in the inbox (a scan takes seconds at most).
const DRAIN_SILENCE: Duration = Duration::from_secs(20);

/// The shortest watch of a file that failed to decode.
const JUNK_GRACE_MIN: Duration = Duration::from_secs(3);

#[derive(PartialEq, Clone, Copy)]
struct Seen {
    len: u64,
    mtime: SystemTime,
    since: SystemTime,
}

impl Folder {
    /// Opens the inbox and its done/ and failed/ folders (made if missing).
    pub fn new(c: &FolderConfig) -> std::io::Result<Self> {
        let f = Self {
            dir: c.path.clone(),
            done: c.path.join("done"),
            failed: c.path.join("failed"),
            poll: Duration::from_millis(c.poll_ms),
            settle: Duration::from_millis(c.settle_ms),
        };
        fs::create_dir_all(&f.done)?;
        fs::create_dir_all(&f.failed)?;
        Ok(f)
    }

    /// Scans until `stop`; blocks on a full queue (back-pressure). The stop flag and
    /// the heartbeat are looked at for every file, so a folder of thousands of files
    /// never silences the watchdog or delays a shutdown.
    pub fn run(
        self,
        queue: Queue,
        health: Arc<Health>,
        heartbeat: Heartbeat,
        stop: Arc<AtomicBool>,
    ) {
        let mut seen: HashMap<PathBuf, Seen> = HashMap::new();
        let mut junk: HashMap<PathBuf, Junk> = HashMap::new();
        let mut in_flight: HashSet<PathBuf> = HashSet::new();
        let (finished, finishing) = crossbeam_channel::unbounded::<Finished>();
        health.set_folder(true, &format!("watching {}", self.dir.display()));
        while !stop.load(Ordering::SeqCst) {
            heartbeat.beat();
            for f in finishing.try_iter() {
                self.put_away(f, &mut in_flight);
            }
            match self.candidates() {
                Ok(files) => {
                    let now = SystemTime::now();
                    let present: HashSet<&PathBuf> = files.iter().map(|(f, _)| f).collect();
                    seen.retain(|p, _| present.contains(p));
                    junk.retain(|p, _| present.contains(p));
                    for (path, meta) in &files {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        heartbeat.beat();
                        if in_flight.contains(path) {
                            continue;
                        }
                        let cur = Seen {
                            len: meta.len(),
                            mtime: meta.modified().unwrap_or(now),
                            since: now,
                        };
                        if let Some(j) = junk.get(path) {
                            if j.seen.len != cur.len || j.seen.mtime != cur.mtime {
                                // Read too early (a writer pausing longer than
                                // `settle_ms`), not broken: it settles again.
                                tracing::info!(file = %path.display(), "unreadable while still being written; retrying once it settles");
                                junk.remove(path);
                            } else if Instant::now() >= j.until {
                                let j = junk.remove(path).expect("junk entry");
                                self.fail(path, &j.sidecars, &j.reason);
                                continue;
                            } else {
                                continue;
                            }
                        }
                        let entry = seen.entry(path.clone()).or_insert(cur);
                        if entry.len != cur.len || entry.mtime != cur.mtime {
                            *entry = cur;
                            continue;
                        }
                        let still = now.duration_since(entry.since).unwrap_or_default()
                            >= self.settle
                            && now.duration_since(cur.mtime).unwrap_or_default() >= self.settle;
                        if still {
                            seen.remove(path);
                            in_flight.insert(path.clone());
                            let to = Handoff {
                                queue: &queue,
                                finished: &finished,
                                heartbeat: &heartbeat,
                                stop: &stop,
                            };
                            match self.submit(path, &to) {
                                Ok(true) => {}
                                // Stopping: the file stays in the inbox for the next start.
                                Ok(false) => {
                                    in_flight.remove(path);
                                }
                                Err((reason, sidecars)) => {
                                    in_flight.remove(path);
                                    junk.insert(
                                        path.clone(),
                                        Junk {
                                            seen: cur,
                                            until: Instant::now() + self.grace(),
                                            reason,
                                            sidecars,
                                        },
                                    );
                                }
                            }
                        }
                    }
                }
                Err(e) => health.set_folder(false, &format!("{}: {e}", self.dir.display())),
            }
            heartbeat.sleep_unless(&stop, self.poll);
        }
        // The posters already queued are still classified after a stop: their files
        // move once the classifier is done with them. A file whose job never comes
        // back (the classifier gone) stays in the inbox for the next start.
        drop(finished);
        while !in_flight.is_empty() {
            match finishing.recv_timeout(DRAIN_SILENCE) {
                Ok(f) => self.put_away(f, &mut in_flight),
                Err(_) => break,
            }
        }
    }

    /// Moves a file the classifier is done with, and forgets it.
    fn put_away(&self, f: Finished, in_flight: &mut HashSet<PathBuf>) {
        finish(&f.path, &f.sidecars, &self.done, &self.failed, &f.outcome);
        in_flight.remove(&f.path);
    }

    fn candidates(&self) -> std::io::Result<Vec<(PathBuf, fs::Metadata)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let meta = e.metadata()?;
            let name = e.file_name().to_string_lossy().into_owned();
            let sidecar = Path::new(&name)
                .extension()
                .is_some_and(|x| SIDECARS.iter().any(|s| x.eq_ignore_ascii_case(s)));
            let temp = name.starts_with('.') || TEMP_SUFFIXES.iter().any(|s| name.ends_with(s));
            if meta.is_file() && !sidecar && !temp {
                out.push((e.path(), meta));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// How long a file that failed to decode is watched for a change before it goes
    /// to failed/: a change means it was read too early (a writer pausing longer
    /// than `settle_ms`), not that it is broken. The wait runs beside the other
    /// files, never in front of them.
    fn grace(&self) -> Duration {
        (self.settle * 2).max(JUNK_GRACE_MIN)
    }

    /// Moves a file that can never be classified to failed/ with its reason.
    fn fail(&self, path: &Path, sidecars: &[PathBuf], reason: &str) {
        finish(
            path,
            sidecars,
            &self.done,
            &self.failed,
            &Err(reason.to_string()),
        );
    }

    fn overview(&self, image: &Path) -> (Option<String>, Vec<PathBuf>) {
        let mut found = Vec::new();
        let mut overview = None;
        for ext in SIDECARS {
            let p = image.with_extension(ext);
            let Ok(bytes) = read_file(&p, SIDECAR_MAX) else {
                continue;
            };
            let text = String::from_utf8_lossy(&bytes).into_owned();
            found.push(p);
            let o = if ext == "json" {
                serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["overview"].as_str().map(String::from))
            } else {
                Some(text)
            };
            overview = overview.or(o.filter(|s| !s.trim().is_empty()));
        }
        (overview, found)
    }

    /// Hands the file to the queue (`false` when stopping: it was not queued), or
    /// says why it cannot be read (with its sidecars), so that the scan can watch it
    /// a little longer before failing it.
    fn submit(&self, path: &Path, to: &Handoff) -> Result<bool, (String, Vec<PathBuf>)> {
        let (overview, sidecars) = self.overview(path);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let image = match read_file(path, MAX_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|b| decode(&b).map_err(|e| e.to_string()))
        {
            Ok(image) => image,
            Err(reason) => return Err((reason, sidecars)),
        };
        let (finished, path) = (to.finished.clone(), path.to_path_buf());
        let job = Job {
            poster: Poster {
                source: Source::Folder,
                name,
                image,
                overview,
                caption: None,
            },
            done: Some(Box::new(move |o| {
                let outcome = o.map(|_| ()).map_err(|e| e.to_string());
                let _ = finished.send(Finished {
                    path,
                    sidecars,
                    outcome,
                });
            })),
        };
        match to.queue.send(job, to.heartbeat, to.stop) {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::warn!("{e}");
                Ok(false)
            }
        }
    }
}

/// Moves a handled file and its sidecars to `done/` or `failed/` (with its reason).
fn finish(
    path: &Path,
    sidecars: &[PathBuf],
    done: &Path,
    failed: &Path,
    outcome: &Result<(), String>,
) {
    let dest = if outcome.is_ok() { done } else { failed };
    let moved = move_into(path, dest);
    for s in sidecars {
        let _ = move_into(s, dest);
    }
    if let (Err(reason), Ok(target)) = (outcome, &moved) {
        let _ = fs::write(reason_path(target), format!("{reason}\n"));
        tracing::warn!(file = %path.display(), "failed: {reason}");
    }
}

fn reason_path(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(".reason.txt");
    PathBuf::from(s)
}

/// Moves `path` into `dir`, never overwriting: a clash gets a numeric suffix.
fn move_into(path: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    let name = path.file_name().unwrap_or_default();
    let mut target = dir.join(name);
    let mut n = 1;
    while target.exists() {
        target = dir.join(format!("{n}-{}", name.to_string_lossy()));
        n += 1;
    }
    fs::rename(path, &target)?;
    Ok(target)
}
