//! `pagemig move --pid` and `pagemig placement --pid` against a running program
//! (`pagemig-target`) that checks its own memory while it is migrated: through its agent,
//! through the kernel without one, refused for another user, with malformed requests and
//! while the program forks.
//!
//! On a host with one node every page is already home; the tests prove the paths, the
//! reports, the permissions and that no byte changes. Run on two nodes (the target with
//! `--on-node 0`, the moves `--to-node 1`), the same commands move the memory.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

fn node() -> u32 {
    pagemig::numa::memory_nodes().unwrap()[0]
}

/// Runs `body` on a thread of its own and fails the test if it takes over `secs` (the
/// library's tests' watchdog).
fn watchdog(secs: u64, body: impl FnOnce() + Send + 'static) {
    common::watchdog(Duration::from_secs(secs), "the test's body", body);
}

/// A running `pagemig-target`, killed when dropped.
struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pid: u32,
    range: String,
}

impl Target {
    fn spawn(args: &[&str]) -> Target {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pagemig-target"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start pagemig-target");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut t = Target { child, stdin, lines, pid: 0, range: String::new() };
        let header = t.expect("pagemig-target ");
        let field = |k: &str| header.split(' ').find_map(|w| w.strip_prefix(k)).unwrap().to_string();
        t.pid = field("pid=").parse().unwrap();
        t.range = field("range=");
        t.expect("ready");
        t
    }

    /// The next line starting with `prefix` (earlier lines are dropped).
    fn expect(&self, prefix: &str) -> String {
        loop {
            let line = self.lines.recv_timeout(Duration::from_secs(120)).expect("a line from the target");
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    fn ask(&mut self, command: &str, reply: &str) -> String {
        writeln!(self.stdin.as_mut().unwrap(), "{command}").unwrap();
        self.expect(reply)
    }

    /// Ends the target: its last verdict, and whether it exited 0.
    fn quit(mut self) -> (String, bool) {
        drop(self.stdin.take());
        let done = self.expect("done ");
        (done, self.child.wait().unwrap().success())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pagemig(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pagemig")).args(args).output().expect("run pagemig")
}

fn move_pid(pid: u32, extra: &[&str]) -> (serde_json::Value, std::process::Output) {
    let mut args: Vec<String> =
        ["move", "--pid", &pid.to_string(), "--to-node", &node().to_string(), "--json"].map(String::from).to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = pagemig(&args);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (v, out)
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

fn adds_up(v: &serde_json::Value) -> bool {
    n(v, "pages")
        == [
            "moved_pagemig",
            "moved_kernel",
            "already_there",
            "not_selected",
            "absent",
            "failed",
            "internal",
            "not_reached",
        ]
        .iter()
        .map(|k| n(v, k))
        .sum::<u64>()
}

fn range_of(text: &str) -> (u64, u64) {
    let (a, b) = text.split_once('-').unwrap();
    let hex = |x: &str| u64::from_str_radix(x.trim_start_matches("0x"), 16).unwrap();
    (hex(a), hex(b))
}

/// Whether every mapping `placement --pid --all` shows of process `pid` is in a line of
/// `detail` (lines start with their range, `start-end`, in address order).
fn every_mapping_is_listed(pid: u32, detail: &[&str]) {
    let out = pagemig(&["placement".into(), "--pid".into(), pid.to_string(), "--json".into()]);
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ranges: Vec<(u64, u64)> = detail.iter().map(|d| range_of(d.split(' ').next().unwrap())).collect();
    assert!(ranges.windows(2).all(|w| w[0].0 <= w[1].0), "not in address order: {detail:#?}");
    let maps = p["mappings"].as_array().unwrap();
    // Mappings made or gone since the move (a thread's arena) may differ: nearly all.
    let listed = maps.iter().filter(|m| ranges.iter().any(|&(s, e)| s <= n(m, "start") && n(m, "start") < e)).count();
    assert!(listed + 2 >= maps.len() && maps.len() > 10, "{listed} of {} mappings in {detail:#?}", maps.len());
}

#[test]
fn move_pid_through_the_agent_keeps_every_byte_and_the_engine_working() {
    watchdog(300, || {
        let mut t = Target::spawn(&["--size", "32MiB", "--writers", "2", "--agent", "--reserve", "4MiB"]);
        let (v, out) = move_pid(t.pid, &["--detail"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(v["path"], "agent", "{v}");
        assert!(adds_up(&v), "{v}");
        assert_eq!(n(&v, "failed"), 0, "{v}");
        // The prepared reserve is the engine's: left alone, never migrated.
        assert!(n(&v, "internal") >= (4 << 20) / 4096, "{v}");
        assert!(v["mappings"]["pagemig"].as_u64().unwrap() >= 1, "{v}");
        let (start, end) = range_of(&t.range);
        let routes: Vec<&str> = v["detail"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
        let buffer = routes.iter().find(|d| {
            let (s, e) = range_of(d.split(' ').next().unwrap());
            s <= start + 4096 && end - 4096 <= e
        });
        assert!(buffer.is_some_and(|d| d.contains(" pagemig ")), "the buffer's route: {buffer:?} in {routes:#?}");
        assert!(routes.iter().any(|d| d.contains(" internal ")), "{routes:#?}");
        // Every mapping of the process is listed, those the agent does not move too.
        assert!(routes.iter().any(|d| d.contains(" none moved=0 file ")), "{routes:#?}");
        every_mapping_is_listed(t.pid, &routes);
        // A range, as /proc/PID/maps prints it, through the agent: every page of it.
        let (r, out) = move_pid(t.pid, &["--range", &t.range, "--from-node", &node().to_string()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(r["path"], "agent", "{r}");
        assert_eq!(n(&r, "pages"), (end - start) / 4096, "{r}");
        assert!(adds_up(&r) && n(&r, "failed") == 0, "{r}");
        assert!(t.ask("check", "check ").starts_with("check ok"), "the target saw corruption");
        // The engine inside still migrates after the agent's moves.
        let selfmove = t.ask(&format!("selfmove {}", node()), "selfmove ");
        assert!(selfmove.starts_with("selfmove ok") && selfmove.ends_with("errors=0"), "{selfmove}");
        // Where the memory is, as numastat -p would say: the buffer on the node asked for.
        let out = pagemig(&["placement".into(), "--pid".into(), t.pid.to_string(), "--json".into()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let maps = p["mappings"].as_array().unwrap();
        let buf = maps
            .iter()
            .find(|m| n(m, "start") <= start + 4096 && start + 4096 < n(m, "end"))
            .unwrap_or_else(|| panic!("no mapping holds the buffer in {p}"));
        let pages = buf["pages"].as_object().unwrap();
        assert_eq!(pages.keys().collect::<Vec<_>>(), vec![&node().to_string()], "{buf}");
        assert!(pages[&node().to_string()].as_u64().unwrap() >= (end - start) / 4096 - 1, "{buf}");
        assert!(p["totals_mib"]["Total"][node().to_string()].as_f64().unwrap() >= 32.0, "{p}");
        let (done, ok) = t.quit();
        assert!(ok && done.starts_with("done ok"), "{done}");
    });
}

#[test]
fn move_pid_without_an_agent_takes_the_kernel_path_and_says_why() {
    watchdog(300, || {
        let t = Target::spawn(&["--size", "16MiB", "--writers", "1"]);
        let (v, out) = move_pid(t.pid, &["--detail"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(v["path"], "kernel", "{v}");
        // Every mapping, with its pages per node before and after the kernel's call.
        let detail: Vec<&str> = v["detail"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
        assert!(detail.iter().all(|d| d.contains(" kernel moved=")), "{detail:#?}");
        assert!(detail.iter().any(|d| d.contains(" -> N")), "{detail:#?}");
        every_mapping_is_listed(t.pid, &detail);
        assert_eq!(v["syscall"], "migrate_pages", "{v}");
        assert!(v["why"].as_str().unwrap().contains("no agent listening"), "{v}");
        assert_eq!(n(&v, "not_moved"), 0, "{v}");
        assert!(v["after_mib"][node().to_string()].as_f64().unwrap() >= 16.0, "{v}");
        let (r, out) = move_pid(t.pid, &["--range", &t.range]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!((r["path"].as_str(), r["syscall"].as_str()), (Some("kernel"), Some("move_pages")), "{r}");
        let (start, end) = range_of(&t.range);
        assert_eq!(n(&r, "pages"), (end - start) / 4096, "{r}");
        assert!(adds_up(&r) && n(&r, "failed") == 0, "{r}");
        // The table says the same in words.
        let out = pagemig(&["move", "--pid", &t.pid.to_string(), "--to-node", &node().to_string()].map(String::from));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("kernel (no agent listening on @pagemig-agent.") && text.contains("migrate_pages"),
            "{text}"
        );
        let (done, ok) = t.quit();
        assert!(ok && done.starts_with("done ok"), "{done}");
    });
}

#[test]
fn another_user_is_refused_as_the_kernel_would_refuse_it() {
    watchdog(300, || {
        let nobody = 65534;
        // SAFETY: getuid has no preconditions.
        let root = unsafe { libc::getuid() } == 0;
        if !root {
            // Not root: the kernel path against a process of root's is refused, clearly.
            let (_, out) = move_pid(1, &["--no-agent"]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(err.contains("not permitted") || err.contains("no process"), "{err}");
            return;
        }
        let t = Target::spawn(&["--size", "8MiB", "--writers", "1", "--agent"]);
        let as_nobody = |extra: &[&str]| {
            use std::os::unix::process::CommandExt;
            let mut args = vec!["move", "--pid"];
            let pid = t.pid.to_string();
            let node = node().to_string();
            args.extend([pid.as_str(), "--to-node", node.as_str()]);
            args.extend(extra);
            Command::new(env!("CARGO_BIN_EXE_pagemig")).args(&args).uid(nobody).gid(nobody).output()
        };
        match as_nobody(&[]) {
            // The binary may not be reachable by that user here: nothing to prove then.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: uid {nobody} cannot run the binary ({e})");
            }
            Err(e) => panic!("{e}"),
            Ok(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(2), "{err}");
                assert!(err.contains("refused") && err.contains("CAP_SYS_PTRACE"), "{err}");
                let out = as_nobody(&["--no-agent"]).unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(2), "{err}");
                assert!(err.contains("not permitted"), "{err}");
            }
        }
        // The owner is served, and the target's memory is as it was.
        let (v, _) = move_pid(t.pid, &[]);
        assert_eq!(v["path"], "agent", "{v}");
        let (done, ok) = t.quit();
        assert!(ok && done.starts_with("done ok"), "{done}");
    });
}

#[test]
fn malformed_requests_get_errors_and_the_agent_goes_on() {
    watchdog(120, || {
        let mut t = Target::spawn(&["--size", "4MiB", "--writers", "1", "--agent"]);
        let send = |text: &[u8]| {
            let name = format!("pagemig-agent.{}", t.pid);
            let mut s = UnixStream::connect_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let _ = s.write_all(text);
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            reply
        };
        for (request, says) in [
            (&b"GET / HTTP/1.1\n"[..], "starts with"),
            (b"pagemig-agent 1 move to=0 to=1\n", "twice"),
            (b"pagemig-agent 1 move to=0 range=0x2000-0x1000\n", "reversed"),
            (b"pagemig-agent 1 move\n", "needs to=NODE"),
            (b"pagemig-agent 7 ping\n", "version 1"),
            (b"pagemig-agent 1 move to=0", "newline"),
        ] {
            let reply = send(request);
            assert!(reply.starts_with("pagemig-agent 1 error errno=") && reply.contains(says), "{reply}");
        }
        assert!(send(b"pagemig-agent 1 ping\n").starts_with(&format!("pagemig-agent 1 ok pid={}\n", t.pid)));
        let (v, _) = move_pid(t.pid, &[]);
        assert_eq!(v["path"], "agent", "{v}");
        // A range on the command line is checked before anything is sent.
        let (_, out) = move_pid(t.pid, &["--range", "0x3000-0x1000"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("empty or reversed"));
        assert!(t.ask("check", "check ").starts_with("check ok"));
        let (done, ok) = t.quit();
        assert!(ok && done.starts_with("done ok"), "{done}");
    });
}

#[test]
fn requests_while_the_target_forks_and_a_childs_own_agent() {
    watchdog(300, || {
        let mut t = Target::spawn(&["--size", "16MiB", "--writers", "2", "--agent"]);
        let pid = t.pid;
        let mover = std::thread::spawn(move || {
            (0..4)
                .map(|_| {
                    let (v, out) = move_pid(pid, &[]);
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                    v
                })
                .collect::<Vec<_>>()
        });
        for _ in 0..10 {
            let fork = t.ask("fork", "fork ");
            assert!(fork.starts_with("fork ok"), "{fork}");
        }
        for v in mover.join().unwrap() {
            assert!(v["path"] == "agent" && adds_up(&v) && n(&v, "failed") == 0, "{v}");
        }
        // A child does not answer for its parent: it starts an agent of its own.
        let line = t.ask("forkagent 20000", "forkagent ");
        let child: u32 = line.split(' ').find_map(|w| w.strip_prefix("child=")).unwrap().parse().unwrap();
        assert!(line.ends_with(&format!("agent=@pagemig-agent.{child}")), "{line}");
        let (c, _) = move_pid(child, &[]);
        assert_eq!(c["path"], "agent", "{c}");
        assert!(adds_up(&c) && n(&c, "failed") == 0, "{c}");
        let pong = pagemig::agent::ping(child, Duration::from_secs(30)).unwrap();
        assert_eq!(pong, child);
        assert_eq!(pagemig::agent::ping(pid, Duration::from_secs(30)).unwrap(), pid);
        // SAFETY: kill has no memory preconditions; the child is the target's, which waits for it.
        unsafe { libc::kill(child as i32, libc::SIGTERM) };
        assert!(t.ask("check", "check ").starts_with("check ok"));
        let (done, ok) = t.quit();
        assert!(ok && done.starts_with("done ok"), "{done}");
    });
}

/// The agent moves a process whose thread keeps mapping, unmapping, `mremap`ing,
/// `mprotect`ing and purging memory of its own meanwhile (`--churn`): every request is
/// answered with counts that add up, and the process finds every word of its buffer and of
/// each churned mapping as it left it. (On one node the pages stay where they are; the
/// two-node guest's `vm/proofs/pid` moves a churning process across nodes.)
#[test]
fn the_agent_moves_a_process_that_changes_its_mappings_meanwhile() {
    watchdog(300, || {
        let mut t = Target::spawn(&["--size", "16MiB", "--writers", "1", "--agent", "--churn"]);
        for round in 0..8 {
            let extra: &[&str] = if round % 4 == 3 { &["--no-agent"] } else { &[] };
            let (v, out) = move_pid(t.pid, extra);
            assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
            if extra.is_empty() {
                assert!(v["path"] == "agent" && adds_up(&v), "round {round}: {v}");
            }
            let check = t.ask("check", "check ");
            assert!(check.starts_with("check ok"), "round {round}: {check}");
        }
        let (done, ok) = t.quit();
        assert!(ok && done.starts_with("done ok"), "{done}");
        let churns: u64 = done.split(' ').find_map(|w| w.strip_prefix("churns=")).unwrap().parse().unwrap();
        assert!(churns > 0, "{done}");
    });
}
