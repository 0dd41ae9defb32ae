//! Folios under migration: a second call that reaches a folio another call is moving finds
//! it busy (`EAGAIN`) and retries it later, as the kernel does with a locked folio.

use std::collections::BTreeMap;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// The set of address ranges being migrated.
#[derive(Debug, Default)]
pub struct Busy {
    ranges: Mutex<BTreeMap<usize, usize>>,
    released: Condvar,
}

impl Busy {
    /// Claims `[start, end)` unless it overlaps a claimed range.
    pub fn try_claim(&self, start: usize, end: usize) -> bool {
        let mut ranges = self.ranges.lock();
        let overlaps = ranges.range(..end).next_back().is_some_and(|(_, &e)| e > start);
        if !overlaps {
            ranges.insert(start, end);
        }
        !overlaps
    }

    /// Releases ranges claimed with [`Busy::try_claim`], by start address.
    pub fn release_all(&self, starts: &[usize]) {
        let mut ranges = self.ranges.lock();
        for start in starts {
            ranges.remove(start);
        }
        drop(ranges);
        self.released.notify_all();
    }

    /// Waits up to `timeout` for any release.
    pub fn wait(&self, timeout: Duration) {
        let mut ranges = self.ranges.lock();
        self.released.wait_for(&mut ranges, timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_claims_are_busy() {
        let b = Busy::default();
        assert!(b.try_claim(0x1000, 0x3000));
        assert!(!b.try_claim(0x2000, 0x4000));
        assert!(!b.try_claim(0x0, 0x1001));
        assert!(b.try_claim(0x3000, 0x4000));
        assert!(b.try_claim(0x0, 0x1000));
        b.release_all(&[0x1000]);
        assert!(b.try_claim(0x2000, 0x3000));
    }
}
