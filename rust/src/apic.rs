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

use serde::{Deserialize, Serialize};
use thiserror::Error;

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

// Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
const REG_ID: u32 = 0x20;
const REG_VERSION: u32 = 0x30;
const REG_TPR: u32 = 0x80;
const REG_APR: u32 = 0x90;
const REG_PPR: u32 = 0xA0;
const REG_EOI: u32 = 0xB0;
const REG_RRD: u32 = 0xC0;
const REG_LDR: u32 = 0xD0;
const REG_DFR: u32 = 0xE0;
const REG_SVR: u32 = 0xF0;
const REG_ISR: u32 = 0x100;
const REG_TMR: u32 = 0x180;
const REG_IRR: u32 = 0x200;
const REG_ESR: u32 = 0x280;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_ERROR: u32 = 0x370;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3E0;
const REG_SELF_IPI: u32 = 0x3F0;

// ESR bits.
/// ESR bit 5: a fixed IPI with an illegal vector (< 16) was sent.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: a fixed interrupt with an illegal vector (< 16) was received.
pub const ESR_RECV_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ESR bit 7: access to a reserved register offset.
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

const SVR_ENABLE: u32 = 1 << 8;
const SVR_MASK: u32 = 0x3FF;
const LVT_MASKED: u32 = 1 << 16;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_TRIGGER_LEVEL: u32 = 1 << 15;
const ICR_DEST_LOGICAL: u32 = 1 << 11;
const ICR_LOW_WRITABLE: u32 = 0x000C_CFFF & !(1 << 12);
const DFR_FLAT: u32 = 0xF;

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

/// Delivery mode of an interrupt message (ICR / redirection entry bits 10:8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// 000: fixed vector.
    Fixed,
    /// 001: lowest priority (delivered to the lowest-numbered matching APIC).
    LowestPriority,
    /// 010: SMI (not modelled, dropped).
    Smi,
    /// 100: NMI.
    Nmi,
    /// 101: INIT.
    Init,
    /// 110: start-up IPI (SIPI).
    StartUp,
    /// 111: ExtINT (no 8259 here, dropped).
    ExtInt,
}

impl DeliveryMode {
    /// Decodes bits 10:8 (already shifted down); `None` for reserved encodings.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits & 7 {
            0 => Some(Self::Fixed),
            1 => Some(Self::LowestPriority),
            2 => Some(Self::Smi),
            4 => Some(Self::Nmi),
            5 => Some(Self::Init),
            6 => Some(Self::StartUp),
            7 => Some(Self::ExtInt),
            _ => None,
        }
    }

    /// The 3-bit encoding.
    pub fn bits(self) -> u32 {
        match self {
            Self::Fixed => 0,
            Self::LowestPriority => 1,
            Self::Smi => 2,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::StartUp => 6,
            Self::ExtInt => 7,
        }
    }
}

/// Physical or logical destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DestinationMode {
    /// The destination is an APIC ID.
    Physical,
    /// The destination is matched against each APIC's LDR (flat / cluster).
    Logical,
}

/// ICR destination shorthand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Shorthand {
    /// Use the destination field.
    None,
    /// Only the sender.
    SelfOnly,
    /// Every APIC, the sender included.
    AllIncludingSelf,
    /// Every APIC but the sender.
    AllExcludingSelf,
}

/// Edge or level trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TriggerMode {
    /// Edge-triggered.
    Edge,
    /// Level-triggered (the EOI is reported to the IOAPIC).
    Level,
}

/// Who an interrupt message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Destination {
    /// Destination field: 8 bits (xAPIC, IOAPIC) or 32 bits (x2APIC).
    pub id: u32,
    /// Physical or logical.
    pub mode: DestinationMode,
    /// ICR shorthand ([`Shorthand::None`] for IOAPIC messages).
    pub shorthand: Shorthand,
    /// The destination is in x2APIC format (32-bit, broadcast 0xFFFF_FFFF);
    /// otherwise xAPIC format (8-bit, broadcast 0xFF).
    pub x2apic_format: bool,
}

/// An interrupt message on the (virtual) system bus: an IPI from a local APIC
/// or an interrupt from the IOAPIC. Shared by [`crate::ioapic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InterruptMessage {
    /// Vector (ignored for NMI and INIT; the start page for SIPI).
    pub vector: u8,
    /// Delivery mode.
    pub delivery_mode: DeliveryMode,
    /// Trigger mode.
    pub trigger_mode: TriggerMode,
    /// Level: `false` only for an INIT level de-assert (which is never sent).
    pub level: bool,
    /// Destination.
    pub destination: Destination,
    /// APIC ID of the sending local APIC; `None` for the IOAPIC and devices.
    pub source_id: Option<u32>,
}

/// Size of [`InterruptMessage::to_bytes`].
pub const INTERRUPT_MESSAGE_BYTES: usize = 12;

impl InterruptMessage {
    /// Compact little-endian encoding, for the wire between nodes:
    /// dest id (u32), source id (u32), vector, flags, shorthand, 0.
    pub fn to_bytes(&self) -> [u8; INTERRUPT_MESSAGE_BYTES] {
        let mut b = [0u8; INTERRUPT_MESSAGE_BYTES];
        b[0..4].copy_from_slice(&self.destination.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.source_id.unwrap_or(0).to_le_bytes());
        b[8] = self.vector;
        let mut flags = self.delivery_mode.bits() as u8;
        if self.destination.mode == DestinationMode::Logical {
            flags |= 1 << 3;
        }
        if self.trigger_mode == TriggerMode::Level {
            flags |= 1 << 4;
        }
        if self.level {
            flags |= 1 << 5;
        }
        if self.destination.x2apic_format {
            flags |= 1 << 6;
        }
        if self.source_id.is_some() {
            flags |= 1 << 7;
        }
        b[9] = flags;
        b[10] = match self.destination.shorthand {
            Shorthand::None => 0,
            Shorthand::SelfOnly => 1,
            Shorthand::AllIncludingSelf => 2,
            Shorthand::AllExcludingSelf => 3,
        };
        b
    }

    /// Decodes [`InterruptMessage::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() != INTERRUPT_MESSAGE_BYTES {
            return Err(ApicError::BadMessage("wrong length"));
        }
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let flags = b[9];
        let delivery_mode = DeliveryMode::from_bits(u32::from(flags & 7))
            .ok_or(ApicError::BadMessage("reserved delivery mode"))?;
        let shorthand = match b[10] {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            3 => Shorthand::AllExcludingSelf,
            _ => return Err(ApicError::BadMessage("bad shorthand")),
        };
        if b[11] != 0 {
            return Err(ApicError::BadMessage("reserved byte set"));
        }
        Ok(Self {
            vector: b[8],
            delivery_mode,
            trigger_mode: if flags & (1 << 4) != 0 {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: flags & (1 << 5) != 0,
            destination: Destination {
                id: word(0),
                mode: if flags & (1 << 3) != 0 {
                    DestinationMode::Logical
                } else {
                    DestinationMode::Physical
                },
                shorthand,
                x2apic_format: flags & (1 << 6) != 0,
            },
            source_id: (flags & (1 << 7) != 0).then(|| word(4)),
        })
    }
}

/// What a register write asks the caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicAction {
    /// Nothing.
    None,
    /// Route this IPI to its destination APICs (possibly on other nodes).
    Ipi(InterruptMessage),
    /// EOI of this level-triggered vector: tell the IOAPIC
    /// ([`crate::ioapic::IoApic::end_of_interrupt`]).
    EoiLevel(u8),
}

/// The addressing state of one local APIC: everything a router needs to decide
/// whether a message is for it. Small and `Copy` so a node can keep the state of
/// remote APICs too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ApicAddressing {
    /// Current APIC ID (x2APIC ID in x2APIC mode, 8-bit ID register otherwise).
    pub id: u32,
    /// Logical destination register.
    pub ldr: u32,
    /// DFR flat model (xAPIC); cluster model otherwise.
    pub flat_model: bool,
    /// In x2APIC mode.
    pub x2apic: bool,
    /// Hardware-enabled (IA32_APIC_BASE.EN). A disabled APIC accepts nothing.
    pub enabled: bool,
    /// Software-enabled (SVR bit 8). A software-disabled APIC still matches
    /// (it takes INIT, SIPI and NMI) but drops fixed interrupts, so
    /// lowest-priority arbitration passes over it (see [`route_targets`]).
    pub software_enabled: bool,
}

impl ApicAddressing {
    /// True if `dest` (without shorthand) selects this APIC.
    ///
    /// Broadcast is 0xFF for xAPIC-format destinations and 0xFFFF_FFFF for
    /// x2APIC-format ones, in both destination modes. An xAPIC-format message
    /// (e.g. from the IOAPIC) reaching an x2APIC-mode APIC is compared with its
    /// 32-bit ID / LDR, as KVM does.
    pub fn matches_destination(
        &self,
        dest: u32,
        mode: DestinationMode,
        x2apic_format: bool,
    ) -> bool {
        if !self.enabled {
            return false;
        }
        let broadcast = if x2apic_format { u32::MAX } else { 0xFF };
        if dest == broadcast {
            return true;
        }
        match mode {
            DestinationMode::Physical => dest == self.id,
            DestinationMode::Logical => {
                if self.x2apic {
                    // x2APIC cluster: bits 31:16 cluster, 15:0 member bitmap.
                    (dest >> 16) == (self.ldr >> 16) && (dest & self.ldr & 0xFFFF) != 0
                } else {
                    let d = dest & 0xFF;
                    let l = self.ldr >> 24;
                    if self.flat_model {
                        d & l != 0
                    } else {
                        (d >> 4) == (l >> 4) && (d & l & 0xF) != 0
                    }
                }
            }
        }
    }

    /// True if `msg` (shorthand included) is for this APIC.
    pub fn matches(&self, msg: &InterruptMessage) -> bool {
        if !self.enabled {
            return false;
        }
        match msg.destination.shorthand {
            Shorthand::None => self.matches_destination(
                msg.destination.id,
                msg.destination.mode,
                msg.destination.x2apic_format,
            ),
            Shorthand::SelfOnly => msg.source_id == Some(self.id),
            Shorthand::AllIncludingSelf => true,
            Shorthand::AllExcludingSelf => msg.source_id != Some(self.id),
        }
    }
}

/// The indices (into `apics`) of the APICs that must receive `msg`.
///
/// Lowest-priority delivery picks the matching APIC with the lowest APIC ID
/// (ties: the lowest index); real hardware arbitrates on task priority, which a
/// distributed VM cannot see cheaply and no guest relies on. A software-disabled
/// APIC would drop the interrupt, so it is chosen only when no software-enabled
/// APIC matches (KVM skips it likewise); then the interrupt is lost, as on
/// hardware.
pub fn route_targets(msg: &InterruptMessage, apics: &[ApicAddressing]) -> Vec<usize> {
    let matching = apics
        .iter()
        .enumerate()
        .filter(|(_, a)| a.matches(msg))
        .map(|(i, _)| i);
    if msg.delivery_mode == DeliveryMode::LowestPriority {
        matching
            .min_by_key(|&i| (!apics[i].software_enabled, apics[i].id, i))
            .into_iter()
            .collect()
    } else {
        matching.collect()
    }
}

/// One of the local vector table entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lvt {
    /// 0x320: timer.
    Timer,
    /// 0x330: thermal sensor.
    Thermal,
    /// 0x340: performance counters.
    Perf,
    /// 0x350: LINT0 pin.
    Lint0,
    /// 0x360: LINT1 pin.
    Lint1,
    /// 0x370: APIC error.
    Error,
}

impl Lvt {
    fn index(self) -> usize {
        self as usize
    }

    fn from_offset(reg: u32) -> Option<Self> {
        match reg {
            0x320 => Some(Self::Timer),
            0x330 => Some(Self::Thermal),
            0x340 => Some(Self::Perf),
            0x350 => Some(Self::Lint0),
            0x360 => Some(Self::Lint1),
            0x370 => Some(Self::Error),
            _ => None,
        }
    }

    /// Bits the guest can write.
    fn writable(self) -> u32 {
        match self {
            Self::Timer => 0xFF | LVT_MASKED | (3 << 17),
            Self::Thermal | Self::Perf => 0xFF | 0x700 | LVT_MASKED,
            Self::Lint0 | Self::Lint1 => 0xFF | 0x700 | (1 << 13) | (1 << 15) | LVT_MASKED,
            Self::Error => 0xFF | LVT_MASKED,
        }
    }
}

/// APIC timer mode (LVT timer bits 18:17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimerMode {
    /// 00 (and the reserved 11): count down once.
    OneShot,
    /// 01: count down and reload.
    Periodic,
    /// 10: fire when the guest TSC reaches IA32_TSC_DEADLINE.
    TscDeadline,
}

#[derive(Debug, Clone, Default)]
struct Timer {
    initial: u32,
    divide_reg: u32,
    /// Start of the current count-down (one-shot / periodic).
    start_ns: u64,
    /// Length of one count-down in ns (periodic: clamped to MIN_PERIODIC_NS).
    period_ns: u64,
    /// Next expiry, if armed.
    deadline_ns: Option<u64>,
    /// IA32_TSC_DEADLINE as the guest wrote it (0 = disarmed).
    tsc_deadline: u64,
}

fn divide_value(reg: u32) -> u64 {
    let code = (reg & 3) | ((reg >> 1) & 4);
    if code == 7 {
        1
    } else {
        2 << code
    }
}

fn bit_test(regs: &[u32; 8], v: u8) -> bool {
    regs[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}

fn bit_set(regs: &mut [u32; 8], v: u8) {
    regs[usize::from(v >> 5)] |= 1 << (v & 31);
}

fn bit_clear(regs: &mut [u32; 8], v: u8) {
    regs[usize::from(v >> 5)] &= !(1 << (v & 31));
}

fn highest(regs: &[u32; 8]) -> Option<u8> {
    regs.iter().enumerate().rev().find_map(|(i, &w)| {
        // i < 8 and the bit index < 32, so the vector fits in a u8.
        (w != 0).then(|| (i as u8) * 32 + (31 - w.leading_zeros() as u8))
    })
}

/// Why a register access failed (mapped to ESR or #GP by the caller).
enum RegFault {
    Invalid,
    ReadOnly,
    WriteOnly,
    Reserved,
}

/// One local APIC.
#[derive(Debug, Clone)]
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

    /// The guest TSC at `now_ns` corresponds to `tsc` (for TSC-deadline).
    pub fn set_tsc_reference(&mut self, now_ns: u64, tsc: u64) {
        self.tsc_ref_ns = now_ns;
        self.tsc_ref = tsc;
    }

    /// The VM clock (the `now_ns` of every method) stood still for `paused_ns`
    /// of real time (VM pause) while the guest TSC ran on: KVM keeps it running
    /// when the VMM just stops entering the guest. One-shot and periodic
    /// timers stay frozen with the clock; the TSC model and an armed
    /// TSC-deadline (a point on the guest's TSC, not on the VM clock) are moved
    /// so that the deadline still fires when the guest's TSC reaches it.
    pub fn clock_resumed(&mut self, paused_ns: u64) {
        let ticks = u128::from(paused_ns) * u128::from(self.tsc_khz) / 1_000_000;
        self.tsc_ref = self
            .tsc_ref
            .wrapping_add(u64::try_from(ticks).unwrap_or(u64::MAX));
        if self.timer_mode() == TimerMode::TscDeadline {
            if let Some(d) = self.timer.deadline_ns {
                self.timer.deadline_ns = Some(d.saturating_sub(paused_ns));
            }
        }
    }

    /// Guest TSC at `now_ns`, by the linear model of [`Self::set_tsc_reference`].
    pub fn tsc_at(&self, now_ns: u64) -> u64 {
        let dt = u128::from(now_ns.saturating_sub(self.tsc_ref_ns));
        let ticks = dt * u128::from(self.tsc_khz) / 1_000_000;
        self.tsc_ref
            .wrapping_add(u64::try_from(ticks).unwrap_or(u64::MAX))
    }

    fn tsc_ticks_to_ns(&self, ticks: u64) -> u64 {
        let ns = u128::from(ticks) * 1_000_000 / u128::from(self.tsc_khz);
        u64::try_from(ns).unwrap_or(u64::MAX)
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

    /// Processor priority register.
    pub fn ppr(&self) -> u8 {
        let isrv = highest(&self.isr).unwrap_or(0);
        let tpr = self.tpr as u8;
        if (tpr >> 4) >= (isrv >> 4) {
            tpr
        } else {
            isrv & 0xF0
        }
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

    /// True if `vector` is set in the IRR.
    pub fn irr_contains(&self, vector: u8) -> bool {
        bit_test(&self.irr, vector)
    }

    /// True if `vector` is set in the ISR.
    pub fn isr_contains(&self, vector: u8) -> bool {
        bit_test(&self.isr, vector)
    }

    /// True if `vector` is set in the TMR.
    pub fn tmr_contains(&self, vector: u8) -> bool {
        bit_test(&self.tmr, vector)
    }

    /// Raw value of an LVT entry.
    pub fn lvt(&self, lvt: Lvt) -> u32 {
        self.lvt[lvt.index()]
    }

    /// Current timer mode (from the LVT timer entry).
    pub fn timer_mode(&self) -> TimerMode {
        match (self.lvt[Lvt::Timer.index()] >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// The addressing state, for routers.
    pub fn addressing(&self) -> ApicAddressing {
        ApicAddressing {
            id: self.id(),
            ldr: self.ldr(),
            flat_model: (self.dfr >> 28) == DFR_FLAT,
            x2apic: self.mode() == ApicMode::X2Apic,
            enabled: self.mode() != ApicMode::Disabled,
            software_enabled: self.is_software_enabled(),
        }
    }

    /// See [`ApicAddressing::matches_destination`].
    pub fn matches_destination(
        &self,
        dest: u32,
        mode: DestinationMode,
        x2apic_format: bool,
    ) -> bool {
        self.addressing()
            .matches_destination(dest, mode, x2apic_format)
    }

    /// See [`ApicAddressing::matches`].
    pub fn matches(&self, msg: &InterruptMessage) -> bool {
        self.addressing().matches(msg)
    }

    /// True for the MSRs this module implements: IA32_APIC_BASE,
    /// IA32_TSC_DEADLINE and the x2APIC range.
    pub fn handles_msr(msr: u32) -> bool {
        msr == MSR_IA32_APIC_BASE
            || msr == MSR_IA32_TSC_DEADLINE
            || (X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr)
    }

    // ----------------------------------------------------------------------
    // Receiving side
    // ----------------------------------------------------------------------

    /// Accepts a message already routed to this APIC (see [`route_targets`]).
    /// Returns true if it had an effect.
    pub fn accept(&mut self, msg: &InterruptMessage) -> bool {
        match msg.delivery_mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.deliver_fixed(msg.vector, msg.trigger_mode == TriggerMode::Level)
            }
            DeliveryMode::Nmi => self.deliver_nmi(),
            DeliveryMode::Init => {
                if msg.trigger_mode == TriggerMode::Level && !msg.level {
                    false // INIT level de-assert: no-op on modern processors
                } else {
                    self.deliver_init()
                }
            }
            DeliveryMode::StartUp => self.deliver_sipi(msg.vector),
            DeliveryMode::Smi | DeliveryMode::ExtInt => false,
        }
    }

    /// A fixed interrupt: sets IRR (and TMR for level-triggered). Vectors 0-15
    /// are illegal (ESR bit 6); a software-disabled APIC drops it.
    pub fn deliver_fixed(&mut self, vector: u8, level_triggered: bool) -> bool {
        if self.mode() == ApicMode::Disabled {
            return false;
        }
        if vector < 16 {
            self.record_error(ESR_RECV_ILLEGAL_VECTOR);
            return false;
        }
        if !self.is_software_enabled() {
            return false;
        }
        bit_set(&mut self.irr, vector);
        if level_triggered {
            bit_set(&mut self.tmr, vector);
        } else {
            bit_clear(&mut self.tmr, vector);
        }
        true
    }

    /// An NMI (collected with [`Self::take_nmi`]).
    pub fn deliver_nmi(&mut self) -> bool {
        if self.mode() == ApicMode::Disabled {
            return false;
        }
        self.pending_nmi = true;
        true
    }

    /// An INIT (collected with [`Self::take_init`]). Drops an older SIPI.
    pub fn deliver_init(&mut self) -> bool {
        if self.mode() == ApicMode::Disabled {
            return false;
        }
        self.pending_init = true;
        self.pending_sipi = None;
        true
    }

    /// A start-up IPI; only latched while an INIT is pending or the vCPU waits
    /// for SIPI (otherwise ignored, as hardware does).
    pub fn deliver_sipi(&mut self, vector: u8) -> bool {
        if self.mode() == ApicMode::Disabled || !(self.pending_init || self.wait_for_sipi) {
            return false;
        }
        self.pending_sipi = Some(vector);
        true
    }

    /// Raises a local interrupt source through its LVT entry (e.g. the LINT0/1
    /// pins, thermal or performance-counter events). Returns true if delivered.
    pub fn raise_lvt(&mut self, lvt: Lvt) -> bool {
        let entry = self.lvt[lvt.index()];
        if entry & LVT_MASKED != 0 || self.mode() == ApicMode::Disabled {
            return false;
        }
        let vector = entry as u8;
        let mode = match lvt {
            Lvt::Timer | Lvt::Error => Some(DeliveryMode::Fixed),
            _ => DeliveryMode::from_bits(entry >> 8),
        };
        match mode {
            Some(DeliveryMode::Fixed) => {
                let level = matches!(lvt, Lvt::Lint0 | Lvt::Lint1) && entry & (1 << 15) != 0;
                self.deliver_fixed(vector, level)
            }
            Some(DeliveryMode::Nmi) => self.deliver_nmi(),
            Some(DeliveryMode::Init) => self.deliver_init(),
            _ => false,
        }
    }

    fn record_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let entry = self.lvt[Lvt::Error.index()];
        if entry & LVT_MASKED == 0 && self.is_software_enabled() {
            let vector = entry as u8;
            if vector >= 16 {
                bit_set(&mut self.irr, vector);
                bit_clear(&mut self.tmr, vector);
            } else {
                self.esr_pending |= ESR_RECV_ILLEGAL_VECTOR;
            }
        }
    }

    // ----------------------------------------------------------------------
    // Injection side
    // ----------------------------------------------------------------------

    /// The vector to inject now, if any: the highest IRR vector whose priority
    /// class is above the PPR's, when the APIC is enabled.
    pub fn pending_interrupt(&self) -> Option<u8> {
        if self.mode() == ApicMode::Disabled || !self.is_software_enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        ((v & 0xF0) > (self.ppr() & 0xF0)).then_some(v)
    }

    /// `vector` was injected (KVM_INTERRUPT succeeded): IRR -> ISR.
    pub fn acknowledge(&mut self, vector: u8) {
        self.note(b'I', vector);
        bit_clear(&mut self.irr, vector);
        bit_set(&mut self.isr, vector);
    }

    /// Takes a pending NMI.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.pending_nmi)
    }

    /// Takes a pending INIT. When true, the APIC has already been reset to its
    /// INIT state (ID, base and mode kept); the caller resets the vCPU and puts
    /// it in wait-for-SIPI.
    pub fn take_init(&mut self) -> bool {
        if !std::mem::take(&mut self.pending_init) {
            return false;
        }
        self.reset_registers();
        self.wait_for_sipi = true;
        true
    }

    /// Takes a SIPI while waiting for one: the vCPU starts in real mode at
    /// CS = vector << 8, IP = 0 (address vector << 12). `None` while an INIT is
    /// still pending (take it first).
    pub fn take_sipi(&mut self) -> Option<u8> {
        if self.pending_init || !self.wait_for_sipi {
            return None;
        }
        let v = self.pending_sipi.take()?;
        self.wait_for_sipi = false;
        Some(v)
    }

    /// The vCPU is in wait-for-SIPI (it must not run).
    pub fn is_waiting_for_sipi(&self) -> bool {
        self.wait_for_sipi
    }

    /// Anything that should wake a halted vCPU: an injectable interrupt, an
    /// NMI, an INIT or a SIPI.
    pub fn has_wake_event(&self) -> bool {
        self.pending_nmi
            || self.pending_init
            || (self.pending_sipi.is_some() && self.wait_for_sipi)
            || self.pending_interrupt().is_some()
    }

    // ----------------------------------------------------------------------
    // Timer
    // ----------------------------------------------------------------------

    /// The timer and interrupt state in one line, for diagnostics
    /// (`DVMM_TRACE_TIMER`).
    /// Record an event in the diagnostic trail (`kind`: I = injected, E = EOI of
    /// the vector, e = EOI with nothing in service, T = timer raised, others from
    /// the vCPU loop).
    pub fn note(&mut self, kind: u8, vector: u8) {
        self.hist[self.hist_at] = (kind, vector);
        self.hist_at = (self.hist_at + 1) % HIST;
    }

    pub fn timer_summary(&self, now_ns: u64) -> String {
        let trail: Vec<String> = (0..HIST)
            .map(|i| self.hist[(self.hist_at + i) % HIST])
            .filter(|(k, _)| *k != 0)
            .map(|(k, v)| format!("{}{v:x}", k as char))
            .collect();
        format!(
            "lvtt={:#x} deadline_in_us={:?} tsc_deadline={:#x} tsc_now={:#x} irr_top={:?} isr_top={:?} ppr={:#x} isr={:x?} trail={}",
            self.lvt[Lvt::Timer.index()],
            self.timer
                .deadline_ns
                .map(|d| (d as i128 - i128::from(now_ns)) / 1000),
            self.timer.tsc_deadline,
            self.tsc_at(now_ns),
            highest(&self.irr),
            highest(&self.isr),
            self.ppr(),
            self.isr,
            trail.join(",")
        )
    }

    /// When [`Self::advance`] must next be called, if the timer can fire
    /// (`None` when disarmed or masked: a masked timer is brought up to date
    /// lazily on the next access).
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if self.mode() == ApicMode::Disabled || self.lvt[Lvt::Timer.index()] & LVT_MASKED != 0 {
            return None;
        }
        self.timer.deadline_ns
    }

    /// Brings the timer to `now_ns`: on expiry raises the timer vector into the
    /// IRR (unless masked), rearms a periodic timer, disarms the others.
    /// Returns true if a vector was raised.
    pub fn advance(&mut self, now_ns: u64) -> bool {
        let Some(deadline) = self.timer.deadline_ns else {
            return false;
        };
        if now_ns < deadline {
            return false;
        }
        match self.timer_mode() {
            TimerMode::Periodic if self.timer.period_ns > 0 => {
                let p = self.timer.period_ns;
                let missed = (now_ns - deadline) / p;
                let start = deadline.saturating_add(missed.saturating_mul(p));
                self.timer.start_ns = start;
                self.timer.deadline_ns = Some(start.saturating_add(p));
            }
            TimerMode::TscDeadline => {
                self.timer.tsc_deadline = 0;
                self.timer.deadline_ns = None;
            }
            _ => self.timer.deadline_ns = None,
        }
        self.note(b'T', self.lvt[Lvt::Timer.index()] as u8);
        self.raise_lvt(Lvt::Timer)
    }

    fn timer_current_count(&self, now_ns: u64) -> u32 {
        let Some(deadline) = self.timer.deadline_ns else {
            return 0;
        };
        if self.timer_mode() == TimerMode::TscDeadline || self.timer.period_ns == 0 {
            return 0;
        }
        let div = divide_value(self.timer.divide_reg) * APIC_BUS_CYCLE_NS;
        let remaining = if self.timer_mode() == TimerMode::Periodic {
            let p = self.timer.period_ns;
            let elapsed = now_ns.saturating_sub(self.timer.start_ns);
            p - (elapsed % p)
        } else {
            deadline.saturating_sub(now_ns)
        };
        u32::try_from(remaining / div)
            .unwrap_or(u32::MAX)
            .min(self.timer.initial)
    }

    fn timer_start(&mut self, now_ns: u64) {
        let periodic = self.timer_mode() == TimerMode::Periodic;
        let t = &mut self.timer;
        if t.initial == 0 {
            t.deadline_ns = None;
            t.period_ns = 0;
            return;
        }
        let mut period = u64::from(t.initial) * divide_value(t.divide_reg) * APIC_BUS_CYCLE_NS;
        if periodic {
            period = period.max(MIN_PERIODIC_NS);
        }
        t.period_ns = period;
        t.start_ns = now_ns;
        t.deadline_ns = Some(now_ns.saturating_add(period));
    }

    fn timer_cancel(&mut self) {
        self.timer.initial = 0;
        self.timer.deadline_ns = None;
        self.timer.period_ns = 0;
        self.timer.tsc_deadline = 0;
    }

    fn write_divide(&mut self, value: u32, now_ns: u64) {
        let old = divide_value(self.timer.divide_reg);
        self.timer.divide_reg = value & 0xB;
        let new = divide_value(self.timer.divide_reg);
        if old == new || self.timer_mode() == TimerMode::TscDeadline {
            return;
        }
        if let Some(deadline) = self.timer.deadline_ns {
            // Rescale what is left of the current count-down.
            let remaining = deadline.saturating_sub(now_ns) / old * new;
            let mut period = u64::from(self.timer.initial) * new * APIC_BUS_CYCLE_NS;
            if self.timer_mode() == TimerMode::Periodic {
                period = period.max(MIN_PERIODIC_NS);
            }
            let deadline = now_ns.saturating_add(remaining);
            self.timer.period_ns = period;
            self.timer.deadline_ns = Some(deadline);
            self.timer.start_ns = deadline.saturating_sub(period);
        }
    }

    fn write_tsc_deadline(&mut self, value: u64, now_ns: u64) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return; // ignored outside TSC-deadline mode
        }
        self.timer.tsc_deadline = value;
        if value == 0 {
            self.timer.deadline_ns = None;
            return;
        }
        let now_tsc = self.tsc_at(now_ns);
        let delta = self.tsc_ticks_to_ns(value.saturating_sub(now_tsc));
        self.timer.deadline_ns = Some(now_ns.saturating_add(delta));
    }

    // ----------------------------------------------------------------------
    // Registers
    // ----------------------------------------------------------------------

    /// Writes IA32_APIC_BASE (mode switches: disabled <-> xAPIC -> x2APIC ->
    /// disabled; x2APIC -> xAPIC and disabled -> x2APIC are illegal). Disabling
    /// the APIC resets its registers. The BSP bit is read-only.
    pub fn set_apic_base(&mut self, value: u64) -> Result<()> {
        if value & APIC_BASE_RESERVED != 0 {
            return Err(ApicError::ReservedBits {
                msr: MSR_IA32_APIC_BASE,
                value,
            });
        }
        let from = self.mode();
        let to = match (value & APIC_BASE_ENABLE != 0, value & APIC_BASE_EXTD != 0) {
            (false, false) => ApicMode::Disabled,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
            (false, true) => return Err(ApicError::InvalidModeTransition { from, value }),
        };
        if matches!(
            (from, to),
            (ApicMode::Disabled, ApicMode::X2Apic) | (ApicMode::X2Apic, ApicMode::XApic)
        ) {
            return Err(ApicError::InvalidModeTransition { from, value });
        }
        self.base = (value & !APIC_BASE_BSP) | (self.base & APIC_BASE_BSP);
        if to == ApicMode::Disabled && from != ApicMode::Disabled {
            self.reset_registers();
            self.xapic_id = self.initial_id as u8;
            self.pending_init = false;
            self.pending_sipi = None;
        }
        Ok(())
    }

    fn read_register(&self, reg: u32, now_ns: u64) -> std::result::Result<u32, RegFault> {
        let x2 = self.mode() == ApicMode::X2Apic;
        Ok(match reg {
            REG_ID => {
                if x2 {
                    self.initial_id
                } else {
                    u32::from(self.xapic_id) << 24
                }
            }
            REG_VERSION => APIC_VERSION,
            REG_TPR => self.tpr,
            REG_APR | REG_RRD if !x2 => 0,
            REG_PPR => u32::from(self.ppr()),
            REG_EOI => return Err(RegFault::WriteOnly),
            REG_LDR => self.ldr(),
            REG_DFR if !x2 => self.dfr,
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr[((reg - REG_ISR) >> 4) as usize],
            0x180..=0x1F0 => self.tmr[((reg - REG_TMR) >> 4) as usize],
            0x200..=0x270 => self.irr[((reg - REG_IRR) >> 4) as usize],
            REG_ESR => self.esr,
            REG_ICR_LOW => self.icr_low,
            REG_ICR_HIGH if !x2 => self.icr_high,
            REG_LVT_TIMER..=REG_LVT_ERROR => match Lvt::from_offset(reg) {
                Some(l) => self.lvt[l.index()],
                None => return Err(RegFault::Invalid),
            },
            REG_TIMER_INITIAL => self.timer.initial,
            REG_TIMER_CURRENT => self.timer_current_count(now_ns),
            REG_TIMER_DIVIDE => self.timer.divide_reg,
            REG_SELF_IPI if x2 => return Err(RegFault::WriteOnly),
            _ => return Err(RegFault::Invalid),
        })
    }

    fn write_register(
        &mut self,
        reg: u32,
        val: u32,
        now_ns: u64,
    ) -> std::result::Result<ApicAction, RegFault> {
        let x2 = self.mode() == ApicMode::X2Apic;
        match reg {
            REG_ID => {
                if x2 {
                    return Err(RegFault::ReadOnly);
                }
                self.xapic_id = (val >> 24) as u8;
            }
            REG_TPR => self.tpr = val & 0xFF,
            REG_EOI => {
                if x2 && val != 0 {
                    return Err(RegFault::Reserved);
                }
                return Ok(self.eoi());
            }
            REG_LDR => {
                if x2 {
                    return Err(RegFault::ReadOnly);
                }
                self.ldr = val & 0xFF00_0000;
            }
            REG_DFR if !x2 => self.dfr = val | 0x0FFF_FFFF,
            REG_SVR => {
                self.svr = val & SVR_MASK;
                if !self.is_software_enabled() {
                    for e in self.lvt.iter_mut() {
                        *e |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => {
                if x2 && val != 0 {
                    return Err(RegFault::Reserved);
                }
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            REG_ICR_LOW => {
                self.icr_low = val & ICR_LOW_WRITABLE;
                return Ok(self.send_ipi());
            }
            REG_ICR_HIGH if !x2 => self.icr_high = val & 0xFF00_0000,
            REG_LVT_TIMER..=REG_LVT_ERROR => {
                let Some(lvt) = Lvt::from_offset(reg) else {
                    return Err(RegFault::Invalid);
                };
                let mut v = val & lvt.writable();
                if !self.is_software_enabled() {
                    v |= LVT_MASKED;
                }
                let old_mode = self.timer_mode();
                self.lvt[lvt.index()] = v;
                if lvt == Lvt::Timer && self.timer_mode() != old_mode {
                    self.timer_cancel();
                }
            }
            REG_TIMER_INITIAL => {
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.timer.initial = val;
                    self.timer_start(now_ns);
                }
            }
            REG_TIMER_DIVIDE => self.write_divide(val, now_ns),
            REG_SELF_IPI if x2 => {
                // SDM 11.12.11: only the vector (bits 7:0) is defined; a value
                // with any other bit set is a #GP (bits 63:32 are caught by
                // msr_write before this point).
                if val & !0xFF != 0 {
                    return Err(RegFault::Reserved);
                }
                self.deliver_fixed(val as u8, false);
            }
            REG_VERSION | REG_PPR | REG_TIMER_CURRENT | 0x100..=0x270 => {
                return Err(RegFault::ReadOnly)
            }
            REG_APR | REG_RRD if !x2 => return Err(RegFault::ReadOnly),
            _ => return Err(RegFault::Invalid),
        }
        Ok(ApicAction::None)
    }

    fn eoi(&mut self) -> ApicAction {
        let Some(v) = highest(&self.isr) else {
            self.note(b'e', 0);
            return ApicAction::None;
        };
        self.note(b'E', v);
        bit_clear(&mut self.isr, v);
        if bit_test(&self.tmr, v) {
            ApicAction::EoiLevel(v)
        } else {
            ApicAction::None
        }
    }

    /// Sends the IPI described by ICR.
    fn send_ipi(&mut self) -> ApicAction {
        let low = self.icr_low;
        let x2 = self.mode() == ApicMode::X2Apic;
        let vector = low as u8;
        let Some(delivery_mode) = DeliveryMode::from_bits(low >> 8) else {
            return ApicAction::None; // reserved encoding: ignored
        };
        let trigger_mode = if low & ICR_TRIGGER_LEVEL != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        };
        let level = low & ICR_LEVEL_ASSERT != 0;
        match delivery_mode {
            DeliveryMode::Smi | DeliveryMode::ExtInt => return ApicAction::None,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority if vector < 16 => {
                self.record_error(ESR_SEND_ILLEGAL_VECTOR);
                return ApicAction::None;
            }
            DeliveryMode::Init if trigger_mode == TriggerMode::Level && !level => {
                return ApicAction::None; // INIT level de-assert
            }
            _ => {}
        }
        let shorthand = match (low >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        if shorthand == Shorthand::SelfOnly {
            // Only fixed delivery is valid with the self shorthand.
            if delivery_mode == DeliveryMode::Fixed {
                self.deliver_fixed(vector, trigger_mode == TriggerMode::Level);
            }
            return ApicAction::None;
        }
        ApicAction::Ipi(InterruptMessage {
            vector,
            delivery_mode,
            trigger_mode,
            level: true,
            destination: Destination {
                id: if x2 {
                    self.icr_high
                } else {
                    self.icr_high >> 24
                },
                mode: if low & ICR_DEST_LOGICAL != 0 {
                    DestinationMode::Logical
                } else {
                    DestinationMode::Physical
                },
                shorthand,
                x2apic_format: x2,
            },
            source_id: Some(self.id()),
        })
    }

    /// A guest read of the xAPIC page at `offset` (0..0x1000). Registers are
    /// 32 bits wide at 16-byte strides; narrower reads get the addressed bytes.
    /// Reads outside any register give zeros (and set ESR bit 7).
    ///
    /// While the APIC is globally disabled (IA32_APIC_BASE.EN = 0) or in x2APIC
    /// mode the page does not decode as the APIC (SDM 11.4.3, 11.12.1): the
    /// read hits nothing and gives all ones, as under QEMU/KVM.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], now_ns: u64) {
        if self.mode() != ApicMode::XApic {
            data.fill(0xFF);
            return;
        }
        data.fill(0);
        if offset >= APIC_MMIO_SIZE {
            return;
        }
        self.advance(now_ns);
        let reg = (offset & !0xF) as u32;
        let value = match self.read_register(reg, now_ns) {
            Ok(v) => v,
            Err(RegFault::WriteOnly) => 0,
            Err(_) => {
                self.record_error(ESR_ILLEGAL_REGISTER);
                0
            }
        };
        let bytes = value.to_le_bytes();
        let start = (offset & 0xF) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            if let Some(b) = bytes.get(start + i) {
                *d = *b;
            }
        }
    }

    /// A guest write to the xAPIC page. Only aligned 32-bit writes to
    /// registers are honoured; anything else is ignored. Like reads, writes
    /// while globally disabled or in x2APIC mode reach no APIC and are dropped.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now_ns: u64) -> ApicAction {
        if self.mode() != ApicMode::XApic || offset >= APIC_MMIO_SIZE || offset & 0xF != 0 {
            return ApicAction::None;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return ApicAction::None;
        };
        self.advance(now_ns);
        match self.write_register(offset as u32, u32::from_le_bytes(bytes), now_ns) {
            Ok(action) => action,
            Err(RegFault::Invalid) => {
                self.record_error(ESR_ILLEGAL_REGISTER);
                ApicAction::None
            }
            Err(_) => ApicAction::None,
        }
    }

    /// `rdmsr` of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register.
    pub fn msr_read(&mut self, msr: u32, now_ns: u64) -> Result<u64> {
        match msr {
            MSR_IA32_APIC_BASE => return Ok(self.base),
            MSR_IA32_TSC_DEADLINE => {
                self.advance(now_ns);
                return Ok(if self.timer_mode() == TimerMode::TscDeadline {
                    self.timer.tsc_deadline
                } else {
                    0
                });
            }
            X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => {}
            _ => return Err(ApicError::InvalidMsr(msr)),
        }
        if self.mode() != ApicMode::X2Apic {
            return Err(ApicError::NotX2Apic(msr));
        }
        self.advance(now_ns);
        let reg = (msr - X2APIC_MSR_FIRST) << 4;
        match self.read_register(reg, now_ns) {
            Ok(v) if reg == REG_ICR_LOW => Ok(u64::from(self.icr_high) << 32 | u64::from(v)),
            Ok(v) => Ok(u64::from(v)),
            Err(RegFault::WriteOnly) => Err(ApicError::WriteOnly(msr)),
            Err(_) => Err(ApicError::InvalidMsr(msr)),
        }
    }

    /// `wrmsr` of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register.
    pub fn msr_write(&mut self, msr: u32, value: u64, now_ns: u64) -> Result<ApicAction> {
        match msr {
            MSR_IA32_APIC_BASE => {
                self.set_apic_base(value)?;
                return Ok(ApicAction::None);
            }
            MSR_IA32_TSC_DEADLINE => {
                self.advance(now_ns);
                self.write_tsc_deadline(value, now_ns);
                return Ok(ApicAction::None);
            }
            X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => {}
            _ => return Err(ApicError::InvalidMsr(msr)),
        }
        if self.mode() != ApicMode::X2Apic {
            return Err(ApicError::NotX2Apic(msr));
        }
        let reg = (msr - X2APIC_MSR_FIRST) << 4;
        let low = if reg == REG_ICR_LOW {
            self.icr_high = (value >> 32) as u32;
            value as u32
        } else {
            u32::try_from(value).map_err(|_| ApicError::ReservedBits { msr, value })?
        };
        self.advance(now_ns);
        self.write_register(reg, low, now_ns).map_err(|f| match f {
            RegFault::ReadOnly => ApicError::ReadOnly(msr),
            RegFault::Reserved => ApicError::ReservedBits { msr, value },
            RegFault::Invalid | RegFault::WriteOnly => ApicError::InvalidMsr(msr),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_000_000_000;

    fn rd(apic: &mut LocalApic, off: u64, now: u64) -> u32 {
        let mut b = [0u8; 4];
        apic.mmio_read(off, &mut b, now);
        u32::from_le_bytes(b)
    }

    fn wr(apic: &mut LocalApic, off: u64, v: u32, now: u64) -> ApicAction {
        apic.mmio_write(off, &v.to_le_bytes(), now)
    }

    /// A software-enabled xAPIC (SVR 0x1FF).
    fn enabled(id: u32) -> LocalApic {
        let mut a = LocalApic::new(id, id == 0, 2_000_000);
        wr(&mut a, 0xF0, 0x1FF, 0);
        a
    }

    fn x2(id: u32) -> LocalApic {
        let mut a = enabled(id);
        a.msr_write(
            MSR_IA32_APIC_BASE,
            APIC_DEFAULT_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD,
            0,
        )
        .unwrap();
        a
    }

    fn ipi(action: ApicAction) -> InterruptMessage {
        match action {
            ApicAction::Ipi(m) => m,
            other => panic!("expected an IPI, got {other:?}"),
        }
    }

    // ---------------------------------------------------------------- basics

    #[test]
    fn power_on_state() {
        let mut a = LocalApic::new(3, false, 0);
        assert_eq!(a.mode(), ApicMode::XApic);
        assert_eq!(a.apic_base(), APIC_DEFAULT_BASE | APIC_BASE_ENABLE);
        assert_eq!(rd(&mut a, 0x20, 0), 3 << 24);
        assert_eq!(rd(&mut a, 0x30, 0), 0x50014);
        assert_eq!(rd(&mut a, 0xF0, 0), 0xFF);
        assert_eq!(rd(&mut a, 0xE0, 0), 0xFFFF_FFFF);
        for off in (0x320..=0x370).step_by(0x10) {
            assert_eq!(rd(&mut a, off, 0), 0x10000, "LVT {off:#x}");
        }
        assert!(a.is_waiting_for_sipi());
        let b = LocalApic::new(0, true, 0);
        assert!(b.is_bsp() && !b.is_waiting_for_sipi());
        assert_eq!(b.apic_base() & APIC_BASE_BSP, APIC_BASE_BSP);
    }

    #[test]
    fn xapic_register_access() {
        let mut a = enabled(1);
        wr(&mut a, 0x20, 0x0700_0000, 0);
        assert_eq!(a.id(), 7);
        wr(&mut a, 0x80, 0x1234_5650, 0);
        assert_eq!(rd(&mut a, 0x80, 0), 0x50);
        assert_eq!(a.cr8(), 5);
        a.set_cr8(0x3);
        assert_eq!(a.tpr(), 0x30);
        wr(&mut a, 0xD0, 0xFFFF_FFFF, 0);
        assert_eq!(rd(&mut a, 0xD0, 0), 0xFF00_0000);
        wr(&mut a, 0xE0, 0, 0);
        assert_eq!(rd(&mut a, 0xE0, 0), 0x0FFF_FFFF);
        // read-only registers ignore writes
        wr(&mut a, 0x30, 0, 0);
        assert_eq!(rd(&mut a, 0x30, 0), APIC_VERSION);
        // byte read of the version's max-LVT byte
        let mut b = [0u8; 1];
        a.mmio_read(0x32, &mut b, 0);
        assert_eq!(b[0], 5);
        // ICR high keeps only bits 31:24
        wr(&mut a, 0x310, 0xABCD_EF12, 0);
        assert_eq!(rd(&mut a, 0x310, 0), 0xAB00_0000);
    }

    #[test]
    fn garbage_accesses_do_not_panic() {
        let mut a = enabled(0);
        for off in [
            0u64,
            0x10,
            0x40,
            0x2F0,
            0x3A0,
            0x3F0,
            0xFF0,
            0xFFF,
            0x1000,
            u64::MAX,
        ] {
            let mut big = [0xAAu8; 16];
            a.mmio_read(off, &mut big, 0);
            let mut empty = [];
            a.mmio_read(off, &mut empty, 0);
            assert_eq!(a.mmio_write(off, &[1, 2, 3], 0), ApicAction::None);
            assert_eq!(a.mmio_write(off, &[], 0), ApicAction::None);
            assert_eq!(a.mmio_write(off, &[0xFF; 8], 0), ApicAction::None);
            let _ = a.mmio_write(off, &[0xFF; 4], 0);
        }
        // unaligned 32-bit write inside a register: ignored
        wr(&mut a, 0x81, 0xFF, 0);
        assert_eq!(a.tpr(), 0);
    }

    #[test]
    fn esr_illegal_register_and_latching() {
        let mut a = enabled(0);
        wr(&mut a, 0x370, 0x50, 0); // error LVT vector 0x50 unmasked
        assert_eq!(rd(&mut a, 0x40, 0), 0);
        assert_eq!(rd(&mut a, 0x280, 0), 0, "ESR is only updated by a write");
        wr(&mut a, 0x280, 0, 0);
        assert_eq!(rd(&mut a, 0x280, 0), ESR_ILLEGAL_REGISTER);
        assert!(a.irr_contains(0x50), "error LVT raised");
        wr(&mut a, 0x280, 0, 0);
        assert_eq!(rd(&mut a, 0x280, 0), 0);
        // send illegal vector
        wr(&mut a, 0x310, 1 << 24, 0);
        assert_eq!(wr(&mut a, 0x300, 0x05, 0), ApicAction::None);
        wr(&mut a, 0x280, 0, 0);
        assert_eq!(a.esr(), ESR_SEND_ILLEGAL_VECTOR);
        // receive illegal vector
        assert!(!a.deliver_fixed(3, false));
        wr(&mut a, 0x280, 0, 0);
        assert_eq!(a.esr(), ESR_RECV_ILLEGAL_VECTOR);
        assert!(!a.irr_contains(3));
    }

    #[test]
    fn error_lvt_with_illegal_vector_does_not_loop() {
        let mut a = enabled(0);
        wr(&mut a, 0x370, 0x02, 0);
        a.deliver_fixed(1, false);
        wr(&mut a, 0x280, 0, 0);
        assert_eq!(a.esr(), ESR_RECV_ILLEGAL_VECTOR);
    }

    #[test]
    fn software_disable_masks_lvts_and_drops_fixed() {
        let mut a = enabled(0);
        wr(&mut a, 0x350, 0x30, 0);
        assert_eq!(a.lvt(Lvt::Lint0), 0x30);
        wr(&mut a, 0xF0, 0xFF, 0);
        assert_eq!(a.lvt(Lvt::Lint0), 0x10030);
        wr(&mut a, 0x350, 0x30, 0);
        assert_eq!(a.lvt(Lvt::Lint0), 0x10030, "mask stays set while disabled");
        assert!(!a.deliver_fixed(0x40, false));
        assert!(a.deliver_nmi(), "NMI accepted while software-disabled");
        assert!(a.deliver_init());
    }

    // ---------------------------------------------------- EOI / ISR / priority

    #[test]
    fn nested_priority_and_eoi_order() {
        let mut a = enabled(0);
        a.deliver_fixed(0x31, false);
        assert_eq!(a.pending_interrupt(), Some(0x31));
        a.acknowledge(0x31);
        assert!(a.isr_contains(0x31) && !a.irr_contains(0x31));
        assert_eq!(a.ppr(), 0x30);
        // same class: blocked
        a.deliver_fixed(0x35, false);
        assert_eq!(a.pending_interrupt(), None);
        // higher class nests
        a.deliver_fixed(0x61, false);
        assert_eq!(a.pending_interrupt(), Some(0x61));
        a.acknowledge(0x61);
        assert_eq!(a.ppr(), 0x60);
        assert_eq!(a.pending_interrupt(), None);
        // EOI clears the highest ISR bit first
        assert_eq!(wr(&mut a, 0xB0, 0, 0), ApicAction::None);
        assert!(!a.isr_contains(0x61) && a.isr_contains(0x31));
        assert_eq!(a.pending_interrupt(), None, "0x35 still blocked by 0x31");
        wr(&mut a, 0xB0, 0, 0);
        assert_eq!(a.pending_interrupt(), Some(0x35));
        // EOI with an empty ISR is harmless
        a.acknowledge(0x35);
        wr(&mut a, 0xB0, 0, 0);
        assert_eq!(wr(&mut a, 0xB0, 0, 0), ApicAction::None);
    }

    #[test]
    fn highest_irr_first() {
        let mut a = enabled(0);
        for v in [0x20, 0xFE, 0x80, 0x41] {
            a.deliver_fixed(v, false);
        }
        let mut order = vec![];
        while let Some(v) = a.pending_interrupt() {
            a.acknowledge(v);
            order.push(v);
            wr(&mut a, 0xB0, 0, 0);
        }
        assert_eq!(order, vec![0xFE, 0x80, 0x41, 0x20]);
    }

    #[test]
    fn tpr_masks_interrupts() {
        let mut a = enabled(0);
        wr(&mut a, 0x80, 0x50, 0);
        a.deliver_fixed(0x55, false);
        assert_eq!(a.pending_interrupt(), None);
        assert_eq!(a.ppr(), 0x50);
        a.deliver_fixed(0x60, false);
        assert_eq!(a.pending_interrupt(), Some(0x60));
        wr(&mut a, 0x80, 0x40, 0);
        assert_eq!(a.pending_interrupt(), Some(0x60));
        a.acknowledge(0x60);
        // PPR = ISR class when higher than TPR
        assert_eq!(rd(&mut a, 0xA0, 0), 0x60);
        wr(&mut a, 0xB0, 0, 0);
        assert_eq!(a.pending_interrupt(), Some(0x55));
    }

    #[test]
    fn level_triggered_eoi_reported() {
        let mut a = enabled(0);
        a.deliver_fixed(0x40, true);
        assert!(a.tmr_contains(0x40));
        assert_eq!(rd(&mut a, 0x180 + 0x20, 0), 1, "TMR word 2 bit 0");
        a.acknowledge(0x40);
        assert_eq!(rd(&mut a, 0x100 + 0x20, 0), 1, "ISR word 2 bit 0");
        assert_eq!(wr(&mut a, 0xB0, 0, 0), ApicAction::EoiLevel(0x40));
        // edge delivery of the same vector clears TMR
        a.deliver_fixed(0x40, false);
        assert!(!a.tmr_contains(0x40));
        a.acknowledge(0x40);
        assert_eq!(wr(&mut a, 0xB0, 0, 0), ApicAction::None);
    }

    #[test]
    fn irr_visible_through_mmio() {
        let mut a = enabled(0);
        a.deliver_fixed(0xEF, false);
        assert_eq!(rd(&mut a, 0x270, 0), 1 << 15);
    }

    #[test]
    fn disabled_apic_never_injects() {
        let mut a = enabled(0);
        a.deliver_fixed(0x40, false);
        wr(&mut a, 0xF0, 0xFF, 0);
        assert_eq!(a.pending_interrupt(), None, "held while software-disabled");
        wr(&mut a, 0xF0, 0x1FF, 0);
        assert_eq!(a.pending_interrupt(), Some(0x40));
    }

    // ----------------------------------------------------------------- timer

    #[test]
    fn divide_values() {
        let expect = [
            (0x0, 2),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xA, 128),
            (0xB, 1),
        ];
        for (reg, div) in expect {
            assert_eq!(divide_value(reg), div, "reg {reg:#x}");
        }
    }

    #[test]
    fn timer_one_shot() {
        let mut a = enabled(0);
        wr(&mut a, 0x3E0, 0xB, T0); // divide by 1
        wr(&mut a, 0x320, 0x40, T0); // one-shot, vector 0x40
        wr(&mut a, 0x380, 1000, T0);
        assert_eq!(a.next_deadline_ns(), Some(T0 + 1000));
        assert_eq!(rd(&mut a, 0x390, T0), 1000);
        assert_eq!(rd(&mut a, 0x390, T0 + 400), 600);
        assert!(!a.advance(T0 + 999));
        assert!(a.advance(T0 + 1000));
        assert!(a.irr_contains(0x40));
        assert_eq!(a.next_deadline_ns(), None);
        assert_eq!(rd(&mut a, 0x390, T0 + 1500), 0);
        assert_eq!(rd(&mut a, 0x380, T0 + 1500), 1000, "initial count kept");
        assert!(!a.advance(T0 + 5000));
    }

    #[test]
    fn timer_divider_scales_period_and_count() {
        let mut a = enabled(0);
        wr(&mut a, 0x3E0, 0x3, T0); // divide by 16
        wr(&mut a, 0x320, 0x40, T0);
        wr(&mut a, 0x380, 100, T0);
        assert_eq!(a.next_deadline_ns(), Some(T0 + 1600));
        assert_eq!(rd(&mut a, 0x390, T0 + 160), 90);
        // switching the divider halfway rescales what is left
        wr(&mut a, 0x3E0, 0xB, T0 + 800); // now divide by 1: 50 counts left
        assert_eq!(rd(&mut a, 0x390, T0 + 800), 50);
        assert_eq!(a.next_deadline_ns(), Some(T0 + 850));
    }

    #[test]
    fn timer_periodic_rearms_and_catches_up() {
        let mut a = enabled(0);
        wr(&mut a, 0x3E0, 0xB, T0);
        wr(&mut a, 0x320, 0x20040, T0); // periodic
        wr(&mut a, 0x380, 1_000_000, T0); // 1 ms
        assert_eq!(a.timer_mode(), TimerMode::Periodic);
        assert!(a.advance(T0 + 1_000_000));
        assert_eq!(a.next_deadline_ns(), Some(T0 + 2_000_000));
        a.acknowledge(0x40);
        wr(&mut a, 0xB0, 0, T0 + 1_000_100);
        assert_eq!(rd(&mut a, 0x390, T0 + 1_250_000), 750_000);
        // late by 3.5 periods: one interrupt, next deadline on the grid
        assert!(a.advance(T0 + 5_500_000));
        assert_eq!(a.next_deadline_ns(), Some(T0 + 6_000_000));
        assert_eq!(rd(&mut a, 0x390, T0 + 5_500_000), 500_000);
    }

    #[test]
    fn timer_periodic_minimum_period() {
        let mut a = enabled(0);
        wr(&mut a, 0x3E0, 0xB, T0);
        wr(&mut a, 0x320, 0x20040, T0);
        wr(&mut a, 0x380, 10, T0);
        assert_eq!(a.next_deadline_ns(), Some(T0 + MIN_PERIODIC_NS));
        assert!(rd(&mut a, 0x390, T0 + 1) <= 10);
    }

    #[test]
    fn timer_masked_does_not_raise() {
        let mut a = enabled(0);
        wr(&mut a, 0x3E0, 0xB, T0);
        wr(&mut a, 0x320, 0x10040, T0); // masked one-shot
        wr(&mut a, 0x380, 100, T0);
        assert_eq!(a.next_deadline_ns(), None, "masked: no wake-up needed");
        assert_eq!(rd(&mut a, 0x390, T0 + 50), 50, "still counts");
        assert!(!a.advance(T0 + 200));
        assert!(!a.irr_contains(0x40));
        // unmasking after expiry does not raise a stale interrupt
        wr(&mut a, 0x320, 0x40, T0 + 300);
        assert!(!a.advance(T0 + 400));
        assert!(!a.irr_contains(0x40));
    }

    #[test]
    fn timer_stop_and_mode_change() {
        let mut a = enabled(0);
        wr(&mut a, 0x320, 0x40, T0);
        wr(&mut a, 0x380, 100, T0);
        wr(&mut a, 0x380, 0, T0 + 10);
        assert_eq!(a.next_deadline_ns(), None);
        wr(&mut a, 0x380, 100, T0);
        wr(&mut a, 0x320, 0x20040, T0 + 10); // mode change disarms
        assert_eq!(a.next_deadline_ns(), None);
        assert_eq!(rd(&mut a, 0x380, T0 + 10), 0);
    }

    #[test]
    fn timer_tsc_deadline() {
        // 2 GHz TSC: 2 ticks per ns.
        let mut a = enabled(0);
        a.set_tsc_reference(T0, 10_000);
        // not in TSC-deadline mode: writes ignored, reads 0
        a.msr_write(MSR_IA32_TSC_DEADLINE, 50_000, T0).unwrap();
        assert_eq!(a.msr_read(MSR_IA32_TSC_DEADLINE, T0).unwrap(), 0);
        wr(&mut a, 0x320, 0x40040, T0);
        assert_eq!(a.timer_mode(), TimerMode::TscDeadline);
        // initial-count writes ignored in this mode
        wr(&mut a, 0x380, 5, T0);
        assert_eq!(a.next_deadline_ns(), None);
        a.msr_write(MSR_IA32_TSC_DEADLINE, 12_000, T0).unwrap();
        assert_eq!(a.next_deadline_ns(), Some(T0 + 1000));
        assert_eq!(a.msr_read(MSR_IA32_TSC_DEADLINE, T0).unwrap(), 12_000);
        assert_eq!(rd(&mut a, 0x390, T0), 0);
        assert!(!a.advance(T0 + 999));
        assert!(a.advance(T0 + 1000));
        assert!(a.irr_contains(0x40));
        assert_eq!(a.msr_read(MSR_IA32_TSC_DEADLINE, T0 + 1000).unwrap(), 0);
        // deadline in the past fires immediately; 0 disarms
        a.msr_write(MSR_IA32_TSC_DEADLINE, 1, T0 + 2000).unwrap();
        assert_eq!(a.next_deadline_ns(), Some(T0 + 2000));
        a.msr_write(MSR_IA32_TSC_DEADLINE, 0, T0 + 2000).unwrap();
        assert_eq!(a.next_deadline_ns(), None);
        // leaving TSC-deadline mode disarms
        a.msr_write(MSR_IA32_TSC_DEADLINE, 100_000, T0 + 2000)
            .unwrap();
        wr(&mut a, 0x320, 0x40, T0 + 2000);
        assert_eq!(a.next_deadline_ns(), None);
    }

    #[test]
    fn frozen_clock_freezes_timers_and_tsc_deadline_follows_the_tsc() {
        // One-shot timer armed for 1000 ticks at divide 1 (1 GHz bus: 1 us).
        let mut a = enabled(0);
        wr(&mut a, 0x320, 0x40, T0); // one-shot, vector 0x40
        wr(&mut a, 0x3E0, 0xB, T0); // divide by 1
        wr(&mut a, 0x380, 1000, T0);
        let deadline = a.next_deadline_ns().unwrap();
        let count = rd(&mut a, 0x390, T0 + 400);
        // The VM clock stands still for a long pause: the vCPU sees the same
        // VM time afterwards, so nothing fired and the count did not move.
        a.clock_resumed(3_000_000_000);
        assert_eq!(a.next_deadline_ns(), Some(deadline));
        assert!(!a.advance(T0 + 400));
        assert_eq!(rd(&mut a, 0x390, T0 + 400), count);
        assert!(a.advance(deadline));
        assert_eq!(a.pending_interrupt(), Some(0x40));

        // TSC-deadline: 2 GHz TSC; a deadline 1 ms ahead of the guest TSC.
        let mut t = enabled(1);
        t.set_tsc_reference(T0, 10_000);
        wr(&mut t, 0x320, 0x41 | (2 << 17), T0);
        let dl = t.tsc_at(T0) + 2_000_000;
        t.msr_write(MSR_IA32_TSC_DEADLINE, dl, T0).unwrap();
        assert_eq!(t.next_deadline_ns(), Some(T0 + 1_000_000));
        // Paused 400 us at VM time T0: the guest TSC ran 800k ticks meanwhile,
        // so at VM time T0 (just resumed) the TSC reads 800k more, and the
        // deadline is 600 us of VM time away.
        t.clock_resumed(400_000);
        assert_eq!(t.tsc_at(T0), 10_000 + 800_000);
        assert_eq!(t.next_deadline_ns(), Some(T0 + 600_000));
        assert_eq!(t.msr_read(MSR_IA32_TSC_DEADLINE, T0).unwrap(), dl);
        assert!(!t.advance(T0 + 599_999));
        assert!(t.advance(T0 + 600_000));
        // A pause longer than what was left: due at once on resume.
        t.msr_write(
            MSR_IA32_TSC_DEADLINE,
            t.tsc_at(T0 + 600_000) + 1000,
            T0 + 600_000,
        )
        .unwrap();
        t.clock_resumed(1_000_000);
        assert!(t.advance(T0 + 600_000));
        // No timer armed: only the TSC model moves.
        let mut idle = enabled(2);
        idle.clock_resumed(5);
        assert_eq!(idle.next_deadline_ns(), None);
    }

    #[test]
    fn tsc_conversion_huge_values() {
        let mut a = LocalApic::new(0, true, 4_000_000);
        a.set_tsc_reference(0, 0);
        assert_eq!(a.tsc_at(1_000_000_000), 4_000_000_000);
        assert_eq!(a.tsc_at(u64::MAX), u64::MAX);
        wr(&mut a, 0xF0, 0x1FF, 0);
        wr(&mut a, 0x320, 0x40040, 0);
        a.msr_write(MSR_IA32_TSC_DEADLINE, u64::MAX, 0).unwrap();
        assert!(a.next_deadline_ns().is_some());
    }

    #[test]
    fn lint_lvt_delivery() {
        let mut a = enabled(0);
        wr(&mut a, 0x360, 0x400, 0); // LINT1: NMI
        assert!(a.raise_lvt(Lvt::Lint1));
        assert!(a.take_nmi());
        assert!(!a.take_nmi());
        wr(&mut a, 0x350, 0x8045, 0); // LINT0 fixed level
        assert!(a.raise_lvt(Lvt::Lint0));
        assert!(a.irr_contains(0x45) && a.tmr_contains(0x45));
        wr(&mut a, 0x350, 0x700, 0); // ExtINT: no PIC
        assert!(!a.raise_lvt(Lvt::Lint0));
        wr(&mut a, 0x340, 0x10050, 0);
        assert!(!a.raise_lvt(Lvt::Perf));
    }

    // ------------------------------------------------------------------- ICR

    #[test]
    fn icr_fixed_physical() {
        let mut a = enabled(2);
        wr(&mut a, 0x310, 5 << 24, 0);
        let m = ipi(wr(&mut a, 0x300, 0x4041, 0));
        assert_eq!(m.vector, 0x41);
        assert_eq!(m.delivery_mode, DeliveryMode::Fixed);
        assert_eq!(m.destination.id, 5);
        assert_eq!(m.destination.mode, DestinationMode::Physical);
        assert_eq!(m.destination.shorthand, Shorthand::None);
        assert!(!m.destination.x2apic_format);
        assert_eq!(m.source_id, Some(2));
        assert_eq!(rd(&mut a, 0x300, 0) & (1 << 12), 0, "delivery status idle");
        assert_eq!(rd(&mut a, 0x300, 0), 0x4041);
    }

    #[test]
    fn icr_delivery_modes() {
        let mut a = enabled(0);
        wr(&mut a, 0x310, 1 << 24, 0);
        let cases = [
            (0x0100 | 0x30, DeliveryMode::LowestPriority),
            (0x0400, DeliveryMode::Nmi),
            (0x4500, DeliveryMode::Init),
            (0x0600 | 0x9A, DeliveryMode::StartUp),
        ];
        for (low, dm) in cases {
            let m = ipi(wr(&mut a, 0x300, low, 0));
            assert_eq!(m.delivery_mode, dm);
            assert_eq!(m.vector, low as u8);
        }
        // INIT level de-assert: nothing sent
        assert_eq!(wr(&mut a, 0x300, 0x8500, 0), ApicAction::None);
        // SMI, reserved encodings, ExtINT: nothing sent
        for low in [0x0200, 0x0300, 0x0700] {
            assert_eq!(wr(&mut a, 0x300, low | 0x40, 0), ApicAction::None);
        }
    }

    #[test]
    fn icr_shorthands() {
        let mut a = enabled(4);
        assert_eq!(wr(&mut a, 0x300, 0x40000 | 0x77, 0), ApicAction::None);
        assert!(a.irr_contains(0x77), "self IPI delivered locally");
        let m = ipi(wr(&mut a, 0x300, 0x80000 | 0x78, 0));
        assert_eq!(m.destination.shorthand, Shorthand::AllIncludingSelf);
        let m2 = ipi(wr(&mut a, 0x300, 0xC0000 | 0x79, 0));
        assert_eq!(m2.destination.shorthand, Shorthand::AllExcludingSelf);
        let me = a.addressing();
        let other = enabled(5).addressing();
        assert!(me.matches(&m) && other.matches(&m));
        assert!(!me.matches(&m2) && other.matches(&m2));
    }

    #[test]
    fn x2apic_icr_and_self_ipi() {
        let mut a = x2(0x1234);
        let m = ipi(a
            .msr_write(0x830, (0x0001_0002u64 << 32) | 0x0840, 0)
            .unwrap());
        assert_eq!(m.destination.id, 0x0001_0002);
        assert_eq!(m.destination.mode, DestinationMode::Logical);
        assert!(m.destination.x2apic_format);
        assert_eq!(m.source_id, Some(0x1234));
        assert_eq!(
            a.msr_read(0x830, 0).unwrap(),
            (0x0001_0002u64 << 32) | 0x0840
        );
        a.msr_write(0x83F, 0x66, 0).unwrap();
        assert!(a.irr_contains(0x66));
        assert_eq!(a.msr_read(0x83F, 0), Err(ApicError::WriteOnly(0x83F)));
    }

    #[test]
    fn x2apic_self_ipi_reserved_bits_gp() {
        let mut a = x2(3);
        // Bits 8-31 and 32-63 are reserved: #GP, and no interrupt is raised.
        for value in [0x166u64, 0x8000_0066, 1 << 32 | 0x66, u64::MAX] {
            assert_eq!(
                a.msr_write(0x83F, value, 0),
                Err(ApicError::ReservedBits { msr: 0x83F, value }),
                "value {value:#x}"
            );
            assert!(!a.irr_contains(0x66));
        }
        // The vector alone is still accepted.
        a.msr_write(0x83F, 0xFF, 0).unwrap();
        assert!(a.irr_contains(0xFF));
    }

    // ------------------------------------------------------- destination match

    fn msg(dest: u32, mode: DestinationMode, x2: bool, dm: DeliveryMode) -> InterruptMessage {
        InterruptMessage {
            vector: 0x40,
            delivery_mode: dm,
            trigger_mode: TriggerMode::Edge,
            level: true,
            destination: Destination {
                id: dest,
                mode,
                shorthand: Shorthand::None,
                x2apic_format: x2,
            },
            source_id: None,
        }
    }

    #[test]
    fn physical_and_broadcast() {
        let a = enabled(3);
        assert!(a.matches_destination(3, DestinationMode::Physical, false));
        assert!(!a.matches_destination(4, DestinationMode::Physical, false));
        assert!(a.matches_destination(0xFF, DestinationMode::Physical, false));
        assert!(a.matches_destination(0xFF, DestinationMode::Logical, false));
        let b = x2(300);
        assert!(b.matches_destination(300, DestinationMode::Physical, true));
        assert!(b.matches_destination(u32::MAX, DestinationMode::Physical, true));
        assert!(!b.matches_destination(0xFF, DestinationMode::Physical, true));
        assert!(
            b.matches_destination(0xFF, DestinationMode::Physical, false),
            "IOAPIC broadcast"
        );
    }

    #[test]
    fn logical_flat() {
        let mut a = enabled(1);
        wr(&mut a, 0xD0, 0x0200_0000, 0); // bit 1
        assert!(a.matches_destination(0x02, DestinationMode::Logical, false));
        assert!(a.matches_destination(0x06, DestinationMode::Logical, false));
        assert!(!a.matches_destination(0x01, DestinationMode::Logical, false));
        assert!(!a.matches_destination(0x02, DestinationMode::Physical, false));
    }

    #[test]
    fn logical_cluster() {
        let mut a = enabled(1);
        wr(&mut a, 0xE0, 0x0FFF_FFFF, 0); // cluster model
        wr(&mut a, 0xD0, 0x3400_0000, 0); // cluster 3, member bit 2
        assert!(a.matches_destination(0x34, DestinationMode::Logical, false));
        assert!(a.matches_destination(0x3F, DestinationMode::Logical, false));
        assert!(!a.matches_destination(0x24, DestinationMode::Logical, false));
        assert!(!a.matches_destination(0x31, DestinationMode::Logical, false));
    }

    #[test]
    fn x2apic_cluster_ldr() {
        let mut a = x2(0x25); // cluster 2, bit 5
        assert_eq!(a.ldr(), 0x0002_0020);
        assert_eq!(a.msr_read(0x80D, 0).unwrap(), 0x0002_0020);
        assert!(a.matches_destination(0x0002_0020, DestinationMode::Logical, true));
        assert!(a.matches_destination(0x0002_FFFF, DestinationMode::Logical, true));
        assert!(!a.matches_destination(0x0001_0020, DestinationMode::Logical, true));
        assert!(!a.matches_destination(0x0002_0010, DestinationMode::Logical, true));
    }

    #[test]
    fn disabled_apic_matches_nothing() {
        let mut a = enabled(0);
        a.set_apic_base(APIC_DEFAULT_BASE).unwrap();
        assert!(!a.matches_destination(0xFF, DestinationMode::Physical, false));
        assert!(!a.deliver_nmi() && !a.deliver_init());
    }

    #[test]
    fn routing_and_lowest_priority() {
        let apics: Vec<ApicAddressing> = (0..4)
            .map(|i| {
                let mut a = enabled(i);
                wr(&mut a, 0xD0, 1 << (24 + i), 0);
                a.addressing()
            })
            .collect();
        let m = msg(0b1100, DestinationMode::Logical, false, DeliveryMode::Fixed);
        assert_eq!(route_targets(&m, &apics), vec![2, 3]);
        let m = msg(
            0b1100,
            DestinationMode::Logical,
            false,
            DeliveryMode::LowestPriority,
        );
        assert_eq!(route_targets(&m, &apics), vec![2]);
        let m = msg(0xFF, DestinationMode::Physical, false, DeliveryMode::Fixed);
        assert_eq!(route_targets(&m, &apics), vec![0, 1, 2, 3]);
        let m = msg(
            9,
            DestinationMode::Physical,
            false,
            DeliveryMode::LowestPriority,
        );
        assert!(route_targets(&m, &apics).is_empty());
        let mut m = msg(0, DestinationMode::Physical, false, DeliveryMode::Nmi);
        m.destination.shorthand = Shorthand::AllExcludingSelf;
        m.source_id = Some(1);
        assert_eq!(route_targets(&m, &apics), vec![0, 2, 3]);
    }

    #[test]
    fn lowest_priority_skips_software_disabled() {
        let mut lapics: Vec<LocalApic> = (0..4)
            .map(|i| {
                let mut a = enabled(i);
                wr(&mut a, 0xD0, 1 << (24 + i), 0);
                a
            })
            .collect();
        let table = |l: &[LocalApic]| l.iter().map(|a| a.addressing()).collect::<Vec<_>>();
        let lp = msg(
            0b1110,
            DestinationMode::Logical,
            false,
            DeliveryMode::LowestPriority,
        );
        assert_eq!(route_targets(&lp, &table(&lapics)), vec![1]);
        // APIC 1 software-disabled (SVR bit 8 clear): the next one is chosen.
        wr(&mut lapics[1], 0xF0, 0xFF, 0);
        assert!(!lapics[1].addressing().software_enabled);
        assert_eq!(route_targets(&lp, &table(&lapics)), vec![2]);
        // ... and it still matches fixed, NMI and INIT messages.
        let fixed = msg(0b1110, DestinationMode::Logical, false, DeliveryMode::Fixed);
        assert_eq!(route_targets(&fixed, &table(&lapics)), vec![1, 2, 3]);
        // Physical broadcast, lowest priority: APIC 0 (enabled, lowest ID).
        let bc = msg(
            0xFF,
            DestinationMode::Physical,
            false,
            DeliveryMode::LowestPriority,
        );
        assert_eq!(route_targets(&bc, &table(&lapics)), vec![0]);
        wr(&mut lapics[0], 0xF0, 0xFF, 0);
        assert_eq!(route_targets(&bc, &table(&lapics)), vec![2]);
        // Every match software-disabled: still one target (which drops it).
        wr(&mut lapics[2], 0xF0, 0xFF, 0);
        wr(&mut lapics[3], 0xF0, 0xFF, 0);
        assert_eq!(route_targets(&lp, &table(&lapics)), vec![1]);
        assert!(!lapics[1].accept(&lp));
        // Re-enabled: back to the lowest ID.
        wr(&mut lapics[1], 0xF0, 0x1FF, 0);
        assert_eq!(route_targets(&lp, &table(&lapics)), vec![1]);
        assert!(lapics[1].accept(&lp));
        // A hardware-disabled APIC is never chosen, software-enabled or not.
        lapics[1].set_apic_base(APIC_DEFAULT_BASE).unwrap();
        assert_eq!(route_targets(&lp, &table(&lapics)), vec![2]);
    }

    #[test]
    fn message_encoding_round_trip() {
        let mut m = msg(
            0xDEAD_BEEF,
            DestinationMode::Logical,
            true,
            DeliveryMode::StartUp,
        );
        m.source_id = Some(77);
        m.trigger_mode = TriggerMode::Level;
        m.destination.shorthand = Shorthand::AllExcludingSelf;
        let b = m.to_bytes();
        assert_eq!(InterruptMessage::from_bytes(&b), Ok(m));
        let m2 = msg(1, DestinationMode::Physical, false, DeliveryMode::Fixed);
        assert_eq!(InterruptMessage::from_bytes(&m2.to_bytes()), Ok(m2));
        assert!(InterruptMessage::from_bytes(&b[..5]).is_err());
        let mut bad = b;
        bad[9] = (bad[9] & !7) | 3;
        assert!(InterruptMessage::from_bytes(&bad).is_err());
        let mut bad = b;
        bad[10] = 9;
        assert!(InterruptMessage::from_bytes(&bad).is_err());
    }

    // -------------------------------------------------------------- INIT/SIPI

    #[test]
    fn init_sipi_sequence() {
        let mut ap = LocalApic::new(1, false, 0);
        wr(&mut ap, 0xF0, 0x1FF, 0);
        wr(&mut ap, 0x80, 0x20, 0);
        ap.msr_write(MSR_IA32_APIC_BASE, ap.apic_base(), 0).unwrap();
        let init = msg(1, DestinationMode::Physical, false, DeliveryMode::Init);
        let mut sipi = msg(1, DestinationMode::Physical, false, DeliveryMode::StartUp);
        sipi.vector = 0x9A;
        assert!(ap.accept(&init));
        assert!(ap.accept(&sipi), "SIPI latched behind a pending INIT");
        assert_eq!(ap.take_sipi(), None, "INIT first");
        assert!(ap.has_wake_event());
        assert!(ap.take_init());
        assert!(!ap.take_init());
        assert_eq!(ap.tpr(), 0, "INIT reset the registers");
        assert!(!ap.is_software_enabled());
        assert_eq!(ap.id(), 1);
        assert!(ap.is_waiting_for_sipi());
        assert_eq!(ap.take_sipi(), Some(0x9A));
        assert!(!ap.is_waiting_for_sipi());
        // a second SIPI to a running AP is ignored
        assert!(!ap.accept(&sipi));
        assert_eq!(ap.take_sipi(), None);
    }

    #[test]
    fn ap_starts_waiting_for_sipi() {
        let mut ap = LocalApic::new(2, false, 0);
        assert!(ap.deliver_sipi(0x10));
        assert_eq!(ap.take_sipi(), Some(0x10));
        let mut bsp = LocalApic::new(0, true, 0);
        assert!(!bsp.deliver_sipi(0x10), "a running BSP ignores SIPI");
    }

    #[test]
    fn init_level_deassert_ignored_on_accept() {
        let mut ap = LocalApic::new(2, false, 0);
        let mut m = msg(2, DestinationMode::Physical, false, DeliveryMode::Init);
        m.trigger_mode = TriggerMode::Level;
        m.level = false;
        assert!(!ap.accept(&m));
        assert!(!ap.take_init());
    }

    #[test]
    fn accept_dispatch() {
        let mut a = enabled(0);
        assert!(a.accept(&msg(
            0,
            DestinationMode::Physical,
            false,
            DeliveryMode::LowestPriority
        )));
        assert!(a.irr_contains(0x40));
        assert!(a.accept(&msg(0, DestinationMode::Physical, false, DeliveryMode::Nmi)));
        assert!(a.take_nmi());
        assert!(!a.accept(&msg(0, DestinationMode::Physical, false, DeliveryMode::Smi)));
        assert!(!a.accept(&msg(
            0,
            DestinationMode::Physical,
            false,
            DeliveryMode::ExtInt
        )));
    }

    // ----------------------------------------------------------- APIC base MSR

    #[test]
    fn apic_base_mode_switches() {
        let mut a = enabled(9);
        let base = APIC_DEFAULT_BASE;
        let en = APIC_BASE_ENABLE;
        let x2 = APIC_BASE_EXTD;
        assert_eq!(a.msr_read(MSR_IA32_APIC_BASE, 0).unwrap(), base | en);
        // xAPIC -> x2APIC
        a.msr_write(MSR_IA32_APIC_BASE, base | en | x2, 0).unwrap();
        assert_eq!(a.mode(), ApicMode::X2Apic);
        assert_eq!(a.mmio_base(), None);
        assert_eq!(a.msr_read(0x802, 0).unwrap(), 9);
        // x2APIC -> xAPIC is illegal
        assert!(matches!(
            a.msr_write(MSR_IA32_APIC_BASE, base | en, 0),
            Err(ApicError::InvalidModeTransition { .. })
        ));
        // EXTD without EN is illegal
        assert!(a.msr_write(MSR_IA32_APIC_BASE, base | x2, 0).is_err());
        // x2APIC -> disabled resets the registers
        a.msr_write(MSR_IA32_APIC_BASE, base, 0).unwrap();
        assert_eq!(a.mode(), ApicMode::Disabled);
        assert!(!a.is_software_enabled());
        // disabled -> x2APIC is illegal, disabled -> xAPIC fine
        assert!(a.msr_write(MSR_IA32_APIC_BASE, base | en | x2, 0).is_err());
        a.msr_write(MSR_IA32_APIC_BASE, base | en, 0).unwrap();
        assert_eq!(a.mode(), ApicMode::XApic);
        // relocation, BSP bit read-only, reserved bits
        a.msr_write(MSR_IA32_APIC_BASE, 0xFED0_0000 | en | APIC_BASE_BSP, 0)
            .unwrap();
        assert_eq!(a.mmio_base(), Some(0xFED0_0000));
        assert!(!a.is_bsp());
        assert!(matches!(
            a.msr_write(MSR_IA32_APIC_BASE, base | en | 1, 0),
            Err(ApicError::ReservedBits { .. })
        ));
        assert!(a
            .msr_write(MSR_IA32_APIC_BASE, base | en | (1 << 60), 0)
            .is_err());
    }

    #[test]
    fn disabled_or_x2apic_ignores_mmio() {
        let mut a = x2(1);
        assert_eq!(rd(&mut a, 0x20, 0), u32::MAX);
        wr(&mut a, 0x80, 0x50, 0);
        assert_eq!(a.tpr(), 0);
    }

    #[test]
    fn mmio_page_does_not_decode_when_disabled_or_x2apic() {
        let base = APIC_DEFAULT_BASE;
        let en = APIC_BASE_ENABLE;
        let mut a = enabled(2);
        wr(&mut a, 0x80, 0x20, 0);
        assert_eq!(rd(&mut a, 0x30, 0), APIC_VERSION);

        // Globally disabled: every read is all ones (any width, any offset),
        // writes are dropped and nothing is latched in ESR.
        a.msr_write(MSR_IA32_APIC_BASE, base, 0).unwrap();
        assert_eq!(a.mode(), ApicMode::Disabled);
        for off in [0x20u64, 0x30, 0x80, 0xF0, 0x280, 0x3F0, 0xFF0] {
            assert_eq!(rd(&mut a, off, 0), u32::MAX, "offset {off:#x}");
        }
        let mut b = [0u8; 1];
        a.mmio_read(0x31, &mut b, 0);
        assert_eq!(b, [0xFF]);
        let mut q = [0u8; 8];
        a.mmio_read(0x20, &mut q, 0);
        assert_eq!(q, [0xFF; 8]);
        assert_eq!(wr(&mut a, 0x80, 0x70, 0), ApicAction::None);
        assert_eq!(wr(&mut a, 0xF0, 0x1FF, 0), ApicAction::None);
        assert_eq!(
            wr(&mut a, 0x300, 0x0000_4500, 0),
            ApicAction::None,
            "ICR write while disabled sends nothing"
        );
        assert_eq!(a.tpr(), 0);
        assert!(!a.is_software_enabled());

        // Re-enabled in xAPIC mode: the page decodes again, in its reset state
        // (disabling reset the registers).
        a.msr_write(MSR_IA32_APIC_BASE, base | en, 0).unwrap();
        assert_eq!(rd(&mut a, 0x30, 0), APIC_VERSION);
        assert_eq!(rd(&mut a, 0x20, 0), 2 << 24);
        assert_eq!(rd(&mut a, 0xF0, 0), 0xFF);
        assert_eq!(a.esr(), 0);
        wr(&mut a, 0x80, 0x30, 0);
        assert_eq!(a.tpr(), 0x30);

        // x2APIC mode: same as disabled for the MMIO page; the MSRs work.
        a.msr_write(MSR_IA32_APIC_BASE, base | en | APIC_BASE_EXTD, 0)
            .unwrap();
        assert_eq!(rd(&mut a, 0x80, 0), u32::MAX);
        wr(&mut a, 0x80, 0x50, 0);
        assert_eq!(a.tpr(), 0x30);
        assert_eq!(a.msr_read(0x808, 0), Ok(0x30));
    }

    #[test]
    fn x2apic_msr_rules() {
        let mut xa = enabled(1);
        assert_eq!(xa.msr_read(0x802, 0), Err(ApicError::NotX2Apic(0x802)));
        assert_eq!(xa.msr_write(0x808, 0, 0), Err(ApicError::NotX2Apic(0x808)));
        assert_eq!(xa.msr_read(0x10, 0), Err(ApicError::InvalidMsr(0x10)));

        let mut a = x2(0x101);
        assert_eq!(a.msr_read(0x803, 0).unwrap(), u64::from(APIC_VERSION));
        assert_eq!(a.msr_write(0x802, 5, 0), Err(ApicError::ReadOnly(0x802)));
        assert_eq!(a.msr_write(0x80D, 5, 0), Err(ApicError::ReadOnly(0x80D)));
        assert_eq!(a.msr_write(0x803, 5, 0), Err(ApicError::ReadOnly(0x803)));
        assert_eq!(a.msr_write(0x839, 5, 0), Err(ApicError::ReadOnly(0x839)));
        assert_eq!(a.msr_read(0x80B, 0), Err(ApicError::WriteOnly(0x80B)));
        for reserved in [0x800, 0x809, 0x80C, 0x80E, 0x82F, 0x831, 0x840, 0x8FF] {
            assert_eq!(
                a.msr_read(reserved, 0),
                Err(ApicError::InvalidMsr(reserved))
            );
            assert!(a.msr_write(reserved, 0, 0).is_err());
        }
        assert!(matches!(
            a.msr_write(0x80B, 1, 0),
            Err(ApicError::ReservedBits { .. })
        ));
        assert!(matches!(
            a.msr_write(0x828, 1, 0),
            Err(ApicError::ReservedBits { .. })
        ));
        assert!(matches!(
            a.msr_write(0x808, 1 << 32, 0),
            Err(ApicError::ReservedBits { .. })
        ));
        a.msr_write(0x808, 0x30, 0).unwrap();
        assert_eq!(a.msr_read(0x808, 0).unwrap(), 0x30);
        // EOI via MSR reports level-triggered vectors
        a.deliver_fixed(0x90, true);
        let v = a.pending_interrupt().unwrap();
        a.acknowledge(v);
        assert_eq!(a.msr_write(0x80B, 0, 0), Ok(ApicAction::EoiLevel(0x90)));
        // timer through MSRs
        a.msr_write(0x83E, 0xB, T0).unwrap();
        a.msr_write(0x832, 0x45, T0).unwrap();
        a.msr_write(0x838, 500, T0).unwrap();
        assert_eq!(a.msr_read(0x839, T0 + 100).unwrap(), 400);
        assert!(a.advance(T0 + 500));
        assert!(a.irr_contains(0x45));
    }

    #[test]
    fn reset_restores_power_on() {
        let mut a = x2(5);
        a.deliver_fixed(0x40, false);
        a.reset();
        assert_eq!(a.mode(), ApicMode::XApic);
        assert!(!a.irr_contains(0x40));
        assert_eq!(a.id(), 5);
        assert!(a.is_waiting_for_sipi());
    }

    #[test]
    fn handles_msr_ranges() {
        assert!(LocalApic::handles_msr(0x1B));
        assert!(LocalApic::handles_msr(0x6E0));
        assert!(LocalApic::handles_msr(0x800) && LocalApic::handles_msr(0x8FF));
        assert!(!LocalApic::handles_msr(0x900) && !LocalApic::handles_msr(0x10));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn random_mmio_never_panics(ops in proptest::collection::vec((0u64..0x1100, any::<u32>(), 0usize..9, any::<bool>()), 0..200)) {
                let mut a = enabled(0);
                let mut now = T0;
                for (off, val, len, is_write) in ops {
                    now += 1000;
                    if is_write {
                        let bytes = val.to_le_bytes();
                        let data: Vec<u8> = bytes.iter().copied().cycle().take(len).collect();
                        let _ = a.mmio_write(off, &data, now);
                    } else {
                        let mut buf = vec![0u8; len];
                        a.mmio_read(off, &mut buf, now);
                    }
                    a.advance(now);
                    if let Some(v) = a.pending_interrupt() { a.acknowledge(v); }
                }
            }

            #[test]
            fn random_msrs_never_panic(ops in proptest::collection::vec((0x7F0u32..0x910, any::<u64>()), 0..200)) {
                let mut a = x2(3);
                let mut now = T0;
                for (msr, val) in ops {
                    now += 1000;
                    let _ = a.msr_write(msr, val, now);
                    let _ = a.msr_read(msr, now);
                    a.advance(now);
                }
            }
        }
    }
}
