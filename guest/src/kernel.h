/* Kernel-only (CPL0) declarations shared by kernel.c and kconform.c. */
#ifndef KERNEL_H
#define KERNEL_H
#include "common.h"

struct trap_frame {
    u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
    u64 vec, err, rip, cs, rflags, rsp, ss;
};

/* The local APIC as the CPU found it before the kernel touched it (an AP:
 * right after INIT-SIPI; the BSP: at kernel entry). Read in the mode the
 * kernel runs the APIC in (x2APIC MSRs or xAPIC MMIO). */
struct apic_snap {
    u32 valid, x2apic;
    u32 id, version, tpr, ppr, ldr, dfr, svr, esr, icr_lo, icr_hi;
    u32 isr_tmr_irr;        /* OR of every ISR, TMR and IRR word */
    u32 lvt[6];             /* timer, thermal, perf, LINT0, LINT1, error */
    u32 tmict, tmcct, tdcr;
    u64 apic_base, tsc_deadline;
};

#define CONFORM_LOG 16
struct cpu {
    u32 apic_id;
    s32 node;
    u32 index;              /* index in cpus[] (MADT order, BSP = 0) */
    u32 rank;               /* dense index among online CPUs */
    volatile u32 state;     /* 0 starting, 1 alive, 2 abandoned */
    u32 pad;
    u64 block;              /* per-CPU memory block */
    u64 ustack_top;
    u64 upage;              /* user per-CPU page (SYS_PERCPU_PAGE) */
    volatile u64 pings, pongs;
    volatile u32 wake_pending;  /* a VEC_WAKE/VEC_PONG arrived while not halted */
    /* conform workload (kconform.c): interrupts on vectors VEC_CONFORM_FIRST..
     * LAST in arrival order with the PPR seen in the handler, NMIs */
    volatile u32 nmis;
    volatile u32 nlog;
    volatile u8 log_vec[CONFORM_LOG];
    volatile u32 log_ppr[CONFORM_LOG];
    volatile u64 log_tsc[CONFORM_LOG];
    volatile u8 log_in_service[CONFORM_LOG]; /* the vector's ISR bit in its handler */
    volatile u32 irq_count[VEC_CONFORM_LAST - VEC_CONFORM_FIRST + 1];
    struct apic_snap snap;
} ALIGNED(4096);            /* one page per CPU: written by its owner only
                             * (pages move between nodes in dvmm) */

/* What the kernel found out about the machine it runs on. */
struct platform {
    int qemu;               /* ACPI OEM ID "BOCHS " (QEMU's tables) */
    int dvmm;               /* ACPI OEM ID "DVMM  " */
    char oem[8];
    int cpl0_emulated;      /* CPL0 code runs ~100x slower than CPL3 (KVM PVM) */
    u32 cpl0_loop_cycles;   /* TSC cycles of one simple CPL0 loop iteration */
    int have_ioapic;
    u32 ioapic_id, ioapic_addr;
};
extern struct platform platform;

/* ---------------------------------------------------------------- */
/* Privileged primitives                                             */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline u64 read_cr2(void)
{
    u64 v;
    __asm__ volatile("mov %%cr2, %0" : "=r"(v));
    return v;
}
static inline struct cpu *this_cpu(void)
{
    u64 sp;
    __asm__ volatile("mov %%rsp, %0" : "=r"(sp));
    return *(struct cpu **)(sp & ~(u64)(KSTACK_SIZE - 1));
}
static inline u32 xchg32(volatile u32 *p, u32 v)
{
    __asm__ volatile("xchgl %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}
static inline u32 cmpxchg32(volatile u32 *p, u32 old, u32 new)
{
    __asm__ volatile("lock cmpxchgl %2, %1" : "+a"(old), "+m"(*p) : "r"(new) : "memory");
    return old;
}
static inline u64 xadd64(volatile u64 *p, u64 v)
{
    __asm__ volatile("lock xaddq %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}

/* ---------------------------------------------------------------- */
/* Local APIC: x2APIC MSRs when available, else xAPIC MMIO           */

#define APIC_BASE_MMIO 0xFEE00000UL
enum {
    APIC_ID = 0x20, APIC_VER = 0x30, APIC_TPR = 0x80, APIC_PPR = 0xA0, APIC_EOI = 0xB0,
    APIC_LDR = 0xD0, APIC_DFR = 0xE0, APIC_SVR = 0xF0, APIC_ISR = 0x100, APIC_TMR = 0x180,
    APIC_IRR = 0x200, APIC_ESR = 0x280, APIC_ICR = 0x300, APIC_ICR_HI = 0x310,
    APIC_LVT_TIMER = 0x320, APIC_LVT_THERMAL = 0x330, APIC_LVT_PERF = 0x340,
    APIC_LVT_LINT0 = 0x350, APIC_LVT_LINT1 = 0x360, APIC_LVT_ERR = 0x370,
    APIC_TMICT = 0x380, APIC_TMCCT = 0x390, APIC_TDCR = 0x3E0,
};
extern u32 use_x2apic;
static inline u32 apic_read(u32 reg)
{
    if (use_x2apic)
        return (u32)rdmsr(0x800 + (reg >> 4));
    return *(volatile u32 *)(APIC_BASE_MMIO + reg);
}
static inline void apic_write(u32 reg, u32 v)
{
    if (use_x2apic)
        wrmsr(0x800 + (reg >> 4), v);
    else
        *(volatile u32 *)(APIC_BASE_MMIO + reg) = v;
}
static inline void apic_eoi(void) { apic_write(APIC_EOI, 0); }

/* kernel.c */
extern u64 tsc_khz;
void apic_init(void);
void apic_send(u32 dest, u32 icr);
u32 apic_self_id(void);
void kprintf(const char *fmt, ...);
void udelay(u64 us);
struct cpu *online_cpu(u32 rank);

/* kconform.c */
void conform_snapshot(struct cpu *c);
void conform_irq(struct cpu *c, u64 vec);
u64 conform_call(struct cpu *c, u64 op, u64 arg, char *out, u64 outlen);
void platform_probe_cpl0(void);

#endif
