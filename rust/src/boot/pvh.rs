//! PVH boot: an ELF kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note, entered in 32-bit
//! protected mode with EBX pointing at `hvm_start_info` (version 1: command line,
//! modules, RSDP, memory map).
//!
//! The start info, memory map and module list are written with linux-loader's
//! `PvhBootConfigurator`, the command line with `load_cmdline`.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::elf::{self, ElfImage};
use super::{
    check_kernel_placement, e820, make_cmdline, page_align_up, place_initrd_high, write_bytes,
    write_cmdline, write_gdt, BootError, BootImages, BootSetup, EntryState, KernelKind,
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, FOUR_GIB, START_INFO_ADDR,
};

/// Errors specific to PVH boot.
#[derive(Debug, Error)]
pub enum PvhError {
    /// The note's entry point is not in the loaded image.
    #[error("PVH entry point {entry:#x} is not inside any loaded segment of the kernel")]
    EntryOutsideImage {
        /// The entry point of the note.
        entry: u64,
    },
    /// Writing `hvm_start_info` and its tables failed.
    #[error("writing hvm_start_info: {0}")]
    StartInfo(linux_loader::configurator::Error),
}

/// `hvm_start_info.version` written (1: has the memory map fields).
pub const START_INFO_VERSION: u32 = 1;
/// Where the memory map goes (after `hvm_start_info`, 8-aligned).
pub const MEMMAP_ADDR: u64 = START_INFO_ADDR + 0x40;

/// Loads a PVH kernel already parsed as `image`; `entry` is its PVH entry point.
pub(super) fn load<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    img: &BootImages<'_>,
    image: &ElfImage,
    entry: u64,
) -> Result<BootSetup, BootError> {
    let mut kstart = u64::MAX;
    let mut kend = 0;
    for s in &image.segments {
        check_kernel_placement(mem_size, s.paddr, s.end())?;
        kstart = kstart.min(s.paddr);
        kend = kend.max(s.end());
    }
    if entry >= FOUR_GIB
        || !image
            .segments
            .iter()
            .any(|s| entry >= s.paddr && entry < s.end())
    {
        return Err(PvhError::EntryOutsideImage { entry }.into());
    }
    let cmdline = make_cmdline(img.cmdline, CMDLINE_MAX_SIZE - 1)?;
    let initrd = match img.initrd {
        Some((path, data)) => {
            let size = data.len() as u64;
            let addr = place_initrd_high(mem_size, path, size, page_align_up(kend), u64::MAX)?;
            Some((addr, data))
        }
        None => None,
    };

    elf::load(mem, image, img.kernel)?;
    write_gdt(mem, false)?;
    write_cmdline(mem, &cmdline)?;
    if let Some((addr, data)) = initrd {
        write_bytes(mem, "initrd", addr, data)?;
    }

    let map = e820(mem_size);
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.code(),
            reserved: 0,
        })
        .collect();
    let modlist_addr =
        MEMMAP_ADDR + (memmap.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|(addr, data)| hvm_modlist_entry {
            paddr: *addr,
            size: data.len() as u64,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { modlist_addr },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: img.rsdp_gpa,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(PvhError::StartInfo)?;

    Ok(BootSetup {
        kind: KernelKind::Pvh,
        entry: EntryState::Protected32 {
            rip: entry,
            rbx: START_INFO_ADDR,
            rax: 0,
        },
        e820: map,
        kernel_range: (kstart, kend),
        initrd_range: initrd.map(|(a, d)| (a, a + d.len() as u64)),
        cmdline_gpa: CMDLINE_ADDR,
        boot_info_gpa: START_INFO_ADDR,
    })
}
