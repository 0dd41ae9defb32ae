//! What moves, and how: each mapping's route (left alone, the kernel's `move_pages(2)`, or
//! pagemig) and the move itself (see the module docs of [`crate::agent`]).

use std::time::Instant;

use super::{MappingReport, MoveRequest, Report, Route};
use crate::error::Result;
use crate::maps::{self, Vma};
use crate::migrate::{Engine, MigrateOptions};
use crate::sys::{self, HPAGE_SIZE, PAGE_SIZE};

/// Mappings smaller than this go to the kernel (see the module docs).
pub const MIN_ACCELERATED: usize = HPAGE_SIZE;
/// The size and alignment of a glibc arena heap (`HEAP_MAX_SIZE` on 64-bit).
const ARENA_HEAP: usize = 64 << 20;
/// Pages looked up and moved per step of a mapping (256 MiB of base pages).
const STEP_PAGES: usize = 1 << 16;

/// Whether `v` is private anonymous memory (the heap and stacks included).
fn private_anonymous(v: &Vma) -> bool {
    v.perms.as_bytes().get(3) == Some(&b'p')
        && v.inode == 0
        && !v.path.starts_with('/')
        && !["[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]"].contains(&v.path.as_str())
}

fn inaccessible_anonymous(v: &Vma) -> bool {
    v.perms.starts_with("---") && v.inode == 0 && v.path.is_empty()
}

/// Why the kernel, not pagemig, must move `vmas[i]`, or `None` when pagemig may.
fn kernel_reason(vmas: &[Vma], i: usize, anchors: &[usize]) -> Option<String> {
    let v = &vmas[i];
    if let Some(why) = v.refusal() {
        return Some(why);
    }
    let prev = i.checked_sub(1).map(|p| &vmas[p]).filter(|p| p.end == v.start);
    let next = vmas.get(i + 1).filter(|n| n.start == v.end);
    // glibc's arenas of threads other than the main one: heaps of `ARENA_HEAP` bytes aligned
    // to their size, read-write up to what is in use and inaccessible beyond.
    let heap_end = v.start + ARENA_HEAP;
    if v.start % ARENA_HEAP == 0
        && (v.end == heap_end || next.is_some_and(|n| inaccessible_anonymous(n) && n.end == heap_end))
    {
        return Some("a malloc arena's heap".into());
    }
    if prev.is_some_and(inaccessible_anonymous) {
        return Some("above an inaccessible guard: a thread stack".into());
    }
    if let Some(p) = prev.filter(|p| p.inode != 0) {
        return Some(format!("the .bss of {}: statics", p.path));
    }
    if anchors.iter().any(|&a| v.start <= a && a < v.end) {
        return Some("holds pagemig's own state or this thread's heap".into());
    }
    if v.end - v.start < MIN_ACCELERATED {
        return Some("under 2 MiB: allocator and loader bookkeeping".into());
    }
    None
}

/// Migrates this process's own memory as `request` asks, on the calling thread, and says
/// what happened (see the module docs for what moves and how).
///
/// The calling thread's stack and heap, and pagemig's own state, are the kernel's to move,
/// so any thread may call it; the others' accesses to memory being moved wait, as in any
/// migration.
///
/// # Errors
/// Nothing moved: [`Error::UnknownNode`](crate::error::Error::UnknownNode) for a target without memory, [`Error::Invalid`](crate::error::Error::Invalid)
/// for a node in `from` past 1023, the errno of reading `/proc/self/maps`. Pages that
/// failed are counted in the report, not errors.
pub fn migrate_self(request: &MoveRequest) -> Result<Report> {
    let started = Instant::now();
    let until = request.deadline.and_then(|d| started.checked_add(d));
    crate::numa::check_node(request.to)?;
    let engine = Engine::global().ok();
    let mut vmas = maps::vmas()?;
    vmas.sort_unstable_by_key(|v| v.start);
    // Heap objects this thread and every call touch: their mappings go to the kernel.
    let probe = Box::new(0u64);
    let mut anchors = vec![&*probe as *const u64 as usize];
    if let Some(e) = engine {
        anchors.extend(e.heap_anchors());
    }
    if let Some((s, _)) = sys::current_thread_stack() {
        anchors.push(s);
    }
    let claimed = crate::sys::own::ranges();
    let mut report = Report { pid: std::process::id(), to: request.to, ..Default::default() };
    let range = request.range.map(|(s, e)| (s & !(PAGE_SIZE - 1), e.next_multiple_of(PAGE_SIZE)));
    let mut covered = range.map(|(s, _)| s);
    for (i, v) in vmas.iter().enumerate() {
        let (start, end) = match range {
            Some((s, e)) => {
                if v.end <= s || v.start >= e {
                    continue;
                }
                // Holes of the range: not mapped.
                if let Some(at) = covered.filter(|&at| at < v.start.max(s)) {
                    report.pages += ((v.start.max(s) - at) / PAGE_SIZE) as u64;
                    report.absent += ((v.start.max(s) - at) / PAGE_SIZE) as u64;
                }
                covered = Some(v.end.min(e));
                (v.start.max(s), v.end.min(e))
            }
            None if private_anonymous(v) && !v.perms.starts_with("---") => (v.start, v.end),
            None => continue,
        };
        let (pieces, skipped) = crate::sys::own::unclaimed(start, end, &claimed);
        if skipped > 0 {
            report.pages += (skipped / PAGE_SIZE) as u64;
            report.internal += (skipped / PAGE_SIZE) as u64;
            report.mappings[2] += 1;
            if request.detail {
                report.detail.push(MappingReport {
                    start,
                    end,
                    route: Route::Internal,
                    moved: 0,
                    why: format!("{} KiB of pagemig's own memory", skipped >> 10),
                });
            }
        }
        let why = match engine {
            None => Some("userfaultfd unavailable in this process".to_string()),
            Some(_) => kernel_reason(&vmas, i, &anchors),
        };
        for (s, e) in pieces {
            let route = if why.is_some() { Route::Kernel } else { Route::Pagemig };
            let moved = move_piece(engine.filter(|_| route == Route::Pagemig), s, e, request, until, &mut report);
            report.mappings[if route == Route::Pagemig { 0 } else { 1 }] += 1;
            if request.detail {
                let why = why.clone().unwrap_or_else(|| format!("private anonymous {}", display_path(v)));
                report.detail.push(MappingReport { start: s, end: e, route, moved, why });
            }
        }
    }
    if let (Some((_, e)), Some(at)) = (range, covered) {
        report.pages += (e.saturating_sub(at) / PAGE_SIZE) as u64;
        report.absent += (e.saturating_sub(at) / PAGE_SIZE) as u64;
    }
    drop(probe);
    report.time_us = started.elapsed().as_micros() as u64;
    Ok(report)
}

fn display_path(v: &Vma) -> &str {
    if v.path.is_empty() { "memory" } else { &v.path }
}

/// Moves the pages of `[start, end)` step by step, with pagemig (`engine`) or the kernel,
/// counting them in `report`; returns the pages moved. From `until` on, nothing more is
/// moved: pagemig's batches stop at it (their pages not reached report `ETIMEDOUT`), and the
/// pages of the steps not begun are counted as not reached.
#[expect(unsafe_code, reason = "pagemig's move_pages on memory this thread leaves alone")]
fn move_piece(
    engine: Option<&Engine>,
    start: usize,
    end: usize,
    request: &MoveRequest,
    until: Option<Instant>,
    report: &mut Report,
) -> u64 {
    let target = request.to as i32;
    let mut moved_here = 0;
    let mut at = start;
    let opts = until.map_or_else(MigrateOptions::default, |t| MigrateOptions::default().deadline(t));
    while at < end {
        if until.is_some_and(|t| Instant::now() >= t) {
            let left = ((end - at) / PAGE_SIZE) as u64;
            report.pages += left;
            report.not_reached += left;
            break;
        }
        let step_end = end.min(at + STEP_PAGES * PAGE_SIZE);
        let pages: Vec<usize> = (at..step_end).step_by(PAGE_SIZE).collect();
        at = step_end;
        report.pages += pages.len() as u64;
        let mut now = vec![0i32; pages.len()];
        if sys::move_pages(&pages, None, &mut now).is_err() {
            // Unmapped meanwhile: nothing there to move.
            report.absent += pages.len() as u64;
            continue;
        }
        let mut todo = Vec::new();
        for (k, &node) in now.iter().enumerate() {
            if node < 0 {
                report.absent += 1;
            } else if node == target {
                report.already_there += 1;
            } else if request.from.as_ref().is_some_and(|f| !f.contains(&(node as u32))) {
                report.not_selected += 1;
            } else {
                todo.push(pages[k]);
            }
        }
        if todo.is_empty() {
            continue;
        }
        let nodes = vec![target; todo.len()];
        let mut status = vec![0i32; todo.len()];
        let (ok, by_pagemig) = match engine {
            Some(engine) => {
                let before = engine.pages_stats().moved;
                // SAFETY: this thread touches none of these pages during the call: its stack
                // and its heap (the probe allocation's mapping), the engine's state and
                // pagemig's own mappings were routed to the kernel or left alone above, and
                // the vectors made since the mappings were read lie outside this piece.
                let result = unsafe { engine.move_pages_with(&todo, &nodes, &mut status, &opts) };
                if let Err(e) = result {
                    status.fill(-e.errno().raw_os_error());
                }
                let ok = status.iter().filter(|&&s| s == target).count() as u64;
                (ok, (engine.pages_stats().moved - before).min(ok))
            }
            None => {
                if let Err(e) = sys::move_pages_of(0, &todo, Some(&nodes), &mut status) {
                    status.fill(-e.raw_os_error());
                }
                (status.iter().filter(|&&s| s == target).count() as u64, 0)
            }
        };
        // Not reached before the deadline; gone meanwhile (the program unmapped or purged
        // them since they were looked at: absent, as the kernel's migrate_pages(2) would
        // not have found them either); the rest that are not on the target failed.
        let gone = |s: i32| s == -libc::EFAULT || s == -libc::ENOENT;
        let failure = |s: i32| s != target && s != -libc::ETIMEDOUT && !gone(s);
        report.moved_pagemig += by_pagemig;
        report.moved_kernel += ok - by_pagemig;
        report.not_reached += status.iter().filter(|&&s| s == -libc::ETIMEDOUT).count() as u64;
        report.absent += status.iter().filter(|&&s| gone(s)).count() as u64;
        report.failed += status.iter().filter(|&&s| failure(s)).count() as u64;
        moved_here += ok;
        if report.first_failure.is_none() {
            report.first_failure =
                todo.iter().zip(&status).find(|&(_, &s)| failure(s)).map(|(&a, &s)| (a, if s < 0 { -s } else { 0 }));
        }
    }
    moved_here
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::watchdog;

    #[test]
    fn guarded_bss_small_and_anchored_mappings_go_to_the_kernel() {
        let line = |s: usize, e: usize, perms: &str, inode: u64, path: &str| Vma {
            start: s,
            end: e,
            perms: perms.into(),
            inode,
            path: path.into(),
            flags: vec![],
        };
        const M: usize = 1 << 20;
        let vmas = vec![
            line(0x1000_0000, 0x1000_0000 + M, "rw-p", 7, "/usr/bin/x"),
            line(0x1000_0000 + M, 0x1000_0000 + 8 * M, "rw-p", 0, ""),
            line(0x2000_0000, 0x2000_0000 + 8 * M, "rw-p", 0, ""),
            line(0x2000_0000 + 8 * M, 0x2400_0000, "---p", 0, ""),
            line(0x2400_0000, 0x2400_0000 + 8 * M, "rw-p", 0, ""),
            line(0x3000_0000, 0x3000_0000 + 8 * M, "rw-p", 0, ""),
            // Below a thread stack's guard: the program's.
            line(0x3000_0000 + 8 * M, 0x3000_0000 + 9 * M, "---p", 0, ""),
            line(0x4000_0000, 0x4000_0000 + M, "rw-p", 0, ""),
            line(0x5000_0000, 0x5000_0000 + 8 * M, "rw-p", 0, "[anon:buffers]"),
            line(0x6000_0000, 0x6000_0000 + 8 * M, "rw-p", 0, "[heap]"),
        ];
        let anchors = [0x5000_0000 + 5];
        let why = |i| kernel_reason(&vmas, i, &anchors);
        assert!(why(0).unwrap().contains("file-backed"));
        assert!(why(1).unwrap().contains(".bss"));
        assert!(why(2).unwrap().contains("arena"));
        assert!(why(4).unwrap().contains("thread stack"));
        assert_eq!(why(5), None, "below a guard: the program's");
        assert!(why(7).unwrap().contains("2 MiB"));
        assert!(why(8).unwrap().contains("own state"));
        assert!(why(9).unwrap().contains("special"));
    }

    #[test]
    fn a_buffer_of_the_program_is_migrated_by_pagemig_and_the_counts_add_up() {
        watchdog(120, a_buffer_of_the_program);
    }

    fn a_buffer_of_the_program() {
        let node = crate::numa::memory_nodes().unwrap()[0];
        let buf: Vec<u64> = (0..(8 << 20) / 8).collect();
        let (s, e) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len() * 8);
        let r = migrate_self(&MoveRequest::new(node).range(s, e).detail(true)).unwrap();
        assert!(r.adds_up(), "{r:?}");
        assert_eq!(r.failed, 0, "{r:?}");
        // A large vector is a mapping of its own: pagemig's to move, wherever it started.
        assert!(r.detail.iter().any(|m| m.route == Route::Pagemig && m.start <= s + 8192), "{r:?}");
        assert!(buf.iter().enumerate().all(|(i, &w)| w == i as u64));
        // The whole process: the pool reserve is left alone, and the engine works after.
        let engine = Engine::global().unwrap();
        engine.reserve(node, 4 << 20, crate::ThpAdvice::Default).unwrap();
        assert!(engine.wait_reserved(Duration::from_secs(30)));
        let all = migrate_self(&MoveRequest::new(node).detail(true)).unwrap();
        assert!(all.adds_up(), "{all:?}");
        assert!(all.internal >= (4 << 20) / PAGE_SIZE as u64, "{all:?}");
        assert!(
            all.detail.iter().all(|m| m.route != Route::Pagemig
                || !crate::sys::own::ranges().iter().any(|&(a, b)| a < m.end && m.start < b))
        );
        engine.reserve(node, 0, crate::ThpAdvice::Default).unwrap();
        assert!(buf.iter().enumerate().all(|(i, &w)| w == i as u64));
        // A deadline already past: nothing is looked at or moved, every page is counted as
        // not reached, and the counts still add up.
        let late = migrate_self(&MoveRequest::new(node).range(s, e).deadline(Duration::ZERO)).unwrap();
        assert!(late.adds_up(), "{late:?}");
        let pages = ((e.next_multiple_of(PAGE_SIZE) - (s & !(PAGE_SIZE - 1))) / PAGE_SIZE) as u64;
        assert_eq!((late.pages, late.not_reached), (pages, pages - late.internal - late.absent), "{late:?}");
        assert!(late.not_reached >= (8 << 20) / PAGE_SIZE as u64, "{late:?}");
        assert_eq!(late.moved_pagemig + late.moved_kernel + late.already_there + late.failed, 0, "{late:?}");
        assert!(buf.iter().enumerate().all(|(i, &w)| w == i as u64));
    }
}
