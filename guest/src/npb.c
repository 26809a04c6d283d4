/*
 * Our own implementations of the NAS Parallel Benchmark kernels EP, IS, CG, MG
 * and FT, written from the NPB specification (NASA reports RNR-94-007 and
 * NAS-95-020, NPB 3 problem classes S, W, A) with its official verification
 * values. Every kernel runs at CPL3 on every CPU, splits its work in static
 * blocks by CPU index, synchronises through per-CPU sync pages (each CPU
 * writes only its own; see "Shared run state") and places each CPU's share of
 * the data on that CPU's NUMA node (numa=local) or everything on node 0
 * (numa=ignore), laid out so that what crosses CPUs is only what the
 * algorithm exchanges, in pages of its own (dvmm's DSM moves whole pages).
 *
 * This is the only guest file built with SSE2 (double precision needs it). The
 * kernel part of the guest is general-registers only, so traps and system
 * calls never touch the XMM registers this code owns; the guest never switches
 * between two user contexts on one CPU, so no fxsave/fxrstor is needed.
 *
 * The NPB random number generator (randlc/vranlc: x <- 5^13 x mod 2^46) is
 * done in 64-bit integers: 2^46 divides 2^64, so the wrapped product masked
 * to 46 bits is exact, and x * 2^-46 is the same double NPB's split
 * floating-point version returns. That also makes jumping ahead (a^n mod
 * 2^46) exact, which is how every CPU finds the start of its own stream.
 */
#include "npb.h"

typedef double f64;

#define NPB_A 1220703125UL /* 5^13 */
#define M46 ((1UL << 46) - 1)
#define R46 (1.0 / 70368744177664.0) /* 2^-46 */

static inline u64 lcg(u64 x, u64 a) { return (x * a) & M46; }

static u64 lcg_pow(u64 a, u64 n) /* a^n mod 2^46 */
{
    u64 r = 1;
    for (; n; n >>= 1) {
        if (n & 1)
            r = lcg(r, a);
        a = lcg(a, a);
    }
    return r;
}

/* ---------------------------------------------------------------- */
/* Freestanding math: sqrtsd, and log/exp accurate to an ulp or two    */
/* (the verification tolerances are 1e-8 .. 1e-10 relative).          */

static inline f64 f_sqrt(f64 x)
{
    f64 r;
    __asm__("sqrtsd %1, %0" : "=x"(r) : "x"(x));
    return r;
}
static inline f64 f_abs(f64 x) { return __builtin_fabs(x); } /* andpd: no branch to mispredict */

union dbits { f64 d; u64 u; };
#define LN2_HI 6.93147180369123816490e-01 /* fdlibm's split of ln 2 */
#define LN2_LO 1.90821492927058770002e-10

/* positive normal x only: x = m 2^e, m in [sqrt(1/2), sqrt(2)),
 * log m = 2 atanh(s), s = (m-1)/(m+1), |s| < 0.172 */
static f64 f_log(f64 x)
{
    union dbits b = { .d = x };
    s64 e = (s64)((b.u >> 52) & 0x7FF) - 1023;
    b.u = (b.u & 0x000FFFFFFFFFFFFFUL) | 0x3FF0000000000000UL;
    f64 m = b.d;
    if (m > 1.4142135623730951) {
        m *= 0.5;
        e++;
    }
    /* 1 + z/3 + z^2/5 + ... + z^11/23 (z = s^2 < 0.0295: the next term is
     * < 1e-18), evaluated in pairs (Estrin) so the chain of dependent
     * multiplications is short: EP spends most of its time here */
    f64 s = (m - 1.0) / (m + 1.0), z = s * s, z2 = z * z, z4 = z2 * z2, z8 = z4 * z4;
    f64 a0 = 1.0 + z * (1.0 / 3), a1 = 1.0 / 5 + z * (1.0 / 7), a2 = 1.0 / 9 + z * (1.0 / 11);
    f64 a3 = 1.0 / 13 + z * (1.0 / 15), a4 = 1.0 / 17 + z * (1.0 / 19), a5 = 1.0 / 21 + z * (1.0 / 23);
    f64 p = (a0 + z2 * a1) + z4 * (a2 + z2 * a3) + z8 * (a4 + z2 * a5);
    return (f64)e * LN2_HI + (2.0 * s * p + (f64)e * LN2_LO);
}

/* x = k ln 2 + r, |r| <= ln2/2; Taylor to r^17 */
static f64 f_exp(f64 x)
{
    f64 kf = x * 1.4426950408889634;
    s64 k = (s64)(kf + (kf >= 0 ? 0.5 : -0.5));
    f64 r = (x - (f64)k * LN2_HI) - (f64)k * LN2_LO, p = 1.0;
    for (int i = 17; i >= 1; i--)
        p = 1.0 + p * r / i;
    union dbits b = { .u = (u64)(k + 1023) << 52 };
    return p * b.d;
}

/* -1.234567890123e+03 (diagnostics only; 13 significant digits) */
static void fmt_e(char *out, u64 n, f64 x)
{
    const char *sg = x < 0 ? "-" : "";
    f64 ax = f_abs(x);
    int e = 0;
    if (ax == 0) {
        snfmt(out, n, "0");
        return;
    }
    while (ax >= 10)
        ax /= 10, e++;
    while (ax < 1)
        ax *= 10, e--;
    u64 m = (u64)(ax * 1e12 + 0.5);
    if (m >= 10000000000000UL)
        m /= 10, e++;
    snfmt(out, n, "%s%lu.%012lue%s%02d", sg, m / 1000000000000UL, m % 1000000000000UL, e < 0 ? "-" : "+",
          e < 0 ? -e : e);
}

/* ---------------------------------------------------------------- */
/* Shared run state. The DSM under dvmm keeps memory coherent page by  */
/* page, so whatever one CPU writes while another reads it lives in a  */
/* page of its own: the variables CPU 0 writes in a timed section, the */
/* pointer tables the CPUs publish at setup (read-only afterwards),    */
/* and each CPU's synchronisation page (on its own node).             */

struct ctx {
    const struct npb_rt *rt;
    u32 me, n;     /* this CPU, CPU count */
    s64 node;      /* where this CPU's share of the data goes */
    char cls;
    u64 corrupt;
    u64 seq;       /* syncs passed (the same sequence on every CPU) */
    u64 spin;      /* TSC cycles a wait spins before it sleeps */
};

/* written by CPU 0 only (TSC around the timed section, the results) */
static struct {
    volatile u64 t_start, t_end;
    struct {
        int verified;
        f64 got[2], want[2];
        u64 igot, iwant;
    } res;
} ALIGNED(4096) cpu0w;
#define t_start cpu0w.t_start
#define t_end cpu0w.t_end
#define res cpu0w.res

/* written only at setup or on failure, read by every CPU */
static volatile u32 oom ALIGNED(4096); /* some CPU could not allocate: everyone stops */
static volatile u32 bad_setup;         /* an internal consistency check failed */

/* Each CPU's synchronisation page, on its node, written by that CPU only:
 * its sequence number (the last sync it reached), whom it sleeps waiting
 * for (so only that CPU wakes it) and the values it contributes to a reduction. Sync s uses
 * slot s % SYNC_SLOTS: a CPU at sync s has seen every CPU reach s - 1, so
 * every CPU has read the slots of s - 2 and older. */
#define SYNC_SLOTS 4
#define RED_W 16
struct syncpage {
    volatile u64 seq;
    volatile u64 sleeping;   /* 1 + the CPU this one sleeps waiting for, 0 if awake */
    volatile f64 slot[SYNC_SLOTS][RED_W];
} ALIGNED(4096);
static struct syncpage *volatile sp[MAX_CPUS];

/* the guest's system call (int3 through a DPL-3 gate; common.h numbers) */
static inline u64 npb_sys(u64 n, u64 a, u64 b)
{
    __asm__ volatile("int3" : "+a"(n) : "D"(a), "S"(b), "d"(0UL) : "memory");
    return n;
}
enum { NPB_SYS_PRINT = 0, NPB_SYS_EXIT = 1, NPB_SYS_YIELD = 12, NPB_SYS_WAKE = 17 };
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline u64 xchg64(volatile u64 *p, u64 v)
{
    __asm__ volatile("xchgq %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}

#ifndef NPB_SPIN_US
#define NPB_SPIN_US 10000
#endif
#define NPB_WAIT_S 120 /* a sync that takes this long means a lost CPU */

static void __attribute__((noinline, noreturn)) sync_timeout(struct ctx *c, u32 cpu)
{
    char line[160];
    int n = snfmt(line, sizeof line, "dvmm-guest: npb FAIL timeout (%us) waiting for cpu %u at sync %lu on cpu %u\n",
                  NPB_WAIT_S, cpu, c->seq, c->me);
    npb_sys(NPB_SYS_PRINT, (u64)line, n < (int)sizeof line ? (u64)n : sizeof line - 1);
    for (;;)
        npb_sys(NPB_SYS_EXIT, 1, 0);
}

/* until CPU `cpu` has reached sync s: spin natively, then halt in the
 * kernel (a wake-up from that CPU, or a timer with backoff), so vCPUs
 * that outnumber the host's cores give theirs away */
static void sync_wait(struct ctx *c, u32 cpu, u64 s)
{
    volatile struct syncpage *o = sp[cpu], *mine = sp[c->me];
    if (o->seq >= s)
        return;
    u64 t0 = rdtsc(), sleep_us = 20;
    while (o->seq < s) {
        u64 now = rdtsc();
        if (now - t0 < c->spin) {
            cpu_relax();
            continue;
        }
        if (now - t0 > (u64)NPB_WAIT_S * 1000 * c->rt->tsc_khz)
            sync_timeout(c, cpu);
        xchg64(&mine->sleeping, 1 + cpu); /* announce, then look once more (Dekker) */
        if (o->seq < s)
            npb_sys(NPB_SYS_YIELD, sleep_us, 0);
        mine->sleeping = 0;
        if (sleep_us < 1000)
            sleep_us *= 2;
    }
}

/* Reach the next sync, publishing v[0..k) with it: every CPU's stores
 * before it are visible to every CPU after it (x86 TSO; the DSM is
 * sequentially consistent). Returns the slot index. */
static u32 sync_arrive(struct ctx *c, const f64 *v, u32 k)
{
    u64 s = ++c->seq;
    u32 slot = (u32)(s % SYNC_SLOTS);
    volatile struct syncpage *mine = sp[c->me];
    for (u32 i = 0; i < k; i++)
        mine->slot[slot][i] = v[i];
    barrier();
    mine->seq = s;
    mfence(); /* the store above before the sleeping flags below */
    for (u32 cpu = 0; cpu < c->n; cpu++) /* only those waiting for me: no wake-up storms */
        if (cpu != c->me && sp[cpu]->sleeping == 1 + (u64)c->me)
            npb_sys(NPB_SYS_WAKE, cpu, 0);
    for (u32 cpu = 0; cpu < c->n; cpu++)
        if (cpu != c->me)
            sync_wait(c, cpu, s);
    barrier();
    return slot;
}

/* a barrier: each CPU writes only its own page and reads the others' */
static void bar(struct ctx *c) { sync_arrive(c, 0, 0); }

static void *nalloc(struct ctx *c, s64 node, u64 size)
{
    void *p = c->rt->alloc(node, size ? size : 8);
    if (!p)
        oom = 1;
    return p;
}

/* Memory other CPUs read: followed by PUB_GUARD bytes nobody touches. The
 * DSM's sequential prefetch (dvmm: up to 64 pages ahead of a reader's
 * stream) would otherwise pull in the pages after it, which the owner
 * writes next (its private data): a wasted transfer and an invalidation
 * each time. */
#define PUB_GUARD (68UL * 4096)
static void *nalloc_pub(struct ctx *c, s64 node, u64 size)
{
    return nalloc(c, node, ((size + 4095) & ~4095UL) + PUB_GUARD);
}

/* v[0..k) <- their sums over all CPUs, added in CPU order, so every CPU
 * gets the same bits; one sync */
static void allsum(struct ctx *c, f64 *v, u32 k)
{
    u32 slot = sync_arrive(c, v, k);
    for (u32 i = 0; i < k; i++) {
        f64 s = 0;
        for (u32 cpu = 0; cpu < c->n; cpu++)
            s += sp[cpu]->slot[slot][i];
        v[i] = s;
    }
}

/* the sum of v over the CPUs before this one (and the total in *tot) */
static f64 exscan(struct ctx *c, f64 v, f64 *tot)
{
    u32 slot = sync_arrive(c, &v, 1);
    f64 s = 0, t = 0;
    for (u32 cpu = 0; cpu < c->n; cpu++) {
        if (cpu < c->me)
            s += sp[cpu]->slot[slot][0];
        t += sp[cpu]->slot[slot][0];
    }
    *tot = t;
    return s;
}

static void span(u64 total, u32 me, u32 n, u64 *lo, u64 *hi)
{
    *lo = total * me / n;
    *hi = total * (me + 1) / n;
}

static void timer_start(struct ctx *c)
{
    bar(c);
    if (c->me == 0)
        t_start = rdtsc();
}
static void timer_stop(struct ctx *c)
{
    bar(c);
    if (c->me == 0)
        t_end = rdtsc();
}

static int rel_ok(f64 got, f64 want, f64 eps) { return f_abs((got - want) / want) <= eps; }

/* ---------------------------------------------------------------- */
/* EP: Gaussian pairs by the Marsaglia polar method from 2^(M+1)      */
/* uniform numbers, in batches of 2^16 pairs; sums of the deviates    */
/* verified. Batch k starts at seed 271828183 * a^(2^17 k).           */

#define EP_MK 16
#define EP_NK (1UL << EP_MK)
#define EP_NQ 10
#define EP_SEED 271828183UL

static const struct { char cls; u32 m; f64 sx, sy; } ep_classes[] = {
    { 'S', 24, -3.247834652034740e+3, -6.958407078382297e+3 },
    { 'W', 25, -2.863319731645753e+3, -6.320053679109499e+3 },
    { 'A', 28, -4.295875165629892e+3, -1.580732573678431e+4 },
};

static u32 ep_class(char cls)
{
    for (u32 i = 0; i < sizeof ep_classes / sizeof ep_classes[0]; i++)
        if (ep_classes[i].cls == cls)
            return i;
    return 0;
}

static void ep_run(struct ctx *c)
{
    u32 ci = ep_class(c->cls);
    u64 nn = 1UL << (ep_classes[ci].m - EP_MK), an = lcg_pow(NPB_A, 2 * EP_NK), lo, hi;
    span(nn, c->me, c->n, &lo, &hi);
    f64 v[2 + EP_NQ] = { 0 }, sx = 0, sy = 0;
    u64 q[EP_NQ] = { 0 }; /* counts apart from the sums: keeps sx, sy in registers */
    timer_start(c);
    for (u64 k = lo; k < hi; k++) {
        u64 x = lcg(EP_SEED + (k == 0 ? c->corrupt : 0), lcg_pow(an, k));
        for (u64 i = 0; i < EP_NK; i++) {
            x = lcg(x, NPB_A);
            f64 x1 = 2.0 * ((f64)x * R46) - 1.0;
            x = lcg(x, NPB_A);
            f64 x2 = 2.0 * ((f64)x * R46) - 1.0;
            f64 t1 = x1 * x1 + x2 * x2;
            if (t1 <= 1.0) {
                f64 t2 = f_sqrt(-2.0 * f_log(t1) / t1), t3 = x1 * t2, t4 = x2 * t2;
                f64 l = f_abs(t3) > f_abs(t4) ? f_abs(t3) : f_abs(t4);
                if (l < EP_NQ) /* a deviate beyond 10 sigma: never, but stay in bounds */
                    q[(u32)l]++;
                sx += t3;
                sy += t4;
            }
        }
    }
    v[0] = sx, v[1] = sy;
    for (u32 i = 0; i < EP_NQ; i++)
        v[2 + i] = (f64)q[i];
    allsum(c, v, 2 + EP_NQ);
    timer_stop(c);
    if (c->me == 0) {
        f64 gc = 0;
        for (u32 i = 0; i < EP_NQ; i++)
            gc += v[2 + i];
        res.got[0] = v[0], res.got[1] = v[1];
        res.want[0] = ep_classes[ci].sx, res.want[1] = ep_classes[ci].sy;
        res.igot = (u64)gc;
        res.verified = rel_ok(v[0], res.want[0], 1e-8) && rel_ok(v[1], res.want[1], 1e-8);
    }
}

/* ---------------------------------------------------------------- */
/* IS: rank 2^K integer keys (each the scaled sum of four uniform     */
/* numbers from seed 314159265) ten times, with two keys changed per  */
/* iteration; the ranks of five test keys are checked every          */
/* iteration (partial verification), and the final ranks must sort   */
/* the keys (full verification): 5*10 + 1 passes.                     */

#define IS_ITERS 10
#define IS_TESTS 5
#define IS_SEED 314159265UL

static const struct {
    char cls;
    u32 keys_log2, max_key_log2;
    u32 index[IS_TESTS], rank[IS_TESTS];
} is_classes[] = {
    { 'S', 16, 11, { 48427, 17148, 23627, 62548, 4431 }, { 0, 18, 346, 64917, 65463 } },
    { 'W', 20, 16, { 357773, 934767, 875723, 898999, 404505 }, { 1249, 11698, 1039987, 1043896, 1048018 } },
    { 'A', 23, 19, { 2112377, 662041, 5336171, 3642833, 4250760 }, { 104, 17523, 123928, 8288932, 8388264 } },
};

static u32 *volatile is_keys[MAX_CPUS]; /* CPU c's block of the key array */
static u32 *volatile is_cnt[MAX_CPUS];  /* CPU c's key histogram, all keys values */
static u32 *volatile is_rnk[MAX_CPUS];  /* CPU c's block of key values: keys <= value */

static u32 is_class(char cls)
{
    for (u32 i = 0; i < sizeof is_classes / sizeof is_classes[0]; i++)
        if (is_classes[i].cls == cls)
            return i;
    return 0;
}

/* where element i of an array split with span() over n CPUs lives */
static u32 owner_of(u64 i, u64 total, u32 n, u64 *off)
{
    for (u32 c = 0; c < n; c++) {
        u64 lo, hi;
        span(total, c, n, &lo, &hi);
        if (i >= lo && i < hi) {
            *off = i - lo;
            return c;
        }
    }
    *off = 0;
    return n - 1;
}

static u32 is_key_at(u64 i, u64 nk, u32 n)
{
    u64 off;
    u32 c = owner_of(i, nk, n, &off);
    return is_keys[c][off];
}
static volatile u32 *is_rank_at(u64 k, u64 mk, u32 n)
{
    u64 off;
    u32 c = owner_of(k, mk, n, &off);
    return &is_rnk[c][off];
}

/* One ranking. Two syncs: after the histograms (each CPU then sums its
 * block of key values over every CPU's histogram), and the exclusive scan
 * of the block totals, which also tells every CPU that all the others are
 * done reading its histogram, so the next ranking may overwrite it. The
 * partial verification is done by the CPU whose block holds the rank
 * tested; it returns how many of those passed. */
static u32 is_rank(struct ctx *c, u32 ci, u64 it)
{
    u64 nk = 1UL << is_classes[ci].keys_log2, mk = 1UL << is_classes[ci].max_key_log2, lo, hi, klo, khi;
    span(nk, c->me, c->n, &lo, &hi);
    span(mk, c->me, c->n, &klo, &khi);
    u32 *keys = is_keys[c->me], *cnt = is_cnt[c->me], *rnk = is_rnk[c->me];
    if (it >= lo && it < hi)
        keys[it - lo] = (u32)it;
    if (it + IS_ITERS >= lo && it + IS_ITERS < hi)
        keys[it + IS_ITERS - lo] = (u32)(mk - it);
    for (u64 k = 0; k < mk; k++)
        cnt[k] = 0;
    for (u64 i = 0; i < hi - lo; i++)
        cnt[keys[i]]++;
    bar(c);
    /* this CPU's block of key values: population over all CPUs, prefix sums */
    u32 run = 0;
    for (u64 k = klo; k < khi; k++) {
        for (u32 cpu = 0; cpu < c->n; cpu++)
            run += is_cnt[cpu][k];
        rnk[k - klo] = run;
    }
    f64 tot;
    u32 off = (u32)exscan(c, (f64)run, &tot);
    for (u64 k = klo; k < khi; k++)
        rnk[k - klo] += off;
    /* partial verification, as the specification shifts each class's
     * ranks; the test keys sit where no ranking rewrites keys (index >
     * 2 * IS_ITERS), so their pages stay read-shared */
    u32 passed = 0;
    for (u32 i = 0; i < IS_TESTS; i++) {
        u64 k = is_key_at(is_classes[ci].index[i], nk, c->n);
        if (k == 0 || k > nk - 1 || k - 1 < klo || k - 1 >= khi)
            continue;
        u64 r = rnk[k - 1 - klo], want = is_classes[ci].rank[i];
        char cl = is_classes[ci].cls;
        if (cl == 'S')
            want = i <= 2 ? want + it : want - it;
        else if (cl == 'W')
            want = i < 2 ? want + (it - 2) : want - it;
        else
            want = i <= 2 ? want + (it - 1) : want - (it - 1);
        passed += r == want;
    }
    return passed;
}

static void is_run(struct ctx *c)
{
    u32 ci = is_class(c->cls);
    u64 nk = 1UL << is_classes[ci].keys_log2, mk = 1UL << is_classes[ci].max_key_log2, lo, hi, klo, khi;
    span(nk, c->me, c->n, &lo, &hi);
    span(mk, c->me, c->n, &klo, &khi);
    is_keys[c->me] = nalloc(c, c->node, (hi - lo) * 4);
    is_cnt[c->me] = nalloc_pub(c, c->node, mk * 4); /* read by every CPU */
    is_rnk[c->me] = nalloc(c, c->node, (khi - klo) * 4);
    bar(c);
    if (oom)
        return;
    /* keys: each is (x1+x2+x3+x4) * 2^-46 * maxkey/4, truncated: exactly
     * the 46-bit sum shifted right */
    u32 *keys = is_keys[c->me], sh = 46 - (is_classes[ci].max_key_log2 - 2);
    u64 s = lcg(IS_SEED, lcg_pow(NPB_A, 4 * lo));
    for (u64 i = lo; i < hi; i++) {
        u64 x1 = lcg(s, NPB_A), x2 = lcg(x1, NPB_A), x3 = lcg(x2, NPB_A), x4 = lcg(x3, NPB_A);
        keys[i - lo] = (u32)((x1 + x2 + x3 + x4) >> sh);
        s = x4;
    }
    /* one key (index 0, which no iteration rewrites) jumps to the far end of
     * the range, across the test keys of one end: their ranks change */
    if (c->corrupt && lo == 0 && hi > 0)
        keys[0] = keys[0] < mk / 2 ? (u32)(mk - 1) : 0;
    is_rank(c, ci, 1); /* untimed, as the specification does */
    f64 passed[1] = { 0 };
    timer_start(c);
    for (u64 it = 1; it <= IS_ITERS; it++)
        passed[0] += is_rank(c, ci, it);
    timer_stop(c);
    allsum(c, passed, 1); /* the partial verifications of every CPU */
    if (c->me != 0)
        return;
    u64 is_passed = (u64)passed[0];
    /* full verification (untimed): sort by the final ranks, count keys out of order */
    u32 *sorted = c->rt->alloc(c->node, nk * 4);
    u64 unsorted = 0;
    if (!sorted) {
        oom = 1;
        return;
    }
    for (u64 i = 0; i < nk; i++) {
        u32 key = is_key_at(i, nk, c->n);
        volatile u32 *r = is_rank_at(key, mk, c->n);
        u32 pos = --*r;
        if (pos < nk)
            sorted[pos] = key;
        else
            unsorted++;
    }
    for (u64 i = 1; i < nk; i++)
        unsorted += sorted[i - 1] > sorted[i];
    is_passed += unsorted == 0;
    res.igot = is_passed;
    res.iwant = IS_TESTS * IS_ITERS + 1;
    res.verified = is_passed == res.iwant;
}

/* ---------------------------------------------------------------- */
/* CG: the smallest eigenvalue of a random sparse symmetric matrix by */
/* inverse power iteration, 25 conjugate-gradient steps per outer     */
/* iteration; zeta = shift + 1/(x.z) verified. Rows are split over    */
/* the CPUs; each CPU builds its own rows from the generator's list  */
/* of outer products (summing duplicates in the specification's       */
/* order, so each row's values are bit for bit the serial ones).      */
/* Only the residual crosses CPUs: each CPU updates r on its rows and  */
/* publishes that block with the r.r reduction; every CPU then gathers */
/* the whole r and computes the whole p, z and x itself (O(n) work, the */
/* same bits on every CPU), so p, z and x are never exchanged and a    */
/* conjugate-gradient step has two syncs.                              */

#define CG_NITER 15
#define CG_CGITMAX 25
#define CG_RCOND 0.1
#define CG_SEED 314159265UL

static const struct { char cls; u32 na, nonzer; f64 shift, zeta; } cg_classes[] = {
    { 'S', 1400, 7, 10.0, 8.5971775078648 },
    { 'W', 7000, 8, 12.0, 10.362595087124 },
    { 'A', 14000, 11, 20.0, 17.130235054029 },
};

/* the generator's output (CPU 0, node 0): per outer product i, arow[i] (col, value) pairs */
static u32 *volatile cg_arow;
static u32 *volatile cg_acol;
static f64 *volatile cg_aelt;
/* per CPU: its rows (local row pointers, global columns) and vector blocks */
static f64 *volatile cg_rb[MAX_CPUS]; /* CPU c's block of r, published */

struct cg_local {
    u64 lo, hi;               /* my rows */
    u32 *rowstr, *colidx;
    f64 *a, *q, *rb;          /* my block only, index j - lo; rb = cg_rb[me] */
    f64 *x, *r, *p, *z;       /* full length, private */
};

static u32 cg_class(char cls)
{
    for (u32 i = 0; i < sizeof cg_classes / sizeof cg_classes[0]; i++)
        if (cg_classes[i].cls == cls)
            return i;
    return 0;
}

/* makea's random part (serial by nature: one stream): sprnvc + vecset per row */
static void cg_generate(u32 ci)
{
    u32 n = cg_classes[ci].na, nz = cg_classes[ci].nonzer, w = nz + 1, lg = 0;
    u64 tran = lcg(CG_SEED, NPB_A); /* the specification draws one number first (zeta's initial value) */
    u32 nn1 = 1;
    do {
        nn1 *= 2;
        lg++;
    } while (nn1 < n);
    for (u32 row = 0; row < n; row++) {
        u32 *ivc = cg_acol + (u64)row * w, nzv = 0;
        f64 *vc = cg_aelt + (u64)row * w;
        while (nzv < nz) {
            tran = lcg(tran, NPB_A);
            f64 vecelt = (f64)tran * R46;
            tran = lcg(tran, NPB_A);
            u32 i = (u32)(tran >> (46 - lg)) + 1; /* (int)(nn1 * uniform) + 1, exactly */
            if (i > n)
                continue;
            u32 dup = 0;
            for (u32 k = 0; k < nzv; k++)
                dup |= ivc[k] == i;
            if (dup)
                continue;
            vc[nzv] = vecelt;
            ivc[nzv++] = i;
        }
        u32 set = 0;
        for (u32 k = 0; k < nzv; k++)
            if (ivc[k] == row + 1) {
                vc[k] = 0.5;
                set = 1;
            }
        if (!set) {
            vc[nzv] = 0.5;
            ivc[nzv++] = row + 1;
        }
        cg_arow[row] = nzv;
        for (u32 k = 0; k < nzv; k++)
            ivc[k]--; /* 0-based columns */
    }
}

/* sparse() for rows [lo, hi): returns 0 on an internal inconsistency */
static int cg_build(struct ctx *c, u32 ci, struct cg_local *L)
{
    u32 n = cg_classes[ci].na, w = cg_classes[ci].nonzer + 1;
    u64 nrows = L->hi - L->lo;
    u32 *rowstr = L->rowstr, *colidx = L->colidx, *nzloc = L->rowstr + nrows + 1;
    f64 *a = L->a, shift = cg_classes[ci].shift;
    for (u64 j = 0; j < nrows; j++) {
        for (u32 k = rowstr[j]; k < rowstr[j + 1]; k++) {
            a[k] = 0.0;
            colidx[k] = ~0U; /* -1: empty */
        }
        nzloc[j] = 0;
    }
    f64 size = 1.0, ratio = f_exp(f_log(CG_RCOND) / n); /* rcond^(1/n) */
    for (u32 i = 0; i < n; i++) {
        u32 nr = cg_arow[i];
        const u32 *acol = cg_acol + (u64)i * w;
        const f64 *aelt = cg_aelt + (u64)i * w;
        for (u32 nza = 0; nza < nr; nza++) {
            u32 j = acol[nza];
            if (j < L->lo || j >= L->hi)
                continue;
            u64 jl = j - L->lo;
            f64 scale = size * aelt[nza];
            for (u32 nzrow = 0; nzrow < nr; nzrow++) {
                u32 jcol = acol[nzrow], k, found = 0;
                f64 va = aelt[nzrow] * scale;
                if (jcol == j && j == i)
                    va = va + CG_RCOND - shift;
                for (k = rowstr[jl]; k < rowstr[jl + 1]; k++) {
                    if (colidx[k] != ~0U && colidx[k] > jcol) {
                        /* insert in column order */
                        for (s64 kk = (s64)rowstr[jl + 1] - 2; kk >= (s64)k; kk--)
                            if (colidx[kk] != ~0U) {
                                a[kk + 1] = a[kk];
                                colidx[kk + 1] = colidx[kk];
                            }
                        colidx[k] = jcol;
                        a[k] = 0.0;
                        found = 1;
                        break;
                    } else if (colidx[k] == ~0U) {
                        colidx[k] = jcol;
                        found = 1;
                        break;
                    } else if (colidx[k] == jcol) {
                        nzloc[jl]++; /* a duplicate: summed, one slot freed */
                        found = 1;
                        break;
                    }
                }
                if (!found)
                    return 0;
                a[k] += va;
            }
        }
        size *= ratio;
    }
    /* squeeze out the slots duplicates left empty */
    for (u64 j = 1; j < nrows; j++)
        nzloc[j] += nzloc[j - 1];
    for (u64 j = 0; j < nrows; j++) {
        u32 j1 = j > 0 ? rowstr[j] - nzloc[j - 1] : 0, j2 = rowstr[j + 1] - nzloc[j], nza = rowstr[j];
        for (u32 k = j1; k < j2; k++, nza++) {
            a[k] = a[nza];
            colidx[k] = colidx[nza];
        }
    }
    for (u64 j = 1; j <= nrows; j++)
        rowstr[j] -= nzloc[j - 1];
    if (c->corrupt && L->lo == 0 && nrows) /* one matrix element */
        a[rowstr[0]] += 1.0;
    return 1;
}

/* r <- every CPU's published block of the residual */
static void cg_gather_r(struct ctx *c, u32 na, f64 *r)
{
    for (u32 cpu = 0; cpu < c->n; cpu++) {
        u64 lo, hi;
        span(na, cpu, c->n, &lo, &hi);
        memcpy(r + lo, cg_rb[cpu], (hi - lo) * 8);
    }
}

static f64 cg_solve(struct ctx *c, u32 na, struct cg_local *L)
{
    u64 lo = L->lo, nr = L->hi - L->lo;
    f64 *p = L->p, *z = L->z, *r = L->r, *x = L->x, *q = L->q, *rb = L->rb, rho = 0, v[1];
    for (u64 j = 0; j < na; j++) {
        z[j] = 0;
        r[j] = x[j];
        p[j] = r[j];
        rho += r[j] * r[j];
    }
    for (u32 it = 1; it <= CG_CGITMAX; it++) {
        v[0] = 0;
        for (u64 j = 0; j < nr; j++) {
            f64 sum = 0.0;
            for (u32 k = L->rowstr[j]; k < L->rowstr[j + 1]; k++)
                sum = sum + L->a[k] * p[L->colidx[k]];
            q[j] = sum;
            v[0] += p[lo + j] * sum;
        }
        allsum(c, v, 1);
        f64 alpha = rho / v[0], rho0 = rho;
        v[0] = 0;
        for (u64 j = 0; j < nr; j++) {
            rb[j] = r[lo + j] - alpha * q[j];
            v[0] += rb[j] * rb[j];
        }
        allsum(c, v, 1); /* also publishes every block of r */
        for (u64 j = 0; j < na; j++)
            z[j] = z[j] + alpha * p[j];
        rho = v[0];
        f64 beta = rho / rho0;
        cg_gather_r(c, na, r); /* read before the next step's first sync */
        for (u64 j = 0; j < na; j++)
            p[j] = r[j] + beta * p[j];
    }
    /* ||x - A z|| */
    v[0] = 0;
    for (u64 j = 0; j < nr; j++) {
        f64 d = 0.0;
        for (u32 k = L->rowstr[j]; k < L->rowstr[j + 1]; k++)
            d = d + L->a[k] * z[L->colidx[k]];
        d = x[lo + j] - d;
        v[0] += d * d;
    }
    allsum(c, v, 1);
    return f_sqrt(v[0]);
}

/* one outer iteration: returns zeta (x and z are whole on every CPU) */
static f64 cg_outer(struct ctx *c, u32 ci, struct cg_local *L)
{
    u32 na = cg_classes[ci].na;
    cg_solve(c, na, L);
    f64 xz = 0, zz = 0;
    for (u64 j = 0; j < na; j++) {
        xz += L->x[j] * L->z[j];
        zz += L->z[j] * L->z[j];
    }
    f64 n2 = 1.0 / f_sqrt(zz);
    for (u64 j = 0; j < na; j++)
        L->x[j] = n2 * L->z[j];
    return cg_classes[ci].shift + 1.0 / xz;
}

static void cg_run(struct ctx *c)
{
    u32 ci = cg_class(c->cls), na = cg_classes[ci].na, w = cg_classes[ci].nonzer + 1;
    struct cg_local L;
    span(na, c->me, c->n, &L.lo, &L.hi);
    u64 nr = L.hi - L.lo;
    if (c->me == 0) {
        cg_arow = nalloc(c, 0, (u64)na * 4);
        cg_acol = nalloc(c, 0, (u64)na * w * 4);
        cg_aelt = nalloc(c, 0, (u64)na * w * 8);
        if (!oom)
            cg_generate(ci);
    }
    L.rowstr = nalloc(c, c->node, (2 * nr + 1) * 4); /* row pointers, then nzloc */
    L.q = nalloc(c, c->node, nr * 8);
    L.rb = cg_rb[c->me] = nalloc_pub(c, c->node, nr * 8); /* read by every CPU */
    L.x = nalloc(c, c->node, (u64)na * 8);
    L.r = nalloc(c, c->node, (u64)na * 8);
    L.p = nalloc(c, c->node, (u64)na * 8);
    L.z = nalloc(c, c->node, (u64)na * 8);
    bar(c);
    if (oom)
        return;
    /* count each of my rows' entries (with duplicates) */
    for (u64 j = 0; j <= nr; j++)
        L.rowstr[j] = 0;
    for (u32 i = 0; i < na; i++)
        for (u32 k = 0; k < cg_arow[i]; k++) {
            u32 j = cg_acol[(u64)i * w + k];
            if (j >= L.lo && j < L.hi)
                L.rowstr[j - L.lo + 1] += cg_arow[i];
        }
    for (u64 j = 1; j <= nr; j++)
        L.rowstr[j] += L.rowstr[j - 1];
    L.a = nalloc(c, c->node, (u64)L.rowstr[nr] * 8);
    L.colidx = nalloc(c, c->node, (u64)L.rowstr[nr] * 4);
    bar(c);
    if (oom)
        return;
    if (!cg_build(c, ci, &L))
        bad_setup = 1;
    for (u64 j = 0; j < na; j++)
        L.x[j] = 1.0;
    bar(c);
    if (bad_setup)
        return;
    cg_outer(c, ci, &L); /* one untimed iteration, as the specification does */
    for (u64 j = 0; j < na; j++)
        L.x[j] = 1.0;
    f64 zeta = 0;
    timer_start(c);
    for (u32 it = 1; it <= CG_NITER; it++)
        zeta = cg_outer(c, ci, &L);
    timer_stop(c);
    if (c->me == 0) {
        res.got[0] = zeta;
        res.want[0] = cg_classes[ci].zeta;
        res.verified = rel_ok(zeta, res.want[0], 1e-10);
    }
}

/* ---------------------------------------------------------------- */
/* MG: four V-cycles of a multigrid solver for a 3-D Poisson problem  */
/* with periodic boundaries, right-hand side +1 at the 10 largest and */
/* -1 at the 10 smallest of nx^3 random numbers; the L2 norm of the   */
/* final residual verified. Every grid is an array of i3 planes; each */
/* CPU owns a block of interior planes at every level (allocated on   */
/* its node), computes them, and the owners of planes 1 and m-2 fill  */
/* the periodic ghost planes m-1 and 0 (ghost 0 lives with CPU 0,     */
/* ghost m-1 with the last CPU).                                     */

#define MG_NIT 4
#define MG_MAXLT 8
#define MG_MAXM 258 /* 2 + 256, class A */
#define MG_SEED 314159265UL

static const struct { char cls; u32 nx, lt; f64 rnm2; } mg_classes[] = {
    { 'S', 32, 5, 0.5307707005734e-04 },
    { 'W', 128, 7, 0.6467329375339e-05 },
    { 'A', 256, 8, 0.2433365309069e-05 },
};

static f64 *mg_u[MG_MAXLT + 1][MG_MAXM], *mg_r[MG_MAXLT + 1][MG_MAXM], *mg_v[MG_MAXM];
static u32 mg_m[MG_MAXLT + 1]; /* points per axis with ghosts, per level */
static const f64 mg_a[4] = { -8.0 / 3.0, 0.0, 1.0 / 6.0, 1.0 / 12.0 };
static const f64 mg_c[4] = { -3.0 / 8.0, +1.0 / 32.0, -1.0 / 64.0, 0.0 };
/* zran3's candidates per CPU: 10 largest (ascending) and 10 smallest (descending) */
#define MG_MM 10
static struct { f64 hv[MG_MM], lv[MG_MM]; u64 hp[MG_MM], lp[MG_MM]; } mg_cand[MAX_CPUS];

static u32 mg_class(char cls)
{
    for (u32 i = 0; i < sizeof mg_classes / sizeof mg_classes[0]; i++)
        if (mg_classes[i].cls == cls)
            return i;
    return 0;
}

/* my interior planes [lo, hi) of a level with m planes */
static void mg_mine(struct ctx *c, u32 m, u64 *lo, u64 *hi)
{
    span(m - 2, c->me, c->n, lo, hi);
    *lo += 1;
    *hi += 1;
}
static int mg_owns(struct ctx *c, u32 m, u64 p)
{
    u64 lo, hi;
    mg_mine(c, m, &lo, &hi);
    return (p >= lo && p < hi) || (p == 0 && c->me == 0) || (p == m - 1 && c->me == c->n - 1);
}

/* my planes of one grid, in one block on my node. (Guards after the
 * planes the neighbours read, as IS and CG have, made MG worse here: its
 * restriction reads two planes deep into the neighbour's block, and one
 * prefetch stream over both beats two shorter ones; class W, 2 nodes: 10.0k
 * remote faults with guards, 7.3k without.) */
static void mg_alloc(struct ctx *c, f64 **tbl, u32 m)
{
    u64 np = 0, plane = (u64)m * m;
    for (u64 p = 0; p < m; p++)
        np += mg_owns(c, m, p);
    f64 *blk = nalloc(c, c->node, np * plane * 8);
    if (!blk)
        return;
    for (u64 p = 0, i = 0; p < m; p++)
        if (mg_owns(c, m, p))
            tbl[p] = blk + (i++) * plane;
}

static void mg_zero(struct ctx *c, f64 **tbl, u32 m, int ghosts)
{
    for (u64 p = 0; p < m; p++)
        if (mg_owns(c, m, p) && (ghosts || (p != 0 && p != m - 1)))
            memset(tbl[p], 0, (u64)m * m * 8);
}

/* periodic boundaries: edges of my planes, then the ghost planes; a barrier */
static void mg_comm3(struct ctx *c, f64 **tbl, u32 m)
{
    u64 lo, hi;
    mg_mine(c, m, &lo, &hi);
    for (u64 i3 = lo; i3 < hi; i3++) {
        f64 *P = tbl[i3];
        for (u32 i2 = 1; i2 < m - 1; i2++) {
            P[i2 * m] = P[i2 * m + m - 2];
            P[i2 * m + m - 1] = P[i2 * m + 1];
        }
        for (u32 i1 = 0; i1 < m; i1++) {
            P[i1] = P[(m - 2) * m + i1];
            P[(m - 1) * m + i1] = P[m + i1];
        }
    }
    if (m - 2 >= lo && m - 2 < hi)
        memcpy(tbl[0], tbl[m - 2], (u64)m * m * 8);
    if (1 >= lo && 1 < hi)
        memcpy(tbl[m - 1], tbl[1], (u64)m * m * 8);
    bar(c);
}

/* r = v - A u */
static void mg_resid(struct ctx *c, f64 **U, f64 **V, f64 **R, u32 m)
{
    f64 u1[MG_MAXM], u2[MG_MAXM];
    u64 lo, hi;
    mg_mine(c, m, &lo, &hi);
    for (u64 i3 = lo; i3 < hi; i3++) {
        const f64 *um = U[i3 - 1], *u0 = U[i3], *up = U[i3 + 1], *v = V[i3];
        f64 *r = R[i3];
        for (u32 i2 = 1; i2 < m - 1; i2++) {
            u32 b = i2 * m, bm = b - m, bp = b + m;
            for (u32 i1 = 0; i1 < m; i1++) {
                u1[i1] = u0[bm + i1] + u0[bp + i1] + um[b + i1] + up[b + i1];
                u2[i1] = um[bm + i1] + um[bp + i1] + up[bm + i1] + up[bp + i1];
            }
            for (u32 i1 = 1; i1 < m - 1; i1++)
                r[b + i1] = v[b + i1] - mg_a[0] * u0[b + i1] - mg_a[2] * (u2[i1] + u1[i1 - 1] + u1[i1 + 1]) -
                            mg_a[3] * (u2[i1 - 1] + u2[i1 + 1]);
        }
    }
    mg_comm3(c, R, m);
}

/* u = u + C r (the smoother) */
static void mg_psinv(struct ctx *c, f64 **R, f64 **U, u32 m)
{
    f64 r1[MG_MAXM], r2[MG_MAXM];
    u64 lo, hi;
    mg_mine(c, m, &lo, &hi);
    for (u64 i3 = lo; i3 < hi; i3++) {
        const f64 *rm = R[i3 - 1], *r0 = R[i3], *rp = R[i3 + 1];
        f64 *u = U[i3];
        for (u32 i2 = 1; i2 < m - 1; i2++) {
            u32 b = i2 * m, bm = b - m, bp = b + m;
            for (u32 i1 = 0; i1 < m; i1++) {
                r1[i1] = r0[bm + i1] + r0[bp + i1] + rm[b + i1] + rp[b + i1];
                r2[i1] = rm[bm + i1] + rm[bp + i1] + rp[bm + i1] + rp[bp + i1];
            }
            for (u32 i1 = 1; i1 < m - 1; i1++)
                u[b + i1] = u[b + i1] + mg_c[0] * r0[b + i1] + mg_c[1] * (r0[b + i1 - 1] + r0[b + i1 + 1] + r1[i1]) +
                            mg_c[2] * (r2[i1] + r1[i1 - 1] + r1[i1 + 1]);
        }
    }
    mg_comm3(c, U, m);
}

/* s = P r: fine level (mk) to the next coarser (mj) */
static void mg_rprj3(struct ctx *c, f64 **R, u32 mk, f64 **S, u32 mj)
{
    f64 x1[MG_MAXM], y1[MG_MAXM];
    u64 lo, hi;
    mg_mine(c, mj, &lo, &hi);
    for (u64 j3 = lo; j3 < hi; j3++) {
        u64 i3 = 2 * j3 - 1;
        const f64 *r0 = R[i3], *r1 = R[i3 + 1], *r2 = R[i3 + 2];
        f64 *s = S[j3];
        for (u32 j2 = 1; j2 < mj - 1; j2++) {
            u32 i2 = 2 * j2 - 1, b0 = i2 * mk, b1 = b0 + mk, b2 = b1 + mk;
            for (u32 j1 = 1; j1 < mj; j1++) {
                u32 i1 = 2 * j1 - 1;
                x1[i1] = r1[b0 + i1] + r1[b2 + i1] + r0[b1 + i1] + r2[b1 + i1];
                y1[i1] = r0[b0 + i1] + r2[b0 + i1] + r0[b2 + i1] + r2[b2 + i1];
            }
            for (u32 j1 = 1; j1 < mj - 1; j1++) {
                u32 i1 = 2 * j1 - 1;
                f64 y2 = r0[b0 + i1 + 1] + r2[b0 + i1 + 1] + r0[b2 + i1 + 1] + r2[b2 + i1 + 1];
                f64 x2 = r1[b0 + i1 + 1] + r1[b2 + i1 + 1] + r0[b1 + i1 + 1] + r2[b1 + i1 + 1];
                s[j2 * mj + j1] = 0.5 * r1[b1 + i1 + 1] + 0.25 * (r1[b1 + i1] + r1[b1 + i1 + 2] + x2) +
                                  0.125 * (x1[i1] + x1[i1 + 2] + y2) + 0.0625 * (y1[i1] + y1[i1 + 2]);
            }
        }
    }
    mg_comm3(c, S, mj);
}

/* u = u + Q z: trilinear interpolation from the coarser level (mm) to
 * the finer (n), by fine plane (fine plane f is 2*i3 or 2*i3+1), so
 * each CPU writes only the planes it owns, ghosts included */
static void mg_interp(struct ctx *c, f64 **Z, u32 mm, f64 **U, u32 n)
{
    f64 z1[MG_MAXM], z2[MG_MAXM], z3[MG_MAXM];
    for (u64 f = 0; f < n; f++) {
        if (!mg_owns(c, n, f))
            continue;
        u64 i3 = f >> 1;
        int odd = f & 1;
        const f64 *z0 = Z[i3], *zp = Z[i3 + 1];
        f64 *u = U[f];
        for (u32 i2 = 0; i2 < mm - 1; i2++) {
            u32 b = i2 * mm, bp = b + mm, e = 2 * i2 * n, o = e + n;
            for (u32 i1 = 0; i1 < mm; i1++) {
                z1[i1] = z0[bp + i1] + z0[b + i1];
                if (odd) {
                    z2[i1] = zp[b + i1] + z0[b + i1];
                    z3[i1] = zp[bp + i1] + zp[b + i1] + z1[i1];
                }
            }
            if (!odd) {
                for (u32 i1 = 0; i1 < mm - 1; i1++) {
                    u[e + 2 * i1] = u[e + 2 * i1] + z0[b + i1];
                    u[e + 2 * i1 + 1] = u[e + 2 * i1 + 1] + 0.5 * (z0[b + i1 + 1] + z0[b + i1]);
                }
                for (u32 i1 = 0; i1 < mm - 1; i1++) {
                    u[o + 2 * i1] = u[o + 2 * i1] + 0.5 * z1[i1];
                    u[o + 2 * i1 + 1] = u[o + 2 * i1 + 1] + 0.25 * (z1[i1] + z1[i1 + 1]);
                }
            } else {
                for (u32 i1 = 0; i1 < mm - 1; i1++) {
                    u[e + 2 * i1] = u[e + 2 * i1] + 0.5 * z2[i1];
                    u[e + 2 * i1 + 1] = u[e + 2 * i1 + 1] + 0.25 * (z2[i1] + z2[i1 + 1]);
                }
                for (u32 i1 = 0; i1 < mm - 1; i1++) {
                    u[o + 2 * i1] = u[o + 2 * i1] + 0.25 * z3[i1];
                    u[o + 2 * i1 + 1] = u[o + 2 * i1 + 1] + 0.125 * (z3[i1] + z3[i1 + 1]);
                }
            }
        }
    }
    bar(c);
}

/* sqrt(sum r^2 / nx^3) over the interior */
static f64 mg_norm2(struct ctx *c, f64 **R, u32 m, u32 nx)
{
    u64 lo, hi;
    f64 s[1] = { 0 };
    mg_mine(c, m, &lo, &hi);
    for (u64 i3 = lo; i3 < hi; i3++)
        for (u32 i2 = 1; i2 < m - 1; i2++)
            for (u32 i1 = 1; i1 < m - 1; i1++) {
                f64 x = R[i3][i2 * m + i1];
                s[0] += x * x;
            }
    allsum(c, s, 1);
    return f_sqrt(s[0] / ((f64)nx * nx * nx));
}

/* keep the 10 largest (ascending, hv[0] the smallest of them) and the 10
 * smallest (descending) values seen, as the specification's bubble does */
static void mg_consider(f64 *hv, u64 *hp, f64 *lv, u64 *lp, f64 x, u64 pos)
{
    if (x > hv[0]) {
        hv[0] = x, hp[0] = pos;
        for (u32 i = 0; i + 1 < MG_MM && hv[i] > hv[i + 1]; i++) {
            f64 t = hv[i];
            hv[i] = hv[i + 1], hv[i + 1] = t;
            u64 q = hp[i];
            hp[i] = hp[i + 1], hp[i + 1] = q;
        }
    }
    if (x < lv[0]) {
        lv[0] = x, lp[0] = pos;
        for (u32 i = 0; i + 1 < MG_MM && lv[i] < lv[i + 1]; i++) {
            f64 t = lv[i];
            lv[i] = lv[i + 1], lv[i + 1] = t;
            u64 q = lp[i];
            lp[i] = lp[i + 1], lp[i + 1] = q;
        }
    }
}

/* the right-hand side: the random field's value at (i1, i2, i3) is the
 * (i1 + nx (i2-1) + nx^2 (i3-1))-th number after the seed; only its 10
 * largest and 10 smallest matter, so the field itself is never stored */
static void mg_zran3(struct ctx *c, u32 ci)
{
    u32 nx = mg_classes[ci].nx, lt = mg_classes[ci].lt, m = mg_m[lt];
    u64 lo, hi, a1 = lcg_pow(NPB_A, nx);
    f64 hv[MG_MM], lv[MG_MM];
    u64 hp[MG_MM], lp[MG_MM];
    for (u32 i = 0; i < MG_MM; i++)
        hv[i] = 0.0, lv[i] = 1.0, hp[i] = lp[i] = 0;
    mg_mine(c, m, &lo, &hi);
    for (u64 i3 = lo; i3 < hi; i3++) {
        u64 x1 = lcg(MG_SEED, lcg_pow(NPB_A, (u64)nx * nx * (i3 - 1)));
        for (u32 i2 = 1; i2 <= nx; i2++) {
            u64 xx = x1;
            for (u32 i1 = 1; i1 <= nx; i1++) {
                xx = lcg(xx, NPB_A);
                mg_consider(hv, hp, lv, lp, (f64)xx * R46, (i3 * m + i2) * m + i1);
            }
            x1 = lcg(x1, a1);
        }
    }
    for (u32 i = 0; i < MG_MM; i++) {
        mg_cand[c->me].hv[i] = hv[i], mg_cand[c->me].hp[i] = hp[i];
        mg_cand[c->me].lv[i] = lv[i], mg_cand[c->me].lp[i] = lp[i];
    }
    bar(c);
    /* every CPU merges all candidates the same way */
    for (u32 i = 0; i < MG_MM; i++)
        hv[i] = 0.0, lv[i] = 1.0, hp[i] = lp[i] = 0;
    for (u32 cpu = 0; cpu < c->n; cpu++)
        for (u32 i = 0; i < MG_MM; i++) {
            if (mg_cand[cpu].hv[i] > 0.0)
                mg_consider(hv, hp, lv, lp, mg_cand[cpu].hv[i], mg_cand[cpu].hp[i]);
            if (mg_cand[cpu].lv[i] < 1.0)
                mg_consider(hv, hp, lv, lp, mg_cand[cpu].lv[i], mg_cand[cpu].lp[i]);
        }
    mg_zero(c, mg_v, m, 0); /* the ghost planes are filled whole by comm3 */
    for (u32 i = 0; i < MG_MM; i++) {
        u64 p = lp[i] / ((u64)m * m);
        if (p >= lo && p < hi && lv[i] < 1.0)
            mg_v[p][lp[i] % ((u64)m * m)] = -1.0;
    }
    for (u32 i = 0; i < MG_MM; i++) {
        u64 p = hp[i] / ((u64)m * m);
        if (p >= lo && p < hi && hv[i] > 0.0)
            mg_v[p][hp[i] % ((u64)m * m)] = +1.0;
    }
    if (c->corrupt && 1 >= lo && 1 < hi) /* one more charge */
        mg_v[1][m + 1] += 1.0;
    mg_comm3(c, mg_v, m);
}

static void mg_vcycle(struct ctx *c, u32 lt)
{
    for (u32 k = lt; k >= 2; k--)
        mg_rprj3(c, mg_r[k], mg_m[k], mg_r[k - 1], mg_m[k - 1]);
    /* coarsest level: psinv reads only interior points of u and refills
     * its ghost planes, so they need no zeroing (nor a barrier) */
    mg_zero(c, mg_u[1], mg_m[1], 0);
    mg_psinv(c, mg_r[1], mg_u[1], mg_m[1]);
    for (u32 k = 2; k <= lt - 1; k++) {
        mg_zero(c, mg_u[k], mg_m[k], 1); /* interp then adds into each plane its owner zeroed */
        mg_interp(c, mg_u[k - 1], mg_m[k - 1], mg_u[k], mg_m[k]);
        mg_resid(c, mg_u[k], mg_r[k], mg_r[k], mg_m[k]);
        mg_psinv(c, mg_r[k], mg_u[k], mg_m[k]);
    }
    mg_interp(c, mg_u[lt - 1], mg_m[lt - 1], mg_u[lt], mg_m[lt]);
    mg_resid(c, mg_u[lt], mg_v, mg_r[lt], mg_m[lt]);
    mg_psinv(c, mg_r[lt], mg_u[lt], mg_m[lt]);
}

static void mg_run(struct ctx *c)
{
    u32 ci = mg_class(c->cls), nx = mg_classes[ci].nx, lt = mg_classes[ci].lt;
    for (u32 k = 1; k <= lt; k++) {
        mg_m[k] = (nx >> (lt - k)) + 2; /* every CPU writes the same values */
        mg_alloc(c, mg_u[k], mg_m[k]);
        mg_alloc(c, mg_r[k], mg_m[k]);
    }
    mg_alloc(c, mg_v, mg_m[lt]);
    bar(c);
    if (oom)
        return;
    u32 m = mg_m[lt];
    mg_zero(c, mg_u[lt], m, 1);
    mg_zran3(c, ci);
    mg_resid(c, mg_u[lt], mg_v, mg_r[lt], m);
    mg_vcycle(c, lt); /* one untimed iteration, as the specification does */
    mg_resid(c, mg_u[lt], mg_v, mg_r[lt], m);
    mg_zero(c, mg_u[lt], m, 1);
    mg_zran3(c, ci);
    timer_start(c);
    mg_resid(c, mg_u[lt], mg_v, mg_r[lt], m);
    mg_norm2(c, mg_r[lt], m, nx);
    for (u32 it = 1; it <= MG_NIT; it++) {
        mg_vcycle(c, lt);
        mg_resid(c, mg_u[lt], mg_v, mg_r[lt], m);
    }
    f64 rnm2 = mg_norm2(c, mg_r[lt], m, nx);
    timer_stop(c);
    if (c->me == 0) {
        res.got[0] = rnm2;
        res.want[0] = mg_classes[ci].rnm2;
        res.verified = rel_ok(rnm2, res.want[0], 1e-8);
    }
}

/* ---------------------------------------------------------------- */
/* FT: a 3-D heat equation solved spectrally: forward 3-D FFT of a    */
/* random field, then per time step a multiplication by              */
/* exp(-4 alpha pi^2 |k|^2 t) and an inverse 3-D FFT; the checksum of */
/* 1024 scattered elements verified every step (1e-12). The z planes  */
/* are split over the CPUs (FFTs along x and y stay in a plane); the  */
/* FFTs along z take a block of y rows across every plane (the       */
/* transpose, NPB's communication).                                  */

#define FT_NITER 6
#define FT_MAXZ 128
#define FT_FB 16 /* FFTs done at once: one lane each */
#define FT_ALPHA 1.0e-6
#define FT_PI 3.141592653589793238
#define FT_SEED 314159265UL

static const struct { char cls; u32 nx, ny, nz; f64 ref[FT_NITER][2]; } ft_classes[] = {
    { 'S', 64, 64, 64,
      { { 5.546087004964e+02, 4.845363331978e+02 }, { 5.546385409189e+02, 4.865304269511e+02 },
        { 5.546148406171e+02, 4.883910722336e+02 }, { 5.545423607415e+02, 4.901273169046e+02 },
        { 5.544255039624e+02, 4.917475857993e+02 }, { 5.542683411902e+02, 4.932597244941e+02 } } },
    { 'W', 128, 128, 32,
      { { 5.673612178944e+02, 5.293246849175e+02 }, { 5.631436885271e+02, 5.282149986629e+02 },
        { 5.594024089970e+02, 5.270996558037e+02 }, { 5.560698047020e+02, 5.260027904925e+02 },
        { 5.530898991250e+02, 5.249400845633e+02 }, { 5.504159734538e+02, 5.239212247086e+02 } } },
    { 'A', 256, 256, 128,
      { { 5.046735008193e+02, 5.114047905510e+02 }, { 5.059412319734e+02, 5.098809666433e+02 },
        { 5.069376896287e+02, 5.098144042213e+02 }, { 5.077892868474e+02, 5.101336130759e+02 },
        { 5.085233095391e+02, 5.104914655194e+02 }, { 5.091487099959e+02, 5.107917842803e+02 } } },
};

typedef struct { f64 re, im; } cplx;

/* z planes of nx*ny elements, each on its owner's node */
static cplx *ft_u0[FT_MAXZ], *ft_u1[FT_MAXZ];
static f64 *ft_tw[FT_MAXZ];

static u32 ft_class(char cls)
{
    for (u32 i = 0; i < sizeof ft_classes / sizeof ft_classes[0]; i++)
        if (ft_classes[i].cls == cls)
            return i;
    return 0;
}

static u32 ilog2u(u32 n)
{
    u32 l = 0;
    while ((1U << l) < n)
        l++;
    return l;
}

/* sin and cos of x in [0, pi]: x = q pi/2 + r (Cody-Waite, q <= 2),
 * Taylor polynomials on |r| <= pi/4 (an ulp or so) */
static void f_sincos(f64 x, f64 *sn, f64 *cs)
{
    const f64 pio2_hi = 1.57079632673412561417e+00, pio2_lo = 6.07710050650619224932e-11; /* fdlibm */
    /* sin r = r + r^3 S(r^2), cos r = 1 - r^2/2 + r^4 C(r^2): Taylor to r^17 / r^18 */
    static const f64 sc[] = { 1.0 / 355687428096000.0, -1.0 / 1307674368000.0, 1.0 / 6227020800.0,
                              -1.0 / 39916800.0,       1.0 / 362880.0,         -1.0 / 5040.0,
                              1.0 / 120.0,             -1.0 / 6.0 };
    static const f64 cc[] = { -1.0 / 6402373705728000.0, 1.0 / 20922789888000.0, -1.0 / 87178291200.0,
                              1.0 / 479001600.0,         -1.0 / 3628800.0,       1.0 / 40320.0,
                              -1.0 / 720.0,              1.0 / 24.0 };
    s64 q = (s64)(x * 0.63661977236758134308 + 0.5);
    f64 r = (x - (f64)q * pio2_hi) - (f64)q * pio2_lo, r2 = r * r, sp = sc[0], cp = cc[0];
    for (u32 i = 1; i < sizeof sc / sizeof sc[0]; i++)
        sp = sp * r2 + sc[i];
    for (u32 i = 1; i < sizeof cc / sizeof cc[0]; i++)
        cp = cp * r2 + cc[i];
    f64 si = r + r * r2 * sp, co = 1.0 - 0.5 * r2 + r2 * r2 * cp;
    switch (q & 3) {
    case 0: *sn = si, *cs = co; break;
    case 1: *sn = co, *cs = -si; break;
    case 2: *sn = -si, *cs = -co; break;
    default: *sn = -co, *cs = si; break;
    }
}

/* the roots of unity, as NPB's fft_init lays them out: u[ln + i] = e^(i pi i/ln) */
static void ft_roots(cplx *u, u32 n)
{
    u32 m = ilog2u(n), ln = 1;
    for (u32 j = 1; j <= m; j++) {
        f64 t = FT_PI / ln;
        for (u32 i = 0; i < ln; i++) {
            f64 sn, cs;
            f_sincos(i * t, &sn, &cs);
            u[ln + i].re = cs, u[ln + i].im = sn;
        }
        ln *= 2;
    }
}

/* one pass (l) of the Stockham FFT on FT_FB lanes: x -> y */
static void ft_pass(int is, u32 l, u32 m, u32 n, const cplx *u, const cplx *x, cplx *y)
{
    u32 n1 = n / 2, lk = 1U << (l - 1), li = 1U << (m - l), lj = 2 * lk;
    for (u32 i = 0; i < li; i++) {
        u32 i11 = i * lk, i12 = i11 + n1, i21 = i * lj, i22 = i21 + lk;
        f64 ur = u[li + i].re, ui = is >= 1 ? u[li + i].im : -u[li + i].im;
        for (u32 k = 0; k < lk; k++)
            for (u32 j = 0; j < FT_FB; j++) {
                cplx a = x[(i11 + k) * FT_FB + j], b = x[(i12 + k) * FT_FB + j];
                f64 dr = a.re - b.re, di = a.im - b.im;
                y[(i21 + k) * FT_FB + j].re = a.re + b.re;
                y[(i21 + k) * FT_FB + j].im = a.im + b.im;
                y[(i22 + k) * FT_FB + j].re = ur * dr - ui * di;
                y[(i22 + k) * FT_FB + j].im = ur * di + ui * dr;
            }
    }
}

/* FT_FB FFTs of length n = 2^m on x (n rows of FT_FB lanes), y scratch */
static void ft_cfftz(int is, u32 m, u32 n, const cplx *u, cplx *x, cplx *y)
{
    for (u32 l = 1; l <= m; l += 2) {
        ft_pass(is, l, m, n, u, x, y);
        if (l == m) {
            memcpy(x, y, (u64)n * FT_FB * sizeof(cplx));
            break;
        }
        ft_pass(is, l + 1, m, n, u, y, x);
    }
}

/* Claim [p, p + bytes) for writing, a page at a time, with an atomic no-op
 * write: on a DSM a page that another node took is then fetched once,
 * with ownership (one write fault), instead of by a read fault followed
 * by an upgrade fault when the first store comes. Elsewhere it costs a
 * locked instruction per 4 KiB. */
static void claim_w(void *p, u64 bytes)
{
    u64 a = (u64)p & ~4095UL, e = (u64)p + bytes;
    for (; a < e; a += 4096) {
        volatile u64 *w = (volatile u64 *)(a < (u64)p ? (u64)p : a);
        __asm__ volatile("lock orq $0, %0" : "+m"(*w) : : "memory");
    }
}

/* FFTs along x (dir 1) or y (dir 2) of my planes of X, in place */
static void ft_xy(struct ctx *c, u32 ci, int is, int dir, cplx **X, const cplx *u, cplx *y1, cplx *y2)
{
    u32 nx = ft_classes[ci].nx, ny = ft_classes[ci].ny, nz = ft_classes[ci].nz;
    u32 n = dir == 1 ? nx : ny, other = dir == 1 ? ny : nx, m = ilog2u(n);
    u64 lo, hi;
    span(nz, c->me, c->n, &lo, &hi);
    for (u64 k = lo; k < hi; k++) {
        cplx *P = X[k];
        claim_w(P, (u64)nx * ny * sizeof(cplx)); /* parts were with the CPUs doing ft_z */
        for (u32 b = 0; b < other; b += FT_FB) {
            for (u32 t = 0; t < n; t++)
                for (u32 j = 0; j < FT_FB; j++)
                    y1[t * FT_FB + j] = dir == 1 ? P[(b + j) * nx + t] : P[t * nx + b + j];
            ft_cfftz(is, m, n, u, y1, y2);
            for (u32 t = 0; t < n; t++)
                for (u32 j = 0; j < FT_FB; j++) {
                    if (dir == 1)
                        P[(b + j) * nx + t] = y1[t * FT_FB + j];
                    else
                        P[t * nx + b + j] = y1[t * FT_FB + j];
                }
        }
    }
}

/* FFTs along z for my block of y rows, across every plane: X -> Y; a barrier */
static void ft_z(struct ctx *c, u32 ci, int is, cplx **X, cplx **Y, const cplx *u, cplx *y1, cplx *y2)
{
    u32 nx = ft_classes[ci].nx, ny = ft_classes[ci].ny, nz = ft_classes[ci].nz, m = ilog2u(nz);
    u64 lo, hi;
    span(ny, c->me, c->n, &lo, &hi);
    for (u32 k = 0; k < nz && hi > lo; k++) /* my rows of every plane: written below */
        claim_w(&Y[k][lo * nx], (hi - lo) * nx * sizeof(cplx));
    for (u64 j = lo; j < hi; j++)
        for (u32 b = 0; b < nx; b += FT_FB) {
            for (u32 k = 0; k < nz; k++)
                memcpy(&y1[k * FT_FB], &X[k][j * nx + b], FT_FB * sizeof(cplx));
            ft_cfftz(is, m, nz, u, y1, y2);
            for (u32 k = 0; k < nz; k++)
                memcpy(&Y[k][j * nx + b], &y1[k * FT_FB], FT_FB * sizeof(cplx));
        }
    bar(c);
}

/* the twiddles exp(-4 alpha pi^2 (i'^2 + j'^2 + k'^2)) and the initial field
 * of my planes: element (k, j, i) is numbers 2(i + nx j + nx ny k) + 1 and + 2
 * after the seed */
static void ft_init(struct ctx *c, u32 ci)
{
    u32 nx = ft_classes[ci].nx, ny = ft_classes[ci].ny, nz = ft_classes[ci].nz;
    f64 ap = -4.0 * FT_ALPHA * FT_PI * FT_PI;
    u64 lo, hi, an = lcg_pow(NPB_A, 2UL * nx * ny);
    span(nz, c->me, c->n, &lo, &hi);
    for (u64 k = lo; k < hi; k++) {
        s64 kk = (s64)((k + nz / 2) % nz) - nz / 2;
        u64 x = lcg(FT_SEED, lcg_pow(an, k));
        for (u32 j = 0; j < ny; j++) {
            s64 jj = (s64)((j + ny / 2) % ny) - ny / 2, kj2 = jj * jj + kk * kk;
            for (u32 i = 0; i < nx; i++) {
                s64 ii = (s64)((i + nx / 2) % nx) - nx / 2;
                ft_tw[k][j * nx + i] = f_exp(ap * (f64)(ii * ii + kj2));
                x = lcg(x, NPB_A);
                ft_u1[k][j * nx + i].re = (f64)x * R46;
                x = lcg(x, NPB_A);
                ft_u1[k][j * nx + i].im = (f64)x * R46;
            }
        }
        if (k == 0 && c->corrupt) /* one element of the initial field */
            ft_u1[0][0].re += 1.0;
    }
}

static void ft_run(struct ctx *c)
{
    u32 ci = ft_class(c->cls), nx = ft_classes[ci].nx, ny = ft_classes[ci].ny, nz = ft_classes[ci].nz;
    u32 maxd = nx > ny ? nx : ny;
    maxd = maxd > nz ? maxd : nz;
    u64 lo, hi, plane = (u64)nx * ny;
    span(nz, c->me, c->n, &lo, &hi);
    if (hi > lo) {
        cplx *b0 = nalloc(c, c->node, (hi - lo) * plane * sizeof(cplx));
        cplx *b1 = nalloc(c, c->node, (hi - lo) * plane * sizeof(cplx));
        f64 *bt = nalloc(c, c->node, (hi - lo) * plane * 8);
        for (u64 k = lo; k < hi && b0 && b1 && bt; k++) {
            ft_u0[k] = b0 + (k - lo) * plane;
            ft_u1[k] = b1 + (k - lo) * plane;
            ft_tw[k] = bt + (k - lo) * plane;
        }
    }
    cplx *u = nalloc(c, c->node, (u64)(maxd + 1) * sizeof(cplx));
    cplx *y1 = nalloc(c, c->node, (u64)maxd * FT_FB * sizeof(cplx));
    cplx *y2 = nalloc(c, c->node, (u64)maxd * FT_FB * sizeof(cplx));
    bar(c);
    if (oom)
        return;
    /* once untimed, as the specification does: touch everything */
    ft_init(c, ci);
    ft_roots(u, maxd);
    ft_xy(c, ci, 1, 1, ft_u1, u, y1, y2);
    ft_xy(c, ci, 1, 2, ft_u1, u, y1, y2);
    bar(c);
    ft_z(c, ci, 1, ft_u1, ft_u0, u, y1, y2);
    /* the timed run: everything, setup included */
    timer_start(c);
    ft_init(c, ci);
    ft_roots(u, maxd);
    ft_xy(c, ci, 1, 1, ft_u1, u, y1, y2);
    ft_xy(c, ci, 1, 2, ft_u1, u, y1, y2);
    bar(c);
    ft_z(c, ci, 1, ft_u1, ft_u0, u, y1, y2);
    f64 worst = 0;
    for (u32 it = 1; it <= FT_NITER; it++) {
        for (u64 k = lo; k < hi; k++) /* evolve: u0 *= twiddle, u1 = u0 */
            for (u64 e = 0; e < plane; e++) {
                ft_u0[k][e].re = ft_u0[k][e].re * ft_tw[k][e];
                ft_u0[k][e].im = ft_u0[k][e].im * ft_tw[k][e];
                ft_u1[k][e] = ft_u0[k][e];
            }
        bar(c);
        ft_z(c, ci, -1, ft_u1, ft_u1, u, y1, y2);
        ft_xy(c, ci, -1, 2, ft_u1, u, y1, y2);
        ft_xy(c, ci, -1, 1, ft_u1, u, y1, y2);
        /* checksum: elements (5j mod nz, 3j mod ny, j mod nx), j = 1..1024,
         * each added by its plane's owner */
        f64 v[2] = { 0, 0 };
        for (u32 j = 1; j <= 1024; j++) {
            u64 k = (5 * j) % nz;
            if (k >= lo && k < hi) {
                cplx e = ft_u1[k][((3 * j) % ny) * nx + j % nx];
                v[0] += e.re;
                v[1] += e.im;
            }
        }
        allsum(c, v, 2);
        f64 nt = (f64)nx * ny * nz, sr = v[0] / nt, si = v[1] / nt;
        f64 rr = ft_classes[ci].ref[it - 1][0], ri = ft_classes[ci].ref[it - 1][1];
        f64 err = f_sqrt(((sr - rr) * (sr - rr) + (si - ri) * (si - ri)) / (rr * rr + ri * ri));
        if (err > worst || err != err) {
            worst = err;
            if (c->me == 0)
                res.got[0] = sr, res.got[1] = si, res.want[0] = rr, res.want[1] = ri, res.igot = it;
        }
    }
    timer_stop(c);
    if (c->me == 0)
        res.verified = worst <= 1.0e-12;
}

/* ---------------------------------------------------------------- */
/* Entry points (called from general-registers-only code, whose stack */
/* alignment is not what SSE spills assume: realign on the way in)    */

#define ENTRY __attribute__((force_align_arg_pointer))

ENTRY void npb_par(const struct npb_rt *rt, const struct npb_args *a, u32 me)
{
    struct ctx c = { rt, me, rt->ncpu, a->numa_local ? rt->node[me] : 0, a->cls, a->corrupt, 0,
                     NPB_SPIN_US * rt->tsc_khz / 1000 };
    if (c.node < 0)
        c.node = 0;
    /* the sync page is on this CPU's node whatever numa= says: it is
     * the runtime's, not the benchmark's data */
    struct syncpage *mine = nalloc_pub(&c, rt->node[me] < 0 ? 0 : rt->node[me], sizeof *mine);
    if (mine) {
        mine->seq = 0;
        mine->sleeping = 0;
    }
    sp[me] = mine;
    rt->barrier(me);
    if (oom)
        return;
    if (a->kernel == NPB_EP)
        ep_run(&c);
    else if (a->kernel == NPB_IS)
        is_run(&c);
    else if (a->kernel == NPB_CG)
        cg_run(&c);
    else if (a->kernel == NPB_MG)
        mg_run(&c);
    else if (a->kernel == NPB_FT)
        ft_run(&c);
}

static const char *const kname[NPB_NKERNELS] = { "ep", "is", "cg", "mg", "ft" };

/* operations the specification counts for Mop/s */
static f64 npb_ops(const struct npb_args *a)
{
    if (a->kernel == NPB_EP)
        return (f64)(2UL << ep_classes[ep_class(a->cls)].m);
    if (a->kernel == NPB_IS)
        return (f64)IS_ITERS * (f64)(1UL << is_classes[is_class(a->cls)].keys_log2);
    if (a->kernel == NPB_CG) {
        u32 ci = cg_class(a->cls);
        f64 nz = cg_classes[ci].nonzer, nzz = nz * (nz + 1);
        return 2.0 * CG_NITER * cg_classes[ci].na * (3.0 + nzz + 25.0 * (5.0 + nzz) + 3.0);
    }
    if (a->kernel == NPB_FT) {
        u32 ci = ft_class(a->cls);
        f64 nt = (f64)ft_classes[ci].nx * ft_classes[ci].ny * ft_classes[ci].nz, ln = f_log(nt);
        return nt * (14.8157 + 7.19641 * ln + (5.23518 + 7.21113 * ln) * FT_NITER);
    }
    u32 ci = mg_class(a->cls);
    f64 nx = mg_classes[ci].nx;
    return 58.0 * MG_NIT * nx * nx * nx;
}

ENTRY int npb_report(const struct npb_rt *rt, const struct npb_args *a, char *out, u64 n,
                     void (*print)(const char *line))
{
    char line[512], g0[32], g1[32], w0[32], w1[32];
    int ok = !oom && !bad_setup && res.verified;
    u64 us = t_end > t_start ? (t_end - t_start) * 1000 / rt->tsc_khz : 0;
    f64 mops = !oom && !bad_setup && us ? npb_ops(a) / (f64)us : 0.0;
    u64 m100 = (u64)(mops * 100.0 + 0.5);
    snfmt(out, n, "class=%c cpus=%u time_us=%lu mops=%lu.%02lu verified=%s", a->cls, rt->ncpu, us, m100 / 100,
          m100 % 100, ok ? "yes" : "no");
    fmt_e(g0, sizeof g0, res.got[0]);
    fmt_e(g1, sizeof g1, res.got[1]);
    fmt_e(w0, sizeof w0, res.want[0]);
    fmt_e(w1, sizeof w1, res.want[1]);
    if (oom)
        snfmt(line, sizeof line, "dvmm-guest: note: npb.%s class=%c out of memory\n", kname[a->kernel], a->cls);
    else if (bad_setup)
        snfmt(line, sizeof line, "dvmm-guest: note: npb.%s class=%c matrix generation failed\n", kname[a->kernel],
              a->cls);
    else if (a->kernel == NPB_EP)
        snfmt(line, sizeof line, "dvmm-guest: note: npb.ep class=%c sx=%s sy=%s want_sx=%s want_sy=%s pairs=%lu\n",
              a->cls, g0, g1, w0, w1, res.igot);
    else if (a->kernel == NPB_IS)
        snfmt(line, sizeof line, "dvmm-guest: note: npb.is class=%c passed=%lu want_passed=%lu\n", a->cls,
              res.igot, res.iwant);
    else if (a->kernel == NPB_FT)
        snfmt(line, sizeof line, "dvmm-guest: note: npb.ft class=%c step=%lu checksum=%s,%s want=%s,%s\n", a->cls,
              res.igot, g0, g1, w0, w1);
    else
        snfmt(line, sizeof line, "dvmm-guest: note: npb.%s class=%c %s=%s want=%s\n", kname[a->kernel], a->cls,
              a->kernel == NPB_CG ? "zeta" : "rnm2", g0, w0);
    if (!ok)
        print(line);
    oom = 0;
    bad_setup = 0;
    res.verified = 0;
    res.got[0] = res.got[1] = res.want[0] = res.want[1] = 0;
    res.igot = res.iwant = 0;
    t_start = t_end = 0;
    return !ok;
}
