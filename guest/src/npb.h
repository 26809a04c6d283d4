/* The boundary between the CPL3 runtime (user.c, general registers only) and
 * our NAS Parallel Benchmark kernels (npb.c, the one file built with SSE2).
 * Only integers and pointers cross it, so neither side needs the other's
 * register conventions beyond the plain SysV ABI. */
#ifndef NPB_H
#define NPB_H
#include "common.h"

/* What the runtime lends the kernels. */
struct npb_rt {
    u32 ncpu;
    u64 tsc_khz;
    void (*barrier)(u32 me);             /* all CPUs; sleeps when oversubscribed */
    void *(*alloc)(s64 node, u64 size);  /* 4 KiB aligned on that node, 0 if none */
    s32 node[MAX_CPUS];                  /* NUMA node of each CPU (SRAT) */
};

enum { NPB_EP, NPB_IS, NPB_CG, NPB_MG, NPB_FT, NPB_NKERNELS };

/* One run's parameters (the same on every CPU). */
struct npb_args {
    u32 kernel;      /* NPB_EP.. */
    char cls;        /* 'S', 'W' or 'A' */
    u32 numa_local;  /* 1: each CPU's share on its own node; 0: all on node 0 */
    u64 corrupt;     /* non-zero: change one input so verification must fail */
};

/* Runs on every CPU at once; every CPU passes the same barriers. */
void npb_par(const struct npb_rt *rt, const struct npb_args *a, u32 me);
/* CPU 0 afterwards: "class=C cpus=N time_us=T mops=M verified=yes|no" into
 * out (a diagnostic `note:` line is printed through print() on failure).
 * Returns 0 when verified. */
int npb_report(const struct npb_rt *rt, const struct npb_args *a, char *out, u64 n,
               void (*print)(const char *line));

#endif
