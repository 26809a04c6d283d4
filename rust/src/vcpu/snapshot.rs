//! A vCPU's complete state for snapshots and restore (issue 15): what KVM holds
//! (registers, special registers, XSAVE area, XCRs, debug registers, pending
//! events, every MSR KVM can save), what dvmm holds (the userspace LAPIC, the
//! run state, a pending NMI) — and the capture and the restore themselves.
//!
//! Capture runs on the vCPU's own thread (the vCPU fd belongs to it) while the
//! vCPU is paused: [`VcpuShared::request_capture`] asks, the paused run loop
//! answers through [`VcpuShared::take_capture`]. Restore runs before the vCPU
//! thread starts ([`Vcpu::restore`]), or on the parked thread for a vCPU that
//! migrates in ([`VcpuShared::request_restore`]).

use kvm_bindings::{
    kvm_debugregs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use serde::{Deserialize, Serialize};

use super::*;

/// The run state a snapshot records (a paused vCPU records the state it was
/// paused from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedRunState {
    Running,
    Halted,
    WaitForSipi,
    /// Not started yet (an AP of a node whose VM had not started).
    Created,
}

impl SavedRunState {
    fn of(s: VcpuState) -> Self {
        match s {
            VcpuState::Halted => SavedRunState::Halted,
            VcpuState::WaitForSipi => SavedRunState::WaitForSipi,
            VcpuState::Created => SavedRunState::Created,
            _ => SavedRunState::Running,
        }
    }
    pub(super) fn state(self) -> VcpuState {
        match self {
            SavedRunState::Running => VcpuState::Running,
            SavedRunState::Halted => VcpuState::Halted,
            SavedRunState::WaitForSipi => VcpuState::WaitForSipi,
            SavedRunState::Created => VcpuState::Created,
        }
    }
}

/// Everything needed to resume one vCPU where it stopped.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    /// vCPU index (= APIC ID).
    pub index: u32,
    pub run_state: SavedRunState,
    /// IF at the HLT that halted it (a halted vCPU with IF clear only wakes on NMI).
    pub halted_if: bool,
    /// An NMI the LAPIC accepted that is not injected yet.
    pub pending_nmi: bool,
    /// The VM clock of the capturing node when the state was taken (the LAPIC's
    /// times are on that clock; a restore on another clock shifts them).
    pub clock_ns: u64,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: Option<kvm_debugregs>,
    pub events: kvm_vcpu_events,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: LocalApic,
}

/// IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;

/// MSRs read or written per KVM_GET/SET_MSRS call.
const MSR_BATCH: usize = 64;

impl Vcpu {
    fn setup_err(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError + '_ {
        move |err| VcpuError::Setup {
            vcpu: self.shared.index,
            what,
            err,
        }
    }

    /// Take this vCPU's state (on its thread, while it is paused or not
    /// started yet).
    pub(super) fn capture(&self) -> Result<VcpuSnapshot, VcpuError> {
        let regs = self.fd.get_regs().map_err(self.setup_err("save regs of"))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.setup_err("save sregs of"))?;
        let xsave = self
            .fd
            .get_xsave()
            .map_err(self.setup_err("save the XSAVE area of"))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(self.setup_err("save the pending events of"))?;
        let state = match (self.state, self.restored) {
            (VcpuState::Paused, _) => self.paused_from,
            // Restored, not started yet: the state it will start in.
            (VcpuState::Created, Some(s)) => s,
            (s, _) => s,
        };
        let run_state = SavedRunState::of(state);
        Ok(VcpuSnapshot {
            index: self.shared.index,
            run_state,
            halted_if: self.halted_if,
            pending_nmi: self.pending_nmi,
            clock_ns: self.env.clock.now_ns(),
            regs,
            sregs,
            xsave,
            xcrs: self.fd.get_xcrs().ok(),
            debugregs: self.fd.get_debug_regs().ok(),
            events,
            msrs: self.read_msrs()?,
            lapic: lock(&self.shared.lapic).clone(),
        })
    }

    /// Every MSR of `VcpuEnv::msr_index` KVM lets userspace read (KVM_GET_MSRS
    /// stops at the first one it refuses: skip that one and go on).
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut out = Vec::with_capacity(self.env.msr_index.len());
        let mut rest: &[u32] = &self.env.msr_index;
        while !rest.is_empty() {
            let n = rest.len().min(MSR_BATCH);
            let entries: Vec<kvm_msr_entry> = rest[..n]
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrBatch)?;
            let got = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(self.setup_err("save the MSRs of"))?;
            let got = got.min(n);
            out.extend_from_slice(&msrs.as_slice()[..got]);
            // The one at `got` was refused (if any): skip it.
            rest = &rest[if got == n { n } else { got + 1 }..];
        }
        Ok(out)
    }

    fn read_msr(&self, index: u32) -> Option<u64> {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()?;
        match self.fd.get_msrs(&mut m) {
            Ok(1) => Some(m.as_slice()[0].data),
            _ => None,
        }
    }

    /// Put a snapshot's state into this (not yet started) vCPU; `clock_ns` is
    /// this node's VM clock now. The order is KVM's: special registers before
    /// MSRs (EFER), events last.
    pub fn restore(&mut self, s: &VcpuSnapshot, clock_ns: u64) -> Result<(), VcpuError> {
        self.fd
            .set_sregs(&s.sregs)
            .map_err(self.setup_err("restore the sregs of"))?;
        self.fd
            .set_regs(&s.regs)
            .map_err(self.setup_err("restore the regs of"))?;
        // SAFETY: `s.xsave` is a whole kvm_xsave (4 KiB region) as KVM_GET_XSAVE
        // returned it; KVM reads no further than that struct.
        unsafe { self.fd.set_xsave(&s.xsave) }
            .map_err(self.setup_err("restore the XSAVE area of"))?;
        if let Some(x) = &s.xcrs {
            self.fd
                .set_xcrs(x)
                .map_err(self.setup_err("restore the XCRs of"))?;
        }
        if let Some(d) = &s.debugregs {
            self.fd
                .set_debug_regs(d)
                .map_err(self.setup_err("restore the debug registers of"))?;
        }
        let mut rest: &[kvm_msr_entry] = &s.msrs;
        while !rest.is_empty() {
            let n = rest.len().min(MSR_BATCH);
            let msrs = Msrs::from_entries(&rest[..n]).map_err(|_| VcpuError::MsrBatch)?;
            let set = self
                .fd
                .set_msrs(&msrs)
                .map_err(self.setup_err("restore the MSRs of"))?
                .min(n);
            if set < n {
                // KVM lists some MSRs it only accepts with a feature enabled
                // (e.g. MSR_KVM_ASYNC_PF_INT): one it refuses is harmless if the
                // new vCPU already holds the saved value.
                let e = rest[set];
                if self.read_msr(e.index) != Some(e.data) {
                    return Err(VcpuError::MsrRefused {
                        vcpu: self.shared.index,
                        msr: e.index,
                    });
                }
                rest = &rest[set + 1..];
            } else {
                rest = &rest[n..];
            }
        }
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(self.setup_err("restore the pending events of"))?;
        let mut lapic = s.lapic.clone();
        lapic.shift_clock(s.clock_ns, clock_ns);
        // The guest TSC as it is now: the saved one where KVM can set it, the
        // host's on KVM PVM (which ignores writes of IA32_TSC): either way the
        // LAPIC's TSC-deadline model must follow the TSC the guest will read.
        if let Some(tsc) = self.read_msr(MSR_IA32_TSC) {
            lapic.set_tsc_reference(clock_ns, tsc);
        }
        *lock(&self.shared.lapic) = lapic;
        self.halted_if = s.halted_if;
        self.pending_nmi = s.pending_nmi;
        // KVM may still hold a vector it was given: wait for a window before the next.
        self.injected_unconfirmed = s.events.interrupt.injected != 0;
        self.restored = Some(s.run_state.state());
        Ok(())
    }
}

impl VcpuShared {
    /// Ask the (paused) vCPU thread to capture its state.
    pub fn request_capture(&self) {
        *lock(&self.capture) = None;
        self.capture_wanted.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// The capture asked for, once the vCPU thread has made it.
    pub fn take_capture(&self) -> Option<Result<Box<VcpuSnapshot>, VcpuError>> {
        lock(&self.capture).take()
    }

    /// On the vCPU thread: answer a capture request, if one is pending.
    pub(super) fn answer_capture(&self, v: &Vcpu) {
        if self.capture_wanted.swap(false, Ordering::SeqCst) {
            *lock(&self.capture) = Some(v.capture().map(Box::new));
        }
    }

    /// Ask the parked vCPU thread to take `s` as its state (a migration in).
    pub fn request_restore(&self, s: Box<VcpuSnapshot>) {
        *lock(&self.restored) = None;
        *lock(&self.restore_in) = Some(s);
        self.restore_wanted.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// The outcome of [`VcpuShared::request_restore`], once the thread made it.
    pub fn take_restored(&self) -> Option<Result<(), VcpuError>> {
        lock(&self.restored).take()
    }

    /// On the vCPU thread (parked): answer a restore request, if one is pending.
    pub(super) fn answer_restore(&self, v: &mut Vcpu) {
        if !self.restore_wanted.swap(false, Ordering::SeqCst) {
            return;
        }
        let Some(s) = lock(&self.restore_in).take() else {
            return;
        };
        // The LAPIC's times move from the capturing node's clock to ours: the
        // time the state spent travelling is time the guest did not see pass.
        let now = v.env.clock.now_ns();
        let r = v.restore(&s, now);
        *lock(&self.restored) = Some(r);
    }
}
