/* Shared by kernel (CPL0) and user (CPL3) code. Everything is built with
 * -mgeneral-regs-only: no SSE/AVX in the kernel, so no FPU state to manage (only
 * npb.c, user code, is built with SSE2: each CPU runs one user context). */
#ifndef COMMON_H
#define COMMON_H
#include "layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed char s8;
typedef int s32;
typedef long s64;
typedef unsigned long size_t;
typedef __builtin_va_list va_list;
#define va_start __builtin_va_start
#define va_end __builtin_va_end
#define va_arg __builtin_va_arg
#define NULL ((void *)0)

#define CACHELINE 64
#define ALIGNED(n) __attribute__((aligned(n)))
#define NORETURN __attribute__((noreturn))
#define UNUSED __attribute__((unused))

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* lib.c */
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
int vsnfmt(char *buf, size_t size, const char *fmt, va_list ap);
int snfmt(char *buf, size_t size, const char *fmt, ...);

/* System-call numbers: rax = number, rdi/rsi/rdx = arguments, result in
 * rax; the gate is `int3` through a DPL-3 interrupt gate (vector 3). */
enum {
    SYS_PRINT = 0,        /* (buf, len) -> len */
    SYS_EXIT = 1,         /* (status) -> does not return */
    SYS_BARRIER = 2,      /* () -> 0: all online CPUs */
    SYS_CPUID = 3,        /* () -> this CPU's index 0..ncpus-1 */
    SYS_NCPUS = 4,        /* () -> online CPUs */
    SYS_NNODES = 5,       /* () -> NUMA nodes */
    SYS_NODE_OF_CPU = 6,  /* (cpu) -> node or -1 */
    SYS_NODE_OF_ADDR = 7, /* (addr) -> node or -1 */
    SYS_ALLOC = 8,        /* (node|-1 = mine, size, align) -> addr or 0 */
    SYS_ALLOC_RESET = 9,  /* () -> 0: frees all SYS_ALLOC memory (CPU 0 only) */
    SYS_TIME_NS = 10,     /* () -> ns since boot (TSC based) */
    SYS_TSC_KHZ = 11,     /* () -> TSC frequency in kHz */
    SYS_YIELD = 12,       /* (us) -> 0: halt until an interrupt or us elapsed */
    SYS_IPI_PING = 13,    /* (cpu) -> 0: send a PING IPI, target replies PONG */
    SYS_IPI_COUNTERS = 14,/* (cpu) -> address of {pings, pongs} of cpu */
    SYS_CMDLINE = 15,     /* () -> address of the NUL-terminated command line */
    SYS_INFO = 16,        /* () -> address of struct sysinfo */
    SYS_WAKE = 17,        /* (cpu) -> 0: send a wake-up IPI (ends a SYS_YIELD) */
    SYS_NODE_MEM = 18,    /* (node) -> bytes of RAM on node */
    SYS_PERCPU_PAGE = 19, /* (cpu) -> a 4 KiB page on cpu's node for its user per-CPU state */
    SYS_CONFORM = 20,     /* (op, arg, buf) -> CF_OK/CF_FAIL/CF_SKIP or a value: conform checks at CPL0 */
};

/* SYS_CONFORM operations (kconform.c). The checks write their details (a
 * string of `key=value` words, at most CONFORM_OUT bytes) to buf. */
enum {
    CF_RESET = 0,      /* LAPIC register values after INIT (AP) / power-on (BSP) */
    CF_APIC_BASE = 1,  /* IA32_APIC_BASE: disable/enable, CPUID bit, page, xAPIC masks, relocation */
    CF_X2APIC_GP = 2,  /* x2APIC MSR #GP rules */
    CF_TPR = 3,        /* TPR/CR8 coupling, masking by TPR, priority order, self-IPIs */
    CF_TSC_DEADLINE = 4, /* the TSC-deadline timer, if CPUID advertises it */
    CF_CPUID = 5,      /* CPUID consistency; advertised instructions run at CPL0 */
    CF_NMI_SEND = 6,   /* arg = target rank: NMI IPI -> CF_OK */
    CF_NMI_COUNT = 7,  /* -> NMIs this CPU took */
    CF_IOAPIC = 8,     /* IOAPIC register masks and redirection (COM1 THRE) */
    CF_NCHECKS = 6,    /* checks every CPU runs: CF_RESET..CF_CPUID */
};
enum { CF_OK = 0, CF_FAIL = 1, CF_SKIP = 2 };
#define CONFORM_OUT 640

struct sysinfo {
    u32 ncpus, nnodes;
    u32 x2apic;            /* 1: x2APIC (MSRs), 0: xAPIC (MMIO) */
    u32 boot_failures;     /* APs that did not start */
    u64 tsc_khz;
    const char *tsc_source;
    u64 mem_bytes;
    u64 boot_tsc;          /* TSC at kernel entry */
    u32 apic_id[MAX_CPUS];
    s32 node[MAX_CPUS];
    char boot_errors[256];
    char platform[8];      /* "dvmm", "qemu" or "other" (from the ACPI OEM ID) */
    u32 cpl0_emulated;     /* CPL0 code is emulated (KVM PVM): ~100x slower than CPL3 */
    u32 cpl0_loop_cycles;  /* TSC cycles of one simple CPL0 loop iteration */
};

#endif
