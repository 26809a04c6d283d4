/*
 * dvmm-guest: the CPL0 side of the `conform` workload (SYS_CONFORM).
 *
 * Each check compares what the machine does with what Intel's SDM (and the
 * 82093AA datasheet for the IOAPIC) says, writes `key=value` details to the
 * caller's buffer and returns CF_OK, CF_FAIL or CF_SKIP. A mismatch is named
 * `<check>=<got>,want=<sdm>`. Where QEMU/KVM is known to differ from the SDM
 * the check still expects the SDM, but under QEMU (ACPI OEM ID "BOCHS ") the
 * mismatch is reported as `qemu_deviates:<check>=<got>,sdm=<want>` instead of
 * failing: that is QEMU/KVM's bug, not the guest's. Under dvmm every mismatch
 * fails. (The CPUID hypervisor leaf cannot tell them apart: dvmm passes KVM's
 * "KVMKVMKVM" leaves through; the ACPI tables' OEM ID can.) One exception,
 * the CPUID check's `kvm_pvm_forces:` (counted as `limitations=`): features KVM
 * PVM shows the guest whatever table the VMM sets, see cf_cpuid.
 *
 * The checks run with interrupts off (the int3 system-call gate is an
 * interrupt gate) except where they wait for one of their own interrupts
 * (vectors VEC_CONFORM_FIRST..LAST, logged per CPU by conform_irq). A
 * #GP or #UD they provoke at CPL0 is caught through the exception table
 * (kernel.c's trap()) and returned as vector + 1. Everything here is
 * emulated on KVM PVM hosts (~0.5 us per instruction): keep it short.
 */
#include "kernel.h"

#define EN (1UL << 11)
#define EXTD (1UL << 10)
#define BSP (1UL << 8)
#define GP 14 /* #GP as returned by the *_safe helpers (vector + 1) */
#define UD 7
#define MOVED_APIC_BASE 0xFED40000UL /* where the relocation check moves the page */
#define COM1 0x3F8
#define VEC_LO 0x45 /* TPR test vectors: classes 4, 5, 6 */
#define VEC_MID 0x55
#define VEC_HI 0x65
#define VEC_GP_SELF 0x5A /* a SELF IPI the x2APIC check expects to #GP */
#define VEC_TSCDL 0x4B
#define VEC_IO 0x4C      /* IOAPIC pin 4 (COM1) */
#define IOAPIC_TEST_PIN 10

/* ---------------------------------------------------------------- */
/* Fault-safe primitives                                             */

#define EXTABLE(f, r) ".pushsection .extable, \"a\"\n.balign 8\n.quad " #f ", " #r "\n.popsection\n"

static u64 rdmsr_safe(u32 msr, u64 *val)
{
    u32 lo = 0, hi = 0;
    u64 trap = 0;
    __asm__ volatile("1: rdmsr\n2:\n" EXTABLE(1b, 2b) : "+a"(lo), "+d"(hi), "+S"(trap) : "c"(msr) : "memory");
    if (val)
        *val = ((u64)hi << 32) | lo;
    return trap;
}

static u64 wrmsr_safe(u32 msr, u64 v)
{
    u64 trap = 0;
    __asm__ volatile("1: wrmsr\n2:\n" EXTABLE(1b, 2b)
                     : "+S"(trap)
                     : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32))
                     : "memory");
    return trap;
}

static inline u64 read_cr8(void)
{
    u64 v;
    __asm__ volatile("mov %%cr8, %0" : "=r"(v));
    return v;
}
static inline void write_cr8(u64 v) { __asm__ volatile("mov %0, %%cr8" ::"r"(v) : "memory"); }

static inline u32 mrd(u64 base, u32 reg) { return *(volatile u32 *)(base + reg); }
static inline void mwr(u64 base, u32 reg, u32 v) { *(volatile u32 *)(base + reg) = v; }

static u32 cpuid_reg(u32 leaf, u32 sub, int reg)
{
    u32 r[4];
    cpuid(leaf, sub, &r[0], &r[1], &r[2], &r[3]);
    return r[reg];
}
enum { EAX, EBX, ECX, EDX };
static int cpuid_bit(u32 leaf, u32 sub, int reg, int bit)
{
    if (leaf < 0x80000000 && leaf > cpuid_reg(0, 0, EAX))
        return 0;
    if (leaf >= 0x80000000 && leaf > cpuid_reg(0x80000000, 0, EAX))
        return 0;
    return (cpuid_reg(leaf, sub, reg) >> bit) & 1;
}

/* The initial APIC ID: CPUID 0xB (x2APIC ID) where it exists, else 1:EBX[31:24]. */
static u32 initial_apic_id(void)
{
    if (cpuid_reg(0, 0, EAX) >= 0xB && cpuid_reg(0xB, 0, EBX))
        return cpuid_reg(0xB, 0, EDX);
    return cpuid_reg(1, 0, EBX) >> 24;
}

/* ---------------------------------------------------------------- */
/* Reporting                                                         */

struct out {
    char *buf;
    u64 len, pos;
    u32 checks, failed, deviations, notes;
};

static void outf(struct out *o, const char *fmt, ...)
{
    if (o->pos + 1 >= o->len)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnfmt(o->buf + o->pos, o->len - o->pos, fmt, ap);
    va_end(ap);
    o->pos += n;
    if (o->pos >= o->len)
        o->pos = o->len - 1;
}

/* One SDM requirement. `kvm` marks a requirement QEMU/KVM is known to break. */
static void req(struct out *o, const char *name, int ok, u64 got, u64 want, int kvm)
{
    o->checks++;
    if (ok)
        return;
    if (kvm && platform.qemu) {
        o->deviations++;
        outf(o, " qemu_deviates:%s=0x%lx,sdm=0x%lx", name, got, want);
        return;
    }
    o->failed++;
    outf(o, " %s=0x%lx,want=0x%lx", name, got, want);
}
/* A fault as the *_safe helpers return it (vector + 1). */
static const char *trap_name(u64 t) { return t == 0 ? "none" : t == GP ? "#GP" : t == UD ? "#UD" : "other"; }

/* One requirement on a fault: `want` is 0 (none) or GP. */
static void req_trap(struct out *o, const char *name, u64 got, u64 want, int kvm)
{
    o->checks++;
    if (got == want)
        return;
    if (kvm && platform.qemu) {
        o->deviations++;
        outf(o, " qemu_deviates:%s=%s,sdm=%s", name, trap_name(got), trap_name(want));
        return;
    }
    o->failed++;
    outf(o, " %s=%s,want=%s", name, trap_name(got), trap_name(want));
}
#define REQ_TRAP(o, name, got, want) req_trap(o, name, got, want, 0)

#define REQ(o, name, got, want) do { u64 g_ = (got), w_ = (want); req(o, name, g_ == w_, g_, w_, 0); } while (0)
#define REQ_KVM(o, name, got, want) do { u64 g_ = (got), w_ = (want); req(o, name, g_ == w_, g_, w_, 1); } while (0)

/* ---------------------------------------------------------------- */
/* Interrupt log                                                     */

void conform_irq(struct cpu *c, u64 v)
{
    u32 n = c->nlog;
    if (n < CONFORM_LOG) {
        c->log_vec[n] = (u8)v;
        c->log_ppr[n] = apic_read(APIC_PPR);
        c->log_in_service[n] = (apic_read(APIC_ISR + (v >> 5) * 0x10) >> (v & 31)) & 1;
        c->log_tsc[n] = rdtsc();
    }
    c->nlog = n + 1;
    c->irq_count[v - VEC_CONFORM_FIRST]++;
    apic_eoi();
}

/* Open the interrupt window until `n` conform interrupts are logged or `us`
 * passed. `poll` reads the PPR on every turn: an APIC access, which makes a
 * userspace APIC look at the TPR the guest wrote through CR8 (KVM PVM emulates
 * `mov cr8` without an exit). */
static int wait_irqs(struct cpu *c, u32 n, u64 us, int poll)
{
    u64 end = rdtsc() + us * tsc_khz / 1000;
    __asm__ volatile("sti; nop" ::: "memory");
    while (READ_ONCE(c->nlog) < n && rdtsc() < end) {
        if (poll)
            (void)apic_read(APIC_PPR);
        cpu_relax();
    }
    __asm__ volatile("cli" ::: "memory");
    return READ_ONCE(c->nlog) >= n;
}

static int irr_has(u32 v) { return (apic_read(APIC_IRR + (v >> 5) * 0x10) >> (v & 31)) & 1; }

static void self_ipi_selfreg(u32 v)
{
    if (use_x2apic)
        wrmsr(0x83F, v);
    else
        apic_write(APIC_ICR, 0x40000 | v);
}

/* ---------------------------------------------------------------- */
/* Snapshot of the APIC's reset state                                */

void conform_snapshot(struct cpu *c)
{
    struct apic_snap *s = &c->snap;
    u64 base = rdmsr(0x1B);
    int x2 = (base & EXTD) != 0;
#define RD(reg) (x2 ? (u32)rdmsr(0x800 + ((reg) >> 4)) : mrd(APIC_BASE_MMIO, (reg)))
    s->apic_base = base;
    s->x2apic = x2;
    s->id = RD(APIC_ID);
    s->version = RD(APIC_VER);
    s->tpr = RD(APIC_TPR);
    s->ppr = RD(APIC_PPR);
    s->ldr = RD(APIC_LDR);
    s->dfr = x2 ? 0 : RD(APIC_DFR);
    s->svr = RD(APIC_SVR);
    s->esr = RD(APIC_ESR);
    if (x2) {
        u64 icr = rdmsr(0x830);
        s->icr_lo = (u32)icr;
        s->icr_hi = (u32)(icr >> 32);
    } else {
        s->icr_lo = RD(APIC_ICR);
        s->icr_hi = RD(APIC_ICR_HI);
    }
    u32 any = 0;
    for (u32 i = 0; i < 8; i++)
        any |= RD(APIC_ISR + i * 0x10) | RD(APIC_TMR + i * 0x10) | RD(APIC_IRR + i * 0x10);
    s->isr_tmr_irr = any;
    for (u32 i = 0; i < 6; i++)
        s->lvt[i] = RD(APIC_LVT_TIMER + i * 0x10);
    s->tmict = RD(APIC_TMICT);
    s->tmcct = RD(APIC_TMCCT);
    s->tdcr = RD(APIC_TDCR);
    s->tsc_deadline = cpuid_bit(1, 0, ECX, 24) ? rdmsr(0x6E0) : 0;
#undef RD
    s->valid = 1;
}

/* 11.4.7.1 (power-up) and 11.4.7.3 (INIT: the same, ID and APIC base kept). */
static u64 cf_reset(struct cpu *c, struct out *o)
{
    struct apic_snap *s = &c->snap;
    if (!s->valid) {
        outf(o, "no_snapshot");
        return CF_SKIP;
    }
    if (c->rank == 0 && !platform.dvmm) {
        /* QEMU's firmware (SeaBIOS) programs the BSP's APIC before the
         * kernel runs; the APs were INIT-reset by this kernel. */
        outf(o, "bsp_set_by_firmware");
        return CF_SKIP;
    }
    u32 id = initial_apic_id();
    REQ(o, "id", s->id, s->x2apic ? id : id << 24);
    u32 maxlvt = (s->version >> 16) & 0xFF;
    req(o, "version_integrated", (s->version & 0xFF) >= 0x10 && (s->version & 0xFF) <= 0x15, s->version, 0x14, 0);
    req(o, "version_maxlvt", maxlvt >= 5, maxlvt, 5, 0);
    REQ(o, "tpr", s->tpr, 0);
    REQ(o, "ppr", s->ppr, 0);
    REQ(o, "svr", s->svr, 0xFF);
    REQ(o, "esr", s->esr, 0);
    REQ(o, "icr", ((u64)s->icr_hi << 32) | s->icr_lo, 0);
    REQ(o, "isr_tmr_irr", s->isr_tmr_irr, 0);
    REQ(o, "ldr", s->ldr, s->x2apic ? ((id >> 4) << 16) | (1U << (id & 15)) : 0);
    if (!s->x2apic)
        REQ(o, "dfr", s->dfr, 0xFFFFFFFF);
    static const char *const lvt_name[6] = { "lvt_timer", "lvt_thermal", "lvt_perf", "lvt_lint0", "lvt_lint1",
                                             "lvt_error" };
    for (u32 i = 0; i < 6; i++)
        REQ(o, lvt_name[i], s->lvt[i], 0x10000);
    REQ(o, "tmict", s->tmict, 0);
    REQ(o, "tmcct", s->tmcct, 0);
    REQ(o, "tdcr", s->tdcr, 0);
    REQ(o, "tsc_deadline", s->tsc_deadline, 0);
    REQ(o, "base_addr", s->apic_base & ~0xFFFUL, APIC_BASE_MMIO);
    REQ(o, "base_enabled", (s->apic_base & EN) != 0, 1);
    REQ(o, "base_bsp", (s->apic_base & BSP) != 0, c->rank == 0);
    outf(o, " state=%s", c->rank ? "init" : "power_on");
    return CF_OK;
}

/* ---------------------------------------------------------------- */
/* IA32_APIC_BASE: global disable/enable, CPUID.1:EDX[9], the xAPIC page, */
/* xAPIC writable masks, relocation (SDM 11.4.3, 11.4.4, 11.12.5)       */

static void xapic_masks(struct out *o, u64 m)
{
    int tscdl = cpuid_bit(1, 0, ECX, 24);
    /* KVM lets the guest write LVT delivery status (bit 12) and the LINT
     * pins' remote IRR (bit 14), which are read-only (SDM 11.5.1). */
    static const struct { u32 reg; const char *name; u32 want, kvm_extra; } t[] = {
        { APIC_TPR, "mask_tpr", 0xFF, 0 },
        { APIC_LDR, "mask_ldr", 0xFF000000, 0 },
        { APIC_LVT_TIMER, "mask_lvt_timer", 0x100FF, 1 << 12 },
        { APIC_LVT_THERMAL, "mask_lvt_thermal", 0x107FF, 1 << 12 },
        { APIC_LVT_PERF, "mask_lvt_perf", 0x107FF, 1 << 12 },
        { APIC_LVT_LINT0, "mask_lvt_lint0", 0x1A7FF, (1 << 12) | (1 << 14) },
        { APIC_LVT_LINT1, "mask_lvt_lint1", 0x1A7FF, (1 << 12) | (1 << 14) },
        { APIC_LVT_ERR, "mask_lvt_error", 0x100FF, 1 << 12 },
        { APIC_TDCR, "mask_tdcr", 0xB, 0 },
        { APIC_ICR_HI, "mask_icr_hi", 0xFF000000, 0 },
    };
    for (u32 i = 0; i < sizeof t / sizeof t[0]; i++) {
        u32 want = t[i].want;
        if (t[i].reg == APIC_LVT_TIMER) /* timer mode: bit 18 only with TSC-deadline */
            want |= tscdl ? 0x60000 : 0x20000;
        mwr(m, t[i].reg, 0xFFFFFFFF);
        u32 r = mrd(m, t[i].reg);
        req(o, t[i].name, r == want, r, want, t[i].kvm_extra && r == (want | t[i].kvm_extra));
    }
    mwr(m, APIC_SVR, 0xFFFFFFFF);
    u32 svr = mrd(m, APIC_SVR);
    /* vector 7:0, enable 8, focus 9; bit 12 only with directed EOI (version bit 24) */
    u32 svr_max = 0x3FF | (mrd(m, APIC_VER) & (1 << 24) ? 0x1000 : 0);
    req(o, "mask_svr", (svr & 0x1FF) == 0x1FF && !(svr & ~svr_max), svr, svr_max, 0);
    mwr(m, APIC_DFR, 0);
    REQ(o, "mask_dfr", mrd(m, APIC_DFR), 0x0FFFFFFF);
    mwr(m, APIC_DFR, 0xFFFFFFFF);
    REQ(o, "dfr_flat", mrd(m, APIC_DFR), 0xFFFFFFFF);
    /* back to sane values */
    mwr(m, APIC_SVR, 0x100 | VEC_SPURIOUS);
    mwr(m, APIC_TPR, 0);
    mwr(m, APIC_LDR, 0);
    mwr(m, APIC_ICR_HI, 0);
    for (u32 r = APIC_LVT_TIMER; r <= APIC_LVT_ERR; r += 0x10)
        mwr(m, r, 0x10000);
    /* read-only registers ignore writes */
    u32 ver = mrd(m, APIC_VER);
    mwr(m, APIC_VER, 0);
    REQ(o, "version_read_only", mrd(m, APIC_VER), ver);
    mwr(m, APIC_PPR, 0xF0);
    REQ(o, "ppr_read_only", mrd(m, APIC_PPR), 0);
    mwr(m, APIC_ISR + 0x70, 0xFFFFFFFF);
    REQ(o, "isr_read_only", mrd(m, APIC_ISR + 0x70), 0);
    /* an access to a reserved offset sets ESR bit 7 (illegal register
     * address; the value read is undefined) */
    mwr(m, APIC_ESR, 0);
    (void)mrd(m, 0x40);
    mwr(m, APIC_ESR, 0);
    u32 esr = mrd(m, APIC_ESR);
    req(o, "esr_illegal_register", esr == 0x80, esr, 0x80, esr == 0);
    mwr(m, APIC_ESR, 0);
    REQ(o, "esr_cleared", mrd(m, APIC_ESR), 0);
}

static u64 cf_apic_base(struct cpu *c, struct out *o)
{
    u64 base0 = rdmsr(0x1B), v = 0;
    u32 id = initial_apic_id();
    int x2 = use_x2apic;
    REQ(o, "base_addr", base0 & ~0xFFFUL, APIC_BASE_MMIO);
    REQ(o, "base_enabled", (base0 & EN) != 0, 1);
    REQ(o, "base_x2apic", (base0 & EXTD) != 0, (u64)x2);
    REQ(o, "base_bsp", (base0 & BSP) != 0, c->rank == 0);
    REQ(o, "cpuid_apic_enabled", cpuid_bit(1, 0, EDX, 9), 1);
    u32 ver = apic_read(APIC_VER);
    if (x2) {
        /* x2APIC mode: the xAPIC page does not decode (11.12.1) */
        REQ(o, "x2apic_page_reads_ones", mrd(APIC_BASE_MMIO, APIC_VER), 0xFFFFFFFF);
        u32 tpr = apic_read(APIC_TPR);
        mwr(APIC_BASE_MMIO, APIC_TPR, 0x30);
        REQ(o, "x2apic_page_drops_writes", apic_read(APIC_TPR), tpr);
        REQ_TRAP(o, "x2apic_to_xapic_gp", wrmsr_safe(0x1B, base0 & ~EXTD), GP); /* 11.12.5 */
    }
    REQ_TRAP(o, "base_reserved_bit0_gp", wrmsr_safe(0x1B, base0 | 1), GP);
    REQ_TRAP(o, "base_reserved_bit9_gp", wrmsr_safe(0x1B, base0 | (1 << 9)), GP);
    REQ_TRAP(o, "base_reserved_bit63_gp", wrmsr_safe(0x1B, base0 | (1UL << 63)), GP);
    REQ(o, "base_unchanged", rdmsr(0x1B), base0);

    /* globally disabled: no APIC at all (11.4.3) */
    u64 off = base0 & ~(EN | EXTD);
    REQ_TRAP(o, "disable", wrmsr_safe(0x1B, off), 0);
    REQ(o, "disabled_base", rdmsr(0x1B), off);
    REQ(o, "cpuid_apic_disabled", cpuid_bit(1, 0, EDX, 9), 0);
    REQ(o, "disabled_page_reads_ones", mrd(APIC_BASE_MMIO, APIC_VER), 0xFFFFFFFF);
    mwr(APIC_BASE_MMIO, APIC_TPR, 0x40);
    REQ(o, "disabled_page_drops_writes", mrd(APIC_BASE_MMIO, APIC_TPR), 0xFFFFFFFF);
    REQ_TRAP(o, "disabled_x2apic_msr_gp", rdmsr_safe(0x808, &v), GP);
    REQ_TRAP(o, "disabled_to_x2apic_gp", wrmsr_safe(0x1B, off | EN | EXTD), GP);
    write_cr8(5);
    REQ(o, "disabled_cr8", read_cr8(), 5);
    write_cr8(0);

    /* xAPIC mode at the default base */
    u64 xa = off | EN;
    REQ_TRAP(o, "enable_xapic", wrmsr_safe(0x1B, xa), 0);
    REQ(o, "cpuid_apic_reenabled", cpuid_bit(1, 0, EDX, 9), 1);
    u64 m = APIC_BASE_MMIO;
    if (id < 255)
        REQ(o, "xapic_id", mrd(m, APIC_ID) >> 24, id);
    REQ(o, "xapic_version", mrd(m, APIC_VER), ver);
    REQ_TRAP(o, "xapic_x2apic_msr_gp", rdmsr_safe(0x808, &v), GP);
    xapic_masks(o, m);

    /* relocation (11.4.4) */
    u64 moved = (xa & 0xFFF) | MOVED_APIC_BASE;
    REQ_TRAP(o, "relocate", wrmsr_safe(0x1B, moved), 0);
    REQ(o, "relocated_base", rdmsr(0x1B), moved);
    REQ(o, "relocated_version", mrd(MOVED_APIC_BASE, APIC_VER), ver);
    if (id < 255)
        REQ(o, "relocated_id", mrd(MOVED_APIC_BASE, APIC_ID) >> 24, id);
    REQ(o, "old_page_reads_ones", mrd(APIC_BASE_MMIO, APIC_VER), 0xFFFFFFFF);
    mwr(MOVED_APIC_BASE, APIC_TPR, 0x20);
    REQ(o, "relocated_tpr", mrd(MOVED_APIC_BASE, APIC_TPR), 0x20);
    REQ(o, "relocated_tpr_cr8", read_cr8(), 2);
    mwr(MOVED_APIC_BASE, APIC_TPR, 0);
    REQ_TRAP(o, "relocate_back", wrmsr_safe(0x1B, xa), 0);
    REQ(o, "home_version", mrd(APIC_BASE_MMIO, APIC_VER), ver);

    if (x2) {
        REQ_TRAP(o, "enable_x2apic", wrmsr_safe(0x1B, base0), 0);
        REQ(o, "x2apic_base", rdmsr(0x1B), base0);
        REQ(o, "x2apic_id", apic_read(APIC_ID), id);
        REQ(o, "x2apic_ldr", apic_read(APIC_LDR), ((id >> 4) << 16) | (1U << (id & 15)));
        REQ(o, "x2apic_page_reads_ones_again", mrd(APIC_BASE_MMIO, APIC_VER), 0xFFFFFFFF);
    }
    /* what the rest of the kernel expects */
    apic_init();
    for (u32 r = APIC_LVT_THERMAL; r <= APIC_LVT_ERR; r += 0x10)
        apic_write(r, 0x10000);
    return CF_OK;
}

/* ---------------------------------------------------------------- */
/* x2APIC MSR #GP rules (SDM 11.12.1.2, 11.12.1.3, 11.12.11)          */

static u64 cf_x2apic_gp(struct cpu *c, struct out *o)
{
    if (!use_x2apic) {
        outf(o, "no_x2apic");
        return CF_SKIP;
    }
    c->nlog = 0;
    static const struct { u32 msr; u8 write, gp, kvm; u64 val; const char *name; } t[] = {
        { 0x80B, 0, 1, 0, 0, "rd_eoi" },            /* write-only */
        { 0x83F, 0, 1, 0, 0, "rd_self_ipi" },       /* write-only */
        { 0x809, 0, 1, 0, 0, "rd_apr" },            /* not in x2APIC mode */
        { 0x80C, 0, 1, 0, 0, "rd_rrd" },
        { 0x80E, 0, 1, 0, 0, "rd_dfr" },
        { 0x831, 0, 1, 0, 0, "rd_icr_hi" },
        { 0x804, 0, 1, 0, 0, "rd_reserved_804" },
        { 0x840, 0, 1, 0, 0, "rd_reserved_840" },
        { 0x802, 1, 1, 0, 0, "wr_id" },             /* read-only */
        { 0x803, 1, 1, 0, 0, "wr_version" },
        { 0x80A, 1, 1, 0, 0, "wr_ppr" },
        { 0x80D, 1, 1, 0, 0, "wr_ldr" },
        { 0x810, 1, 1, 0, 0, "wr_isr" },
        { 0x839, 1, 1, 0, 0, "wr_tmcct" },
        { 0x808, 1, 1, 0, 1UL << 32, "wr_tpr_bit32" }, /* bits 63:32 reserved */
        { 0x83F, 1, 1, 0, 0x100 | VEC_GP_SELF, "wr_self_ipi_bit8" }, /* bits 31:8 reserved */
        { 0x83F, 1, 1, 0, (1UL << 32) | VEC_GP_SELF, "wr_self_ipi_bit32" },
        { 0x80B, 1, 1, 1, 1, "wr_eoi_nonzero" },    /* EOI takes 0 only */
        { 0x828, 1, 1, 0, 1, "wr_esr_nonzero" },    /* ESR takes 0 only */
        { 0x808, 0, 0, 0, 0, "rd_tpr" },
        { 0x830, 0, 0, 0, 0, "rd_icr" },
        { 0x80B, 1, 0, 0, 0, "wr_eoi_zero" },
        { 0x828, 1, 0, 0, 0, "wr_esr_zero" },
    };
    for (u32 i = 0; i < sizeof t / sizeof t[0]; i++) {
        u64 v, trap = t[i].write ? wrmsr_safe(t[i].msr, t[i].val) : rdmsr_safe(t[i].msr, &v);
        req_trap(o, t[i].name, trap, t[i].gp ? GP : 0, t[i].kvm);
    }
    /* a SELF IPI accepted despite reserved bits would arrive now: drop it */
    wait_irqs(c, 1, 1000, 1);
    c->nlog = 0;
    return CF_OK;
}

/* ---------------------------------------------------------------- */
/* TPR, CR8, PPR, masking by priority, self IPIs (11.8.3, 11.8.6, 10.8.6) */

static u64 cf_tpr(struct cpu *c, struct out *o)
{
    u32 id = apic_self_id();
    apic_write(APIC_TPR, 0x50);
    REQ(o, "cr8_from_tpr", read_cr8(), 5);
    apic_write(APIC_TPR, 0x5F);
    /* KVM's in-kernel LAPIC (QEMU) loses the sub-class when a VM exit falls
     * between the write and the read (it syncs TPR from CR8, class only: seen
     * under host load); dvmm's LAPIC must keep it. */
    REQ_KVM(o, "tpr_subclass", apic_read(APIC_TPR), 0x5F);
    REQ(o, "cr8_class_only", read_cr8(), 5);
    write_cr8(0xA);
    REQ(o, "tpr_from_cr8", apic_read(APIC_TPR), 0xA0);
    REQ(o, "ppr_follows_tpr", apic_read(APIC_PPR), 0xA0);
    write_cr8(0);
    REQ(o, "tpr_zero", apic_read(APIC_TPR), 0);

    /* Three self IPIs, one of each kind, while TPR = 0x50 and IF = 0. */
    c->nlog = 0;
    apic_write(APIC_TPR, 0x50);
    self_ipi_selfreg(VEC_LO);                         /* SELF IPI register (xAPIC: ICR shorthand) */
    apic_write(APIC_ICR, 0x40000 | VEC_MID);          /* ICR, destination shorthand "self" */
    apic_send(id, VEC_HI);                            /* ICR, physical destination = own ID */
    REQ(o, "irr_pending", irr_has(VEC_LO) | irr_has(VEC_MID) << 1 | irr_has(VEC_HI) << 2, 7);
    /* Only a class above the TPR's is delivered. */
    wait_irqs(c, 1, 500000, 1);
    wait_irqs(c, 2, 2000, 1); /* and nothing else follows */
    REQ(o, "tpr50_delivers", c->nlog == 1 ? c->log_vec[0] : 0x100 | c->nlog, VEC_HI);
    /* In its handler the vector is in service (ISR) and PPR = max(TPR, its
     * class) (11.8.3.1, 11.8.4). KVM's in-kernel LAPIC on the PVM host here
     * shows the ISR bit clear and PPR = TPR inside the handler. */
    REQ_KVM(o, "isr_in_handler", c->log_in_service[0], 1);
    REQ_KVM(o, "ppr_in_handler", c->log_ppr[0], VEC_HI & 0xF0);
    REQ(o, "tpr50_masks", irr_has(VEC_LO) | irr_has(VEC_MID) << 1, 3);
    /* Lowering the TPR through CR8 unmasks class 5, then class 4. */
    write_cr8(4);
    wait_irqs(c, 2, 500000, 1);
    wait_irqs(c, 3, 2000, 1);
    REQ(o, "cr8_4_delivers", c->nlog == 2 ? c->log_vec[1] : 0x100 | c->nlog, VEC_MID);
    write_cr8(0);
    wait_irqs(c, 3, 500000, 1);
    REQ(o, "cr8_0_delivers", c->nlog == 3 ? c->log_vec[2] : 0x100 | c->nlog, VEC_LO);
    /* Several pending at TPR 0: highest vector first. */
    c->nlog = 0;
    self_ipi_selfreg(0x4A);
    self_ipi_selfreg(0x7A);
    self_ipi_selfreg(0x6A);
    wait_irqs(c, 3, 500000, 1);
    u64 order = (u64)c->log_vec[0] << 16 | c->log_vec[1] << 8 | c->log_vec[2];
    REQ(o, "priority_order", c->nlog == 3 ? order : c->nlog, 0x7A6A4AUL);
    u32 isr = 0;
    for (u32 i = 0; i < 8; i++)
        isr |= apic_read(APIC_ISR + i * 0x10);
    REQ(o, "isr_empty_after_eoi", isr, 0);
    c->nlog = 0;
    return CF_OK;
}

/* ---------------------------------------------------------------- */
/* TSC-deadline timer (11.5.4.1)                                     */

static u64 cf_tsc_deadline(struct cpu *c, struct out *o)
{
    if (!cpuid_bit(1, 0, ECX, 24)) {
        outf(o, "not_advertised");
        return CF_SKIP;
    }
    c->nlog = 0;
    apic_write(APIC_LVT_TIMER, 0x40000 | VEC_TSCDL);
    REQ(o, "lvt_mode", (apic_read(APIC_LVT_TIMER) >> 17) & 3, 2);
    u64 dl = rdtsc() + tsc_khz * 2; /* +2 ms */
    wrmsr(0x6E0, dl);
    REQ(o, "armed", rdmsr(0x6E0), dl);
    wait_irqs(c, 1, 500000, 0);
    REQ(o, "fired", c->nlog >= 1 ? c->log_vec[0] : 0, VEC_TSCDL);
    req(o, "not_early", c->log_tsc[0] >= dl, c->log_tsc[0], dl, 0);
    REQ(o, "msr_cleared", rdmsr(0x6E0), 0);
    /* writing 0 disarms: armed 20 ms ahead, disarmed, nothing by 25 ms (a
     * try where the disarm itself came too late, the vCPU having been
     * descheduled, does not count) */
    u32 fired = 0, tries = 0;
    for (; tries < 3; tries++) {
        c->nlog = 0;
        dl = rdtsc() + 20 * tsc_khz;
        wrmsr(0x6E0, dl);
        wrmsr(0x6E0, 0);
        if (rdtsc() >= dl)
            continue;
        wait_irqs(c, 1, 25000, 0);
        fired = c->nlog;
        break;
    }
    req(o, "zero_disarms", tries < 3 && !fired, fired, 0, 0);
    apic_write(APIC_LVT_TIMER, VEC_TIMER);
    apic_write(APIC_TMICT, 0);
    c->nlog = 0;
    return CF_OK;
}

/* ---------------------------------------------------------------- */
/* CPUID: consistency, and what is advertised runs at CPL0            */

static u64 p_cmov(void) { u64 t = 0, x = 0; __asm__ volatile("1: cmp $0, %1; cmovz %1, %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "+r"(x)); return t; }
static u64 p_clflush(void) { u64 t = 0; __asm__ volatile("1: clflush (%%rsp)\n2:\n" EXTABLE(1b, 2b) : "+S"(t) :: "memory"); return t; }
static u64 p_fxsr(void)
{
    static u8 area[512] ALIGNED(64);
    u64 t = 0;
    __asm__ volatile("1: fxsave64 %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "+m"(area) :: "memory");
    return t;
}
static u64 p_sse2(void) { u64 t = 0; __asm__ volatile("1: lfence; mfence\n2:\n" EXTABLE(1b, 2b) : "+S"(t) :: "memory"); return t; }
static u64 p_cx16(void)
{
    static u64 m[2] ALIGNED(16);
    u64 t = 0, lo = 0, hi = 0;
    __asm__ volatile("1: lock cmpxchg16b %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "+m"(*(u64(*)[2])m), "+a"(lo), "+d"(hi) : "b"(0UL), "c"(0UL) : "memory");
    return t;
}
static u64 p_crc32(void) { u64 t = 0, x = 0; __asm__ volatile("1: crc32q %1, %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "+r"(x)); return t; }
static u64 p_movbe(void) { u64 t = 0, x = 0; __asm__ volatile("1: movbe (%%rsp), %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "=r"(x) :: "memory"); return t; }
static u64 p_popcnt(void) { u64 t = 0, x = 3; __asm__ volatile("1: popcnt %1, %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "+r"(x)); return t; }
static u64 p_rdrand(void) { u64 t = 0, x; __asm__ volatile("1: rdrand %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "=r"(x) :: "cc"); return t; }
static u64 p_rdseed(void) { u64 t = 0, x; __asm__ volatile("1: rdseed %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "=r"(x) :: "cc"); return t; }
static u64 p_andn(void) { u64 t = 0, x = 1; __asm__ volatile("1: andn %1, %1, %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "+r"(x)); return t; }
static u64 p_pdep(void) { u64 t = 0, x = 1; __asm__ volatile("1: pdep %1, %1, %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "+r"(x)); return t; }
static u64 p_adx(void) { u64 t = 0, x = 1; __asm__ volatile("1: adcx %1, %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "+r"(x) :: "cc"); return t; }
static u64 p_smap(void) { u64 t = 0; __asm__ volatile("1: stac; clac\n2:\n" EXTABLE(1b, 2b) : "+S"(t) :: "cc"); return t; }
static u64 p_clflushopt(void) { u64 t = 0; __asm__ volatile("1: clflushopt (%%rsp)\n2:\n" EXTABLE(1b, 2b) : "+S"(t) :: "memory"); return t; }
static u64 p_clwb(void) { u64 t = 0; __asm__ volatile("1: clwb (%%rsp)\n2:\n" EXTABLE(1b, 2b) : "+S"(t) :: "memory"); return t; }
static u64 p_serialize(void) { u64 t = 0; __asm__ volatile("1: .byte 0x0f, 0x01, 0xe8\n2:\n" EXTABLE(1b, 2b) : "+S"(t) :: "memory"); return t; }
static u64 p_rdpid(void) { u64 t = 0, x; __asm__ volatile("1: rdpid %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "=r"(x)); return t; }
static u64 p_lahf(void) { u64 t = 0; __asm__ volatile("1: lahf; sahf\n2:\n" EXTABLE(1b, 2b) : "+S"(t) :: "rax", "cc"); return t; }
static u64 p_lzcnt(void) { u64 t = 0, x = 1; __asm__ volatile("1: lzcnt %1, %1\n2:\n" EXTABLE(1b, 2b) : "+S"(t), "+r"(x) :: "cc"); return t; }
static u64 p_prefetchw(void) { u64 t = 0; __asm__ volatile("1: prefetchw (%%rsp)\n2:\n" EXTABLE(1b, 2b) : "+S"(t) :: "memory"); return t; }
static u64 p_rdtscp(void) { u64 t = 0; __asm__ volatile("1: rdtscp\n2:\n" EXTABLE(1b, 2b) : "+S"(t) :: "rax", "rdx", "rcx"); return t; }

/* Instructions a kernel runs at CPL0 once CPUID advertises them. `refused`:
 * KVM's instruction emulator refuses it (emulation failure, or #UD for
 * movbe), probed on a KVM PVM host (6.18), where every CPL0 instruction
 * goes through that emulator; running one there would crash the VM, so it
 * is not run where CPL0 is emulated. `forced`: KVM PVM shows it to the guest
 * whatever CPUID table the VMM sets (dvmm's `baseline` model removes it and
 * warns that KVM put it back). */
static const struct probe {
    const char *name;
    u32 leaf, sub;
    u8 reg, bit, refused, forced;
    u64 (*run)(void);
} probes[] = {
    { "cmov", 1, 0, EDX, 15, 0, 0, p_cmov },
    { "clflush", 1, 0, EDX, 19, 0, 0, p_clflush },
    { "fxsr", 1, 0, EDX, 24, 0, 0, p_fxsr },
    { "sse2", 1, 0, EDX, 26, 0, 0, p_sse2 },
    { "cx16", 1, 0, ECX, 13, 1, 0, p_cx16 },
    { "sse4.2", 1, 0, ECX, 20, 1, 1, p_crc32 },
    { "movbe", 1, 0, ECX, 22, 1, 1, p_movbe },
    { "popcnt", 1, 0, ECX, 23, 1, 1, p_popcnt },
    { "rdrand", 1, 0, ECX, 30, 0, 0, p_rdrand },
    { "bmi1", 7, 0, EBX, 3, 1, 1, p_andn },
    { "bmi2", 7, 0, EBX, 8, 1, 1, p_pdep },
    { "rdseed", 7, 0, EBX, 18, 0, 0, p_rdseed },
    { "adx", 7, 0, EBX, 19, 1, 1, p_adx },
    { "smap", 7, 0, EBX, 20, 1, 1, p_smap },
    { "clflushopt", 7, 0, EBX, 23, 0, 0, p_clflushopt },
    { "clwb", 7, 0, EBX, 24, 1, 1, p_clwb },
    { "rdpid", 7, 0, ECX, 22, 1, 0, p_rdpid },
    { "serialize", 7, 0, EDX, 14, 0, 0, p_serialize },
    { "lahf_lm", 0x80000001, 0, ECX, 0, 0, 0, p_lahf },
    { "lzcnt", 0x80000001, 0, ECX, 5, 0, 0, p_lzcnt },
    { "prefetchw", 0x80000001, 0, ECX, 8, 0, 0, p_prefetchw },
    { "rdtscp", 0x80000001, 0, EDX, 27, 1, 0, p_rdtscp },
};

static u64 cf_cpuid(struct cpu *c, struct out *o)
{
    u32 id = initial_apic_id();
    u32 a, b, cx, d;
    cpuid(1, 0, &a, &b, &cx, &d);
    if (id < 255)
        REQ(o, "initial_apic_id", b >> 24, id);
    REQ(o, "apic_id_register", apic_self_id(), id);
    REQ(o, "apic_bit", (d >> 9) & 1, 1);
    REQ(o, "hypervisor_bit", (cx >> 31) & 1, 1);
    REQ(o, "x2apic_bit_is_the_mode", (cx >> 21) & 1, use_x2apic);
    char ran[256], skipped[256];
    u32 nran = 0, nskip = 0;
    ran[0] = skipped[0] = 0;
    for (u32 i = 0; i < sizeof probes / sizeof probes[0]; i++) {
        const struct probe *p = &probes[i];
        if (!cpuid_bit(p->leaf, p->sub, p->reg, p->bit))
            continue;
        if (platform.cpl0_emulated && p->refused) {
            /* advertised, but this host's CPL0 emulator would end the VM */
            nskip += snfmt(skipped + nskip, sizeof skipped - nskip, "%s%s", nskip ? "," : "", p->name);
            if (platform.qemu) {
                o->checks++, o->deviations++;
                outf(o, " qemu_deviates:advertises_%s_refused_at_cpl0", p->name);
            } else if (p->forced) {
                o->checks++, o->notes++;
                outf(o, " kvm_pvm_forces:%s", p->name);
            } else {
                o->checks++, o->failed++;
                outf(o, " advertised_but_refused_at_cpl0:%s", p->name);
            }
            continue;
        }
        req_trap(o, p->name, p->run(), 0, 0);
        nran += snfmt(ran + nran, sizeof ran - nran, "%s%s", nran ? "," : "", p->name);
    }
    outf(o, " ran_at_cpl0=%s", nran ? ran : "-");
    if (nskip)
        outf(o, " not_run=%s", skipped);
    return CF_OK;
}

/* ---------------------------------------------------------------- */
/* IOAPIC (82093AA): register masks and redirection                   */

static u64 ioapic_base;
static u32 io_rd(u32 idx)
{
    *(volatile u32 *)ioapic_base = idx;
    return *(volatile u32 *)(ioapic_base + 0x10);
}
static void io_wr(u32 idx, u32 v)
{
    *(volatile u32 *)ioapic_base = idx;
    *(volatile u32 *)(ioapic_base + 0x10) = v;
}

static u64 cf_ioapic(struct cpu *c, struct out *o)
{
    if (!platform.have_ioapic) {
        outf(o, "no_ioapic_in_madt");
        return CF_SKIP;
    }
    ioapic_base = platform.ioapic_addr;
    u32 id = io_rd(0);
    REQ(o, "id_is_madt_id", (id >> 24) & 0xF, platform.ioapic_id);
    REQ(o, "madt_id_fits", platform.ioapic_id <= 15, 1);
    REQ(o, "id_reserved_zero", id & ~0x0F000000U, 0);
    io_wr(0, 0xFFFFFFFF);
    REQ(o, "id_writable_bits", io_rd(0), 0x0F000000);
    io_wr(0, id);
    REQ(o, "id_restored", io_rd(0), id);
    u32 ver = io_rd(1);
    req(o, "version", ((ver & 0xFF) == 0x11 || (ver & 0xFF) == 0x20) && ((ver >> 16) & 0xFF) >= 23, ver, 0x170020,
        0);
    io_wr(1, 0);
    REQ(o, "version_read_only", io_rd(1), ver);
    u32 arb = io_rd(2);
    io_wr(2, 0);
    REQ(o, "arbitration_read_only", io_rd(2), arb);
    /* redirection entry masks, on a pin no device uses */
    u32 lo_i = 0x10 + 2 * IOAPIC_TEST_PIN, hi_i = lo_i + 1;
    u32 lo = io_rd(lo_i), hi = io_rd(hi_i);
    io_wr(lo_i, 0xFFFFFFFF); /* masked: nothing is delivered */
    /* delivery status and remote IRR are read-only, 31:17 reserved (KVM keeps
     * the reserved bits) */
    u32 l = io_rd(lo_i);
    req(o, "rte_low_mask", l == 0x1AFFF, l, 0x1AFFF, l == 0xFFFFAFFF);
    io_wr(hi_i, 0xFFFFFFFF);
    u32 h = io_rd(hi_i);
    REQ(o, "rte_destination", h >> 24, 0xFF);
    /* 55:32 are reserved in the 82093AA (55:48 is the "extended destination
     * ID" some hypervisors define: either way) */
    REQ_KVM(o, "rte_reserved_zero", h & 0xFFFF, 0);
    io_wr(lo_i, lo);
    io_wr(hi_i, hi);
    REQ(o, "rte_restored", (u64)io_rd(hi_i) << 32 | io_rd(lo_i), (u64)hi << 32 | lo);

    /* Redirection, end to end: COM1's THR-empty interrupt (ISA IRQ 4 = pin 4,
     * edge, active high) to this CPU, then to CPU 0. */
    u32 me = apic_self_id(), pin_lo = 0x10 + 2 * 4, pin_hi = pin_lo + 1;
    c->nlog = 0;
    io_wr(pin_hi, me << 24);
    io_wr(pin_lo, VEC_IO); /* fixed, physical, edge, active high, unmasked */
    outb(COM1 + 1, 0x02);  /* IER: THR empty */
    wait_irqs(c, 1, 500000, 1);
    outb(COM1 + 1, 0);
    (void)inb(COM1 + 2);
    REQ(o, "redirect_to_self", c->nlog >= 1 ? c->log_vec[0] : 0, VEC_IO);
    struct cpu *c0 = online_cpu(0);
    if (c0 && c0 != c) {
        u32 before = c0->irq_count[VEC_IO - VEC_CONFORM_FIRST];
        io_wr(pin_hi, c0->apic_id << 24);
        outb(COM1 + 1, 0x02);
        u64 end = rdtsc() + 500 * tsc_khz;
        while (READ_ONCE(c0->irq_count[VEC_IO - VEC_CONFORM_FIRST]) == before && rdtsc() < end)
            cpu_relax();
        outb(COM1 + 1, 0);
        (void)inb(COM1 + 2);
        REQ(o, "redirect_to_cpu0", READ_ONCE(c0->irq_count[VEC_IO - VEC_CONFORM_FIRST]) != before, 1);
    }
    /* a masked pin delivers nothing */
    c->nlog = 0;
    io_wr(pin_hi, me << 24);
    io_wr(pin_lo, 0x10000 | VEC_IO);
    outb(COM1 + 1, 0x02);
    wait_irqs(c, 1, 5000, 1);
    outb(COM1 + 1, 0);
    (void)inb(COM1 + 2);
    REQ(o, "masked_pin_silent", c->nlog, 0);
    io_wr(pin_lo, 0x10000);
    io_wr(pin_hi, 0);
    c->nlog = 0;
    outf(o, " ioapic_id=%u version=0x%x", platform.ioapic_id, ver);
    return CF_OK;
}

/* ---------------------------------------------------------------- */

/* How slow is CPL0 here? A simple loop: ~1-3 cycles per iteration when it
 * runs on the CPU, thousands when KVM PVM's instruction emulator runs it. */
void platform_probe_cpl0(void)
{
    u64 t0 = rdtsc();
    for (volatile u32 i = 0; i < 64; i++)
        ;
    u64 per = (rdtsc() - t0) / 64;
    platform.cpl0_loop_cycles = per > 0xFFFFFFFF ? 0xFFFFFFFF : (u32)per;
    platform.cpl0_emulated = per > 200;
}

u64 conform_call(struct cpu *c, u64 op, u64 arg, char *buf, u64 len)
{
    char details[CONFORM_OUT];
    struct out o = { details, sizeof details, 0, 0, 0, 0, 0 };
    details[0] = 0;
    u64 r;
    switch (op) {
    case CF_RESET: r = cf_reset(c, &o); break;
    case CF_APIC_BASE: r = cf_apic_base(c, &o); break;
    case CF_X2APIC_GP: r = cf_x2apic_gp(c, &o); break;
    case CF_TPR: r = cf_tpr(c, &o); break;
    case CF_TSC_DEADLINE: r = cf_tsc_deadline(c, &o); break;
    case CF_CPUID: r = cf_cpuid(c, &o); break;
    case CF_IOAPIC: r = cf_ioapic(c, &o); break;
    case CF_NMI_SEND: {
        struct cpu *t = online_cpu((u32)arg);
        if (!t)
            return CF_FAIL;
        apic_send(t->apic_id, 0x400); /* NMI, physical, edge */
        return CF_OK;
    }
    case CF_NMI_COUNT:
        return c->nmis;
    default:
        return CF_FAIL;
    }
    if (r == CF_OK && o.failed)
        r = CF_FAIL;
    if (r == CF_SKIP) {
        snfmt(buf, len, "skipped=%s", details);
        return r;
    }
    u64 n = snfmt(buf, len, "checks=%u failed=%u", o.checks, o.failed);
    if (o.deviations && n < len)
        n += snfmt(buf + n, len - n, " qemu_deviations=%u", o.deviations);
    if (o.notes && n < len)
        n += snfmt(buf + n, len - n, " limitations=%u", o.notes);
    if (n < len)
        snfmt(buf + n, len - n, "%s", details);
    return r;
}
