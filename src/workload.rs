//! A workload to migrate under: a byte pattern to fill a region with, writer threads that
//! keep storing sequence numbers into it while it moves, and the check that every byte and
//! every write survived.
//!
//! Writers own *slots*: the first 64-bit word of each base page, dealt out round-robin.
//! Each writer remembers the last value it stored in each of its slots; after the
//! migration, a slot holding anything else is a lost write. Every other word must still
//! hold the pattern.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::region::Region;
use crate::sys::PAGE_SIZE;

const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

/// The pattern word at `index` for `seed` (SplitMix64 of both).
pub fn pattern_word(seed: u64, index: usize) -> u64 {
    let mut z = seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills the region with the pattern for `seed`.
pub fn fill(region: &Region, seed: u64) {
    for i in 0..region.words() {
        region.word(i).store(pattern_word(seed, i), Ordering::Relaxed);
    }
}

/// What the writers did.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct WriteLog {
    /// Stores made.
    pub writes: u64,
    /// `(word index, last value stored)` of every slot written.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub last: Vec<(usize, u64)>,
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct VerifyReport {
    /// Bytes checked.
    pub checked_bytes: u64,
    /// Bytes that differ from the pattern (outside writer slots).
    pub mismatched_bytes: u64,
    /// Slots that do not hold the last value their writer stored.
    pub lost_writes: u64,
    /// Offset of the first mismatching byte or lost write.
    pub first_bad_offset: Option<u64>,
}

impl VerifyReport {
    /// Whether every byte and every write is intact.
    pub fn ok(&self) -> bool {
        self.mismatched_bytes == 0 && self.lost_writes == 0
    }
}

/// Runs `f` while `writers` threads store sequence numbers into the region's slots (`f`
/// begins once each has stored), then stops them and returns `f`'s result with what they
/// wrote.
pub fn with_writers<R: Send>(region: &Region, writers: usize, f: impl FnOnce() -> R + Send) -> (R, WriteLog) {
    let stop = AtomicBool::new(false);
    let started = std::sync::atomic::AtomicUsize::new(0);
    let pages = region.len() / PAGE_SIZE;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let (stop, started) = (&stop, &started);
                s.spawn(move || {
                    let mine: Vec<usize> = (w..pages).step_by(writers).map(|p| p * WORDS_PER_PAGE).collect();
                    let mut last = vec![0u64; mine.len()];
                    let mut written = vec![false; mine.len()];
                    let mut seq = 0u64;
                    let tag = ((w as u64) + 1) << 48;
                    'outer: while !mine.is_empty() {
                        for (j, &word) in mine.iter().enumerate() {
                            if seq % 64 == 0 && stop.load(Ordering::Relaxed) {
                                break 'outer;
                            }
                            seq += 1;
                            let value = tag | seq;
                            region.word(word).store(value, Ordering::Release);
                            last[j] = value;
                            written[j] = true;
                            if seq == 1 {
                                started.fetch_add(1, Ordering::Release);
                            }
                        }
                    }
                    let log: Vec<(usize, u64)> =
                        mine.iter().zip(&last).zip(&written).filter(|(_, w)| **w).map(|((&i, &v), _)| (i, v)).collect();
                    WriteLog { writes: seq, last: log }
                })
            })
            .collect();
        // `f` runs once every writer has stored (a writer with no page stores nothing).
        let storing = writers.min(pages);
        while started.load(Ordering::Acquire) < storing {
            std::thread::yield_now();
        }
        let result = f();
        stop.store(true, Ordering::Relaxed);
        let mut log = WriteLog::default();
        for h in handles {
            let part = h.join().expect("writer thread panicked");
            log.writes += part.writes;
            log.last.extend(part.last);
        }
        (result, log)
    })
}

/// Checks every byte of the region against the pattern for `seed`, except the slots in
/// `log`, which must hold the last value written.
pub fn verify(region: &Region, seed: u64, log: &WriteLog) -> VerifyReport {
    let mut slots: Vec<(usize, u64)> = log.last.clone();
    slots.sort_unstable();
    let mut next = slots.iter().peekable();
    let mut report = VerifyReport { checked_bytes: region.len() as u64, ..Default::default() };
    for i in 0..region.words() {
        let got = region.word(i).load(Ordering::Acquire);
        if next.peek().is_some_and(|(w, _)| *w == i) {
            let (_, want) = next.next().expect("peeked");
            if got != *want {
                report.lost_writes += 1;
                report.first_bad_offset.get_or_insert(i as u64 * 8);
            }
            continue;
        }
        let diff = got ^ pattern_word(seed, i);
        if diff != 0 {
            report.mismatched_bytes += diff.to_ne_bytes().iter().filter(|&&b| b != 0).count() as u64;
            report.first_bad_offset.get_or_insert(i as u64 * 8);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_catches_changed_bytes_and_lost_writes() {
        let r = Region::new(64 << 10, 4096, None).unwrap();
        fill(&r, 1);
        let ((), log) = with_writers(&r, 2, || std::thread::sleep(std::time::Duration::from_millis(20)));
        assert!(log.writes > 0);
        assert!(verify(&r, 1, &log).ok());
        r.word(3).store(0, Ordering::Relaxed);
        let bad = verify(&r, 1, &log);
        assert!(bad.mismatched_bytes > 0 && bad.first_bad_offset == Some(24));
        let (slot, value) = log.last[0];
        r.word(slot).store(value - 1, Ordering::Relaxed);
        assert_eq!(verify(&r, 1, &log).lost_writes, 1);
    }
}
