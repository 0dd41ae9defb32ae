//! The claim phase: each folio of a batch claimed for this call (see `busy`), each
//! contiguous stretch at once, folio by folio where another call holds part of it. A folio
//! another call holds waits for the next pass.

use super::{BUSY_ELSEWHERE, Call, Held};
use crate::migrate::Item;
use crate::sys::Errno;

impl Call<'_> {
    /// Claims what it can of `batch` (sorted by address). Returns the claimed items, the
    /// claims (by start address, to release once the batch is done) and the items held by
    /// another call.
    pub(super) fn claim(&self, batch: &[Item]) -> (Vec<Item>, Vec<usize>, Vec<Held>) {
        let busy = &self.engine.busy;
        let faults = self.opts.faults();
        let (mut claimed, mut claims, mut held) = (Vec::with_capacity(batch.len()), Vec::new(), Vec::new());
        let mut i = 0;
        while i < batch.len() {
            let mut j = i + 1;
            while j < batch.len() && batch[j - 1].folio.end() == batch[j].folio.addr() {
                j += 1;
            }
            let (start, end) = (batch[i].folio.addr(), batch[j - 1].folio.end());
            if busy.try_claim(start, end, faults) {
                claims.push(start);
                claimed.extend_from_slice(&batch[i..j]);
            } else {
                for item in &batch[i..j] {
                    if busy.try_claim(item.folio.addr(), item.folio.end(), faults) {
                        claims.push(item.folio.addr());
                        claimed.push(*item);
                    } else {
                        held.push(Held { item: *item, op: BUSY_ELSEWHERE, errno: Errno::AGAIN });
                    }
                }
            }
            i = j;
        }
        (claimed, claims, held)
    }
}
