//! The VM clock (the LAPIC time base) stands still while the VM is paused, so
//! an APIC timer neither advances nor fires across a pause.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dvmm::apic::LocalApic;
use dvmm::vcpu::VmClock;

const MS: u64 = 1_000_000;
const START: u64 = 5_000 * MS;

#[test]
fn clock_stands_still_while_paused() {
    let c = VmClock::starting_at(START);
    assert_eq!(c.now_at(START), 0);
    assert_eq!(c.now_at(START + 10 * MS), 10 * MS);
    assert!(!c.is_paused());

    c.pause_at(START + 10 * MS);
    assert!(c.is_paused());
    assert_eq!(c.now_at(START + 10 * MS), 10 * MS);
    assert_eq!(c.now_at(START + 500 * MS), 10 * MS, "frozen while paused");
    // A second pause does not move the frozen time.
    c.pause_at(START + 600 * MS);
    assert_eq!(c.now_at(START + 700 * MS), 10 * MS);

    // Resumed 990 ms after the pause: continues from 10 ms.
    assert_eq!(c.resume_at(START + 1_000 * MS), 990 * MS);
    assert!(!c.is_paused());
    assert_eq!(c.now_at(START + 1_000 * MS), 10 * MS);
    assert_eq!(c.now_at(START + 1_005 * MS), 15 * MS);
    // Resuming a running clock changes nothing.
    assert_eq!(c.resume_at(START + 1_100 * MS), 0);
    assert_eq!(c.now_at(START + 1_105 * MS), 115 * MS);

    // Pauses add up; clones share the clock.
    let d = c.clone();
    d.pause_at(START + 1_200 * MS); // VM time 210 ms
    assert_eq!(c.now_at(START + 9_000 * MS), 210 * MS);
    assert_eq!(c.resume_at(START + 1_300 * MS), 100 * MS);
    assert_eq!(d.now_at(START + 1_310 * MS), 220 * MS);
}

#[test]
fn apic_timer_does_not_fire_or_advance_across_a_pause() {
    let clock = VmClock::starting_at(START);
    let mut lapic = LocalApic::new(0, true, 0);
    let mmio = |l: &mut LocalApic, off: u64, v: u32, now: u64| {
        l.mmio_write(off, &v.to_le_bytes(), now);
    };
    let count = |l: &mut LocalApic, now: u64| {
        let mut d = [0u8; 4];
        l.mmio_read(0x390, &mut d, now);
        u32::from_le_bytes(d)
    };
    let t = |mono: u64| clock.now_at(mono);
    mmio(&mut lapic, 0xF0, 0x1FF, t(START));
    mmio(&mut lapic, 0x320, 0x40, t(START)); // one-shot, vector 0x40
    mmio(&mut lapic, 0x3E0, 0xB, t(START)); // divide by 1 (1 ns per tick)
    mmio(&mut lapic, 0x380, 2_000_000, t(START)); // 2 ms

    // 1 ms in, the VM is paused for 10 s.
    let paused_at = START + MS;
    assert_eq!(count(&mut lapic, t(paused_at)), 1_000_000);
    clock.pause_at(paused_at);
    let during = paused_at + 10_000 * MS;
    assert!(!lapic.advance(t(during)), "no timer interrupt while paused");
    assert_eq!(count(&mut lapic, t(during)), 1_000_000, "count frozen");
    let resumed_at = during;
    let paused = clock.resume_at(resumed_at);
    assert_eq!(paused, 10_000 * MS);
    lapic.clock_resumed(paused);
    assert!(!lapic.advance(t(resumed_at)));
    assert_eq!(count(&mut lapic, t(resumed_at)), 1_000_000);
    // It fires 1 ms of running time after the resume, not before.
    assert!(!lapic.advance(t(resumed_at + MS - 1)));
    assert!(lapic.advance(t(resumed_at + MS)));
    assert_eq!(lapic.pending_interrupt(), Some(0x40));
}

#[test]
fn readers_never_see_time_go_backwards_across_pause_and_resume() {
    let clock = VmClock::new();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (clock, stop, reads) = (clock.clone(), stop.clone(), reads.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let now = clock.now_ns();
                assert!(now >= last, "VM time went back: {last} -> {now}");
                last = now;
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Toggle until the reader has raced with many pauses (bounded: 2 cores).
    let end = Instant::now() + Duration::from_secs(3);
    let (mut toggles, mut paused_total) = (0u64, 0u64);
    while (toggles < 2_000 || reads.load(Ordering::Relaxed) < 100_000) && Instant::now() < end {
        clock.pause();
        std::hint::spin_loop();
        paused_total += clock.resume();
        toggles += 1;
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("the reader saw VM time go backwards");
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert!(paused_total > 0);
}
