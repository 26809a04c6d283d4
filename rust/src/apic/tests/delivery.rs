//! Unit tests of interrupt delivery: priorities and EOI, the ICR, destination
//! matching and routing, the message encoding, INIT/SIPI.

use super::*;

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
