/* pagemig: batched page migration between NUMA nodes, from user space.
 * Generated from capi/src/lib.rs by cbindgen: do not edit. */

#ifndef PAGEMIG_H
#define PAGEMIG_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <stddef.h>

/**
 * `MPOL_MF_MOVE`: move the pages only this process maps.
 */
#define PAGEMIG_MPOL_MF_MOVE (1 << 1)

/**
 * `MPOL_MF_MOVE_ALL`: move pages other processes map too (needs `CAP_SYS_NICE`); handed to
 * the kernel's `move_pages(2)` whole.
 */
#define PAGEMIG_MPOL_MF_MOVE_ALL (1 << 2)

/**
 * What the kernel and this process allow pagemig.
 */
struct pagemig_capabilities {
  /**
   * 1: userfaultfd is available and pagemig migrates itself; 0: every call goes to the
   * kernel's `move_pages(2)`.
   */
  int available;
  /**
   * 1: only user-mode faults wait, and kernel writes into migrating memory (`read(2)`
   * into it, `O_DIRECT`) fail with `EFAULT`; 0: they wait like any other access.
   */
  int user_mode_only;
  /**
   * 1: never-touched pages are protected without being populated first.
   */
  int wp_unpopulated;
};

/**
 * What `pagemig_move_pages` has done in this process so far ([`pagemig_stats`]).
 */
struct pagemig_stats {
  /**
   * Calls that named at least one page with a target and went through pagemig.
   */
  uint64_t calls;
  /**
   * Pages those calls named.
   */
  uint64_t pages;
  /**
   * Pages of mappings pagemig moves that were on their target already: left alone.
   */
  uint64_t already_home;
  /**
   * Pages of mappings pagemig moves that were not there to move (`-ENOENT`).
   */
  uint64_t absent;
  /**
   * Pages pagemig moved itself.
   */
  uint64_t moved;
  /**
   * Pages handed to the kernel's `move_pages(2)` because pagemig does not move their
   * memory: shared, file-backed or special mappings, addresses not mapped, the calling
   * thread's stack, pages another process maps too.
   */
  uint64_t kernel_unmovable;
  /**
   * Pages pagemig could not move (pinned, mapped by another process) and handed to the
   * kernel after.
   */
  uint64_t kernel_retried;
  /**
   * Pages that ended a call with an error.
   */
  uint64_t failed;
  /**
   * Calls handed to the kernel whole (`MPOL_MF_MOVE_ALL`, no userfaultfd, arrays a
   * sandbox forbids `process_vm_readv` to read, an address-space limit that leaves
   * pagemig too little room).
   */
  uint64_t kernel_calls;
  /**
   * Pages those calls named.
   */
  uint64_t kernel_call_pages;
};

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * Moves the `count` pages at `pages[i]` of the calling process to nodes `nodes[i]`, and
 * writes each page's outcome in `status[i]`: the node it is on, or a negative errno
 * (`-ENOENT` not present, `-EFAULT` not mapped, `-EBUSY` a folio named again while the
 * call had it queued, as the second 4 KiB page of a huge page, `-EACCES` mapped by another
 * process, `-ENOMEM` no room on the node), exactly as the kernel answers: where a page
 * cannot move (pinned), the call stops as the kernel's does, the statuses of its batch
 * and of every entry after it as the caller left them. With `nodes` NULL, only writes
 * where each page is. `flags` is `0`, `MPOL_MF_MOVE` or `MPOL_MF_MOVE_ALL`, as for
 * `move_pages(2)`.
 *
 * Returns `0` when every page is on its node, the number of pages that are not, or `-1`
 * with `errno`: `EINVAL` for other flags, `ENODEV` for a node out of range or without
 * memory, `EFAULT` for arrays that cannot be read or written (as the kernel, the entries
 * before the first bad node or the first entry that cannot be read are served first),
 * `EPERM` for `MPOL_MF_MOVE_ALL` without `CAP_SYS_NICE`. Any `count` takes bounded
 * memory: the arrays are served a chunk at a time.
 *
 * Not async-signal-safe: pagemig allocates and takes locks on the calling thread; a signal
 * handler calls `move_pages(2)` (or libnuma's `move_pages`, which `libpagemig-preload.so`
 * serves async-signal-safely).
 *
 * # Safety
 * `pages` and `status` (and `nodes`, unless NULL) must point to `count` elements. The
 * calling thread is inside this call while its pages move: nothing else on it accesses
 * them meanwhile, which is what pagemig needs.
 */
long pagemig_move_pages(unsigned long count,
                        void *const *pages,
                        const int *nodes,
                        int *status,
                        int flags);

/**
 * Reads the attribute `path` (`migrate/max_batch_pages`, `dcbm/nr_dma_chan`, …; see
 * `pagemig attr`) into `buf` as a NUL-terminated string.
 *
 * The first call of a process opens its engine, which applies the settings kept in the
 * config file and `PAGEMIG_ATTRS` (see `pagemig attr --help`): the value read is the one
 * the process runs with.
 *
 * Returns the length of the value, or `-1` with `errno`: `ENOENT` for an unknown path,
 * `ERANGE` when `len` bytes cannot hold the value and its NUL, `EFAULT` for NULL pointers.
 *
 * # Safety
 * `path` must be a NUL-terminated string and `buf` writable for `len` bytes.
 */
long pagemig_attr_read(const char *path, char *buf, uintptr_t len);

/**
 * Writes the attribute `path` from the string `value`, in this process only (after the
 * config file and `PAGEMIG_ATTRS` were applied, so they do not overwrite it); `pagemig
 * attr PATH=VALUE` keeps a setting for every process.
 *
 * Returns `0`, or `-1` with `errno`: `ENOENT` for an unknown path, `EACCES` for a
 * read-only one, `EINVAL` for a value it does not accept, `EFAULT` for NULL pointers.
 *
 * # Safety
 * `path` and `value` must be NUL-terminated strings.
 */
int pagemig_attr_write(const char *path, const char *value);

/**
 * Starts this process's agent: a thread that migrates the process's own memory when
 * `pagemig move --pid PID` asks (pagemig's batched copy from inside the process), on the
 * abstract socket `@pagemig-agent.<pid>`, for senders the kernel would let migrate it.
 * Once per process: later calls return `0` at once; a forked child starts its own.
 *
 * Returns `0`, or `-1` with `errno`: `EADDRINUSE` when another process holds the socket
 * name, or the errno of binding it or starting the thread.
 */
int pagemig_agent_start(void);

/**
 * Fills `out` with what the kernel and this process allow pagemig. Returns `0`, or `-1`
 * with `errno` `EFAULT` for a NULL pointer.
 *
 * # Safety
 * `out` must be writable.
 */
int pagemig_capabilities(struct pagemig_capabilities *out);

/**
 * Writes what `pagemig_move_pages` has done in this process so far into `out`: pages
 * pagemig moved, pages handed to the kernel and why, pages left alone. `size` is
 * `sizeof(struct pagemig_stats)` as the caller was built with; the first `size` bytes are
 * written, so a program built against an older header keeps working.
 *
 * Returns `0`, or `-1` with `errno` `EFAULT` for a NULL pointer.
 *
 * # Safety
 * `out` must be writable for `size` bytes.
 */
int pagemig_stats(struct pagemig_stats *out, uintptr_t size);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* PAGEMIG_H */
