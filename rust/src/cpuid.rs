//! CPUID and initial MSRs for each vCPU.
//!
//! Starts from `KVM_GET_SUPPORTED_CPUID` and makes the CPU consistent with what dvmm
//! emulates: one package, one thread per core, one core per vCPU, APIC ID = vCPU
//! index; a local APIC and x2APIC (emulated in userspace), the hypervisor bit; the
//! TSC-deadline timer only when the userspace LAPIC implements it; no features that
//! need the in-kernel LAPIC (KVM PV EOI / PV IPI / PV unhalt / async-PF interrupts),
//! no VMX/SVM, no MONITOR/MWAIT, no AMD topology extensions (the topology is given by
//! leaf 0xB / 0x1F and 0x8000_0008 instead).
//!
//! On top of that a named [`CpuModel`] (as QEMU's `-cpu`) decides which of the host's
//! instruction-set features the guest is promised:
//!
//! - `host`: everything `KVM_GET_SUPPORTED_CPUID` offers. Right on a host with
//!   hardware virtualization (VT-x / AMD-V), where all guest code runs natively.
//! - `baseline`: `host` minus every feature whose instructions KVM's instruction
//!   emulator cannot execute, or that a guest kernel would use at CPL0. On a KVM PVM
//!   host all guest CPL0 code goes through that emulator, and an instruction it
//!   refuses ends the vCPU with an emulation failure (probed at CPL0 with the
//!   bundled guest on a 6.18 PVM host: `cmpxchg16b`, `xrstor`, `popcnt`, `crc32`,
//!   `andn`, `pdep`, `adcx`, `rdtscp`, `clwb`, `stac`/`clac` fail, `movbe` raises
//!   #UD; `clflush`, `clflushopt`, `fxsave`, `rdrand`, `rdseed`, `serialize`,
//!   `lzcnt`, `cmov`, fences and `prefetchw` run). See [`BASELINE_REMOVED`] for the
//!   list and the reason for each bit.
//!   A guest that checks CPUID then takes its fallback paths (FXSAVE instead of
//!   XSAVE, no PCID, plain CR3 writes, `rdtsc` instead of `rdtscp`, ...). User code
//!   (CPL3) runs natively either way: the model is about what the guest *kernel* may
//!   rely on.
//!
//! KVM PVM does not fully honour KVM_SET_CPUID2 (measured with KVM_GET_CPUID2 and a
//! guest's own CPUID): it hides what `baseline` removes among CX16, PCID, INVPCID,
//! OSXSAVE, PKU, WAITPKG, CET, AMX and RDTSCP, but puts back host features it cannot
//! hide from code that runs on the real CPU (XSAVE and leaf 0xD, AVX*, AES, PCLMULQDQ,
//! SSE4.2, POPCNT, MOVBE, BMI1/BMI2, ADX, RDRAND/RDSEED, FSGSBASE, SMAP,
//! CLFLUSHOPT/CLWB, SERIALIZE...). [`not_removed`] finds those after the fact, and the
//! VM warns about them once per node. Of those, the instructions of SSE4.2, POPCNT,
//! MOVBE, BMI1/BMI2, ADX, CLWB and SMAP do not run at CPL0 there: a PVM limitation
//! the VMM cannot fix (the bundled guest's `conform` workload lists them).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Errors of the cpuid module.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("too many CPUID entries ({0})")]
    TooMany(usize),
    #[error("building the MSR list failed: {0}")]
    Msrs(String),
    #[error("unknown CPU model {name:?} (known models: {known})", known = CpuModel::names().join(", "))]
    UnknownModel { name: String },
}

/// A named CPU model: which of the host's features the guest is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuModel {
    /// Everything KVM_GET_SUPPORTED_CPUID offers (minus what dvmm does not emulate).
    Host,
    /// `Host` minus the features in [`BASELINE_REMOVED`]: safe where guest CPL0 code
    /// is run by KVM's instruction emulator (KVM PVM).
    Baseline,
}

impl CpuModel {
    /// Every model, in the order they are listed to users.
    pub const ALL: [CpuModel; 2] = [CpuModel::Host, CpuModel::Baseline];

    /// The model's name in specs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CpuModel::Host => "host",
            CpuModel::Baseline => "baseline",
        }
    }

    /// The names of all models.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|m| m.name()).collect()
    }

    /// The model for a spec's `cpu` field; an unknown name is an error naming it and
    /// the known ones.
    pub fn from_name(name: &str) -> Result<Self, CpuidError> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| CpuidError::UnknownModel {
                name: name.to_owned(),
            })
    }

    /// The default when a spec names no model: `baseline` on a KVM PVM host (the
    /// `kvm_pvm` module is loaded, as `dvmmctl doctor` detects it), `host` otherwise.
    /// The Python control plane passes the model explicitly; this is the fallback for
    /// specs written by hand.
    pub fn host_default() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            CpuModel::Baseline
        } else {
            CpuModel::Host
        }
    }

    /// The feature bits this model clears from the host's set.
    pub fn removed(self) -> &'static [Removed] {
        match self {
            CpuModel::Host => &[],
            CpuModel::Baseline => BASELINE_REMOVED,
        }
    }
}

impl CpuModel {
    /// Linux's own command-line switches for the features this model removes that
    /// a Linux kernel would otherwise use at CPL0 during boot: `noxsave` (XSAVE and
    /// everything built on it: AVX*, FMA, ...) and `clearcpuid=` names. Appended to a
    /// Linux kernel's command line (see [`linux_cmdline`]) so that the model holds
    /// where KVM does not honour KVM_SET_CPUID2: KVM PVM shows the guest XSAVE and
    /// SSSE3 whatever the table says, and its CPL0 emulator refuses `xrstor` (FPU
    /// init) and SSSE3 code (the RNG's blake2s). Redundant but harmless where KVM
    /// honours the table. Empty for `host`.
    pub fn linux_switches(self) -> &'static [&'static str] {
        match self {
            CpuModel::Host => &[],
            CpuModel::Baseline => &["noxsave", "clearcpuid=ssse3"],
        }
    }
}

/// `user` with `model`'s [`CpuModel::linux_switches`] added, and the switches that
/// were added (empty when the user's line already has them). A `clearcpuid=` the
/// user wrote is extended rather than repeated (Linux reads only one).
pub fn linux_cmdline(user: &str, model: CpuModel) -> (String, Vec<String>) {
    let mut words: Vec<String> = user.split_whitespace().map(str::to_owned).collect();
    // Words after a lone `--` are init's arguments, not the kernel's.
    let kernel_end = words.iter().position(|w| w == "--").unwrap_or(words.len());
    let (mut words, init_args) = {
        let rest = words.split_off(kernel_end);
        (words, rest)
    };
    let mut added = Vec::new();
    for sw in model.linux_switches() {
        match sw.split_once('=') {
            Some(("clearcpuid", names)) => {
                let existing = words.iter().position(|w| w.starts_with("clearcpuid="));
                let have: Vec<&str> = existing
                    .map(|i| words[i]["clearcpuid=".len()..].split(',').collect())
                    .unwrap_or_default();
                let missing: Vec<&str> = names.split(',').filter(|n| !have.contains(n)).collect();
                if missing.is_empty() {
                    continue;
                }
                let extra = missing.join(",");
                match existing {
                    Some(i) if have.iter().any(|h| !h.is_empty()) => {
                        words[i] = format!("{},{extra}", words[i]);
                    }
                    Some(i) => words[i] = format!("clearcpuid={extra}"),
                    None => words.push(format!("clearcpuid={extra}")),
                }
                added.push(format!("clearcpuid={extra}"));
            }
            _ => {
                if !words.iter().any(|w| w == sw) {
                    words.push((*sw).to_owned());
                    added.push((*sw).to_owned());
                }
            }
        }
    }
    words.extend(init_args);
    (words.join(" "), added)
}

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn of(self, e: &mut kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Reg::Eax => &mut e.eax,
            Reg::Ebx => &mut e.ebx,
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
        }
    }
}

/// Feature bits a model removes: `bits` of `reg` in leaf `function`, subleaf `index`
/// (`None`: every subleaf).
#[derive(Debug, Clone, Copy)]
pub struct Removed {
    pub function: u32,
    pub index: Option<u32>,
    pub reg: Reg,
    pub bits: u32,
    /// Why (documentation).
    pub why: &'static str,
}

const fn rm(function: u32, index: Option<u32>, reg: Reg, bits: u32, why: &'static str) -> Removed {
    Removed {
        function,
        index,
        reg,
        bits,
        why,
    }
}

const ALL_BITS: u32 = 0xffff_ffff;

/// What `baseline` removes from `host`, with the reason for each bit. "Not emulated":
/// KVM's x86 instruction emulator has no handler for the instruction, so executing it
/// at guest CPL0 on a PVM host ends KVM_RUN with an emulation failure.
pub const BASELINE_REMOVED: &[Removed] = &[
    // Leaf 1 ECX.
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 1,
        "PCLMULQDQ: kernel crc/ghash at CPL0; not emulated",
    ),
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 9,
        "SSSE3: Linux's blake2s (the RNG) runs SSSE3 code at CPL0; not emulated",
    ),
    rm(1, None, Reg::Ecx, 1 << 12, "FMA: AVX state, needs XSAVE"),
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 13,
        "CX16: cmpxchg16b refused by the emulator (probed)",
    ),
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 17,
        "PCID: CR3 no-flush writes and invpcid at CPL0",
    ),
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 25,
        "AES: AES-NI in kernel crypto at CPL0; not emulated",
    ),
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 26,
        "XSAVE: xsave/xrstor refused (probed xrstor)",
    ),
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 27,
        "OSXSAVE: follows XSAVE (xgetbv)",
    ),
    rm(1, None, Reg::Ecx, 1 << 28, "AVX: AVX state, needs XSAVE"),
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 20,
        "SSE4.2: crc32 (kernel crc32c) refused by the emulator (probed)",
    ),
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 22,
        "MOVBE: #UD at CPL0 (probed; the emulator checks its own CPUID)",
    ),
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 23,
        "POPCNT: popcnt (kernel hweight) refused by the emulator (probed)",
    ),
    rm(
        7,
        Some(0),
        Reg::Ebx,
        1 << 3,
        "BMI1: VEX andn refused by the emulator (probed)",
    ),
    rm(
        7,
        Some(0),
        Reg::Ebx,
        1 << 8,
        "BMI2: VEX pdep refused by the emulator (probed)",
    ),
    rm(
        7,
        Some(0),
        Reg::Ebx,
        1 << 19,
        "ADX: adcx (kernel bignum crypto) refused by the emulator (probed)",
    ),
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 29,
        "F16C: VEX-encoded, needs AVX/XSAVE",
    ),
    rm(
        1,
        None,
        Reg::Ecx,
        1 << 30,
        "RDRAND: kernel RNG/KASLR at CPL0; not emulated",
    ),
    // Leaf 7 subleaf 0 EBX.
    rm(
        7,
        Some(0),
        Reg::Ebx,
        1 << 0,
        "FSGSBASE: rd/wr{fs,gs}base in kernel entry; not emulated",
    ),
    rm(7, Some(0), Reg::Ebx, 1 << 5, "AVX2: AVX state, needs XSAVE"),
    rm(
        7,
        Some(0),
        Reg::Ebx,
        1 << 10,
        "INVPCID: kernel TLB flushes; not emulated",
    ),
    rm(
        7,
        Some(0),
        Reg::Ebx,
        (1 << 16)
            | (1 << 17)
            | (1 << 21)
            | (1 << 26)
            | (1 << 27)
            | (1 << 28)
            | (1 << 30)
            | (1 << 31),
        "AVX-512 F/DQ/IFMA/PF/ER/CD/BW/VL: AVX-512 state, needs XSAVE",
    ),
    rm(
        7,
        Some(0),
        Reg::Ebx,
        1 << 18,
        "RDSEED: kernel RNG at CPL0; not emulated",
    ),
    rm(
        7,
        Some(0),
        Reg::Ebx,
        1 << 20,
        "SMAP: stac/clac on every kernel user access; not emulated",
    ),
    rm(
        7,
        Some(0),
        Reg::Ebx,
        1 << 23,
        "CLFLUSHOPT: kernel cache flushes; not emulated",
    ),
    rm(
        7,
        Some(0),
        Reg::Ebx,
        1 << 24,
        "CLWB: kernel cache write-back; not emulated",
    ),
    // Leaf 7 subleaf 0 ECX.
    rm(
        7,
        Some(0),
        Reg::Ecx,
        (1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14),
        "AVX-512 VBMI/VBMI2/VNNI/BITALG/VPOPCNTDQ: AVX-512 state, needs XSAVE",
    ),
    rm(
        7,
        Some(0),
        Reg::Ecx,
        (1 << 3) | (1 << 4),
        "PKU/OSPKE: XSAVE-managed, rd/wrpkru at CPL0",
    ),
    rm(
        7,
        Some(0),
        Reg::Ecx,
        1 << 5,
        "WAITPKG: umwait/tpause in kernel delays; not emulated",
    ),
    rm(
        7,
        Some(0),
        Reg::Ecx,
        1 << 7,
        "CET shadow stacks: XSAVES-managed state",
    ),
    rm(
        7,
        Some(0),
        Reg::Ecx,
        (1 << 8) | (1 << 9) | (1 << 10),
        "GFNI/VAES/VPCLMULQDQ: SIMD crypto at CPL0, VEX forms need XSAVE",
    ),
    rm(
        7,
        Some(0),
        Reg::Ecx,
        (1 << 25) | (1 << 27) | (1 << 28),
        "CLDEMOTE/MOVDIRI/MOVDIR64B: not emulated",
    ),
    // Leaf 7 subleaf 0 EDX.
    rm(
        7,
        Some(0),
        Reg::Edx,
        (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23),
        "AVX-512 4VNNIW/4FMAPS/VP2INTERSECT/FP16: AVX-512 state, needs XSAVE",
    ),
    rm(
        7,
        Some(0),
        Reg::Edx,
        1 << 14,
        "SERIALIZE: kernel sync_core() at CPL0; not emulated",
    ),
    rm(7, Some(0), Reg::Edx, 1 << 16, "TSXLDTRK: not emulated"),
    rm(
        7,
        Some(0),
        Reg::Edx,
        1 << 20,
        "CET IBT: XSAVES-managed state",
    ),
    rm(
        7,
        Some(0),
        Reg::Edx,
        (1 << 22) | (1 << 24) | (1 << 25),
        "AMX BF16/TILE/INT8: XSAVE-managed tile state",
    ),
    // Leaf 7 subleaf 1.
    rm(
        7,
        Some(1),
        Reg::Eax,
        (1 << 4) | (1 << 5) | (1 << 21) | (1 << 23),
        "AVX-VNNI/AVX512-BF16/AMX-FP16/AVX-IFMA: AVX state, needs XSAVE",
    ),
    rm(
        7,
        Some(1),
        Reg::Edx,
        (1 << 4) | (1 << 5) | (1 << 10) | (1 << 19),
        "AVX-VNNI-INT8/AVX-NE-CONVERT/AVX-VNNI-INT16/AVX10: AVX state, needs XSAVE",
    ),
    // XSAVE state enumeration: empty without XSAVE. XSAVEOPT, XSAVEC, XGETBV1 and
    // XSAVES are bits 0-3 of leaf 0xD subleaf 1 EAX.
    rm(
        0xd,
        None,
        Reg::Eax,
        ALL_BITS,
        "XSAVE leaf (XSAVEOPT/XSAVEC/XGETBV1/XSAVES): XSAVE is off",
    ),
    rm(
        0xd,
        None,
        Reg::Ebx,
        ALL_BITS,
        "XSAVE leaf (XSAVEOPT/XSAVEC/XGETBV1/XSAVES): XSAVE is off",
    ),
    rm(
        0xd,
        None,
        Reg::Ecx,
        ALL_BITS,
        "XSAVE leaf (XSAVEOPT/XSAVEC/XGETBV1/XSAVES): XSAVE is off",
    ),
    rm(
        0xd,
        None,
        Reg::Edx,
        ALL_BITS,
        "XSAVE leaf (XSAVEOPT/XSAVEC/XGETBV1/XSAVES): XSAVE is off",
    ),
    // AMX tile leaves.
    rm(0x1d, None, Reg::Eax, ALL_BITS, "AMX leaves: AMX is off"),
    rm(0x1d, None, Reg::Ebx, ALL_BITS, "AMX leaves: AMX is off"),
    rm(0x1d, None, Reg::Ecx, ALL_BITS, "AMX leaves: AMX is off"),
    rm(0x1e, None, Reg::Ebx, ALL_BITS, "AMX leaves: AMX is off"),
    // Extended leaf 0x8000_0001.
    rm(
        0x8000_0001,
        None,
        Reg::Ecx,
        (1 << 11) | (1 << 16),
        "XOP/FMA4: AVX state, needs XSAVE",
    ),
    rm(
        0x8000_0001,
        None,
        Reg::Edx,
        1 << 27,
        "RDTSCP: kernel rdtsc_ordered() at CPL0; not emulated",
    ),
];

/// Clear the bits `model` removes from one entry.
fn apply_model(model: CpuModel, e: &mut kvm_cpuid_entry2) {
    for r in model.removed() {
        if r.function == e.function && r.index.is_none_or(|i| i == e.index) {
            *r.reg.of(e) &= !r.bits;
        }
    }
}

/// The features `model` removes that the vCPU still shows: `got` is what
/// KVM_GET_CPUID2 returns after KVM_SET_CPUID2. Empty where KVM honours the table
/// (hardware virtualization). KVM PVM does not: it puts back host features it cannot
/// hide from a guest that runs on the real CPU (measured here: leaf 1 XSAVE, AVX,
/// AES..., leaf 7 FSGSBASE, SMAP, CLFLUSHOPT..., leaf 0xD; CX16 does stay off).
/// Names are the short names of [`BASELINE_REMOVED`], each once, in its order.
pub fn not_removed(model: CpuModel, got: &CpuId) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for r in model.removed() {
        let shown = got.as_slice().iter().any(|e| {
            let mut e = *e;
            e.function == r.function
                && r.index.is_none_or(|i| i == e.index)
                && *r.reg.of(&mut e) & r.bits != 0
        });
        let name = r.why.split(':').next().unwrap_or(r.why);
        if shown && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// What the rest of the VMM offers the guest.
#[derive(Debug, Clone, Copy)]
pub struct CpuidConfig {
    /// Total number of vCPUs in the VM (all nodes).
    pub total_vcpus: u32,
    /// The userspace LAPIC implements the TSC-deadline timer mode.
    pub tsc_deadline: bool,
    /// The CPU model (which host features the guest is offered).
    pub model: CpuModel,
    /// All vCPUs share the last-level cache (a one-NUMA-node VM). With
    /// several NUMA nodes each vCPU reports its own L3: an L3 shared across
    /// nodes contradicts the SRAT (Linux warns "llc-sibling ... is not on the
    /// same node" and ignores it), and vCPUs of one node need not form the
    /// aligned APIC-ID block that leaf 4's sharing count describes. (Intel's
    /// leaf 4 only: on AMD family 17h+ without topoext, which dvmm hides, Linux
    /// takes the LLC from ApicId[3] and still puts vCPUs 0-7 in one LLC.)
    pub l3_shared: bool,
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
        apply_model(cfg.model, &mut e);
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
                let sharing = if level >= 3 && cfg.l3_shared {
                    (n - 1).min(4095)
                } else {
                    0
                };
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
    #[test]
    fn linux_switches_are_added_once_and_before_init_args() {
        let b = CpuModel::Baseline;
        let (line, added) = linux_cmdline("console=ttyS0", b);
        assert_eq!(line, "console=ttyS0 noxsave clearcpuid=ssse3");
        assert_eq!(added, vec!["noxsave", "clearcpuid=ssse3"]);
        // Already there: nothing added, nothing repeated.
        let (line, added) = linux_cmdline("noxsave clearcpuid=ssse3 quiet", b);
        assert_eq!(line, "noxsave clearcpuid=ssse3 quiet");
        assert!(added.is_empty());
        // A clearcpuid= of the user's is extended (Linux reads one).
        let (line, added) = linux_cmdline("clearcpuid=pcid console=ttyS0", b);
        assert_eq!(line, "clearcpuid=pcid,ssse3 console=ttyS0 noxsave");
        assert_eq!(added, vec!["noxsave", "clearcpuid=ssse3"]);
        // init's arguments stay last.
        let (line, _) = linux_cmdline("console=ttyS0 -- single", b);
        assert_eq!(line, "console=ttyS0 noxsave clearcpuid=ssse3 -- single");
        // `host` promises the host's features: the line is left alone.
        let (line, added) = linux_cmdline("console=ttyS0  quiet", CpuModel::Host);
        assert_eq!(line, "console=ttyS0 quiet");
        assert!(added.is_empty());
    }

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
            model: CpuModel::Host,
            l3_shared: true,
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
    fn l3_is_shared_only_within_one_numa_node() {
        let e = |index: u32, level: u32| kvm_cpuid_entry2 {
            function: 4,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            // Type 1/3 (data/unified) at `level`, host sharing bits set.
            eax: (level << 5) | 1 | (7 << 14),
            ..Default::default()
        };
        let supported = CpuId::from_entries(&[e(0, 1), e(1, 2), e(2, 3)]).unwrap();
        let sharing = |l3_shared: bool| -> Vec<u32> {
            let cfg = CpuidConfig {
                total_vcpus: 4,
                tsc_deadline: false,
                model: CpuModel::Host,
                l3_shared,
            };
            let c = vcpu_cpuid(&supported, 1, &cfg).unwrap();
            c.as_slice()
                .iter()
                .filter(|x| x.function == 4)
                .map(|x| (x.eax >> 14) & 0xfff)
                .collect()
        };
        // One node: L1/L2 private, L3 shared by all 4 vCPUs (4 - 1).
        assert_eq!(sharing(true), vec![0, 0, 3]);
        // Several nodes: every cache private, so no LLC spans two nodes.
        assert_eq!(sharing(false), vec![0, 0, 0]);
    }

    #[test]
    fn tsc_deadline_when_offered() {
        let cfg = CpuidConfig {
            total_vcpus: 1,
            tsc_deadline: true,
            model: CpuModel::Host,
            l3_shared: true,
        };
        let c = vcpu_cpuid(&fake_supported(), 0, &cfg).unwrap();
        let l1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_ne!(l1.ecx & (1 << 24), 0);
        assert_eq!(l1.edx & (1 << 28), 0, "no HTT for one vCPU");
    }

    /// A host that offers every feature bit in the leaves the models touch.
    fn full_supported() -> CpuId {
        let e = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 7 | 0xd | 0x1d | 0x1e) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        let f = ALL_BITS;
        CpuId::from_entries(&[
            e(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            e(1, 0, 0x000c_06f1, 0x0001_0800, f, f),
            e(7, 0, 1, f, f, f),
            e(7, 1, f, f, f, f),
            e(0xd, 0, 0x2e7, 0xa88, 0x2b00, 0),
            e(0xd, 1, 0xf, 0x990, 0x1900, 0),
            e(0xd, 2, 0x100, 0x240, 0, 0),
            e(0x1d, 0, 1, 0, 0, 0),
            e(0x1d, 1, 0x0400_2000, 0x0008_0040, 0x10, 0),
            e(0x1e, 0, 0, 0x4010, 0, 0),
            e(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            e(0x4000_0001, 0, f, 0, 0, f),
            e(0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
            e(0x8000_0001, 0, 0, 0, f, f),
            e(0x8000_0008, 0, 0x3030, 0, 0xffff, 0),
        ])
        .unwrap()
    }

    fn table(model: CpuModel, n: u32, apic_id: u32) -> Vec<kvm_cpuid_entry2> {
        let cfg = CpuidConfig {
            total_vcpus: n,
            tsc_deadline: true,
            model,
            l3_shared: true,
        };
        vcpu_cpuid(&full_supported(), apic_id, &cfg)
            .unwrap()
            .as_slice()
            .to_vec()
    }

    fn leaf(t: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *t.iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    fn regs(e: &kvm_cpuid_entry2) -> [u32; 4] {
        [e.eax, e.ebx, e.ecx, e.edx]
    }

    /// The bits `BASELINE_REMOVED` clears in (function, index), per register.
    fn expected_removed(function: u32, index: u32) -> [u32; 4] {
        let mut m = [0u32; 4];
        for r in BASELINE_REMOVED {
            if r.function == function && r.index.is_none_or(|i| i == index) {
                m[r.reg as usize] |= r.bits;
            }
        }
        m
    }

    #[test]
    fn model_names_round_trip() {
        assert_eq!(CpuModel::names(), vec!["host", "baseline"]);
        for m in CpuModel::ALL {
            assert_eq!(CpuModel::from_name(m.name()).unwrap(), m);
        }
        let err = CpuModel::from_name("pentium").unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown CPU model \"pentium\" (known models: host, baseline)"
        );
        assert!(CpuModel::from_name("Host").is_err(), "names are exact");
    }

    #[test]
    fn baseline_removes_exactly_its_list() {
        let host = table(CpuModel::Host, 2, 1);
        let base = table(CpuModel::Baseline, 2, 1);
        assert_eq!(host.len(), base.len(), "same leaves");
        for (h, b) in host.iter().zip(&base) {
            assert_eq!((h.function, h.index), (b.function, b.index));
            let exp = expected_removed(h.function, h.index);
            let (hr, br) = (regs(h), regs(b));
            for r in 0..4 {
                assert_eq!(
                    hr[r] & !br[r],
                    hr[r] & exp[r],
                    "leaf {:#x}.{} reg {r}: removed bits",
                    h.function,
                    h.index
                );
                assert_eq!(br[r] & !hr[r], 0, "baseline adds nothing");
            }
        }
    }

    #[test]
    fn baseline_named_features_off_host_keeps_them() {
        let host = table(CpuModel::Host, 1, 0);
        let base = table(CpuModel::Baseline, 1, 0);
        let l1 = |t: &[kvm_cpuid_entry2]| leaf(t, 1, 0);
        let l7 = |t: &[kvm_cpuid_entry2]| leaf(t, 7, 0);
        // (leaf-1 ECX bit, name)
        for (bit, name) in [
            (13, "cx16"),
            (17, "pcid"),
            (20, "sse4.2"),
            (22, "movbe"),
            (23, "popcnt"),
            (26, "xsave"),
            (27, "osxsave"),
            (28, "avx"),
            (12, "fma"),
            (30, "rdrand"),
        ] {
            assert_ne!(l1(&host).ecx & (1 << bit), 0, "host keeps {name}");
            assert_eq!(l1(&base).ecx & (1 << bit), 0, "baseline drops {name}");
        }
        for (bit, name) in [
            (0, "fsgsbase"),
            (3, "bmi1"),
            (8, "bmi2"),
            (19, "adx"),
            (5, "avx2"),
            (10, "invpcid"),
            (16, "avx512f"),
            (20, "smap"),
            (23, "clflushopt"),
            (24, "clwb"),
        ] {
            assert_ne!(l7(&host).ebx & (1 << bit), 0, "host keeps {name}");
            assert_eq!(l7(&base).ebx & (1 << bit), 0, "baseline drops {name}");
        }
        assert_eq!(l7(&base).edx & (1 << 14), 0, "no serialize");
        // XSAVEOPT/XSAVEC/XGETBV1/XSAVES live in leaf 0xD.1 EAX.
        assert_eq!(leaf(&host, 0xd, 1).eax, 0xf);
        assert!(base
            .iter()
            .filter(|e| e.function == 0xd)
            .all(|e| regs(e) == [0; 4]));
        assert_eq!(leaf(&base, 0x8000_0001, 0).edx & (1 << 27), 0, "no rdtscp");
        // What the bundled guest and a kernel need stays: SSE2, FXSR, NX, LM,
        // SYSCALL, 1 GiB pages, TSC, CX8, SSE3, SSE4.1, leaf 7's max subleaf.
        // SSSE3 goes (Linux's blake2s would run it at CPL0).
        for bit in [4, 8, 24, 25, 26] {
            assert_ne!(l1(&base).edx & (1 << bit), 0, "leaf 1 edx bit {bit}");
        }
        for bit in [0, 19] {
            assert_ne!(l1(&base).ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_ne!(l1(&host).ecx & (1 << 9), 0, "host keeps ssse3");
        assert_eq!(l1(&base).ecx & (1 << 9), 0, "baseline drops ssse3");
        for bit in [11, 20, 26, 29] {
            assert_ne!(
                leaf(&base, 0x8000_0001, 0).edx & (1 << bit),
                0,
                "ext edx bit {bit}"
            );
        }
        assert_eq!(l7(&base).eax, 1);
    }

    #[test]
    fn models_keep_dvmm_leaves() {
        for model in CpuModel::ALL {
            let t = table(model, 4, 2);
            let l1 = leaf(&t, 1, 0);
            assert_ne!(l1.ecx & (1 << 21), 0, "{model:?}: x2apic");
            assert_ne!(l1.ecx & (1 << 31), 0, "{model:?}: hypervisor");
            assert_ne!(l1.ecx & (1 << 24), 0, "{model:?}: tsc deadline");
            assert_eq!(
                l1.ecx & ((1 << 3) | (1 << 5) | (1 << 6)),
                0,
                "{model:?}: no monitor/vmx/smx"
            );
            assert_eq!(l1.ebx >> 24, 2, "{model:?}: APIC ID");
            assert_ne!(l1.edx & (1 << 9), 0, "{model:?}: apic");
            assert_ne!(l1.edx & (1 << 28), 0, "{model:?}: htt");
            let b: Vec<_> = t.iter().filter(|e| e.function == 0xb).collect();
            assert_eq!(b.len(), 3, "{model:?}: leaf 0xb");
            assert!(b.iter().all(|e| e.edx == 2));
            assert_eq!((b[1].eax, b[1].ebx), (2, 4));
            assert_eq!(
                leaf(&t, 0x4000_0000, 0).ebx,
                0x4b4d_564b,
                "{model:?}: KVM signature"
            );
            let pv = leaf(&t, 0x4000_0001, 0);
            assert_eq!(pv.eax, (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24));
            assert_eq!(pv.edx, 0);
            assert_eq!(leaf(&t, 0x8000_0008, 0).ecx & 0xff, 3);
            assert_eq!(
                leaf(&t, 0x8000_0001, 0).ecx & (1 << 2),
                0,
                "{model:?}: no svm"
            );
        }
    }

    #[test]
    fn not_removed_names_what_kvm_put_back() {
        let base = CpuId::from_entries(&table(CpuModel::Baseline, 1, 0)).unwrap();
        assert!(not_removed(CpuModel::Baseline, &base).is_empty());
        assert!(not_removed(CpuModel::Host, &full_supported()).is_empty());
        // As KVM PVM does: XSAVE and leaf 0xD come back, CX16 stays off.
        let mut t = table(CpuModel::Baseline, 1, 0);
        for e in t.iter_mut() {
            if e.function == 1 {
                e.ecx |= 1 << 26;
            }
            if e.function == 0xd && e.index == 1 {
                e.eax = 0xf;
            }
        }
        let got = CpuId::from_entries(&t).unwrap();
        let names = not_removed(CpuModel::Baseline, &got);
        assert_eq!(names.len(), 2, "one name per feature: {names:?}");
        assert!(names[0].starts_with("XSAVE"), "{names:?}");
        assert!(names[1].starts_with("XSAVE leaf"), "{names:?}");
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
