//! One VM (or, in a distributed VM, one node's share of it): KVM VM (with the
//! userspace LAPIC, or KVM's for a one-node VM that asks: crate::kirq), guest
//! RAM, buses and devices, ACPI tables, the kernel, the vCPU threads and the
//! interrupt router.
//!
//! [`run_vm`] is the whole life cycle behind `dvmmd._native.run_vm`: parse and
//! validate a [`VmSpec`] (docs/interfaces.md), build the [`Vm`], run it until it
//! stops and return the [`VmResult`] as JSON.
//!
//! - [`spec`]: the spec and its validation;
//! - [`routing`]: the interrupt router (local delivery, remote resolution);
//! - [`build`]: construction of the VM from a spec;
//! - [`run`]: the run loop, the result, pause/resume/stop;
//! - [`checkpoint`], [`snapshot`]: snapshots and restore;
//! - [`migrate`]: live vCPU migration between the nodes of a distributed VM;
//! - [`control`]: the control socket of a running VM (snapshot, migrate).

pub mod build;
pub mod checkpoint;
pub mod control;
pub mod migrate;
pub mod routing;
pub mod run;
pub mod snapshot;
pub mod spec;

pub use build::{Vm, IOAPIC_BASE, IOAPIC_SIZE};
pub use routing::{eoi_route, resolved_for, EoiRoute, InterruptRouter};
pub use run::{run_vm, VmControl, VmResult, VmStats};
pub use spec::{SpecError, VmSpec, MAX_VCPUS};

use crate::cpuid;
use crate::memory::MemoryError;

/// Errors of the vm module.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The spec is malformed or asks for something impossible (user error).
    #[error("invalid VM spec: {0}")]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible?)")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM {what} failed: {err}")]
    KvmOp {
        what: String,
        #[source]
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
    Acpi(#[from] crate::acpi::AcpiError),
    #[error("writing ACPI tables into guest memory failed: at {gpa:#x}: {source}")]
    AcpiWrite {
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot serialize the result: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot join the cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Kirq(#[from] crate::kirq::KirqError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
}

impl VmError {
    /// True when the error is the caller's fault (bad spec, missing/bad kernel image):
    /// Python raises ValueError for these, RuntimeError otherwise.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            VmError::Spec(_)
                | VmError::Memory(
                    MemoryError::TooSmall(_) | MemoryError::TooLarge(_) | MemoryError::Unaligned(_)
                )
                | VmError::Boot(_)
                | VmError::Device(_)
                | VmError::Checkpoint(
                    checkpoint::CheckpointError::Snapshot(_)
                        | checkpoint::CheckpointError::Mismatch { .. }
                        | checkpoint::CheckpointError::KernelLapic
                )
        )
    }
}

fn kvm_op(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |err| VmError::KvmOp { what, err }
}
