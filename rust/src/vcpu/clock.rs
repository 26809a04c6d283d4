//! [`VmClock`]: the VM's clock, monotonic time that stops while the VM is paused,
//! which the LAPIC timers and the guest TSC follow.

use super::*;

/// Monotonic VM clock in nanoseconds since the VM was created (LAPIC time base).
///
/// It stands still while the VM is paused ([`VmClock::pause`] to
/// [`VmClock::resume`]), as QEMU's virtual clock does: a paused guest must not
/// find its APIC timer advanced or fired by the time it spent paused. Clones
/// share one clock. Reading takes no lock (it is on every exit).
#[derive(Debug, Clone)]
pub struct VmClock {
    inner: Arc<ClockInner>,
}

#[derive(Debug)]
pub(super) struct ClockInner {
    /// CLOCK_MONOTONIC time of VM time 0: the creation time plus all the time
    /// spent paused. Only grows.
    offset_ns: AtomicU64,
    /// The VM time the clock stands still at, or [`CLOCK_RUNNING`].
    frozen_ns: AtomicU64,
    /// Serializes pause and resume against each other (readers never take it).
    control: Mutex<()>,
}

/// [`ClockInner::frozen_ns`] while the clock runs.
pub(super) const CLOCK_RUNNING: u64 = u64::MAX;

/// [`ClockInner::frozen_ns`] while a pause reads the time it freezes at.
pub(super) const CLOCK_PAUSING: u64 = u64::MAX - 1;

pub(super) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl VmClock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self::starting_at(monotonic_ns())
    }

    /// A clock whose VM time 0 is the CLOCK_MONOTONIC time `mono_ns` (the
    /// `*_at` methods take such times too; they let tests drive the clock).
    pub fn starting_at(mono_ns: u64) -> Self {
        VmClock {
            inner: Arc::new(ClockInner {
                offset_ns: AtomicU64::new(mono_ns),
                frozen_ns: AtomicU64::new(CLOCK_RUNNING),
                control: Mutex::new(()),
            }),
        }
    }

    /// Nanoseconds of VM time (time since the clock started, paused time
    /// excluded).
    pub fn now_ns(&self) -> u64 {
        self.read(monotonic_ns)
    }

    /// VM time when CLOCK_MONOTONIC reads `mono_ns`.
    pub fn now_at(&self, mono_ns: u64) -> u64 {
        self.read(|| mono_ns)
    }

    /// Lock-free read. The state is read before and after the monotonic time:
    /// a pause or resume in between (the offset or the frozen time changed)
    /// means a retry. Together with [`CLOCK_PAUSING`] this keeps VM time from
    /// going backwards for a reader that races with a pause or a resume.
    pub(super) fn read(&self, mono: impl Fn() -> u64) -> u64 {
        let c = &self.inner;
        loop {
            let offset = c.offset_ns.load(Ordering::SeqCst);
            match c.frozen_ns.load(Ordering::SeqCst) {
                CLOCK_RUNNING => {}
                CLOCK_PAUSING => {
                    std::hint::spin_loop();
                    continue;
                }
                frozen => return frozen,
            }
            let now = mono().saturating_sub(offset);
            if c.frozen_ns.load(Ordering::SeqCst) == CLOCK_RUNNING
                && c.offset_ns.load(Ordering::SeqCst) == offset
            {
                return now;
            }
        }
    }

    /// Stop the clock (VM pause). Pausing a paused clock does nothing.
    pub fn pause(&self) {
        self.pause_with(monotonic_ns);
    }

    /// [`VmClock::pause`] at CLOCK_MONOTONIC time `mono_ns`.
    pub fn pause_at(&self, mono_ns: u64) {
        self.pause_with(|| mono_ns);
    }

    pub(super) fn pause_with(&self, mono: impl Fn() -> u64) {
        let c = &self.inner;
        let _g = lock(&c.control);
        if c.frozen_ns.load(Ordering::SeqCst) == CLOCK_RUNNING {
            // Readers wait while the freeze time is taken: one that read the
            // time after it would otherwise return a later time than the
            // frozen one, and the clock would step back.
            c.frozen_ns.store(CLOCK_PAUSING, Ordering::SeqCst);
            let vm = mono().saturating_sub(c.offset_ns.load(Ordering::SeqCst));
            // Keep clear of the two sentinels (u64::MAX - 1 ns is 584 years).
            c.frozen_ns
                .store(vm.min(CLOCK_PAUSING - 1), Ordering::SeqCst);
        }
    }

    /// Restart a paused clock where it stopped; returns how long it stood
    /// still (0 if it was running).
    pub fn resume(&self) -> u64 {
        self.resume_at(monotonic_ns())
    }

    /// [`VmClock::resume`] at CLOCK_MONOTONIC time `mono_ns`.
    pub fn resume_at(&self, mono_ns: u64) -> u64 {
        let c = &self.inner;
        let _g = lock(&c.control);
        let frozen = c.frozen_ns.load(Ordering::SeqCst);
        if frozen == CLOCK_RUNNING {
            return 0;
        }
        let old = c.offset_ns.load(Ordering::SeqCst);
        // VM time continues from `frozen`; the offset never moves backwards
        // (a resume "before" the pause only happens with a test's fake times).
        let offset = mono_ns.saturating_sub(frozen).max(old);
        // Offset first: a reader that sees the clock running again must see
        // the new offset (it re-checks the offset after reading the time).
        c.offset_ns.store(offset, Ordering::SeqCst);
        c.frozen_ns.store(CLOCK_RUNNING, Ordering::SeqCst);
        offset - old
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.inner.frozen_ns.load(Ordering::SeqCst) != CLOCK_RUNNING
    }

    /// CLOCK_MONOTONIC time of VM time `ns` if the clock keeps running (for
    /// arming host timers).
    pub(super) fn to_monotonic(&self, ns: u64) -> u64 {
        self.inner
            .offset_ns
            .load(Ordering::SeqCst)
            .saturating_add(ns)
    }
}

impl Default for VmClock {
    fn default() -> Self {
        Self::new()
    }
}
