/* The calls libnuma's users make (numa_move_pages, move_pages, mbind with MPOL_MF_MOVE and
 * MPOL_MF_STRICT) on every kind of memory, each made twice on twin memory: once through
 * libnuma's symbols, which libpagemig-preload.so takes over under LD_PRELOAD, and once with
 * syscall(2), which nothing takes over. Every return value, errno, status entry, page
 * placement and memory policy is compared, and the data checked; exits 0 when all agree.
 *
 * One line a case, without addresses or pids: a run under LD_PRELOAD prints exactly what a
 * run without it prints. When libpagemig-preload.so is loaded, each case also checks in its
 * summary (pagemig_preload_summary) which way the call went.
 *
 *   libnuma_calls [NODE] [--no-userfaultfd]    the cases; NODE: where to move (default: the
 *                                              node the memory is on)
 *   libnuma_calls --overhead CALLS             microseconds a move_pages call on a shared
 *                                              file mapping takes (pages the kernel moves)
 *
 * --no-userfaultfd installs a seccomp filter first that makes userfaultfd unavailable, as
 * on a kernel without it: every call must then go to the kernel.
 *
 * Build: cc -Wall -Wextra -Werror -pthread libnuma_calls.c -lnuma -ldl -o libnuma_calls */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <numa.h>
#include <numaif.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef MPOL_F_STATIC_NODES
#define MPOL_F_STATIC_NODES (1 << 15)
#endif
#ifndef MPOL_PREFERRED_MANY
#define MPOL_PREFERRED_MANY 5
#endif

/* What errno holds before each call compared: no call sets it, so a call that succeeds
 * leaves it so. */
#define ERRNO_BEFORE 4242

static long page;
static int failures;
static int target, home_node;
static int no_userfaultfd;

/* ---- which way a call went: the preload library's summary, when it is loaded ---- */

enum route {
    SERVED_MOVE_PAGES, SERVED_MBIND, DISABLED, OTHER_PROCESS, MOVE_ALL, NOT_A_MOVE, NOT_SINGLE_NODE,
    NO_USERFAULTFD, UNREADABLE, PAGEMIG_FAILED, NROUTES
};
static const char *route_label[NROUTES] = {
    "served by pagemig, move_pages calls",
    "served by pagemig, mbind calls",
    "to the kernel whole, disabled",
    "to the kernel whole, other process",
    "to the kernel whole, MPOL_MF_MOVE_ALL",
    "to the kernel whole, not a move",
    "to the kernel whole, policy not single-node",
    "to the kernel whole, no userfaultfd",
    "to the kernel whole, process_vm_readv refused",
    "to the kernel whole, pagemig failed, kernel retried",
};
static long (*summary_fn)(char *, size_t);
static int preload_enabled;

/* The number after the line that starts with `label`, up to its ": "; -1 when absent. */
static long summary_count(const char *text, const char *label) {
    for (const char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        if (strncmp(line, label, strlen(label)) == 0) {
            const char *colon = strstr(line, ": ");
            if (colon)
                return atol(colon + 2);
        }
    }
    return -1;
}

static void routes(long out[NROUTES]) {
    static char text[8192];
    if (!summary_fn)
        return;
    summary_fn(text, sizeof text);
    for (int r = 0; r < NROUTES; r++)
        out[r] = summary_count(text, route_label[r]);
}

/* The route a case expects, enabled with userfaultfd (`with`) or without (`without`). */
static void check_route(const char *what, const long before[NROUTES], enum route with, enum route without) {
    if (!summary_fn)
        return;
    long after[NROUTES];
    routes(after);
    enum route want = !preload_enabled ? DISABLED : no_userfaultfd ? without : with;
    for (int r = 0; r < NROUTES; r++) {
        long d = after[r] - before[r];
        if (d != (r == (int)want)) {
            printf("ROUTE %s: \"%s\" went %+ld, expected the call under \"%s\"\n", what, route_label[r], d,
                   route_label[want]);
            failures++;
        }
    }
}

/* ---- twin memory ---- */

#define NPAGES 11
struct layout {
    char *anon;       /* 8 private anonymous pages, 0-3 touched */
    char *shared;     /* 2 shared anonymous pages */
    char *file;       /* 2 pages of a shared file mapping */
    char *cow;        /* 2 pages of a private file mapping, the first written */
    char *mixed;      /* 4 private anonymous pages, then 4 shared ones */
    char *holed;      /* 3 private anonymous pages, the middle one unmapped */
    void *pages[NPAGES];
};

static void *map(size_t len, int flags, int fd) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return p;
}

/* `len` bytes mapped low in the address space (from 256 MiB up), where the kernel's
 * top-down mmap never reaches, with 16 free pages on either side: no later mapping of the
 * library's or libnuma's lands beside it, so what pagemig sees next to it (which decides
 * whether it takes the pages or leaves them to the kernel: memory right above an
 * inaccessible mapping looks like a thread stack, above a loaded object's data like its
 * statics) does not depend on where the kernel happened to put the test's other mappings. */
static char *map_low(size_t len, int flags, int fd) {
    static unsigned long next = 0x10000000UL + 16 * 4096;
    for (; next < 0x40000000UL; next += 16 * page) {
        char *p = mmap((void *)next, len, PROT_READ | PROT_WRITE, flags | MAP_FIXED_NOREPLACE, fd, 0);
        if (p == MAP_FAILED)
            continue;
        if (p != (char *)next) { /* a kernel that took the flag as a hint */
            munmap(p, len);
            continue;
        }
        next += len + 16 * page;
        return p;
    }
    fprintf(stderr, "no free low pages for a mapping of %zu bytes\n", len);
    exit(2);
}

/* 3 private anonymous pages whose middle one is unmapped, low in the address space: no
 * later mapping can fill the hole while the cases run. */
static char *map_holed(void) {
    char *p = map_low(3 * page, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    memset(p, 5, 3 * page);
    munmap(p + page, page);
    return p;
}

static void make_layout(struct layout *l, int fd) {
    l->anon = map_low(8 * page, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    memset(l->anon, 7, 4 * page);
    l->shared = map(2 * page, MAP_SHARED | MAP_ANONYMOUS, -1);
    memset(l->shared, 1, 2 * page);
    l->file = map(2 * page, MAP_SHARED, fd);
    memset(l->file, 2, 2 * page);
    l->cow = map(2 * page, MAP_PRIVATE, fd);
    l->cow[0] = 3;
    (void)*(volatile char *)(l->cow + page);
    l->mixed = map_low(8 * page, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    if (mmap(l->mixed + 4 * page, 4 * page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1, 0) ==
        MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    memset(l->mixed, 4, 8 * page);
    l->holed = map_holed();
    void *p[NPAGES] = {
        l->anon, l->anon + page + 123, l->anon + 3 * page, l->anon + 5 * page, /* present, inside, present, never touched */
        l->shared, l->file + page, l->cow, l->cow + page, l->mixed + 5 * page,
        l->holed + page, /* not mapped */
        l->anon,         /* twice */
    };
    memcpy(l->pages, p, sizeof p);
}

static int data_intact(const struct layout *l) {
    for (long i = 0; i < 8 * page; i++)
        if (l->anon[i] != (i < 4 * page ? 7 : 0) || l->mixed[i] != 4)
            return 0;
    return l->shared[0] == 1 && l->file[page] == 2 && l->cow[0] == 3 && l->holed[2 * page] == 5;
}

#define MAX_PLACEMENT 64
static void placement(char *addr, int n, int *out) {
    void *p[MAX_PLACEMENT];
    if (n > MAX_PLACEMENT)
        abort();
    for (int i = 0; i < n; i++)
        p[i] = addr + i * page;
    syscall(SYS_move_pages, 0, n, p, NULL, out, 0);
}

/* ---- the comparisons ---- */

static const char *result(int same) {
    if (!same)
        failures++;
    return same ? "same" : "DIFFERENT";
}

typedef long (*move_fn)(int pid, unsigned long count, void **pages, const int *nodes, int *status, int flags);

static long libnuma_numa_move_pages(int pid, unsigned long count, void **pages, const int *nodes, int *status, int flags) {
    return numa_move_pages(pid, count, pages, nodes, status, flags);
}

/* A move_pages call through `fn` on `a`, and through syscall(2) on `b`. */
static void compare_move(const char *what, move_fn fn, int pid, unsigned long count, void **a, void **b,
                         const int *nodes, int flags, int status_null, enum route with, enum route without) {
    int sa[NPAGES], sb[NPAGES];
    memset(sa, 0x55, sizeof sa);
    memset(sb, 0x55, sizeof sb);
    long before[NROUTES];
    routes(before);
    /* errno as the call leaves it, success or not: a success leaves it alone. */
    errno = ERRNO_BEFORE;
    long ra = fn(pid, count, a, nodes, status_null ? NULL : sa, flags);
    int ea = errno;
    check_route(what, before, with, without);
    errno = ERRNO_BEFORE;
    long rb = syscall(SYS_move_pages, pid, count, b, nodes, status_null ? NULL : sb, flags);
    int eb = errno;
    int same = ra == rb && ea == eb && (ra < 0 || status_null || memcmp(sa, sb, count * sizeof(int)) == 0);
    printf("move_pages  %-44s %ld errno %-2d status", what, ra, ea);
    for (unsigned long i = 0; ra >= 0 && !status_null && i < count; i++)
        printf(" %d", sa[i]);
    printf(" %s\n", result(same));
}

static void policy(char *addr, int *mode, unsigned long *mask) {
    *mask = 0;
    if (syscall(SYS_get_mempolicy, mode, mask, 64, addr, MPOL_F_ADDR) != 0)
        *mode = -errno;
}

/* An mbind call through libnuma on `a` (`offset` bytes in) and with syscall(2) on `b`;
 * then where the `pages` pages from `a` and `b` are and their policies. */
static void compare_mbind(const char *what, char *a, char *b, long offset, unsigned long len, int mode,
                          const unsigned long *mask, unsigned long maxnode, unsigned flags, int pages,
                          enum route with, enum route without) {
    long before[NROUTES];
    routes(before);
    errno = ERRNO_BEFORE;
    long ra = mbind(a + offset, len, mode, mask, maxnode, flags);
    int ea = errno;
    check_route(what, before, with, without);
    errno = ERRNO_BEFORE;
    long rb = syscall(SYS_mbind, b + offset, len, mode, mask, maxnode, flags);
    int eb = errno;
    int pa[16], pb[16], ma, mb;
    unsigned long ka, kb;
    placement(a, pages, pa);
    placement(b, pages, pb);
    policy(a, &ma, &ka);
    policy(b, &mb, &kb);
    int same = ra == rb && ea == eb && memcmp(pa, pb, pages * sizeof(int)) == 0 && ma == mb && ka == kb;
    printf("mbind       %-44s %ld errno %-2d policy %d/%#lx pages", what, ra, ea, ma, ka);
    for (int i = 0; i < pages; i++)
        printf(" %d", pa[i]);
    printf(" %s\n", result(same));
}

/* ---- the cases ---- */

static void move_pages_cases(struct layout *la, struct layout *lb) {
    int nodes[NPAGES], bad[NPAGES];
    for (int i = 0; i < NPAGES; i++)
        nodes[i] = target;
    void **a = la->pages, **b = lb->pages;
    compare_move("numa_move_pages: where (nodes NULL)", libnuma_numa_move_pages, 0, NPAGES, a, b, NULL, 0, 0,
                 NOT_A_MOVE, NOT_A_MOVE);
    compare_move("numa_move_pages: to the node", libnuma_numa_move_pages, 0, NPAGES, a, b, nodes, MPOL_MF_MOVE, 0,
                 SERVED_MOVE_PAGES, NO_USERFAULTFD);
    compare_move("move_pages: pid getpid(), again", move_pages, getpid(), NPAGES, a, b, nodes, 0, 0,
                 SERVED_MOVE_PAGES, NO_USERFAULTFD);
    compare_move("move_pages: count 0", move_pages, 0, 0, a, b, nodes, MPOL_MF_MOVE, 0, NOT_A_MOVE, NOT_A_MOVE);
    compare_move("move_pages: bad flags", move_pages, 0, NPAGES, a, b, nodes, 0x10, 0, NOT_A_MOVE, NOT_A_MOVE);
    memcpy(bad, nodes, sizeof bad);
    bad[NPAGES - 1] = -1;
    compare_move("move_pages: a negative node", move_pages, 0, NPAGES, a, b, bad, 0, 0, PAGEMIG_FAILED,
                 NO_USERFAULTFD);
    bad[NPAGES - 1] = 1000;
    compare_move("move_pages: a node without memory", move_pages, 0, NPAGES, a, b, bad, 0, 0, PAGEMIG_FAILED,
                 NO_USERFAULTFD);
    compare_move("move_pages: pages NULL", move_pages, 0, NPAGES, NULL, NULL, nodes, 0, 0, NOT_A_MOVE,
                 NO_USERFAULTFD);
    /* A status array that cannot be written goes to the kernel whole, before anything moves. */
    compare_move("move_pages: status NULL", move_pages, 0, NPAGES, a, b, nodes, 0, 1, NOT_A_MOVE,
                 NO_USERFAULTFD);
    compare_move("move_pages: MPOL_MF_MOVE_ALL", move_pages, 0, NPAGES, a, b, nodes, MPOL_MF_MOVE_ALL, 0, MOVE_ALL,
                 MOVE_ALL);

    /* Another process: a child holding the twin pages (the same addresses), and pages it
     * shares with this one until it exits (the kernel refuses them, -EACCES). */
    char *ca = map(4 * page, MAP_PRIVATE | MAP_ANONYMOUS, -1), *cb = map(4 * page, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    memset(ca, 9, 4 * page);
    memset(cb, 9, 4 * page);
    int hold[2];
    if (pipe(hold) != 0)
        exit(2);
    pid_t child = fork();
    if (child == 0) {
        char c;
        close(hold[1]);
        _exit(read(hold[0], &c, 1) < 0);
    }
    close(hold[0]);
    compare_move("move_pages: another process, where", move_pages, child, NPAGES, b, b, NULL, 0, 0, OTHER_PROCESS,
                 OTHER_PROCESS);
    compare_move("move_pages: another process, to the node", move_pages, child, NPAGES, a, a, nodes, MPOL_MF_MOVE, 0,
                 OTHER_PROCESS, OTHER_PROCESS);
    void *qa[4], *qb[4];
    for (int i = 0; i < 4; i++) {
        qa[i] = ca + i * page;
        qb[i] = cb + i * page;
    }
    compare_move("numa_move_pages: pages a child maps too", libnuma_numa_move_pages, 0, 4, qa, qb, nodes,
                 MPOL_MF_MOVE, 0, SERVED_MOVE_PAGES, NO_USERFAULTFD);
    close(hold[1]);
    waitpid(child, NULL, 0);
    compare_move("numa_move_pages: the same once the child exited", libnuma_numa_move_pages, 0, 4, qa, qb, nodes,
                 MPOL_MF_MOVE, 0, SERVED_MOVE_PAGES, NO_USERFAULTFD);
    for (long i = 0; i < 4 * page; i++)
        if (ca[i] != 9 || cb[i] != 9) {
            printf("DATA: byte %ld of the pages a child shared changed\n", i);
            failures++;
            break;
        }
    munmap(ca, 4 * page);
    munmap(cb, 4 * page);
}

/* A transparent huge page the range covers only part of: the kernel moves it whole (its
 * pages outside the range too). `offset` and `len` within the huge page. */
static char *huge_page(int split) {
    char *raw = map(4 << 20, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    char *huge = (char *)(((unsigned long)raw + (2 << 20) - 1) & ~((2UL << 20) - 1));
    madvise(huge, 2 << 20, MADV_HUGEPAGE);
    memset(huge, 6, 2 << 20);
    if (split) { /* mapped by page entries from now on, still one folio */
        mprotect(huge + 10 * page, page, PROT_READ);
        mprotect(huge + 10 * page, page, PROT_READ | PROT_WRITE);
    }
    return huge;
}

static void huge_where(char *huge, int *out) {
    static void *p[512];
    for (int i = 0; i < 512; i++)
        p[i] = huge + i * page;
    syscall(SYS_move_pages, 0, 512, p, NULL, out, 0);
}

static void compare_mbind_huge(const char *what, long offset, unsigned long len, int split) {
    char *a = huge_page(split), *b = huge_page(split);
    unsigned long one = 1UL << target;
    long before[NROUTES];
    routes(before);
    errno = ERRNO_BEFORE;
    long ra = mbind(a + offset, len, MPOL_BIND, &one, 64, MPOL_MF_MOVE);
    int ea = errno;
    check_route(what, before, SERVED_MBIND, NO_USERFAULTFD);
    errno = ERRNO_BEFORE;
    long rb = syscall(SYS_mbind, b + offset, len, MPOL_BIND, &one, 64, MPOL_MF_MOVE);
    int eb = errno;
    static int pa[512], pb[512];
    huge_where(a, pa);
    huge_where(b, pb);
    int on_a = 0, on_b = 0, intact = 1;
    for (int i = 0; i < 512; i++) {
        on_a += pa[i] == target;
        on_b += pb[i] == target;
    }
    for (long i = 0; i < 2 << 20; i++)
        intact &= a[i] == 6 && b[i] == 6;
    int same = ra == rb && ea == eb && memcmp(pa, pb, sizeof pa) == 0 && intact;
    printf("mbind       %-44s %ld errno %-2d pages of the huge page on node %d: %d of 512 %s\n", what, ra, ea, target,
           on_a, result(same));
}

static void mbind_cases(struct layout *la, struct layout *lb) {
    unsigned long one = 1UL << target, two = one | 1UL << (target + 1), far[17] = {0};
    unsigned long max = 64;
    far[1000 / 64] = 1UL << (1000 % 64);
    const unsigned mv = MPOL_MF_MOVE, strict = MPOL_MF_MOVE | MPOL_MF_STRICT;
    compare_mbind("MPOL_BIND, MOVE|STRICT, private anonymous", la->anon, lb->anon, 0, 8 * page, MPOL_BIND, &one, max,
                  strict, 8, SERVED_MBIND, NO_USERFAULTFD);
    compare_mbind("MPOL_PREFERRED, MOVE", la->anon, lb->anon, 0, 8 * page, MPOL_PREFERRED, &one, max, mv, 8,
                  SERVED_MBIND, NO_USERFAULTFD);
    compare_mbind("MPOL_PREFERRED_MANY, MOVE|STRICT", la->anon, lb->anon, 0, 8 * page, MPOL_PREFERRED_MANY, &one, max,
                  strict, 8, SERVED_MBIND, NO_USERFAULTFD);
    compare_mbind("MPOL_INTERLEAVE, MOVE", la->anon, lb->anon, 0, 8 * page, MPOL_INTERLEAVE, &one, max, mv, 8,
                  NOT_SINGLE_NODE, NOT_SINGLE_NODE);
    compare_mbind("MPOL_BIND of two nodes, MOVE|STRICT", la->anon, lb->anon, 0, 8 * page, MPOL_BIND, &two, max, strict,
                  8, NOT_SINGLE_NODE, NOT_SINGLE_NODE);
    compare_mbind("MPOL_BIND|MPOL_F_STATIC_NODES, MOVE", la->anon, lb->anon, 0, 8 * page,
                  MPOL_BIND | MPOL_F_STATIC_NODES, &one, max, mv, 8, NOT_SINGLE_NODE, NOT_SINGLE_NODE);
    compare_mbind("MPOL_BIND, MOVE|STRICT, shared anonymous", la->shared, lb->shared, 0, 2 * page, MPOL_BIND, &one,
                  max, strict, 2, SERVED_MBIND, NO_USERFAULTFD);
    compare_mbind("MPOL_BIND, MOVE|STRICT, shared file", la->file, lb->file, 0, 2 * page, MPOL_BIND, &one, max, strict,
                  2, SERVED_MBIND, NO_USERFAULTFD);
    compare_mbind("MPOL_BIND, MOVE|STRICT, private file", la->cow, lb->cow, 0, 2 * page, MPOL_BIND, &one, max, strict,
                  2, SERVED_MBIND, NO_USERFAULTFD);
    compare_mbind("MPOL_BIND, MOVE, private then shared", la->mixed, lb->mixed, 0, 8 * page, MPOL_BIND, &one, max, mv,
                  8, SERVED_MBIND, NO_USERFAULTFD);
    compare_mbind("MPOL_BIND, no flags", la->anon, lb->anon, 0, 8 * page, MPOL_BIND, &one, max, 0, 8, NOT_A_MOVE,
                  NOT_A_MOVE);
    compare_mbind("MPOL_BIND, STRICT alone", la->anon, lb->anon, 0, 8 * page, MPOL_BIND, &one, max, MPOL_MF_STRICT, 8,
                  NOT_A_MOVE, NOT_A_MOVE);
    compare_mbind("MPOL_BIND, MOVE_ALL", la->anon, lb->anon, 0, 8 * page, MPOL_BIND, &one, max, MPOL_MF_MOVE_ALL, 8,
                  MOVE_ALL, MOVE_ALL);
    compare_mbind("MPOL_BIND, MOVE, length 0", la->anon, lb->anon, 0, 0, MPOL_BIND, &one, max, mv, 8, SERVED_MBIND,
                  NO_USERFAULTFD);
    compare_mbind("MPOL_BIND, MOVE, unaligned address", la->anon, lb->anon, 1, page, MPOL_BIND, &one, max, mv, 8,
                  NOT_A_MOVE, NOT_A_MOVE);
    compare_mbind("MPOL_BIND, MOVE, a hole in the range", la->holed, lb->holed, 0, 3 * page, MPOL_BIND, &one, max, mv,
                  1, NOT_A_MOVE, NOT_A_MOVE);
    compare_mbind("MPOL_BIND, MOVE|0x100", la->anon, lb->anon, 0, 8 * page, MPOL_BIND, &one, max, mv | 0x100, 8,
                  NOT_A_MOVE, NOT_A_MOVE);
    compare_mbind("MPOL_BIND, MOVE, node 1000", la->anon, lb->anon, 0, 8 * page, MPOL_BIND, far, 1025, mv, 8,
                  NOT_A_MOVE, NOT_A_MOVE);
    /* Arguments the kernel refuses are refused before pagemig looks at the policy. */
    compare_mbind("MPOL_BIND, MOVE, mask NULL", la->anon, lb->anon, 0, 8 * page, MPOL_BIND, NULL, max, mv, 8,
                  NOT_A_MOVE, NOT_A_MOVE);
    compare_mbind("mode 99, MOVE", la->anon, lb->anon, 0, 8 * page, 99, &one, max, mv, 8, NOT_A_MOVE, NOT_A_MOVE);
    compare_mbind("MPOL_DEFAULT, MOVE|STRICT", la->anon, lb->anon, 0, 8 * page, MPOL_DEFAULT, NULL, 0, strict, 8,
                  NOT_SINGLE_NODE, NOT_SINGLE_NODE);
    /* Back home, through pagemig: pages really move when the node differs. */
    unsigned long home = 1UL << home_node;
    compare_mbind("MPOL_BIND home, MOVE|STRICT", la->anon, lb->anon, 0, 8 * page, MPOL_BIND, &home, max, strict, 8,
                  SERVED_MBIND, NO_USERFAULTFD);
    compare_mbind("MPOL_BIND home, MOVE, private then shared", la->mixed, lb->mixed, 0, 8 * page, MPOL_BIND, &home, max,
                  mv, 8, SERVED_MBIND, NO_USERFAULTFD);
    compare_mbind_huge("MPOL_BIND, MOVE, the second half of a huge page", 1 << 20, 1 << 20, 0);
    compare_mbind_huge("MPOL_BIND, MOVE, one page of a huge page", 5 * page, page, 0);
    compare_mbind_huge("MPOL_BIND, MOVE, a whole huge page", 0, 2 << 20, 0);
    compare_mbind_huge("MPOL_BIND, MOVE, half a huge page split", 1 << 20, 1 << 20, 1);
}

/* ---- threads, and forks while they run ---- */

#define THREADS 4
#define ROUNDS 25
#define TPAGES 32
static int thread_failures[THREADS];
/* What failed, for the report: calls (return or status), placement, data. */
static int thread_call_failures[THREADS], thread_placement_failures[THREADS], thread_data_failures[THREADS];

static void *mover(void *arg) {
    int t = (int)(long)arg;
    unsigned char *m = map(TPAGES * page, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    /* Not inherited by the children forked meanwhile: a page a child shares is refused
     * (-EACCES) by the kernel's move_pages and skipped by its mbind, which is not what the
     * threads check. The children's own calls are checked in child_checks. */
    madvise(m, TPAGES * page, MADV_DONTFORK);
    void *p[TPAGES];
    int nodes[TPAGES], status[TPAGES];
    for (int i = 0; i < TPAGES; i++) {
        p[i] = m + i * page;
        for (long j = 0; j < page; j++)
            m[i * page + j] = (unsigned char)(t + i + j);
    }
    for (int r = 0; r < ROUNDS; r++) {
        int node = r % 2 ? home_node : target;
        for (int i = 0; i < TPAGES; i++)
            nodes[i] = node;
        long ret = numa_move_pages(0, TPAGES, p, nodes, status, MPOL_MF_MOVE);
        for (int i = 0; i < TPAGES; i++)
            thread_call_failures[t] += ret != 0 || status[i] != node;
        unsigned long mask = 1UL << (r % 2 ? target : home_node);
        thread_call_failures[t] += mbind(m, TPAGES * page, MPOL_BIND, &mask, 64, MPOL_MF_MOVE | MPOL_MF_STRICT) != 0;
        placement((char *)m, TPAGES, status);
        for (int i = 0; i < TPAGES; i++)
            thread_placement_failures[t] += status[i] != (r % 2 ? target : home_node);
        for (int i = 0; i < TPAGES; i++)
            for (long j = 0; j < page; j += 64)
                thread_data_failures[t] += m[i * page + j] != (unsigned char)(t + i + j);
    }
    thread_failures[t] = thread_call_failures[t] + thread_placement_failures[t] + thread_data_failures[t];
    munmap(m, TPAGES * page);
    return NULL;
}

/* What a forked child does: its own twin memory, one move_pages and one mbind compared. */
static int child_checks(int fd) {
    struct layout la, lb;
    make_layout(&la, fd);
    make_layout(&lb, fd);
    int nodes[NPAGES];
    for (int i = 0; i < NPAGES; i++)
        nodes[i] = target;
    compare_move("child: numa_move_pages", libnuma_numa_move_pages, 0, NPAGES, la.pages, lb.pages, nodes,
                 MPOL_MF_MOVE, 0, SERVED_MOVE_PAGES, NO_USERFAULTFD);
    unsigned long one = 1UL << target;
    compare_mbind("child: MPOL_BIND, MOVE|STRICT", la.mixed, lb.mixed, 0, 8 * page, MPOL_BIND, &one, 64,
                  MPOL_MF_MOVE | MPOL_MF_STRICT, 8, SERVED_MBIND, NO_USERFAULTFD);
    failures += !data_intact(&la) || !data_intact(&lb);
    return failures != 0;
}

static void threads_and_forks(int fd) {
    long before[NROUTES], after[NROUTES];
    routes(before);
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++)
        pthread_create(&th[t], NULL, mover, (void *)t);
    /* Forks while the threads move: each child opens its own engine, or uses the kernel. */
    int children_ok = 1;
    for (int f = 0; f < 3; f++) {
        fflush(stdout);
        pid_t child = fork();
        if (child == 0) {
            int rc = child_checks(fd);
            fflush(stdout);
            exit(rc); /* exit, not _exit: the child's summary is written */
        }
        int status;
        children_ok &= waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    int moved_ok = 1;
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
        moved_ok &= thread_failures[t] == 0;
    }
    printf("threads     %d threads x %d rounds of numa_move_pages and mbind, placement and data %s\n", THREADS, ROUNDS,
           result(moved_ok));
    printf("forks       3 children forked while the threads moved %s\n", result(children_ok));
    for (int t = 0; t < THREADS; t++)
        if (thread_failures[t])
            printf("thread %d: %d calls not as asked, %d pages misplaced, %d bytes wrong\n", t, thread_call_failures[t],
                   thread_placement_failures[t], thread_data_failures[t]);
    if (summary_fn && preload_enabled && !no_userfaultfd) {
        routes(after);
        long mp = after[SERVED_MOVE_PAGES] - before[SERVED_MOVE_PAGES];
        long mb = after[SERVED_MBIND] - before[SERVED_MBIND];
        if (mp != THREADS * ROUNDS || mb != THREADS * ROUNDS) {
            printf("ROUTE threads: pagemig served %ld move_pages and %ld mbind calls of %d each\n", mp, mb,
                   THREADS * ROUNDS);
            failures++;
        }
    }
}

/* ---- without userfaultfd ---- */

static void deny_userfaultfd(void) {
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_userfaultfd, 3, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_ioctl, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)USERFAULTFD_IOC_NEW, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof filter / sizeof filter[0], .filter = filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        perror("seccomp");
        exit(2);
    }
}

/* ---- what the preload library adds to a call it hands to the kernel ---- */

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int overhead(int fd, int calls) {
    enum { PAGES = 64 };
    if (ftruncate(fd, PAGES * page) != 0)
        return 2;
    char *m = map(PAGES * page, MAP_SHARED, fd);
    memset(m, 1, PAGES * page);
    void *p[PAGES];
    int nodes[PAGES], status[PAGES];
    for (int i = 0; i < PAGES; i++)
        p[i] = m + i * page;
    syscall(SYS_move_pages, 0, 1, p, NULL, status, 0);
    for (int i = 0; i < PAGES; i++)
        nodes[i] = status[0];
    double t0 = now_us();
    if (move_pages(0, PAGES, p, nodes, status, MPOL_MF_MOVE) != 0)
        return 1;
    double first = now_us() - t0;
    /* The first call under the preload opens pagemig's engine, whose copy kernels are
     * measured on a thread of their own for about half a second: the timed calls start
     * after it. */
    sleep(2);
    t0 = now_us();
    for (int c = 0; c < calls; c++)
        if (move_pages(0, PAGES, p, nodes, status, MPOL_MF_MOVE) != 0 || status[PAGES - 1] != nodes[0])
            return 1;
    printf("move_pages of %d pages of a shared file mapping (already on node %d): %.2f us a call over %d calls; "
           "the first call %.0f us\n", PAGES, nodes[0], (now_us() - t0) / calls, calls, first);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    alarm(120); /* the watchdog of a run by hand; the test harness has its own */
    page = sysconf(_SC_PAGESIZE);
    char tmpl[] = "/tmp/pagemig-libnuma-calls-XXXXXX";
    int fd = mkstemp(tmpl);
    unlink(tmpl);
    if (fd < 0 || ftruncate(fd, 2 * page) != 0)
        return 2;
    if (argc > 2 && strcmp(argv[1], "--overhead") == 0)
        return overhead(fd, atoi(argv[2]));
    summary_fn = (long (*)(char *, size_t))dlsym(RTLD_DEFAULT, "pagemig_preload_summary");
    if (summary_fn) {
        char text[256];
        summary_fn(text, sizeof text);
        preload_enabled = strstr(text, "): enabled") != NULL;
    }
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--no-userfaultfd") == 0)
            no_userfaultfd = 1;
    if (no_userfaultfd)
        deny_userfaultfd();
    if (numa_available() < 0) {
        printf("libnuma: NUMA not available\n");
        return 2;
    }
    struct layout la, lb;
    make_layout(&la, fd);
    make_layout(&lb, fd);
    placement(lb.anon, 1, &home_node);
    target = argc > 1 && argv[1][0] != '-' ? atoi(argv[1]) : home_node;
    printf("memory on node %d, moved to node %d\n", home_node, target);
    move_pages_cases(&la, &lb);
    mbind_cases(&la, &lb);
    if (!data_intact(&la) || !data_intact(&lb)) {
        printf("DATA: the twin memory changed\n");
        failures++;
    }
    threads_and_forks(fd);
    printf("%s: %d case(s) differ\n", failures ? "FAIL" : "PASS", failures);
    return failures != 0;
}
