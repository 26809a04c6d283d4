//! The APIC timer: one-shot, periodic and TSC-deadline modes, the divide
//! register, the guest-TSC reference used to turn TSC deadlines into
//! nanoseconds, and [`LocalApic::advance`], which fires expired timers.

use super::delivery::highest;
use super::*;

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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Timer {
    pub(super) initial: u32,
    pub(super) divide_reg: u32,
    /// Start of the current count-down (one-shot / periodic).
    pub(super) start_ns: u64,
    /// Length of one count-down in ns (periodic: clamped to MIN_PERIODIC_NS).
    pub(super) period_ns: u64,
    /// Next expiry, if armed.
    pub(super) deadline_ns: Option<u64>,
    /// IA32_TSC_DEADLINE as the guest wrote it (0 = disarmed).
    pub(super) tsc_deadline: u64,
}

pub(super) fn divide_value(reg: u32) -> u64 {
    let code = (reg & 3) | ((reg >> 1) & 4);
    if code == 7 {
        1
    } else {
        2 << code
    }
}

impl LocalApic {
    /// Whether the TSC-deadline mode exists (as the vCPU's CPUID says; on by
    /// default). Without it the LVT timer's mode bit 18 is reserved: it reads 0,
    /// so the timer stays one-shot or periodic.
    pub fn set_tsc_deadline_supported(&mut self, on: bool) {
        self.tsc_deadline = on;
    }

    /// The guest TSC at `now_ns` corresponds to `tsc` (for TSC-deadline).
    pub fn set_tsc_reference(&mut self, now_ns: u64, tsc: u64) {
        self.tsc_ref_ns = now_ns;
        self.tsc_ref = tsc;
    }
    /// This LAPIC's times were on a VM clock that read `from_ns` and now
    /// continue on one that reads `to_ns` at the same instant (restore of a
    /// snapshot, maybe on another node): move every time with it.
    pub fn shift_clock(&mut self, from_ns: u64, to_ns: u64) {
        let mv = |t: u64| t.wrapping_add(to_ns).wrapping_sub(from_ns);
        self.timer.start_ns = mv(self.timer.start_ns);
        self.timer.deadline_ns = self.timer.deadline_ns.map(mv);
        self.tsc_ref_ns = mv(self.tsc_ref_ns);
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
    pub(super) fn tsc_ticks_to_ns(&self, ticks: u64) -> u64 {
        let ns = u128::from(ticks) * 1_000_000 / u128::from(self.tsc_khz);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
    /// Current timer mode (from the LVT timer entry).
    pub fn timer_mode(&self) -> TimerMode {
        match (self.lvt[Lvt::Timer.index()] >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
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
    pub(super) fn timer_current_count(&self, now_ns: u64) -> u32 {
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
    pub(super) fn timer_start(&mut self, now_ns: u64) {
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
    pub(super) fn timer_cancel(&mut self) {
        self.timer.initial = 0;
        self.timer.deadline_ns = None;
        self.timer.period_ns = 0;
        self.timer.tsc_deadline = 0;
    }
    pub(super) fn write_divide(&mut self, value: u32, now_ns: u64) {
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
    pub(super) fn write_tsc_deadline(&mut self, value: u64, now_ns: u64) {
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
}
