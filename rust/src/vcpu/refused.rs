//! When KVM gives up on an instruction: finishing the ones [`complete`] knows
//! (emulation failures of KVM PVM's CPL0 emulator) and, otherwise, the crash report.
//!
//! [`complete`]: super::complete

use super::*;

/// The instruction bytes of an emulation-failure exit, when KVM reported them
/// (KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: data[0] = flags, then
/// insn_size (1 byte) and up to 15 instruction bytes); `n` is 0 otherwise.
pub(super) fn kvm_insn_bytes(
    internal: &kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_13,
) -> ([u8; 15], usize) {
    let mut out = [0u8; 15];
    let nd = (internal.ndata as usize).min(internal.data.len());
    if nd < 3 || internal.data[0] & 1 == 0 {
        return (out, 0);
    }
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&internal.data[1].to_le_bytes());
    bytes[8..].copy_from_slice(&internal.data[2].to_le_bytes());
    let n = (bytes[0] as usize).min(15);
    out[..n].copy_from_slice(&bytes[1..=n]);
    (out, n)
}

/// A vCPU's x87/SSE control and status for [`complete`]. Read and written with
/// KVM_GET_XSAVE / KVM_SET_XSAVE (the legacy area: FCW/FSW at bytes 0-3, MXCSR at
/// 24, XSTATE_BV at 512): on KVM PVM, KVM_GET_FPU reads zeros and KVM_SET_FPU
/// does not reach the guest (probed). KVM takes MXCSR from the buffer only when
/// XSTATE_BV has the SSE bit, so a write sets it (the buffer holds the current
/// SSE registers, or their init values, so nothing else changes).
pub(super) struct VcpuFpu<'a>(&'a VcpuFd);

impl complete::FpuState for VcpuFpu<'_> {
    fn fsw(&mut self) -> Option<u16> {
        self.0.get_xsave().ok().map(|x| (x.region[0] >> 16) as u16)
    }
    fn mxcsr(&mut self) -> Option<u32> {
        self.0.get_xsave().ok().map(|x| x.region[6])
    }
    fn set_mxcsr(&mut self, v: u32) -> bool {
        let Ok(mut x) = self.0.get_xsave() else {
            return false;
        };
        x.region[6] = v;
        x.region[128] |= 2; // XSTATE_BV.SSE
                            // SAFETY: a kvm_xsave read from this vCPU, with MXCSR (validated by the
                            // caller) and XSTATE_BV.SSE changed.
        unsafe { self.0.set_xsave(&x) }.is_ok()
    }
}

impl Vcpu {
    /// After an emulation failure (`KVM_EXIT_INTERNAL_ERROR`, suberror
    /// `KVM_INTERNAL_ERROR_EMULATION`): finishes the instruction at RIP if it is one
    /// [`complete`] handles (64-bit mode, CPL0) and sets the vCPU up to resume.
    /// False leaves everything as KVM reported it, for the crash report. Only an
    /// emulation failure comes here, so hardware-VT hosts, where these instructions
    /// never exit, are unaffected.
    pub(super) fn complete_refused_insn(&mut self) -> bool {
        let Some(mem) = self.env.guest_memory.as_ref() else {
            return false;
        };
        let index = self.shared.index;
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // union member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        if internal.suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            return false;
        }
        let (bytes, n) = kvm_insn_bytes(&internal);
        let (Ok(mut regs), Ok(mut sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return false;
        };
        let rip = regs.rip;
        let mut fpu = VcpuFpu(&self.fd);
        let (decoded, outcome) =
            match complete::complete_with(&bytes[..n], &mut regs, &sregs, mem, &mut fpu) {
                Ok(r) => r,
                Err(e) => {
                    if self.env.debug {
                        eprintln!(
                            "dvmm: vCPU {index}: emulation failure at {rip:#x} not completed: {e}"
                        );
                    }
                    return false;
                }
            };
        let Ok(mut events) = self.fd.get_vcpu_events() else {
            return false;
        };
        // KVM queued a #UD along with the exit (`handle_emulation_failure`): the
        // completion replaces it. The instruction completed, so an interrupt shadow
        // (STI, MOV SS) before it has ended.
        events.exception.injected = 0;
        events.exception.pending = 0;
        events.exception.nr = 0;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        events.exception_has_payload = 0;
        events.exception_payload = 0;
        events.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW;
        events.interrupt.shadow = 0;
        let injects = matches!(outcome, complete::Outcome::Exception { .. });
        if let complete::Outcome::Exception {
            vector,
            error_code,
            cr2,
        } = outcome
        {
            if let Some(cr2) = cr2 {
                sregs.cr2 = cr2;
                if self.fd.set_sregs(&sregs).is_err() {
                    return false;
                }
            }
            events.exception.injected = 1;
            events.exception.nr = vector;
            events.exception.has_error_code = u8::from(error_code.is_some());
            events.exception.error_code = error_code.unwrap_or(0);
        }
        if self.fd.set_regs(&regs).is_err() || self.fd.set_vcpu_events(&events).is_err() {
            return false;
        }
        if injects {
            // The exception is delivered at the next entry: no interrupt may be
            // injected with it (`run_once` requests a window instead; KVM rewrites
            // this field at the next exit).
            self.fd.get_kvm_run().ready_for_interrupt_injection = 0;
        }
        self.stats.insns_completed += 1;
        if self.trace_timer {
            let ev = self.fd.get_vcpu_events().ok();
            let mut l = lock(&self.shared.lapic);
            // Trail: C = completed (vector: the interrupt KVM holds as injected, if any).
            let held = ev
                .filter(|e| e.interrupt.injected != 0)
                .map_or(0, |e| e.interrupt.nr);
            l.note(b'C', held);
        }
        if self.env.debug {
            eprintln!(
                "dvmm: vCPU {index}: completed {:?} at {rip:#x} ({outcome:?})",
                decoded.insn
            );
        }
        true
    }
    /// Build the crash report: the exit reason and this vCPU's registers.
    pub(super) fn crash(&mut self, kind: CrashKind) -> StopReason {
        let index = self.shared.index;
        let mut insn = None;
        let what = match &kind {
            CrashKind::TripleFault => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            CrashKind::FailEntry { reason, cpu } => format!(
                "VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, cpu {cpu})"
            ),
            CrashKind::Unexpected(e) => format!("unexpected exit {e}"),
            CrashKind::InternalError => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // active union member.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let sub = internal.suberror;
                let name = match sub {
                    1 => "emulation failure",
                    2 => "simultaneous exception",
                    3 => "delivery event",
                    4 => "unexpected exit reason",
                    _ => "unknown suberror",
                };
                let (bytes, n) = kvm_insn_bytes(&internal);
                if sub == 1 && n > 0 {
                    insn = Some(
                        bytes[..n]
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                    );
                }
                format!("KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {sub}: {name})")
            }
        };
        let dump = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => {
                let mut d = VcpuDump::from_regs(index, &what, &r, &s);
                d.insn_bytes = insn.clone();
                Some(Box::new(d))
            }
            _ => None,
        };
        let mut error = format!("guest crashed on vCPU {index}: {what}");
        if let Some(i) = &insn {
            error.push_str(&format!("; instruction bytes: {i}"));
        }
        if let Some(d) = &dump {
            error.push_str(&format!("; {}", d.summary()));
        }
        StopReason::Crash { error, dump }
    }
}
