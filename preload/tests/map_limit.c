/* A process that holds every mapping vm.max_map_count allows, less HEADROOM, then makes its
 * first move_pages and mbind calls: under the preload, those calls are the ones that start
 * pagemig's worker and engine, whose thread stacks and buffers are new mappings the kernel
 * may refuse. The answers must be the kernel's all the same, and nothing may abort.
 *
 * The kernel is asked first, with syscall(2) (which starts nothing); then the same calls
 * through libnuma's symbols (the preload's under LD_PRELOAD). Return values, errno and
 * every status entry must agree; the region's bytes must stay as written.
 *
 *   map_limit HEADROOM [NODE]     (default node 0)
 *
 * Build: cc -Wall -Wextra -Werror map_limit.c -lnuma -o map_limit
 * With -DVIA_CAPI (and pagemig.h, -lpagemig), the second way is the C entry,
 * pagemig_move_pages, instead of libnuma's move_pages, and mbind is left out (the C entry
 * has none): its first call opens the engine on the calling thread. */
#define _GNU_SOURCE
#include <errno.h>
#include <numaif.h>
#ifdef VIA_CAPI
#include <pagemig.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PAGES 1024

static void **held;
static size_t nheld;

/* Single pages mapped until the kernel refuses one more, alternately readable and not so
 * that no two merge; then `headroom` of them unmapped again. */
static void fill_the_map_count(size_t headroom) {
    size_t cap = 1 << 20;
    held = malloc(cap * sizeof *held);
    if (!held) {
        perror("malloc");
        exit(2);
    }
    for (;;) {
        void *p = mmap(NULL, 4096, nheld % 2 ? PROT_NONE : PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            if (errno != ENOMEM) {
                perror("mmap");
                exit(2);
            }
            break;
        }
        if (nheld == cap) {
            fprintf(stderr, "no map count limit met\n");
            exit(2);
        }
        held[nheld++] = p;
    }
    for (size_t i = 0; i < headroom && nheld > 0; i++) {
        munmap(held[--nheld], 4096);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: map_limit HEADROOM [NODE]\n");
        return 2;
    }
    size_t headroom = strtoul(argv[1], NULL, 10);
    int node = argc > 2 ? atoi(argv[2]) : 0;
    long page = sysconf(_SC_PAGESIZE);
    unsigned char *region = mmap(NULL, PAGES * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    for (long i = 0; i < PAGES * page; i++) {
        region[i] = (unsigned char)(i * 7 + 3);
    }
    void *pages[PAGES];
    int nodes[PAGES], want[PAGES], got[PAGES];
    for (int i = 0; i < PAGES; i++) {
        pages[i] = region + i * page;
        nodes[i] = node;
    }
    fill_the_map_count(headroom);
    int failures = 0;
    /* move_pages: to the node, then a query, the kernel's way first. */
    for (int pass = 0; pass < 2; pass++) {
        const int *to = pass == 0 ? nodes : NULL;
        memset(want, 0x55, sizeof want);
        memset(got, 0x55, sizeof got);
        errno = 0;
        long k = syscall(SYS_move_pages, 0, PAGES, pages, to, want, MPOL_MF_MOVE);
        int kerr = errno;
        errno = 0;
#ifdef VIA_CAPI
        long p = pagemig_move_pages(PAGES, pages, to, got, MPOL_MF_MOVE);
#else
        long p = move_pages(0, PAGES, pages, to, got, MPOL_MF_MOVE);
#endif
        int perr = errno;
        if (k != p || (k < 0 && kerr != perr) || memcmp(want, got, sizeof want) != 0) {
            printf("move_pages %s: kernel %ld (errno %d), preloaded %ld (errno %d), status[0] %d/%d\n",
                   to ? "move" : "query", k, kerr, p, perr, want[0], got[0]);
            failures++;
        }
    }
#ifndef VIA_CAPI
    /* mbind with MPOL_MF_MOVE, bound to the node, then the default policy again. */
    unsigned long mask = 1UL << node;
    errno = 0;
    long k = syscall(SYS_mbind, region, PAGES * page, MPOL_BIND, &mask, sizeof mask * 8, MPOL_MF_MOVE);
    int kerr = errno;
    syscall(SYS_mbind, region, PAGES * page, MPOL_DEFAULT, NULL, 0, 0);
    errno = 0;
    long p = mbind(region, PAGES * page, MPOL_BIND, &mask, sizeof mask * 8, MPOL_MF_MOVE);
    int perr = errno;
    if (k != p || (k < 0 && kerr != perr)) {
        printf("mbind: kernel %ld (errno %d), preloaded %ld (errno %d)\n", k, kerr, p, perr);
        failures++;
    }
#endif
    for (long i = 0; i < PAGES * page; i++) {
        if (region[i] != (unsigned char)(i * 7 + 3)) {
            printf("byte %ld changed\n", i);
            failures++;
            break;
        }
    }
    printf("%zu mappings held, headroom %zu: %s\n", nheld, headroom, failures ? "answers differ" : "the kernel's answers");
    return failures ? 1 : 0;
}
