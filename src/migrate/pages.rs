//! Migrating memory the caller already has, page by page, with the outcome of every page:
//! [`Engine::move_pages`], the form of `move_pages(2)` for the calling process.
//!
//! The pages are taken as the kernel would take them: each address names the page it lies
//! in, and a page of a transparent huge page moves with its whole huge page (found with the
//! `PAGEMAP_SCAN` ioctl). Pages already on their target node are left alone, pages that
//! are not there report `ENOENT` (never touched) or `EFAULT` (not mapped), and pages
//! pagemig does not move itself (shared, file-backed or special mappings, the calling
//! thread's stack) go to the kernel's `move_pages(2)`, so that nothing fails that the
//! kernel would have served. Every other page goes through the batch pipeline.
#![allow(unsafe_code, reason = "names the caller's pages as folios, under the caller's promise")]

use std::collections::BTreeMap;

use super::{Engine, MigrateOptions, Mode, Reason};
use crate::error::{Error, Result};
use crate::folio::Folio;
use crate::maps;
use crate::sys::{self, HPAGE_SIZE, PAGE_SIZE};

/// The most nodes a node number may name (`MAX_NUMNODES` of the kernel's largest
/// configuration).
const MAX_NODES: i32 = 1024;

impl Engine {
    /// Moves each page at `pages[i]` to node `nodes[i]` and writes its outcome in
    /// `status[i]`, as `move_pages(2)` does for the calling process: the node the page is
    /// on afterwards, or a negative errno (`-ENOENT` for a page never touched, `-EFAULT`
    /// for an address not mapped, `-EBUSY` for a pinned page, `-ENOMEM`, …). Without
    /// `nodes`, only reports where each page is. Returns, as the kernel does, how many of
    /// the pages it tried to move (present, elsewhere than asked) it could not move.
    ///
    /// Any address inside a page names that page; a page of a transparent huge page moves
    /// with its whole huge page. Pages already on their target are left alone. Pages
    /// pagemig does not move itself (shared, file-backed or special mappings such as the
    /// `brk` heap, the calling thread's stack) are handed to the kernel's `move_pages(2)`.
    /// Unlike the kernel, the nodes are all checked before any page moves.
    ///
    /// # Safety
    /// The calling thread must not access the pages during the call (a page being migrated
    /// makes every access wait for the migration, which this thread performs). Other
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
        if status.len() != pages.len() || nodes.is_some_and(|n| n.len() != pages.len()) {
            return Err(Error::Invalid(format!(
                "{} pages, {} statuses and {} nodes: the three must match",
                pages.len(),
                status.len(),
                nodes.map_or(pages.len(), <[i32]>::len)
            )));
        }
        let Some(nodes) = nodes else {
            sys::move_pages(pages, None, status).map_err(Error::sys("move_pages (query)"))?;
            return Ok(0);
        };
        let memory = crate::numa::memory_nodes()?;
        // As the kernel: a node out of range is as unknown as one without memory.
        if nodes.iter().any(|&n| !(0..MAX_NODES).contains(&n)) {
            return Err(Error::Sys { op: "move_pages (a node outside 0 … 1023)", errno: crate::sys::Errno::NODEV });
        }
        if let Some(&bad) = nodes.iter().find(|&&n| !memory.contains(&(n as u32))) {
            crate::numa::check_node(bad as u32)?;
        }
        if pages.is_empty() {
            return Ok(0);
        }
        // Where each page is now: pages not there, and pages already home, are done.
        sys::move_pages(pages, None, status).map_err(Error::sys("move_pages (query)"))?;
        let todo: Vec<usize> = (0..pages.len()).filter(|&i| status[i] >= 0 && status[i] != nodes[i]).collect();
        if todo.is_empty() {
            return Ok(0);
        }
        self.move_todo(pages, nodes, status, &todo)
    }

    /// Moves the pages `todo` (present, elsewhere than asked), writing their outcomes, and
    /// returns how many failed to migrate as the kernel counts them: not the pages it
    /// refuses to take at all (`EACCES` shared, `ENOENT`, `EFAULT`), which only their status
    /// reports.
    fn move_todo(&self, pages: &[usize], nodes: &[i32], status: &mut [i32], todo: &[usize]) -> Result<usize> {
        let page_of = |i: usize| pages[i] & !(PAGE_SIZE - 1);
        let lo = todo.iter().map(|&i| page_of(i)).min().expect("not empty");
        let hi = todo.iter().map(|&i| page_of(i) + PAGE_SIZE).max().expect("not empty");
        let vmas = maps::vmas_with_flags(lo & !(HPAGE_SIZE - 1), hi.next_multiple_of(HPAGE_SIZE))?;
        let huge = sys::huge_ranges(lo & !(HPAGE_SIZE - 1), hi.next_multiple_of(HPAGE_SIZE)).unwrap_or_default();
        let stack = sys::current_thread_stack();
        // Each page's folio, the first target named for it wins (as the kernel moves a huge
        // page once); pages pagemig does not move go to the kernel.
        let mut folios: BTreeMap<usize, (usize, i32)> = BTreeMap::new();
        let mut kernel: Vec<usize> = Vec::new();
        let mut not_moved = 0;
        for &i in todo {
            let page = page_of(i);
            let (start, size) = match huge.iter().find(|&&(s, e)| s <= page && page < e) {
                Some(_) => (page & !(HPAGE_SIZE - 1), HPAGE_SIZE),
                None => (page, PAGE_SIZE),
            };
            let on_stack = stack.is_some_and(|(s, e)| start < e && s < start + size);
            if on_stack || maps::check_movable(start, start + size, &vmas).is_err() {
                kernel.push(i);
            } else {
                folios.entry(start).or_insert((size, nodes[i]));
            }
        }
        if !kernel.is_empty() {
            let p: Vec<usize> = kernel.iter().map(|&i| pages[i]).collect();
            let n: Vec<i32> = kernel.iter().map(|&i| nodes[i]).collect();
            let mut s = vec![0; kernel.len()];
            not_moved += sys::move_pages_counted(&p, Some(&n), &mut s).map_err(Error::sys("move_pages"))?;
            for (k, &i) in kernel.iter().enumerate() {
                status[i] = s[k];
            }
        }
        // pagemig's pages, one call per target node; what failed, by folio.
        let mut by_node: BTreeMap<i32, Vec<(usize, usize)>> = BTreeMap::new();
        for (&start, &(size, node)) in &folios {
            by_node.entry(node).or_default().push((start, size));
        }
        let mut failed: BTreeMap<usize, i32> = BTreeMap::new();
        for (node, list) in by_node {
            // SAFETY: the caller promises this thread does not access its pages during the
            // call; each folio is a page (or huge page) of a mapping pagemig may move, and
            // the call checks them again before touching anything.
            let folios: Vec<Folio<'_>> =
                list.iter().filter_map(|&(s, len)| unsafe { Folio::new(s, len) }.ok()).collect();
            match self.migrate_pages(&folios, node as u32, Reason::Syscall, Mode::Sync, &MigrateOptions::default()) {
                Ok(_) => {}
                Err(Error::Partial { stats, .. }) => {
                    failed.extend(stats.failures.iter().map(|f| (f.addr, f.errno)));
                }
                // Refused as a whole before anything moved (the node filled up, the
                // program changed its mappings meanwhile): every folio has the errno.
                Err(e) => failed.extend(list.iter().map(|&(s, _)| (s, e.errno().raw_os_error()))),
            }
        }
        // The outcome of every page pagemig took: its node now, or its folio's errno.
        let mine: Vec<usize> = todo.iter().copied().filter(|i| !kernel.contains(i)).collect();
        if mine.is_empty() {
            return Ok(not_moved);
        }
        let p: Vec<usize> = mine.iter().map(|&i| pages[i]).collect();
        let mut now = vec![0; mine.len()];
        sys::move_pages(&p, None, &mut now).map_err(Error::sys("move_pages (query)"))?;
        for (k, &i) in mine.iter().enumerate() {
            let page = page_of(i);
            let folio = folios.range(..=page).next_back().filter(|(s, (len, _))| page < *s + *len).map(|(s, _)| *s);
            status[i] = match folio.and_then(|s| failed.get(&s)) {
                Some(&errno) if now[k] != nodes[i] => {
                    not_moved += usize::from(![libc::EACCES, libc::ENOENT, libc::EFAULT].contains(&errno));
                    -errno
                }
                _ => now[k],
            };
        }
        Ok(not_moved)
    }
}
