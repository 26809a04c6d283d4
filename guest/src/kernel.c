/*
 * dvmm-guest kernel (CPL0): boot, ACPI (MADT/SRAT), memory, local APIC,
 * AP start-up (INIT-SIPI-SIPI), per-CPU GDT/TSS/IDT, traps and the system
 * calls. On PVM hosts every CPL0 instruction is emulated (~500 ns each), so
 * this file does as little as possible; the workloads run at CPL3 (user.c).
 */
#include "kernel.h"

/* ---------------------------------------------------------------- */
/* Boot protocol structures                                          */

struct hvm_start_info {
    u32 magic; /* 0x336ec578 */
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr; /* version >= 1 */
    u32 memmap_entries;
    u32 reserved;
};
struct hvm_memmap_entry {
    u64 addr, size;
    u32 type, reserved;
};
#define HVM_START_MAGIC 0x336ec578

struct tss {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3, iomap_base;
} __attribute__((packed));

/* ---------------------------------------------------------------- */
/* Globals (small: .bss is zeroed by emulated code)                  */

extern char __kernel_end[], trampoline_start[], trampoline_end[], isr_stubs[];
extern u64 ap_stack_by_apic[MAX_APICID];
u64 ap_stack_by_apic[MAX_APICID];
u32 use_x2apic;
extern void enter_user(u64 rip, u64 rsp, u64 arg) NORETURN;
extern void cpu_idle_wait(void);
extern void halt_forever(void) NORETURN;
extern void user_main(u64 cpu) NORETURN;   /* user.c, runs at CPL3 */

static struct cpu cpus[MAX_CPUS];
/* Read-mostly IPI routing data, each in a page of its own (padded) so that
 * the IPI path never touches a page another CPU keeps writing:
 * online_apic[rank] is written at boot only; ping_reply.to[rank] (the APIC
 * ID a PING to that CPU answers) is written by senders, and only when it
 * changes, so in steady state it stays read-shared on every node. */
static struct { u32 apic[MAX_CPUS]; } ALIGNED(4096) online_apic;
static struct { volatile u32 to[MAX_CPUS]; } ALIGNED(4096) ping_reply;
static struct cpu *online[MAX_CPUS];
static u32 ncpus, nonline;
static s32 apic_to_cpu[MAX_APICID];
u64 bsp_kstack[KSTACK_SIZE / 8] ALIGNED(KSTACK_SIZE);
static u64 idt_master[512] ALIGNED(4096);
static struct sysinfo sysinfo;
static char cmdline[2048];
u64 tsc_khz;
struct platform platform;

#define MAX_NODES 64
#define MAX_RANGES 64
struct range { u64 base, end; s32 node; };
static struct range srat_mem[MAX_RANGES];
static u32 nsrat_mem;
struct mrange { u64 base, end, cur, boot_cur; s32 node; };
static struct mrange mem[MAX_RANGES];
static u32 nmem;
static u32 prox_domain[MAX_NODES];
static u32 nnodes;
static u64 node_mem[MAX_NODES];

static volatile u32 print_lock, alloc_lock;
static volatile u64 kbarrier_count, kbarrier_gen;

/* Bounded spin lock (a broken CPU must not hang the printer forever). */
static void klock(volatile u32 *l)
{
    u64 n = 0;
    while (xchg32(l, 1))
        if (++n > 2000000)
            return;
}
static void kunlock(volatile u32 *l) { __asm__ volatile("movl $0, %0" : "=m"(*l) : : "memory"); }

/* ---------------------------------------------------------------- */
/* Serial console (16550 at COM1) and exit                           */

#define COM1 0x3F8
static void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0x07); /* FIFO on, cleared */
    outb(COM1 + 4, 0x03); /* DTR RTS */
}
static void serial_putc(char c)
{
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (u8)c);
}
static void serial_write(const char *s, u64 n)
{
    for (u64 i = 0; i < n; i++) {
        if (s[i] == '\n')
            serial_putc('\r');
        serial_putc(s[i]);
    }
}
void kprintf(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnfmt(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 1)
        n = sizeof buf - 1;
    klock(&print_lock);
    serial_write(buf, n);
    kunlock(&print_lock);
}

static void NORETURN machine_exit(u32 status)
{
    /* isa-debug-exit (QEMU: exit code (status<<1)|1) / dvmm: exit status. */
    outb(0xF4, (u8)status);
    /* Fallback when there is no exit device: triple fault (-no-reboot
     * turns it into an exit), else halt. */
    struct { u16 limit; u64 base; } __attribute__((packed)) nullidt = { 0, 0 };
    __asm__ volatile("lidt %0; int3" ::"m"(nullidt));
    halt_forever();
}

/* ---------------------------------------------------------------- */
/* Local APIC: x2APIC MSRs when available, else xAPIC MMIO           */

void apic_send(u32 dest, u32 icr)
{
    if (use_x2apic) {
        wrmsr(0x830, ((u64)dest << 32) | icr);
        return;
    }
    for (int i = 0; i < 100000 && (apic_read(APIC_ICR) & (1 << 12)); i++)
        ;
    apic_write(APIC_ICR_HI, dest << 24);
    apic_write(APIC_ICR, icr);
}
u32 apic_self_id(void)
{
    return use_x2apic ? apic_read(APIC_ID) : apic_read(APIC_ID) >> 24;
}
void apic_init(void)
{
    u64 base = rdmsr(0x1B), want = base | 1 << 11;
    if (use_x2apic)
        want |= 1 << 10;
    if (want != base)
        wrmsr(0x1B, want);
    apic_write(APIC_SVR, 0x100 | VEC_SPURIOUS);
    apic_write(APIC_TPR, 0);
    apic_write(APIC_LVT_TIMER, VEC_TIMER);           /* one-shot (SYS_YIELD) */
    apic_write(APIC_TDCR, 0xB);                      /* divide by 1 */
}

void udelay(u64 us)
{
    u64 end = rdtsc() + us * tsc_khz / 1000;
    while (rdtsc() < end)
        cpu_relax();
}

/* ---------------------------------------------------------------- */
/* TSC frequency: hypervisor leaf, CPUID 0x15, else APIC timer (1 GHz) */

static u64 calibrate_tsc(const char **src)
{
    u32 a, b, c, d;
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    if (a >= 0x40000010 && a < 0x40000100) {
        cpuid(0x40000010, 0, &a, &b, &c, &d);
        if (a) {
            *src = "cpuid40000010";
            return a;
        }
    }
    cpuid(0, 0, &a, &b, &c, &d);
    if (a >= 0x15) {
        cpuid(0x15, 0, &a, &b, &c, &d);
        if (a && b && c) {
            *src = "cpuid15";
            return (u64)c * b / a / 1000;
        }
    }
    /* APIC timer: one-shot, masked, divide 1 => 1 tick per ns. */
    u64 r[3];
    apic_write(APIC_LVT_TIMER, 0x10000 | VEC_TIMER);
    for (int k = 0; k < 3; k++) {
        apic_write(APIC_TMICT, 0xFFFFFFFF);
        u32 c0 = apic_read(APIC_TMCCT);
        u64 t0 = rdtsc(), t1;
        u32 c1;
        do {
            c1 = apic_read(APIC_TMCCT);
            t1 = rdtsc();
        } while (c0 - c1 < 2000000 && t1 - t0 < (1UL << 35));
        if (c0 - c1 < 1000000) {
            *src = "none(apic-timer-dead)";
            apic_write(APIC_TMICT, 0);
            apic_write(APIC_LVT_TIMER, VEC_TIMER);
            return 1000000;
        }
        r[k] = (t1 - t0) * 1000000 / (c0 - c1);
    }
    apic_write(APIC_TMICT, 0);
    apic_write(APIC_LVT_TIMER, VEC_TIMER);
    /* median of three */
    u64 x = r[0], y = r[1], z = r[2], t;
    if (x > y) t = x, x = y, y = t;
    if (y > z) t = y, y = z, z = t;
    if (x > y) t = x, x = y, y = t;
    *src = "apic";
    return y;
}

/* ---------------------------------------------------------------- */
/* ACPI                                                              */

struct sdt { char sig[4]; u32 length; u8 rev, csum; char oem[6], oemtab[8]; u32 oemrev, crid, crrev; } __attribute__((packed));

static int sum8(const u8 *p, u32 n)
{
    u8 s = 0;
    for (u32 i = 0; i < n; i++)
        s += p[i];
    return s;
}
static u64 scan_rsdp(u64 start, u64 len)
{
    for (u64 p = start; p < start + len; p += 16)
        if (*(volatile u64 *)p == 0x2052545020445352UL /* "RSD PTR " */ && !sum8((u8 *)p, 20))
            return p;
    return 0;
}
static u64 find_rsdp(struct hvm_start_info *si)
{
#ifndef FORCE_RSDP_SCAN
    if (si && si->rsdp_paddr)
        return si->rsdp_paddr;
#endif
    u64 ebda = (u64)(*(volatile u16 *)0x40E) << 4;
    u64 p = 0;
    if (ebda >= 0x80000 && ebda < 0xA0000)
        p = scan_rsdp(ebda, 1024);
    if (!p)
        p = scan_rsdp(0xE0000, 0x20000);
    return p;
}

static int node_for_domain(u32 dom)
{
    for (u32 i = 0; i < nnodes; i++)
        if (prox_domain[i] == dom)
            return i;
    if (nnodes >= MAX_NODES)
        return 0;
    prox_domain[nnodes] = dom;
    return nnodes++;
}

static void add_cpu(u32 apic_id)
{
    if (ncpus >= MAX_CPUS || apic_id >= MAX_APICID || apic_to_cpu[apic_id] >= 0)
        return;
    cpus[ncpus].apic_id = apic_id;
    cpus[ncpus].index = ncpus;
    apic_to_cpu[apic_id] = ncpus++;
}

static void parse_madt(struct sdt *t)
{
    u8 *p = (u8 *)t + 44, *end = (u8 *)t + t->length;
    memcpy(platform.oem, t->oem, 6);
    platform.qemu = !memcmp(t->oem, "BOCHS ", 6);
    platform.dvmm = !memcmp(t->oem, "DVMM  ", 6);
    for (; p + 2 <= end && p[1] >= 2; p += p[1]) {
        if (p[0] == 0 && (*(u32 *)(p + 4) & 1))       /* LAPIC, enabled */
            add_cpu(p[3]);
        else if (p[0] == 9 && (*(u32 *)(p + 8) & 1))  /* x2APIC, enabled */
            add_cpu(*(u32 *)(p + 4));
        else if (p[0] == 1 && p[1] >= 12 && !platform.have_ioapic) { /* IOAPIC */
            platform.have_ioapic = 1;
            platform.ioapic_id = p[2];
            platform.ioapic_addr = *(u32 *)(p + 4);
        }
    }
}

static void parse_srat(struct sdt *t, u32 *cpu_dom_apic, u32 *cpu_dom, u32 *ncd)
{
    u8 *p = (u8 *)t + 48, *end = (u8 *)t + t->length;
    for (; p + 2 <= end && p[1] >= 2; p += p[1]) {
        if (p[0] == 0 && (*(u32 *)(p + 4) & 1) && *ncd < MAX_APICID) {
            u32 dom = p[2] | (u32)p[9] << 8 | (u32)p[10] << 16 | (u32)p[11] << 24;
            cpu_dom_apic[*ncd] = p[3];
            cpu_dom[(*ncd)++] = dom;
        } else if (p[0] == 2 && (*(u32 *)(p + 12) & 1) && *ncd < MAX_APICID) {
            cpu_dom_apic[*ncd] = *(u32 *)(p + 8);
            cpu_dom[(*ncd)++] = *(u32 *)(p + 4);
        } else if (p[0] == 1 && (*(u32 *)(p + 28) & 1) && nsrat_mem < MAX_RANGES) {
            u64 base = *(u32 *)(p + 8) | (u64)*(u32 *)(p + 12) << 32;
            u64 len = *(u32 *)(p + 16) | (u64)*(u32 *)(p + 20) << 32;
            if (!len)
                continue;
            srat_mem[nsrat_mem].base = base;
            srat_mem[nsrat_mem].end = base + len;
            srat_mem[nsrat_mem++].node = node_for_domain(*(u32 *)(p + 2));
        }
    }
}

/* cpu_dom arrays live on the boot stack only while parsing */
static void parse_acpi(u64 rsdp)
{
    struct sdt *madt = 0, *srat = 0;
    if (rsdp) {
        u8 *r = (u8 *)rsdp;
        u64 xsdt = r[15] >= 2 ? *(u64 *)(r + 24) : 0;
        u64 rsdt = *(u32 *)(r + 16);
        struct sdt *root = (struct sdt *)(xsdt ? xsdt : rsdt);
        int esz = xsdt ? 8 : 4;
        if (root && root->length >= 36) {
            u32 n = (root->length - 36) / esz;
            for (u32 i = 0; i < n; i++) {
                u8 *e = (u8 *)root + 36 + i * esz;
                struct sdt *t = (struct sdt *)(esz == 8 ? *(u64 *)e : *(u32 *)e);
                if (!t)
                    continue;
                if (!memcmp(t->sig, "APIC", 4))
                    madt = t;
                else if (!memcmp(t->sig, "SRAT", 4))
                    srat = t;
            }
        }
    }
    u32 bsp = apic_self_id();
    add_cpu(bsp); /* BSP is always cpu 0 */
    if (madt)
        parse_madt(madt);
    else
        snfmt(sysinfo.boot_errors, sizeof sysinfo.boot_errors, "%s", rsdp ? "no MADT; " : "no RSDP; ");
    if (srat) {
        static u32 cda[MAX_APICID], cd[MAX_APICID];
        u32 ncd = 0;
        parse_srat(srat, cda, cd, &ncd);
        for (u32 i = 0; i < ncd; i++)
            if (cda[i] < MAX_APICID && apic_to_cpu[cda[i]] >= 0)
                cpus[apic_to_cpu[cda[i]]].node = node_for_domain(cd[i]);
    }
    if (nnodes == 0)
        nnodes = 1;
}

/* ---------------------------------------------------------------- */
/* Physical memory: usable memmap ranges split by SRAT node, bump     */
/* allocation per node. Memory is handed out identity-mapped.         */

static void add_mem(u64 base, u64 end, int node)
{
    base = (base + 4095) & ~4095UL;
    end &= ~4095UL;
    if (end <= base || nmem >= MAX_RANGES)
        return;
    mem[nmem].base = mem[nmem].cur = base;
    mem[nmem].end = end;
    mem[nmem++].node = node;
    node_mem[node] += end - base;
    sysinfo.mem_bytes += end - base;
}

static void add_usable(u64 base, u64 end)
{
    u64 kend = ((u64)__kernel_end + 4095) & ~4095UL;
    if (base < kend)
        base = kend; /* nothing below the end of the kernel image (>= 1 MiB) */
    if (end <= base)
        return;
    if (!nsrat_mem) {
        add_mem(base, end, 0);
        return;
    }
    for (u32 i = 0; i < nsrat_mem; i++) {
        u64 b = base > srat_mem[i].base ? base : srat_mem[i].base;
        u64 e = end < srat_mem[i].end ? end : srat_mem[i].end;
        if (b < e)
            add_mem(b, e, srat_mem[i].node);
    }
}

static u64 kalloc(int node, u64 size, u64 align)
{
    if (align < 64)
        align = 64;
    u64 ret = 0;
    klock(&alloc_lock);
    for (u32 i = 0; i < nmem && !ret; i++) {
        if (mem[i].node != node)
            continue;
        u64 p = (mem[i].cur + align - 1) & ~(align - 1);
        if (p + size <= mem[i].end && p + size > p) {
            mem[i].cur = p + size;
            ret = p;
        }
    }
    kunlock(&alloc_lock);
    return ret;
}

static u64 kalloc_any(int node, u64 size, u64 align)
{
    u64 p = kalloc(node, size, align);
    for (u32 n = 0; !p && n < nnodes; n++)
        p = kalloc(n, size, align);
    return p;
}

/* Identity-map RAM above 4 GiB (boot.S maps 0..4 GiB). */
extern u64 pdpt[512];
static void map_high(u64 top)
{
    u32 a, b, c, d;
    cpuid(0x80000001, 0, &a, &b, &c, &d);
    int gb_pages = (d >> 26) & 1;
    for (u64 gb = 4; gb < 512 && (gb << 30) < top; gb++) {
        if (pdpt[gb])
            continue;
        if (gb_pages) {
            pdpt[gb] = (gb << 30) | 0x87;
            continue;
        }
        u64 *pd = (u64 *)kalloc_any(0, 4096, 4096);
        if (!pd)
            return;
        for (u64 i = 0; i < 512; i++)
            pd[i] = (gb << 30) + (i << 21) + 0x87;
        pdpt[gb] = (u64)pd | 0x07;
    }
    __asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
}

/* ---------------------------------------------------------------- */
/* Per-CPU descriptor tables                                         */

#define PERCPU_IDT 16384
#define PERCPU_IST 20480
#define PERCPU_GDT 24576
#define PERCPU_TSS (PERCPU_GDT + 128)
#define PERCPU_SIZE 28672
#define USTACK_SIZE 65536

static void set_gate(u64 *idt, int vec, u64 handler, int dpl, int ist)
{
    idt[vec * 2] = (handler & 0xFFFF) | ((u64)SEL_KCODE << 16) | ((u64)ist << 32) |
                   ((u64)(0x8E | dpl << 5) << 40) | ((handler >> 16) & 0xFFFF) << 48;
    idt[vec * 2 + 1] = handler >> 32;
}

static void build_idt(u64 *idt)
{
    for (int v = 0; v < 256; v++)
        set_gate(idt, v, (u64)isr_stubs + v * 16, v == 3 ? 3 : 0, (v == 2 || v == 8 || v == 18) ? 1 : 0);
}

struct dtr { u16 limit; u64 base; } __attribute__((packed));

/* Each CPU: GDT + TSS + IST stack in its per-CPU block, its own IDT copy,
 * kernel stack at kstack (KSTACK_SIZE aligned; its bottom word points to
 * the struct cpu, see this_cpu()). */
static void load_cpu_tables(struct cpu *c, u64 kstack, u64 *idt)
{
    u64 blk = c->block;
    u64 *gdt = (u64 *)(blk + PERCPU_GDT);
    struct tss *tss = (struct tss *)(blk + PERCPU_TSS);
    memset(tss, 0, sizeof *tss);
    tss->rsp0 = kstack + KSTACK_SIZE;
    tss->ist[0] = blk + PERCPU_IST + 4096;
    /* NMIs (and #DF, #MC) run on the IST stack, where this_cpu() does not
     * work: its lowest word names the CPU (see trap()). */
    *(struct cpu **)(blk + PERCPU_IST) = c;
    tss->iomap_base = sizeof *tss;
    gdt[0] = 0;
    gdt[1] = 0x00CF9A000000FFFFUL; /* kernel code 32 (boot only) */
    gdt[2] = 0x00CF92000000FFFFUL; /* kernel data */
    gdt[3] = 0x00AF9A000000FFFFUL; /* kernel code 64 */
    gdt[4] = 0x00CFF2000000FFFFUL; /* user data, DPL 3 */
    gdt[5] = 0x00AFFA000000FFFFUL; /* user code 64, DPL 3 */
    u64 t = (u64)tss, lim = sizeof *tss - 1;
    gdt[6] = (lim & 0xFFFF) | (t & 0xFFFFFF) << 16 | 0x89UL << 40 | ((t >> 24) & 0xFF) << 56;
    gdt[7] = t >> 32;
    if (idt != idt_master)
        memcpy(idt, idt_master, 4096);
    struct dtr g = { 8 * 8 - 1, (u64)gdt }, i = { 4095, (u64)idt };
    __asm__ volatile("lgdt %0; lidt %1; ltr %w2" ::"m"(g), "m"(i), "r"(SEL_TSS) : "memory");
    *(struct cpu **)kstack = c;
}

/* ---------------------------------------------------------------- */
/* Traps and system calls                                            */

static const char *vec_name(u64 v)
{
    static const char *n[] = { "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO",
                               "#TS", "#NP", "#SS", "#GP", "#PF", "?",   "#MF", "#AC", "#MC", "#XM",
                               "#VE", "#CP" };
    return v < sizeof n / sizeof n[0] ? n[v] : "irq";
}

static void NORETURN panic_trap(struct trap_frame *f)
{
    struct cpu *c = this_cpu();
    kprintf("dvmm-guest: panic FAIL exception vector=%lu(%s) cpu=%u cpl=%lu rip=0x%lx err=0x%lx cr2=0x%lx rsp=0x%lx\n",
            f->vec, vec_name(f->vec), c ? c->rank : 0, f->cs & 3, f->rip, f->err, read_cr2(), f->rsp);
    machine_exit(2);
}

static void kbarrier(void)
{
    u64 gen = kbarrier_gen;
    if (xadd64(&kbarrier_count, 1) == nonline - 1) {
        kbarrier_count = 0;
        __asm__ volatile("" ::: "memory");
        kbarrier_gen = gen + 1;
        for (u32 i = 0; i < nonline; i++)
            if (online[i] != this_cpu())
                apic_send(online[i]->apic_id, VEC_WAKE);
        return;
    }
    while (kbarrier_gen == gen) {
        apic_write(APIC_TMICT, 1000000); /* 1 ms safety net for a lost wake */
        if (kbarrier_gen != gen)
            break;
        cpu_idle_wait();
    }
}

static u64 do_syscall(struct trap_frame *f)
{
    struct cpu *c = this_cpu();
    u64 a0 = f->rdi, a1 = f->rsi, a2 = f->rdx;
    switch (f->rax) {
    case SYS_PRINT:
        klock(&print_lock);
        serial_write((const char *)a0, a1);
        kunlock(&print_lock);
        return a1;
    case SYS_EXIT:
        machine_exit((u32)a0);
    case SYS_BARRIER:
        kbarrier();
        return 0;
    case SYS_CPUID:
        return c->rank;
    case SYS_NCPUS:
        return nonline;
    case SYS_NNODES:
        return nnodes;
    case SYS_NODE_OF_CPU:
        return a0 < nonline ? (u64)(s64)online[a0]->node : (u64)-1;
    case SYS_NODE_OF_ADDR:
        for (u32 i = 0; i < nsrat_mem; i++)
            if (a0 >= srat_mem[i].base && a0 < srat_mem[i].end)
                return srat_mem[i].node;
        return nsrat_mem ? (u64)-1 : 0;
    case SYS_ALLOC: {
        s64 node = (s64)a0;
        if (node < 0)
            node = c->node;
        if (node >= nnodes || !a1 || (a2 & (a2 - 1)))
            return 0;
        return kalloc((int)node, a1, a2);
    }
    case SYS_ALLOC_RESET:
        klock(&alloc_lock);
        for (u32 i = 0; i < nmem; i++)
            mem[i].cur = mem[i].boot_cur;
        kunlock(&alloc_lock);
        return 0;
    case SYS_TIME_NS:
    {
        u64 t = rdtsc();
        return t / tsc_khz * 1000000 + (t % tsc_khz) * 1000000 / tsc_khz;
    }
    case SYS_TSC_KHZ:
        return tsc_khz;
    case SYS_YIELD:
        /* A wake-up (VEC_WAKE or VEC_PONG) that arrived while this CPU
         * ran at CPL3 ends the yield at once (no lost wake-ups). The
         * int3 gate is an interrupt gate: IF is 0 from here on, so an
         * interrupt arriving after this check stays pending and ends the
         * halt (cpu_idle_wait is `sti; hlt`: sti's shadow covers hlt);
         * otherwise halt until any interrupt or the one-shot timer. */
        if (!READ_ONCE(c->wake_pending)) {
            if (a0 > 4000000)
                a0 = 4000000;
            apic_write(APIC_TMICT, (u32)(a0 ? a0 * 1000 : 1));
            cpu_idle_wait();
        }
        WRITE_ONCE(c->wake_pending, 0);
        return 0;
    case SYS_IPI_PING:
        if (a0 >= nonline)
            return (u64)-1;
        if (READ_ONCE(ping_reply.to[a0]) != c->apic_id)
            WRITE_ONCE(ping_reply.to[a0], c->apic_id);
        __asm__ volatile("mfence" ::: "memory"); /* visible before the IPI */
        apic_send(online_apic.apic[a0], VEC_PING);
        return 0;
    case SYS_WAKE:
        if (a0 >= nonline)
            return (u64)-1;
        apic_send(online_apic.apic[a0], VEC_WAKE);
        return 0;
    case SYS_IPI_COUNTERS:
        return a0 < nonline ? (u64)&online[a0]->pings : 0;
    case SYS_CMDLINE:
        return (u64)cmdline;
    case SYS_INFO:
        return (u64)&sysinfo;
    case SYS_PERCPU_PAGE:
        return a0 < nonline ? online[a0]->upage : 0;
    case SYS_NODE_MEM:
        return a0 < nnodes ? node_mem[a0] : 0;
    case SYS_CONFORM:
        return conform_call(c, a0, a1, (char *)a2, CONFORM_OUT);
    }
    return (u64)-1;
}

/* Exception fixups: a #GP or #UD at CPL0 at `fault` resumes at `resume`
 * with rsi = vector + 1 (the conform checks' rdmsr/wrmsr/instruction
 * probes, see kconform.c). */
struct extable_entry { u64 fault, resume; };
extern const struct extable_entry __extable_start[], __extable_end[];

void trap(struct trap_frame *f)
{
    u64 v = f->vec;
    if (v == 3 && (f->cs & 3) == 3) {
        f->rax = do_syscall(f);
        return;
    }
    if (v == 2) {
        /* NMI, on the IST stack: the CPU is named at the stack's base */
        struct cpu *c = *(struct cpu **)((u64)f & ~4095UL);
        c->nmis++;
        return;
    }
    if ((v == 13 || v == 6) && (f->cs & 3) == 0)
        for (const struct extable_entry *e = __extable_start; e < __extable_end; e++)
            if (e->fault == f->rip) {
                f->rip = e->resume;
                f->rsi = v + 1;
                return;
            }
    if (v >= VEC_CONFORM_FIRST && v <= VEC_CONFORM_LAST) {
        conform_irq(this_cpu(), v);
        return;
    }
    if (v == VEC_WAKE) {
        WRITE_ONCE(this_cpu()->wake_pending, 1);
        apic_eoi();
        return;
    }
    if (v == VEC_TIMER) {
        apic_eoi();
        return;
    }
    if (v == VEC_PING) {
        struct cpu *c = this_cpu();
        c->pings++;
        apic_eoi();
        apic_send(READ_ONCE(ping_reply.to[c->rank]), VEC_PONG);
        return;
    }
    if (v == VEC_PONG) {
        /* also a wake-up: a PONG that lands between the waiter's last
         * check at CPL3 and its SYS_YIELD must end that yield at once */
        struct cpu *c = this_cpu();
        c->pongs++;
        WRITE_ONCE(c->wake_pending, 1);
        apic_eoi();
        return;
    }
    if (v == VEC_SPURIOUS)
        return;
    panic_trap(f);
}

struct cpu *online_cpu(u32 rank) { return rank < nonline ? online[rank] : 0; }

/* ---------------------------------------------------------------- */
/* Boot                                                              */

void NORETURN ap_main(u32 apic_id)
{
    struct cpu *c = &cpus[apic_to_cpu[apic_id]];
    *(struct cpu **)c->block = c;
    if (cmpxchg32(&c->state, 0, 1) != 0)
        halt_forever(); /* too late: the BSP gave up on us */
    conform_snapshot(c); /* the APIC as INIT-SIPI left it */
    apic_init();
    load_cpu_tables(c, c->block, (u64 *)(c->block + PERCPU_IDT));
    enter_user((u64)user_main, c->ustack_top, c->index);
}

static void start_aps(void)
{
    memcpy((void *)TRAMPOLINE_PA, trampoline_start, trampoline_end - trampoline_start);
    for (u32 i = 1; i < ncpus; i++)
        apic_send(cpus[i].apic_id, 0x4500); /* INIT, assert */
    udelay(10000);
    for (u32 i = 1; i < ncpus; i++)
        apic_send(cpus[i].apic_id, 0x0600 | (TRAMPOLINE_PA >> 12)); /* SIPI */
    udelay(300);
    for (u32 i = 1; i < ncpus; i++)
        if (!cpus[i].state)
            apic_send(cpus[i].apic_id, 0x0600 | (TRAMPOLINE_PA >> 12));
    u64 deadline = rdtsc() + 10000 * tsc_khz; /* 10 s */
    for (u32 i = 1; i < ncpus; i++) {
        while (!cpus[i].state && rdtsc() < deadline)
            udelay(50);
        if (cmpxchg32(&cpus[i].state, 0, 2) == 0) {
            sysinfo.boot_failures++;
            u32 n = strlen(sysinfo.boot_errors);
            snfmt(sysinfo.boot_errors + n, sizeof sysinfo.boot_errors - n, "cpu %u (apic %u) did not start; ",
                  i, cpus[i].apic_id);
        }
    }
}

void NORETURN kmain(u32 start_info)
{
    struct hvm_start_info *si = (struct hvm_start_info *)(u64)start_info;
    sysinfo.boot_tsc = rdtsc();
    if (si && si->magic != HVM_START_MAGIC)
        si = 0;
    serial_init();
    for (u32 i = 0; i < MAX_APICID; i++)
        apic_to_cpu[i] = -1;
    *(struct cpu **)bsp_kstack = &cpus[0];

    /* command line */
    if (si && si->cmdline_paddr) {
        const char *s = (const char *)si->cmdline_paddr;
        u32 n = 0;
        while (n < sizeof cmdline - 1 && s[n])
            n++;
        memcpy(cmdline, s, n);
    }

    /* mask the 8259 PICs: only the local APIC delivers interrupts */
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    use_x2apic = (c >> 21) & 1;
    conform_snapshot(&cpus[0]); /* the APIC as power-on (or firmware) left it */
    apic_init();
    apic_write(APIC_LVT_LINT0, 0x10000);

    parse_acpi(find_rsdp(si));

    /* memory: PVH memmap (version >= 1) */
    u64 top = 0;
    if (si && si->version >= 1 && si->memmap_paddr) {
        struct hvm_memmap_entry *e = (struct hvm_memmap_entry *)si->memmap_paddr;
        for (u32 i = 0; i < si->memmap_entries; i++)
            if (e[i].type == 1) {
                add_usable(e[i].addr, e[i].addr + e[i].size);
                if (e[i].addr + e[i].size > top)
                    top = e[i].addr + e[i].size;
            }
    }
    if (!nmem) {
        kprintf("dvmm-guest: boot FAIL no usable memory map in hvm_start_info\n");
        machine_exit(3);
    }
    if (top > (4UL << 30))
        map_high(top);

    const char *tsc_src = "";
    tsc_khz = calibrate_tsc(&tsc_src);
    platform_probe_cpl0();

    /* per-CPU memory, on each CPU's node */
    build_idt(idt_master);
    for (u32 i = 0; i < ncpus; i++) {
        struct cpu *cp = &cpus[i];
        cp->block = kalloc_any(cp->node, PERCPU_SIZE, KSTACK_SIZE);
        u64 us = kalloc_any(cp->node, USTACK_SIZE, 4096);
        cp->upage = kalloc_any(cp->node, 4096, 4096);
        if (!cp->block || !us || !cp->upage) {
            ncpus = i;
            break;
        }
        cp->ustack_top = us + USTACK_SIZE;
        if (i)
            ap_stack_by_apic[cp->apic_id] = cp->block + KSTACK_SIZE;
    }
    load_cpu_tables(&cpus[0], (u64)bsp_kstack, idt_master);
    cpus[0].state = 1;

    start_aps();

    for (u32 i = 0; i < ncpus; i++)
        if (cpus[i].state == 1) {
            cpus[i].rank = nonline;
            online[nonline++] = &cpus[i];
        }
    for (u32 i = 0; i < nmem; i++)
        mem[i].boot_cur = mem[i].cur;

    sysinfo.ncpus = nonline;
    sysinfo.nnodes = nnodes;
    sysinfo.x2apic = use_x2apic;
    sysinfo.tsc_khz = tsc_khz;
    sysinfo.tsc_source = tsc_src;
    snfmt(sysinfo.platform, sizeof sysinfo.platform, "%s",
          platform.dvmm ? "dvmm" : platform.qemu ? "qemu" : "other");
    sysinfo.cpl0_emulated = platform.cpl0_emulated;
    sysinfo.cpl0_loop_cycles = platform.cpl0_loop_cycles;
    for (u32 i = 0; i < nonline; i++) {
        sysinfo.apic_id[i] = online[i]->apic_id;
        online_apic.apic[i] = online[i]->apic_id;
        sysinfo.node[i] = online[i]->node;
    }
    __asm__ volatile("mfence" ::: "memory");
    enter_user((u64)user_main, cpus[0].ustack_top, 0);
}
