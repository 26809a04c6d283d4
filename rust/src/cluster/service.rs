//! The cluster link's service: what a node does with the other nodes'
//! application messages (remote IPIs, addressing updates, EOIs, forwarded I/O,
//! stop and done), on the DSM engine thread (fast path) or on the cluster
//! thread; and the interrupt interfaces between the link and a node's
//! interrupt router ([`crate::vm::routing`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::messages::{
    decode_addressing, decode_ipi, decode_stop, decode_vcpu_at, encode_addressing, encode_ipi,
    IoRequest, APP_ADDR, APP_DONE, APP_EOI, APP_ERROR, APP_IO, APP_IPI, APP_MIGRATE, APP_SNAP,
    APP_STOP, APP_VCPU_AT, APP_VCPU_STATE,
};
use super::{AppEvent, Cluster};
use crate::apic::{self, InterruptMessage};
use crate::bus::{Bus, BusAction};
use crate::dsm::protocol::NodeId;
use crate::sync::lock;
use crate::vcpu::{StopReason, VmFailure, VmStop};

/// Hook for a distributed VM: the link from a node's [`InterruptRouter`](crate::vm::InterruptRouter) to the
/// other nodes (implemented by [`Cluster`]).
///
/// The router resolves every interrupt message to its exact target vCPUs with
/// [`apic::route_targets`] over the addressing table of *all* vCPUs (see
/// [`InterruptRouter`](crate::vm::InterruptRouter)) and hands each remote target over as a message already
/// re-encoded for it ([`resolved_for`](crate::vm::resolved_for)); the receiving node hands it to
/// [`LocalInterrupts::deliver_local`].
pub trait RemoteInterruptSink: Send + Sync {
    /// Send `msg` (resolved: physical destination of exactly vCPU `vcpu`) to the
    /// node running vCPU `vcpu`; false (nothing sent) if that is this node.
    fn forward(&self, vcpu: u32, msg: &InterruptMessage) -> bool;
    /// The addressing of local vCPU `vcpu` changed to `a`: tell every other node.
    fn publish_addressing(&self, vcpu: u32, a: &apic::ApicAddressing);
    /// A local LAPIC EOI'd the level-triggered `vector`: forward it to the node
    /// that owns the IOAPIC (only called on the nodes that do not own it).
    fn forward_eoi(&self, vector: u8);
}

/// The inbound side: what the link needs from a node's interrupt router
/// (implemented by [`crate::vm::InterruptRouter`]) to apply the other nodes'
/// messages.
pub trait LocalInterrupts: Send + Sync {
    /// Deliver `msg` to the local APICs it is for; returns how many accepted it.
    fn deliver_local(&self, msg: &InterruptMessage) -> usize;
    /// Deliver `msg`, resolved for exactly vCPU `vcpu`, to it: here if this
    /// node runs it, else on to the node that does. False for a vCPU the VM
    /// does not have.
    fn deliver_to(&self, vcpu: u32, msg: &InterruptMessage) -> bool;
    /// Apply an addressing update of remote vCPU `vcpu` (from `APP_ADDR`); false
    /// if `vcpu` is not a vCPU of the VM or runs on this node.
    fn apply_remote_addressing(&self, vcpu: u32, a: apic::ApicAddressing) -> bool;
    /// An EOI for `vector` forwarded from another node (this node owns the IOAPIC).
    fn remote_eoi(&self, vector: u8);
    /// Does this node own the IOAPIC?
    fn owns_ioapic(&self) -> bool;
}

impl Cluster {
    /// Serve remote IPIs and forwarded I/O directly on the DSM engine thread
    /// (one wake-up less per hop than going through [`Cluster::serve`]'s thread).
    /// Undo with [`Cluster::quit`].
    pub fn fast_path(self: &Arc<Self>, router: Arc<dyn LocalInterrupts>, pio: Bus, mmio: Bus) {
        let me = Arc::downgrade(self);
        self.link
            .set_handler(Box::new(move |from, kind, tag, payload| {
                // APP_ADDR and APP_VCPU_AT with APP_IPI: one sender's updates
                // stay ahead of its IPIs.
                if matches!(kind, APP_MIGRATE | APP_VCPU_STATE) {
                    return me
                        .upgrade()
                        .is_some_and(|c| c.to_mover(from, kind, tag, payload));
                }
                if !matches!(kind, APP_IPI | APP_IO | APP_ADDR | APP_EOI | APP_VCPU_AT) {
                    return false;
                }
                match me.upgrade() {
                    Some(c) => {
                        c.on_message(&*router, &pio, &mmio, from, kind, tag, payload);
                        true
                    }
                    None => false,
                }
            }));
    }

    /// The per-node event loop (own thread): remote IPIs, forwarded I/O, stop and
    /// done messages, peer failures.
    pub fn serve(&self, router: &dyn LocalInterrupts, pio: &Bus, mmio: &Bus) {
        while !self.quit.load(Ordering::Relaxed) {
            let Some(ev) = self.link.recv(Duration::from_millis(50)) else {
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
                    self.stop.request(StopReason::Error(VmFailure::Remote(msg)));
                }
                AppEvent::Error(e) => {
                    self.stop
                        .request(StopReason::Error(VmFailure::Remote(format!(
                            "{}: coherence engine failed: {e}",
                            self.describe(self.me)
                        ))));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_message(
        &self,
        router: &dyn LocalInterrupts,
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
            self.stop.request(StopReason::Error(VmFailure::Remote(msg)));
        };
        match kind {
            APP_IPI => match decode_ipi(payload) {
                Ok((vcpu, m)) => {
                    if !router.deliver_to(vcpu, &m) {
                        bad(format!(
                            "an interrupt for vCPU {vcpu}, which the VM does not have"
                        ));
                    }
                }
                Err(e) => bad(format!("a malformed interrupt message: {e}")),
            },
            APP_VCPU_AT => match decode_vcpu_at(payload) {
                Ok((vcpu, node, moves)) => {
                    if !self.place(vcpu, node, moves) {
                        bad(format!(
                            "vCPU {vcpu} on node {node}, which the VM does not have"
                        ));
                    }
                }
                Err(e) => bad(format!("a malformed vCPU placement: {e}")),
            },
            APP_VCPU_STATE | APP_MIGRATE => {
                let mover = lock(&self.mover).clone();
                match mover {
                    Some(m) => self.on_mover_job(&*m, from, kind, tag, payload),
                    None if kind == APP_MIGRATE && tag != 0 => {
                        let reply = br#"{"error":"this node takes no part in migrations yet"}"#;
                        let _ = self.link.respond(&self.dsm, from, APP_MIGRATE, tag, reply);
                    }
                    None => bad("a vCPU state, but this node takes no migrations".into()),
                }
            }
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
                    let _ = self.link.respond(&self.dsm, from, APP_IO, tag, &reply);
                }
            }
            APP_ADDR => match decode_addressing(payload) {
                Ok((vcpu, a)) => {
                    if self.node_of(vcpu) != Some(from) || !router.apply_remote_addressing(vcpu, a)
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
            APP_ERROR => self
                .stop
                .request(StopReason::Error(VmFailure::Remote(format!(
                    "{}: {}",
                    self.describe(from),
                    String::from_utf8_lossy(payload)
                )))),
            APP_DONE => self.mark_done(from),
            APP_SNAP if from == self.boot && tag != 0 => {
                let agent = lock(&self.agent).clone();
                let reply = match agent {
                    Some(a) => a.handle(payload),
                    None => br#"{"error":"this node takes no part in snapshots yet"}"#.to_vec(),
                };
                let _ = self.link.respond(&self.dsm, from, APP_SNAP, tag, &reply);
            }
            APP_SNAP => bad("a snapshot request, but it is not the boot node".into()),
            k => bad(format!("an unknown message kind {k}")),
        }
    }
}

impl Cluster {
    /// A migration message (the mover thread, or the cluster thread without one).
    pub(super) fn on_mover_job(
        &self,
        agent: &dyn super::VcpuAgent,
        from: NodeId,
        kind: u64,
        tag: u64,
        payload: &[u8],
    ) {
        if kind == APP_VCPU_STATE {
            if let Err(e) = agent.state_chunk(from, payload) {
                let msg = format!("{} sent a malformed vCPU state: {e}", self.describe(from));
                eprintln!("dvmm: node {}: {msg}", self.me);
                self.stop.request(StopReason::Error(VmFailure::Remote(msg)));
            }
        } else if tag != 0 {
            let reply = agent.migrate(from, payload);
            let _ = self.link.respond(&self.dsm, from, APP_MIGRATE, tag, &reply);
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
    fn forward(&self, vcpu: u32, msg: &InterruptMessage) -> bool {
        match self.node_of(vcpu) {
            Some(n) if n != self.me => {
                // A vanished peer stops the VM through PeerDown.
                let sent = self.send(n, APP_IPI, &encode_ipi(vcpu, msg)).is_ok();
                self.dsm.count_forwarded(u64::from(sent), 0);
                true
            }
            _ => false,
        }
    }

    fn publish_addressing(&self, vcpu: u32, a: &apic::ApicAddressing) {
        let p = encode_addressing(vcpu, a);
        for n in self.peers() {
            // A vanished peer stops the VM through PeerDown.
            let _ = self.send(n, APP_ADDR, &p);
        }
    }

    fn forward_eoi(&self, vector: u8) {
        if self.is_boot() {
            return;
        }
        if let Err(e) = self.send(self.boot, APP_EOI, &[vector]) {
            self.stop
                .request(StopReason::Error(VmFailure::Remote(format!(
                    "EOI of vector {vector:#x} forwarded to {} failed: {e}",
                    self.describe(self.boot)
                ))));
        }
    }
}
