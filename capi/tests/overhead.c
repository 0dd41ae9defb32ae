/* What pagemig_move_pages adds to a call it hands to the kernel: pages of a shared file
 * mapping (which pagemig does not move itself), moved by the kernel's move_pages(2) and by
 * pagemig_move_pages in turn. With two nodes every call moves every page (the kernel's to
 * the other node, pagemig's back); with one, both answer that the pages are already home.
 * Built against the installed header and library; exits non-zero when a call fails or a
 * page is not where it was sent. Timings under software emulation are not real ones. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <pagemig.h>

#define PAGES 64
#define CALLS 200

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int *home_init(int *home, int node) {
    for (int i = 0; i < PAGES; i++)
        home[i] = node;
    return home;
}

static int all_on(const int *status, int node) {
    for (int i = 0; i < PAGES; i++)
        if (status[i] != node)
            return 0;
    return 1;
}

int main(int argc, char **argv) {
    long page = sysconf(_SC_PAGESIZE);
    char tmpl[] = "/tmp/pagemig-overhead-XXXXXX";
    int fd = mkstemp(tmpl);
    unlink(tmpl);
    if (fd < 0 || ftruncate(fd, PAGES * page) != 0)
        return 2;
    char *map = mmap(NULL, PAGES * page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return 2;
    memset(map, 1, PAGES * page);
    void *pages[PAGES];
    int status[PAGES], home[PAGES], away[PAGES];
    for (int i = 0; i < PAGES; i++)
        pages[i] = map + i * page;
    syscall(SYS_move_pages, 0, 1, pages, NULL, status, 0);
    /* argv[1]: another node exists (the one named, or node 0 if the pages are there). */
    int a = status[0], b = a;
    if (argc > 1)
        b = atoi(argv[1]) != a ? atoi(argv[1]) : a == 0 ? 1 : 0;
    /* The first call opens the engine (userfaultfd, its threads, the copy kernels' start-up
     * measurement): timed apart, as a program pays it once. */
    double t0 = now_us();
    long r0 = pagemig_move_pages(PAGES, pages, home_init(home, a), status, PAGEMIG_MPOL_MF_MOVE);
    double first = now_us() - t0;
    if (r0 != 0 || !all_on(status, a)) {
        printf("first pagemig_move_pages: %ld (errno %d)\n", r0, errno);
        return 1;
    }
    for (int i = 0; i < PAGES; i++) {
        home[i] = a;
        away[i] = b;
    }
    double kernel = 0, ours = 0;
    for (int c = 0; c < CALLS; c++) {
        double t = now_us();
        long r = syscall(SYS_move_pages, 0, PAGES, pages, away, status, PAGEMIG_MPOL_MF_MOVE);
        kernel += now_us() - t;
        if (r != 0 || !all_on(status, b)) {
            printf("kernel move_pages: %ld (errno %d), status[0] %d\n", r, errno, status[0]);
            return 1;
        }
        t = now_us();
        r = pagemig_move_pages(PAGES, pages, home, status, PAGEMIG_MPOL_MF_MOVE);
        ours += now_us() - t;
        if (r != 0 || !all_on(status, a)) {
            printf("pagemig_move_pages: %ld (errno %d), status[0] %d\n", r, errno, status[0]);
            return 1;
        }
    }
    struct pagemig_stats st;
    pagemig_stats(&st, sizeof st);
    printf("%d pages of a shared file, %s %d and %d, %d calls each: kernel move_pages %.1f us, "
           "pagemig_move_pages %.1f us a call (%+.1f us); the first pagemig call, opening the engine, %.0f us; "
           "pagemig handed %llu pages to the kernel\n",
           PAGES, a == b ? "all already on node" : "moved between nodes", a, b, CALLS, kernel / CALLS, ours / CALLS,
           (ours - kernel) / CALLS, first, (unsigned long long)st.kernel_unmovable);
    return 0;
}
