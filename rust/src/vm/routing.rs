//! Interrupt routing: the [`InterruptRouter`] delivers interrupt messages (ICR
//! writes, IOAPIC pins, EOIs) to the local APICs they are for and, in a
//! distributed VM, resolves and forwards the remote targets through the
//! cluster link ([`RemoteInterruptSink`]).

use std::sync::{Arc, Mutex};

use super::VmError;
use crate::apic::{self, InterruptMessage, LocalApic};
use crate::bus::BusDevice;
use crate::cluster::{LocalInterrupts, RemoteInterruptSink};
use crate::devices::IrqLine;
use crate::sync::lock;
use crate::vcpu::{InterruptSink, VcpuShared};

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
    /// A vCPU this node does not run (a distributed VM keeps a parked replica
    /// of every vCPU, `vm::migrate`) gets it posted: its thread hands it on to
    /// the node that runs it, or keeps it for when it starts here.
    fn deliver_one(v: &VcpuShared, msg: &InterruptMessage) -> bool {
        // Never wait for a LAPIC lock: the caller may be the (real-time) DSM
        // engine thread and the holder a preempted vCPU thread. A busy LAPIC
        // gets the message posted; its vCPU applies it before it next looks
        // at its LAPIC (the kick makes that immediate).
        let accepted = match v.lapic.try_lock() {
            // Residency changes under this lock: a message accepted here is
            // in the state a migration captures next.
            Ok(mut l) if v.is_resident() => l.matches(msg) && l.accept(msg),
            Err(std::sync::TryLockError::Poisoned(e)) if v.is_resident() => {
                let mut l = e.into_inner();
                l.matches(msg) && l.accept(msg)
            }
            _ => {
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
            let here: Vec<&Arc<VcpuShared>> =
                self.vcpus.iter().filter(|v| v.is_resident()).collect();
            let addrs: Vec<apic::ApicAddressing> =
                here.iter().map(|v| lock(&v.lapic).addressing()).collect();
            for i in apic::route_targets(msg, &addrs) {
                if let Some(v) = here.get(i) {
                    if lock(&v.lapic).accept(msg) {
                        n += 1;
                    }
                    v.kick();
                }
            }
        } else {
            for v in self.vcpus.iter().filter(|v| v.is_resident()) {
                if Self::deliver_one(v, msg) {
                    n += 1;
                }
            }
        }
        self.ipis_delivered
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }

    /// Deliver `msg`, resolved for exactly vCPU `vcpu`: to its LAPIC if this
    /// node runs it, on to the node that does if not. False if the VM has no
    /// such vCPU.
    pub fn deliver_to(&self, vcpu: u32, msg: &InterruptMessage) -> bool {
        let Some(pos) = self.local.get(vcpu as usize).copied().flatten() else {
            return false;
        };
        let v = &self.vcpus[pos];
        // The common case of a vCPU that runs elsewhere: straight on (a replica
        // that becomes resident meanwhile gets it posted, see `deliver_one`).
        if !v.is_resident() && self.remote.as_ref().is_some_and(|r| r.forward(vcpu, msg)) {
            return true;
        }
        if Self::deliver_one(v, msg) {
            self.ipis_delivered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        true
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
        for (vcpu, m) in self.resolve(msg) {
            if !self.deliver_to(vcpu, &m) {
                // Not in this node's table (a VM without replicas): its node.
                remote.forward(vcpu, &m);
            }
        }
    }

    /// Apply an addressing update of remote vCPU `vcpu` (from `APP_ADDR`); false
    /// if `vcpu` is not a vCPU of the VM or runs on this node.
    pub fn apply_remote_addressing(&self, vcpu: u32, a: apic::ApicAddressing) -> bool {
        let here = self.local.get(vcpu as usize).copied().flatten();
        if here.is_some_and(|pos| self.vcpus[pos].is_resident()) {
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

    /// The IOAPIC's state (snapshots; the node that owns it).
    pub fn ioapic_state(&self) -> crate::ioapic::IoApic {
        lock(&self.ioapic).clone()
    }
    /// Put the IOAPIC's state back (restore of a snapshot; before any vCPU runs).
    pub fn set_ioapic_state(&self, s: crate::ioapic::IoApic) {
        *lock(&self.ioapic) = s;
    }
    /// Whether this node has the IOAPIC.
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

    /// Device interrupt lines raised so far.
    pub fn irqs_raised(&self) -> u64 {
        self.irqs_raised.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// IPIs delivered so far (local acceptances).
    pub fn ipis_delivered(&self) -> u64 {
        self.ipis_delivered
            .load(std::sync::atomic::Ordering::Relaxed)
            + self.vcpus.iter().map(|v| v.posted_accepted()).sum::<u64>()
    }
}

impl LocalInterrupts for InterruptRouter {
    fn deliver_local(&self, msg: &InterruptMessage) -> usize {
        InterruptRouter::deliver_local(self, msg)
    }
    fn deliver_to(&self, vcpu: u32, msg: &InterruptMessage) -> bool {
        InterruptRouter::deliver_to(self, vcpu, msg)
    }
    fn apply_remote_addressing(&self, vcpu: u32, a: apic::ApicAddressing) -> bool {
        InterruptRouter::apply_remote_addressing(self, vcpu, a)
    }
    fn remote_eoi(&self, vector: u8) {
        InterruptRouter::remote_eoi(self, vector)
    }
    fn owns_ioapic(&self) -> bool {
        InterruptRouter::owns_ioapic(self)
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
    fn redirect(&self, vcpu: u32, msg: InterruptMessage) -> bool {
        self.remote.as_ref().is_some_and(|r| r.forward(vcpu, &msg))
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
pub(super) struct IoApicDevice(pub(super) Arc<InterruptRouter>);

impl BusDevice for IoApicDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.ioapic_read(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<crate::bus::BusAction> {
        self.0.ioapic_write(offset, data);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::COM1_IRQ;

    /// vCPUs `0..n` with software-enabled LAPICs.
    fn enabled_vcpus(n: u32) -> Vec<Arc<VcpuShared>> {
        (0..n)
            .map(|i| {
                let mut l = LocalApic::new(i, i == 0, 0);
                l.mmio_write(0xF0, &0x1FFu32.to_le_bytes(), 0); // software-enable
                Arc::new(VcpuShared::new(i, l))
            })
            .collect()
    }

    fn router(n: u32) -> (Arc<InterruptRouter>, Vec<Arc<VcpuShared>>) {
        let shared = enabled_vcpus(n);
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
        fn forward(&self, vcpu: u32, msg: &InterruptMessage) -> bool {
            lock(&self.forwarded).push((vcpu, *msg));
            true
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
        let shared = enabled_vcpus(2);
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

    /// A remote side whose vCPU 1 runs on this node (true) or another (false).
    struct Placement {
        elsewhere: std::sync::atomic::AtomicBool,
        forwarded: Mutex<Vec<u32>>,
    }
    impl RemoteInterruptSink for Placement {
        fn forward(&self, vcpu: u32, _msg: &InterruptMessage) -> bool {
            let away = self.elsewhere.load(std::sync::atomic::Ordering::SeqCst);
            if away {
                lock(&self.forwarded).push(vcpu);
            }
            away
        }
        fn publish_addressing(&self, _vcpu: u32, _a: &apic::ApicAddressing) {}
        fn forward_eoi(&self, _vector: u8) {}
    }

    #[test]
    fn a_migrated_vcpu_gets_its_interrupts_forwarded_or_kept_for_its_start() {
        // Both vCPUs have a replica here (as on every node of a distributed
        // VM); vCPU 1 has left.
        let shared = enabled_vcpus(2);
        shared[1].set_resident(false, &lock(&shared[1].lapic));
        let place = Arc::new(Placement {
            elsewhere: true.into(),
            forwarded: Mutex::new(Vec::new()),
        });
        let r = InterruptRouter::distributed(
            shared.clone(),
            2,
            crate::ioapic::IoApic::new(2),
            Some(place.clone() as Arc<dyn RemoteInterruptSink>),
            true,
        );
        let rx = lock(shared[1].inbox_rx_for_tests()).take().unwrap();
        // Runs elsewhere: on to its node, never into the stale replica.
        r.send_ipi(0, fixed(0x51, 1, apic::Shorthand::None));
        assert_eq!(*lock(&place.forwarded), vec![1]);
        assert!(lock(&shared[1].lapic).pending_interrupt().is_none());
        assert!(rx.try_recv().is_err());
        // An APP_IPI for it (a node that had not heard yet) goes on too.
        assert!(r.deliver_to(1, &fixed(0x52, 1, apic::Shorthand::None)));
        assert_eq!(*lock(&place.forwarded), vec![1, 1]);
        // Migrating in (this node runs it, not started yet): kept for its start.
        place
            .elsewhere
            .store(false, std::sync::atomic::Ordering::SeqCst);
        r.send_ipi(0, fixed(0x53, 1, apic::Shorthand::None));
        assert_eq!(rx.try_recv().map(|m| m.vector), Ok(0x53));
        assert!(lock(&shared[1].lapic).pending_interrupt().is_none());
        // Resident again: straight into its LAPIC.
        shared[1].set_resident(true, &lock(&shared[1].lapic));
        r.send_ipi(0, fixed(0x54, 1, apic::Shorthand::None));
        assert_eq!(lock(&shared[1].lapic).pending_interrupt(), Some(0x54));
        // A vCPU the VM does not have.
        assert!(!r.deliver_to(7, &fixed(0x55, 7, apic::Shorthand::None)));
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
}
