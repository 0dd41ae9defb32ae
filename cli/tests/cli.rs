//! The `pagemig` command line, run as a user would, with `PAGEMIG_CONFIG` in a temporary
//! directory so that no test reads or writes the real config file.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The longest any one command may run before the test fails.
const WATCHDOG: Duration = Duration::from_secs(300);

/// Runs `cmd` to completion with its output captured, killing it (and failing) past the
/// watchdog.
fn output(mut cmd: Command) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = wait(&mut child, &format!("{cmd:?}"));
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

fn wait(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} ran past {WATCHDOG:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The command with `config` as its config file and no `PAGEMIG_ATTRS`.
fn command(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pagemig"));
    cmd.args(args).env("PAGEMIG_CONFIG", config).env_remove("PAGEMIG_ATTRS");
    cmd
}

/// A config file that does not exist, for commands that only read.
fn no_config() -> PathBuf {
    std::env::temp_dir().join(format!("pagemig-cli-{}-absent/attrs", std::process::id()))
}

fn pagemig(args: &[&str]) -> Output {
    output(command(&no_config(), args))
}

/// A fresh directory for one test's config file.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagemig-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `pagemig attr --json` with `config` and, when given, `PAGEMIG_ATTRS`.
fn listing(config: &Path, env: Option<&str>) -> serde_json::Value {
    let mut cmd = command(config, &["attr", "--json"]);
    if let Some(env) = env {
        cmd.env("PAGEMIG_ATTRS", env);
    }
    let out = output(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn attribute<'a>(listing: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    listing["attributes"].as_array().unwrap().iter().find(|a| a["path"] == path).unwrap()
}

/// `pagemig attr PATH` with `config`.
fn read_attr(config: &Path, path: &str) -> String {
    let out = output(command(config, &["attr", path]));
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

fn node() -> String {
    pagemig::numa::memory_nodes().unwrap()[0].to_string()
}

#[test]
fn move_json_reports_a_verified_migration() {
    for folio in ["4KiB", "64KiB", "2MiB"] {
        let out = pagemig(&[
            "move",
            "--size",
            "16MiB",
            "--folio-size",
            folio,
            "--to-node",
            &node(),
            "--writers",
            "2",
            "--json",
        ]);
        assert!(out.status.success(), "{folio}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for key in [
            "bytes",
            "folio_size",
            "folios",
            "to_node",
            "succeeded_folios",
            "failed_folios",
            "mismatched_bytes",
            "writes",
            "lost_writes",
            "placement_ok",
            "gbps",
            "critical_path_gbps",
            "memcpy_gbps",
            "uffdio_copy_gbps",
            "ratio",
            "critical_path_ratio",
            "page_errors",
            "first_folio_us",
            "phases_us",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        let folio_size = pagemig::folio::order_of(v["folio_size"].as_u64().unwrap() as usize).map(|o| 4096usize << o);
        assert_eq!(v["bytes"], 16 << 20);
        assert_eq!(v["folios"].as_u64().unwrap() as usize, (16 << 20) / folio_size.unwrap());
        assert_eq!(v["succeeded_folios"], v["folios"]);
        assert_eq!(v["failed_folios"], 0);
        assert_eq!(v["mismatched_bytes"], 0);
        assert_eq!(v["lost_writes"], 0);
        // Each writer's stalls: every store counted, the percentiles of those that waited
        // ordered, and the stores adding up to the writes.
        let stalls = v["writer_stalls"].as_array().unwrap();
        assert_eq!(stalls.len(), 2, "{v}");
        let stores: u64 = stalls.iter().map(|s| s["stores"].as_u64().unwrap()).sum();
        assert_eq!(stores, v["writes"].as_u64().unwrap());
        for s in stalls {
            let f = |k: &str| s[k].as_u64().unwrap();
            assert!(f("waited") <= f("stores") && f("p99_ns") <= f("p999_ns") && f("p999_ns") <= f("max_ns"), "{s}");
        }
        assert_eq!(v["placement_ok"], true);
        assert!(v["writes"].as_u64().unwrap() > 0);
        assert!(v["gbps"].as_f64().unwrap() > 0.0 && v["memcpy_gbps"].as_f64().unwrap() > 0.0);
        assert!(v["uffdio_copy_gbps"].as_f64().unwrap() > 0.0);
        // Each yardstick is the median of several warm repetitions, its spread said.
        for y in ["memcpy", "uffdio_copy"] {
            let r = &v["yardsticks"][y];
            assert!(r["reps"].as_u64().unwrap() >= 5, "{v}");
            let (min, median, max) =
                (r["min_gbps"].as_f64().unwrap(), r["median_gbps"].as_f64().unwrap(), r["max_gbps"].as_f64().unwrap());
            assert!(min <= median && median <= max, "{v}");
        }
        assert_eq!(v["yardsticks"]["memcpy"]["median_gbps"], v["memcpy_gbps"]);
        assert_eq!(v["yardsticks"]["bytes"], 16 << 20);
        // The headline is the whole call: never faster than its critical path.
        assert!(v["gbps"].as_f64().unwrap() <= v["critical_path_gbps"].as_f64().unwrap());
        let total_s = v["phases_us"]["total"].as_f64().unwrap() / 1e6;
        let end_to_end = (16 << 20) as f64 / total_s / 1e9;
        assert!((v["gbps"].as_f64().unwrap() - end_to_end).abs() <= end_to_end * 1e-6, "{v}");
        assert_eq!(v["migrator"], "cpu");
        assert_eq!(v["page_errors"], serde_json::json!({}));
        for phase in ["prepare", "unmap", "copy", "move"] {
            assert!(v["phases_us"][phase].as_f64().is_some(), "phase {phase}");
        }
    }
}

/// Runs `args` and checks it is refused at once (exit 2, within a few seconds: nothing was
/// allocated or started), with a message holding each of `words`.
fn refused_at_once(args: &[&str], words: &[&str]) {
    let started = Instant::now();
    let out = pagemig(args);
    let took = started.elapsed();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(took < Duration::from_secs(5), "{args:?} took {took:?} to be refused");
    for w in words {
        assert!(err.contains(w), "{args:?}: {w:?} not in {err}");
    }
}

#[test]
fn sizes_the_machine_cannot_hold_are_refused_before_allocating() {
    for size in ["30TiB", "1000TiB"] {
        refused_at_once(
            &["move", "--size", size, "--to-node", &node()],
            &["needs about", "of memory at its peak", "is available", "use a smaller --size"],
        );
    }
    refused_at_once(
        &["bench", "--size", "30TiB", "--out", "/nonexistent/never-made"],
        &["needs about", "is available"],
    );
    // 30 GiB and 1 TiB, the sizes seen to fill memory, where the machine cannot hold them.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    if kb * 1024 < 30 << 30 {
        refused_at_once(&["move", "--size", "30GiB", "--to-node", &node()], &["needs about 30.50 GiB", "is available"]);
    }
    refused_at_once(&["move", "--size", "1TiB", "--to-node", &node()], &["needs about 1024.50 GiB", "is available"]);
}

#[test]
fn writer_counts_past_the_machine_are_refused() {
    let max = 4 * std::thread::available_parallelism().unwrap().get();
    refused_at_once(
        &["move", "--size", "4MiB", "--to-node", &node(), "--writers", "100000"],
        &["--writers 100000", &format!("at most {max} (4 per online CPU")],
    );
    refused_at_once(&["bench", "--quick", "--writers", "100000"], &[&format!("at most {max}")]);
    let threads = max.min(64);
    refused_at_once(
        &["move", "--size", "4MiB", "--to-node", &node(), "--migrator", "mtcopy", "--threads", "100000"],
        &[&format!("--threads 100000 is outside 1 … {threads}")],
    );
    refused_at_once(
        &["move", "--size", "4MiB", "--to-node", &node(), "--migrator", "dcbm", "--channels", "17"],
        &["--channels 17 is outside 1 … 16"],
    );
}

#[test]
fn move_table_and_topology_print() {
    let out = pagemig(&["move", "--size", "4MiB", "--folio-size", "4KiB", "--to-node", &node()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("end to end / memcpy") && text.contains("placement"), "{text}");
    assert!(text.contains("critical path (excl. destination preparation)") && text.contains("UFFDIO_COPY"), "{text}");
    // The headline comes before the narrower figure.
    assert!(text.find("throughput (end to end)") < text.find("critical path (excl."), "{text}");
    let out = pagemig(&["topology", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!v["nodes"].as_array().unwrap().is_empty());
    assert_eq!(v["userfaultfd"]["available"], true);
}

#[test]
fn bad_arguments_get_clear_errors() {
    let n = node();
    for (args, needle) in [
        (vec!["--size", "1000"], "not a multiple"),
        (vec!["--size", "0"], "zero"),
        (vec!["--size", "4MiB", "--folio-size", "3KiB"], "power of two"),
        (vec!["--size", "4MiB", "--to-node=4000"], "not an online node"),
        (vec!["--size", "4MiB", "--batch-pages", "0"], "max_batch_pages"),
        (vec!["--size", "4MiB", "--batch-pages", "262145"], "max_batch_pages"),
        (vec!["--size", "4MiB", "--reason", "bogus"], "accepted"),
        (vec!["--size", "4XB"], "unknown unit"),
        (vec!["--pid", "1", "--agent-timeout", "0"], "0 is not in 1.."),
    ] {
        let mut full = vec!["move"];
        full.extend(args.iter().copied());
        if !args.iter().any(|a| a.starts_with("--to-node")) {
            full.extend(["--to-node", &n]);
        }
        let out = pagemig(&full);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn kernel_migrator_refuses_a_move_within_one_node() {
    let n = node();
    let out = pagemig(&["move", "--migrator", "kernel", "--size", "4MiB", "--from-node", &n, "--to-node", &n]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("move_pages(2) to the node a page is already on copies nothing"), "{err}");
    let out = pagemig(&["move", "--migrator", "kernel", "--size", "4MiB", "--to-node", &n, "--channels", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the kernel's"));
}

#[test]
fn kernel_migrator_moves_between_two_nodes_where_there_are_two() {
    let nodes = pagemig::numa::memory_nodes().unwrap();
    let [from, to, ..] = nodes[..] else { return };
    let (from, to) = (from.to_string(), to.to_string());
    let out = pagemig(&[
        "move",
        "--migrator",
        "kernel",
        "--size",
        "8MiB",
        "--folio-size",
        "4KiB",
        "--from-node",
        &from,
        "--to-node",
        &to,
        "--writers",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["migrator"], "kernel");
    assert_eq!((v["placement_ok"].clone(), v["mismatched_bytes"].clone()), (true.into(), 0.into()));
    assert_eq!(v["page_errors"], serde_json::json!({}));
    assert!(v["critical_path_gbps"].is_null() && v["gbps"].as_f64().unwrap() > 0.0);
}

#[test]
fn move_with_a_prepared_reserve_takes_its_destinations_from_it() {
    let n = node();
    for (folio, extra) in [("4KiB", None), ("2MiB", None), ("4KiB", Some("--attr=migrate/fill_empty=0"))] {
        let mut args = vec!["move", "--size", "16MiB", "--folio-size", folio, "--to-node", &n];
        args.extend(["--writers", "2", "--reserve", "--json"]);
        args.extend(extra);
        let out = pagemig(&args);
        assert!(out.status.success(), "{folio}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["failed_folios"], 0, "{v}");
        assert_eq!(v["mismatched_bytes"], 0, "{v}");
        assert_eq!(v["lost_writes"], 0, "{v}");
        assert_eq!(v["placement_ok"], true, "{v}");
        assert_eq!(v["reserve_bytes"], 16 << 20, "{v}");
        // Everything was prepared before the call: the call prepared nothing itself.
        assert_eq!(v["stats"]["prepare_ns"], 0, "{folio}: {v}");
        assert_eq!(v["stats"]["copied_in_folios"], 0, "{folio}: {v}");
        assert!(v["copy_kernels"]["hot"].is_string(), "{v}");
    }
    // A size: that much is prepared.
    let out = pagemig(&["move", "--size", "8MiB", "--folio-size", "2MiB", "--to-node", &n, "--reserve=4MiB", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["reserve_bytes"], 4 << 20, "{v}");
    assert_eq!(v["placement_ok"], true, "{v}");
    let out = pagemig(&["move", "--size", "8MiB", "--to-node", &n, "--reserve=lots"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lots"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_kept_attribute_holds_in_the_next_process() {
    let dir = temp_dir("persist");
    let config = dir.join("attrs");
    std::fs::write(&config, "# mine\nmigrate/pipelined = 0  # measured\n").unwrap();
    assert_eq!(read_attr(&config, "dcbm/nr_dma_chan"), "1");
    let out = output(command(&config, &["attr", "dcbm/nr_dma_chan=4"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("kept in {}", config.display())), "{}", stdout(&out));
    // Another process, as a user would run it next.
    assert_eq!(read_attr(&config, "dcbm/nr_dma_chan"), "4");
    assert_eq!(read_attr(&config, "migrate/pipelined"), "0");
    let v = listing(&config, None);
    assert_eq!(attribute(&v, "dcbm/nr_dma_chan")["value"], "4");
    assert_eq!(attribute(&v, "dcbm/nr_dma_chan")["source"], format!("{}:3", config.display()));
    assert_eq!(attribute(&v, "migrate/pipelined")["source"], format!("{}:2", config.display()));
    assert_eq!(attribute(&v, "mtcopy/threads")["source"], "default");
    assert_eq!(v["rejected"], serde_json::json!([]));
    // A second write replaces the line and keeps every other line and comment.
    let out = output(command(&config, &["attr", "/dcbm/nr_dma_chan=6"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&config).unwrap();
    assert_eq!(text, "# mine\nmigrate/pipelined = 0  # measured\ndcbm/nr_dma_chan = 6\n");
    assert_eq!(read_attr(&config, "dcbm/nr_dma_chan"), "6");
    // The engine's own settings hold too, in the migration itself.
    let out = output(command(&config, &["attr", "migrate/max_batch_pages=1024"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let out =
        output(command(&config, &["move", "--size", "4MiB", "--folio-size", "4KiB", "--to-node", &node(), "--json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["batch_pages"], 1024, "{v}");
    // No temporary file is left next to it.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Four `pagemig attr` processes keeping different settings in one file at the same
/// moment, three times over: each keeps its own (none reads the file while another
/// replaces it), every other line stays, and nothing is left beside the file.
#[test]
fn settings_kept_by_processes_at_once_are_all_kept() {
    let dir = temp_dir("concurrent");
    let config = dir.join("attrs");
    std::fs::write(&config, "# shared by several writers\n").unwrap();
    let settings = ["dcbm/nr_dma_chan", "mtcopy/threads", "migrate/max_batch_pages", "migrate/pipelined"];
    for round in 0..3 {
        let values =
            [format!("{}", 2 + round), format!("{}", 3 + round), format!("{}", 100 + round), format!("{}", round % 2)];
        let mut children: Vec<_> = settings
            .iter()
            .zip(&values)
            .map(|(path, value)| {
                let mut cmd = command(&config, &["attr", &format!("{path}={value}")]);
                cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
                cmd.spawn().unwrap()
            })
            .collect();
        for child in &mut children {
            assert!(wait(child, "pagemig attr").success(), "round {round}");
        }
        let v = listing(&config, None);
        for (path, value) in settings.iter().zip(&values) {
            assert_eq!(attribute(&v, path)["value"], value.as_str(), "round {round}: {path} lost");
        }
    }
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.starts_with("# shared by several writers\n") && text.lines().count() == 5, "{text}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pagemig_attrs_overrides_the_file() {
    let dir = temp_dir("env");
    let config = dir.join("attrs");
    std::fs::write(&config, "dcbm/nr_dma_chan = 4\nmtcopy/threads = 3\n").unwrap();
    let v = listing(&config, Some("dcbm/nr_dma_chan=7, migrate/mover=0"));
    assert_eq!(attribute(&v, "dcbm/nr_dma_chan")["value"], "7");
    assert_eq!(attribute(&v, "dcbm/nr_dma_chan")["source"], "PAGEMIG_ATTRS");
    assert_eq!(attribute(&v, "migrate/mover")["value"], "0");
    assert_eq!(attribute(&v, "mtcopy/threads")["value"], "3");
    assert_eq!(attribute(&v, "mtcopy/threads")["source"], format!("{}:2", config.display()));
    // Without it, the file's value.
    assert_eq!(attribute(&listing(&config, None), "dcbm/nr_dma_chan")["value"], "4");
    // Keeping a value that the variable overrides says so.
    let mut cmd = command(&config, &["attr", "dcbm/nr_dma_chan=5"]);
    cmd.env("PAGEMIG_ATTRS", "dcbm/nr_dma_chan=7");
    let out = output(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("overrides the file"), "{}", stderr(&out));
    assert_eq!(read_attr(&config, "dcbm/nr_dma_chan"), "5");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unset_removes_a_kept_value() {
    let dir = temp_dir("unset");
    let config = dir.join("attrs");
    std::fs::write(&config, "# keep me\nmtcopy/threads = 5\nbogus/path = 1\n").unwrap();
    assert_eq!(read_attr(&config, "mtcopy/threads"), "5");
    let out = output(command(&config, &["attr", "--unset", "mtcopy/threads"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("removed"), "{}", stdout(&out));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "# keep me\nbogus/path = 1\n");
    assert_eq!(read_attr(&config, "mtcopy/threads"), "2");
    assert_eq!(attribute(&listing(&config, None), "mtcopy/threads")["source"], "default");
    // Nothing left to remove: said, and not an error.
    let out = output(command(&config, &["attr", "--unset", "mtcopy/threads"]));
    assert!(out.status.success() && stdout(&out).contains("nothing to remove"), "{}", stdout(&out));
    // An entry the engine rejects as unknown can be removed.
    let out = output(command(&config, &["attr", "--unset", "bogus/path"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "# keep me\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_entries_are_reported_and_the_engine_opens() {
    let dir = temp_dir("bad");
    let config = dir.join("attrs");
    std::fs::write(
        &config,
        "not an entry\ndcbm/nr_dma_chan = 99\nno/such = 1\ndcbm/folios_migrated = 0\noffload/active = dcbm\n\
         migrate/pipelined = sometimes\nmtcopy/threads = 3\n",
    )
    .unwrap();
    let v = listing(&config, Some("migrate/max_batch_pages=0,junk"));
    let rejected: Vec<(String, String)> = v["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["source"].as_str().unwrap().to_string(), r["error"].as_str().unwrap().to_string()))
        .collect();
    let file = config.display().to_string();
    let at = |line: usize| format!("{file}:{line}");
    assert_eq!(rejected.len(), 8, "{rejected:#?}");
    for (i, (source, needle)) in [
        (at(1), "not `path = value`"),
        (at(2), "an integer from 1 to 16"),
        (at(3), "no such attribute"),
        (at(4), "counter"),
        (at(5), "read-only"),
        (at(6), "0 or 1"),
        ("PAGEMIG_ATTRS".into(), "from 1 to 262144"),
        ("PAGEMIG_ATTRS".into(), "not path=value"),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(rejected[i].0, source, "{rejected:#?}");
        assert!(rejected[i].1.contains(needle), "{}: {}", rejected[i].0, rejected[i].1);
    }
    // Rejected entries leave their attributes as they were; the good one applies.
    assert_eq!(attribute(&v, "dcbm/nr_dma_chan")["value"], "1");
    assert_eq!(attribute(&v, "migrate/max_batch_pages")["value"], "512");
    assert_eq!(attribute(&v, "mtcopy/threads")["value"], "3");
    // The engine opened: a migration runs, with the rejections on stderr.
    let out =
        output(command(&config, &["move", "--size", "4MiB", "--folio-size", "4KiB", "--to-node", &node(), "--json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("warning: {}: \"dcbm/nr_dma_chan=99\" not applied", at(2))),
        "{}",
        stderr(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["placement_ok"], true);
    // The table says where each rejection came from.
    let out = output(command(&config, &["attr"]));
    assert!(out.status.success());
    assert!(stdout(&out).contains(&format!("rejected: {}: \"no/such=1\"", at(3))), "{}", stdout(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writes_that_cannot_be_kept_are_refused() {
    let dir = temp_dir("refused");
    let config = dir.join("attrs");
    for (assignment, needle) in [
        ("dcbm/folios_migrated=0", "counter of each process"),
        ("mtcopy/folios_copied=0", "counter of each process"),
        ("offload/active=dcbm", "read-only"),
        ("dcbm/nr_dma_chan=17", "an integer from 1 to 16"),
        ("no/such=1", "no such attribute"),
    ] {
        let out = output(command(&config, &["attr", assignment]));
        assert_eq!(out.status.code(), Some(2), "{assignment}: {}", stdout(&out));
        assert!(stderr(&out).contains(needle), "{assignment}: {}", stderr(&out));
        assert!(!config.exists(), "{assignment} wrote the file");
    }
    // A file that cannot be written (its directory is a plain file): refused, saying
    // where settings are kept.
    std::fs::write(dir.join("plain"), "").unwrap();
    let unwritable = dir.join("plain/attrs");
    let out = output(command(&unwritable, &["attr", "dcbm/nr_dma_chan=4"]));
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("cannot") && err.contains("plain/attrs") && err.contains("PAGEMIG_CONFIG"), "{err}");
    assert!(err.contains("~/.config/pagemig/attrs"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn node_lists_as_numactl_takes_them() {
    let nodes = pagemig::numa::memory_nodes().unwrap();
    let missing = (nodes.iter().max().unwrap() + 1).to_string();
    let valid = nodes.iter().map(u32::to_string).collect::<Vec<_>>();
    let n = node();
    // A range, "all", and a list naming a node twice (a set, as numactl's mask).
    for list in [format!("{n}-{n}"), "all".into(), format!("{n},{n}")] {
        let out = pagemig(&["move", "--size", "4MiB", "--folio-size", "64KiB", "--to-node", &list, "--json"]);
        assert!(out.status.success(), "{list}: {}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let expect: Vec<u32> = if list == "all" { nodes.clone() } else { vec![n.parse().unwrap()] };
        assert_eq!(v["to_nodes"], serde_json::json!(expect), "{list}");
        assert_eq!((v["placement_ok"].clone(), v["misplaced_pages"].clone()), (true.into(), 0.into()), "{list}: {v}");
        assert_eq!(v["failed_folios"], 0);
    }
    // A node without memory, in a list: the kernel's ENODEV and the nodes that can be used.
    for flag in ["--to-node", "--from-node"] {
        let list = format!("{n},{missing}");
        let mut args = vec!["move", "--size", "4MiB", flag, &list];
        if flag == "--from-node" {
            args.extend(["--to-node", &n]);
        }
        let out = pagemig(&args);
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert!(err.contains(&format!("node {missing} is not an online node with memory")), "{err}");
        assert!(err.contains("ENODEV") && err.contains("No such device"), "{err}");
        assert!(err.contains(&format!("nodes with memory: {}", valid[0])), "{err}");
    }
    let out = pagemig(&["bench", "--quick", "--to-node", &missing]);
    assert!(!out.status.success() && stderr(&out).contains("ENODEV"), "{}", stderr(&out));
    // Where there are two nodes: folios spread round-robin, each checked on its node.
    if let [a, b, ..] = nodes[..] {
        let list = format!("{a},{b}");
        let out = pagemig(&[
            "move",
            "--size",
            "8MiB",
            "--folio-size",
            "4KiB",
            "--to-node",
            &list,
            "--writers",
            "1",
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["to_nodes"], serde_json::json!([a, b]));
        assert_eq!(v["placement_ok"], true, "{v}");
        let half = (8 << 20) / 4096 / 2;
        assert_eq!(v["placement"], serde_json::json!({ a.to_string(): half, b.to_string(): half }), "{v}");
        // One node is not a list for a flag that takes one.
        let out = pagemig(&["move", "--size", "4MiB", "--from-node", &list, "--to-node", &a.to_string()]);
        assert!(stderr(&out).contains("takes one node"), "{}", stderr(&out));
    }
}

#[test]
fn sizes_as_users_type_them() {
    let n = node();
    for (size, bytes) in [("1.5MiB", 3 << 19), ("0.5M", 1 << 19), ("2 mib", 2 << 20), ("512k", 512 << 10)] {
        let out = pagemig(&["move", "--size", size, "--folio-size", "4k", "--to-node", &n, "--json"]);
        assert!(out.status.success(), "{size}: {}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["bytes"], bytes, "{size}");
    }
    for (size, needle) in [
        ("1.3KiB", "1331.2 bytes, not a whole number of bytes"),
        ("99999999TiB", "too large"),
        ("4XB", "powers of 1000"),
        ("1,5M", "unknown unit"),
    ] {
        let out = pagemig(&["move", "--size", size, "--to-node", &n]);
        assert_eq!(out.status.code(), Some(2), "{size}");
        assert!(stderr(&out).contains(needle), "{size}: {}", stderr(&out));
    }
    let help = stdout(&pagemig(&["move", "--help"]));
    assert!(help.contains("powers of 1024") && help.contains("MB = 1000000 bytes"), "{help}");
}

/// The writing end of a pipe whose reading end is closed already: every write to it fails
/// with `EPIPE` (and raises `SIGPIPE`).
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2(2) writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2");
    // SAFETY: both descriptors were just created, and nothing else owns them.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    writer
}

/// Runs `args` with standard output a pipe whose reader has already exited.
fn into_closed_pipe(args: &[&str]) -> Output {
    let writer = closed_pipe();
    let mut cmd = command(&no_config(), args);
    let mut child = cmd.stdin(Stdio::null()).stdout(writer).stderr(Stdio::piped()).spawn().unwrap();
    let mut err = child.stderr.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    drop(cmd);
    let status = wait(&mut child, &format!("{args:?}"));
    Output { status, stdout: Vec::new(), stderr: drain.join().unwrap() }
}

#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    let n = node();
    for args in [
        vec!["attr"],
        vec!["attr", "--json"],
        vec!["attr", "dcbm/nr_dma_chan"],
        vec!["topology"],
        vec!["topology", "--json=compact"],
        vec!["move", "--size", "4MiB", "--to-node", &n, "--json"],
        vec!["move", "--size", "4MiB", "--to-node", &n],
        vec!["--help"],
    ] {
        let out = into_closed_pipe(&args);
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{args:?}: {:?}: {}", out.status, stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{args:?}: {}", stderr(&out));
    }
    // Standard error a closed pipe too (the error message of a bad flag): killed by the
    // signal as well, which a shell reports as 141.
    let writer = closed_pipe();
    let mut child =
        command(&no_config(), &["move", "--to-node", "bogus"]).stdout(Stdio::null()).stderr(writer).spawn().unwrap();
    assert_eq!(wait(&mut child, "move --to-node bogus").signal(), Some(libc::SIGPIPE));
}

#[test]
fn json_is_pretty_or_compact_by_flag() {
    for args in [vec!["topology"], vec!["attr"], vec!["move", "--size", "4MiB", "--to-node", &node()]] {
        let run = |style: &str| {
            let mut full = args.clone();
            full.push(style);
            let out = pagemig(&full);
            assert!(out.status.success(), "{full:?}: {}", stderr(&out));
            let text = stdout(&out);
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            (text, v)
        };
        let (pretty, v) = run("--json");
        assert!(pretty.lines().count() > 3 && pretty.contains("\n  \""), "{args:?}: {pretty}");
        let (explicit, _) = run("--json=pretty");
        assert!(explicit.lines().count() > 3, "{args:?}");
        let (compact, w) = run("--json=compact");
        assert_eq!(compact.lines().count(), 1, "{args:?}: {compact}");
        let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&v), keys(&w), "{args:?}");
    }
    let out = pagemig(&["topology", "--json=tight"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("compact"), "{}", stderr(&out));
}

#[test]
fn options_that_cannot_apply_are_refused() {
    let n = node();
    for (args, needle) in [
        (vec!["--pid", "1", "--size", "4MiB", "--writers", "2"], "--size and --writers do not apply with --pid"),
        (vec!["--pid", "1", "--folio-size", "4KiB"], "--folio-size does not apply with --pid"),
        (vec!["--pid", "1", "--reserve"], "--reserve does not apply with --pid"),
        (vec!["--pid", "1", "--migrator", "dcbm", "--seed", "1"], "--migrator and --seed do not apply with --pid"),
        (vec!["--pid", "1", "--no-agent", "--agent-timeout", "5"], "--agent-timeout does not apply with --no-agent"),
        (vec!["--size", "4MiB", "--migrator", "cpu", "--threads", "4"], "--threads does not apply to the cpu migrator"),
        (vec!["--size", "4MiB", "--threads", "4"], "--threads does not apply to the cpu migrator"),
        (vec!["--size", "4MiB", "--migrator", "cpu", "--channels", "4"], "--channels does not apply to the cpu"),
        (vec!["--size", "4MiB", "--migrator", "mtcopy", "--channels", "4"], "--channels is dcbm's"),
        (vec!["--size", "4MiB", "--migrator", "dcbm", "--threads", "2"], "--threads is mtcopy's"),
        (vec!["--size", "4MiB", "--migrator", "kernel", "--mode", "async"], "--mode does not apply to the kernel's"),
        (vec!["--size", "4MiB", "--migrator", "kernel", "--batch-pages", "64"], "--batch-pages does not apply"),
    ] {
        let mut full = vec!["move", "--to-node", &n];
        full.extend(args.iter().copied());
        let out = pagemig(&full);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // What does apply runs: mtcopy with its threads, a default left as it is.
    let out = pagemig(&["move", "--to-node", &n, "--size", "4MiB", "--migrator", "mtcopy", "--threads", "2", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_move_off_a_terminal_prints_its_result_and_nothing_else() {
    let out = pagemig(&["move", "--size", "8MiB", "--to-node", &node(), "--json=compact"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // No phase notes or bar on a pipe: one JSON line on stdout, nothing on stderr.
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}

#[test]
fn a_kernel_thread_has_no_mappings_and_no_negative_zero() {
    // Process 2 is kthreadd where the kernel shows it; its numa_maps is empty.
    if std::fs::read_to_string("/proc/2/numa_maps").map_or(true, |m| !m.is_empty()) {
        return;
    }
    let out = pagemig(&["placement", "--pid", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "process 2 has no user-space mappings");
    let out = pagemig(&["placement", "--pid", "2", "--json"]);
    assert!(out.status.success() && !stdout(&out).contains("-0"), "{}", stdout(&out));
}
