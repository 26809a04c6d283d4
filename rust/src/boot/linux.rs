//! Linux bzImage through the 64-bit boot protocol (Documentation/arch/x86/boot.rst).
//!
//! The protected-mode kernel is loaded by linux-loader's `BzImage` at a
//! `kernel_alignment`-aligned address (the kernel's `pref_address` when it fits,
//! else the first aligned address from 1 MiB for a relocatable kernel); `boot_params`
//! (zero page) at [`BOOT_PARAMS_ADDR`] carries the setup header, the command line
//! pointer, the initrd (page aligned, as high as possible below `initrd_addr_max` and
//! the MMIO hole), the ACPI RSDP and the e820 map; the vCPU enters `startup_64` at
//! load address + 0x200 in long mode with identity page tables for 0..4 GiB and the
//! boot GDT (`__BOOT_CS` 0x10, `__BOOT_DS` 0x18).
//!
//! Linux cannot run at speed on PVM hosts (CPL0 is emulated): this path is tested for
//! its loading and tables, and ready for hosts with VT-x / AMD-V.

use std::io::Cursor;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use thiserror::Error;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend};

use super::cpu::{self, BOOT_STACK};
use super::{
    check_kernel_placement, e820, make_cmdline, page_align_up, place_initrd_high, write_bytes,
    write_cmdline, write_gdt, BootError, BootImages, BootSetup, EntryState, KernelKind,
    BOOT_PARAMS_ADDR, CMDLINE_ADDR, GDT_ADDR, GDT_LIMIT, HIMEM_START,
};

/// Offset of the setup header in the image.
pub const SETUP_HEADER_OFFSET: usize = 0x1F1;
/// "HdrS".
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// `boot_flag`.
pub const BOOT_FLAG_MAGIC: u16 = 0xAA55;
/// `type_of_loader`: "undefined" boot loader.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
/// Lowest protocol with `xloadflags` (and so the 64-bit entry flag): 2.12.
pub const MIN_PROTOCOL: u16 = 0x020C;
/// `loadflags`: protected-mode code loaded at 0x100000.
pub const LOADED_HIGH: u8 = 0x01;
/// `xloadflags`: the kernel has the 64-bit entry at +0x200.
pub const XLF_KERNEL_64: u16 = 0x01;
/// Offset of `startup_64` from the load address.
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// Default alignment when the header does not give a usable one.
const DEFAULT_ALIGNMENT: u64 = 0x20_0000;

/// Errors of Linux bzImage boot.
#[derive(Debug, Error)]
pub enum LinuxError {
    /// File too short for what its header says.
    #[error("bzImage is truncated: {0}")]
    Truncated(String),
    /// `boot_flag` is not 0xAA55.
    #[error("bzImage boot_flag is {0:#06x}, expected 0xaa55")]
    BadBootFlag(u16),
    /// Boot protocol too old for the 64-bit entry.
    #[error(
        "bzImage uses boot protocol {}.{:02}, the 64-bit boot protocol needs 2.12 or later",
        .0 >> 8,
        .0 & 0xff
    )]
    ProtocolTooOld(u16),
    /// No 64-bit entry point.
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 not set in xloadflags)")]
    No64BitEntry,
    /// A zImage, not a bzImage.
    #[error("kernel is a zImage (LOADED_HIGH not set), only bzImage is supported")]
    NotLoadedHigh,
    /// linux-loader failed.
    #[error("loading the kernel: {0}")]
    Loader(linux_loader::loader::Error),
    /// linux-loader failed to write boot_params.
    #[error("writing boot_params: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// True if `bytes` has the "HdrS" setup header magic.
pub fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.get(0x202..0x206) == Some(b"HdrS".as_slice())
}

/// Reads and checks the setup header.
pub fn parse_header(bytes: &[u8]) -> Result<setup_header, LinuxError> {
    let size = std::mem::size_of::<setup_header>();
    let raw = bytes
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size)
        .ok_or_else(|| {
            LinuxError::Truncated(format!(
                "the setup header needs {:#x} bytes, the file has {:#x}",
                SETUP_HEADER_OFFSET + size,
                bytes.len()
            ))
        })?;
    let mut h = setup_header::default();
    h.as_mut_slice().copy_from_slice(raw);
    let boot_flag = h.boot_flag;
    if boot_flag != BOOT_FLAG_MAGIC {
        return Err(LinuxError::BadBootFlag(boot_flag));
    }
    let version = h.version;
    if version < MIN_PROTOCOL {
        return Err(LinuxError::ProtocolTooOld(version));
    }
    if h.loadflags & LOADED_HIGH == 0 {
        return Err(LinuxError::NotLoadedHigh);
    }
    let xloadflags = h.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxError::No64BitEntry);
    }
    Ok(h)
}

/// `(file offset, length)` of the protected-mode kernel.
fn payload(h: &setup_header, file_len: usize) -> Result<(usize, usize), LinuxError> {
    let sects = if h.setup_sects == 0 { 4 } else { h.setup_sects };
    let off = (usize::from(sects) + 1) * 512;
    if file_len <= off {
        return Err(LinuxError::Truncated(format!(
            "{sects} setup sectors end at {off:#x} but the file is {file_len:#x} bytes: no kernel follows"
        )));
    }
    Ok((off, file_len - off))
}

/// Chooses the load address: `pref_address` if it is aligned, at or above 1 MiB and
/// the kernel fits there, else (relocatable kernels) the first aligned address from
/// 1 MiB.
fn load_address(h: &setup_header, mem_size: u64, size: u64) -> u64 {
    let align = u64::from(h.kernel_alignment);
    let align = if align.is_power_of_two() && align >= 0x1000 {
        align
    } else {
        DEFAULT_ALIGNMENT
    };
    let pref = h.pref_address;
    let fits = |a: u64| check_kernel_placement(mem_size, a, a.saturating_add(size)).is_ok();
    if h.relocatable_kernel == 0
        || (pref >= HIMEM_START && pref.is_multiple_of(align) && fits(pref))
    {
        return if pref >= HIMEM_START {
            pref
        } else {
            HIMEM_START
        };
    }
    HIMEM_START.div_ceil(align) * align
}

/// Loads a bzImage.
pub(super) fn load<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    img: &BootImages<'_>,
) -> Result<BootSetup, BootError> {
    let h = parse_header(img.kernel)?;
    let (_, payload_len) = payload(&h, img.kernel.len())?;
    let init_size = u64::from(h.init_size).max(payload_len as u64);
    let load_addr = load_address(&h, mem_size, init_size);
    let kernel_end = load_addr.saturating_add(init_size);
    check_kernel_placement(mem_size, load_addr, kernel_end)?;

    let line = img.linux_cmdline.unwrap_or(img.cmdline);
    let cmdline = make_cmdline(line, h.cmdline_size as usize)?;
    let initrd = match img.initrd {
        Some((path, data)) => {
            let limit = u64::from(h.initrd_addr_max) + 1;
            let size = data.len() as u64;
            let addr = place_initrd_high(mem_size, path, size, page_align_up(kernel_end), limit)?;
            Some((addr, data))
        }
        None => None,
    };

    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(load_addr)),
        &mut Cursor::new(img.kernel),
        None,
    )
    .map_err(LinuxError::Loader)?;
    let mut params = boot_params {
        hdr: loaded.setup_header.unwrap_or(h),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.code32_start = load_addr as u32;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    write_cmdline(mem, &cmdline)?;
    if let Some((addr, data)) = initrd {
        write_bytes(mem, "initrd", addr, data)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = data.len() as u32;
    }
    params.acpi_rsdp_addr = img.rsdp_gpa;
    let map = e820(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind.code(),
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(BOOT_PARAMS_ADDR)),
        mem,
    )
    .map_err(LinuxError::BootParams)?;

    write_gdt(mem, true)?;
    let cr3 = cpu::write_identity_page_tables(mem).map_err(|source| BootError::GuestWrite {
        what: "identity page tables",
        addr: cpu::PML4_ADDR,
        source,
    })?;

    Ok(BootSetup {
        kind: KernelKind::LinuxBzImage,
        entry: EntryState::Long64 {
            rip: load_addr + STARTUP_64_OFFSET,
            rsi: BOOT_PARAMS_ADDR,
            cr3,
            gdt_base: GDT_ADDR,
            gdt_limit: GDT_LIMIT,
            rsp: BOOT_STACK,
        },
        e820: map,
        kernel_range: (load_addr, kernel_end),
        initrd_range: initrd.map(|(a, d)| (a, a + d.len() as u64)),
        cmdline_gpa: CMDLINE_ADDR,
        boot_info_gpa: BOOT_PARAMS_ADDR,
    })
}
