/* pagemig_move_pages against the kernel's move_pages(2): the same inputs to both, every
 * return value, errno and status entry compared, and the cases of limits.c (huge counts, a
 * tight RLIMIT_AS). Built against the installed header and library (see capi/install).
 * Exits 0 when every case agrees. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <pagemig.h>

#include "limits.c"

static long capi_move_pages(unsigned long count, void **pages, const int *nodes, int *status, int flags) {
    return pagemig_move_pages(count, pages, nodes, status, flags);
}

#define N 12
static long page;
static int failures;

static long kernel_move_pages(unsigned long count, void **pages, const int *nodes, int *status, int flags) {
    return syscall(SYS_move_pages, 0, count, pages, nodes, status, flags);
}

/* A page mapped, written and unmapped again, low in the address space (from 256 MiB up)
 * where the kernel's top-down mmap never reaches: the library's own later mappings (its
 * threads, its pool) cannot take the hole over, so it stays unmapped for both calls. */
static char *unmapped_page(void) {
    static unsigned long next = 0x10000000UL;
    for (; next < 0x40000000UL; next += 16 * page) {
        char *p = mmap((void *)next, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (p == MAP_FAILED)
            continue;
        if (p != (char *)next) { /* a kernel that took the flag as a hint */
            munmap(p, page);
            continue;
        }
        p[0] = 1;
        munmap(p, page);
        next += 16 * page;
        return p;
    }
    fprintf(stderr, "no free low page for an unmapped address\n");
    exit(2);
}

/* Fills `pages` with one of each kind of address. */
static void layout(void **pages, int fd) {
    char *anon = mmap(NULL, 8 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(anon, 7, 4 * page);                      /* pages 0-3 touched, 4-7 not */
    char *ro = mmap(NULL, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *shared = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    shared[0] = 1;
    char *heap = malloc(3 * page);
    memset(heap, 3, 3 * page);
    char *gone = unmapped_page();
    void *p[N] = {
        anon, anon + page + 123, anon + 3 * page, anon + 5 * page, /* present, inside, present, untouched */
        ro, shared, shared + page, heap + page, gone, (void *)0x1000,
        anon, /* a duplicate */
        anon + 2 * page,
    };
    memcpy(pages, p, sizeof p);
}

static void compare(const char *what, unsigned long count, void **pa, void **pb, int *nodes, int flags, int nodes_null) {
    int sa[N], sb[N];
    memset(sa, 0x55, sizeof sa);
    memset(sb, 0x55, sizeof sb);
    errno = 0;
    long ra = pagemig_move_pages(count, pa, nodes_null ? NULL : nodes, sa, flags);
    int ea = ra < 0 ? errno : 0;
    errno = 0;
    long rb = kernel_move_pages(count, pb, nodes_null ? NULL : nodes, sb, flags);
    int eb = rb < 0 ? errno : 0;
    int same = ra == rb && ea == eb && (ra < 0 || memcmp(sa, sb, count * sizeof(int)) == 0);
    printf("%-40s pagemig %ld errno %-3d | kernel %ld errno %-3d | status", what, ra, ea, rb, eb);
    for (unsigned long i = 0; ra >= 0 && i < count; i++)
        printf(" %d/%d", sa[i], sb[i]);
    printf(" %s\n", same ? "same" : "DIFFERENT");
    failures += !same;
}

/* A status array that ends after 3 of 5 entries (the page after it inaccessible), the
 * targets alternating: the kernel moves the pages of its batches up to the one whose
 * statuses it cannot store, then fails with EFAULT, and leaves the rest where they are. */
static void short_status(int target, int other) {
    void *p[2][5];
    for (int k = 0; k < 2; k++) {
        char *mem = mmap(NULL, 5 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(mem, 9, 5 * page);
        int start[5], st0[5];
        for (int i = 0; i < 5; i++) {
            p[k][i] = mem + i * page;
            start[i] = other;
        }
        kernel_move_pages(5, p[k], start, st0, 0); /* all on the other node first */
    }
    int nodes[5] = {target, other, target, other, target};
    char *buf = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mprotect(buf + page, page, PROT_NONE);
    int *st = (int *)(buf + page) - 3;
    int sa[3], sb[3], wa[5], wb[5];
    memset(st, 0x55, 3 * sizeof(int));
    errno = 0;
    long ra = pagemig_move_pages(5, p[0], nodes, st, 0);
    int ea = ra < 0 ? errno : 0;
    memcpy(sa, st, sizeof sa);
    memset(st, 0x55, 3 * sizeof(int));
    errno = 0;
    long rb = kernel_move_pages(5, p[1], nodes, st, 0);
    int eb = rb < 0 ? errno : 0;
    memcpy(sb, st, sizeof sb);
    kernel_move_pages(5, p[0], NULL, wa, 0);
    kernel_move_pages(5, p[1], NULL, wb, 0);
    int same = ra == rb && ea == eb && memcmp(sa, sb, sizeof sa) == 0 && memcmp(wa, wb, sizeof wa) == 0;
    printf("%-40s pagemig %ld errno %-3d | kernel %ld errno %-3d | status", "status ending early, targets alternating",
           ra, ea, rb, eb);
    for (int i = 0; i < 3; i++)
        printf(" %d/%d", sa[i], sb[i]);
    printf(" | nodes after");
    for (int i = 0; i < 5; i++)
        printf(" %d/%d", wa[i], wb[i]);
    printf(" %s\n", same ? "same" : "DIFFERENT");
    failures += !same;
}

/* argv[1], when given, is the node to move to (in the two-node guest: the other node). */
int main(int argc, char **argv) {
    page = sysconf(_SC_PAGESIZE);
    struct pagemig_capabilities caps;
    if (pagemig_capabilities(&caps) != 0) {
        perror("pagemig_capabilities");
        return 2;
    }
    printf("pagemig: userfaultfd %s, user mode only %d\n", caps.available ? "available" : "absent", caps.user_mode_only);
    /* The agent starts once per process; a second call finds it running. */
    if (pagemig_agent_start() != 0 || pagemig_agent_start() != 0) {
        perror("pagemig_agent_start");
        return 2;
    }
    char batch[32];
    if (pagemig_attr_read("migrate/max_batch_pages", batch, sizeof batch) < 0 || pagemig_attr_write("migrate/max_batch_pages", batch) != 0) {
        perror("pagemig_attr");
        return 2;
    }
    errno = 0;
    if (pagemig_attr_read("no/such", batch, sizeof batch) != -1 || errno != ENOENT) {
        printf("unknown attribute: errno %d\n", errno);
        failures++;
    }
    char tmpl[] = "/tmp/pagemig-conformance-XXXXXX";
    int fd = mkstemp(tmpl);
    unlink(tmpl);
    if (fd < 0 || ftruncate(fd, 2 * page) != 0)
        return 2;
    void *pa[N], *pb[N];
    layout(pa, fd);
    layout(pb, fd);
    /* Where the first page is: the node to move to, and the other node if there is one. */
    int here[1];
    kernel_move_pages(1, pb, NULL, here, 0);
    int target = here[0];
    if (argc > 1)
        target = atoi(argv[1]);
    printf("pages on node %d, moved to node %d\n", here[0], target);
    int nodes[N];
    for (int i = 0; i < N; i++)
        nodes[i] = target;
    compare("query", N, pa, pb, nodes, 0, 1);
    compare("move to the target node", N, pa, pb, nodes, PAGEMIG_MPOL_MF_MOVE, 0);
    compare("move again (already there)", N, pa, pb, nodes, 0, 0);
    compare("count 0", 0, pa, pb, nodes, 0, 0);
    compare("bad flags", N, pa, pb, nodes, 0x10, 0);
    int bad[N];
    memcpy(bad, nodes, sizeof bad);
    bad[N - 1] = -1;
    compare("a negative node", N, pa, pb, bad, 0, 0);
    bad[N - 1] = 1000;
    compare("a node without memory", N, pa, pb, bad, 0, 0);
    compare("NULL pages", N, NULL, NULL, nodes, 0, 0);
    short_status(target, argc > 1 ? 1 - target : target); /* in the guest, nodes 0 and 1 */

    /* Pages another process maps too: a child forked after they were written shares them
     * until it exits (the kernel refuses them with -EACCES without MPOL_MF_MOVE_ALL). */
    char *sa = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *sb = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(sa, 5, 4 * page);
    memset(sb, 5, 4 * page);
    int hold[2];
    if (pipe(hold) != 0)
        return 2;
    pid_t child = fork();
    if (child == 0) {
        char c;
        close(hold[1]);
        _exit(read(hold[0], &c, 1) < 0);
    }
    close(hold[0]);
    void *qa[4], *qb[4];
    for (int i = 0; i < 4; i++) {
        qa[i] = sa + i * page;
        qb[i] = sb + i * page;
    }
    compare("pages a child process maps too", 4, qa, qb, nodes, PAGEMIG_MPOL_MF_MOVE, 0);
    close(hold[1]);
    waitpid(child, NULL, 0);
    compare("the same pages once the child exited", 4, qa, qb, nodes, PAGEMIG_MPOL_MF_MOVE, 0);
    for (int i = 0; i < 4 * page; i++)
        if (sa[i] != 5 || sb[i] != 5) {
            printf("byte %d of the shared pages changed\n", i);
            failures++;
            break;
        }

    struct pagemig_stats st;
    memset(&st, 0, sizeof st);
    if (pagemig_stats(&st, sizeof st) != 0) {
        perror("pagemig_stats");
        return 2;
    }
    printf("pagemig_stats: %llu calls, %llu pages: %llu moved by pagemig, %llu already home, %llu absent, "
           "%llu to the kernel (mapping), %llu to the kernel (after pagemig failed), %llu failed; "
           "%llu calls (%llu pages) handed to the kernel whole\n",
           (unsigned long long)st.calls, (unsigned long long)st.pages, (unsigned long long)st.moved,
           (unsigned long long)st.already_home, (unsigned long long)st.absent,
           (unsigned long long)st.kernel_unmovable, (unsigned long long)st.kernel_retried,
           (unsigned long long)st.failed, (unsigned long long)st.kernel_calls,
           (unsigned long long)st.kernel_call_pages);
    if (target != here[0] && (st.moved == 0 || st.kernel_unmovable == 0)) {
        printf("moving to another node, pagemig should have moved pages and handed shared ones to the kernel\n");
        failures++;
    }
    if (st.pages < st.already_home + st.absent + st.moved) {
        printf("pagemig_stats does not add up\n");
        failures++;
    }
    /* Huge counts and a tight RLIMIT_AS, each in a child of its own. */
    failures += limits_cases(capi_move_pages);
    printf("%s: %d case(s) differ\n", failures ? "FAIL" : "PASS", failures);
    return failures != 0;
}
