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
    Error(VmFailure),
    /// `timeout_s` passed.
    Timeout,
    /// `stop()` was called.
    Stopped,
    /// A snapshot was taken into this directory and the VM stopped after it.
    Snapshotted(String),
}

/// Why the VMM (not the guest) failed, with the error that caused it as the
/// source. Clonable, because every waiter on [`VmStop`] gets a copy: the sources
/// are shared behind an `Arc`. Turned into text only at the edge (the VM result).
#[derive(Debug, Clone, thiserror::Error)]
pub enum VmFailure {
    /// A vCPU thread failed (KVM_RUN, its LAPIC timer, KVM_INTERRUPT, spawning).
    #[error(transparent)]
    Vcpu(Arc<VcpuError>),
    /// A VMM thread could not be started.
    #[error("cannot spawn the {what} thread: {source}")]
    Spawn {
        /// Which thread (`cluster`, `console input`).
        what: &'static str,
        /// Why.
        source: Arc<std::io::Error>,
    },
    /// Another part of the VMM failed (e.g. KVM's interrupt controller in
    /// `crate::kirq`): its own error, kept as the source.
    #[error(transparent)]
    Component(Arc<dyn std::error::Error + Send + Sync>),
    /// A failure of or reported by another node of the cluster. The text is all
    /// that crosses the wire, so this one is a message.
    #[error("{0}")]
    Remote(String),
}

impl VmFailure {
    /// Wraps another module's error as [`VmFailure::Component`].
    pub fn component(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        VmFailure::Component(Arc::new(e))
    }
}

impl From<VcpuError> for VmFailure {
    fn from(e: VcpuError) -> Self {
        VmFailure::Vcpu(Arc::new(e))
    }
}

/// Two failures are the same when they read the same (the sources, e.g.
/// `std::io::Error`, have no equality of their own).
impl PartialEq for VmFailure {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for VmFailure {}

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
