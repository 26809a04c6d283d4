//! Sleeping vCPUs: HLT with adaptive halt polling (`HaltPoll`), and an AP waiting
//! for its Startup IPI.

use super::*;

/// Default [`VcpuEnv::halt_poll_max`]: KVM's own default `halt_poll_ns` (200 us).
pub const DEFAULT_HALT_POLL_US: u64 = 200;

/// Adaptive halt polling, as KVM does it in the kernel (`halt_poll_ns`): a vCPU that
/// halts first watches its kick flag for a short window before it sleeps on the
/// futex, because waking a sleeping thread costs ~25 us on these hosts, more than
/// most IPI round trips leave between a halt and the next interrupt. The window
/// grows (10 us, then doubling up to the maximum) while wake-ups come within the
/// maximum, and shrinks (halving to zero) after longer sleeps, so an idle vCPU
/// stops burning its core within a few halts. While polling the core would
/// otherwise be idle (the vCPU has nothing to run); a real-time DSM engine thread
/// preempts the poll at once.
#[derive(Debug, Clone, Copy)]
pub(super) struct HaltPoll {
    window: Duration,
    max: Duration,
}

impl HaltPoll {
    const START: Duration = Duration::from_micros(10);

    pub(super) fn new(max: Duration) -> Self {
        HaltPoll {
            window: Duration::ZERO,
            max,
        }
    }

    /// Adapt after a halt that ended `blocked` after it began; `hit`: the
    /// poll saw the wake-up.
    pub(super) fn adapt(&mut self, blocked: Duration, hit: bool) {
        if self.max.is_zero() {
            return;
        }
        if hit {
            return;
        }
        if blocked <= self.max {
            self.window = (self.window * 2).clamp(Self::START, self.max);
        } else {
            self.window /= 2;
            if self.window < Self::START {
                self.window = Duration::ZERO;
            }
        }
    }
}

impl Vcpu {
    pub(super) fn wait_for_sipi(&mut self) -> Result<(), VcpuError> {
        let sipi = {
            let mut l = lock(&self.shared.lapic);
            self.shared.drain_posted(self.inbox.as_ref(), &mut l);
            let _ = l.take_init();
            let _ = l.take_nmi();
            l.take_sipi()
        };
        match sipi {
            Some(vector) => {
                let mut regs = self.reset_regs;
                let mut sregs = self.reset_sregs;
                regs.rip = 0;
                regs.rflags = 2;
                sregs.cs.selector = u16::from(vector) << 8;
                sregs.cs.base = u64::from(vector) << 12;
                sregs.cs.limit = 0xffff;
                self.fd.set_sregs(&sregs).map_err(|err| VcpuError::Setup {
                    vcpu: self.shared.index,
                    what: "set sregs (SIPI) of",
                    err,
                })?;
                self.fd.set_regs(&regs).map_err(|err| VcpuError::Setup {
                    vcpu: self.shared.index,
                    what: "set regs (SIPI) of",
                    err,
                })?;
                self.pending_nmi = false;
                self.transition(VcpuEvent::Sipi);
            }
            None => {
                self.shared.wait_kick(None);
                self.serve_due = true;
            }
        }
        Ok(())
    }
    pub(super) fn halted(&mut self) {
        let now = self.env.clock.now_ns();
        if self.trace_timer {
            let since = *self.halt_since.get_or_insert(now);
            if now - since > 2_000_000_000 && now - self.halt_reported > 1_000_000_000 {
                self.halt_reported = now;
                let l = lock(&self.shared.lapic);
                eprintln!(
                    "dvmm: vCPU {}: halted for {} ms (IF={}): {}",
                    self.shared.index,
                    (now - since) / 1_000_000,
                    self.halted_if,
                    l.timer_summary(now)
                );
            }
        }
        let (wake, init, deadline) = {
            let mut l = lock(&self.shared.lapic);
            self.shared.drain_posted(self.inbox.as_ref(), &mut l);
            Self::advance_timer(
                &mut l,
                now,
                &mut self.timer_due,
                &mut self.stats,
                self.trace_timer,
                self.shared.index,
                "halted",
            );
            if l.take_nmi() {
                self.pending_nmi = true;
            }
            let init = l.take_init();
            let wake = self.pending_nmi || (self.halted_if && l.pending_interrupt().is_some());
            (wake, init, l.next_deadline_ns())
        };
        if init {
            self.halt_since = None;
            self.report_init_addressing();
            self.transition(VcpuEvent::Init);
        } else if wake {
            // The HLT completed with IF set: the interrupt that woke it can be
            // injected at once (see `run_once`).
            self.after_hlt = self.halted_if;
            self.halt_since = None;
            self.transition(VcpuEvent::Wake);
        } else {
            let timeout = deadline.map(|d| Duration::from_nanos(d.saturating_sub(now)));
            let t0 = Instant::now();
            let window = timeout.map_or(self.halt_poll.window, |t| t.min(self.halt_poll.window));
            if !window.is_zero() && self.shared.poll_kick(t0 + window) {
                self.stats.halt_poll_hits += 1;
                self.halt_poll.adapt(t0.elapsed(), true);
                self.serve_due = true;
                return;
            }
            self.shared.wait_kick(timeout);
            self.serve_due = true;
            self.stats.halt_sleeps += 1;
            self.halt_poll.adapt(t0.elapsed(), false);
        }
    }
}

#[cfg(test)]
mod halt_poll_tests {
    use super::HaltPoll;
    use std::time::Duration;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn the_window_grows_on_short_sleeps_and_shrinks_on_long_ones() {
        let mut h = HaltPoll::new(200 * US);
        assert_eq!(h.window, Duration::ZERO, "starts without polling");
        h.adapt(50 * US, false); // woken within the maximum: polling would have caught it
        assert_eq!(h.window, 10 * US);
        for want in [20, 40, 80, 160, 200, 200] {
            h.adapt(150 * US, false);
            assert_eq!(h.window, want * US);
        }
        h.adapt(150 * US, true); // a hit keeps the window
        assert_eq!(h.window, 200 * US);
        for want_ns in [100_000, 50_000, 25_000, 12_500, 0, 0] {
            h.adapt(Duration::from_millis(5), false); // long sleeps: polling is waste
            assert_eq!(h.window, Duration::from_nanos(want_ns));
        }
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut h = HaltPoll::new(Duration::ZERO);
        h.adapt(5 * US, false);
        h.adapt(5 * US, true);
        assert_eq!(h.window, Duration::ZERO);
    }
}
