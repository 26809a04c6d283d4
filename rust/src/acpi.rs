//! ACPI tables: RSDP, XSDT, FADT, DSDT, MADT, SRAT, SLIT.
//!
//! Built with the `acpi_tables` crate where it has the table (RSDP, XSDT, FADT,
//! MADT with its local-APIC and IOAPIC entries, SRAT memory affinity, AML for
//! the DSDT); the structures it lacks (MADT x2APIC / interrupt source override
//! / local APIC NMI entries, SRAT processor affinity entries) are zerocopy
//! structs here. The SLIT and SRAT are assembled with its generic
//! [`acpi_tables::sdt::Sdt`] so that asymmetric distance matrices and x86
//! processor affinity entries fit.
//!
//! The tables tell the guest the NUMA topology of the distributed VM: which
//! vCPUs (APIC IDs) and which memory ranges belong to which node (SRAT) and how
//! far the nodes are from each other (SLIT).
//!
//! [`build_tables`] places everything in guest-physical memory from a base
//! (normally [`ACPI_TABLES_BASE`] = 0xE0000, where the legacy RSDP scan also
//! finds it) and returns blobs for the caller to write: this module never
//! touches guest memory.
//!
//! Platform description choices:
//! - FADT: ACPI 6.5, HW-reduced (no PM timer, no SCI, no FACS), no fixed
//!   power/sleep buttons; IA-PC boot flags: legacy devices present (COM1), no
//!   8042, no VGA, no CMOS RTC (dvmm emulates none of them).
//! - DSDT: `\_SB_` with a COM1 device (PNP0501, I/O 0x3F8-0x3FF, IRQ 4).
//! - MADT: no PCAT_COMPAT flag (there is no 8259), one Processor Local APIC
//!   entry per vCPU (Processor Local x2APIC for APIC IDs >= 255), the IOAPIC,
//!   ISA IRQ 0 -> GSI 2 override, LINT1 = NMI for every processor.

use acpi_tables::{
    aml,
    fadt::{FADTBuilder, Flags},
    madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT},
    rsdp::Rsdp,
    sdt::Sdt,
    srat::MemoryAffinity,
    xsdt::XSDT,
    Aml, AmlSink,
};
use thiserror::Error;
use zerocopy::{
    little_endian::{U16, U32},
    FromBytes, Immutable, IntoBytes,
};

/// Where the RSDP goes (docs/interfaces.md); the tables follow it.
pub const ACPI_TABLES_BASE: u64 = 0xE_0000;
/// End (exclusive) of the area reserved for the tables.
pub const ACPI_TABLES_LIMIT: u64 = 0x10_0000;
/// Default local APIC address.
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;
/// Default IOAPIC address.
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
/// SLIT distance of a node to itself.
pub const LOCAL_DISTANCE: u8 = 10;
/// Default SLIT distance between two different nodes: the largest the SLIT can
/// say (255 means "unreachable"). SLIT distances are relative latencies (10 =
/// local); a remote access of a distributed VM is a page fault served over the
/// network (~40-115 us here, ARCHITECTURE.md; a few us with RDMA) against ~0.1 us
/// for local memory, hundreds of times local, so any smaller value understates
/// it. The value matters to the guest: Linux stops balancing on exec and fork
/// and waking tasks onto another node's CPU (SD_BALANCE_EXEC/FORK,
/// SD_WAKE_AFFINE) only across NUMA levels farther than its
/// `node_reclaim_distance` (30); at the former default, 20 (a two-socket
/// server), a plain 2-node Linux boot kept moving tasks, and with them their
/// stacks and run-queue data, between the nodes (README.md, "Linux guests").
pub const REMOTE_DISTANCE: u8 = 254;
/// Linux's `RECLAIM_DISTANCE`: NUMA levels farther than this are not used for
/// fork/exec balancing and wake-affine moves (kernel/sched/topology.c).
#[cfg(test)]
const LINUX_RECLAIM_DISTANCE: u8 = 30;

const OEM_ID: [u8; 6] = *b"DVMM  ";
const OEM_REVISION: u32 = 1;
const TABLE_ALIGN: u64 = 16;

/// FADT IA-PC boot architecture flags (ACPI 5.2.9.3).
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Errors building the tables (all are caller mistakes in the layout).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AcpiError {
    /// The layout has no vCPU.
    #[error("the ACPI layout has no vCPU")]
    NoCpus,
    /// Two vCPUs share an APIC ID.
    #[error("APIC ID {0} appears twice")]
    DuplicateApicId(u32),
    /// APIC ID 0xFFFF_FFFF is the x2APIC broadcast address.
    #[error("APIC ID {0:#x} is reserved")]
    ReservedApicId(u32),
    /// A memory range is empty or wraps around the address space.
    #[error("bad memory range {gpa:#x}+{size:#x}")]
    BadMemoryRange {
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// The distance matrix is not `nodes x nodes`.
    #[error("distance matrix must be {nodes}x{nodes}")]
    DistanceMatrixShape {
        /// Number of NUMA nodes in the layout.
        nodes: usize,
    },
    /// A distance is invalid (must be 10 on the diagonal, > 10 elsewhere).
    #[error("invalid distance {value} from node {from} to node {to}")]
    BadDistance {
        /// Row.
        from: usize,
        /// Column.
        to: usize,
        /// Value.
        value: u8,
    },
    /// A NUMA node number does not fit a proximity domain / the SLIT.
    #[error("too many NUMA nodes ({0})")]
    TooManyNodes(u64),
    /// The tables do not fit between the base and [`ACPI_TABLES_LIMIT`].
    #[error("ACPI tables need {needed} bytes at {base:#x}, only {available} available")]
    TooLarge {
        /// Base address.
        base: u64,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
}

/// One vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiCpu {
    /// Its (global) APIC ID.
    pub apic_id: u32,
    /// Its NUMA node (proximity domain).
    pub node: u32,
}

/// One guest-physical memory range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiMemory {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Its NUMA node (proximity domain).
    pub node: u32,
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiLayout {
    /// The vCPUs, in ACPI processor UID order (UID = index).
    pub cpus: Vec<AcpiCpu>,
    /// RAM ranges (one per contiguous range per node; a node's RAM split by the
    /// MMIO hole gives two entries).
    pub memory: Vec<AcpiMemory>,
    /// SLIT matrix `[from][to]`; `None`: [`LOCAL_DISTANCE`] local, [`REMOTE_DISTANCE`] remote.
    pub distances: Option<Vec<Vec<u8>>>,
    /// IOAPIC ID.
    pub ioapic_id: u8,
    /// IOAPIC address.
    pub ioapic_addr: u32,
    /// Local APIC address.
    pub lapic_addr: u32,
    /// Describe COM1 in the DSDT.
    pub com1: bool,
}

impl AcpiLayout {
    /// A layout with the defaults of docs/interfaces.md: the IOAPIC ID of
    /// [`crate::ioapic::ioapic_id_for`] (the number of vCPUs up to 15, else 15: the
    /// register has 4 bits), standard addresses, default distances, COM1.
    pub fn new(cpus: Vec<AcpiCpu>, memory: Vec<AcpiMemory>) -> Self {
        Self {
            ioapic_id: crate::ioapic::ioapic_id_for(cpus.len()),
            cpus,
            memory,
            distances: None,
            ioapic_addr: IOAPIC_ADDR,
            lapic_addr: LAPIC_ADDR,
            com1: true,
        }
    }

    /// Number of NUMA nodes: one more than the highest node number used.
    pub fn num_nodes(&self) -> u64 {
        let cpus = self.cpus.iter().map(|c| c.node);
        let mem = self.memory.iter().map(|m| m.node);
        let max = cpus.chain(mem).map(u64::from).max().map_or(1, |n| n + 1);
        max.max(self.distances.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// The tables, placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest-physical address of the RSDP.
    pub rsdp_addr: u64,
    /// `(gpa, bytes)` to write into guest memory, RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
    /// `(signature, gpa)` of every table ("RSD " for the RSDP).
    pub tables: Vec<([u8; 4], u64)>,
    /// One past the last byte used (for the e820 reserved range).
    pub end: u64,
}

impl AcpiTables {
    /// Address of the table with this signature.
    pub fn table_addr(&self, signature: &[u8; 4]) -> Option<u64> {
        self.tables
            .iter()
            .find(|(s, _)| s == signature)
            .map(|&(_, a)| a)
    }

    /// Bytes of the blob at `gpa`.
    pub fn blob_at(&self, gpa: u64) -> Option<&[u8]> {
        self.blobs
            .iter()
            .find(|(a, _)| *a == gpa)
            .map(|(_, b)| b.as_slice())
    }
}

// ---------------------------------------------------------------------------
// Structures acpi_tables 0.2 does not have.
// ---------------------------------------------------------------------------

/// MADT type 9: Processor Local x2APIC.
#[repr(C)]
#[derive(Clone, Copy, Debug, IntoBytes, FromBytes, Immutable)]
struct LocalX2Apic {
    r#type: u8,
    length: u8,
    _reserved: U16,
    x2apic_id: U32,
    flags: U32,
    processor_uid: U32,
}

/// MADT type 2: Interrupt Source Override.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, FromBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

/// MADT type 4: Local APIC NMI.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, FromBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

/// MADT type 0xA: Local x2APIC NMI.
#[repr(C)]
#[derive(Clone, Copy, Debug, IntoBytes, FromBytes, Immutable)]
struct LocalX2ApicNmi {
    r#type: u8,
    length: u8,
    flags: U16,
    processor_uid: U32,
    lint: u8,
    _reserved: [u8; 3],
}

/// SRAT type 0: Processor Local APIC Affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, IntoBytes, FromBytes, Immutable)]
struct ProcessorApicAffinity {
    r#type: u8,
    length: u8,
    proximity_lo: u8,
    apic_id: u8,
    flags: U32,
    sapic_eid: u8,
    proximity_hi: [u8; 3],
    clock_domain: U32,
}

/// SRAT type 2: Processor Local x2APIC Affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, IntoBytes, FromBytes, Immutable)]
struct ProcessorX2ApicAffinity {
    r#type: u8,
    length: u8,
    _reserved: U16,
    proximity: U32,
    x2apic_id: U32,
    flags: U32,
    clock_domain: U32,
    _reserved2: U32,
}

macro_rules! aml_bytes {
    ($($t:ty),*) => {$(
        impl Aml for $t {
            fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
                sink.vec(self.as_bytes());
            }
        }
    )*};
}
aml_bytes!(
    LocalX2Apic,
    InterruptSourceOverride,
    LocalApicNmi,
    LocalX2ApicNmi
);

const _: () = assert!(std::mem::size_of::<LocalX2Apic>() == 16);
const _: () = assert!(std::mem::size_of::<InterruptSourceOverride>() == 10);
const _: () = assert!(std::mem::size_of::<LocalApicNmi>() == 6);
const _: () = assert!(std::mem::size_of::<LocalX2ApicNmi>() == 12);
const _: () = assert!(std::mem::size_of::<ProcessorApicAffinity>() == 16);
const _: () = assert!(std::mem::size_of::<ProcessorX2ApicAffinity>() == 24);

const ENABLED: u32 = 1;

fn to_vec(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

fn table_id(sig: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"DVMM    ";
    id[4..].copy_from_slice(sig);
    id
}

fn madt(layout: &AcpiLayout) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        table_id(b"APIC"),
        OEM_REVISION,
        LocalInterruptController::Address(layout.lapic_addr),
    );
    for (uid, cpu) in layout.cpus.iter().enumerate() {
        match (u8::try_from(uid), u8::try_from(cpu.apic_id)) {
            (Ok(uid), Ok(id)) if id != 0xFF => {
                madt.add_structure(ProcessorLocalApic::new(uid, id, EnabledStatus::Enabled));
            }
            _ => madt.add_structure(LocalX2Apic {
                r#type: 9,
                length: 16,
                _reserved: 0.into(),
                x2apic_id: cpu.apic_id.into(),
                flags: ENABLED.into(),
                processor_uid: (uid as u32).into(),
            }),
        }
    }
    madt.add_structure(IoApic::new(layout.ioapic_id, layout.ioapic_addr, 0));
    // ISA IRQ 0 (PIT) -> GSI 2, bus-conforming polarity and trigger.
    madt.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2.into(),
        flags: 0.into(),
    });
    // LINT1 is the NMI pin on every processor.
    madt.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: 0xFF,
        flags: 0.into(),
        lint: 1,
    });
    if layout.cpus.iter().any(|c| c.apic_id >= 0xFF) || layout.cpus.len() > 255 {
        madt.add_structure(LocalX2ApicNmi {
            r#type: 0xA,
            length: 12,
            flags: 0.into(),
            processor_uid: u32::MAX.into(),
            lint: 1,
            _reserved: [0; 3],
        });
    }
    to_vec(&madt)
}

fn srat(layout: &AcpiLayout) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"SRAT", 48, 3, OEM_ID, table_id(b"SRAT"), OEM_REVISION);
    sdt.write_u32(36, 1); // reserved, 1 for backward compatibility
    for cpu in &layout.cpus {
        let pd = cpu.node.to_le_bytes();
        match u8::try_from(cpu.apic_id) {
            Ok(id) if id != 0xFF => sdt.append(ProcessorApicAffinity {
                r#type: 0,
                length: 16,
                proximity_lo: pd[0],
                apic_id: id,
                flags: ENABLED.into(),
                sapic_eid: 0,
                proximity_hi: [pd[1], pd[2], pd[3]],
                clock_domain: 0.into(),
            }),
            _ => sdt.append(ProcessorX2ApicAffinity {
                r#type: 2,
                length: 24,
                _reserved: 0.into(),
                proximity: cpu.node.into(),
                x2apic_id: cpu.apic_id.into(),
                flags: ENABLED.into(),
                clock_domain: 0.into(),
                _reserved2: 0.into(),
            }),
        }
    }
    for m in &layout.memory {
        sdt.append_slice(&to_vec(
            &MemoryAffinity::new(m.node, m.gpa, m.size).enabled(),
        ));
    }
    sdt.as_slice().to_vec()
}

fn slit(layout: &AcpiLayout, nodes: usize) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"SLIT", 44, 1, OEM_ID, table_id(b"SLIT"), OEM_REVISION);
    sdt.write_u64(36, nodes as u64);
    let mut row = vec![0u8; nodes];
    for i in 0..nodes {
        for (j, d) in row.iter_mut().enumerate() {
            *d = match &layout.distances {
                Some(m) => m[i][j],
                None if i == j => LOCAL_DISTANCE,
                None => REMOTE_DISTANCE,
            };
        }
        sdt.append_slice(&row);
    }
    sdt.as_slice().to_vec()
}

fn dsdt(layout: &AcpiLayout) -> Vec<u8> {
    let mut body = Vec::new();
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &1u8);
    let io = aml::IO::new(0x3F8, 0x3F8, 0, 8);
    let irq = aml::Interrupt::new(true, true, false, false, 4);
    let crs_template = aml::ResourceTemplate::new(vec![&io, &irq]);
    let crs = aml::Name::new("_CRS".into(), &crs_template);
    let com1 = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    let children: Vec<&dyn Aml> = if layout.com1 { vec![&com1] } else { vec![] };
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, table_id(b"DSDT"), OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // Legacy 32-bit DSDT pointer too, for ACPI 1.0-minded parsers.
    if let Ok(a) = u32::try_from(dsdt_addr) {
        b.dsdt = a.into();
    }
    b.iapc_boot_arch =
        (IAPC_LEGACY_DEVICES | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    to_vec(&b.finalize())
}

fn validate(layout: &AcpiLayout) -> Result<usize, AcpiError> {
    if layout.cpus.is_empty() {
        return Err(AcpiError::NoCpus);
    }
    let mut ids: Vec<u32> = layout.cpus.iter().map(|c| c.apic_id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(AcpiError::DuplicateApicId(w[0]));
    }
    if ids.last() == Some(&u32::MAX) {
        return Err(AcpiError::ReservedApicId(u32::MAX));
    }
    for m in &layout.memory {
        if m.size == 0 || m.gpa.checked_add(m.size).is_none() {
            return Err(AcpiError::BadMemoryRange {
                gpa: m.gpa,
                size: m.size,
            });
        }
    }
    let nodes = layout.num_nodes();
    // The SLIT is nodes^2 bytes and must fit below 1 MiB.
    let nodes = match usize::try_from(nodes) {
        Ok(n) if n <= 256 => n,
        _ => return Err(AcpiError::TooManyNodes(nodes)),
    };
    if let Some(m) = &layout.distances {
        if m.len() != nodes || m.iter().any(|r| r.len() != nodes) {
            return Err(AcpiError::DistanceMatrixShape { nodes });
        }
        for (i, row) in m.iter().enumerate() {
            for (j, &value) in row.iter().enumerate() {
                let ok = if i == j {
                    value == LOCAL_DISTANCE
                } else {
                    value > LOCAL_DISTANCE
                };
                if !ok {
                    return Err(AcpiError::BadDistance {
                        from: i,
                        to: j,
                        value,
                    });
                }
            }
        }
    }
    Ok(nodes)
}

fn align_up(x: u64) -> u64 {
    (x + TABLE_ALIGN - 1) & !(TABLE_ALIGN - 1)
}

/// Builds every table for `layout` and places them from `base` (the RSDP at
/// `base`, normally [`ACPI_TABLES_BASE`]; then XSDT, FADT, DSDT, MADT, SRAT,
/// SLIT, each 16-byte aligned), all below [`ACPI_TABLES_LIMIT`].
pub fn build_tables(layout: &AcpiLayout, base: u64) -> Result<AcpiTables, AcpiError> {
    let nodes = validate(layout)?;
    let base = align_up(base);

    let madt = madt(layout);
    let srat = srat(layout);
    let slit = slit(layout, nodes);
    let dsdt = dsdt(layout);
    // XSDT has 4 entries: FADT, MADT, SRAT, SLIT.
    let xsdt_len = 36 + 8 * 4;
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;

    let rsdp_addr = base;
    let xsdt_addr = align_up(rsdp_addr + Rsdp::len() as u64);
    let fadt_addr = align_up(xsdt_addr + xsdt_len);
    let dsdt_addr = align_up(fadt_addr + fadt_len);
    let madt_addr = align_up(dsdt_addr + dsdt.len() as u64);
    let srat_addr = align_up(madt_addr + madt.len() as u64);
    let slit_addr = align_up(srat_addr + srat.len() as u64);
    let end = slit_addr + slit.len() as u64;
    if end > ACPI_TABLES_LIMIT {
        return Err(AcpiError::TooLarge {
            base,
            needed: end.saturating_sub(base),
            available: ACPI_TABLES_LIMIT.saturating_sub(base),
        });
    }

    let fadt = fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    for addr in [fadt_addr, madt_addr, srat_addr, slit_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt = to_vec(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = to_vec(&Rsdp::new(OEM_ID, xsdt_addr));

    let placed = [
        (*b"RSD ", rsdp_addr, rsdp),
        (*b"XSDT", xsdt_addr, xsdt),
        (*b"FACP", fadt_addr, fadt),
        (*b"DSDT", dsdt_addr, dsdt),
        (*b"APIC", madt_addr, madt),
        (*b"SRAT", srat_addr, srat),
        (*b"SLIT", slit_addr, slit),
    ];
    Ok(AcpiTables {
        rsdp_addr,
        tables: placed.iter().map(|(s, a, _)| (*s, *a)).collect(),
        blobs: placed.into_iter().map(|(_, a, b)| (a, b)).collect(),
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// Sub-structures of a table with a fixed prefix: (type, bytes).
    fn entries(table: &[u8], start: usize) -> Vec<(u8, &[u8])> {
        let mut out = vec![];
        let mut o = start;
        while o < table.len() {
            let len = table[o + 1] as usize;
            assert!(len >= 2, "zero-length structure at {o}");
            out.push((table[o], &table[o..o + len]));
            o += len;
        }
        assert_eq!(o, table.len());
        out
    }

    fn two_nodes() -> AcpiLayout {
        AcpiLayout::new(
            vec![
                AcpiCpu {
                    apic_id: 0,
                    node: 0,
                },
                AcpiCpu {
                    apic_id: 1,
                    node: 0,
                },
                AcpiCpu {
                    apic_id: 2,
                    node: 1,
                },
                AcpiCpu {
                    apic_id: 3,
                    node: 1,
                },
            ],
            vec![
                AcpiMemory {
                    gpa: 0,
                    size: 0x8000_0000,
                    node: 0,
                },
                AcpiMemory {
                    gpa: 0x8000_0000,
                    size: 0x4000_0000,
                    node: 1,
                },
                AcpiMemory {
                    gpa: 0x1_0000_0000,
                    size: 0x4000_0000,
                    node: 1,
                },
            ],
        )
    }

    fn build(layout: &AcpiLayout) -> AcpiTables {
        build_tables(layout, ACPI_TABLES_BASE).unwrap()
    }

    fn table<'a>(t: &'a AcpiTables, sig: &[u8; 4]) -> &'a [u8] {
        t.blob_at(t.table_addr(sig).unwrap()).unwrap()
    }

    #[test]
    fn checksums_lengths_signatures() {
        let t = build(&two_nodes());
        assert_eq!(t.rsdp_addr, 0xE0000);
        for (sig, addr) in &t.tables {
            let b = t.blob_at(*addr).unwrap();
            assert_eq!(addr % 16, 0);
            assert!(*addr >= ACPI_TABLES_BASE && addr + b.len() as u64 <= ACPI_TABLES_LIMIT);
            if sig == b"RSD " {
                continue;
            }
            assert_eq!(&b[0..4], sig);
            assert_eq!(
                u32_at(b, 4) as usize,
                b.len(),
                "{}",
                String::from_utf8_lossy(sig)
            );
            assert_eq!(sum(b), 0, "checksum of {}", String::from_utf8_lossy(sig));
            assert_eq!(&b[10..16], b"DVMM  ");
        }
        // no overlaps
        let mut spans: Vec<(u64, u64)> = t
            .blobs
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
        assert_eq!(t.end, spans.last().unwrap().1);
    }

    #[test]
    fn rsdp_and_xsdt() {
        let t = build(&two_nodes());
        let r = t.blob_at(t.rsdp_addr).unwrap();
        assert_eq!(r.len(), 36);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(sum(&r[0..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(r), 0, "extended checksum");
        assert_eq!(r[15], 2, "revision 2");
        assert_eq!(u32_at(r, 20), 36);
        let xsdt_addr = u64_at(r, 24);
        assert_eq!(Some(xsdt_addr), t.table_addr(b"XSDT"));
        let x = t.blob_at(xsdt_addr).unwrap();
        let ptrs: Vec<u64> = (36..x.len()).step_by(8).map(|o| u64_at(x, o)).collect();
        let sigs: Vec<&[u8]> = ptrs.iter().map(|p| &t.blob_at(*p).unwrap()[0..4]).collect();
        assert_eq!(sigs, vec![&b"FACP"[..], b"APIC", b"SRAT", b"SLIT"]);
    }

    #[test]
    fn fadt_points_to_dsdt_and_is_hw_reduced() {
        let t = build(&two_nodes());
        let f = table(&t, b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "FADT major version");
        let dsdt = t.table_addr(b"DSDT").unwrap();
        assert_eq!(u32_at(f, 40) as u64, dsdt);
        assert_eq!(u64_at(f, 140), dsdt, "X_DSDT");
        assert_ne!(u32_at(f, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u16::from_le_bytes([f[109], f[110]]), 0b10_0101);
        let d = table(&t, b"DSDT");
        assert_eq!(d[36], 0x10, "ScopeOp");
        assert!(d.windows(4).any(|w| w == b"COM1"));
        let mut l = two_nodes();
        l.com1 = false;
        let d2 = build(&l);
        assert!(!table(&d2, b"DSDT").windows(4).any(|w| w == b"COM1"));
    }

    #[test]
    fn madt_entries() {
        let t = build(&two_nodes());
        let m = table(&t, b"APIC");
        assert_eq!(u32_at(m, 36), 0xFEE0_0000);
        assert_eq!(u32_at(m, 40), 0, "no PCAT_COMPAT");
        let e = entries(m, 44);
        let lapics: Vec<(u8, u8, u32)> = e
            .iter()
            .filter(|(ty, _)| *ty == 0)
            .map(|(_, b)| (b[2], b[3], u32_at(b, 4)))
            .collect();
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
        let io: Vec<_> = e.iter().filter(|(ty, _)| *ty == 1).collect();
        assert_eq!(io.len(), 1);
        let io = io[0].1;
        assert_eq!(io[2], 4, "IOAPIC id = vcpus");
        assert_eq!(u32_at(io, 4), 0xFEC0_0000);
        assert_eq!(u32_at(io, 8), 0, "GSI base");
        let iso: Vec<_> = e.iter().filter(|(ty, _)| *ty == 2).collect();
        assert_eq!(iso.len(), 1);
        assert_eq!((iso[0].1[3], u32_at(iso[0].1, 4)), (0, 2), "IRQ0 -> GSI2");
        let nmi: Vec<_> = e.iter().filter(|(ty, _)| *ty == 4).collect();
        assert_eq!((nmi[0].1[2], nmi[0].1[5]), (0xFF, 1));
        assert!(e.iter().all(|(ty, _)| *ty != 9));
    }

    #[test]
    fn madt_x2apic_entries_for_large_ids() {
        let cpus: Vec<AcpiCpu> = (0..300)
            .map(|i| AcpiCpu {
                apic_id: i,
                node: i / 150,
            })
            .collect();
        let mut l = AcpiLayout::new(
            cpus,
            vec![AcpiMemory {
                gpa: 0,
                size: 1 << 30,
                node: 0,
            }],
        );
        l.ioapic_id = 0xFE;
        let t = build(&l);
        let m = table(&t, b"APIC");
        assert_eq!(sum(m), 0);
        let e = entries(m, 44);
        let xapic: Vec<u8> = e
            .iter()
            .filter(|(ty, _)| *ty == 0)
            .map(|(_, b)| b[3])
            .collect();
        assert_eq!(xapic, (0..255).collect::<Vec<u8>>());
        let x2: Vec<(u32, u32)> = e
            .iter()
            .filter(|(ty, _)| *ty == 9)
            .map(|(_, b)| (u32_at(b, 4), u32_at(b, 12)))
            .collect();
        assert_eq!(x2.len(), 45);
        assert_eq!(x2[0], (255, 255));
        assert_eq!(x2[44], (299, 299));
        assert_eq!(e.iter().filter(|(ty, _)| *ty == 0xA).count(), 1);
        // SRAT: x2APIC affinity for the same IDs
        let s = table(&t, b"SRAT");
        let se = entries(s, 48);
        let x2aff: Vec<(u32, u32)> = se
            .iter()
            .filter(|(ty, _)| *ty == 2)
            .map(|(_, b)| (u32_at(b, 8), u32_at(b, 4)))
            .collect();
        assert_eq!(x2aff.len(), 45);
        assert_eq!(x2aff[0], (255, 1));
    }

    #[test]
    fn srat_per_node() {
        let t = build(&two_nodes());
        let s = table(&t, b"SRAT");
        assert_eq!(u32_at(s, 36), 1);
        let e = entries(s, 48);
        let cpus: Vec<(u8, u32, u32)> = e
            .iter()
            .filter(|(ty, _)| *ty == 0)
            .map(|(_, b)| {
                let pd = u32::from_le_bytes([b[2], b[9], b[10], b[11]]);
                (b[3], pd, u32_at(b, 4))
            })
            .collect();
        assert_eq!(cpus, vec![(0, 0, 1), (1, 0, 1), (2, 1, 1), (3, 1, 1)]);
        let mem: Vec<(u32, u64, u64, u32)> = e
            .iter()
            .filter(|(ty, _)| *ty == 1)
            .map(|(_, b)| (u32_at(b, 2), u64_at(b, 8), u64_at(b, 16), u32_at(b, 28)))
            .collect();
        assert_eq!(
            mem,
            vec![
                (0, 0, 0x8000_0000, 1),
                (1, 0x8000_0000, 0x4000_0000, 1),
                (1, 0x1_0000_0000, 0x4000_0000, 1),
            ]
        );
    }

    #[test]
    fn slit_default_and_given() {
        let t = build(&two_nodes());
        let s = table(&t, b"SLIT");
        assert_eq!(u64_at(s, 36), 2);
        assert_eq!(
            &s[44..],
            &[
                LOCAL_DISTANCE,
                REMOTE_DISTANCE,
                REMOTE_DISTANCE,
                LOCAL_DISTANCE
            ]
        );
        assert_eq!(&s[44..], &[10, 254, 254, 10]);
        let mut l = two_nodes();
        l.cpus.push(AcpiCpu {
            apic_id: 4,
            node: 2,
        });
        l.distances = Some(vec![vec![10, 15, 30], vec![16, 10, 25], vec![30, 25, 10]]);
        let t = build(&l);
        let s = table(&t, b"SLIT");
        assert_eq!(sum(s), 0);
        assert_eq!(u64_at(s, 36), 3);
        assert_eq!(&s[44..], &[10, 15, 30, 16, 10, 25, 30, 25, 10]);
    }

    /// The default remote distance is one Linux treats as far (no fork/exec
    /// balancing, no wake-affine moves across nodes), and a valid SLIT entry
    /// (255 would mean "unreachable").
    #[test]
    fn default_remote_distance_is_far_and_reachable() {
        const { assert!(REMOTE_DISTANCE > LINUX_RECLAIM_DISTANCE) };
        const { assert!(REMOTE_DISTANCE < u8::MAX) };
        let mut l = two_nodes();
        l.distances = Some(vec![vec![10, REMOTE_DISTANCE], vec![REMOTE_DISTANCE, 10]]);
        assert_eq!(build(&l), build(&two_nodes()));
    }

    #[test]
    fn single_node_default() {
        let l = AcpiLayout::new(
            vec![AcpiCpu {
                apic_id: 0,
                node: 0,
            }],
            vec![AcpiMemory {
                gpa: 0,
                size: 256 << 20,
                node: 0,
            }],
        );
        assert_eq!(l.ioapic_id, 1);
        let t = build(&l);
        assert_eq!(&table(&t, b"SLIT")[36..], &[1, 0, 0, 0, 0, 0, 0, 0, 10]);
    }

    #[test]
    fn bad_layouts() {
        let mut l = two_nodes();
        l.cpus.clear();
        assert_eq!(build_tables(&l, ACPI_TABLES_BASE), Err(AcpiError::NoCpus));
        let mut l = two_nodes();
        l.cpus[3].apic_id = 1;
        assert_eq!(
            build_tables(&l, ACPI_TABLES_BASE),
            Err(AcpiError::DuplicateApicId(1))
        );
        let mut l = two_nodes();
        l.cpus[3].apic_id = u32::MAX;
        assert!(build_tables(&l, ACPI_TABLES_BASE).is_err());
        let mut l = two_nodes();
        l.memory[0].size = 0;
        assert!(matches!(
            build_tables(&l, ACPI_TABLES_BASE),
            Err(AcpiError::BadMemoryRange { .. })
        ));
        l.memory[0] = AcpiMemory {
            gpa: u64::MAX,
            size: 2,
            node: 0,
        };
        assert!(matches!(
            build_tables(&l, ACPI_TABLES_BASE),
            Err(AcpiError::BadMemoryRange { .. })
        ));
        let mut l = two_nodes();
        l.distances = Some(vec![vec![10, 20]]);
        assert_eq!(
            build_tables(&l, ACPI_TABLES_BASE),
            Err(AcpiError::DistanceMatrixShape { nodes: 2 })
        );
        l.distances = Some(vec![vec![10, 20], vec![20, 11]]);
        assert!(matches!(
            build_tables(&l, ACPI_TABLES_BASE),
            Err(AcpiError::BadDistance { from: 1, to: 1, .. })
        ));
        l.distances = Some(vec![vec![10, 5], vec![20, 10]]);
        assert!(matches!(
            build_tables(&l, ACPI_TABLES_BASE),
            Err(AcpiError::BadDistance { from: 0, to: 1, .. })
        ));
        let mut l = two_nodes();
        l.cpus[0].node = u32::MAX;
        assert!(matches!(
            build_tables(&l, ACPI_TABLES_BASE),
            Err(AcpiError::TooManyNodes(_))
        ));
        // does not fit
        assert!(matches!(
            build_tables(&two_nodes(), 0xFFF00),
            Err(AcpiError::TooLarge { .. })
        ));
    }

    /// The MADT's IOAPIC ID fits the IOAPIC's 4-bit ID register and is what that
    /// register reads, for every vCPU count; below 16 vCPUs no local APIC has it.
    #[test]
    fn madt_ioapic_id_matches_the_register() {
        for n in [1usize, 2, 4, 15, 16, 17, 64, 254, 255, 300] {
            let cpus: Vec<AcpiCpu> = (0..n as u32)
                .map(|i| AcpiCpu {
                    apic_id: i,
                    node: 0,
                })
                .collect();
            let memory = vec![AcpiMemory {
                gpa: 0,
                size: 256 << 20,
                node: 0,
            }];
            let t = build(&AcpiLayout::new(cpus, memory));
            let e = entries(table(&t, b"APIC"), 44);
            let io: Vec<_> = e.iter().filter(|(ty, _)| *ty == 1).collect();
            assert_eq!(io.len(), 1, "{n} vCPUs");
            let madt_id = io[0].1[2];
            assert!(
                madt_id <= 15,
                "{n} vCPUs: IOAPIC ID {madt_id} has more than 4 bits"
            );
            assert_eq!(madt_id, crate::ioapic::ioapic_id_for(n), "{n} vCPUs");
            // The register of an IOAPIC built the way vm.rs builds it.
            let mut ioapic = crate::ioapic::IoApic::new(crate::ioapic::ioapic_id_for(n));
            ioapic.mmio_write(crate::ioapic::IOREGSEL, &[0]);
            let mut reg = [0u8; 4];
            ioapic.mmio_read(crate::ioapic::IOWIN, &mut reg);
            assert_eq!(
                u32::from_le_bytes(reg),
                u32::from(madt_id) << 24,
                "{n} vCPUs"
            );
            if n < 16 {
                assert_eq!(usize::from(madt_id), n, "{n} vCPUs: first free ID");
                let lapic_ids: Vec<u8> = e
                    .iter()
                    .filter(|(ty, _)| *ty == 0)
                    .map(|(_, b)| b[3])
                    .collect();
                assert!(
                    !lapic_ids.contains(&madt_id),
                    "{n} vCPUs: shared with a LAPIC"
                );
            } else {
                assert_eq!(madt_id, 15, "{n} vCPUs");
            }
        }
    }

    #[test]
    fn many_cpus_fit() {
        let cpus: Vec<AcpiCpu> = (0..1024)
            .map(|i| AcpiCpu {
                apic_id: i,
                node: i / 64,
            })
            .collect();
        let memory = (0..16)
            .map(|n| AcpiMemory {
                gpa: u64::from(n) << 30,
                size: 1 << 30,
                node: n,
            })
            .collect();
        let t = build(&AcpiLayout::new(cpus, memory));
        assert!(t.end <= ACPI_TABLES_LIMIT);
        for (sig, a) in &t.tables {
            if sig != b"RSD " {
                assert_eq!(sum(t.blob_at(*a).unwrap()), 0);
            }
        }
    }
}
