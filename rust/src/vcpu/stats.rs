//! What a vCPU reports: per-exit-kind counters and timer lateness ([`VcpuStats`]),
//! and the register dump of a crashed vCPU ([`VcpuDump`]).

use super::*;

/// Registers of a vCPU, reported when the guest crashes.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct VcpuDump {
    pub vcpu: u32,
    pub exit_reason: String,
    pub rip: String,
    pub rsp: String,
    pub rflags: String,
    pub cr0: String,
    pub cr2: String,
    pub cr3: String,
    pub cr4: String,
    pub efer: String,
    pub cs: String,
    pub ss: String,
    pub cs_base: String,
    pub regs: std::collections::BTreeMap<String, String>,
    /// The instruction bytes KVM reported (emulation failures), hex.
    pub insn_bytes: Option<String>,
}

impl VcpuDump {
    /// Build a dump from KVM register state.
    pub fn from_regs(vcpu: u32, exit_reason: &str, r: &kvm_regs, s: &kvm_sregs) -> Self {
        let h = |v: u64| format!("{v:#x}");
        let regs = [
            ("rax", r.rax),
            ("rbx", r.rbx),
            ("rcx", r.rcx),
            ("rdx", r.rdx),
            ("rsi", r.rsi),
            ("rdi", r.rdi),
            ("rbp", r.rbp),
            ("r8", r.r8),
            ("r9", r.r9),
            ("r10", r.r10),
            ("r11", r.r11),
            ("r12", r.r12),
            ("r13", r.r13),
            ("r14", r.r14),
            ("r15", r.r15),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), h(*v)))
        .collect();
        VcpuDump {
            vcpu,
            exit_reason: exit_reason.to_string(),
            rip: h(r.rip),
            rsp: h(r.rsp),
            rflags: h(r.rflags),
            cr0: h(s.cr0),
            cr2: h(s.cr2),
            cr3: h(s.cr3),
            cr4: h(s.cr4),
            efer: h(s.efer),
            cs: format!("{:#x}", s.cs.selector),
            ss: format!("{:#x}", s.ss.selector),
            cs_base: h(s.cs.base),
            regs,
            insn_bytes: None,
        }
    }

    /// One-line summary for error messages.
    pub fn summary(&self) -> String {
        format!(
            "vCPU {} rip={} rsp={} rflags={} cs={} cr0={} cr3={} cr4={} efer={}",
            self.vcpu,
            self.rip,
            self.rsp,
            self.rflags,
            self.cs,
            self.cr0,
            self.cr3,
            self.cr4,
            self.efer
        )
    }
}

/// Kinds of exits counted in [`VcpuStats::exits`].
pub const EXIT_KINDS: [&str; 10] = [
    "io",
    "mmio",
    "msr",
    "hlt",
    "irq_window",
    "intr",
    "shutdown",
    "internal_error",
    "fail_entry",
    "other",
];

pub(super) const EK_IO: usize = 0;

pub(super) const EK_MMIO: usize = 1;

pub(super) const EK_MSR: usize = 2;

pub(super) const EK_HLT: usize = 3;

pub(super) const EK_IRQ_WINDOW: usize = 4;

pub(super) const EK_INTR: usize = 5;

pub(super) const EK_SHUTDOWN: usize = 6;

pub(super) const EK_INTERNAL: usize = 7;

pub(super) const EK_FAIL_ENTRY: usize = 8;

pub(super) const EK_OTHER: usize = 9;

/// A timer interrupt injected later than this after its deadline counts as late
/// ([`VcpuStats::timer_late`]); with `DVMM_TRACE_TIMER=1` each one is reported with
/// where the time went (kick or injection).
pub const TIMER_LATE_NS: u64 = 10_000_000;

/// Counters of one vCPU (owned by its thread; no atomics on the exit path).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuStats {
    pub exits: [u64; EXIT_KINDS.len()],
    pub pio_reads: u64,
    pub pio_writes: u64,
    pub mmio_reads: u64,
    pub mmio_writes: u64,
    pub lapic_accesses: u64,
    pub unknown_pio: u64,
    pub unknown_mmio: u64,
    pub msr_gp: u64,
    pub interrupts_injected: u64,
    pub nmis_injected: u64,
    pub ipis_sent: u64,
    pub timer_rearms: u64,
    /// Halts that ended during halt polling (no sleep).
    pub halt_poll_hits: u64,
    /// Halts that slept on the futex.
    pub halt_sleeps: u64,
    /// Emulation failures finished by the VMM (see [`complete`]).
    pub insns_completed: u64,
    /// Interrupt injections put off because KVM still held the previous vector.
    pub injections_deferred: u64,
    /// LAPIC timer expiries (the timer vector raised into the IRR).
    pub timer_fires: u64,
    /// Worst delay from a timer's deadline to its vector's injection, in µs.
    pub timer_late_max_us: u64,
    /// Timer interrupts injected more than [`TIMER_LATE_NS`] after their deadline.
    pub timer_late: u64,
}

impl VcpuStats {
    /// Add another vCPU's counters.
    pub fn merge(&mut self, o: &VcpuStats) {
        for (a, b) in self.exits.iter_mut().zip(o.exits.iter()) {
            *a += b;
        }
        self.pio_reads += o.pio_reads;
        self.pio_writes += o.pio_writes;
        self.mmio_reads += o.mmio_reads;
        self.mmio_writes += o.mmio_writes;
        self.lapic_accesses += o.lapic_accesses;
        self.unknown_pio += o.unknown_pio;
        self.unknown_mmio += o.unknown_mmio;
        self.msr_gp += o.msr_gp;
        self.interrupts_injected += o.interrupts_injected;
        self.nmis_injected += o.nmis_injected;
        self.ipis_sent += o.ipis_sent;
        self.timer_rearms += o.timer_rearms;
        self.halt_poll_hits += o.halt_poll_hits;
        self.halt_sleeps += o.halt_sleeps;
        self.insns_completed += o.insns_completed;
        self.timer_fires += o.timer_fires;
        self.injections_deferred += o.injections_deferred;
        self.timer_late_max_us = self.timer_late_max_us.max(o.timer_late_max_us);
        self.timer_late += o.timer_late;
    }

    /// Total number of exits.
    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }
}

// ---------------------------------------------------------------------------------
// Exit dispatch
// ---------------------------------------------------------------------------------
