//! `pagemig-target`: a program to migrate from outside with `pagemig move --pid`, which
//! checks its own memory all the while.
//!
//! It fills a buffer (`--size`, on `--on-node` if given): the first half once with a
//! fixed pattern that a checker thread keeps reading, the second half again and again by
//! `--writers` threads, each of which reads back every pass it wrote. Any word found
//! different from what was written is corruption. It prints
//! `pagemig-target pid=PID range=START-END size=BYTES agent=@NAME|off` and `ready`, then
//! obeys commands on standard input, one per line, answering each on one line:
//!
//! - `check`: `check ok passes=N` or `check CORRUPT words=N first=…`;
//! - `selfmove NODE`: migrates the buffer itself with `Engine::move_range` (the engine
//!   still works after an outside migration): `selfmove ok pages=N on_node=N errors=N`;
//! - `fork`: a child checks the pattern it inherited and exits: `fork ok child=PID`;
//! - `forkagent MS`: a child starts an agent of its own, prints `forkagent child=PID
//!   agent=@NAME`, serves for MS milliseconds, checks the pattern and exits;
//! - `quit` (or the end of input): stops, checks, prints `done ok …` or `done CORRUPT …`.
//!
//! With `--churn` a further thread keeps doing to memory of its own what allocators do,
//! while the process is moved: it maps 4 MiB, fills it, then unmaps a quarter of it, moves
//! a quarter elsewhere with `mremap`, makes a quarter read-only or purges a quarter with
//! `MADV_DONTNEED` (in turn), checks every word of what is left, and unmaps it. A word
//! found different is corruption too; `churns=N` in the verdict counts the rounds.
//!
//! With `--seconds N` it reads no commands and quits after N seconds. It exits 0 when
//! nothing was corrupted, 1 when something was, 2 on bad options.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use pagemig::{Engine, MigrateOptions, ThpAdvice};

const STATIC_TAG: u64 = 0x5eed << 48;

fn pattern(i: usize) -> u64 {
    STATIC_TAG | i as u64
}

fn generation(pass: u64, i: usize) -> u64 {
    (pass << 40) | i as u64
}

struct Opts {
    size: usize,
    writers: usize,
    agent: bool,
    reserve: usize,
    on_node: Option<u32>,
    seconds: Option<u64>,
    churn: bool,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o =
        Opts { size: 64 << 20, writers: 2, agent: false, reserve: 0, on_node: None, seconds: None, churn: false };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--size" => o.size = pagemig_size(&value()?)?,
            "--writers" => o.writers = value()?.parse().map_err(|e| format!("--writers: {e}"))?,
            "--agent" => o.agent = true,
            "--churn" => o.churn = true,
            "--reserve" => o.reserve = pagemig_size(&value()?)?,
            "--on-node" => o.on_node = Some(value()?.parse().map_err(|e| format!("--on-node: {e}"))?),
            "--seconds" => o.seconds = Some(value()?.parse().map_err(|e| format!("--seconds: {e}"))?),
            _ => {
                return Err(format!(
                    "unknown option {a:?} (--size BYTES[KiB|MiB|GiB] --writers N --agent --reserve SIZE --on-node N \
                     --seconds N --churn)"
                ));
            }
        }
    }
    if o.size < 2 * 4096 * (o.writers + 1) {
        return Err(format!("--size {} is too small for {} writers", o.size, o.writers));
    }
    pagemig_cli::experiment::check_writers(o.writers).map_err(|e| e.to_string())?;
    // The buffer and the reserve, each held whole.
    let needed = o.size as u64 + o.reserve as u64;
    let (available, source) = pagemig_cli::experiment::available_memory();
    if needed > available {
        return Err(format!(
            "--size and --reserve need {needed} bytes of memory but {available} are available ({source}); use a \
             smaller --size"
        ));
    }
    Ok(o)
}

fn pagemig_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: usize = t[..split].parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult = match t[split..].to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        u => return Err(format!("{s:?}: unknown unit {u:?}")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

struct Shared {
    buf: Vec<AtomicU64>,
    half: usize,
    stop: AtomicBool,
    corrupt: AtomicU64,
    passes: AtomicU64,
    first_bad: first_bad::Slot,
    churns: AtomicU64,
    churn_bad: AtomicU64,
}

/// A first-error slot without a lock a forked child could inherit held.
mod first_bad {
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The index and value of the first bad word (index + 1; 0: none).
    #[derive(Default)]
    pub struct Slot {
        index: AtomicU64,
        value: AtomicU64,
    }

    impl Slot {
        pub fn record(&self, index: usize, value: u64) {
            if self.index.compare_exchange(0, index as u64 + 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                self.value.store(value, Ordering::Release);
            }
        }

        pub fn describe(&self) -> String {
            match self.index.load(Ordering::Acquire) {
                0 => "none".into(),
                i => format!("word{}={:#x}", i - 1, self.value.load(Ordering::Acquire)),
            }
        }
    }
}

impl Shared {
    /// Words of the fixed half that differ from the pattern (reads only: safe in a child).
    fn check_static(&self) -> u64 {
        let mut bad = 0;
        for (i, w) in self.buf[..self.half].iter().enumerate() {
            let v = w.load(Ordering::Relaxed);
            if v != pattern(i) {
                bad += 1;
                self.first_bad.record(i, v);
            }
        }
        bad
    }

    fn verdict(&self) -> String {
        let churn_bad = self.churn_bad.load(Ordering::Relaxed);
        let bad = self.corrupt.load(Ordering::Relaxed) + self.check_static() + churn_bad;
        let churns = self.churns.load(Ordering::Relaxed);
        if bad == 0 {
            format!("ok passes={} churns={churns}", self.passes.load(Ordering::Relaxed))
        } else {
            format!("CORRUPT words={bad} first={} churned_words={churn_bad}", self.first_bad.describe())
        }
    }

    fn range(&self) -> (usize, usize) {
        let start = self.buf.as_ptr() as usize;
        (start, start + self.buf.len() * 8)
    }
}

fn writer(s: &Shared, from: usize, to: usize) {
    let mut pass = 0;
    while !s.stop.load(Ordering::Relaxed) {
        pass += 1;
        for i in from..to {
            s.buf[i].store(generation(pass, i), Ordering::Relaxed);
        }
        for i in from..to {
            let v = s.buf[i].load(Ordering::Relaxed);
            if v != generation(pass, i) {
                s.corrupt.fetch_add(1, Ordering::Relaxed);
                s.first_bad.record(i, v);
            }
        }
        s.passes.fetch_add(1, Ordering::Relaxed);
    }
}

/// What `--churn` does, round after round, until the process stops (see the crate docs).
#[expect(unsafe_code, reason = "maps, changes and unmaps memory of its own")]
fn churner(s: &Shared) {
    const LEN: usize = 4 << 20;
    const Q: usize = LEN / 4;
    let word = |round: u64, i: usize| (round << 40) | (0xc4 << 32) | i as u64;
    let mut round = 0u64;
    while !s.stop.load(Ordering::Relaxed) {
        round += 1;
        // SAFETY: a fresh private anonymous mapping of this thread's own.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let base = p as usize;
        let at = |a: usize| a as *mut u64;
        for i in 0..LEN / 8 {
            // SAFETY: inside the mapping just made.
            unsafe { at(base + i * 8).write_volatile(word(round, i)) };
        }
        // The changed quarter, the second one; where its data went for `mremap`.
        let changed = base + Q;
        let (mut moved, mut purged, mut gone) = (None, false, false);
        // SAFETY: each call changes the second quarter of the mapping above, this thread's.
        unsafe {
            match round % 4 {
                0 => gone = libc::munmap(changed as *mut _, Q) == 0,
                1 => {
                    let q = libc::mremap(changed as *mut _, Q, Q, libc::MREMAP_MAYMOVE);
                    if q != libc::MAP_FAILED {
                        moved = Some(q as usize);
                    }
                }
                2 => _ = libc::mprotect(changed as *mut _, Q, libc::PROT_READ),
                _ => purged = libc::madvise(changed as *mut _, Q, libc::MADV_DONTNEED) == 0,
            }
        }
        let mut bad = 0u64;
        for i in 0..LEN / 8 {
            let a = base + i * 8;
            let in_changed = (changed..changed + Q).contains(&a);
            let (addr, want) = match (in_changed, moved) {
                (false, _) => (a, word(round, i)),
                (true, Some(q)) => (q + (a - changed), word(round, i)),
                (true, None) if gone => continue,
                (true, None) => (a, if purged { 0 } else { word(round, i) }),
            };
            // SAFETY: a mapped, readable word of this thread's mapping (or where `mremap`
            // moved it).
            if unsafe { at(addr).read_volatile() } != want {
                bad += 1;
            }
        }
        s.churn_bad.fetch_add(bad, Ordering::Relaxed);
        // SAFETY: what is left of this round's mappings, this thread's only. Where the
        // second quarter was unmapped or moved away, another thread (pagemig's own) may have
        // mapped something there since: only the quarters still this thread's are unmapped.
        unsafe {
            if gone || moved.is_some() {
                libc::munmap(p, Q);
                libc::munmap((changed + Q) as *mut _, LEN - 2 * Q);
            } else {
                libc::munmap(p, LEN);
            }
            if let Some(q) = moved {
                libc::munmap(q as *mut _, Q);
            }
        }
        s.churns.fetch_add(1, Ordering::Relaxed);
    }
}

#[expect(unsafe_code, reason = "fork(2) and _exit(2) for the children that check inherited memory")]
fn fork_child(s: &Shared, serve: Option<Duration>) -> Result<i32, String> {
    // SAFETY: the child touches only memory it inherited (the buffer, read-only atomics),
    // starts the agent (allocating: glibc's malloc is fork-safe) and ends with `_exit`,
    // never returning into code that expects the parent's threads.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        return Ok(pid);
    }
    if let Some(serve) = serve {
        match pagemig::agent::start() {
            Ok(a) => println!("forkagent child={} agent={}", std::process::id(), a.socket()),
            Err(e) => println!("forkagent error {e}"),
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(serve);
    }
    let code = if s.check_static() == 0 { 0 } else { 1 };
    // SAFETY: ends the child at once, without running the parent's exit handlers.
    unsafe { libc::_exit(code) }
}

#[expect(unsafe_code, reason = "waitpid(2) for a child forked here")]
fn wait_child(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: `status` is a valid local; `pid` is a child of this process.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r == pid && libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 }
}

fn command(s: &Shared, line: &str, children: &mut Vec<i32>) -> String {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("check"), None) => format!("check {}", s.verdict()),
        (Some("selfmove"), Some(node)) => {
            let Ok(node) = node.parse::<u32>() else { return format!("selfmove error node {node:?}") };
            let (start, end) = s.range();
            let moved = Engine::global().and_then(|e| {
                // SAFETY: this thread does not touch the buffer during the call; the writers
                // and the checker may, and wait while their pages move.
                unsafe { e.move_range(start, end - start, node, &MigrateOptions::default()) }
            });
            match moved {
                Ok(o) => format!(
                    "selfmove ok pages={} on_node={} errors={}",
                    o.status.len(),
                    o.pages_on(node),
                    o.errors().count()
                ),
                Err(e) => format!("selfmove error {e}"),
            }
        }
        (Some("fork"), None) => match fork_child(s, None) {
            Ok(pid) => match wait_child(pid) {
                0 => format!("fork ok child={pid}"),
                code => format!("fork CORRUPT child={pid} exit={code}"),
            },
            Err(e) => format!("fork error {e}"),
        },
        (Some("forkagent"), Some(ms)) => {
            let Ok(ms) = ms.parse::<u64>() else { return format!("forkagent error {ms:?}") };
            match fork_child(s, Some(Duration::from_millis(ms))) {
                // The child answers for itself.
                Ok(pid) => {
                    children.push(pid);
                    String::new()
                }
                Err(e) => format!("forkagent error {e}"),
            }
        }
        _ => format!("unknown command {line:?} (check, selfmove NODE, fork, forkagent MS, quit)"),
    }
}

/// A new thread's first steps before the target says `ready`: its first allocation (which
/// makes the thread's malloc arena, two mappings), then the wait for the others.
fn settle(started: &std::sync::Barrier) {
    drop(std::hint::black_box(Box::new(0u64)));
    started.wait();
}

fn main() -> std::process::ExitCode {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("pagemig-target: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(n) = opts.on_node
        && let Err(e) = pagemig::sys::set_mempolicy_bind(Some(n))
    {
        eprintln!("pagemig-target: binding to node {n}: {e}");
        return std::process::ExitCode::from(2);
    }
    let words = opts.size / 8;
    let half = words / 2;
    let buf: Vec<AtomicU64> = (0..words).map(|i| AtomicU64::new(if i < half { pattern(i) } else { 0 })).collect();
    if opts.on_node.is_some() {
        let _ = pagemig::sys::set_mempolicy_bind(None);
    }
    let shared = Arc::new(Shared {
        buf,
        half,
        stop: AtomicBool::new(false),
        corrupt: AtomicU64::new(0),
        passes: AtomicU64::new(0),
        first_bad: Default::default(),
        churns: AtomicU64::new(0),
        churn_bad: AtomicU64::new(0),
    });
    let agent = if opts.agent {
        match pagemig::agent::start() {
            Ok(a) => a.socket(),
            Err(e) => {
                eprintln!("pagemig-target: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    } else {
        "off".into()
    };
    if opts.reserve > 0 {
        let node = opts.on_node.unwrap_or_else(|| pagemig::numa::memory_nodes().map_or(0, |n| n[0]));
        let reserved = Engine::global().and_then(|e| e.reserve(node, opts.reserve, ThpAdvice::Default).map(|()| e));
        match reserved {
            Ok(e) if e.wait_reserved(Duration::from_secs(60)) => {}
            Ok(_) => eprintln!("pagemig-target: the reserve was not full after 60 s"),
            Err(e) => eprintln!("pagemig-target: reserve: {e}"),
        }
    }
    let mut threads = Vec::new();
    let stripe = (words - half) / opts.writers.max(1);
    let started = Arc::new(std::sync::Barrier::new(opts.writers + usize::from(opts.churn) + 2));
    for w in 0..opts.writers {
        let s = shared.clone();
        let (from, to) = (half + w * stripe, if w + 1 == opts.writers { words } else { half + (w + 1) * stripe });
        let started = started.clone();
        threads.push(std::thread::spawn(move || {
            settle(&started);
            writer(&s, from, to)
        }));
    }
    if opts.churn {
        let s = shared.clone();
        let started = started.clone();
        threads.push(std::thread::spawn(move || {
            settle(&started);
            churner(&s)
        }));
    }
    let checker = shared.clone();
    let checker_started = started.clone();
    threads.push(std::thread::spawn(move || {
        settle(&checker_started);
        while !checker.stop.load(Ordering::Relaxed) {
            let bad = checker.check_static();
            checker.corrupt.fetch_add(bad, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
    }));
    // Every thread has started and made its malloc arena: the mappings a caller sees after
    // `ready` stay as they are.
    started.wait();
    let (start, end) = shared.range();
    println!(
        "pagemig-target pid={} range={:#x}-{:#x} size={} agent={agent}",
        std::process::id(),
        start & !4095,
        end.next_multiple_of(4096),
        opts.size
    );
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut children = Vec::new();
    match opts.seconds {
        Some(secs) => std::thread::sleep(Duration::from_secs(secs)),
        None => {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if line.trim() == "quit" {
                    break;
                }
                let reply = command(&shared, line.trim(), &mut children);
                if !reply.is_empty() {
                    println!("{reply}");
                }
                let _ = std::io::stdout().flush();
            }
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // A child that found its memory changed exits 1; one ended by a signal found nothing.
    let children_ok = children.iter().all(|&pid| wait_child(pid) != 1);
    let verdict = shared.verdict();
    println!("done {verdict}{}", if children_ok { "" } else { " children=CORRUPT" });
    let _ = std::io::stdout().flush();
    if verdict.starts_with("ok") && children_ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
