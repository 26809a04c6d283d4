//! Starting a node's engine (the transport, the userfaultfd registration, the
//! engine thread) and the [`DsmHandle`] the VM holds: stats, application
//! frames out, vCPU-thread service, shutdown.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::serve::Engine;
use super::{AppSink, DsmConfig, DsmError, EngineFault, ServiceMode, TransportKind};
use crate::dsm::prefetch::Prefetcher;
use crate::dsm::protocol::{self, NodeId};
use crate::dsm::shm::{ShmConfig, ShmMesh};
use crate::dsm::stats::{Stats, StatsSnapshot};
use crate::dsm::transport::{Lane, MeshConfig, TcpMesh, Transport};
use crate::dsm::uffd::{GuestMem, PAGE};
use crate::dsm::wire::{Frame, Limits};
use crate::sync::lock;
use vmm_sys_util::eventfd::EventFd;

type Result<T> = std::result::Result<T, DsmError>;

pub(super) struct Shared {
    pub(super) app: Option<Arc<dyn AppSink>>,
    pub(super) me: NodeId,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) stats: Stats,
    pub(super) stop: AtomicBool,
    pub(super) wake: EventFd,
    pub(super) error: Mutex<Option<Arc<EngineFault>>>,
    pub(super) mem: GuestMem,
    pub(super) service: ServiceMode,
    /// A vCPU thread serves incoming messages ([`ServiceMode::VcpuServe`]).
    pub(super) server_attached: AtomicBool,
    /// Questions about page states ([`DsmHandle::page_copies`]), answered by
    /// whichever thread runs the engine's next turn.
    pub(super) queries: (
        crossbeam_channel::Sender<CopyQuery>,
        crossbeam_channel::Receiver<CopyQuery>,
    ),
}

/// Where the current contents of a page are, as this node sees it (snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCopy {
    /// A valid copy is in this node's memfd.
    Here,
    /// Valid here and never written: zero, nothing backs it.
    Zero,
    /// Not valid here (another node holds it, or a transfer is in flight): read
    /// it through the guest mapping, which fetches it coherently.
    Elsewhere,
}

/// A [`DsmHandle::page_copies`] question.
pub(super) struct CopyQuery {
    pub(super) first: protocol::PageIdx,
    pub(super) count: u32,
    pub(super) reply: crossbeam_channel::Sender<Vec<PageCopy>>,
}

impl Shared {
    pub(super) fn fail(&self, fault: EngineFault) {
        eprintln!("dvmm-dsm: node {}: {fault}", self.me);
        let fault = Arc::new(fault);
        self.record(fault.clone());
        if let Some(app) = &self.app {
            app.failed(fault);
        }
    }

    /// Keep `fault` if it is the first.
    pub(super) fn record(&self, fault: Arc<EngineFault>) {
        let mut e = lock(&self.error);
        if e.is_none() {
            *e = Some(fault);
        }
    }

    pub(super) fn kick(&self) {
        // Fails only if the counter would overflow: then a wake-up is pending anyway.
        let _ = self.wake.write(1);
    }
}

/// Handle to a running engine.
pub struct DsmHandle {
    pub(super) sh: Arc<Shared>,
    pub(super) engine: Arc<Mutex<Engine>>,
    pub(super) thread: Mutex<Option<JoinHandle<()>>>,
}

/// Entry point.
pub struct DsmEngine;

impl DsmEngine {
    /// Form the mesh with every other node, register the guest mapping with
    /// userfaultfd and start serving faults.
    ///
    /// # Safety
    /// `guest_addr` and `engine_addr` must be page-aligned MAP_SHARED mappings
    /// of the whole `memfd` (total RAM size) that stay mapped, and `memfd` open,
    /// until the handle is shut down (or dropped).
    pub unsafe fn start(cfg: DsmConfig) -> Result<DsmHandle> {
        let node = Self::layout(&cfg)?;
        if cfg.keys.me() != cfg.node_index {
            return Err(DsmError::KeysOfAnotherNode {
                keys: cfg.keys.me(),
                node: cfg.node_index,
            });
        }
        let limits = Limits {
            pages: node.pages(),
            nodes: cfg.nodes.len(),
        };
        let transport: Arc<dyn Transport> = match cfg.transport {
            TransportKind::Tcp => Arc::new(TcpMesh::connect(&MeshConfig {
                me: cfg.node_index,
                addrs: cfg.nodes.clone(),
                keys: cfg.keys.clone(),
                connect_deadline: cfg.connect_deadline,
                dead_after: cfg.dead_after,
                limits,
            })?),
            TransportKind::Shm => Arc::new(ShmMesh::connect(&ShmConfig {
                keys: cfg.keys.clone(),
                dir: PathBuf::from("/dev/shm"),
                connect_deadline: cfg.connect_deadline,
                dead_after: cfg.dead_after,
                limits,
            })?),
        };
        // SAFETY: forwarded from this function's contract.
        unsafe { Self::start_with(cfg, transport) }
    }

    /// Like [`DsmEngine::start`], over a transport the caller formed (tests
    /// drive the engine through an in-process transport this way).
    ///
    /// # Safety
    /// As for [`DsmEngine::start`].
    pub unsafe fn start_with(cfg: DsmConfig, transport: Arc<dyn Transport>) -> Result<DsmHandle> {
        let node = Self::layout(&cfg)?;
        if transport.me() != cfg.node_index || transport.nodes() != cfg.nodes.len() {
            return Err(DsmError::TransportMismatch);
        }
        let pages = node.pages();
        let len = pages as usize * PAGE;
        // SAFETY: forwarded from this function's contract.
        let mem = unsafe {
            GuestMem::new(
                cfg.memfd,
                cfg.guest_addr as *mut u8,
                cfg.engine_addr as *mut u8,
                len,
            )?
        };
        Self::spawn(cfg, node, mem, transport)
    }

    /// Check the configuration; the protocol state of this node.
    fn layout(cfg: &DsmConfig) -> Result<protocol::Node> {
        let n = cfg.nodes.len();
        if cfg.ram.len() != n {
            return Err(DsmError::RamRanges {
                ranges: cfg.ram.len(),
                nodes: n,
            });
        }
        let mut homes = Vec::with_capacity(n);
        for r in &cfg.ram {
            if !r.start.is_multiple_of(PAGE as u64) || !r.end.is_multiple_of(PAGE as u64) {
                return Err(DsmError::UnalignedRam);
            }
            homes.push(r.start / PAGE as u64..r.end / PAGE as u64);
        }
        let node = protocol::Node::new(cfg.node_index, homes)?;
        if !cfg.guest_addr.is_multiple_of(PAGE) || !cfg.engine_addr.is_multiple_of(PAGE) {
            return Err(DsmError::UnalignedMapping);
        }
        Ok(node)
    }

    fn spawn(
        cfg: DsmConfig,
        node: protocol::Node,
        mem: GuestMem,
        transport: Arc<dyn Transport>,
    ) -> Result<DsmHandle> {
        let wake =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(DsmError::WakeFd)?;
        let sh = Arc::new(Shared {
            app: cfg.app.clone(),
            me: cfg.node_index,
            transport,
            stats: Stats::default(),
            stop: AtomicBool::new(false),
            wake,
            error: Mutex::new(None),
            mem,
            service: cfg.service,
            server_attached: AtomicBool::new(false),
            queries: crossbeam_channel::unbounded(),
        });
        let eng = Engine {
            sh: sh.clone(),
            node,
            local: VecDeque::new(),
            pending_since: HashMap::new(),
            foreign: VecDeque::new(),
            foreign_resident: 0,
            evicting: HashSet::new(),
            budget: cfg.foreign_budget,
            my_range: cfg.ram[usize::from(cfg.node_index)].start / PAGE as u64
                ..cfg.ram[usize::from(cfg.node_index)].end / PAGE as u64,
            spin: cfg.spin,
            idle_spin: cfg.idle_spin,
            service: cfg.service,
            failed: false,
            last_activity: Instant::now(),
            idle_busy: false,
            faults: Vec::with_capacity(64),
            fault_buf: GuestMem::fault_buffer(),
            events: Vec::with_capacity(64),
            effects: Vec::with_capacity(16),
            hold: cfg.hold_window,
            hold_until: HashMap::new(),
            deferred: VecDeque::new(),
            deferred_pages: HashMap::new(),
            pf: prefetcher(&cfg, true),
            wpf: prefetcher(&cfg, cfg.ranges && cfg.upgrade_prefetch),
            ranges: cfg.ranges,
            homes: cfg
                .ram
                .iter()
                .map(|r| r.start / PAGE as u64..r.end / PAGE as u64)
                .collect(),
            rpages: Vec::new(),
            landed: HashSet::new(),
            land: super::land_from_env(),
        };
        let realtime = cfg.realtime || cfg.service != ServiceMode::Legacy;
        let me = cfg.node_index;
        let engine = Arc::new(Mutex::new(eng));
        let eng = engine.clone();
        let thread = std::thread::Builder::new()
            .name(format!("dsm-{}", cfg.node_index))
            .spawn(move || {
                if realtime {
                    if let Err(e) = set_realtime() {
                        eprintln!(
                            "dvmm-dsm: node {me}: warning: cannot run the engine thread \
                             SCHED_FIFO ({e}); serving faults at normal priority"
                        );
                    }
                }
                Engine::run(&eng)
            })
            .map_err(DsmError::Spawn)?;
        Ok(DsmHandle {
            sh,
            engine,
            thread: Mutex::new(Some(thread)),
        })
    }
}

impl DsmHandle {
    /// This node's index.
    pub fn node(&self) -> NodeId {
        self.sh.me
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.sh.transport.nodes()
    }

    /// Counters (the engine's, plus the transport's page copies).
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.sh.stats.snapshot();
        s.page_copies += self.sh.transport.page_copies();
        s
    }

    /// Where the contents of pages `first..first + count` are ([`PageCopy`]),
    /// from the engine's own state (asked through its next turn); None if the
    /// engine does not answer within `timeout` (stopped or failed).
    pub fn page_copies(
        &self,
        first: protocol::PageIdx,
        count: u32,
        timeout: Duration,
    ) -> Option<Vec<PageCopy>> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.sh
            .queries
            .0
            .send(CopyQuery {
                first,
                count,
                reply,
            })
            .ok()?;
        self.sh.kick();
        rx.recv_timeout(timeout).ok()
    }

    /// Whether incoming messages are to be served by a vCPU thread
    /// ([`ServiceMode::VcpuServe`]).
    pub fn vcpu_serves(&self) -> bool {
        self.sh.service == ServiceMode::VcpuServe
    }

    /// [`ServiceMode::VcpuServe`]: make the sockets signal thread `tid` with
    /// `signal` when traffic arrives (None: stop; the engine thread serves
    /// everything again). The thread then calls [`DsmHandle::serve_now`].
    pub fn attach_server(&self, owner: Option<(i32, i32)>) -> Result<()> {
        if self.sh.service != ServiceMode::VcpuServe {
            return Ok(());
        }
        if owner.is_none() {
            self.sh.server_attached.store(false, Ordering::SeqCst);
        }
        self.sh.transport.set_signal_owner(owner)?;
        if owner.is_some() {
            self.sh.server_attached.store(true, Ordering::SeqCst);
        }
        self.sh.kick();
        Ok(())
    }

    /// Serve what has arrived, on the calling thread, unless another thread is
    /// serving right now (never blocks).
    pub fn serve_now(&self) {
        if let Ok(mut e) = self.engine.try_lock() {
            e.turn(Some(Duration::ZERO));
            // What the turn sent is only queued (this thread polled): write it now,
            // the engine thread may not poll for a while.
            self.sh.transport.flush();
        }
    }

    /// Counter for forwarded IPIs/I/O (the VM side counts what it forwards).
    pub fn count_forwarded(&self, ipis: u64, io: u64) {
        Stats::add(&self.sh.stats.ipis_forwarded, ipis);
        Stats::add(&self.sh.stats.io_forwarded, io);
    }

    /// Resident guest pages of this node's memfd, measured with mincore.
    pub fn resident_pages(&self) -> usize {
        self.sh.mem.resident_pages()
    }

    /// The first fatal error, if any, as text.
    pub fn error(&self) -> Option<String> {
        self.fault().map(|f| f.to_string())
    }

    /// The first fatal error, if any.
    pub fn fault(&self) -> Option<Arc<EngineFault>> {
        lock(&self.sh.error).clone()
    }

    /// Send an application frame to another node on the control lane (the
    /// cluster link's messages: the DSM layer does not look into them).
    pub fn send_app(&self, to: NodeId, kind: u64, tag: u64, payload: &[u8]) -> Result<()> {
        if payload.len() > crate::dsm::wire::MAX_APP_PAYLOAD {
            return Err(DsmError::AppPayloadTooLarge(payload.len()));
        }
        let f = Frame::App {
            kind,
            tag,
            payload: payload.to_vec(),
        };
        self.sh.transport.send(to, Lane::Control, &f)?;
        Ok(())
    }

    /// Stop the engine thread and close the connections. Guest memory must no
    /// longer be accessed by then (threads faulting afterwards are not served
    /// until the userfaultfd is closed with the handle).
    pub fn shutdown(&self) {
        let _ = self.attach_server(None);
        self.sh.stop.store(true, Ordering::Relaxed);
        self.sh.kick();
        let t = lock(&self.thread).take();
        if let Some(t) = t {
            let _ = t.join();
        }
        self.sh.transport.shutdown();
    }

    /// Last resort when the VM is stopping and a peer is gone: stop serving
    /// faults and unregister the guest mapping from userfaultfd, which wakes
    /// every thread blocked on a fault (their accesses then see whatever the
    /// memfd holds). Coherence is over after this; only call it once the VM's
    /// result no longer depends on guest memory.
    pub fn release_memory(&self) {
        self.shutdown();
        self.sh.mem.release();
    }
}

impl Drop for DsmHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Switch the calling thread back to normal scheduling (`SCHED_OTHER`).
pub(super) fn set_normal() -> std::io::Result<()> {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &p) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A prefetcher as `cfg` asks (`on`: at all). A range request may cover a
/// whole 2 MiB run; `Prefetch` 64 pages.
fn prefetcher(cfg: &DsmConfig, on: bool) -> Prefetcher {
    let max = if on {
        cfg.prefetch_max_pages.min(if cfg.ranges {
            protocol::MAX_RANGE
        } else {
            protocol::MAX_PREFETCH
        })
    } else {
        0
    };
    if cfg.recall {
        Prefetcher::with_recall(max)
    } else {
        Prefetcher::new(max)
    }
}

/// Switch the calling thread to `SCHED_FIFO` priority 1 (the caller logs a
/// failure and goes on at normal priority).
pub(crate) fn set_realtime() -> std::io::Result<()> {
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: plain syscall on the calling thread with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
