//! The one way pagemig waits for something another thread or the kernel will change (an
//! event to be read, a page to be let go, a resource to come back): pauses that start
//! short and double up to a ceiling, given up at an optional deadline.

use std::time::{Duration, Instant};

/// Pauses from `first`, doubling up to `longest`; with [`Backoff::within`], none once a
/// limit has passed since the first.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backoff {
    first: Duration,
    longest: Duration,
    next: Duration,
    limit: Option<Duration>,
    deadline: Option<Instant>,
}

impl Backoff {
    /// Pauses from `first`, doubling up to `longest`, for ever.
    pub const fn new(first: Duration, longest: Duration) -> Self {
        Self { first, longest, next: first, limit: None, deadline: None }
    }

    /// Waiting on the kernel or the event reader, which answer in microseconds: 50 µs,
    /// doubling up to 200 µs.
    pub const fn kernel() -> Self {
        Self::new(Duration::from_micros(50), Duration::from_micros(200))
    }

    /// The same pauses, none once `limit` has passed since the first was asked for.
    pub const fn within(self, limit: Duration) -> Self {
        Self { limit: Some(limit), ..self }
    }

    /// The pause to take now (the next is twice as long, up to the ceiling), or `None` once
    /// past the deadline.
    pub fn next_pause(&mut self) -> Option<Duration> {
        if let Some(limit) = self.limit {
            let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + limit);
            if Instant::now() >= deadline {
                return None;
            }
        }
        let now = self.next;
        self.next = (now * 2).min(self.longest);
        Some(now)
    }

    /// Sleeps for the next pause; returns false, without sleeping, once past the deadline.
    pub fn pause(&mut self) -> bool {
        self.next_pause().map(std::thread::sleep).is_some()
    }

    /// Back to the first pause, the deadline cleared (it starts again with the next pause).
    pub fn reset(&mut self) {
        self.next = self.first;
        self.deadline = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::watchdog;

    #[test]
    fn pauses_double_up_to_the_ceiling() {
        watchdog(60, || {
            let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(35));
            let got: Vec<_> = (0..4).map(|_| b.next_pause().unwrap().as_millis()).collect();
            assert_eq!(got, [10, 20, 35, 35]);
            b.reset();
            assert_eq!(b.next_pause(), Some(Duration::from_millis(10)));
        });
    }

    #[test]
    fn gives_up_at_the_deadline_and_starts_again_after_reset() {
        watchdog(60, || {
            let mut b =
                Backoff::new(Duration::from_millis(1), Duration::from_millis(1)).within(Duration::from_millis(20));
            let started = Instant::now();
            while b.pause() {}
            assert!(started.elapsed() >= Duration::from_millis(20));
            assert_eq!(b.next_pause(), None);
            b.reset();
            assert!(b.next_pause().is_some());
        });
    }
}
