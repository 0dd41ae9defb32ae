//! Copy kernels: the default CPU copy of one folio (`folio_copy`) and of a batch
//! (`folios_copy`), the user-space forms of the kernel's `folio_mc_copy()` and
//! `folios_mc_copy()`.
//!
//! They return an error instead of crashing so that a failing copy can be undone; a real
//! machine-check on a poisoned source page is delivered to user space as `SIGBUS` and is
//! not caught here.
#![allow(unsafe_code)]

pub mod simd;

use crate::process::PerProcess;

use crate::sys::uffd::Uffd;
use crate::sys::{self, Errno};

/// What a destination is when its copy starts.
#[derive(Clone, Copy, Debug)]
pub enum Dst<'a> {
    /// Populated some time ago (a prepared reserve): its lines are not in the cache. Copied
    /// with the kernel measured fastest for cold destinations ([`kernels`]).
    Mapped,
    /// Populated, so zeroed by the kernel, just before the copy: its lines may still be in
    /// the cache. Copied with the kernel measured fastest for such destinations.
    Fresh,
    /// No pages yet, registered in missing mode with this userfaultfd: the copy allocates
    /// each page and fills it in one step (`UFFDIO_COPY`), so the kernel never zeroes it
    /// first and every destination byte is written once.
    Empty(&'a Uffd),
}

/// One folio's copy: `len` bytes from `src` to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyPair {
    /// Destination address.
    pub dst: usize,
    /// Source address.
    pub src: usize,
    /// Bytes to copy.
    pub len: usize,
}

/// Copies one folio.
///
/// # Errors
/// `EINVAL` for a zero-length or overlapping pair.
///
/// # Safety
/// `src` must be readable and `dst` writable for `len` bytes, and during the copy no thread
/// may write `src` (it is write-protected) or access `dst` (pagemig owns it).
pub unsafe fn folio_copy(pair: CopyPair) -> Result<(), Errno> {
    let CopyPair { dst, src, len } = pair;
    if len == 0 || (dst < src + len && src < dst + len) {
        return Err(Errno::INVAL);
    }
    // SAFETY: the caller guarantees access to both ranges; we checked they do not overlap.
    unsafe { chosen().cold.copy(dst, src, len) };
    Ok(())
}

/// Copies a batch of folios in order, stopping at the first failure.
///
/// # Errors
/// The first failing pair's error.
///
/// # Safety
/// Every pair must satisfy [`folio_copy`]'s contract.
pub unsafe fn folios_copy(pairs: &[CopyPair]) -> Result<(), Errno> {
    for pair in coalesce(pairs) {
        // SAFETY: forwarded from the caller's contract: a coalesced pair is the union of
        // adjacent pairs, each of which satisfies it.
        unsafe { folio_copy(pair)? };
    }
    Ok(())
}

/// Copies a batch of folios in order into destinations that are all `dst`, stopping at the
/// first failure.
///
/// Into [`Dst::Empty`] destinations each coalesced pair is one `UFFDIO_COPY`; a page that
/// is there already (a part copied before) is stored into instead.
///
/// # Errors
/// The first failing pair's error; `ENOMEM` when the kernel cannot allocate a page.
///
/// # Safety
/// Every pair must satisfy [`folio_copy`]'s contract, and an `Empty` destination must be
/// registered with its userfaultfd and not be read by anyone before the copy into it ends.
pub unsafe fn folios_copy_to(pairs: &[CopyPair], dst: Dst<'_>) -> Result<(), Errno> {
    let uffd = match dst {
        // SAFETY: forwarded from the caller's contract.
        Dst::Mapped => return unsafe { folios_copy(pairs) },
        Dst::Fresh => {
            let kernel = chosen().hot;
            for pair in coalesce(pairs) {
                if pair.len == 0 || (pair.dst < pair.src + pair.len && pair.src < pair.dst + pair.len) {
                    return Err(Errno::INVAL);
                }
                // SAFETY: forwarded from the caller's contract; checked not to overlap.
                unsafe { kernel.copy(pair.dst, pair.src, pair.len) };
            }
            return Ok(());
        }
        Dst::Empty(uffd) => uffd,
    };
    for pair in coalesce(pairs) {
        if pair.len == 0 || (pair.dst < pair.src + pair.len && pair.src < pair.dst + pair.len) {
            return Err(Errno::INVAL);
        }
        let page = sys::PAGE_SIZE;
        if pair.dst % page != 0 || pair.src % page != 0 || pair.len % page != 0 {
            // Not whole pages: stored into; a missing page is filled with zeros by the
            // engine's fault handler first.
            // SAFETY: forwarded from the caller's contract.
            unsafe { folio_copy(pair)? };
            continue;
        }
        let mut done = 0;
        let mut again = 0;
        while done < pair.len {
            // SAFETY: the caller promises the destination is ours alone and nobody reads it
            // before the copy ends: filling it surprises nobody.
            match unsafe { uffd.copy(pair.dst + done, pair.src + done, pair.len - done) } {
                Ok(()) => done = pair.len,
                Err((n, Errno::EXIST)) => {
                    // A page already there (a part copied before): stored into.
                    let at = done + n;
                    // SAFETY: inside the caller's pair; the page is mapped (EEXIST).
                    unsafe { simd::copy_bytes_nt(pair.dst + at, pair.src + at, page) };
                    done = at + page;
                }
                Err((n, Errno::AGAIN)) if again < 1000 => {
                    done += n;
                    again += 1;
                    std::thread::yield_now();
                }
                Err((_, errno)) => return Err(errno),
            }
        }
    }
    Ok(())
}

/// Copies a batch of folios in order, each into a destination as `dsts` says (one
/// [`folios_copy_to`] per stretch of destinations of the same kind), stopping at the first
/// failure.
///
/// # Errors
/// The first failing pair's error.
///
/// # Safety
/// As [`folios_copy_to`] for every pair; `dsts` has one entry per pair.
pub unsafe fn folios_copy_each(pairs: &[CopyPair], dsts: &[Dst<'_>]) -> Result<(), Errno> {
    debug_assert_eq!(pairs.len(), dsts.len());
    let mut i = 0;
    while i < pairs.len() {
        let kind = std::mem::discriminant(&dsts[i]);
        let j = i + dsts[i..].iter().take_while(|d| std::mem::discriminant(*d) == kind).count();
        // SAFETY: forwarded from the caller's contract.
        unsafe { folios_copy_to(&pairs[i..j], dsts[i])? };
        i = j;
    }
    Ok(())
}

/// Makes each destination equal to its source after a pre-copy: compares them base page by
/// base page and copies only the pages that differ (written since the pre-copy read them,
/// or unreadable then). Returns the bytes copied.
///
/// # Errors
/// `EINVAL` for a zero-length, unaligned or overlapping pair; the pairs before it are done.
///
/// # Safety
/// Every pair must satisfy [`folio_copy`]'s contract, and `dst` must be populated memory
/// (no userfaultfd of its own).
pub unsafe fn folios_fix(pairs: &[CopyPair]) -> Result<usize, Errno> {
    let page = sys::PAGE_SIZE;
    let mut copied = 0;
    for pair in coalesce(pairs) {
        let CopyPair { dst, src, len } = pair;
        if len == 0 || len % page != 0 || (dst < src + len && src < dst + len) {
            return Err(Errno::INVAL);
        }
        for off in (0..len).step_by(page) {
            // SAFETY: the caller guarantees both ranges readable, the source not written and
            // the destination ours during the call; a page of each lies within them.
            let (from, to) = unsafe {
                (
                    std::slice::from_raw_parts((src + off) as *const u8, page),
                    std::slice::from_raw_parts_mut((dst + off) as *mut u8, page),
                )
            };
            if from != &*to {
                to.copy_from_slice(from);
                copied += page;
            }
        }
    }
    Ok(copied)
}

/// Merges pairs that continue each other in both source and destination into one copy:
/// one large `memcpy` runs faster than many small ones over the same bytes.
pub fn coalesce(pairs: &[CopyPair]) -> impl Iterator<Item = CopyPair> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let mut cur = *pairs.get(i)?;
        i += 1;
        while let Some(next) = pairs.get(i) {
            if next.src != cur.src + cur.len || next.dst != cur.dst + cur.len {
                break;
            }
            cur.len += next.len;
            i += 1;
        }
        Some(cur)
    })
}

#[cfg(any(test, feature = "internals"))]
/// Times `reps` plain copies of `len` bytes between two populated buffers laid out like a
/// region of `folio_size` folios (2 MiB folios: THP-backed), the physical limit a migration
/// of the same bytes is measured against, after one untimed copy that warms them up (page
/// tables, TLB, the CPU's clock). Returns the time of each timed copy, in order.
///
/// A single cold copy of a freshly populated buffer varied twofold between identical runs;
/// the median of warm repetitions is what a ratio can be divided by. A GB/s figure is a
/// rate: a buffer well above the last-level cache gives the same one as a larger buffer,
/// so callers may measure a capped `len` rather than the whole region.
///
/// # Errors
/// The errno of mapping or populating the buffers; `EINVAL` for a zero `len`.
pub fn memcpy_baseline(len: usize, folio_size: usize, reps: usize) -> Result<Vec<std::time::Duration>, Errno> {
    if len == 0 {
        return Err(Errno::INVAL);
    }
    let huge = folio_size >= sys::HPAGE_SIZE;
    let align = folio_size.max(sys::PAGE_SIZE);
    let src = sys::Mapping::new_own(len, align)?;
    let dst = sys::Mapping::new_own(len, align)?;
    for m in [&src, &dst] {
        let advice = if huge { sys::Advice::HugePage } else { sys::Advice::NoHugePage };
        sys::madvise(m.addr(), len, advice)?;
        sys::madvise(m.addr(), len, sys::Advice::PopulateWrite)?;
    }
    let mut times = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let started = std::time::Instant::now();
        // SAFETY: two distinct mappings of `len` bytes that only this function can reach.
        unsafe { simd::copy_bytes(dst.addr(), src.addr(), len) };
        // Repetition 0 warms up and is not counted.
        if rep > 0 {
            times.push(started.elapsed());
        }
    }
    Ok(times)
}

/// A CPU copy kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Kernel {
    /// Non-temporal stores, one source stream.
    Nt,
    /// Non-temporal stores, the two halves of a large copy read side by side.
    NtTwoStreams,
    /// The C library's `memcpy` (`rep movsb` or its own non-temporal path, by size).
    Memcpy,
}

impl Kernel {
    /// Every kernel, in the order they are measured.
    pub const ALL: [Kernel; 3] = [Kernel::Nt, Kernel::NtTwoStreams, Kernel::Memcpy];

    /// The kernel's name, as `migrate/copy_kernel` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Nt => "nt",
            Kernel::NtTwoStreams => "nt2",
            Kernel::Memcpy => "memcpy",
        }
    }

    /// Copies `len` bytes from `src` to `dst`.
    ///
    /// # Safety
    /// As [`simd::copy_bytes`].
    pub unsafe fn copy(self, dst: usize, src: usize, len: usize) {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            match self {
                Kernel::Nt => simd::copy_bytes_nt_streams(dst, src, len, false),
                Kernel::NtTwoStreams => simd::copy_bytes_nt_streams(dst, src, len, true),
                Kernel::Memcpy => simd::copy_bytes(dst, src, len),
            }
        }
    }
}

impl std::str::FromStr for Kernel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Kernel::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| format!("{s:?} is not nt, nt2 or memcpy"))
    }
}

/// One kernel's throughput at start-up, GB/s.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct KernelFigure {
    /// The kernel.
    pub kernel: Kernel,
    /// Into 2 MiB destinations populated (zeroed) just before, as the pipeline copies into
    /// destinations it populates itself.
    pub fresh_gbps: f64,
    /// Into destinations populated long before (evicted from the cache), as from a prepared
    /// reserve.
    pub cold_gbps: f64,
}

/// The copy kernels chosen on this machine, and the figures they were chosen by.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Kernels {
    /// For destinations populated just before the copy ([`Dst::Fresh`]).
    pub hot: Kernel,
    /// For destinations populated long before ([`Dst::Mapped`]).
    pub cold: Kernel,
    /// What each kernel did at start-up (empty when chosen by `migrate/copy_kernel`).
    pub figures: Vec<KernelFigure>,
}

/// The kernels, measured or chosen; none before. They hold in a forked child too (the same
/// machine): a child uses its parent's until it chooses or measures its own.
static KERNELS: PerProcess<Kernels> = PerProcess::new();

/// The default when nothing was measured or chosen.
const DEFAULT_KERNELS: Kernels = Kernels { hot: Kernel::Nt, cold: Kernel::Nt, figures: Vec::new() };

/// The copy kernels of this process: measured once, at the first call, on this machine
/// (about 0.4 s), unless [`set_kernel`] chose one.
///
/// The same copy runs at very different speeds on different machines: the two-stream
/// non-temporal copy that was fastest on one AMD EPYC VM ran at half speed on an Intel Xeon
/// one, and whether a destination was just zeroed (its lines in the cache) or populated
/// long ago changes the order again. So each kind of destination gets the kernel that was
/// fastest for it here, measured the way the pipeline uses it.
pub fn kernels() -> Kernels {
    if let Some(k) = KERNELS.latest() {
        return k.clone();
    }
    // A choice made meanwhile (`set_kernel`) stands.
    KERNELS.get_or_init(|_| calibrate().unwrap_or(DEFAULT_KERNELS)).clone()
}

/// Starts measuring the kernels on a thread of its own, unless they are measured, chosen
/// or being measured in this process; copies made meanwhile use [`chosen`]'s default.
pub fn measure_in_background() {
    if KERNELS.latest().is_none() && !KERNELS.being_made() {
        let _ = sys::thread::spawn("pagemig-calibrate", || {
            let _ = kernels();
        });
    }
}

#[cfg(any(test, feature = "internals"))]
/// Whether a thread of this process is measuring the kernels now.
pub fn measuring() -> bool {
    KERNELS.being_made()
}

/// The kernels chosen, without waiting: the measured ones once [`kernels`] has measured
/// them, the two-stream non-temporal copy before (while an engine's start-up thread is
/// still measuring, or when nothing asked).
pub fn chosen() -> Kernels {
    KERNELS.latest().cloned().unwrap_or(DEFAULT_KERNELS)
}

/// Chooses `kernel` for every destination (`Some`), or measures again (`None`, at the next
/// [`kernels`]). The kernels replaced stay allocated (a few bytes a change).
pub fn set_kernel(kernel: Option<Kernel>) {
    match kernel {
        Some(k) => {
            KERNELS.set(Kernels { hot: k, cold: k, figures: Vec::new() });
        }
        None => KERNELS.clear(),
    }
}

/// The last-level cache's size from sysfs, 32 MiB where it cannot be read.
fn llc_bytes() -> usize {
    (0..8)
        .rev()
        .find_map(|i| crate::sys::read_text(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size")).ok())
        .and_then(|s| {
            let s = s.trim();
            let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
            let n: usize = n.parse().ok()?;
            Some(match unit {
                "K" => n << 10,
                "M" => n << 20,
                _ => n,
            })
        })
        .unwrap_or(32 << 20)
}

/// Measures every kernel into fresh and cold destinations, from a source out of the cache
/// as a migration's is; the best of two each. A kernel replaces the two-stream one only
/// when it is faster by more than a tenth: closer than that is noise on a shared machine.
fn calibrate() -> Result<Kernels, Errno> {
    use std::time::{Duration, Instant};
    const PIECE: usize = sys::HPAGE_SIZE;
    const LEN: usize = 8 << 20;
    let huge = |len: usize| -> Result<sys::Mapping, Errno> {
        let m = sys::Mapping::new_own(len, sys::HPAGE_SIZE)?;
        sys::madvise(m.addr(), len, sys::Advice::HugePage)?;
        Ok(m)
    };
    let src = huge(LEN)?;
    sys::madvise(src.addr(), LEN, sys::Advice::PopulateWrite)?;
    // SAFETY: a fresh mapping of ours, populated just above.
    unsafe { std::ptr::write_bytes(src.addr() as *mut u8, 0x5a, LEN) };
    // Out of the cache before each copy: the source, and a destination populated long ago.
    // Flushed line by line where the CPU can (no memory beyond the copy's own), else pushed
    // out by writing a scratch area twice the last-level cache (up to 256 MiB).
    // SAFETY: a readable mapping of ours; the flush reads nothing else.
    let scratch = if unsafe { simd::flush_cache(src.addr(), 64) } {
        None
    } else {
        let len = (2 * llc_bytes()).clamp(16 << 20, 256 << 20).next_multiple_of(sys::HPAGE_SIZE);
        Some((huge(len)?, len))
    };
    let evict = |populated_dst: Option<&sys::Mapping>| match &scratch {
        None => {
            for m in std::iter::once(&src).chain(populated_dst) {
                // SAFETY: mappings of ours, `LEN` bytes each, populated.
                unsafe { simd::flush_cache(m.addr(), LEN) };
            }
        }
        // SAFETY: a mapping of ours, used by this function alone.
        Some((s, len)) => unsafe { std::ptr::write_bytes(s.addr() as *mut u8, 1, *len) },
    };
    let mut figures = Vec::new();
    for kernel in Kernel::ALL {
        let (mut fresh, mut cold) = (Duration::MAX, Duration::MAX);
        for _ in 0..2 {
            // Fresh: each 2 MiB destination populated right before its copy, as the
            // pipeline populates the destinations it takes.
            let dst = huge(LEN)?;
            evict(None);
            let mut t = Duration::ZERO;
            for off in (0..LEN).step_by(PIECE) {
                sys::madvise(dst.addr() + off, PIECE, sys::Advice::PopulateWrite)?;
                let started = Instant::now();
                // SAFETY: two distinct mappings of ours, both populated, `PIECE` bytes each.
                unsafe { kernel.copy(dst.addr() + off, src.addr() + off, PIECE) };
                t += started.elapsed();
            }
            fresh = fresh.min(t);
            // Cold: populated, then pushed out of the cache with the source.
            let dst = huge(LEN)?;
            sys::madvise(dst.addr(), LEN, sys::Advice::PopulateWrite)?;
            evict(Some(&dst));
            let started = Instant::now();
            // SAFETY: two distinct mappings of ours, both populated, `LEN` bytes each.
            unsafe { kernel.copy(dst.addr(), src.addr(), LEN) };
            cold = cold.min(started.elapsed());
        }
        let gbps = |t: Duration| crate::stats::gbps(LEN as u64, t);
        figures.push(KernelFigure { kernel, fresh_gbps: gbps(fresh), cold_gbps: gbps(cold) });
    }
    let best = |f: fn(&KernelFigure) -> f64| {
        let default = figures.iter().find(|k| k.kernel == Kernel::NtTwoStreams).map_or(0.0, f);
        figures
            .iter()
            .filter(|k| f(k) > 1.1 * default)
            .max_by(|a, b| f(a).total_cmp(&f(b)))
            .map_or(Kernel::NtTwoStreams, |k| k.kernel)
    };
    Ok(Kernels { hot: best(|k| k.fresh_gbps), cold: best(|k| k.cold_gbps), figures })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fix_copies_exactly_the_pages_that_differ() {
        let page = sys::PAGE_SIZE;
        let src = sys::Mapping::new(8 * page, page).unwrap();
        let dst = sys::Mapping::new(8 * page, page).unwrap();
        for i in 0..src.len() / 8 {
            src.word(i).unwrap().store(i as u64 * 7 + 1, std::sync::atomic::Ordering::Relaxed);
            dst.word(i).unwrap().store(i as u64 * 7 + 1, std::sync::atomic::Ordering::Relaxed);
        }
        // Pages 1 and 6 differ, page 6 in its last byte only.
        dst.word(page / 8 + 3).unwrap().store(0, std::sync::atomic::Ordering::Relaxed);
        dst.word(7 * page / 8 - 1).unwrap().fetch_xor(1 << 63, std::sync::atomic::Ordering::Relaxed);
        let pairs = [
            CopyPair { dst: dst.addr(), src: src.addr(), len: 4 * page },
            CopyPair { dst: dst.addr() + 4 * page, src: src.addr() + 4 * page, len: 4 * page },
        ];
        // SAFETY: two populated mappings of this test's, not overlapping, not written
        // by anything else meanwhile.
        assert_eq!(unsafe { folios_fix(&pairs) }, Ok(2 * page));
        for i in 0..src.len() / 8 {
            assert_eq!(dst.word(i).unwrap().load(std::sync::atomic::Ordering::Relaxed), i as u64 * 7 + 1, "word {i}");
        }
        // SAFETY: as above.
        assert_eq!(unsafe { folios_fix(&pairs) }, Ok(0));
        let odd = CopyPair { dst: dst.addr(), src: src.addr(), len: 100 };
        // SAFETY: refused before anything is read.
        assert_eq!(unsafe { folios_fix(&[odd]) }, Err(Errno::INVAL));
    }

    #[test]
    fn adjacent_pairs_coalesce() {
        let p = |dst, src, len| CopyPair { dst, src, len };
        let pairs = [
            p(0x10000, 0x1000, 0x1000),
            p(0x11000, 0x2000, 0x1000),
            p(0x13000, 0x3000, 0x1000),
            p(0x14000, 0x4000, 0x1000),
        ];
        let merged: Vec<_> = coalesce(&pairs).collect();
        assert_eq!(merged, [p(0x10000, 0x1000, 0x2000), p(0x13000, 0x3000, 0x2000)]);
        assert_eq!(coalesce(&[]).count(), 0);
    }

    #[test]
    fn copies_and_refuses_overlap() {
        let src = vec![7u8; 8192];
        let mut dst = vec![0u8; 8192];
        let pair = CopyPair { dst: dst.as_mut_ptr() as usize, src: src.as_ptr() as usize, len: 8192 };
        // SAFETY: two distinct live vectors of 8192 bytes, used by this thread alone.
        unsafe { folios_copy(&[pair]).unwrap() };
        assert!(dst.iter().all(|&b| b == 7));
        let overlap = CopyPair { dst: pair.src + 4096, src: pair.src, len: 8192 };
        // SAFETY: refused before any access.
        assert_eq!(unsafe { folio_copy(overlap) }, Err(Errno::INVAL));
    }

    #[test]
    fn every_kernel_copies_every_byte_and_one_is_chosen_per_destination() {
        let src: Vec<u8> = (0..(1 << 20) + 4096).map(|i| (i * 7 + 3) as u8).collect();
        for kernel in Kernel::ALL {
            let mut dst = vec![0u8; src.len()];
            // SAFETY: two distinct live vectors of the same length, used by this thread alone.
            unsafe { kernel.copy(dst.as_mut_ptr() as usize, src.as_ptr() as usize, src.len()) };
            assert!(dst == src, "{kernel:?}");
            assert_eq!(kernel.name().parse::<Kernel>(), Ok(kernel));
        }
        let k = kernels();
        assert_eq!(k.figures.len(), Kernel::ALL.len());
        assert!(k.figures.iter().all(|f| f.fresh_gbps > 0.0 && f.cold_gbps > 0.0), "{k:?}");
        // The chosen kernel is the two-stream one or one faster than it.
        let fresh = |kernel| k.figures.iter().find(|f| f.kernel == kernel).unwrap().fresh_gbps;
        assert!(fresh(k.hot) >= fresh(Kernel::NtTwoStreams), "{k:?}");
    }
}
