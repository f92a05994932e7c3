//! The camera source. Capture is a thin `FrameSource` (V4L2 with the `camera`
//! feature, or a replay of recorded frames); everything after the raw frame (decode,
//! steady trigger, de-dup, re-open with back-off, health) is shared and tested
//! through the replay source.
//!
//! `device = "replay:DIR"` replays DIR's frames (`*.jpg` as MJPEG, `*.yuyv` as raw
//! YUYV at the configured size) in name order at the configured fps, once.

use super::frame::{Frame, PixelFormat, decode_frame};
use super::trigger::SteadyTrigger;
use crate::config::{CameraConfig, CameraFormat};
use crate::health::{Health, Heartbeat};
use crate::pipeline::{Job, Poster, Queue, Source};
use crate::preprocess::image::MAX_BYTES;
use crate::util::backoff::Backoff;
use crate::util::limited::read_file;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Yields raw frames; `Ok(None)` means the stream ended (a replay ran out).
pub trait FrameSource {
    /// The next frame; `Ok(None)` at the end of the stream.
    fn next_frame(&mut self) -> std::io::Result<Option<Frame>>;
}

/// Recorded frames played back at the configured rate (`replay:DIR`).
pub struct Replay {
    files: Vec<PathBuf>,
    next: usize,
    format: PixelFormat,
    width: u32,
    height: u32,
    period: Duration,
    last: Option<Instant>,
}

impl Replay {
    /// The frames of `dir`, in name order.
    pub fn open(dir: &Path, c: &CameraConfig) -> std::io::Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "jpg" || x == "jpeg" || x == "yuyv")
            })
            .collect();
        files.sort();
        let format = pixel_format(c.format);
        Ok(Self {
            files,
            next: 0,
            format,
            width: c.width,
            height: c.height,
            period: Duration::from_secs_f64(1.0 / c.fps.max(1) as f64),
            last: None,
        })
    }
}

impl FrameSource for Replay {
    fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        // An unreadable entry (a folder named like a frame, a frame over the limit)
        // is skipped with a warning; the replay goes on.
        let (path, data) = loop {
            let Some(path) = self.files.get(self.next) else {
                return Ok(None);
            };
            self.next += 1;
            let max = (self.width as usize * self.height as usize * 3).max(MAX_BYTES);
            match read_file(path, max) {
                Ok(data) => break (path, data),
                Err(e) => tracing::warn!("replay: skipping {e}"),
            }
        };
        if let Some(last) = self.last {
            std::thread::sleep(self.period.saturating_sub(last.elapsed()));
        }
        self.last = Some(Instant::now());
        let format = if path.extension().is_some_and(|x| x == "yuyv") {
            PixelFormat::Yuyv
        } else {
            self.format
        };
        Ok(Some(Frame {
            format,
            width: self.width,
            height: self.height,
            data,
        }))
    }
}

fn open(c: &CameraConfig) -> std::io::Result<Box<dyn FrameSource>> {
    let dev = c.device.to_string_lossy();
    if let Some(dir) = dev.strip_prefix("replay:") {
        return Ok(Box::new(Replay::open(Path::new(dir), c)?));
    }
    v4l_open(c)
}

#[cfg(feature = "camera")]
fn v4l_open(c: &CameraConfig) -> std::io::Result<Box<dyn FrameSource>> {
    Ok(Box::new(v4l_capture::V4l::open(c)?))
}

#[cfg(not(feature = "camera"))]
fn v4l_open(_: &CameraConfig) -> std::io::Result<Box<dyn FrameSource>> {
    Err(std::io::Error::other(
        "this build has no V4L2 support: rebuild with --features camera",
    ))
}

#[cfg(feature = "camera")]
mod v4l_capture {
    use super::*;
    use v4l::buffer::Type;
    use v4l::io::mmap::Stream;
    use v4l::io::traits::CaptureStream;
    use v4l::video::Capture;
    use v4l::{Device, FourCC};

    pub struct V4l {
        stream: Stream<'static>,
        format: PixelFormat,
        width: u32,
        height: u32,
    }

    impl V4l {
        pub fn open(c: &CameraConfig) -> std::io::Result<Self> {
            let dev = Device::with_path(&c.device)?;
            let mut fmt = dev.format()?;
            fmt.width = c.width;
            fmt.height = c.height;
            let format = pixel_format(c.format);
            fmt.fourcc = FourCC::new(if format == PixelFormat::Mjpeg {
                b"MJPG"
            } else {
                b"YUYV"
            });
            let fmt = dev.set_format(&fmt)?;
            let mut params = dev.params()?;
            params.interval = v4l::Fraction::new(1, c.fps);
            let _ = dev.set_params(&params);
            // The stream keeps its own handle on the device.
            let stream = Stream::with_buffers(&dev, Type::VideoCapture, 4)?;
            Ok(Self {
                stream,
                format,
                width: fmt.width,
                height: fmt.height,
            })
        }
    }

    impl FrameSource for V4l {
        fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
            let (buf, meta) = self.stream.next()?;
            let data = buf[..(meta.bytesused as usize).min(buf.len())].to_vec();
            Ok(Some(Frame {
                format: self.format,
                width: self.width,
                height: self.height,
                data,
            }))
        }
    }
}

/// Captures until `stop`: re-opens a vanished camera with back-off, and sends each
/// new steady poster to the queue.
pub fn run(
    c: CameraConfig,
    queue: Queue,
    health: Arc<Health>,
    heartbeat: Heartbeat,
    stop: Arc<AtomicBool>,
) {
    let name = c.device.display().to_string();
    let replay = name.starts_with("replay:");
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut trigger = SteadyTrigger::new(c.steady_frames);
    while !stop.load(Ordering::SeqCst) {
        let mut src = match open(&c) {
            Ok(s) => s,
            Err(e) => {
                let wait = backoff.advance();
                health.set_camera(false, &format!("{name}: {e}; retrying in {wait:?}"));
                heartbeat.sleep_unless(&stop, wait);
                continue;
            }
        };
        health.set_camera(true, &format!("{name}: streaming"));
        backoff.reset();
        while !stop.load(Ordering::SeqCst) {
            heartbeat.beat();
            let frame = match src.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => {
                    health.set_camera(true, &format!("{name}: replay finished"));
                    return idle(&heartbeat, &stop);
                }
                Err(e) => {
                    health.set_camera(false, &format!("{name}: {e}"));
                    break;
                }
            };
            let image = match decode_frame(&frame) {
                Ok(i) => i,
                Err(e) => {
                    tracing::debug!("dropping a bad frame: {e}");
                    continue;
                }
            };
            if trigger.feed(&image) {
                let job = Job {
                    poster: Poster {
                        source: Source::Camera,
                        name: name.clone(),
                        image,
                        overview: None,
                        caption: None,
                    },
                    done: None,
                };
                if queue.send(job, &heartbeat, &stop).is_err() {
                    return;
                }
            }
        }
        if replay {
            return idle(&heartbeat, &stop);
        }
    }
}

/// A finished replay stays alive (and beating) until shutdown.
fn idle(heartbeat: &Heartbeat, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        heartbeat.beat();
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pixel_format(f: CameraFormat) -> PixelFormat {
    match f {
        CameraFormat::Mjpeg => PixelFormat::Mjpeg,
        CameraFormat::Yuyv => PixelFormat::Yuyv,
    }
}
