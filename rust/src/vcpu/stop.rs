//! Why and when the VM stops: [`StopReason`] and the first-report-wins [`VmStop`].

use super::*;

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
