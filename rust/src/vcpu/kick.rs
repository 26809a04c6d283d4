//! Kicking a vCPU out of `KVM_RUN` or out of its sleep: the futex word, the kick
//! signal (`SIGRTMIN`) and its handler, [`KickTarget`] (never signal a thread that
//! left its run function) and the per-vCPU POSIX timer that delivers the same
//! signal at the LAPIC timer deadline (`KickTimer`).

use super::*;

/// FUTEX_WAIT on `word` while it holds `val`, at most `timeout`.
pub(super) fn futex_wait(word: &AtomicU32, val: u32, timeout: Option<Duration>) {
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
pub(super) fn futex_wake(word: &AtomicU32) {
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

thread_local! {
    pub(super) static RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    /// This vCPU thread's kick flag: the signal handler raises it, so a signal
    /// that lands just before the futex wait still ends the wait (the transport's
    /// readiness signals come without a `kick`).
    pub(super) static KICK_FLAG: Cell<*const AtomicU32> = const { Cell::new(std::ptr::null()) };
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

pub(super) static SIGNAL_INIT: Once = Once::new();

/// Install the kick signal handler (once per process).
pub fn register_kick_signal() -> Result<(), VcpuError> {
    let mut res = Ok(());
    SIGNAL_INIT.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(VcpuError::Signal);
    });
    res
}

/// A POSIX timer that sends the kick signal to one thread.
pub(super) struct KickTimer {
    pub(super) id: libc::timer_t,
    pub(super) armed: Option<u64>,
}

impl KickTimer {
    pub(super) fn new(vcpu: u32) -> Result<Self, VcpuError> {
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
    pub(super) fn set(&mut self, at_ns: Option<u64>) {
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
