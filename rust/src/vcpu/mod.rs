//! The vCPU: one thread per vCPU running an explicit state machine around `KVM_RUN`.
//!
//! ```text
//!            start()            INIT            SIPI
//!  Created ──────────► Running ───────► WaitForSipi ───► Running
//!     │ (AP)             │  ▲ HLT / wake-up
//!     └──► WaitForSipi   ▼  │
//!                      Halted
//!  any state ── pause() ──► Paused ── resume() ──► previous state
//!  any state ── stop() / VM stop / crash ──► Stopped
//! ```
//!
//! * Exits are dispatched by one function, [`handle_exit`], that only needs an
//!   [`ExitContext`] (buses, this vCPU's LAPIC, the interrupt sink), so it is unit
//!   tested without KVM.
//! * With the userspace LAPIC (the default): before each `KVM_RUN` the LAPIC timer is
//!   advanced and a pending vector is injected with `KVM_INTERRUPT` when
//!   `ready_for_interrupt_injection` and IF allow it, otherwise an interrupt window is
//!   requested. With KVM's LAPIC (`VcpuEnv::kernel_lapic`, one-node VMs, crate::kirq)
//!   the loop only enters the guest: interrupts, the timer, HLT and INIT/SIPI stay
//!   in the kernel. KVM's APIC timer runs on in host time while the VM is paused (as
//!   under QEMU); saving and restoring the LAPIC per vCPU would lose an IPI that
//!   arrives in between.
//! * Kicks (new interrupt, pause, stop) set a flag, wake the condition variable the
//!   vCPU sleeps on when it is not in the guest, and, when it is in the guest, send
//!   the kick signal (`SIGRTMIN`) whose handler sets `kvm_run.immediate_exit`, as
//!   Firecracker does. The flag/`in_guest` pair is a Dekker handshake, so no kick is
//!   lost and a vCPU that is not in the guest is not signalled; [`KickTarget`] makes
//!   sure a kick never signals a thread that has left its run function.
//! * The LAPIC timer is a POSIX timer per vCPU delivering the same signal to the vCPU
//!   thread (`SIGEV_THREAD_ID`): a guest spinning at CPL3 (no exits) still gets its timer
//!   interrupt on time; it is only re-armed when the deadline changes.
//! * The LAPIC answers IA32_APIC_BASE; each write the guest makes is mirrored into
//!   KVM's copy of the MSR (KVM_SET_MSRS), which is where KVM takes CPUID.1:EDX[9]
//!   ("APIC present") from, so that bit follows the global enable. The xAPIC page
//!   decodes wherever the base says, only in xAPIC mode.
//! * The exit path allocates nothing and logs nothing (statistics are plain counters
//!   owned by the vCPU thread, returned when it ends).
//! * An emulation failure (KVM PVM's CPL0 emulator refusing an instruction) is
//!   finished by the VMM when [`complete`] knows the instruction (`int3`, `int1`,
//!   `cmpxchg16b`, `popcnt`, `stac`/`clac`, `fwait`, `ldmxcsr`/`stmxcsr` at CPL0 in 64-bit
//!   mode): registers,
//!   memory and an exception to deliver are set, and the guest resumes; otherwise
//!   the VM stops with the crash report as before (debug mode logs either).
//!
//! # Layout
//!
//! - `mod.rs` (this file): [`VcpuError`], the state machine ([`VcpuState`],
//!   [`VcpuEvent`], [`next_state`]) and [`VcpuShared`], the handle others use to
//!   post interrupts, kick, pause and stop a vCPU.
//! - `run.rs`: [`Vcpu`] and its run loop; `halt.rs`: HLT and wait-for-SIPI.
//! - `exits.rs`: [`handle_exit`] and [`ExitContext`]; `refused.rs`: instructions
//!   KVM refused, finished by [`complete`] or reported as a crash.
//! - `kick.rs`: kick signal, futex, [`KickTarget`], the LAPIC timer's POSIX timer.
//! - `clock.rs`: [`VmClock`]; `stats.rs`: [`VcpuStats`], [`VcpuDump`];
//!   `stop.rs`: [`StopReason`], [`VmStop`].
//! - `tests.rs`: unit tests of the exit dispatch and the state machine.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;

use crate::apic::{ApicAction, InterruptMessage, LocalApic, Lvt};
use crate::bus::{lock, Bus, BusAction};

mod clock;
pub mod complete;
mod exits;
mod halt;
mod kick;
mod profile;
mod refused;
mod run;
pub mod snapshot;
mod stats;
mod stop;
#[cfg(test)]
mod tests;

pub use clock::VmClock;
pub use exits::{handle_exit, CrashKind, ExitContext, InterruptSink, VcpuAction};
pub use halt::DEFAULT_HALT_POLL_US;
pub use kick::{kick_signal, register_kick_signal, KickAttachment, KickTarget};
pub use run::{MessageServer, Vcpu, VcpuEnv};
pub use stats::{VcpuDump, VcpuStats, EXIT_KINDS, TIMER_LATE_NS};
pub use stop::{StopReason, VmFailure, VmStop};

// Shared between the submodules (each does `use super::*`).
use halt::HaltPoll;
use kick::{futex_wait, futex_wake, KickTimer, KICK_FLAG, RUN_PTR};
use stats::{
    EK_FAIL_ENTRY, EK_HLT, EK_INTERNAL, EK_INTR, EK_IO, EK_IRQ_WINDOW, EK_MMIO, EK_MSR, EK_OTHER,
    EK_SHUTDOWN,
};

/// Guest-physical base of the local APIC page at reset (the guest may move it through
/// IA32_APIC_BASE; each vCPU decodes its own APIC wherever its base says).
pub const LAPIC_BASE: u64 = 0xFEE0_0000;

/// Size of the local APIC page.
pub const LAPIC_SIZE: u64 = 0x1000;

/// Errors of the vcpu module.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_RUN failed on vCPU {vcpu}: {err}")]
    Run { vcpu: u32, err: kvm_ioctls::Error },
    #[error("cannot {what} vCPU {vcpu}: {err}")]
    Setup {
        vcpu: u32,
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("cannot register the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot create the LAPIC timer of vCPU {vcpu}: {err}")]
    Timer { vcpu: u32, err: std::io::Error },
    #[error("cannot spawn the thread of vCPU {vcpu}: {err}")]
    Spawn { vcpu: u32, err: std::io::Error },
    #[error("cannot build a KVM_GET/SET_MSRS batch")]
    MsrBatch,
    #[error("restoring vCPU {vcpu}: KVM refused MSR {msr:#x}")]
    MsrRefused { vcpu: u32, msr: u32 },
    #[error("KVM_INTERRUPT of vector {vector:#x} failed on vCPU {vcpu}: {err}")]
    Interrupt {
        vcpu: u32,
        vector: u8,
        err: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------
// State machine
// ---------------------------------------------------------------------------------

/// The state of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[repr(u8)]
pub enum VcpuState {
    /// Created, thread not started (or waiting for `start`).
    Created = 0,
    /// Executing guest code (or about to).
    Running = 1,
    /// Executed HLT; waits for an interrupt, a timer deadline or a kick.
    Halted = 2,
    /// Application processor after reset/INIT, waiting for a Startup IPI.
    WaitForSipi = 3,
    /// Paused by the VMM.
    Paused = 4,
    /// Finished; the thread has ended or is ending.
    Stopped = 5,
}

impl VcpuState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => VcpuState::Created,
            1 => VcpuState::Running,
            2 => VcpuState::Halted,
            3 => VcpuState::WaitForSipi,
            4 => VcpuState::Paused,
            _ => VcpuState::Stopped,
        }
    }
}

/// What the VMM asks of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Request {
    /// Not started yet.
    None = 0,
    /// Run (start or resume).
    Run = 1,
    /// Pause.
    Pause = 2,
    /// Stop for good.
    Stop = 3,
}

/// Events the state machine reacts to (besides exits); used by [`next_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The VMM requested `Request::Run` for a not yet started vCPU.
    Start { is_bsp: bool },
    /// The guest executed HLT.
    Hlt,
    /// An interrupt the vCPU can take (or an NMI) is pending.
    Wake,
    /// Restored from a snapshot, or migrated in from another node: start (or
    /// go on) in the state it was saved in.
    Restore(VcpuState),
    /// The LAPIC received INIT.
    Init,
    /// The LAPIC received a Startup IPI.
    Sipi,
    /// `pause()`.
    Pause,
    /// `resume()`, back to the state before the pause.
    Resume(VcpuState),
    /// `stop()`, a VM stop, or a crash.
    Stop,
}

/// The transition function of the vCPU state machine (pure, unit tested).
pub fn next_state(state: VcpuState, ev: VcpuEvent) -> VcpuState {
    use VcpuState::*;
    match (state, ev) {
        (Stopped, _) | (_, VcpuEvent::Stop) => Stopped,
        (Created, VcpuEvent::Start { is_bsp: true }) => Running,
        (Created, VcpuEvent::Start { is_bsp: false }) => WaitForSipi,
        (Created | Paused, VcpuEvent::Restore(s)) if !matches!(s, Paused | Stopped) => s,
        (Created, _) => Created,
        (Paused, VcpuEvent::Resume(prev)) => prev,
        (Paused, _) => Paused,
        (_, VcpuEvent::Pause) => Paused,
        (_, VcpuEvent::Init) => WaitForSipi,
        (WaitForSipi, VcpuEvent::Sipi) => Running,
        (WaitForSipi, _) => WaitForSipi,
        (Running, VcpuEvent::Hlt) => Halted,
        (Halted, VcpuEvent::Wake) => Running,
        (s, _) => s,
    }
}

// ---------------------------------------------------------------------------------
// Shared per-vCPU handle (kicks, requests, LAPIC)
// ---------------------------------------------------------------------------------

/// What other threads share with one vCPU: its LAPIC, its requested and current state,
/// and the kick machinery.
pub struct VcpuShared {
    /// vCPU index = APIC ID.
    pub index: u32,
    /// This vCPU's local APIC.
    pub lapic: Mutex<LocalApic>,
    request: AtomicU8,
    state: AtomicU8,
    /// 1 = kicked since the vCPU last looked; also the futex word it sleeps on.
    kick_flag: AtomicU32,
    /// The vCPU is (about to be) asleep in [`VcpuShared::wait_kick`].
    sleeping: AtomicBool,
    in_guest: AtomicBool,
    /// The vCPU thread the kick signal goes to (none before it starts and once it
    /// has left its run function).
    thread: KickTarget,
    /// Interrupt messages posted by [`VcpuShared::post`] (sender side, lock-free).
    inbox_tx: mpsc::Sender<InterruptMessage>,
    /// Receiver side, taken by the vCPU thread when it starts.
    inbox_rx: Mutex<Option<mpsc::Receiver<InterruptMessage>>>,
    /// Posted messages the LAPIC accepted (statistics).
    posted_accepted: AtomicU64,
    /// A snapshot wants this vCPU's state ([`VcpuShared::request_capture`]).
    capture_wanted: AtomicBool,
    /// The state the vCPU thread captured, or why it could not.
    capture: Mutex<Option<Result<Box<snapshot::VcpuSnapshot>, VcpuError>>>,
    /// This node runs the vCPU (a distributed VM has a replica of every vCPU
    /// on every node; only one node's is resident, see `vm::migrate`). Changed
    /// with the LAPIC lock held, so a delivery that found it resident under
    /// that lock is in the state a capture takes after the change.
    resident: AtomicBool,
    /// State to put into the (parked) vCPU: a migration in.
    restore_in: Mutex<Option<Box<snapshot::VcpuSnapshot>>>,
    restore_wanted: AtomicBool,
    /// The outcome of that restore, once the vCPU thread has made it.
    restored: Mutex<Option<Result<(), VcpuError>>>,
}

impl std::fmt::Debug for VcpuShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuShared")
            .field("index", &self.index)
            .field("state", &self.state())
            .finish()
    }
}

impl VcpuShared {
    /// A handle for vCPU `index` with its LAPIC.
    pub fn new(index: u32, lapic: LocalApic) -> Self {
        let (tx, rx) = mpsc::channel();
        VcpuShared {
            index,
            lapic: Mutex::new(lapic),
            request: AtomicU8::new(Request::None as u8),
            state: AtomicU8::new(VcpuState::Created as u8),
            kick_flag: AtomicU32::new(0),
            sleeping: AtomicBool::new(false),
            in_guest: AtomicBool::new(false),
            thread: KickTarget::new(),
            inbox_tx: tx,
            capture_wanted: AtomicBool::new(false),
            capture: Mutex::new(None),
            inbox_rx: Mutex::new(Some(rx)),
            posted_accepted: AtomicU64::new(0),
            resident: AtomicBool::new(true),
            restore_in: Mutex::new(None),
            restore_wanted: AtomicBool::new(false),
            restored: Mutex::new(None),
        }
    }

    /// Whether this node runs the vCPU (see the field).
    pub fn is_resident(&self) -> bool {
        self.resident.load(Ordering::SeqCst)
    }

    /// Make the vCPU resident here or not; the caller holds `lapic`'s lock
    /// (see the field). A vCPU that is not resident stays parked whatever it
    /// is asked (but to stop), and its thread forwards what is posted to it
    /// to the node that runs it.
    pub fn set_resident(&self, on: bool, _lapic_held: &LocalApic) {
        self.resident.store(on, Ordering::SeqCst);
        self.kick();
    }

    /// Hand an interrupt message to this vCPU without taking its LAPIC lock: the vCPU
    /// thread applies it (`matches` + `accept`) the next time it looks at its LAPIC,
    /// which the kick makes happen at once. Used by [`crate::vm::InterruptRouter`] when
    /// the LAPIC lock is busy, so a real-time DSM engine thread never waits for a vCPU
    /// thread that was preempted while holding it (priority inversion).
    pub fn post(&self, msg: InterruptMessage) {
        // The receiver lives as long as the vCPU; a send to a finished vCPU is moot.
        let _ = self.inbox_tx.send(msg);
        self.kick();
    }

    /// The inbox receiver slot (tests that play the vCPU thread).
    #[cfg(test)]
    pub(crate) fn inbox_rx_for_tests(&self) -> &Mutex<Option<mpsc::Receiver<InterruptMessage>>> {
        &self.inbox_rx
    }

    /// Posted messages the LAPIC accepted so far.
    pub fn posted_accepted(&self) -> u64 {
        self.posted_accepted.load(Ordering::Relaxed)
    }

    /// Apply the posted messages to `lapic` (held by the caller).
    pub(crate) fn drain_posted(
        &self,
        rx: Option<&mpsc::Receiver<InterruptMessage>>,
        lapic: &mut LocalApic,
    ) {
        let Some(rx) = rx else { return };
        while let Ok(m) = rx.try_recv() {
            if lapic.matches(&m) && lapic.accept(&m) {
                self.posted_accepted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The vCPU's current state.
    pub fn state(&self) -> VcpuState {
        VcpuState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set_state(&self, s: VcpuState) {
        self.state.store(s as u8, Ordering::Release);
    }

    fn request(&self) -> Request {
        match self.request.load(Ordering::Acquire) {
            1 => Request::Run,
            2 => Request::Pause,
            3 => Request::Stop,
            _ => Request::None,
        }
    }

    fn set_request(&self, r: Request) {
        // Stop is final.
        let _ = self
            .request
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur != Request::Stop as u8).then_some(r as u8)
            });
        self.kick();
    }

    /// Start (or resume) the vCPU.
    pub fn start(&self) {
        self.set_request(Request::Run);
    }
    /// Resume a paused vCPU.
    pub fn resume(&self) {
        self.set_request(Request::Run);
    }
    /// Pause the vCPU (it leaves the guest and sleeps until `resume`).
    pub fn pause(&self) {
        self.set_request(Request::Pause);
    }
    /// Stop the vCPU for good.
    pub fn stop(&self) {
        self.set_request(Request::Stop);
    }

    /// Make the vCPU re-examine its LAPIC and requests now: leaves `KVM_RUN` if it is
    /// in the guest, wakes it if it sleeps. Never blocks (no lock: the kicker may be the
    /// real-time DSM engine thread and the vCPU thread may be preempted anywhere).
    pub fn kick(&self) {
        self.kick_flag.store(1, Ordering::SeqCst);
        // Dekker with `wait_kick`: it sets `sleeping` before it looks at the flag.
        if self.sleeping.load(Ordering::SeqCst) {
            futex_wake(&self.kick_flag);
        }
        if self.in_guest.load(Ordering::SeqCst) {
            // Never reaches a thread that has returned from its run function.
            self.thread.signal(kick_signal());
        }
    }

    /// Watch the kick flag without sleeping until `until`; consumes a kick and
    /// returns true when one came (see [`HaltPoll`]).
    fn poll_kick(&self, until: Instant) -> bool {
        loop {
            if self.kick_flag.load(Ordering::Acquire) != 0 {
                self.kick_flag.store(0, Ordering::SeqCst);
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
    }

    /// Sleep until kicked, or until `timeout` passes (None: no timeout). Returns at
    /// once if a kick came since the flag was last consumed. May return early
    /// (signals): callers re-check what they wait for.
    fn wait_kick(&self, timeout: Option<Duration>) {
        self.sleeping.store(true, Ordering::SeqCst);
        if self.kick_flag.swap(0, Ordering::SeqCst) == 0 {
            // The kernel re-checks the word: a kick between the swap and the sleep
            // makes FUTEX_WAIT return at once (EAGAIN), so no kick is lost.
            futex_wait(&self.kick_flag, 0, timeout);
        }
        self.sleeping.store(false, Ordering::SeqCst);
        self.kick_flag.store(0, Ordering::SeqCst);
    }
}
