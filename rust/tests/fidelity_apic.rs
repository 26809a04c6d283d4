//! APIC fidelity at the vCPU exit level (no KVM needed): what the guest sees
//! through `handle_exit` when it disables its APIC, switches to x2APIC mode or
//! writes reserved bits, and how the addressing table replicated on another
//! node follows those changes.

use std::sync::{Arc, Mutex, OnceLock};

use dvmm::apic::{
    ApicAddressing, DeliveryMode, Destination, DestinationMode, InterruptMessage, LocalApic,
    Shorthand, TriggerMode, APIC_BASE_BSP, APIC_BASE_ENABLE, APIC_BASE_EXTD, APIC_DEFAULT_BASE,
};
use dvmm::bus::Bus;
use dvmm::cluster::RemoteInterruptSink;
use dvmm::vcpu::{
    handle_exit, ExitContext, InterruptSink, VcpuAction, VcpuShared, VcpuStats, LAPIC_BASE,
};
use dvmm::vm::InterruptRouter;
use kvm_ioctls::{MsrExitReason, ReadMsrExit, VcpuExit, WriteMsrExit};

const MSR_APIC_BASE: u32 = 0x1B;

/// Runs exits against one LAPIC with `irq` as the interrupt sink.
struct Cpu<'a> {
    vcpu: u32,
    pio: Bus,
    mmio: Bus,
    lapic: &'a Mutex<LocalApic>,
    irq: &'a dyn InterruptSink,
    stats: VcpuStats,
    /// What the last exit reported as written to IA32_APIC_BASE.
    apic_base_written: Option<u64>,
}

impl<'a> Cpu<'a> {
    fn new(vcpu: u32, lapic: &'a Mutex<LocalApic>, irq: &'a dyn InterruptSink) -> Self {
        Cpu {
            vcpu,
            pio: Bus::new(),
            mmio: Bus::new(),
            lapic,
            irq,
            stats: VcpuStats::default(),
            apic_base_written: None,
        }
    }

    fn handle(&mut self, exit: VcpuExit<'_>) -> VcpuAction {
        let mut ctx = ExitContext {
            vcpu: self.vcpu,
            pio: &self.pio,
            mmio: &self.mmio,
            lapic: self.lapic,
            irq: self.irq,
            now_ns: 1_000,
            stats: &mut self.stats,
            debug: false,
            apic_base_written: None,
            kernel_lapic: false,
        };
        let action = handle_exit(exit, &mut ctx).expect("handle_exit");
        self.apic_base_written = ctx.apic_base_written;
        action
    }

    fn mmio_read(&mut self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        assert_eq!(
            self.handle(VcpuExit::MmioRead(LAPIC_BASE + offset, &mut d)),
            VcpuAction::Continue
        );
        u32::from_le_bytes(d)
    }

    fn mmio_write(&mut self, offset: u64, value: u32) {
        assert_eq!(
            self.handle(VcpuExit::MmioWrite(
                LAPIC_BASE + offset,
                &value.to_le_bytes()
            )),
            VcpuAction::Continue
        );
    }

    /// `wrmsr`; true if it raised #GP.
    fn wrmsr(&mut self, index: u32, data: u64) -> bool {
        let mut error = 0u8;
        self.handle(VcpuExit::X86Wrmsr(WriteMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index,
            data,
        }));
        error != 0
    }

    /// `rdmsr`; `None` if it raised #GP.
    fn rdmsr(&mut self, index: u32) -> Option<u64> {
        let (mut error, mut data) = (0u8, 0u64);
        self.handle(VcpuExit::X86Rdmsr(ReadMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index,
            data: &mut data,
        }));
        (error == 0).then_some(data)
    }
}

/// Records what a LAPIC hands to its sink.
#[derive(Default)]
struct Recorder {
    ipis: Mutex<Vec<InterruptMessage>>,
    addressing: Mutex<Vec<(u32, ApicAddressing)>>,
}

impl InterruptSink for Recorder {
    fn send_ipi(&self, _from: u32, msg: InterruptMessage) {
        self.ipis.lock().unwrap().push(msg);
    }
    fn eoi(&self, _from: u32, _vector: u8) {}
    fn addressing_changed(&self, from: u32, now: ApicAddressing) {
        self.addressing.lock().unwrap().push((from, now));
    }
}

#[test]
fn apic_page_does_not_decode_while_disabled_or_x2apic() {
    let lapic = Mutex::new(LocalApic::new(0, true, 0));
    let sink = Recorder::default();
    let mut cpu = Cpu::new(0, &lapic, &sink);
    let bsp = APIC_DEFAULT_BASE | APIC_BASE_BSP;

    cpu.mmio_write(0xF0, 0x1FF);
    cpu.mmio_write(0x80, 0x20);
    assert_eq!(cpu.mmio_read(0x80), 0x20);

    // EN cleared: reads all ones, writes (even an ICR write) dropped.
    assert!(!cpu.wrmsr(MSR_APIC_BASE, bsp));
    for off in [0x20, 0x30, 0x80, 0xF0, 0x300, 0xFF0] {
        assert_eq!(cpu.mmio_read(off), u32::MAX, "offset {off:#x}");
    }
    let mut byte = [0u8; 1];
    cpu.handle(VcpuExit::MmioRead(LAPIC_BASE + 0x30, &mut byte));
    assert_eq!(byte, [0xFF]);
    cpu.mmio_write(0x310, 1 << 24);
    cpu.mmio_write(0x300, 0x4030);
    cpu.mmio_write(0x80, 0x40);
    assert!(sink.ipis.lock().unwrap().is_empty());
    assert_eq!(lapic.lock().unwrap().tpr(), 0);
    // No device behind the page: nothing counted as unknown MMIO either.
    assert_eq!(cpu.stats.unknown_mmio, 0);

    // EN set again (xAPIC): the page decodes, registers in their reset state.
    assert!(!cpu.wrmsr(MSR_APIC_BASE, bsp | APIC_BASE_ENABLE));
    assert_eq!(cpu.mmio_read(0x30), dvmm::apic::APIC_VERSION);
    assert_eq!(cpu.mmio_read(0xF0), 0xFF);

    // x2APIC mode: the MMIO page does not decode; the MSRs answer.
    cpu.mmio_write(0x80, 0x30);
    assert!(!cpu.wrmsr(MSR_APIC_BASE, bsp | APIC_BASE_ENABLE | APIC_BASE_EXTD));
    assert_eq!(cpu.mmio_read(0x80), u32::MAX);
    cpu.mmio_write(0x80, 0x50);
    assert_eq!(cpu.rdmsr(0x808), Some(0x30));
}

/// The xAPIC page decodes wherever IA32_APIC_BASE puts it (SDM 11.4.4); the
/// default page then holds nothing. Every write that changes the MSR is reported
/// to the run loop (which mirrors it into KVM, see tests/fidelity_cpuid.rs); a
/// write that changes nothing or #GPs is not.
#[test]
fn apic_base_relocation_moves_the_page_and_writes_are_reported() {
    let lapic = Mutex::new(LocalApic::new(0, true, 0));
    let sink = Recorder::default();
    let mut cpu = Cpu::new(0, &lapic, &sink);
    let moved = 0xFED4_0000u64;
    let bsp = APIC_BASE_BSP | APIC_BASE_ENABLE;
    let read_at = |cpu: &mut Cpu<'_>, addr: u64| {
        let mut d = [0u8; 4];
        cpu.handle(VcpuExit::MmioRead(addr, &mut d));
        u32::from_le_bytes(d)
    };

    assert!(!cpu.wrmsr(MSR_APIC_BASE, moved | bsp));
    assert_eq!(cpu.apic_base_written, Some(moved | bsp));
    assert_eq!(cpu.rdmsr(MSR_APIC_BASE), Some(moved | bsp));
    assert_eq!(read_at(&mut cpu, moved + 0x30), dvmm::apic::APIC_VERSION);
    assert_eq!(read_at(&mut cpu, LAPIC_BASE + 0x30), u32::MAX);
    cpu.handle(VcpuExit::MmioWrite(moved + 0x80, &0x70u32.to_le_bytes()));
    cpu.handle(VcpuExit::MmioWrite(
        LAPIC_BASE + 0x80,
        &0x20u32.to_le_bytes(),
    ));
    assert_eq!(lapic.lock().unwrap().tpr(), 0x70, "old page: write dropped");
    assert_eq!(cpu.stats.unknown_mmio, 0);

    // Unchanged value, a #GP: nothing to mirror.
    assert!(!cpu.wrmsr(MSR_APIC_BASE, moved | bsp));
    assert_eq!(cpu.apic_base_written, None);
    assert!(cpu.wrmsr(MSR_APIC_BASE, moved | bsp | 1));
    assert_eq!(cpu.apic_base_written, None);
    assert!(cpu.wrmsr(MSR_APIC_BASE, moved | APIC_BASE_BSP | APIC_BASE_EXTD));
    assert_eq!(cpu.apic_base_written, None);

    // Disabled: the moved page is plain (unbacked) MMIO.
    assert!(!cpu.wrmsr(MSR_APIC_BASE, moved | APIC_BASE_BSP));
    assert_eq!(cpu.apic_base_written, Some(moved | APIC_BASE_BSP));
    assert_eq!(read_at(&mut cpu, moved + 0x30), u32::MAX);
    assert_eq!(cpu.stats.unknown_mmio, 1);

    // Back home.
    assert!(!cpu.wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE | bsp));
    assert_eq!(
        read_at(&mut cpu, LAPIC_BASE + 0x30),
        dvmm::apic::APIC_VERSION
    );
}

#[test]
fn x2apic_self_ipi_reserved_bits_raise_gp() {
    let lapic = Mutex::new(LocalApic::new(0, true, 0));
    let sink = Recorder::default();
    let mut cpu = Cpu::new(0, &lapic, &sink);
    let base = APIC_DEFAULT_BASE | APIC_BASE_BSP | APIC_BASE_ENABLE;
    assert!(!cpu.wrmsr(MSR_APIC_BASE, base | APIC_BASE_EXTD));
    assert!(!cpu.wrmsr(0x80F, 0x1FF));
    for bad in [0x140u64, 0xFFFF_0040, 1 << 40 | 0x40] {
        assert!(cpu.wrmsr(0x83F, bad), "SELF_IPI {bad:#x} must #GP");
    }
    assert_eq!(cpu.stats.msr_gp, 3);
    assert!(!lapic.lock().unwrap().irr_contains(0x40));
    assert!(!cpu.wrmsr(0x83F, 0x40));
    assert!(lapic.lock().unwrap().irr_contains(0x40));
}

#[test]
fn en_and_svr_toggles_report_addressing() {
    let lapic = Mutex::new(LocalApic::new(1, false, 0));
    let sink = Recorder::default();
    let mut cpu = Cpu::new(1, &lapic, &sink);
    let taken = || std::mem::take(&mut *sink.addressing.lock().unwrap());

    cpu.mmio_write(0xF0, 0x1FF);
    let r = taken();
    assert_eq!(r.len(), 1);
    assert!(r[0].1.enabled && r[0].1.software_enabled);

    assert!(!cpu.wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE));
    let r = taken();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, 1);
    assert!(!r[0].1.enabled);
    assert!(!r[0].1.software_enabled, "disabling resets SVR");

    assert!(!cpu.wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE | APIC_BASE_ENABLE));
    let r = taken();
    assert_eq!(r.len(), 1);
    assert!(r[0].1.enabled && !r[0].1.software_enabled);

    // A write that changes nothing reports nothing.
    cpu.mmio_write(0x80, 0x10);
    assert!(taken().is_empty());
}

/// A [`RemoteInterruptSink`] that hands addressing updates straight to the
/// router of the other node and records forwarded messages.
#[derive(Default)]
struct Link {
    peer: OnceLock<Arc<InterruptRouter>>,
    forwarded: Mutex<Vec<(u32, InterruptMessage)>>,
}

impl RemoteInterruptSink for Link {
    fn forward(&self, vcpu: u32, msg: &InterruptMessage) -> bool {
        self.forwarded.lock().unwrap().push((vcpu, *msg));
        true
    }
    fn publish_addressing(&self, vcpu: u32, a: &ApicAddressing) {
        if let Some(p) = self.peer.get() {
            assert!(p.apply_remote_addressing(vcpu, *a));
        }
    }
    fn forward_eoi(&self, _vector: u8) {}
}

fn node(vcpus: &[u32], link: &Arc<Link>) -> (Arc<InterruptRouter>, Vec<Arc<VcpuShared>>) {
    let shared: Vec<Arc<VcpuShared>> = vcpus
        .iter()
        .map(|&i| Arc::new(VcpuShared::new(i, LocalApic::new(i, i == 0, 0))))
        .collect();
    let r = Arc::new(InterruptRouter::distributed(
        shared.clone(),
        4,
        dvmm::ioapic::IoApic::new(4),
        Some(link.clone() as Arc<dyn RemoteInterruptSink>),
        vcpus.contains(&0),
    ));
    (r, shared)
}

#[test]
fn remote_table_follows_en_and_svr_and_lowest_priority_skips_disabled() {
    let (a_link, b_link) = (Arc::new(Link::default()), Arc::new(Link::default()));
    let (a, a_vcpus) = node(&[0, 1], &a_link);
    let (b, b_vcpus) = node(&[2, 3], &b_link);
    let _ = a_link.peer.set(b.clone());
    let _ = b_link.peer.set(a.clone());

    // Every vCPU software-enables its APIC with logical ID bit i (flat).
    let mut cpus_a: Vec<Cpu<'_>> = a_vcpus
        .iter()
        .map(|v| Cpu::new(v.index, &v.lapic, a.as_ref()))
        .collect();
    let mut cpus_b: Vec<Cpu<'_>> = b_vcpus
        .iter()
        .map(|v| Cpu::new(v.index, &v.lapic, b.as_ref()))
        .collect();
    for c in cpus_a.iter_mut().chain(cpus_b.iter_mut()) {
        c.mmio_write(0xD0, 1 << (24 + c.vcpu));
        c.mmio_write(0xF0, 0x1FF);
    }
    let same_tables = |a: &InterruptRouter, b: &InterruptRouter| {
        let (ta, tb) = (a.addressing_table(), b.addressing_table());
        assert_eq!(ta, tb, "both nodes see the same addressing");
        ta
    };
    let t = same_tables(&a, &b);
    assert!(t.iter().all(|e| e.enabled && e.software_enabled));

    let lowest = InterruptMessage {
        vector: 0x41,
        delivery_mode: DeliveryMode::LowestPriority,
        trigger_mode: TriggerMode::Edge,
        level: true,
        destination: Destination {
            id: 0b0110,
            mode: DestinationMode::Logical,
            shorthand: Shorthand::None,
            x2apic_format: false,
        },
        source_id: None,
    };
    let target =
        |r: &InterruptRouter| -> Vec<u32> { r.resolve(&lowest).iter().map(|(v, _)| *v).collect() };
    assert_eq!(target(&a), vec![1]);
    assert_eq!(target(&b), vec![1]);

    // vCPU 1 software-disables its APIC: both nodes now pick vCPU 2.
    cpus_a[1].mmio_write(0xF0, 0xFF);
    let t = same_tables(&a, &b);
    assert!(t[1].enabled && !t[1].software_enabled);
    assert_eq!(target(&a), vec![2]);
    assert_eq!(target(&b), vec![2]);

    // vCPU 1 clears IA32_APIC_BASE.EN, then sets it again and software-enables.
    assert!(!cpus_a[1].wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE));
    let t = same_tables(&a, &b);
    assert!(!t[1].enabled);
    assert_eq!(target(&b), vec![2]);
    assert!(!cpus_a[1].wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE | APIC_BASE_ENABLE));
    let t = same_tables(&a, &b);
    assert!(t[1].enabled && !t[1].software_enabled);
    assert_eq!(t[1].ldr, 0, "disabling reset the LDR");
    cpus_a[1].mmio_write(0xD0, 1 << 25);
    cpus_a[1].mmio_write(0xF0, 0x1FF);
    same_tables(&a, &b);
    assert_eq!(target(&a), vec![1]);
    assert_eq!(target(&b), vec![1]);

    // vCPU 2 (remote for node A) disabled as well as 1: nothing else matches,
    // so the lowest ID (which drops it) is still the one chosen.
    cpus_a[1].mmio_write(0xF0, 0xFF);
    cpus_b[0].mmio_write(0xF0, 0xFF);
    same_tables(&a, &b);
    assert_eq!(target(&a), vec![1]);
    assert_eq!(target(&b), vec![1]);
}

/// An NMI IPI written by a vCPU on node A reaches exactly its target on node B, as
/// the cluster carries it: resolved on A, forwarded, re-encoded on the wire
/// (`to_bytes`/`from_bytes`), delivered by B's router (the end-to-end run is the
/// guest's `conform` NMI ring, tests/test_conform.py). A globally disabled target
/// takes none.
#[test]
fn nmi_ipi_crosses_nodes() {
    let (a_link, b_link) = (Arc::new(Link::default()), Arc::new(Link::default()));
    let (a, a_vcpus) = node(&[0, 1], &a_link);
    let (b, b_vcpus) = node(&[2, 3], &b_link);
    let _ = a_link.peer.set(b.clone());
    let _ = b_link.peer.set(a.clone());
    let x2 = APIC_DEFAULT_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD;
    let mut cpu0 = Cpu::new(0, &a_vcpus[0].lapic, a.as_ref());
    assert!(!cpu0.wrmsr(MSR_APIC_BASE, x2 | APIC_BASE_BSP));
    let carry = |link: &Link, to: &InterruptRouter| -> usize {
        let msgs = std::mem::take(&mut *link.forwarded.lock().unwrap());
        msgs.iter()
            .map(|(_, m)| to.deliver_local(&InterruptMessage::from_bytes(&m.to_bytes()).unwrap()))
            .sum()
    };

    // x2APIC ICR: NMI (delivery mode 100), physical destination 2.
    assert!(!cpu0.wrmsr(0x830, (2u64 << 32) | 0x400));
    let fwd = a_link.forwarded.lock().unwrap().clone();
    assert_eq!(fwd.len(), 1, "{fwd:?}");
    assert_eq!((fwd[0].0, fwd[0].1.delivery_mode), (2, DeliveryMode::Nmi));
    assert_eq!(carry(&a_link, &b), 1);
    assert!(
        b_vcpus[0].lapic.lock().unwrap().take_nmi(),
        "vCPU 2 took the NMI"
    );
    assert!(!b_vcpus[1].lapic.lock().unwrap().take_nmi());
    for v in &a_vcpus {
        assert!(!v.lapic.lock().unwrap().take_nmi());
    }

    // vCPU 3 clears IA32_APIC_BASE.EN (node A learns it): an NMI for it is dropped.
    let mut cpu3 = Cpu::new(3, &b_vcpus[1].lapic, b.as_ref());
    assert!(!cpu3.wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE));
    assert!(!a.addressing_table()[3].enabled);
    assert!(!cpu0.wrmsr(0x830, (3u64 << 32) | 0x400));
    assert_eq!(carry(&a_link, &b), 0);
    assert!(!b_vcpus[1].lapic.lock().unwrap().take_nmi());
}
