//! The requests and replies of protocol version 1 (see the module docs of [`crate::agent`]).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::sys::{Errno, PAGE_SIZE};

/// The first word of every request and reply line.
pub const MAGIC: &str = "pagemig-agent";
/// The protocol version this agent speaks.
pub const VERSION: u32 = 1;
/// The longest request line, newline included.
pub const MAX_REQUEST: usize = 4096;

pub(super) fn error_line(errno: Errno, message: &str) -> String {
    format!("{MAGIC} {VERSION} error errno={} {}\n", errno.raw_os_error(), message.replace('\n', " "))
}

/// A request to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Is an agent there, and whose is it?
    Ping,
    /// Migrate memory.
    Move(MoveRequest),
}

/// What to migrate where.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MoveRequest {
    /// The node to move to.
    pub to: u32,
    /// Only pages now on one of these nodes (`None`: wherever they are).
    pub from: Option<Vec<u32>>,
    /// Only this address range, `(start, end)`, every page of it whatever its mapping
    /// (`None`: all private anonymous memory).
    pub range: Option<(usize, usize)>,
    /// Report each mapping's route too.
    pub detail: bool,
    /// Stop moving this long after the request was taken (`None`: no limit).
    pub deadline: Option<Duration>,
}

impl MoveRequest {
    /// All private anonymous memory to `to`.
    pub fn new(to: u32) -> Self {
        Self { to, from: None, range: None, detail: false, deadline: None }
    }

    /// Only pages now on `nodes`.
    pub fn from_nodes(mut self, nodes: Vec<u32>) -> Self {
        self.from = Some(nodes);
        self
    }

    /// Only `[start, end)`.
    pub fn range(mut self, start: usize, end: usize) -> Self {
        self.range = Some((start, end));
        self
    }

    /// With or without each mapping's route.
    pub fn detail(mut self, on: bool) -> Self {
        self.detail = on;
        self
    }

    /// Stops moving `after` the agent took the request; pages not reached by then stay.
    pub fn deadline(mut self, after: Duration) -> Self {
        self.deadline = Some(after);
        self
    }
}

impl Request {
    /// Parses a request line (with or without its newline).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming what is wrong; [`Error::Sys`] with `EPROTONOSUPPORT` for
    /// another version.
    pub fn parse(line: &str) -> Result<Request> {
        let bad = |why: String| Error::Invalid(why);
        let mut words = line.trim_end_matches('\n').split(' ');
        if words.next() != Some(MAGIC) {
            return Err(bad(format!("a request starts with {MAGIC:?}")));
        }
        match words.next().map(str::parse::<u32>) {
            Some(Ok(VERSION)) => {}
            Some(Ok(v)) => {
                return Err(Error::Sys {
                    op: "agent request: this agent speaks protocol version 1, not the version asked",
                    errno: if v == 0 { Errno::INVAL } else { Errno::PROTONOSUPPORT },
                });
            }
            _ => return Err(bad("the protocol version (a number) follows the magic word".into())),
        }
        match words.next() {
            Some("ping") => match words.next() {
                None => Ok(Request::Ping),
                Some(w) => Err(bad(format!("ping takes no fields, got {w:?}"))),
            },
            Some("move") => {
                let mut to = None;
                let mut m = MoveRequest::new(0);
                for word in words {
                    let (key, value) =
                        word.split_once('=').ok_or_else(|| bad(format!("{word:?} is not a key=value field")))?;
                    let dup = || bad(format!("field {key} given twice"));
                    match key {
                        "to" => {
                            if to.replace(parse_node(value)?).is_some() {
                                return Err(dup());
                            }
                        }
                        "from" => {
                            let nodes = value.split(',').map(parse_node).collect::<Result<Vec<u32>>>()?;
                            if m.from.replace(nodes).is_some() {
                                return Err(dup());
                            }
                        }
                        "range" => {
                            if m.range.replace(parse_range(value)?).is_some() {
                                return Err(dup());
                            }
                        }
                        "detail" => {
                            m.detail = match value {
                                "0" => false,
                                "1" => true,
                                _ => return Err(bad(format!("detail is 0 or 1, not {value:?}"))),
                            }
                        }
                        "deadline_ms" => {
                            let ms = value.parse::<u64>().map_err(|_| {
                                bad(format!("deadline_ms is a whole number of milliseconds, not {value:?}"))
                            })?;
                            if m.deadline.replace(Duration::from_millis(ms)).is_some() {
                                return Err(dup());
                            }
                        }
                        _ => return Err(bad(format!("unknown field {key:?} (to, from, range, detail, deadline_ms)"))),
                    }
                }
                m.to = to.ok_or_else(|| bad("move needs to=NODE".into()))?;
                Ok(Request::Move(m))
            }
            Some(other) => Err(bad(format!("unknown request {other:?} (ping, move)"))),
            None => Err(bad("the request (ping, move) follows the version".into())),
        }
    }

    /// The request as a line, newline included.
    pub fn to_line(&self) -> String {
        match self {
            Request::Ping => format!("{MAGIC} {VERSION} ping\n"),
            Request::Move(m) => {
                let mut line = format!("{MAGIC} {VERSION} move to={}", m.to);
                if let Some(from) = &m.from {
                    let nodes: Vec<String> = from.iter().map(u32::to_string).collect();
                    line += &format!(" from={}", nodes.join(","));
                }
                if let Some((s, e)) = m.range {
                    line += &format!(" range={s:#x}-{e:#x}");
                }
                if m.detail {
                    line += " detail=1";
                }
                if let Some(d) = m.deadline {
                    line += &format!(" deadline_ms={}", d.as_millis());
                }
                line + "\n"
            }
        }
    }
}

fn parse_node(s: &str) -> Result<u32> {
    s.parse::<u32>()
        .ok()
        .filter(|&n| n < 1024)
        .ok_or_else(|| Error::Invalid(format!("{s:?} is not a node number (0 … 1023)")))
}

/// Parses `START-END` in hex (`0x` optional, as `/proc/PID/maps` prints them): a non-empty
/// range, rounded out to whole pages.
///
/// # Errors
/// [`Error::Invalid`] for anything else.
pub fn parse_range(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::Invalid(format!("{s:?} is not a range START-END of hex addresses (0x7f00a000-0x7f10a000)"));
    let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
    let hex = |x: &str| {
        let x = x.trim();
        let x = x.strip_prefix("0x").or_else(|| x.strip_prefix("0X")).unwrap_or(x);
        usize::from_str_radix(x, 16).ok().filter(|_| !x.is_empty())
    };
    let (start, end) = (hex(a).ok_or_else(bad)?, hex(b).ok_or_else(bad)?);
    if start >= end {
        return Err(Error::Invalid(format!("range {s:?} is empty or reversed")));
    }
    let end = end.checked_next_multiple_of(PAGE_SIZE).ok_or_else(bad)?;
    Ok((start & !(PAGE_SIZE - 1), end))
}

/// How a mapping was migrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// pagemig's batched copy ([`Engine::move_pages`](crate::migrate::Engine::move_pages)).
    Pagemig,
    /// The kernel's `move_pages(2)`.
    Kernel,
    /// Left alone: pagemig's own memory.
    Internal,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Route::Pagemig => "pagemig",
            Route::Kernel => "kernel",
            Route::Internal => "internal",
        }
    }
}

/// One mapping (or part) of a [`Report`] with `detail`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MappingReport {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// How it was migrated.
    pub route: Route,
    /// Its pages that are on the target node now because of this request.
    pub moved: u64,
    /// Why it took that route.
    pub why: String,
}

/// What a move request did. Every page looked at is counted once:
/// `pages == moved_pagemig + moved_kernel + already_there + not_selected + absent + failed +
/// internal + not_reached`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The process that migrated.
    pub pid: u32,
    /// The target node.
    pub to: u32,
    /// Pages looked at.
    pub pages: u64,
    /// Pages pagemig moved itself.
    pub moved_pagemig: u64,
    /// Pages the kernel's `move_pages(2)` moved (mappings pagemig leaves to it, and pages
    /// pagemig handed over).
    pub moved_kernel: u64,
    /// Pages on the target node already.
    pub already_there: u64,
    /// Pages on a node the request did not name in `from`.
    pub not_selected: u64,
    /// Pages not there to move (never touched, not mapped, or unmapped or purged by the
    /// program while the request ran).
    pub absent: u64,
    /// Pages present elsewhere that could not be moved.
    pub failed: u64,
    /// Pages of pagemig's own mappings, left alone.
    pub internal: u64,
    /// Pages not reached before the request's deadline, left where they are.
    pub not_reached: u64,
    /// Mappings (or parts) pagemig moved, the kernel moved, and left alone.
    pub mappings: [u64; 3],
    /// The first page that failed, and its errno.
    pub first_failure: Option<(usize, i32)>,
    /// How long the request took, in microseconds.
    pub time_us: u64,
    /// Each mapping's route, with `detail`.
    pub detail: Vec<MappingReport>,
}

impl Report {
    /// Whether the counts add up ([`Report`]'s invariant).
    pub fn adds_up(&self) -> bool {
        self.pages
            == self.moved_pagemig
                + self.moved_kernel
                + self.already_there
                + self.not_selected
                + self.absent
                + self.failed
                + self.internal
                + self.not_reached
    }

    /// The reply lines, `end` included.
    pub fn to_lines(&self) -> String {
        let mut out = format!(
            "{MAGIC} {VERSION} ok pid={} to={} pages={} pagemig={} kernel={} already={} unselected={} absent={} \
             failed={} internal={} maps_pagemig={} maps_kernel={} maps_internal={} time_us={}",
            self.pid,
            self.to,
            self.pages,
            self.moved_pagemig,
            self.moved_kernel,
            self.already_there,
            self.not_selected,
            self.absent,
            self.failed,
            self.internal,
            self.mappings[0],
            self.mappings[1],
            self.mappings[2],
            self.time_us
        );
        if self.not_reached > 0 {
            out += &format!(" not_reached={}", self.not_reached);
        }
        if let Some((addr, errno)) = self.first_failure {
            out += &format!(" first_failure={addr:#x}:{errno}");
        }
        out.push('\n');
        for m in &self.detail {
            out += &format!(
                "map {:#x}-{:#x} {} moved={} {}\n",
                m.start,
                m.end,
                m.route.as_str(),
                m.moved,
                m.why.replace('\n', " ")
            );
        }
        out + "end\n"
    }

    /// Parses the `ok` line of a reply and its `map` lines (without `end`).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a line that is not part of a version-1 report.
    pub fn parse(lines: &[&str]) -> Result<Report> {
        let bad = |why: String| Error::Invalid(format!("agent reply: {why}"));
        let (first, maps) = lines.split_first().ok_or_else(|| bad("empty".into()))?;
        let rest = first
            .strip_prefix(&format!("{MAGIC} {VERSION} ok"))
            .ok_or_else(|| bad(format!("{first:?} is not an ok line")))?;
        let mut r = Report::default();
        for word in rest.split_whitespace() {
            let (key, value) = word.split_once('=').ok_or_else(|| bad(format!("{word:?} is not key=value")))?;
            let num = || value.parse::<u64>().map_err(|_| bad(format!("{key}={value:?} is not a number")));
            match key {
                "pid" => r.pid = num()? as u32,
                "to" => r.to = num()? as u32,
                "pages" => r.pages = num()?,
                "pagemig" => r.moved_pagemig = num()?,
                "kernel" => r.moved_kernel = num()?,
                "already" => r.already_there = num()?,
                "unselected" => r.not_selected = num()?,
                "absent" => r.absent = num()?,
                "failed" => r.failed = num()?,
                "internal" => r.internal = num()?,
                "not_reached" => r.not_reached = num()?,
                "maps_pagemig" => r.mappings[0] = num()?,
                "maps_kernel" => r.mappings[1] = num()?,
                "maps_internal" => r.mappings[2] = num()?,
                "time_us" => r.time_us = num()?,
                "first_failure" => {
                    let (a, e) = value.split_once(':').ok_or_else(|| bad(format!("first_failure={value:?}")))?;
                    let addr = usize::from_str_radix(a.trim_start_matches("0x"), 16)
                        .map_err(|_| bad(format!("first_failure={value:?}")))?;
                    r.first_failure = Some((addr, e.parse().map_err(|_| bad(format!("first_failure={value:?}")))?));
                }
                // A later version's field.
                _ => {}
            }
        }
        for line in maps {
            let mut w = line.splitn(5, ' ');
            let (tag, range, route, moved) = (w.next(), w.next(), w.next(), w.next());
            if tag != Some("map") {
                return Err(bad(format!("{line:?} is not a map line")));
            }
            let (start, end) = parse_range(range.unwrap_or_default())?;
            let route = match route {
                Some("pagemig") => Route::Pagemig,
                Some("kernel") => Route::Kernel,
                Some("internal") => Route::Internal,
                _ => return Err(bad(format!("{line:?}: unknown route"))),
            };
            let moved = moved
                .and_then(|m| m.strip_prefix("moved="))
                .and_then(|m| m.parse().ok())
                .ok_or_else(|| bad(format!("{line:?}: no moved=N")))?;
            r.detail.push(MappingReport { start, end, route, moved, why: w.next().unwrap_or_default().to_string() });
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_malformed_ones_say_why() {
        let m = MoveRequest::new(1)
            .from_nodes(vec![0, 2])
            .range(0x1000, 0x3000)
            .detail(true)
            .deadline(Duration::from_millis(1500));
        let line = Request::Move(m.clone()).to_line();
        assert_eq!(line, "pagemig-agent 1 move to=1 from=0,2 range=0x1000-0x3000 detail=1 deadline_ms=1500\n");
        assert_eq!(Request::parse(&line).unwrap(), Request::Move(m));
        assert_eq!(Request::parse("pagemig-agent 1 ping\n").unwrap(), Request::Ping);
        for (bad, says) in [
            ("", "starts with"),
            ("hello 1 ping", "starts with"),
            ("pagemig-agent x ping", "version"),
            ("pagemig-agent 1", "follows the version"),
            ("pagemig-agent 1 dance", "unknown request"),
            ("pagemig-agent 1 ping now", "no fields"),
            ("pagemig-agent 1 move", "needs to=NODE"),
            ("pagemig-agent 1 move to=x", "not a node"),
            ("pagemig-agent 1 move to=1024", "not a node"),
            ("pagemig-agent 1 move to=1 to=2", "twice"),
            ("pagemig-agent 1 move to=1 from=", "not a node"),
            ("pagemig-agent 1 move to=1 range=0x2000-0x1000", "empty or reversed"),
            ("pagemig-agent 1 move to=1 range=zz-0x1000", "not a range"),
            ("pagemig-agent 1 move to=1 colour=red", "unknown field"),
            ("pagemig-agent 1 move to=1 detail=yes", "detail is 0 or 1"),
            ("pagemig-agent 1 move to=1 deadline_ms=1.5", "whole number of milliseconds"),
            ("pagemig-agent 1 move to=1 deadline_ms=-1", "whole number of milliseconds"),
            ("pagemig-agent 1 move to=1 deadline_ms=5 deadline_ms=6", "twice"),
            ("pagemig-agent 1 move to=1 justaword", "not a key=value"),
        ] {
            let e = Request::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        assert_eq!(Request::parse("pagemig-agent 2 ping").unwrap_err().errno(), Errno::PROTONOSUPPORT);
    }

    #[test]
    fn ranges_read_as_proc_maps_prints_them() {
        assert_eq!(parse_range("7f00a000-7f00c000").unwrap(), (0x7f00a000, 0x7f00c000));
        assert_eq!(parse_range("0x7f00a010-0x7f00b001").unwrap(), (0x7f00a000, 0x7f00c000));
        assert!(parse_range("0x10").is_err());
        assert!(parse_range("-0x10").is_err());
        assert!(parse_range("0x-0x10").is_err());
    }

    #[test]
    fn reports_round_trip() {
        let r = Report {
            pid: 7,
            to: 1,
            pages: 13,
            moved_pagemig: 4,
            moved_kernel: 1,
            already_there: 2,
            absent: 1,
            failed: 1,
            internal: 1,
            not_reached: 3,
            mappings: [1, 2, 1],
            first_failure: Some((0x5000, 16)),
            time_us: 99,
            detail: vec![MappingReport {
                start: 0x1000,
                end: 0x3000,
                route: Route::Kernel,
                moved: 1,
                why: "next to an inaccessible guard: a thread stack".into(),
            }],
            ..Default::default()
        };
        assert!(r.adds_up());
        let text = r.to_lines();
        let lines: Vec<&str> = text.lines().take_while(|l| *l != "end").collect();
        assert_eq!(Report::parse(&lines).unwrap(), r);
        assert!(Report::parse(&["pagemig-agent 1 ok pages=x"]).is_err());
    }
}
