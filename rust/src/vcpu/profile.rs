//! A sampling profiler of guest code, for finding where a slow guest spends its
//! time (`DVMM_PROFILE=N`, a debugging aid, off by default): each timer
//! interrupt injected into a vCPU samples the RIP it interrupts — a sample
//! every tick of guest time, wherever the guest had interrupts enabled — and
//! every N samples the vCPU prints its hottest addresses of that window to
//! stderr (`dvmm-profile vcpu=I t=S rip=COUNT ...`). `tests/linux/symbolize.py`
//! turns the addresses into a kernel's symbols.

use std::collections::HashMap;

/// Hottest addresses printed per window.
const TOP: usize = 12;

/// One vCPU's samples of the current window.
pub(super) struct Profile {
    every: u64,
    samples: u64,
    window: HashMap<u64, u64>,
}

impl Profile {
    /// The profiler `DVMM_PROFILE` asks for (none when unset or 0).
    pub(super) fn from_env() -> Option<Profile> {
        let every = std::env::var("DVMM_PROFILE").ok()?.parse::<u64>().ok()?;
        (every > 0).then(|| Profile {
            every,
            samples: 0,
            window: HashMap::new(),
        })
    }

    /// Count one sample; print and restart the window when it is full.
    pub(super) fn sample(&mut self, vcpu: u32, guest_ns: u64, rip: u64) {
        *self.window.entry(rip).or_insert(0) += 1;
        self.samples += 1;
        if self.samples.is_multiple_of(self.every) {
            let mut top: Vec<(u64, u64)> = self.window.drain().collect();
            top.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let line: Vec<String> = top
                .iter()
                .take(TOP)
                .map(|(rip, n)| format!("{rip:#x}={n}"))
                .collect();
            eprintln!(
                "dvmm-profile vcpu={vcpu} t={:.1} {}",
                guest_ns as f64 / 1e9,
                line.join(" ")
            );
        }
    }
}
