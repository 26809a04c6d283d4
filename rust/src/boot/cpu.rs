//! Initial CPU state of the boot vCPU: the boot GDT, identity page tables for the
//! Linux 64-bit protocol, and the translation of an [`EntryState`] into
//! `kvm_regs` / `kvm_sregs`.
//!
//! The segment registers' hidden parts are derived from the very GDT descriptors
//! written to guest memory, so what KVM holds and what a reload of the selectors
//! would give are the same.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use super::EntryState;

/// Guest-physical address of the boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Selector of the boot code segment (Linux `__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment (Linux `__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Selector of the boot TSS (only there because VMX wants a usable TR).
pub const BOOT_TSS: u16 = 0x20;

/// PML4 of the identity page tables (Linux 64-bit boot).
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the identity page tables.
pub const PDPT_ADDR: u64 = 0xA000;
/// First of [`IDENTITY_MAP_GIB`] page directories (2 MiB pages).
pub const PD_ADDR: u64 = 0xB000;
/// How much is identity mapped for the Linux 64-bit entry, in GiB (all of the
/// 32-bit space, so the kernel, boot_params, command line and an initrd placed high
/// below 4 GiB are all reachable).
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Initial stack pointer for the Linux 64-bit entry (the kernel sets its own at once).
pub const BOOT_STACK: u64 = 0x8FF0;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// 64-bit code, DPL 0, present, L=1, G=1.
const DESC_CODE64: u64 = 0x00AF_9B00_0000_FFFF;
/// 32-bit code, flat 4 GiB, DPL 0, present, D=1, G=1.
const DESC_CODE32: u64 = 0x00CF_9B00_0000_FFFF;
/// 32-bit data, flat 4 GiB, read/write, D/B=1, G=1.
const DESC_DATA: u64 = 0x00CF_9300_0000_FFFF;
/// Busy TSS at base 0, limit 0x67 (its second half, for long mode, is zero).
const DESC_TSS: u64 = 0x0000_8B00_0000_0067;

/// Number of 8-byte slots in the boot GDT (null, unused, CS, DS, TSS low, TSS high).
const GDT_ENTRIES: usize = 6;
/// `gdtr.limit` of the boot GDT.
pub const GDT_LIMIT: u16 = (GDT_ENTRIES * 8 - 1) as u16;

/// The boot GDT for 32-bit protected mode (`long == false`) or long mode.
pub fn gdt(long: bool) -> [u64; GDT_ENTRIES] {
    let code = if long { DESC_CODE64 } else { DESC_CODE32 };
    [0, 0, code, DESC_DATA, DESC_TSS, 0]
}

/// Writes the boot GDT at [`GDT_ADDR`].
pub fn write_gdt<M: GuestMemoryBackend>(mem: &M, long: bool) -> Result<(), GuestMemoryError> {
    let mut bytes = [0u8; GDT_ENTRIES * 8];
    for (chunk, d) in bytes.chunks_exact_mut(8).zip(gdt(long)) {
        chunk.copy_from_slice(&d.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(GDT_ADDR))
}

/// Writes identity page tables mapping `[0, IDENTITY_MAP_GIB GiB)` with 2 MiB pages:
/// PML4 at [`PML4_ADDR`], PDPT at [`PDPT_ADDR`], page directories from [`PD_ADDR`].
/// Returns the CR3 value.
pub fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<u64, GuestMemoryError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let mut pml4 = [0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | PRESENT_RW).to_le_bytes());
    mem.write_slice(&pml4, GuestAddress(PML4_ADDR))?;

    let mut pdpt = [0u8; 4096];
    for i in 0..IDENTITY_MAP_GIB {
        let pd = PD_ADDR + i * 0x1000;
        let off = (i * 8) as usize;
        pdpt[off..off + 8].copy_from_slice(&(pd | PRESENT_RW).to_le_bytes());

        let mut pd_page = [0u8; 4096];
        for (j, chunk) in pd_page.chunks_exact_mut(8).enumerate() {
            let addr = ((i << 30) | ((j as u64) << 21)) | PRESENT_RW | PAGE_SIZE_2M;
            chunk.copy_from_slice(&addr.to_le_bytes());
        }
        mem.write_slice(&pd_page, GuestAddress(pd))?;
    }
    mem.write_slice(&pdpt, GuestAddress(PDPT_ADDR))?;
    Ok(PML4_ADDR)
}

/// The hidden segment state KVM wants for selector `selector` whose descriptor is
/// `desc`.
pub fn segment_from_descriptor(selector: u16, desc: u64) -> kvm_segment {
    let limit_raw = ((desc & 0xFFFF) | ((desc >> 32) & 0xF_0000)) as u32;
    let g = ((desc >> 55) & 1) as u8;
    kvm_segment {
        base: ((desc >> 16) & 0xFF_FFFF) | (((desc >> 56) & 0xFF) << 24),
        limit: if g == 1 {
            (limit_raw << 12) | 0xFFF
        } else {
            limit_raw
        },
        selector,
        type_: ((desc >> 40) & 0xF) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

impl EntryState {
    /// True for the Linux 64-bit entry (long mode).
    pub fn is_long_mode(&self) -> bool {
        matches!(self, EntryState::Long64 { .. })
    }

    /// Guest-physical address of the GDT this entry state uses.
    pub fn gdt_base(&self) -> u64 {
        match self {
            EntryState::Protected32 { .. } => GDT_ADDR,
            EntryState::Long64 { gdt_base, .. } => *gdt_base,
        }
    }

    /// Fills the boot vCPU's registers for this entry state.
    ///
    /// `regs` is overwritten entirely (all general-purpose registers not named by
    /// the protocol are zero, RFLAGS = 0x2). In `sregs` the segment registers, TR,
    /// GDTR, IDTR (empty: any exception before the kernel installs its own IDT is a
    /// triple fault, which the VMM reports), CR0, CR3, CR4 and EFER are set; the APIC
    /// base, CR8, LDTR and the pending-interrupt bitmap are left as they were (take
    /// them from `KVM_GET_SREGS` of the fresh vCPU).
    pub fn apply(&self, regs: &mut kvm_regs, sregs: &mut kvm_sregs) {
        *regs = kvm_regs {
            rflags: 0x2,
            ..Default::default()
        };
        let long = self.is_long_mode();
        let table = gdt(long);
        let code = segment_from_descriptor(BOOT_CS, table[(BOOT_CS >> 3) as usize]);
        let data = segment_from_descriptor(BOOT_DS, table[(BOOT_DS >> 3) as usize]);
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = segment_from_descriptor(BOOT_TSS, table[(BOOT_TSS >> 3) as usize]);
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr2 = 0;
        match *self {
            EntryState::Protected32 { rip, rbx, rax } => {
                regs.rip = rip;
                regs.rbx = rbx;
                regs.rax = rax;
                sregs.gdt.base = GDT_ADDR;
                sregs.gdt.limit = GDT_LIMIT;
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
                sregs.cr3 = 0;
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
            EntryState::Long64 {
                rip,
                rsi,
                cr3,
                gdt_base,
                gdt_limit,
                rsp,
            } => {
                regs.rip = rip;
                regs.rsi = rsi;
                regs.rsp = rsp;
                regs.rbp = rsp;
                sregs.gdt.base = gdt_base;
                sregs.gdt.limit = gdt_limit;
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
                sregs.cr3 = cr3;
                sregs.cr4 = X86_CR4_PAE;
                sregs.efer = EFER_LME | EFER_LMA;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn protected32_registers() {
        let e = EntryState::Protected32 {
            rip: 0x10_0040,
            rbx: 0x6000,
            rax: 0x2BAD_B002,
        };
        let mut regs = kvm_regs {
            rcx: 77,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            apic_base: 0xFEE0_0900,
            ..Default::default()
        };
        e.apply(&mut regs, &mut sregs);
        assert_eq!(regs.rip, 0x10_0040);
        assert_eq!(regs.rbx, 0x6000);
        assert_eq!(regs.rax, 0x2BAD_B002);
        assert_eq!(regs.rcx, 0);
        assert_eq!(regs.rflags, 2);
        let cs = sregs.cs;
        assert_eq!(
            (cs.selector, cs.base, cs.limit, cs.type_),
            (0x10, 0, 0xFFFF_FFFF, 0xB)
        );
        assert_eq!(
            (cs.present, cs.s, cs.db, cs.l, cs.g, cs.dpl),
            (1, 1, 1, 0, 1, 0)
        );
        for s in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(
                (s.selector, s.base, s.limit, s.type_),
                (0x18, 0, 0xFFFF_FFFF, 3)
            );
            assert_eq!((s.present, s.s, s.db, s.g), (1, 1, 1, 1));
        }
        assert_eq!((sregs.tr.type_, sregs.tr.s, sregs.tr.present), (0xB, 0, 1));
        assert_eq!(sregs.tr.limit, 0x67);
        assert_eq!(sregs.cr0, 0x11);
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (GDT_ADDR, GDT_LIMIT));
        assert_eq!(sregs.apic_base, 0xFEE0_0900, "apic base untouched");
        assert!(!e.is_long_mode());
    }

    #[test]
    fn long64_registers() {
        let e = EntryState::Long64 {
            rip: 0x100_0200,
            rsi: 0x7000,
            cr3: PML4_ADDR,
            gdt_base: GDT_ADDR,
            gdt_limit: GDT_LIMIT,
            rsp: BOOT_STACK,
        };
        let mut regs = kvm_regs::default();
        let mut sregs = kvm_sregs::default();
        e.apply(&mut regs, &mut sregs);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp),
            (0x100_0200, 0x7000, BOOT_STACK)
        );
        assert_eq!(regs.rflags, 2);
        let cs = sregs.cs;
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.present, cs.s),
            (0x10, 0xB, 1, 0, 1, 1)
        );
        assert_eq!(sregs.ds.selector, 0x18);
        assert_eq!(sregs.ss.type_, 3);
        assert_eq!(sregs.cr0, 0x8000_0031);
        assert_eq!(sregs.cr4, 0x20);
        assert_eq!(sregs.efer, 0x500);
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert!(e.is_long_mode());
    }

    #[test]
    fn descriptor_decoding() {
        let s = segment_from_descriptor(0x8, 0x00CF_9A12_3456_FFFF);
        assert_eq!(s.base, 0x0012_3456);
        assert_eq!(s.limit, 0xFFFF_FFFF);
        assert_eq!(s.type_, 0xA);
        let t = segment_from_descriptor(0x20, DESC_TSS);
        assert_eq!((t.limit, t.g, t.s), (0x67, 0, 0));
    }

    #[test]
    fn gdt_and_page_tables_in_memory() {
        let m = mem();
        write_gdt(&m, true).unwrap();
        let cs: u64 = m.read_obj(GuestAddress(GDT_ADDR + 0x10)).unwrap();
        assert_eq!(cs, DESC_CODE64);
        let ds: u64 = m.read_obj(GuestAddress(GDT_ADDR + 0x18)).unwrap();
        assert_eq!(ds, DESC_DATA);
        write_gdt(&m, false).unwrap();
        let cs: u64 = m.read_obj(GuestAddress(GDT_ADDR + 0x10)).unwrap();
        assert_eq!(cs, DESC_CODE32);

        assert_eq!(write_identity_page_tables(&m).unwrap(), PML4_ADDR);
        let pml4e: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4e, PDPT_ADDR | 3);
        for i in 0..IDENTITY_MAP_GIB {
            let pdpte: u64 = m.read_obj(GuestAddress(PDPT_ADDR + 8 * i)).unwrap();
            assert_eq!(pdpte, (PD_ADDR + 0x1000 * i) | 3);
        }
        let pde1: u64 = m.read_obj(GuestAddress(PD_ADDR + 8)).unwrap();
        assert_eq!(pde1, 0x20_0000 | 0x83);
        // last entry of the 4th directory maps 4 GiB - 2 MiB
        let last: u64 = m
            .read_obj(GuestAddress(PD_ADDR + 0x3000 + 511 * 8))
            .unwrap();
        assert_eq!(last, (0x1_0000_0000 - 0x20_0000) | 0x83);
    }
}
