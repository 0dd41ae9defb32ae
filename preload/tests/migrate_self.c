/* migrate_pages(2) of the whole calling process, round after round between the nodes with
 * memory, while two threads store into and check every word of their memory: 4 KiB pages,
 * transparent huge pages, a malloc buffer and a shared anonymous mapping. Every round must
 * return a count of pages not moved (not -1), leave at most that many pages of the
 * program's memory off the new node, and lose no store. Then the calls the kernel refuses,
 * made through libnuma's symbol (the preload's under LD_PRELOAD) and with syscall(2): the
 * same return value and errno.
 *
 *   migrate_self [ROUNDS]     (default 4)
 *
 * Build: cc -Wall -Wextra -Werror -pthread migrate_self.c -lnuma -o migrate_self */
#define _GNU_SOURCE
#include <errno.h>
#include <numa.h>
#include <numaif.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SMALL (32UL << 20)
#define HUGE (16UL << 20)
#define HEAP (4UL << 20)
#define SHARED (1UL << 20)
#define WRITERS 2

struct area {
    const char *what;
    unsigned long *words;
    size_t len;
};

static struct area areas[4];
static atomic_int stop;
static atomic_long lost;
static long page;

static unsigned long *anon(size_t len, int flags, int advice) {
    void *m = mmap(NULL, len + (2UL << 20), PROT_READ | PROT_WRITE, flags | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    /* 2 MiB aligned, so that huge pages can back it. */
    unsigned long *a = (unsigned long *)(((unsigned long)m + (2UL << 20) - 1) & ~((2UL << 20) - 1));
    if (advice >= 0)
        madvise(a, len, advice);
    return a;
}

/* Each writer owns every WRITERS-th word of every area; pass p stores p into each of its
 * words after checking it still holds p - 1. A store lost to a migration shows as a word
 * holding an older pass. */
static void *writer(void *arg) {
    long me = (long)arg;
    for (unsigned long pass = 1; !atomic_load(&stop); pass++)
        for (int a = 0; a < 4; a++) {
            unsigned long *w = areas[a].words;
            size_t n = areas[a].len / sizeof *w;
            for (size_t i = me; i < n; i += WRITERS) {
                if (w[i] != pass - 1) {
                    if (atomic_fetch_add(&lost, 1) < 5)
                        printf("writer %ld: %s word %zu holds %lu, expected %lu\n", me, areas[a].what, i, w[i], pass - 1);
                }
                w[i] = pass;
            }
        }
    return NULL;
}

/* Pages of an area not on `node`, by the kernel's status query. */
static long off_node(struct area *a, int node) {
    size_t n = a->len / page;
    void **pages = malloc(n * sizeof *pages);
    int *status = malloc(n * sizeof *status);
    if (!pages || !status)
        exit(2);
    for (size_t i = 0; i < n; i++)
        pages[i] = (char *)a->words + i * page;
    long off = 0;
    if (syscall(SYS_move_pages, 0, n, pages, NULL, status, 0) != 0) {
        perror("move_pages (query)");
        off = (long)n;
    } else
        for (size_t i = 0; i < n; i++)
            off += status[i] != node;
    free(pages);
    free(status);
    return off;
}

static int refused(const char *what, int pid, unsigned long maxnode, const unsigned long *old, const unsigned long *new) {
    errno = 0;
    long ours = migrate_pages(pid, maxnode, old, new);
    int ours_errno = ours < 0 ? errno : 0;
    errno = 0;
    long kernel = syscall(SYS_migrate_pages, pid, maxnode, old, new);
    int kernel_errno = kernel < 0 ? errno : 0;
    int same = ours == kernel && ours_errno == kernel_errno;
    printf("%s: kernel %ld (%s), this call %ld (%s)%s\n", what, kernel, strerror(kernel_errno), ours,
           strerror(ours_errno), same ? "" : " DIFFER");
    return !same;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 4;
    page = sysconf(_SC_PAGESIZE);
    int nodes[64], n = 0;
    for (int i = 0; i <= numa_max_node() && n < 64; i++)
        if (numa_node_size64(i, NULL) > 0)
            nodes[n++] = i;
    areas[0] = (struct area){"4 KiB pages", anon(SMALL, MAP_PRIVATE, MADV_NOHUGEPAGE), SMALL};
    areas[1] = (struct area){"huge pages", anon(HUGE, MAP_PRIVATE, MADV_HUGEPAGE), HUGE};
    areas[2] = (struct area){"malloc buffer", calloc(1, HEAP), HEAP};
    areas[3] = (struct area){"shared mapping", anon(SHARED, MAP_SHARED, -1), SHARED};
    if (!areas[2].words)
        return 2;
    for (int a = 0; a < 4; a++)
        memset(areas[a].words, 0, areas[a].len);
    pthread_t threads[WRITERS];
    for (long t = 0; t < WRITERS; t++)
        pthread_create(&threads[t], NULL, writer, (void *)t);
    int failed = 0;
    unsigned long all = 0;
    for (int i = 0; i < n; i++)
        all |= 1UL << nodes[i];
    for (int r = 0; r < rounds; r++) {
        int target = nodes[(r + 1) % n];
        unsigned long to = 1UL << target;
        errno = 0;
        long left = migrate_pages(0, 65, &all, &to);
        if (left < 0) {
            printf("round %d: migrate_pages to node %d failed: %s\n", r, target, strerror(errno));
            failed = 1;
            continue;
        }
        long off = 0;
        for (int a = 0; a < 4; a++) {
            long o = off_node(&areas[a], target);
            if (o)
                printf("round %d: %ld pages of the %s not on node %d\n", r, o, areas[a].what, target);
            off += o;
        }
        printf("round %d: to node %d, %ld pages not moved, %ld of the program's pages off the node\n", r, target,
               left, off);
        if (off > left)
            failed = 1;
    }
    atomic_store(&stop, 1);
    for (int t = 0; t < WRITERS; t++)
        pthread_join(threads[t], NULL);
    printf("stores lost: %ld\n", atomic_load(&lost));
    failed |= atomic_load(&lost) != 0;

    unsigned long none = 0, node0 = 1UL << nodes[0], far = 1UL << 62;
    failed |= refused("maxnode past what the kernel reads", 0, 1UL << 20, &all, &node0);
    failed |= refused("unreadable new mask", 0, 65, &all, (const unsigned long *)8);
    failed |= refused("unreadable old mask", 0, 65, (const unsigned long *)8, &node0);
    failed |= refused("empty new mask", 0, 65, &all, &none);
    failed |= refused("a new node past the possible ones", 0, 65, &all, &far);
    failed |= refused("an old node past the possible ones", 0, 65, &far, &node0);
    failed |= refused("unreadable old mask, empty new mask", 0, 65, (const unsigned long *)8, &none);
    failed |= refused("old mask past what the kernel reads", 0, 1UL << 20, (const unsigned long *)8, &node0);
    failed |= refused("a process that does not exist", 0x3fffffff, 65, &all, &node0);
    failed |= refused("maxnode 0", 0, 0, &all, &node0);
    printf("%s\n", failed ? "FAILED" : "ok");
    return failed;
}
