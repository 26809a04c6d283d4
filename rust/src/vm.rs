//! One VM (or, in a distributed VM, one node's share of it): KVM VM without the
//! in-kernel irqchip, guest RAM, buses and devices, ACPI tables, the kernel, the vCPU
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

    /// Check everything that can be checked without KVM.
    pub fn validate(&self) -> Result<(), VmError> {
        let bad = |m: String| Err(VmError::InvalidSpec(m));
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

/// Hook for a distributed VM: forwards interrupt messages whose destination may
/// include vCPUs that live on other nodes. The receiving node hands them to
/// [`InterruptRouter::deliver_local`].
pub trait RemoteInterruptSink: Send + Sync {
    /// Forward `msg` (an IPI or an IOAPIC interrupt) to the other nodes;
    /// `delivered_locally` local APICs already accepted it.
    fn forward(&self, msg: &InterruptMessage, delivered_locally: usize);
}

/// Delivers interrupt messages (ICR writes, IOAPIC pins) to the matching local APICs
/// and kicks their vCPUs; forwards to other nodes through a [`RemoteInterruptSink`].
pub struct InterruptRouter {
    vcpus: Vec<Arc<VcpuShared>>,
    ioapic: Mutex<crate::ioapic::IoApic>,
    remote: Option<Arc<dyn RemoteInterruptSink>>,
    ipis_delivered: std::sync::atomic::AtomicU64,
    irqs_raised: std::sync::atomic::AtomicU64,
}

impl InterruptRouter {
    /// A router for the local vCPUs `vcpus` (each with its global APIC ID).
    pub fn new(
        vcpus: Vec<Arc<VcpuShared>>,
        ioapic: crate::ioapic::IoApic,
        remote: Option<Arc<dyn RemoteInterruptSink>>,
    ) -> Self {
        InterruptRouter {
            vcpus,
            ioapic: Mutex::new(ioapic),
            remote,
            ipis_delivered: Default::default(),
            irqs_raised: Default::default(),
        }
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
                        continue;
                    }
                };
                if accepted {
                    n += 1;
                    v.kick();
                }
            }
        }
        self.ipis_delivered
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }

    fn route(&self, msg: &InterruptMessage) {
        let n = self.deliver_local(msg);
        if let Some(r) = &self.remote {
            if msg.destination.shorthand != apic::Shorthand::SelfOnly {
                r.forward(msg, n);
            }
        }
    }

    /// Guest access to the IOAPIC window.
    fn ioapic_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.ioapic).mmio_read(offset, data);
    }

    fn ioapic_write(&self, offset: u64, data: &[u8]) {
        let msgs = lock(&self.ioapic).mmio_write(offset, data);
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
        let msgs = lock(&self.ioapic).end_of_interrupt(vector);
        for m in msgs {
            self.route(&m);
        }
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
}

impl VmControl {
    /// Ask every vCPU to pause (returns at once; see [`VmControl::states`]).
    pub fn pause(&self) {
        self.vcpus.iter().for_each(|v| v.pause());
    }
    /// Resume every paused vCPU.
    pub fn resume(&self) {
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
    _vm: VmFd,
    router: Arc<InterruptRouter>,
    shared: Vec<Arc<VcpuShared>>,
    vcpus: Vec<Vcpu>,
    serial: Option<Arc<Mutex<Serial>>>,
    /// Console input (boot node only), started by `run`.
    console_input: Option<ConsoleInput>,
    stop: Arc<VmStop>,
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
        install_msr_filter(&vm)?;

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

        let ioapic = crate::ioapic::IoApic::new(n as u8);
        let remote = cluster.clone().map(|c| c as Arc<dyn RemoteInterruptSink>);
        let router = Arc::new(InterruptRouter::new(shared.clone(), ioapic, remote));

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
            Some(crate::boot::load_kernel(
                mem,
                spec.memory,
                Path::new(&spec.kernel),
                spec.initrd.as_deref().map(Path::new),
                spec.cmdline.as_deref().unwrap_or(""),
                rsdp,
            )?)
        } else {
            None
        };

        // vCPUs.
        let env = Arc::new(VcpuEnv {
            pio: pio.clone(),
            mmio: mmio.clone(),
            irq: router.clone(),
            clock,
            stop: stop.clone(),
            debug: spec.debug || std::env::var_os("DVMM_DEBUG").is_some(),
        });
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_op("KVM_GET_SUPPORTED_CPUID"))?;
        let cfg = CpuidConfig {
            total_vcpus: n,
            tsc_deadline: true,
        };
        let mut vcpus = Vec::with_capacity(local.len());
        for (k, fd) in fds.into_iter().enumerate() {
            let i = local[k];
            let c = cpuid::vcpu_cpuid(&supported, i, &cfg)?;
            fd.set_cpuid2(&c)
                .map_err(kvm_op(format!("KVM_SET_CPUID2 on vCPU {i}")))?;
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
