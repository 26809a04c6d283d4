//! Building a VM (or one node's share of a distributed VM) from its spec: the
//! KVM VM and its capabilities, guest RAM, the cluster link, the vCPUs with
//! their LAPICs and CPUID, the interrupt router, buses and devices, the ACPI
//! tables and the kernel.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

use super::checkpoint::{self, CheckpointError};
use super::routing::{InterruptRouter, IoApicDevice};
use super::snapshot::Snapshot;
use super::{kvm_op, VmError, VmSpec};
use crate::apic::{self, LocalApic};
use crate::bus::Bus;
use crate::cluster::RemoteInterruptSink;
use crate::cpuid::{self, CpuidConfig};
use crate::devices::{
    ConsoleInput, ConsoleWriter, DebugExit, IrqLine, Serial, COM1_IRQ, COM1_PORT, DEBUG_EXIT_PORT,
};
use crate::memory::GuestRam;
use crate::numa::numa_gpa_ranges;
use crate::vcpu::{Vcpu, VcpuEnv, VcpuShared, VmClock, VmStop};

/// Guest-physical base of the IOAPIC.
pub const IOAPIC_BASE: u64 = crate::ioapic::IOAPIC_DEFAULT_BASE;
/// Size of the IOAPIC MMIO window.
pub const IOAPIC_SIZE: u64 = crate::ioapic::IOAPIC_MMIO_SIZE;

/// A VM ready to run.
pub struct Vm {
    pub(super) spec: VmSpec,
    pub(super) _kvm: Kvm,
    pub(super) _vm: Arc<VmFd>,
    pub(super) router: Arc<InterruptRouter>,
    pub(super) shared: Vec<Arc<VcpuShared>>,
    pub(super) vcpus: Vec<Vcpu>,
    pub(super) serial: Option<Arc<Mutex<Serial>>>,
    /// Console input (boot node only), started by `run`.
    pub(super) console_input: Option<ConsoleInput>,
    pub(super) stop: Arc<VmStop>,
    /// The LAPIC time base (shared with the vCPUs; pause stops it).
    pub(super) clock: VmClock,
    pub(super) setup: Duration,
    /// The buses (also served to other nodes by the cluster thread).
    pub(super) pio: Bus,
    pub(super) mmio: Bus,
    /// Restored from a snapshot (its vCPUs start when every node has loaded).
    pub(super) restored: bool,
    /// The vCPUs' CPUID offers the TSC-deadline timer (see `offer_tsc_deadline`).
    pub(super) tsc_deadline: bool,
    /// Distributed VM: the link to the other nodes. Declared before `ram`: the
    /// engine must stop before the mappings go away.
    pub(super) cluster: Option<Arc<crate::cluster::Cluster>>,
    pub(super) ram: GuestRam,
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
        if kernel_lapic && (spec.restore.is_some() || spec.snapshot.is_some()) {
            return Err(CheckpointError::KernelLapic.into());
        }
        // A snapshot to restore is checked whole before anything is built.
        let restore = match &spec.restore {
            Some(d) => {
                let s = Snapshot::open(Path::new(d)).map_err(CheckpointError::from)?;
                checkpoint::check_spec(&s, &spec)?;
                Some(s)
            }
            None => None,
        };

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
            Some(c) => Some(crate::cluster::Cluster::start(
                c,
                &numa,
                n,
                &ram,
                stop.clone(),
            )?),
            None => None,
        };
        let is_boot = cluster.as_ref().is_none_or(|c| c.is_boot());
        // The vCPUs this node runs (APIC IDs are global).
        let local: Vec<u32> = match &spec.cluster {
            Some(c) => c.placement_of(&numa).vcpus_of(c.node_index),
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
        // A distributed VM has every vCPU on every node, parked where it does
        // not run, so that one can migrate to any node (vm::migrate).
        let all: Vec<u32> = if cluster.is_some() {
            (0..n).collect()
        } else {
            local.clone()
        };
        let clock = VmClock::new();
        let mut fds = Vec::with_capacity(all.len());
        for &i in &all {
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
        // A restored VM keeps the CPU it was booted with, wherever it runs now.
        let tsc_deadline = match &restore {
            Some(s) => s.manifest.tsc_deadline,
            None => offer_tsc_deadline(spec.cluster.is_some()),
        };
        let shared: Vec<Arc<VcpuShared>> = all
            .iter()
            .map(|&i| {
                let mut l = LocalApic::new(i, i == 0, tsc_khz);
                l.set_tsc_deadline_supported(tsc_deadline);
                if let Some(t) = tsc_now {
                    l.set_tsc_reference(now, t);
                }
                let s = Arc::new(VcpuShared::new(i, l));
                if !local.contains(&i) {
                    s.set_resident(false, &crate::sync::lock(&s.lapic));
                }
                s
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
        let boot = if is_boot && restore.is_none() {
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
            msr_index: snapshot_msrs(&kvm),
        });
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_op("KVM_GET_SUPPORTED_CPUID"))?;
        let cfg = CpuidConfig {
            total_vcpus: n,
            tsc_deadline,
            model: spec.cpu_model()?,
            l3_shared: spec.numa_nodes().len() <= 1,
        };
        let mut vcpus = Vec::with_capacity(local.len());
        for (k, fd) in fds.into_iter().enumerate() {
            let i = all[k];
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
            let mut v = Vcpu::new(
                fd,
                shared[k].clone(),
                env.clone(),
                i == 0,
                reset_regs,
                reset_sregs,
            );
            if let Some(s) = restore.as_ref().filter(|_| local.contains(&i)) {
                let saved = s.vcpu(i).map_err(CheckpointError::from)?;
                v.restore(&saved, clock.now_ns())
                    .map_err(|source| CheckpointError::Restore { vcpu: i, source })?;
            }
            vcpus.push(v);
        }
        if let Some(s) = &restore {
            restore_rest(s, &vm, &ram, &spec, serial.as_ref(), &router)?;
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
            restored: restore.is_some(),
            tsc_deadline,
            cluster,
            ram,
        })
    }

    /// The VM's guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The interrupt router (e.g. for remote deliveries).
    pub fn router(&self) -> &Arc<InterruptRouter> {
        &self.router
    }
}

/// The rest of a restore, after the vCPUs: the boot node's devices, kvm-clock,
/// and the RAM this node is home of.
fn restore_rest(
    s: &Snapshot,
    vm: &VmFd,
    ram: &GuestRam,
    spec: &VmSpec,
    serial: Option<&Arc<Mutex<Serial>>>,
    router: &InterruptRouter,
) -> Result<(), VmError> {
    if let Some(serial) = serial {
        let dev = s.devices().map_err(CheckpointError::from)?;
        crate::sync::lock(serial)
            .set_regs(&dev.com1)
            .map_err(CheckpointError::from)?;
        router.set_ioapic_state(dev.ioapic);
    }
    if let Some(ns) = s.manifest.kvmclock_ns {
        let c = kvm_bindings::kvm_clock_data {
            clock: ns,
            ..Default::default()
        };
        vm.set_clock(&c).map_err(|err| CheckpointError::Kvm {
            what: "KVM_SET_CLOCK",
            err,
        })?;
    }
    let range = match &spec.cluster {
        Some(c) => c.placement_of(&spec.numa_nodes()).home(c.node_index),
        None => 0..spec.memory,
    };
    checkpoint::load_memory(
        s,
        &range,
        &ram.memfd_file(),
        ram.guest_base(),
        spec.cluster.is_some(),
    )?;
    Ok(())
}

/// The MSRs a snapshot saves: what KVM can save and restore, less those the
/// userspace LAPIC answers (it saves them itself).
fn snapshot_msrs(kvm: &Kvm) -> Vec<u32> {
    let lapic = |m: u32| {
        m == apic::MSR_IA32_APIC_BASE
            || m == apic::MSR_IA32_TSC_DEADLINE
            || (apic::X2APIC_MSR_FIRST..apic::X2APIC_MSR_FIRST + 256).contains(&m)
    };
    kvm.get_msr_index_list()
        .map(|l| {
            l.as_slice()
                .iter()
                .copied()
                .filter(|&m| !lapic(m))
                .collect()
        })
        .unwrap_or_default()
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
    let tables = build_tables(&layout, ACPI_TABLES_BASE)?;
    for (gpa, blob) in &tables.blobs {
        ram.guest_memory()
            .write_slice(blob, GuestAddress(*gpa))
            .map_err(|source| VmError::AcpiWrite { gpa: *gpa, source })?;
    }
    Ok(tables.rsdp_addr)
}

/// Whether the vCPUs' CPUID offers the TSC-deadline timer: only when the VM runs
/// in one process (`DVMM_TSC_DEADLINE=1` / `=0` forces it either way, for A/B
/// runs).
///
/// Why not in a distributed VM: a vCPU there stalls on remote pages, and the
/// timekeeping data one guest CPU writes every tick and the others read crosses
/// the nodes every tick, so a guest tick can outlast its period (measured on 2
/// nodes of a PVM host: a tick of Linux's 4 ms period took 5-7 ms under tracing,
/// about 3 ms without, 1-1.5 ms of it DSM stalls on the jiffies and timekeeper
/// pages, with a tail of longer ones). A LAPIC that has only one-shot deadlines
/// makes Linux run its boot-time periodic tick from one-shot events, and once
/// its clocksource is high-resolution `tick_handle_periodic` replays every missed
/// period in a loop with interrupts off: a tick slower than its period never
/// leaves it (a plain 2-node boot had both CPUs in that loop for good after
/// switching to kvm-clock; README.md, "Linux guests"). The LAPIC's periodic
/// mode, which every local APIC has, coalesces missed periods as hardware does,
/// and Linux's tick leaves it for one-shot high-resolution mode with the same
/// switch, so the guest loses nothing but the deadline mode's precision.
fn offer_tsc_deadline(distributed: bool) -> bool {
    match std::env::var("DVMM_TSC_DEADLINE").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => !distributed,
    }
}
