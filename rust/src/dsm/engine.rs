//! The DSM engine: one thread per node that serves userfaultfd faults on the
//! guest mapping and the coherence protocol over the transport.
//!
//! The thread waits in one epoll set (the transport's connections, the
//! userfaultfd, a wake-up eventfd). Wake-ups are the expensive part on these
//! nested hosts (a thread woken on an idle core costs ~100 us, one that must
//! preempt a vCPU in KVM's fault path ~30-55 us), so how the thread waits is the
//! main design choice: [`ServiceMode`] (A/B table in perf/README.md). The
//! default, `rt-spin`: `SCHED_FIFO`, so a message preempts a vCPU at once; a
//! bounded busy-poll while one of our faults waits for its reply (the faulting
//! vCPU is blocked, its core would idle); otherwise it blocks. (`rt-idle` adds
//! an idle spin that makes ping-pong pages 2-4x faster on two nodes, but it is
//! 3-6x slower when nodes outnumber the cores, so it is not the default.)
//! Every spin is bounded: with two cores an unbounded one would starve a vCPU.
//! The poll deadlines are sub-millisecond (`epoll_pwait2`).
//!
//! **Hold window** (Mirage-style, [`DsmConfig::hold_window`]): a node that has
//! just been granted write ownership of a page defers invalidations and fetches
//! of that page until the window is over (queued with a deadline that bounds
//! the thread's poll timeout; never a sleep of the engine thread). Later
//! messages for a page with deferred messages queue behind them, so each page's
//! messages keep their order; messages for other pages may overtake, which the
//! protocol allows (all its state is per page; `tests/dsm_protocol.rs` delivers
//! out of order that way). The deferral is bounded, so it cannot deadlock: to the
//! protocol it is a slower link. Zero turns it off (plain IVY). A range
//! message is deferred as a whole (if any of its pages is held), and later
//! messages overlapping a deferred one queue behind it.
//!
//! **Range transactions** ([`DsmConfig::ranges`], off by default,
//! `DVMM_DSM_RANGES=1`): a prefetch window is requested with one
//! [`protocol::RangeMsg::Req`] (`OnBusy::Decline`) instead of a `Prefetch`
//! message, so the home answers a run of pages with one grant (pages as one
//! train of frames, see `wire`) and one `Done`, and the window may grow to
//! [`protocol::MAX_RANGE`] pages. The engine executes every range effect
//! whether or not it asked for ranges itself (a peer's home may answer with
//! range messages only to range requests, but every node handles them).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::auth::{AuthError, NodeKeys};
use super::prefetch::Prefetcher;
use super::protocol::{
    self, Access, CacheState, Data, Effect, FaultOutcome, Msg, NodeId, OnBusy, PageIdx, RangeMsg,
};
use super::shm::{ShmConfig, ShmMesh};
use super::stats::{Stats, StatsSnapshot};
use super::transport::{Lane, MeshConfig, TcpMesh, Transport, TransportError, TransportEvent};
use super::uffd::{Fault, GuestMem, UffdError, PAGE};
use super::wire::{Frame, Limits};
use crate::sync::lock;
use userfaultfd::EventBuffer;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum DsmError {
    #[error("invalid DSM configuration: keys are node {keys}'s, this is node {node}")]
    KeysOfAnotherNode { keys: NodeId, node: NodeId },
    #[error("invalid DSM configuration: the transport does not match the node layout")]
    TransportMismatch,
    #[error("invalid DSM configuration: {ranges} RAM ranges for {nodes} nodes")]
    RamRanges { ranges: usize, nodes: usize },
    #[error("invalid DSM configuration: RAM ranges must be page-aligned")]
    UnalignedRam,
    #[error("invalid DSM configuration: mappings must be page-aligned")]
    UnalignedMapping,
    #[error("cannot create the engine's wake-up eventfd: {0}")]
    WakeFd(#[source] std::io::Error),
    #[error("cannot spawn the engine thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error("application payload of {0} bytes (at most {max})", max = super::wire::MAX_APP_PAYLOAD)]
    AppPayloadTooLarge(usize),
}

type Result<T> = std::result::Result<T, DsmError>;

/// Default [`DsmConfig::hold_window`] in microseconds: off (A/B in
/// perf/README.md: the window did not make the false-sharing workloads faster).
pub const DEFAULT_HOLD_WINDOW_US: u64 = 0;

/// How the engine thread waits for work (A/B candidates of issue 9; the table
/// is in perf/README.md). Chosen with [`DsmConfig::service`], or for A/B runs
/// with `DVMM_DSM_MODE=legacy|rt|rt-spin` in the worker's environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceMode {
    /// The first version: normal priority; busy-polls (with `sched_yield`)
    /// while a fault waits and for a while after any traffic.
    Legacy,
    /// `SCHED_FIFO`, blocks in epoll and never spins: every message wakes it, and
    /// it runs at once (it preempts a vCPU thread instead of waiting for a slice).
    Rt,
    /// `SCHED_FIFO`, blocks in epoll, but busy-polls while one of this node's
    /// faults waits for its reply (bounded by [`DsmConfig::spin`]): the faulting
    /// vCPU is blocked meanwhile, so the core would be idle, and the reply is
    /// seen without a wake-up. No idle spin, no `sched_yield`.
    RtSpin,
    /// `RtSpin`, plus `Legacy`'s idle spin: for `idle_spin` after any traffic
    /// the thread keeps polling at normal priority with `sched_yield` (so a vCPU
    /// on its core runs first), then goes back to `SCHED_FIFO` and blocks.
    /// Ping-pong pages (one line written by two nodes) send the next request
    /// within microseconds of the last grant: the idle spin catches it without
    /// a wake-up, while faults keep the real-time engine.
    RtIdle,
    /// As `RtSpin` while a fault of this node waits; otherwise the engine
    /// thread watches only the userfaultfd, and incoming messages (requests for
    /// our pages, IPIs) are served by a vCPU thread of this node: the sockets
    /// signal it (`F_SETOWN_EX`/`F_SETSIG`), `KVM_RUN` returns `EINTR`, the
    /// thread serves ([`DsmHandle::serve_now`]) and re-enters — no thread is
    /// woken. The engine thread still serves every 1 ms as a fallback (and
    /// fully whenever no vCPU is attached).
    VcpuServe,
}

impl ServiceMode {
    /// The default mode (the A/B that chose it is in perf/README.md).
    pub const DEFAULT: ServiceMode = ServiceMode::RtSpin;

    /// Parse a mode name (`legacy`, `rt`, `rt-spin`).
    pub fn parse(s: &str) -> Option<ServiceMode> {
        match s {
            "legacy" => Some(ServiceMode::Legacy),
            "rt" => Some(ServiceMode::Rt),
            "rt-spin" => Some(ServiceMode::RtSpin),
            "rt-idle" => Some(ServiceMode::RtIdle),
            "vcpu-serve" => Some(ServiceMode::VcpuServe),
            _ => None,
        }
    }

    /// `DVMM_DSM_MODE` from the environment, else the default.
    pub fn from_env() -> ServiceMode {
        match std::env::var("DVMM_DSM_MODE") {
            Ok(v) => ServiceMode::parse(v.trim()).unwrap_or_else(|| {
                eprintln!(
                    "dvmm-dsm: warning: DVMM_DSM_MODE={v:?} is not one of legacy, rt, \
                     rt-spin, rt-idle, vcpu-serve; using the default"
                );
                ServiceMode::DEFAULT
            }),
            Err(_) => ServiceMode::DEFAULT,
        }
    }
}

/// A side effect of the protocol that failed: the VM must stop (never carry on).
#[derive(Debug, thiserror::Error)]
pub enum EffectError {
    #[error("sending {msg:?} to node {to}: {err}")]
    Send {
        to: NodeId,
        msg: Msg,
        #[source]
        err: TransportError,
    },
    #[error("grant for page {0} arrived without its data")]
    MissingData(PageIdx),
    #[error("page {page}: {err}")]
    Memory {
        page: PageIdx,
        #[source]
        err: UffdError,
    },
    /// (The message's kind and pages only: its per-page arrays can hold 512
    /// entries.)
    #[error("sending range {what} for pages {first}..{end} to node {to}: {err}")]
    SendRange {
        to: NodeId,
        what: &'static str,
        first: PageIdx,
        end: PageIdx,
        #[source]
        err: TransportError,
    },
}

/// Default [`DsmConfig::spin`] in microseconds (`DVMM_DSM_SPIN_US` overrides it
/// for A/B runs).
pub const DEFAULT_SPIN_US: u64 = 500;

/// Default [`DsmConfig::prefetch_max_pages`]: on, adaptive up to the largest
/// batch (A/B in perf/README.md "Prefetch"); `DVMM_DSM_PREFETCH` overrides it
/// for A/B runs.
pub const DEFAULT_PREFETCH_MAX_PAGES: u32 = protocol::MAX_PREFETCH;

/// Configuration of one node's engine.
pub struct DsmConfig {
    /// This node's index into `nodes`.
    pub node_index: NodeId,
    /// Mesh address of every node.
    pub nodes: Vec<SocketAddr>,
    /// This node's keys for this VM's data plane (`keys.me()` must be
    /// `node_index`).
    pub keys: NodeKeys,
    /// Guest RAM byte offsets each node is home of (`ram[i]` for node i),
    /// contiguous from 0, page-aligned.
    pub ram: Vec<Range<u64>>,
    /// The guest RAM memfd (must be all holes at start).
    pub memfd: RawFd,
    /// Address of RAM offset 0 in the guest mapping (used by KVM and the VMM).
    pub guest_addr: usize,
    /// Address of RAM offset 0 in the engine's own mapping of the memfd.
    pub engine_addr: usize,
    /// Give up forming the mesh after this long.
    pub connect_deadline: Duration,
    /// A silent peer is declared dead after this long.
    pub dead_after: Duration,
    /// Keep at most this many pages of other nodes' ranges resident (memory
    /// aggregation); None: no limit.
    pub foreign_budget: Option<usize>,
    /// Busy-poll bound while a fault of ours waits for a reply.
    pub spin: Duration,
    /// Busy-poll bound after serving traffic.
    pub idle_spin: Duration,
    /// Hold window (Mirage-style): after this node is granted write ownership
    /// of a page, invalidations and fetches of that page are deferred for this
    /// long, so the local vCPUs make progress on a ping-pong (false-sharing)
    /// page before it moves again. `Duration::ZERO` turns it off (plain IVY).
    pub hold_window: Duration,
    /// Run the engine thread with `SCHED_FIFO` (lowest RT priority) when the
    /// host allows it, so a request arriving while a vCPU thread spins in the
    /// guest preempts it at once instead of after a scheduler slice (~ms).
    /// The engine never spins without a bound, so this cannot starve a core.
    /// Only for [`ServiceMode::Legacy`]; the other modes are always real-time.
    pub realtime: bool,
    /// How the engine thread waits for work.
    pub service: ServiceMode,
    /// Sequential prefetch: when this node's read faults on pages homed
    /// elsewhere look sequential, also request up to this many following
    /// pages in one message (per stream, the batch doubles from 4 while the
    /// stream stays sequential and halves when its prefetched pages are
    /// wasted: see `prefetch`). 0 turns it off; at most
    /// [`protocol::MAX_PREFETCH`], or [`protocol::MAX_RANGE`] with
    /// [`DsmConfig::ranges`] (then also the default when `DVMM_DSM_PREFETCH`
    /// is unset). Bounded by `foreign_budget`.
    pub prefetch_max_pages: u32,
    /// How messages move between the nodes.
    pub transport: TransportKind,
    /// Prefetch with range transactions (one request, grant and `Done` per
    /// window, windows up to [`protocol::MAX_RANGE`] pages) instead of
    /// `Prefetch` messages. Off by default until the A/B says otherwise;
    /// `DVMM_DSM_RANGES=1` turns it on.
    pub ranges: bool,
    /// Where application frames, peer failures and fatal errors go (the
    /// cluster link, [`crate::cluster::link`]); None: they are only logged.
    pub app: Option<Arc<dyn AppSink>>,
}

/// `DVMM_DSM_RANGES` from the environment: `1`, `true`, `on` or `yes` turn
/// range transactions on; anything else (or nothing) leaves them off.
pub fn ranges_from_env() -> bool {
    std::env::var("DVMM_DSM_RANGES")
        .map(|v| matches!(v.trim(), "1" | "true" | "on" | "yes"))
        .unwrap_or(false)
}

/// The transport [`DsmEngine::start`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// A TCP mesh (any nodes).
    #[default]
    Tcp,
    /// Shared-memory rings (nodes on one host), see [`super::shm`].
    Shm,
}

impl DsmConfig {
    /// A configuration with default timings.
    pub fn new(
        node_index: NodeId,
        nodes: Vec<SocketAddr>,
        keys: NodeKeys,
        ram: Vec<Range<u64>>,
        memfd: RawFd,
        guest_addr: usize,
        engine_addr: usize,
    ) -> Self {
        DsmConfig {
            node_index,
            nodes,
            keys,
            ram,
            memfd,
            guest_addr,
            engine_addr,
            connect_deadline: Duration::from_secs(30),
            dead_after: Duration::from_secs(3),
            foreign_budget: None,
            spin: Duration::from_micros(
                std::env::var("DVMM_DSM_SPIN_US")
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(DEFAULT_SPIN_US),
            ),
            idle_spin: Duration::from_micros(50),
            hold_window: Duration::from_micros(DEFAULT_HOLD_WINDOW_US),
            realtime: false,
            service: ServiceMode::from_env(),
            prefetch_max_pages: std::env::var("DVMM_DSM_PREFETCH")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(if ranges_from_env() {
                    protocol::MAX_RANGE
                } else {
                    DEFAULT_PREFETCH_MAX_PAGES
                }),
            transport: TransportKind::Tcp,
            ranges: ranges_from_env(),
            app: None,
        }
    }
}

/// The layer above the engine (the cluster link, [`crate::cluster::link`]):
/// it gets the application frames (`Frame::App`, opaque to the DSM layer),
/// peer failures and the engine's fatal errors. Called on the engine thread:
/// must be quick, must not touch guest memory or wait for the engine.
pub trait AppSink: Send + Sync {
    /// An application frame from node `from` (`kind` and `tag` as sent).
    fn frame(&self, from: NodeId, kind: u64, tag: u64, payload: Vec<u8>);
    /// Node `node` died or was disconnected; the VM must stop.
    fn peer_down(&self, node: NodeId, reason: &str);
    /// The engine failed (protocol violation, failed memory operation).
    fn failed(&self, error: &str);
}

struct Shared {
    app: Option<Arc<dyn AppSink>>,
    me: NodeId,
    transport: Arc<dyn Transport>,
    stats: Stats,
    stop: AtomicBool,
    wake: EventFd,
    error: Mutex<Option<String>>,
    mem: GuestMem,
    service: ServiceMode,
    /// A vCPU thread serves incoming messages ([`ServiceMode::VcpuServe`]).
    server_attached: AtomicBool,
}

impl Shared {
    fn fail(&self, msg: String) {
        eprintln!("dvmm-dsm: node {}: {msg}", self.me);
        let mut e = lock(&self.error);
        if e.is_none() {
            *e = Some(msg.clone());
        }
        drop(e);
        if let Some(app) = &self.app {
            app.failed(&msg);
        }
    }

    fn kick(&self) {
        // Fails only if the counter would overflow: then a wake-up is pending anyway.
        let _ = self.wake.write(1);
    }
}

/// Handle to a running engine.
pub struct DsmHandle {
    sh: Arc<Shared>,
    engine: Arc<Mutex<Engine>>,
    thread: Mutex<Option<JoinHandle<()>>>,
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
            buf: Box::new([0u8; PAGE]),
            hold: cfg.hold_window,
            hold_until: HashMap::new(),
            deferred: VecDeque::new(),
            deferred_pages: HashMap::new(),
            // A range request may cover a whole 2 MiB run; `Prefetch` 64 pages.
            pf: Prefetcher::new(cfg.prefetch_max_pages.min(if cfg.ranges {
                protocol::MAX_RANGE
            } else {
                protocol::MAX_PREFETCH
            })),
            ranges: cfg.ranges,
            homes: cfg
                .ram
                .iter()
                .map(|r| r.start / PAGE as u64..r.end / PAGE as u64)
                .collect(),
            rbuf: Vec::new(),
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

    /// The first fatal error, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.sh.error).clone()
    }

    /// Send an application frame to another node on the control lane (the
    /// cluster link's messages: the DSM layer does not look into them).
    pub fn send_app(&self, to: NodeId, kind: u64, tag: u64, payload: &[u8]) -> Result<()> {
        if payload.len() > super::wire::MAX_APP_PAYLOAD {
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
fn set_normal() -> std::io::Result<()> {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &p) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Switch the calling thread to `SCHED_FIFO` priority 1 (the caller logs a
/// failure and goes on at normal priority).
fn set_realtime() -> std::io::Result<()> {
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: plain syscall on the calling thread with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The name of a range message's kind (for errors).
fn range_kind(m: &RangeMsg) -> &'static str {
    match m {
        RangeMsg::Req { .. } => "Req",
        RangeMsg::Inv { .. } => "Inv",
        RangeMsg::InvAck { .. } => "InvAck",
        RangeMsg::Fetch { .. } => "Fetch",
        RangeMsg::Grant { .. } => "Grant",
        RangeMsg::Done { .. } => "Done",
        RangeMsg::Nack { .. } => "Nack",
    }
}

/// A protocol message of either kind.
#[derive(Debug, Clone)]
enum PMsg {
    One(Msg),
    Range(RangeMsg),
}

impl PMsg {
    /// The pages it is about.
    fn pages(&self) -> Range<PageIdx> {
        match self {
            PMsg::One(m) => m.page()..m.page() + 1,
            PMsg::Range(m) => m.pages(),
        }
    }

    /// Whether it takes a page away from this node (held back by the hold
    /// window).
    fn takes_away(&self) -> bool {
        matches!(
            self,
            PMsg::One(Msg::Inv { .. } | Msg::Fetch { .. })
                | PMsg::Range(RangeMsg::Inv { .. } | RangeMsg::Fetch { .. })
        )
    }
}

/// Where an `Install` effect finds the contents: the page of a single-page
/// grant, or a range grant's payload (its `Data::Page` pages in slot order).
#[derive(Clone, Copy)]
enum Payload<'a> {
    None,
    One(&'a [u8]),
    Range(&'a RangeMsg, &'a [u8]),
}

impl<'a> Payload<'a> {
    /// The contents of `page`, if the message carries them.
    fn page(&self, page: PageIdx) -> Option<&'a [u8; PAGE]> {
        let d = match *self {
            Payload::None => return None,
            Payload::One(d) => d,
            Payload::Range(m, d) => {
                let at = m.slot_of(page)?.checked_mul(PAGE)?;
                d.get(at..at.checked_add(PAGE)?)?
            }
        };
        <&[u8; PAGE]>::try_from(d).ok()
    }
}

/// A protocol message held back by the hold window.
struct Deferred {
    until: Instant,
    from: NodeId,
    msg: PMsg,
    data: Option<Box<[u8]>>,
}

/// A `sched_yield` in the idle spin that took longer than this ran another
/// thread: the core is not idle.
const IDLE_YIELD_BUSY: Duration = Duration::from_micros(20);

/// At most this many evictions in flight.
const MAX_EVICTING: usize = 32;
/// How far into the eviction queue (oldest first) a clean page is looked for.
const VICTIM_WINDOW: usize = 32;

static ZERO: [u8; PAGE] = [0u8; PAGE];

struct Engine {
    sh: Arc<Shared>,
    node: protocol::Node,
    /// Messages to ourselves (the home's own requests), with page data.
    local: VecDeque<(PMsg, Option<Box<[u8]>>)>,
    pending_since: HashMap<PageIdx, Instant>,
    /// Foreign pages in installation order (may hold stale entries).
    foreign: VecDeque<PageIdx>,
    foreign_resident: usize,
    evicting: HashSet<PageIdx>,
    budget: Option<usize>,
    my_range: Range<PageIdx>,
    spin: Duration,
    idle_spin: Duration,
    service: ServiceMode,
    /// A side effect failed: the VM is stopping; execute nothing more.
    failed: bool,
    last_activity: Instant,
    /// `RtIdle`: the idle spin found the core busy (until the next activity).
    idle_busy: bool,
    faults: Vec<Fault>,
    /// Raw fault messages as read from the userfaultfd.
    fault_buf: EventBuffer,
    events: Vec<TransportEvent>,
    effects: Vec<Effect>,
    buf: Box<[u8; PAGE]>,
    /// Hold window (zero: off).
    hold: Duration,
    /// Pages granted for writing recently: end of their hold window.
    hold_until: HashMap<PageIdx, Instant>,
    /// Messages held back by the hold window, in arrival order.
    deferred: VecDeque<Deferred>,
    /// Number of deferred messages per page (later messages for such a page
    /// are deferred too, so each page's messages keep their order).
    deferred_pages: HashMap<PageIdx, u32>,
    /// Adaptive sequential prefetch (see `prefetch`).
    pf: Prefetcher,
    /// Prefetch with range requests ([`DsmConfig::ranges`]).
    ranges: bool,
    /// Pages each node is home of.
    homes: Vec<Range<PageIdx>>,
    /// The pages of a range grant being sent (read from the engine mapping).
    rbuf: Vec<u8>,
}

impl Engine {
    /// The engine thread's loop.
    fn run(engine: &Mutex<Engine>) {
        let sh = lock(engine).sh.clone();
        if sh.service != ServiceMode::VcpuServe {
            // Nobody else serves: hold the engine for good.
            let mut e = lock(engine);
            let mut rt = sh.service != ServiceMode::Legacy;
            while !sh.stop.load(Ordering::Relaxed) {
                if sh.service == ServiceMode::RtIdle {
                    // Real-time while a fault waits or while blocked; normal
                    // priority for the idle spin.
                    let want = !e.idle_spinning();
                    if want != rt {
                        let _ = if want { set_realtime() } else { set_normal() };
                        rt = want;
                    }
                }
                let t = e.next_timeout();
                e.turn(t);
            }
            return;
        }
        let watch = [sh.mem.fd(), sh.wake.as_raw_fd()];
        while !sh.stop.load(Ordering::Relaxed) {
            let quiet = {
                let mut e = lock(engine);
                let quiet = e.pending_since.is_empty()
                    && e.deferred.is_empty()
                    && sh.server_attached.load(Ordering::SeqCst);
                if !quiet {
                    let t = e.next_timeout();
                    e.turn(t);
                }
                quiet
            };
            if quiet {
                // A vCPU serves the sockets: wait for a fault (or a kick) only,
                // without holding the engine; serve anyway every 1 ms.
                let mut fds = watch.map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                // SAFETY: fds is a valid array of pollfd of the given length.
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1) };
                lock(engine).turn(Some(Duration::ZERO));
                sh.transport.flush();
            }
        }
    }

    /// In the idle spin: no fault of ours waits, but traffic came within
    /// `idle_spin`.
    fn idle_spinning(&self) -> bool {
        self.pending_since.is_empty()
            && !self.idle_busy
            && Instant::now().saturating_duration_since(self.last_activity) < self.idle_spin
    }

    /// How long the next poll may block (zero: spin).
    fn next_timeout(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let since = now.saturating_duration_since(self.last_activity);
        let waiting = !self.pending_since.is_empty() && since < self.spin;
        let spinning = match self.service {
            ServiceMode::Legacy => waiting || since < self.idle_spin,
            ServiceMode::Rt => false,
            ServiceMode::RtSpin | ServiceMode::VcpuServe => waiting,
            ServiceMode::RtIdle => waiting || (since < self.idle_spin && !self.idle_busy),
        };
        if spinning {
            if self.service == ServiceMode::Legacy {
                // Let another engine on this core (co-located nodes) run.
                // SAFETY: no preconditions.
                unsafe { libc::sched_yield() };
            } else if self.service == ServiceMode::RtIdle && !waiting {
                // Spin only while the core is idle: a yield that gave the core to
                // another thread (a vCPU) for a while ends the idle spin, so the
                // next message wakes a real-time engine that preempts it instead.
                let t0 = Instant::now();
                // SAFETY: no preconditions.
                unsafe { libc::sched_yield() };
                if t0.elapsed() > IDLE_YIELD_BUSY {
                    self.idle_busy = true;
                }
            }
            return Some(Duration::ZERO);
        }
        let t = Duration::from_millis(100);
        match self.deferred.iter().map(|d| d.until).min() {
            Some(u) => Some(t.min(u.saturating_duration_since(now))),
            None => Some(t),
        }
    }

    /// One round: wait up to `timeout` for traffic or faults, then handle what
    /// came (any thread holding the engine may run it).
    fn turn(&mut self, timeout: Option<Duration>) {
        let extra = [self.sh.mem.fd(), self.sh.wake.as_raw_fd()];
        let mut events = std::mem::take(&mut self.events);
        let mut faults = std::mem::take(&mut self.faults);
        let mut effects = std::mem::take(&mut self.effects);
        let ready = match self.sh.transport.poll(timeout, &extra, &mut events) {
            Ok(r) => r,
            Err(e) => {
                self.sh.fail(format!("transport poll failed: {e}"));
                std::thread::sleep(Duration::from_millis(10));
                0
            }
        };
        if ready & 2 != 0 {
            let _ = self.sh.wake.read();
        }
        let mut active = false;
        if ready & 1 != 0 {
            if let Err(e) = self.sh.mem.read_faults(&mut self.fault_buf, &mut faults) {
                self.sh.fail(e.to_string());
            }
        }
        for f in faults.drain(..) {
            active = true;
            self.on_fault(f, &mut effects);
        }
        for ev in events.drain(..) {
            active = true;
            self.on_event(ev, &mut effects);
        }
        self.drain_local(&mut effects);
        if !self.deferred.is_empty() && self.run_deferred(&mut effects) {
            active = true;
        }
        self.evict_over_budget(&mut effects);
        if active {
            self.last_activity = Instant::now();
            self.idle_busy = false;
        }
        self.events = events;
        self.faults = faults;
        self.effects = effects;
    }

    fn on_fault(&mut self, f: Fault, effects: &mut Vec<Effect>) {
        let st = &self.sh.stats;
        if f.wp {
            Stats::inc(&st.wp_faults);
        } else if f.write {
            Stats::inc(&st.write_faults);
        } else {
            Stats::inc(&st.read_faults);
        }
        let access = if f.write || f.wp {
            Access::Write
        } else {
            Access::Read
        };
        effects.clear();
        match self.node.fault(f.page, access, effects) {
            Ok(FaultOutcome::Resolved) => Stats::inc(&st.local_faults),
            Ok(FaultOutcome::Waiting) => {
                self.pending_since
                    .entry(f.page)
                    .or_insert_with(Instant::now);
            }
            Err(e) => {
                self.sh.fail(format!("fault at page {}: {e}", f.page));
                return;
            }
        }
        let fx = std::mem::take(effects);
        self.exec(&fx, Payload::None);
        *effects = fx;
        if self.pf.enabled() && access == Access::Read && self.node.is_pending(f.page) {
            self.prefetch(f.page, effects);
        }
        self.drain_local(effects);
    }

    /// Sequential read detection and prefetch after a read fault on `page`
    /// that needs a message (its own request is already sent).
    fn prefetch(&mut self, page: PageIdx, effects: &mut Vec<Effect>) {
        let mut k = self.pf.on_read_fault(page);
        if let Some(b) = self.budget.filter(|_| self.is_foreign(page)) {
            let used = self.foreign_resident + self.pending_since.len() + self.pf.tracked();
            k = k.min(u32::try_from(b.saturating_sub(used)).unwrap_or(u32::MAX));
        }
        if k > 0 && self.ranges {
            self.prefetch_range(page, k, effects);
        } else if k > 0 {
            effects.clear();
            match self.node.prefetch(page, k, effects) {
                Ok((start, n)) if n > 0 => {
                    Stats::inc(&self.sh.stats.prefetch_requests);
                    self.pf.requested(page, start, n);
                    let fx = std::mem::take(effects);
                    self.exec(&fx, Payload::None);
                    *effects = fx;
                }
                Ok(_) => {}
                Err(e) => self.sh.fail(format!("prefetch after page {page}: {e}")),
            }
        }
        self.sync_prefetch_stats();
    }

    /// Prefetch with a range request: the window as `Node::prefetch` picks
    /// it (skip what is valid or in flight right after `page`, at most `2 *
    /// k` pages: the stream's window still arriving; then the run of up to
    /// `k` pages that can be asked for), requested with one
    /// [`RangeMsg::Req`] whose busy pages the home declines.
    fn prefetch_range(&mut self, page: PageIdx, k: u32, effects: &mut Vec<Effect>) {
        let Ok(home) = self.node.home_of(page) else {
            return;
        };
        // As `Node::prefetch`: pages a home reads back are not prefetched yet.
        if home == self.sh.me {
            return;
        }
        let Some(end) = self.homes.get(usize::from(home)).map(|r| r.end) else {
            return;
        };
        let askable = |node: &protocol::Node, p: PageIdx| {
            matches!(node.state(p), Some((CacheState::Invalid, _, _))) && !node.is_pending(p)
        };
        let mut p = page + 1;
        let skip_end = p.saturating_add(2 * u64::from(k));
        while p < end && p < skip_end && !askable(&self.node, p) {
            p += 1;
        }
        let start = p;
        let limit = start
            .saturating_add(u64::from(k.min(protocol::MAX_RANGE)))
            .min(end);
        while p < limit && askable(&self.node, p) {
            p += 1;
        }
        let n = (p - start) as u32;
        if n == 0 {
            return;
        }
        effects.clear();
        match self
            .node
            .request_range(start, n, Access::Read, OnBusy::Decline, effects)
        {
            Ok(runs) => {
                if !runs.is_empty() {
                    Stats::inc(&self.sh.stats.prefetch_requests);
                }
                for (s, c) in runs {
                    self.pf.requested(page, s, c);
                }
                let fx = std::mem::take(effects);
                self.exec(&fx, Payload::None);
                *effects = fx;
            }
            Err(e) => self
                .sh
                .fail(format!("range prefetch of pages {start}+{n}: {e}")),
        }
    }

    /// Publish the prefetcher's counters.
    fn sync_prefetch_stats(&self) {
        let c = self.pf.counts();
        let st = &self.sh.stats;
        st.prefetch_late.store(c.late, Ordering::Relaxed);
        st.prefetch_used.store(c.used, Ordering::Relaxed);
        st.prefetch_wasted.store(c.wasted, Ordering::Relaxed);
    }

    fn on_event(&mut self, ev: TransportEvent, effects: &mut Vec<Effect>) {
        match ev {
            TransportEvent::PeerDown { node, reason } => {
                if let Some(app) = &self.sh.app {
                    app.peer_down(node, &reason);
                }
                let msg = format!("node {node} is down: {reason}");
                eprintln!("dvmm-dsm: node {}: {msg}", self.sh.me);
                let mut e = lock(&self.sh.error);
                if e.is_none() {
                    *e = Some(msg);
                }
            }
            TransportEvent::Frame { from, frame, .. } => match frame {
                Frame::Proto { msg, data } => {
                    self.on_msg(from, PMsg::One(msg), data, effects);
                    self.drain_local(effects);
                }
                Frame::Range { msg, data } => {
                    self.on_msg(from, PMsg::Range(msg), data, effects);
                    self.drain_local(effects);
                }
                Frame::App { kind, tag, payload } => {
                    if let Some(app) = &self.sh.app {
                        app.frame(from, kind, tag, payload);
                    }
                }
                Frame::Ping | Frame::Auth { .. } => {}
            },
        }
    }

    /// Handle a protocol message now, or hold it back if it would take away a
    /// page inside its hold window.
    fn on_msg(
        &mut self,
        from: NodeId,
        msg: PMsg,
        data: Option<Box<[u8]>>,
        effects: &mut Vec<Effect>,
    ) {
        if !self.hold.is_zero() {
            let pages = msg.pages();
            let mut until: Option<Instant> = None;
            if msg.takes_away() {
                let now = Instant::now();
                for page in pages.clone() {
                    if let Some(&u) = self.hold_until.get(&page) {
                        if u > now {
                            until = Some(until.map_or(u, |t| t.max(u)));
                        } else {
                            self.hold_until.remove(&page);
                        }
                    }
                }
            }
            if until.is_none() && pages.clone().any(|p| self.deferred_pages.contains_key(&p)) {
                until = Some(Instant::now());
            }
            if let Some(until) = until {
                Stats::inc(&self.sh.stats.held_requests);
                for page in pages {
                    *self.deferred_pages.entry(page).or_insert(0) += 1;
                }
                self.deferred.push_back(Deferred {
                    until,
                    from,
                    msg,
                    data,
                });
                return;
            }
        }
        self.handle_msg(from, msg, data, effects);
    }

    /// Handle the deferred messages whose window is over (in order per page).
    /// Returns whether any was handled.
    fn run_deferred(&mut self, effects: &mut Vec<Effect>) -> bool {
        let now = Instant::now();
        let mut any = false;
        let mut i = 0;
        while i < self.deferred.len() {
            let d = &self.deferred[i];
            let pages = d.msg.pages();
            // An earlier message for one of its pages still waiting blocks this one.
            let blocked = self.deferred.iter().take(i).any(|e| {
                let o = e.msg.pages();
                o.start < pages.end && pages.start < o.end
            });
            if d.until > now || blocked {
                i += 1;
                continue;
            }
            let Some(d) = self.deferred.remove(i) else {
                break;
            };
            for page in pages {
                if let Some(c) = self.deferred_pages.get_mut(&page) {
                    *c -= 1;
                    if *c == 0 {
                        self.deferred_pages.remove(&page);
                    }
                }
                self.hold_until.remove(&page);
            }
            any = true;
            self.handle_msg(d.from, d.msg, d.data, effects);
            self.drain_local(effects);
        }
        any
    }

    fn handle_msg(
        &mut self,
        from: NodeId,
        msg: PMsg,
        data: Option<Box<[u8]>>,
        effects: &mut Vec<Effect>,
    ) {
        let msg = match msg {
            PMsg::One(m) => m,
            PMsg::Range(m) => return self.handle_range(from, m, data, effects),
        };
        let st = &self.sh.stats;
        match msg {
            Msg::Inv { page } => {
                if from != self.sh.me {
                    Stats::inc(&st.invalidations_received);
                }
                self.evicting.remove(&page);
            }
            Msg::Fetch { page, .. } => {
                self.evicting.remove(&page);
            }
            Msg::Nack { page } => {
                Stats::inc(&st.prefetch_declined);
                self.pf.refused(page);
            }
            Msg::Grant {
                data: Data::Page, ..
            } if from != self.sh.me => {
                Stats::inc(&st.pages_received);
                Stats::inc(&st.pages_moved);
                Stats::add(&st.bytes_received, PAGE as u64);
            }
            _ => {}
        }
        effects.clear();
        if let Err(e) = self.node.handle(from, msg, effects) {
            let why = format!("protocol violation by node {from}: {e}");
            self.sh.fail(why);
            return;
        }
        let fx = std::mem::take(effects);
        self.exec(&fx, data.as_deref().map_or(Payload::None, Payload::One));
        *effects = fx;
        if let Msg::Grant { page, access, .. } = msg {
            self.granted(page, access);
        }
    }

    /// Bookkeeping after a grant of `page` was installed.
    fn granted(&mut self, page: PageIdx, access: Access) {
        if access == Access::Write && !self.hold.is_zero() {
            if self.hold_until.len() >= 4096 {
                let now = Instant::now();
                self.hold_until.retain(|_, u| *u > now);
            }
            self.hold_until.insert(page, Instant::now() + self.hold);
        }
        let prefetched = self.pf.is_tracked(page);
        if let Some(t0) = self.pending_since.remove(&page) {
            self.sh.stats.fault_latency(t0.elapsed().as_nanos() as u64);
        } else if prefetched {
            Stats::inc(&self.sh.stats.prefetched_pages);
        }
    }

    /// Handle a range message (see `handle_msg`); `data` is a range grant's
    /// payload.
    fn handle_range(
        &mut self,
        from: NodeId,
        msg: RangeMsg,
        data: Option<Box<[u8]>>,
        effects: &mut Vec<Effect>,
    ) {
        let st = &self.sh.stats;
        let (_, count) = msg.span();
        let remote = from != self.sh.me;
        match &msg {
            RangeMsg::Inv { .. } => {
                if remote {
                    Stats::add(&st.invalidations_received, u64::from(count));
                }
                for page in msg.pages() {
                    self.evicting.remove(&page);
                }
            }
            RangeMsg::Fetch { .. } => {
                for page in msg.pages() {
                    self.evicting.remove(&page);
                }
            }
            RangeMsg::Nack { .. } => {
                Stats::add(&st.prefetch_declined, u64::from(count));
                for page in msg.pages() {
                    self.pf.refused(page);
                }
            }
            RangeMsg::Grant { .. } if remote => {
                let n = msg.data_pages() as u64;
                Stats::add(&st.pages_received, n);
                Stats::add(&st.pages_moved, n);
                Stats::add(&st.bytes_received, n * PAGE as u64);
            }
            _ => {}
        }
        effects.clear();
        if let Err(e) = self.node.handle_range(from, &msg, effects) {
            let why = format!("protocol violation by node {from}: {e}");
            self.sh.fail(why);
            return;
        }
        let fx = std::mem::take(effects);
        self.exec(&fx, Payload::Range(&msg, data.as_deref().unwrap_or(&[])));
        *effects = fx;
        if let RangeMsg::Grant { access, .. } = msg {
            for page in msg.pages() {
                self.granted(page, access);
            }
        }
    }

    fn drain_local(&mut self, effects: &mut Vec<Effect>) {
        while let Some((msg, data)) = self.local.pop_front() {
            let me = self.sh.me;
            self.on_msg(me, msg, data, effects);
        }
    }

    fn is_foreign(&self, page: PageIdx) -> bool {
        !self.my_range.contains(&page)
    }

    /// Execute the protocol's effects in order. The first failure stops the VM
    /// and aborts the rest: a failed `Drop` must not be acknowledged, a failed
    /// `Install` must not be reported `Done`, or peers would go on with a page
    /// this node does not hold.
    fn exec(&mut self, effects: &[Effect], data: Payload) {
        for e in effects {
            if self.failed {
                return;
            }
            if let Err(err) = self.exec_one(e, data) {
                self.failed = true;
                self.sh.fail(err.to_string());
                return;
            }
        }
    }

    fn exec_one(&mut self, e: &Effect, data: Payload) -> std::result::Result<(), EffectError> {
        let st = &self.sh.stats;
        let mem = &self.sh.mem;
        match *e {
            Effect::Send { to, msg } => {
                let mut page_data: Option<&[u8]> = None;
                if let Msg::Grant { page, data: d, .. } = msg {
                    match d {
                        Data::Page => {
                            mem.read_page(page, &mut self.buf);
                            // One copy here, one more if it goes to self.
                            Stats::add(&st.page_copies, 1 + u64::from(to == self.sh.me));
                            page_data = Some(&self.buf[..]);
                            if to != self.sh.me {
                                Stats::inc(&st.pages_sent);
                                Stats::add(&st.bytes_sent, PAGE as u64);
                            }
                        }
                        Data::Zero => Stats::inc(&st.zero_pages_sent),
                        Data::None => Stats::inc(&st.transfers_skipped),
                    }
                }
                if let Msg::Inv { .. } = msg {
                    if to != self.sh.me {
                        Stats::inc(&st.invalidations_sent);
                    }
                }
                if to == self.sh.me {
                    self.local.push_back((
                        PMsg::One(msg),
                        page_data.map(|d| d.to_vec().into_boxed_slice()),
                    ));
                    Ok(())
                } else {
                    self.sh
                        .transport
                        .send_msg(to, &msg, page_data)
                        .map_err(|err| EffectError::Send { to, msg, err })
                }
            }
            Effect::Install {
                page,
                zero,
                writable,
            } => {
                let src: &[u8; PAGE] = if zero {
                    &ZERO
                } else {
                    match data.page(page) {
                        Some(d) => d,
                        None => return Err(EffectError::MissingData(page)),
                    }
                };
                mem.install(page, src, writable)
                    .map_err(|err| EffectError::Memory { page, err })?;
                if !zero {
                    // UFFDIO_COPY from the received payload.
                    Stats::inc(&st.page_copies);
                }
                st.resident(1);
                if self.is_foreign(page) {
                    self.foreign_resident += 1;
                    self.foreign.push_back(page);
                }
                Ok(())
            }
            Effect::MakeWritable { page } => mem
                .write_protect(page, false)
                .map_err(|err| EffectError::Memory { page, err }),
            Effect::WriteProtect { page } => mem
                .write_protect(page, true)
                .map_err(|err| EffectError::Memory { page, err }),
            Effect::Drop { page } => {
                mem.punch(page)
                    .map_err(|err| EffectError::Memory { page, err })?;
                st.resident(-1);
                if self.is_foreign(page) {
                    self.foreign_resident = self.foreign_resident.saturating_sub(1);
                }
                self.evicting.remove(&page);
                if self.pf.is_tracked(page) {
                    self.pf.lost(page);
                    self.sync_prefetch_stats();
                }
                Ok(())
            }
            Effect::Wake { page } => mem
                .wake(page)
                .map_err(|err| EffectError::Memory { page, err }),
            Effect::SendRange { to, ref msg } => self.send_range(to, msg),
        }
    }

    /// Execute a `SendRange`: for a grant, read its pages of data from the
    /// engine mapping now (as for a single-page grant) into one payload.
    fn send_range(&mut self, to: NodeId, msg: &RangeMsg) -> std::result::Result<(), EffectError> {
        let st = &self.sh.stats;
        let remote = to != self.sh.me;
        self.rbuf.clear();
        match msg {
            RangeMsg::Grant { first, data, .. } => {
                let n = msg.data_pages();
                self.rbuf.resize(n * PAGE, 0);
                let mut slots = self.rbuf.chunks_exact_mut(PAGE);
                for (page, d) in (*first..).zip(data.iter()) {
                    match d {
                        Data::Page => {
                            // n slots for the n `Data::Page` entries.
                            let Some(slot) = slots
                                .next()
                                .and_then(|s| <&mut [u8; PAGE]>::try_from(s).ok())
                            else {
                                return Err(EffectError::MissingData(page));
                            };
                            self.sh.mem.read_page(page, slot);
                        }
                        Data::Zero => Stats::inc(&st.zero_pages_sent),
                        Data::None => Stats::inc(&st.transfers_skipped),
                    }
                }
                if remote {
                    Stats::add(&st.pages_sent, n as u64);
                    Stats::add(&st.bytes_sent, (n * PAGE) as u64);
                }
                // Read from the mapping; once more below if it goes to self.
                Stats::add(&st.page_copies, (n + if remote { 0 } else { n }) as u64);
            }
            RangeMsg::Inv { count, .. } if remote => {
                Stats::add(&st.invalidations_sent, u64::from(*count));
            }
            _ => {}
        }
        if !remote {
            let data = (!self.rbuf.is_empty()).then(|| self.rbuf.clone().into_boxed_slice());
            self.local.push_back((PMsg::Range(msg.clone()), data));
            return Ok(());
        }
        self.sh
            .transport
            .send_range(to, msg, &self.rbuf)
            .map_err(|err| EffectError::SendRange {
                to,
                what: range_kind(msg),
                first: msg.pages().start,
                end: msg.pages().end,
                err,
            })
    }

    fn evict_over_budget(&mut self, effects: &mut Vec<Effect>) {
        let Some(budget) = self.budget else {
            return;
        };
        let mut tries = self.foreign.len();
        // Pages being evicted still count as resident until they are dropped, so
        // the foreign footprint stays at `budget` plus what arrives while the
        // evictions are in flight (a few pages).
        while self.foreign_resident > budget && self.evicting.len() < MAX_EVICTING && tries > 0 {
            tries -= 1;
            let Some(page) = self.pick_victim() else {
                break;
            };
            if self.evicting.contains(&page) {
                continue;
            }
            effects.clear();
            match self.node.evict(page, effects) {
                Ok(true) => {
                    Stats::inc(&self.sh.stats.evictions);
                    self.evicting.insert(page);
                    let fx = std::mem::take(effects);
                    self.exec(&fx, Payload::None);
                    *effects = fx;
                }
                Ok(false) => {
                    // Busy (request in flight): retry later; not held: forget it.
                    if self.node.is_pending(page) {
                        self.foreign.push_back(page);
                    }
                }
                Err(e) => self.sh.fail(format!("evict page {page}: {e}")),
            }
        }
    }

    /// The foreign page to evict next: the least recently faulted clean one
    /// among the oldest [`VICTIM_WINDOW`] (a clean page goes back with one small
    /// message, a modified one with its 4 KiB), else the oldest.
    fn pick_victim(&mut self) -> Option<PageIdx> {
        let clean = self
            .foreign
            .iter()
            .take(VICTIM_WINDOW)
            .position(|&p| matches!(self.node.state(p), Some((CacheState::Shared, _, _))));
        match clean {
            Some(i) => self.foreign.remove(i),
            None => self.foreign.pop_front(),
        }
    }
}
