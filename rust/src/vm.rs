//! One VM (or, in a distributed VM, one node's share of it): KVM VM (with the
//! userspace LAPIC, or KVM's for a one-node VM that asks: crate::kirq), guest RAM, buses and devices, ACPI tables, the kernel, the vCPU
//! threads and the interrupt router.
//!
//! [`run_vm`] is the whole life cycle behind `dvmmd._native.run_vm`: parse and
//! validate a [`VmSpec`] (docs/interfaces.md), build the [`Vm`], run it until it stops
//! and return the [`VmResult`] as JSON.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use serde::{Deserialize, Serialize};

use crate::apic::{self, InterruptMessage, LocalApic};
use crate::bus::{lock, Bus, BusDevice};
use crate::cpuid::{self, CpuidConfig};
use crate::devices::{
    ConsoleInput, ConsoleWriter, DebugExit, IrqLine, Serial, COM1_IRQ, COM1_PORT, DEBUG_EXIT_PORT,
};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{
    InterruptSink, StopReason, Vcpu, VcpuDump, VcpuEnv, VcpuShared, VcpuStats, VmClock, VmStop,
    EXIT_KINDS,
};

/// Most vCPUs a VM may have (8-bit xAPIC IDs; 0xFF is broadcast and the IOAPIC takes
/// the ID after the last vCPU).
pub const MAX_VCPUS: u32 = 254;
/// Guest-physical base of the IOAPIC.
pub const IOAPIC_BASE: u64 = crate::ioapic::IOAPIC_DEFAULT_BASE;
/// Size of the IOAPIC MMIO window.
pub const IOAPIC_SIZE: u64 = crate::ioapic::IOAPIC_MMIO_SIZE;

/// Errors of the vm module.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The spec is malformed or asks for something impossible (user error).
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible?)")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM {what} failed: {err}")]
    KvmOp {
        what: String,
        err: kvm_ioctls::Error,
    },
    #[error("KVM lacks a capability dvmm needs: {0}")]
    MissingCap(&'static str),
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    #[error(transparent)]
    Device(#[from] crate::devices::DeviceError),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    #[error("writing ACPI tables into guest memory failed: {0}")]
    Acpi(String),
    #[error("cannot serialize the result: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot join the cluster: {0}")]
    Cluster(String),
    #[error(transparent)]
    Kirq(#[from] crate::kirq::KirqError),
}

impl VmError {
    /// True when the error is the caller's fault (bad spec, missing/bad kernel image):
    /// Python raises ValueError for these, RuntimeError otherwise.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            VmError::InvalidSpec(_)
                | VmError::Memory(
                    MemoryError::TooSmall(_) | MemoryError::TooLarge(_) | MemoryError::Unaligned(_)
                )
                | VmError::Boot(_)
                | VmError::Device(_)
        )
    }
}

fn kvm_op(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |err| VmError::KvmOp { what, err }
}

// ---------------------------------------------------------------------------------
// Spec and result
// ---------------------------------------------------------------------------------

/// One NUMA node of the VM: its vCPUs and its share of RAM (offsets into RAM, not
/// GPAs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumaNode {
    pub cpus: Vec<u32>,
    pub mem_start: u64,
    pub mem_size: u64,
}

/// The VM spec (docs/interfaces.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub kernel: String,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub numa: Option<Vec<NumaNode>>,
    #[serde(default)]
    pub console_log: Option<String>,
    #[serde(default)]
    pub console_stdout: bool,
    /// A FIFO whose bytes are fed to the guest's COM1 receiver (boot node only).
    #[serde(default)]
    pub console_input: Option<String>,
    /// Feed the process's stdin to COM1 too (boot node only).
    #[serde(default)]
    pub console_stdin: bool,
    /// Stop the VM after this many seconds (0 or absent: no limit).
    #[serde(default)]
    pub timeout_s: f64,
    /// Distributed VM (issue 4): this worker's node and the others; null: one node.
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterSpec>,
    /// Log unknown port/MMIO accesses to stderr (dvmm extension).
    #[serde(default)]
    pub debug: bool,
    /// Upper bound of adaptive halt polling in microseconds (0: off; absent:
    /// [`crate::vcpu::DEFAULT_HALT_POLL_US`], or `DVMM_HALT_POLL_US` from the
    /// environment for A/B runs).
    #[serde(default)]
    pub halt_poll_us: Option<u64>,
    /// CPU model (`host`, `baseline`; see [`cpuid::CpuModel`]). Absent:
    /// [`cpuid::CpuModel::host_default`]. Every node of a VM must name the same one.
    #[serde(default)]
    pub cpu: Option<String>,
    /// Local APIC: `user` (dvmm's, the default), `kernel` (KVM's, one-node VMs
    /// only) or `auto` (kernel on one node); absent: `DVMM_LAPIC` from the
    /// environment, else `user`. See crate::kirq.
    #[serde(default)]
    pub lapic: Option<String>,
}

impl VmSpec {
    /// Parse a JSON spec.
    pub fn from_json(s: &str) -> Result<Self, VmError> {
        serde_json::from_str(s).map_err(|e| VmError::InvalidSpec(e.to_string()))
    }

    /// The NUMA layout: the given one or one node with everything.
    pub fn numa_nodes(&self) -> Vec<NumaNode> {
        self.numa.clone().unwrap_or_else(|| {
            vec![NumaNode {
                cpus: (0..self.vcpus).collect(),
                mem_start: 0,
                mem_size: self.memory,
            }]
        })
    }

    /// The CPU model the spec names, or this host's default.
    pub fn cpu_model(&self) -> Result<cpuid::CpuModel, VmError> {
        match &self.cpu {
            None => Ok(cpuid::CpuModel::host_default()),
            Some(name) => cpuid::CpuModel::from_name(name)
                .map_err(|e| VmError::InvalidSpec(format!("cpu: {e}"))),
        }
    }

    /// The local APIC this VM gets (see [`VmSpec::lapic`]).
    pub fn lapic_kind(&self) -> Result<crate::kirq::LapicKind, VmError> {
        let env = std::env::var("DVMM_LAPIC").ok();
        crate::kirq::LapicKind::choose(
            self.lapic.as_deref(),
            env.as_deref(),
            self.cluster.is_some(),
        )
        .map_err(|e| VmError::InvalidSpec(e.to_string()))
    }

    /// Check everything that can be checked without KVM.
    pub fn validate(&self) -> Result<(), VmError> {
        let bad = |m: String| Err(VmError::InvalidSpec(m));
        self.cpu_model()?;
        self.lapic_kind()?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!(
                "vcpus = {}: must be between 1 and {MAX_VCPUS} (the maximum)",
                self.vcpus
            ));
        }
        crate::memory::validate_size(self.memory)
            .map_err(|e| VmError::InvalidSpec(e.to_string()))?;
        if self.kernel.is_empty() {
            return bad("kernel: no kernel image given".into());
        }
        let k = Path::new(&self.kernel);
        if !k.exists() {
            return bad(format!("kernel image {}: file not found", self.kernel));
        }
        if !k.is_file() {
            return bad(format!("kernel image {}: not a regular file", self.kernel));
        }
        if let Some(i) = &self.initrd {
            if !Path::new(i).is_file() {
                return bad(format!("initrd {i}: file not found"));
            }
        }
        if !(self.timeout_s.is_finite() && self.timeout_s >= 0.0) {
            return bad(format!("timeout_s = {}: must be >= 0", self.timeout_s));
        }
        if let Some(c) = &self.cluster {
            c.validate(self.numa.as_deref())
                .map_err(VmError::InvalidSpec)?;
        }
        if let Some(numa) = &self.numa {
            if numa.is_empty() {
                return bad("numa: empty list (omit it for a single node)".into());
            }
            let mut seen = vec![false; self.vcpus as usize];
            let mut next = 0u64;
            for (i, n) in numa.iter().enumerate() {
                if n.mem_start != next {
                    return bad(format!(
                        "numa[{i}].mem_start = {:#x}: expected {next:#x} (ranges must follow each other)",
                        n.mem_start
                    ));
                }
                if n.mem_size == 0 || !n.mem_size.is_multiple_of(crate::memory::PAGE_SIZE) {
                    return bad(format!(
                        "numa[{i}].mem_size = {:#x}: must be a non-zero multiple of 4 KiB",
                        n.mem_size
                    ));
                }
                next = n.mem_start.saturating_add(n.mem_size);
                for &c in &n.cpus {
                    match seen.get_mut(c as usize) {
                        None => {
                            return bad(format!(
                                "numa[{i}].cpus: vCPU {c} does not exist (vcpus = {})",
                                self.vcpus
                            ))
                        }
                        Some(true) => {
                            return bad(format!("numa[{i}].cpus: vCPU {c} is in two nodes"))
                        }
                        Some(s) => *s = true,
                    }
                }
            }
            if next != self.memory {
                return bad(format!(
                    "numa: the ranges cover {next:#x} bytes but memory is {:#x}",
                    self.memory
                ));
            }
            if let Some(c) = seen.iter().position(|s| !s) {
                return bad(format!("numa: vCPU {c} is in no node"));
            }
        }
        Ok(())
    }
}

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
            StopReason::Error(e) => ("error", None, Some(e), None),
            StopReason::Timeout => ("timeout", None, Some("timeout_s passed".into()), None),
            StopReason::Stopped => ("stopped", None, None, None),
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

// ---------------------------------------------------------------------------------
// Interrupt routing
// ---------------------------------------------------------------------------------

/// Hook for a distributed VM: the link from a node's [`InterruptRouter`] to the
/// other nodes (implemented by [`crate::cluster::Cluster`]).
///
/// The router resolves every interrupt message to its exact target vCPUs with
/// [`apic::route_targets`] over the addressing table of *all* vCPUs (see
/// [`InterruptRouter`]) and hands each remote target over as a message already
/// re-encoded for it ([`resolved_for`]); the receiving node hands it to
/// [`InterruptRouter::deliver_local`].
pub trait RemoteInterruptSink: Send + Sync {
    /// Send `msg` (resolved: physical destination of exactly vCPU `vcpu`) to the
    /// node running vCPU `vcpu`.
    fn forward(&self, vcpu: u32, msg: &InterruptMessage);
    /// The addressing of local vCPU `vcpu` changed to `a`: tell every other node.
    fn publish_addressing(&self, vcpu: u32, a: &apic::ApicAddressing);
    /// A local LAPIC EOI'd the level-triggered `vector`: forward it to the node
    /// that owns the IOAPIC (only called on the nodes that do not own it).
    fn forward_eoi(&self, vector: u8);
}

/// `msg` re-encoded for exactly the APIC `target`: physical destination, x2APIC
/// format (whose broadcast, 0xFFFF_FFFF, is never an APIC ID, so an APIC in
/// either mode matches by its ID alone), no shorthand, and lowest priority turned
/// into fixed (the arbitration is done).
pub fn resolved_for(msg: &InterruptMessage, target: &apic::ApicAddressing) -> InterruptMessage {
    let mut m = *msg;
    m.destination = apic::Destination {
        id: target.id,
        mode: apic::DestinationMode::Physical,
        shorthand: apic::Shorthand::None,
        x2apic_format: true,
    };
    if m.delivery_mode == apic::DeliveryMode::LowestPriority {
        m.delivery_mode = apic::DeliveryMode::Fixed;
    }
    m
}

/// Where an EOI of a level-triggered vector must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EoiRoute {
    /// This node owns the IOAPIC: [`crate::ioapic::IoApic::end_of_interrupt`] here.
    Local,
    /// Another node owns it: forward through [`RemoteInterruptSink::forward_eoi`].
    Forward,
}

/// The EOI forwarding decision: local unless this is a node of a distributed VM
/// that does not own the IOAPIC.
pub fn eoi_route(distributed: bool, owns_ioapic: bool) -> EoiRoute {
    if distributed && !owns_ioapic {
        EoiRoute::Forward
    } else {
        EoiRoute::Local
    }
}

/// Delivers interrupt messages (ICR writes, IOAPIC pins) to the matching local APICs
/// and kicks their vCPUs; forwards to other nodes through a [`RemoteInterruptSink`].
///
/// **Distributed VMs.** Every node keeps the [`apic::ApicAddressing`] of every
/// vCPU (`table`, indexed by vCPU index = initial APIC ID): the entries start at
/// the power-on state and follow the updates the owning vCPU threads report
/// ([`InterruptSink::addressing_changed`], on LDR / DFR / ID / APIC base writes and
/// INIT) and that other nodes broadcast (`APP_ADDR`, see [`crate::cluster`]). The
/// node an interrupt originates on resolves the exact targets over this table
/// (lowest priority: exactly one vCPU, the lowest matching APIC ID) and sends each
/// remote target a physical re-encoding only to the node running it, so a
/// logical or lowest-priority interrupt is delivered once, not once per node.
///
/// Ordering: addressing updates and IPIs travel on the same FIFO control lane
/// per pair of nodes, and a vCPU reports its change before it executes its next
/// instruction, so every node sees one sender's updates before that sender's
/// later IPIs. Across senders (vCPU A changes its LDR, vCPU B on another node
/// targets it) the guest must synchronise as it must on real hardware; an IPI
/// racing the update may be resolved with the previous addressing.
pub struct InterruptRouter {
    vcpus: Vec<Arc<VcpuShared>>,
    ioapic: Mutex<crate::ioapic::IoApic>,
    remote: Option<Arc<dyn RemoteInterruptSink>>,
    /// Addressing of every vCPU of the VM (distributed VMs only; empty otherwise).
    table: Mutex<Vec<apic::ApicAddressing>>,
    /// vCPU index -> position in `vcpus` for the local ones.
    local: Vec<Option<usize>>,
    /// This node owns the IOAPIC (the boot node; always true without cluster).
    owns_ioapic: bool,
    /// One-node VM with KVM's LAPICs: messages go in as MSIs (crate::kirq).
    kernel: Option<crate::kirq::KernelIrq>,
    ipis_delivered: std::sync::atomic::AtomicU64,
    irqs_raised: std::sync::atomic::AtomicU64,
}

impl InterruptRouter {
    /// A router for the local vCPUs `vcpus` (each with its global APIC ID) of a VM
    /// of `total` vCPUs; `owns_ioapic` on the node that has the IOAPIC.
    pub fn new(
        vcpus: Vec<Arc<VcpuShared>>,
        ioapic: crate::ioapic::IoApic,
        remote: Option<Arc<dyn RemoteInterruptSink>>,
    ) -> Self {
        let total = vcpus.iter().map(|v| v.index + 1).max().unwrap_or(0);
        Self::distributed(vcpus, total, ioapic, remote, true)
    }

    /// [`InterruptRouter::new`] for one node of a VM of `total` vCPUs;
    /// `owns_ioapic` on the node that has the IOAPIC.
    pub fn distributed(
        vcpus: Vec<Arc<VcpuShared>>,
        total: u32,
        ioapic: crate::ioapic::IoApic,
        remote: Option<Arc<dyn RemoteInterruptSink>>,
        owns_ioapic: bool,
    ) -> Self {
        let mut local = vec![None; total as usize];
        for (pos, v) in vcpus.iter().enumerate() {
            if let Some(x) = local.get_mut(v.index as usize) {
                *x = Some(pos);
            }
        }
        let table = if remote.is_some() {
            (0..total)
                .map(|i| match local.get(i as usize).copied().flatten() {
                    Some(pos) => lock(&vcpus[pos].lapic).addressing(),
                    // Power-on state, as every node creates it.
                    None => LocalApic::new(i, i == 0, 0).addressing(),
                })
                .collect()
        } else {
            Vec::new()
        };
        InterruptRouter {
            vcpus,
            ioapic: Mutex::new(ioapic),
            remote,
            table: Mutex::new(table),
            local,
            owns_ioapic,
            kernel: None,
            ipis_delivered: Default::default(),
            irqs_raised: Default::default(),
        }
    }

    /// Deliver through KVM's LAPICs (one-node VMs, crate::kirq) from now on.
    pub fn with_kernel_lapic(mut self, k: crate::kirq::KernelIrq) -> Result<Self, VmError> {
        k.update_routes(&lock(&self.ioapic))?;
        self.kernel = Some(k);
        Ok(self)
    }

    /// Deliver `msg` to the one local APIC `v` if it matches; true if accepted.
    /// Never waits for the LAPIC lock (see [`InterruptRouter::deliver_local`]).
    fn deliver_one(v: &VcpuShared, msg: &InterruptMessage) -> bool {
        // Never wait for a LAPIC lock: the caller may be the (real-time) DSM
        // engine thread and the holder a preempted vCPU thread. A busy LAPIC
        // gets the message posted; its vCPU applies it before it next looks
        // at its LAPIC (the kick makes that immediate).
        let accepted = match v.lapic.try_lock() {
            Ok(mut l) => l.matches(msg) && l.accept(msg),
            Err(std::sync::TryLockError::Poisoned(e)) => {
                let mut l = e.into_inner();
                l.matches(msg) && l.accept(msg)
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                v.post(*msg);
                return false;
            }
        };
        if accepted {
            v.kick();
        }
        accepted
    }

    /// Deliver `msg` to the local APICs it is for; returns how many accepted it.
    pub fn deliver_local(&self, msg: &InterruptMessage) -> usize {
        let mut n = 0;
        if msg.delivery_mode == apic::DeliveryMode::LowestPriority {
            // Lowest-priority: the lowest matching APIC ID (see apic::route_targets).
            let addrs: Vec<apic::ApicAddressing> = self
                .vcpus
                .iter()
                .map(|v| lock(&v.lapic).addressing())
                .collect();
            for i in apic::route_targets(msg, &addrs) {
                if let Some(v) = self.vcpus.get(i) {
                    if lock(&v.lapic).accept(msg) {
                        n += 1;
                    }
                    v.kick();
                }
            }
        } else {
            for v in &self.vcpus {
                if Self::deliver_one(v, msg) {
                    n += 1;
                }
            }
        }
        self.ipis_delivered
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }

    /// The exact targets of `msg` over the whole-VM table: (vCPU index, message
    /// re-encoded for it).
    pub fn resolve(&self, msg: &InterruptMessage) -> Vec<(u32, InterruptMessage)> {
        let t = lock(&self.table);
        apic::route_targets(msg, &t)
            .into_iter()
            .map(|i| (i as u32, resolved_for(msg, &t[i])))
            .collect()
    }

    fn route(&self, msg: &InterruptMessage) {
        if let Some(k) = &self.kernel {
            let n = k.signal(msg);
            self.ipis_delivered
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let Some(remote) = &self.remote else {
            self.deliver_local(msg);
            return;
        };
        let mut n = 0;
        for (vcpu, m) in self.resolve(msg) {
            match self.local.get(vcpu as usize).copied().flatten() {
                Some(pos) => {
                    if Self::deliver_one(&self.vcpus[pos], &m) {
                        n += 1;
                    }
                }
                None => remote.forward(vcpu, &m),
            }
        }
        self.ipis_delivered
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Apply an addressing update of remote vCPU `vcpu` (from `APP_ADDR`); false
    /// if `vcpu` is not a vCPU of the VM or runs on this node.
    pub fn apply_remote_addressing(&self, vcpu: u32, a: apic::ApicAddressing) -> bool {
        if self.local.get(vcpu as usize).copied().flatten().is_some() {
            return false;
        }
        match lock(&self.table).get_mut(vcpu as usize) {
            Some(e) => {
                *e = a;
                true
            }
            None => false,
        }
    }

    /// The addressing this node currently assumes for every vCPU (distributed VMs).
    pub fn addressing_table(&self) -> Vec<apic::ApicAddressing> {
        lock(&self.table).clone()
    }

    /// An EOI for `vector` forwarded from another node (this node owns the IOAPIC).
    pub fn remote_eoi(&self, vector: u8) {
        let msgs = lock(&self.ioapic).end_of_interrupt(vector);
        for m in msgs {
            self.route(&m);
        }
    }

    /// Does this node own the IOAPIC?
    pub fn owns_ioapic(&self) -> bool {
        self.owns_ioapic
    }

    /// Guest access to the IOAPIC window.
    fn ioapic_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.ioapic).mmio_read(offset, data);
    }

    fn ioapic_write(&self, offset: u64, data: &[u8]) {
        let msgs = {
            let mut io = lock(&self.ioapic);
            let msgs = io.mmio_write(offset, data);
            if let Some(k) = &self.kernel {
                k.routes_changed(&io);
            }
            msgs
        };
        for m in msgs {
            self.route(&m);
        }
    }

    /// IPIs delivered so far (local acceptances).
    pub fn ipis_delivered(&self) -> u64 {
        self.ipis_delivered
            .load(std::sync::atomic::Ordering::Relaxed)
            + self.vcpus.iter().map(|v| v.posted_accepted()).sum::<u64>()
    }
}

impl InterruptSink for InterruptRouter {
    fn send_ipi(&self, _from: u32, msg: InterruptMessage) {
        self.route(&msg);
    }
    fn eoi(&self, _from: u32, vector: u8) {
        match (
            &self.remote,
            eoi_route(self.remote.is_some(), self.owns_ioapic),
        ) {
            (Some(r), EoiRoute::Forward) => r.forward_eoi(vector),
            _ => self.remote_eoi(vector),
        }
    }
    fn addressing_changed(&self, from: u32, now: apic::ApicAddressing) {
        let Some(remote) = &self.remote else {
            return;
        };
        {
            let mut t = lock(&self.table);
            match t.get_mut(from as usize) {
                Some(e) if *e != now => *e = now,
                _ => return,
            }
        }
        remote.publish_addressing(from, &now);
    }
}

impl IrqLine for InterruptRouter {
    fn set_irq(&self, irq: u32, level: bool) {
        if level {
            self.irqs_raised
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Pins outside the IOAPIC are ignored (a device bug, not a guest one).
        let msg = lock(&self.ioapic).set_irq(irq as usize, level);
        if let Ok(Some(m)) = msg {
            self.route(&m);
        }
    }
}

/// The IOAPIC's MMIO window on the bus.
struct IoApicDevice(Arc<InterruptRouter>);

impl BusDevice for IoApicDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.ioapic_read(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<crate::bus::BusAction> {
        self.0.ioapic_write(offset, data);
        None
    }
}

// ---------------------------------------------------------------------------------
// The VM
// ---------------------------------------------------------------------------------

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

/// A VM ready to run.
pub struct Vm {
    spec: VmSpec,
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    router: Arc<InterruptRouter>,
    shared: Vec<Arc<VcpuShared>>,
    vcpus: Vec<Vcpu>,
    serial: Option<Arc<Mutex<Serial>>>,
    /// Console input (boot node only), started by `run`.
    console_input: Option<ConsoleInput>,
    stop: Arc<VmStop>,
    /// The LAPIC time base (shared with the vCPUs; pause stops it).
    clock: VmClock,
    setup: Duration,
    /// The buses (also served to other nodes by the cluster thread).
    pio: Bus,
    mmio: Bus,
    /// Distributed VM: the link to the other nodes. Declared before `ram`: the
    /// engine must stop before the mappings go away.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    ram: GuestRam,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.spec.vcpus)
            .field("ram", &self.ram)
            .finish()
    }
}

/// The MSRs that must exit to userspace (answered by the userspace LAPIC). KVM
/// never filters the x2APIC range; those exit because KVM has no LAPIC to answer
/// them (KVM_MSR_EXIT_REASON_INVAL).
fn install_msr_filter(vm: &VmFd) -> Result<(), VmError> {
    let deny = [0u8; 32];
    let rw = MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE;
    let r = |base: u32, count: u32| MsrFilterRange {
        flags: rw,
        base,
        msr_count: count,
        bitmap: &deny,
    };
    let full = [
        r(apic::MSR_IA32_APIC_BASE, 1),
        r(apic::MSR_IA32_TSC_DEADLINE, 1),
        r(apic::X2APIC_MSR_FIRST, 256),
    ];
    if vm
        .set_msr_filter(MsrFilterDefaultAction::ALLOW, &full)
        .is_ok()
    {
        return Ok(());
    }
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &full[..2])
        .map_err(kvm_op("KVM_X86_SET_MSR_FILTER"))
}

impl Vm {
    /// Build a VM from a spec (validated here).
    pub fn new(spec: VmSpec) -> Result<Self, VmError> {
        let t0 = Instant::now();
        spec.validate()?;
        let n = spec.vcpus;
        let lapic_kind = spec.lapic_kind()?;
        let kernel_lapic = lapic_kind == crate::kirq::LapicKind::Kernel;

        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm = kvm.create_vm().map_err(kvm_op("KVM_CREATE_VM"))?;
        if !kvm.check_extension(Cap::ImmediateExit) {
            return Err(VmError::MissingCap("KVM_CAP_IMMEDIATE_EXIT"));
        }
        if !kvm.check_extension(Cap::X86UserSpaceMsr) {
            return Err(VmError::MissingCap("KVM_CAP_X86_USER_SPACE_MSR"));
        }
        // Only needed on Intel VMX for real mode; harmless to fail elsewhere (PVM).
        let _ = vm.set_tss_address(0xfffb_d000);
        let _ = vm.set_identity_map_address(0xfffb_c000);

        // User-space MSR exits: invalid (x2APIC without in-kernel LAPIC), unknown and
        // filtered MSRs come to us.
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            args: [
                u64::from(
                    kvm_bindings::KVM_MSR_EXIT_REASON_INVAL
                        | kvm_bindings::KVM_MSR_EXIT_REASON_UNKNOWN
                        | kvm_bindings::KVM_MSR_EXIT_REASON_FILTER,
                ),
                0,
                0,
                0,
            ],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(kvm_op("enable KVM_CAP_X86_USER_SPACE_MSR"))?;
        if kernel_lapic {
            // KVM answers the APIC MSRs itself; only unknown ones come to us.
            crate::kirq::enable_split_irqchip(&vm)?;
        } else {
            install_msr_filter(&vm)?;
        }
        let vm = Arc::new(vm);

        // Guest RAM; for a distributed VM the coherence engine takes it over before
        // anything (KVM, the loader, ACPI) touches it.
        let numa = spec.numa_nodes();
        let ram = GuestRam::new(spec.memory)?;
        let stop = Arc::new(VmStop::new());
        let cluster = match &spec.cluster {
            Some(c) => Some(
                crate::cluster::Cluster::start(c, &numa, n, &ram, stop.clone())
                    .map_err(VmError::Cluster)?,
            ),
            None => None,
        };
        let is_boot = cluster.as_ref().is_none_or(|c| c.is_boot());
        // The vCPUs this node runs (APIC IDs are global).
        let local: Vec<u32> = match &spec.cluster {
            Some(c) => {
                let mut v = numa[c.node_index].cpus.clone();
                v.sort_unstable();
                v
            }
            None => (0..n).collect(),
        };
        for (slot, r) in ram.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.guest_host_addr,
            };
            // SAFETY: the host range is a live mapping owned by `ram`, which the Vm
            // keeps alive at least as long as the KVM VM fd.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_op(format!("KVM_SET_USER_MEMORY_REGION slot {slot}")))?;
        }

        // vCPU handles with their LAPICs; TSC frequency for the TSC-deadline timer.
        let clock = VmClock::new();
        let mut fds = Vec::with_capacity(local.len());
        for &i in &local {
            fds.push(
                vm.create_vcpu(u64::from(i))
                    .map_err(kvm_op(format!("KVM_CREATE_VCPU {i}")))?,
            );
        }
        // Initial MSRs (TSC = 0 on every vCPU), then the TSC reference of the LAPICs.
        let msrs = cpuid::initial_msrs()?;
        for (i, fd) in fds.iter().enumerate() {
            fd.set_msrs(&msrs)
                .map_err(kvm_op(format!("KVM_SET_MSRS on vCPU {i}")))?;
        }
        let tsc_khz = fds.first().and_then(|f| f.get_tsc_khz().ok()).unwrap_or(0);
        let tsc_now = fds.first().and_then(read_tsc);

        let now = clock.now_ns();
        let shared: Vec<Arc<VcpuShared>> = local
            .iter()
            .map(|&i| {
                let mut l = LocalApic::new(i, i == 0, tsc_khz);
                if let Some(t) = tsc_now {
                    l.set_tsc_reference(now, t);
                }
                Arc::new(VcpuShared::new(i, l))
            })
            .collect();

        let ioapic = crate::ioapic::IoApic::new(crate::ioapic::ioapic_id_for(n as usize));
        let remote = cluster.clone().map(|c| c as Arc<dyn RemoteInterruptSink>);
        let mut router = InterruptRouter::distributed(shared.clone(), n, ioapic, remote, is_boot);
        if kernel_lapic {
            router =
                router.with_kernel_lapic(crate::kirq::KernelIrq::new(vm.clone(), stop.clone()))?;
        }
        let router = Arc::new(router);

        // Devices: on the boot node; the other nodes forward to it.
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let mut serial = None;
        let mut console_input = None;
        if is_boot {
            console_input = ConsoleInput::open(spec.console_input.as_deref(), spec.console_stdin)?;
            let console = ConsoleWriter::new(spec.console_log.as_deref(), spec.console_stdout)?;
            let s = Arc::new(Mutex::new(Serial::new(
                console,
                Some(router.clone() as Arc<dyn IrqLine>),
                COM1_IRQ,
            )));
            pio.insert(u64::from(COM1_PORT), 8, "COM1", s.clone())?;
            serial = Some(s);
            pio.insert(
                u64::from(DEBUG_EXIT_PORT),
                1,
                "debug-exit",
                Arc::new(Mutex::new(DebugExit)),
            )?;
            mmio.insert(
                IOAPIC_BASE,
                IOAPIC_SIZE,
                "IOAPIC",
                Arc::new(Mutex::new(IoApicDevice(router.clone()))),
            )?;
        } else if let Some(c) = &cluster {
            let fwd = c.clone() as Arc<dyn crate::bus::RemoteBusForwarder>;
            let proxy = |base: u64, is_pio: bool| {
                Arc::new(Mutex::new(crate::bus::ProxyDevice::new(
                    base,
                    is_pio,
                    fwd.clone(),
                )))
            };
            pio.insert(
                u64::from(COM1_PORT),
                8,
                "COM1 (remote)",
                proxy(u64::from(COM1_PORT), true),
            )?;
            pio.insert(
                u64::from(DEBUG_EXIT_PORT),
                1,
                "debug-exit (remote)",
                proxy(u64::from(DEBUG_EXIT_PORT), true),
            )?;
            mmio.insert(
                IOAPIC_BASE,
                IOAPIC_SIZE,
                "IOAPIC (remote)",
                proxy(IOAPIC_BASE, false),
            )?;
        }

        // ACPI tables and the kernel (once, by the boot node: through the guest
        // mapping, so the other nodes see them through the coherence protocol).
        let boot = if is_boot {
            let rsdp = write_acpi(&ram, &spec)?;
            let mem = ram.guest_memory();
            let user_line = spec.cmdline.as_deref().unwrap_or("");
            let model = spec.cpu_model()?;
            let (linux_line, added) = cpuid::linux_cmdline(user_line, model);
            let setup = crate::boot::load_kernel(
                mem,
                spec.memory,
                Path::new(&spec.kernel),
                spec.initrd.as_deref().map(Path::new),
                user_line,
                Some(&linux_line),
                rsdp,
            )?;
            if setup.kind == crate::boot::KernelKind::LinuxBzImage && !added.is_empty() {
                eprintln!(
                    "dvmm: CPU model {}: added '{}' to the Linux command line, so the model holds where KVM cannot hide these features from the guest's CPUID (KVM PVM); `--cpu host` leaves the line alone",
                    model.name(),
                    added.join(" ")
                );
            }
            Some(setup)
        } else {
            None
        };

        // vCPUs.
        let env = Arc::new(VcpuEnv {
            pio: pio.clone(),
            mmio: mmio.clone(),
            irq: router.clone(),
            clock: clock.clone(),
            stop: stop.clone(),
            debug: spec.debug || std::env::var_os("DVMM_DEBUG").is_some(),
            halt_poll_max: Duration::from_micros(spec.halt_poll_us.unwrap_or_else(|| {
                std::env::var("DVMM_HALT_POLL_US")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(crate::vcpu::DEFAULT_HALT_POLL_US)
            })),
            server: cluster
                .as_ref()
                .filter(|c| c.dsm.vcpu_serves())
                .map(|c| c.clone() as Arc<dyn crate::vcpu::MessageServer>),
            server_vcpu: local.first().copied(),
            guest_memory: Some(ram.guest_memory().clone()),
            kernel_lapic,
        });
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_op("KVM_GET_SUPPORTED_CPUID"))?;
        let cfg = CpuidConfig {
            total_vcpus: n,
            tsc_deadline: true,
            model: spec.cpu_model()?,
        };
        let mut vcpus = Vec::with_capacity(local.len());
        for (k, fd) in fds.into_iter().enumerate() {
            let i = local[k];
            let c = cpuid::vcpu_cpuid(&supported, i, &cfg)?;
            fd.set_cpuid2(&c)
                .map_err(kvm_op(format!("KVM_SET_CPUID2 on vCPU {i}")))?;
            if k == 0 {
                // KVM PVM puts back host features it cannot hide: say so, once.
                if let Ok(got) = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES) {
                    let kept = cpuid::not_removed(cfg.model, &got);
                    if !kept.is_empty() {
                        eprintln!(
                            "dvmm: warning: CPU model {}: KVM still shows the guest {} (this KVM overrides KVM_SET_CPUID2 for them)",
                            cfg.model.name(),
                            kept.join(", ")
                        );
                    }
                }
            }
            let fpu = kvm_bindings::kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            fd.set_fpu(&fpu)
                .map_err(kvm_op(format!("KVM_SET_FPU on vCPU {i}")))?;
            let reset_regs = fd
                .get_regs()
                .map_err(kvm_op(format!("KVM_GET_REGS on vCPU {i}")))?;
            let reset_sregs = fd
                .get_sregs()
                .map_err(kvm_op(format!("KVM_GET_SREGS on vCPU {i}")))?;
            if let (0, Some(boot)) = (i, &boot) {
                let mut regs = reset_regs;
                let mut sregs = reset_sregs;
                boot.entry.apply(&mut regs, &mut sregs);
                fd.set_sregs(&sregs)
                    .map_err(kvm_op("KVM_SET_SREGS on the boot vCPU"))?;
                fd.set_regs(&regs)
                    .map_err(kvm_op("KVM_SET_REGS on the boot vCPU"))?;
            }
            vcpus.push(Vcpu::new(
                fd,
                shared[k].clone(),
                env.clone(),
                i == 0,
                reset_regs,
                reset_sregs,
            ));
        }

        Ok(Vm {
            spec,
            _kvm: kvm,
            _vm: vm,
            router,
            shared,
            vcpus,
            serial,
            console_input,
            stop,
            clock,
            setup: t0.elapsed(),
            pio,
            mmio,
            cluster,
            ram,
        })
    }

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

    /// The VM's guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The interrupt router (e.g. for remote deliveries).
    pub fn router(&self) -> &Arc<InterruptRouter> {
        &self.router
    }

    /// Run until the VM stops (debug exit, crash, shutdown, timeout, `stop`), join every
    /// vCPU thread and return the result.
    pub fn run(mut self) -> VmResult {
        let t0 = Instant::now();
        // Distributed VM: the thread serving the other nodes (IPIs, I/O, stop).
        if let Some(c) = &self.cluster {
            c.fast_path(self.router.clone(), self.pio.clone(), self.mmio.clone());
        }
        let server = self.cluster.clone().map(|c| {
            let (router, pio, mmio) = (self.router.clone(), self.pio.clone(), self.mmio.clone());
            std::thread::Builder::new()
                .name("dvmm-cluster".into())
                .spawn(move || c.serve(&router, &pio, &mmio))
        });
        let server = match server {
            Some(Ok(h)) => Some(h),
            Some(Err(e)) => {
                self.stop.request(StopReason::Error(format!(
                    "cannot spawn the cluster thread: {e}"
                )));
                None
            }
            None => None,
        };
        let mut failed = None;
        let input = match (self.console_input.take(), &self.serial) {
            (Some(i), Some(s)) => match i.spawn(s.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    failed = Some(StopReason::Error(format!(
                        "cannot spawn the console input thread: {e}"
                    )));
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
                    failed = Some(StopReason::Error(e.to_string()));
                    break;
                }
            }
        }
        let reason = match failed {
            Some(r) => r,
            None => {
                for s in &self.shared {
                    s.start();
                }
                let timeout = (self.spec.timeout_s > 0.0)
                    .then(|| Duration::from_secs_f64(self.spec.timeout_s));
                match self.stop.wait(timeout) {
                    Some(r) => r,
                    None => {
                        self.stop.request(StopReason::Timeout);
                        self.stop.reason().unwrap_or(StopReason::Timeout)
                    }
                }
            }
        };
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
            irqs_raised: self
                .router
                .irqs_raised
                .load(std::sync::atomic::Ordering::Relaxed),
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
            local_vcpus: self.shared.iter().map(|s| s.index).collect(),
            dsm,
        };
        let mut r = VmResult::from_stop(reason, stats);
        r.node = self.cluster.as_ref().map_or(0, |c| usize::from(c.me));
        r
    }
}

/// The guest TSC of a fresh vCPU (IA32_TSC), if readable.
fn read_tsc(fd: &kvm_ioctls::VcpuFd) -> Option<u64> {
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: 0x10,
        ..Default::default()
    }])
    .ok()?;
    match fd.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

/// Build the ACPI tables for the spec's layout, write them into guest RAM and return
/// the RSDP's guest-physical address.
fn write_acpi(ram: &GuestRam, spec: &VmSpec) -> Result<u64, VmError> {
    use crate::acpi::{build_tables, AcpiCpu, AcpiLayout, AcpiMemory, ACPI_TABLES_BASE};
    use vm_memory::{Bytes, GuestAddress};
    let nodes = spec.numa_nodes();
    let mut cpus: Vec<AcpiCpu> = nodes
        .iter()
        .enumerate()
        .flat_map(|(n, node)| {
            node.cpus.iter().map(move |&c| AcpiCpu {
                apic_id: c,
                node: n as u32,
            })
        })
        .collect();
    cpus.sort_by_key(|c| c.apic_id);
    let memory = numa_gpa_ranges(ram, &nodes)
        .into_iter()
        .map(|(gpa, size, node)| AcpiMemory { gpa, size, node })
        .collect();
    let layout = AcpiLayout::new(cpus, memory);
    let tables =
        build_tables(&layout, ACPI_TABLES_BASE).map_err(|e| VmError::Acpi(e.to_string()))?;
    for (gpa, blob) in &tables.blobs {
        ram.guest_memory()
            .write_slice(blob, GuestAddress(*gpa))
            .map_err(|e| VmError::Acpi(format!("at {gpa:#x}: {e}")))?;
    }
    Ok(tables.rsdp_addr)
}

/// The NUMA nodes' RAM ranges as GPA ranges `(gpa, size, node)`, split at the MMIO
/// hole.
pub fn numa_gpa_ranges(ram: &GuestRam, nodes: &[NumaNode]) -> Vec<(u64, u64, u32)> {
    let mut out = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let (start, end) = (node.mem_start, node.mem_start + node.mem_size);
        for r in ram.regions() {
            let (rs, re) = (r.file_offset, r.file_offset + r.size);
            let (s, e) = (start.max(rs), end.min(re));
            if s < e {
                out.push((r.gpa + (s - rs), e - s, n as u32));
            }
        }
    }
    out
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

    fn spec(json: &str) -> Result<VmSpec, VmError> {
        let s = VmSpec::from_json(json)?;
        s.validate()?;
        Ok(s)
    }

    fn kernel() -> String {
        // Any existing regular file passes the spec check.
        std::env::current_exe()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn spec_defaults_and_validation() {
        let k = kernel();
        let s = spec(&format!(
            r#"{{"vcpus": 2, "memory": 268435456, "kernel": "{k}"}}"#
        ))
        .unwrap();
        assert_eq!(s.numa_nodes().len(), 1);
        assert_eq!(s.numa_nodes()[0].cpus, vec![0, 1]);
        let e = spec(&format!(
            r#"{{"vcpus": 300, "memory": 268435456, "kernel": "{k}"}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("254"), "{e}");
        assert!(e.is_user_error());
        let e = spec(&format!(
            r#"{{"vcpus": 0, "memory": 268435456, "kernel": "{k}"}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("vcpus"));
        let e = spec(&format!(
            r#"{{"vcpus": 1, "memory": 1000, "kernel": "{k}"}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        let e = spec(&format!(
            r#"{{"vcpus": 1, "memory": 16777217, "kernel": "{k}"}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("4 KiB"), "{e}");
        let e = spec(r#"{"vcpus": 1, "memory": 16777216, "kernel": "/nonexistent/kernel"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/kernel"), "{e}");
        let e = spec(r#"{"vcpus": 1, "memory": 16777216}"#).unwrap_err();
        assert!(e.to_string().contains("kernel"), "{e}");
        let e = spec("{nonsense").unwrap_err();
        assert!(e.is_user_error());
        let e = spec(&format!(
            r#"{{"vcpus": 1, "memory": 16777216, "kernel": "{k}", "bogus": 1}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn numa_validation() {
        let k = kernel();
        let base = |numa: &str| {
            spec(&format!(
                r#"{{"vcpus": 2, "memory": 33554432, "kernel": "{k}", "numa": {numa}}}"#
            ))
        };
        assert!(base(
            r#"[{"cpus":[0],"mem_start":0,"mem_size":16777216},{"cpus":[1],"mem_start":16777216,"mem_size":16777216}]"#
        )
        .is_ok());
        let e = base(r#"[{"cpus":[0,1],"mem_start":0,"mem_size":16777216}]"#).unwrap_err();
        assert!(e.to_string().contains("cover"), "{e}");
        let e = base(
            r#"[{"cpus":[0],"mem_start":0,"mem_size":16777216},{"cpus":[0],"mem_start":16777216,"mem_size":16777216}]"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("two nodes"), "{e}");
        let e = base(r#"[{"cpus":[0,5],"mem_start":0,"mem_size":33554432}]"#).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = base(r#"[{"cpus":[0],"mem_start":0,"mem_size":33554432}]"#).unwrap_err();
        assert!(e.to_string().contains("no node"), "{e}");
    }

    fn router(n: u32) -> (Arc<InterruptRouter>, Vec<Arc<VcpuShared>>) {
        let shared: Vec<Arc<VcpuShared>> = (0..n)
            .map(|i| {
                let mut l = LocalApic::new(i, i == 0, 0);
                l.mmio_write(0xF0, &0x1FFu32.to_le_bytes(), 0); // software-enable
                Arc::new(VcpuShared::new(i, l))
            })
            .collect();
        let r = Arc::new(InterruptRouter::new(
            shared.clone(),
            crate::ioapic::IoApic::new(n as u8),
            None,
        ));
        (r, shared)
    }

    fn fixed(vector: u8, dest: u32, shorthand: apic::Shorthand) -> InterruptMessage {
        InterruptMessage {
            vector,
            delivery_mode: apic::DeliveryMode::Fixed,
            trigger_mode: apic::TriggerMode::Edge,
            level: true,
            destination: apic::Destination {
                id: dest,
                mode: apic::DestinationMode::Physical,
                shorthand,
                x2apic_format: false,
            },
            source_id: Some(0),
        }
    }

    #[test]
    fn remote_delivery_never_waits_for_a_busy_lapic() {
        // Regression: the DSM engine thread delivers remote IPIs; it must not block on
        // the LAPIC lock of a vCPU thread that was preempted while holding it. With the
        // lock held by this very thread, a blocking delivery would deadlock here.
        let (r, v) = router(2);
        let rx = lock(v[1].inbox_rx_for_tests()).take();
        {
            let _held = lock(&v[1].lapic);
            r.deliver_local(&fixed(0x41, 1, apic::Shorthand::None));
        }
        assert_eq!(lock(&v[1].lapic).pending_interrupt(), None); // posted, not yet seen
        let mut l = lock(&v[1].lapic);
        v[1].drain_posted(rx.as_ref(), &mut l);
        assert_eq!(l.pending_interrupt(), Some(0x41));
        drop(l);
        assert_eq!(r.ipis_delivered(), 1);
        // Messages for someone else are dropped by the vCPU's own matching.
        {
            let _held = lock(&v[1].lapic);
            r.deliver_local(&fixed(0x42, 0, apic::Shorthand::None));
        }
        assert_eq!(lock(&v[0].lapic).pending_interrupt(), Some(0x42));
        let mut l = lock(&v[1].lapic);
        v[1].drain_posted(rx.as_ref(), &mut l);
        assert_eq!(l.pending_interrupt(), Some(0x41));
    }

    #[test]
    fn router_delivers_ipis_to_matching_apics() {
        let (r, v) = router(3);
        r.send_ipi(0, fixed(0x40, 2, apic::Shorthand::None));
        assert_eq!(lock(&v[2].lapic).pending_interrupt(), Some(0x40));
        assert_eq!(lock(&v[1].lapic).pending_interrupt(), None);
        r.send_ipi(0, fixed(0x50, 0, apic::Shorthand::AllExcludingSelf));
        assert_eq!(lock(&v[1].lapic).pending_interrupt(), Some(0x50));
        assert_eq!(lock(&v[0].lapic).pending_interrupt(), None);
        r.send_ipi(0, fixed(0x60, 0xFF, apic::Shorthand::None)); // broadcast
        assert_eq!(lock(&v[0].lapic).pending_interrupt(), Some(0x60));
        assert_eq!(r.ipis_delivered(), 1 + 2 + 3);
        // Garbage destination: nobody.
        r.send_ipi(0, fixed(0x70, 0x77, apic::Shorthand::None));
        assert_eq!(r.ipis_delivered(), 6);
    }

    #[test]
    fn ioapic_pin_reaches_its_destination() {
        let (r, v) = router(2);
        let mut dev = IoApicDevice(r.clone());
        // Pin 4 -> vector 0x24, edge, physical destination APIC 1.
        dev.write(0x00, &(0x10u32 + 2 * 4 + 1).to_le_bytes());
        dev.write(0x10, &(1u32 << 24).to_le_bytes());
        dev.write(0x00, &(0x10u32 + 2 * 4).to_le_bytes());
        dev.write(0x10, &0x24u32.to_le_bytes());
        r.set_irq(COM1_IRQ, true);
        r.set_irq(COM1_IRQ, false);
        assert_eq!(lock(&v[1].lapic).pending_interrupt(), Some(0x24));
        assert_eq!(lock(&v[0].lapic).pending_interrupt(), None);
        // Out-of-range pin: ignored.
        r.set_irq(99, true);
        let mut id = [0u8; 4];
        dev.write(0x00, &0u32.to_le_bytes());
        dev.read(0x10, &mut id);
        assert_eq!(
            u32::from_le_bytes(id) >> 24,
            2,
            "IOAPIC id = number of vCPUs"
        );
    }

    /// Records what a router hands to the other nodes.
    #[derive(Default)]
    struct FakeRemote {
        forwarded: Mutex<Vec<(u32, InterruptMessage)>>,
        published: Mutex<Vec<(u32, apic::ApicAddressing)>>,
        eois: Mutex<Vec<u8>>,
    }
    impl RemoteInterruptSink for FakeRemote {
        fn forward(&self, vcpu: u32, msg: &InterruptMessage) {
            lock(&self.forwarded).push((vcpu, *msg));
        }
        fn publish_addressing(&self, vcpu: u32, a: &apic::ApicAddressing) {
            lock(&self.published).push((vcpu, *a));
        }
        fn forward_eoi(&self, vector: u8) {
            lock(&self.eois).push(vector);
        }
    }
    impl FakeRemote {
        fn take_forwarded(&self) -> Vec<(u32, InterruptMessage)> {
            std::mem::take(&mut *lock(&self.forwarded))
        }
    }

    /// One node of a 4-vCPU VM running vCPUs 0 and 1 (software-enabled);
    /// vCPUs 2 and 3 are remote.
    fn node0(owns_ioapic: bool) -> (Arc<InterruptRouter>, Vec<Arc<VcpuShared>>, Arc<FakeRemote>) {
        let shared: Vec<Arc<VcpuShared>> = (0..2)
            .map(|i| {
                let mut l = LocalApic::new(i, i == 0, 0);
                l.mmio_write(0xF0, &0x1FFu32.to_le_bytes(), 0);
                Arc::new(VcpuShared::new(i, l))
            })
            .collect();
        let fake = Arc::new(FakeRemote::default());
        let r = Arc::new(InterruptRouter::distributed(
            shared.clone(),
            4,
            crate::ioapic::IoApic::new(4),
            Some(fake.clone() as Arc<dyn RemoteInterruptSink>),
            owns_ioapic,
        ));
        (r, shared, fake)
    }

    /// Program a local LAPIC register the way the vCPU thread does (write, then
    /// report the addressing).
    fn write_local(r: &InterruptRouter, v: &VcpuShared, reg: u64, val: u32) {
        let a = {
            let mut l = lock(&v.lapic);
            l.mmio_write(reg, &val.to_le_bytes(), 0);
            l.addressing()
        };
        r.addressing_changed(v.index, a);
    }

    fn logical(mode: apic::DeliveryMode, vector: u8, dest: u32, x2: bool) -> InterruptMessage {
        let mut m = fixed(vector, dest, apic::Shorthand::None);
        m.delivery_mode = mode;
        m.destination.mode = apic::DestinationMode::Logical;
        m.destination.x2apic_format = x2;
        m
    }

    fn remote_entry(id: u32, ldr: u32, flat: bool, x2: bool) -> apic::ApicAddressing {
        apic::ApicAddressing {
            id,
            ldr,
            flat_model: flat,
            x2apic: x2,
            enabled: true,
            software_enabled: true,
        }
    }

    /// (vCPU, physical destination) of the forwarded messages, checking each is a
    /// resolved physical x2APIC-format message with no shorthand.
    fn targets(f: &[(u32, InterruptMessage)]) -> Vec<(u32, u32)> {
        f.iter()
            .map(|(v, m)| {
                assert_eq!(m.destination.mode, apic::DestinationMode::Physical);
                assert_eq!(m.destination.shorthand, apic::Shorthand::None);
                assert!(m.destination.x2apic_format);
                assert_ne!(m.delivery_mode, apic::DeliveryMode::LowestPriority);
                (*v, m.destination.id)
            })
            .collect()
    }

    #[test]
    fn resolved_targets_flat_logical_across_nodes() {
        let (r, v, fake) = node0(true);
        // Initial table: power-on state of every vCPU (LDR 0: no logical match).
        let t = r.addressing_table();
        assert_eq!(t.len(), 4);
        assert_eq!(t[3], LocalApic::new(3, false, 0).addressing());
        r.send_ipi(
            0,
            logical(apic::DeliveryMode::Fixed, 0x30, 0xFF >> 1, false),
        );
        assert!(fake.take_forwarded().is_empty());
        // Flat model: one bit per vCPU.
        write_local(&r, &v[0], 0xD0, 0x01 << 24);
        write_local(&r, &v[1], 0xD0, 0x02 << 24);
        assert!(r.apply_remote_addressing(2, remote_entry(2, 0x04 << 24, true, false)));
        assert!(r.apply_remote_addressing(3, remote_entry(3, 0x08 << 24, true, false)));
        r.send_ipi(0, logical(apic::DeliveryMode::Fixed, 0x31, 0x0C, false));
        assert_eq!(targets(&fake.take_forwarded()), vec![(2, 2), (3, 3)]);
        assert_eq!(lock(&v[0].lapic).pending_interrupt(), None);
        r.send_ipi(0, logical(apic::DeliveryMode::Fixed, 0x32, 0x05, false));
        assert_eq!(targets(&fake.take_forwarded()), vec![(2, 2)]);
        assert_eq!(lock(&v[0].lapic).pending_interrupt(), Some(0x32));
        assert_eq!(lock(&v[1].lapic).pending_interrupt(), None);
        // The re-encoded message reaches exactly its vCPU on the receiving node.
        let m = resolved_for(
            &logical(apic::DeliveryMode::LowestPriority, 0x33, 0x03, false),
            &r.addressing_table()[1],
        );
        assert_eq!(m.delivery_mode, apic::DeliveryMode::Fixed);
        assert_eq!(r.deliver_local(&m), 1);
        assert_eq!(lock(&v[1].lapic).pending_interrupt(), Some(0x33));
    }

    #[test]
    fn resolved_targets_cluster_logical_across_nodes() {
        let (r, v, fake) = node0(true);
        // Cluster model: cluster 1 = vCPUs 0 (bit 0), 2 (bit 1); cluster 2 = 1, 3.
        for (x, ldr) in [(0usize, 0x11u32), (1, 0x21)] {
            write_local(&r, &v[x], 0xE0, 0x0FFF_FFFF);
            write_local(&r, &v[x], 0xD0, ldr << 24);
        }
        assert!(!r.addressing_table()[0].flat_model);
        r.apply_remote_addressing(2, remote_entry(2, 0x12 << 24, false, false));
        r.apply_remote_addressing(3, remote_entry(3, 0x22 << 24, false, false));
        r.send_ipi(0, logical(apic::DeliveryMode::Fixed, 0x40, 0x13, false));
        assert_eq!(targets(&fake.take_forwarded()), vec![(2, 2)]);
        assert_eq!(lock(&v[0].lapic).pending_interrupt(), Some(0x40));
        r.send_ipi(0, logical(apic::DeliveryMode::Fixed, 0x41, 0x22, false));
        assert_eq!(targets(&fake.take_forwarded()), vec![(3, 3)]);
        assert_eq!(lock(&v[1].lapic).pending_interrupt(), None);
    }

    #[test]
    fn resolved_targets_x2apic_cluster_across_nodes() {
        let (r, v, fake) = node0(true);
        for x in &v {
            let a = {
                let mut l = lock(&x.lapic);
                let bsp = if x.index == 0 { apic::APIC_BASE_BSP } else { 0 };
                l.set_apic_base(
                    apic::APIC_DEFAULT_BASE | apic::APIC_BASE_ENABLE | apic::APIC_BASE_EXTD | bsp,
                )
                .unwrap();
                l.addressing()
            };
            r.addressing_changed(x.index, a);
        }
        // x2APIC LDR: cluster = id >> 4 in 31:16, bit id & 15 in 15:0.
        assert_eq!(r.addressing_table()[1].ldr, 0x0000_0002);
        r.apply_remote_addressing(2, remote_entry(2, 0x0000_0004, false, true));
        r.apply_remote_addressing(3, remote_entry(0x13, 0x0001_0008, false, true));
        r.send_ipi(
            0,
            logical(apic::DeliveryMode::Fixed, 0x50, 0x0000_0006, true),
        );
        assert_eq!(targets(&fake.take_forwarded()), vec![(2, 2)]);
        assert_eq!(lock(&v[1].lapic).pending_interrupt(), Some(0x50));
        r.send_ipi(
            0,
            logical(apic::DeliveryMode::Fixed, 0x51, 0x0001_0008, true),
        );
        assert_eq!(targets(&fake.take_forwarded()), vec![(3, 0x13)]);
        // Cluster 0 bit 3 names nobody (vCPU 3 is in cluster 1).
        r.send_ipi(
            0,
            logical(apic::DeliveryMode::Fixed, 0x52, 0x0000_0008, true),
        );
        assert!(fake.take_forwarded().is_empty());
    }

    #[test]
    fn lowest_priority_picks_exactly_one_vcpu_in_the_whole_vm() {
        let (r, v, fake) = node0(true);
        for (x, bit) in [(0usize, 0x01u32), (1, 0x02)] {
            write_local(&r, &v[x], 0xD0, bit << 24);
        }
        r.apply_remote_addressing(2, remote_entry(2, 0x04 << 24, true, false));
        r.apply_remote_addressing(3, remote_entry(3, 0x08 << 24, true, false));
        // Candidates 1, 2, 3: the local vCPU 1 (lowest ID) alone.
        r.send_ipi(
            0,
            logical(apic::DeliveryMode::LowestPriority, 0x60, 0x0E, false),
        );
        assert!(fake.take_forwarded().is_empty());
        assert_eq!(lock(&v[1].lapic).pending_interrupt(), Some(0x60));
        // Candidates 2, 3 (both remote): one message, to vCPU 2's node only.
        r.send_ipi(
            0,
            logical(apic::DeliveryMode::LowestPriority, 0x61, 0x0C, false),
        );
        assert_eq!(targets(&fake.take_forwarded()), vec![(2, 2)]);
        // A remote vCPU with a lower current ID wins over local ones.
        r.apply_remote_addressing(3, remote_entry(0, 0x08 << 24, true, false));
        write_local(&r, &v[0], 0x20, 5 << 24); // vCPU 0 now has APIC ID 5
        r.send_ipi(
            1,
            logical(apic::DeliveryMode::LowestPriority, 0x62, 0x09, false),
        );
        assert_eq!(targets(&fake.take_forwarded()), vec![(3, 0)]);
        assert_eq!(lock(&v[0].lapic).pending_interrupt(), None);
    }

    #[test]
    fn broadcast_and_shorthands_reach_every_vcpu_once() {
        let (r, v, fake) = node0(true);
        r.send_ipi(0, fixed(0x70, 0xFF, apic::Shorthand::None));
        assert_eq!(targets(&fake.take_forwarded()), vec![(2, 2), (3, 3)]);
        assert_eq!(lock(&v[0].lapic).pending_interrupt(), Some(0x70));
        assert_eq!(lock(&v[1].lapic).pending_interrupt(), Some(0x70));
        r.send_ipi(1, {
            let mut m = fixed(0x71, 0, apic::Shorthand::AllExcludingSelf);
            m.source_id = Some(1);
            m
        });
        assert_eq!(targets(&fake.take_forwarded()), vec![(2, 2), (3, 3)]);
        r.send_ipi(0, fixed(0x72, 0, apic::Shorthand::SelfOnly));
        assert!(fake.take_forwarded().is_empty());
        // Physical to a remote vCPU: its node only.
        r.send_ipi(0, fixed(0x73, 3, apic::Shorthand::None));
        assert_eq!(targets(&fake.take_forwarded()), vec![(3, 3)]);
    }

    #[test]
    fn addressing_updates_are_published_once_and_applied_to_remote_entries() {
        let (r, v, fake) = node0(true);
        write_local(&r, &v[1], 0xD0, 0x02 << 24);
        write_local(&r, &v[1], 0xD0, 0x02 << 24); // no change: nothing sent
        write_local(&r, &v[1], 0xE0, u32::MAX); // DFR already flat: nothing sent
        let p = std::mem::take(&mut *lock(&fake.published));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, 1);
        assert_eq!(p[0].1.ldr, 0x02 << 24);
        // Remote entries only; a node never takes updates for its own vCPUs.
        let a = remote_entry(2, 0x40 << 24, true, false);
        assert!(r.apply_remote_addressing(2, a));
        assert_eq!(r.addressing_table()[2], a);
        assert!(!r.apply_remote_addressing(0, a));
        assert!(!r.apply_remote_addressing(4, a));
        assert!(lock(&fake.published).is_empty());
    }

    #[test]
    fn eoi_is_forwarded_to_the_ioapic_owner() {
        assert_eq!(eoi_route(false, true), EoiRoute::Local);
        assert_eq!(eoi_route(true, true), EoiRoute::Local);
        assert_eq!(eoi_route(true, false), EoiRoute::Forward);
        // A node without the IOAPIC forwards.
        let (r, _v, fake) = node0(false);
        r.eoi(1, 0x25);
        assert_eq!(*lock(&fake.eois), vec![0x25]);
        // The owner: a still-asserted level pin is re-delivered on the EOI.
        let (r, v, fake) = node0(true);
        let mut dev = IoApicDevice(r.clone());
        // Pin 4 -> vector 0x25, level, physical destination APIC 0.
        dev.write(0x00, &(0x10u32 + 2 * 4 + 1).to_le_bytes());
        dev.write(0x10, &0u32.to_le_bytes());
        dev.write(0x00, &(0x10u32 + 2 * 4).to_le_bytes());
        dev.write(0x10, &(0x25u32 | 1 << 15).to_le_bytes());
        r.set_irq(COM1_IRQ, true);
        {
            let mut l = lock(&v[0].lapic);
            assert_eq!(l.pending_interrupt(), Some(0x25));
            l.acknowledge(0x25);
            assert_eq!(l.pending_interrupt(), None);
            let eoi = l.mmio_write(0xB0, &0u32.to_le_bytes(), 0);
            assert_eq!(eoi, apic::ApicAction::EoiLevel(0x25));
        }
        r.remote_eoi(0x25); // as from APP_EOI
        assert_eq!(lock(&v[0].lapic).pending_interrupt(), Some(0x25));
        assert!(lock(&fake.eois).is_empty());
    }

    #[test]
    fn numa_ranges_split_at_the_hole() {
        let ram = GuestRam::new((3u64 << 30) + (1 << 30)).unwrap();
        let nodes = vec![
            NumaNode {
                cpus: vec![0],
                mem_start: 0,
                mem_size: 2 << 30,
            },
            NumaNode {
                cpus: vec![1],
                mem_start: 2 << 30,
                mem_size: 2 << 30,
            },
        ];
        assert_eq!(
            numa_gpa_ranges(&ram, &nodes),
            vec![
                (0, 2 << 30, 0),
                (2 << 30, 1 << 30, 1),
                (crate::memory::HIGH_RAM_START, 1 << 30, 1)
            ]
        );
    }

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
