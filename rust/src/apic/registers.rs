//! The register file of the local APIC: register offsets, xAPIC MMIO and x2APIC
//! MSR access, IA32_APIC_BASE mode switches, the LVT table and the error status
//! register (ESR). Timer registers are decoded here and handed to `timer.rs`;
//! EOI and ICR writes to `delivery.rs`.

use super::delivery::{bit_clear, bit_set};
use super::*;

// Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
pub(super) const REG_ID: u32 = 0x20;

pub(super) const REG_VERSION: u32 = 0x30;

pub(super) const REG_TPR: u32 = 0x80;

pub(super) const REG_APR: u32 = 0x90;

pub(super) const REG_PPR: u32 = 0xA0;

pub(super) const REG_EOI: u32 = 0xB0;

pub(super) const REG_RRD: u32 = 0xC0;

pub(super) const REG_LDR: u32 = 0xD0;

pub(super) const REG_DFR: u32 = 0xE0;

pub(super) const REG_SVR: u32 = 0xF0;

pub(super) const REG_ISR: u32 = 0x100;

pub(super) const REG_TMR: u32 = 0x180;

pub(super) const REG_IRR: u32 = 0x200;

pub(super) const REG_ESR: u32 = 0x280;

pub(super) const REG_ICR_LOW: u32 = 0x300;

pub(super) const REG_ICR_HIGH: u32 = 0x310;

pub(super) const REG_LVT_TIMER: u32 = 0x320;

pub(super) const REG_LVT_ERROR: u32 = 0x370;

pub(super) const REG_TIMER_INITIAL: u32 = 0x380;

pub(super) const REG_TIMER_CURRENT: u32 = 0x390;

pub(super) const REG_TIMER_DIVIDE: u32 = 0x3E0;

pub(super) const REG_SELF_IPI: u32 = 0x3F0;

// ESR bits.
/// ESR bit 5: a fixed IPI with an illegal vector (< 16) was sent.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;

/// ESR bit 6: a fixed interrupt with an illegal vector (< 16) was received.
pub const ESR_RECV_ILLEGAL_VECTOR: u32 = 1 << 6;

/// ESR bit 7: access to a reserved register offset.
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

pub(super) const SVR_ENABLE: u32 = 1 << 8;

pub(super) const SVR_MASK: u32 = 0x3FF;

pub(super) const LVT_MASKED: u32 = 1 << 16;

pub(super) const ICR_LEVEL_ASSERT: u32 = 1 << 14;

pub(super) const ICR_TRIGGER_LEVEL: u32 = 1 << 15;

pub(super) const ICR_DEST_LOGICAL: u32 = 1 << 11;

pub(super) const ICR_LOW_WRITABLE: u32 = 0x000C_CFFF & !(1 << 12);

pub(super) const DFR_FLAT: u32 = 0xF;

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
    pub(super) fn index(self) -> usize {
        self as usize
    }

    pub(super) fn from_offset(reg: u32) -> Option<Self> {
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
    pub(super) fn writable(self) -> u32 {
        match self {
            Self::Timer => 0xFF | LVT_MASKED | (3 << 17),
            Self::Thermal | Self::Perf => 0xFF | 0x700 | LVT_MASKED,
            Self::Lint0 | Self::Lint1 => 0xFF | 0x700 | (1 << 13) | (1 << 15) | LVT_MASKED,
            Self::Error => 0xFF | LVT_MASKED,
        }
    }
}

/// Why a register access failed (mapped to ESR or #GP by the caller).
pub(super) enum RegFault {
    Invalid,
    ReadOnly,
    WriteOnly,
    Reserved,
}

impl LocalApic {
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
    pub(super) fn record_error(&mut self, bits: u32) {
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
    pub(super) fn read_register(
        &self,
        reg: u32,
        now_ns: u64,
    ) -> std::result::Result<u32, RegFault> {
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
    pub(super) fn write_register(
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
                if lvt == Lvt::Timer && !self.tsc_deadline {
                    v &= !(1 << 18);
                }
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
