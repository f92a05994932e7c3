//! The steady-poster trigger: a camera sees a stream of frames, and we want one
//! classification per poster. A frame is taken when the scene has been still for
//! `steady_frames` frames, has some detail (not a blank wall), and differs from the
//! last poster taken, so a poster left in view is not sent again.

use image::RgbImage;

const SIDE: u32 = 16;
/// Mean absolute difference (0-255) under which two frames count as the same scene.
const STILL: f32 = 6.0;
/// A steady scene is a new poster when this share of its cells changed by more than
/// `CELL_CHANGED` levels. A share, not a mean: the poster may fill only part of the
/// frame, and the unchanged stand around it must not dilute the difference.
const NEW_SHARE: f32 = 0.10;
const CELL_CHANGED: u8 = 24;
/// Standard deviation under which a scene is blank.
const MIN_DETAIL: f32 = 10.0;

type Sig = Vec<u8>;

fn signature(img: &RgbImage) -> Sig {
    let gray = image::imageops::grayscale(img);
    image::imageops::thumbnail(&gray, SIDE, SIDE).into_raw()
}

fn diff(a: &Sig, b: &Sig) -> f32 {
    let sum: u32 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as u32).sum();
    sum as f32 / a.len().max(1) as f32
}

fn changed_share(a: &Sig, b: &Sig) -> f32 {
    let n = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.abs_diff(**y) > CELL_CHANGED)
        .count();
    n as f32 / a.len().max(1) as f32
}

fn detail(s: &Sig) -> f32 {
    let mean = s.iter().map(|&x| x as f32).sum::<f32>() / s.len() as f32;
    (s.iter().map(|&x| (x as f32 - mean).powi(2)).sum::<f32>() / s.len() as f32).sqrt()
}

/// Fires once a scene has held still for a number of frames.
pub struct SteadyTrigger {
    steady_frames: u32,
    previous: Option<Sig>,
    still: u32,
    last_taken: Option<Sig>,
}

impl SteadyTrigger {
    /// A trigger that waits for `steady_frames` still frames.
    pub fn new(steady_frames: u32) -> Self {
        Self {
            steady_frames: steady_frames.max(1),
            previous: None,
            still: 0,
            last_taken: None,
        }
    }

    /// True when this frame should be classified.
    pub fn feed(&mut self, frame: &RgbImage) -> bool {
        let sig = signature(frame);
        let is_still = self
            .previous
            .as_ref()
            .is_some_and(|p| diff(p, &sig) < STILL);
        self.still = if is_still { self.still + 1 } else { 0 };
        self.previous = Some(sig.clone());
        // Fire once, exactly when the scene has been still long enough.
        if self.still + 1 != self.steady_frames {
            return false;
        }
        if detail(&sig) < MIN_DETAIL {
            return false;
        }
        if self
            .last_taken
            .as_ref()
            .is_some_and(|t| changed_share(t, &sig) < NEW_SHARE)
        {
            return false;
        }
        self.last_taken = Some(sig);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large-scale structure, as a poster seen by a camera has: vertical or
    /// horizontal bands of light and dark.
    fn poster(vertical: bool) -> RgbImage {
        RgbImage::from_fn(64, 96, |x, y| {
            let band = if vertical { x / 16 } else { y / 24 };
            let v = if band % 2 == 0 { 30 } else { 220 };
            image::Rgb([v, v / 2, 255 - v])
        })
    }

    #[test]
    fn one_shot_per_steady_poster_and_no_repeat() {
        let mut t = SteadyTrigger::new(3);
        let a = poster(true);
        let b = poster(false);
        let fired: Vec<bool> = [&a, &a, &a, &a, &a, &a].iter().map(|f| t.feed(f)).collect();
        assert_eq!(fired, [false, false, true, false, false, false]);
        // Moving away and back to the same poster: not sent again.
        let blank = RgbImage::from_pixel(64, 96, image::Rgb([20, 20, 20]));
        for f in [&blank, &blank, &blank, &blank, &a, &a, &a, &a] {
            assert!(!t.feed(f));
        }
        // A new poster fires once it is still.
        let fired: Vec<bool> = [&b, &b, &b, &b].iter().map(|f| t.feed(f)).collect();
        assert_eq!(fired, [false, false, true, false]);
    }
}
