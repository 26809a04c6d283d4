//! Unit tests of the APIC timer (one-shot, periodic, TSC-deadline, frozen clock).

use super::super::timer::*;
use super::*;

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

/// Without the TSC-deadline mode (a distributed VM's CPUID does not offer it),
/// LVT timer bit 18 is reserved: mode 10b cannot be selected, and the periodic
/// mode still works; a reset keeps the setting.
#[test]
fn timer_without_tsc_deadline_mode() {
    let mut a = enabled(0);
    a.set_tsc_deadline_supported(false);
    wr(&mut a, 0x320, 0x70040, T0);
    assert_eq!(rd(&mut a, 0x320, T0), 0x30040);
    assert_eq!(a.timer_mode(), TimerMode::Periodic);
    wr(&mut a, 0x320, 0x40040, T0);
    assert_eq!(a.timer_mode(), TimerMode::OneShot);
    a.reset();
    wr(&mut a, 0xF0, 0x1FF, T0);
    wr(&mut a, 0x320, 0x40040, T0);
    assert_ne!(a.timer_mode(), TimerMode::TscDeadline);
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
