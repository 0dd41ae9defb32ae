//! Helpers shared by the adversarial tests: a watchdog that turns a hang into a failure,
//! and a probe that every page of a region is writable again.
#![allow(dead_code, reason = "each test binary uses a part of these helpers")]

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use pagemig::Region;
use pagemig::sys::PAGE_SIZE;

/// Runs `f` on a thread of its own and fails the test if it has not returned within
/// `limit`: a hang (a writer asleep on a protection nobody lifts, a lock never released)
/// fails instead of stalling the suite. A panic in `f` fails the test with its message.
pub fn watchdog<R: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("watched: {what}"))
        .spawn(move || {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        })
        .expect("spawn the watched thread");
    match rx.recv_timeout(limit) {
        Ok(Ok(r)) => {
            let _ = handle.join();
            r
        }
        Ok(Err(payload)) => std::panic::resume_unwind(payload),
        Err(_) => panic!("{what}: still running after {limit:?} (hung)"),
    }
}

/// Writes every page of `region` (adding zero to a word of each: a write access, data
/// unchanged) on another thread, and fails if that does not finish within 10 s: no page is
/// left write-protected with nobody to lift it.
pub fn assert_writable(region: &'static Region) {
    watchdog(Duration::from_secs(10), "probe write of every page", move || {
        for page in 0..region.len() / PAGE_SIZE {
            region.word(page * PAGE_SIZE / 8).fetch_add(0, Ordering::SeqCst);
        }
    });
}

/// Leaks `region` so that watched threads may use it; the test process unmaps it on exit.
pub fn leak(region: Region) -> &'static Region {
    Box::leak(Box::new(region))
}

/// Pages of `region` on `node`.
pub fn pages_on(region: &Region, node: u32) -> usize {
    region.placement().unwrap().get(&(node as i32)).copied().unwrap_or(0)
}
