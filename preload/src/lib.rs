//! `libpagemig-preload.so`: pagemig for programs that call `move_pages()` and
//! `mbind(…, MPOL_MF_MOVE)` and are not changed to call pagemig, through `LD_PRELOAD`.
//!
//! ```text
//! PAGEMIG_PRELOAD=1 PAGEMIG_SUMMARY=1 LD_PRELOAD=/usr/local/lib/libpagemig-preload.so program
//! ```
//!
//! The library defines the symbols libnuma exports for these system calls, `move_pages`,
//! `mbind` and `migrate_pages`, so that a program's calls of them, and libnuma's own (`numa_move_pages`
//! calls `move_pages` through its PLT), reach it first. It serves the calling process's
//! private anonymous memory with pagemig's batch migration and hands everything else to
//! the kernel unchanged, with `syscall(2)`: other processes, `MPOL_MF_MOVE_ALL`, shared,
//! file-backed and special memory, policies that do not name a single node, processes
//! without userfaultfd. It never makes a call fail that the kernel would have served, and
//! sets `errno` as the kernel does.
//!
//! | variable | effect |
//! |---|---|
//! | `PAGEMIG_PRELOAD` | `1` (or `on`, `yes`, `true`) turns pagemig on; unset or anything else, every call goes straight to the kernel |
//! | `PAGEMIG_ATTRS` | `path=value,…`: pagemig attributes (`migrate/max_batch_pages=512,mtcopy/offloading=1`), applied in each process before its first call pagemig serves |
//! | `PAGEMIG_SUMMARY` | `1`: a summary on standard error when the process exits; a path: the summary appended to that file (each process that exits adds its own) |
//!
//! Both symbols are async-signal-safe, as the system calls are: the calling thread blocks
//! every signal for the length of the call (a signal that arrives meanwhile is delivered
//! when the call returns, as after a system call) and waits on a futex while pagemig's
//! worker thread serves the call (`worker`), so a call made from a signal handler that
//! interrupted pagemig itself, or `malloc` in an arena of its own, meets none of the locks
//! the interrupted code holds. The first call pagemig serves in a process starts that
//! thread. Not covered: the worker allocates (and starts the call's threads), so a handler
//! that interrupted the allocator holding a lock the worker needs too waits for ever —
//! glibc's `malloc` in an arena the worker shares (more threads than arenas, or
//! `MALLOC_ARENA_MAX=1`), `pthread_create`, or an allocator with process-wide locks
//! (jemalloc, tcmalloc) in their slow paths. A program that calls `move_pages` from a
//! handler that may interrupt those should set `PAGEMIG_PRELOAD=0`.
//!
//! Whatever `count` a call passes, pagemig takes bounded memory (the arrays are served a
//! chunk at a time); under a finite `RLIMIT_AS` or `RLIMIT_DATA` that leaves it too little
//! room, and after any failure or panic of its own, the kernel serves the call.
//!
//! The summary says how many calls each symbol had, which pagemig served, which it handed
//! to the kernel whole and why, and what became of the pages; a program can read it at
//! any time with [`pagemig_preload_summary`](symbols::pagemig_preload_summary). Nothing
//! else is ever printed, and no panic crosses into the program.
//!
//! `migrate_pages()` of the calling process to one node is served too (`migrate`): pagemig
//! moves the pages of the process's private anonymous mappings that are on the old nodes,
//! never its own memory nor its threads' stacks, and the kernel the rest, with the kernel's
//! answer.
#![deny(unsafe_code)]

mod config;
mod mbind;
mod migrate;
mod summary;
pub mod symbols;
mod worker;
