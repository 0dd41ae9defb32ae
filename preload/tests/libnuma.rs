//! `libpagemig-preload.so` under a C program built against libnuma (`libnuma_calls.c`):
//! every call compared with the kernel's, in runs without the library, with it loaded but
//! off, on, and on in a process without userfaultfd; and each run's summary checked for
//! which way the calls went.
//!
//! Needs a C compiler and libnuma's headers (Debian `libnuma-dev`), which `.ci/run`
//! installs. Each run of the program has a watchdog that kills it and fails the test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one run of the program may take (it takes well under a second).
const WATCHDOG: Duration = Duration::from_secs(120);

/// The preload library cargo built for this test: in the test's own `deps/` (where cargo
/// leaves it when building the tests) or next to it (after `cargo build`).
fn library() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let deps = exe.parent().expect("target/<profile>/deps");
    [deps, deps.parent().unwrap_or(deps)]
        .iter()
        .map(|d| d.join("libpagemig_preload.so"))
        .find(|lib| lib.exists())
        .unwrap_or_else(|| panic!("libpagemig_preload.so not built next to {}", exe.display()))
}

/// `libnuma_calls.c`, compiled once per test process.
fn program() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("libnuma_calls");
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libnuma_calls.c");
            let status = Command::new("cc")
                .args(["-O1", "-Wall", "-Wextra", "-Werror", "-pthread"])
                .arg(&src)
                .args(["-lnuma", "-ldl", "-o"])
                .arg(&out)
                .status()
                .expect("running cc (a C compiler is needed: apt-get install gcc)");
            assert!(status.success(), "cc failed on {} (libnuma-dev is needed)", src.display());
            out
        })
        .clone()
}

/// A run of the program: its exit status, standard output and, when asked, the summaries
/// its processes appended to a file.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    summaries: Vec<BTreeMap<String, String>>,
}

/// Runs the program with `args` and `env`, under the watchdog; with `preload`, under
/// `LD_PRELOAD` with the summary written to a file of its own.
fn run(name: &str, args: &[&str], preload: bool, env: &[(&str, &str)]) -> Run {
    let summary = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("summary-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&summary);
    let mut cmd = Command::new(program());
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for var in ["LD_PRELOAD", "PAGEMIG_PRELOAD", "PAGEMIG_ATTRS", "PAGEMIG_SUMMARY"] {
        cmd.env_remove(var);
    }
    // No config file: only what the test sets applies.
    cmd.env("PAGEMIG_CONFIG", PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-such-config"));
    if preload {
        cmd.env("LD_PRELOAD", library()).env("PAGEMIG_SUMMARY", &summary);
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("running libnuma_calls");
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("waiting for libnuma_calls") {
            break status.code();
        }
        if start.elapsed() > WATCHDOG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: libnuma_calls ran past {WATCHDOG:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("reading libnuma_calls' output");
    let text = std::fs::read_to_string(&summary).unwrap_or_default();
    let _ = std::fs::remove_file(&summary);
    Run {
        code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        summaries: parse_summaries(&text),
    }
}

/// The summaries of a file, each as its `label: value` lines (the heading's state under
/// `state`).
fn parse_summaries(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut out: Vec<BTreeMap<String, String>> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("pagemig-preload summary (pid ") {
            let (_, state) = rest.split_once("): ").expect("the heading names a state");
            out.push(BTreeMap::from([("state".to_string(), state.to_string())]));
        } else if let (Some(summary), Some((label, value))) = (out.last_mut(), line.split_once(": ")) {
            summary.insert(label.to_string(), value.to_string());
        }
    }
    out
}

/// The first number of a summary line (`12`, `3 calls, 40 pages`).
fn count(summary: &BTreeMap<String, String>, label: &str) -> u64 {
    let value = summary.get(label).unwrap_or_else(|| panic!("no {label:?} in the summary {summary:#?}"));
    value.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{label}: {value:?}"))
}

const WHOLE: [&str; 9] = [
    "disabled",
    "other process",
    "MPOL_MF_MOVE_ALL",
    "not a move (query, count 0, no MPOL_MF_MOVE, refused arguments)",
    "policy not single-node",
    "no userfaultfd",
    "process_vm_readv refused",
    "pagemig failed, kernel retried",
    "address-space or mapping-count limit",
];

fn whole(summary: &BTreeMap<String, String>, why: &str) -> u64 {
    count(summary, &format!("to the kernel whole, {why}"))
}

/// Every call of a summary went exactly one way: served, or to the kernel for one reason.
fn check_adds_up(s: &BTreeMap<String, String>) {
    let calls = count(s, "move_pages calls") + count(s, "mbind calls");
    let served = count(s, "served by pagemig, move_pages calls") + count(s, "served by pagemig, mbind calls");
    let kernel: u64 = WHOLE.iter().map(|w| whole(s, w)).sum();
    assert_eq!(calls, served + kernel, "calls do not add up in {s:#?}");
    assert_eq!(count(s, "panics caught"), 0);
}

/// The program's own process: the summary with the most calls (the forked children make a
/// call of each symbol).
fn main_summary(run: &Run) -> &BTreeMap<String, String> {
    run.summaries.iter().max_by_key(|s| count(s, "move_pages calls")).expect("a summary")
}

fn passed(name: &str, run: &Run) {
    assert_eq!(run.code, Some(0), "{name}: libnuma_calls failed\n{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.ends_with("PASS: 0 case(s) differ\n"), "{name}:\n{}", run.stdout);
    assert!(run.stderr.is_empty(), "{name} printed on stderr: {}", run.stderr);
}

#[test]
fn libnuma_calls_are_the_kernels_with_and_without_the_preload() {
    let plain = run("plain", &[], false, &[]);
    passed("plain", &plain);
    assert!(plain.summaries.is_empty());

    // Loaded but off: every call straight to the kernel, the engine never opened.
    let off = run("off", &[], true, &[]);
    passed("off", &off);
    assert_eq!(off.stdout, plain.stdout, "loaded but off, the program saw something else");
    // The program and its three forked children (the child that only holds pages ends
    // with _exit, which writes no summary).
    assert_eq!(off.summaries.len(), 4, "{:#?}", off.summaries);
    for s in &off.summaries {
        check_adds_up(s);
        assert!(s["state"].starts_with("disabled"));
        assert_eq!(s["engine"], "not opened");
        assert_eq!(whole(s, "disabled"), count(s, "move_pages calls") + count(s, "mbind calls"));
    }

    // On: the calls pagemig serves, and each other call's reason, counted as the program
    // makes them (libnuma_calls.c checks each call's way itself; these are its totals).
    let on =
        run("on", &[], true, &[("PAGEMIG_PRELOAD", "1"), ("PAGEMIG_ATTRS", "migrate/max_batch_pages=64, no/such=1")]);
    passed("on", &on);
    assert_eq!(on.stdout, plain.stdout, "with pagemig on, the program saw something else");
    assert_eq!(on.summaries.len(), 4, "{:#?}", on.summaries);
    on.summaries.iter().for_each(check_adds_up);
    let main = main_summary(&on);
    assert_eq!(main["state"], "enabled");
    assert_eq!(main["engine"], "opened");
    // 14 move_pages cases and 27 mbind cases, then 4 threads x 25 rounds of each.
    assert_eq!(count(main, "move_pages calls"), 14 + 100);
    assert_eq!(count(main, "mbind calls"), 27 + 100);
    assert_eq!(count(main, "served by pagemig, move_pages calls"), 4 + 100);
    assert_eq!(count(main, "served by pagemig, mbind calls"), 14 + 100);
    for (why, calls) in [
        ("disabled", 0),
        ("other process", 2),
        ("MPOL_MF_MOVE_ALL", 2),
        // mbind's refused arguments (a NULL mask, mode 99 among them) are refused by the
        // kernel's check before pagemig looks at the policy; a status array that cannot be
        // written goes to the kernel before anything moves.
        ("not a move (query, count 0, no MPOL_MF_MOVE, refused arguments)", 13),
        ("policy not single-node", 4),
        ("no userfaultfd", 0),
        ("process_vm_readv refused", 0),
        ("pagemig failed, kernel retried", 2),
    ] {
        assert_eq!(whole(main, why), calls, "{why}");
    }
    // Shared anonymous 2, shared file 2, private file 2, and the shared half of the mixed
    // range, twice; and the huge-page cases' pages in a huge page they cover only part of
    // (the kernel moves it whole): 256, 1 and 256 (the split one), where the kernel gave
    // them huge pages.
    let not_movable = count(main, "pages to the kernel, not movable by pagemig (mbind)");
    assert!([2 + 2 + 2 + 4 + 4, 2 + 2 + 2 + 4 + 4 + 256 + 1 + 256].contains(&not_movable), "{not_movable}");
    assert!(count(main, "pages to the kernel, not movable by pagemig (move_pages)") > 0);
    let pages = count(main, "pages moved by pagemig") + count(main, "pages already on their node");
    assert!(pages >= 100 * 32 * 2, "the threads' pages went through pagemig: {main:#?}");
    assert_eq!(count(main, "attributes applied"), 1);
    assert_eq!(count(main, "attributes rejected"), 1);
    assert!(main["first attribute rejected"].starts_with("no/such=1"));
    // Each forked child opened an engine of its own, applied the attributes again, and
    // served its one call of each symbol.
    for child in on.summaries.iter().filter(|s| !std::ptr::eq(*s, main)) {
        assert_eq!(child["engine"], "opened", "{child:#?}");
        assert_eq!(count(child, "served by pagemig, move_pages calls"), 1);
        assert_eq!(count(child, "served by pagemig, mbind calls"), 1);
        assert_eq!(count(child, "attributes applied"), 1);
    }
}

#[test]
fn without_userfaultfd_every_call_goes_to_the_kernel() {
    let plain = run("plain-no-uffd", &["--no-userfaultfd"], false, &[]);
    passed("plain-no-uffd", &plain);
    let on = run("on-no-uffd", &["--no-userfaultfd"], true, &[("PAGEMIG_PRELOAD", "1")]);
    passed("on-no-uffd", &on);
    assert_eq!(on.stdout, plain.stdout);
    assert_eq!(on.summaries.len(), 4, "{:#?}", on.summaries);
    for s in &on.summaries {
        check_adds_up(s);
        assert_eq!(s["engine"], "not opened");
        assert_eq!(count(s, "served by pagemig, move_pages calls") + count(s, "served by pagemig, mbind calls"), 0);
        assert_eq!(whole(s, "pagemig failed, kernel retried"), 0);
        assert!(whole(s, "no userfaultfd") > 0, "{s:#?}");
    }
}

#[test]
fn the_summary_goes_to_stderr_when_asked_and_nowhere_otherwise() {
    let quiet = run("quiet", &[], true, &[("PAGEMIG_PRELOAD", "1"), ("PAGEMIG_SUMMARY", "0")]);
    passed("quiet", &quiet);
    let loud = run("loud", &[], true, &[("PAGEMIG_PRELOAD", "1"), ("PAGEMIG_SUMMARY", "1")]);
    assert_eq!(loud.code, Some(0), "{}", loud.stdout);
    assert_eq!(loud.stderr.matches("pagemig-preload summary (pid ").count(), 4, "{}", loud.stderr);
    assert_eq!(parse_summaries(&loud.stderr).len(), 4);
}
