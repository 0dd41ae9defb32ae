//! The DMA Core Batch Migrator on real memory, driven directly through
//! `OffloadCopy::offload_copy` with a private soft DMA device per test: every byte
//! verified, including at the moment a part is reported complete, and nothing written
//! after the call returns.

mod common;

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pagemig::copy::CopyPair;
use pagemig::dma::{self, Caps, Device, FaultPlan, SoftConfig};
use pagemig::migrators::dcbm::{self, Dcbm, split_folios};
use pagemig::offload::{Batch, CpuCopy, Migrator, OffloadCopy, Owner, Registry, registry};
use pagemig::sys::{Errno, Mapping};

const K4: usize = 4096;
const M2: usize = 2 << 20;

/// A private mapping that only the test and the DMA workers it lends it to see.
struct Buf {
    map: Mapping,
}

impl Buf {
    fn new(len: usize, align: usize) -> Self {
        Self { map: Mapping::new(len, align).unwrap() }
    }

    fn word(&self, addr: usize) -> u64 {
        self.map.word((addr - self.map.addr()) / 8).unwrap().load(Ordering::Acquire)
    }

    /// The contents, read word by word (atomically: race-tolerant).
    fn words(&self) -> Vec<u64> {
        (0..self.map.len() / 8).map(|i| self.map.word(i).unwrap().load(Ordering::Acquire)).collect()
    }
}

/// A batch over real memory: folio `i` copies source slot `src_slot(i)` to destination
/// slot `dst_slot(i)`.
struct Setup {
    src: Buf,
    dst: Buf,
    pairs: Vec<CopyPair>,
}

fn word_pattern(i: usize) -> u64 {
    (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555_0000_AAAA_0000
}

impl Setup {
    fn new(n: usize, folio: usize, src_slot: impl Fn(usize) -> usize, dst_slot: impl Fn(usize) -> usize) -> Self {
        let slots = |f: &dyn Fn(usize) -> usize| (0..n).map(f).max().unwrap() + 1;
        let src = Buf::new(slots(&src_slot) * folio, folio);
        let dst = Buf::new(slots(&dst_slot) * folio, folio);
        for i in 0..src.map.len() / 8 {
            src.map.word(i).unwrap().store(word_pattern(i), Ordering::Relaxed);
        }
        let pairs = (0..n)
            .map(|i| CopyPair {
                dst: dst.map.addr() + dst_slot(i) * folio,
                src: src.map.addr() + src_slot(i) * folio,
                len: folio,
            })
            .collect();
        Self { src, dst, pairs }
    }

    fn contiguous(n: usize, folio: usize) -> Self {
        Self::new(n, folio, |i| i, |i| i)
    }

    /// Whether folio `i`'s destination holds its source, every byte.
    fn folio_ok(&self, i: usize) -> bool {
        let p = self.pairs[i];
        (0..p.len).step_by(8).all(|off| self.dst.word(p.dst + off) == self.src.word(p.src + off))
    }

    /// Whether no byte of folio `i`'s destination was written (it started zeroed).
    fn folio_untouched(&self, i: usize) -> bool {
        let p = self.pairs[i];
        (0..p.len).step_by(8).all(|off| self.dst.word(p.dst + off) == 0)
    }

    fn folios(&self) -> usize {
        self.pairs.len()
    }
}

/// What one `offload_copy` did.
struct Outcome {
    result: Result<(), Errno>,
    /// Folios reported complete, in report order, each checked when reported.
    reported: Vec<Range<usize>>,
}

impl Outcome {
    fn folios(&self) -> BTreeSet<usize> {
        self.reported.iter().flat_map(|r| r.clone()).collect()
    }
}

/// Runs `offload_copy` over `setup`, verifying every reported folio at the moment it is
/// reported and that no byte of the destination changes after the call returns.
fn offload(dcbm: &Dcbm, setup: &Setup) -> Outcome {
    let reported = Mutex::new(Vec::new());
    let early = AtomicBool::new(false);
    let on_complete = |r: Range<usize>| {
        if !r.clone().all(|i| setup.folio_ok(i)) {
            early.store(true, Ordering::SeqCst);
        }
        reported.lock().unwrap().push(r);
    };
    // SAFETY: every pair is a distinct folio of two live mappings that nothing else
    // accesses during the call; no two pairs overlap.
    let batch = unsafe { Batch::new(&setup.pairs, Some(&on_complete)) };
    let result = dcbm.offload_copy(&batch);
    let after = setup.dst.words();
    assert!(!early.load(Ordering::SeqCst), "a folio was reported complete before its bytes were copied");
    std::thread::sleep(Duration::from_millis(100));
    assert!(setup.dst.words() == after, "the DMA wrote after offload_copy returned");
    let reported = reported.into_inner().unwrap();
    let folios: usize = reported.iter().map(|r| r.len()).sum();
    let unique: BTreeSet<usize> = reported.iter().flat_map(|r| r.clone()).collect();
    assert_eq!(unique.len(), folios, "a folio was reported twice: {reported:?}");
    Outcome { result, reported }
}

fn device(name: &str, channels: usize, memcpy_sg: bool) -> Arc<Device> {
    Device::soft(name, channels, SoftConfig { memcpy_sg, ..Default::default() }).unwrap()
}

fn dcbm_on(dev: &Arc<Device>, channels: usize) -> Arc<Dcbm> {
    let d = Dcbm::new(Some(dev.clone()));
    d.set_nr_dma_chan(channels).unwrap();
    d
}

fn assert_all_copied(setup: &Setup, out: &Outcome) {
    assert_eq!(out.result, Ok(()));
    assert_eq!(out.folios(), (0..setup.folios()).collect());
    for i in 0..setup.folios() {
        assert!(setup.folio_ok(i), "folio {i}");
    }
}

fn channel_counts(folio: usize, sg: bool) {
    let n = if folio == M2 { 16 } else { 512 };
    let dev = device(&format!("t-counts-{folio}-{sg}"), 16, sg);
    for ch in [1, 2, 4, 8, 16] {
        let setup = Setup::contiguous(n, folio);
        let d = dcbm_on(&dev, ch);
        let out = offload(&d, &setup);
        assert_all_copied(&setup, &out);
        // One report per channel, each a share of the seed's split.
        let mut shares = out.reported.clone();
        shares.sort_by_key(|r| r.start);
        assert_eq!(shares, split_folios(n, ch), "{ch} channels");
        assert_eq!((d.folios_migrated(), d.folios_failures()), (n as u64, 0));
        assert_eq!(dev.free_channels(), 16, "channels not released");
    }
}

#[test]
fn copies_4k_folios_on_1_to_16_channels() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "copies_4k_folios_on_1_to_16_channels");
    channel_counts(K4, true);
}

#[test]
fn copies_2m_folios_on_1_to_16_channels() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "copies_2m_folios_on_1_to_16_channels");
    channel_counts(M2, true);
}

#[test]
fn copies_without_memcpy_sg_one_descriptor_per_piece() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "copies_without_memcpy_sg_one_descriptor_per_piece");
    channel_counts(K4, false);
    channel_counts(M2, false);
}

#[test]
fn uneven_scatter_lists_are_copied_not_declined() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "uneven_scatter_lists_are_copied_not_declined");
    // (source slot, destination slot) layouts whose two sides coalesce differently.
    type Layout = (&'static str, fn(usize) -> usize, fn(usize) -> usize);
    let layouts: [Layout; 4] = [
        ("scattered sources, one destination run", |i| 2 * i, |i| i),
        ("one source run, destinations swapped pairwise", |i| i, |i| i ^ 1),
        ("gaps every 3 sources and every 2 destinations", |i| i + i / 3, |i| i + i / 2),
        ("reversed destinations", |i| i, |i| 63 - i),
    ];
    for sg in [true, false] {
        let dev = device(&format!("t-uneven-{sg}"), 4, sg);
        for (what, src_slot, dst_slot) in layouts {
            for ch in [1, 3, 4] {
                let setup = Setup::new(64, K4, src_slot, dst_slot);
                let d = dcbm_on(&dev, ch);
                let out = offload(&d, &setup);
                assert_eq!(out.result, Ok(()), "{what}, {ch} channels, sg {sg}");
                assert_all_copied(&setup, &out);
                assert_eq!((d.folios_migrated(), d.folios_failures()), (64, 0), "{what}");
            }
        }
        // The destinations' zero bytes between folios were not written either.
        let setup = Setup::new(32, K4, |i| i, |i| 2 * i);
        let out = offload(&dcbm_on(&dev, 2), &setup);
        assert_all_copied(&setup, &out);
        let words = setup.dst.words();
        for gap in (0..31).map(|i| 2 * i + 1) {
            assert!(words[gap * K4 / 8..(gap + 1) * K4 / 8].iter().all(|&w| w == 0), "gap {gap} written");
        }
    }
}

#[test]
fn uses_the_channels_it_gets_and_declines_without_any() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "uses_the_channels_it_gets_and_declines_without_any");
    let dev = device("t-few", 2, true);
    let setup = Setup::contiguous(100, K4);
    let d = dcbm_on(&dev, 8);
    let out = offload(&d, &setup);
    assert_all_copied(&setup, &out);
    let mut shares = out.reported.clone();
    shares.sort_by_key(|r| r.start);
    assert_eq!(shares, split_folios(100, 2));

    // Every channel held by someone else: declined, all counted as falling back.
    let held = (dev.request_chan(Caps::MEMCPY).unwrap(), dev.request_chan(Caps::MEMCPY).unwrap());
    let setup = Setup::contiguous(10, K4);
    let out = offload(&d, &setup);
    assert_eq!(out.result, Err(Errno::NODEV));
    assert!(out.reported.is_empty());
    assert!((0..10).all(|i| setup.folio_untouched(i)));
    assert_eq!((d.folios_migrated(), d.folios_failures()), (100, 10));
    drop(held);

    // Fewer folios than channels: one channel per folio at most.
    let setup = Setup::contiguous(1, M2);
    let out = offload(&d, &setup);
    assert_all_copied(&setup, &out);
    assert_eq!(out.reported, vec![Range { start: 0, end: 1 }]);

    // An empty batch is a no-op.
    // SAFETY: an empty batch touches no memory.
    let empty = unsafe { Batch::new(&[], None) };
    assert_eq!(d.offload_copy(&empty), Ok(()));
    assert_eq!((d.folios_migrated(), d.folios_failures()), (101, 10));
    d.reset_folios_migrated();
    d.reset_folios_failures();
    assert_eq!((d.folios_migrated(), d.folios_failures()), (0, 0));
}

#[test]
fn nr_dma_chan_changes_take_effect_on_the_next_batch() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "nr_dma_chan_changes_take_effect_on_the_next_batch");
    let dev = device("t-nr", 16, true);
    let d = dcbm_on(&dev, 2);
    let setup = Setup::contiguous(64, K4);
    assert_eq!(offload(&d, &setup).reported.len(), 2);
    d.set_nr_dma_chan(5).unwrap();
    let setup = Setup::contiguous(64, K4);
    assert_eq!(offload(&d, &setup).reported.len(), 5);
    assert_eq!(d.set_nr_dma_chan(17), Err(Errno::INVAL));
    assert_eq!(d.nr_dma_chan(), 5);
}

/// A failed descriptor: its channel's folios fall back, the other channels' are reported.
fn failed_descriptor(sg: bool, folio: usize) {
    let dev = device(&format!("t-fail-{sg}-{folio}"), 4, sg);
    let n = if folio == M2 { 8 } else { 64 };
    // Destinations swapped pairwise: without MEMCPY_SG each folio is its own descriptor.
    let setup = Setup::new(n, folio, |i| i, |i| i ^ 1);
    let d = dcbm_on(&dev, 4);
    let per_channel = if sg { 1 } else { n / 4 };
    // The second descriptor of channel 1 (the only one with MEMCPY_SG).
    let bad = per_channel as u64 + if sg { 0 } else { 1 };
    dev.set_faults(FaultPlan { fail_descriptor: Some(dev.descriptors_submitted() + bad), ..Default::default() });
    let out = offload(&d, &setup);
    assert_eq!(out.result, Err(Errno::IO));
    let shares = split_folios(n, 4);
    let expected: BTreeSet<usize> = [0, 2, 3].iter().flat_map(|&c| shares[c].clone()).collect();
    assert_eq!(out.folios(), expected, "reported {:?}", out.reported);
    for i in &expected {
        assert!(setup.folio_ok(*i));
    }
    let failed = shares[1].len() as u64;
    assert_eq!((d.folios_migrated(), d.folios_failures()), (n as u64 - failed, failed));
}

#[test]
fn failed_descriptor_falls_back_for_its_channel_only() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "failed_descriptor_falls_back_for_its_channel_only");
    failed_descriptor(true, K4);
    failed_descriptor(false, K4);
    failed_descriptor(true, M2);
}

#[test]
fn never_completing_descriptor_times_out() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "never_completing_descriptor_times_out");
    for sg in [true, false] {
        let dev = device(&format!("t-stuck-{sg}"), 4, sg);
        let n = 64;
        let setup = Setup::new(n, K4, |i| i, |i| i ^ 1);
        let d = dcbm_on(&dev, 4);
        d.set_timeout(Duration::from_millis(500)).unwrap();
        let per_channel = if sg { 1 } else { n / 4 };
        // The first descriptor of channel 2.
        let stuck = dev.descriptors_submitted() + 2 * per_channel as u64;
        dev.set_faults(FaultPlan { never_complete: Some(stuck), ..Default::default() });
        let out = offload(&d, &setup);
        assert_eq!(out.result, Err(Errno::TIMEDOUT));
        let shares = split_folios(n, 4);
        let expected: BTreeSet<usize> = [0, 1, 3].iter().flat_map(|&c| shares[c].clone()).collect();
        assert_eq!(out.folios(), expected, "sg {sg}: reported {:?}", out.reported);
        // The stuck descriptor's folio was never written, and is not later (checked by
        // `offload`, and once more now that the plan no longer parks anything).
        let first_stuck = shares[2].start;
        assert!(setup.folio_untouched(first_stuck));
        dev.set_faults(FaultPlan::default());
        std::thread::sleep(Duration::from_millis(50));
        assert!(setup.folio_untouched(first_stuck));
        assert_eq!((d.folios_migrated(), d.folios_failures()), (48, 16));
        assert_eq!(dev.free_channels(), 4);
    }
}

#[test]
fn out_of_order_completion_is_reported_only_when_a_channel_is_done() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "out_of_order_completion_is_reported_only_when_a_channel_is_done");
    for sg in [false, true] {
        let dev = Device::soft(
            &format!("t-ooo-{sg}"),
            4,
            SoftConfig {
                memcpy_sg: sg,
                faults: FaultPlan { out_of_order: true, ..Default::default() },
                ..Default::default()
            },
        )
        .unwrap();
        for (n, folio) in [(256, K4), (8, M2)] {
            // Every folio its own descriptor without MEMCPY_SG; the last one submitted runs
            // first. A report on the last callback alone would come too early and fail the
            // check made at report time.
            let setup = Setup::new(n, folio, |i| i, |i| i ^ 1);
            let d = dcbm_on(&dev, 4);
            let out = offload(&d, &setup);
            assert_all_copied(&setup, &out);
            assert_eq!((d.folios_migrated(), d.folios_failures()), (n as u64, 0));
        }
    }
}

#[test]
fn out_of_order_with_a_stuck_first_descriptor_reports_nothing_early() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "out_of_order_with_a_stuck_first_descriptor_reports_nothing_early");
    // The share's last descriptor completes first and its first never does: a report
    // driven by the last callback alone would announce a folio that was never copied.
    let dev = Device::soft(
        "t-ooo-stuck",
        4,
        SoftConfig {
            memcpy_sg: false,
            faults: FaultPlan { out_of_order: true, ..Default::default() },
            ..Default::default()
        },
    )
    .unwrap();
    let n = 64;
    let setup = Setup::new(n, K4, |i| i, |i| i ^ 1);
    let d = dcbm_on(&dev, 4);
    d.set_timeout(Duration::from_millis(300)).unwrap();
    dev.set_faults(FaultPlan {
        out_of_order: true,
        never_complete: Some(dev.descriptors_submitted()),
        ..Default::default()
    });
    let out = offload(&d, &setup);
    assert_eq!(out.result, Err(Errno::TIMEDOUT));
    let shares = split_folios(n, 4);
    let expected: BTreeSet<usize> = [1, 2, 3].iter().flat_map(|&c| shares[c].clone()).collect();
    assert_eq!(out.folios(), expected);
    assert!(setup.folio_untouched(0));
    assert_eq!((d.folios_migrated(), d.folios_failures()), (48, 16));
}

/// A migrator that copies on the CPU, to occupy a registry.
fn other_migrator() -> Migrator {
    Migrator::new("cpu-test", Arc::new(CpuCopy), Owner::new("test"))
}

#[test]
fn registration_semantics_with_a_private_registry() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "registration_semantics_with_a_private_registry");
    let reg = Registry::new();
    let dev = device("t-reg", 2, true);
    let d = dcbm_on(&dev, 2);
    assert!(!d.offloading());
    // Off when off: nothing to do.
    d.set_offloading_in(&reg, false).unwrap();
    d.set_offloading_in(&reg, true).unwrap();
    assert!(d.offloading());
    assert_eq!(reg.active_name().as_deref(), Some(dcbm::NAME));
    // On when on: fine.
    d.set_offloading_in(&reg, true).unwrap();

    // The registry dispatches batches to it.
    let setup = Setup::contiguous(32, K4);
    // SAFETY: distinct folios of two live mappings, untouched by anything else meanwhile.
    let batch = unsafe { Batch::new(&setup.pairs, None) };
    assert_eq!(reg.dispatch(&batch), Some(Ok(())));
    assert!((0..32).all(|i| setup.folio_ok(i)));
    assert_eq!(d.folios_migrated(), 32);

    d.set_offloading_in(&reg, false).unwrap();
    assert!(!d.offloading());
    assert_eq!(reg.active_name(), None);
    d.set_offloading_in(&reg, false).unwrap();

    // Another migrator active: EBUSY, and the state stays off.
    let other = other_migrator();
    reg.register(&other).unwrap();
    assert_eq!(d.set_offloading_in(&reg, true), Err(Errno::BUSY));
    assert!(!d.offloading());
    reg.unregister(&other).unwrap();

    // A dying owner cannot register.
    d.owner().going_away();
    assert_eq!(d.set_offloading_in(&reg, true), Err(Errno::NODEV));
    assert!(!d.offloading());
}

/// The only test of this binary that uses the process-wide registries.
#[test]
fn global_registration_and_channels_from_the_dma_registry() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "global_registration_and_channels_from_the_dma_registry");
    let dev = device("t-global", 4, true);
    let d = dcbm_on(&dev, 4);
    d.set_offloading(true).unwrap();
    assert_eq!(registry().active_name().as_deref(), Some(dcbm::NAME));
    let other = Dcbm::new(None);
    assert_eq!(other.set_offloading(true), Err(Errno::BUSY));
    let setup = Setup::contiguous(40, K4);
    // SAFETY: distinct folios of two live mappings, untouched by anything else meanwhile.
    let batch = unsafe { Batch::new(&setup.pairs, None) };
    assert_eq!(registry().dispatch(&batch), Some(Ok(())));
    assert!((0..40).all(|i| setup.folio_ok(i)));
    d.set_offloading(false).unwrap();
    assert_eq!(registry().active_name(), None);

    // Channels from the DMA registry: none registered, then the process-wide soft device.
    let from_registry = Dcbm::new(None);
    from_registry.set_nr_dma_chan(16).unwrap();
    if dma::devices().is_empty() {
        let setup = Setup::contiguous(8, K4);
        assert_eq!(offload(&from_registry, &setup).result, Err(Errno::NODEV));
    }
    let global = dcbm::global();
    assert!(dma::devices().iter().any(|dev| dev.name() == "soft0"));
    let setup = Setup::contiguous(64, K4);
    let out = offload(global, &setup);
    assert_all_copied(&setup, &out);
    assert_eq!(out.reported.len(), 1, "the global migrator starts with one channel");
    let out = offload(&from_registry, &Setup::contiguous(64, K4));
    assert_eq!(out.result, Ok(()));
    assert_eq!(out.reported.len(), 16);
}
