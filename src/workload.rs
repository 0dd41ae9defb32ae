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
    /// Per writer, how long its stores waited ([`with_timed_writers`]; empty otherwise).
    pub stalls: Vec<Stalls>,
}

/// A store that took longer than this waited: on a page a migration protected or
/// isolated, or for a CPU (a store otherwise takes nanoseconds).
pub const STALL_NS: u64 = 10_000;

/// How long one writer's stores waited: the stores that took longer than [`STALL_NS`],
/// told apart by what the writer's thread did meanwhile (its context switches, read after
/// each such store): those during which it slept or ran in the kernel (a fault on memory
/// the migration protected or isolated, the mmap lock) *waited on memory*; those during
/// which it was only preempted (another thread took its CPU, the machine's load rather than
/// the migration) are counted apart. Max, 99.9th and 99th percentile are of the stores
/// that waited on memory.
///
/// A store that waited on memory may also have waited for a CPU once woken: on a machine
/// with fewer CPUs than busy threads the wake-up can take milliseconds. The `memory_*`
/// figures are of the same stores less that wait (the thread's `run_delay`, read with its
/// context switches): what the migration itself made them wait. Where it cannot be told
/// (the thread was also preempted since the last read, or the kernel keeps no `run_delay`)
/// a store counts whole there too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Stalls {
    /// Stores made.
    pub stores: u64,
    /// Stores that took longer than [`STALL_NS`] waiting on memory.
    pub waited: u64,
    /// The longest store that waited on memory, nanoseconds (0 when none did).
    pub max_ns: u64,
    /// The 99.9th percentile of the stores that waited on memory, nanoseconds (0 when none
    /// did).
    pub p999_ns: u64,
    /// The 99th percentile of the stores that waited on memory, nanoseconds (0 when none
    /// did).
    pub p99_ns: u64,
    /// Stores that took longer than [`STALL_NS`] because the writer was preempted.
    pub preempted: u64,
    /// The longest of those, nanoseconds.
    pub preempted_max_ns: u64,
    /// The longest store that waited on memory, less the time its thread then waited for a
    /// CPU, nanoseconds.
    pub memory_max_ns: u64,
    /// The 99.9th percentile of the stores that waited on memory, each less the time its
    /// thread then waited for a CPU, nanoseconds.
    pub memory_p999_ns: u64,
    /// The 99th percentile of those, nanoseconds.
    pub memory_p99_ns: u64,
}

/// The `q` quantile of `sorted` (nearest rank), 0 when it is empty.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Stalls {
    /// The figures of `stores` stores, of which those in `waited` (nanoseconds each) took
    /// longer than [`STALL_NS`] waiting on memory and those in `preempted` took that long
    /// because the writer was preempted.
    /// Each store that waited counts whole in the `memory_*` figures too: see
    /// [`Stalls::split`].
    pub fn of(stores: u64, waited: Vec<u64>, preempted: &[u64]) -> Self {
        Self::split(stores, waited.iter().map(|&ns| (ns, 0)).collect(), preempted)
    }

    /// [`Stalls::of`], each store that waited given as (how long it took, how long of that
    /// its thread waited for a CPU), both nanoseconds.
    pub fn split(stores: u64, waited: Vec<(u64, u64)>, preempted: &[u64]) -> Self {
        let mut whole: Vec<u64> = waited.iter().map(|&(ns, _)| ns).collect();
        let mut memory: Vec<u64> = waited.iter().map(|&(ns, cpu)| ns.saturating_sub(cpu)).collect();
        whole.sort_unstable();
        memory.sort_unstable();
        Stalls {
            stores,
            waited: whole.len() as u64,
            max_ns: quantile(&whole, 1.0),
            p999_ns: quantile(&whole, 0.999),
            p99_ns: quantile(&whole, 0.99),
            preempted: preempted.len() as u64,
            preempted_max_ns: preempted.iter().copied().max().unwrap_or(0),
            memory_max_ns: quantile(&memory, 1.0),
            memory_p999_ns: quantile(&memory, 0.999),
            memory_p99_ns: quantile(&memory, 0.99),
        }
    }

    /// The stalls of several writers as one: counts summed, the largest of each figure (a
    /// bound on the percentile of the stores of all of them together).
    pub fn worst(all: &[Stalls]) -> Stalls {
        all.iter().fold(Stalls::default(), |a, s| Stalls {
            stores: a.stores + s.stores,
            waited: a.waited + s.waited,
            max_ns: a.max_ns.max(s.max_ns),
            p999_ns: a.p999_ns.max(s.p999_ns),
            p99_ns: a.p99_ns.max(s.p99_ns),
            preempted: a.preempted + s.preempted,
            preempted_max_ns: a.preempted_max_ns.max(s.preempted_max_ns),
            memory_max_ns: a.memory_max_ns.max(s.memory_max_ns),
            memory_p999_ns: a.memory_p999_ns.max(s.memory_p999_ns),
            memory_p99_ns: a.memory_p99_ns.max(s.memory_p99_ns),
        })
    }
}

/// How many stores a timed writer makes between two reads of its context switches, at
/// most: a preemption between stores is told from one during a store only this finely.
const SWITCHES_EVERY: u64 = 256;

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
    run_writers::<false, R>(region, writers, f)
}

/// [`with_writers`], each store timed: the log says how long each writer's stores waited
/// ([`Stalls`]). Timing costs each store two clock reads, so these writers store less
/// often.
pub fn with_timed_writers<R: Send>(region: &Region, writers: usize, f: impl FnOnce() -> R + Send) -> (R, WriteLog) {
    run_writers::<true, R>(region, writers, f)
}

fn run_writers<const TIMED: bool, R: Send>(
    region: &Region,
    writers: usize,
    f: impl FnOnce() -> R + Send,
) -> (R, WriteLog) {
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
                    // Each store that waited on memory: how long, and how long of that
                    // its thread waited for a CPU.
                    let mut waited: Vec<(u64, u64)> = Vec::new();
                    let mut preempted: Vec<u64> = Vec::new();
                    let mut switches = if TIMED { crate::sys::context_switches() } else { (0, 0) };
                    let run_delay = if TIMED { crate::sys::RunDelay::open() } else { None };
                    let mut delayed = run_delay.as_ref().and_then(crate::sys::RunDelay::read);
                    let tag = ((w as u64) + 1) << 48;
                    'outer: while !mine.is_empty() {
                        for (j, &word) in mine.iter().enumerate() {
                            if seq % 64 == 0 && stop.load(Ordering::Relaxed) {
                                break 'outer;
                            }
                            seq += 1;
                            let value = tag | seq;
                            if TIMED {
                                let t = std::time::Instant::now();
                                region.word(word).store(value, Ordering::Release);
                                let ns = t.elapsed().as_nanos() as u64;
                                if ns > STALL_NS || seq % SWITCHES_EVERY == 0 {
                                    let now = crate::sys::context_switches();
                                    let (slept, lost_cpu) = (now.0 > switches.0, now.1 > switches.1);
                                    switches = now;
                                    let was = delayed;
                                    delayed = run_delay.as_ref().and_then(crate::sys::RunDelay::read);
                                    // Not preempted since the last read: the thread waited
                                    // runnable only after its wake-ups, this store's.
                                    let cpu = match (was, delayed) {
                                        (Some(was), Some(now)) if !lost_cpu => now.saturating_sub(was),
                                        _ => 0,
                                    };
                                    // The first 16 Mi of each kind are kept (128 MiB of
                                    // preempted stores, 256 MiB of waits, at most).
                                    if ns > STALL_NS {
                                        if lost_cpu && !slept {
                                            if preempted.len() < 1 << 24 {
                                                preempted.push(ns);
                                            }
                                        } else if waited.len() < 1 << 24 {
                                            waited.push((ns, cpu));
                                        }
                                    }
                                }
                            } else {
                                region.word(word).store(value, Ordering::Release);
                            }
                            last[j] = value;
                            written[j] = true;
                            if seq == 1 {
                                started.fetch_add(1, Ordering::Release);
                            }
                        }
                    }
                    let log: Vec<(usize, u64)> =
                        mine.iter().zip(&last).zip(&written).filter(|(_, w)| **w).map(|((&i, &v), _)| (i, v)).collect();
                    let stalls = if TIMED { vec![Stalls::split(seq, waited, &preempted)] } else { Vec::new() };
                    WriteLog { writes: seq, last: log, stalls }
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
            log.stalls.extend(part.stalls);
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
    use crate::testing::watchdog;

    #[test]
    fn stall_percentiles_are_of_the_stores_that_waited() {
        watchdog(60, || {
            assert_eq!(Stalls::of(5, Vec::new(), &[]), Stalls { stores: 5, ..Default::default() });
            let waited: Vec<u64> = (1..=1000).rev().map(|i| i * 100_000).collect();
            let s = Stalls::of(1_000_000, waited, &[20_000, 900_000_000]);
            assert_eq!((s.waited, s.max_ns, s.p999_ns, s.p99_ns), (1000, 100_000_000, 99_900_000, 99_000_000));
            assert_eq!((s.preempted, s.preempted_max_ns), (2, 900_000_000));
            // Without CPU waits, the memory figures are the whole ones.
            assert_eq!((s.memory_max_ns, s.memory_p999_ns, s.memory_p99_ns), (s.max_ns, s.p999_ns, s.p99_ns));
            let w = Stalls::worst(&[s.clone(), Stalls::of(10, vec![200_000_000], &[])]);
            assert_eq!(
                (w.stores, w.waited, w.max_ns, w.p999_ns, w.preempted, w.memory_max_ns),
                (1_000_010, 1001, 200_000_000, 200_000_000, 2, 200_000_000)
            );
        });
    }

    /// The memory figures take each store's CPU wait off that store, then rank: the store
    /// that took longest may not have waited longest on memory.
    #[test]
    fn memory_figures_leave_out_the_cpu_waits() {
        watchdog(60, || {
            // 1000 stores of 1..1000 µs; the three longest waited 990 µs of it for a CPU.
            let waited: Vec<(u64, u64)> =
                (1..=1000u64).map(|i| (i * 1000, if i > 997 { 990_000 } else { 0 })).collect();
            let s = Stalls::split(2000, waited, &[]);
            assert_eq!((s.waited, s.max_ns, s.p999_ns, s.p99_ns), (1000, 1_000_000, 999_000, 990_000));
            assert_eq!((s.memory_max_ns, s.memory_p999_ns, s.memory_p99_ns), (997_000, 996_000, 987_000));
            let w = Stalls::worst(&[s, Stalls::split(5, vec![(2_000_000, 1_500_000)], &[])]);
            assert_eq!((w.max_ns, w.memory_max_ns), (2_000_000, 997_000));
        });
    }

    /// Timed writers store and time every store; untimed ones report no stalls.
    #[test]
    fn timed_writers_report_their_stores() {
        watchdog(60, || {
            let region = Region::new(1 << 20, PAGE_SIZE, None).unwrap();
            fill(&region, 3);
            let ((), log) = with_timed_writers(&region, 2, || std::thread::sleep(std::time::Duration::from_millis(20)));
            assert_eq!(log.stalls.len(), 2);
            assert_eq!(log.stalls.iter().map(|s| s.stores).sum::<u64>(), log.writes);
            assert!(log.stalls.iter().all(|s| s.waited <= s.stores && s.p99_ns <= s.p999_ns && s.p999_ns <= s.max_ns));
            assert!(verify(&region, 3, &log).ok());
            let ((), plain) = with_writers(&region, 1, || ());
            assert!(plain.stalls.is_empty());
        });
    }

    #[test]
    fn verify_catches_changed_bytes_and_lost_writes() {
        watchdog(60, || {
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
        });
    }
}
