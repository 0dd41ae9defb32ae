//! Migrating memory the caller already has, page by page, with the outcome of every page:
//! [`Engine::move_pages`], the form of `move_pages(2)` for the calling process.
//!
//! The pages are taken as the kernel would take them: each address names the page it lies
//! in, and a page of a transparent huge page moves with its whole huge page (found with the
//! `PAGEMAP_SCAN` ioctl). Pages already on their target node are left alone, pages that
//! are not there report `ENOENT` (never touched) or `EFAULT` (not mapped), and pages
//! pagemig does not move itself (shared, file-backed or special mappings, the calling
//! thread's stack, pagemig's own mappings and every memory its threads may touch while a
//! migration runs: thread stacks and TLS, malloc arenas, statics) go to the kernel's
//! `move_pages(2)`, so that nothing fails that the
//! kernel would have served. Every other page goes through the batch pipeline.
#![allow(unsafe_code, reason = "names the caller's pages as folios, under the caller's promise")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Engine, MigrateOptions, Mode, Reason};
use crate::error::{Error, Result};
use crate::folio::Folio;
use crate::maps;
use crate::sys::{self, HPAGE_SIZE, PAGE_SIZE};

/// The most nodes a node number may name (`MAX_NUMNODES` of the kernel's largest
/// configuration).
const MAX_NODES: i32 = 1024;

/// The parts of `addr .. addr + len` (rounded out to whole pages) that lie in mappings
/// pagemig moves itself (private, anonymous, read-write memory that is not pagemig's own
/// nor memory its threads may touch: thread stacks, malloc arenas, statics), in address
/// order; the rest of the range is unmapped or memory [`Engine::move_pages`] hands to the
/// kernel.
///
/// # Errors
/// [`Error::Invalid`] for an empty or wrapping range; the errno of reading
/// `/proc/self/maps`.
pub fn movable_ranges(addr: usize, len: usize) -> Result<Vec<std::ops::Range<usize>>> {
    let end = addr
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
        .filter(|_| len > 0)
        .ok_or_else(|| Error::Invalid(format!("range {addr:#x}+{len:#x} is empty or wraps around")))?;
    let start = addr & !(PAGE_SIZE - 1);
    let claimed = crate::sys::own::ranges();
    let mut lookup = maps::Lookup::open()?;
    let mut out = Vec::new();
    for v in lookup.range(start, end)? {
        let (s, e) = (v.start.max(start), v.end.min(end));
        if !lookup.in_process(s, &[])? {
            continue;
        }
        // pagemig's own memory inside the mapping (a destination it merged with) is cut out.
        for (ps, pe) in crate::sys::own::unclaimed(s, e, &claimed).0 {
            out.push(ps..pe);
        }
    }
    Ok(out)
}

/// Pages [`Engine::move_range`] hands to the pipeline at a time.
const RANGE_CHUNK: usize = 1 << 16;

/// A range [`Engine::move_range`] takes spans at most this many times the machine's memory.
const RANGE_MEMORY_FACTOR: usize = 16;

/// The machine's memory, RAM and swap (`MemTotal` and `SwapTotal` of `/proc/meminfo`), in
/// pages; no bound where it cannot be read.
fn memory_pages() -> usize {
    let Ok(meminfo) = crate::sys::read_text("/proc/meminfo") else {
        return usize::MAX / RANGE_MEMORY_FACTOR;
    };
    let kib: usize = meminfo
        .lines()
        .filter(|l| l.starts_with("MemTotal:") || l.starts_with("SwapTotal:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .sum();
    if kib == 0 { usize::MAX / RANGE_MEMORY_FACTOR } else { kib.saturating_mul(1024) / PAGE_SIZE }
}

impl Engine {
    /// Moves each page at `pages[i]` to node `nodes[i]` and writes its outcome in
    /// `status[i]`, as `move_pages(2)` does for the calling process: the node the page is
    /// on (for a page the call moved, the node it moved it to, even where the program
    /// freed that page since; for one that could not move, pinned say, the node it is still
    /// on), or a negative errno (`-ENOENT` for a page never touched, `-EFAULT` for an
    /// address not mapped, `-ENOMEM`, …). Without `nodes`, only reports where each page is.
    /// Returns, as the kernel does, how many of the pages it tried to move (present,
    /// elsewhere than asked) it could not move.
    ///
    /// Any address inside a page names that page; a page of a transparent huge page moves
    /// with its whole huge page. Pages already on their target are left alone. Pages
    /// pagemig does not move itself (shared, file-backed or special mappings such as the
    /// `brk` heap, the calling thread's stack) are handed to the kernel's `move_pages(2)`.
    /// Unlike the kernel, the nodes are all checked before any page moves, and every page
    /// gets its outcome: the kernel stops at a batch with a page that cannot move, its
    /// statuses and all after unwritten, and answers `-EBUSY` for a folio named again while
    /// it has it queued (the second 4 KiB page of a huge page); the C entry, and so the
    /// drop-in, answer as it does.
    ///
    /// # Safety
    /// The calling thread must not access the pages during the call (a page being migrated
    /// makes every access wait for the migration, which this thread performs; its
    /// asynchronous signals wait for the call's end, see [`crate::Folio::new`]). Other
    /// threads may do anything to them.
    ///
    /// # Errors
    /// Nothing moved: [`Error::Invalid`] (`EINVAL`) when the three slices differ in length;
    /// `ENODEV` for a node that is negative, beyond 1023 ([`Error::Sys`]) or without memory
    /// ([`Error::UnknownNode`]), as the kernel answers; the errno of reading the process's
    /// mappings.
    ///
    /// # Examples
    /// ```no_run
    /// # use pagemig::Engine;
    /// let buf = vec![7u8; 1 << 20];
    /// let pages: Vec<usize> = (0..buf.len()).step_by(4096).map(|o| buf.as_ptr() as usize + o).collect();
    /// let mut status = vec![0; pages.len()];
    /// // SAFETY: this thread does not touch `buf` during the call.
    /// let left = unsafe { Engine::global()?.move_pages(&pages, Some(&vec![1; pages.len()]), &mut status)? };
    /// # Ok::<(), pagemig::Error>(())
    /// ```
    pub unsafe fn move_pages(&self, pages: &[usize], nodes: Option<&[i32]>, status: &mut [i32]) -> Result<usize> {
        let Some(nodes) = nodes else {
            lengths_match(pages.len(), status.len(), pages.len())?;
            sys::move_pages(pages, None, status).map_err(Error::sys("move_pages (query)"))?;
            return Ok(0);
        };
        // SAFETY: the caller's promise, passed on.
        unsafe { self.move_pages_with(pages, nodes, status, &MigrateOptions::default()) }
    }

    /// [`Engine::move_pages`] with a target for every page, and whether the call stopped
    /// where the kernel's would have (a batch with a page that could not move: the
    /// entries after it are not the kernel's to have reached, and count as not moved).
    ///
    /// # Safety
    /// As [`Engine::move_pages`].
    ///
    /// # Errors
    /// As [`Engine::move_pages`].
    #[cfg_attr(not(feature = "ffi"), allow(dead_code, reason = "the C entry's"))]
    pub(crate) unsafe fn move_pages_stopping(
        &self,
        pages: &[usize],
        nodes: &[i32],
        status: &mut [i32],
    ) -> Result<(usize, bool)> {
        lengths_match(pages.len(), status.len(), nodes.len())?;
        self.check_targets(nodes)?;
        if pages.is_empty() {
            return Ok((0, false));
        }
        self.move_all(pages, nodes, status, &MigrateOptions::default(), true)
    }

    /// `ENODEV` for a node that is negative, beyond 1023 or without memory, as the kernel
    /// answers.
    fn check_targets(&self, nodes: &[i32]) -> Result<()> {
        let memory = crate::numa::memory_nodes()?;
        // As the kernel: a node out of range is as unknown as one without memory.
        if nodes.iter().any(|&n| !(0..MAX_NODES).contains(&n)) {
            return Err(Error::Sys { op: "move_pages (a node outside 0 … 1023)", errno: crate::sys::Errno::NODEV });
        }
        if let Some(&bad) = nodes.iter().find(|&&n| !memory.contains(&(n as u32))) {
            crate::numa::check_node(bad as u32)?;
        }
        Ok(())
    }

    /// [`Engine::move_pages`] with a target for every page and `opts`: its batch bound, and
    /// its deadline or cancel flag, at which the call stops; pages not reached by then
    /// report `-ETIMEDOUT` or `-ECANCELED` and are as they were.
    ///
    /// # Safety
    /// As [`Engine::move_pages`].
    ///
    /// # Errors
    /// As [`Engine::move_pages`].
    pub unsafe fn move_pages_with(
        &self,
        pages: &[usize],
        nodes: &[i32],
        status: &mut [i32],
        opts: &MigrateOptions,
    ) -> Result<usize> {
        lengths_match(pages.len(), status.len(), nodes.len())?;
        self.check_targets(nodes)?;
        if pages.is_empty() {
            return Ok(0);
        }
        self.move_all(pages, nodes, status, opts, false).map(|(left, _)| left)
    }

    /// Moves every page of `addr .. addr + len` (rounded out to whole pages) to `node`,
    /// with [`Engine::move_pages`]' rules for each page: folios of the size the pages really
    /// are (a transparent huge page moves whole), pages already on `node` left alone, pages
    /// pagemig does not move itself handed to the kernel's `move_pages(2)`, and an outcome
    /// for every page. `opts` bounds the batches and can cancel the call or give it a
    /// deadline: pages not reached report `-ECANCELED` or `-ETIMEDOUT` and are as they were.
    ///
    /// # Safety
    /// As [`Engine::move_pages`]: the calling thread must not access the range during the
    /// call; other threads may do anything to it.
    ///
    /// # Errors
    /// Nothing moved: [`Error::Invalid`] for an empty or wrapping range, or one of more
    /// pages than 16 times the machine's memory (RAM and swap) holds, [`Error::Sys`] with
    /// `ENOMEM` when its outcomes cannot be allocated, [`Error::UnknownNode`] for a node
    /// without memory, the errno of reading the process's mappings.
    ///
    /// # Examples
    /// Memory the program already has, moved where it is and reported page by page:
    /// ```no_run
    /// # use pagemig::{Engine, MigrateOptions};
    /// let mut table = vec![0u64; 1 << 20];
    /// table.iter_mut().enumerate().for_each(|(i, w)| *w = i as u64);
    /// let bytes = table.len() * 8;
    /// // SAFETY: this thread does not touch `table` during the call.
    /// let outcome = unsafe {
    ///     Engine::global()?.move_range(table.as_ptr() as usize, bytes, 1, &MigrateOptions::default())?
    /// };
    /// println!("{} of {} pages on node 1", outcome.pages_on(1), outcome.status.len());
    /// for (addr, errno) in outcome.errors() {
    ///     eprintln!("page {addr:#x} stayed: errno {errno}");
    /// }
    /// # Ok::<(), pagemig::Error>(())
    /// ```
    pub unsafe fn move_range(&self, addr: usize, len: usize, node: u32, opts: &MigrateOptions) -> Result<RangeOutcome> {
        let end = addr
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| Error::Invalid(format!("range {addr:#x}+{len:#x} is empty or wraps around")))?;
        crate::numa::check_node(node)?;
        let first = addr & !(PAGE_SIZE - 1);
        let count = (end - first).div_ceil(PAGE_SIZE);
        // One outcome per page is the answer: bounded by the machine's memory (a range of
        // more pages than 16 times it holds is not memory anyone could have meant to move),
        // and allocated fallibly.
        if count > RANGE_MEMORY_FACTOR * memory_pages() {
            return Err(Error::Invalid(format!(
                "range {addr:#x}+{len:#x} ({count} pages) spans more than {RANGE_MEMORY_FACTOR} times the \
                 machine's memory: move the mapped parts"
            )));
        }
        let mut status = Vec::new();
        status
            .try_reserve_exact(count)
            .map_err(|_| Error::Sys { op: "move_range (an outcome for each page)", errno: sys::Errno::NOMEM })?;
        status.resize(count, 0);
        let target = i32::try_from(node).map_err(|_| Error::Invalid(format!("node {node}")))?;
        // The pages' addresses and targets, a chunk at a time: memory beyond the outcomes
        // stays bounded however long the range.
        let mut not_moved = 0;
        for (k, outcomes) in status.chunks_mut(RANGE_CHUNK).enumerate() {
            let base = first + k * RANGE_CHUNK * PAGE_SIZE;
            let pages: Vec<usize> = (0..outcomes.len()).map(|i| base + i * PAGE_SIZE).collect();
            not_moved += self.move_all(&pages, &vec![target; pages.len()], outcomes, opts, false)?.0;
        }
        // The kernel moves a huge page it was handed whole at its first page, and reports
        // `EBUSY` for the next page of it, which it finds isolated by that same call; where
        // such a page is on the target now, it moved (the kernel's count of pages not
        // moved never counted it).
        let busy: Vec<usize> = (0..count).filter(|&i| status[i] == -libc::EBUSY).collect();
        if !busy.is_empty() {
            let mut now = vec![0; busy.len()];
            let at: Vec<usize> = busy.iter().map(|&i| first + i * PAGE_SIZE).collect();
            sys::move_pages(&at, None, &mut now).map_err(Error::sys("move_pages (query)"))?;
            for (k, &i) in busy.iter().enumerate() {
                if now[k] == target {
                    status[i] = target;
                }
            }
        }
        Ok(RangeOutcome { first_page: first, status, not_moved })
    }

    /// Moves every page to its node, writing its outcome; returns the kernel's count of
    /// pages not moved. Pages of mappings pagemig does not move go to the kernel at once,
    /// without a look of pagemig's own: one mapping lookup per mapping named, the only cost
    /// such a call pays (smaps, which walks every mapping's pages, is not read; flags such
    /// as I/O and PFN maps are checked by the migration itself, which refuses such a folio
    /// before touching it, and the folio goes to the kernel after).
    ///
    /// `as_kernel`: the kernel's answers (see [`kernel_order`]): `-EBUSY` for a folio named
    /// again while queued, and where a page the kernel would have queued could not move,
    /// the call answers as the kernel's does and says it stopped there. Without it, every
    /// page gets its own outcome.
    fn move_all(
        &self,
        pages: &[usize],
        nodes: &[i32],
        status: &mut [i32],
        opts: &MigrateOptions,
        as_kernel: bool,
    ) -> Result<(usize, bool)> {
        let page_of = |i: usize| pages[i] & !(PAGE_SIZE - 1);
        let mut vmas = maps::Lookup::open()?;
        // pagemig's own mappings and its threads' stacks: the kernel's to move, as is
        // memory pagemig's threads may touch (see `maps::shared_with_pagemig`).
        let claimed = crate::sys::own::ranges();
        let (mut candidates, mut direct) = (Vec::new(), Vec::new());
        for i in 0..pages.len() {
            let movable = vmas.in_process(page_of(i), &claimed)?;
            if movable { candidates.push(i) } else { direct.push(i) }
        }
        // What the caller's statuses held: an entry the kernel leaves unwritten (it stops at
        // a batch that failed) keeps it, as the kernel would leave it.
        let mut answers = Answers {
            original: status.to_vec(),
            served: vec![false; pages.len()],
            unwritten: vec![false; pages.len()],
            stopped: 0,
        };
        let mut home = vec![false; pages.len()];
        // For the kernel's answers, which of those are where they are asked to be: an entry
        // already there moves the kernel's queue on (see `kernel_order`). Not needed where
        // the kernel takes every entry: its answer is the call's.
        if as_kernel && !direct.is_empty() && !candidates.is_empty() {
            let at: Vec<usize> = direct.iter().map(|&i| pages[i]).collect();
            let mut now = vec![0; at.len()];
            sys::move_pages(&at, None, &mut now).map_err(Error::sys("move_pages (query)"))?;
            direct.iter().zip(&now).for_each(|(&i, &n)| home[i] = n == nodes[i]);
        }
        let mut not_moved = kernel_moves(pages, nodes, status, &direct, &mut answers)?;
        self.pages_counters.kernel_unmovable.fetch_add(direct.len() as u64, Ordering::Relaxed);
        if candidates.is_empty() && as_kernel {
            // The kernel's own call, whole: where it stopped, the call stops.
            return Ok((not_moved, answers.unwritten.iter().any(|&u| u)));
        }
        // Where pagemig's candidates are now: pages not there, and pages already home, are
        // done.
        let mut now = vec![0; candidates.len()];
        if !candidates.is_empty() {
            let at: Vec<usize> = candidates.iter().map(|&i| pages[i]).collect();
            sys::move_pages(&at, None, &mut now).map_err(Error::sys("move_pages (query)"))?;
        }
        for (k, &i) in candidates.iter().enumerate() {
            status[i] = now[k];
            home[i] = now[k] == nodes[i];
        }
        // Each candidate's folio: the huge page it lies in, or its page.
        let huge = match (candidates.first(), candidates.last()) {
            (Some(&first), Some(_)) => {
                let lo = candidates.iter().map(|&i| page_of(i)).min().unwrap_or(page_of(first));
                let hi = candidates.iter().map(|&i| page_of(i) + PAGE_SIZE).max().unwrap_or(lo + PAGE_SIZE);
                sys::huge_ranges(lo & !(HPAGE_SIZE - 1), hi.next_multiple_of(HPAGE_SIZE)).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        // A folio named for more than one node is the kernel's, every entry naming it in
        // order: it moves the folio to each node in turn, and the last one named keeps it.
        let mut first_node: BTreeMap<usize, i32> = BTreeMap::new();
        let mut mixed: BTreeSet<usize> = BTreeSet::new();
        for &i in &candidates {
            let start = folio_at(&huge, page_of(i)).0;
            if *first_node.entry(start).or_insert(nodes[i]) != nodes[i] {
                mixed.insert(start);
            }
        }
        if !mixed.is_empty() {
            let (theirs, ours): (Vec<usize>, Vec<usize>) =
                candidates.iter().partition(|&&i| mixed.contains(&folio_at(&huge, page_of(i)).0));
            not_moved += kernel_moves(pages, nodes, status, &theirs, &mut answers)?;
            self.pages_counters.kernel_unmovable.fetch_add(theirs.len() as u64, Ordering::Relaxed);
            theirs.iter().for_each(|&i| home[i] = false);
            candidates = ours;
        }
        let todo: Vec<usize> =
            candidates.iter().copied().filter(|&i| status[i] >= 0 && status[i] != nodes[i]).collect();
        let absent = candidates.iter().filter(|&&i| status[i] < 0).count();
        self.pages_counters.begin(pages.len(), absent, candidates.len() - absent - todo.len());
        if !todo.is_empty() {
            not_moved += self.move_todo(pages, nodes, status, &todo, &huge, &mut answers, &mut vmas, opts)?;
        }
        // Entries the kernel left unwritten: it stopped at a batch of them that failed. A
        // page it moved all the same is queued in `kernel_order`'s reckoning, one still
        // elsewhere failed (or was never tried).
        let mut unwritten: Vec<usize> = (0..pages.len()).filter(|&i| answers.unwritten[i]).collect();
        if !as_kernel && !unwritten.is_empty() {
            // Every page its own outcome: the pages the kernel stopped short of (a batch with
            // one that could not move) are handed to it again, each alone, and counted by
            // those calls (the stopped calls' counts held them all, and the pages never
            // reached).
            not_moved = not_moved.saturating_sub(std::mem::take(&mut answers.stopped));
            for &i in &unwritten {
                not_moved += kernel_moves(pages, nodes, status, &[i], &mut answers)?;
            }
            unwritten.retain(|&i| answers.unwritten[i]);
        }
        let mut failed = vec![false; pages.len()];
        if !unwritten.is_empty() {
            let at: Vec<usize> = unwritten.iter().map(|&i| pages[i]).collect();
            let mut now = vec![0; at.len()];
            sys::move_pages(&at, None, &mut now).map_err(Error::sys("move_pages (query)"))?;
            for (k, &i) in unwritten.iter().enumerate() {
                failed[i] = now[k] != nodes[i] && now[k] >= 0 && !home[i];
                // Without the kernel's answers to give, where the page is.
                if now[k] == nodes[i] || !as_kernel {
                    status[i] = now[k];
                }
            }
        }
        if !as_kernel {
            return Ok((not_moved, false));
        }
        // The kernel's answers for a folio named again while queued, and for a batch that
        // failed.
        let keys: Vec<Option<usize>> = (0..pages.len())
            .map(|i| {
                let queued = !home[i] && ((status[i] >= 0 && status[i] == nodes[i]) || failed[i]);
                queued.then(|| if answers.served[i] { folio_at(&huge, page_of(i)).0 } else { page_of(i) })
            })
            .collect();
        let order = KernelOrder { nodes, keys: &keys, failed: &failed, served: &answers.served };
        match kernel_order(&order, status, &answers.original) {
            Some(left) => Ok((left, true)),
            None => Ok((not_moved, false)),
        }
    }

    /// Moves the pages `todo` (present, elsewhere than asked), writing their outcomes, and
    /// returns how many failed to migrate as the kernel counts them: not the pages it
    /// refuses to take at all (`EACCES` shared, `ENOENT`, `EFAULT`), which only their status
    /// reports.
    ///
    /// A folio pagemig could not move (pinned, mapped by another process since the call
    /// began, refused by the kernel) is handed to the kernel's `move_pages(2)`, whose answer
    /// stands: the call never fails a page the kernel would have moved. Folios stopped by
    /// the caller (`ECANCELED`, `ETIMEDOUT`) keep that errno.
    ///
    /// `huge`: the huge pages among them; `answers`: what the caller's statuses held, where
    /// each page's answer comes from.
    #[allow(clippy::too_many_arguments, reason = "one call's arrays, and what it found of them")]
    fn move_todo(
        &self,
        pages: &[usize],
        nodes: &[i32],
        status: &mut [i32],
        todo: &[usize],
        huge: &[(usize, usize)],
        answers: &mut Answers,
        vmas: &mut maps::Lookup,
        opts: &MigrateOptions,
    ) -> Result<usize> {
        let page_of = |i: usize| pages[i] & !(PAGE_SIZE - 1);
        let mut kernel: Vec<usize> = Vec::new();
        let mut folios: BTreeMap<usize, (usize, i32)> = BTreeMap::new();
        let stack = sys::current_thread_stack();
        // Pages another process maps too (a fork's copy-on-write sharing): the kernel's
        // to refuse (`EACCES`), or to move with `MPOL_MF_MOVE_ALL`. Pages the program
        // write-protected through a userfaultfd of its own, or has not written since it
        // cleared their soft-dirty bits: the kernel's migration keeps those marks on the new
        // page, a page pagemig moves in comes without the one and with the other.
        let marks = sys::page_marks(&todo.iter().map(|&i| pages[i]).collect::<Vec<_>>()).unwrap_or_default();
        // Each page's folio (every page naming it names the same node: see `move_all`).
        for (k, &i) in todo.iter().enumerate() {
            let (start, size) = folio_at(huge, page_of(i));
            let in_huge = size == HPAGE_SIZE;
            let on_stack = stack.is_some_and(|(s, e)| start < e && s < start + size);
            let mark = marks.get(k).copied().unwrap_or_default();
            let kernels = mark.present && (mark.shared || mark.uffd_wp || !mark.soft_dirty);
            let mut whole_huge_movable =
                || vmas.range(start, start + size).is_ok_and(|r| maps::check_movable(start, start + size, &r).is_ok());
            if on_stack || kernels || (in_huge && !whole_huge_movable()) {
                kernel.push(i);
            } else {
                folios.entry(start).or_insert((size, nodes[i]));
            }
        }
        let mut to_kernel = vec![false; pages.len()];
        for &i in &kernel {
            to_kernel[i] = true;
        }
        let mut not_moved = kernel_moves(pages, nodes, status, &kernel, answers)?;
        self.pages_counters.kernel_unmovable.fetch_add(kernel.len() as u64, Ordering::Relaxed);
        // pagemig's pages, one call per target node; what failed, by folio.
        let mut by_node: BTreeMap<i32, Vec<(usize, usize)>> = BTreeMap::new();
        for (&start, &(size, node)) in &folios {
            by_node.entry(node).or_default().push((start, size));
        }
        let mut failed: BTreeMap<usize, i32> = BTreeMap::new();
        for (node, list) in by_node {
            let mut folios: Vec<Folio<'_>> = Vec::with_capacity(list.len());
            for &(s, len) in &list {
                // SAFETY: the caller promises this thread does not access its pages during
                // the call; each folio is a page (or huge page) of a mapping pagemig may
                // move, and the call checks them again before touching anything.
                match unsafe { Folio::new(s, len) } {
                    Ok(f) => folios.push(f),
                    Err(e) => {
                        failed.insert(s, e.errno().raw_os_error());
                    }
                }
            }
            match self.migrate_pages(&folios, node as u32, Reason::Syscall, Mode::Sync, opts) {
                Ok(_) => {}
                Err(Error::Partial { stats, .. }) => {
                    failed.extend(stats.failures.iter().map(|f| (f.addr, f.errno)));
                }
                // Refused as a whole before anything moved (the node filled up, the
                // program changed its mappings meanwhile): every folio has the errno.
                Err(e) => failed.extend(list.iter().map(|&(s, _)| (s, e.errno().raw_os_error()))),
            }
        }
        // The outcome of every page pagemig took: for a folio it moved, the node it moved it
        // to, as the kernel reports the pages it migrated (not where the page is now: the
        // program may have freed it since, or faulted a new one in on another node); for a
        // folio it did not move, its errno, or the kernel's answer where it is still there.
        let mine: Vec<usize> = todo.iter().copied().filter(|&i| !to_kernel[i]).collect();
        if mine.is_empty() {
            self.pages_counters.end(status, nodes, todo);
            return Ok(not_moved);
        }
        let p: Vec<usize> = mine.iter().map(|&i| pages[i]).collect();
        let mut now = vec![0; mine.len()];
        sys::move_pages(&p, None, &mut now).map_err(Error::sys("move_pages (query)"))?;
        let mut retry: Vec<usize> = Vec::new();
        for (k, &i) in mine.iter().enumerate() {
            let page = page_of(i);
            let Some((folio, &(_, moved_to))) =
                folios.range(..=page).next_back().filter(|(s, (len, _))| page < *s + *len)
            else {
                status[i] = now[k];
                continue;
            };
            status[i] = match failed.get(folio) {
                Some(&errno) if now[k] != nodes[i] => {
                    if errno == libc::ECANCELED || errno == libc::ETIMEDOUT {
                        not_moved += 1;
                    } else if now[k] >= 0 {
                        retry.push(i);
                    } else {
                        // Gone meanwhile (unmapped, purged): the query's answer stands.
                        not_moved += usize::from(![libc::ENOENT, libc::EFAULT].contains(&-now[k]));
                        status[i] = now[k];
                        continue;
                    }
                    -errno
                }
                Some(_) => now[k],
                None => {
                    answers.served[i] = true;
                    moved_to
                }
            };
        }
        let moved = mine.iter().filter(|&&i| status[i] == nodes[i]).count();
        self.pages_counters.moved.fetch_add(moved as u64, Ordering::Relaxed);
        not_moved += kernel_moves(pages, nodes, status, &retry, answers)?;
        self.pages_counters.kernel_retried.fetch_add(retry.len() as u64, Ordering::Relaxed);
        self.pages_counters.end(status, nodes, todo);
        Ok(not_moved)
    }
}

/// The folio the page at `page` belongs to, `(start, size)`: the huge page of `huge` (the
/// huge pages of the range, in address order) it lies in, or the page itself.
fn folio_at(huge: &[(usize, usize)], page: usize) -> (usize, usize) {
    let in_huge = huge.get(huge.partition_point(|&(_, e)| e <= page)).is_some_and(|&(s, _)| s <= page);
    if in_huge { (page & !(HPAGE_SIZE - 1), HPAGE_SIZE) } else { (page, PAGE_SIZE) }
}

/// A call's entries as [`kernel_order`] reckons them.
struct KernelOrder<'a> {
    /// The node each entry names.
    nodes: &'a [i32],
    /// The folio of each entry the kernel would queue (present elsewhere than asked, and
    /// moved there by the call or failed), `None` for one it would not (absent, refused,
    /// already there).
    keys: &'a [Option<usize>],
    /// Entries whose folio could not move.
    failed: &'a [bool],
    /// Entries pagemig moved itself: only their answers are rewritten, the kernel's own
    /// answers already are its own.
    served: &'a [bool],
}

/// What the kernel's `move_pages(2)` answers, where it differs from each page's own outcome
/// (`do_pages_move`). It queues a folio at the first entry that finds it elsewhere than
/// asked, and moves the queue when the node changes or an entry is not queued.
///
/// - An entry that finds its folio already queued cannot isolate it again and reports
///   `-EBUSY` (not counted as a page not moved), which moves the queue; after that the folio
///   is on its node. So every 4 KiB page of a huge page reads `[node, -EBUSY, node, …]`,
///   and a page named twice in a row `[node, -EBUSY]`.
/// - Where a queue moved with a folio that failed, the kernel returns at once, the queue's entries and every entry after
///   it unwritten (`original`: the caller's statuses as they were), and its count is the
///   folios that failed plus the entries it never reached. That count is returned; `None`
///   where no queue failed.
fn kernel_order(order: &KernelOrder<'_>, status: &mut [i32], original: &[i32]) -> Option<usize> {
    let n = order.nodes.len();
    let (mut queued, mut moved, mut failing): (BTreeSet<usize>, BTreeSet<usize>, BTreeSet<usize>) = Default::default();
    let mut members: Vec<usize> = Vec::new();
    let mut run: Option<i32> = None;
    // The kernel stops with the queue: `members` and the entries from `from` unwritten.
    let stop = |members: &[usize], failing: usize, from: usize, status: &mut [i32]| {
        members.iter().copied().chain(from..n).for_each(|i| status[i] = original[i]);
        Some(failing + (n - from))
    };
    for i in 0..n {
        if run != Some(order.nodes[i]) {
            if !failing.is_empty()
                && let Some(left) = stop(&members, failing.len(), i, status)
            {
                return Some(left);
            }
            moved.extend(std::mem::take(&mut queued));
            members.clear();
            run = Some(order.nodes[i]);
        }
        match order.keys[i] {
            Some(k) if !moved.contains(&k) && !queued.contains(&k) => {
                queued.insert(k);
                members.push(i);
                if order.failed[i] {
                    failing.insert(k);
                }
                continue;
            }
            Some(k) if queued.contains(&k) && order.served[i] => status[i] = -libc::EBUSY,
            _ => {}
        }
        // Not queued: its own answer is written, then the queue moves, and the next entry
        // starts a run of its own.
        if !failing.is_empty()
            && let Some(left) = stop(&members, failing.len(), i + 1, status)
        {
            return Some(left);
        }
        moved.extend(std::mem::take(&mut queued));
        members.clear();
        run = None;
    }
    if failing.is_empty() { None } else { stop(&members, failing.len(), n, status) }
}

/// [`Error::Invalid`] unless a call's pages, statuses and nodes are as many.
fn lengths_match(pages: usize, status: usize, nodes: usize) -> Result<()> {
    if status == pages && nodes == pages {
        return Ok(());
    }
    Err(Error::Invalid(format!("{pages} pages, {status} statuses and {nodes} nodes: the three must match")))
}

/// Where each answer of a call comes from.
struct Answers {
    /// The caller's statuses as they were.
    original: Vec<i32>,
    /// Entries of folios pagemig moved itself.
    served: Vec<bool>,
    /// Entries the kernel did not write (it stopped at a batch that failed).
    unwritten: Vec<bool>,
    /// The counts of the kernel's calls that stopped so: every page they could not move
    /// is among their unwritten entries.
    stopped: usize,
}

/// What no status the kernel writes can be: a node number or a negative errno.
const UNWRITTEN: i32 = i32::MIN;

/// Hands the pages `which` to the kernel's `move_pages(2)`, writes their statuses and
/// returns the kernel's count of pages it could not move. An entry the kernel does not
/// write (it stops at a batch that failed) gets the caller's value and is marked so in
/// `answers`.
fn kernel_moves(
    pages: &[usize],
    nodes: &[i32],
    status: &mut [i32],
    which: &[usize],
    answers: &mut Answers,
) -> Result<usize> {
    if which.is_empty() {
        return Ok(0);
    }
    let p: Vec<usize> = which.iter().map(|&i| pages[i]).collect();
    let n: Vec<i32> = which.iter().map(|&i| nodes[i]).collect();
    let mut s: Vec<i32> = vec![UNWRITTEN; which.len()];
    let not_moved = sys::move_pages_counted(&p, Some(&n), &mut s).map_err(Error::sys("move_pages"))?;
    let mut stopped = false;
    for (k, &i) in which.iter().enumerate() {
        let unwritten = s[k] == UNWRITTEN;
        status[i] = if unwritten { answers.original[i] } else { s[k] };
        answers.unwritten[i] = unwritten;
        stopped |= unwritten;
    }
    if stopped {
        answers.stopped += not_moved;
    }
    Ok(not_moved)
}

/// The outcome of [`Engine::move_range`]: one status per page of the range, as
/// `move_pages(2)` writes them.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RangeOutcome {
    /// The address of the range's first page.
    pub first_page: usize,
    /// For each page, the node it is on, or a negative errno: `-ENOENT` never touched,
    /// `-EFAULT` not mapped, `-EACCES` mapped by another process, `-EBUSY` pinned,
    /// `-ECANCELED`/`-ETIMEDOUT` not reached before the call was stopped.
    pub status: Vec<i32>,
    /// Pages present elsewhere than asked that could not be moved, as the kernel counts
    /// them.
    pub not_moved: usize,
}

impl RangeOutcome {
    /// How many pages are on `node`.
    pub fn pages_on(&self, node: u32) -> usize {
        self.status.iter().filter(|&&s| i64::from(s) == i64::from(node)).count()
    }

    /// The pages that reported an error, as `(page address, positive errno)`.
    pub fn errors(&self) -> impl Iterator<Item = (usize, i32)> + '_ {
        self.status.iter().enumerate().filter(|&(_, &s)| s < 0).map(|(i, &s)| (self.first_page + i * PAGE_SIZE, -s))
    }

    /// What a page's status errno (positive, as [`RangeOutcome::errors`] gives it, or as
    /// `move_pages(2)` puts it in `status`, negated) says about that page, in the words of
    /// `move_pages(2)`: `strerror`'s text ("No such file or directory" for `ENOENT`) says
    /// nothing of pages.
    pub fn meaning(errno: i32) -> &'static str {
        match errno {
            libc::ENOENT => "ENOENT: the page is not present (never touched, or purged)",
            libc::EFAULT => "EFAULT: a zero page, or no memory mapped there",
            libc::EACCES => "EACCES: the page is mapped by another process too",
            libc::EBUSY => "EBUSY: the page is busy (pinned for I/O, or held by another migration)",
            libc::ENOMEM => "ENOMEM: no memory for the page on the target node",
            libc::EIO => "EIO: the page could not be copied or written back",
            libc::EINVAL => "EINVAL: the page's mapping cannot move it",
            libc::ECANCELED => "ECANCELED: the call was stopped before reaching the page",
            libc::ETIMEDOUT => "ETIMEDOUT: the call's time ran out before reaching the page",
            _ => "the page was not moved",
        }
    }
}

/// What [`Engine::move_pages`] and [`Engine::move_range`] have done in this engine so far,
/// page by page ([`Engine::pages_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct PagesStats {
    /// Calls that named at least one page with a target.
    pub calls: u64,
    /// Pages named.
    pub pages: u64,
    /// Pages of mappings pagemig moves that were on their target already: left alone.
    pub already_home: u64,
    /// Pages of mappings pagemig moves that were not there to move (`ENOENT` never
    /// touched).
    pub absent: u64,
    /// Pages pagemig moved itself.
    pub moved: u64,
    /// Pages handed to the kernel's `move_pages(2)` because pagemig does not move their
    /// memory: shared, file-backed or special mappings, addresses not mapped, the calling
    /// thread's stack, pages another process maps too.
    pub kernel_unmovable: u64,
    /// Pages pagemig tried and could not move (pinned, mapped by another process, changed
    /// under the call), handed to the kernel's `move_pages(2)` after.
    pub kernel_retried: u64,
    /// Pages present elsewhere than asked that ended the call with an error.
    pub failed: u64,
}

/// The counters behind [`PagesStats`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    calls: AtomicU64,
    pages: AtomicU64,
    already_home: AtomicU64,
    absent: AtomicU64,
    moved: AtomicU64,
    kernel_unmovable: AtomicU64,
    kernel_retried: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    /// Counts a call of `pages` pages, of which pagemig's query found `absent` not there
    /// and `home` on their target already.
    fn begin(&self, pages: usize, absent: usize, home: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.pages.fetch_add(pages as u64, Ordering::Relaxed);
        self.absent.fetch_add(absent as u64, Ordering::Relaxed);
        self.already_home.fetch_add(home as u64, Ordering::Relaxed);
    }

    /// Counts the pages of `todo` that ended with an error.
    fn end(&self, status: &[i32], nodes: &[i32], todo: &[usize]) {
        let failed = todo.iter().filter(|&&i| status[i] != nodes[i] && status[i] < 0).count();
        self.failed.fetch_add(failed as u64, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> PagesStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PagesStats {
            calls: get(&self.calls),
            pages: get(&self.pages),
            already_home: get(&self.already_home),
            absent: get(&self.absent),
            moved: get(&self.moved),
            kernel_unmovable: get(&self.kernel_unmovable),
            kernel_retried: get(&self.kernel_retried),
            failed: get(&self.failed),
        }
    }
}

impl Engine {
    /// What [`Engine::move_pages`] and [`Engine::move_range`] have done in this engine so
    /// far: pages moved by pagemig, pages handed to the kernel and why, pages left alone.
    pub fn pages_stats(&self) -> PagesStats {
        self.pages_counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: i32 = 1;
    const BUSY: i32 = -libc::EBUSY;
    /// What the caller's statuses held.
    const SENTINEL: i32 = -99;

    /// `kernel_order` on entries moved by pagemig to `nodes` (`keys`: their folios, `None`
    /// for an absent page), those in `failed` not moved: the statuses and count.
    fn kernel_answers(nodes: &[i32], keys: &[Option<usize>], failed: &[usize]) -> (Vec<i32>, Option<usize>) {
        let mut status: Vec<i32> = nodes.iter().zip(keys).map(|(&n, k)| if k.is_some() { n } else { -2 }).collect();
        let failed: Vec<bool> = (0..nodes.len()).map(|i| failed.contains(&i)).collect();
        for (i, f) in failed.iter().enumerate() {
            if *f {
                status[i] = SENTINEL;
            }
        }
        let served: Vec<bool> = failed.iter().map(|f| !f).collect();
        let order = KernelOrder { nodes, keys, failed: &failed, served: &served };
        let left = kernel_order(&order, &mut status, &vec![SENTINEL; nodes.len()]);
        (status, left)
    }

    #[test]
    fn a_folio_named_again_while_queued_reads_busy_as_the_kernel_answers() {
        crate::testing::watchdog(60, || {
            // Every page of a huge page: queued at the first, busy at the second, home after.
            assert_eq!(kernel_answers(&[B; 4], &[Some(7); 4], &[]), (vec![B, BUSY, B, B], None));
            // Pages named twice in a row (a stride smaller than a page).
            let twice = [Some(1), Some(1), Some(2), Some(2)];
            assert_eq!(kernel_answers(&[B; 4], &twice, &[]).0, [B, BUSY, B, BUSY]);
            // Another folio queued between: the first is still queued.
            assert_eq!(kernel_answers(&[B; 3], &[Some(7), Some(8), Some(7)], &[]).0, [B, B, BUSY]);
            // An entry not queued between (absent, already there) moves the queue first.
            assert_eq!(kernel_answers(&[B; 3], &[Some(7), None, Some(7)], &[]).0, [B, -2, B]);
            // So does a change of node.
            assert_eq!(kernel_answers(&[B, 2, B], &[Some(7), Some(8), Some(7)], &[]).0, [B, 2, B]);
            // Answers of the kernel's own are left as they are.
            let mut status = vec![B, B];
            let order =
                KernelOrder { nodes: &[B, B], keys: &[Some(3), Some(3)], failed: &[false; 2], served: &[false; 2] };
            assert_eq!(kernel_order(&order, &mut status, &[SENTINEL; 2]), None);
            assert_eq!(status, [B, B]);
        });
    }

    #[test]
    fn a_batch_with_a_page_that_cannot_move_stops_the_call_as_the_kernel_does() {
        crate::testing::watchdog(60, || {
            let keys: Vec<Option<usize>> = (0..6).map(Some).collect();
            // Every entry in one queue: its answers unwritten, the folios that failed counted.
            assert_eq!(kernel_answers(&[B; 6], &keys, &[2]), (vec![SENTINEL; 6], Some(1)));
            // The queue moves at an absent page: that one answered, the rest never reached.
            let mut with_hole = keys.clone();
            with_hole[3] = None;
            let want = vec![SENTINEL, SENTINEL, SENTINEL, -2, SENTINEL, SENTINEL];
            assert_eq!(kernel_answers(&[B; 6], &with_hole, &[1]), (want, Some(1 + 2)));
            // A failure in a later queue: the queues before it answered.
            let want = vec![B, B, B, -2, SENTINEL, SENTINEL];
            assert_eq!(kernel_answers(&[B; 6], &with_hole, &[5]), (want, Some(1)));
            // The queue moves at a change of node: the entry there is not reached either.
            let want = vec![SENTINEL; 6];
            assert_eq!(kernel_answers(&[B, B, B, 2, 2, 2], &keys, &[0]), (want, Some(1 + 3)));
            // Nothing failed: nothing to say.
            assert_eq!(kernel_answers(&[B; 6], &keys, &[]).1, None);
        });
    }
}
