//! The VM spec (docs/interfaces.md): its JSON form and every check that can be
//! made without KVM.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::VmError;
use crate::cpuid;
use crate::numa::NumaNode;

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

    /// The CPU model the spec names, or this host's default.
    pub fn cpu_model(&self) -> Result<cpuid::CpuModel, VmError> {
        match &self.cpu {
            None => Ok(cpuid::CpuModel::host_default()),
            Some(name) => cpuid::CpuModel::from_name(name)
                .map_err(|e| VmError::InvalidSpec(format!("cpu: {e}"))),
        }
    }

    /// The local APIC this VM gets (see [`VmSpec::lapic`]).
    pub fn lapic_kind(&self) -> Result<crate::kirq::LapicKind, VmError> {
        let env = std::env::var("DVMM_LAPIC").ok();
        crate::kirq::LapicKind::choose(
            self.lapic.as_deref(),
            env.as_deref(),
            self.cluster.is_some(),
        )
        .map_err(|e| VmError::InvalidSpec(e.to_string()))
    }

    /// Check everything that can be checked without KVM.
    pub fn validate(&self) -> Result<(), VmError> {
        let bad = |m: String| Err(VmError::InvalidSpec(m));
        self.cpu_model()?;
        self.lapic_kind()?;
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
}
