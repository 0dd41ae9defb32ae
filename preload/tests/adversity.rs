//! `libpagemig-preload.so` under programs that push on what a system call promises:
//! `move_pages` and `mbind` called from a signal handler while the program is inside
//! `malloc` (`signal_calls.c`), huge counts and a tight `RLIMIT_AS` (`capi/tests/limits.c`,
//! built for libnuma's `move_pages`), a first call about memory the program has just
//! unmapped (`freed_first.c`), first calls with nearly every mapping `vm.max_map_count`
//! allows taken (`map_limit.c`), `migrate_pages` of the whole process while its threads
//! store and check (`migrate_self.c`: on one node only its refusals and the kernel's path
//! run here; the two-node guest moves the pages, `vm/proofs/dropin`). Each answer is compared with the raw system call's by
//! the program itself; here, the program must exit 0 within its watchdog and write nothing
//! to standard error.
//!
//! Needs a C compiler and libnuma's headers (Debian `libnuma-dev`), as `libnuma.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one run may take: a deadlock is a failure, not a stalled suite.
const WATCHDOG: Duration = Duration::from_secs(60);

/// The preload library cargo built for this test (see `libnuma.rs`).
fn library() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let deps = exe.parent().expect("target/<profile>/deps");
    [deps, deps.parent().unwrap_or(deps)]
        .iter()
        .map(|d| d.join("libpagemig_preload.so"))
        .find(|lib| lib.exists())
        .unwrap_or_else(|| panic!("libpagemig_preload.so not built next to {}", exe.display()))
}

/// Compiles `source` (relative to the package) with `defines` into `name`.
fn compile(source: &str, name: &str, defines: &[&str]) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(source);
    let status = Command::new("cc")
        .args(["-O1", "-Wall", "-Wextra", "-Werror"])
        .args(defines)
        .arg(&src)
        .args(["-lnuma", "-o"])
        .arg(&out)
        .status()
        .expect("running cc (a C compiler is needed: apt-get install gcc)");
    assert!(status.success(), "cc failed on {} (libnuma-dev is needed)", src.display());
    out
}

/// Runs `program` under the preload, pagemig on, with the watchdog; its exit code, standard
/// output and standard error.
fn run_preloaded(program: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for var in ["PAGEMIG_ATTRS", "PAGEMIG_SUMMARY"] {
        cmd.env_remove(var);
    }
    cmd.env("PAGEMIG_CONFIG", PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-such-config"))
        .env("LD_PRELOAD", library())
        .env("PAGEMIG_PRELOAD", "1");
    let mut child = cmd.spawn().expect("running the program");
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("waiting for the program") {
            break status.code();
        }
        if start.elapsed() > WATCHDOG {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reading its output");
            panic!(
                "{} ran past {WATCHDOG:?} (deadlocked) and was killed; its output:\n{}",
                program.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("reading the program's output");
    (code, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn move_pages_and_mbind_from_a_signal_handler_interrupting_malloc() {
    let program = compile("tests/signal_calls.c", "signal_calls", &[]);
    let (code, stdout, stderr) = run_preloaded(&program, &["3"]);
    print!("{stdout}");
    assert_eq!(code, Some(0), "signal_calls failed:\n{stdout}\n{stderr}");
    assert_eq!(stderr, "", "signal_calls wrote to its standard error");
}

#[test]
fn huge_counts_and_a_tight_address_space_limit_get_the_kernels_answers() {
    let program = compile("../capi/tests/limits.c", "limits", &["-DLIMITS_MAIN"]);
    let (code, stdout, stderr) = run_preloaded(&program, &[]);
    print!("{stdout}");
    assert_eq!(code, Some(0), "limits failed:\n{stdout}\n{stderr}");
    assert_eq!(stderr, "", "limits wrote to its standard error");
}

/// The first calls of a process that holds every mapping `vm.max_map_count` allows but a
/// few (`map_limit.c`): with fewer free than pagemig needs to start, 1 to 16 of them, the
/// process aborted (an allocation of pagemig's or glibc's met the limit) before pagemig
/// probed for room when it starts.
#[test]
fn first_calls_at_the_map_count_limit_get_the_kernels_answers() {
    let program = compile("tests/map_limit.c", "map_limit", &[]);
    for headroom in ["0", "2", "8", "16", "63", "64", "100"] {
        let (code, stdout, stderr) = run_preloaded(&program, &[headroom]);
        print!("{stdout}");
        assert_eq!(code, Some(0), "map_limit {headroom} failed:\n{stdout}\n{stderr}");
        assert_eq!(stderr, "", "map_limit {headroom} wrote to its standard error");
    }
}

#[test]
fn a_first_call_about_memory_just_unmapped_gets_the_kernels_efault() {
    let program = compile("tests/freed_first.c", "freed_first", &[]);
    for call in ["move_pages", "mbind", "bad_node"] {
        let (code, stdout, stderr) = run_preloaded(&program, &[call]);
        print!("{stdout}");
        assert_eq!(code, Some(0), "freed_first {call} failed:\n{stdout}\n{stderr}");
        assert_eq!(stderr, "", "freed_first {call} wrote to its standard error");
    }
}

#[test]
fn migrate_pages_of_the_whole_process_while_threads_write_loses_nothing() {
    let program = compile("tests/migrate_self.c", "migrate_self", &["-pthread"]);
    let (code, stdout, stderr) = run_preloaded(&program, &["3"]);
    print!("{stdout}");
    assert_eq!(code, Some(0), "migrate_self failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("stores lost: 0"), "{stdout}");
    assert_eq!(stderr, "", "migrate_self wrote to its standard error");
}
