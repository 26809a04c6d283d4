//! Running a built VM: start the vCPU threads (and, in a distributed VM, the
//! cluster service), wait for the stop, join everything and report the
//! [`VmResult`]; [`VmControl`] pauses, resumes and stops it from other threads.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::checkpoint::{Coordinator, NodeSaver, SnapshotReport};
use super::control::{ControlOps, ControlSocket};
use super::migrate::{MoveReport, VcpuMover};
use super::snapshot::{DeviceState, Manifest};
use super::{Vm, VmError, VmSpec};
use crate::sync::lock;
use crate::vcpu::{
    StopReason, VcpuDump, VcpuShared, VcpuStats, VmClock, VmFailure, VmStop, EXIT_KINDS,
};

/// Statistics of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmStats {
    pub exits: std::collections::BTreeMap<String, u64>,
    pub exits_total: u64,
    pub pio_reads: u64,
    pub pio_writes: u64,
    pub mmio_reads: u64,
    pub mmio_writes: u64,
    pub lapic_accesses: u64,
    pub unknown_pio: u64,
    pub unknown_mmio: u64,
    pub msr_gp: u64,
    pub interrupts_injected: u64,
    pub nmis_injected: u64,
    pub ipis_sent: u64,
    pub ipis_delivered: u64,
    pub irqs_raised: u64,
    /// Halts ended by adaptive halt polling / halts that slept.
    pub halt_poll_hits: u64,
    pub halt_sleeps: u64,
    /// Emulation failures the VMM finished itself (`vcpu::complete`).
    pub insns_completed: u64,
    /// LAPIC timer expiries; the worst deadline-to-injection delay (µs); timer
    /// interrupts injected more than 10 ms late (`vcpu::TIMER_LATE_NS`).
    pub timer_fires: u64,
    pub timer_late_max_us: u64,
    pub timer_late: u64,
    /// Interrupt injections put off while KVM still held the previous vector.
    pub injections_deferred: u64,
    pub setup_ms: f64,
    pub run_ms: f64,
    pub per_vcpu_exits: Vec<u64>,
    /// The vCPUs this node ran (all of them for a single-node VM).
    pub local_vcpus: Vec<u32>,
    /// Coherence counters of this node (distributed VM only).
    pub dsm: Option<crate::dsm::StatsSnapshot>,
    /// Snapshots taken (the boot node's figures).
    pub snapshots: Vec<SnapshotReport>,
    /// vCPU migrations made (the boot node's figures).
    pub migrations: Vec<super::migrate::MoveReport>,
}

/// The result of a run (docs/interfaces.md).
#[derive(Debug, Clone, Serialize)]
pub struct VmResult {
    /// The node this result is from (0 for a single-node VM).
    pub node: usize,
    pub reason: String,
    pub status: Option<u8>,
    pub error: Option<String>,
    pub vcpu_dump: Option<VcpuDump>,
    pub stats: VmStats,
}

impl VmResult {
    fn from_stop(r: StopReason, stats: VmStats) -> Self {
        let (reason, status, error, vcpu_dump) = match r {
            StopReason::DebugExit(s) => ("debug_exit", Some(s), None, None),
            StopReason::Shutdown(why) => ("shutdown", None, Some(why), None),
            StopReason::Crash { error, dump } => ("crash", None, Some(error), dump.map(|d| *d)),
            StopReason::Error(e) => ("error", None, Some(e.to_string()), None),
            StopReason::Timeout => ("timeout", None, Some("timeout_s passed".into()), None),
            StopReason::Stopped => ("stopped", None, None, None),
            StopReason::Snapshotted(dir) => ("snapshot", None, Some(dir), None),
        };
        VmResult {
            node: 0,
            reason: reason.into(),
            status,
            error,
            vcpu_dump,
            stats,
        }
    }
}

/// Pause / resume / stop a running VM from another thread.
#[derive(Clone)]
pub struct VmControl {
    vcpus: Vec<Arc<VcpuShared>>,
    stop: Arc<VmStop>,
    clock: VmClock,
}

impl VmControl {
    /// Ask every vCPU to pause (returns at once; see [`VmControl::states`]).
    /// The VM clock stops now, so the APIC timers do not run while paused.
    pub fn pause(&self) {
        self.clock.pause();
        self.vcpus.iter().for_each(|v| v.pause());
    }
    /// Resume every paused vCPU, and the VM clock with them.
    pub fn resume(&self) {
        let paused_ns = self.clock.resume();
        if paused_ns > 0 {
            // The guest TSC ran on meanwhile: keep the LAPICs' TSC model on it.
            for v in &self.vcpus {
                lock(&v.lapic).clock_resumed(paused_ns);
            }
        }
        self.vcpus.iter().for_each(|v| v.resume());
    }
    /// Stop the VM: `run` returns with reason `stopped`.
    pub fn stop(&self) {
        self.stop.request(StopReason::Stopped);
    }
    /// The VM clock now (ns).
    pub fn clock_ns(&self) -> u64 {
        self.clock.now_ns()
    }
    /// Current state of each vCPU.
    pub fn states(&self) -> Vec<crate::vcpu::VcpuState> {
        self.vcpus.iter().map(|v| v.state()).collect()
    }
    /// Wait until every vCPU is in one of `states` (or `timeout` passes); true on success.
    pub fn wait_states(&self, states: &[crate::vcpu::VcpuState], timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.states().iter().all(|s| states.contains(s)) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Vm {
    /// A handle to stop the VM from another thread: `request(StopReason::Stopped)`.
    pub fn stopper(&self) -> Arc<VmStop> {
        self.stop.clone()
    }

    /// A handle to pause, resume, stop and observe the VM from other threads.
    pub fn control(&self) -> VmControl {
        VmControl {
            vcpus: self.shared.clone(),
            stop: self.stop.clone(),
            clock: self.clock.clone(),
        }
    }

    /// Run until the VM stops (debug exit, crash, shutdown, timeout, `stop`), join every
    /// vCPU thread and return the result.
    pub fn run(mut self) -> VmResult {
        let t0 = Instant::now();
        // Snapshot requests are answered by the service thread: the agent is in
        // place before it starts (a restore's `ready` may come at once).
        let saver = Arc::new(self.node_saver());
        let mover = self
            .cluster
            .as_ref()
            .map(|c| Arc::new(VcpuMover::new(self.shared.clone(), c.clone())));
        if let Some(c) = &self.cluster {
            c.set_agent(Some(saver.clone() as Arc<dyn crate::cluster::SnapshotAgent>));
            c.set_mover(
                mover
                    .clone()
                    .map(|m| m as Arc<dyn crate::cluster::VcpuAgent>),
            );
        }
        // Distributed VM: the thread serving the other nodes (IPIs, I/O, stop).
        if let Some(c) = &self.cluster {
            c.fast_path(self.router.clone(), self.pio.clone(), self.mmio.clone());
        }
        let server = self.cluster.clone().map(|c| {
            let (router, pio, mmio) = (self.router.clone(), self.pio.clone(), self.mmio.clone());
            std::thread::Builder::new()
                .name("dvmm-cluster".into())
                .spawn(move || c.serve(&*router, &pio, &mmio))
        });
        let server = match server {
            Some(Ok(h)) => Some(h),
            Some(Err(e)) => {
                self.stop.request(StopReason::Error(VmFailure::Spawn {
                    what: "cluster",
                    source: Arc::new(e),
                }));
                None
            }
            None => None,
        };
        let mut failed = None;
        let input = match (self.console_input.take(), &self.serial) {
            (Some(i), Some(s)) => match i.spawn(s.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    failed = Some(StopReason::Error(VmFailure::Spawn {
                        what: "console input",
                        source: Arc::new(e),
                    }));
                    None
                }
            },
            _ => None,
        };
        let mut handles = Vec::with_capacity(self.vcpus.len());
        for v in self.vcpus.drain(..) {
            if failed.is_some() {
                break;
            }
            match v.spawn() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    failed = Some(StopReason::Error(e.into()));
                    break;
                }
            }
        }
        let mut snapshots = Vec::new();
        let mut migrations = Vec::new();
        let reason = match failed {
            Some(r) => r,
            None => self.start_and_wait(&saver, mover.as_deref(), &mut snapshots, &mut migrations),
        };
        if let Some(c) = &self.cluster {
            c.set_agent(None);
            c.set_mover(None);
        }
        if let Some(c) = &self.cluster {
            c.broadcast_stop(&reason);
        }
        for s in &self.shared {
            s.stop();
        }
        if let Some(c) = &self.cluster {
            // A vCPU blocked on a page held by a node that vanished never comes back
            // by itself: after a grace period give up coherence so it can leave.
            let end = Instant::now() + Duration::from_secs(3);
            while handles.iter().any(|h| !h.is_finished()) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(2));
            }
            if handles.iter().any(|h| !h.is_finished()) {
                eprintln!(
                    "dvmm: {}: vCPUs still blocked on guest memory 3 s after the stop; releasing it",
                    c.describe(c.me)
                );
                c.dsm.release_memory();
                for s in &self.shared {
                    s.kick();
                }
            }
        }
        let mut total = VcpuStats::default();
        let mut per_vcpu = Vec::new();
        for h in handles {
            match h.join() {
                Ok(s) => {
                    per_vcpu.push(s.total_exits());
                    total.merge(&s);
                }
                Err(_) => per_vcpu.push(0),
            }
        }
        if let Some(t) = input {
            t.stop();
        }
        if let Some(s) = &self.serial {
            lock(s).flush();
        }
        let mut dsm = None;
        if let Some(c) = &self.cluster {
            // Keep serving memory until every peer's vCPUs are out too.
            c.finish(Duration::from_secs(5));
            dsm = Some(c.dsm.stats());
            c.dsm.shutdown();
            c.quit();
        }
        if let Some(h) = server {
            let _ = h.join();
        }
        let run = t0.elapsed();
        let stats = VmStats {
            exits: EXIT_KINDS
                .iter()
                .zip(total.exits.iter())
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (k.to_string(), *n))
                .collect(),
            exits_total: total.total_exits(),
            pio_reads: total.pio_reads,
            pio_writes: total.pio_writes,
            mmio_reads: total.mmio_reads,
            mmio_writes: total.mmio_writes,
            lapic_accesses: total.lapic_accesses,
            unknown_pio: total.unknown_pio,
            unknown_mmio: total.unknown_mmio,
            msr_gp: total.msr_gp,
            interrupts_injected: total.interrupts_injected,
            nmis_injected: total.nmis_injected,
            ipis_sent: total.ipis_sent,
            ipis_delivered: self.router.ipis_delivered(),
            irqs_raised: self.router.irqs_raised(),
            halt_poll_hits: total.halt_poll_hits,
            halt_sleeps: total.halt_sleeps,
            insns_completed: total.insns_completed,
            timer_fires: total.timer_fires,
            timer_late_max_us: total.timer_late_max_us,
            timer_late: total.timer_late,
            injections_deferred: total.injections_deferred,
            setup_ms: self.setup.as_secs_f64() * 1e3,
            run_ms: run.as_secs_f64() * 1e3,
            per_vcpu_exits: per_vcpu,
            local_vcpus: self
                .shared
                .iter()
                .filter(|s| s.is_resident())
                .map(|s| s.index)
                .collect(),
            dsm,
            snapshots,
            migrations,
        };
        let mut r = VmResult::from_stop(reason, stats);
        r.node = self.cluster.as_ref().map_or(0, |c| usize::from(c.me));
        r
    }
}

impl Vm {
    /// This node's part in snapshots.
    fn node_saver(&self) -> NodeSaver {
        let (node, home) = match &self.spec.cluster {
            Some(c) => (
                c.node_index,
                c.placement_of(&self.spec.numa_nodes()).home(c.node_index),
            ),
            None => (0, 0..self.spec.memory),
        };
        NodeSaver {
            node,
            control: self.control(),
            vcpus: self.shared.clone(),
            memfd: self.ram.memfd_file(),
            guest_base: self.ram.guest_base(),
            home,
            cluster: self.cluster.clone(),
        }
    }

    /// The manifest's fields that do not change from snapshot to snapshot.
    fn manifest_base(&self) -> Manifest {
        let numa = self.spec.numa_nodes();
        let vcpu_node = match &self.spec.cluster {
            Some(c) => c.placement_of(&numa).vcpu_node,
            None => vec![0; self.spec.vcpus as usize],
        };
        Manifest {
            format: super::snapshot::FORMAT.into(),
            version: super::snapshot::VERSION,
            vcpus: self.spec.vcpus,
            memory: self.spec.memory,
            numa,
            cpu: self
                .spec
                .cpu_model()
                .map(|m| m.name().to_string())
                .unwrap_or_default(),
            tsc_deadline: self.tsc_deadline,
            nodes: self.spec.cluster.as_ref().map_or(1, |c| c.nodes.len()),
            vcpu_node,
            clock_ns: 0,
            kvmclock_ns: None,
            taken_unix_s: 0,
            memory_files: Vec::new(),
            files: Default::default(),
        }
    }

    /// Start the vCPUs (a restored distributed VM: once every node has loaded,
    /// driven by the boot node), then wait for the stop, taking the snapshots
    /// and making the migrations the spec asks for on the way, and answering
    /// the control socket (boot node).
    fn start_and_wait(
        &self,
        saver: &NodeSaver,
        mover: Option<&VcpuMover>,
        reports: &mut Vec<SnapshotReport>,
        moves: &mut Vec<MoveReport>,
    ) -> StopReason {
        let is_boot = self.cluster.as_ref().is_none_or(|c| c.is_boot());
        let (router, serial, vm) = (&self.router, &self.serial, &self._vm);
        let devices = || DeviceState {
            ioapic: router.ioapic_state(),
            com1: serial
                .as_ref()
                .map(|s| lock(s).regs())
                .unwrap_or_else(crate::devices::Serial::default_regs),
        };
        let kvmclock = || vm.get_clock().ok().map(|c| c.clock);
        let op = Operator {
            coord: Coordinator {
                saver,
                manifest_base: self.manifest_base(),
                devices: &devices,
                kvmclock: &kvmclock,
            },
            mover,
            cluster: self.cluster.as_deref(),
            vcpus: self.spec.vcpus,
            stop: &self.stop,
            busy: Mutex::new(()),
            reports: Mutex::new(Vec::new()),
            moves: Mutex::new(Vec::new()),
        };
        if self.restored && self.cluster.is_some() {
            if is_boot {
                if let Err(e) = op.coord.start_restored() {
                    return StopReason::Error(VmFailure::component(e));
                }
            }
            // Elsewhere the boot node's `resume` starts them.
        } else {
            for s in &self.shared {
                s.start();
            }
        }
        let control = match self.spec.control.as_deref().filter(|_| is_boot) {
            Some(path) => match ControlSocket::bind(std::path::Path::new(path)) {
                Ok(c) => Some(c),
                Err(e) => return StopReason::Error(VmFailure::component(e)),
            },
            None => None,
        };
        let reason = std::thread::scope(|s| {
            if let Some(c) = &control {
                let op = &op;
                s.spawn(move || c.serve(op, op.stop));
            }
            let r = self.wait_planned(&op, is_boot);
            // The control thread leaves once it sees the stop.
            self.stop.request(r.clone());
            r
        });
        reports.append(&mut lock(&op.reports));
        moves.append(&mut lock(&op.moves));
        reason
    }

    /// Wait for the stop, taking the planned snapshots and making the
    /// planned migrations when they are due (boot node).
    fn wait_planned(&self, op: &Operator<'_>, is_boot: bool) -> StopReason {
        let t0 = Instant::now();
        let end =
            (self.spec.timeout_s > 0.0).then(|| t0 + Duration::from_secs_f64(self.spec.timeout_s));
        let plan = self.spec.snapshot.clone().filter(|_| is_boot);
        let mut next = plan
            .as_ref()
            .map(|p| t0 + Duration::from_secs_f64(p.after_s));
        let mut steps = if is_boot {
            self.spec.migrate.as_slice()
        } else {
            &[]
        }
        .iter();
        let mut step = steps.next();
        loop {
            let step_at = step.map(|m| t0 + Duration::from_secs_f64(m.after_s));
            let until = [end, next, step_at].into_iter().flatten().min();
            let wait = until.map(|u| u.saturating_duration_since(Instant::now()));
            if let Some(r) = self.stop.wait(wait) {
                return r;
            }
            let now = Instant::now();
            if end.is_some_and(|e| now >= e) {
                self.stop.request(StopReason::Timeout);
                return self.stop.reason().unwrap_or(StopReason::Timeout);
            }
            if let (Some(m), Some(at)) = (step, step_at) {
                if now >= at {
                    if let Err(e) = op.migrate_now(m.vcpu, m.node) {
                        eprintln!("dvmm: vCPU {} not moved to node {}: {e}", m.vcpu, m.node);
                    }
                    step = steps.next();
                    continue;
                }
            }
            let (Some(p), Some(at)) = (&plan, next) else {
                continue;
            };
            if now < at {
                continue;
            }
            // Errors are reported by `snapshot_now`; a failed one that was to
            // stop the VM has stopped it.
            let _ = op.snapshot_now(&p.dir, p.leave_running);
            next = p
                .every_s
                .map(|e| Instant::now() + Duration::from_secs_f64(e));
        }
    }
}

/// Snapshots and migrations while the VM runs, from the plan or the control
/// socket, one at a time (boot node).
struct Operator<'a> {
    coord: Coordinator<'a>,
    mover: Option<&'a VcpuMover>,
    cluster: Option<&'a crate::cluster::Cluster>,
    vcpus: u32,
    stop: &'a VmStop,
    busy: Mutex<()>,
    reports: Mutex<Vec<SnapshotReport>>,
    moves: Mutex<Vec<MoveReport>>,
}

impl Operator<'_> {
    /// Take a snapshot into `dir`; without `leave_running` the VM stops after it
    /// (reason `snapshot`), or with the error if it failed.
    fn snapshot_now(&self, dir: &str, leave_running: bool) -> Result<SnapshotReport, String> {
        let _one = lock(&self.busy);
        match self.coord.take(std::path::Path::new(dir), leave_running) {
            Ok(rep) => {
                eprintln!(
                    "dvmm: snapshot {}: {} pages ({:.1} MiB in {} files) written in {:.0} ms; the guest stood still {:.0} ms",
                    rep.dir,
                    rep.pages_stored,
                    rep.bytes as f64 / (1 << 20) as f64,
                    rep.files,
                    rep.write_ms,
                    rep.pause_ms
                );
                lock(&self.reports).push(rep.clone());
                if !leave_running {
                    self.stop.request(StopReason::Snapshotted(dir.to_string()));
                }
                Ok(rep)
            }
            Err(e) => {
                eprintln!("dvmm: snapshot {dir} failed: {e}");
                let msg = e.to_string();
                if !leave_running {
                    self.stop
                        .request(StopReason::Error(VmFailure::component(e)));
                }
                Err(msg)
            }
        }
    }

    /// Move vCPU `vcpu` to node `node`. A failed move leaves the vCPU where it
    /// was, running (`VcpuMover` takes it back), so the VM goes on.
    fn migrate_now(&self, vcpu: u32, node: usize) -> Result<MoveReport, String> {
        let Some(mover) = self.mover else {
            return Err("the VM runs on one node".into());
        };
        let _one = lock(&self.busy);
        let rep = mover
            .migrate(vcpu, node as crate::dsm::protocol::NodeId)
            .map_err(|e| e.to_string())?;
        eprintln!(
            "dvmm: vCPU {} moved from node {} to node {}: stopped {:.2} ms (pause {:.2}, capture {:.2}, transfer {:.2} of which restore {:.2}; {} state bytes)",
            rep.vcpu, rep.from, rep.to, rep.stopped_ms, rep.pause_ms, rep.capture_ms, rep.transfer_ms, rep.restore_ms, rep.state_bytes
        );
        lock(&self.moves).push(rep.clone());
        Ok(rep)
    }
}

impl ControlOps for Operator<'_> {
    fn snapshot(&self, dir: &str, leave_running: bool) -> Result<serde_json::Value, String> {
        let rep = self.snapshot_now(dir, leave_running)?;
        serde_json::to_value(rep).map_err(|e| e.to_string())
    }
    fn migrate(&self, vcpu: u32, node: usize) -> Result<serde_json::Value, String> {
        let rep = self.migrate_now(vcpu, node)?;
        serde_json::to_value(rep).map_err(|e| e.to_string())
    }
    fn placement(&self) -> Vec<usize> {
        match self.cluster {
            Some(c) => c.vcpu_nodes(),
            None => vec![0; self.vcpus as usize],
        }
    }
}

/// Parse, validate, build and run a VM; the result as JSON.
pub fn run_vm(spec_json: &str) -> Result<String, VmError> {
    let spec = VmSpec::from_json(spec_json)?;
    let vm = Vm::new(spec)?;
    let result = vm.run();
    Ok(serde_json::to_string(&result)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_json_shape() {
        let r = VmResult::from_stop(StopReason::DebugExit(3), VmStats::default());
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["reason"], "debug_exit");
        assert_eq!(v["status"], 3);
        assert!(v["error"].is_null());
        assert!(v["vcpu_dump"].is_null());
        assert!(v["stats"].is_object());
        let r = VmResult::from_stop(StopReason::Timeout, VmStats::default());
        assert_eq!(serde_json::to_value(&r).unwrap()["reason"], "timeout");
    }
}
