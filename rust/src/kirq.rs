//! KVM's in-kernel local APIC for one-node VMs (the "split irqchip": LAPICs in
//! the kernel, the IOAPIC stays ours).
//!
//! Why: with the userspace LAPIC every ICR write, EOI, timer and HLT leaves
//! `KVM_RUN` (about nine round trips per IPI ping-pong, each paying PVM's vCPU
//! re-entry), so a one-node IPI costs about twice QEMU's. In the kernel none of
//! them leaves. Why not always: a distributed VM must see every IPI to forward it
//! to other nodes, and KVM's LAPIC keeps KVM's known deviations from the SDM (the
//! guest `conform` workload lists them under QEMU), so the userspace LAPIC stays
//! the default and the reference; `lapic: kernel` is the choice for one-node speed.
//!
//! What this module does: choose the LAPIC ([`LapicKind`]), enable the split
//! irqchip, turn the IOAPIC's messages into MSIs (`KVM_SIGNAL_MSI`) and keep one
//! MSI route per IOAPIC pin, so KVM knows which vectors are level-triggered and
//! exits with `KVM_EXIT_IOAPIC_EOI` when the guest ends one (the IOAPIC's remote
//! IRR is ours to clear).

use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_CAP_SPLIT_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::apic::{DeliveryMode, DestinationMode, InterruptMessage, TriggerMode};
use crate::ioapic::IoApic;
use crate::vcpu::{StopReason, VmFailure, VmStop};

/// Pins of our IOAPIC (KVM reserves that many GSIs for it).
pub const IOAPIC_PINS: usize = 24;

/// Errors of the kirq module.
#[derive(Debug, thiserror::Error)]
pub enum KirqError {
    #[error("lapic = {0:?}: expected user, kernel or auto")]
    UnknownKind(String),
    #[error("lapic = kernel needs a one-node VM (a distributed VM routes IPIs across nodes in userspace)")]
    KernelNeedsOneNode,
    #[error("{what} failed: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("IRQ routing table of {0} entries could not be built")]
    Routing(usize),
}

/// Which local APIC a VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapicKind {
    /// dvmm's userspace LAPIC (crate::apic): every node of a distributed VM.
    User,
    /// KVM's in-kernel LAPIC with our IOAPIC (split irqchip): one-node VMs only.
    Kernel,
}

impl LapicKind {
    /// The kind a spec asks for: `name` from the spec, else `env` (the
    /// `DVMM_LAPIC` environment variable, for A/B runs: a preference, so
    /// `kernel` there means `auto`), else `user`. `auto` means `kernel` for a
    /// one-node VM and `user` otherwise.
    pub fn choose(
        name: Option<&str>,
        env: Option<&str>,
        distributed: bool,
    ) -> Result<Self, KirqError> {
        let name = match (name, env) {
            (Some(n), _) => n,
            (None, Some("kernel")) => "auto",
            (None, Some(e)) => e,
            (None, None) => "user",
        };
        match name {
            "user" => Ok(Self::User),
            "kernel" if distributed => Err(KirqError::KernelNeedsOneNode),
            "kernel" => Ok(Self::Kernel),
            "auto" if distributed => Ok(Self::User),
            "auto" => Ok(Self::Kernel),
            other => Err(KirqError::UnknownKind(other.to_string())),
        }
    }

    /// The name used in specs and stats.
    pub fn name(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Kernel => "kernel",
        }
    }
}

/// Enable the split irqchip (before any vCPU is created).
pub fn enable_split_irqchip(vm: &VmFd) -> Result<(), KirqError> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        args: [IOAPIC_PINS as u64, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|err| KirqError::Kvm {
        what: "enable KVM_CAP_SPLIT_IRQCHIP",
        err,
    })
}

/// The MSI (address, data) an interrupt message is on the bus (SDM 11.11), or
/// None for what an MSI cannot carry (SMI and ExtINT are dropped as by the
/// userspace LAPIC; INIT/SIPI never come from the IOAPIC).
pub fn msi_of(msg: &InterruptMessage) -> Option<(u32, u32)> {
    let mode = match msg.delivery_mode {
        DeliveryMode::Fixed | DeliveryMode::LowestPriority | DeliveryMode::Nmi => {
            msg.delivery_mode.bits()
        }
        _ => return None,
    };
    let logical = msg.destination.mode == DestinationMode::Logical;
    // Redirection hint: lowest priority goes to one of the destinations.
    let hint = msg.delivery_mode == DeliveryMode::LowestPriority;
    let address = 0xFEE0_0000
        | ((msg.destination.id & 0xFF) << 12)
        | (u32::from(hint) << 3)
        | (u32::from(logical) << 2);
    let level = msg.trigger_mode == TriggerMode::Level;
    let data = u32::from(msg.vector)
        | (mode << 8)
        | (u32::from(msg.level) << 14)
        | (u32::from(level) << 15);
    Some((address, data))
}

/// Deliveries into KVM's LAPICs. A failed ioctl stops the VM naming it (an
/// interrupt must never be lost silently).
pub struct KernelIrq {
    vm: Arc<VmFd>,
    stop: Arc<VmStop>,
}

impl std::fmt::Debug for KernelIrq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelIrq")
    }
}

impl KernelIrq {
    /// Deliveries through `vm`, which has the split irqchip enabled; failures
    /// stop the VM through `stop`.
    pub fn new(vm: Arc<VmFd>, stop: Arc<VmStop>) -> Self {
        KernelIrq { vm, stop }
    }

    /// Send `msg` to the in-kernel LAPICs; the number of LAPICs that accepted it
    /// (0 also for what an MSI cannot carry, dropped as on a real bus).
    pub fn signal(&self, msg: &InterruptMessage) -> u64 {
        let Some((address_lo, data)) = msi_of(msg) else {
            return 0;
        };
        let msi = kvm_msi {
            address_lo,
            data,
            ..Default::default()
        };
        match self.vm.signal_msi(msi) {
            Ok(n) => u64::try_from(n).unwrap_or(0),
            Err(err) => {
                self.stop
                    .request(StopReason::Error(VmFailure::component(KirqError::Kvm {
                        what: "KVM_SIGNAL_MSI",
                        err,
                    })));
                0
            }
        }
    }

    /// [`KernelIrq::update_routes`], stopping the VM if KVM refuses.
    pub fn routes_changed(&self, ioapic: &IoApic) {
        if let Err(e) = self.update_routes(ioapic) {
            self.stop
                .request(StopReason::Error(VmFailure::component(e)));
        }
    }

    /// One MSI route per IOAPIC pin from its redirection entry, so KVM exits on
    /// the EOI of a level-triggered vector (masked and edge pins included: KVM only
    /// looks at the trigger mode and the destination).
    pub fn update_routes(&self, ioapic: &IoApic) -> Result<(), KirqError> {
        let mut table = KvmIrqRouting::new(0).map_err(|_| KirqError::Routing(0))?;
        for pin in 0..IOAPIC_PINS {
            let Some(msg) = ioapic.message_of(pin) else {
                continue;
            };
            let Some((address_lo, data)) = msi_of(&msg) else {
                continue;
            };
            let mut e = kvm_irq_routing_entry {
                gsi: pin as u32,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = address_lo;
            e.u.msi.data = data;
            table.push(e).map_err(|_| KirqError::Routing(pin))?;
        }
        self.vm
            .set_gsi_routing(&table)
            .map_err(|err| KirqError::Kvm {
                what: "KVM_SET_GSI_ROUTING",
                err,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apic::{Destination, Shorthand};

    fn msg(mode: DeliveryMode, trig: TriggerMode, dest: u32, logical: bool) -> InterruptMessage {
        InterruptMessage {
            vector: 0x31,
            delivery_mode: mode,
            trigger_mode: trig,
            level: true,
            destination: Destination {
                id: dest,
                mode: if logical {
                    DestinationMode::Logical
                } else {
                    DestinationMode::Physical
                },
                shorthand: Shorthand::None,
                x2apic_format: false,
            },
            source_id: None,
        }
    }

    #[test]
    fn msi_encoding_follows_the_sdm() {
        let m = msg(DeliveryMode::Fixed, TriggerMode::Edge, 3, false);
        assert_eq!(msi_of(&m), Some((0xFEE0_3000, 0x4031)));
        let m = msg(DeliveryMode::LowestPriority, TriggerMode::Level, 0x0F, true);
        assert_eq!(msi_of(&m), Some((0xFEE0_F00C, 0xC131)));
        let m = msg(DeliveryMode::Nmi, TriggerMode::Edge, 1, false);
        assert_eq!(msi_of(&m), Some((0xFEE0_1000, 0x4431)));
        assert_eq!(
            msi_of(&msg(DeliveryMode::ExtInt, TriggerMode::Edge, 0, false)),
            None
        );
        assert_eq!(
            msi_of(&msg(DeliveryMode::Smi, TriggerMode::Edge, 0, false)),
            None
        );
    }

    #[test]
    fn kind_choice() {
        use LapicKind::*;
        assert_eq!(LapicKind::choose(None, None, false).ok(), Some(User));
        assert_eq!(
            LapicKind::choose(None, Some("kernel"), false).ok(),
            Some(Kernel)
        );
        assert_eq!(
            LapicKind::choose(Some("user"), Some("kernel"), false).ok(),
            Some(User)
        );
        assert_eq!(
            LapicKind::choose(Some("auto"), None, false).ok(),
            Some(Kernel)
        );
        assert_eq!(LapicKind::choose(Some("auto"), None, true).ok(), Some(User));
        assert!(matches!(
            LapicKind::choose(Some("kernel"), None, true),
            Err(KirqError::KernelNeedsOneNode)
        ));
        assert!(matches!(
            LapicKind::choose(Some("x"), None, false),
            Err(KirqError::UnknownKind(_))
        ));
    }
}
