/* The first call of a process, about memory it has just unmapped: the process maps a
 * 64 MiB region and unmaps it again, leaving a hole where the next mappings go (the
 * kernel places a new mapping in the highest gap that fits, and a new thread's stack is
 * one), then makes its first move_pages or mbind call, naming pages of the hole and pages
 * that are mapped. Under the preload that call is the one that starts pagemig's worker
 * and engine; their stacks must not turn the hole into memory the answer speaks of.
 *
 * The kernel is asked first, with syscall(2) (which starts nothing), on the same layout;
 * then the same call through libnuma's symbol (the preload's under LD_PRELOAD). Return
 * values, errno and every status entry must agree, and the hole's pages must be -EFAULT.
 * Prints whether anything was mapped in the hole after the call (pagemig's stacks, when
 * the worker and engine were started there).
 *
 *   freed_first move_pages|mbind|bad_node [NODE]     (default node 0)
 *
 * Build: cc -Wall -Wextra -Werror freed_first.c -lnuma -o freed_first */
#define _GNU_SOURCE
#include <errno.h>
#include <numaif.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define HOLE (64UL << 20)
#define MAPPED 16

static long page;

static char *fresh(size_t len) {
    char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    memset(m, 7, len);
    return m;
}

/* Whether any mapping of the process overlaps [start, end). */
static int mapped_in(unsigned long start, unsigned long end) {
    FILE *maps = fopen("/proc/self/maps", "r");
    if (!maps) {
        perror("/proc/self/maps");
        exit(2);
    }
    unsigned long a, b;
    int found = 0;
    char line[512];
    while (fgets(line, sizeof line, maps))
        if (sscanf(line, "%lx-%lx", &a, &b) == 2 && a < end && b > start)
            found = 1;
    fclose(maps);
    return found;
}

static int check_bytes(const char *m, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (m[i] != 7) {
            fprintf(stdout, "byte %zu of the mapped pages is %d, not 7\n", i, m[i]);
            return 1;
        }
    return 0;
}

/* The same move_pages call, first with syscall(2) (the kernel's answer, which starts
 * nothing), then through libnuma's symbol (the preload's under LD_PRELOAD): prints both
 * answers under `what`; whether the return values and errno agree. */
static int both_calls(const char *what, unsigned long count, void **pages, const int *nodes, int *kernel, int *ours) {
    errno = 0;
    long rk = syscall(SYS_move_pages, 0, count, pages, nodes, kernel, MPOL_MF_MOVE);
    int ek = rk < 0 ? errno : 0;
    errno = 0;
    long ro = move_pages(0, count, pages, nodes, ours, MPOL_MF_MOVE);
    int eo = ro < 0 ? errno : 0;
    printf("%s: kernel %ld errno %d, this call %ld errno %d\n", what, rk, ek, ro, eo);
    return rk == ro && ek == eo;
}

int main(int argc, char **argv) {
    if (argc < 2 || (strcmp(argv[1], "move_pages") && strcmp(argv[1], "mbind") && strcmp(argv[1], "bad_node"))) {
        fprintf(stderr, "usage: freed_first move_pages|mbind|bad_node [NODE]\n");
        return 2;
    }
    int node = argc > 2 ? atoi(argv[2]) : 0;
    page = sysconf(_SC_PAGESIZE);
    int failed = 0;
    if (!strcmp(argv[1], "bad_node")) {
        /* The first entry names a page of the hole and a node that does not exist: the
         * kernel checks the node first and fails the call with ENODEV, moving nothing and
         * leaving every status entry as it was. */
        unsigned long count = 1 + MAPPED;
        void *pages[1 + MAPPED];
        int nodes[1 + MAPPED], kernel[1 + MAPPED], ours[1 + MAPPED];
        char *mapped = fresh(MAPPED * page);
        char *hole = fresh(HOLE);
        munmap(hole, HOLE);
        for (unsigned long i = 0; i < count; i++) {
            pages[i] = i == 0 ? hole : mapped + (i - 1) * page;
            nodes[i] = i == 0 ? 4000 : node;
            kernel[i] = ours[i] = -99;
        }
        int same = both_calls("bad_node", count, pages, nodes, kernel, ours);
        if (!same || memcmp(kernel, ours, sizeof kernel)) {
            printf("answers or status entries differ:");
            for (unsigned long i = 0; i < count; i++)
                printf(" %d/%d", kernel[i], ours[i]);
            printf("\n");
            failed = 1;
        }
        failed |= check_bytes(mapped, MAPPED * page);
    } else if (!strcmp(argv[1], "move_pages")) {
        /* The arrays (mapped by malloc, being large) and the mapped pages first, then the
         * hole: the hole is the most recent mapping's place, and nothing of the program's
         * is mapped there before the calls. */
        unsigned long count = MAPPED + HOLE / page;
        void **pages = calloc(count, sizeof *pages);
        int *nodes = calloc(count, sizeof *nodes);
        int *kernel = calloc(count, sizeof *kernel), *ours = calloc(count, sizeof *ours);
        if (!pages || !nodes || !kernel || !ours)
            return 2;
        char *mapped = fresh(MAPPED * page);
        char *hole = fresh(HOLE);
        munmap(hole, HOLE);
        for (unsigned long i = 0; i < count; i++) {
            pages[i] = i < MAPPED ? mapped + i * page : hole + (i - MAPPED) * page;
            nodes[i] = node;
            kernel[i] = ours[i] = -99;
        }
        int same = both_calls("move_pages", count, pages, nodes, kernel, ours);
        printf("hole mapped after the call: %s\n",
               mapped_in((unsigned long)hole, (unsigned long)hole + HOLE) ? "yes" : "no");
        if (!same) {
            printf("return values or errno differ\n");
            failed = 1;
        }
        unsigned long differ = 0;
        for (unsigned long i = 0; i < count; i++) {
            int want = i < MAPPED ? node : -EFAULT;
            if (kernel[i] != ours[i] || ours[i] != want) {
                if (differ++ < 5)
                    printf("entry %lu (%s): kernel %d, this call %d, expected %d\n", i, i < MAPPED ? "mapped" : "hole",
                           kernel[i], ours[i], want);
            }
        }
        if (differ) {
            printf("%lu of %lu entries differ\n", differ, count);
            failed = 1;
        }
        failed |= check_bytes(mapped, MAPPED * page);
    } else {
        /* A mapped tail after the hole: the range [hole's last page, tail's end) has a hole,
         * which the kernel refuses with EFAULT. */
        char *region = fresh(HOLE + MAPPED * page);
        char *tail = region + HOLE;
        munmap(region, HOLE);
        unsigned long mask = 1UL << node;
        char *start = tail - page;
        unsigned long len = (MAPPED + 1) * page;
        errno = 0;
        long rk = syscall(SYS_mbind, start, len, MPOL_BIND, &mask, 64, MPOL_MF_MOVE);
        int ek = rk < 0 ? errno : 0;
        errno = 0;
        long ro = mbind(start, len, MPOL_BIND, &mask, 64, MPOL_MF_MOVE);
        int eo = ro < 0 ? errno : 0;
        int reused = mapped_in((unsigned long)region, (unsigned long)tail);
        printf("mbind: kernel %ld errno %d, this call %ld errno %d; hole mapped after the call: %s\n", rk, ek, ro, eo,
               reused ? "yes" : "no");
        if (rk != ro || ek != eo || ek != EFAULT) {
            printf("answers differ, or not EFAULT\n");
            failed = 1;
        }
        /* The range the kernel refused: no policy may have been set on anything in it. */
        int mode = -1;
        if (syscall(SYS_get_mempolicy, &mode, NULL, 0, start, MPOL_F_ADDR) == 0 && mode != MPOL_DEFAULT) {
            printf("a policy (mode %d) was set at the refused range's first address\n", mode);
            failed = 1;
        }
        failed |= check_bytes(tail, MAPPED * page);
    }
    printf("%s\n", failed ? "FAILED" : "ok");
    return failed;
}
