//! Unit tests of the local APIC: shared helpers, power-on state, register
//! access, ESR and IA32_APIC_BASE here; the timer and delivery in submodules.

use super::registers::*;
use super::*;

mod delivery;
mod timer;

const T0: u64 = 1_000_000_000;

pub(super) fn rd(apic: &mut LocalApic, off: u64, now: u64) -> u32 {
    let mut b = [0u8; 4];
    apic.mmio_read(off, &mut b, now);
    u32::from_le_bytes(b)
}

pub(super) fn wr(apic: &mut LocalApic, off: u64, v: u32, now: u64) -> ApicAction {
    apic.mmio_write(off, &v.to_le_bytes(), now)
}

/// A software-enabled xAPIC (SVR 0x1FF).
pub(super) fn enabled(id: u32) -> LocalApic {
    let mut a = LocalApic::new(id, id == 0, 2_000_000);
    wr(&mut a, 0xF0, 0x1FF, 0);
    a
}

pub(super) fn x2(id: u32) -> LocalApic {
    let mut a = enabled(id);
    a.msr_write(
        MSR_IA32_APIC_BASE,
        APIC_DEFAULT_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD,
        0,
    )
    .unwrap();
    a
}

pub(super) fn ipi(action: ApicAction) -> InterruptMessage {
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
