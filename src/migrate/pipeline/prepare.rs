//! The prepare phase: each run of a batch gets its destination on the target node (from
//! the pool, prepared ahead where it could be) and its graveyard, as one [`Staged`].

use super::{BatchState, Call};
use crate::error::Error;
use crate::migrate::staged::Staged;
use std::time::Duration;

use crate::pool::{Key, Populate, Unpopulated};
use crate::sys::{self, HPAGE_SIZE};

impl<'a> Call<'a> {
    /// Gives each run its destination and graveyard; a run that cannot have both fails
    /// whole, untouched.
    pub(super) fn prepare(&mut self, st: &mut BatchState) {
        for r in 0..st.runs.len() {
            let (start, end) = (st.runs[r].start, st.runs[r].end);
            let items = st.items(st.runs[r].items.clone());
            // Keep the destination at the source's offset within a 2 MiB page whenever the
            // run spans one (but see below): huge pages stay huge.
            let align = if end - start >= HPAGE_SIZE {
                HPAGE_SIZE
            } else {
                items.iter().map(|i| i.folio.size()).max().unwrap_or(sys::PAGE_SIZE)
            };
            // Base pages only: `UFFDIO_COPY` cannot make a huge page.
            let len = end - start;
            let empty = self.plan.fill_empty && items.iter().all(|i| i.folio.size() < HPAGE_SIZE);
            // Destinations a prepared reserve populated ahead cost nothing now: taken first.
            let populated = Key { node: self.target, thp: items[0].thp, empty: false };
            let empty = empty && self.engine.pool.ready(populated) < len;
            // Where nothing better is prepared, pages whose mapping has no policy of its own
            // are copied in by the mover thread, bound to the target: written once, where
            // they belong, with no destination to move them from.
            st.runs[r].copy_in = empty && self.plan.copy_in && !items[0].own_policy;
            let key = Key { empty, ..populated };
            let locked = items[0].locked;
            // Filled empty by the caller and the copy helper at once, from the two ends of
            // each piece (see `copy_shared`): half a huge page off the source's offset, a
            // piece of 2 MiB lies in two page tables, one for each thread, whose
            // `UFFDIO_COPY`s then do not wait for each other's page-table lock. Every empty
            // destination of 2 MiB or more is placed so (filled by one thread, or only a
            // placeholder for a copy in, it loses nothing), so that they follow each other
            // in the pool with no gap between them whatever the call; a shorter one keeps its
            // source's offset (a gap before each of many small runs would split the pool's
            // mapping once they are given back). Base pages move in entry by entry wherever
            // they lie. The spinning on that lock fell from 3.7 % of the samples to 0.25 %;
            // 1 GiB of 4 KiB folios migrated again and again, 2-core AMD EPYC VM: 1.01x
            // (default batch, median of 12 alternating pairs; 1.03x of 20 with destinations
            // 4 MiB apart, a gap between each two); a single cold call (`pagemig move`, 20
            // pairs): 0.99x, within the noise.
            let (align, phase) = if key.empty && len >= HPAGE_SIZE {
                (HPAGE_SIZE, (start + HPAGE_SIZE / 2) % HPAGE_SIZE)
            } else {
                (align, start % align)
            };
            // The pipelined copy populates each piece's destination just before it copies it
            // (see `Pool::take_later`); the call's other paths write a destination anywhere
            // once isolated, so theirs are populated now. Destinations populated by touch
            // (`Populate::Touch`, beside a mover) are not: a store is not a populate.
            let taken = if self.plan.lazy && self.plan.populate == Populate::Madvise {
                self.engine.pool.take_later(key, len, align, phase).map(|(dest, later)| (dest, Duration::ZERO, later))
            } else {
                let taken = self.engine.pool.take(key, len, align, phase, self.plan.populate);
                taken.map(|(dest, spent)| (dest, spent, Unpopulated::NONE))
            };
            let dest = match taken {
                Ok((dest, spent, later)) => {
                    st.runs[r].later = later;
                    self.tally.stats.prepare_ns += spent.as_nanos() as u64;
                    // Pages move only between mappings locked alike (a program's
                    // `mlockall` may have locked a destination made earlier).
                    let alike =
                        if locked { sys::mlock_onfault(dest.addr(), len) } else { sys::munlock(dest.addr(), len) };
                    if alike.is_err() {
                        self.tally.stats.relock_failures += items.len() as u64;
                    }
                    Ok(dest)
                }
                Err(e) => Err(("destination on target node", e.errno())),
            };
            let base_pages = items.iter().all(|i| !i.folio.is_pmd());
            let grave = self.engine.reaper.reserve(len, start, locked, base_pages);
            match (dest, grave) {
                (Ok(dest), Ok(grave)) => {
                    st.runs[r].grave_base = grave.addr();
                    st.runs[r].rest = Some(Staged::new(dest, grave));
                }
                (dest, grave) => {
                    let (op, errno) = match (&dest, &grave) {
                        (Err(e), _) => *e,
                        (_, Err(e)) => ("graveyard for the old pages", *e),
                        _ => unreachable!("one of the two failed"),
                    };
                    if let Ok(dest) = dest {
                        self.engine.pool.release(dest);
                    }
                    if let Ok(grave) = grave {
                        self.engine.reaper.free_now(grave);
                    }
                    let items = st.items(st.runs[r].items.clone());
                    self.fail_all(&items, || Error::sys(op)(errno));
                }
            }
        }
    }
}
