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

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;

use crate::apic::{ApicAction, InterruptMessage, LocalApic, Lvt};
use crate::bus::{lock, Bus, BusAction};

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
pub enum Event {
    /// The VMM requested `Request::Run` for a not yet started vCPU.
    Start { is_bsp: bool },
    /// The guest executed HLT.
    Hlt,
    /// An interrupt the vCPU can take (or an NMI) is pending.
    Wake,
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
pub fn next_state(state: VcpuState, ev: Event) -> VcpuState {
    use VcpuState::*;
    match (state, ev) {
        (Stopped, _) | (_, Event::Stop) => Stopped,
        (Created, Event::Start { is_bsp: true }) => Running,
        (Created, Event::Start { is_bsp: false }) => WaitForSipi,
        (Created, _) => Created,
        (Paused, Event::Resume(prev)) => prev,
        (Paused, _) => Paused,
        (_, Event::Pause) => Paused,
        (_, Event::Init) => WaitForSipi,
        (WaitForSipi, Event::Sipi) => Running,
        (WaitForSipi, _) => WaitForSipi,
        (Running, Event::Hlt) => Halted,
        (Halted, Event::Wake) => Running,
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
            inbox_rx: Mutex::new(Some(rx)),
            posted_accepted: AtomicU64::new(0),
        }
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

/// FUTEX_WAIT on `word` while it holds `val`, at most `timeout`.
fn futex_wait(word: &AtomicU32, val: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, aligned u32 for the duration of the call; `tsp` is
    // null or points to a valid relative timespec on our stack.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            val,
            tsp,
        );
    }
}

/// Wake every thread waiting on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE only reads the address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

/// The thread a kick signals, with the handshake that keeps a kick from ever
/// signalling a thread that has returned from its run function: once a thread has
/// exited (and been joined) its `pthread_t` may be invalid or reused, and
/// `pthread_kill` on it is undefined behaviour.
///
/// Protocol (all `SeqCst`, so there is one total order): a kicker announces itself
/// in `signalling`, then reads `thread`, signals it if set, then withdraws. The
/// thread [`detach`](Self::detach)es by clearing `thread`, then waits until no kicker
/// is announced. A kicker that read the live `pthread_t` announced itself before
/// that read, which came before the clear, so `detach` sees it and waits for its
/// `pthread_kill` to return; a kicker that comes later reads 0. Kicks stay lock-free
/// (the kicker may be the real-time DSM engine thread); only the exiting thread can
/// wait, and only for the few instructions of a `pthread_kill` already under way.
#[derive(Debug, Default)]
pub struct KickTarget {
    /// `pthread_t` of the attached thread; 0 = none.
    thread: AtomicU64,
    /// Kickers between their read of `thread` and the end of their `pthread_kill`.
    signalling: AtomicU32,
}

impl KickTarget {
    /// No thread attached.
    pub const fn new() -> Self {
        KickTarget {
            thread: AtomicU64::new(0),
            signalling: AtomicU32::new(0),
        }
    }

    /// Make the calling thread the target of [`signal`](Self::signal) until the
    /// returned guard is dropped (which [`detach`](Self::detach)es, also when the
    /// thread unwinds from a panic). Keep the guard in the thread's run function.
    pub fn attach(&self) -> KickAttachment<'_> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.thread.store(me as u64, Ordering::SeqCst);
        KickAttachment(self)
    }

    /// Stop being the target: when this returns no signal is being sent to the
    /// attached thread and none will be.
    pub fn detach(&self) {
        self.thread.store(0, Ordering::SeqCst);
        let mut spins = 0u32;
        while self.signalling.load(Ordering::SeqCst) != 0 {
            // A kicker is inside pthread_kill (a few hundred ns) unless it was
            // preempted there: spin briefly, then sleep rather than burn the core.
            if spins < 1000 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Send `sig` to the attached thread, if there is one; true if it was sent.
    /// Never blocks.
    pub fn signal(&self, sig: libc::c_int) -> bool {
        self.signalling.fetch_add(1, Ordering::SeqCst);
        let t = self.thread.load(Ordering::SeqCst);
        let sent = t != 0 && {
            // SAFETY: `t` was read while this kicker was announced in `signalling`,
            // so the thread has not got past `detach` (which waits for us) and is
            // alive: its pthread_t is valid. A signal has no memory effects here.
            unsafe { libc::pthread_kill(t as libc::pthread_t, sig) == 0 }
        };
        self.signalling.fetch_sub(1, Ordering::SeqCst);
        sent
    }
}

/// The calling thread is the target of a [`KickTarget`] while this lives.
#[must_use = "dropping the attachment detaches the thread at once"]
#[derive(Debug)]
pub struct KickAttachment<'a>(&'a KickTarget);

impl Drop for KickAttachment<'_> {
    fn drop(&mut self) {
        self.0.detach();
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

#[cfg(test)]
mod kick_target_tests {
    use super::*;

    /// `detach` must not return while a kicker that may have read the live
    /// `pthread_t` is still signalling: simulated by announcing a kicker by hand.
    #[test]
    fn detach_waits_for_a_kick_in_flight() {
        let t = Arc::new(KickTarget::new());
        let (tx, rx) = mpsc::channel();
        let h = {
            let t = t.clone();
            std::thread::spawn(move || {
                let a = t.attach();
                // A kicker announces itself and reads the live thread id ...
                t.signalling.fetch_add(1, Ordering::SeqCst);
                assert_ne!(t.thread.load(Ordering::SeqCst), 0);
                tx.send(()).unwrap();
                drop(a);
                Instant::now()
            })
        };
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // ... the thread is still inside `detach`, so its id is still valid.
        assert!(!h.is_finished(), "detach returned under a kick in flight");
        assert_eq!(
            t.thread.load(Ordering::SeqCst),
            0,
            "new kicks see no thread"
        );
        let released = Instant::now();
        t.signalling.fetch_sub(1, Ordering::SeqCst);
        let detached = h.join().unwrap();
        assert!(detached >= released);
        assert!(!t.signal(libc::SIGUSR2), "kick after exit sent a signal");
    }
}

// ---------------------------------------------------------------------------------
// Kick signal and timer
// ---------------------------------------------------------------------------------

thread_local! {
    static RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    /// This vCPU thread's kick flag: the signal handler raises it, so a signal
    /// that lands just before the futex wait still ends the wait (the transport's
    /// readiness signals come without a `kick`).
    static KICK_FLAG: Cell<*const AtomicU32> = const { Cell::new(std::ptr::null()) };
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = RUN_PTR.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: RUN_PTR points to this thread's mmapped kvm_run while the vCPU
            // thread runs (cleared before the mapping goes away); a volatile byte store
            // is async-signal-safe.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
        }
    });
    let _ = KICK_FLAG.try_with(|f| {
        let f = f.get();
        if !f.is_null() {
            // SAFETY: KICK_FLAG points to this thread's VcpuShared::kick_flag, kept
            // alive by the thread's Arc while set (cleared before the thread ends);
            // an atomic store is async-signal-safe.
            unsafe { (*f).store(1, Ordering::SeqCst) };
        }
    });
}

static SIGNAL_INIT: Once = Once::new();

/// Install the kick signal handler (once per process).
pub fn register_kick_signal() -> Result<(), VcpuError> {
    let mut res = Ok(());
    SIGNAL_INIT.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(VcpuError::Signal);
    });
    res
}

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
struct ClockInner {
    /// CLOCK_MONOTONIC time of VM time 0: the creation time plus all the time
    /// spent paused. Only grows.
    offset_ns: AtomicU64,
    /// The VM time the clock stands still at, or [`CLOCK_RUNNING`].
    frozen_ns: AtomicU64,
    /// Serializes pause and resume against each other (readers never take it).
    control: Mutex<()>,
}

/// [`ClockInner::frozen_ns`] while the clock runs.
const CLOCK_RUNNING: u64 = u64::MAX;
/// [`ClockInner::frozen_ns`] while a pause reads the time it freezes at.
const CLOCK_PAUSING: u64 = u64::MAX - 1;

fn monotonic_ns() -> u64 {
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
    fn read(&self, mono: impl Fn() -> u64) -> u64 {
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

    fn pause_with(&self, mono: impl Fn() -> u64) {
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
    fn to_monotonic(&self, ns: u64) -> u64 {
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

/// A POSIX timer that sends the kick signal to one thread.
struct KickTimer {
    id: libc::timer_t,
    armed: Option<u64>,
}

impl KickTimer {
    fn new(vcpu: u32) -> Result<Self, VcpuError> {
        // SAFETY: sigevent is plain data; zeroed is a valid starting value.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: sev and id are valid pointers for the duration of the call.
        let r = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) };
        if r != 0 {
            return Err(VcpuError::Timer {
                vcpu,
                err: std::io::Error::last_os_error(),
            });
        }
        Ok(KickTimer { id, armed: None })
    }

    /// Arm at absolute CLOCK_MONOTONIC time `at_ns` (None: disarm); no syscall if
    /// unchanged.
    fn set(&mut self, at_ns: Option<u64>) {
        if self.armed == at_ns {
            return;
        }
        self.armed = at_ns;
        let ns = at_ns.map(|v| v.max(1)).unwrap_or(0);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: self.id is a live timer; spec is a valid itimerspec.
        unsafe {
            libc::timer_settime(self.id, libc::TIMER_ABSTIME, &spec, std::ptr::null_mut());
        }
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        // SAFETY: self.id was created by timer_create and is deleted once.
        unsafe {
            libc::timer_delete(self.id);
        }
    }
}

// ---------------------------------------------------------------------------------
// Stop reasons, statistics, register dumps
// ---------------------------------------------------------------------------------

/// Registers of a vCPU, reported when the guest crashes.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct VcpuDump {
    pub vcpu: u32,
    pub exit_reason: String,
    pub rip: String,
    pub rsp: String,
    pub rflags: String,
    pub cr0: String,
    pub cr2: String,
    pub cr3: String,
    pub cr4: String,
    pub efer: String,
    pub cs: String,
    pub ss: String,
    pub cs_base: String,
    pub regs: std::collections::BTreeMap<String, String>,
    /// The instruction bytes KVM reported (emulation failures), hex.
    pub insn_bytes: Option<String>,
}

impl VcpuDump {
    /// Build a dump from KVM register state.
    pub fn from_regs(vcpu: u32, exit_reason: &str, r: &kvm_regs, s: &kvm_sregs) -> Self {
        let h = |v: u64| format!("{v:#x}");
        let regs = [
            ("rax", r.rax),
            ("rbx", r.rbx),
            ("rcx", r.rcx),
            ("rdx", r.rdx),
            ("rsi", r.rsi),
            ("rdi", r.rdi),
            ("rbp", r.rbp),
            ("r8", r.r8),
            ("r9", r.r9),
            ("r10", r.r10),
            ("r11", r.r11),
            ("r12", r.r12),
            ("r13", r.r13),
            ("r14", r.r14),
            ("r15", r.r15),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), h(*v)))
        .collect();
        VcpuDump {
            vcpu,
            exit_reason: exit_reason.to_string(),
            rip: h(r.rip),
            rsp: h(r.rsp),
            rflags: h(r.rflags),
            cr0: h(s.cr0),
            cr2: h(s.cr2),
            cr3: h(s.cr3),
            cr4: h(s.cr4),
            efer: h(s.efer),
            cs: format!("{:#x}", s.cs.selector),
            ss: format!("{:#x}", s.ss.selector),
            cs_base: h(s.cs.base),
            regs,
            insn_bytes: None,
        }
    }

    /// One-line summary for error messages.
    pub fn summary(&self) -> String {
        format!(
            "vCPU {} rip={} rsp={} rflags={} cs={} cr0={} cr3={} cr4={} efer={}",
            self.vcpu,
            self.rip,
            self.rsp,
            self.rflags,
            self.cs,
            self.cr0,
            self.cr3,
            self.cr4,
            self.efer
        )
    }
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote this status to the debug-exit port.
    DebugExit(u8),
    /// The guest asked for a shutdown/reset (KVM system event).
    Shutdown(String),
    /// The guest crashed (triple fault, emulation failure, failed entry, unexpected exit).
    Crash {
        error: String,
        dump: Option<Box<VcpuDump>>,
    },
    /// The VMM failed.
    Error(String),
    /// `timeout_s` passed.
    Timeout,
    /// `stop()` was called.
    Stopped,
}

/// Where vCPUs (and others) report that the VM must stop; the first report wins.
#[derive(Debug, Default)]
pub struct VmStop {
    reason: Mutex<Option<StopReason>>,
    cv: Condvar,
}

impl VmStop {
    /// A fresh, not stopped, signal.
    pub fn new() -> Self {
        Self::default()
    }
    /// Ask the VM to stop (ignored if a reason was already given).
    pub fn request(&self, r: StopReason) {
        let mut g = lock(&self.reason);
        if g.is_none() {
            *g = Some(r);
        }
        self.cv.notify_all();
    }
    /// The stop reason, if the VM was asked to stop.
    pub fn reason(&self) -> Option<StopReason> {
        lock(&self.reason).clone()
    }
    /// Wait for a stop request; `None` if `timeout` passed first.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<StopReason> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut g = lock(&self.reason);
        loop {
            if let Some(r) = g.clone() {
                return Some(r);
            }
            match deadline {
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return None;
                    }
                    g = self
                        .cv
                        .wait_timeout(g, d - now)
                        .map(|x| x.0)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                None => g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

/// Kinds of exits counted in [`VcpuStats::exits`].
pub const EXIT_KINDS: [&str; 10] = [
    "io",
    "mmio",
    "msr",
    "hlt",
    "irq_window",
    "intr",
    "shutdown",
    "internal_error",
    "fail_entry",
    "other",
];
const EK_IO: usize = 0;
const EK_MMIO: usize = 1;
const EK_MSR: usize = 2;
const EK_HLT: usize = 3;
const EK_IRQ_WINDOW: usize = 4;
const EK_INTR: usize = 5;
const EK_SHUTDOWN: usize = 6;
const EK_INTERNAL: usize = 7;
const EK_FAIL_ENTRY: usize = 8;
const EK_OTHER: usize = 9;

/// A timer interrupt injected later than this after its deadline counts as late
/// ([`VcpuStats::timer_late`]); with `DVMM_TRACE_TIMER=1` each one is reported with
/// where the time went (kick or injection).
pub const TIMER_LATE_NS: u64 = 10_000_000;

/// Counters of one vCPU (owned by its thread; no atomics on the exit path).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuStats {
    pub exits: [u64; EXIT_KINDS.len()],
    pub pio_reads: u64,
    pub pio_writes: u64,
    pub mmio_reads: u64,
    pub mmio_writes: u64,
    pub lapic_accesses: u64,
    pub unknown_pio: u64,
    pub unknown_mmio: u64,
    pub msr_gp: u64,
    pub interrupts_injected: u64,
    pub nmis_injected: u64,
    pub ipis_sent: u64,
    pub timer_rearms: u64,
    /// Halts that ended during halt polling (no sleep).
    pub halt_poll_hits: u64,
    /// Halts that slept on the futex.
    pub halt_sleeps: u64,
    /// Emulation failures finished by the VMM (see [`complete`]).
    pub insns_completed: u64,
    /// Interrupt injections put off because KVM still held the previous vector.
    pub injections_deferred: u64,
    /// LAPIC timer expiries (the timer vector raised into the IRR).
    pub timer_fires: u64,
    /// Worst delay from a timer's deadline to its vector's injection, in µs.
    pub timer_late_max_us: u64,
    /// Timer interrupts injected more than [`TIMER_LATE_NS`] after their deadline.
    pub timer_late: u64,
}

impl VcpuStats {
    /// Add another vCPU's counters.
    pub fn merge(&mut self, o: &VcpuStats) {
        for (a, b) in self.exits.iter_mut().zip(o.exits.iter()) {
            *a += b;
        }
        self.pio_reads += o.pio_reads;
        self.pio_writes += o.pio_writes;
        self.mmio_reads += o.mmio_reads;
        self.mmio_writes += o.mmio_writes;
        self.lapic_accesses += o.lapic_accesses;
        self.unknown_pio += o.unknown_pio;
        self.unknown_mmio += o.unknown_mmio;
        self.msr_gp += o.msr_gp;
        self.interrupts_injected += o.interrupts_injected;
        self.nmis_injected += o.nmis_injected;
        self.ipis_sent += o.ipis_sent;
        self.timer_rearms += o.timer_rearms;
        self.halt_poll_hits += o.halt_poll_hits;
        self.halt_sleeps += o.halt_sleeps;
        self.insns_completed += o.insns_completed;
        self.timer_fires += o.timer_fires;
        self.injections_deferred += o.injections_deferred;
        self.timer_late_max_us = self.timer_late_max_us.max(o.timer_late_max_us);
        self.timer_late += o.timer_late;
    }

    /// Total number of exits.
    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }
}

// ---------------------------------------------------------------------------------
// Exit dispatch
// ---------------------------------------------------------------------------------

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
    fn of(env: &'a VcpuEnv, shared: &'a VcpuShared, stats: &'a mut VcpuStats, now_ns: u64) -> Self {
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
fn is_default_apic_page(addr: u64) -> bool {
    addr.wrapping_sub(LAPIC_BASE) < LAPIC_SIZE
}

/// The offset of `addr` in the LAPIC's MMIO page, if the page decodes there: only in
/// xAPIC mode, at the base IA32_APIC_BASE gives (the guest may relocate it; SDM
/// 11.4.4). Globally disabled or in x2APIC mode the page is not there at all, so
/// an access goes to the bus like any other (nothing is there: reads give all
/// ones, writes are dropped). A base over RAM is not seen: RAM accesses do not exit.
fn lapic_offset(l: &LocalApic, addr: u64) -> Option<u64> {
    let off = addr.wrapping_sub(l.mmio_base()?);
    (off < LAPIC_SIZE).then_some(off)
}

/// A guest write to this vCPU's LAPIC (MMIO or MSR): brings its timer up to date,
/// applies `write`, and reports a change of its addressing (ID, LDR, DFR, mode) so
/// other nodes can route logical and lowest-priority interrupts to it.
fn lapic_write<R>(ctx: &ExitContext<'_>, write: impl FnOnce(&mut LocalApic, u64) -> R) -> R {
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
fn lapic_output(ctx: &mut ExitContext<'_>, out: ApicAction) {
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
struct HaltPoll {
    window: Duration,
    max: Duration,
}

impl HaltPoll {
    const START: Duration = Duration::from_micros(10);

    fn new(max: Duration) -> Self {
        HaltPoll {
            window: Duration::ZERO,
            max,
        }
    }

    /// Adapt after a halt that ended `blocked` after it began; `hit`: the
    /// poll saw the wake-up.
    fn adapt(&mut self, blocked: Duration, hit: bool) {
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

/// One vCPU, owned by its thread once started.
pub struct Vcpu {
    fd: VcpuFd,
    shared: Arc<VcpuShared>,
    env: Arc<VcpuEnv>,
    is_bsp: bool,
    state: VcpuState,
    paused_from: VcpuState,
    stats: VcpuStats,
    reset_regs: kvm_regs,
    reset_sregs: kvm_sregs,
    pending_nmi: bool,
    halted_if: bool,
    last_cr8: u64,
    inbox: Option<mpsc::Receiver<InterruptMessage>>,
    halt_poll: HaltPoll,
    /// Woken from a HLT executed with IF set; nothing ran in the guest since.
    after_hlt: bool,
    /// This thread serves the node's incoming messages (see [`MessageServer`]).
    serves: bool,
    /// A signal or kick came: serve before the next entry.
    serve_due: bool,
    /// The deadline of a timer expiry whose vector is raised but not injected yet.
    timer_due: Option<u64>,
    /// `DVMM_TRACE_TIMER` is set: report late timer interrupts on stderr.
    trace_timer: bool,
    /// A vector went to KVM_INTERRUPT and has not been seen delivered since.
    injected_unconfirmed: bool,
    /// (Tracing) when the current halt began, and when it was last reported.
    halt_since: Option<u64>,
    halt_reported: u64,
}

const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86; // _IOW(KVMIO, 0x86, struct kvm_interrupt)

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

    fn thread_main(mut self) -> VcpuStats {
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
            self.env.stop.request(StopReason::Error(e.to_string()));
        }
        if let Some(s) = &server {
            s.attach(None);
        }
        // From here on no kick signals this thread (and none is still on its way).
        drop(attached);
        KICK_FLAG.with(|f| f.set(std::ptr::null()));
        self.shared.in_guest.store(false, Ordering::SeqCst);
        RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        self.transition(Event::Stop);
        std::mem::take(&mut self.stats)
    }

    fn transition(&mut self, ev: Event) {
        let new = next_state(self.state, ev);
        if new == VcpuState::Paused && self.state != VcpuState::Paused {
            self.paused_from = self.state;
        }
        self.state = new;
        self.shared.set_state(new);
    }

    fn run_loop(&mut self, timer: &mut KickTimer) -> Result<(), VcpuError> {
        loop {
            if self.serves && std::mem::take(&mut self.serve_due) {
                if let Some(s) = &self.env.server {
                    s.serve();
                }
            }
            match self.shared.request() {
                Request::Stop => return Ok(()),
                Request::Pause if self.state != VcpuState::Paused => {
                    timer.set(None);
                    self.transition(Event::Pause);
                }
                Request::Run if self.state == VcpuState::Paused => {
                    let prev = self.paused_from;
                    self.transition(Event::Resume(prev));
                }
                Request::Run if self.state == VcpuState::Created => {
                    // KVM's LAPIC holds an AP in KVM_RUN until its SIPI: every
                    // vCPU enters the guest at once.
                    self.transition(Event::Start {
                        is_bsp: self.is_bsp || self.env.kernel_lapic,
                    });
                }
                _ => {}
            }
            match self.state {
                VcpuState::Stopped => return Ok(()),
                VcpuState::Created | VcpuState::Paused => {
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

    /// [`Vcpu::run_once`] with KVM's LAPIC: nothing to inject, no timer to arm.
    fn run_once_kernel_lapic(&mut self) -> Result<Option<StopReason>, VcpuError> {
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
    fn kicked_before_entry(&self) -> bool {
        self.shared.in_guest.store(true, Ordering::SeqCst);
        if self.shared.kick_flag.swap(0, Ordering::SeqCst) != 0 {
            self.shared.in_guest.store(false, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// `KVM_RUN` failed: a signal or kick (EINTR/EAGAIN) means serve and go on.
    fn interrupted_run(&mut self, e: kvm_ioctls::Error) -> Result<VcpuAction, VcpuError> {
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
    fn after_exit(&mut self, action: VcpuAction) -> Option<StopReason> {
        self.fd.set_kvm_immediate_exit(0);
        self.shared.kick_flag.store(0, Ordering::SeqCst);
        match action {
            VcpuAction::Continue => None,
            // KVM's LAPIC halts in the kernel (a HLT exit there: just re-enter).
            VcpuAction::Halt if self.env.kernel_lapic => None,
            VcpuAction::Halt => {
                self.halted_if = self.fd.get_kvm_run().if_flag != 0;
                self.transition(Event::Hlt);
                None
            }
            VcpuAction::StopVm(s) => Some(StopReason::DebugExit(s)),
            VcpuAction::Shutdown(why) => Some(StopReason::Shutdown(why)),
            VcpuAction::Crash(CrashKind::InternalError) if self.complete_refused_insn() => None,
            VcpuAction::Crash(kind) => Some(self.crash(kind)),
        }
    }

    fn wait_for_sipi(&mut self) -> Result<(), VcpuError> {
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
                self.transition(Event::Sipi);
            }
            None => {
                self.shared.wait_kick(None);
                self.serve_due = true;
            }
        }
        Ok(())
    }

    /// INIT reset the LDR and DFR: report the addressing (distributed VMs).
    fn report_init_addressing(&self) {
        let a = lock(&self.shared.lapic).addressing();
        self.env.irq.addressing_changed(self.shared.index, a);
    }

    /// [`LocalApic::advance`], counting an expiry and remembering its deadline
    /// until the vector is injected ([`Self::timer_injected`]).
    fn advance_timer(
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
    fn timer_injected(&mut self, now: u64, due: u64) {
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

    fn halted(&mut self) {
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
            self.transition(Event::Init);
        } else if wake {
            // The HLT completed with IF set: the interrupt that woke it can be
            // injected at once (see `run_once`).
            self.after_hlt = self.halted_if;
            self.halt_since = None;
            self.transition(Event::Wake);
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

    /// Inject what is pending, enter the guest once, handle the exit.
    fn run_once(&mut self, timer: &mut KickTimer) -> Result<Option<StopReason>, VcpuError> {
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
        }
        if init {
            timer.set(None);
            self.report_init_addressing();
            self.transition(Event::Init);
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

    /// After an emulation failure (`KVM_EXIT_INTERNAL_ERROR`, suberror
    /// `KVM_INTERNAL_ERROR_EMULATION`): finishes the instruction at RIP if it is one
    /// [`complete`] handles (64-bit mode, CPL0) and sets the vCPU up to resume.
    /// False leaves everything as KVM reported it, for the crash report. Only an
    /// emulation failure comes here, so hardware-VT hosts, where these instructions
    /// never exit, are unaffected.
    fn complete_refused_insn(&mut self) -> bool {
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

    /// Mirrors a guest write of IA32_APIC_BASE (answered by the userspace LAPIC) into
    /// KVM's own copy of the MSR. KVM derives CPUID.1:EDX[9] (APIC present) from its
    /// copy's global-enable bit (`kvm_update_cpuid_runtime`), and KVM_SET_CPUID2 is
    /// refused once the vCPU has run, so this host-initiated KVM_SET_MSRS is what makes
    /// the guest's CPUID say "no APIC" while its APIC is disabled (SDM 11.4.3), and
    /// "APIC" again once it is re-enabled. The value was validated by the LAPIC; KVM
    /// refuses it only if its base lies beyond the guest's MAXPHYADDR, and then the CPUID
    /// bit keeps its old value (nothing else depends on KVM's copy without an
    /// in-kernel LAPIC). It allocates the MSR list: APIC mode switches are rare.
    fn sync_kvm_apic_base(&mut self, base: u64) {
        let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: crate::apic::MSR_IA32_APIC_BASE,
            data: base,
            ..Default::default()
        }]);
        if let Ok(m) = msrs {
            let _ = self.fd.set_msrs(&m);
        }
    }

    /// Build the crash report: the exit reason and this vCPU's registers.
    fn crash(&mut self, kind: CrashKind) -> StopReason {
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

/// The instruction bytes of an emulation-failure exit, when KVM reported them
/// (KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: data[0] = flags, then
/// insn_size (1 byte) and up to 15 instruction bytes); `n` is 0 otherwise.
fn kvm_insn_bytes(
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

pub mod complete;

/// A vCPU's x87/SSE control and status for [`complete`]. Read and written with
/// KVM_GET_XSAVE / KVM_SET_XSAVE (the legacy area: FCW/FSW at bytes 0-3, MXCSR at
/// 24, XSTATE_BV at 512): on KVM PVM, KVM_GET_FPU reads zeros and KVM_SET_FPU
/// does not reach the guest (probed). KVM takes MXCSR from the buffer only when
/// XSTATE_BV has the SSE bit, so a write sets it (the buffer holds the current
/// SSE registers, or their init values, so nothing else changes).
struct VcpuFpu<'a>(&'a VcpuFd);

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

#[cfg(test)]
mod tests;
