/*
 * dvmm-guest CPL3 runtime: command line, job dispatch, barriers, and the
 * workloads. Everything here runs at CPL3 (natively, even on PVM hosts) and
 * reaches the kernel only through the int3 system-call gate (see common.h).
 */
#include "common.h"
#include "npb.h"

/* ---------------------------------------------------------------- */
/* System calls                                                      */

static inline u64 sys(u64 n, u64 a, u64 b, u64 c)
{
    __asm__ volatile("int3" : "+a"(n) : "D"(a), "S"(b), "d"(c) : "memory");
    return n;
}

static inline u64 xadd(volatile u64 *p, u64 v)
{
    __asm__ volatile("lock xaddq %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}
static inline u64 xchg(volatile u64 *p, u64 v)
{
    __asm__ volatile("xchgq %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }

/* ---------------------------------------------------------------- */
/* Runtime state                                                     */

static struct sysinfo *si;
static u32 ncpu, nnode;
static u64 tsc_khz;
static const char *cur_name = "boot";
static u64 timeout_s = 60;
static u64 syscall_ns;     /* measured cost of a null system call */
/* Spin before sleeping: a few system calls' worth (sleeping and being
 * woken each cost a system call, ~150 us when CPL0 is emulated). */
static u64 spin_cycles = 100000;

struct percpu {
    volatile u64 sleeping;
    u64 idle;                  /* waiting for work: no deadline */
    u64 a, b, c, d;            /* per-CPU results */
    s32 node;
} ALIGNED(4096);
/* One page per CPU, on that CPU's node (SYS_PERCPU_PAGE), written by its
 * owner only (except `sleeping`, read by wakers, and the resets by CPU 0
 * between workloads): in dvmm pages move between nodes, so per-CPU state
 * must not share a page with another CPU's. Set up by CPU 0 before
 * rt_ready. */
static struct percpu *pc[MAX_CPUS];

static void uprintf(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnfmt(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 1)
        n = sizeof buf - 1;
    sys(SYS_PRINT, (u64)buf, n, 0);
}

static void NORETURN uexit(u32 status)
{
    sys(SYS_EXIT, status, 0, 0);
    for (;;)
        ;
}

static u64 us_since(u64 t0) { return (rdtsc() - t0) * 1000 / tsc_khz; }

/* ---------------------------------------------------------------- */
/* Waiting: spin natively for a while, then halt in the kernel (frees */
/* the host CPU when vCPUs outnumber cores) until a wake-up IPI or a  */
/* timer. Every wait has a deadline: the guest never hangs.           */

struct waiter { u64 spin_end, deadline, sleep_us; };

static void waiter_init(struct waiter *w, u32 me)
{
    u64 now = rdtsc();
    w->spin_end = now + spin_cycles;
    w->deadline = pc[me]->idle ? ~0UL : now + timeout_s * tsc_khz * 1000;
    w->sleep_us = 50;
}

static void NORETURN wait_timeout(const char *what)
{
    uprintf("dvmm-guest: %s FAIL timeout (%lus) waiting for %s on cpu %lu\n", cur_name, timeout_s, what,
            sys(SYS_CPUID, 0, 0, 0));
    uexit(1);
}

/* returns 1 while still in the spinning phase */
static int waiter_spin(struct waiter *w, const char *what)
{
    u64 now = rdtsc();
    if (now > w->deadline)
        wait_timeout(what);
    if (now < w->spin_end) {
        cpu_relax();
        return 1;
    }
    return 0;
}

static void waiter_sleep(struct waiter *w, u64 max_us)
{
    sys(SYS_YIELD, w->sleep_us, 0, 0);
    if (w->sleep_us < max_us)
        w->sleep_us *= 2;
}

/* Dekker-style: the waiter announces itself before its last check, the
 * waker publishes its change before looking at the flags. */
#define WAIT_UNTIL(me, cond, what, max_us)                       \
    do {                                                         \
        struct waiter w_;                                        \
        waiter_init(&w_, me);                                      \
        while (!(cond)) {                                        \
            if (waiter_spin(&w_, what))                          \
                continue;                                        \
            xchg(&pc[me]->sleeping, 1);                           \
            if (cond) {                                          \
                pc[me]->sleeping = 0;                             \
                break;                                           \
            }                                                    \
            waiter_sleep(&w_, max_us);                           \
            pc[me]->sleeping = 0;                                 \
        }                                                        \
    } while (0)

static void wake(u32 cpu)
{
    mfence();
    if (pc[cpu]->sleeping)
        sys(SYS_WAKE, cpu, 0, 0);
}
static void wake_all(u32 me)
{
    mfence();
    for (u32 i = 0; i < ncpu; i++)
        if (i != me && pc[i]->sleeping)
            sys(SYS_WAKE, i, 0, 0);
}

/* Sense-free generation barrier over all CPUs. */
static struct { volatile u64 count ALIGNED(64); volatile u64 gen ALIGNED(64); } bar;

static void barrier_all(u32 me)
{
    u64 gen = bar.gen;
    if (xadd(&bar.count, 1) == ncpu - 1) {
        bar.count = 0;
        barrier();
        bar.gen = gen + 1;
        wake_all(me);
        return;
    }
    WAIT_UNTIL(me, bar.gen != gen, "barrier", 2000);
}

/* Test-and-test-and-set spin lock; long waits sleep (no wake-ups). */
static void spin_lock(u32 me, volatile u64 *l)
{
    while (xchg(l, 1))
        WAIT_UNTIL(me, *l == 0, "spinlock", 200);
}
static void spin_unlock(volatile u64 *l)
{
    barrier();
    *l = 0;
}

/* ---------------------------------------------------------------- */
/* Parameters                                                        */

enum { P_ITERS, P_SIZE, P_MEM, P_SEED, P_STEPS, P_SLOTS, P_PEER, P_NUMA, P_TIMEOUT, P_CLASS, P_CORRUPT, NPARAM };
static const char *const pname[NPARAM] = { "iters", "size", "mem", "seed", "steps", "slots", "peer", "numa", "timeout",
                                           "class", "corrupt" };

struct params { u64 v[NPARAM]; };   /* numa: 1 = local, 0 = ignore; class: 'S', 'W', 'A' */

struct workload {
    const char *name;
    void (*par)(u32 me);           /* runs on every CPU */
    int (*check)(char *out, u64 n); /* CPU 0 afterwards: result keys; 0 = pass */
    struct params def;
    u64 used;                      /* bit mask of parameters it reads */
    struct params p;
    int selected;
    int own_line;                  /* check() prints time_us itself (the NPB line format) */
};

static struct workload *W;      /* the workload being run */
#define PRM(i) (W->p.v[i])
static u64 T0, T1;              /* timed section, TSC, set by CPU 0 */
static int numa_local(void) { return PRM(P_NUMA) != 0; }
static s64 data_node(u32 me) { return numa_local() ? pc[me]->node : 0; }

/* Highest end address ualloc has handed out on each node since boot. The
 * allocator restarts at the same addresses after every workload, so this
 * is how faultlat finds memory that no workload has touched yet (its
 * one-node read phase times first touches). A page of its own: every
 * allocation reads it, and it is written only while a node's mark grows. */
#define UALLOC_NODES 64 /* kernel.c's MAX_NODES */
static union { volatile u64 top[UALLOC_NODES]; u8 page[4096]; } ualloc_hw ALIGNED(4096);

static void *ualloc(s64 node, u64 size)
{
    u64 p = sys(SYS_ALLOC, (u64)node, size, 4096);
    if (p && node >= 0 && node < UALLOC_NODES) {
        volatile u64 *t = &ualloc_hw.top[node];
        u64 old = *t;
        while (p + size > old) {
            u64 seen = __sync_val_compare_and_swap(t, old, p + size);
            if (seen == old)
                break;
            old = seen;
        }
    }
    return (void *)p;
}

/* size bytes on node that no ualloc has handed out since boot (so untouched
 * by any workload): skips the allocator past the node's high-water mark.
 * When that does not fit, ordinary memory and *fresh = 0. */
static void *ualloc_fresh(s64 node, u64 size, int *fresh)
{
    u64 top = node >= 0 && node < UALLOC_NODES ? ualloc_hw.top[node] : ~0UL;
    u64 p = (u64)ualloc(node, 4096); /* where the bump pointer is now */
    if (p && top != ~0UL && p + 4096 < top)
        ualloc(node, top - p - 4096);
    u64 b = (u64)ualloc(node, size);
    *fresh = b && b >= top;
    return (void *)b;
}

static volatile u64 alloc_failed;
#define ALLOC_OR_FLAG(ptr, node, size)                   \
    do {                                                 \
        (ptr) = ualloc((node), (size));                  \
        if (!(ptr))                                      \
            alloc_failed = 1;                            \
    } while (0)

static inline u64 splitmix(u64 x)
{
    x += 0x9E3779B97F4A7C15UL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
    return x ^ (x >> 31);
}

static void chunk(u64 total, u32 me, u32 n, u64 *lo, u64 *hi)
{
    *lo = total * me / n;
    *hi = total * (me + 1) / n;
}

#define TIMED_START(me)      \
    do {                     \
        barrier_all(me);     \
        if ((me) == 0)       \
            T0 = rdtsc();    \
    } while (0)
#define TIMED_END(me)        \
    do {                     \
        barrier_all(me);     \
        if ((me) == 0)       \
            T1 = rdtsc();    \
    } while (0)

/* ---------------------------------------------------------------- */
/* (i) ep: Monte-Carlo pi, fixed seed, serial recomputation          */

static void ep_range(u64 lo, u64 hi, u64 seed, u64 *inside, u64 *csum)
{
    u64 in = 0, cs = 0;
    for (u64 i = lo; i < hi; i++) {
        u64 r = splitmix(seed * 0x100000001B3UL + i);
        u64 x = r & 0x7FFFFFFF, y = (r >> 32) & 0x7FFFFFFF;
        in += x * x + y * y < (1UL << 62);
        cs += r;
    }
    *inside = in;
    *csum = cs;
}

static void ep_par(u32 me)
{
    u64 lo, hi;
    chunk(PRM(P_SIZE), me, ncpu, &lo, &hi);
    TIMED_START(me);
    ep_range(lo, hi, PRM(P_SEED), &pc[me]->a, &pc[me]->b);
    TIMED_END(me);
}

static int ep_check(char *out, u64 n)
{
    u64 in = 0, cs = 0, ein, ecs;
    for (u32 c = 0; c < ncpu; c++) {
        in += pc[c]->a;
        cs += pc[c]->b;
    }
    ep_range(0, PRM(P_SIZE), PRM(P_SEED), &ein, &ecs); /* serial recomputation */
    u64 pi6 = in * 4000000 / PRM(P_SIZE);
    snfmt(out, n, "samples=%lu inside=%lu pi=%lu.%06lu checksum=%016lx", PRM(P_SIZE), in, pi6 / 1000000,
          pi6 % 1000000, cs);
    if (in != ein || cs != ecs) {
        snfmt(out + strlen(out), n - strlen(out), " expected_inside=%lu expected_checksum=%016lx", ein, ecs);
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- */
/* (ii) counter: lock xadd by every CPU                              */

static struct { volatile u64 v ALIGNED(64); } counter;

static void counter_par(u32 me)
{
    if (me == 0)
        counter.v = 0;
    TIMED_START(me);
    u64 s = 0, it = PRM(P_ITERS);
    for (u64 i = 0; i < it; i++)
        s += xadd(&counter.v, 1);
    pc[me]->a = s;
    TIMED_END(me);
}

static int counter_check(char *out, u64 n)
{
    u64 t = (u64)ncpu * PRM(P_ITERS), s = 0;
    for (u32 c = 0; c < ncpu; c++)
        s += pc[c]->a;
    /* every value 0..t-1 is fetched exactly once */
    u64 es = (t % 2 == 0) ? (t / 2) * (t - 1) : t * ((t - 1) / 2);
    snfmt(out, n, "cpus=%u iters=%lu total=%lu", ncpu, PRM(P_ITERS), counter.v);
    if (counter.v != t)
        return snfmt(out + strlen(out), n - strlen(out), " expected=%lu", t), 1;
    if (s != es)
        return snfmt(out + strlen(out), n - strlen(out), " fetched_sum=%lu expected_sum=%lu", s, es), 1;
    return 0;
}

/* ---------------------------------------------------------------- */
/* gap: the longest time each CPU did not run (issue 15: a vCPU       */
/* migrating to another node stops for that long, as the guest sees) */

static void gap_par(u32 me)
{
    TIMED_START(me);
    u64 dur = PRM(P_ITERS) * tsc_khz; /* iters: milliseconds */
    u64 t0 = rdtsc(), prev = t0, max = 0, over = 0, n = 0;
    while (prev - t0 < dur) {
        u64 t = rdtsc();
        u64 d = t > prev ? t - prev : 0;
        if (d > max)
            max = d;
        if (d > tsc_khz) /* longer than 1 ms */
            over++;
        prev = t;
        n++;
    }
    pc[me]->a = max;
    pc[me]->b = over;
    pc[me]->c = n;
    TIMED_END(me);
}

static int gap_check(char *out, u64 n)
{
    u64 max = 0, over = 0, k = 0;
    int bad = 0;
    char per[256];
    per[0] = 0;
    for (u32 c = 0; c < ncpu; c++) {
        u64 us = pc[c]->a * 1000 / tsc_khz;
        if (pc[c]->a > max)
            max = pc[c]->a;
        over += pc[c]->b;
        bad |= pc[c]->c == 0;
        k += snfmt(per + k, sizeof per - k, "%s%lu", c ? "," : "", us);
    }
    snfmt(out, n, "cpus=%u ms=%lu max_gap_us=%lu gaps_over_1ms=%lu cpu_gap_us=%s", ncpu, PRM(P_ITERS),
          max * 1000 / tsc_khz, over, per);
    return bad;
}

/* ---------------------------------------------------------------- */
/* (iii) spinlock: histogram + linked list under one lock            */

struct lnode { struct lnode *next; u32 cpu, idx; u64 key; };
static struct {
    volatile u64 lock ALIGNED(64);
    volatile u64 owner;
    volatile u64 violations;
    struct lnode *volatile head;
    volatile u64 total;
    volatile u64 *hist;
} sl;

static inline u64 sl_key(u64 seed, u32 cpu, u64 i) { return splitmix(seed ^ ((u64)cpu << 40) ^ i); }

static void spinlock_par(u32 me)
{
    u64 it = PRM(P_ITERS), nb = PRM(P_SIZE), seed = PRM(P_SEED);
    if (me == 0) {
        sl.lock = 0;
        sl.owner = ~0UL;
        sl.violations = 0;
        sl.head = 0;
        sl.total = 0;
        ALLOC_OR_FLAG(sl.hist, 0, nb * 8);
        if (sl.hist)
            memset((void *)sl.hist, 0, nb * 8);
    }
    struct lnode *nodes;
    ALLOC_OR_FLAG(nodes, data_node(me), it * sizeof(struct lnode));
    barrier_all(me);
    if (alloc_failed)
        return;
    TIMED_START(me);
    for (u64 i = 0; i < it; i++) {
        struct lnode *nd = &nodes[i];
        nd->cpu = me;
        nd->idx = (u32)i;
        nd->key = sl_key(seed, me, i);
        spin_lock(me, &sl.lock);
        if (sl.owner != ~0UL)
            sl.violations++;
        sl.owner = me;
        sl.hist[nd->key % nb]++;
        nd->next = sl.head;
        sl.head = nd;
        sl.total = sl.total + 1;
        if (sl.owner != me)
            sl.violations++;
        sl.owner = ~0UL;
        spin_unlock(&sl.lock);
    }
    TIMED_END(me);
}

static int spinlock_check(char *out, u64 n)
{
    u64 it = PRM(P_ITERS), nb = PRM(P_SIZE), seed = PRM(P_SEED), t = ncpu * it;
    u64 len = 0, bad = 0;
    u64 *h = ualloc(0, nb * 8);
    if (!h)
        return snfmt(out, n, "out of memory"), 1;
    memset(h, 0, nb * 8);
    for (struct lnode *p = sl.head; p && len <= t; p = p->next, len++) {
        if (p->cpu >= ncpu || p->idx >= it || p->key != sl_key(seed, p->cpu, p->idx))
            bad++;
        h[p->key % nb]++;
    }
    /* expected histogram, computed independently of the list */
    u64 *eh = ualloc(0, nb * 8), hist_bad = 0, hist_sum = 0;
    if (!eh)
        return snfmt(out, n, "out of memory"), 1;
    memset(eh, 0, nb * 8);
    for (u32 c = 0; c < ncpu; c++)
        for (u64 i = 0; i < it; i++)
            eh[sl_key(seed, c, i) % nb]++;
    for (u64 b = 0; b < nb; b++) {
        hist_sum += sl.hist[b];
        hist_bad += sl.hist[b] != eh[b] || h[b] != eh[b];
    }
    snfmt(out, n, "cpus=%u iters=%lu buckets=%lu total=%lu list=%lu", ncpu, it, nb, sl.total, len);
    if (sl.total != t || len != t || hist_sum != t || bad || hist_bad || sl.violations) {
        snfmt(out + strlen(out), n - strlen(out), " expected=%lu bad_nodes=%lu bad_buckets=%lu violations=%lu", t,
              bad, hist_bad, sl.violations);
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- */
/* (iv) matmul: X <- X*X + (i^j^s) mod 2^32, rows split over CPUs,   */
/* a barrier between steps (every step reads all rows)              */

static u32 **mm_rows[2];

static void mm_step(u32 **src, u32 **dst, u64 n, u64 lo, u64 hi, u64 s)
{
    for (u64 i = lo; i < hi; i++) {
        u32 *d = dst[i], *a = src[i];
        for (u64 j = 0; j < n; j++)
            d[j] = (u32)(i ^ j ^ s);
        for (u64 t = 0; t < n; t++) {
            u32 x = a[t], *b = src[t];
            for (u64 j = 0; j < n; j++)
                d[j] += x * b[j];
        }
    }
}

static u64 mm_init_val(u64 seed, u64 i, u64 j, u64 n) { return (u32)splitmix(seed ^ (i * n + j)); }

static void matmul_par(u32 me)
{
    u64 n = PRM(P_SIZE), steps = PRM(P_STEPS), seed = PRM(P_SEED), lo, hi;
    chunk(n, me, ncpu, &lo, &hi);
    if (me == 0) {
        ALLOC_OR_FLAG(mm_rows[0], 0, n * 8);
        ALLOC_OR_FLAG(mm_rows[1], 0, n * 8);
    }
    barrier_all(me);
    if (alloc_failed)
        return;
    if (hi > lo) {
        u32 *blk;
        ALLOC_OR_FLAG(blk, data_node(me), 2 * (hi - lo) * n * 4);
        if (blk)
            for (u64 i = lo; i < hi; i++) {
                mm_rows[0][i] = blk + (i - lo) * n;
                mm_rows[1][i] = blk + (hi - lo + i - lo) * n;
                for (u64 j = 0; j < n; j++)
                    mm_rows[0][i][j] = mm_init_val(seed, i, j, n);
            }
    }
    barrier_all(me);
    if (alloc_failed)
        return;
    TIMED_START(me);
    for (u64 s = 0; s < steps; s++) {
        mm_step(mm_rows[s & 1], mm_rows[(s + 1) & 1], n, lo, hi, s);
        barrier_all(me);
    }
    TIMED_END(me);
}

static int matmul_check(char *out, u64 n_out)
{
    u64 n = PRM(P_SIZE), steps = PRM(P_STEPS), seed = PRM(P_SEED);
    u32 **r[2];
    r[0] = ualloc(0, n * 8);
    r[1] = ualloc(0, n * 8);
    u32 *blk = ualloc(0, 2 * n * n * 4);
    if (!r[0] || !r[1] || !blk)
        return snfmt(out, n_out, "n=%lu out of memory for the serial check", n), 1;
    for (u64 i = 0; i < n; i++) {
        r[0][i] = blk + i * n;
        r[1][i] = blk + (n + i) * n;
        for (u64 j = 0; j < n; j++)
            r[0][i][j] = mm_init_val(seed, i, j, n);
    }
    for (u64 s = 0; s < steps; s++)
        mm_step(r[s & 1], r[(s + 1) & 1], n, 0, n, s);
    u64 cs = 0, ecs = 0, diff = 0;
    u32 **got = mm_rows[steps & 1], **exp = r[steps & 1];
    for (u64 i = 0; i < n; i++)
        for (u64 j = 0; j < n; j++) {
            cs += (u64)got[i][j] * (i * n + j + 1);
            ecs += (u64)exp[i][j] * (i * n + j + 1);
            diff += got[i][j] != exp[i][j];
        }
    snfmt(out, n_out, "n=%lu steps=%lu numa=%s checksum=%016lx", n, steps, numa_local() ? "local" : "ignore", cs);
    if (diff || cs != ecs)
        return snfmt(out + strlen(out), n_out - strlen(out), " expected=%016lx wrong_elements=%lu", ecs, diff), 1;
    return 0;
}

/* ---------------------------------------------------------------- */
/* (v) ring: single-producer/single-consumer rings between CPU pairs */

struct ring {
    volatile u64 head ALIGNED(64);
    volatile u64 tail ALIGNED(64);
    u64 slots[];
};
static struct ring *rings[MAX_CPUS];

static inline u64 ring_val(u64 seed, u32 pair, u64 s) { return splitmix(seed ^ ((u64)pair << 48) ^ s); }

static void ring_par(u32 me)
{
    u64 it = PRM(P_ITERS), ns = PRM(P_SLOTS), seed = PRM(P_SEED);
    u32 pair = me / 2;
    int self = (me == ncpu - 1) && (ncpu % 2 == 1); /* odd one out: its own ring */
    int consumer = self || (me % 2 == 1);
    if (consumer) {
        struct ring *r;
        ALLOC_OR_FLAG(r, data_node(me), sizeof(struct ring) + ns * 8);
        if (r)
            r->head = r->tail = 0;
        rings[pair] = r;
    }
    barrier_all(me);
    if (alloc_failed)
        return;
    struct ring *r = rings[pair];
    u32 partner = self ? me : (me ^ 1);
    u64 bad = 0, sum = 0;
    TIMED_START(me);
    if (self) {
        for (u64 s = 0; s < it;) {
            u64 b = it - s < ns ? it - s : ns;
            for (u64 k = 0; k < b; k++)
                r->slots[(s + k) % ns] = ring_val(seed, pair, s + k);
            for (u64 k = 0; k < b; k++) {
                u64 v = r->slots[(s + k) % ns];
                bad += v != ring_val(seed, pair, s + k);
                sum += v;
            }
            s += b;
        }
    } else if (!consumer) {
        /* publish every quarter ring so both sides stream */
        u64 head = 0, tail = 0, q = ns / 4 ? ns / 4 : 1;
        while (head < it) {
            if (head - tail >= ns) {
                tail = r->tail;
                if (head - tail >= ns) {
                    WAIT_UNTIL(me, head - r->tail < ns, "ring space", 1000);
                    tail = r->tail;
                }
            }
            u64 lim = tail + ns < it ? tail + ns : it;
            if (lim > head + q)
                lim = head + q;
            for (; head < lim; head++)
                r->slots[head % ns] = ring_val(seed, pair, head);
            barrier();
            r->head = head;
            wake(partner);
        }
    } else {
        u64 tail = 0, q = ns / 4 ? ns / 4 : 1;
        while (tail < it) {
            u64 head = r->head;
            if (head == tail) {
                WAIT_UNTIL(me, r->head != tail, "ring data", 1000);
                head = r->head;
            }
            if (head > tail + q)
                head = tail + q;
            barrier();
            for (; tail < head; tail++) {
                u64 v = r->slots[tail % ns];
                bad += v != ring_val(seed, pair, tail);
                sum += v;
            }
            barrier();
            r->tail = tail;
            wake(partner);
        }
    }
    pc[me]->a = consumer ? bad : 0;
    pc[me]->b = consumer ? sum : 0;
    pc[me]->c = consumer;
    TIMED_END(me);
}

static int ring_check(char *out, u64 n)
{
    u64 it = PRM(P_ITERS), seed = PRM(P_SEED), bad = 0, sum = 0, esum = 0, rings_n = 0;
    for (u32 c = 0; c < ncpu; c++)
        if (pc[c]->c) {
            rings_n++;
            bad += pc[c]->a;
            sum += pc[c]->b;
            for (u64 s = 0; s < it; s++)
                esum += ring_val(seed, c / 2, s);
        }
    snfmt(out, n, "rings=%lu items=%lu slots=%lu sum=%016lx", rings_n, it, PRM(P_SLOTS), sum);
    if (bad || sum != esum)
        return snfmt(out + strlen(out), n - strlen(out), " expected=%016lx out_of_sequence=%lu", esum, bad), 1;
    return 0;
}

/* ---------------------------------------------------------------- */
/* (vi) sweep: write a pattern over mem= bytes, verify a neighbour's  */
/* part; each part on its CPU's node when numa=local                 */

static u64 *sw_part[MAX_CPUS];
static u64 sw_words, sw_t1;

static inline u64 sw_pat(u64 seed, u64 g) { return (g * 0x9E3779B97F4A7C15UL) ^ seed ^ (g >> 7); }

static void sweep_par(u32 me)
{
    u64 words = (PRM(P_MEM) / ncpu) / 8, seed = PRM(P_SEED);
    if (me == 0)
        sw_words = words;
    ALLOC_OR_FLAG(sw_part[me], data_node(me), words * 8 + 8);
    barrier_all(me);
    if (alloc_failed)
        return;
    TIMED_START(me);
    u64 *p = sw_part[me], g0 = me * words;
    for (u64 k = 0; k < words; k++)
        p[k] = sw_pat(seed, g0 + k);
    barrier_all(me);
    if (me == 0)
        sw_t1 = rdtsc();
    u32 v = (me + 1) % ncpu;
    u64 *q = sw_part[v], g1 = v * words, err = 0;
    for (u64 k = 0; k < words; k++)
        err += q[k] != sw_pat(seed, g1 + k);
    pc[me]->a = err;
    pc[me]->b = sys(SYS_NODE_OF_ADDR, (u64)p, 0, 0) == (u64)(s64)pc[me]->node;
    TIMED_END(me);
}

static int sweep_check(char *out, u64 n)
{
    u64 err = 0, local = 0, bytes = sw_words * 8 * ncpu;
    for (u32 c = 0; c < ncpu; c++) {
        err += pc[c]->a;
        local += pc[c]->b;
    }
    u64 wus = (sw_t1 - T0) * 1000 / tsc_khz, vus = (T1 - sw_t1) * 1000 / tsc_khz;
    snfmt(out, n, "bytes=%lu numa=%s local_parts=%lu/%u write_us=%lu verify_us=%lu write_mb_s=%lu errors=%lu", bytes,
          numa_local() ? "local" : "ignore", local, ncpu, wus, vus, wus ? bytes / wus : 0, err);
    return err != 0;
}

/* ---------------------------------------------------------------- */
/* (vii) falseshare: per-CPU words in one cache line, then in one page */

static volatile u64 *fs_line, *fs_page;
static u64 fs_t1;

static volatile u64 *fs_slot_line(u32 c) { return fs_line + c; }                 /* 8 CPUs per line */
static volatile u64 *fs_slot_page(u32 c) { return fs_page + (c % 64) * 8 + c / 64; } /* 64 lines per page */

static void falseshare_par(u32 me)
{
    u64 it = PRM(P_ITERS);
    if (me == 0) {
        ALLOC_OR_FLAG(fs_line, 0, 4096);
        ALLOC_OR_FLAG(fs_page, 0, 4096);
        if (fs_line && fs_page) {
            memset((void *)fs_line, 0, 4096);
            memset((void *)fs_page, 0, 4096);
        }
    }
    barrier_all(me);
    if (alloc_failed)
        return;
    TIMED_START(me);
    volatile u64 *w = fs_slot_line(me);
    for (u64 i = 0; i < it; i++)
        *w = *w + 1;
    barrier_all(me);
    if (me == 0)
        fs_t1 = rdtsc();
    w = fs_slot_page(me);
    for (u64 i = 0; i < it; i++)
        *w = *w + 1;
    TIMED_END(me);
}

static int falseshare_check(char *out, u64 n)
{
    u64 it = PRM(P_ITERS), bad = 0, sum = 0;
    for (u32 k = 0; k < 512; k++) {
        sum += fs_line[k] + fs_page[k];
    }
    for (u32 c = 0; c < ncpu; c++)
        bad += (*fs_slot_line(c) != it) + (*fs_slot_page(c) != it);
    if (sum != 2 * it * ncpu)
        bad++;
    snfmt(out, n, "cpus=%u iters=%lu line_us=%lu page_us=%lu", ncpu, it, (fs_t1 - T0) * 1000 / tsc_khz,
          (T1 - fs_t1) * 1000 / tsc_khz);
    if (bad)
        return snfmt(out + strlen(out), n - strlen(out), " wrong_words=%lu", bad), 1;
    return 0;
}

/* ---------------------------------------------------------------- */
/* Latency samples: u32 TSC cycles per event (saturated), sorted in    */
/* the guest, percentiles by nearest rank.                             */

static inline u32 cyc32(u64 c) { return c > 0xFFFFFFFFUL ? 0xFFFFFFFFU : (u32)c; }
static inline u64 cyc_ns(u64 c) { return c * 1000000 / tsc_khz; }

static void heap_sift(u32 *a, u64 i, u64 n)
{
    u32 v = a[i];
    for (;;) {
        u64 c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && a[c + 1] > a[c])
            c++;
        if (a[c] <= v)
            break;
        a[i] = a[c];
        i = c;
    }
    a[i] = v;
}

/* heapsort: O(n log n) worst case, in place, no recursion */
static void sort_u32(u32 *a, u64 n)
{
    if (n < 2)
        return;
    for (u64 i = n / 2; i-- > 0;)
        heap_sift(a, i, n);
    for (u64 e = n - 1; e > 0; e--) {
        u32 t = a[0];
        a[0] = a[e];
        a[e] = t;
        heap_sift(a, 0, e);
    }
}

/* nearest rank: the smallest sample with at least pct% of them <= it */
static u64 pctl_ns(const u32 *sorted, u64 n, u64 pct)
{
    if (!n)
        return 0;
    u64 rank = (pct * n + 99) / 100;
    return cyc_ns(sorted[rank ? rank - 1 : 0]);
}

/* rdtsc fenced around exactly one access (Intel SDM, RDTSC): LFENCE
 * before it waits until every earlier instruction (the timed load) has
 * completed; LFENCE after it keeps the timed access from starting before
 * the counter is read; MFENCE first makes a timed store globally visible
 * (a page fault or write-protect fault is taken before it retires). */
static inline u64 tsc_begin(void)
{
    u32 lo, hi;
    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) : : "memory");
    return ((u64)hi << 32) | lo;
}
static inline u64 tsc_end_load(void)
{
    u32 lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
    return ((u64)hi << 32) | lo;
}
static inline u64 tsc_end_store(void)
{
    u32 lo, hi;
    __asm__ volatile("mfence; lfence; rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
    return ((u64)hi << 32) | lo;
}

/* ---------------------------------------------------------------- */
/* ipi: ping-pong CPU0 <-> peer through fixed-vector IPIs; the peer's */
/* CPL0 handler EOIs and replies                                     */

static volatile u64 ipi_done;
/* written once per run: the peer polls ipi_done, so nothing CPU 0 writes
 * per round may share its page */
static u64 ipi_min, ipi_sum, ipi_pings, ipi_pongs;
static u32 *volatile ipi_rtt; /* one round trip per round (cycles), CPU 0's node */

static void ipi_par(u32 me)
{
    u64 it = PRM(P_ITERS), peer = PRM(P_PEER);
    if (ncpu < 2 || peer >= ncpu)
        return;
    if (me == 0) {
        ipi_done = 0;
        ALLOC_OR_FLAG(ipi_rtt, pc[0]->node, it * 4);
        if (ipi_rtt)
            memset(ipi_rtt, 0, it * 4); /* touched before the timed rounds */
    }
    barrier_all(me);
    if (alloc_failed)
        return;
    if (me != 0) {
        if (me == peer) {
            /* the peer just waits; the pings arrive as interrupts */
            WAIT_UNTIL(me, ipi_done, "ipi end", 1000);
        }
        barrier_all(me);
        return;
    }
    volatile u64 *mine = (volatile u64 *)sys(SYS_IPI_COUNTERS, 0, 0, 0);
    volatile u64 *theirs = (volatile u64 *)sys(SYS_IPI_COUNTERS, peer, 0, 0);
    u64 pong0 = mine[1], ping0 = theirs[0];
    u64 min = ~0UL, sum = 0;
    T0 = rdtsc();
    for (u64 r = 0; r < it; r++) {
        u64 t = rdtsc();
        sys(SYS_IPI_PING, peer, 0, 0);
        WAIT_UNTIL(0, mine[1] != pong0 + r, "ipi pong", 1000);
        t = rdtsc() - t;
        sum += t;
        if (t < min)
            min = t;
        ipi_rtt[r] = cyc32(t);
    }
    T1 = rdtsc();
    ipi_sum = sum;
    ipi_min = min;
    ipi_pongs = mine[1] - pong0;
    ipi_pings = theirs[0] - ping0;
    ipi_done = 1;
    wake(peer);
    barrier_all(me);
}

static int ipi_check(char *out, u64 n)
{
    u64 it = PRM(P_ITERS), peer = PRM(P_PEER);
    if (ncpu < 2)
        return snfmt(out, n, "rounds=0 skipped=1cpu"), 0;
    if (peer >= ncpu)
        return snfmt(out, n, "bad parameter peer=%lu (cpus=%u)", peer, ncpu), 1;
    sort_u32(ipi_rtt, it);
    snfmt(out, n,
          "peer=%lu peer_node=%ld rounds=%lu pings=%lu pongs=%lu rtt_ns=%lu min_rtt_ns=%lu rtt_p50_ns=%lu"
          " rtt_p99_ns=%lu",
          peer, (s64)pc[peer]->node, it, ipi_pings, ipi_pongs, ipi_sum * 1000000 / tsc_khz / it,
          ipi_min * 1000000 / tsc_khz, pctl_ns(ipi_rtt, it, 50), pctl_ns(ipi_rtt, it, 99));
    return ipi_pings != it || ipi_pongs != it;
}

/* ---------------------------------------------------------------- */
/* stress: every CPU does a random mix of atomic adds, plain reads and */
/* plain writes to the words it owns, over one shared region whose     */
/* pages are interleaved over the NUMA nodes (numa=local). Readers     */
/* check coherence and ordering as they go; CPU 0 replays every CPU's  */
/* stream afterwards and compares the region word by word.             */
/*                                                                     */
/* Layout: 64-byte lines alternate: even lines hold "atomic" words     */
/* (lock xadd of random values), odd lines "owned" words: owned word   */
/* number j belongs to CPU j % ncpus, which alone writes it, with      */
/* value (seq << 32) | tag(word, owner), seq = that CPU's count of      */
/* writes so far (1, 2, ...); 0 = never written. After each write the   */
/* owner stores (seq << 32) | word in its progress word (another page, */
/* on its node).                                                       */
/* Checks while running, per reader and word (a shadow copy of what     */
/* this CPU last saw or did):                                           */
/*  mono:    an atomic word never decreases, an owned word's seq never  */
/*           goes back (coherence; read-your-own-adds);                 */
/*  corrupt: an owned word holds a tag that is not its owner's;         */
/*  order:   message passing: after reading an owner's progress word   */
/*           (seq s, word w), w must hold seq >= s (stores are seen in  */
/*           the order they were made: TSO/SC);                         */
/*  own:     a CPU reading its own word sees exactly its last write.    */

#define ST_MAX_MEM (256UL << 20)
#define ST_MAX_ITERS ((1UL << 31) - 1)

struct st_cpu {
    u64 total, adds, reads, writes; /* sum of values added; op counts */
    u64 mono, corrupt, order, own;  /* violations seen */
} ALIGNED(CACHELINE);
static struct st_cpu st[MAX_CPUS];
/* Set up by one CPU, read by all after a barrier: volatile, since GCC may keep
 * a static whose address is never taken in a register across the barrier. */
static u64 *volatile st_chunk[MAX_CPUS];         /* page p: st_chunk[p % st_nn] + (p / st_nn) pages */
static volatile u64 *volatile st_prog[MAX_CPUS]; /* each CPU's last write: (seq << 32) | word */
static volatile u64 st_pages, st_nn;
static const char *volatile st_bad;

static inline u64 st_next(u64 *s) /* xorshift64* */
{
    u64 x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DUL;
}
static inline u64 st_seed(u64 seed, u32 cpu)
{
    u64 s = splitmix(seed ^ splitmix(0x5354524553530000UL + cpu));
    return s ? s : 1;
}
static inline u64 st_pick(u64 r, u64 n) { return (u64)(((unsigned __int128)r * n) >> 64); }
static inline u64 st_tag(u64 seed, u64 w, u32 owner) { return (u32)splitmix(seed ^ (w << 8) ^ owner) | 1; }
static inline u64 st_val(u64 seed, u64 w, u32 owner, u64 seq) { return seq ? (seq << 32) | st_tag(seed, w, owner) : 0; }
static inline u64 st_atomic_word(u64 a) { return (a >> 3) * 16 + (a & 7); }
static inline u64 st_owned_word(u64 j) { return (j >> 3) * 16 + 8 + (j & 7); }
static inline int st_is_owned(u64 w) { return (w >> 3) & 1; }
static inline u64 st_owned_index(u64 w) { return (w >> 4) * 8 + (w & 7); }

static inline volatile u64 *st_word(u64 w)
{
    u64 p = w >> 9;
    return (volatile u64 *)((char *)st_chunk[p % st_nn] + (p / st_nn) * 4096) + (w & 511);
}

enum { ST_ADD, ST_READ, ST_WRITE };
struct st_op { u32 kind; u64 w, v; };

/* One step of CPU me's stream: the same in the parallel run and the replay,
 * and independent of anything read (so the final contents are determined). */
static inline void st_decode(u64 r, u32 me, u64 half, u64 nmine, struct st_op *o)
{
    u32 k = r & 0xFF;
    if (k < 96) {
        o->kind = ST_ADD;
        o->w = st_atomic_word(st_pick(r, half));
        o->v = ((r >> 8) & 0xFFFFFF) + 1; /* no wrap: iters < 2^31, cpus <= 128 */
    } else if (k < 192) {
        o->kind = ST_READ;
        o->w = st_pick(r, 2 * half);
    } else {
        o->kind = ST_WRITE;
        o->w = st_owned_word(st_pick(r, nmine) * ncpu + me);
    }
}

/* a plain read x of word w owned by another CPU */
static inline void st_seen(struct st_cpu *r, u64 *sh, u64 seed, u64 w, u32 owner, u64 x)
{
    u64 xs = x >> 32;
    if (x && (x & 0xFFFFFFFF) != st_tag(seed, w, owner)) {
        r->corrupt++;
        return;
    }
    r->mono += xs < sh[w];
    sh[w] = xs;
}

static void *st_alloc(s64 node, u64 size)
{
    void *p = ualloc(node, size);
    for (u32 n = 0; !p && n < nnode; n++)
        p = ualloc(n, size);
    return p;
}

static void stress_par(u32 me)
{
    u64 it = PRM(P_ITERS), seed = PRM(P_SEED);
    if (me == 0) {
        st_bad = 0;
        st_pages = PRM(P_MEM) / 4096;
        st_nn = numa_local() && nnode ? nnode : 1;
        if (st_pages == 0 || PRM(P_MEM) > ST_MAX_MEM)
            st_bad = "stress.mem must be 4K..256M";
        else if (it > ST_MAX_ITERS)
            st_bad = "stress.iters must be < 2^31";
        for (u64 n = 0; n < st_nn && !st_bad; n++) {
            u64 np = (st_pages - n + st_nn - 1) / st_nn;
            st_chunk[n] = np ? st_alloc((s64)n, np * 4096) : 0;
            if (np && !st_chunk[n])
                alloc_failed = 1;
        }
    }
    barrier_all(me);
    if (st_bad || alloc_failed)
        return;
    u64 words = st_pages * 512, half = words / 2;
    u64 nmine = (half - me + ncpu - 1) / ncpu;
    u64 *sh = st_alloc(data_node(me), words * 8);
    volatile u64 *prog = st_alloc(data_node(me), 4096);
    if (!sh || !prog) {
        alloc_failed = 1;
    } else {
        memset(sh, 0, words * 8);
        *prog = 0;
        st_prog[me] = prog;
        for (u64 p = me; p < st_pages; p += ncpu) /* first touch spread over the CPUs */
            memset((void *)st_word(p * 512), 0, 4096);
    }
    barrier_all(me);
    if (alloc_failed)
        return;
    struct st_cpu r = { 0 };
    u64 s = st_seed(seed, me), seq = 0;
    TIMED_START(me);
    for (u64 i = 0; i < it; i++) {
        struct st_op o;
        st_decode(st_next(&s), me, half, nmine, &o);
        volatile u64 *p = st_word(o.w);
        if (o.kind == ST_ADD) {
            u64 old = xadd(p, o.v);
            r.mono += old < sh[o.w];
            sh[o.w] = old + o.v;
            r.total += o.v;
            r.adds++;
        } else if (o.kind == ST_WRITE) {
            *p = st_val(seed, o.w, me, ++seq);
            *st_prog[me] = (seq << 32) | o.w;
            sh[o.w] = seq;
            r.writes++;
        } else {
            u64 x = *p;
            r.reads++;
            if (!st_is_owned(o.w)) {
                r.mono += x < sh[o.w];
                sh[o.w] = x;
                continue;
            }
            u32 owner = st_owned_index(o.w) % ncpu;
            if (owner == me) {
                r.own += x != st_val(seed, o.w, me, sh[o.w]);
                continue;
            }
            st_seen(&r, sh, seed, o.w, owner, x);
            /* message passing: the word named in the owner's progress word
             * was written before it */
            u64 pg = *st_prog[owner], ps = pg >> 32, pw = pg & 0xFFFFFFFF;
            if (!ps)
                continue;
            if (pw >= words || !st_is_owned(pw) || st_owned_index(pw) % ncpu != owner) {
                r.corrupt++;
                continue;
            }
            u64 y = *st_word(pw);
            r.order += (y >> 32) < ps;
            st_seen(&r, sh, seed, pw, owner, y);
        }
    }
    st[me] = r;
    TIMED_END(me);
}

static inline u64 st_mix(u64 cs, u64 x) { return (cs ^ x) * 0x100000001B3UL; }

static int stress_check(char *out, u64 n)
{
    u64 it = PRM(P_ITERS), seed = PRM(P_SEED);
    if (st_bad)
        return snfmt(out, n, "bad parameter (%s)", st_bad), 1;
    u64 words = st_pages * 512, half = words / 2;
    u64 *exp = ualloc(pc[0]->node, words * 8); /* CPU 0's node, explicit for ualloc_hw */
    if (!exp)
        return snfmt(out, n, "mem=%lu out of memory for the serial check", st_pages * 4096), 1;
    memset(exp, 0, words * 8);
    /* serial replay of every CPU's stream */
    u64 eadds = 0, ereads = 0, ewrites = 0, etotal = 0, bad_totals = 0;
    for (u32 c = 0; c < ncpu; c++) {
        u64 s = st_seed(seed, c), seq = 0, tot = 0, nmine = (half - c + ncpu - 1) / ncpu;
        for (u64 i = 0; i < it; i++) {
            struct st_op o;
            st_decode(st_next(&s), c, half, nmine, &o);
            if (o.kind == ST_ADD)
                exp[o.w] += o.v, tot += o.v, eadds++;
            else if (o.kind == ST_WRITE)
                exp[o.w] = st_val(seed, o.w, c, ++seq), ewrites++;
            else
                ereads++;
        }
        bad_totals += tot != st[c].total;
        etotal += tot;
    }
    u64 adds = 0, reads = 0, writes = 0, total = 0, mono = 0, corrupt = 0, order = 0, own = 0;
    for (u32 c = 0; c < ncpu; c++) {
        adds += st[c].adds, reads += st[c].reads, writes += st[c].writes, total += st[c].total;
        mono += st[c].mono, corrupt += st[c].corrupt, order += st[c].order, own += st[c].own;
    }
    u64 cs = 0xCBF29CE484222325UL, ecs = cs, sum = 0, wrong = 0;
    for (u64 w = 0; w < words; w++) {
        u64 x = *st_word(w);
        if (!st_is_owned(w))
            sum += x;
        wrong += x != exp[w];
        cs = st_mix(cs, x);
        ecs = st_mix(ecs, exp[w]);
    }
    snfmt(out, n, "cpus=%u iters=%lu mem=%lu seed=%lu numa=%s adds=%lu reads=%lu writes=%lu checksum=%016lx", ncpu,
          it, st_pages * 4096, seed, numa_local() ? "local" : "ignore", adds, reads, writes, cs);
    if (wrong || cs != ecs || sum != total || total != etotal || bad_totals || adds != eadds ||
        reads != ereads || writes != ewrites || mono || corrupt || order || own) {
        snfmt(out + strlen(out), n - strlen(out),
              " expected_checksum=%016lx wrong_words=%lu sum=%lu added=%lu expected_added=%lu bad_totals=%lu"
              " mono=%lu corrupt=%lu order=%lu own=%lu",
              ecs, wrong, sum, total, etotal, bad_totals, mono, corrupt, order, own);
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- */
/* faultlat: what one access costs when it faults, timed by the guest */
/* (rdtsc fenced around a single access), one access at a time, in    */
/* three phases separated by barriers. Every CPU c has a buffer B_c of */
/* `size` pages on its own node (whatever numa= says) and a partner    */
/* shift s: the smallest s in 1..ncpu-1 that puts every CPU's partner  */
/* (c+s)%ncpu on another node, or 0 if there is none (one node).       */
/*  local:   c writes word 0 of every page of B_c, memory no workload   */
/*           has touched: a first touch of a page homed on its own node  */
/*           (under dvmm: resolved by the local engine, no message; the  */
/*           floor the remote phases are set against). Its home now     */
/*           holds them modified, nobody else holds them. With s == 0   */
/*           B_c stays untouched here and `local` is the read phase's   */
/*           first touches (if no untouched memory is left, c zeroes    */
/*           B_c: read_kind=reused, local hits).                        */
/*  read:    c reads word 0 of every page of B_(c+s): a remote miss     */
/*           (s == 0: a first touch of its own buffer, expected zero).  */
/*  upgrade: c writes word 1 of those pages: they are read-shared by    */
/*           its node and their home.                                   */
/*  steal:   c writes word 2 of every page of its own B_c, which CPU    */
/*           (c-s)%ncpu's node now holds modified (s == 0: local hits). */
/* Each phase visits the pages in its own per-CPU random order, so no   */
/* sequential prefetcher (the guest's, the host's or dvmm's) hides a    */
/* miss. Afterwards every CPU checks words 0-2 of every page of B_c.    */

#define FL_MAX_PAGES (1UL << 24) /* u32 page indices */
enum { FL_READ, FL_UPGRADE, FL_STEAL, FL_LOCAL, FL_PHASES };
static const char *const fl_phase[FL_PHASES] = { "read", "upgrade", "steal", "local" };

/* written once per CPU at the end (samples taken, wrong values seen) */
struct fl_res { u64 n[FL_PHASES], bad_read, bad_final; } ALIGNED(CACHELINE);
static struct fl_res fl_res[MAX_CPUS];
/* set up by CPU 0, read by all after a barrier */
static u64 *volatile fl_buf[MAX_CPUS];
static u32 *volatile fl_smp[MAX_CPUS]; /* per CPU: samples per phase, then a permutation per phase */
static volatile u64 fl_pages, fl_shift, fl_fresh;
static const char *volatile fl_bad;

static inline u64 fl_val(u64 seed, u32 cpu, u64 page, u64 word)
{
    return splitmix(seed ^ ((u64)cpu << 40) ^ (page << 2) ^ word) | 1; /* never 0: untouched memory is */
}

static u64 fl_find_shift(void)
{
    for (u64 s = 1; s < ncpu; s++) {
        u32 c = 0;
        while (c < ncpu && pc[c]->node != pc[(c + s) % ncpu]->node)
            c++;
        if (c == ncpu)
            return s;
    }
    return 0;
}

/* A timed write phase: in the order `perm`, write fl_val(.., word) to word
 * `word` of each of the np pages of `buf`, one store between the fences, each
 * time into `out`. Returns the number of samples taken. */
static u64 fl_write_phase(volatile u64 *buf, u64 word, const u32 *perm, u32 *out, u64 np, u64 seed, u32 me)
{
    for (u64 i = 0; i < np; i++) {
        u64 k = perm[i], v = fl_val(seed, me, k, word);
        volatile u64 *w = buf + k * 512 + word;
        u64 t0 = tsc_begin();
        *w = v;
        u64 t1 = tsc_end_store();
        out[i] = cyc32(t1 - t0);
    }
    return np;
}

static void fl_shuffle(u32 *perm, u64 n, u64 *rng)
{
    for (u64 i = 0; i < n; i++)
        perm[i] = (u32)i;
    for (u64 i = n - 1; n && i > 0; i--) {
        u64 j = st_pick(st_next(rng), i + 1);
        u32 t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}

static void faultlat_par(u32 me)
{
    u64 np = PRM(P_SIZE), seed = PRM(P_SEED);
    if (me == 0) {
        fl_bad = 0;
        fl_pages = np;
        fl_shift = fl_find_shift();
        fl_fresh = 1;
        if (np > FL_MAX_PAGES)
            fl_bad = "faultlat.size must be <= 16M pages";
        /* One CPU allocates, in CPU order, so each fresh buffer starts
         * above the one before it. If fresh memory runs out, start again
         * (nothing else is allocated yet) with memory earlier workloads used. */
        for (int want_fresh = 1, ok = 0; !ok && !fl_bad; want_fresh = 0) {
            ok = 1;
            for (u32 c = 0; c < ncpu && ok; c++) {
                s64 node = pc[c]->node;
                int fresh = 0;
                fl_buf[c] = want_fresh ? ualloc_fresh(node, np * 4096, &fresh) : ualloc(node, np * 4096);
                fl_fresh &= fresh;
                fl_smp[c] = ualloc(node, 2 * FL_PHASES * np * 4);
                ok = fl_buf[c] && fl_smp[c];
            }
            if (!ok && !want_fresh) {
                alloc_failed = 1;
                break;
            }
            if (!ok)
                sys(SYS_ALLOC_RESET, 0, 0, 0);
        }
    }
    barrier_all(me);
    if (fl_bad || alloc_failed)
        return;
    u64 sh = fl_shift;
    u32 home = (u32)((me + sh) % ncpu), writer = (u32)((me + ncpu - sh) % ncpu);
    volatile u64 *mine = fl_buf[me], *theirs = fl_buf[home];
    u32 *smp = fl_smp[me], *perm = smp + FL_PHASES * np;
    struct fl_res r = { { 0 }, 0, 0 };
    u64 rng = splitmix(seed ^ splitmix(0x464C540000000000UL + me));
    rng = rng ? rng : 1;
    /* everything the timed loops touch besides the pages under test is
     * this CPU's own, on its node, and touched now */
    memset(smp, 0, FL_PHASES * np * 4);
    for (u32 ph = 0; ph < FL_PHASES; ph++)
        fl_shuffle(perm + ph * np, np, &rng);
    if (sh) {
        /* local: first touches of this CPU's own untouched pages */
        r.n[FL_LOCAL] = fl_write_phase(mine, 0, perm + FL_LOCAL * np, smp + FL_LOCAL * np, np, seed, me);
        barrier_all(me);
    } else if (!fl_fresh) /* no untouched memory left: reads are local hits */
        for (u64 k = 0; k < np; k++)
            mine[k * 512] = mine[k * 512 + 1] = mine[k * 512 + 2] = 0;
    TIMED_START(me);
    /* read: one word of each of the partner's pages */
    u32 *o = perm + FL_READ * np, *out = smp + FL_READ * np;
    for (u64 i = 0; i < np; i++) {
        u64 k = o[i];
        volatile u64 *w = theirs + k * 512;
        u64 t0 = tsc_begin();
        u64 v = *w;
        u64 t1 = tsc_end_load();
        out[i] = cyc32(t1 - t0);
        r.bad_read += v != (sh ? fl_val(seed, home, k, 0) : 0);
        r.n[FL_READ]++;
    }
    if (!sh) { /* one node: the read phase was the first touches */
        memcpy(smp + FL_LOCAL * np, out, np * 4);
        r.n[FL_LOCAL] = r.n[FL_READ];
    }
    barrier_all(me);
    /* upgrade: write the pages just read (shared by this node and home) */
    r.n[FL_UPGRADE] = fl_write_phase(theirs, 1, perm + FL_UPGRADE * np, smp + FL_UPGRADE * np, np, seed, me);
    barrier_all(me);
    /* steal: write this CPU's own pages, held modified by the writer's node */
    r.n[FL_STEAL] = fl_write_phase(mine, 2, perm + FL_STEAL * np, smp + FL_STEAL * np, np, seed, me);
    TIMED_END(me);
    /* exact final contents of B_me (all local again after the steal) */
    for (u64 k = 0; k < np; k++) {
        volatile u64 *pg = mine + k * 512;
        r.bad_final += pg[0] != (sh ? fl_val(seed, me, k, 0) : 0);
        r.bad_final += pg[1] != fl_val(seed, writer, k, 1);
        r.bad_final += pg[2] != fl_val(seed, me, k, 2);
    }
    fl_res[me] = r;
}

static int faultlat_check(char *out, u64 n)
{
    u64 np = fl_pages, total = ncpu * np, cnt[FL_PHASES] = { 0 }, bad_read = 0, bad_final = 0, bad_n = 0;
    if (fl_bad)
        return snfmt(out, n, "bad parameter (%s)", fl_bad), 1;
    for (u32 c = 0; c < ncpu; c++) {
        for (u32 ph = 0; ph < FL_PHASES; ph++) {
            cnt[ph] += fl_res[c].n[ph];
            bad_n += fl_res[c].n[ph] != np;
        }
        bad_read += fl_res[c].bad_read;
        bad_final += fl_res[c].bad_final;
    }
    u32 *all = ualloc(pc[0]->node, total * 4);
    if (!all)
        return snfmt(out, n, "pages=%lu out of memory for the percentiles", total), 1;
    u64 len = snfmt(out, n, "cpus=%u pages=%lu shift=%lu read_kind=%s local_kind=%s", ncpu, cnt[FL_READ],
                    fl_shift, fl_shift ? "remote" : fl_fresh ? "first_touch" : "reused",
                    fl_fresh ? "first_touch" : "reused");
    u64 unsorted = 0;
    for (u32 ph = 0; ph < FL_PHASES; ph++) {
        for (u32 c = 0; c < ncpu; c++)
            memcpy(all + c * np, fl_smp[c] + ph * np, np * 4);
        sort_u32(all, total);
        for (u64 i = 1; i < total; i++)
            unsorted += all[i - 1] > all[i];
        len += snfmt(out + len, n - len, " %s_p50_ns=%lu %s_p99_ns=%lu %s_max_ns=%lu", fl_phase[ph],
                     pctl_ns(all, total, 50), fl_phase[ph], pctl_ns(all, total, 99), fl_phase[ph],
                     total ? cyc_ns(all[total - 1]) : 0);
    }
    if (bad_n || cnt[FL_UPGRADE] != total || cnt[FL_STEAL] != total || cnt[FL_LOCAL] != total || bad_read ||
        bad_final || unsorted) {
        snfmt(out + len, n - len, " expected_pages=%lu bad_counts=%lu bad_reads=%lu wrong_words=%lu unsorted=%lu",
              total, bad_n, bad_read, bad_final, unsorted);
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- */
/* fault (not part of run=all): the last CPU reads an unmapped address */
/* at CPL3; the kernel must report it as a FAIL line and exit non-zero. */

static void fault_par(u32 me)
{
    barrier_all(me);
    if (me == ncpu - 1)
        (void)*(volatile u64 *)0x8000000000UL; /* 512 GiB: never mapped */
    barrier_all(me);
}

static int fault_check(char *out, u64 n)
{
    snfmt(out, n, "the fault was not reported");
    return 1;
}

/* ---------------------------------------------------------------- */
/* conform (not part of run=all): architectural conformance checks    */
/* from inside the guest (kconform.c does them at CPL0), on every CPU; */
/* every CPU prints its own lines, and afterwards the last CPU (on the */
/* last node of a distributed VM) ends the VM through the debug-exit  */
/* port.                                                              */

static const char *const cf_name[CF_NCHECKS] = { "reset", "apic_base", "x2apic_gp", "tpr", "tsc_deadline", "cpuid" };
static int conform_ran;             /* CPU 0: the last CPU must end the VM */
static volatile u64 cf_exit_req;    /* exit status + 1, for the last CPU */

static void cf_line(u32 me, const char *check, u64 r, const char *details)
{
    uprintf("dvmm-guest: conform.%s cpu=%u node=%d %s %s\n", check, me, pc[me]->node, details,
            r == CF_OK ? "ok" : r == CF_SKIP ? "skip" : "FAIL");
    if (r == CF_OK)
        pc[me]->a++;
    else if (r == CF_SKIP)
        pc[me]->c++;
    else
        pc[me]->b++;
}

static void conform_par(u32 me)
{
    char buf[CONFORM_OUT];
    TIMED_START(me);
    snfmt(buf, sizeof buf, "apic=%u", si->apic_id[me]);
    cf_line(me, "console", CF_OK, buf); /* this line is the check: every CPU prints */
    for (u32 k = 0; k < CF_NCHECKS; k++)
        cf_line(me, cf_name[k], sys(SYS_CONFORM, k, 0, (u64)buf), buf);

    /* NMI ring: CPU c sends an NMI to c+1 (across nodes when they differ) */
    u64 before = sys(SYS_CONFORM, CF_NMI_COUNT, 0, 0);
    barrier_all(me);
    u32 to = (me + 1) % ncpu, from = (me + ncpu - 1) % ncpu;
    sys(SYS_CONFORM, CF_NMI_SEND, to, 0);
    u64 got, end = rdtsc() + 10000 * tsc_khz;
    while ((got = sys(SYS_CONFORM, CF_NMI_COUNT, 0, 0)) == before && rdtsc() < end)
        sys(SYS_YIELD, 200, 0, 0); /* an NMI ends a halt */
    barrier_all(me); /* every NMI sent: count again (exactly one each) */
    got = sys(SYS_CONFORM, CF_NMI_COUNT, 0, 0);
    snfmt(buf, sizeof buf, "from=%u from_node=%d to=%u to_node=%d received=%lu", from, pc[from]->node, to,
          pc[to]->node, got - before);
    cf_line(me, "nmi", got - before == 1 ? CF_OK : CF_FAIL, buf);

    /* IOAPIC, from the last CPU: on a distributed VM its MMIO and COM1
     * accesses are forwarded to the boot node */
    barrier_all(me);
    if (me == ncpu - 1)
        cf_line(me, "ioapic", sys(SYS_CONFORM, CF_IOAPIC, 0, (u64)buf), buf);
    TIMED_END(me);
}

static int conform_check(char *out, u64 n)
{
    u64 ok = 0, failed = 0, skipped = 0, printed = 0;
    for (u32 c = 0; c < ncpu; c++) {
        ok += pc[c]->a;
        failed += pc[c]->b;
        skipped += pc[c]->c;
        printed += pc[c]->a + pc[c]->b + pc[c]->c > 0;
    }
    conform_ran = 1;
    snfmt(out, n,
          "cpus=%u nodes=%u platform=%s cpl0=%s cpus_printed=%lu checks_ok=%lu failed=%lu skipped=%lu exit_cpu=%u "
          "exit_node=%d",
          ncpu, nnode, si->platform, si->cpl0_emulated ? "emulated" : "native", printed, ok, failed, skipped,
          ncpu - 1, pc[ncpu - 1]->node);
    return failed != 0 || printed != ncpu;
}

/* The last CPU ends the VM (after a conform run): its console line and
 * its debug-exit write come from the last node of a distributed VM. */
static void NORETURN last_cpu_exit(u32 me, u32 status)
{
    uprintf("dvmm-guest: exit cpu=%u node=%d apic=%u status=%u\n", me, pc[me]->node, si->apic_id[me], status);
    uexit(status);
}

/* ---------------------------------------------------------------- */
/* Workload table and defaults                                       */

#define B(p) (1UL << (p))
#define DEF(it, sz, mem, steps, slots, peer) \
    { { [P_ITERS] = it, [P_SIZE] = sz, [P_MEM] = mem, [P_SEED] = 1, [P_STEPS] = steps, [P_SLOTS] = slots, \
        [P_PEER] = peer, [P_NUMA] = 1, [P_TIMEOUT] = 60 } }
#define COMMON_P (B(P_NUMA) | B(P_TIMEOUT))
#define NPB_DEF { { [P_SEED] = 1, [P_NUMA] = 1, [P_TIMEOUT] = 60, [P_CLASS] = 'S', [P_CORRUPT] = 0 } }
#define NPB_P (B(P_CLASS) | B(P_CORRUPT) | COMMON_P)

/* The NPB kernels run in npb.c (built with SSE2); these wrappers hand them
 * the parameters and the runtime's barrier and allocator. */
static struct npb_rt npb_rt; /* filled by CPU 0 before the first workload */

static void npb_args_for(struct npb_args *a, u32 kernel)
{
    a->kernel = kernel;
    a->cls = (char)PRM(P_CLASS);
    a->numa_local = (u32)numa_local();
    a->corrupt = PRM(P_CORRUPT);
}
static void npb_print(const char *line) { uprintf("%s", line); }
#define NPB_WRAP(k, id)                                                        \
    static void npb_##k##_par(u32 me)                                          \
    {                                                                          \
        struct npb_args a;                                                     \
        npb_args_for(&a, id);                                                  \
        npb_par(&npb_rt, &a, me);                                              \
    }                                                                          \
    static int npb_##k##_check(char *out, u64 n)                               \
    {                                                                          \
        struct npb_args a;                                                     \
        npb_args_for(&a, id);                                                  \
        return npb_report(&npb_rt, &a, out, n, npb_print);                     \
    }
NPB_WRAP(ep, NPB_EP)
NPB_WRAP(is, NPB_IS)
NPB_WRAP(cg, NPB_CG)
NPB_WRAP(mg, NPB_MG)
NPB_WRAP(ft, NPB_FT)

static struct workload workloads[] = {
    { "ep", ep_par, ep_check, DEF(0, 4 << 20, 0, 0, 0, 0), B(P_SIZE) | B(P_SEED) | COMMON_P, {{0}}, 0, 0 },
    { "counter", counter_par, counter_check, DEF(100000, 0, 0, 0, 0, 0), B(P_ITERS) | COMMON_P, {{0}}, 0, 0 },
    { "spinlock", spinlock_par, spinlock_check, DEF(20000, 64, 0, 0, 0, 0), B(P_ITERS) | B(P_SIZE) | B(P_SEED) | COMMON_P, {{0}}, 0, 0 },
    { "matmul", matmul_par, matmul_check, DEF(0, 128, 0, 4, 0, 0), B(P_SIZE) | B(P_STEPS) | B(P_SEED) | COMMON_P, {{0}}, 0, 0 },
    { "ring", ring_par, ring_check, DEF(100000, 0, 0, 0, 1024, 0), B(P_ITERS) | B(P_SLOTS) | B(P_SEED) | COMMON_P, {{0}}, 0, 0 },
    { "sweep", sweep_par, sweep_check, DEF(0, 0, 16 << 20, 0, 0, 0), B(P_MEM) | B(P_SEED) | COMMON_P, {{0}}, 0, 0 },
    { "falseshare", falseshare_par, falseshare_check, DEF(200000, 0, 0, 0, 0, 0), B(P_ITERS) | COMMON_P, {{0}}, 0, 0 },
    { "ipi", ipi_par, ipi_check, DEF(200, 0, 0, 0, 0, 1), B(P_ITERS) | B(P_PEER) | COMMON_P, {{0}}, 0, 0 },
    { "stress", stress_par, stress_check, DEF(20000, 0, 512 << 10, 0, 0, 0), B(P_ITERS) | B(P_MEM) | B(P_SEED) | COMMON_P, {{0}}, 0, 0 },
    { "faultlat", faultlat_par, faultlat_check, DEF(0, 1024, 0, 0, 0, 0), B(P_SIZE) | B(P_SEED) | COMMON_P, {{0}}, 0, 0 },
    /* not in run=all: */
    { "fault", fault_par, fault_check, DEF(0, 0, 0, 0, 0, 0), COMMON_P, {{0}}, 0, 0 },
    { "conform", conform_par, conform_check, DEF(0, 0, 0, 0, 0, 0), COMMON_P, {{0}}, 0, 0 },
    { "gap", gap_par, gap_check, DEF(1000, 0, 0, 0, 0, 0), B(P_ITERS) | COMMON_P, {{0}}, 0, 0 },
    /* the NAS Parallel Benchmark kernels (npb.c), not in run=all either */
    { "npb.ep", npb_ep_par, npb_ep_check, NPB_DEF, NPB_P, {{0}}, 0, 1 },
    { "npb.is", npb_is_par, npb_is_check, NPB_DEF, NPB_P, {{0}}, 0, 1 },
    { "npb.cg", npb_cg_par, npb_cg_check, NPB_DEF, NPB_P, {{0}}, 0, 1 },
    { "npb.mg", npb_mg_par, npb_mg_check, NPB_DEF, NPB_P, {{0}}, 0, 1 },
    { "npb.ft", npb_ft_par, npb_ft_check, NPB_DEF, NPB_P, {{0}}, 0, 1 },
};
#define NALL 10 /* run=all runs the first NALL */
#define NWL (sizeof workloads / sizeof workloads[0])

/* ---------------------------------------------------------------- */
/* Command line                                                      */

static u32 nfail, npass;
static u32 order[64], norder;

static void cmd_fail(const char *name, const char *fmt, const char *a, const char *b)
{
    char r[256];
    snfmt(r, sizeof r, fmt, a, b);
    uprintf("dvmm-guest: %s FAIL %s\n", name, r);
    nfail++;
}

static struct workload *find_wl(const char *s, u64 len)
{
    for (u32 i = 0; i < NWL; i++)
        if (strlen(workloads[i].name) == len && !strncmp(workloads[i].name, s, len))
            return &workloads[i];
    return 0;
}

/* decimal or 0x hex, optional k/K, m/M, g/G suffix (binary) */
static int parse_num(const char *s, u64 *out)
{
    u64 v = 0;
    int base = 10, digits = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        base = 16, s += 2;
    for (;; s++) {
        int d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && ((*s | 32) >= 'a' && (*s | 32) <= 'f'))
            d = (*s | 32) - 'a' + 10;
        else
            break;
        if (v > (~0UL - d) / base)
            return -1;
        v = v * base + d;
        digits++;
    }
    if (!digits)
        return -1;
    u64 mul = 1;
    if (*s == 'k' || *s == 'K')
        mul = 1UL << 10, s++;
    else if (*s == 'm' || *s == 'M')
        mul = 1UL << 20, s++;
    else if (*s == 'g' || *s == 'G')
        mul = 1UL << 30, s++;
    if (*s)
        return -1;
    if (v && mul > ~0UL / v)
        return -1;
    *out = v * mul;
    return 0;
}

static const u64 pmax[NPARAM] = {
    [P_ITERS] = 1UL << 40, [P_SIZE] = 1UL << 40, [P_MEM] = 1UL << 44, [P_SEED] = ~0UL,
    [P_STEPS] = 1UL << 20, [P_SLOTS] = 1UL << 24, [P_PEER] = MAX_CPUS - 1, [P_NUMA] = 1, [P_TIMEOUT] = 1UL << 20,
    [P_CORRUPT] = 1UL << 40, /* P_CLASS is a letter, checked where it is parsed */
};

/* key=value for one workload (w) or all (w == 0) */
static void set_param(struct workload *w, const char *key, u64 klen, const char *val, const char *tok)
{
    int p = -1;
    for (int i = 0; i < NPARAM; i++)
        if (strlen(pname[i]) == klen && !strncmp(pname[i], key, klen))
            p = i;
    char kname[64];
    snfmt(kname, sizeof kname, "%s", tok);
    for (u32 i = 0; kname[i]; i++)
        if (kname[i] == '=')
            kname[i] = 0;
    if (p < 0) {
        if (w)
            cmd_fail(kname, "unknown parameter '%s'", tok, 0);
        else
            uprintf("dvmm-guest: note: ignoring unknown parameter '%s'\n", tok);
        return;
    }
    u64 v;
    if (p == P_NUMA) {
        if (!strcmp(val, "local"))
            v = 1;
        else if (!strcmp(val, "ignore"))
            v = 0;
        else
            return cmd_fail(kname, "malformed parameter '%s' (numa=local|ignore)", tok, 0);
    } else if (p == P_CLASS) {
        /* NPB problem classes; B and larger do not fit these guests */
        if ((val[0] == 'S' || val[0] == 'W' || val[0] == 'A') && !val[1])
            v = (u64)val[0];
        else if ((val[0] == 's' || val[0] == 'w' || val[0] == 'a') && !val[1])
            v = (u64)(val[0] - 'a' + 'A');
        else
            return cmd_fail(kname, "malformed parameter '%s' (class=S|W|A)", tok, 0);
    } else if (parse_num(val, &v) < 0) {
        return cmd_fail(kname, "malformed parameter '%s' (expected a number)", tok, 0);
    } else if (v > pmax[p] || (v == 0 && p != P_SEED && p != P_PEER && p != P_CORRUPT)) {
        return cmd_fail(kname, "parameter out of range '%s'", tok, 0);
    }
    if (p == P_TIMEOUT && !w)
        timeout_s = v;
    for (u32 i = 0; i < NWL; i++)
        if (!w || w == &workloads[i])
            workloads[i].p.v[p] = v;
}

static void parse_cmdline(const char *cl)
{
    static char tok[512];
    int have_run = 0;
    for (u32 i = 0; i < NWL; i++)
        workloads[i].p = workloads[i].def;
    while (*cl) {
        while (*cl == ' ' || *cl == '\t' || *cl == '\n')
            cl++;
        if (!*cl)
            break;
        u32 n = 0;
        while (*cl && *cl != ' ' && *cl != '\t' && *cl != '\n') {
            if (n < sizeof tok - 1)
                tok[n++] = *cl;
            cl++;
        }
        tok[n] = 0;
        const char *eq = 0;
        for (u32 i = 0; i < n; i++)
            if (tok[i] == '=') {
                eq = tok + i;
                break;
            }
        if (!eq) {
            uprintf("dvmm-guest: note: ignoring '%s'\n", tok);
            continue;
        }
        const char *key = tok, *val = eq + 1;
        u64 klen = eq - tok;
        if (klen == 3 && !strncmp(key, "run", 3)) {
            have_run = 1;
            const char *s = val;
            if (!*s)
                cmd_fail("run", "malformed parameter '%s' (empty list)", tok, 0);
            while (*s) {
                const char *e = s;
                while (*e && *e != ',')
                    e++;
                if (e - s == 3 && !strncmp(s, "all", 3)) {
                    for (u32 i = 0; i < NALL && norder < 64; i++)
                        order[norder++] = i;
                } else {
                    struct workload *w = find_wl(s, e - s);
                    if (w && norder < 64) {
                        order[norder++] = w - workloads;
                    } else if (!w) {
                        char name[64];
                        u64 l = e - s < 63 ? e - s : 63;
                        memcpy(name, s, l);
                        name[l] = 0;
                        cmd_fail(l ? name : "run", "unknown workload '%s'", name, 0);
                    }
                }
                s = *e ? e + 1 : e;
            }
            continue;
        }
        /* the last dot: workload names may hold one (npb.ep.class=W); a
         * prefix that names a family sets all of it (npb.class=W) */
        const char *dot = 0;
        for (const char *p = key; p < eq; p++)
            if (*p == '.')
                dot = p;
        if (dot) {
            struct workload *w = find_wl(key, dot - key);
            u32 family = 0;
            for (u32 i = 0; !w && i < NWL; i++)
                if (!strncmp(workloads[i].name, key, dot - key) && workloads[i].name[dot - key] == '.') {
                    set_param(&workloads[i], dot + 1, eq - dot - 1, val, tok);
                    family++;
                }
            if (family)
                continue;
            if (!w) {
                char name[64];
                u64 l = dot - key < 63 ? dot - key : 63;
                memcpy(name, key, l);
                name[l] = 0;
                cmd_fail(name, "unknown workload in parameter '%s'", tok, 0);
                continue;
            }
            set_param(w, dot + 1, eq - dot - 1, val, tok);
        } else {
            set_param(0, key, klen, val, tok);
        }
    }
    if (!have_run)
        for (u32 i = 0; i < NALL; i++)
            order[norder++] = i;
}

/* ---------------------------------------------------------------- */
/* Job dispatch                                                      */

static struct { void (*volatile fn)(u32); volatile u64 gen ALIGNED(64); volatile u64 done ALIGNED(64); } job;
static volatile u64 rt_ready;

static void run_all_cpus(void (*fn)(u32))
{
    job.fn = fn;
    job.done = 0;
    barrier();
    job.gen = job.gen + 1;
    wake_all(0);
    fn(0);
    WAIT_UNTIL(0, job.done == ncpu - 1, "workers to finish", 2000);
}

static void NORETURN ap_loop(u32 me)
{
    u64 seen = 0;
    for (;;) {
        /* long idle waits are fine: the dispatcher wakes us */
        pc[me]->idle = 1;
        WAIT_UNTIL(me, job.gen != seen || (cf_exit_req && me == ncpu - 1), "work", 5000);
        pc[me]->idle = 0;
        if (cf_exit_req && me == ncpu - 1)
            last_cpu_exit(me, (u32)cf_exit_req - 1);
        seen = job.gen;
        job.fn(me);
        xadd(&job.done, 1);
        wake(0);
    }
}

static void run_workload(struct workload *w)
{
    char res[512];
    W = w;
    cur_name = w->name;
    alloc_failed = 0;
    T0 = T1 = 0;
    memset(res, 0, sizeof res);
    for (u32 c = 0; c < ncpu; c++)
        if (pc[c]->a | pc[c]->b | pc[c]->c | pc[c]->d) /* no needless page moves */
            pc[c]->a = pc[c]->b = pc[c]->c = pc[c]->d = 0;
    /* timeout_s is read by every CPU's waits: set before the dispatch */
    timeout_s = w->p.v[P_TIMEOUT];
    u64 t = rdtsc();
    run_all_cpus(w->par);
    int failed;
    if (alloc_failed)
        failed = 1, snfmt(res, sizeof res, "out of memory");
    else
        failed = w->check(res, sizeof res);
    u64 us = T1 > T0 ? (T1 - T0) * 1000 / tsc_khz : us_since(t);
    if (w->own_line)
        uprintf("dvmm-guest: %s %s %s\n", w->name, res, failed ? "FAIL" : "PASS");
    else
        uprintf("dvmm-guest: %s %s time_us=%lu %s\n", w->name, res, us, failed ? "FAIL" : "PASS");
    if (failed)
        nfail++;
    else
        npass++;
    sys(SYS_ALLOC_RESET, 0, 0, 0);
}

/* ---------------------------------------------------------------- */

void NORETURN user_main(u64 arg)
{
    si = (struct sysinfo *)sys(SYS_INFO, 0, 0, 0);
    tsc_khz = sys(SYS_TSC_KHZ, 0, 0, 0);
    while (!READ_ONCE(si->ncpus)) /* APs: wait for the BSP to finish booting */
        sys(SYS_YIELD, 1000, 0, 0);
    u32 me = (u32)sys(SYS_CPUID, 0, 0, 0);
    if (me != 0) {
        while (!rt_ready)
            sys(SYS_YIELD, 1000, 0, 0);
        sys(SYS_BARRIER, 0, 0, 0); /* exercises the kernel barrier once */
        ap_loop(me);
    }
    u64 boot_us = us_since(si->boot_tsc);
    u64 ts = rdtsc();
    for (int i = 0; i < 10; i++)
        sys(SYS_CPUID, 0, 0, 0);
    syscall_ns = (rdtsc() - ts) * 100000 / tsc_khz;
    spin_cycles = (50000 + 4 * syscall_ns) * tsc_khz / 1000000;
    ncpu = si->ncpus;
    nnode = si->nnodes;
    for (u32 c = 0; c < ncpu; c++) {
        pc[c] = (struct percpu *)sys(SYS_PERCPU_PAGE, c, 0, 0);
        memset(pc[c], 0, sizeof *pc[c]);
        pc[c]->node = (s32)sys(SYS_NODE_OF_CPU, c, 0, 0);
        npb_rt.node[c] = pc[c]->node;
    }
    npb_rt.ncpu = ncpu;
    npb_rt.tsc_khz = tsc_khz;
    npb_rt.barrier = barrier_all;
    npb_rt.alloc = ualloc;
    const char *cl = (const char *)sys(SYS_CMDLINE, 0, 0, 0);
    uprintf("dvmm-guest: boot cpus=%u nodes=%u apic=%s tsc_mhz=%lu tsc_src=%s mem_mb=%lu boot_ms=%lu syscall_ns=%lu cmdline='%s'\n",
            ncpu, nnode, si->x2apic ? "x2apic" : "xapic", tsc_khz / 1000, si->tsc_source, si->mem_bytes >> 20,
            boot_us / 1000, syscall_ns, cl);
    for (u32 n = 0; n < nnode; n++) {
        char cpus[512];
        u32 k = 0;
        cpus[0] = 0;
        for (u32 c = 0; c < ncpu; c++)
            if (pc[c]->node == (s32)n)
                k += snfmt(cpus + k, sizeof cpus - k, "%s%u", k ? "," : "", c);
        uprintf("dvmm-guest: node %u cpus=%s mem_mb=%lu\n", n, k ? cpus : "-", sys(SYS_NODE_MEM, n, 0, 0) >> 20);
    }
    if (si->boot_failures || si->boot_errors[0]) {
        uprintf("dvmm-guest: boot %s %s\n", si->boot_failures ? "FAIL" : "note:", si->boot_errors);
        if (si->boot_failures)
            nfail++;
    }
    parse_cmdline(cl);
    if (nfail) {
        uprintf("dvmm-guest: %u passed, %u failed\n", npass, nfail);
        uexit(1);
    }
    rt_ready = 1;
    sys(SYS_BARRIER, 0, 0, 0);
    u64 t = rdtsc();
    for (u32 i = 0; i < norder; i++)
        run_workload(&workloads[order[i]]);
    uprintf("dvmm-guest: %u passed, %u failed (total_ms=%lu)\n", npass, nfail, us_since(t) / 1000);
    if (conform_ran && ncpu > 1) {
        cf_exit_req = (nfail ? 1 : 0) + 1;
        wake(ncpu - 1);
        WAIT_UNTIL(0, 0, "the last cpu to end the vm", 5000); /* fails after the timeout */
    }
    if (conform_ran)
        last_cpu_exit(0, nfail ? 1 : 0);
    uexit(nfail ? 1 : 0);
}
