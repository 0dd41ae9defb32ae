//! Micro-benchmarks of the copy kernels, of one batch through each migrator, and of the
//! offload dispatch path: `cargo bench --bench kernels`.
//!
//! Every buffer is a populated private mapping owned by the benchmark; whole migrations
//! (unmap, copy, move, checks) are measured by `pagemig bench` instead.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pagemig::copy::{CopyPair, folio_copy, folios_copy};
use pagemig::dma::{Device, SoftConfig};
use pagemig::migrators::dcbm::Dcbm;
use pagemig::migrators::mtcopy::MtCopy;
use pagemig::offload::{Batch, CpuCopy, Migrator, OffloadCopy, Owner, Registry};
use pagemig::sys::{self, Advice, Errno, Mapping};

/// A populated mapping of `len` bytes (2 MiB aligned and THP-advised when `huge`).
fn buffer(len: usize, huge: bool) -> Mapping {
    let map = Mapping::new(len, if huge { sys::HPAGE_SIZE } else { sys::PAGE_SIZE }).expect("map a buffer");
    let advice = if huge { Advice::HugePage } else { Advice::NoHugePage };
    sys::madvise(map.addr(), len, advice).expect("huge page advice");
    sys::madvise(map.addr(), len, Advice::PopulateWrite).expect("populate a buffer");
    map
}

/// `len / folio` pairs copying `src` to `dst` folio by folio, in order.
fn pairs(dst: &Mapping, src: &Mapping, len: usize, folio: usize) -> Vec<CopyPair> {
    (0..len / folio)
        .map(|i| CopyPair { dst: dst.addr() + i * folio, src: src.addr() + i * folio, len: folio })
        .collect()
}

fn copy_kernels(c: &mut Criterion) {
    let len = 16 << 20;
    let (src, dst) = (buffer(len, true), buffer(len, true));
    let mut g = c.benchmark_group("copy");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    for size in [4 << 10, 2 << 20, 16 << 20] {
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("copy_bytes", size), &size, |b, &n| {
            // SAFETY: two distinct mappings of `len >= n` bytes that only this benchmark uses.
            b.iter(|| unsafe { pagemig::copy::simd::copy_bytes(dst.addr(), src.addr(), black_box(n)) })
        });
        g.bench_with_input(BenchmarkId::new("copy_bytes_nt", size), &size, |b, &n| {
            // SAFETY: as above.
            b.iter(|| unsafe { pagemig::copy::simd::copy_bytes_nt(dst.addr(), src.addr(), black_box(n)) })
        });
    }
    for folio in [4 << 10, 2 << 20] {
        g.throughput(Throughput::Bytes(folio as u64));
        let pair = CopyPair { dst: dst.addr(), src: src.addr(), len: folio };
        g.bench_with_input(BenchmarkId::new("folio_copy", folio), &pair, |b, &p| {
            // SAFETY: the pair lies within two distinct mappings only this benchmark uses.
            b.iter(|| unsafe { folio_copy(black_box(p)) })
        });
    }
    // A batch of 4 KiB folios: contiguous (coalesced into one copy) and every other
    // folio (no two adjacent, so 2048 copies).
    g.throughput(Throughput::Bytes(8 << 20));
    let contiguous = pairs(&dst, &src, 8 << 20, 4 << 10);
    let scattered: Vec<CopyPair> = pairs(&dst, &src, len, 4 << 10).into_iter().step_by(2).collect();
    for (name, batch) in [("contiguous", &contiguous), ("every_other", &scattered)] {
        g.bench_with_input(BenchmarkId::new("folios_copy_4k", name), batch, |b, batch| {
            // SAFETY: every pair lies within two distinct mappings only this benchmark uses.
            b.iter(|| unsafe { folios_copy(black_box(batch)) })
        });
    }
    g.finish();
}

fn migrators(c: &mut Criterion) {
    let len = 16 << 20;
    let (src, dst) = (buffer(len, true), buffer(len, true));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let device = Device::soft("bench-dma", 16, SoftConfig::default()).expect("a soft DMA device");
    let dcbm = Dcbm::new(Some(device));
    dcbm.set_nr_dma_chan(4).expect("4 channels");
    let mtcopy = MtCopy::new(cpus).expect("mtcopy threads");
    let copiers: [(&str, Arc<dyn OffloadCopy>); 3] =
        [("cpu", Arc::new(CpuCopy)), ("mtcopy", mtcopy), ("dcbm_4ch", dcbm)];
    let mut g = c.benchmark_group("migrator_batch");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(len as u64));
    for folio in [64 << 10, 2 << 20] {
        let batch_pairs = pairs(&dst, &src, len, folio);
        for (name, copier) in &copiers {
            g.bench_with_input(BenchmarkId::new(*name, folio), &batch_pairs, |b, p| {
                // SAFETY: the pairs lie within two distinct mappings that only this benchmark
                // uses, and no two overlap.
                let batch = unsafe { Batch::new(p, None) };
                b.iter(|| copier.offload_copy(black_box(&batch)))
            });
        }
    }
    g.finish();
}

/// A migrator that copies nothing: what remains is the dispatch path itself.
struct Noop;

// SAFETY: copies nothing and reports nothing.
unsafe impl OffloadCopy for Noop {
    fn offload_copy(&self, batch: &Batch<'_>) -> Result<(), Errno> {
        black_box(batch.folio_count());
        Ok(())
    }
}

fn dispatch(c: &mut Criterion) {
    let (src, dst) = (buffer(4096, false), buffer(4096, false));
    let pair = [CopyPair { dst: dst.addr(), src: src.addr(), len: 4096 }];
    // SAFETY: one pair within two distinct mappings only this benchmark uses.
    let batch = unsafe { Batch::new(&pair, None) };
    let mut g = c.benchmark_group("dispatch");
    g.sample_size(10).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_millis(500));
    let empty = Registry::new();
    g.bench_function("unregistered", |b| b.iter(|| black_box(&empty).dispatch(black_box(&batch))));
    let noop = Registry::new();
    noop.register(&Migrator::new("noop", Arc::new(Noop), Owner::new("bench"))).expect("register noop");
    g.bench_function("registered_noop", |b| b.iter(|| black_box(&noop).dispatch(black_box(&batch))));
    let cpu = Registry::new();
    cpu.register(&Migrator::new("cpu", Arc::new(CpuCopy), Owner::new("bench"))).expect("register cpu");
    g.bench_function("registered_cpu_4k", |b| b.iter(|| black_box(&cpu).dispatch(black_box(&batch))));
    g.finish();
}

mod groups {
    use super::*;

    criterion_group! {
        name = benches;
        config = Criterion::default();
        targets = copy_kernels, migrators, dispatch
    }
}

criterion_main!(groups::benches);
