//! CPUID and initial MSRs for each vCPU.
//!
//! Starts from `KVM_GET_SUPPORTED_CPUID` and makes the CPU consistent with what dvmm
//! emulates: one package, one thread per core, one core per vCPU, APIC ID = vCPU
//! index; a local APIC and x2APIC (emulated in userspace), the hypervisor bit; the
//! TSC-deadline timer only when the userspace LAPIC implements it; no features that
//! need the in-kernel LAPIC (KVM PV EOI / PV IPI / PV unhalt / async-PF interrupts),
//! no VMX/SVM, no MONITOR/MWAIT, no AMD topology extensions (the topology is given by
//! leaf 0xB / 0x1F and 0x8000_0008 instead).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Errors of the cpuid module.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("too many CPUID entries ({0})")]
    TooMany(usize),
    #[error("building the MSR list failed: {0}")]
    Msrs(String),
}

/// What the rest of the VMM offers the guest.
#[derive(Debug, Clone, Copy)]
pub struct CpuidConfig {
    /// Total number of vCPUs in the VM (all nodes).
    pub total_vcpus: u32,
    /// The userspace LAPIC implements the TSC-deadline timer mode.
    pub tsc_deadline: bool,
}

/// Number of bits needed for `n` distinct IDs (x2APIC topology shift).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology_leaf(function: u32, apic_id: u32, n: u32) -> Vec<kvm_cpuid_entry2> {
    let shift = id_bits(n);
    let mk = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    };
    vec![
        // SMT level: one thread per core.
        mk(0, 0, 1, 1 << 8),
        // Core level: n cores in the package.
        mk(1, shift, n, (2 << 8) | 1),
        // Invalid level terminates the enumeration.
        mk(2, 0, 0, 2),
    ]
}

/// The CPUID table for the vCPU with `apic_id`, derived from KVM's supported CPUID.
pub fn vcpu_cpuid(supported: &CpuId, apic_id: u32, cfg: &CpuidConfig) -> Result<CpuId, CpuidError> {
    let n = cfg.total_vcpus.max(1);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.as_slice().len() + 8);
    let mut have_0b = false;
    let mut have_1f = false;
    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (n.min(255) << 16);
                // ECX: x2APIC (21), hypervisor (31), TSC deadline (24) if emulated;
                // no VMX (5), no SMX (6), no MONITOR (3).
                e.ecx |= (1 << 21) | (1 << 31);
                e.ecx &= !((1 << 5) | (1 << 6) | (1 << 3));
                if cfg.tsc_deadline {
                    e.ecx |= 1 << 24;
                } else {
                    e.ecx &= !(1 << 24);
                }
                // EDX: APIC present (9); HTT (28) = more than one logical CPU.
                e.edx |= 1 << 9;
                if n > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            0x4 => {
                // Deterministic cache parameters: cores per package - 1 in EAX[31:26],
                // one thread per cache-sharing group... except shared L3 (level 3).
                let cores = (n - 1).min(63);
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { (n - 1).min(4095) } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | (cores << 26);
            }
            0x5 => {
                // MONITOR/MWAIT leaf: not offered.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb => {
                if !have_0b {
                    out.extend(topology_leaf(0xb, apic_id, n));
                    have_0b = true;
                }
                continue;
            }
            0x1f => {
                if !have_1f {
                    out.extend(topology_leaf(0x1f, apic_id, n));
                    have_1f = true;
                }
                continue;
            }
            0x4000_0001 => {
                // KVM PV features: keep only the clocks and NOP_IO_DELAY; everything
                // else (PV EOI, PV IPI, PV unhalt, async PF...) needs the in-kernel LAPIC.
                e.eax &= (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24);
                e.edx = 0;
            }
            0x8000_0001 => {
                // ECX: CmpLegacy (1) iff multi-core, no SVM (2), no topoext (22),
                // no MONITORX (29).
                e.ecx &= !((1 << 2) | (1 << 22) | (1 << 29));
                if n > 1 {
                    e.ecx |= 1 << 1;
                } else {
                    e.ecx &= !(1 << 1);
                }
            }
            0x8000_0008 => {
                // ECX: ApicIdCoreIdSize [15:12], NC [7:0] = cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(n) << 12) | (n - 1).min(255);
            }
            0x8000_001e => continue, // topoext is off
            0x8000_000a => {
                // SVM leaf: not offered.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
        out.push(e);
    }
    if !have_0b {
        out.extend(topology_leaf(0xb, apic_id, n));
        // Make leaf 0xB reachable.
        if let Some(e0) = out.iter_mut().find(|e| e.function == 0) {
            e0.eax = e0.eax.max(0xb);
        }
    }
    CpuId::from_entries(&out).map_err(|_| CpuidError::TooMany(out.len()))
}

/// MSR indexes used for the initial MSR state.
pub mod msr_index {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const IA32_TSC: u32 = 0x10;
}

/// Initial MSRs of every vCPU (as a freshly reset CPU with fast strings and MTRRs
/// enabled, default memory type write-back).
pub fn initial_msrs() -> Result<Msrs, CpuidError> {
    use msr_index::*;
    let entries: Vec<kvm_bindings::kvm_msr_entry> = [
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_MISC_ENABLE, 1),
        (IA32_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .iter()
    .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    Msrs::from_entries(&entries).map_err(|e| CpuidError::Msrs(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_supported() -> CpuId {
        let e = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(0, 0, 0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            e(1, 0, 0x00a6_0f12, 0x0001_0800, (1 << 5) | (1 << 24), 0),
            e(0x4000_0001, 0, 0xffff_ffff, 0, 0, 1),
            e(0x8000_0008, 0, 0x3030, 0, 0xffff, 0),
            e(0x8000_001e, 0, 1, 1, 1, 1),
        ])
        .unwrap()
    }

    #[test]
    fn apic_ids_and_features() {
        let cfg = CpuidConfig {
            total_vcpus: 4,
            tsc_deadline: false,
        };
        let c = vcpu_cpuid(&fake_supported(), 3, &cfg).unwrap();
        let s = c.as_slice();
        let l1 = s.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & (1 << 21), 0, "x2apic");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor");
        assert_eq!(l1.ecx & (1 << 24), 0, "no tsc deadline");
        assert_eq!(l1.ecx & (1 << 5), 0, "no vmx");
        assert_ne!(l1.edx & (1 << 9), 0, "apic");
        let b: Vec<_> = s.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(b.len(), 3);
        assert!(b.iter().all(|e| e.edx == 3));
        assert_eq!(b[1].eax, 2);
        assert_eq!(b[1].ebx, 4);
        assert!(s.iter().all(|e| e.function != 0x8000_001e));
        let l88 = s.iter().find(|e| e.function == 0x8000_0008).unwrap();
        assert_eq!(l88.ecx & 0xff, 3);
        let kvm = s.iter().find(|e| e.function == 0x4000_0001).unwrap();
        assert_eq!(kvm.eax & (1 << 6), 0, "no PV EOI");
        let l0 = s.iter().find(|e| e.function == 0).unwrap();
        assert!(l0.eax >= 0xb);
    }

    #[test]
    fn tsc_deadline_when_offered() {
        let cfg = CpuidConfig {
            total_vcpus: 1,
            tsc_deadline: true,
        };
        let c = vcpu_cpuid(&fake_supported(), 0, &cfg).unwrap();
        let l1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_ne!(l1.ecx & (1 << 24), 0);
        assert_eq!(l1.edx & (1 << 28), 0, "no HTT for one vCPU");
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(254), 8);
    }

    #[test]
    fn msrs_build() {
        assert_eq!(initial_msrs().unwrap().as_slice().len(), 10);
    }
}
