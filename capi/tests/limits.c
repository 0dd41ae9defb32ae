/* Huge counts and a tight RLIMIT_AS: a move_pages entry point of pagemig's against the raw
 * system call, each case in a forked child whose standard error is captured, under a
 * watchdog. The arrays hold a few entries and end at a page that cannot be read (PROT_NONE),
 * so the kernel reads what is there and answers for the rest; every return value, errno
 * and status entry must be the kernel's, the child must exit normally, and nothing may be
 * written to its standard error.
 *
 * Included by conformance.c (pagemig_move_pages); built alone with -DLIMITS_MAIN for the
 * preload's move_pages under LD_PRELOAD (preload/tests/adversity.rs):
 *   cc -DLIMITS_MAIN -Wall -Wextra -Werror limits.c -lnuma -o limits */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef long (*move_pages_fn)(unsigned long count, void **pages, const int *nodes, int *status, int flags);

/* Entries served at a time by pagemig (src/ffi.rs CHUNK): a case with more entries than
 * this goes through pagemig's chunks before it meets the end of the arrays. */
#define LIMITS_CHUNK 65536
#define LIMITS_PAGES 4

static long limits_page;

static long limits_kernel(unsigned long count, void **pages, const int *nodes, int *status, int flags) {
    return syscall(SYS_move_pages, 0, count, pages, nodes, status, flags);
}

/* Room for `n` elements of `size` bytes that ends where a PROT_NONE page starts. */
static void *limits_at_end(size_t n, size_t size) {
    size_t len = (n * size + limits_page - 1) / limits_page * limits_page;
    char *m = mmap(NULL, len + limits_page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED || mprotect(m + len, limits_page, PROT_NONE) != 0) {
        perror("mmap");
        _exit(3);
    }
    return m + len - n * size;
}

struct limits_side {
    void **pages;
    int *nodes, *status;
};

/* Arrays of `n` entries over LIMITS_PAGES pages of fresh memory on `node`, each entry to
 * `node`. The pages are put on `node` by the kernel first: the thread may have run on
 * another node's CPU when it touched them, and the two calls compared must start alike. */
static struct limits_side limits_side(size_t n, int node) {
    char *mem = mmap(NULL, LIMITS_PAGES * limits_page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(mem, 9, LIMITS_PAGES * limits_page);
    void *home[LIMITS_PAGES];
    int to[LIMITS_PAGES], got[LIMITS_PAGES];
    for (int k = 0; k < LIMITS_PAGES; k++) {
        home[k] = mem + k * limits_page;
        to[k] = node;
    }
    limits_kernel(LIMITS_PAGES, home, to, got, 0);
    struct limits_side s = {limits_at_end(n, sizeof(void *)), limits_at_end(n, sizeof(int)), limits_at_end(n, sizeof(int))};
    for (size_t i = 0; i < n; i++) {
        s.pages[i] = mem + (i % LIMITS_PAGES) * limits_page;
        s.nodes[i] = node;
        s.status[i] = 0x5555;
    }
    return s;
}

/* Address space the process has mapped now (VmSize), in bytes. */
static unsigned long limits_vm_size(void) {
    unsigned long pages = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%lu", &pages) != 1)
            pages = 0;
        fclose(f);
    }
    return pages * limits_page;
}

/* The child of one case: both calls, compared; exits 0 when they agree. */
static void limits_child(move_pages_fn tested, const char *what, unsigned long count, size_t n, int tight) {
    int here = 0;
    void *probe = limits_at_end(1, sizeof(int));
    *(volatile int *)probe = 1;
    limits_kernel(1, &probe, NULL, &here, 0);
    struct limits_side a = limits_side(n, here), b = limits_side(n, here);
    if (tight) {
        struct rlimit lim = {limits_vm_size() + (8ul << 20), RLIM_INFINITY};
        if (setrlimit(RLIMIT_AS, &lim) != 0) {
            perror("setrlimit");
            _exit(3);
        }
    }
    errno = 0;
    long ra = tested(count, a.pages, a.nodes, a.status, 0);
    int ea = ra < 0 ? errno : 0;
    errno = 0;
    long rb = limits_kernel(count, b.pages, b.nodes, b.status, 0);
    int eb = rb < 0 ? errno : 0;
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) {
        if (a.status[i] != b.status[i] && differ < 5)
            printf("  entry %zu differs: pagemig %d, kernel %d\n", i, a.status[i], b.status[i]);
        differ += a.status[i] != b.status[i];
    }
    printf("%-44s pagemig %ld errno %-3d | kernel %ld errno %-3d | %zu status entries, %zu differ: %s\n", what, ra, ea, rb,
           eb, n, differ, ra == rb && ea == eb && differ == 0 ? "same" : "DIFFERENT");
    fflush(stdout);
    _exit(ra == rb && ea == eb && differ == 0 ? 0 : 1);
}

/* Runs one case in a forked child under a 60 s watchdog; 0 when it passed. */
static int limits_case(move_pages_fn tested, const char *what, unsigned long count, size_t n, int tight) {
    int err[2];
    if (pipe(err) != 0)
        return 1;
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        close(err[0]);
        dup2(err[1], 2);
        limits_child(tested, what, count, n, tight);
    }
    close(err[1]);
    int status = 0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    while (waitpid(child, &status, WNOHANG) == 0) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec > 60) {
            kill(child, SIGKILL);
            waitpid(child, &status, 0);
            printf("%-44s HUNG: killed after 60 s\n", what);
            break;
        }
        usleep(10000);
    }
    char text[4096];
    ssize_t len = read(err[0], text, sizeof text - 1);
    close(err[0]);
    int failed = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    if (WIFSIGNALED(status))
        printf("%-44s KILLED by signal %d (%s)\n", what, WTERMSIG(status), strsignal(WTERMSIG(status)));
    if (len > 0) {
        text[len] = 0;
        printf("%-44s wrote to stderr: %s\n", what, text);
        failed = 1;
    }
    return failed;
}

/* Every case; the number that failed. */
static int limits_cases(move_pages_fn tested) {
    limits_page = sysconf(_SC_PAGESIZE);
    int failed = 0;
    failed += limits_case(tested, "count 2^36, 4 entries readable", 1ul << 36, 4, 0);
    failed += limits_case(tested, "count 2^40, 4 entries readable", 1ul << 40, 4, 0);
    failed += limits_case(tested, "count 2^61, 4 entries readable", 1ul << 61, 4, 0);
    failed += limits_case(tested, "count 2^63, 4 entries readable", 1ul << 63, 4, 0);
    failed += limits_case(tested, "count ~0, 4 entries readable", ~0ul, 4, 0);
    failed += limits_case(tested, "count 2^40, a chunk and 8 entries readable", 1ul << 40, LIMITS_CHUNK + 8, 0);
    failed += limits_case(tested, "RLIMIT_AS at VmSize + 8 MiB, count 4", 4, 4, 1);
    failed += limits_case(tested, "RLIMIT_AS at VmSize + 8 MiB, count 65536", 65536, 65536, 1);
    printf("limits: %d case(s) failed\n", failed);
    return failed;
}

#ifdef LIMITS_MAIN
#include <numaif.h>

/* libnuma's move_pages: the preload's under LD_PRELOAD. */
static long preload_move_pages(unsigned long count, void **pages, const int *nodes, int *status, int flags) {
    return move_pages(0, count, pages, nodes, status, flags);
}

int main(void) {
    return limits_cases(preload_move_pages) != 0;
}
#endif
