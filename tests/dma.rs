//! The DMA engine API and its soft provider, on real memory: every byte of every
//! destination is compared with what it must hold, including the bytes no transfer may
//! touch.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagemig::dma::{self, Caps, Chan, Cookie, Device, FaultPlan, PrepFlags, Segment, SharedChan, SoftConfig, Status};
use pagemig::sys::{Errno, Mapping};

const WAIT: Duration = Duration::from_secs(10);

/// A test buffer: a private mapping that only the test thread and the DMA worker it
/// submits to ever see.
struct Buf {
    map: Mapping,
}

impl Buf {
    fn new(len: usize) -> Self {
        Self { map: Mapping::new(len, 4096).unwrap() }
    }

    /// A buffer holding a byte pattern that differs with `seed` and position.
    fn pattern(len: usize, seed: u64) -> Self {
        let b = Self::new(len);
        b.write(&(0..len).map(|i| pat(seed, i)).collect::<Vec<_>>());
        b
    }

    fn addr(&self) -> usize {
        self.map.addr()
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// The contents now, as words. Race-tolerant: reads aligned words atomically.
    fn words(&self) -> Vec<u64> {
        (0..self.len() / 8).map(|i| self.map.word(i).unwrap().load(Ordering::Acquire)).collect()
    }

    /// The bytes now, as [`Buf::words`].
    fn snapshot(&self) -> Vec<u8> {
        self.words().iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn write(&self, bytes: &[u8]) {
        for (i, w) in bytes.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..w.len()].copy_from_slice(w);
            self.map.word(i).unwrap().store(u64::from_le_bytes(word), Ordering::Release);
        }
    }
}

fn pat(seed: u64, i: usize) -> u8 {
    ((i as u64 ^ seed.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

fn soft(name: &str, channels: usize, config: SoftConfig) -> Arc<Device> {
    Device::soft(name, channels, config).unwrap()
}

fn flags() -> PrepFlags {
    PrepFlags::INTERRUPT | PrepFlags::CTRL_ACK
}

/// Copies `len` bytes `src[s..]` to `dst[d..]` in the model of what a destination must
/// hold.
fn expect_copy(expected: &mut [u8], src: &[u8], d: usize, s: usize, len: usize) {
    expected[d..d + len].copy_from_slice(&src[s..s + len]);
}

/// Submits a memcpy with a callback that sends its outcome on `tx`, tagged with `tag`.
fn submit_memcpy(
    chan: &Chan,
    dst: usize,
    src: usize,
    len: usize,
    tx: &mpsc::Sender<(usize, Result<(), Errno>)>,
    tag: usize,
) -> Cookie {
    // SAFETY: every caller passes ranges inside two distinct live `Buf`s that it does not
    // touch until the transfer has finished or the channel has been terminated.
    let mut desc = unsafe { chan.prep_memcpy(dst, src, len, flags()) }.unwrap();
    let tx = tx.clone();
    desc.set_callback(move |r| {
        let _ = tx.send((tag, r));
    });
    desc.submit()
}

#[test]
fn memcpy_copies_exactly_the_range() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "memcpy_copies_exactly_the_range");
    let dev = soft("t-memcpy", 1, SoftConfig::default());
    let chan = dev.request_chan(Caps::MEMCPY).unwrap();
    let src = Buf::pattern(2 << 20, 1);
    let dst = Buf::new(2 << 20);
    let (tx, rx) = mpsc::channel();
    let s = src.snapshot();
    let mut expected = dst.snapshot();
    // Aligned (non-temporal path), then odd offsets and length (plain path).
    for (tag, (d, so, len)) in
        [(0usize, 0usize, 1 << 20), (1 << 20, 3, 12_345), ((1 << 20) + 20_000, 777, 1)].into_iter().enumerate()
    {
        let cookie = submit_memcpy(&chan, dst.addr() + d, src.addr() + so, len, &tx, tag);
        chan.issue_pending();
        assert_eq!(chan.wait(cookie, WAIT), Ok(Status::Complete));
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (tag, Ok(())));
        expect_copy(&mut expected, &s, d, so, len);
    }
    assert!(dst.snapshot() == expected, "destination differs from the model");
}

#[test]
fn memcpy_sg_even_and_uneven_lists() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "memcpy_sg_even_and_uneven_lists");
    let dev = soft("t-sg", 2, SoftConfig::default());
    let chan = dev.request_chan(Caps::MEMCPY | Caps::MEMCPY_SG).unwrap();
    let src = Buf::pattern(4 << 20, 2);
    let dst = Buf::new(4 << 20);
    let s = src.snapshot();
    let mut expected = dst.snapshot();
    let k = 4096;
    let seg = |base: usize, off: usize, len: usize| Segment::new(base + off, len);
    let cases: Vec<(Vec<Segment>, Vec<Segment>)> = vec![
        // Even: same split on both sides, scattered.
        (
            vec![seg(dst.addr(), 0, 4 * k), seg(dst.addr(), 10 * k, 8 * k), seg(dst.addr(), 30 * k, k)],
            vec![seg(src.addr(), 100 * k, 4 * k), seg(src.addr(), 50 * k, 8 * k), seg(src.addr(), 7 * k, k)],
        ),
        // One destination segment, many sources.
        (
            vec![seg(dst.addr(), 64 * k, 12 * k)],
            vec![seg(src.addr(), 0, 3 * k), seg(src.addr(), 200 * k, 5 * k), seg(src.addr(), 40 * k, 4 * k)],
        ),
        // Many destinations, one source; and boundaries that never line up, odd sizes.
        (
            vec![seg(dst.addr(), 300 * k, 1000), seg(dst.addr(), 310 * k, 5000), seg(dst.addr(), 320 * k + 13, 2192)],
            vec![seg(src.addr(), 500 * k + 1, 8192)],
        ),
        (
            vec![seg(dst.addr(), 400 * k, 3000), seg(dst.addr(), 401 * k, 7000), seg(dst.addr(), 410 * k, 2000)],
            vec![seg(src.addr(), 600 * k, 5000), seg(src.addr(), 610 * k, 1), seg(src.addr(), 620 * k, 6999)],
        ),
    ];
    for (dl, sl) in &cases {
        // SAFETY: segments inside two distinct live buffers, untouched until completion.
        let desc = unsafe { chan.prep_memcpy_sg(dl, sl, flags()) }.unwrap();
        assert_eq!(desc.len(), dl.iter().map(|s| s.len).sum::<usize>());
        let cookie = desc.submit();
        chan.issue_pending();
        assert_eq!(chan.wait(cookie, WAIT), Ok(Status::Complete));
        let mut stream: Vec<u8> = Vec::new();
        for s_ in sl {
            stream.extend_from_slice(&s[s_.addr - src.addr()..s_.addr - src.addr() + s_.len]);
        }
        let mut at = 0;
        for d_ in dl {
            let off = d_.addr - dst.addr();
            expected[off..off + d_.len].copy_from_slice(&stream[at..at + d_.len]);
            at += d_.len;
        }
    }
    assert!(dst.snapshot() == expected, "destination differs from the model");
}

#[test]
fn prep_refuses_bad_requests() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "prep_refuses_bad_requests");
    let dev = soft("t-prep", 1, SoftConfig { memcpy_sg: false, ..Default::default() });
    let chan = dev.request_chan(Caps::MEMCPY).unwrap();
    let b = Buf::new(1 << 20);
    let a = b.addr();
    // SAFETY: each call is refused before anything is queued, or its descriptor is
    // dropped unsubmitted: no memory is accessed.
    unsafe {
        assert_eq!(chan.prep_memcpy(a, a + 8192, 0, flags()).err(), Some(Errno::INVAL));
        assert_eq!(chan.prep_memcpy(a, a + 4096, 8192, flags()).err(), Some(Errno::INVAL));
        assert_eq!(chan.prep_memcpy(usize::MAX - 10, a, 100, flags()).err(), Some(Errno::INVAL));
        let one = [Segment::new(a, 4096)];
        let other = [Segment::new(a + 8192, 4096)];
        assert_eq!(chan.prep_memcpy_sg(&one, &other, flags()).err(), Some(Errno::OPNOTSUPP));
        // Unsubmitted: accesses nothing.
        drop(chan.prep_memcpy(a, a + 8192, 4096, flags()).unwrap());
    }
    let dev = soft("t-prep-sg", 1, SoftConfig::default());
    let chan = dev.request_chan(Caps::MEMCPY_SG).unwrap();
    let s = |off: usize, len: usize| Segment::new(a + off, len);
    // SAFETY: refused before anything is queued.
    unsafe {
        assert_eq!(chan.prep_memcpy_sg(&[], &[s(0, 4096)], flags()).err(), Some(Errno::INVAL));
        assert_eq!(chan.prep_memcpy_sg(&[s(0, 4096)], &[], flags()).err(), Some(Errno::INVAL));
        assert_eq!(chan.prep_memcpy_sg(&[s(0, 4096)], &[s(8192, 4095)], flags()).err(), Some(Errno::INVAL));
        assert_eq!(
            chan.prep_memcpy_sg(&[s(0, 4096), s(8192, 4096)], &[s(4096, 4096), s(10_000, 4096)], flags()).err(),
            Some(Errno::INVAL),
            "a destination overlaps a source"
        );
    }
    assert_eq!(b.snapshot(), vec![0; 1 << 20]);
}

#[test]
fn nothing_runs_before_issue_pending() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "nothing_runs_before_issue_pending");
    let dev = soft("t-issue", 1, SoftConfig::default());
    let chan = dev.request_chan(Caps::MEMCPY).unwrap();
    let src = Buf::pattern(1 << 20, 3);
    let dst = Buf::new(1 << 20);
    let (tx, rx) = mpsc::channel();
    let cookies: Vec<Cookie> =
        (0..4).map(|i| submit_memcpy(&chan, dst.addr() + i * (256 << 10), src.addr(), 256 << 10, &tx, i)).collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(dst.snapshot().iter().all(|&b| b == 0), "a submitted descriptor ran before issue_pending");
    assert!(rx.try_recv().is_err(), "a callback ran before issue_pending");
    for &c in &cookies {
        assert_eq!(chan.tx_status(c), Ok(Status::InProgress));
    }
    assert_eq!(chan.wait(cookies[0], Duration::from_millis(50)), Err(Errno::TIMEDOUT));
    chan.issue_pending();
    for &c in &cookies {
        assert_eq!(chan.wait(c, WAIT), Ok(Status::Complete));
    }
    let s = src.snapshot();
    let d = dst.snapshot();
    for i in 0..4 {
        assert!(d[i * (256 << 10)..(i + 1) * (256 << 10)] == s[..256 << 10]);
    }
    let mut tags: Vec<usize> = (0..4).map(|_| rx.recv_timeout(WAIT).unwrap().0).collect();
    tags.sort_unstable();
    assert_eq!(tags, [0, 1, 2, 3]);
}

#[test]
fn cookies_increase_per_channel() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "cookies_increase_per_channel");
    let dev = soft("t-cookie", 2, SoftConfig::default());
    let a = dev.request_chan(Caps::MEMCPY).unwrap();
    let b = dev.request_chan(Caps::MEMCPY).unwrap();
    let src = Buf::pattern(64 << 10, 4);
    let dst = Buf::new(64 << 10);
    let (tx, _rx) = mpsc::channel();
    let mut last = 0;
    for i in 0..10 {
        let c = submit_memcpy(&a, dst.addr(), src.addr(), 4096, &tx, i);
        assert_eq!(c.value(), last + 1);
        last = c.value();
        if i % 3 == 0 {
            a.issue_pending();
        }
    }
    // Per channel: the other one starts at 1.
    let on_b = submit_memcpy(&b, dst.addr() + 8192, src.addr(), 4096, &tx, 99);
    assert_eq!(on_b.value(), 1);
    a.issue_pending();
    b.issue_pending();
    assert_eq!(b.wait(on_b, WAIT), Ok(Status::Complete));
    // Completions do not reset the count.
    let newest = submit_memcpy(&a, dst.addr(), src.addr(), 4096, &tx, 0);
    assert_eq!(newest.value(), 11);
    assert!(newest > on_b);
    a.issue_pending();
    assert_eq!(a.wait(newest, WAIT), Ok(Status::Complete));
    // A cookie the channel never handed out.
    assert_eq!(b.tx_status(newest), Err(Errno::INVAL));
    assert_eq!(b.wait(newest, WAIT), Err(Errno::INVAL));
    let s = src.snapshot();
    let d = dst.snapshot();
    assert!(d[..4096] == s[..4096] && d[8192..12288] == s[..4096]);
}

#[test]
fn exclusive_request_and_shared_find() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "exclusive_request_and_shared_find");
    // A private device: exclusive only.
    let private = soft("t-private", 2, SoftConfig::default());
    assert!(private.caps().contains(Caps::PRIVATE));
    assert!(private.find_channel(Caps::MEMCPY).is_none());
    let c0 = private.request_chan(Caps::MEMCPY).unwrap();
    let c1 = private.request_chan(Caps::MEMCPY).unwrap();
    assert_ne!(c0.name(), c1.name());
    assert_eq!(private.request_chan(Caps::MEMCPY).err(), Some(Errno::NODEV));
    assert_eq!(private.free_channels(), 0);
    let name = c1.name().to_string();
    c1.release();
    let again = private.request_chan(Caps::MEMCPY).unwrap();
    assert_eq!(again.name(), name);
    drop((c0, again));
    assert_eq!(private.free_channels(), 2);

    // A public device: shared lookups, and exclusivity against them.
    let public = soft("t-public", 2, SoftConfig { private: false, memcpy_sg: false, ..Default::default() });
    assert_eq!(public.request_chan(Caps::MEMCPY_SG).err(), Some(Errno::NODEV));
    assert!(public.find_channel(Caps::MEMCPY_SG).is_none());
    let s: Vec<SharedChan> = (0..4).map(|_| public.find_channel(Caps::MEMCPY).unwrap()).collect();
    // Spread: two users on each channel.
    assert_eq!(s.iter().filter(|c| c.name() == s[0].name()).count(), 2);
    assert_eq!(public.request_chan(Caps::MEMCPY).err(), Some(Errno::NODEV), "a shared channel was handed out");
    drop(s);
    let ex = public.request_chan(Caps::MEMCPY).unwrap();
    let shared = public.find_channel(Caps::MEMCPY).unwrap();
    assert_ne!(shared.name(), ex.name(), "an exclusive channel was shared");
    let ex2 = public.find_channel(Caps::MEMCPY);
    assert!(ex2.is_some());
    assert_eq!(public.request_chan(Caps::MEMCPY).err(), Some(Errno::NODEV));

    // Shared channels work: two users copy through the same channel.
    let src = Buf::pattern(64 << 10, 5);
    let dst = Buf::new(64 << 10);
    let (a, b) = (shared, ex2.unwrap());
    assert_eq!(a.name(), b.name());
    // SAFETY: distinct halves of live buffers, untouched until completion.
    let (ca, cb) = unsafe {
        (
            a.prep_memcpy(dst.addr(), src.addr(), 32 << 10, flags()).unwrap().submit(),
            b.prep_memcpy(dst.addr() + (32 << 10), src.addr() + (32 << 10), 32 << 10, flags()).unwrap().submit(),
        )
    };
    assert_eq!(cb.value(), ca.value() + 1);
    b.issue_pending();
    assert_eq!(a.wait(ca, WAIT), Ok(Status::Complete));
    assert_eq!(b.wait(cb, WAIT), Ok(Status::Complete));
    assert!(dst.snapshot() == src.snapshot());
}

/// The only test of this binary that uses the process-wide device registry.
#[test]
fn global_registry() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "global_registry");
    let a = soft("t-global-a", 1, SoftConfig::default());
    let b = soft("t-global-b", 2, SoftConfig { private: false, ..Default::default() });
    dma::register_device(a.clone()).unwrap();
    dma::register_device(b.clone()).unwrap();
    assert_eq!(dma::register_device(a.clone()), Err(Errno::EXIST));
    let same_name = soft("t-global-a", 1, SoftConfig::default());
    assert_eq!(dma::register_device(same_name), Err(Errno::EXIST));

    // Exclusive requests take from the first device, then the next.
    let c1 = dma::request_chan_by_mask(Caps::MEMCPY).unwrap();
    assert!(Arc::ptr_eq(c1.device(), &a));
    // Shared lookups skip the private device.
    let shared = dma::find_channel(Caps::MEMCPY).unwrap();
    assert!(Arc::ptr_eq(shared.device(), &b));
    let c2 = dma::request_chan_by_mask(Caps::MEMCPY).unwrap();
    assert!(Arc::ptr_eq(c2.device(), &b));
    assert_ne!(c2.name(), shared.name());
    assert_eq!(dma::request_chan_by_mask(Caps::MEMCPY).err(), Some(Errno::NODEV));
    drop(c1);
    assert!(Arc::ptr_eq(dma::request_chan_by_mask(Caps::MEMCPY).unwrap().device(), &a));

    dma::unregister_device(&a).unwrap();
    assert_eq!(dma::unregister_device(&a), Err(Errno::INVAL));
    assert!(!dma::devices().iter().any(|d| Arc::ptr_eq(d, &a)));
    // Channels already handed out stay usable.
    let src = Buf::pattern(8192, 6);
    let dst = Buf::new(8192);
    // SAFETY: two live buffers, untouched until completion.
    let cookie = unsafe { c2.prep_memcpy(dst.addr(), src.addr(), 8192, flags()) }.unwrap().submit();
    c2.issue_pending();
    assert_eq!(c2.wait(cookie, WAIT), Ok(Status::Complete));
    assert!(dst.snapshot() == src.snapshot());
    dma::unregister_device(&b).unwrap();
    assert_eq!(dma::request_chan_by_mask(Caps::MEMCPY).err(), Some(Errno::NODEV));
}

#[test]
fn fault_fail_descriptor() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "fault_fail_descriptor");
    let dev = soft("t-fail", 1, SoftConfig::default());
    let chan = dev.request_chan(Caps::MEMCPY).unwrap();
    let src = Buf::pattern(3 << 20, 7);
    let dst = Buf::new(3 << 20);
    let (tx, rx) = mpsc::channel();
    dev.set_faults(FaultPlan { fail_descriptor: Some(dev.descriptors_submitted() + 1), ..Default::default() });
    let mb = 1 << 20;
    let cookies: Vec<Cookie> =
        (0..3).map(|i| submit_memcpy(&chan, dst.addr() + i * mb, src.addr() + i * mb, mb, &tx, i)).collect();
    chan.issue_pending();
    let statuses: Vec<_> = cookies.iter().map(|&c| chan.wait(c, WAIT).unwrap()).collect();
    assert_eq!(statuses, [Status::Complete, Status::Error, Status::Complete]);
    let mut outcomes: Vec<_> = (0..3).map(|_| rx.recv_timeout(WAIT).unwrap()).collect();
    outcomes.sort_by_key(|o| o.0);
    assert_eq!(outcomes, [(0, Ok(())), (1, Err(Errno::IO)), (2, Ok(()))]);
    let (s, d) = (src.snapshot(), dst.snapshot());
    assert!(d[..mb] == s[..mb] && d[2 * mb..] == s[2 * mb..]);
    // The failed one is partial: a prefix copied at most, the rest untouched.
    let failed = &d[mb..2 * mb];
    let copied = failed.iter().zip(&s[mb..2 * mb]).take_while(|(a, b)| a == b).count();
    assert!(copied < mb, "the failed descriptor copied everything");
    assert!(failed[copied..].iter().all(|&b| b == 0), "bytes written past the failed copy's prefix");

    // Faults change at run time: with the plan cleared, the same copy succeeds.
    dev.set_faults(FaultPlan::default());
    let c = submit_memcpy(&chan, dst.addr() + mb, src.addr() + mb, mb, &tx, 9);
    chan.issue_pending();
    assert_eq!(chan.wait(c, WAIT), Ok(Status::Complete));
    assert!(dst.snapshot() == src.snapshot());
}

#[test]
fn fault_never_complete_then_terminate() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "fault_never_complete_then_terminate");
    let dev = soft("t-stuck", 1, SoftConfig::default());
    let chan = dev.request_chan(Caps::MEMCPY).unwrap();
    let src = Buf::pattern(2 << 20, 8);
    let dst = Buf::new(2 << 20);
    let (tx, rx) = mpsc::channel();
    let mb = 1 << 20;
    dev.set_faults(FaultPlan { never_complete: Some(dev.descriptors_submitted()), ..Default::default() });
    let stuck = submit_memcpy(&chan, dst.addr(), src.addr(), mb, &tx, 0);
    let next = submit_memcpy(&chan, dst.addr() + mb, src.addr() + mb, mb, &tx, 1);
    chan.issue_pending();
    // The channel goes on with the others.
    assert_eq!(chan.wait(next, WAIT), Ok(Status::Complete));
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), (1, Ok(())));
    assert_eq!(chan.wait(stuck, Duration::from_millis(200)), Err(Errno::TIMEDOUT));
    assert_eq!(chan.tx_status(stuck), Ok(Status::InProgress));
    chan.terminate_sync();
    assert_eq!(chan.tx_status(stuck), Ok(Status::Error));
    assert_eq!(chan.wait(stuck, WAIT), Ok(Status::Error));
    let after = dst.snapshot();
    assert!(after[..mb].iter().all(|&b| b == 0), "the stuck descriptor wrote");
    assert!(after[mb..] == src.snapshot()[mb..]);
    // Never called, and nothing written later.
    dev.set_faults(FaultPlan::default());
    std::thread::sleep(Duration::from_millis(200));
    assert!(rx.try_recv().is_err(), "an aborted descriptor's callback was called");
    assert!(dst.snapshot() == after, "a write after terminate_sync");
    // The channel still works.
    let c = submit_memcpy(&chan, dst.addr(), src.addr(), mb, &tx, 2);
    chan.issue_pending();
    assert_eq!(chan.wait(c, WAIT), Ok(Status::Complete));
    assert!(dst.snapshot() == src.snapshot());
}

#[test]
fn fault_out_of_order() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "fault_out_of_order");
    let dev = soft(
        "t-ooo",
        1,
        SoftConfig { faults: FaultPlan { out_of_order: true, ..Default::default() }, ..Default::default() },
    );
    let chan = dev.request_chan(Caps::MEMCPY).unwrap();
    let n = 8;
    let src = Buf::pattern(n * 65536, 9);
    let dst = Buf::new(n * 65536);
    let order = Arc::new(Mutex::new(Vec::new()));
    let cookies: Vec<Cookie> = (0..n)
        .map(|i| {
            // SAFETY: distinct slices of two live buffers, untouched until completion.
            let mut d =
                unsafe { chan.prep_memcpy(dst.addr() + i * 65536, src.addr() + i * 65536, 65536, flags()) }.unwrap();
            let order = order.clone();
            d.set_callback(move |r| order.lock().unwrap().push((i, r)));
            d.submit()
        })
        .collect();
    chan.issue_pending();
    for &c in &cookies {
        assert_eq!(chan.wait(c, WAIT), Ok(Status::Complete));
    }
    // `wait` may return before the last callback has run.
    let deadline = std::time::Instant::now() + WAIT;
    while order.lock().unwrap().len() < n && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order, (0..n).rev().map(|i| (i, Ok(()))).collect::<Vec<_>>());
    assert!(dst.snapshot() == src.snapshot());
}

#[test]
fn terminate_stops_a_long_queue_and_nothing_writes_afterwards() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "terminate_stops_a_long_queue_and_nothing_writes_afterwards");
    let dev = soft("t-term", 1, SoftConfig::default());
    let chan = dev.request_chan(Caps::MEMCPY).unwrap();
    let piece = 1 << 20;
    let n = 128;
    let src = Buf::new(piece * n);
    // SAFETY: nothing else accesses `src` yet; fills it with a non-zero byte, fast.
    unsafe { std::ptr::write_bytes(src.addr() as *mut u8, 0xAB, piece * n) };
    let dst = Buf::new(piece * n);
    let (tx, rx) = mpsc::channel();
    let cookies: Vec<Cookie> =
        (0..n).map(|i| submit_memcpy(&chan, dst.addr() + i * piece, src.addr() + i * piece, piece, &tx, i)).collect();
    chan.issue_pending();
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, Ok(())));
    chan.terminate_sync();
    let after = dst.words();
    let statuses: Vec<Status> = cookies.iter().map(|&c| chan.tx_status(c).unwrap()).collect();
    assert_eq!(statuses[0], Status::Complete);
    assert_eq!(statuses[n - 1], Status::Error, "the whole queue ran before terminate_sync");
    // What completed did so entirely and in order; what was aborted never calls back.
    let completed = statuses.iter().take_while(|&&s| s == Status::Complete).count();
    assert!(statuses[completed..].iter().all(|&s| s == Status::Error));
    let called: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok()).map(|(i, _)| i).collect();
    assert!(called.iter().all(|&i| i < completed), "callback of an aborted descriptor: {called:?}");
    let per = piece / 8;
    for i in 0..completed {
        assert!(after[i * per..(i + 1) * per].iter().all(|&w| w == 0xABAB_ABAB_ABAB_ABAB));
    }
    // The one running at the abort may be partial; those never started are untouched.
    for i in completed + 1..n {
        assert!(after[i * per..(i + 1) * per].iter().all(|&w| w == 0), "descriptor {i} wrote");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(dst.words() == after, "a write after terminate_sync");
    assert!(rx.try_recv().is_err());
}

#[test]
fn callbacks_may_use_their_channel() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "callbacks_may_use_their_channel");
    let dev = soft("t-cb", 1, SoftConfig::default());
    let chan = Arc::new(dev.request_chan(Caps::MEMCPY).unwrap());
    let src = Buf::pattern(3 * 4096, 10);
    let dst = Buf::new(3 * 4096);
    let calls = Arc::new(AtomicUsize::new(0));
    // First callback: terminates its own channel (it must not wait for itself), which
    // aborts the second descriptor.
    // SAFETY: distinct pages of two live buffers, untouched until completion or abort.
    let mut first = unsafe { chan.prep_memcpy(dst.addr(), src.addr(), 4096, flags()) }.unwrap();
    let (c, n) = (chan.clone(), calls.clone());
    first.set_callback(move |r| {
        assert!(r.is_ok());
        c.terminate_sync();
        n.fetch_add(1, Ordering::SeqCst);
    });
    // SAFETY: as above.
    let mut second = unsafe { chan.prep_memcpy(dst.addr() + 4096, src.addr() + 4096, 4096, flags()) }.unwrap();
    let n = calls.clone();
    second.set_callback(move |_| {
        n.fetch_add(100, Ordering::SeqCst);
    });
    let (c1, c2) = (first.submit(), second.submit());
    chan.issue_pending();
    assert_eq!(chan.wait(c1, WAIT), Ok(Status::Complete));
    assert_eq!(chan.wait(c2, WAIT), Ok(Status::Error));
    // A panicking callback does not take the channel down.
    // SAFETY: as above.
    let mut third = unsafe { chan.prep_memcpy(dst.addr() + 8192, src.addr() + 8192, 4096, flags()) }.unwrap();
    third.set_callback(|_| panic!("callback panics (expected by the test)"));
    let c3 = third.submit();
    chan.issue_pending();
    assert_eq!(chan.wait(c3, WAIT), Ok(Status::Complete));
    // SAFETY: as above.
    let fourth = unsafe { chan.prep_memcpy(dst.addr() + 4096, src.addr() + 4096, 4096, flags()) }.unwrap().submit();
    chan.issue_pending();
    assert_eq!(chan.wait(fourth, WAIT), Ok(Status::Complete));
    chan.terminate_sync();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(dst.snapshot() == src.snapshot());
}

#[test]
fn dropping_the_device_with_work_queued() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "dropping_the_device_with_work_queued");
    let src = Buf::pattern(1 << 20, 11);
    let dst = Buf::new(1 << 20);
    let called = Arc::new(AtomicUsize::new(0));
    {
        let dev = soft("t-drop", 1, SoftConfig::default());
        let chan = dev.request_chan(Caps::MEMCPY).unwrap();
        dev.set_faults(FaultPlan { never_complete: Some(0), ..Default::default() });
        for _ in 0..2 {
            // SAFETY: two live buffers, untouched until the channel is released below.
            let mut d = unsafe { chan.prep_memcpy(dst.addr(), src.addr(), 1 << 20, flags()) }.unwrap();
            let called = called.clone();
            d.set_callback(move |_| {
                called.fetch_add(1, Ordering::SeqCst);
            });
            d.submit();
        }
        // Submitted, one issued and stuck, the other never issued: released with both.
        chan.issue_pending();
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: as above.
        unsafe { chan.prep_memcpy(dst.addr(), src.addr(), 4096, flags()) }.unwrap().submit();
    }
    assert_eq!(Arc::strong_count(&called), 1, "callbacks of aborted descriptors were not dropped");
    assert!(called.load(Ordering::SeqCst) <= 1);
    assert!(dst.snapshot().iter().zip(src.snapshot()).all(|(&d, s)| d == 0 || d == s));
}

#[test]
fn soft_device_arguments() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "soft_device_arguments");
    assert_eq!(Device::soft("", 1, SoftConfig::default()).err(), Some(Errno::INVAL));
    assert_eq!(Device::soft("x", 0, SoftConfig::default()).err(), Some(Errno::INVAL));
    assert_eq!(Device::soft("x", dma::MAX_SOFT_CHANNELS + 1, SoftConfig::default()).err(), Some(Errno::INVAL));
    let d = Device::soft("t-args", 3, SoftConfig { pin: false, ..Default::default() }).unwrap();
    assert_eq!((d.name(), d.nr_channels(), d.free_channels()), ("t-args", 3, 3));
    assert_eq!(d.caps(), Caps::MEMCPY | Caps::MEMCPY_SG | Caps::PRIVATE);
}
