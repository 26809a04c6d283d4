//! dvmm data path: everything that touches KVM, guest memory or the wire.
//!
//! Layout (one obvious place for each part):
//! - `memory`   guest RAM (memfd, mapped twice: guest view + engine view)
//! - `bus`      port-I/O and MMIO buses
//! - `numa`     the NUMA layout: each node's vCPUs and share of guest RAM
//! - `cluster`  one node's link to the others: its spec, the application
//!   request/response layer over the DSM mesh, remote IPIs, forwarded I/O, stop
//! - `devices`  16550 UART, debug-exit port
//! - `apic`     userspace local APIC (xAPIC MMIO + x2APIC MSRs, timer)
//! - `ioapic`   userspace IOAPIC
//! - `kirq`     KVM's in-kernel LAPIC for one-node VMs (split irqchip)
//! - `acpi`     ACPI tables (RSDP, XSDT, MADT, SRAT, SLIT, FADT, DSDT)
//! - `boot`     direct kernel boot: PVH ELF, Multiboot v1, Linux bzImage; e820
//! - `cpuid`    CPUID / MSR set-up
//! - `vcpu`     the vCPU run loop (state machine + exit dispatch)
//! - `vm`       one VM (or one node's share of a distributed VM): spec,
//!   interrupt routing, construction, run
//! - `dsm`      distributed shared memory: coherence protocol, wire, transport
//! - `sync`     the crate's one mutex helper (`lock`, poison-tolerant)
//! - `python`   the PyO3 module `dvmmd._native`

pub mod acpi;
pub mod apic;
pub mod boot;
pub mod bus;
pub mod cluster;
pub mod cpuid;
pub mod devices;
pub mod dsm;
pub mod ioapic;
pub mod kirq;
pub mod memory;
pub mod numa;
pub mod python;
pub mod sync;
pub mod vcpu;
pub mod vm;
