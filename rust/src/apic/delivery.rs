//! Interrupt delivery: the [`InterruptMessage`] that crosses vCPUs and nodes,
//! destination matching and [`route_targets`], the receiving side (IRR, TMR,
//! NMI, INIT, SIPI), the injection side (PPR, ISR, acknowledge) and the sending
//! side (EOI, IPIs from the ICR).

use super::*;

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

pub(super) fn bit_test(regs: &[u32; 8], v: u8) -> bool {
    regs[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}

pub(super) fn bit_set(regs: &mut [u32; 8], v: u8) {
    regs[usize::from(v >> 5)] |= 1 << (v & 31);
}

pub(super) fn bit_clear(regs: &mut [u32; 8], v: u8) {
    regs[usize::from(v >> 5)] &= !(1 << (v & 31));
}

pub(super) fn highest(regs: &[u32; 8]) -> Option<u8> {
    regs.iter().enumerate().rev().find_map(|(i, &w)| {
        // i < 8 and the bit index < 32, so the vector fits in a u8.
        (w != 0).then(|| (i as u8) * 32 + (31 - w.leading_zeros() as u8))
    })
}

impl LocalApic {
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

    pub(super) fn eoi(&mut self) -> ApicAction {
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
    pub(super) fn send_ipi(&mut self) -> ApicAction {
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
}
