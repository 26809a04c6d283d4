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
//! **Range transactions** ([`DsmConfig::ranges`], on by default since pages
//! land in place, A/B in perf/README.md; `DVMM_DSM_RANGES=0` turns them off):
//! a prefetch window is requested with one [`protocol::RangeMsg::Req`]
//! (`OnBusy::Decline`) instead of a `Prefetch` message, so the home answers a
//! run of pages with one grant (pages as one train of frames, see `wire`,
//! landing in place and mapped with one UFFDIO_CONTINUE) and one `Done`. The
//! window grows to [`DEFAULT_PREFETCH_MAX_PAGES`]; `DVMM_DSM_PREFETCH` may
//! raise it to [`protocol::MAX_RANGE`] pages (it measured worse: see
//! perf/README.md). The engine executes every range effect
//! whether or not it asked for ranges itself (a peer's home may answer with
//! range messages only to range requests, but every node handles them).
//!
//! **Upgrade prefetch** ([`DsmConfig::upgrade_prefetch`], with ranges): a
//! node rewriting pages it holds read-only (an array other nodes read after
//! each pass: a solver's vector, a histogram, a grid's boundary planes)
//! faults on every page, one invalidation round trip each. A second
//! prefetcher follows those write-protect faults as streams and asks for
//! write access to the following run of pages this node holds `Shared`, with
//! one range `Req` (`Access::Write`, `OnBusy::Decline`): one `Inv` per other
//! holder and one grant without data for the run. It never asks for pages
//! this node does not hold (a write stream over other nodes' data must not
//! take it from them ahead of need). Both prefetchers remember the window of
//! a stream by its start page ([`DsmConfig::recall`], see `prefetch`), so
//! the next pass over the same array asks for its window on its first fault.
//!
//! Files: this one holds the configuration, the errors and the [`AppSink`]
//! interface to the layer above; `handle` starts the engine and is the
//! [`DsmHandle`] the VM holds; `serve` is the engine thread's loop (waiting,
//! faults, messages, hold window, prefetch); `effects` executes the protocol's
//! effects and evicts over the memory budget.

mod effects;
mod handle;
mod landing;
mod serve;

pub(crate) use handle::set_realtime;
pub use handle::{DsmEngine, DsmHandle, PageCopy};

use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::RawFd;
use std::time::Duration;

use super::auth::{AuthError, NodeKeys};
use super::protocol::{self, Msg, NodeId, PageIdx};
use super::transport::TransportError;
use super::uffd::UffdError;
use std::sync::Arc;

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
    /// [`DsmConfig::ranges`]. Bounded by `foreign_budget`.
    pub prefetch_max_pages: u32,
    /// How messages move between the nodes.
    pub transport: TransportKind,
    /// Prefetch with range transactions (one request, grant and `Done` per
    /// window, windows up to [`protocol::MAX_RANGE`] pages) instead of
    /// `Prefetch` messages. On by default (A/B in perf/README.md);
    /// `DVMM_DSM_RANGES=0` turns it off.
    pub ranges: bool,
    /// Upgrade prefetch (see the module comment; needs `ranges` and
    /// prefetch on). `DVMM_DSM_UPGRADES=0` turns it off.
    pub upgrade_prefetch: bool,
    /// Prefetchers remember stream windows by start page (see `prefetch`).
    /// `DVMM_DSM_RECALL=0` turns it off.
    pub recall: bool,
    /// Where application frames, peer failures and fatal errors go (the
    /// cluster link, [`crate::cluster::link`]); None: they are only logged.
    pub app: Option<Arc<dyn AppSink>>,
}

/// `DVMM_DSM_RANGES` from the environment: `0`, `false`, `off` or `no` turn
/// range transactions off; anything else (or nothing) leaves them on.
pub fn ranges_from_env() -> bool {
    switch_from_env("DVMM_DSM_RANGES")
}

/// A switch that is on unless the variable `name` says `0`, `false`, `off`
/// or `no` (for A/B runs).
fn switch_from_env(name: &str) -> bool {
    !std::env::var(name)
        .map(|v| matches!(v.trim(), "0" | "false" | "off" | "no"))
        .unwrap_or(false)
}

/// `DVMM_DSM_LAND` from the environment: `0`, `false`, `off` or `no` turn
/// landing in place off (every received page is then installed from a
/// payload with UFFDIO_COPY, as before); anything else leaves it on. For A/B
/// runs.
pub fn land_from_env() -> bool {
    switch_from_env("DVMM_DSM_LAND")
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
                .unwrap_or(DEFAULT_PREFETCH_MAX_PAGES),
            transport: TransportKind::Tcp,
            ranges: ranges_from_env(),
            upgrade_prefetch: switch_from_env("DVMM_DSM_UPGRADES"),
            recall: switch_from_env("DVMM_DSM_RECALL"),
            app: None,
        }
    }
}

/// Why the engine stopped serving (it reports the first one: the VM must stop).
#[derive(Debug, thiserror::Error)]
pub enum EngineFault {
    #[error("transport poll failed: {0}")]
    Poll(#[source] TransportError),
    #[error("{0}")]
    ReadFaults(#[source] UffdError),
    #[error("fault at page {page}: {source}")]
    Fault {
        page: PageIdx,
        source: protocol::ProtocolError,
    },
    #[error("prefetch after page {page}: {source}")]
    Prefetch {
        page: PageIdx,
        source: protocol::ProtocolError,
    },
    #[error("range prefetch of pages {start}+{count}: {source}")]
    RangePrefetch {
        start: PageIdx,
        count: u32,
        source: protocol::ProtocolError,
    },
    #[error("protocol violation by node {from}: {source}")]
    Violation {
        from: NodeId,
        source: protocol::ProtocolError,
    },
    #[error("{0}")]
    Effect(#[from] EffectError),
    #[error("evict page {page}: {source}")]
    Evict {
        page: PageIdx,
        source: protocol::ProtocolError,
    },
    #[error("node {node} is down: {reason}")]
    PeerDown { node: NodeId, reason: String },
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
    fn failed(&self, fault: Arc<EngineFault>);
}
