//! The checks a call passes before anything is touched: shapes, the node, what the memory
//! is, free memory on the target, `vm.max_map_count`; and the call's folios paired with the
//! state of their mappings.

use super::{Item, Span};
use crate::error::{Error, Result};
use crate::folio::Folio;
use crate::maps::{self, Vma};
use crate::numa;
use crate::pool::ThpAdvice;
use crate::sys;

/// Free memory left untouched on the target node.
const NODE_RESERVE: u64 = 32 << 20;

/// A call that may add more mappings than this (two for each run, and some of pagemig's
/// own) is checked against `vm.max_map_count` up front, which means reading every mapping
/// of the process (see [`maps::call_vmas`]). A smaller one is not: where it would cross
/// the limit all the same, in a process that holds nearly the 65530 mappings allowed, the
/// kernel refuses the mapping pagemig asks for, and the folios that needed it fail with
/// `ENOMEM`, untouched.
const COUNTED_ABOVE: usize = 512;

/// Checks a whole call before anything is touched and pairs each folio with the state
/// of its mapping.
/// Also returns the target's free memory beyond its reserve. `prepared` bytes of the target
/// are populated destinations of ours already, free for the call.
pub(super) fn prepare_call(folios: &[Folio<'_>], target: u32, prepared: u64) -> Result<(Vec<Item>, Vec<Span>, u64)> {
    if folios.is_empty() {
        return Err(Error::Invalid("no folios to migrate (zero length)".into()));
    }
    numa::check_node(target)?;
    let mut sorted: Vec<Folio<'static>> = folios.iter().map(|f| f.erased()).collect();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0].end() > w[1].addr()) {
        return Err(Error::Invalid(format!("folios at {:#x} and {:#x} overlap", w[0].addr(), w[1].addr())));
    }
    let (lo, hi) = (sorted[0].addr(), sorted[sorted.len() - 1].end());
    let runs = contiguous_runs(sorted.iter().copied());
    let added = 2 * runs.len() + 16;
    let (vmas, current) = maps::call_vmas(lo, hi, added > COUNTED_ABOVE)?;
    let own_stack = sys::current_thread_stack();
    let claimed = crate::sys::own::ranges();
    for &(s, e) in &runs {
        maps::check_movable(s, e, &vmas)?;
        // pagemig's own mappings and its threads' stacks: its threads would wait on
        // protections of their own.
        if crate::sys::own::overlaps(&claimed, s, e) {
            return Err(Error::NotMovable {
                start: s,
                end: e,
                why: "pagemig's own memory (a mapping or a thread stack of its own)".into(),
            });
        }
        // The migrating thread writes its own stack: protecting it would deadlock.
        if let Some((ss, se)) = own_stack.filter(|&(ss, se)| s < se && ss < e) {
            return Err(Error::NotMovable {
                start: s.max(ss),
                end: e.min(se),
                why: "the calling thread's own stack".into(),
            });
        }
    }
    if let Some(current) = current {
        let limit = sys::max_map_count();
        let needed = current + added;
        if needed > limit {
            return Err(Error::MapCountLimit { current, needed, limit });
        }
    }
    let bytes: u64 = sorted.iter().map(|f| f.size() as u64).sum();
    let free = check_free_memory(target, bytes, &runs, prepared)?;
    Ok((attach_vma_state(&sorted, &vmas), runs, free))
}

/// Checks that `target` can take `bytes`; returns its free memory beyond the reserve.
fn check_free_memory(target: u32, bytes: u64, runs: &[(usize, usize)], prepared: u64) -> Result<u64> {
    let (_, mem_free) = numa::meminfo(target)?;
    let free = mem_free.saturating_sub(NODE_RESERVE) + prepared;
    if bytes <= free {
        return Ok(free);
    }
    // Pages already on the target free as much as they take.
    let mut needed = 0u64;
    for &(s, e) in runs {
        let here = numa::page_nodes(s, e - s)?.iter().filter(|&&n| n == target as i32).count();
        needed += (e - s) as u64 - (here * sys::PAGE_SIZE) as u64;
    }
    if needed <= free {
        Ok(free)
    } else {
        Err(Error::NodeFull { node: target, needed, free: mem_free, reserve: NODE_RESERVE })
    }
}

/// Maximal runs of contiguous folios, as `(start, end)`.
pub(super) fn contiguous_runs<'a>(sorted: impl IntoIterator<Item = Folio<'a>>) -> Vec<Span> {
    let mut runs: Vec<Span> = Vec::new();
    for f in sorted {
        match runs.last_mut() {
            Some(last) if last.1 == f.addr() => last.1 = f.end(),
            _ => runs.push((f.addr(), f.end())),
        }
    }
    runs
}

fn attach_vma_state(sorted: &[Folio<'static>], vmas: &[Vma]) -> Vec<Item> {
    let mut v = 0;
    // Looked up once per mapping; an error (unmapped meanwhile) counts as a policy, which
    // only turns the faster way of moving in off.
    let policies: Vec<bool> = vmas.iter().map(|m| sys::vma_has_policy(m.start).unwrap_or(true)).collect();
    sorted
        .iter()
        .enumerate()
        .map(|(index, &folio)| {
            while v + 1 < vmas.len() && vmas[v].end <= folio.addr() {
                v += 1;
            }
            let vma = vmas.get(v).filter(|m| m.start <= folio.addr() && folio.addr() < m.end);
            let own_policy = vma.is_none() || policies[v];
            let locked = vma.is_some_and(|m| m.has_flag("lo"));
            Item { folio, index, locked, thp: destination_advice(folio.size()), own_policy }
        })
        .collect()
}

/// The huge-page advice of the destination of a folio of `size` bytes: huge pages for a
/// huge folio, which stays huge as the kernel's migration keeps it (whatever its mapping's
/// advice: a huge page collapsed before `MADV_NOHUGEPAGE`, or one of a mapping with no
/// advice where huge pages are always on), base pages otherwise, so that no huge page is
/// populated only to be split as its pages move out. The source mapping's own advice is
/// not needed: pages move into it (`UFFDIO_MOVE`) and it keeps its flags.
pub(super) fn destination_advice(size: usize) -> ThpAdvice {
    if size >= sys::HPAGE_SIZE { ThpAdvice::Huge } else { ThpAdvice::NoHuge }
}

/// The size of the folio of `folios` at `addr` (base pages where none starts there).
pub(super) fn items_size_at(folios: &[Folio<'_>], addr: usize) -> usize {
    folios.iter().find(|f| f.addr() <= addr && addr < f.end()).map_or(sys::PAGE_SIZE, |f| f.size())
}

#[cfg(test)]
#[allow(unsafe_code, reason = "folios made from plain addresses to test the bookkeeping")]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_contiguous_folios() {
        // SAFETY: these folios describe addresses only; nothing migrates them.
        let f: Vec<_> = [0x1000, 0x2000, 0x4000].iter().map(|&a| unsafe { Folio::new(a, 4096) }.unwrap()).collect();
        assert_eq!(contiguous_runs(f), [(0x1000, 0x3000), (0x4000, 0x5000)]);
    }
}
