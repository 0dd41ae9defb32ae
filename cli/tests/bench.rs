//! `pagemig bench` on tiny sizes: every file is written, and the JSON holds real, verified
//! measurements of every experiment.

use std::path::{Path, PathBuf};
use std::process::Command;

use pagemig_cli::report::{self, BenchConfig, MigratorSpec};
use serde_json::Value;

fn node() -> u32 {
    pagemig::numa::memory_nodes().unwrap()[0]
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagemig-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn check_files(dir: &Path, plots: &[&str]) {
    for name in plots {
        let svg = std::fs::read_to_string(dir.join(format!("{name}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("<text"), "{name}.svg has no text");
        let png = std::fs::read(dir.join(format!("{name}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "{name}.png is not a drawn PNG");
    }
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("AMD Zen 3 EPYC, PTDMA (RFC v5 thread)"));
    assert!(html.contains("Throughput, end to end") && html.contains("UFFDIO_COPY"));
    assert!(!html.contains("<?xml"), "SVG inlined with its XML declaration");
    // Each experiment opens with what to conclude, computed from its numbers.
    let experiments = plots.iter().filter(|p| ["throughput", "first-folio", "scattered"].contains(p)).count();
    assert_eq!(html.matches("<div class=\"conclusion\">").count(), experiments, "one conclusion per experiment");
    assert!(html.contains("Fastest end to end (medians): "));
}

fn positive(v: &Value) -> bool {
    v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite())
}

#[test]
fn bench_measures_every_experiment_and_writes_the_report() {
    let Ok(engine) = pagemig::Engine::global() else { return };
    let mut cfg = BenchConfig::quick(node(), node());
    cfg.size = 8 << 20;
    cfg.reps = 1;
    cfg.sweep_reps = 1;
    cfg.folio_sizes = vec![4 << 10, 64 << 10, 2 << 20];
    cfg.mtcopy_threads = vec![2];
    cfg.dcbm_channels = vec![1, 4];
    cfg.sweep_batch_pages = vec![512, 2048];
    cfg.sweep_migrators = vec![MigratorSpec::Cpu, MigratorSpec::Dcbm { channels: 4 }];
    cfg.scatter_folio_sizes = vec![4 << 10, 2 << 20];
    cfg.scatter_max_folios = 256;
    cfg.writers = 1;
    let kernel = cfg.kernel_nodes.is_some();
    assert_eq!(kernel, pagemig::numa::memory_nodes().unwrap().len() >= 2);
    let started = std::sync::atomic::AtomicUsize::new(0);
    let finished = std::sync::Mutex::new(Vec::new());
    let r = report::run(engine, &cfg, &|s| {
        assert!(!s.what.is_empty());
        match s.finished {
            None => {
                assert!(s.done < s.total);
                started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Some(m) => {
                assert!(s.done >= 1 && s.done <= s.total);
                finished.lock().unwrap().push((s.done, s.what.to_string(), m.ok, m.gbps));
            }
        }
    })
    .unwrap();
    assert_eq!(started.into_inner(), cfg.planned_runs());
    let finished = finished.into_inner().unwrap();
    assert_eq!(finished.len(), cfg.planned_runs());
    // The summary counts the migrations the progress counted, not the yardstick rows again.
    assert_eq!(r.measurements().count(), cfg.planned_runs());
    for (i, (done, what, ok, gbps)) in finished.iter().enumerate() {
        assert_eq!(*done, i + 1);
        assert!(*ok && *gbps > 0.0, "{what}");
    }
    assert!(finished[0].1.starts_with("throughput: cpu, 4K folios, rep 1/1"), "{}", finished[0].1);
    let dir = temp_dir("lib");
    let written = report::write_all(&r, &dir).unwrap();
    assert_eq!(written.len(), 1 + 4 * 2 + 1);
    check_files(&dir, &["throughput", "first-folio", "batch-throughput", "scattered"]);

    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(v["failed_measurements"], 0, "{}", serde_json::to_string_pretty(&v).unwrap());
    let m = &v["machine"];
    assert!(m["cores"].as_u64().unwrap() >= 1);
    assert!(!m["kernel"].as_str().unwrap().is_empty() && !m["cpu_model"].as_str().unwrap().is_empty());
    assert!(m["thp"].is_string() && m["nodes"].as_array().is_some_and(|n| !n.is_empty()));
    assert!(v["attributes"]["migrate/max_batch_pages"].is_string());

    // Throughput: cpu, cpu with a prepared reserve, mtcopy 2, dcbm 1 and 4, the kernel on
    // two nodes, the yardsticks memcpy and UFFDIO_COPY; one cell per folio size.
    let t = &v["throughput"];
    let rows = t["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["migrator"]["name"].as_str().unwrap()).collect();
    let mut want = vec!["cpu", "cpu_reserved", "mtcopy", "dcbm", "dcbm"];
    want.extend(kernel.then_some("kernel"));
    want.extend(["memcpy", "uffdio_copy"]);
    assert_eq!(names, want);
    if kernel {
        assert!(t["kernel_absent_reason"].is_null() && t["kernel_nodes"].is_array());
    } else {
        assert!(t["kernel_nodes"].is_null());
        let why = t["kernel_absent_reason"].as_str().unwrap();
        assert!(why.contains("needs two NUMA nodes with memory") && !why.contains("  "), "{why}");
    }
    let mut timed = 0;
    for row in rows {
        let cells = row["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 3);
        let is_kernel = row["migrator"]["name"] == "kernel";
        for c in cells {
            assert_eq!(c["ok"], true);
            assert!(positive(&c["gbps"]["mean"]), "{c}");
            assert_eq!(positive(&c["critical_path_gbps"]["mean"]), !is_kernel, "{c}");
            let ms = c["measurements"].as_array().unwrap();
            assert_eq!(ms.len(), 1);
            assert_eq!(ms[0]["bytes"], 8 << 20);
            assert_eq!(ms[0]["mismatched_bytes"], 0);
            assert_eq!(ms[0]["placement_ok"], true);
            // A migration under the writer reports its stalls, its every store counted (a
            // plain copy, the yardstick rows, runs without writers).
            if ms[0]["writes"].as_u64().unwrap() > 0 {
                let stalls = ms[0]["writer_stalls"].as_array().unwrap();
                assert_eq!(stalls.len(), 1, "{c}");
                assert_eq!(stalls[0]["stores"], ms[0]["writes"], "{c}");
                timed += 1;
            }
        }
    }
    // Every migrator row but the yardsticks ran under the writer.
    assert!(timed >= 5 * 3, "{timed} cells with writer stalls");
    // The migrators really copied: dcbm's folios went through the DMA channels.
    assert_eq!(rows[3]["migrator"]["name"], "dcbm");
    for c in rows[3]["cells"].as_array().unwrap() {
        assert!(c["offloaded_folios"].as_u64().unwrap() > 0, "{c}");
    }
    // With a prepared reserve the calls prepared nothing themselves.
    for c in rows[1]["cells"].as_array().unwrap() {
        assert_eq!(c["measurements"][0]["phases_us"]["prepare"], 0.0, "{c}");
    }

    // Sweep: 2 folio sizes × 2 migrators × pipelined or not × 2 batch sizes.
    let points = v["sweep"]["points"].as_array().unwrap();
    assert_eq!(points.len(), 16);
    for p in points {
        assert_eq!(p["ok"], true, "{p}");
        assert!(positive(&p["first_folio_us"]) && positive(&p["first_folio_p99_us"]), "{p}");
        assert!(positive(&p["gbps"]["mean"]) && positive(&p["critical_path_gbps"]["mean"]));
    }
    let batches = |b: u64| points.iter().find(|p| p["batch_pages"] == b && p["folio_size"] == 4096).unwrap();
    assert_eq!(batches(512)["measurements"][0]["batches"], 4);
    assert_eq!(batches(2048)["measurements"][0]["batches"], 1);

    // Scattered: every other folio is a run of its own.
    let scattered = v["scattered"]["rows"].as_array().unwrap();
    assert_eq!(scattered.len(), 2);
    for r in scattered {
        let (all, half) = (&r["contiguous"], &r["scattered"]);
        assert_eq!(all["ok"], true);
        assert_eq!(half["ok"], true);
        assert_eq!(half["folios"].as_u64().unwrap() * 2, all["folios"].as_u64().unwrap());
        assert_eq!(half["runs"].as_f64().unwrap() as u64, half["folios"].as_u64().unwrap());
        assert!(positive(&half["us_per_folio"]["mean"]) && positive(&half["move_us_per_run"]["mean"]));
    }
    assert_eq!(v["reference"]["throughput"]["rows"].as_array().unwrap().len(), 42);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_bench_applies_attributes_and_writes_the_report() {
    if pagemig::Engine::global().is_err() {
        return;
    }
    let dir = temp_dir("cli");
    let out = Command::new(env!("CARGO_BIN_EXE_pagemig"))
        .args(["bench", "--quick", "--size", "4MiB", "--reps", "1", "--only", "throughput", "--no-tables"])
        .args(["--attr", "migrate/max_batch_pages=1024", "--out"])
        .arg(&dir)
        // Never the real config file.
        .env("PAGEMIG_CONFIG", dir.join("attrs"))
        .env_remove("PAGEMIG_ATTRS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("report.html"), "{stdout}");
    check_files(&dir, &["throughput"]);
    assert!(!dir.join("scattered.svg").exists());
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(v["attributes"]["migrate/max_batch_pages"], "1024");
    assert!(v["sweep"].is_null() && v["scattered"].is_null());
    let kernel = usize::from(v["config"]["kernel_nodes"].is_array());
    // cpu and cpu reserved, mtcopy, six dcbm rows.
    let migrators = 2 + v["config"]["mtcopy_threads"].as_array().unwrap().len() + 6;
    assert_eq!(v["throughput"]["rows"].as_array().unwrap().len(), migrators + kernel + 2);
    // Not a terminal: one line per finished migration on stderr, with its end-to-end rate.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("pagemig bench: [")).collect();
    assert_eq!(lines.len(), (migrators + kernel) * 6, "{stderr}");
    assert!(lines[0].starts_with("pagemig bench: [1/"), "{}", lines[0]);
    assert!(lines[0].contains("throughput: cpu, 4K folios, rep 1/1: "), "{}", lines[0]);
    assert!(lines.iter().all(|l| l.contains(" GB/s end to end")), "{stderr}");
    // Each line says how long the run has taken and about how long is left; the last one
    // counts to the total the summary gives.
    assert!(lines.iter().all(|l| l.contains(" elapsed, about ") && l.contains(" left] ")), "{stderr}");
    let total = format!("/{}, ", lines.len());
    assert!(lines.last().unwrap().starts_with(&format!("pagemig bench: [{}{total}", lines.len())), "{stderr}");
    assert!(stdout.contains(&format!("{} migrations in ", lines.len())), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_bench_refuses_an_unusable_out_path_and_options_that_do_not_apply_before_running() {
    let dir = temp_dir("refusals");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a-file");
    std::fs::write(&file, b"").unwrap();
    let bench = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pagemig"))
            .args(["bench", "--quick", "--size", "2MiB", "--reps", "1", "--sweep-reps", "1", "--no-tables"])
            .args(extra)
            .env("PAGEMIG_CONFIG", dir.join("attrs"))
            .env_remove("PAGEMIG_ATTRS")
            .output()
            .unwrap()
    };
    let bad_out = file.join("report").display().to_string();
    for (extra, needle) in [
        (vec!["--out", bad_out.as_str()], format!("--out {bad_out}: cannot make the directory: ")),
        (vec!["--out", "/proc/pagemig-report"], "--out /proc/pagemig-report: cannot make the directory: ".into()),
        (vec!["--only", "throughput"], "--sweep-reps does not apply with --only throughput".into()),
    ] {
        let out = bench(&extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        // One line, before any migration ran, its cause said once.
        assert_eq!(stderr.lines().count(), 1, "{extra:?}: {stderr}");
        assert!(stderr.contains(&needle), "{extra:?}: {stderr}");
        let cause = stderr.rsplit(": ").next().unwrap();
        assert_eq!(stderr.matches(cause).count(), 1, "{stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_pagemig"))
        .args(["bench", "--quick", "--only", "sweep", "--reps", "2", "--batch-pages", "64"])
        .env("PAGEMIG_CONFIG", dir.join("attrs"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--reps does not apply with --only sweep"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
