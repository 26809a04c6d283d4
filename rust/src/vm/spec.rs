//! The VM spec (docs/interfaces.md): its JSON form and every check that can be
//! made without KVM.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterSpecError;
use crate::cpuid;
use crate::numa::NumaNode;

/// What is wrong with a spec (the caller's mistake: Python raises ValueError).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("cpu: {0}")]
    Cpu(#[source] cpuid::CpuidError),
    #[error("{0}")]
    Lapic(#[source] crate::kirq::KirqError),
    #[error("vcpus = {0}: must be between 1 and {MAX_VCPUS} (the maximum)")]
    Vcpus(u32),
    #[error("{0}")]
    Memory(#[source] crate::memory::MemoryError),
    #[error("kernel: no kernel image given")]
    NoKernel,
    #[error("kernel image {0}: file not found")]
    KernelNotFound(String),
    #[error("kernel image {0}: not a regular file")]
    KernelNotAFile(String),
    #[error("initrd {0}: file not found")]
    InitrdNotFound(String),
    #[error("snapshot: dir must be given, after_s >= 0 and every_s > 0")]
    SnapshotPlan,
    #[error("timeout_s = {0}: must be >= 0")]
    Timeout(f64),
    #[error("migrate: {0}")]
    Migrate(String),
    #[error("{0}")]
    Cluster(#[from] ClusterSpecError),
    #[error("numa: empty list (omit it for a single node)")]
    NumaEmpty,
    #[error(
        "numa[{node}].mem_start = {start:#x}: expected {expected:#x} (ranges must follow each other)"
    )]
    NumaGap {
        node: usize,
        start: u64,
        expected: u64,
    },
    #[error("numa[{node}].mem_size = {size:#x}: must be a non-zero multiple of 4 KiB")]
    NumaSize { node: usize, size: u64 },
    #[error("numa[{node}].cpus: vCPU {cpu} does not exist (vcpus = {vcpus})")]
    NumaNoSuchCpu { node: usize, cpu: u32, vcpus: u32 },
    #[error("numa[{node}].cpus: vCPU {cpu} is in two nodes")]
    NumaCpuTwice { node: usize, cpu: u32 },
    #[error("numa: the ranges cover {covered:#x} bytes but memory is {memory:#x}")]
    NumaCoverage { covered: u64, memory: u64 },
    #[error("numa: vCPU {0} is in no node")]
    NumaCpuMissing(usize),
}

/// Most vCPUs a VM may have (8-bit xAPIC IDs; 0xFF is broadcast and the IOAPIC takes
/// the ID after the last vCPU).
pub const MAX_VCPUS: u32 = 254;

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
    /// Take snapshots during the run (issue 15; see `vm::checkpoint`).
    #[serde(default)]
    pub snapshot: Option<super::checkpoint::SnapshotPlan>,
    /// Restore the VM from this snapshot directory instead of booting `kernel`
    /// (which may then be empty).
    #[serde(default)]
    pub restore: Option<String>,
    /// vCPU migrations during the run, in time order (issue 15; `vm::migrate`).
    #[serde(default)]
    pub migrate: Vec<super::migrate::MigrationStep>,
    /// Listen on this unix socket for snapshot and migration requests while
    /// the VM runs (boot node; `vm::control`).
    #[serde(default)]
    pub control: Option<String>,
}

impl VmSpec {
    /// Parse a JSON spec.
    pub fn from_json(s: &str) -> Result<Self, SpecError> {
        Ok(serde_json::from_str(s)?)
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
    pub fn cpu_model(&self) -> Result<cpuid::CpuModel, SpecError> {
        match &self.cpu {
            None => Ok(cpuid::CpuModel::host_default()),
            Some(name) => cpuid::CpuModel::from_name(name).map_err(SpecError::Cpu),
        }
    }

    /// The local APIC this VM gets (see [`VmSpec::lapic`]).
    pub fn lapic_kind(&self) -> Result<crate::kirq::LapicKind, SpecError> {
        let env = std::env::var("DVMM_LAPIC").ok();
        crate::kirq::LapicKind::choose(
            self.lapic.as_deref(),
            env.as_deref(),
            self.cluster.is_some(),
        )
        .map_err(SpecError::Lapic)
    }

    /// Check everything that can be checked without KVM.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.cpu_model()?;
        self.lapic_kind()?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(SpecError::Vcpus(self.vcpus));
        }
        crate::memory::validate_size(self.memory).map_err(SpecError::Memory)?;
        if self.restore.is_none() {
            if self.kernel.is_empty() {
                return Err(SpecError::NoKernel);
            }
            let k = Path::new(&self.kernel);
            if !k.exists() {
                return Err(SpecError::KernelNotFound(self.kernel.clone()));
            }
            if !k.is_file() {
                return Err(SpecError::KernelNotAFile(self.kernel.clone()));
            }
        }
        if let Some(p) = &self.snapshot {
            let ok = |t: f64| t.is_finite() && t >= 0.0;
            if p.dir.is_empty() || !ok(p.after_s) || !p.every_s.is_none_or(|e| ok(e) && e > 0.0) {
                return Err(SpecError::SnapshotPlan);
            }
        }
        self.validate_migrations()?;
        if let Some(i) = &self.initrd {
            if !Path::new(i).is_file() {
                return Err(SpecError::InitrdNotFound(i.clone()));
            }
        }
        if !(self.timeout_s.is_finite() && self.timeout_s >= 0.0) {
            return Err(SpecError::Timeout(self.timeout_s));
        }
        if let Some(c) = &self.cluster {
            c.validate(self.numa.as_deref())?;
        }
        if let Some(numa) = &self.numa {
            self.validate_numa(numa)?;
        }
        Ok(())
    }

    /// Migrations need a distributed VM, and name one of its vCPUs and nodes.
    fn validate_migrations(&self) -> Result<(), SpecError> {
        let Some(first) = self.migrate.first() else {
            return Ok(());
        };
        let Some(c) = &self.cluster else {
            return Err(SpecError::Migrate(format!(
                "vCPU {} cannot move: the VM runs on one node",
                first.vcpu
            )));
        };
        for m in &self.migrate {
            if m.vcpu >= self.vcpus {
                return Err(SpecError::Migrate(format!(
                    "vCPU {}: the VM has vCPUs 0-{}",
                    m.vcpu,
                    self.vcpus - 1
                )));
            }
            if m.node >= c.nodes.len() {
                return Err(SpecError::Migrate(format!(
                    "node {}: the VM runs on nodes 0-{}",
                    m.node,
                    c.nodes.len() - 1
                )));
            }
            if !(m.after_s.is_finite() && m.after_s >= 0.0) {
                return Err(SpecError::Migrate(format!(
                    "after_s = {}: must be >= 0",
                    m.after_s
                )));
            }
        }
        Ok(())
    }

    /// The NUMA list: contiguous page-aligned ranges covering RAM, every vCPU
    /// in exactly one node.
    fn validate_numa(&self, numa: &[NumaNode]) -> Result<(), SpecError> {
        if numa.is_empty() {
            return Err(SpecError::NumaEmpty);
        }
        let mut seen = vec![false; self.vcpus as usize];
        let mut next = 0u64;
        for (i, n) in numa.iter().enumerate() {
            if n.mem_start != next {
                return Err(SpecError::NumaGap {
                    node: i,
                    start: n.mem_start,
                    expected: next,
                });
            }
            if n.mem_size == 0 || !n.mem_size.is_multiple_of(crate::memory::PAGE_SIZE) {
                return Err(SpecError::NumaSize {
                    node: i,
                    size: n.mem_size,
                });
            }
            next = n.mem_start.saturating_add(n.mem_size);
            for &c in &n.cpus {
                match seen.get_mut(c as usize) {
                    None => {
                        return Err(SpecError::NumaNoSuchCpu {
                            node: i,
                            cpu: c,
                            vcpus: self.vcpus,
                        })
                    }
                    Some(true) => return Err(SpecError::NumaCpuTwice { node: i, cpu: c }),
                    Some(s) => *s = true,
                }
            }
        }
        if next != self.memory {
            return Err(SpecError::NumaCoverage {
                covered: next,
                memory: self.memory,
            });
        }
        if let Some(c) = seen.iter().position(|s| !s) {
            return Err(SpecError::NumaCpuMissing(c));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::VmError;

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
}
