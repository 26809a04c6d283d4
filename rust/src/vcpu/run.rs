//! The vCPU thread: [`Vcpu`], its state transitions and the run loop around
//! `KVM_RUN` (interrupt injection, timer, exits, pause/stop requests).

use super::*;

/// What all vCPUs of a VM share.
pub struct VcpuEnv {
    pub pio: Bus,
    pub mmio: Bus,
    pub irq: Arc<dyn InterruptSink>,
    pub clock: VmClock,
    pub stop: Arc<VmStop>,
    pub debug: bool,
    /// Upper bound of adaptive halt polling (see `HaltPoll`); zero turns it off.
    pub halt_poll_max: Duration,
    /// Serves the node's incoming messages on a vCPU thread (DSM `vcpu-serve`).
    pub server: Option<Arc<dyn MessageServer>>,
    /// The vCPU whose thread serves (its thread gets the transport's signals).
    pub server_vcpu: Option<u32>,
    /// Guest RAM through the guest mapping (coherent: accesses fault into the DSM
    /// like the guest's), for finishing instructions the host's CPL0 emulator
    /// refuses ([`complete`]); None: never complete, every emulation failure
    /// stops the VM. Must stay mapped while the vCPUs run (the `Vm` owns it).
    pub guest_memory: Option<vm_memory::GuestMemoryMmap>,
    /// KVM's in-kernel LAPIC (split irqchip) instead of `VcpuShared::lapic`.
    pub kernel_lapic: bool,
    /// The MSRs a snapshot saves (KVM_GET_MSR_INDEX_LIST).
    pub msr_index: Vec<u32>,
}

/// Incoming cluster traffic served on a vCPU thread: the transport signals the
/// thread (which leaves `KVM_RUN` or its halt wait with `EINTR`) and it serves
/// what arrived before it re-enters the guest, so no other thread is woken.
pub trait MessageServer: Send + Sync {
    /// Route the transport's signals to thread `tid` (None: stop).
    fn attach(&self, tid: Option<i32>);
    /// Serve what has arrived, unless another thread is serving (never blocks).
    fn serve(&self);
}

/// One vCPU, owned by its thread once started.
pub struct Vcpu {
    pub(super) fd: VcpuFd,
    pub(super) shared: Arc<VcpuShared>,
    pub(super) env: Arc<VcpuEnv>,
    pub(super) is_bsp: bool,
    pub(super) state: VcpuState,
    pub(super) paused_from: VcpuState,
    pub(super) stats: VcpuStats,
    pub(super) reset_regs: kvm_regs,
    pub(super) reset_sregs: kvm_sregs,
    pub(super) pending_nmi: bool,
    pub(super) halted_if: bool,
    last_cr8: u64,
    pub(super) inbox: Option<mpsc::Receiver<InterruptMessage>>,
    pub(super) halt_poll: HaltPoll,
    /// Woken from a HLT executed with IF set; nothing ran in the guest since.
    pub(super) after_hlt: bool,
    /// This thread serves the node's incoming messages (see [`MessageServer`]).
    pub(super) serves: bool,
    /// A signal or kick came: serve before the next entry.
    pub(super) serve_due: bool,
    /// The deadline of a timer expiry whose vector is raised but not injected yet.
    pub(super) timer_due: Option<u64>,
    /// `DVMM_TRACE_TIMER` is set: report late timer interrupts on stderr.
    pub(super) trace_timer: bool,
    /// A vector went to KVM_INTERRUPT and has not been seen delivered since.
    pub(super) injected_unconfirmed: bool,
    /// (Tracing) when the current halt began, and when it was last reported.
    pub(super) halt_since: Option<u64>,
    pub(super) halt_reported: u64,
    /// Restored from a snapshot: the run state to start in.
    pub(super) restored: Option<VcpuState>,
    /// `DVMM_PROFILE`: sample the guest's RIP at each timer interrupt.
    pub(super) profile: Option<super::profile::Profile>,
}

pub(super) const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86; // _IOW(KVMIO, 0x86, struct kvm_interrupt)

impl Vcpu {
    /// Wrap a configured KVM vCPU. `reset_*` is the architectural reset state used for
    /// INIT/SIPI (take it from the fresh vCPU before applying the boot entry state).
    pub fn new(
        fd: VcpuFd,
        shared: Arc<VcpuShared>,
        env: Arc<VcpuEnv>,
        is_bsp: bool,
        reset_regs: kvm_regs,
        reset_sregs: kvm_sregs,
    ) -> Self {
        let halt_poll = HaltPoll::new(env.halt_poll_max);
        Vcpu {
            fd,
            shared,
            env,
            is_bsp,
            state: VcpuState::Created,
            paused_from: VcpuState::Created,
            stats: VcpuStats::default(),
            reset_regs,
            reset_sregs,
            pending_nmi: false,
            halted_if: true,
            last_cr8: 0,
            inbox: None,
            halt_poll,
            after_hlt: false,
            serves: false,
            serve_due: false,
            timer_due: None,
            trace_timer: std::env::var_os("DVMM_TRACE_TIMER").is_some_and(|v| v != "0"),
            injected_unconfirmed: false,
            halt_since: None,
            halt_reported: 0,
            restored: None,
            profile: super::profile::Profile::from_env(),
        }
    }
    /// Spawn the vCPU thread; it waits in `Created` for `VcpuShared::start`.
    pub fn spawn(self) -> Result<std::thread::JoinHandle<VcpuStats>, VcpuError> {
        let index = self.shared.index;
        register_kick_signal()?;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.thread_main())
            .map_err(|err| VcpuError::Spawn { vcpu: index, err })
    }
    pub(super) fn thread_main(mut self) -> VcpuStats {
        let index = self.shared.index;
        // Unblock the kick signal in this thread (the spawning thread may block it).
        // SAFETY: plain sigset manipulation on local storage.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, kick_signal());
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        self.inbox = lock(&self.shared.inbox_rx).take();
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        RUN_PTR.with(|p| p.set(run_ptr));
        KICK_FLAG.with(|f| f.set(&self.shared.kick_flag as *const AtomicU32));
        let shared = self.shared.clone();
        let server = self
            .env
            .server
            .clone()
            .filter(|_| self.env.server_vcpu == Some(index));
        if let Some(s) = &server {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            s.attach(Some(tid));
            self.serves = true;
        }
        // Detaches before this function returns, also if the run loop panics.
        let attached = shared.thread.attach();

        let r = match KickTimer::new(index) {
            Ok(mut timer) => self.run_loop(&mut timer),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            self.env.stop.request(StopReason::Error(e.into()));
        }
        if let Some(s) = &server {
            s.attach(None);
        }
        // From here on no kick signals this thread (and none is still on its way).
        drop(attached);
        KICK_FLAG.with(|f| f.set(std::ptr::null()));
        self.shared.in_guest.store(false, Ordering::SeqCst);
        RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        self.transition(VcpuEvent::Stop);
        std::mem::take(&mut self.stats)
    }
    pub(super) fn transition(&mut self, ev: VcpuEvent) {
        let new = next_state(self.state, ev);
        if new == VcpuState::Paused && self.state != VcpuState::Paused {
            self.paused_from = self.state;
        }
        self.state = new;
        self.shared.set_state(new);
    }
    pub(super) fn run_loop(&mut self, timer: &mut KickTimer) -> Result<(), VcpuError> {
        loop {
            if self.serves && std::mem::take(&mut self.serve_due) {
                if let Some(s) = &self.env.server {
                    s.serve();
                }
            }
            let request = self.shared.request();
            if !self.shared.is_resident() && request != Request::Stop {
                // Another node runs this vCPU (or it is migrating in): parked.
                self.parked_elsewhere();
                continue;
            }
            match request {
                Request::Stop => return Ok(()),
                Request::Pause if self.state != VcpuState::Paused => {
                    timer.set(None);
                    self.finish_pending_exit();
                    self.transition(VcpuEvent::Pause);
                }
                Request::Run
                    if matches!(self.state, VcpuState::Created | VcpuState::Paused)
                        && self.restored.is_some() =>
                {
                    if let Some(s) = self.restored.take() {
                        self.transition(VcpuEvent::Restore(s));
                        // The other nodes learn its APIC addressing (as after an INIT).
                        self.report_init_addressing();
                    }
                }
                Request::Run if self.state == VcpuState::Paused => {
                    let prev = self.paused_from;
                    self.transition(VcpuEvent::Resume(prev));
                }
                Request::Run if self.state == VcpuState::Created => {
                    // KVM's LAPIC holds an AP in KVM_RUN until its SIPI: every
                    // vCPU enters the guest at once.
                    self.transition(VcpuEvent::Start {
                        is_bsp: self.is_bsp || self.env.kernel_lapic,
                    });
                }
                _ => {}
            }
            match self.state {
                VcpuState::Stopped => return Ok(()),
                VcpuState::Created | VcpuState::Paused => {
                    self.shared.clone().answer_capture(self);
                    self.shared.wait_kick(None);
                    self.serve_due = true;
                }
                VcpuState::WaitForSipi => self.wait_for_sipi()?,
                VcpuState::Halted => self.halted(),
                VcpuState::Running => {
                    if let Some(stop) = self.run_once(timer)? {
                        self.env.stop.request(stop);
                        return Ok(());
                    }
                }
            }
        }
    }
    /// One round of a vCPU another node runs: take a migration's state if one
    /// came, hand what was posted to it to the node that runs it, sleep until
    /// kicked (this thread may serve the node's messages meanwhile).
    fn parked_elsewhere(&mut self) {
        if !matches!(self.state, VcpuState::Created | VcpuState::Paused) {
            // It left while running (a migration pauses it first; this is the
            // pause it had not seen yet).
            self.finish_pending_exit();
            self.transition(VcpuEvent::Pause);
        }
        self.shared.clone().answer_capture(self);
        self.shared.clone().answer_restore(self);
        if let Some(rx) = &self.inbox {
            while let Ok(m) = rx.try_recv() {
                if !self.env.irq.redirect(self.shared.index, m) {
                    // Migrating in: keep it for when the vCPU starts here.
                    let _ = self.shared.inbox_tx.send(m);
                    break;
                }
            }
        }
        self.shared.wait_kick(None);
        self.serve_due = true;
    }

    /// Let KVM finish the operation of the last exit before the vCPU's state is
    /// taken (a pause for a snapshot or a migration). KVM completes an MMIO,
    /// port I/O or MSR access userspace answered only on the next `KVM_RUN`,
    /// and that pending completion is in no state userspace can save
    /// (Documentation/virt/kvm/api.rst, KVM_RUN): captured before it, a WRMSR
    /// of the ICR would run again where the state is restored (a second IPI),
    /// a read would lose its value. `KVM_RUN` with `immediate_exit` set
    /// completes it and returns at once, without running guest code.
    fn finish_pending_exit(&mut self) {
        if self.state == VcpuState::Created {
            return;
        }
        self.fd.set_kvm_immediate_exit(1);
        // EINTR is the expected answer; anything else changes nothing here.
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// [`Vcpu::run_once`] with KVM's LAPIC: nothing to inject, no timer to arm.
    pub(super) fn run_once_kernel_lapic(&mut self) -> Result<Option<StopReason>, VcpuError> {
        if self.kicked_before_entry() {
            return Ok(None);
        }
        let res = self.fd.run();
        self.shared.in_guest.store(false, Ordering::SeqCst);
        let action = match res {
            Ok(exit) => {
                // (VM time only matters to the userspace LAPIC.)
                let mut ctx = ExitContext::of(&self.env, &self.shared, &mut self.stats, 0);
                handle_exit(exit, &mut ctx)?
            }
            Err(e) => self.interrupted_run(e)?,
        };
        Ok(self.after_exit(action))
    }
    /// The Dekker handshake with `VcpuShared::kick` before `KVM_RUN`: true (and
    /// not in the guest) if a kick came, so the loop looks at it first.
    pub(super) fn kicked_before_entry(&self) -> bool {
        self.shared.in_guest.store(true, Ordering::SeqCst);
        if self.shared.kick_flag.swap(0, Ordering::SeqCst) != 0 {
            self.shared.in_guest.store(false, Ordering::SeqCst);
            return true;
        }
        false
    }
    /// `KVM_RUN` failed: a signal or kick (EINTR/EAGAIN) means serve and go on.
    pub(super) fn interrupted_run(
        &mut self,
        e: kvm_ioctls::Error,
    ) -> Result<VcpuAction, VcpuError> {
        if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN {
            self.stats.exits[EK_INTR] += 1;
            self.serve_due = true;
            return Ok(VcpuAction::Continue);
        }
        Err(VcpuError::Run {
            vcpu: self.shared.index,
            err: e,
        })
    }
    /// Re-arm the kick and turn the exit's action into the loop's next step.
    pub(super) fn after_exit(&mut self, action: VcpuAction) -> Option<StopReason> {
        self.fd.set_kvm_immediate_exit(0);
        self.shared.kick_flag.store(0, Ordering::SeqCst);
        match action {
            VcpuAction::Continue => None,
            // KVM's LAPIC halts in the kernel (a HLT exit there: just re-enter).
            VcpuAction::Halt if self.env.kernel_lapic => None,
            VcpuAction::Halt => {
                self.halted_if = self.fd.get_kvm_run().if_flag != 0;
                self.transition(VcpuEvent::Hlt);
                None
            }
            VcpuAction::StopVm(s) => Some(StopReason::DebugExit(s)),
            VcpuAction::Shutdown(why) => Some(StopReason::Shutdown(why)),
            VcpuAction::Crash(CrashKind::InternalError) if self.complete_refused_insn() => None,
            VcpuAction::Crash(kind) => Some(self.crash(kind)),
        }
    }
    /// INIT reset the LDR and DFR: report the addressing (distributed VMs).
    pub(super) fn report_init_addressing(&self) {
        let a = lock(&self.shared.lapic).addressing();
        self.env.irq.addressing_changed(self.shared.index, a);
    }
    /// [`LocalApic::advance`], counting an expiry and remembering its deadline
    /// until the vector is injected ([`Self::timer_injected`]).
    pub(super) fn advance_timer(
        l: &mut LocalApic,
        now: u64,
        due: &mut Option<u64>,
        stats: &mut VcpuStats,
        trace: bool,
        index: u32,
        state: &str,
    ) {
        let deadline = l.next_deadline_ns();
        if l.advance(now) {
            stats.timer_fires += 1;
            if let Some(d) = deadline {
                due.get_or_insert(d);
                if trace && now.saturating_sub(d) > TIMER_LATE_NS {
                    eprintln!(
                        "dvmm: vCPU {index}: timer seen {} us after its deadline ({state})",
                        (now - d) / 1000
                    );
                }
            }
        }
    }

    /// The timer vector whose deadline was `due` is being injected at `now`.
    pub(super) fn timer_injected(&mut self, now: u64, due: u64) {
        let late = now.saturating_sub(due);
        self.stats.timer_late_max_us = self.stats.timer_late_max_us.max(late / 1000);
        if late > TIMER_LATE_NS {
            self.stats.timer_late += 1;
            if self.trace_timer {
                eprintln!(
                    "dvmm: vCPU {}: timer interrupt injected {} us after its deadline",
                    self.shared.index,
                    late / 1000
                );
            }
        }
    }
    /// Inject what is pending, enter the guest once, handle the exit.
    pub(super) fn run_once(
        &mut self,
        timer: &mut KickTimer,
    ) -> Result<Option<StopReason>, VcpuError> {
        if self.env.kernel_lapic {
            return self.run_once_kernel_lapic();
        }
        let index = self.shared.index;
        let now = self.env.clock.now_ns();
        let after_hlt = std::mem::take(&mut self.after_hlt);
        let mut timer_injected = None;
        let (vector, more, deadline, init) = {
            let mut l = lock(&self.shared.lapic);
            self.shared.drain_posted(self.inbox.as_ref(), &mut l);
            Self::advance_timer(
                &mut l,
                now,
                &mut self.timer_due,
                &mut self.stats,
                self.trace_timer,
                self.shared.index,
                "running",
            );
            if l.take_init() {
                (None, false, None, true)
            } else {
                let _ = l.take_sipi(); // SIPI outside wait-for-SIPI is ignored
                if l.take_nmi() {
                    self.pending_nmi = true;
                }
                let run = self.fd.get_kvm_run();
                self.last_cr8 = l.cr8();
                run.cr8 = self.last_cr8;
                // After an `sti; hlt` exit KVM still reports the STI interrupt
                // shadow (not ready), which would cost an interrupt-window exit
                // per wake-up; but the shadow ended with the HLT and IF is set,
                // so a real CPU takes the interrupt right there.
                let mut can =
                    run.if_flag != 0 && (run.ready_for_interrupt_injection != 0 || after_hlt);
                if can && self.injected_unconfirmed && l.pending_interrupt().is_some() {
                    // The last vector given to KVM_INTERRUPT may still be held by
                    // KVM for (re)injection: on KVM PVM `ready_for_interrupt_injection`
                    // can say 1 then, and a second KVM_INTERRUPT would replace the
                    // first, which the LAPIC already moved to the ISR: that vector
                    // would stay in service forever (no EOI comes) and block every
                    // lower-priority interrupt, the timer's among them. Wait for a
                    // window instead.
                    match self.fd.get_vcpu_events() {
                        Ok(ev) if ev.interrupt.injected != 0 => {
                            l.note(b'H', ev.interrupt.nr);
                            self.stats.injections_deferred += 1;
                            can = false;
                        }
                        _ => self.injected_unconfirmed = false,
                    }
                }
                let mut vector = None;
                let mut more = false;
                if let Some(v) = l.pending_interrupt() {
                    if can {
                        l.acknowledge(v);
                        vector = Some(v);
                        more = l.pending_interrupt().is_some();
                        if v == (l.lvt(Lvt::Timer) & 0xff) as u8 {
                            timer_injected = self.timer_due.take();
                        }
                    } else {
                        more = true;
                    }
                }
                (vector, more, l.next_deadline_ns(), false)
            }
        };
        if let Some(due) = timer_injected {
            self.timer_injected(now, due);
            if let Some(p) = self.profile.as_mut() {
                if let Ok(regs) = self.fd.get_regs() {
                    p.sample(index, now, regs.rip);
                }
            }
        }
        if init {
            timer.set(None);
            self.report_init_addressing();
            self.transition(VcpuEvent::Init);
            return Ok(None);
        }
        if self.pending_nmi {
            self.pending_nmi = false;
            self.stats.nmis_injected += 1;
            self.fd.nmi().map_err(|err| VcpuError::Setup {
                vcpu: index,
                what: "inject an NMI into",
                err,
            })?;
        }
        if let Some(v) = vector {
            let irq = kvm_bindings::kvm_interrupt { irq: u32::from(v) };
            // SAFETY: KVM_INTERRUPT on our vCPU fd with a valid kvm_interrupt struct.
            let r = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                    KVM_INTERRUPT as _,
                    &irq,
                )
            };
            if r < 0 {
                return Err(VcpuError::Interrupt {
                    vcpu: index,
                    vector: v,
                    err: std::io::Error::last_os_error(),
                });
            }
            self.stats.interrupts_injected += 1;
            self.injected_unconfirmed = true;
        }
        self.fd.get_kvm_run().request_interrupt_window = u8::from(more);
        let abs = deadline.map(|d| self.env.clock.to_monotonic(d));
        if timer.armed != abs {
            self.stats.timer_rearms += 1;
        }
        timer.set(abs);

        if self.kicked_before_entry() {
            return Ok(None);
        }
        let run_ptr: *const kvm_run = self.fd.get_kvm_run();
        let res = self.fd.run();
        self.shared.in_guest.store(false, Ordering::SeqCst);
        if res.is_ok() {
            // Without the in-kernel LAPIC, KVM reports the guest's CR8 in kvm_run.
            // SAFETY: run_ptr points to this vCPU's mmapped kvm_run, alive as long as
            // self.fd; `cr8` is outside the exit union the borrowed exit data lives in.
            let cr8 = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*run_ptr).cr8)) };
            if cr8 != self.last_cr8 {
                lock(&self.shared.lapic).set_cr8(cr8);
                self.last_cr8 = cr8;
            }
        }
        let action = match res {
            Ok(exit) => {
                let now_ns = self.env.clock.now_ns();
                let mut ctx = ExitContext::of(&self.env, &self.shared, &mut self.stats, now_ns);
                let action = handle_exit(exit, &mut ctx)?;
                if let Some(base) = ctx.apic_base_written {
                    self.sync_kvm_apic_base(base);
                }
                action
            }
            Err(e) => self.interrupted_run(e)?,
        };
        Ok(self.after_exit(action))
    }
    /// Mirrors a guest write of IA32_APIC_BASE (answered by the userspace LAPIC) into
    /// KVM's own copy of the MSR. KVM derives CPUID.1:EDX[9] (APIC present) from its
    /// copy's global-enable bit (`kvm_update_cpuid_runtime`), and KVM_SET_CPUID2 is
    /// refused once the vCPU has run, so this host-initiated KVM_SET_MSRS is what makes
    /// the guest's CPUID say "no APIC" while its APIC is disabled (SDM 11.4.3), and
    /// "APIC" again once it is re-enabled. The value was validated by the LAPIC; KVM
    /// refuses it only if its base lies beyond the guest's MAXPHYADDR, and then the CPUID
    /// bit keeps its old value (nothing else depends on KVM's copy without an
    /// in-kernel LAPIC). It allocates the MSR list: APIC mode switches are rare.
    pub(super) fn sync_kvm_apic_base(&mut self, base: u64) {
        let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: crate::apic::MSR_IA32_APIC_BASE,
            data: base,
            ..Default::default()
        }]);
        if let Ok(m) = msrs {
            let _ = self.fd.set_msrs(&m);
        }
    }
}
