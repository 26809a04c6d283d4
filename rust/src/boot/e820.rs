//! The guest-physical RAM layout and the e820 map the guest is told about.
//!
//! Layout (docs/interfaces.md): RAM from 0 to `min(mem_size, 3 GiB)`, the MMIO hole
//! 3 GiB..4 GiB (IOAPIC, local APIC), the rest of RAM above 4 GiB. The 0x9FC00..1 MiB
//! part of the low range is backed by memory (the RSDP and ACPI tables live at
//! 0xE0000) but reported as reserved, like a PC's EBDA and BIOS area.
//!
//! "RAM offsets" (the `numa[].mem_start` of the VM spec) count bytes of guest RAM with
//! the hole skipped; [`ram_offset_to_gpa`] and [`gpa_to_ram_offset`] convert.

use serde::Serialize;

/// Start of the EBDA / BIOS area (end of low usable RAM).
pub const EBDA_START: u64 = 0x9_FC00;
/// Start of "high" memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO hole below 4 GiB; RAM below it ends here at most.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// 4 GiB: RAM beyond the first 3 GiB continues here.
pub const FOUR_GIB: u64 = 0x1_0000_0000;

/// e820 type 1: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type 2: reserved.
pub const E820_RESERVED: u32 = 2;

/// Kind of an e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum E820Kind {
    /// Usable RAM (type 1).
    Ram,
    /// Reserved (type 2).
    Reserved,
}

impl E820Kind {
    /// The numeric e820 / `hvm_memmap_table_entry` / Multiboot mmap type.
    pub fn code(self) -> u32 {
        match self {
            E820Kind::Ram => E820_RAM,
            E820Kind::Reserved => E820_RESERVED,
        }
    }
}

/// One entry of the e820 map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct E820Entry {
    /// Guest-physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// RAM or reserved.
    pub kind: E820Kind,
}

impl E820Entry {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Top of the RAM below the MMIO hole: `min(mem_size, 3 GiB)`.
pub fn low_ram_top(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

/// The guest-physical ranges `(gpa, len)` that must be backed by memory for a VM
/// with `mem_size` bytes of RAM: `[0, min(mem, 3 GiB))` and, if there is more,
/// `[4 GiB, 4 GiB + mem - 3 GiB)`. Empty ranges are left out.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::with_capacity(2);
    let low = low_ram_top(mem_size);
    if low > 0 {
        v.push((0, low));
    }
    if mem_size > MMIO_HOLE_START {
        v.push((FOUR_GIB, mem_size - MMIO_HOLE_START));
    }
    v
}

/// Guest-physical address of RAM offset `offset` (the hole is skipped).
pub fn ram_offset_to_gpa(offset: u64) -> u64 {
    if offset < MMIO_HOLE_START {
        offset
    } else {
        offset.saturating_add(FOUR_GIB - MMIO_HOLE_START)
    }
}

/// RAM offset of a guest-physical address, `None` inside the MMIO hole.
pub fn gpa_to_ram_offset(gpa: u64) -> Option<u64> {
    if gpa < MMIO_HOLE_START {
        Some(gpa)
    } else if gpa < FOUR_GIB {
        None
    } else {
        Some(gpa - (FOUR_GIB - MMIO_HOLE_START))
    }
}

/// The e820 map for `mem_size` bytes of RAM, sorted by address, non-overlapping:
/// RAM `[0, 0x9FC00)`, reserved `[0x9FC00, 1 MiB)`, RAM `[1 MiB, min(mem, 3 GiB))`,
/// reserved `[3 GiB, 4 GiB)` (MMIO: IOAPIC, local APIC), RAM above 4 GiB.
pub fn e820(mem_size: u64) -> Vec<E820Entry> {
    let mut v = Vec::with_capacity(5);
    let low = low_ram_top(mem_size);
    v.push(E820Entry {
        addr: 0,
        size: low.min(EBDA_START),
        kind: E820Kind::Ram,
    });
    v.push(E820Entry {
        addr: EBDA_START,
        size: HIMEM_START - EBDA_START,
        kind: E820Kind::Reserved,
    });
    if low > HIMEM_START {
        v.push(E820Entry {
            addr: HIMEM_START,
            size: low - HIMEM_START,
            kind: E820Kind::Ram,
        });
    }
    v.push(E820Entry {
        addr: MMIO_HOLE_START,
        size: FOUR_GIB - MMIO_HOLE_START,
        kind: E820Kind::Reserved,
    });
    if mem_size > MMIO_HOLE_START {
        v.push(E820Entry {
            addr: FOUR_GIB,
            size: mem_size - MMIO_HOLE_START,
            kind: E820Kind::Ram,
        });
    }
    v.retain(|e| e.size > 0);
    v
}

/// True if `[start, start + len)` lies inside one usable-RAM e820 entry.
pub fn is_usable_ram(mem_size: u64, start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    e820(mem_size)
        .iter()
        .any(|e| e.kind == E820Kind::Ram && start >= e.addr && end <= e.end())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_vm_layout() {
        let m = 256 * MIB;
        assert_eq!(ram_ranges(m), vec![(0, m)]);
        let e = e820(m);
        assert_eq!(
            e,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9FC00,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0x9FC00,
                    size: 0x400 + 0x60000,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: MIB,
                    size: m - MIB,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 3 * GIB,
                    size: GIB,
                    kind: E820Kind::Reserved
                },
            ]
        );
    }

    #[test]
    fn large_vm_layout_skips_hole() {
        let m = 6 * GIB;
        assert_eq!(ram_ranges(m), vec![(0, 3 * GIB), (4 * GIB, 3 * GIB)]);
        let e = e820(m);
        assert_eq!(e.len(), 5);
        assert_eq!(e[2].end(), 3 * GIB);
        assert_eq!(
            e[4],
            E820Entry {
                addr: 4 * GIB,
                size: 3 * GIB,
                kind: E820Kind::Ram
            }
        );
        // sorted and non-overlapping
        for w in e.windows(2) {
            assert!(w[0].end() <= w[1].addr);
        }
        let ram: u64 = e
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, m - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn exactly_three_gib_has_no_high_range() {
        assert_eq!(ram_ranges(3 * GIB), vec![(0, 3 * GIB)]);
        assert!(e820(3 * GIB).iter().all(|e| e.addr < 4 * GIB));
    }

    #[test]
    fn offsets_and_gpas() {
        assert_eq!(ram_offset_to_gpa(0x1000), 0x1000);
        assert_eq!(ram_offset_to_gpa(3 * GIB), 4 * GIB);
        assert_eq!(gpa_to_ram_offset(4 * GIB + 5), Some(3 * GIB + 5));
        assert_eq!(gpa_to_ram_offset(0xFEE0_0000), None);
        assert!(is_usable_ram(256 * MIB, MIB, MIB));
        assert!(!is_usable_ram(256 * MIB, 0x9F000, 0x2000));
        assert!(!is_usable_ram(256 * MIB, 255 * MIB, 2 * MIB));
        assert!(!is_usable_ram(256 * MIB, u64::MAX, 2));
    }
}
