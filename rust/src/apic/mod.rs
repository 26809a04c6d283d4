//! Userspace local APIC (xAPIC MMIO + x2APIC MSRs + APIC timer).
//!
//! dvmm runs with the in-kernel irqchip off, because an in-kernel LAPIC cannot
//! deliver an IPI to a vCPU that lives in another process (or on another node).
//! This module is a pure state machine: it never calls KVM and never reads a
//! clock. Every operation that depends on time takes `now_ns`, a monotonic
//! nanosecond timestamp chosen by the caller, so the tests are deterministic.
//!
//! # How the vCPU thread uses it
//!
//! - Guest accesses to the APIC page ([`LocalApic::mmio_base`], 4 KiB) go to
//!   [`LocalApic::mmio_read`] / [`LocalApic::mmio_write`]; `rdmsr`/`wrmsr` of
//!   the MSRs for which [`LocalApic::handles_msr`] is true go to
//!   [`LocalApic::msr_read`] / [`LocalApic::msr_write`]. An `Err` from the MSR
//!   path must be turned into a #GP in the guest.
//! - Writes return an [`ApicAction`]: an IPI to route (see [`route_targets`]) or
//!   the vector of a level-triggered interrupt whose EOI the IOAPIC must see.
//! - Before entering the guest: [`LocalApic::advance`] with the current time,
//!   then [`LocalApic::take_init`], [`LocalApic::take_sipi`],
//!   [`LocalApic::take_nmi`] and [`LocalApic::pending_interrupt`]; after a
//!   successful `KVM_INTERRUPT` of vector `v`, [`LocalApic::acknowledge`]`(v)`.
//!   Sleep (HLT, wait-for-SIPI) at most until [`LocalApic::next_deadline_ns`].
//! - CR8: with a userspace LAPIC KVM exchanges CR8 through `kvm_run.cr8`; copy it
//!   with [`LocalApic::cr8`] / [`LocalApic::set_cr8`].
//!
//! # Model
//!
//! - Version 0x50014: a P6-family integrated APIC with 6 LVT entries (timer,
//!   thermal, performance counters, LINT0, LINT1, error) and no directed-EOI
//!   support, so every EOI of a level-triggered vector is broadcast to the IOAPIC.
//! - The timer counts at 1 GHz ([`APIC_BUS_CYCLE_NS`] = 1 ns per count before the
//!   divider), like KVM's in-kernel LAPIC. A periodic timer never fires more often
//!   than every [`MIN_PERIODIC_NS`] (KVM's `min_timer_period_us` default).
//! - The TSC-deadline timer needs the guest TSC at `now_ns`: the APIC assumes the
//!   guest TSC runs at `tsc_khz` and is linear in `now_ns` from the reference
//!   point given to [`LocalApic::set_tsc_reference`] (default: TSC 0 at time 0).
//! - Interrupt delivery is instantaneous: the ICR delivery-status bit always
//!   reads 0. Lowest-priority delivery goes to the lowest-numbered matching APIC
//!   (see [`route_targets`]); the receiving side treats it as fixed.
//! - Self IPIs (ICR shorthand "self", x2APIC SELF IPI register) are delivered
//!   to this APIC directly and are not returned as [`ApicAction::Ipi`].
//! - SMI and ExtINT are not modelled (no SMM, no 8259): such IPIs and LVT
//!   deliveries are dropped.
//! - Guest garbage never panics. xAPIC: accesses to reserved offsets read 0 /
//!   are ignored and set ESR bit 7 (illegal register address); writes to
//!   read-only registers and accesses that are not 32-bit aligned are ignored.
//!   x2APIC: invalid accesses return an [`ApicError`] (the caller injects #GP).
//!
//! # Layout
//!
//! - `mod.rs` (this file): the [`LocalApic`] struct, its constructor, reset and
//!   the plain accessors; constants and [`ApicError`].
//! - `registers.rs`: register offsets, MMIO / MSR access, IA32_APIC_BASE, LVT, ESR.
//! - `timer.rs`: the one-shot / periodic / TSC-deadline timer.
//! - `delivery.rs`: [`InterruptMessage`], destinations and [`route_targets`],
//!   IRR / ISR / PPR, accept / acknowledge / EOI, IPIs.
//! - `tests/`: the unit tests.

use serde::{Deserialize, Serialize};
use thiserror::Error;

mod delivery;
mod registers;
#[cfg(test)]
mod tests;
mod timer;

pub use delivery::{
    route_targets, ApicAction, ApicAddressing, DeliveryMode, Destination, DestinationMode,
    InterruptMessage, Shorthand, TriggerMode, INTERRUPT_MESSAGE_BYTES,
};
use registers::*;
pub use registers::{Lvt, ESR_ILLEGAL_REGISTER, ESR_RECV_ILLEGAL_VECTOR, ESR_SEND_ILLEGAL_VECTOR};
use timer::Timer;
pub use timer::TimerMode;

/// Default guest-physical base of the xAPIC MMIO page.
pub const APIC_DEFAULT_BASE: u64 = 0xFEE0_0000;

/// Size of the xAPIC MMIO page.
pub const APIC_MMIO_SIZE: u64 = 0x1000;

/// Value of the version register: version 0x14, max LVT entry 5.
pub const APIC_VERSION: u32 = 0x0005_0014;

/// IA32_APIC_BASE.
pub const MSR_IA32_APIC_BASE: u32 = 0x1B;

/// IA32_TSC_DEADLINE.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6E0;

/// First x2APIC MSR.
pub const X2APIC_MSR_FIRST: u32 = 0x800;

/// Last x2APIC MSR.
pub const X2APIC_MSR_LAST: u32 = 0x8FF;

/// Nanoseconds per APIC bus cycle (timer count before the divider): 1 GHz.
pub const APIC_BUS_CYCLE_NS: u64 = 1;

/// Shortest period of the periodic timer, in ns (as KVM's default 200 us).
pub const MIN_PERIODIC_NS: u64 = 200_000;

/// IA32_APIC_BASE bit 8: this processor is the bootstrap processor (read-only).
pub const APIC_BASE_BSP: u64 = 1 << 8;

/// IA32_APIC_BASE bit 10: x2APIC mode.
pub const APIC_BASE_EXTD: u64 = 1 << 10;

/// IA32_APIC_BASE bit 11: APIC globally enabled.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;

/// IA32_APIC_BASE base-address field (MAXPHYADDR 52).
pub const APIC_BASE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

const APIC_BASE_RESERVED: u64 =
    !(APIC_BASE_ADDR_MASK | APIC_BASE_BSP | APIC_BASE_EXTD | APIC_BASE_ENABLE);

/// Errors of the local APIC. Every one of them is a #GP for the guest.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ApicError {
    /// An x2APIC MSR was accessed while the APIC is not in x2APIC mode.
    #[error("x2APIC MSR {0:#x} accessed while the APIC is not in x2APIC mode")]
    NotX2Apic(u32),
    /// The MSR is not an APIC register (reserved x2APIC MSR or foreign MSR).
    #[error("MSR {0:#x} is not a valid APIC register")]
    InvalidMsr(u32),
    /// Write to a read-only x2APIC register.
    #[error("write to read-only x2APIC register MSR {0:#x}")]
    ReadOnly(u32),
    /// Read of a write-only x2APIC register.
    #[error("read of write-only x2APIC register MSR {0:#x}")]
    WriteOnly(u32),
    /// Reserved bits set in a value written to an MSR.
    #[error("reserved bits set in value {value:#x} written to MSR {msr:#x}")]
    ReservedBits {
        /// The MSR written.
        msr: u32,
        /// The value written.
        value: u64,
    },
    /// IA32_APIC_BASE write asking for an illegal mode transition.
    #[error("illegal APIC mode transition {from:?} -> IA32_APIC_BASE {value:#x}")]
    InvalidModeTransition {
        /// The mode before the write.
        from: ApicMode,
        /// The value written.
        value: u64,
    },
    /// A serialized [`InterruptMessage`] could not be decoded.
    #[error("malformed interrupt message: {0}")]
    BadMessage(&'static str),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, ApicError>;

/// Operating mode, from IA32_APIC_BASE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ApicMode {
    /// Globally disabled (EN = 0).
    Disabled,
    /// xAPIC: MMIO registers, 8-bit APIC IDs.
    XApic,
    /// x2APIC: MSR registers, 32-bit APIC IDs.
    X2Apic,
}

/// One local APIC.
/// Serializable (snapshots, `crate::vcpu::snapshot`): every field is state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalApic {
    initial_id: u32,
    base: u64,
    xapic_id: u8,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    esr: u32,
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 6],
    timer: Timer,
    tsc_khz: u64,
    tsc_ref_ns: u64,
    tsc_ref: u64,
    /// The TSC-deadline timer mode is implemented (CPUID.1:ECX[24] offered);
    /// without it LVT timer bit 18 is reserved and reads 0 (SDM 11.5.4.1).
    tsc_deadline: bool,
    pending_nmi: bool,
    pending_init: bool,
    pending_sipi: Option<u8>,
    wait_for_sipi: bool,
    /// The last interrupt events (kind byte, vector), oldest first after `hist_at`:
    /// a diagnostic trail shown by [`Self::timer_summary`].
    hist: [(u8, u8); HIST],
    hist_at: usize,
}

/// Length of [`LocalApic`]'s event trail.
const HIST: usize = 24;

impl LocalApic {
    /// A local APIC at power-on: xAPIC mode at [`APIC_DEFAULT_BASE`],
    /// software-disabled (SVR 0xFF), every LVT masked. An AP (`!is_bsp`) starts
    /// in wait-for-SIPI. `tsc_khz` is the guest TSC frequency (0 means 1 GHz).
    pub fn new(apic_id: u32, is_bsp: bool, tsc_khz: u32) -> Self {
        let mut apic = Self {
            initial_id: apic_id,
            base: APIC_DEFAULT_BASE | APIC_BASE_ENABLE | if is_bsp { APIC_BASE_BSP } else { 0 },
            xapic_id: apic_id as u8,
            tpr: 0,
            ldr: 0,
            dfr: u32::MAX,
            svr: 0xFF,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; 6],
            timer: Timer::default(),
            tsc_khz: if tsc_khz == 0 {
                1_000_000
            } else {
                u64::from(tsc_khz)
            },
            tsc_ref_ns: 0,
            tsc_ref: 0,
            tsc_deadline: true,
            pending_nmi: false,
            pending_init: false,
            pending_sipi: None,
            wait_for_sipi: !is_bsp,
            hist: [(0, 0); HIST],
            hist_at: 0,
        };
        apic.reset_registers();
        apic
    }
    /// Power-on reset: back to xAPIC mode at the default base with the initial
    /// APIC ID; pending events dropped; an AP waits for SIPI again. The TSC
    /// frequency and reference are kept.
    pub fn reset(&mut self) {
        let mut fresh = Self::new(self.initial_id, self.is_bsp(), 0);
        fresh.tsc_khz = self.tsc_khz;
        fresh.tsc_ref_ns = self.tsc_ref_ns;
        fresh.tsc_ref = self.tsc_ref;
        fresh.tsc_deadline = self.tsc_deadline;
        *self = fresh;
    }
    /// Registers reset by INIT (and power-on): everything but the APIC base MSR
    /// and the ID.
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = u32::MAX;
        self.svr = 0xFF;
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.irr = [0; 8];
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt = [LVT_MASKED; 6];
        self.timer = Timer::default();
        self.pending_nmi = false;
    }
    /// The initial (hardware) APIC ID this APIC was created with.
    pub fn initial_id(&self) -> u32 {
        self.initial_id
    }
    /// The current APIC ID: the x2APIC ID in x2APIC mode, the (guest-writable)
    /// 8-bit xAPIC ID otherwise.
    pub fn id(&self) -> u32 {
        match self.mode() {
            ApicMode::X2Apic => self.initial_id,
            _ => u32::from(self.xapic_id),
        }
    }
    /// Current mode.
    pub fn mode(&self) -> ApicMode {
        if self.base & APIC_BASE_ENABLE == 0 {
            ApicMode::Disabled
        } else if self.base & APIC_BASE_EXTD != 0 {
            ApicMode::X2Apic
        } else {
            ApicMode::XApic
        }
    }
    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.base
    }
    /// Guest-physical base of the MMIO page, `None` unless in xAPIC mode.
    pub fn mmio_base(&self) -> Option<u64> {
        (self.mode() == ApicMode::XApic).then_some(self.base & APIC_BASE_ADDR_MASK)
    }
    /// Bootstrap processor flag.
    pub fn is_bsp(&self) -> bool {
        self.base & APIC_BASE_BSP != 0
    }
    /// Software-enabled (SVR bit 8).
    pub fn is_software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }
    /// The task priority register (bits 7:0).
    pub fn tpr(&self) -> u8 {
        self.tpr as u8
    }
    /// CR8 (TPR bits 7:4), for `kvm_run.cr8`.
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }
    /// Sets TPR from CR8 (bits 3:0; the rest ignored).
    pub fn set_cr8(&mut self, cr8: u64) {
        self.tpr = ((cr8 & 0xF) as u32) << 4;
    }
    /// Logical destination register (derived from the ID in x2APIC mode).
    pub fn ldr(&self) -> u32 {
        if self.mode() == ApicMode::X2Apic {
            ((self.initial_id >> 4) << 16) | (1 << (self.initial_id & 0xF))
        } else {
            self.ldr
        }
    }
    /// Visible error status register.
    pub fn esr(&self) -> u32 {
        self.esr
    }
    /// Raw value of an LVT entry.
    pub fn lvt(&self, lvt: Lvt) -> u32 {
        self.lvt[lvt.index()]
    }
    /// The timer and interrupt state in one line, for diagnostics
    /// (`DVMM_TRACE_TIMER`).
    /// Record an event in the diagnostic trail (`kind`: I = injected, E = EOI of
    /// the vector, e = EOI with nothing in service, T = timer raised, others from
    /// the vCPU loop).
    pub fn note(&mut self, kind: u8, vector: u8) {
        self.hist[self.hist_at] = (kind, vector);
        self.hist_at = (self.hist_at + 1) % HIST;
    }
}
