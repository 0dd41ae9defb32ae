//! The two places a stretch of source needs while it migrates: its destination on the
//! target node (the copy) and its graveyard (the old pages). Both are as long as the
//! stretch, cover it byte for byte, and are split and released as one.

use super::Engine;
use super::reaper::Grave;
use crate::pool::Dest;

/// A stretch's destination and graveyard, of equal length.
#[derive(Debug)]
pub(super) struct Staged {
    pub dest: Dest,
    pub grave: Grave,
}

impl Staged {
    /// Pairs a destination with a graveyard of the same length.
    pub fn new(dest: Dest, grave: Grave) -> Self {
        assert_eq!(dest.len(), grave.len(), "a destination and a graveyard of different lengths");
        Self { dest, grave }
    }

    /// Length in bytes, of each.
    pub fn len(&self) -> usize {
        self.dest.len()
    }

    /// Whether there is nothing left.
    pub fn is_empty(&self) -> bool {
        self.dest.is_empty()
    }

    /// Splits both at `at`: the first `at` bytes, and the rest.
    ///
    /// # Panics
    /// When `at` is past the end.
    pub fn split_at(self, at: usize) -> (Staged, Staged) {
        let (dest, dest_rest) = self.dest.split_at(at);
        let (grave, grave_rest) = self.grave.split_at(at);
        (Staged { dest, grave }, Staged { dest: dest_rest, grave: grave_rest })
    }

    /// Gives both back now: the destination to the pool, the graveyard (and any old pages
    /// left in it) freed.
    pub fn release(self, engine: &Engine) {
        engine.pool.release(self.dest);
        engine.reaper.free_now(self.grave);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_as_one() {
        let engine = Engine::global().unwrap();
        let node = crate::numa::memory_nodes().unwrap()[0];
        let key = crate::pool::Key { node, thp: crate::pool::ThpAdvice::Default, empty: false };
        let page = crate::sys::PAGE_SIZE;
        let (dest, _) = engine.pool.take(key, 4 * page, page, 0, crate::pool::Populate::Madvise).unwrap();
        let grave = engine.reaper.reserve(4 * crate::sys::PAGE_SIZE, 0, false, true).unwrap();
        let staged = Staged::new(dest, grave);
        let (head, tail) = staged.split_at(crate::sys::PAGE_SIZE);
        assert_eq!((head.len(), tail.len()), (crate::sys::PAGE_SIZE, 3 * crate::sys::PAGE_SIZE));
        assert_eq!(head.dest.addr() + head.len(), tail.dest.addr());
        assert_eq!(head.grave.addr() + head.len(), tail.grave.addr());
        let (empty, all) = tail.split_at(0);
        assert!(empty.is_empty());
        assert_eq!(all.len(), 3 * crate::sys::PAGE_SIZE);
        for part in [head, empty, all] {
            part.release(engine);
        }
    }
}
