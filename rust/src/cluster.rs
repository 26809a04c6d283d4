//! One node's link to the other nodes of a distributed VM (issue 4).
//!
//! A distributed VM runs one worker per node; each worker builds a [`crate::vm::Vm`]
//! with its share of the vCPUs and a [`Cluster`]: the DSM engine (coherent guest
//! memory, see [`crate::dsm`]) plus the application messages that tie the VMMs into
//! one machine:
//!
//! | kind | payload | meaning |
//! | --- | --- | --- |
//! | `APP_IPI` | 16-byte [`InterruptMessage`] | deliver to the local APICs it matches |
//! | `APP_IO` (request) | [`IoRequest`] | perform a port/MMIO access on the device owner's bus |
//! | `APP_STOP` | [`encode_stop`] | the VM stopped (debug exit, crash, error, ...) |
//! | `APP_DONE` | empty | the sender's vCPUs are joined; it leaves once everyone is done |
//! | `APP_ADDR` | [`encode_addressing`] | a vCPU of the sender changed its APIC addressing |
//! | `APP_EOI` | `[vector u8]` | EOI of a level-triggered vector, for the IOAPIC's node |
//!
//! **Interrupts.** Every node keeps the [`apic::ApicAddressing`] of every vCPU (its
//! own from its LAPICs, the others' from `APP_ADDR` broadcasts sent whenever a
//! vCPU's ID / LDR / DFR / APIC mode changes, starting from the power-on state that
//! the APIC ID determines). The node an interrupt originates on resolves its exact
//! targets over that table with [`apic::route_targets`] (lowest priority: exactly
//! one vCPU, the lowest matching APIC ID; logical, broadcast and shorthand
//! destinations: every match) and sends each remote target, as `APP_IPI`, a
//! physical re-encoding of the message ([`crate::vm::resolved_for`]) to the node
//! that runs it alone; the receiver delivers it with
//! [`InterruptRouter::deliver_local`], which can only match that one vCPU. So an
//! interrupt is delivered once per target, never once per node. INIT, SIPI and NMI
//! are ordinary messages, so the guest's own INIT-SIPI-SIPI starts APs on every
//! node. Ordering: `APP_ADDR` and `APP_IPI` travel on the same FIFO control lane
//! and are both handled on the engine thread, so every node applies one sender's
//! addressing updates before that sender's later IPIs; across senders the guest
//! synchronises as on real hardware (see [`InterruptRouter`]).
//!
//! **EOI.** The IOAPIC lives on the boot node; an EOI of a level-triggered vector
//! on another node goes there as `APP_EOI` and the boot node's IOAPIC
//! re-delivers a still-asserted pin, routed like any other interrupt.
//!
//! **I/O.** Devices live on the boot node (COM1, debug exit, IOAPIC). Other nodes map
//! [`ProxyDevice`](crate::bus::ProxyDevice)s that forward each access synchronously
//! ([`DsmHandle::request`]) and return the read data or the device's action.
//!
//! **Stopping.** Whatever stops a node's VM (debug exit on any node, a crash, a
//! timeout, an error, a vanished peer) is broadcast as `APP_STOP`; every node stops
//! with the first reason it sees, so all workers report the same status. Then each
//! node joins its vCPUs, says `APP_DONE` and keeps serving memory until every peer is
//! done (or gone), bounded, before it tears the mesh down: no node disappears while
//! another still needs one of its pages to let a vCPU leave the guest.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::apic::{self, InterruptMessage};
use crate::bus::{lock, Bus, BusAction, RemoteBusForwarder};
use crate::dsm::auth::{self, NodeKeys};
use crate::dsm::engine::TransportKind;
use crate::dsm::protocol::NodeId;
use crate::dsm::seal::Protection;
use crate::dsm::{AppEvent, DsmConfig, DsmEngine, DsmHandle, APP_ERROR, APP_IO, APP_IPI, APP_STOP};
use crate::memory::GuestRam;
use crate::vcpu::{StopReason, VmStop};
use crate::vm::{InterruptRouter, NumaNode, RemoteInterruptSink};

/// Application message: "my vCPUs are joined" (see the module docs).
pub const APP_DONE: u64 = 5;

/// Application message: addressing update of one of the sender's vCPUs.
pub const APP_ADDR: u64 = 6;

/// Application message: EOI of a level-triggered vector, for the IOAPIC owner.
pub const APP_EOI: u64 = 7;

/// Size of an [`encode_addressing`] payload.
pub const ADDRESSING_BYTES: usize = 13;

/// Encode an `APP_ADDR` payload:
/// `[vcpu u32 LE][id u32 LE][ldr u32 LE][flags u8: 1 flat model, 2 x2APIC, 4 enabled,
/// 8 software-enabled]`.
pub fn encode_addressing(vcpu: u32, a: &apic::ApicAddressing) -> [u8; ADDRESSING_BYTES] {
    let mut b = [0u8; ADDRESSING_BYTES];
    b[0..4].copy_from_slice(&vcpu.to_le_bytes());
    b[4..8].copy_from_slice(&a.id.to_le_bytes());
    b[8..12].copy_from_slice(&a.ldr.to_le_bytes());
    b[12] = u8::from(a.flat_model)
        | (u8::from(a.x2apic) << 1)
        | (u8::from(a.enabled) << 2)
        | (u8::from(a.software_enabled) << 3);
    b
}

/// Decode [`encode_addressing`].
pub fn decode_addressing(b: &[u8]) -> Result<(u32, apic::ApicAddressing), String> {
    if b.len() != ADDRESSING_BYTES {
        return Err(format!(
            "addressing update of {} bytes (expected {ADDRESSING_BYTES})",
            b.len()
        ));
    }
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let flags = b[12];
    if flags & !0xF != 0 {
        return Err(format!("addressing update with reserved flags {flags:#x}"));
    }
    Ok((
        word(0),
        apic::ApicAddressing {
            id: word(4),
            ldr: word(8),
            flat_model: flags & 1 != 0,
            x2apic: flags & 2 != 0,
            enabled: flags & 4 != 0,
            software_enabled: flags & 8 != 0,
        },
    ))
}

/// How long a forwarded I/O access may take before the VM is stopped with an error.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One node of the cluster in the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNodeSpec {
    /// `ip:port` of the node's DSM endpoint.
    pub addr: String,
}

/// The `cluster` field of the VM spec (docs/interfaces.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// This worker's node (index into `nodes` and `numa`).
    pub node_index: usize,
    pub nodes: Vec<ClusterNodeSpec>,
    /// Data-plane protection: "encrypt" (default), "integrity" or "none".
    #[serde(default)]
    pub security: Option<String>,
    /// The VM's session id (16 bytes, hex; public, the same on every node).
    pub session_hex: String,
    /// Every node's X25519 public key for this VM (hex), in `nodes` order.
    pub node_pubkeys_hex: Vec<String>,
    /// This node's X25519 private key (hex). Never in a spec file: the worker
    /// reads it from its standard input; never serialized, never printed.
    #[serde(default, skip_serializing)]
    pub private_key_hex: PrivateKeyHex,
    /// The node that runs the BSP and owns the devices.
    #[serde(default)]
    pub boot_node: usize,
    /// Memory aggregation: keep at most this many pages of other nodes' ranges
    /// resident (dvmm extension; absent: [`DEFAULT_FOREIGN_BUDGET_PERCENT`] of
    /// this node's own share).
    #[serde(default)]
    pub foreign_budget_pages: Option<usize>,
    /// DSM hold window in microseconds (0: off; absent: the engine's default,
    /// see [`crate::dsm::engine::DEFAULT_HOLD_WINDOW_US`]).
    #[serde(default)]
    pub hold_window_us: Option<u64>,
    /// DSM sequential prefetch, pages per batch at most (0: off; absent: the
    /// engine's default, see [`crate::dsm::engine::DEFAULT_PREFETCH_MAX_PAGES`]).
    #[serde(default)]
    pub prefetch_max_pages: Option<u32>,
    /// DSM range transactions for prefetch (absent: off, or `DVMM_DSM_RANGES`
    /// in the worker's environment; see [`crate::dsm::DsmConfig::ranges`]).
    #[serde(default)]
    pub dsm_ranges: Option<bool>,
    /// How messages move between the nodes: "tcp" (default; any nodes) or
    /// "shm" (shared-memory rings; all nodes on one host).
    #[serde(default)]
    pub transport: Option<String>,
    /// Give up forming the mesh after this many seconds (default 30).
    #[serde(default)]
    pub connect_timeout_s: Option<f64>,
}

/// Default foreign budget, in percent of the node's own share: a node holds
/// at most its share plus half of it again, so a VM bigger than any one node
/// still fits when its nodes together have room (memory aggregation).
pub const DEFAULT_FOREIGN_BUDGET_PERCENT: usize = 50;

/// The foreign budget (pages) of a node whose share is `share_pages`.
pub fn default_foreign_budget(share_pages: usize) -> usize {
    (share_pages * DEFAULT_FOREIGN_BUDGET_PERCENT / 100).max(1)
}

/// A private key in hex that `Debug` does not print.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct PrivateKeyHex(pub String);

impl std::fmt::Debug for PrivateKeyHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "(none)"
        } else {
            "(hidden)"
        })
    }
}

fn hex_array<const N: usize>(field: &str, s: &str) -> Result<[u8; N], String> {
    let v = decode_hex(s).ok_or_else(|| format!("{field}: not a hex string"))?;
    <[u8; N]>::try_from(v.as_slice())
        .map_err(|_| format!("{field}: {} bytes, {N} are required", v.len()))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl ClusterSpec {
    /// Check the cluster against the VM's NUMA layout; the error names the field.
    pub fn validate(&self, numa: Option<&[NumaNode]>) -> Result<(), String> {
        let n = self.nodes.len();
        if n == 0 {
            return Err("cluster.nodes: empty list".into());
        }
        if n > crate::dsm::protocol::MAX_NODES {
            return Err(format!(
                "cluster.nodes: {n} nodes, at most {} are supported",
                crate::dsm::protocol::MAX_NODES
            ));
        }
        if self.node_index >= n {
            return Err(format!(
                "cluster.node_index = {}: must be below the number of nodes ({n})",
                self.node_index
            ));
        }
        if self.boot_node >= n {
            return Err(format!(
                "cluster.boot_node = {}: must be below the number of nodes ({n})",
                self.boot_node
            ));
        }
        let Some(numa) = numa else {
            return Err(format!(
                "numa: a cluster of {n} nodes needs a numa list with one entry per node"
            ));
        };
        if numa.len() != n {
            return Err(format!(
                "numa: {} entries but cluster.nodes has {n} (one NUMA node per cluster node)",
                numa.len()
            ));
        }
        if !numa[self.boot_node].cpus.contains(&0) {
            return Err(format!(
                "cluster.boot_node = {}: the BSP (vCPU 0) must be in numa[{}].cpus",
                self.boot_node, self.boot_node
            ));
        }
        self.addrs()?;
        self.keys()?;
        self.transport_kind()?;
        if let Some(t) = self.connect_timeout_s {
            if !(t.is_finite() && t > 0.0) {
                return Err(format!("cluster.connect_timeout_s = {t}: must be > 0"));
            }
        }
        Ok(())
    }

    /// The nodes' socket addresses.
    pub fn addrs(&self) -> Result<Vec<SocketAddr>, String> {
        let mut out: Vec<SocketAddr> = Vec::with_capacity(self.nodes.len());
        for (i, nd) in self.nodes.iter().enumerate() {
            let a: SocketAddr = nd.addr.parse().map_err(|e| {
                format!(
                    "cluster.nodes[{i}].addr = {:?}: not an ip:port address ({e})",
                    nd.addr
                )
            })?;
            if out.contains(&a) {
                return Err(format!(
                    "cluster.nodes[{i}].addr = {a}: used by another node"
                ));
            }
            out.push(a);
        }
        Ok(out)
    }

    /// The transport the spec asks for.
    pub fn transport_kind(&self) -> Result<TransportKind, String> {
        match self.transport.as_deref() {
            None | Some("tcp") => Ok(TransportKind::Tcp),
            Some("shm") => Ok(TransportKind::Shm),
            Some(t) => Err(format!(
                "cluster.transport = {t:?}: must be \"tcp\" or \"shm\""
            )),
        }
    }

    /// This node's data-plane keys (the private key must match its public key).
    pub fn keys(&self) -> Result<NodeKeys, String> {
        let n = self.nodes.len();
        if self.node_pubkeys_hex.len() != n {
            return Err(format!(
                "cluster.node_pubkeys_hex: {} keys for {n} nodes (one per node)",
                self.node_pubkeys_hex.len()
            ));
        }
        let pubs = self
            .node_pubkeys_hex
            .iter()
            .enumerate()
            .map(|(i, h)| hex_array::<32>(&format!("cluster.node_pubkeys_hex[{i}]"), h))
            .collect::<Result<Vec<_>, _>>()?;
        if self.private_key_hex.0.is_empty() {
            return Err(
                "cluster.private_key_hex: missing (the worker reads it from its \
                        standard input)"
                    .into(),
            );
        }
        let private = hex_array::<32>("cluster.private_key_hex", &self.private_key_hex.0)?;
        let session =
            hex_array::<{ auth::SESSION_SIZE }>("cluster.session_hex", &self.session_hex)?;
        let mode = self.security.as_deref().unwrap_or("encrypt");
        let protection = Protection::parse(mode).ok_or_else(|| {
            format!("cluster.security = {mode:?}: must be \"encrypt\", \"integrity\" or \"none\"")
        })?;
        let me = NodeId::try_from(self.node_index)
            .map_err(|_| format!("cluster.node_index = {}: too large", self.node_index))?;
        NodeKeys::new(me, private, &pubs, session, protection)
            .map_err(|e| format!("cluster.private_key_hex: {e}"))
    }
}

/// A forwarded device access (wire format of `APP_IO` requests):
/// `[is_pio u8][is_write u8][len u8][0; 5][addr u64 LE][data; len]`. The response is
/// `[action u8 (0 none, 1 stop)][status u8][read data; len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoRequest {
    pub is_pio: bool,
    pub is_write: bool,
    pub addr: u64,
    /// Write data, or a zeroed buffer of the read length.
    pub data: Vec<u8>,
}

impl IoRequest {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.data.len());
        v.push(self.is_pio as u8);
        v.push(self.is_write as u8);
        v.push(self.data.len() as u8);
        v.extend_from_slice(&[0; 5]);
        v.extend_from_slice(&self.addr.to_le_bytes());
        v.extend_from_slice(&self.data);
        v
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        if b.len() < 16 {
            return Err(format!("I/O request of {} bytes (< 16)", b.len()));
        }
        let len = usize::from(b[2]);
        if b[0] > 1 || b[1] > 1 || !(1..=8).contains(&len) || b.len() != 16 + len {
            return Err("malformed I/O request".into());
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[8..16]);
        Ok(IoRequest {
            is_pio: b[0] == 1,
            is_write: b[1] == 1,
            addr: u64::from_le_bytes(a),
            data: b[16..].to_vec(),
        })
    }
}

/// Encode a stop reason for `APP_STOP`: `[kind u8][status u8][utf-8 message]`.
pub fn encode_stop(r: &StopReason) -> Vec<u8> {
    let (kind, status, msg): (u8, u8, &str) = match r {
        StopReason::DebugExit(s) => (0, *s, ""),
        StopReason::Shutdown(m) => (1, 0, m),
        StopReason::Crash { error, .. } => (2, 0, error),
        StopReason::Error(m) => (3, 0, m),
        StopReason::Timeout => (4, 0, ""),
        StopReason::Stopped => (5, 0, ""),
    };
    let mut v = vec![kind, status];
    let m = msg.as_bytes();
    v.extend_from_slice(&m[..m.len().min(crate::dsm::wire::MAX_APP_PAYLOAD - 2)]);
    v
}

/// Decode an `APP_STOP` payload sent by node `from` (described as `who`).
pub fn decode_stop(who: &str, b: &[u8]) -> Result<StopReason, String> {
    if b.len() < 2 {
        return Err("stop message too short".into());
    }
    let msg = String::from_utf8_lossy(&b[2..]).into_owned();
    Ok(match b[0] {
        0 => StopReason::DebugExit(b[1]),
        1 => StopReason::Shutdown(format!("{who}: {msg}")),
        2 => StopReason::Crash {
            error: format!("{who}: {msg}"),
            dump: None,
        },
        3 => StopReason::Error(format!("{who}: {msg}")),
        4 => StopReason::Timeout,
        5 => StopReason::Stopped,
        k => return Err(format!("stop message of unknown kind {k}")),
    })
}

/// This node's link to the cluster.
pub struct Cluster {
    pub dsm: DsmHandle,
    pub me: NodeId,
    pub boot: NodeId,
    pub addrs: Vec<SocketAddr>,
    /// APIC ID (= vCPU index) -> node running it.
    cpu_node: Vec<NodeId>,
    stop: Arc<VmStop>,
    /// Peers that said DONE or went down.
    done: Mutex<HashSet<NodeId>>,
    done_cv: Condvar,
    quit: AtomicBool,
}

impl Cluster {
    /// Start the DSM engine on `ram` (which nothing may have touched yet) and form
    /// the authenticated mesh with the other nodes.
    pub fn start(
        spec: &ClusterSpec,
        numa: &[NumaNode],
        vcpus: u32,
        ram: &GuestRam,
        stop: Arc<VmStop>,
    ) -> Result<Arc<Cluster>, String> {
        let addrs = spec.addrs()?;
        let me = spec.node_index as NodeId;
        let ranges = numa
            .iter()
            .map(|n| n.mem_start..n.mem_start + n.mem_size)
            .collect();
        let mut cfg = DsmConfig::new(
            me,
            addrs.clone(),
            spec.keys()?,
            ranges,
            ram.memfd(),
            ram.guest_base(),
            ram.engine_base(),
        );
        let share_pages = numa.get(spec.node_index).map_or(0, |n| n.mem_size / 4096) as usize;
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
        // SAFETY: both mappings cover the whole memfd and live in `ram`, which the
        // Vm keeps alive until after `Cluster::finish` shut the engine down; the
        // memfd is still all holes (nothing has touched guest memory yet).
        let dsm = unsafe { DsmEngine::start(cfg) }
            .map_err(|e| format!("node {me} ({}): {e}", addrs[usize::from(me)]))?;
        let mut cpu_node = vec![0 as NodeId; vcpus as usize];
        for (i, n) in numa.iter().enumerate() {
            for &c in &n.cpus {
                if let Some(x) = cpu_node.get_mut(c as usize) {
                    *x = i as NodeId;
                }
            }
        }
        Ok(Arc::new(Cluster {
            dsm,
            me,
            boot: spec.boot_node as NodeId,
            addrs,
            cpu_node,
            stop,
            done: Mutex::new(HashSet::new()),
            done_cv: Condvar::new(),
            quit: AtomicBool::new(false),
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

    /// Tell every other node that the VM stopped (errors: the peer is gone anyway).
    pub fn broadcast_stop(&self, r: &StopReason) {
        let p = encode_stop(r);
        for n in self.peers() {
            let _ = self.dsm.send(n, APP_STOP, &p);
        }
    }

    /// Say DONE and wait (bounded) until every peer is done or gone.
    pub fn finish(&self, timeout: Duration) -> bool {
        for n in self.peers() {
            let _ = self.dsm.send(n, APP_DONE, &[]);
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

    /// End the event loop of [`Cluster::serve`].
    pub fn quit(&self) {
        self.dsm.clear_app_handler();
        self.quit.store(true, Ordering::Relaxed);
    }

    /// Serve remote IPIs and forwarded I/O directly on the DSM engine thread
    /// (one wake-up less per hop than going through [`Cluster::serve`]'s thread).
    /// Undo with [`Cluster::quit`].
    pub fn fast_path(self: &Arc<Self>, router: Arc<InterruptRouter>, pio: Bus, mmio: Bus) {
        let me = Arc::downgrade(self);
        self.dsm
            .set_app_handler(Box::new(move |from, kind, tag, payload| {
                // APP_ADDR with APP_IPI: one sender's updates stay ahead of its IPIs.
                if !matches!(kind, APP_IPI | APP_IO | APP_ADDR | APP_EOI) {
                    return false;
                }
                match me.upgrade() {
                    Some(c) => {
                        c.on_message(&router, &pio, &mmio, from, kind, tag, payload);
                        true
                    }
                    None => false,
                }
            }));
    }

    /// The per-node event loop (own thread): remote IPIs, forwarded I/O, stop and
    /// done messages, peer failures.
    pub fn serve(&self, router: &InterruptRouter, pio: &Bus, mmio: &Bus) {
        while !self.quit.load(Ordering::Relaxed) {
            let Some(ev) = self.dsm.recv_app(Duration::from_millis(50)) else {
                continue;
            };
            match ev {
                AppEvent::Message {
                    from,
                    kind,
                    tag,
                    payload,
                } => self.on_message(router, pio, mmio, from, kind, tag, &payload),
                AppEvent::PeerDown { node, reason } => {
                    self.mark_done(node);
                    let msg = format!("{} vanished: {reason}", self.describe(node));
                    if self.stop.reason().is_none() {
                        eprintln!("dvmm: node {}: {msg}", self.me);
                    }
                    self.stop.request(StopReason::Error(msg));
                }
                AppEvent::Error(e) => {
                    self.stop.request(StopReason::Error(format!(
                        "{}: coherence engine failed: {e}",
                        self.describe(self.me)
                    )));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_message(
        &self,
        router: &InterruptRouter,
        pio: &Bus,
        mmio: &Bus,
        from: NodeId,
        kind: u64,
        tag: u64,
        payload: &[u8],
    ) {
        let bad = |what: String| {
            let msg = format!("{} sent {what}", self.describe(from));
            eprintln!("dvmm: node {}: {msg}", self.me);
            self.stop.request(StopReason::Error(msg));
        };
        match kind {
            APP_IPI => match InterruptMessage::from_bytes(payload) {
                Ok(m) => {
                    router.deliver_local(&m);
                }
                Err(e) => bad(format!("a malformed interrupt message: {e}")),
            },
            APP_IO => {
                let reply = match IoRequest::from_bytes(payload) {
                    Ok(req) if self.is_boot() => perform_io(pio, mmio, req, &self.stop),
                    Ok(_) => {
                        bad("an I/O request to a node that owns no device".into());
                        vec![0]
                    }
                    Err(e) => {
                        bad(format!("a malformed I/O request: {e}"));
                        vec![0]
                    }
                };
                if tag != 0 {
                    let _ = self.dsm.respond(from, APP_IO, tag, &reply);
                }
            }
            APP_ADDR => match decode_addressing(payload) {
                Ok((vcpu, a)) => {
                    if self.cpu_node.get(vcpu as usize) != Some(&from)
                        || !router.apply_remote_addressing(vcpu, a)
                    {
                        bad(format!(
                            "an addressing update for vCPU {vcpu}, which it does not run"
                        ));
                    }
                }
                Err(e) => bad(format!("a malformed addressing update: {e}")),
            },
            APP_EOI => match payload {
                [vector] if router.owns_ioapic() => router.remote_eoi(*vector),
                [_] => bad("an EOI to a node that owns no IOAPIC".into()),
                _ => bad(format!(
                    "a malformed EOI message of {} bytes",
                    payload.len()
                )),
            },
            APP_STOP => match decode_stop(&self.describe(from), payload) {
                Ok(r) => self.stop.request(r),
                Err(e) => bad(format!("a malformed stop message: {e}")),
            },
            APP_ERROR => self.stop.request(StopReason::Error(format!(
                "{}: {}",
                self.describe(from),
                String::from_utf8_lossy(payload)
            ))),
            APP_DONE => self.mark_done(from),
            k => bad(format!("an unknown message kind {k}")),
        }
    }
}

/// Perform a forwarded access on this node's buses; the response payload.
fn perform_io(pio: &Bus, mmio: &Bus, mut req: IoRequest, stop: &VmStop) -> Vec<u8> {
    let bus = if req.is_pio { pio } else { mmio };
    let mut out = vec![0u8, 0u8];
    if req.is_write {
        if let Some(Some(BusAction::Stop(s))) = bus.write(req.addr, &req.data) {
            stop.request(StopReason::DebugExit(s));
            out = vec![1, s];
        }
    } else {
        if !bus.read(req.addr, &mut req.data) {
            req.data.fill(0xff);
        }
        out.extend_from_slice(&req.data);
    }
    out
}

impl RemoteInterruptSink for Cluster {
    fn forward(&self, vcpu: u32, msg: &InterruptMessage) {
        let sent = match self.cpu_node.get(vcpu as usize) {
            Some(&n) if n != self.me => self.dsm.send(n, APP_IPI, &msg.to_bytes()).is_ok(),
            _ => false,
        };
        self.dsm.count_forwarded(u64::from(sent), 0);
    }

    fn publish_addressing(&self, vcpu: u32, a: &apic::ApicAddressing) {
        let p = encode_addressing(vcpu, a);
        for n in self.peers() {
            // A vanished peer stops the VM through PeerDown.
            let _ = self.dsm.send(n, APP_ADDR, &p);
        }
    }

    fn forward_eoi(&self, vector: u8) {
        if self.is_boot() {
            return;
        }
        if let Err(e) = self.dsm.send(self.boot, APP_EOI, &[vector]) {
            self.stop.request(StopReason::Error(format!(
                "EOI of vector {vector:#x} forwarded to {} failed: {e}",
                self.describe(self.boot)
            )));
        }
    }
}

impl Cluster {
    fn io(&self, req: IoRequest) -> Option<Vec<u8>> {
        self.dsm.count_forwarded(0, 1);
        match self
            .dsm
            .request(self.boot, APP_IO, &req.to_bytes(), IO_TIMEOUT)
        {
            Ok(r) if r.len() >= 2 => Some(r),
            Ok(_) => {
                self.stop.request(StopReason::Error(format!(
                    "{} answered a forwarded I/O access with a malformed reply",
                    self.describe(self.boot)
                )));
                None
            }
            Err(e) => {
                self.stop.request(StopReason::Error(format!(
                    "I/O access at {:#x} forwarded to {} failed: {e}",
                    req.addr,
                    self.describe(self.boot)
                )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_request_round_trip_and_rejects_garbage() {
        let r = IoRequest {
            is_pio: true,
            is_write: true,
            addr: 0x3f8,
            data: vec![b'x'],
        };
        assert_eq!(IoRequest::from_bytes(&r.to_bytes()).unwrap(), r);
        assert!(IoRequest::from_bytes(&[1, 2, 3]).is_err());
        let mut b = r.to_bytes();
        b[2] = 9;
        assert!(IoRequest::from_bytes(&b).is_err());
    }

    #[test]
    fn stop_round_trip() {
        for r in [
            StopReason::DebugExit(7),
            StopReason::Timeout,
            StopReason::Stopped,
        ] {
            assert_eq!(decode_stop("node 1", &encode_stop(&r)).unwrap(), r);
        }
        let e = decode_stop("node 1", &encode_stop(&StopReason::Error("boom".into()))).unwrap();
        assert_eq!(e, StopReason::Error("node 1: boom".into()));
        assert!(decode_stop("n", &[9, 0]).is_err());
        assert!(decode_stop("n", &[]).is_err());
    }

    #[test]
    fn addressing_update_round_trip_and_rejects_garbage() {
        let a = apic::ApicAddressing {
            id: 0x1_0013,
            ldr: 0x0001_0008,
            flat_model: false,
            x2apic: true,
            enabled: true,
            software_enabled: true,
        };
        let b = encode_addressing(7, &a);
        assert_eq!(decode_addressing(&b).unwrap(), (7, a));
        for flat in [false, true] {
            for x2 in [false, true] {
                for en in [false, true] {
                    for sw in [false, true] {
                        let a = apic::ApicAddressing {
                            id: 3,
                            ldr: 0x0800_0000,
                            flat_model: flat,
                            x2apic: x2,
                            enabled: en,
                            software_enabled: sw,
                        };
                        let d = decode_addressing(&encode_addressing(3, &a)).unwrap().1;
                        assert_eq!(d, a);
                    }
                }
            }
        }
        assert!(decode_addressing(&b[..12]).is_err());
        assert!(decode_addressing(&[]).is_err());
        let mut bad = b;
        bad[12] |= 0x80;
        assert!(decode_addressing(&bad).unwrap_err().contains("reserved"));
    }

    #[test]
    fn spec_validation_names_fields() {
        let numa = vec![
            NumaNode {
                cpus: vec![0],
                mem_start: 0,
                mem_size: 16 << 20,
            },
            NumaNode {
                cpus: vec![1],
                mem_start: 16 << 20,
                mem_size: 16 << 20,
            },
        ];
        let ok = ClusterSpec {
            node_index: 1,
            nodes: vec![
                ClusterNodeSpec {
                    addr: "127.0.0.1:7100".into(),
                },
                ClusterNodeSpec {
                    addr: "127.0.0.2:7100".into(),
                },
            ],
            security: None,
            session_hex: "00112233445566778899aabbccddeeff".into(),
            // RFC 7748 section 6.1: Alice's and Bob's keys; this is node 1 (Bob).
            node_pubkeys_hex: vec![
                "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a".into(),
                "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f".into(),
            ],
            private_key_hex: PrivateKeyHex(
                "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb".into(),
            ),
            boot_node: 0,
            foreign_budget_pages: None,
            hold_window_us: None,
            prefetch_max_pages: None,
            dsm_ranges: None,
            transport: None,
            connect_timeout_s: None,
        };
        ok.validate(Some(&numa)).unwrap();
        let e = |f: &dyn Fn(&mut ClusterSpec)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate(Some(&numa)).unwrap_err()
        };
        assert!(e(&|c| c.node_index = 2).contains("cluster.node_index"));
        assert!(e(&|c| c.boot_node = 5).contains("cluster.boot_node"));
        assert!(e(&|c| c.boot_node = 1).contains("BSP"));
        assert!(e(&|c| c.nodes[1].addr = "nowhere".into()).contains("cluster.nodes[1].addr"));
        assert!(e(&|c| c.nodes[1].addr = "127.0.0.1:7100".into()).contains("another node"));
        assert!(e(&|c| c.session_hex = "zz".into()).contains("cluster.session_hex"));
        assert!(e(&|c| c.session_hex = "0011".into()).contains("16 are required"));
        assert!(e(&|c| c.node_pubkeys_hex.pop().map(drop).unwrap_or(())).contains("one per node"));
        assert!(e(&|c| c.private_key_hex = PrivateKeyHex(String::new())).contains("missing"));
        // Alice's private key is not node 1's.
        assert!(e(&|c| c.private_key_hex = PrivateKeyHex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a".into()
        ))
        .contains("does not match"));
        assert!(e(&|c| c.security = Some("rot13".into())).contains("cluster.security"));
        assert!(e(&|c| c.transport = Some("pigeon".into())).contains("cluster.transport"));
        assert!(
            !format!("{ok:?}").contains("5dab087e"),
            "Debug must hide the private key"
        );
        let json = serde_json::to_string(&ok).unwrap();
        assert!(
            !json.contains("5dab087e"),
            "the private key is never serialized"
        );
        assert!(ok.validate(Some(&numa[..1])).unwrap_err().contains("numa"));
        assert!(ok.validate(None).unwrap_err().contains("numa"));
    }
}
