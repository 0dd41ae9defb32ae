//! Cross-node migration on a machine with two NUMA nodes.
//!
//! These tests need two memory nodes; `vm/run` boots a two-node QEMU guest and runs them
//! there (`--include-ignored`). A plain `cargo test` lists them as ignored, never as passed;
//! run by hand on a host with fewer than two nodes, each prints `skipped: needs 2 NUMA
//! nodes`, which `vm/run` counts as a failure.
//!
//! Every migrated region is checked twice, by two independent sources: the kernel's
//! `move_pages()` status query and the `N<node>=` page counts of `/proc/self/numa_maps`.
//! A test prints `placement: <region> node <N> pages <k>/<total>` (`k`: the pages both
//! sources find on node `N`) and asserts that all pages are on the node they were sent to.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::strangers::{StopOnDrop, can_pin, known_mappings, pin, pin_fresh, scan};
use pagemig::attr;
use pagemig::error::Error;
use pagemig::migrate::{self, Engine, FaultInjection, MigrateOptions, Mode, Reason};
use pagemig::numa;
use pagemig::region::Region;
use pagemig::sys::{self, Errno, HPAGE_SIZE, PAGE_SIZE};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// The two nodes to move between, or `None` (after printing the skip line) on a host
/// with fewer than two memory nodes.
fn two_nodes() -> Option<(u32, u32)> {
    let nodes = numa::memory_nodes().expect("reading the NUMA topology");
    if nodes.len() < 2 {
        println!("skipped: needs 2 NUMA nodes");
        return None;
    }
    Some((nodes[0], nodes[1]))
}

fn size_name(bytes: usize) -> String {
    if bytes >= MIB { format!("{}MiB", bytes / MIB) } else { format!("{}KiB", bytes / KIB) }
}

/// The value every word of a region holds after `fill(region, seed)`.
fn pattern(seed: u64, index: usize) -> u64 {
    (index as u64 ^ seed.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed
}

fn fill(region: &Region, seed: u64) {
    for i in 0..region.words() {
        region.word(i).store(pattern(seed, i), Ordering::Relaxed);
    }
}

/// Checks every byte of the region (word by word) against `fill(region, seed)`.
fn verify(region: &Region, seed: u64, what: &str) {
    let bad: Vec<usize> =
        (0..region.words()).filter(|&i| region.word(i).load(Ordering::Relaxed) != pattern(seed, i)).collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} words differ, first at byte offset {:#x}",
        bad.len(),
        region.words(),
        bad[0] * 8
    );
}

/// `/proc/self/maps` and `/proc/self/numa_maps` read while no mapping changed: numa_maps
/// gives each mapping's start only, maps gives its end.
fn maps_and_numa_maps() -> (String, String) {
    let read = |path| std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let mut maps = read("/proc/self/maps");
    for _ in 0..100 {
        let numa_maps = read("/proc/self/numa_maps");
        let again = read("/proc/self/maps");
        if again == maps {
            return (maps, numa_maps);
        }
        maps = again;
    }
    panic!("the mappings kept changing while reading numa_maps");
}

/// Pages of `[addr, addr + len)` on each node according to `/proc/self/numa_maps`, summed
/// over the mappings the range is made of. Fails when a mapping reaches outside the range,
/// since its counts could not be told apart from the range's.
///
/// A mapping of the test's that lies right beside the range with the same flags is one
/// mapping with it for the kernel (a region a test leaked, say): the range is marked
/// `MADV_DONTDUMP` while numa_maps is read, which only keeps it out of core dumps and
/// makes its own mappings, and unmarked after.
fn numa_maps_counts(addr: usize, len: usize) -> BTreeMap<u32, usize> {
    let end = addr + len;
    // SAFETY: advice on the caller's range that changes no memory and no access.
    unsafe { libc::madvise(addr as *mut _, len, libc::MADV_DONTDUMP) };
    let (maps, numa_maps) = maps_and_numa_maps();
    // SAFETY: as above.
    unsafe { libc::madvise(addr as *mut _, len, libc::MADV_DODUMP) };
    let ends: BTreeMap<usize, usize> = maps
        .lines()
        .filter_map(|l| {
            let (s, e) = l.split(' ').next()?.split_once('-')?;
            Some((usize::from_str_radix(s, 16).ok()?, usize::from_str_radix(e, 16).ok()?))
        })
        .collect();
    let mut counts = BTreeMap::new();
    let mut covered = 0;
    for line in numa_maps.lines() {
        let mut fields = line.split_whitespace();
        let Some(start) = fields.next().and_then(|s| usize::from_str_radix(s, 16).ok()) else {
            continue;
        };
        let vma_end = *ends.get(&start).unwrap_or_else(|| panic!("mapping {start:#x} of numa_maps not in maps"));
        if vma_end <= addr || start >= end {
            continue;
        }
        assert!(
            start >= addr && vma_end <= end,
            "mapping {start:#x}-{vma_end:#x} reaches outside the region {addr:#x}-{end:#x}: {line}"
        );
        covered += vma_end - start;
        let mut page_kb = 4;
        for field in fields {
            if let Some(kb) = field.strip_prefix("kernelpagesize_kB=") {
                page_kb = kb.parse().expect("kernelpagesize_kB");
            } else if let Some((node, pages)) = field.strip_prefix('N').and_then(|f| f.split_once('=')) {
                let (Ok(node), Ok(pages)) = (node.parse::<u32>(), pages.parse::<usize>()) else {
                    continue;
                };
                *counts.entry(node).or_insert(0) += pages;
            }
        }
        // Transparent huge pages are counted in base pages; only hugetlbfs differs.
        assert_eq!(page_kb, PAGE_SIZE / KIB, "unexpected page size in numa_maps: {line}");
    }
    assert_eq!(covered, len, "numa_maps covers {covered} of the region's {len} bytes");
    counts
}

/// Checks, by `move_pages` status and by `numa_maps`, that every page of `region` is on
/// `node`, and prints the placement line: `k` counts the pages both sources put on `node`.
fn check_placement(name: &str, region: &Region, node: u32) {
    check_placement_with(name, region, node, &String::new);
}

/// [`check_placement`], where a failure also says `context()` (what the call counted, for
/// a failure that is hard to reproduce) and where the first page off `node` lies.
fn check_placement_with(name: &str, region: &Region, node: u32, context: &dyn Fn() -> String) {
    let total = region.len() / PAGE_SIZE;
    let status = numa::page_nodes(region.addr(), region.len()).expect("move_pages status query");
    let by_status = status.iter().filter(|&&n| n == node as i32).count();
    let counts = numa_maps_counts(region.addr(), region.len());
    let by_numa_maps = counts.get(&node).copied().unwrap_or(0);
    println!("placement: {name} node {node} pages {}/{total}", by_status.min(by_numa_maps));
    let mut per_node: BTreeMap<i32, usize> = BTreeMap::new();
    for &n in &status {
        *per_node.entry(n).or_insert(0) += 1;
    }
    let first_off = status.iter().position(|&n| n != node as i32).map(|i| region.addr() + i * PAGE_SIZE);
    assert_eq!(
        by_status,
        total,
        "{name}: move_pages finds pages per node (or -errno) {per_node:?}, the first off node {node} at {first_off:#x?}; {}",
        context()
    );
    assert_eq!(by_numa_maps, total, "{name}: numa_maps counts pages per node {counts:?}");
}

/// A way of moving a whole region to a node.
#[derive(Clone, Copy, Debug)]
enum CopyPath {
    /// pagemig, batch-eligible reason: the batch copy.
    Batch,
    /// pagemig, a reason that is not batch-eligible: folio by folio.
    PerFolio,
    /// pagemig with the batch copy failing: the per-folio fallback.
    Fallback,
    /// pagemig with the multi-threaded CPU copy migrator registered.
    MtCopy,
    /// pagemig with the DMA migrator (soft DMA engine, 4 channels) registered.
    Dcbm,
    /// The kernel's `move_pages()`: the baseline.
    Kernel,
    /// pagemig, base pages copied straight into the source by a thread bound to the
    /// target (`migrate/copy_in`).
    CopyIn,
    /// pagemig, destinations populated (zeroed) first, then copied into and moved in.
    Populated,
    /// pagemig, the mapping bound by `mbind` to the node the pages leave: no copy straight
    /// into the source may be used (its pages would follow that policy), destinations are.
    PolicyBound,
}

impl CopyPath {
    const ALL: [CopyPath; 9] = [
        CopyPath::Batch,
        CopyPath::PerFolio,
        CopyPath::Fallback,
        CopyPath::MtCopy,
        CopyPath::Dcbm,
        CopyPath::Kernel,
        CopyPath::CopyIn,
        CopyPath::Populated,
        CopyPath::PolicyBound,
    ];

    fn name(self) -> &'static str {
        match self {
            CopyPath::Batch => "batch-cpu",
            CopyPath::PerFolio => "folio-cpu",
            CopyPath::Fallback => "fallback-cpu",
            CopyPath::MtCopy => "mtcopy",
            CopyPath::Dcbm => "dcbm",
            CopyPath::Kernel => "kernel",
            CopyPath::CopyIn => "copy-in-cpu",
            CopyPath::Populated => "populated-dest-cpu",
            CopyPath::PolicyBound => "mbind-bound-cpu",
        }
    }

    fn migrate(self, region: &Region, node: u32) {
        let (reason, opts) = match self {
            CopyPath::Kernel => return kernel_move_pages(region, node),
            CopyPath::Batch => (Reason::Syscall, MigrateOptions::default()),
            CopyPath::PerFolio => (Reason::MemoryFailure, MigrateOptions::default()),
            CopyPath::Fallback => {
                let fault = FaultInjection { fail_batch_copy: true, ..Default::default() };
                (Reason::Demotion, MigrateOptions::default().fault(fault))
            }
            CopyPath::MtCopy | CopyPath::Dcbm => (Reason::Demotion, MigrateOptions::default()),
            CopyPath::CopyIn => (Reason::Syscall, MigrateOptions::default().copy_in(true)),
            CopyPath::Populated => (Reason::Syscall, MigrateOptions::default().copy_in(false).fill_empty(false)),
            CopyPath::PolicyBound => {
                let (a, b) = two_nodes().expect("two nodes");
                let from = if node == a { b } else { a };
                sys::mbind(region.addr(), region.len(), from, false).expect("mbind");
                (Reason::Syscall, MigrateOptions::default().copy_in(true))
            }
        };
        let migrator = match self {
            CopyPath::MtCopy => "mtcopy",
            CopyPath::Dcbm => "dcbm",
            _ => "cpu",
        };
        attr::select_migrator(migrator, Some(4), Some(2)).expect("selecting the migrator");
        let folios = region.folios();
        let engine = Engine::global().expect("opening userfaultfd");
        let stats = engine
            .migrate_pages(&folios, node, reason, Mode::Sync, &opts)
            .unwrap_or_else(|e| panic!("{}: migrate to node {node}: {e}", self.name()));
        attr::select_migrator("cpu", None, None).expect("unregistering the migrator");
        let n = folios.len() as u64;
        assert_eq!((stats.succeeded_folios, stats.failed_folios), (n, 0), "{stats:?}");
        assert_eq!(stats.bytes, region.len() as u64, "{stats:?}");
        let copied = match self {
            CopyPath::Batch | CopyPath::Populated | CopyPath::PolicyBound => stats.batch_copied_folios,
            // Base pages copied straight in; huge pages batch-copied.
            CopyPath::CopyIn => stats.batch_copied_folios + stats.copied_in_folios,
            CopyPath::PerFolio => stats.single_copied_folios,
            CopyPath::Fallback => stats.fallback_folios,
            CopyPath::MtCopy | CopyPath::Dcbm => stats.offloaded_folios,
            CopyPath::Kernel => unreachable!(),
        };
        assert_eq!(copied, n, "{}: folios not copied the expected way: {stats:?}", self.name());
    }
}

/// The kernel's own `move_pages()` on the region, one address per folio: the baseline.
///
/// One address per folio, because the kernel moves a huge page whole from its first
/// address and reports `EBUSY` for the next one, which it finds isolated.
fn kernel_move_pages(r: &Region, node: u32) {
    let pages: Vec<usize> = r.folios().iter().map(|f| f.addr()).collect();
    let nodes = vec![node as i32; pages.len()];
    let mut status = vec![i32::MIN; pages.len()];
    sys::move_pages(&pages, Some(&nodes), &mut status).unwrap_or_else(|e| panic!("move_pages: {e}"));
    let failed: Vec<_> = status.iter().enumerate().filter(|&(_, &s)| s != node as i32).take(4).collect();
    assert!(failed.is_empty(), "move_pages per-page status (index, status): {failed:?}");
}

fn round_trip(folio_size: usize, len: usize) {
    let Some((a, b)) = two_nodes() else { return };
    for path in CopyPath::ALL {
        let name = format!("{}-{}-folios-{}", path.name(), size_name(folio_size), size_name(len));
        let region = Region::new(len, folio_size, Some(a)).expect("region on the first node");
        let seed = len as u64 ^ folio_size as u64;
        fill(&region, seed);
        check_placement(&format!("{name}@start"), &region, a);
        for (step, node) in [b, a].into_iter().enumerate() {
            path.migrate(&region, node);
            verify(&region, seed, &format!("{name} after move {step} to node {node}"));
            check_placement(&format!("{name}#{}", step + 1), &region, node);
        }
        if folio_size == HPAGE_SIZE {
            // 2 MiB-aligned moves keep transparent huge pages whole.
            let huge = region.anon_huge_bytes().expect("reading smaps");
            assert_eq!(huge, len as u64, "{name}: bytes on huge pages after the moves");
        }
    }
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn round_trip_4k_folios() {
    round_trip(4 * KIB, 8 * MIB);
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn round_trip_2m_folios() {
    round_trip(HPAGE_SIZE, 16 * MIB);
}

/// 2 MiB folios the kernel maps with base pages (split by an `mprotect` of one page and back)
/// arrive on the other node mapped whole by huge pages, every byte as it was
/// (`mover::rejoin_huge_pages`): as base pages they would stay so for good, and
/// `khugepaged` could collapse them back onto the node they left.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn huge_folios_mapped_with_base_pages_arrive_whole_on_the_other_node() {
    let Some((a, b)) = two_nodes() else { return };
    let name = "split-huge-folios-across-nodes";
    let region = Region::new(8 * MIB, HPAGE_SIZE, Some(a)).expect("region on the first node");
    fill(&region, 0x77);
    assert_eq!(region.anon_huge_bytes().expect("smaps"), 8 * MIB as u64, "{name}: huge at the start");
    for (i, node) in [b, a].into_iter().enumerate() {
        assert_eq!(common::map_with_base_pages(&region), 0, "{name}: mapped with base pages");
        Engine::global()
            .expect("engine")
            .migrate_pages(&region.folios(), node, Reason::Syscall, Mode::Sync, &MigrateOptions::default())
            .unwrap_or_else(|e| panic!("{name}: move to {node}: {e}"));
        verify(&region, 0x77, name);
        check_placement(&format!("{name}#{}", i + 1), &region, node);
        assert_eq!(region.anon_huge_bytes().expect("smaps"), 8 * MIB as u64, "{name}: mapped whole on node {node}");
    }
}

/// Folios keep their size across nodes whatever their mapping advises: huge pages of a
/// mapping advised `MADV_NOHUGEPAGE` after they were made stay huge, base pages of a
/// mapping advised `MADV_HUGEPAGE` stay base pages, and each mapping keeps its advice;
/// moved by `migrate_pages` one way and by the drop-in's `move_pages` the other. Advised
/// `MADV_HUGEPAGE`, base pages may also be collapsed by `khugepaged` meanwhile (it did, once
/// in a few dozen runs of the suite): where the kernel's count of collapses rose while the
/// huge bytes changed, the case runs again with a fresh region (three tries).
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn folios_keep_their_size_across_nodes_whatever_their_mapping_advises() {
    let Some((a, b)) = two_nodes() else { return };
    let engine = Engine::global().expect("the migration engine");
    for (folio, advice, flag) in [(HPAGE_SIZE, sys::Advice::NoHugePage, "nh"), (4 * KIB, sys::Advice::HugePage, "hg")] {
        let name = format!("advised-{flag}-{}-folios", size_name(folio));
        let mut tries = 0;
        let region = loop {
            tries += 1;
            let collapses = common::thp_collapses();
            let region = Region::new(16 * MIB, folio, Some(a)).expect("region on the first node");
            fill(&region, 0x5a);
            let huge = region.anon_huge_bytes().expect("smaps");
            assert_eq!(huge, if folio == HPAGE_SIZE { 16 * MIB as u64 } else { 0 }, "{name}: huge bytes at the start");
            sys::madvise(region.addr(), region.len(), advice).expect("madvise");
            // The huge bytes after a move, or `None` where they changed while khugepaged
            // collapsed pages (not this move's doing) and another try is left.
            let huge_after = |step: &str| {
                let after = region.anon_huge_bytes().expect("smaps");
                let collapsed = common::thp_collapses() - collapses;
                if after != huge && collapsed > 0 && tries < 3 {
                    println!(
                        "{name}: {after} huge bytes after the move {step} while khugepaged collapsed {collapsed} huge pages: tried again"
                    );
                    return None;
                }
                assert_eq!(
                    after, huge,
                    "{name}: huge bytes after the move {step} (khugepaged collapses meanwhile: {collapsed})"
                );
                Some(())
            };
            engine
                .migrate_pages(&region.folios(), b, Reason::Syscall, Mode::Sync, &MigrateOptions::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            verify(&region, 0x5a, &name);
            check_placement(&format!("{name}#1"), &region, b);
            if huge_after(&format!("to {b}")).is_none() {
                continue;
            }
            let pages: Vec<usize> = (0..region.len() / PAGE_SIZE).map(|p| region.addr() + p * PAGE_SIZE).collect();
            let mut status = vec![0; pages.len()];
            // SAFETY: this thread does not touch the region during the call.
            unsafe { engine.move_pages(&pages, Some(&vec![a as i32; pages.len()]), &mut status) }
                .unwrap_or_else(|e| panic!("{name}: move_pages: {e}"));
            verify(&region, 0x5a, &name);
            check_placement(&format!("{name}#2"), &region, a);
            if huge_after(&format!("to {a}")).is_some() {
                break region;
            }
        };
        assert!(common::vm_flags(region.addr()).iter().any(|f| f == flag), "{name}: the mapping lost its advice");
    }
}

/// Writers put increasing sequence numbers in their own slots, readers check that no slot
/// ever goes back, while the region bounces between the nodes, each move with `opts`. With
/// `stranger`, another thread reads every page of every mapping the process made since the
/// test began (pagemig's graveyards and destinations among them: its faults there are
/// answered with pages of zeros), as a profiler or a conservative collector does.
/// Returns the bytes the event reader answered over all the moves
/// (`MigrateStats::answered_bytes`); `None` without two nodes.
fn bounce_under_load(
    folio_size: usize,
    len: usize,
    moves: usize,
    opts: &MigrateOptions,
    stranger: bool,
) -> Option<u64> {
    const WRITERS: usize = 2;
    const READERS: usize = 2;
    let (a, b) = two_nodes()?;
    let known = known_mappings();
    let stranger_name = if stranger { "-read-by-a-stranger" } else { "" };
    let name = format!("bounce-{}-folios-{}{stranger_name}", size_name(folio_size), size_name(len));
    let region = Region::new(len, folio_size, Some(a)).expect("region on the first node");
    let seed = 0xb0_0c3;
    fill(&region, seed);
    // One slot per writer in every 512-byte line: each page holds slots of every writer.
    let stride = 64;
    let slot = |writer: usize, line: usize| line * stride + writer;
    let lines = region.words() / stride;
    for line in 0..lines {
        for w in 0..WRITERS {
            region.word(slot(w, line)).store(0, Ordering::Relaxed);
        }
    }
    let stop = AtomicBool::new(false);
    let start = Barrier::new(WRITERS + READERS + 1);
    let rounds: Vec<AtomicU64> = (0..WRITERS).map(|_| AtomicU64::new(0)).collect();
    let reads = AtomicU64::new(0);
    let scanned = AtomicU64::new(0);
    let answered = AtomicU64::new(0);
    let region = &region;
    let last_written: Vec<Vec<u64>> = std::thread::scope(|s| {
        if stranger {
            let (stop, known, scanned) = (&stop, &known, &scanned);
            let skip = (region.addr(), region.addr() + region.len());
            s.spawn(move || scanned.store(scan(known, skip, stop), Ordering::Relaxed));
        }
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (stop, start, rounds) = (&stop, &start, &rounds);
                s.spawn(move || {
                    let mut last = vec![0u64; lines];
                    let mut seq = 0u64;
                    start.wait();
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        for (line, l) in last.iter_mut().enumerate() {
                            let word = region.word(slot(w, line));
                            word.store(seq, Ordering::Release);
                            assert_eq!(word.load(Ordering::Acquire), seq, "writer {w} lost its write");
                            *l = seq;
                        }
                        rounds[w].store(seq, Ordering::Relaxed);
                    }
                    last
                })
            })
            .collect();
        for _ in 0..READERS {
            let (stop, start, reads) = (&stop, &start, &reads);
            s.spawn(move || {
                let mut seen = vec![0u64; lines * WRITERS];
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    for line in 0..lines {
                        for w in 0..WRITERS {
                            let v = region.word(slot(w, line)).load(Ordering::Acquire);
                            let prev = &mut seen[line * WRITERS + w];
                            assert!(v >= *prev, "slot of writer {w} in line {line} went back from {prev} to {v}");
                            *prev = v;
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Whatever happens below, the readers and writers stop: a panic here must fail
        // the test, not leave the scope waiting for them forever.
        let _stop = StopOnDrop(&stop);
        start.wait();
        let engine = Engine::global().expect("userfaultfd");
        for i in 0..moves {
            // Every writer finishes a round between two moves, so that writes keep
            // landing on pages while they migrate.
            let before: Vec<u64> = rounds.iter().map(|r| r.load(Ordering::Relaxed)).collect();
            let waiting = Instant::now();
            while rounds.iter().zip(&before).any(|(r, &b)| r.load(Ordering::Relaxed) <= b) {
                if writers.iter().any(|h| h.is_finished()) {
                    break; // It panicked: joining it below reports why.
                }
                assert!(waiting.elapsed() < Duration::from_secs(60), "{name}: a writer made no progress for 60 s");
                std::thread::yield_now();
            }
            let node = if i % 2 == 0 { b } else { a };
            let stats = engine
                .migrate_pages(&region.folios(), node, Reason::Syscall, Mode::Sync, opts)
                .unwrap_or_else(|e| panic!("{name}: move {i} to node {node}: {e}"));
            assert_eq!(stats.succeeded_folios, region.folios().len() as u64, "{name}: move {i}: {stats:?}");
            answered.fetch_add(stats.answered_bytes, Ordering::Relaxed);
            check_placement_with(&format!("{name}#{}", i + 1), region, node, &|| format!("{stats:?}"));
        }
        stop.store(true, Ordering::Relaxed);
        writers.into_iter().map(|h| h.join().expect("writer panicked")).collect()
    });
    // Zero lost writes: every slot holds its writer's last value.
    let mut lost = 0;
    for (w, last) in last_written.iter().enumerate() {
        for (line, &v) in last.iter().enumerate() {
            if region.word(slot(w, line)).load(Ordering::Relaxed) != v {
                lost += 1;
            }
        }
    }
    let write_rounds: u64 = rounds.iter().map(|r| r.load(Ordering::Relaxed)).sum();
    let scanned = scanned.load(Ordering::Relaxed);
    println!(
        "{name}: {moves} moves, {write_rounds} write rounds, {} read rounds, {scanned} pages read by the stranger",
        reads.load(Ordering::Relaxed)
    );
    assert!(!stranger || scanned > 0, "{name}: the stranger read nothing");
    assert_eq!(lost, 0, "{name}: {lost} slots lost their last write");
    let untouched = (0..region.words()).filter(|i| i % stride >= WRITERS);
    let bad = untouched.filter(|&i| region.word(i).load(Ordering::Relaxed) != pattern(seed, i)).count();
    assert_eq!(bad, 0, "{name}: {bad} words outside the slots changed");
    Some(answered.load(Ordering::Relaxed))
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn bounce_4k_folios_while_threads_read_and_write() {
    bounce_under_load(4 * KIB, 4 * MIB, 12, &MigrateOptions::default(), false);
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn bounce_2m_folios_while_threads_read_and_write() {
    bounce_under_load(HPAGE_SIZE, 8 * MIB, 12, &MigrateOptions::default(), false);
}

/// The same with one batch per move and the smallest piece budget (`migrate/piece_budget_us`):
/// each batch's pipelined copy is cut into pieces of 512 KiB (4 KiB folios) or one folio
/// (2 MiB), each isolated, copied and moved across the nodes while the threads write.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn bounce_in_small_pieces_while_threads_read_and_write() {
    let opts = MigrateOptions::default().max_batch_pages(8192).piece_budget_us(50);
    bounce_under_load(4 * KIB, 4 * MIB, 6, &opts, false);
    bounce_under_load(HPAGE_SIZE, 8 * MIB, 6, &opts, false);
}

/// The same with every move held 20 ms (each piece stays isolated that long): the threads'
/// faults on isolated base pages are answered by the event reader, which copies the pages
/// in on the node they are sent to (`migrate/answer_faults`). Some bytes are answered, and
/// every page, answered or moved, is on that node, with no write lost. Huge pages are not
/// answered.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn bounce_with_answered_faults_while_threads_read_and_write() {
    let opts = MigrateOptions::default()
        .max_batch_pages(512)
        .answer_faults(true)
        .fault(FaultInjection { delay_move: Some(Duration::from_millis(20)), ..Default::default() });
    let Some(answered) = bounce_under_load(4 * KIB, 4 * MIB, 4, &opts, false) else { return };
    assert!(answered > 0, "4 KiB folios: nothing answered");
    assert_eq!(bounce_under_load(HPAGE_SIZE, 8 * MIB, 2, &opts, false), Some(0), "2 MiB folios: answered");
}

/// The same with the pre-copy (`migrate/precopy`): each piece is read while the threads
/// write it, then protected, and only what differs is copied again before it crosses the
/// nodes.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn bounce_with_the_precopy_while_threads_read_and_write() {
    let opts = MigrateOptions::default().max_batch_pages(8192).precopy(true);
    bounce_under_load(4 * KIB, 4 * MIB, 6, &opts, false);
    bounce_under_load(HPAGE_SIZE, 8 * MIB, 6, &opts, false);
}

/// The same while a stranger reads every mapping the process made (see `bounce_under_load`):
/// no move fails, no byte or write is lost, every page is on the node it was sent to.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn bounce_while_a_stranger_reads_every_mapping() {
    bounce_under_load(4 * KIB, 4 * MIB, 6, &MigrateOptions::default(), true);
    bounce_under_load(HPAGE_SIZE, 8 * MIB, 6, &MigrateOptions::default(), true);
}

/// Moves across the nodes held 60 ms each, while a stranger pins every fresh mapping (and
/// the filled parts of pagemig's destination pool) for 250 ms, as io_uring's fixed buffers
/// do. With failures injected (the runs of every third folio), the failing folios' old
/// pages, pinned in their graveyard, go back to the node they were on; without, every folio
/// moves to the other node, a pinned destination copied in instead of moved. Every word is
/// as it was.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn moves_across_nodes_while_a_stranger_pins_pagemig_memory() {
    let Some((a, b)) = two_nodes() else { return };
    if !can_pin() {
        println!("io_uring cannot pin pages here: nothing to test");
        return;
    }
    for (folio_size, inject) in [(4 * KIB, true), (4 * KIB, false), (HPAGE_SIZE, true), (HPAGE_SIZE, false)] {
        let known = known_mappings();
        let name = format!("pinned-{}-folios-{}", size_name(folio_size), if inject { "failing" } else { "moving" });
        let region = Region::new(8 * MIB, folio_size, Some(a)).expect("region on the first node");
        let seed = 0x91 + folio_size as u64;
        fill(&region, seed);
        let folios = region.folios();
        let stop = AtomicBool::new(false);
        let skip = (region.addr(), region.addr() + region.len());
        let (result, pinned) = std::thread::scope(|s| {
            let stranger = s.spawn(|| pin_fresh(&known, skip, Duration::from_millis(250), &stop));
            let _stop = StopOnDrop(&stop);
            // Let the stranger take in what the process mapped before the call.
            std::thread::sleep(Duration::from_millis(50));
            let fault = FaultInjection {
                fail_move: if inject { (0..folios.len()).step_by(3).collect() } else { Vec::new() },
                delay_move: Some(Duration::from_millis(60)),
                ..Default::default()
            };
            let opts = MigrateOptions::default().fault(fault).max_batch_pages(512);
            let result = Engine::global().unwrap().migrate_pages(&folios, b, Reason::Syscall, Mode::Sync, &opts);
            stop.store(true, Ordering::Relaxed);
            (result, stranger.join().unwrap())
        });
        let failures = match &result {
            Err(Error::Partial { stats, .. }) if inject => stats.failures.clone(),
            Ok(stats) if inject => panic!("{name}: the injected failures did not fail ({stats:?})"),
            Ok(_) => Vec::new(),
            Err(e) => panic!("{name}: {e}"),
        };
        verify(&region, seed, &format!("{name} after the move"));
        assert!(pinned > 0, "{name}: the stranger pinned nothing");
        let failed: BTreeMap<usize, i32> = failures.iter().map(|f| (f.addr, f.errno)).collect();
        for errno in failed.values() {
            assert_eq!(Errno::from_raw_os_error(*errno), Errno::IO, "{name}: errno {errno}");
        }
        let nodes = numa::page_nodes(region.addr(), region.len()).expect("move_pages status query");
        for (i, node) in nodes.iter().enumerate() {
            let folio = region.addr() + i * PAGE_SIZE / folio_size * folio_size;
            let want = if failed.contains_key(&folio) { a } else { b };
            assert_eq!(*node, want as i32, "{name}: page {i} (folio {folio:#x}, failed: {:?})", failed.get(&folio));
        }
        println!(
            "{name}: {} of {} pages on node {b}; {} folios failed and stayed on node {a}; {pinned} mappings pinned",
            nodes.iter().filter(|&&n| n == b as i32).count(),
            nodes.len(),
            failed.len()
        );
        let (addr, len) = (region.addr(), region.len());
        common::assert_writable(common::leak(region));
        // Unmapped, not left mapped: a later test's region made right beside it would merge
        // with it, and its numa_maps counts could not be told apart.
        // SAFETY: the region, leaked above and used no more.
        unsafe { libc::munmap(addr as *mut _, len) };
    }
}

/// A signal handler of the program's stores into memory while the thread it runs on moves
/// that memory between the nodes, a signal every 100 µs through 16 moves (see
/// `common::signal_stores`): the handler runs only between calls, every store of its stays,
/// every other byte is as written, and the pages end on the node of the last move. (A
/// handler run mid-call would wait for good on a folio its own thread isolates.) The
/// handler is the process's: `vm/run` runs these tests one at a time.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn a_signal_handler_stores_into_memory_its_thread_moves_across_nodes() {
    let Some((a, b)) = two_nodes() else { return };
    let what = "signal-handler-stores-across-nodes";
    let seed = 0x7369_676e;
    let region: &'static Region = Box::leak(Box::new(Region::new(16 * MIB, 4 * KIB, Some(a)).expect("region")));
    pagemig::workload::fill(region, seed);
    let engine = Engine::global().expect("engine");
    let outcome = common::watchdog(Duration::from_secs(120), what, move || {
        common::signal_stores::migrate_under_storing_signals(engine, region, seed, &[b, a])
    });
    match outcome {
        Ok(done) => println!("{what}: {done}"),
        Err(failures) => panic!("{what}: {failures:?}"),
    }
    check_placement(what, region, a);
}

/// The program moves memory (`mremap`, twice) whose old pages a migration across the nodes
/// holds isolated: the old pages go home to where the memory is by then, straight from their
/// graveyards or through the event reader's holdings, and stay on the node they were on, as
/// memory the kernel did not migrate stays; every word is where the program put it.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn memory_moved_while_it_migrates_stays_on_its_node() {
    use common::changes;
    const LEN: usize = 8 * MIB;
    const MOVED: usize = 2 * MIB;
    const SEED: u64 = 0x686f_6d65;
    let Some((a, b)) = two_nodes() else { return };
    let mut went_home = [0usize; 2];
    for holdings in [false, true, false, true] {
        let what = format!("memory-moved-while-it-migrates{}", if holdings { "-through-holdings" } else { "" });
        // The reservations first: a mapping right above an inaccessible one looks like a
        // thread stack, which pagemig leaves to the kernel.
        let (reserved1, spare1) = changes::spare();
        let (reserved2, spare2) = changes::spare();
        let base = changes::mapping(LEN, 4 * KIB, SEED);
        let firsts: Vec<usize> = (base..base + LEN).step_by(PAGE_SIZE).collect();
        let mut st = vec![0; firsts.len()];
        sys::move_pages(&firsts, Some(&vec![a as i32; firsts.len()]), &mut st).expect("move_pages to a");
        assert!(st.iter().all(|&s| s == a as i32), "{what}: setting up on node {a}");
        let opts = MigrateOptions::default()
            .fault(FaultInjection {
                delay_move: Some(Duration::from_millis(400)),
                home_through_holdings: holdings,
                ..Default::default()
            })
            .max_batch_pages(256);
        let result = common::watchdog(Duration::from_secs(120), &what.clone(), move || {
            std::thread::scope(|s| {
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(30));
                    for (from, to) in [(base, spare1), (spare1, spare2)] {
                        changes::apply(changes::Change::Mremap, from, MOVED, to);
                    }
                });
                let before = Engine::global().unwrap().pages_stats().moved;
                // SAFETY: this thread does not touch the range during the call; the other
                // one moves a part of it, which pagemig must survive.
                let outcome = unsafe { Engine::global().unwrap().move_range(base, LEN, b, &opts) };
                (outcome, Engine::global().unwrap().pages_stats().moved - before)
            })
        });
        let (outcome, moved_by_pagemig) = result;
        let outcome = outcome.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(moved_by_pagemig > 0, "{what}: pagemig moved no page itself (all went to the kernel)");
        // Every word where the program put it: the moved part at its last place.
        let bad = (0..LEN / 8)
            .filter(|&i| {
                let at = if i * 8 < MOVED { spare2 + i * 8 } else { base + i * 8 };
                changes::word(at) != pagemig::workload::pattern_word(SEED, i)
            })
            .count();
        assert_eq!(bad, 0, "{what}: {bad} words not where the program put them");
        // The moved memory's pages that the call did not migrate (before the program moved
        // them) are on the node they were on; those it did, on the target.
        let moved = numa::page_nodes(spare2, MOVED).expect("query");
        let migrated = outcome.status[..MOVED / PAGE_SIZE].iter().filter(|&&s| s == b as i32).count();
        let off: Vec<(usize, i32, i32)> = moved
            .iter()
            .zip(&outcome.status)
            .enumerate()
            .filter(|&(_, (&n, &s))| n != if s == b as i32 { b as i32 } else { a as i32 })
            .map(|(p, (&n, &s))| (p, s, n))
            .collect();
        assert!(
            off.is_empty(),
            "{what}: pages of the moved memory on the wrong node (page, status, node): {:?}",
            &off[..off.len().min(8)]
        );
        // The rest migrated.
        if migrated == 0 {
            went_home[usize::from(holdings)] += 1;
        }
        let rest = numa::page_nodes(base + MOVED, LEN - MOVED).expect("query");
        let on_b = rest.iter().filter(|&&n| n == b as i32).count();
        assert_eq!(on_b, rest.len(), "{what}: pages of the rest on node {b}");
        println!(
            "{what}: of the {} pages the program moved, {migrated} migrated before and the others on node {a}; {on_b} of the rest on node {b}",
            moved.len()
        );
        // SAFETY: the test's own mappings, no longer used: `changes::mapping` keeps exactly
        // `LEN` bytes, and the first MOVED of them the program moved away (another thread's
        // mapping may lie there now).
        unsafe {
            libc::munmap((base + MOVED) as *mut _, LEN - MOVED);
            libc::munmap(spare2 as *mut _, MOVED);
            libc::munmap(reserved2 as *mut _, changes::SPARE);
        }
        // Not the hole the moved part left at `spare1` on its way.
        changes::release_reservation_around(reserved1, spare1, MOVED);
    }
    // The program's move met isolated pages in each mode at least once (pages the call
    // had not migrated yet, put home by the event reader).
    assert!(went_home.iter().all(|&n| n > 0), "rounds whose moved memory went home (direct, holdings): {went_home:?}");
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn full_target_node_fails_cleanly_with_enomem() {
    let Some((a, b)) = two_nodes() else { return };
    // Fill the target node until about 32 MiB is free, well above the kernel's watermarks:
    // a node that runs out for real invokes the OOM killer (a second hog, taken where the
    // node's free memory had grown after the first, once did).
    let keep_free = 32 * MIB;
    let free = numa::meminfo(b).expect("node meminfo").1 as usize;
    let hog_len = free.saturating_sub(keep_free) / HPAGE_SIZE * HPAGE_SIZE;
    // Bound to the node by a policy of its own (`mbind`, strict), populated after.
    let hog = sys::Mapping::new(hog_len, HPAGE_SIZE).expect("mapping the hog");
    sys::mbind(hog.addr(), hog_len, b, false).expect("mbind");
    sys::madvise(hog.addr(), hog_len, sys::Advice::HugePage).expect("madvise");
    sys::madvise(hog.addr(), hog_len, sys::Advice::PopulateWrite).expect("filling the target node");
    // The region is made larger than what is left (the node's free memory moves: earlier
    // tests' pages come back to it), 64 MiB at least.
    let left = numa::meminfo(b).expect("node meminfo").1 as usize;
    let len = (left + 16 * MIB).next_multiple_of(HPAGE_SIZE).max(64 * MIB);
    let region = Region::new(len, HPAGE_SIZE, Some(a)).expect("region on the first node");
    let seed = 0xf0_11;
    fill(&region, seed);
    println!("node {b}: {} MiB free after taking {} MiB; migrating {} MiB", left >> 20, hog_len >> 20, len >> 20);
    let err = migrate::migrate_pages(&region.folios(), b, Reason::Syscall, Mode::Sync)
        .expect_err("migrating more than the target node has free");
    println!("error: {err}");
    assert_eq!(err.errno(), Errno::NOMEM, "{err}");
    assert!(!matches!(err, Error::Partial { .. }), "nothing may have moved: {err}");
    verify(&region, seed, "source after the refused migration");
    check_placement("enomem-2MiB-folios-64MiB@source", &region, a);
    drop(hog);
    // Once there is room, the same region moves.
    migrate::migrate_pages(&region.folios(), b, Reason::Syscall, Mode::Sync).expect("migrating with room");
    verify(&region, seed, "region after the migration with room");
    check_placement("enomem-2MiB-folios-64MiB#retry", &region, b);
}

/// `pagemig move --migrator kernel --from-node A --to-node B`, as the command runs it:
/// the kernel's `move_pages(2)` of a filled region while writers write, with every byte,
/// write and page checked.
fn kernel_migrator(folio_size: usize, len: usize, writers: usize) {
    let Some((a, b)) = two_nodes() else { return };
    let cfg = pagemig_cli::experiment::MoveConfig {
        size: len,
        folio_size,
        from_node: Some(a),
        to_node: b,
        to_nodes: Vec::new(),
        batch_pages: migrate::DEFAULT_MAX_BATCH_PAGES,
        reason: Reason::Syscall,
        mode: Mode::Sync,
        writers,
        seed: 0x6b65_726e,
        measure_memcpy: true,
        reserve: None,
    };
    let report = pagemig_cli::experiment::run_kernel_move(&cfg, None).expect("the kernel's migration");
    let name = format!("kernel-move_pages-{}-folios-{}", size_name(folio_size), size_name(len));
    let total = len / PAGE_SIZE;
    let on_target = report.placement.get(&(b as i32)).copied().unwrap_or(0);
    println!("placement: {name} node {b} pages {on_target}/{total}");
    println!(
        "{name}: {} writes, move_pages outcomes other than node {b}: {:?}, {} calls",
        report.writes, report.page_errors, report.stats.batches
    );
    assert_eq!(report.migrator, "kernel");
    assert!(report.page_errors.is_empty(), "{name}: {:?}", report.page_errors);
    assert_eq!((report.failed_folios, report.succeeded_folios), (0, (len / folio_size) as u64), "{name}");
    assert_eq!((report.mismatched_bytes, report.lost_writes), (0, 0), "{name}");
    assert!(report.placement_ok, "{name}: pages per node {:?}", report.placement);
    assert!(report.ok() && report.gbps > 0.0 && report.critical_path_gbps.is_none(), "{name}");
    assert!(report.uffdio_copy_gbps > 0.0, "{name}: the UFFDIO_COPY yardstick on node {b}");
    // Refused the other way round on one node, as on a one-node machine.
    let same = pagemig_cli::experiment::MoveConfig { from_node: Some(b), ..cfg };
    let err = pagemig_cli::experiment::run_kernel_move(&same, None).expect_err("node to itself");
    assert!(err.to_string().contains("copies nothing"), "{err}");
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn kernel_migrator_moves_64mib_of_2m_folios() {
    kernel_migrator(HPAGE_SIZE, 64 * MIB, 0);
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn kernel_migrator_moves_4k_folios_while_threads_write() {
    kernel_migrator(4 * KIB, 16 * MIB, 2);
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn bench_throughput_has_a_kernel_row() {
    let Some((a, b)) = two_nodes() else { return };
    let engine = Engine::global().expect("the migration engine");
    let mut cfg = pagemig_cli::report::BenchConfig::quick(a, a);
    assert_eq!(cfg.kernel_nodes, Some([a, b]));
    cfg.size = 4 * MIB;
    cfg.reps = 1;
    cfg.folio_sizes = vec![4 * KIB, HPAGE_SIZE];
    cfg.mtcopy_threads = Vec::new();
    cfg.dcbm_channels = Vec::new();
    cfg.experiments = pagemig_cli::report::Experiments { throughput: true, sweep: false, scattered: false };
    let report = pagemig_cli::report::run(engine, &cfg, &|_| {}).expect("bench run");
    let t = report.throughput.as_ref().expect("the throughput experiment");
    let names: Vec<&str> = t.rows.iter().map(|r| r.migrator.name()).collect();
    assert_eq!(names, ["cpu", "cpu_reserved", "kernel", "memcpy", "uffdio_copy"]);
    assert_eq!((t.kernel_nodes, t.kernel_absent_reason.as_deref()), (Some([a, b]), None));
    for (row, name) in t.rows.iter().zip(names) {
        for (cell, folio) in row.cells.iter().zip(&cfg.folio_sizes) {
            assert!(cell.ok && cell.gbps.is_some_and(|g| g.mean > 0.0), "{name} {folio}: {cell:?}");
            for m in &cell.measurements {
                println!("bench: {name} {} folios: {:.3} GB/s end to end", size_name(*folio), m.gbps);
            }
        }
    }
    let tables = pagemig_cli::report::table::tables(&report);
    assert!(tables[0].rows.iter().any(|r| r[0].text == "kernel move_pages"));
    let note = format!(
        "kernel move_pages: the kernel's own migration of the same region with move_pages(2), node {a} → {b}, "
    );
    assert!(tables[0].notes.iter().any(|n| n.starts_with(&note)), "{:?}", tables[0].notes);
}

/// A layout of pages for `move_pages` conformance: base pages, pages of huge pages (one
/// address per huge page), never-touched pages, an unmapped address, a shared file page.
struct PageMix {
    base: Region,
    huge: Region,
    addrs: Vec<usize>,
    _file: std::fs::File,
}

fn page_mix(node: u32, seed: u64) -> PageMix {
    let base = Region::new(64 * PAGE_SIZE, PAGE_SIZE, Some(node)).expect("base pages");
    fill(&base, seed);
    let huge = Region::new(2 * HPAGE_SIZE, HPAGE_SIZE, Some(node)).expect("huge pages");
    fill(&huge, seed + 1);
    let untouched = sys::mmap_anon(4 * PAGE_SIZE).expect("mmap");
    let (file, shared) = common::shared_file_pages(2);
    let addrs = vec![
        base.addr(),
        base.addr() + 5 * PAGE_SIZE + 123,
        base.addr() + 63 * PAGE_SIZE,
        huge.addr(),
        huge.addr() + HPAGE_SIZE + 7 * PAGE_SIZE,
        untouched + PAGE_SIZE,
        0x1000,
        shared,
        shared + PAGE_SIZE,
    ];
    PageMix { base, huge, addrs, _file: file }
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn move_pages_matches_the_kernel_across_nodes() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "move_pages_matches_the_kernel_across_nodes");
    let Some((a, b)) = two_nodes() else { return };
    let ours = page_mix(a, 21);
    let theirs = page_mix(a, 21);
    let nodes = vec![b as i32; ours.addrs.len()];
    let engine = Engine::global().expect("the migration engine");
    let mut s_ours = vec![i32::MIN; ours.addrs.len()];
    // SAFETY: this thread does not touch the pages during the call.
    let left = unsafe { engine.move_pages(&ours.addrs, Some(&nodes), &mut s_ours) }.expect("pagemig move_pages");
    let mut s_kernel = vec![i32::MIN; theirs.addrs.len()];
    sys::move_pages(&theirs.addrs, Some(&nodes), &mut s_kernel).expect("move_pages");
    println!("move_pages statuses: pagemig {s_ours:?}, kernel {s_kernel:?}, {left} pages not on node {b}");
    assert_eq!(s_ours, s_kernel, "pagemig against the kernel");
    assert_eq!(left, 0, "every page that could move moved");
    // The named pages are on node b, with their data; each huge page moved whole.
    verify(&ours.base, 21, "base pages after move_pages");
    verify(&ours.huge, 22, "huge pages after move_pages");
    let on_b = numa::page_nodes(ours.huge.addr(), ours.huge.len()).unwrap().iter().filter(|&&n| n == b as i32).count();
    println!("placement: move_pages-huge node {b} pages {on_b}/{}", ours.huge.len() / PAGE_SIZE);
    assert_eq!(on_b, ours.huge.len() / PAGE_SIZE, "every page of the named huge pages moved");
    // Back again: pages already home are left alone, the others come back.
    let back = vec![a as i32; ours.addrs.len()];
    // SAFETY: as above.
    unsafe { engine.move_pages(&ours.addrs, Some(&back), &mut s_ours) }.expect("pagemig move_pages back");
    sys::move_pages(&theirs.addrs, Some(&back), &mut s_kernel).expect("move_pages back");
    assert_eq!(s_ours, s_kernel, "pagemig against the kernel, back");
}

/// A thread of the program closes every descriptor while another migrates 32 MiB of base
/// pages across the nodes and a third writes into them (the host's
/// `descriptors::closing_or_replacing_every_descriptor_during_a_migration_loses_no_write`
/// across nodes): the call goes on with its userfaultfds taken back from pagemig's vault;
/// every byte and write stands and every page lands on the node asked. In forked children
/// (closing descriptors is process-wide), the blow at several moments of the call.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn closing_every_descriptor_during_a_cross_node_migration_loses_no_write() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "closing_every_descriptor_during_a_cross_node_migration_loses_no_write",
    );
    let Some((a, b)) = two_nodes() else { return };
    for us in [0u64, 500, 1000, 2000, 3000, 4000, 8000, 12000] {
        let child = || {
            let Ok(engine) = Engine::global() else { return 64 };
            let region = Region::new(32 * MIB, 4 * KIB, Some(a)).expect("region");
            pagemig::workload::fill(&region, 99);
            let (result, log) = pagemig::workload::with_writers(&region, 1, || {
                std::thread::scope(|s| {
                    s.spawn(|| {
                        std::thread::sleep(Duration::from_micros(us));
                        // SAFETY: closes every descriptor from 3 up, as a daemon's thread
                        // might; nothing of this child's uses them but pagemig.
                        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
                    });
                    engine.migrate_pages(&region.folios(), b, Reason::Syscall, Mode::Sync, &MigrateOptions::default())
                })
            });
            let report = pagemig::workload::verify(&region, 99, &log);
            let on_b = numa::page_nodes(region.addr(), region.len())
                .map_or(0, |s| s.iter().filter(|&&n| n == b as i32).count());
            let total = region.len() / PAGE_SIZE;
            println!("placement: closed-after-{us}us node {b} pages {on_b}/{total}");
            let whole = result.as_ref().is_ok_and(|s| s.succeeded_folios == s.folios);
            if !whole || !report.ok() {
                println!("closed after {us} us: {result:?}; {report:?}");
            }
            i32::from(!report.ok()) | i32::from(!whole) << 1 | i32::from(on_b != total) << 2
        };
        // SAFETY: the child opens its own engine and uses only its own threads.
        let code = unsafe { common::fork_and_wait(Duration::from_secs(120), child) };
        assert_eq!(code, 0, "{us} us into the call: 1 bytes or writes lost, 2 folios not moved, 4 pages misplaced");
    }
}

/// Marks the kernel's migration carries over to the new page: a write-protection the
/// program put on through a userfaultfd of its own, and a soft-dirty bit it cleared
/// (`/proc/self/clear_refs`, as a checkpointer tracking writes does) on a page not written
/// since. pagemig leaves such pages to the kernel (a page it moves in has no protection and
/// is soft-dirty); the marks, statuses and nodes are the kernel's for a twin layout.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn move_pages_keeps_the_programs_write_protection_and_clean_pages_clean() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "move_pages_keeps_the_programs_write_protection_and_clean_pages_clean",
    );
    let Some((a, b)) = two_nodes() else { return };
    const PAGES: usize = 8;
    let ours = Region::new(PAGES * PAGE_SIZE, PAGE_SIZE, Some(a)).expect("region");
    let theirs = Region::new(PAGES * PAGE_SIZE, PAGE_SIZE, Some(a)).expect("region");
    fill(&ours, 41);
    fill(&theirs, 41);
    // The program's own userfaultfd protects the first two pages of each.
    let program = sys::uffd::Uffd::open().expect("the program's userfaultfd");
    for r in [&ours, &theirs] {
        program.register_missing_wp(r.addr(), 2 * PAGE_SIZE).expect("register");
        program.writeprotect(r.addr(), 2 * PAGE_SIZE, true).expect("protect");
    }
    // Every soft-dirty bit of the process cleared, then page 3 of each written again.
    std::fs::write("/proc/self/clear_refs", "4").expect("clear_refs");
    for r in [&ours, &theirs] {
        let w = 3 * PAGE_SIZE / 8;
        r.word(w).store(r.word(w).load(Ordering::Relaxed), Ordering::Relaxed);
    }
    let addrs = |r: &Region| (0..PAGES).map(|i| r.addr() + i * PAGE_SIZE).collect::<Vec<_>>();
    let nodes = vec![b as i32; PAGES];
    let engine = Engine::global().expect("the migration engine");
    let mut s_ours = vec![i32::MIN; PAGES];
    // SAFETY: this thread does not touch the pages during the call.
    let left = unsafe { engine.move_pages(&addrs(&ours), Some(&nodes), &mut s_ours) }.expect("pagemig move_pages");
    let mut s_kernel = vec![i32::MIN; PAGES];
    sys::move_pages(&addrs(&theirs), Some(&nodes), &mut s_kernel).expect("move_pages");
    let marks = |r: &Region| -> Vec<(bool, bool)> {
        sys::page_marks(&addrs(r)).unwrap().iter().map(|m| (m.uffd_wp, m.soft_dirty)).collect()
    };
    let (m_ours, m_kernel) = (marks(&ours), marks(&theirs));
    println!("marks (write-protected, soft-dirty): pagemig {m_ours:?}, kernel {m_kernel:?}");
    println!("statuses: pagemig {s_ours:?}, kernel {s_kernel:?}, {left} not moved");
    assert_eq!(s_ours, s_kernel, "statuses against the kernel");
    assert_eq!(m_ours, m_kernel, "marks against the kernel");
    assert!(m_kernel[0].0 && !m_kernel[2].1 && m_kernel[3].1, "the layout is as meant: {m_kernel:?}");
    let at = numa::page_nodes(ours.addr(), ours.len()).unwrap();
    println!("placement: marked-pages node {b} pages {}/{PAGES}", at.iter().filter(|&&n| n == b as i32).count());
    assert_eq!(at, numa::page_nodes(theirs.addr(), theirs.len()).unwrap(), "nodes against the kernel");
    drop(program);
    verify(&ours, 41, "pages with marks after move_pages");
}

/// `move_pages` with pages named more than once, as programs name them: every 4 KiB page
/// of a huge page, a page named twice in a row (a stride under a page), a huge page named
/// again after another page, and pages named for both nodes in turn. pagemig answers
/// exactly as the kernel does for the same layout (`-EBUSY` for a folio named while still
/// queued, the last node named keeping a page named for two), and leaves each page where
/// the kernel leaves its twin.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn move_pages_matches_the_kernel_for_pages_named_more_than_once() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "move_pages_matches_the_kernel_for_pages_named_more_than_once");
    let Some((a, b)) = two_nodes() else { return };
    let layout = |seed: u64| {
        let huge = Region::new(3 * HPAGE_SIZE, HPAGE_SIZE, Some(a)).expect("huge pages");
        fill(&huge, seed);
        let base = Region::new(8 * PAGE_SIZE, PAGE_SIZE, Some(a)).expect("base pages");
        fill(&base, seed + 1);
        let (h, p) = (|k: usize| huge.addr() + k, |k: usize| base.addr() + k * PAGE_SIZE);
        let (ai, bi) = (a as i32, b as i32);
        let named = vec![
            // Every page of a huge page, in order.
            (h(0), bi),
            (h(PAGE_SIZE), bi),
            (h(2 * PAGE_SIZE), bi),
            (h(3 * PAGE_SIZE), bi),
            // A page twice in a row, then another.
            (p(0), bi),
            (p(0) + 2048, bi),
            (p(1), bi),
            // A huge page, another page, the huge page again.
            (h(HPAGE_SIZE), bi),
            (p(2), bi),
            (h(HPAGE_SIZE + 5 * PAGE_SIZE), bi),
            // A page for b, then for a; one for a (where it is), then for b.
            (p(3), bi),
            (p(3), ai),
            (p(4), ai),
            (p(4), bi),
            // A huge page for both nodes in turn.
            (h(2 * HPAGE_SIZE), bi),
            (h(2 * HPAGE_SIZE + PAGE_SIZE), ai),
        ];
        (huge, base, named)
    };
    let (our_huge, our_base, ours) = layout(41);
    let (their_huge, _their_base, theirs) = layout(41);
    // The huge pages are huge pages, in both layouts.
    for r in [&our_huge, &their_huge] {
        let huge = sys::huge_ranges(r.addr(), r.addr() + r.len()).expect("PAGEMAP_SCAN");
        assert_eq!(huge.iter().map(|(s, e)| e - s).sum::<usize>(), r.len(), "transparent huge pages: {huge:x?}");
    }
    let nodes: Vec<i32> = ours.iter().map(|&(_, n)| n).collect();
    let our_pages: Vec<usize> = ours.iter().map(|&(p, _)| p).collect();
    let their_pages: Vec<usize> = theirs.iter().map(|&(p, _)| p).collect();
    let engine = Engine::global().expect("the migration engine");
    let mut s_ours = vec![i32::MIN; ours.len()];
    let ptrs: Vec<*mut libc::c_void> = our_pages.iter().map(|&a| a as *mut libc::c_void).collect();
    // SAFETY: this thread does not touch the pages during the call; the arrays hold
    // `ptrs.len()` entries each.
    let (answer, route) = unsafe {
        pagemig::ffi::move_pages(
            ptrs.len() as libc::c_ulong,
            ptrs.as_ptr(),
            nodes.as_ptr(),
            s_ours.as_mut_ptr(),
            pagemig::ffi::MPOL_MF_MOVE,
        )
    };
    assert_eq!(route, pagemig::ffi::Route::Pagemig, "served by pagemig");
    let left = answer.expect("pagemig's move_pages") as usize;
    let mut s_kernel = vec![i32::MIN; theirs.len()];
    let their_left = sys::move_pages_counted(&their_pages, Some(&nodes), &mut s_kernel).expect("move_pages");
    println!("named more than once: pagemig {s_ours:?} ({left} not moved), kernel {s_kernel:?} ({their_left})");
    assert_eq!(s_ours, s_kernel, "pagemig against the kernel");
    assert_eq!(left, their_left, "pages not moved");
    let (mut now_ours, mut now_theirs) = (vec![0; ours.len()], vec![0; theirs.len()]);
    sys::move_pages(&our_pages, None, &mut now_ours).expect("query");
    sys::move_pages(&their_pages, None, &mut now_theirs).expect("query");
    assert_eq!(now_ours, now_theirs, "where the pages are: pagemig against the kernel");
    verify(&our_huge, 41, "huge pages named more than once");
    verify(&our_base, 42, "base pages named more than once");
    // The Rust entry gives every page its own outcome: where it is, no -EBUSY.
    let (_h, _b, again) = layout(41);
    let again_pages: Vec<usize> = again.iter().map(|&(p, _)| p).collect();
    let mut s_rust = vec![i32::MIN; again.len()];
    // SAFETY: as above.
    unsafe { engine.move_pages(&again_pages, Some(&nodes), &mut s_rust) }.expect("pagemig move_pages");
    let mut now = vec![0; again.len()];
    sys::move_pages(&again_pages, None, &mut now).expect("query");
    // (The pages named for two nodes, the last six, are the kernel's answers.)
    assert_eq!(s_rust[..10], now[..10], "the Rust entry: each page where it is");
}

/// `move_pages` over pages one of which is pinned (registered with io_uring, as a program
/// pins buffers for I/O): the kernel cannot move that page and returns as soon as the
/// batch holding it is moved, that batch's statuses and every one after unwritten, its
/// count the pages that failed plus the entries never reached. pagemig answers the same
/// (return and every status, the caller's values left where the kernel leaves them), with
/// every byte intact, through the C entry (and so the drop-in); the Rust entry gives every
/// page its own outcome instead.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn move_pages_matches_the_kernel_where_a_page_is_pinned() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "move_pages_matches_the_kernel_where_a_page_is_pinned");
    const SENTINEL: i32 = -99;
    let Some((a, b)) = two_nodes() else { return };
    let engine = Engine::global().expect("the migration engine");
    // The pinned page, and an address not mapped (an entry the kernel does not queue), at
    // these indexes of the eight entries.
    for (pinned, hole) in [(2, None), (2, Some(5)), (6, Some(3))] {
        let what = format!("page {pinned} pinned, hole at {hole:?}");
        let layout = |seed: u64| {
            let region = Region::new(8 * PAGE_SIZE, PAGE_SIZE, Some(a)).expect("base pages");
            fill(&region, seed);
            let pin = pin(region.addr() + pinned * PAGE_SIZE, PAGE_SIZE).expect("io_uring to pin a page");
            let addrs: Vec<usize> =
                (0..8).map(|k| if Some(k) == hole { 0x1000 } else { region.addr() + k * PAGE_SIZE }).collect();
            (region, pin, addrs)
        };
        let (ours, _our_pin, our_addrs) = layout(51);
        let (_theirs, _their_pin, their_addrs) = layout(51);
        let nodes = vec![b as i32; 8];
        let mut s_ours = vec![SENTINEL; 8];
        let our_ptrs: Vec<*mut libc::c_void> = our_addrs.iter().map(|&a| a as *mut libc::c_void).collect();
        // SAFETY: this thread does not touch the pages during the call; the arrays are
        // eight entries each, as `count` says.
        let (answer, route) = unsafe {
            pagemig::ffi::move_pages(
                8,
                our_ptrs.as_ptr(),
                nodes.as_ptr(),
                s_ours.as_mut_ptr(),
                pagemig::ffi::MPOL_MF_MOVE,
            )
        };
        assert_eq!(route, pagemig::ffi::Route::Pagemig, "{what}: served by pagemig");
        let left = answer.expect("pagemig's move_pages") as usize;
        // The Rust entry gives every page its outcome: the pinned page where it still is.
        let (mut s_rust, rust_addrs) = (vec![SENTINEL; 8], layout(51));
        // SAFETY: as above.
        let rust_left =
            unsafe { engine.move_pages(&rust_addrs.2, Some(&nodes), &mut s_rust) }.expect("pagemig move_pages");
        let want: Vec<i32> = (0..8)
            .map(|k| {
                if Some(k) == hole {
                    -libc::EFAULT
                } else if k == pinned {
                    a as i32
                } else {
                    b as i32
                }
            })
            .collect();
        assert_eq!((s_rust, rust_left), (want, 1), "{what}: the Rust entry, every page its outcome");
        let mut s_kernel = vec![SENTINEL; 8];
        let their_left = sys::move_pages_counted(&their_addrs, Some(&nodes), &mut s_kernel).expect("move_pages");
        println!("{what}: pagemig {s_ours:?} ({left} not moved), kernel {s_kernel:?} ({their_left})");
        assert_eq!(s_ours, s_kernel, "{what}: pagemig against the kernel");
        assert_eq!(left, their_left, "{what}: pages not moved");
        assert!(left > 0, "{what}: the pinned page moved");
        verify(&ours, 51, &what);
    }
}

/// `move_pages` while another thread of the program frees pages and writes them again
/// (`MADV_DONTNEED`, then a new page on node A, bound there): every page reports what the
/// kernel would — the node it was moved to, or `ENOENT` where it was not there when the call
/// looked — never the node a page the program made again after its move is on. And no
/// write of that thread is lost: each page holds the last generation it wrote there.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn move_pages_reports_where_it_moved_pages_the_program_frees_again() {
    const PAGES: usize = 2048;
    const SEED: u64 = 0x6368_7572;
    const WORDS: usize = PAGE_SIZE / 8;
    fn write_page(region: &Region, p: usize, generation: u64) {
        region.word(p * WORDS).store(generation, Ordering::Relaxed);
        for w in 1..WORDS {
            region.word(p * WORDS + w).store(pattern(SEED, p * WORDS + w), Ordering::Relaxed);
        }
    }
    let Some((a, b)) = two_nodes() else { return };
    let region = std::sync::Arc::new(Region::new(PAGES * PAGE_SIZE, PAGE_SIZE, Some(a)).expect("base pages on node a"));
    (0..PAGES).for_each(|p| write_page(&region, p, 0));
    let addrs: Vec<usize> = (0..PAGES).map(|p| region.addr() + p * PAGE_SIZE).collect();
    let engine = Engine::global().expect("the migration engine");
    let churned_region = region.clone();
    let (status, left, last, churned) =
        common::watchdog(Duration::from_secs(300), "move_pages beside a churn", move || {
            let region = churned_region;
            let (stop, started) = (AtomicBool::new(false), Barrier::new(2));
            let (status, left, last, churned) = std::thread::scope(|s| {
                let churn = s.spawn(|| {
                    // Its new pages on node a, whatever CPU it runs on.
                    let mut binding = sys::PolicyBinding::new();
                    assert!(binding.bind(a), "binding the churning thread to node {a}");
                    let mut last = vec![0u64; PAGES];
                    let (mut generation, mut churned) = (0u64, 0u64);
                    started.wait();
                    while !stop.load(Ordering::Relaxed) {
                        generation += 1;
                        // Every 7th page, from a new start each sweep.
                        for p in ((generation as usize % 7)..PAGES).step_by(7) {
                            // SAFETY: the region is this test's own; its pages are freed and
                            // written again below, which is what the test is about.
                            let r =
                                unsafe { libc::madvise(addrs[p] as *mut libc::c_void, PAGE_SIZE, libc::MADV_DONTNEED) };
                            assert_eq!(r, 0, "MADV_DONTNEED: {}", std::io::Error::last_os_error());
                            write_page(&region, p, generation);
                            last[p] = generation;
                            churned += 1;
                        }
                    }
                    (last, churned)
                });
                started.wait();
                let mut status = vec![i32::MIN; PAGES];
                // SAFETY: this thread does not touch the region during the call; the other one
                // frees and writes it, which pagemig must survive.
                let left = unsafe { engine.move_pages(&addrs, Some(&vec![b as i32; PAGES]), &mut status) };
                stop.store(true, Ordering::Relaxed);
                let (last, churned) = churn.join().expect("the churning thread");
                (status, left, last, churned)
            });
            (status, left, last, churned)
        });
    let left = left.expect("move_pages beside a churn");
    let mut by_status: BTreeMap<i32, usize> = BTreeMap::new();
    for &s in &status {
        *by_status.entry(s).or_default() += 1;
    }
    println!("move_pages beside a churn of {churned} pages: statuses {by_status:?}, {left} not moved");
    for (p, &s) in status.iter().enumerate() {
        assert!(s == b as i32 || s == -libc::ENOENT, "page {p}: status {s} (statuses {by_status:?})");
    }
    assert_eq!(left, 0, "pages that could not move");
    // Every byte: the generation the churn wrote last, and the pattern.
    for (p, &generation) in last.iter().enumerate() {
        assert_eq!(region.word(p * WORDS).load(Ordering::Relaxed), generation, "page {p}: the last generation written");
        for w in 1..WORDS {
            let i = p * WORDS + w;
            assert_eq!(region.word(i).load(Ordering::Relaxed), pattern(SEED, i), "page {p}, word {w}");
        }
    }
}

/// `pagemig move --to-node A,B`: the folios spread round-robin over both nodes while
/// writers write, each page checked against the node its folio was sent to.
fn interleaved(folio_size: usize, len: usize) {
    let Some((a, b)) = two_nodes() else { return };
    let cfg = pagemig_cli::experiment::MoveConfig {
        size: len,
        folio_size,
        from_node: Some(a),
        to_node: a,
        to_nodes: vec![a, b],
        batch_pages: migrate::DEFAULT_MAX_BATCH_PAGES,
        reason: Reason::Syscall,
        mode: Mode::Sync,
        writers: 1,
        seed: 0x696e_746c,
        measure_memcpy: false,
        reserve: None,
    };
    let engine = Engine::global().unwrap();
    let report = pagemig_cli::experiment::run_move(engine, &cfg, None).expect("the interleaved migration");
    let name = format!("interleave-{}-folios-{}", size_name(folio_size), size_name(len));
    let total = len / PAGE_SIZE;
    for node in [a, b] {
        let on = report.placement.get(&(node as i32)).copied().unwrap_or(0);
        println!("placement: {name}-half-{node} node {node} pages {on}/{}", total / 2);
    }
    assert_eq!((report.failed_folios, report.succeeded_folios), (0, (len / folio_size) as u64), "{name}");
    assert_eq!((report.mismatched_bytes, report.lost_writes, report.misplaced_pages), (0, 0, 0), "{name}");
    assert!(report.placement_ok, "{name}: pages per node {:?}", report.placement);
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn interleave_4k_folios_over_both_nodes() {
    interleaved(4 * KIB, 8 * MIB);
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn interleave_2m_folios_over_both_nodes() {
    interleaved(HPAGE_SIZE, 16 * MIB);
}

/// `move_range` over a mapping the program changes meanwhile (`munmap`, `munmap` then a new
/// `mmap`, `mremap`, `mprotect(PROT_READ)`, `MADV_DONTNEED`, `MADV_FREE`, on two folios in
/// the middle, at several moments; every move held back 2 ms): each page outside the
/// change is on the target node with its data and says so, each page of the change reports
/// where it is or why not, and whatever the program did stands (`changes::check`).
fn move_range_while_the_program_changes_it(folio: usize) {
    use common::changes::{self, Change};
    const LEN: usize = 8 * MIB;
    const SEED: u64 = 0x7261_6e67;
    let Some((a, b)) = two_nodes() else { return };
    let engine = Engine::global().expect("the migration engine");
    let (mut outside_on_b, mut outside_total) = (0, 0);
    for change in changes::ALL {
        for delay_ms in [0u64, 2, 10, 40] {
            let what = format!("move_range, {change:?}, folio {}, after {delay_ms} ms", size_name(folio));
            let base = changes::mapping(LEN, folio, SEED);
            // Every folio on node a first (the kernel's move, one address per folio).
            let firsts: Vec<usize> = (base..base + LEN).step_by(folio).collect();
            let mut st = vec![0; firsts.len()];
            sys::move_pages(&firsts, Some(&vec![a as i32; firsts.len()]), &mut st).expect("move_pages to a");
            assert!(st.iter().all(|&s| s == a as i32), "{what}: setting up on node {a}: {st:?}");
            let (reserved, spare) = changes::spare();
            let len = 2 * folio.max(64 * KIB);
            let at = base + LEN / 4;
            let moved_to = AtomicU64::new(0);
            let opts = MigrateOptions::default()
                .fault(FaultInjection { delay_move: Some(Duration::from_millis(2)), ..Default::default() })
                .max_batch_pages(64);
            let outcome = common::watchdog(Duration::from_secs(120), &what.clone(), move || {
                let outcome = std::thread::scope(|s| {
                    s.spawn(|| {
                        std::thread::sleep(Duration::from_millis(delay_ms));
                        moved_to.store(changes::apply(change, at, len, spare) as u64, Ordering::SeqCst);
                    });
                    // SAFETY: this thread does not touch the range during the call; the
                    // other one changes it, which pagemig must survive.
                    unsafe { engine.move_range(base, LEN, b, &opts) }
                });
                // Read once the scope has joined the thread that changes the range: a call
                // shorter than the delay ended before the change was made (read inside the
                // scope, `moved_to` was still 0 then, and the check read address 0).
                (outcome, moved_to.load(Ordering::SeqCst))
            });
            let (outcome, moved_to) = outcome;
            let outcome = outcome.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!((outcome.first_page, outcome.status.len()), (base, LEN / PAGE_SIZE), "{what}");
            // Outside the change: on node b, by the outcome and by a query now.
            let outside: Vec<usize> =
                (0..LEN / PAGE_SIZE).filter(|&p| !(at..at + len).contains(&(base + p * PAGE_SIZE))).collect();
            let addrs: Vec<usize> = outside.iter().map(|&p| base + p * PAGE_SIZE).collect();
            let mut now = vec![0; addrs.len()];
            sys::move_pages(&addrs, None, &mut now).expect("query");
            for (k, &p) in outside.iter().enumerate() {
                let s = outcome.status[p];
                assert_eq!(s, b as i32, "{what}: page {p} outside the change: status");
                assert_eq!(now[k], b as i32, "{what}: page {p} outside the change is on {}", now[k]);
            }
            outside_on_b += now.iter().filter(|&&n| n == b as i32).count();
            outside_total += now.len();
            // Inside: where it is, or why not. A new mapping in place of the old one may
            // be where the program's thread put it, when it came after pagemig's move. A
            // huge page handed to the kernel is moved at its first page and the others
            // report `EBUSY` (isolated by that same call); where the program changed the
            // range before the call's closing query, such a page is not on the target and
            // keeps the kernel's own answer.
            let replaced = change == Change::MunmapThenMmap;
            let tail_busy = |s: i32| folio > PAGE_SIZE && s == -libc::EBUSY;
            let mut inside: BTreeMap<i32, usize> = BTreeMap::new();
            for p in (at - base) / PAGE_SIZE..(at - base + len) / PAGE_SIZE {
                let s = outcome.status[p];
                assert!(
                    s == b as i32
                        || (replaced && s == a as i32)
                        || tail_busy(s)
                        || [-libc::EFAULT, -libc::ENOENT].contains(&s),
                    "{what}: page {p} of the change: status {s}"
                );
                *inside.entry(s).or_default() += 1;
            }
            if change == Change::MprotectReadOnly {
                assert_eq!(inside.get(&(b as i32)), Some(&(len / PAGE_SIZE)), "{what}: read-only pages move too");
            }
            println!("{what}: pages of the change by status {inside:?}");
            changes::check(&what, change, base, LEN, SEED, at, len, moved_to as usize);
            changes::release(change, base, LEN, at, len, reserved);
        }
    }
    println!(
        "placement: move-range-changed-{}-folios-outside-the-changes node {b} pages {outside_on_b}/{outside_total}",
        size_name(folio)
    );
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn move_range_of_4k_pages_while_the_program_changes_them() {
    move_range_while_the_program_changes_it(4 * KIB);
}

#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn move_range_of_huge_pages_while_the_program_changes_them() {
    move_range_while_the_program_changes_it(HPAGE_SIZE);
}

/// Every page of every private anonymous read-write mapping of this process, as a program
/// that moves "all of its memory" finds them in `/proc/self/maps`: the heap, the stacks of
/// every thread (pagemig's among them), malloc arenas, statics, pagemig's own pool and
/// graveyards, the test's regions.
fn every_private_anonymous_page() -> Vec<usize> {
    let mut pages = Vec::new();
    for line in std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps").lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(range), Some(perms), Some(inode)) = (f.first(), f.get(1), f.get(4)) else { continue };
        let name = f.get(5).copied().unwrap_or("");
        if !perms.starts_with("rw") || !perms.ends_with('p') || *inode != "0" || name == "[vsyscall]" {
            continue;
        }
        let (s, e) = range.split_once('-').unwrap();
        let (s, e) = (usize::from_str_radix(s, 16).unwrap(), usize::from_str_radix(e, 16).unwrap());
        pages.extend((s..e).step_by(PAGE_SIZE));
    }
    pages
}

/// A program that moves all of its own memory with `move_pages`, round after round between
/// the nodes, while its threads keep writing and checking words on the heap, on their
/// stacks and in a region: pagemig moves what is the program's, hands to the kernel what
/// its own threads may touch (their stacks and TLS, arenas, statics, its own mappings), and
/// nothing hangs (a thread of pagemig's waiting on a protection of its own would).
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn moving_all_of_the_process_memory_back_and_forth_never_hangs() {
    // In a process of its own: it moves every page of its process, the regions of the tests
    // running beside it too (a round trip once found a huge page of its region back on the
    // first node, moved there by this test's round, as it checked the second).
    common::fresh_process_test(
        "moving_all_of_the_process_memory_back_and_forth_never_hangs",
        "PAGEMIG_MOVE_ALL_CHILD",
        Duration::from_secs(240),
        moving_all_of_the_process_memory,
    );
}

fn moving_all_of_the_process_memory() {
    let Some((a, b)) = two_nodes() else { return };
    const ROUNDS: usize = 4;
    let region = common::leak(Region::new(8 * MIB, 4 * KIB, Some(a)).expect("region"));
    fill(region, 0x616c6c);
    let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            std::thread::spawn(move || {
                // Words of this thread's heap (an arena) and stack, written and checked.
                let mut heap = vec![0u64; 512];
                let mut stack = [0u64; 64];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let (h, s) = (n as usize % heap.len(), n as usize % stack.len());
                    heap[h] = n;
                    stack[s] = n;
                    std::hint::black_box(&mut stack);
                    assert_eq!((heap[h], stack[s]), (n, n), "writer {w}: a word changed under it");
                    // And a load from the region, which moves meanwhile.
                    std::hint::black_box(region.word(n as usize % region.words()).load(Ordering::Relaxed));
                }
                n
            })
        })
        .collect();
    let engine = Engine::global().expect("the migration engine");
    let summary = common::watchdog(Duration::from_secs(240), "moving all of the process's memory", move || {
        let mut summary = Vec::new();
        for round in 0..ROUNDS {
            let target = if round % 2 == 0 { b } else { a };
            let mut pages = every_private_anonymous_page();
            let mut status = vec![0i32; pages.len()];
            let nodes = vec![target as i32; pages.len()];
            // This thread writes the three arrays during the call: their pages are left out,
            // as `move_pages`' contract asks (a C caller's arrays are copied by the C entry).
            let span = |p: *const u8, bytes: usize| p as usize..p as usize + bytes;
            let arrays = [
                span(status.as_ptr().cast(), status.len() * 4),
                span(nodes.as_ptr().cast(), nodes.len() * 4),
                span(pages.as_ptr().cast(), pages.len() * 8),
            ];
            pages.retain(|&p| arrays.iter().all(|r| r.end <= p || p + PAGE_SIZE <= r.start));
            status.truncate(pages.len());
            let nodes = &nodes[..pages.len()];
            // SAFETY: this thread touches none of the pages named during the call: its
            // stack goes to the kernel, its arrays are left out.
            let left = unsafe { engine.move_pages(&pages, Some(nodes), &mut status) }
                .unwrap_or_else(|e| panic!("round {round}: move_pages: {e}"));
            let mut by_status: BTreeMap<i32, usize> = BTreeMap::new();
            for &s in &status {
                *by_status.entry(s).or_default() += 1;
            }
            for &s in by_status.keys() {
                assert!(
                    s == target as i32 || [-libc::EFAULT, -libc::ENOENT, -libc::EBUSY, -libc::EACCES].contains(&s),
                    "round {round}: a page ended with status {s}: {by_status:?}"
                );
            }
            let region_on = numa::page_nodes(region.addr(), region.len()).unwrap();
            let on = region_on.iter().filter(|&&n| n == target as i32).count();
            summary.push(format!(
                "round {round}: {} pages to node {target}, {left} not moved, statuses {by_status:?}; region {on}/{} on node {target}",
                pages.len(),
                region.len() / PAGE_SIZE
            ));
            assert_eq!(on, region.len() / PAGE_SIZE, "round {round}: the region's pages are on node {target}");
        }
        summary
    });
    stop.store(true, Ordering::Relaxed);
    let writes: Vec<u64> = writers.into_iter().map(|h| h.join().expect("a writer found a word changed")).collect();
    for line in &summary {
        println!("{line}");
    }
    println!("writers' stores: {writes:?}");
    verify(region, 0x616c6c, "the region after moving all of the process's memory");
    let last = if ROUNDS % 2 == 0 { a } else { b };
    println!(
        "placement: move-all-process-memory-region node {last} pages {}/{}",
        common::pages_on(region, last),
        region.len() / PAGE_SIZE
    );
    let pages = engine.pages_stats();
    println!("pages stats: {pages:?}");
    assert!(pages.moved > 0, "pagemig moved the program's pages itself");
    // The writers are gone: the region's memory goes back, so that no later test's
    // mapping lands beside it and merges with it.
    // SAFETY: the leaked region's own mapping, which nothing uses any more (its `Region`
    // is never dropped, so it is unmapped once).
    unsafe { libc::munmap(region.addr() as *mut _, region.len()) };
}

/// Huge pages that go back to their node keep their size across graveyards that held base
/// pages: 2 MiB folios mapped with base pages move from the first node to the second (their
/// graveyards get page tables), then huge pages whose moves all fail come back from the
/// graveyards the engine kept, or from new ones: still huge, every byte and page where it
/// was; then they move whole. Graveyards of huge pages are kept only where the kernel frees
/// the page table a discard empties; on a kernel that does not (this guest's may not) a kept
/// one would split every huge page moved into it, which this test would see.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn huge_pages_put_back_across_nodes_stay_huge_after_graveyards_held_base_pages() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "huge_pages_put_back_across_nodes_stay_huge_after_graveyards_held_base_pages",
    );
    let Some((a, b)) = two_nodes() else { return };
    let engine = Engine::global().expect("the migration engine");
    let len = 16 * MIB;
    let split = Region::new(len, HPAGE_SIZE, Some(a)).expect("region on the first node");
    fill(&split, 0x61);
    assert_eq!(split.anon_huge_bytes().expect("smaps"), len as u64, "huge pages to split");
    for f in 0..len / HPAGE_SIZE {
        let page = (split.addr() + f * HPAGE_SIZE) as *mut libc::c_void;
        // SAFETY: a page of our own region; its protection comes back at once, and no other
        // thread touches the region.
        unsafe {
            assert_eq!(libc::mprotect(page, PAGE_SIZE, libc::PROT_READ), 0);
            assert_eq!(libc::mprotect(page, PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE), 0);
        }
    }
    assert_eq!(split.anon_huge_bytes().expect("smaps"), 0, "mapped with base pages");
    let opts = MigrateOptions::default().max_batch_pages(512);
    engine.migrate_pages(&split.folios(), b, Reason::Syscall, Mode::Sync, &opts).expect("the split region moves");
    verify(&split, 0x61, "split huge pages");
    check_placement("split-huge-pages", &split, b);
    let huge = Region::new(len, HPAGE_SIZE, Some(a)).expect("region on the first node");
    fill(&huge, 0x62);
    assert_eq!(huge.anon_huge_bytes().expect("smaps"), len as u64);
    let failing = MigrateOptions::default()
        .max_batch_pages(512)
        .fault(FaultInjection { fail_move: (0..len / HPAGE_SIZE).collect(), ..Default::default() });
    match engine.migrate_pages(&huge.folios(), b, Reason::Syscall, Mode::Sync, &failing) {
        Err(Error::Partial { stats, .. }) => assert_eq!(stats.failed_folios as usize, len / HPAGE_SIZE, "{stats:?}"),
        other => panic!("expected every move to fail, got {other:?}"),
    }
    verify(&huge, 0x62, "huge pages put back");
    check_placement("huge-pages-put-back", &huge, a);
    assert_eq!(huge.anon_huge_bytes().expect("smaps"), len as u64, "huge pages put back whole");
    engine.migrate_pages(&huge.folios(), b, Reason::Syscall, Mode::Sync, &opts).expect("the huge pages move");
    verify(&huge, 0x62, "huge pages moved");
    check_placement("huge-pages-moved", &huge, b);
    assert_eq!(huge.anon_huge_bytes().expect("smaps"), len as u64, "huge pages moved whole");
    let (_, kept_huge, reused) = engine.kept_graveyards();
    eprintln!("graveyards of huge pages kept: {kept_huge}, reservations that took a kept one: {reused}");
}

/// 32 MiB of 2 MiB folios in one batch across nodes, the target refusing the destination of
/// the piece that holds folio 5 (populated just before its copy, as every piece's is): that
/// piece's folios fail with `ENOMEM` and stay on the first node, whole and byte for byte;
/// every other folio is on the second; a later call moves the rest.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn a_piece_whose_destination_cannot_be_populated_stays_on_its_node() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "a_piece_whose_destination_cannot_be_populated_stays_on_its_node");
    let Some((a, b)) = two_nodes() else { return };
    let engine = Engine::global().expect("the migration engine");
    let len = 32 * MIB;
    let region = Region::new(len, HPAGE_SIZE, Some(a)).expect("region on the first node");
    fill(&region, 0x71);
    let huge = region.anon_huge_bytes().expect("smaps");
    let opts = MigrateOptions::default()
        .max_batch_pages(len / PAGE_SIZE)
        .fault(FaultInjection { fail_populate: vec![5], ..Default::default() });
    let stats = match engine.migrate_pages(&region.folios(), b, Reason::Syscall, Mode::Sync, &opts) {
        Err(Error::Partial { stats, .. }) => stats,
        other => panic!("expected a partial migration, got {other:?}"),
    };
    assert!(stats.failures.iter().all(|f| f.errno == libc::ENOMEM), "{:?}", stats.failures);
    let failed: Vec<usize> = stats.failures.iter().map(|f| (f.addr - region.addr()) / HPAGE_SIZE).collect();
    println!("folios refused a destination: {failed:?}");
    assert!(failed.contains(&5) && failed.windows(2).all(|w| w[1] == w[0] + 1), "{failed:?}");
    assert!(failed.len() < len / HPAGE_SIZE / 2, "{failed:?}");
    verify(&region, 0x71, "region after the refused piece");
    assert_eq!(region.anon_huge_bytes().expect("smaps"), huge, "huge pages stay huge");
    let nodes = numa::page_nodes(region.addr(), len).expect("move_pages status query");
    for (f, pages) in nodes.chunks(HPAGE_SIZE / PAGE_SIZE).enumerate() {
        let want = if failed.contains(&f) { a } else { b } as i32;
        assert!(pages.iter().all(|&n| n == want), "folio {f}: pages on {pages:?}, not all on node {want}");
    }
    println!(
        "refused piece: {} folios stay on node {a}, {} moved to node {b}",
        failed.len(),
        len / HPAGE_SIZE - failed.len()
    );
    engine
        .migrate_pages(&region.folios(), b, Reason::Syscall, Mode::Sync, &MigrateOptions::default())
        .expect("the rest moves");
    verify(&region, 0x71, "region moved whole");
    check_placement("refused-piece#retry", &region, b);
}

/// Old pages that cannot move home after a refused move (the program made the memory
/// read-only while they were out) are copied back across nodes onto their own node; where
/// that node refuses the copy (`ENOMEM`, injected once: `fail_put_back_copies`) the copy
/// prefers it again and takes it here, as it has room: every byte back, every page on the
/// node it was on, the memory still read-only.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn old_pages_copied_back_stay_on_their_node_after_it_refused_a_copy() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "old_pages_copied_back_stay_on_their_node_after_it_refused_a_copy");
    let Some((a, b)) = two_nodes() else { return };
    let engine = Engine::global().expect("the migration engine");
    let len = MIB;
    let region = Region::new(len, PAGE_SIZE, Some(a)).expect("region on the first node");
    fill(&region, 0x81);
    let base = region.addr();
    let stall = pagemig::Handshake::new();
    let fault = FaultInjection {
        fail_move: vec![0],
        stall_put_back: Some(stall.clone()),
        fail_put_back_copies: 1,
        ..Default::default()
    };
    let opts = MigrateOptions::default().max_batch_pages(len / PAGE_SIZE).answer_faults(false).fault(fault);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            common::while_put_back_stalled(&stall, base, || {
                // SAFETY: our own region, read-only from here.
                assert_eq!(unsafe { libc::mprotect(base as *mut libc::c_void, len, libc::PROT_READ) }, 0);
            })
        });
        engine.migrate_pages(&region.folios(), b, Reason::Syscall, Mode::Sync, &opts)
    });
    match result {
        Err(Error::Partial { stats, .. }) => assert_eq!(stats.failed_folios as usize, len / PAGE_SIZE, "{stats:?}"),
        other => panic!("expected every move to fail, got {other:?}"),
    }
    verify(&region, 0x81, "old pages copied back");
    check_placement("copied-back-after-a-refused-copy", &region, a);
    assert_eq!(common::changes::perms(base).as_deref(), Some("r--p"), "protection undone");
}

/// Pages purged while a call has them registered, before it claims them, are never moved
/// in by that call (their zap may still be coming): across nodes, the pages purged with
/// `MADV_FREE` and written again stay on their node with what was written, those purged
/// with `MADV_DONTNEED` read zeros, both fail with `ENOENT`, and every other page moves.
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn pages_purged_before_the_claim_stay_across_nodes() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "pages_purged_before_the_claim_stay_across_nodes");
    let Some((a, b)) = two_nodes() else { return };
    let engine = Engine::global().expect("the migration engine");
    const PAGES: usize = 64;
    let region = Region::new(PAGES * PAGE_SIZE, PAGE_SIZE, Some(a)).expect("region on the first node");
    fill(&region, 0x91);
    let page = |p: usize| region.addr() + p * PAGE_SIZE;
    let (dontneed, free) = (8..16, 32..48);
    let handshake = pagemig::Handshake::new();
    let opts = MigrateOptions::default()
        .answer_faults(false)
        .fault(FaultInjection { claim_handshake: Some(handshake.clone()), ..Default::default() });
    let result = std::thread::scope(|s| {
        let call = s.spawn(|| engine.migrate_pages(&region.folios(), b, Reason::Syscall, Mode::Sync, &opts));
        handshake.wait();
        // SAFETY: pages of our own region; `madvise` returns once its event is read.
        unsafe {
            let advise = |r: &std::ops::Range<usize>, advice| {
                assert_eq!(libc::madvise(page(r.start) as *mut libc::c_void, r.len() * PAGE_SIZE, advice), 0)
            };
            advise(&dontneed, libc::MADV_DONTNEED);
            advise(&free, libc::MADV_FREE);
        }
        for i in free.start * PAGE_SIZE / 8..free.end * PAGE_SIZE / 8 {
            // SAFETY: a word of a present, writable page of our region.
            unsafe { ((region.addr() + i * 8) as *mut u64).write_volatile(!pattern(0x91, i)) };
        }
        handshake.wait();
        call.join().unwrap()
    });
    let Err(Error::Partial { stats, .. }) = &result else { panic!("the purged pages moved: {result:?}") };
    let mut failed: Vec<usize> = stats.failures.iter().map(|f| (f.addr - region.addr()) / PAGE_SIZE).collect();
    failed.sort_unstable();
    assert_eq!(failed, dontneed.clone().chain(free.clone()).collect::<Vec<_>>(), "{stats:?}");
    assert!(stats.failures.iter().all(|f| f.errno == libc::ENOENT), "{stats:?}");
    let nodes = numa::page_nodes(region.addr(), PAGES * PAGE_SIZE).expect("move_pages status query");
    for (p, &node) in nodes.iter().enumerate() {
        // SAFETY: words of our own region.
        let word = |i: usize| unsafe { ((page(p) + i * 8) as *const u64).read_volatile() };
        if dontneed.contains(&p) {
            assert!((0..PAGE_SIZE / 8).all(|i| word(i) == 0), "page {p}: purged data came back");
            continue;
        }
        let freed = free.contains(&p);
        assert_eq!(node, if freed { a } else { b } as i32, "page {p}: on node {node}");
        let want = |i: usize| if freed { !pattern(0x91, i) } else { pattern(0x91, i) };
        assert!((0..PAGE_SIZE / 8).all(|i| word(i) == want(p * PAGE_SIZE / 8 + i)), "page {p}: its data");
    }
    let moving: Vec<usize> = (0..PAGES).filter(|p| !dontneed.contains(p) && !free.contains(p)).collect();
    let on_b = moving.iter().filter(|&&p| nodes[p] == b as i32).count();
    println!("placement: purged-before-claim-others node {b} pages {on_b}/{}", moving.len());
}

/// A huge page of the region pinned for a moment while it moves (as a stranger's
/// `process_vm_readv` pins what it reads, or io_uring a fixed buffer): its isolation is
/// refused (`EBUSY`), the folio is held for another pass, and every folio the call reports
/// moved is on the target node, every other one where it was, every byte as written.
/// (`bounce_while_a_stranger_reads_every_mapping` once reported every folio moved with the
/// one held for a second pass still on its node.)
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn a_huge_page_pinned_for_a_moment_moves_on_a_later_pass_or_fails() {
    let Some((a, b)) = two_nodes() else { return };
    if !can_pin() {
        println!("io_uring cannot pin pages here: nothing to test");
        return;
    }
    for (round, hold_ms) in [10u64, 50, 150].into_iter().enumerate() {
        let (from, to) = if round % 2 == 0 { (a, b) } else { (b, a) };
        let region = Region::new(8 * MIB, HPAGE_SIZE, Some(from)).expect("region");
        let seed = 0x9111 + round as u64;
        fill(&region, seed);
        let pinned_at = region.addr() + HPAGE_SIZE;
        let started = Barrier::new(2);
        let result = std::thread::scope(|s| {
            let pinner = s.spawn(|| {
                let held = pin(pinned_at, HPAGE_SIZE).expect("pinning a huge page of the region");
                started.wait();
                std::thread::sleep(Duration::from_millis(hold_ms));
                drop(held);
            });
            started.wait();
            let opts = MigrateOptions::default().max_batch_pages(512);
            let result =
                Engine::global().unwrap().migrate_pages(&region.folios(), to, Reason::Syscall, Mode::Sync, &opts);
            pinner.join().unwrap();
            result
        });
        let (failed, retried): (Vec<usize>, u64) = match &result {
            Ok(stats) => (Vec::new(), stats.retried_folios),
            Err(Error::Partial { stats, .. }) => {
                (stats.failures.iter().map(|f| f.addr).collect(), stats.retried_folios)
            }
            Err(e) => panic!("pinned for {hold_ms} ms: {e}"),
        };
        println!("pinned for {hold_ms} ms: {} folios failed, {retried} retried", failed.len());
        verify(&region, seed, &format!("pinned for {hold_ms} ms"));
        let nodes = numa::page_nodes(region.addr(), region.len()).expect("move_pages status query");
        for (i, node) in nodes.iter().enumerate() {
            let folio = region.addr() + i * PAGE_SIZE / HPAGE_SIZE * HPAGE_SIZE;
            let want = if failed.contains(&folio) { from } else { to };
            assert_eq!(
                *node, want as i32,
                "pinned for {hold_ms} ms: page {i} (folio {folio:#x}); failed {failed:?}; {result:?}"
            );
        }
        println!(
            "placement: pinned-for-{hold_ms}ms node {to} pages {}/{}",
            nodes.iter().filter(|&&n| n == to as i32).count() + failed.len() * (HPAGE_SIZE / PAGE_SIZE),
            nodes.len()
        );
    }
}

/// The guest twin of `fork_child::children_forked_while_the_parent_migrates_migrate_with_their_own_engines`:
/// children forked while the parent moves its memory between the nodes (its threads
/// waiting on pagemig's locks at the fork) move their own memory across with a writer:
/// none crashes or hangs, every byte and write stands, every page lands on the node asked.
/// (With `parking_lot`'s locks, whose table of waiting threads a child inherited, a child
/// now and then died of `SIGSEGV` or hung.)
#[test]
#[ignore = "needs two NUMA nodes: vm/run runs it in the two-node guest"]
fn children_forked_while_the_parent_migrates_move_their_memory_across_nodes() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "children_forked_while_the_parent_migrates_move_their_memory_across_nodes",
    );
    let Some((a, b)) = two_nodes() else { return };
    let engine = Engine::global().unwrap();
    let region = Region::new(16 * MIB, 4 * KIB, Some(a)).expect("region");
    fill(&region, 5);
    let stop = AtomicBool::new(false);
    let mut bad = Vec::new();
    std::thread::scope(|s| {
        let parent = s.spawn(|| {
            let mut moves = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let to = if moves % 2 == 0 { b } else { a };
                engine
                    .migrate_pages(&region.folios(), to, Reason::Syscall, Mode::Sync, &MigrateOptions::default())
                    .expect("the parent's migration");
                moves += 1;
            }
            moves
        });
        for child in 0..16 {
            // SAFETY: the child uses its own engine and threads, and ends with _exit.
            let end = unsafe {
                common::fork_and_wait_or_kill_or_crash(Duration::from_secs(120), || {
                    let Ok(engine) = Engine::global() else { return 2 };
                    let Ok(mine) = Region::new(8 * MIB, 4 * KIB, Some(a)) else { return 3 };
                    pagemig::workload::fill(&mine, 6);
                    let (result, log) = pagemig::workload::with_writers(&mine, 1, || {
                        engine.migrate_pages(&mine.folios(), b, Reason::Syscall, Mode::Sync, &MigrateOptions::default())
                    });
                    if result.is_err() {
                        return 4;
                    }
                    if !pagemig::workload::verify(&mine, 6, &log).ok() {
                        return 5;
                    }
                    let on_b = numa::page_nodes(mine.addr(), mine.len())
                        .map_or(0, |s| s.iter().filter(|&&n| n == b as i32).count());
                    if on_b != mine.len() / PAGE_SIZE {
                        return 6;
                    }
                    0
                })
            };
            if end != common::ChildEnd::Exited(0) {
                bad.push((child, end));
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert!(parent.join().unwrap() > 0, "the parent migrated while it forked");
    });
    verify(&region, 5, "the parent's region");
    engine.migrate_pages(&region.folios(), b, Reason::Syscall, Mode::Sync, &MigrateOptions::default()).unwrap();
    verify(&region, 5, "the parent's region, moved once more");
    check_placement("forked-children-parent", &region, b);
    println!("16 children moved their 8 MiB to node {b} while the parent moved its 16 MiB: {} ended badly", bad.len());
    assert!(
        bad.is_empty(),
        "children that did not end well (exit 2 no engine, 3 no region, 4 a call failed, 5 data lost, 6 pages off node {b}): {bad:?}"
    );
}
