//! Exit dispatch: [`handle_exit`] turns one `KVM_RUN` exit into a [`VcpuAction`],
//! given only an [`ExitContext`] (buses, this vCPU's LAPIC, the interrupt sink), so
//! it is unit tested without KVM.

use super::*;

/// Where a LAPIC sends what it cannot handle itself: IPIs (ICR writes) and EOIs (for
/// the IOAPIC's level-triggered pins). Implemented by the VM's interrupt router.
pub trait InterruptSink: Send + Sync {
    /// Deliver an IPI written to the ICR of the LAPIC of vCPU `from`.
    fn send_ipi(&self, from: u32, msg: crate::apic::InterruptMessage);
    /// The LAPIC of vCPU `from` received an EOI for `vector`.
    fn eoi(&self, from: u32, vector: u8);
    /// The addressing (ID, LDR, DFR, mode) of the LAPIC of vCPU `from` may have
    /// changed to `now` (a register or APIC base write, INIT). Distributed VMs
    /// tell the other nodes; the default ignores it.
    fn addressing_changed(&self, _from: u32, _now: crate::apic::ApicAddressing) {}
    /// Interrupt messages were posted to vCPU `vcpu`, which this node does not
    /// run: hand `msg` to the node that runs it. False if that is this node
    /// (the vCPU is migrating in: keep it for when it starts). The default
    /// (one-node VMs, where every vCPU is resident) keeps everything.
    fn redirect(&self, _vcpu: u32, _msg: crate::apic::InterruptMessage) -> bool {
        false
    }
}

/// Why the guest crashed (exit-level information; registers are added by the loop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashKind {
    /// KVM_EXIT_SHUTDOWN.
    TripleFault,
    /// KVM_EXIT_INTERNAL_ERROR (details in kvm_run).
    InternalError,
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry { reason: u64, cpu: u32 },
    /// Any other exit we do not expect.
    Unexpected(String),
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuAction {
    /// Re-enter the guest.
    Continue,
    /// The guest executed HLT.
    Halt,
    /// Stop the VM with this debug-exit status.
    StopVm(u8),
    /// The guest asked for a shutdown or reset.
    Shutdown(String),
    /// The guest crashed.
    Crash(CrashKind),
}

/// Everything [`handle_exit`] needs; cheap to build per exit (only references).
pub struct ExitContext<'a> {
    /// vCPU index (= APIC ID).
    pub vcpu: u32,
    pub pio: &'a Bus,
    pub mmio: &'a Bus,
    pub lapic: &'a Mutex<LocalApic>,
    pub irq: &'a dyn InterruptSink,
    /// Current VM time (LAPIC time base).
    pub now_ns: u64,
    pub stats: &'a mut VcpuStats,
    /// Log unknown port/MMIO accesses to stderr.
    pub debug: bool,
    /// Set by [`handle_exit`] when a guest `wrmsr` changed IA32_APIC_BASE (the new
    /// value): the run loop mirrors it into KVM (see [`Vcpu`]'s `sync_kvm_apic_base`).
    pub apic_base_written: Option<u64>,
    /// KVM's LAPIC answers the APIC MSRs: an MSR exit is one KVM refused or does
    /// not know, so it raises #GP without asking `lapic`.
    pub kernel_lapic: bool,
}

impl<'a> ExitContext<'a> {
    /// The context of an exit of the vCPU `shared` runs in `env` at VM time `now_ns`.
    pub(super) fn of(
        env: &'a VcpuEnv,
        shared: &'a VcpuShared,
        stats: &'a mut VcpuStats,
        now_ns: u64,
    ) -> Self {
        ExitContext {
            vcpu: shared.index,
            pio: &env.pio,
            mmio: &env.mmio,
            lapic: &shared.lapic,
            irq: &*env.irq,
            now_ns,
            stats,
            debug: env.debug,
            apic_base_written: None,
            kernel_lapic: env.kernel_lapic,
        }
    }
}

/// The APIC's architectural page (0xFEE00000): while this vCPU's APIC does not decode
/// there (disabled, x2APIC mode, relocated) nothing is, but an access is not counted
/// or logged as unknown MMIO (guests probe it, e.g. while switching modes).
pub(super) fn is_default_apic_page(addr: u64) -> bool {
    addr.wrapping_sub(LAPIC_BASE) < LAPIC_SIZE
}

/// The offset of `addr` in the LAPIC's MMIO page, if the page decodes there: only in
/// xAPIC mode, at the base IA32_APIC_BASE gives (the guest may relocate it; SDM
/// 11.4.4). Globally disabled or in x2APIC mode the page is not there at all, so
/// an access goes to the bus like any other (nothing is there: reads give all
/// ones, writes are dropped). A base over RAM is not seen: RAM accesses do not exit.
pub(super) fn lapic_offset(l: &LocalApic, addr: u64) -> Option<u64> {
    let off = addr.wrapping_sub(l.mmio_base()?);
    (off < LAPIC_SIZE).then_some(off)
}

/// A guest write to this vCPU's LAPIC (MMIO or MSR): brings its timer up to date,
/// applies `write`, and reports a change of its addressing (ID, LDR, DFR, mode) so
/// other nodes can route logical and lowest-priority interrupts to it.
pub(super) fn lapic_write<R>(
    ctx: &ExitContext<'_>,
    write: impl FnOnce(&mut LocalApic, u64) -> R,
) -> R {
    let (r, before, after) = {
        let mut l = lock(ctx.lapic);
        l.advance(ctx.now_ns);
        let before = l.addressing();
        let r = write(&mut l, ctx.now_ns);
        (r, before, l.addressing())
    };
    if before != after {
        ctx.irq.addressing_changed(ctx.vcpu, after);
    }
    r
}

/// Handle one exit. Never panics on guest-controlled input: unknown ports read as
/// all-ones and ignore writes, unknown MMIO likewise, invalid MSR accesses inject #GP.
pub fn handle_exit(exit: VcpuExit<'_>, ctx: &mut ExitContext<'_>) -> Result<VcpuAction, VcpuError> {
    Ok(match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.stats.exits[EK_IO] += 1;
            ctx.stats.pio_reads += 1;
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff);
                ctx.stats.unknown_pio += 1;
                if ctx.debug {
                    eprintln!("dvmm: vCPU {}: read of unknown port {port:#x}", ctx.vcpu);
                }
            }
            VcpuAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            ctx.stats.exits[EK_IO] += 1;
            ctx.stats.pio_writes += 1;
            match ctx.pio.write(u64::from(port), data) {
                Some(Some(BusAction::Stop(s))) => VcpuAction::StopVm(s),
                Some(None) => VcpuAction::Continue,
                None => {
                    ctx.stats.unknown_pio += 1;
                    if ctx.debug {
                        eprintln!(
                            "dvmm: vCPU {}: write {data:02x?} to unknown port {port:#x} ignored",
                            ctx.vcpu
                        );
                    }
                    VcpuAction::Continue
                }
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.stats.exits[EK_MMIO] += 1;
            let lapic = {
                let mut l = lock(ctx.lapic);
                lapic_offset(&l, addr).map(|off| {
                    l.advance(ctx.now_ns);
                    l.mmio_read(off, data, ctx.now_ns);
                })
            };
            if lapic.is_some() {
                ctx.stats.lapic_accesses += 1;
            } else if is_default_apic_page(addr) {
                data.fill(0xff); // the APIC's page, not decoding now: nothing there
                ctx.stats.lapic_accesses += 1;
            } else {
                ctx.stats.mmio_reads += 1;
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                    ctx.stats.unknown_mmio += 1;
                    if ctx.debug {
                        eprintln!("dvmm: vCPU {}: read of unknown MMIO {addr:#x}", ctx.vcpu);
                    }
                }
            }
            VcpuAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.stats.exits[EK_MMIO] += 1;
            let lapic = lapic_write(ctx, |l, now| {
                lapic_offset(l, addr).map(|off| l.mmio_write(off, data, now))
            });
            if let Some(out) = lapic {
                ctx.stats.lapic_accesses += 1;
                lapic_output(ctx, out);
                VcpuAction::Continue
            } else if is_default_apic_page(addr) {
                ctx.stats.lapic_accesses += 1; // dropped: the page does not decode now
                VcpuAction::Continue
            } else {
                ctx.stats.mmio_writes += 1;
                match ctx.mmio.write(addr, data) {
                    Some(Some(BusAction::Stop(s))) => VcpuAction::StopVm(s),
                    Some(None) => VcpuAction::Continue,
                    None => {
                        ctx.stats.unknown_mmio += 1;
                        if ctx.debug {
                            eprintln!(
                                "dvmm: vCPU {}: write to unknown MMIO {addr:#x} ignored",
                                ctx.vcpu
                            );
                        }
                        VcpuAction::Continue
                    }
                }
            }
        }
        VcpuExit::X86Rdmsr(m) if ctx.kernel_lapic => {
            ctx.stats.exits[EK_MSR] += 1;
            *m.data = 0;
            *m.error = 1;
            ctx.stats.msr_gp += 1;
            VcpuAction::Continue
        }
        VcpuExit::X86Wrmsr(m) if ctx.kernel_lapic => {
            ctx.stats.exits[EK_MSR] += 1;
            *m.error = 1;
            ctx.stats.msr_gp += 1;
            VcpuAction::Continue
        }
        VcpuExit::IoapicEoi(vector) => {
            // KVM's LAPIC ended a level-triggered IOAPIC vector: clear remote IRR.
            ctx.stats.exits[EK_OTHER] += 1;
            ctx.irq.eoi(ctx.vcpu, vector);
            VcpuAction::Continue
        }
        VcpuExit::X86Rdmsr(m) => {
            ctx.stats.exits[EK_MSR] += 1;
            let r = {
                let mut l = lock(ctx.lapic);
                l.advance(ctx.now_ns);
                l.msr_read(m.index, ctx.now_ns)
            };
            match r {
                Ok(v) => {
                    *m.data = v;
                    *m.error = 0;
                }
                Err(_) => {
                    *m.data = 0;
                    *m.error = 1;
                    ctx.stats.msr_gp += 1;
                }
            }
            VcpuAction::Continue
        }
        VcpuExit::X86Wrmsr(m) => {
            ctx.stats.exits[EK_MSR] += 1;
            let (r, base) = lapic_write(ctx, |l, now| {
                let before = l.apic_base();
                let r = l.msr_write(m.index, m.data, now);
                let after = l.apic_base();
                (r, (after != before).then_some(after))
            });
            if base.is_some() {
                ctx.apic_base_written = base;
            }
            match r {
                Ok(out) => {
                    *m.error = 0;
                    lapic_output(ctx, out);
                }
                Err(_) => {
                    *m.error = 1;
                    ctx.stats.msr_gp += 1;
                }
            }
            VcpuAction::Continue
        }
        VcpuExit::Hlt => {
            ctx.stats.exits[EK_HLT] += 1;
            VcpuAction::Halt
        }
        VcpuExit::SetTpr => {
            // VT-x / AMD-V with a userspace LAPIC: the guest lowered CR8 (TPR). The run
            // loop has already copied kvm_run.cr8 into the LAPIC, so an interrupt the
            // old TPR masked is injected on the way back in. (PVM emulates `mov cr8`
            // without this exit; the LAPIC sees the new TPR at the next exit.)
            ctx.stats.exits[EK_OTHER] += 1;
            VcpuAction::Continue
        }
        VcpuExit::IrqWindowOpen => {
            ctx.stats.exits[EK_IRQ_WINDOW] += 1;
            VcpuAction::Continue
        }
        VcpuExit::Intr => {
            ctx.stats.exits[EK_INTR] += 1;
            VcpuAction::Continue
        }
        VcpuExit::Shutdown => {
            ctx.stats.exits[EK_SHUTDOWN] += 1;
            VcpuAction::Crash(CrashKind::TripleFault)
        }
        VcpuExit::InternalError => {
            ctx.stats.exits[EK_INTERNAL] += 1;
            VcpuAction::Crash(CrashKind::InternalError)
        }
        VcpuExit::FailEntry(reason, cpu) => {
            ctx.stats.exits[EK_FAIL_ENTRY] += 1;
            VcpuAction::Crash(CrashKind::FailEntry { reason, cpu })
        }
        VcpuExit::SystemEvent(kind, _) => {
            ctx.stats.exits[EK_OTHER] += 1;
            match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    VcpuAction::Shutdown("guest requested shutdown".into())
                }
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    VcpuAction::Shutdown("guest requested reset".into())
                }
                k => VcpuAction::Crash(CrashKind::Unexpected(format!(
                    "KVM_EXIT_SYSTEM_EVENT type {k}"
                ))),
            }
        }
        other => {
            ctx.stats.exits[EK_OTHER] += 1;
            VcpuAction::Crash(CrashKind::Unexpected(format!("{other:?}")))
        }
    })
}

/// Forward what a LAPIC register write produced (IPI, EOI) to the interrupt sink.
pub(super) fn lapic_output(ctx: &mut ExitContext<'_>, out: ApicAction) {
    match out {
        ApicAction::None => {}
        ApicAction::Ipi(msg) => {
            ctx.stats.ipis_sent += 1;
            ctx.irq.send_ipi(ctx.vcpu, msg);
        }
        ApicAction::EoiLevel(v) => ctx.irq.eoi(ctx.vcpu, v),
    }
}

// ---------------------------------------------------------------------------------
// The run loop
// ---------------------------------------------------------------------------------
