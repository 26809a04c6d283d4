//! Kicks after a vCPU thread has exited (issue 9, review edge): a kick sends a
//! signal with `pthread_kill` to the vCPU thread, and after that thread has
//! returned from its run function (and been joined) its `pthread_t` may be
//! invalid or reused. [`KickTarget`] must make such a kick a no-op, including
//! when the kick races with the thread's exit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use dvmm::vcpu::KickTarget;

static DELIVERED: AtomicU64 = AtomicU64::new(0);

extern "C" fn count(_: libc::c_int) {
    DELIVERED.fetch_add(1, Ordering::Relaxed);
}

/// The test signal (SIGUSR2, counted by a handler installed once).
fn sig() -> libc::c_int {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // SAFETY: installs an async-signal-safe handler (one atomic add) for a
        // signal nothing else in this test binary uses; `sa` is fully initialised.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = count as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
        }
    });
    libc::SIGUSR2
}

#[test]
fn kick_after_the_thread_was_joined_signals_nothing() {
    let s = sig();
    let target = Arc::new(KickTarget::new());
    assert!(!target.signal(s), "nothing attached yet");
    let t = {
        let target = target.clone();
        std::thread::spawn(move || {
            let _attached = target.attach();
            // While attached, a kick reaches this thread.
            assert!(target.signal(s));
        })
    };
    t.join().unwrap();
    // The thread is gone (joined: its pthread_t is freed): nothing is sent.
    for _ in 0..1000 {
        assert!(!target.signal(s));
    }
}

#[test]
fn kicks_racing_with_thread_exit_never_reach_an_exited_thread() {
    let s = sig();
    let before = DELIVERED.load(Ordering::Relaxed);
    let end = Instant::now() + Duration::from_millis(1500);
    let mut rounds = 0u64;
    let mut sent = 0u64;
    while Instant::now() < end && rounds < 2000 {
        rounds += 1;
        let target = Arc::new(KickTarget::new());
        let done = Arc::new(AtomicBool::new(false));
        let kicker = {
            let (target, done) = (target.clone(), done.clone());
            // Kicks as fast as it can until the vCPU-like thread has been joined
            // and well after: every kick after the exit must be a no-op.
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut after = 0;
                while after < 200 {
                    if done.load(Ordering::SeqCst) {
                        assert!(!target.signal(s), "kick reached a joined thread");
                        after += 1;
                    } else if target.signal(s) {
                        n += 1;
                    }
                }
                n
            })
        };
        let vcpu = {
            let target = target.clone();
            std::thread::spawn(move || {
                let _attached = target.attach();
                for _ in 0..(rounds % 64) * 100 {
                    std::hint::spin_loop();
                }
                // Returns: `_attached` detaches, waiting out a kick in flight.
            })
        };
        vcpu.join().unwrap();
        done.store(true, Ordering::SeqCst);
        sent += kicker.join().unwrap();
    }
    assert!(rounds > 10);
    // Sent signals are delivered (to live threads only; the count can only be
    // checked as a lower bound since delivery is asynchronous).
    let deadline = Instant::now() + Duration::from_secs(2);
    while DELIVERED.load(Ordering::Relaxed) - before < sent.min(1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(sent == 0 || DELIVERED.load(Ordering::Relaxed) > before);
}
