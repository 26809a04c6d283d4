//! Live vCPU migration between the nodes of a distributed VM (issue 15).
//!
//! **Replicas.** Every node builds every vCPU of the VM (KVM vCPU fd, LAPIC,
//! thread); a vCPU is *resident* on exactly one node and parked everywhere
//! else ([`VcpuShared::is_resident`]). Every node keeps where each vCPU runs
//! ([`Cluster::node_of`]), numbered by how many times it moved, so a late
//! notice never overrides a newer one.
//!
//! **Moving vCPU v from node A to node B** (A's mover thread, asked by any
//! node with `APP_MIGRATE {op: out}`):
//!
//! 1. A pauses v and waits until it is out of the guest.
//! 2. A tells B `APP_VCPU_AT(v, B)` first: B now keeps what arrives for v.
//! 3. A records v at B and makes its replica non-resident, under v's LAPIC
//!    lock: an interrupt accepted before is in the state A captures next;
//!    one after is posted to the parked replica, whose thread hands it on
//!    to B. B's replica keeps such messages (v runs "here" for B) until v
//!    starts, then takes them.
//! 4. A captures v's state on v's thread (registers, XSAVE, MSRs, events,
//!    LAPIC: `vcpu::snapshot`) and sends it in `APP_VCPU_STATE` pieces,
//!    then `APP_MIGRATE {op: in}`: B restores it on its replica's thread,
//!    makes it resident, starts it and tells every other node
//!    `APP_VCPU_AT(v, B)`. Until they hear it, they send v's interrupts to
//!    A, which forwards them.
//!
//! `APP_VCPU_AT` and `APP_IPI` are both applied on the engine thread in lane
//! order, so a message A forwards after step 2 finds B ready for it. If B
//! fails, A takes v back (resident again, a newer move number) and resumes
//! it where it was.
//!
//! Guest memory needs nothing: the coherence protocol brings v's pages to B
//! as B's vCPU touches them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::messages::{
    encode_chunk, encode_vcpu_at, MessageError, APP_MIGRATE, APP_VCPU_AT, APP_VCPU_STATE,
};
use crate::cluster::{Cluster, LinkError, VcpuAgent};
use crate::dsm::protocol::NodeId;
use crate::dsm::wire::MAX_APP_PAYLOAD;
use crate::sync::lock;
use crate::vcpu::snapshot::VcpuSnapshot;
use crate::vcpu::{VcpuError, VcpuShared, VcpuState};

/// How long a vCPU may take to pause, hand over or take its state.
const VCPU_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the whole move may take, as the asking node sees it.
const MOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest vCPU state a node accepts (a few tens of KiB in practice).
const MAX_STATE: usize = 1 << 20;

/// One migration of a run (the spec's `migrate` list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationStep {
    /// Seconds after the start of the run.
    pub after_s: f64,
    pub vcpu: u32,
    /// The node to move it to.
    pub node: usize,
}

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("the VM has no vCPU {0}")]
    NoVcpu(u32),
    #[error("the VM has no node {0}")]
    NoNode(NodeId),
    #[error("vCPU {vcpu} runs on node {node} already")]
    SameNode { vcpu: u32, node: NodeId },
    #[error("vCPU {vcpu} does not run on node {node}")]
    NotHere { vcpu: u32, node: NodeId },
    #[error("vCPU {vcpu} already runs on node {node}")]
    AlreadyHere { vcpu: u32, node: NodeId },
    #[error("vCPU {0} did not pause within {VCPU_TIMEOUT:?}")]
    PauseTimeout(u32),
    #[error("vCPU {0} has stopped")]
    Stopped(u32),
    #[error("vCPU {0} did not hand over its state within {VCPU_TIMEOUT:?}")]
    CaptureTimeout(u32),
    #[error("vCPU {0} did not take its state within {VCPU_TIMEOUT:?}")]
    RestoreTimeout(u32),
    #[error("vCPU {vcpu}: {source}")]
    Vcpu { vcpu: u32, source: VcpuError },
    #[error("vCPU {vcpu}: {what}")]
    State { vcpu: u32, what: String },
    #[error("{node}: {source}")]
    Link { node: String, source: LinkError },
    #[error("{node}: {what}")]
    Peer { node: String, what: String },
    #[error("{node} did not answer whether it runs vCPU {vcpu} now ({source}): the VM stops, it might run twice")]
    Unanswered {
        node: String,
        vcpu: u32,
        source: LinkError,
    },
}

/// A migration request on the cluster link.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    /// To the node running `vcpu`: move it to `to`.
    Out { vcpu: u32, to: NodeId },
    /// To the target: take `vcpu`, whose state (`bytes` long) came ahead.
    In { vcpu: u32, moves: u32, bytes: usize },
}

/// Its response.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Response {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    report: Option<MoveReport>,
}

/// Figures of one move (reported in the run's result).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveReport {
    pub vcpu: u32,
    pub from: NodeId,
    pub to: NodeId,
    /// From the pause request on the old node to the start on the new one.
    pub stopped_ms: f64,
    /// Of that: getting the vCPU out of the guest; capturing its state;
    /// sending it and the new node's answer (its restore and start included);
    /// the new node's own restore and start.
    pub pause_ms: f64,
    pub capture_ms: f64,
    pub transfer_ms: f64,
    pub restore_ms: f64,
    /// The state's size on the wire.
    pub state_bytes: usize,
}

/// vCPU states arriving in `APP_VCPU_STATE` pieces, by vCPU (pure: unit
/// tested). A piece out of order, from another sender or beyond the stated
/// size drops what had arrived for that vCPU.
#[derive(Default)]
pub struct StateAssembly {
    parts: HashMap<u32, Incoming>,
}

struct Incoming {
    from: NodeId,
    total: usize,
    buf: Vec<u8>,
}

impl StateAssembly {
    /// Add a piece (an `APP_VCPU_STATE` payload) from node `from`.
    pub fn add(&mut self, from: NodeId, payload: &[u8]) -> Result<(), MessageError> {
        let (vcpu, total, offset, bytes) = crate::cluster::messages::decode_chunk(payload)?;
        let (total, offset) = (total as usize, offset as usize);
        if offset == 0 {
            if total > MAX_STATE {
                self.parts.remove(&vcpu);
                return Err(MessageError::StateTooLarge {
                    vcpu,
                    total,
                    max: MAX_STATE,
                });
            }
            self.parts.insert(
                vcpu,
                Incoming {
                    from,
                    total,
                    buf: Vec::with_capacity(total),
                },
            );
        }
        match self.parts.get_mut(&vcpu) {
            Some(i)
                if i.from == from
                    && i.total == total
                    && i.buf.len() == offset
                    && offset + bytes.len() <= total =>
            {
                i.buf.extend_from_slice(bytes);
                Ok(())
            }
            _ => {
                self.parts.remove(&vcpu);
                Err(MessageError::ChunkOrder { vcpu, offset })
            }
        }
    }

    /// The whole state of `vcpu` sent by `from`, if all `bytes` of it came.
    pub fn take(&mut self, vcpu: u32, from: NodeId, bytes: usize) -> Result<Vec<u8>, String> {
        match self.parts.remove(&vcpu) {
            Some(i) if i.from == from && i.buf.len() == bytes && i.total == bytes => Ok(i.buf),
            Some(i) => Err(format!(
                "{} of {} state bytes arrived, the request says {bytes}",
                i.buf.len(),
                i.total
            )),
            None => Err("no state arrived".into()),
        }
    }
}

/// This node's part in migrations (the cluster's [`VcpuAgent`]).
pub struct VcpuMover {
    /// Every vCPU of the VM, by index (resident here or not).
    pub vcpus: Vec<Arc<VcpuShared>>,
    pub cluster: Arc<Cluster>,
    incoming: std::sync::Mutex<StateAssembly>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl VcpuMover {
    pub fn new(vcpus: Vec<Arc<VcpuShared>>, cluster: Arc<Cluster>) -> Self {
        VcpuMover {
            vcpus,
            cluster,
            incoming: std::sync::Mutex::new(StateAssembly::default()),
        }
    }

    fn vcpu(&self, vcpu: u32) -> Result<&Arc<VcpuShared>, MigrateError> {
        self.vcpus
            .iter()
            .find(|v| v.index == vcpu)
            .ok_or(MigrateError::NoVcpu(vcpu))
    }

    fn link_err(&self, node: NodeId) -> impl FnOnce(LinkError) -> MigrateError + '_ {
        move |source| MigrateError::Link {
            node: self.cluster.describe(node),
            source,
        }
    }

    /// Move vCPU `vcpu` to node `to`, wherever it runs now (any node may ask).
    pub fn migrate(&self, vcpu: u32, to: NodeId) -> Result<MoveReport, MigrateError> {
        let at = self
            .cluster
            .node_of(vcpu)
            .ok_or(MigrateError::NoVcpu(vcpu))?;
        if at == to {
            return Err(MigrateError::SameNode { vcpu, node: to });
        }
        let raw = serde_json::to_vec(&Request::Out { vcpu, to }).unwrap_or_default();
        let resp = self
            .cluster
            .request(at, APP_MIGRATE, &raw, MOVE_TIMEOUT)
            .map_err(self.link_err(at))?;
        self.report_of(at, &resp)
    }

    /// The report in `node`'s answer to a migration request, or its error.
    fn report_of(&self, node: NodeId, resp: &[u8]) -> Result<MoveReport, MigrateError> {
        let peer = |what: String| MigrateError::Peer {
            node: self.cluster.describe(node),
            what,
        };
        let r: Response = serde_json::from_slice(resp)
            .map_err(|e| peer(format!("malformed migration response: {e}")))?;
        match (r.error, r.report) {
            (Some(e), _) => Err(peer(e)),
            (None, Some(rep)) => Ok(rep),
            (None, None) => Err(peer("a migration response without a report".into())),
        }
    }

    /// Step 1-4 of the module docs, on the node running `vcpu`.
    fn move_out(&self, vcpu: u32, to: NodeId) -> Result<MoveReport, MigrateError> {
        let me = self.cluster.me;
        let v = self.vcpu(vcpu)?;
        if usize::from(to) >= self.cluster.addrs.len() {
            return Err(MigrateError::NoNode(to));
        }
        if to == me {
            return Err(MigrateError::SameNode { vcpu, node: me });
        }
        if !v.is_resident() || self.cluster.node_of(vcpu) != Some(me) {
            return Err(MigrateError::NotHere { vcpu, node: me });
        }
        let t0 = Instant::now();
        v.pause();
        let end = t0 + VCPU_TIMEOUT;
        loop {
            match v.state() {
                VcpuState::Paused | VcpuState::Created => break,
                VcpuState::Stopped => return Err(MigrateError::Stopped(vcpu)),
                _ if Instant::now() >= end => {
                    v.resume();
                    return Err(MigrateError::PauseTimeout(vcpu));
                }
                // Sleep, do not spin: on a busy host the vCPU thread needs a
                // core to leave the guest.
                _ => std::thread::sleep(Duration::from_micros(10)),
            }
        }
        let paused = t0.elapsed();
        let moves = self.cluster.moves_of(vcpu) + 1;
        if let Err(e) = self
            .cluster
            .send_to(to, APP_VCPU_AT, &encode_vcpu_at(vcpu, to, moves))
        {
            v.resume();
            return Err(self.link_err(to)(e));
        }
        {
            let l = lock(&v.lapic);
            self.cluster.place(vcpu, to, moves);
            v.set_resident(false, &l);
        }
        let r = self.hand_over(v, to, moves);
        let (capture, transfer, state_bytes, restore_ms) = match r {
            Ok(x) => x,
            Err(e @ MigrateError::Unanswered { .. }) => {
                // B may have started it: taking it back could run it twice.
                self.cluster.stop_vm(&e.to_string());
                return Err(e);
            }
            Err(e) => {
                self.take_back(v, moves + 1);
                return Err(e);
            }
        };
        Ok(MoveReport {
            vcpu,
            from: me,
            to,
            stopped_ms: ms(t0.elapsed()),
            pause_ms: ms(paused),
            capture_ms: ms(capture),
            transfer_ms: ms(transfer),
            restore_ms,
            state_bytes,
        })
    }

    /// Capture the (parked) vCPU's state and have `to` take it; (capture
    /// time, transfer time, state bytes, the target's restore time in ms).
    fn hand_over(
        &self,
        v: &VcpuShared,
        to: NodeId,
        moves: u32,
    ) -> Result<(Duration, Duration, usize, f64), MigrateError> {
        let vcpu = v.index;
        let t0 = Instant::now();
        v.request_capture();
        let end = t0 + VCPU_TIMEOUT;
        let snap = loop {
            if let Some(r) = v.take_capture() {
                break r.map_err(|source| MigrateError::Vcpu { vcpu, source })?;
            }
            if Instant::now() >= end {
                return Err(MigrateError::CaptureTimeout(vcpu));
            }
            std::thread::sleep(Duration::from_micros(20));
        };
        let capture = t0.elapsed();
        let t1 = Instant::now();
        let bytes = serde_json::to_vec(&snap).map_err(|e| MigrateError::State {
            vcpu,
            what: e.to_string(),
        })?;
        let piece = MAX_APP_PAYLOAD - 12;
        for (k, c) in bytes.chunks(piece).enumerate() {
            let p = encode_chunk(vcpu, bytes.len() as u32, (k * piece) as u32, c);
            self.cluster
                .send_to(to, APP_VCPU_STATE, &p)
                .map_err(self.link_err(to))?;
        }
        let req = Request::In {
            vcpu,
            moves,
            bytes: bytes.len(),
        };
        let raw = serde_json::to_vec(&req).unwrap_or_default();
        let resp = self
            .cluster
            .request(to, APP_MIGRATE, &raw, MOVE_TIMEOUT)
            .map_err(|source| MigrateError::Unanswered {
                node: self.cluster.describe(to),
                vcpu,
                source,
            })?;
        let restore_ms = self.report_of(to, &resp)?.restore_ms;
        Ok((capture, t1.elapsed(), bytes.len(), restore_ms))
    }

    /// The target failed: run `v` here again (it was never changed here),
    /// telling every other node with a newer move number.
    fn take_back(&self, v: &VcpuShared, moves: u32) {
        let me = self.cluster.me;
        {
            let l = lock(&v.lapic);
            self.cluster.place(v.index, me, moves);
            v.set_resident(true, &l);
        }
        let p = encode_vcpu_at(v.index, me, moves);
        for n in self.cluster.peer_ids() {
            let _ = self.cluster.send_to(n, APP_VCPU_AT, &p);
        }
        v.resume();
    }

    /// The target's side: take `vcpu`'s state (arrived ahead from `from`) and
    /// start it here; the restore time.
    fn move_in(
        &self,
        from: NodeId,
        vcpu: u32,
        moves: u32,
        bytes: usize,
    ) -> Result<MoveReport, MigrateError> {
        let me = self.cluster.me;
        let v = self.vcpu(vcpu)?;
        let state_err = |what: String| MigrateError::State { vcpu, what };
        let buf = lock(&self.incoming)
            .take(vcpu, from, bytes)
            .map_err(state_err)?;
        let snap: VcpuSnapshot =
            serde_json::from_slice(&buf).map_err(|e| state_err(e.to_string()))?;
        if snap.index != vcpu {
            return Err(state_err(format!("the state is vCPU {}'s", snap.index)));
        }
        if v.is_resident() {
            return Err(MigrateError::AlreadyHere { vcpu, node: me });
        }
        let t0 = Instant::now();
        self.cluster.place(vcpu, me, moves);
        v.request_restore(Box::new(snap));
        let end = t0 + VCPU_TIMEOUT;
        loop {
            if let Some(r) = v.take_restored() {
                r.map_err(|source| MigrateError::Vcpu { vcpu, source })?;
                break;
            }
            if Instant::now() >= end {
                return Err(MigrateError::RestoreTimeout(vcpu));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        {
            let l = lock(&v.lapic);
            v.set_resident(true, &l);
        }
        v.start();
        let restore_ms = ms(t0.elapsed());
        // The others send its interrupts here from now on (the old node
        // forwards what they sent before they heard).
        let p = encode_vcpu_at(vcpu, me, moves);
        for n in self.cluster.peer_ids().into_iter().filter(|&n| n != from) {
            let _ = self.cluster.send_to(n, APP_VCPU_AT, &p);
        }
        Ok(MoveReport {
            vcpu,
            from,
            to: me,
            restore_ms,
            state_bytes: bytes,
            ..Default::default()
        })
    }
}

impl VcpuAgent for VcpuMover {
    fn migrate(&self, from: NodeId, request: &[u8]) -> Vec<u8> {
        let r = match serde_json::from_slice::<Request>(request) {
            Err(e) => Err(format!("malformed migration request: {e}")),
            Ok(Request::Out { vcpu, to }) => self.move_out(vcpu, to).map_err(|e| e.to_string()),
            Ok(Request::In { vcpu, moves, bytes }) => self
                .move_in(from, vcpu, moves, bytes)
                .map_err(|e| e.to_string()),
        };
        let resp = match r {
            Ok(report) => Response {
                error: None,
                report: Some(report),
            },
            Err(e) => Response {
                error: Some(e),
                report: None,
            },
        };
        serde_json::to_vec(&resp).unwrap_or_default()
    }

    fn state_chunk(&self, from: NodeId, payload: &[u8]) -> Result<(), MessageError> {
        lock(&self.incoming).add(from, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(vcpu: u32, state: &[u8], piece: usize) -> Vec<Vec<u8>> {
        state
            .chunks(piece)
            .enumerate()
            .map(|(k, c)| encode_chunk(vcpu, state.len() as u32, (k * piece) as u32, c))
            .collect()
    }

    #[test]
    fn a_state_in_pieces_is_put_together() {
        let state: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut a = StateAssembly::default();
        for p in pieces(3, &state, 4084) {
            a.add(1, &p).unwrap();
        }
        assert_eq!(a.take(3, 1, state.len()).unwrap(), state);
        // Taken: gone.
        assert_eq!(a.take(3, 1, state.len()).unwrap_err(), "no state arrived");
    }

    #[test]
    fn incomplete_wrong_sender_or_size_is_refused() {
        let state = vec![5u8; 9000];
        let p = pieces(1, &state, 4084);
        let mut a = StateAssembly::default();
        a.add(0, &p[0]).unwrap();
        a.add(0, &p[1]).unwrap();
        assert!(a.take(1, 0, 9000).unwrap_err().contains("8168 of 9000"));
        for x in &p {
            a.add(0, x).unwrap();
        }
        assert!(a.take(1, 2, 9000).is_err(), "from another node");
        for x in &p {
            a.add(0, x).unwrap();
        }
        assert!(a.take(1, 0, 8999).is_err(), "another size");
    }

    #[test]
    fn pieces_out_of_order_or_oversized_drop_the_state() {
        let state = vec![1u8; 9000];
        let p = pieces(2, &state, 4084);
        let mut a = StateAssembly::default();
        a.add(0, &p[0]).unwrap();
        assert_eq!(
            a.add(0, &p[2]),
            Err(MessageError::ChunkOrder {
                vcpu: 2,
                offset: 8168
            })
        );
        assert!(a.take(2, 0, 9000).is_err());
        // A piece from another node in the middle of a state.
        a.add(0, &p[0]).unwrap();
        assert!(a.add(1, &p[1]).is_err());
        // Larger than a node accepts.
        let big = encode_chunk(2, (MAX_STATE + 1) as u32, 0, &[0; 16]);
        assert!(matches!(
            a.add(0, &big),
            Err(MessageError::StateTooLarge { vcpu: 2, .. })
        ));
        // Past the stated size.
        let over = encode_chunk(2, 10, 0, &[0; 11]);
        assert!(a.add(0, &over).is_err());
        assert_eq!(a.add(0, &[1, 2, 3]), Err(MessageError::ChunkShort(3)));
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let r = Request::Out { vcpu: 1, to: 2 };
        let raw = serde_json::to_vec(&r).unwrap();
        assert_eq!(
            std::str::from_utf8(&raw).unwrap(),
            r#"{"op":"out","vcpu":1,"to":2}"#
        );
        assert!(serde_json::from_slice::<Request>(br#"{"op":"out","vcpu":1}"#).is_err());
        assert!(
            serde_json::from_slice::<Request>(br#"{"op":"sideways","vcpu":1,"to":0}"#).is_err()
        );
        let step: MigrationStep =
            serde_json::from_str(r#"{"after_s":0.5,"vcpu":1,"node":0}"#).unwrap();
        assert_eq!(step.node, 0);
        assert!(serde_json::from_str::<MigrationStep>(r#"{"after_s":0.5,"vcpu":1}"#).is_err());
    }
}
