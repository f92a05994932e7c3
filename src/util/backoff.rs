//! One exponential back-off for every retry loop: the MQTT reconnect, the camera
//! re-open and the remote captioner's retries.

use std::time::Duration;

/// Waits that double from `min` up to `max`; `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays from `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The wait before the next attempt (what `advance` would return).
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// The wait before the next attempt; the one after it is twice as long.
    pub fn advance(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// Back to `min` (after a success).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let waits: Vec<_> = (0..5).map(|_| b.advance()).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        b.reset();
        assert_eq!(b.peek(), ms(100));
    }
}
