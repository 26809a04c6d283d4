//! One node's link to the other nodes of a distributed VM (issue 4).
//!
//! A distributed VM runs one worker per node; each worker builds a [`crate::vm::Vm`]
//! with its share of the vCPUs and a [`Cluster`]: the DSM engine (coherent guest
//! memory, see [`crate::dsm`]) plus the application messages that tie the VMMs into
//! one machine, carried by the engine's mesh as opaque frames ([`link`]: requests,
//! responses, the fast path on the engine thread; [`messages`]: the payloads;
//! [`service`]: what a node does with them; [`spec`]: the spec's `cluster` field):
//!
//! | kind | payload | meaning |
//! | --- | --- | --- |
//! | `APP_IPI` | 16-byte [`InterruptMessage`](crate::apic::InterruptMessage) | deliver to the local APICs it matches |
//! | `APP_IO` (request) | [`messages::IoRequest`] | perform a port/MMIO access on the device owner's bus |
//! | `APP_STOP` | [`messages::encode_stop`] | the VM stopped (debug exit, crash, error, ...) |
//! | `APP_DONE` | empty | the sender's vCPUs are joined; it leaves once everyone is done |
//! | `APP_ADDR` | [`encode_addressing`](messages::encode_addressing) | a vCPU of the sender changed its APIC addressing |
//! | `APP_EOI` | `[vector u8]` | EOI of a level-triggered vector, for the IOAPIC's node |
//! | `APP_SNAP` (request) | JSON (`vm::checkpoint`) | snapshot: pause, save this node's share, resume, ready |
//! | `APP_VCPU_AT` | [`messages::encode_vcpu_at`] | a vCPU runs on another node now (migration) |
//! | `APP_MIGRATE` (request) | JSON (`vm::migrate`) | move a vCPU out of / into this node |
//! | `APP_VCPU_STATE` | [`messages::encode_chunk`] | a piece of a migrating vCPU's state |
//!
//! **Interrupts.** Every node keeps the [`ApicAddressing`](crate::apic::ApicAddressing) of every vCPU (its
//! own from its LAPICs, the others' from `APP_ADDR` broadcasts sent whenever a
//! vCPU's ID / LDR / DFR / APIC mode changes, starting from the power-on state that
//! the APIC ID determines). The node an interrupt originates on resolves its exact
//! targets over that table with [`route_targets`](crate::apic::route_targets) (lowest priority: exactly
//! one vCPU, the lowest matching APIC ID; logical, broadcast and shorthand
//! destinations: every match) and sends each remote target, as `APP_IPI`, a
//! physical re-encoding of the message ([`crate::vm::resolved_for`]) to the node
//! that runs it alone; the receiver delivers it with
//! [`LocalInterrupts::deliver_local`], which can only match that one vCPU. So an
//! interrupt is delivered once per target, never once per node. INIT, SIPI and NMI
//! are ordinary messages, so the guest's own INIT-SIPI-SIPI starts APs on every
//! node. Ordering: `APP_ADDR` and `APP_IPI` travel on the same FIFO control lane
//! and are both handled on the engine thread, so every node applies one sender's
//! addressing updates before that sender's later IPIs; across senders the guest
//! synchronises as on real hardware (see [`crate::vm::InterruptRouter`]).
//!
//! **EOI.** The IOAPIC lives on the boot node; an EOI of a level-triggered vector
//! on another node goes there as `APP_EOI` and the boot node's IOAPIC
//! re-delivers a still-asserted pin, routed like any other interrupt.
//!
//! **I/O.** Devices live on the boot node (COM1, debug exit, IOAPIC). Other nodes map
//! [`ProxyDevice`](crate::bus::ProxyDevice)s that forward each access synchronously
//! ([`AppLink::request`]) and return the read data or the device's action.
//!
//! **Stopping.** Whatever stops a node's VM (debug exit on any node, a crash, a
//! timeout, an error, a vanished peer) is broadcast as `APP_STOP`; every node stops
//! with the first reason it sees, so all workers report the same status. Then each
//! node joins its vCPUs, says `APP_DONE` and keeps serving memory until every peer is
//! done (or gone), bounded, before it tears the mesh down: no node disappears while
//! another still needs one of its pages to let a vCPU leave the guest.

pub mod link;
pub mod messages;
pub mod service;
pub mod spec;

pub use link::{AppEvent, AppHandler, AppLink, LinkError};
pub use messages::MessageError;
pub use service::{LocalInterrupts, RemoteInterruptSink};

/// Takes part in snapshots (`vm::checkpoint::NodeSaver`): answers the boot
/// node's `APP_SNAP` requests on the service thread.
pub trait SnapshotAgent: Send + Sync {
    /// The response payload to a request payload.
    fn handle(&self, request: &[u8]) -> Vec<u8>;
}

/// Takes part in vCPU migrations (`vm::migrate::VcpuMover`): answers
/// `APP_MIGRATE` requests and collects `APP_VCPU_STATE` pieces, on the mover
/// thread ([`Cluster::set_mover`]).
pub trait VcpuAgent: Send + Sync {
    /// The response payload to a migration request from `from`.
    fn migrate(&self, from: NodeId, request: &[u8]) -> Vec<u8>;
    /// A piece of a vCPU's state sent by `from` ahead of its request.
    fn state_chunk(&self, from: NodeId, payload: &[u8]) -> Result<(), MessageError>;
}
pub use spec::{ClusterNodeSpec, ClusterSpec, ClusterSpecError};

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::bus::{BusAction, RemoteBusForwarder};
use crate::dsm::protocol::NodeId;
use crate::dsm::{DsmConfig, DsmEngine, DsmHandle};
use crate::memory::GuestRam;
use crate::numa::NumaNode;
use crate::sync::lock;
use crate::vcpu::{StopReason, VmFailure, VmStop};
use messages::{encode_stop, IoRequest, APP_DONE, APP_IO, APP_STOP};
use spec::default_foreign_budget;

/// How long a forwarded I/O access may take before the VM is stopped with an error.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the cluster link.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Spec(#[from] ClusterSpecError),
    #[error("node {node} ({addr}): {source}")]
    Engine {
        node: NodeId,
        addr: SocketAddr,
        source: crate::dsm::DsmError,
    },
}

/// This node's link to the cluster.
pub struct Cluster {
    pub dsm: DsmHandle,
    /// The application request/response layer on top of `dsm`.
    link: Arc<AppLink>,
    pub me: NodeId,
    pub boot: NodeId,
    pub addrs: Vec<SocketAddr>,
    /// vCPU index -> the node running it, as far as this node knows (a node a
    /// vCPU left forwards its interrupts on), and how many times it moved.
    cpu_node: Vec<AtomicU16>,
    cpu_moves: Vec<AtomicU32>,
    stop: Arc<VmStop>,
    /// Peers that said DONE or went down.
    done: Mutex<HashSet<NodeId>>,
    done_cv: Condvar,
    quit: AtomicBool,
    /// Serialises [`Cluster::place`].
    place_lock: Mutex<()>,
    /// Answers `APP_SNAP` requests (set by the VM's run).
    agent: Mutex<Option<Arc<dyn SnapshotAgent>>>,
    /// Answers `APP_MIGRATE` requests (set by the VM's run).
    mover: Mutex<Option<Arc<dyn VcpuAgent>>>,
    /// Hands `APP_MIGRATE` / `APP_VCPU_STATE` to the mover thread (see
    /// [`Cluster::set_mover`]).
    mover_tx: Mutex<Option<crossbeam_channel::Sender<MoverJob>>>,
}

/// A migration message for the mover thread: (from, kind, tag, payload).
type MoverJob = (NodeId, u64, u64, Vec<u8>);

impl Cluster {
    /// Start the DSM engine on `ram` (which nothing may have touched yet) and form
    /// the authenticated mesh with the other nodes.
    pub fn start(
        spec: &ClusterSpec,
        numa: &[NumaNode],
        vcpus: u32,
        ram: &GuestRam,
        stop: Arc<VmStop>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let addrs = spec.addrs()?;
        let me = spec.node_index as NodeId;
        let placement = spec.placement_of(numa);
        let ranges = (0..addrs.len()).map(|k| placement.home(k)).collect();
        let mut cfg = DsmConfig::new(
            me,
            addrs.clone(),
            spec.keys()?,
            ranges,
            ram.memfd(),
            ram.guest_base(),
            ram.engine_base(),
        );
        let share = placement.home(spec.node_index);
        let share_pages = ((share.end - share.start) / 4096) as usize;
        cfg.foreign_budget = Some(
            spec.foreign_budget_pages
                .unwrap_or_else(|| default_foreign_budget(share_pages)),
        );
        if let Some(us) = spec.hold_window_us {
            cfg.hold_window = Duration::from_micros(us);
        }
        if let Some(n) = spec.prefetch_max_pages {
            cfg.prefetch_max_pages = n;
        }
        if let Some(on) = spec.dsm_ranges {
            cfg.ranges = on;
        }
        cfg.transport = spec.transport_kind()?;
        if let Some(t) = spec.connect_timeout_s {
            cfg.connect_deadline = Duration::from_secs_f64(t);
        }
        let link = AppLink::new(me);
        cfg.app = Some(link.clone());
        // SAFETY: both mappings cover the whole memfd and live in `ram`, which the
        // Vm keeps alive until after `Cluster::finish` shut the engine down; the
        // memfd is still all holes (nothing has touched guest memory yet).
        let dsm = unsafe { DsmEngine::start(cfg) }.map_err(|source| ClusterError::Engine {
            node: me,
            addr: addrs[usize::from(me)],
            source,
        })?;
        let cpu_node = (0..vcpus as usize)
            .map(|c| AtomicU16::new(placement.vcpu_node.get(c).map_or(0, |&k| k as NodeId)))
            .collect();
        let cpu_moves = (0..vcpus).map(|_| AtomicU32::new(0)).collect();
        Ok(Arc::new(Cluster {
            dsm,
            link,
            me,
            boot: spec.boot_node as NodeId,
            addrs,
            cpu_node,
            cpu_moves,
            stop,
            done: Mutex::new(HashSet::new()),
            done_cv: Condvar::new(),
            quit: AtomicBool::new(false),
            place_lock: Mutex::new(()),
            agent: Mutex::new(None),
            mover: Mutex::new(None),
            mover_tx: Mutex::new(None),
        }))
    }

    /// Is this the boot node (BSP and devices)?
    pub fn is_boot(&self) -> bool {
        self.me == self.boot
    }

    /// "node N (addr)".
    pub fn describe(&self, node: NodeId) -> String {
        match self.addrs.get(usize::from(node)) {
            Some(a) => format!("node {node} ({a})"),
            None => format!("node {node}"),
        }
    }

    fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.addrs.len() as NodeId).filter(move |&n| n != self.me)
    }

    /// Every other node.
    pub fn peer_ids(&self) -> Vec<NodeId> {
        self.peers().collect()
    }

    /// Set who answers the snapshot requests of the boot node.
    pub fn set_agent(&self, agent: Option<Arc<dyn SnapshotAgent>>) {
        *lock(&self.agent) = agent;
    }

    /// Set who answers the migration requests of other nodes (None: nobody;
    /// the mover thread ends).
    ///
    /// They are answered on a thread of their own at `SCHED_FIFO` priority 1
    /// (as the engine thread), fed by the engine thread: a move stops a vCPU
    /// for the time its state takes to cross, and on a host whose cores run
    /// busy vCPUs a normal-priority thread waits for a scheduler tick (4 ms
    /// here) at each of its wake-ups.
    pub fn set_mover(self: &Arc<Self>, mover: Option<Arc<dyn VcpuAgent>>) {
        *lock(&self.mover) = mover.clone();
        let Some(agent) = mover else {
            *lock(&self.mover_tx) = None;
            return;
        };
        let (tx, rx) = crossbeam_channel::unbounded::<MoverJob>();
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("dvmm-mover".into())
            .spawn(move || {
                if let Err(e) = crate::dsm::engine::set_realtime() {
                    eprintln!("dvmm: vCPU migrations at normal priority: SCHED_FIFO: {e}");
                }
                // Ends when the sender goes (set_mover(None), or the cluster).
                while let Ok((from, kind, tag, payload)) = rx.recv() {
                    let Some(c) = me.upgrade() else { break };
                    c.on_mover_job(&*agent, from, kind, tag, &payload);
                }
            });
        match spawned {
            Ok(_) => *lock(&self.mover_tx) = Some(tx),
            Err(e) => {
                eprintln!("dvmm: no mover thread ({e}): migrations served by the cluster thread")
            }
        }
    }

    /// Stop the VM with an error (a failed side effect that cannot be undone).
    pub fn stop_vm(&self, why: &str) {
        eprintln!("dvmm: node {}: {why}", self.me);
        self.stop
            .request(StopReason::Error(VmFailure::Remote(why.to_string())));
    }

    /// Hand a migration message to the mover thread; false if there is none.
    fn to_mover(&self, from: NodeId, kind: u64, tag: u64, payload: &[u8]) -> bool {
        match &*lock(&self.mover_tx) {
            Some(tx) => tx.send((from, kind, tag, payload.to_vec())).is_ok(),
            None => false,
        }
    }

    /// The node running vCPU `vcpu`, as far as this node knows.
    pub fn node_of(&self, vcpu: u32) -> Option<NodeId> {
        self.cpu_node
            .get(vcpu as usize)
            .map(|n| n.load(Ordering::SeqCst))
    }

    /// How many times vCPU `vcpu` moved, as far as this node knows.
    pub fn moves_of(&self, vcpu: u32) -> u32 {
        self.cpu_moves
            .get(vcpu as usize)
            .map_or(0, |n| n.load(Ordering::SeqCst))
    }

    /// Where every vCPU runs, as far as this node knows (vCPU index -> node).
    pub fn vcpu_nodes(&self) -> Vec<usize> {
        self.cpu_node
            .iter()
            .map(|n| usize::from(n.load(Ordering::SeqCst)))
            .collect()
    }

    /// vCPU `vcpu` runs on `node` after its `moves`-th migration: recorded
    /// unless this node already knows of a later one. False for a vCPU or
    /// node the VM does not have.
    pub fn place(&self, vcpu: u32, node: NodeId, moves: u32) -> bool {
        let (Some(n), Some(m)) = (
            self.cpu_node.get(vcpu as usize),
            self.cpu_moves.get(vcpu as usize),
        ) else {
            return false;
        };
        if usize::from(node) >= self.addrs.len() {
            return false;
        }
        // One writer at a time per vCPU in practice (the service or engine
        // thread); the lock keeps node and count together anyway.
        let _g = lock(&self.place_lock);
        if moves >= m.load(Ordering::SeqCst) {
            m.store(moves, Ordering::SeqCst);
            n.store(node, Ordering::SeqCst);
        }
        true
    }

    /// Send `payload` of `kind` to `to` (fire and forget).
    pub fn send_to(&self, to: NodeId, kind: u64, payload: &[u8]) -> Result<(), LinkError> {
        self.send(to, kind, payload)
    }

    /// Send a request to `node` and wait for its response.
    pub fn request(
        &self,
        node: NodeId,
        kind: u64,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        self.link.request(&self.dsm, node, kind, payload, timeout)
    }

    /// Send a snapshot request to `node` and wait for its response.
    pub fn snapshot_request(
        &self,
        node: NodeId,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        self.link
            .request(&self.dsm, node, messages::APP_SNAP, payload, timeout)
    }

    /// Tell every other node that the VM stopped (errors: the peer is gone anyway).
    pub fn broadcast_stop(&self, r: &StopReason) {
        let p = encode_stop(r);
        for n in self.peers() {
            let _ = self.send(n, APP_STOP, &p);
        }
    }

    /// Say DONE and wait (bounded) until every peer is done or gone.
    pub fn finish(&self, timeout: Duration) -> bool {
        for n in self.peers() {
            let _ = self.send(n, APP_DONE, &[]);
        }
        let end = Instant::now() + timeout;
        let want = self.addrs.len() - 1;
        let mut g = lock(&self.done);
        while g.len() < want {
            let now = Instant::now();
            if now >= end {
                return false;
            }
            g = self
                .done_cv
                .wait_timeout(g, end - now)
                .map(|x| x.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }

    fn mark_done(&self, n: NodeId) {
        lock(&self.done).insert(n);
        self.done_cv.notify_all();
    }

    /// Send an application message (fire and forget) to a node.
    fn send(&self, to: NodeId, kind: u64, payload: &[u8]) -> Result<(), LinkError> {
        self.link.send(&self.dsm, to, kind, payload)
    }

    /// End the event loop of [`Cluster::serve`].
    pub fn quit(&self) {
        self.link.clear_handler();
        self.quit.store(true, Ordering::Relaxed);
    }
}

impl Cluster {
    fn io(&self, req: IoRequest) -> Option<Vec<u8>> {
        self.dsm.count_forwarded(0, 1);
        match self
            .link
            .request(&self.dsm, self.boot, APP_IO, &req.to_bytes(), IO_TIMEOUT)
        {
            Ok(r) if r.len() >= 2 => Some(r),
            Ok(_) => {
                self.stop
                    .request(StopReason::Error(VmFailure::Remote(format!(
                        "{} answered a forwarded I/O access with a malformed reply",
                        self.describe(self.boot)
                    ))));
                None
            }
            Err(e) => {
                self.stop
                    .request(StopReason::Error(VmFailure::Remote(format!(
                        "I/O access at {:#x} forwarded to {} failed: {e}",
                        req.addr,
                        self.describe(self.boot)
                    ))));
                None
            }
        }
    }
}

impl RemoteBusForwarder for Cluster {
    fn read(&self, is_pio: bool, addr: u64, data: &mut [u8]) {
        let req = IoRequest {
            is_pio,
            is_write: false,
            addr,
            data: vec![0; data.len().clamp(1, 8)],
        };
        match self.io(req) {
            Some(r) if r.len() >= 2 + data.len() => data.copy_from_slice(&r[2..2 + data.len()]),
            _ => data.fill(0xff),
        }
    }

    fn write(&self, is_pio: bool, addr: u64, data: &[u8]) -> Option<BusAction> {
        let req = IoRequest {
            is_pio,
            is_write: true,
            addr,
            data: data[..data.len().min(8)].to_vec(),
        };
        if req.data.is_empty() {
            return None;
        }
        match self.io(req) {
            Some(r) if r[0] == 1 => Some(BusAction::Stop(r[1])),
            _ => None,
        }
    }
}

/// `vcpu-serve`: a vCPU thread of this node serves the DSM's incoming traffic.
impl crate::vcpu::MessageServer for Cluster {
    fn attach(&self, tid: Option<i32>) {
        let owner = tid.map(|t| (t, crate::vcpu::kick_signal()));
        if let Err(e) = self.dsm.attach_server(owner) {
            // The engine thread goes on serving everything: slower, not wrong.
            eprintln!("dvmm: node {}: cannot serve on a vCPU thread: {e}", self.me);
        }
    }

    fn serve(&self) {
        self.dsm.serve_now();
    }
}
