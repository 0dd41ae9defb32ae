/* move_pages and mbind from a signal handler: a 1 ms timer (setitimer, SIGALRM) fires again
 * and again while the main thread loops over malloc/free (sizes glibc serves under its
 * arena lock) and move_pages/mbind calls of its own; the handler calls move_pages and mbind
 * on a page, and each call is made twice, on twin memory: through libnuma's symbols (the
 * preload's under LD_PRELOAD) and with syscall(2). Every return value, errno and status
 * must agree; a deadlock is the harness's watchdog's to catch.
 *
 *   signal_calls [SECONDS]     (default 3)
 *
 * Build: cc -Wall -Wextra -Werror signal_calls.c -lnuma -o signal_calls */
#define _GNU_SOURCE
#include <errno.h>
#include <numaif.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAIN_PAGES 16

static long page;
static int node;
static unsigned long mask;
static char *handler_a, *handler_b;
static volatile sig_atomic_t handled, handler_differ, in_handler_calls;

static long kernel_move_pages(unsigned long count, void **pages, const int *nodes, int *status, int flags) {
    return syscall(SYS_move_pages, 0, count, pages, nodes, status, flags);
}

static long kernel_mbind(void *addr, unsigned long len, int mode, const unsigned long *nodemask, unsigned long maxnode,
                         unsigned flags) {
    return syscall(SYS_mbind, addr, len, mode, nodemask, maxnode, flags);
}

static void on_alarm(int sig) {
    (void)sig;
    int saved = errno;
    void *pa[1] = {handler_a}, *pb[1] = {handler_b};
    int nodes[1] = {node}, sa[1] = {-99}, sb[1] = {-99};
    long ra, rb;
    int ea, eb;
    if (handled % 2 == 0) {
        errno = 0;
        ra = move_pages(0, 1, pa, nodes, sa, MPOL_MF_MOVE);
        ea = ra < 0 ? errno : 0;
        errno = 0;
        rb = kernel_move_pages(1, pb, nodes, sb, MPOL_MF_MOVE);
        eb = rb < 0 ? errno : 0;
    } else {
        errno = 0;
        ra = mbind(handler_a, page, MPOL_BIND, &mask, 64, MPOL_MF_MOVE);
        ea = ra < 0 ? errno : 0;
        errno = 0;
        rb = kernel_mbind(handler_b, page, MPOL_BIND, &mask, 64, MPOL_MF_MOVE);
        eb = rb < 0 ? errno : 0;
    }
    handler_differ += ra != rb || ea != eb || sa[0] != sb[0];
    in_handler_calls += 2;
    handled++;
    errno = saved;
}

static char *fresh(size_t len) {
    char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    memset(m, 1, len);
    return m;
}

int main(int argc, char **argv) {
    int seconds = argc > 1 ? atoi(argv[1]) : 3;
    page = sysconf(_SC_PAGESIZE);
    handler_a = fresh(page);
    handler_b = fresh(page);
    char *main_a = fresh(MAIN_PAGES * page), *main_b = fresh(MAIN_PAGES * page);
    void *probe[1] = {handler_b};
    kernel_move_pages(1, probe, NULL, &node, 0);
    mask = 1ul << node;
    void *pa[MAIN_PAGES], *pb[MAIN_PAGES];
    int nodes[MAIN_PAGES], sa[MAIN_PAGES], sb[MAIN_PAGES];
    for (int i = 0; i < MAIN_PAGES; i++) {
        pa[i] = main_a + i * page;
        pb[i] = main_b + i * page;
        nodes[i] = node;
    }
    /* The first call a process makes through the preload starts pagemig's worker thread
     * (pthread_create allocates): made here, before any handler may interrupt malloc. */
    move_pages(0, MAIN_PAGES, pa, nodes, sa, MPOL_MF_MOVE);

    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_alarm;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    sigaction(SIGALRM, &action, NULL);
    struct itimerval every_ms = {{0, 1000}, {0, 1000}};
    setitimer(ITIMER_REAL, &every_ms, NULL);

    unsigned long rounds = 0, main_differ = 0, mallocs = 0;
    unsigned seed = 1;
    time_t end = time(NULL) + seconds;
    while (time(NULL) < end) {
        /* Sizes above the per-thread cache (1 KiB) and below the mmap threshold: served
         * from the arena, under its lock. */
        for (int i = 0; i < 200; i++, mallocs++) {
            size_t size = 2048 + rand_r(&seed) % (60 << 10);
            char *p = malloc(size);
            if (!p)
                return 2;
            p[0] = p[size - 1] = (char)i;
            free(p);
        }
        errno = 0;
        long ra = rounds % 2 ? mbind(main_a, MAIN_PAGES * page, MPOL_BIND, &mask, 64, MPOL_MF_MOVE)
                             : move_pages(0, MAIN_PAGES, pa, nodes, sa, MPOL_MF_MOVE);
        int ea = ra < 0 ? errno : 0;
        errno = 0;
        long rb = rounds % 2 ? kernel_mbind(main_b, MAIN_PAGES * page, MPOL_BIND, &mask, 64, MPOL_MF_MOVE)
                             : kernel_move_pages(MAIN_PAGES, pb, nodes, sb, MPOL_MF_MOVE);
        int eb = rb < 0 ? errno : 0;
        main_differ += ra != rb || ea != eb || (rounds % 2 == 0 && memcmp(sa, sb, sizeof sa) != 0);
        rounds++;
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    int ok = handled >= 100 && handler_differ == 0 && main_differ == 0;
    printf("signals: %d handler runs (%d calls, %d not as the kernel's), %lu main rounds (%lu not as the kernel's), "
           "%lu mallocs: %s\n",
           (int)handled, (int)in_handler_calls, (int)handler_differ, rounds, main_differ, mallocs,
           ok ? "PASS" : "FAIL");
    return !ok;
}
