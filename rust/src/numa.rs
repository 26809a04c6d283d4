//! The VM's NUMA layout: which vCPUs and which share of guest RAM make up each
//! node (the spec's `numa` list, the ACPI SRAT, and in a distributed VM the
//! home ranges of the coherence protocol).

use serde::{Deserialize, Serialize};

use crate::memory::GuestRam;

/// One NUMA node of the VM: its vCPUs and its share of RAM (offsets into RAM, not
/// GPAs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumaNode {
    pub cpus: Vec<u32>,
    pub mem_start: u64,
    pub mem_size: u64,
}

/// The NUMA nodes' RAM ranges as GPA ranges `(gpa, size, node)`, split at the MMIO
/// hole.
pub fn numa_gpa_ranges(ram: &GuestRam, nodes: &[NumaNode]) -> Vec<(u64, u64, u32)> {
    let mut out = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let (start, end) = (node.mem_start, node.mem_start + node.mem_size);
        for r in ram.regions() {
            let (rs, re) = (r.file_offset, r.file_offset + r.size);
            let (s, e) = (start.max(rs), end.min(re));
            if s < e {
                out.push((r.gpa + (s - rs), e - s, n as u32));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numa_ranges_split_at_the_hole() {
        let ram = GuestRam::new((3u64 << 30) + (1 << 30)).unwrap();
        let nodes = vec![
            NumaNode {
                cpus: vec![0],
                mem_start: 0,
                mem_size: 2 << 30,
            },
            NumaNode {
                cpus: vec![1],
                mem_start: 2 << 30,
                mem_size: 2 << 30,
            },
        ];
        assert_eq!(
            numa_gpa_ranges(&ram, &nodes),
            vec![
                (0, 2 << 30, 0),
                (2 << 30, 1 << 30, 1),
                (crate::memory::HIGH_RAM_START, 1 << 30, 1)
            ]
        );
    }
}
