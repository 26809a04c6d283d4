//! Userspace IOAPIC (82093AA-style, version 0x20, 24 pins) at 0xFEC0_0000.
//!
//! Pure state machine, no KVM calls. Devices call [`IoApic::set_irq`] with the
//! logical level of a pin (true = asserted; the polarity bit is kept for the
//! guest to read but the devices already report asserted/de-asserted); the
//! returned [`InterruptMessage`]s are routed to local APICs like IPIs (see
//! [`crate::apic::route_targets`]). When a local APIC reports the EOI of a
//! level-triggered vector ([`crate::apic::ApicAction::EoiLevel`]), call
//! [`IoApic::end_of_interrupt`]: it clears remote IRR and re-delivers a line
//! that is still asserted.
//!
//! - Edge-triggered pins deliver on a rising edge. An edge that arrives while
//!   the pin is masked is latched and delivered when the pin is unmasked (as
//!   KVM's IOAPIC does), so a guest that masks briefly loses nothing.
//! - Level-triggered pins deliver while asserted and remote IRR is clear.
//! - The ID register implements bits 27:24 only (82093AA); the others read 0.
//!   dvmm gives it the ID [`ioapic_id_for`] picks, the one the MADT names.
//! - Guest garbage (bad sizes, reserved registers, out-of-range IOREGSEL) is
//!   ignored / reads as zero; it never panics.

use crate::apic::{
    DeliveryMode, Destination, DestinationMode, InterruptMessage, Shorthand, TriggerMode,
};
use thiserror::Error;

/// Default guest-physical base of the IOAPIC.
pub const IOAPIC_DEFAULT_BASE: u64 = 0xFEC0_0000;
/// Size of the IOAPIC MMIO window.
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;
/// Number of pins (redirection entries).
pub const IOAPIC_NUM_PINS: usize = 24;
/// Version (with the EOI register).
pub const IOAPIC_VERSION: u32 = 0x20;

/// Implemented bits of the IOAPIC ID (the register's bits 27:24).
const IOAPIC_ID_MASK: u8 = 0x0F;

/// MMIO offset of IOREGSEL.
pub const IOREGSEL: u64 = 0x00;
/// MMIO offset of IOWIN.
pub const IOWIN: u64 = 0x10;
/// MMIO offset of the EOI register (version 0x20).
pub const IOEOI: u64 = 0x40;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_REDIR_FIRST: u32 = 0x10;

const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_POLARITY: u64 = 1 << 13;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
const RTE_DEST_LOGICAL: u64 = 1 << 11;
/// Guest-writable bits of the low dword (delivery status and remote IRR are
/// read-only).
const RTE_LOW_WRITABLE: u64 =
    0xFF | 0x700 | RTE_DEST_LOGICAL | RTE_POLARITY | RTE_LEVEL | RTE_MASKED;
/// Guest-writable bits of the high dword: destination 63:56 (and the extended
/// destination 55:48, kept but not interpreted).
const RTE_HIGH_WRITABLE: u64 = 0xFFFF_0000_0000_0000;

/// Highest IOAPIC ID: the ID register has 4 bits (82093AA, bits 27:24).
pub const IOAPIC_MAX_ID: u8 = IOAPIC_ID_MASK;

/// The IOAPIC ID of a VM with `vcpus` vCPUs (local APIC IDs `0..vcpus`), named by
/// the MADT and held by the ID register, which has 4 bits.
///
/// - Up to 15 vCPUs: `vcpus`, the first ID after the local APICs, so no local APIC
///   shares it (the MP-specification convention; P6-era APIC-bus systems needed
///   every APIC ID unique).
/// - 16 vCPUs or more: the local APIC IDs cover every 4-bit value, so no unique ID
///   exists; [`IOAPIC_MAX_ID`] (15). On xAPIC-generation processors (local APIC
///   version >= 0x14, as dvmm's) interrupts travel as system-bus messages and the
///   IOAPIC ID is not an arbitration ID any more: it only has to be unique among
///   IOAPICs (SDM 11.1; Linux checks exactly that on x86-64 and on 32-bit xAPIC
///   systems, `io_apic_unique_id`). QEMU uses 0 whatever the CPU count.
///
/// Before, the MADT said `vcpus` while the register kept only its low 4 bits, so a
/// guest with 16 vCPUs read ID 0 where the MADT said 16.
pub fn ioapic_id_for(vcpus: usize) -> u8 {
    u8::try_from(vcpus).unwrap_or(u8::MAX).min(IOAPIC_MAX_ID)
}

/// Errors of the IOAPIC (from the VMM side, never from the guest).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum IoApicError {
    /// A device asked for a pin the IOAPIC does not have.
    #[error("IOAPIC has no pin {0} (it has {IOAPIC_NUM_PINS})")]
    InvalidPin(usize),
}

/// The IOAPIC.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IoApic {
    id: u8,
    ioregsel: u32,
    redirection: [u64; IOAPIC_NUM_PINS],
    /// Level pins: the current line level. Edge pins: an edge not delivered yet.
    irr: u32,
    /// Current line levels (for edge detection).
    lines: u32,
}

impl IoApic {
    /// A reset IOAPIC with ID `id` (dvmm uses [`ioapic_id_for`]); every
    /// redirection entry masked. The ID register holds 4 bits (82093AA), so
    /// only the low 4 bits of `id` are kept.
    pub fn new(id: u8) -> Self {
        Self {
            id: id & IOAPIC_ID_MASK,
            ioregsel: 0,
            redirection: [RTE_MASKED; IOAPIC_NUM_PINS],
            irr: 0,
            lines: 0,
        }
    }

    /// Back to the reset state (the ID is kept).
    pub fn reset(&mut self) {
        *self = Self::new(self.id);
    }

    /// The IOAPIC ID.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Raw redirection entry of `pin`.
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    /// The message pin `pin` sends when it fires (None: no such pin, or a
    /// reserved delivery mode).
    pub fn message_of(&self, pin: usize) -> Option<InterruptMessage> {
        if pin >= self.redirection.len() {
            return None;
        }
        self.message(pin)
    }

    fn message(&self, pin: usize) -> Option<InterruptMessage> {
        let e = self.redirection[pin];
        let delivery_mode = DeliveryMode::from_bits((e >> 8) as u32)?;
        Some(InterruptMessage {
            vector: e as u8,
            delivery_mode,
            trigger_mode: if e & RTE_LEVEL != 0 {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: true,
            destination: Destination {
                id: (e >> 56) as u32,
                mode: if e & RTE_DEST_LOGICAL != 0 {
                    DestinationMode::Logical
                } else {
                    DestinationMode::Physical
                },
                shorthand: Shorthand::None,
                x2apic_format: false,
            },
            source_id: None,
        })
    }

    /// Delivers `pin` if its state calls for it.
    fn service(&mut self, pin: usize) -> Option<InterruptMessage> {
        let bit = 1u32 << pin;
        let e = self.redirection[pin];
        if self.irr & bit == 0 || e & RTE_MASKED != 0 {
            return None;
        }
        if e & RTE_LEVEL != 0 {
            if e & RTE_REMOTE_IRR != 0 {
                return None;
            }
            let msg = self.message(pin)?;
            // Remote IRR stays set until the EOI; only fixed / lowest-priority
            // interrupts get an EOI, so other modes do not set it.
            if matches!(
                msg.delivery_mode,
                DeliveryMode::Fixed | DeliveryMode::LowestPriority
            ) {
                self.redirection[pin] |= RTE_REMOTE_IRR;
            }
            Some(msg)
        } else {
            self.irr &= !bit;
            self.message(pin)
        }
    }

    /// Sets the (logical) level of `pin`. Returns the message to route, if the
    /// change makes the IOAPIC deliver.
    pub fn set_irq(
        &mut self,
        pin: usize,
        level: bool,
    ) -> Result<Option<InterruptMessage>, IoApicError> {
        if pin >= IOAPIC_NUM_PINS {
            return Err(IoApicError::InvalidPin(pin));
        }
        let bit = 1u32 << pin;
        let was = self.lines & bit != 0;
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        if self.redirection[pin] & RTE_LEVEL != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && !was {
            self.irr |= bit;
        }
        Ok(self.service(pin))
    }

    /// Pulses `pin` (assert then de-assert), for edge-triggered devices.
    pub fn pulse_irq(&mut self, pin: usize) -> Result<Option<InterruptMessage>, IoApicError> {
        let msg = self.set_irq(pin, true)?;
        self.set_irq(pin, false)?;
        Ok(msg)
    }

    /// EOI of `vector` (from a local APIC's EOI of a level-triggered vector, or
    /// the EOI register): clears remote IRR of every level-triggered pin with
    /// that vector and re-delivers those whose line is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) -> Vec<InterruptMessage> {
        let mut out = Vec::new();
        for pin in 0..IOAPIC_NUM_PINS {
            let e = self.redirection[pin];
            if e as u8 == vector && e & RTE_LEVEL != 0 && e & RTE_REMOTE_IRR != 0 {
                self.redirection[pin] &= !RTE_REMOTE_IRR;
                out.extend(self.service(pin));
            }
        }
        out
    }

    fn read_register(&self, index: u32) -> u32 {
        match index {
            REG_ID | REG_ARB => u32::from(self.id) << 24,
            REG_VERSION => ((IOAPIC_NUM_PINS as u32 - 1) << 16) | IOAPIC_VERSION,
            REG_REDIR_FIRST.. => {
                let pin = ((index - REG_REDIR_FIRST) / 2) as usize;
                match self.redirection.get(pin) {
                    Some(&e) if index & 1 == 0 => e as u32,
                    Some(&e) => (e >> 32) as u32,
                    None => 0,
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, index: u32, value: u32) -> Option<InterruptMessage> {
        match index {
            // 82093AA: only bits 27:24 of the ID register are implemented;
            // the rest are reserved and read back as 0 (KVM and QEMU do the same).
            REG_ID => self.id = (value >> 24) as u8 & IOAPIC_ID_MASK,
            REG_REDIR_FIRST.. => {
                let pin = ((index - REG_REDIR_FIRST) / 2) as usize;
                let old = *self.redirection.get(pin)?;
                let new = if index & 1 == 0 {
                    (old & !RTE_LOW_WRITABLE) | (u64::from(value) & RTE_LOW_WRITABLE)
                } else {
                    (old & !RTE_HIGH_WRITABLE) | ((u64::from(value) << 32) & RTE_HIGH_WRITABLE)
                };
                let mut new = new & !RTE_DELIVERY_STATUS;
                if new & RTE_LEVEL == 0 {
                    new &= !RTE_REMOTE_IRR;
                }
                self.redirection[pin] = new;
                let bit = 1u32 << pin;
                if (old ^ new) & RTE_LEVEL != 0 {
                    // Trigger mode changed: a level pin's IRR is its line.
                    if new & RTE_LEVEL != 0 && self.lines & bit != 0 {
                        self.irr |= bit;
                    } else {
                        self.irr &= !bit;
                    }
                }
                return self.service(pin);
            }
            _ => {} // version and arbitration are read-only; others reserved
        }
        None
    }

    /// A guest read at `offset` in the IOAPIC window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            IOREGSEL => self.ioregsel,
            IOWIN => self.read_register(self.ioregsel),
            _ => 0,
        };
        for (d, b) in data.iter_mut().zip(value.to_le_bytes()) {
            *d = b;
        }
    }

    /// A guest write at `offset`. Only 32-bit (or 64-bit, low half used)
    /// accesses are honoured. Returns the messages to route (unmasking a
    /// pending pin, EOI register re-delivery).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Vec<InterruptMessage> {
        let value = match data {
            [a, b, c, d] | [a, b, c, d, _, _, _, _] => u32::from_le_bytes([*a, *b, *c, *d]),
            // IOREGSEL is a byte register: accept byte writes there.
            [a] if offset == IOREGSEL => u32::from(*a),
            _ => return Vec::new(),
        };
        match offset {
            IOREGSEL => self.ioregsel = value & 0xFF,
            IOWIN => {
                return self
                    .write_register(self.ioregsel, value)
                    .into_iter()
                    .collect()
            }
            IOEOI => return self.end_of_interrupt(value as u8),
            _ => {}
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_reg(io: &mut IoApic, index: u32, value: u32) -> Vec<InterruptMessage> {
        io.mmio_write(IOREGSEL, &index.to_le_bytes());
        io.mmio_write(IOWIN, &value.to_le_bytes())
    }

    fn read_reg(io: &mut IoApic, index: u32) -> u32 {
        io.mmio_write(IOREGSEL, &index.to_le_bytes());
        let mut b = [0u8; 4];
        io.mmio_read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    fn program(io: &mut IoApic, pin: u32, low: u32, dest: u8) -> Vec<InterruptMessage> {
        write_reg(io, 0x11 + 2 * pin, u32::from(dest) << 24);
        write_reg(io, 0x10 + 2 * pin, low)
    }

    #[test]
    fn id_version_arbitration() {
        let mut io = IoApic::new(4);
        assert_eq!(read_reg(&mut io, 0), 4 << 24);
        assert_eq!(read_reg(&mut io, 1), 0x0017_0020);
        assert_eq!(read_reg(&mut io, 2), 4 << 24);
        write_reg(&mut io, 0, 0x0200_0000);
        assert_eq!(io.id(), 2);
        write_reg(&mut io, 1, 0);
        assert_eq!(read_reg(&mut io, 1), 0x0017_0020, "version read-only");
        let mut b = [0u8; 4];
        io.mmio_read(IOREGSEL, &mut b);
        assert_eq!(b, [1, 0, 0, 0]);
    }

    #[test]
    fn id_register_only_bits_24_to_27_writable() {
        let mut io = IoApic::new(4);
        write_reg(&mut io, 0, u32::MAX);
        assert_eq!(read_reg(&mut io, 0), 0x0F00_0000);
        assert_eq!(read_reg(&mut io, 2), 0x0F00_0000, "arbitration ID follows");
        assert_eq!(io.id(), 0x0F);
        write_reg(&mut io, 0, 0xF0FF_FFFF);
        assert_eq!(read_reg(&mut io, 0), 0);
        write_reg(&mut io, 0, 0x0A00_0000);
        assert_eq!(read_reg(&mut io, 0), 0x0A00_0000);
        // An ID given at construction is cut to the register's width too.
        let io = IoApic::new(0x13);
        assert_eq!(io.id(), 3);
        // Reset keeps the (masked) ID.
        let mut io = IoApic::new(5);
        write_reg(&mut io, 0, 0x0700_0000);
        io.reset();
        assert_eq!(read_reg(&mut io, 0), 0x0700_0000);
    }

    #[test]
    fn id_for_vcpu_counts() {
        assert_eq!(ioapic_id_for(1), 1);
        assert_eq!(ioapic_id_for(15), 15);
        for n in [16, 17, 255, 256, 1024, usize::MAX] {
            assert_eq!(ioapic_id_for(n), IOAPIC_MAX_ID, "{n}");
        }
        // What the MADT names is what the register holds.
        for n in [3, 15, 16, 40] {
            let mut io = IoApic::new(ioapic_id_for(n));
            assert_eq!(read_reg(&mut io, 0) >> 24, u32::from(ioapic_id_for(n)));
        }
    }

    #[test]
    fn reset_state_all_masked() {
        let mut io = IoApic::new(0);
        for pin in 0..24 {
            assert_eq!(read_reg(&mut io, 0x10 + 2 * pin), 0x10000);
            assert_eq!(read_reg(&mut io, 0x11 + 2 * pin), 0);
        }
        assert_eq!(io.set_irq(4, true), Ok(None));
    }

    #[test]
    fn redirection_entry_fields() {
        let mut io = IoApic::new(0);
        // vector 0x31, lowest priority, logical, active low, level, unmasked
        let low = 0x31 | 0x100 | (1 << 11) | (1 << 13) | (1 << 15);
        program(&mut io, 5, low | (1 << 12) | (1 << 14), 0x0F);
        assert_eq!(read_reg(&mut io, 0x1A), low, "RO bits not writable");
        assert_eq!(read_reg(&mut io, 0x1B), 0x0F00_0000);
        let m = io.set_irq(5, true).unwrap().unwrap();
        assert_eq!(m.vector, 0x31);
        assert_eq!(m.delivery_mode, DeliveryMode::LowestPriority);
        assert_eq!(m.trigger_mode, TriggerMode::Level);
        assert_eq!(m.destination.mode, DestinationMode::Logical);
        assert_eq!(m.destination.id, 0x0F);
        assert!(!m.destination.x2apic_format);
        assert_eq!(m.source_id, None);
        assert_ne!(read_reg(&mut io, 0x1A) & (1 << 14), 0, "remote IRR set");
    }

    #[test]
    fn edge_delivers_on_rising_edge_only() {
        let mut io = IoApic::new(0);
        program(&mut io, 4, 0x24, 0);
        let m = io.set_irq(4, true).unwrap().unwrap();
        assert_eq!((m.vector, m.trigger_mode), (0x24, TriggerMode::Edge));
        assert_eq!(io.set_irq(4, true), Ok(None), "still high: no new edge");
        assert_eq!(io.set_irq(4, false), Ok(None));
        assert!(io.set_irq(4, true).unwrap().is_some());
        io.set_irq(4, false).unwrap();
        assert!(io.pulse_irq(4).unwrap().is_some());
    }

    #[test]
    fn edge_while_masked_delivered_on_unmask() {
        let mut io = IoApic::new(0);
        program(&mut io, 3, 0x10023, 0);
        assert_eq!(io.pulse_irq(3), Ok(None));
        let out = program(&mut io, 3, 0x23, 0);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].vector, 0x23);
        // only once
        assert!(write_reg(&mut io, 0x16, 0x23).is_empty());
    }

    #[test]
    fn level_remote_irr_and_eoi() {
        let mut io = IoApic::new(0);
        program(&mut io, 9, 0x8039, 1);
        assert!(io.set_irq(9, true).unwrap().is_some());
        assert_eq!(io.set_irq(9, true), Ok(None), "remote IRR blocks");
        // EOI with the line still asserted: re-delivered
        let again = io.end_of_interrupt(0x39);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].destination.id, 1);
        // de-assert, then EOI: nothing more
        io.set_irq(9, false).unwrap();
        assert!(io.end_of_interrupt(0x39).is_empty());
        assert_eq!(io.redirection_entry(9).unwrap() & RTE_REMOTE_IRR, 0);
        // EOI of an unrelated vector does nothing
        io.set_irq(9, true).unwrap();
        assert!(io.end_of_interrupt(0x40).is_empty());
        assert_ne!(io.redirection_entry(9).unwrap() & RTE_REMOTE_IRR, 0);
        // EOI register (version 0x20)
        let out = io.mmio_write(IOEOI, &0x39u32.to_le_bytes());
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn level_masked_then_unmasked_while_asserted() {
        let mut io = IoApic::new(0);
        program(&mut io, 2, 0x18040, 0);
        assert_eq!(io.set_irq(2, true), Ok(None));
        let out = program(&mut io, 2, 0x8040, 0);
        assert_eq!(out.len(), 1);
        io.set_irq(2, false).unwrap();
        io.end_of_interrupt(0x40);
        // de-asserted while masked: nothing on unmask
        program(&mut io, 2, 0x18040, 0);
        io.set_irq(2, true).unwrap();
        io.set_irq(2, false).unwrap();
        assert!(program(&mut io, 2, 0x8040, 0).is_empty());
    }

    #[test]
    fn shared_vector_eoi() {
        let mut io = IoApic::new(0);
        program(&mut io, 10, 0x8050, 0);
        program(&mut io, 11, 0x8050, 0);
        io.set_irq(10, true).unwrap();
        io.set_irq(11, true).unwrap();
        assert_eq!(io.end_of_interrupt(0x50).len(), 2);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        let mut io = IoApic::new(0);
        program(&mut io, 7, 0x8047, 0);
        io.set_irq(7, true).unwrap();
        program(&mut io, 7, 0x10047, 0);
        assert_eq!(io.redirection_entry(7).unwrap() & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn nmi_and_reserved_delivery_modes() {
        let mut io = IoApic::new(0);
        program(&mut io, 1, 0x400, 0);
        let m = io.set_irq(1, true).unwrap().unwrap();
        assert_eq!(m.delivery_mode, DeliveryMode::Nmi);
        program(&mut io, 6, 0x300 | 0x20, 0); // reserved encoding
        assert_eq!(io.set_irq(6, true), Ok(None));
        program(&mut io, 8, 0x8000 | 0x400, 0); // level NMI: no remote IRR
        assert!(io.set_irq(8, true).unwrap().is_some());
        assert_eq!(io.redirection_entry(8).unwrap() & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn bad_pins_and_garbage() {
        let mut io = IoApic::new(0);
        assert_eq!(io.set_irq(24, true), Err(IoApicError::InvalidPin(24)));
        assert_eq!(
            io.set_irq(usize::MAX, true),
            Err(IoApicError::InvalidPin(usize::MAX))
        );
        assert!(io.redirection_entry(24).is_none());
        // out-of-range register index reads 0, writes ignored
        assert_eq!(read_reg(&mut io, 0x40), 0);
        assert!(write_reg(&mut io, 0x40, 0xFFFF_FFFF).is_empty());
        assert!(write_reg(&mut io, 0xFF, 0).is_empty());
        assert_eq!(read_reg(&mut io, 0x05), 0);
        // odd sizes and offsets
        assert!(io.mmio_write(IOWIN, &[1, 2]).is_empty());
        assert!(io.mmio_write(0x20, &[1, 2, 3, 4]).is_empty());
        assert!(io.mmio_write(IOWIN, &[]).is_empty());
        let mut big = [0xAAu8; 16];
        io.mmio_read(IOWIN, &mut big);
        io.mmio_read(0xFFF, &mut big);
        // byte write to IOREGSEL works
        io.mmio_write(IOREGSEL, &[1]);
        let mut b = [0u8; 4];
        io.mmio_read(IOWIN, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0017_0020);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn random_accesses_never_panic(ops in proptest::collection::vec((0u64..0x50, any::<u32>(), 0usize..9, 0usize..30, any::<bool>()), 0..300)) {
                let mut io = IoApic::new(2);
                for (off, val, len, pin, level) in ops {
                    let data: Vec<u8> = val.to_le_bytes().iter().copied().cycle().take(len).collect();
                    let _ = io.mmio_write(off, &data);
                    let mut buf = vec![0u8; len];
                    io.mmio_read(off, &mut buf);
                    let _ = io.set_irq(pin, level);
                    let _ = io.end_of_interrupt(val as u8);
                }
            }
        }
    }
}
