//! Model test of the migrator registry: every interleaving of register, dispatch and
//! unregister, checked with loom. Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --test loom`.
#![cfg(loom)]

use std::sync::Arc;

use loom::model::Builder;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;
use pagemig::offload::{Batch, Migrator, OffloadCopy, Owner, Registry};
use pagemig::sys::Errno;

/// A migrator that checks it is never called once its owner freed it.
struct Probe {
    freed: AtomicBool,
    calls: AtomicUsize,
}

// SAFETY: copies nothing and reports nothing.
unsafe impl OffloadCopy for Probe {
    fn offload_copy(&self, _batch: &Batch<'_>) -> Result<(), Errno> {
        loom::sync::atomic::fence(Ordering::SeqCst);
        assert!(!self.freed.load(Ordering::SeqCst), "migrator used after unregister returned");
        self.calls.fetch_add(1, Ordering::SeqCst);
        loom::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }
}

/// Explores interleavings with at most `bound` preemptions: enough for every ordering of
/// the few steps below, small enough to finish in seconds.
fn model(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = Builder::new();
    b.preemption_bound = Some(bound);
    b.check(f);
}

fn dispatch(reg: &Registry) -> Option<Result<(), Errno>> {
    // SAFETY: an empty batch touches no memory.
    let batch = unsafe { Batch::new(&[], None) };
    reg.dispatch(&batch)
}

#[test]
fn unregister_waits_for_dispatch_in_flight() {
    model(3, || {
        let reg = Arc::new(Registry::new());
        let probe = Arc::new(Probe { freed: AtomicBool::new(false), calls: AtomicUsize::new(0) });
        let m = Migrator::new("probe", probe.clone(), Owner::new("test"));
        reg.register(&m).unwrap();
        let r2 = reg.clone();
        let t = thread::spawn(move || dispatch(&r2));
        reg.unregister(&m).unwrap();
        // The grace period is over: the migrator's resources may go.
        loom::sync::atomic::fence(Ordering::SeqCst);
        probe.freed.store(true, Ordering::SeqCst);
        let result = t.join().unwrap();
        // Either the dispatch ran the migrator, or it found none.
        match result {
            Some(Ok(())) => assert_eq!(probe.calls.load(Ordering::SeqCst), 1),
            None => assert_eq!(probe.calls.load(Ordering::SeqCst), 0),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(dispatch(&reg), None);
    });
}

#[test]
fn one_of_two_racing_registrations_wins() {
    model(3, || {
        let reg = Arc::new(Registry::new());
        let mk = |name: &str| {
            let p = Arc::new(Probe { freed: AtomicBool::new(false), calls: AtomicUsize::new(0) });
            Migrator::new(name, p, Owner::new(name))
        };
        let (a, b) = (mk("a"), mk("b"));
        let (r2, b2) = (reg.clone(), b.clone());
        let t = thread::spawn(move || r2.register(&b2));
        let ra = reg.register(&a);
        let rb = t.join().unwrap();
        assert!(ra.is_ok() ^ rb.is_ok(), "{ra:?} {rb:?}");
        assert!(ra == Err(Errno::BUSY) || rb == Err(Errno::BUSY));
        let winner = if ra.is_ok() { &a } else { &b };
        let loser = if ra.is_ok() { &b } else { &a };
        assert_eq!(reg.unregister(loser), Err(Errno::INVAL));
        reg.unregister(winner).unwrap();
    });
}

#[test]
fn concurrent_dispatches_and_unregister() {
    model(2, || {
        let reg = Arc::new(Registry::new());
        let probe = Arc::new(Probe { freed: AtomicBool::new(false), calls: AtomicUsize::new(0) });
        let m = Migrator::new("probe", probe.clone(), Owner::new("test"));
        reg.register(&m).unwrap();
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let r = reg.clone();
                thread::spawn(move || dispatch(&r))
            })
            .collect();
        reg.unregister(&m).unwrap();
        probe.freed.store(true, Ordering::SeqCst);
        for h in handles {
            let _ = h.join().unwrap();
        }
    });
}
