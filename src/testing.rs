//! What the unit tests share.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// Runs `body` on a thread of its own and fails the test if it has not returned within
/// `secs` seconds: a hang (a helper that never stops, a wait nobody ends, a fault nobody
/// answers) fails instead of stalling the suite. A panic in `body` fails the test with its
/// message.
pub(crate) fn watchdog(secs: u64, body: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("test-watched".into())
        .spawn(move || {
            body();
            let _ = tx.send(());
        })
        .expect("start the watched thread");
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => handle.join().expect("the watched thread ended"),
        // The body panicked: join to show its message.
        Err(RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(()) => unreachable!("the watched thread ended without a word"),
            Err(payload) => std::panic::resume_unwind(payload),
        },
        Err(RecvTimeoutError::Timeout) => panic!("watchdog: still running after {secs} s (hung)"),
    }
}
