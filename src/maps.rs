//! The process's mappings, from `/proc/self/maps` and `/proc/self/smaps`: what pagemig may
//! move, and the per-mapping state (`mlock`, huge-page advice) a migration must keep.


use crate::error::{Error, Result};

/// One virtual memory area of this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// The `rwxp`/`rwxs` permission string.
    pub perms: String,
    /// Inode of the backing file (0 for anonymous memory).
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[anon:name]`), empty for plain anonymous memory.
    pub path: String,
    /// The two-letter `VmFlags` of smaps (empty when read from `maps`).
    pub flags: Vec<String>,
}

impl Vma {
    /// Whether smaps listed the flag (`lo`, `hg`, `nh`, …).
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// Why pagemig may not move this mapping, or `None` when it may: only private,
    /// anonymous, read-write, non-executable memory is moved.
    pub fn refusal(&self) -> Option<String> {
        let b = self.perms.as_bytes();
        if b.len() < 4 {
            return Some(format!("unreadable permissions {:?}", self.perms));
        }
        if b[3] == b's' {
            return Some("shared mapping (use the kernel's move_pages() for shared memory)".into());
        }
        if self.inode != 0 || self.path.starts_with('/') {
            return Some(format!("file-backed mapping of {:?}", self.path));
        }
        if self.path.starts_with('[') && !self.path.starts_with("[anon:") {
            return Some(format!("special mapping {}", self.path));
        }
        if b[0] != b'r' || b[1] != b'w' {
            return Some(format!("mapping is not read-write ({})", self.perms));
        }
        if b[2] == b'x' {
            return Some(format!("executable mapping ({})", self.perms));
        }
        [("io", "I/O memory"), ("pf", "a pure PFN range"), ("mm", "a mixed map")]
            .iter()
            .find(|(flag, _)| self.has_flag(flag))
            .map(|(_, what)| format!("special mapping ({what})"))
    }
}

fn parse_line(line: &str) -> Option<Vma> {
    let mut it = line.splitn(6, ' ');
    let (range, perms, _off, _dev, inode) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    let path = it.next().unwrap_or("").trim().to_string();
    let (s, e) = range.split_once('-')?;
    Some(Vma {
        start: usize::from_str_radix(s, 16).ok()?,
        end: usize::from_str_radix(e, 16).ok()?,
        perms: perms.to_string(),
        inode: inode.parse().ok()?,
        path,
        flags: Vec::new(),
    })
}

/// The size and alignment of a glibc arena heap (`HEAP_MAX_SIZE` on 64-bit).
pub const ARENA_HEAP: usize = 64 << 20;

impl Vma {
    /// Whether this is an inaccessible anonymous mapping (a guard, or an arena's reserved
    /// tail).
    pub fn inaccessible_anonymous(&self) -> bool {
        self.perms.starts_with("---") && self.inode == 0 && self.path.is_empty()
    }
}

/// Why memory that pagemig could move by its kind (see [`Vma::refusal`]) must still be
/// moved by the kernel when a call of this process names it, or `None` when pagemig may
/// move it in-process: memory that pagemig's own threads may touch while a migration
/// runs, which a migration in-process would protect against the very threads that serve
/// it. `prev` and `next` are the mappings right below and above `v`, where they touch it.
///
/// - a glibc arena heap (the threads pagemig starts allocate from arenas that program
///   threads share): a mapping of [`ARENA_HEAP`] bytes aligned to its size, or the
///   read-write head of one whose tail is inaccessible;
/// - a thread stack (and its TLS): a mapping right above an inaccessible guard;
/// - the `.bss` of a loaded object (the statics of pagemig's own library among them): an
///   anonymous mapping right above a private file mapping (a shared one, anonymous shared
///   memory among them, is no loaded object's data).
///
/// The rules are generous: memory of the program's that matches them only goes to the
/// kernel, which gives the same answer more slowly.
pub fn shared_with_pagemig(v: &Vma, prev: Option<&Vma>, next: Option<&Vma>) -> Option<&'static str> {
    let heap_end = v.start.saturating_add(ARENA_HEAP);
    if v.start % ARENA_HEAP == 0
        && (v.end == heap_end || next.is_some_and(|n| n.inaccessible_anonymous() && n.end == heap_end))
    {
        return Some("a malloc arena's heap");
    }
    if prev.is_some_and(Vma::inaccessible_anonymous) {
        return Some("above an inaccessible guard: a thread stack");
    }
    if prev.is_some_and(|p| p.inode != 0 && p.perms.ends_with('p')) {
        return Some("the .bss of a loaded object: statics");
    }
    None
}

/// Every mapping of this process, from `/proc/self/maps` (no flags).
///
/// # Errors
/// [`Error::Io`] when the file cannot be read.
pub fn vmas() -> Result<Vec<Vma>> {
    let text = crate::sys::read_text("/proc/self/maps").map_err(Error::io("/proc/self/maps"))?;
    Ok(text.lines().filter_map(parse_line).collect())
}

/// The number of mappings this process holds.
///
/// # Errors
/// [`Error::Io`] when `/proc/self/maps` cannot be read.
#[cfg(any(test, feature = "internals"))]
pub fn vma_count() -> Result<usize> {
    let text = crate::sys::read_text("/proc/self/maps").map_err(Error::io("/proc/self/maps"))?;
    Ok(text.lines().count())
}

/// The mappings overlapping `[start, end)` with the one flag a migration must know, and,
/// when `count`, the number of mappings the process holds: what a call checks before it
/// touches anything.
///
/// That flag is `VM_LOCKED` (`lo`): a locked folio is locked again where it lands. It is
/// asked of each mapping with [`crate::sys::any_locked`], one system call: `/proc/self/smaps`
/// names it too, but to make that file the kernel walks the page tables of every mapping of
/// the process (about 13 ms per GiB resident anywhere in it, paid by a call of a few pages
/// too). The other flags smaps gives that matter here (`io`, `pf`, `mm`) belong to device
/// mappings, which `maps` shows as file-backed or special already, and which the migration
/// refuses before touching them besides.
///
/// Reading `/proc/self/maps` costs about a microsecond and a half per mapping of the
/// process here (the kernel writes each file mapping's path), so a process of a few
/// hundred mappings paid hundreds of microseconds a call for it. Without `count`, the
/// mappings are looked up one by one over the range instead ([`Lookup`]).
///
/// # Errors
/// [`Error::Io`] when `/proc/self/maps` cannot be read; [`Error::Sys`] when a lookup fails.
pub fn call_vmas(start: usize, end: usize, count: bool) -> Result<(Vec<Vma>, Option<usize>)> {
    let (mut vmas, counted) = if count {
        let all = vmas()?;
        let n = all.len();
        (all.into_iter().filter(|v| v.end > start && v.start < end).collect(), Some(n))
    } else {
        (Lookup::open()?.range(start, end)?, None)
    };
    for v in &mut vmas {
        let (s, e) = (v.start.max(start), v.end.min(end));
        // A mapping gone meanwhile (`ENOMEM`) is the migration's to find.
        if crate::sys::any_locked(s, e - s) == Ok(true) {
            v.flags.push("lo".into());
        }
    }
    Ok((vmas, counted))
}

/// The mappings overlapping `[start, end)` with their `VmFlags`, from `/proc/self/smaps`
/// (pagemig's tests and command: a migration asks [`call_vmas`]).
#[cfg(any(test, feature = "internals"))]
///
/// # Errors
/// [`Error::Io`] when the file cannot be read.
pub fn vmas_with_flags(start: usize, end: usize) -> Result<Vec<Vma>> {
    let text = crate::sys::read_text("/proc/self/smaps").map_err(Error::io("/proc/self/smaps"))?;
    let mut out: Vec<Vma> = Vec::new();
    let mut current: Option<Vma> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("VmFlags:") {
            if let Some(mut v) = current.take() {
                v.flags = rest.split_whitespace().map(str::to_string).collect();
                out.push(v);
            }
        } else if line
            .split(' ')
            .next()
            .is_some_and(|r| r.contains('-') && r.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()))
        {
            if let Some(v) = parse_line(line) {
                current = (v.end > start && v.start < end).then_some(v);
            }
        }
    }
    Ok(out)
}

/// This process's mapping list.
const MAPS: &std::ffi::CStr = c"/proc/self/maps";

/// The mappings of this process, looked up address by address: with the `PROCMAP_QUERY`
/// ioctl (Linux 6.11), one lookup in the kernel's tree per mapping met, or else from one
/// read of `/proc/self/maps`. What reading every mapping costs a process with many of them
/// (a `move_pages` call of a few pages paid it whole) is paid only for the mappings asked
/// about.
#[derive(Debug)]
pub struct Lookup {
    /// `/proc/self/maps`, when the ioctl answers.
    file: Option<crate::sys::OwnFile>,
    /// The mappings met so far (all of them without the ioctl), sorted by address.
    seen: Vec<Vma>,
    /// [`Lookup::in_process`]'s verdict on each mapping asked about, by its start.
    verdicts: std::collections::BTreeMap<usize, bool>,
}

impl Drop for Lookup {
    /// The open `/proc/self/maps` is kept for the next lookup of this process.
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            crate::sys::put_kept(MAPS, file);
        }
    }
}

impl Lookup {
    /// Opens `/proc/self/maps`, where the ioctl answers (checked once per process); reads
    /// the whole list where it does not.
    ///
    /// # Errors
    /// [`Error::Io`] when `/proc/self/maps` cannot be read.
    pub fn open() -> Result<Self> {
        /// Whether the ioctl answers on this kernel: asked once, not per lookup (a child
        /// takes its parent's answer; `PerProcess`: a `OnceLock` being filled at a `fork()`
        /// would leave the child waiting on it for good).
        static QUERY_WORKS: crate::process::PerProcess<bool> = crate::process::PerProcess::new();
        let file = crate::sys::take_kept(MAPS)
            .map_or_else(|| crate::sys::OwnFile::open(MAPS), Ok)
            .map_err(|errno| Error::io("/proc/self/maps")(std::io::Error::from_raw_os_error(errno.raw_os_error())))?;
        let works = *QUERY_WORKS.get_or_init(|parent| {
            parent.copied().unwrap_or_else(|| matches!(crate::sys::procmap_query(&file, 0, true), Ok(_) | Err(crate::sys::Errno::NOENT)))
        });
        if works {
            return Ok(Self { file: Some(file), seen: Vec::new(), verdicts: Default::default() });
        }
        let mut seen = vmas()?;
        seen.sort_unstable_by_key(|v| v.start);
        Ok(Self { file: None, seen, verdicts: Default::default() })
    }

    /// The mapping holding `addr`, if any.
    ///
    /// # Errors
    /// The ioctl's errno, as [`Error::Sys`].
    pub fn at(&mut self, addr: usize) -> Result<Option<&Vma>> {
        let at = self.seen.partition_point(|v| v.end <= addr);
        if self.seen.get(at).is_some_and(|v| v.start <= addr) {
            return Ok(self.seen.get(at));
        }
        if self.file.is_none() {
            return Ok(None);
        }
        match self.query(addr, false) {
            Ok(q) => {
                let v = from_query(q);
                let at = self.seen.partition_point(|s| s.end <= v.start);
                self.seen.insert(at, v);
                Ok(self.seen.get(at))
            }
            Err(crate::sys::Errno::NOENT) => Ok(None),
            Err(errno) => Err(Error::Sys { op: "PROCMAP_QUERY", errno }),
        }
    }

    /// Whether pagemig may move the page at `addr` in-process: it is mapped, of a kind
    /// pagemig moves ([`Vma::refusal`]), not pagemig's own (`claimed`, as
    /// [`crate::sys::own::ranges`] gives them: its mappings and its threads' stacks), and not in
    /// memory pagemig's threads may touch ([`shared_with_pagemig`]). Every other page is
    /// the kernel's to move.
    ///
    /// # Errors
    /// As [`Lookup::at`].
    pub fn in_process(&mut self, addr: usize, claimed: &[(usize, usize)]) -> Result<bool> {
        let page = addr & !(crate::sys::PAGE_SIZE - 1);
        if crate::sys::own::overlaps(claimed, page, page + crate::sys::PAGE_SIZE) {
            return Ok(false);
        }
        let Some(v) = self.at(page)?.cloned() else { return Ok(false) };
        if let Some(&verdict) = self.verdicts.get(&v.start) {
            return Ok(verdict);
        }
        let verdict = v.refusal().is_none() && {
            // An inaccessible reservation of pagemig's own (address space a graveyard or a
            // pool keeps) right below is no thread's guard: the program's mapping that
            // happens to lie above it is its own to move in-process.
            let prev = match v.start.checked_sub(1) {
                Some(below) => self
                    .at(below)?
                    .filter(|p| p.end == v.start)
                    .filter(|p| {
                        !(p.inaccessible_anonymous() && crate::sys::own::unclaimed(p.start, p.end, claimed).0.is_empty())
                    })
                    .cloned(),
                None => None,
            };
            let next = self.at(v.end)?.filter(|n| n.start == v.end).cloned();
            shared_with_pagemig(&v, prev.as_ref(), next.as_ref()).is_none()
        };
        self.verdicts.insert(v.start, verdict);
        Ok(verdict)
    }

    /// `PROCMAP_QUERY` on the open file; where the program closed or took its number
    /// meanwhile, on `/proc/self/maps` opened again (a few times).
    fn query(&mut self, addr: usize, or_next: bool) -> std::result::Result<crate::sys::QueriedVma, crate::sys::Errno> {
        let mut tries = 8;
        loop {
            let file = self.file.as_ref().ok_or(crate::sys::Errno::BADF)?;
            match crate::sys::procmap_query(file, addr, or_next) {
                Err(crate::sys::Errno::BADF) if tries > 0 => {
                    tries -= 1;
                    // The lost one is let go unclosed (see `OwnFile::forget`).
                    // Where it cannot be opened again, the lost one stays: every later lookup
                    // fails too (none answers "unmapped").
                    let again = crate::sys::OwnFile::open(MAPS)?;
                    if let Some(lost) = self.file.replace(again) {
                        lost.forget();
                    }
                }
                answer => return answer,
            }
        }
    }

    /// The mappings overlapping `[start, end)`, in address order.
    ///
    /// # Errors
    /// As [`Lookup::at`].
    pub fn range(&mut self, start: usize, end: usize) -> Result<Vec<Vma>> {
        if self.file.is_some() {
            let mut out = Vec::new();
            let mut at = start;
            while at < end {
                match self.query(at, true) {
                    Ok(q) if q.start < end => {
                        at = q.end;
                        out.push(from_query(q));
                    }
                    Ok(_) | Err(crate::sys::Errno::NOENT) => break,
                    Err(errno) => return Err(Error::Sys { op: "PROCMAP_QUERY", errno }),
                }
            }
            return Ok(out);
        }
        Ok(self.seen.iter().filter(|v| v.end > start && v.start < end).cloned().collect())
    }
}

/// A mapping as the ioctl describes it, in the terms of `/proc/self/maps`.
fn from_query(q: crate::sys::QueriedVma) -> Vma {
    let bit = |b: u64, c: char| if q.flags & b != 0 { c } else { '-' };
    let perms: String = [bit(1, 'r'), bit(2, 'w'), bit(4, 'x'), if q.flags & 8 != 0 { 's' } else { 'p' }].iter().collect();
    Vma { start: q.start, end: q.end, perms, inode: q.inode, path: q.name, flags: Vec::new() }
}

/// Checks that `[start, end)` is fully mapped with memory pagemig may move, and returns the
/// mappings covering it (with flags when `with_flags`).
///
/// # Errors
/// [`Error::NotMovable`] naming the first offending range.
pub fn check_movable(start: usize, end: usize, all: &[Vma]) -> Result<()> {
    let mut at = start;
    for v in all.iter().filter(|v| v.end > start && v.start < end) {
        if v.start > at {
            return Err(Error::NotMovable { start: at, end: v.start.min(end), why: "not mapped".into() });
        }
        if let Some(why) = v.refusal() {
            return Err(Error::NotMovable { start: v.start.max(start), end: v.end.min(end), why });
        }
        at = v.end;
        if at >= end {
            return Ok(());
        }
    }
    Err(Error::NotMovable { start: at, end, why: "not mapped".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call's mappings say `lo` exactly where smaps does: none locked, one page locked in
    /// the middle (`mlock`), the tail locked as it faults (`mlock2(MLOCK_ONFAULT)`), counted
    /// or not.
    #[test]
    #[allow(unsafe_code, reason = "maps and locks a mapping of the test's own")]
    fn call_vmas_know_locked_mappings() {
        let page = crate::sys::PAGE_SIZE;
        let len = 8 * page;
        // Between two inaccessible pages: no mapping another test makes meanwhile merges
        // with it (one that did moved its bounds between the two reads).
        let base = crate::sys::mmap_anon(len + 2 * page).unwrap();
        let a = base + page;
        for guard in [base, a + len] {
            // SAFETY: a page of the test's own mapping, used by nothing.
            assert_eq!(unsafe { libc::mprotect(guard as *mut libc::c_void, page, libc::PROT_NONE) }, 0);
        }
        let agree = |what: &str| {
            let smaps = vmas_with_flags(a, a + len).unwrap();
            for count in [true, false] {
                let (vmas, counted) = call_vmas(a, a + len, count).unwrap();
                assert_eq!(counted.is_some(), count);
                assert!(counted.is_none_or(|n| n >= vmas.len()));
                let ours: Vec<_> = vmas.iter().map(|v| (v.start, v.end, v.has_flag("lo"))).collect();
                let kernel: Vec<_> = smaps.iter().map(|v| (v.start, v.end, v.has_flag("lo"))).collect();
                assert_eq!(ours, kernel, "{what}, counted {count}");
            }
            smaps.iter().filter(|v| v.has_flag("lo")).count()
        };
        assert_eq!(agree("nothing locked"), 0);
        if crate::sys::mlock(a + 2 * page, page).is_ok() {
            assert_eq!(agree("one page locked"), 1);
        }
        if crate::sys::mlock_onfault(a + 6 * page, 2 * page).is_ok() {
            assert!(agree("the tail locked on fault") >= 1);
        }
        // SAFETY: the test's own mapping, used by nothing else.
        unsafe { crate::sys::munmap(base, len + 2 * page).unwrap() };
    }

    #[test]
    fn parses_maps_lines() {
        let v = parse_line("7f00a000-7f00c000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!((v.start, v.end, v.inode, v.path.as_str()), (0x7f00a000, 0x7f00c000, 0, ""));
        assert!(v.refusal().is_none());
        let f = parse_line("55d0-55e0 r--p 00000000 08:01 1234   /usr/bin/true").unwrap();
        assert_eq!(f.path, "/usr/bin/true");
        assert!(f.refusal().unwrap().contains("file-backed"));
        let s = parse_line("1000-2000 rw-s 00000000 00:01 77 /dev/zero (deleted)").unwrap();
        assert!(s.refusal().unwrap().contains("shared"));
        let h = parse_line("1000-2000 rw-p 00000000 00:00 0 [heap]").unwrap();
        assert!(h.refusal().unwrap().contains("special"));
        let n = parse_line("1000-2000 rw-p 00000000 00:00 0 [anon:buffers]").unwrap();
        assert!(n.refusal().is_none());
    }

    /// The ioctl's answers agree with `/proc/self/maps` for every mapping of this process
    /// that stays put meanwhile, and say nothing for a hole.
    #[test]
    #[allow(unsafe_code, reason = "makes a hole in a mapping of the test's own")]
    fn lookups_agree_with_the_maps_file() {
        let hole = crate::sys::mmap_anon(3 * 4096).unwrap();
        // SAFETY: the middle page of our own fresh mapping.
        unsafe { crate::sys::munmap(hole + 4096, 4096).unwrap() };
        let all = vmas().unwrap();
        let mut lookup = Lookup::open().unwrap();
        let mut agreed = 0;
        for v in all.iter().filter(|v| v.start == hole || v.path.starts_with('/') || v.path == "[stack]") {
            let found = lookup.at(v.start).unwrap().cloned();
            let again = vmas().unwrap();
            // Compared only where the mapping is still as listed (threads of other tests
            // map and unmap meanwhile).
            if again.contains(v) {
                assert_eq!(found.as_ref(), Some(v), "mapping at {:#x}", v.start);
                agreed += 1;
            }
        }
        assert!(agreed >= 2, "too few mappings compared: {agreed}");
        assert!(lookup.at(hole + 4096).unwrap().is_none() || vmas().unwrap().iter().any(|v| v.start <= hole + 4096 && hole + 4096 < v.end));
        let covering = lookup.range(hole, hole + 3 * 4096).unwrap();
        // Another test's anonymous mapping made right beside the page merges with it.
        assert!(covering.iter().any(|v| v.start <= hole && hole < v.end), "{covering:?}");
        // SAFETY: the rest of our own mapping.
        unsafe {
            crate::sys::munmap(hole, 4096).unwrap();
            crate::sys::munmap(hole + 2 * 4096, 4096).unwrap();
        }
    }

    #[test]
    fn memory_pagemig_threads_touch_is_recognised() {
        let vma = |line: &str| parse_line(line).unwrap();
        let arena = vma("7f0004000000-7f0004021000 rw-p 00000000 00:00 0");
        let tail = vma("7f0004021000-7f0008000000 ---p 00000000 00:00 0");
        assert_eq!(shared_with_pagemig(&arena, None, Some(&tail)), Some("a malloc arena's heap"));
        let guard = vma("7f1000000000-7f1000001000 ---p 00000000 00:00 0");
        let stack = vma("7f1000001000-7f1000801000 rw-p 00000000 00:00 0");
        assert!(shared_with_pagemig(&stack, Some(&guard), None).unwrap().contains("thread stack"));
        let lib = vma("7f2000000000-7f2000010000 rw-p 0001f000 08:01 99 /usr/lib/libpagemig.so");
        let bss = vma("7f2000010000-7f2000012000 rw-p 00000000 00:00 0");
        assert!(shared_with_pagemig(&bss, Some(&lib), None).unwrap().contains(".bss"));
        // A plain mapping of the program's, with an ordinary neighbour.
        let buf = vma("7f3000200000-7f3000600000 rw-p 00000000 00:00 0");
        let other = vma("7f3000000000-7f3000200000 rw-p 00000000 00:00 0");
        assert_eq!(shared_with_pagemig(&buf, Some(&other), None), None);
        assert_eq!(shared_with_pagemig(&buf, None, None), None);
        // Right above anonymous shared memory (which has an inode): no loaded object's data.
        let shm = vma("7f3000000000-7f3000200000 rw-s 00000000 00:01 1234 /dev/zero (deleted)");
        assert_eq!(shared_with_pagemig(&buf, Some(&shm), None), None);
    }

    /// A thread's stack is not the program's to move in-process, nor are pagemig's own
    /// mappings; a mapping of the test's own is.
    #[test]
    fn in_process_excludes_thread_stacks_and_pagemig_memory() {
        let map = crate::sys::Mapping::new(1 << 20, 4096).unwrap();
        let own = crate::sys::Mapping::new_own(1 << 20, 4096).unwrap();
        let claimed = crate::sys::own::ranges();
        let mut lookup = Lookup::open().unwrap();
        assert!(lookup.in_process(map.addr() + 4096, &claimed).unwrap());
        assert!(!lookup.in_process(own.addr(), &claimed).unwrap());
        let on_stack = std::thread::spawn(|| {
            let probe = 0u64;
            let at = &probe as *const u64 as usize;
            Lookup::open().unwrap().in_process(at, &crate::sys::own::ranges()).unwrap()
        })
        .join()
        .unwrap();
        assert!(!on_stack, "a thread's stack goes to the kernel");
    }

    /// A mapping of the program's right above an inaccessible reservation of pagemig's own
    /// is the program's to move in-process: no thread's stack lies above pagemig's own
    /// address space. Above an inaccessible page of the program's, it goes to the kernel.
    #[test]
    #[allow(unsafe_code, reason = "maps and protects memory of the test's own")]
    fn memory_above_a_reservation_of_pagemigs_is_the_programs() {
        const LEN: usize = 1 << 20;
        let page = crate::sys::PAGE_SIZE;
        // One reservation, cut in three: the first page the program's guard, the next 256
        // KiB pagemig's own reservation, the rest a mapping of the program's above it.
        let base = crate::sys::reserve(2 * LEN).unwrap();
        let (guarded, own, above) = (base + page, base + LEN / 2, base + LEN);
        // SAFETY: the test's own fresh reservation, remapped piecewise; nothing else uses it.
        unsafe {
            for (at, len) in [(guarded, LEN / 2 - page), (above, LEN)] {
                let p = libc::mmap(
                    at as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                );
                assert_eq!(p as usize, at);
            }
            // Different access on either side, so that nothing merges across.
            assert_eq!(libc::madvise(guarded as *mut libc::c_void, LEN / 2 - page, libc::MADV_NOHUGEPAGE), 0);
        }
        crate::sys::own::claim(own, LEN / 2);
        let claimed = crate::sys::own::ranges();
        let mut lookup = Lookup::open().unwrap();
        let above_ours = lookup.in_process(above, &claimed).unwrap();
        let above_guard = lookup.in_process(guarded, &claimed).unwrap();
        crate::sys::own::disclaim(own, LEN / 2);
        // SAFETY: the test's own reservation, used by nothing any more.
        unsafe { crate::sys::munmap(base, 2 * LEN).unwrap() };
        assert!(above_ours, "memory above pagemig's own reservation was taken for a thread stack");
        assert!(!above_guard, "memory above an inaccessible page of the program's is taken for a thread stack");
    }

    #[test]
    fn holes_are_not_movable() {
        let a = parse_line("1000-2000 rw-p 00000000 00:00 0").unwrap();
        let b = parse_line("3000-4000 rw-p 00000000 00:00 0").unwrap();
        let all = [a, b];
        assert!(check_movable(0x1000, 0x2000, &all).is_ok());
        assert!(matches!(
            check_movable(0x1000, 0x4000, &all),
            Err(Error::NotMovable { start: 0x2000, end: 0x3000, .. })
        ));
        assert!(check_movable(0x3000, 0x5000, &all).is_err());
    }

    #[test]
    fn smaps_reports_flags_of_our_own_mappings() {
        let map = crate::sys::Mapping::new(1 << 16, 4096).unwrap();
        let v = vmas_with_flags(map.addr(), map.addr() + map.len()).unwrap();
        assert_eq!(v.len(), 1);
        assert!(v[0].has_flag("rd") && v[0].has_flag("wr"), "{:?}", v[0].flags);
    }
}
