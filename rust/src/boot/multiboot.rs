//! Multiboot (version 1) boot, as GRUB legacy and QEMU's `-kernel` do it.
//!
//! The header (magic 0x1BADB002, flags, checksum) is searched 4-byte aligned in the
//! first 8 KiB. The kernel is loaded by the header's address fields when flag 16 is
//! set (the "a.out kludge", also used by many ELF kernels), otherwise from the ELF
//! program headers (ELF32 or ELF64, entry below 4 GiB; a virtual entry point inside
//! a segment is translated to its physical address, as GRUB does). The initrd becomes
//! module 0, page-aligned right after the kernel, its string the initrd's path. The
//! command line is `"<kernel path> <cmdline>"` like GRUB and QEMU pass it.
//!
//! Required feature flags: bit 0 (page-aligned modules: always) and bit 1 (memory
//! information: always) are honoured, bit 2 (video mode) is accepted and ignored (no
//! video information is given: the console is the serial port); any other bit in
//! 0..15 is refused.

use thiserror::Error;
use vm_memory::GuestMemoryBackend;

use super::elf::{self, zero_guest, ElfImage};
use super::{
    check_kernel_placement, e820, low_ram_top, make_cmdline, page_align_up, write_bytes, write_gdt,
    BootError, BootImages, BootSetup, EntryState, KernelKind, CMDLINE_ADDR, CMDLINE_MAX_SIZE,
    EBDA_START, FOUR_GIB, HIMEM_START, START_INFO_ADDR,
};

/// Magic in the kernel's header.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Magic the loader puts in EAX.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// How far into the image the header may start.
pub const SEARCH_LIMIT: usize = 8192;

/// Header flag: modules must be page aligned.
pub const FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: memory information required.
pub const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: video mode information required.
pub const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the address fields are valid (a.out kludge).
pub const FLAG_ADDRESS_FIELDS: u32 = 1 << 16;

/// `multiboot_info.flags` bits dvmm sets.
pub const INFO_MEMORY: u32 = 1 << 0;
/// Command line present.
pub const INFO_CMDLINE: u32 = 1 << 2;
/// Modules present.
pub const INFO_MODS: u32 = 1 << 3;
/// Memory map present.
pub const INFO_MMAP: u32 = 1 << 6;
/// Boot loader name present.
pub const INFO_LOADER_NAME: u32 = 1 << 9;

/// Multiboot information structure.
pub const INFO_ADDR: u64 = START_INFO_ADDR;
/// Memory map (after the 116-byte info structure).
pub const MMAP_ADDR: u64 = INFO_ADDR + 0x80;
/// Module list.
pub const MODS_ADDR: u64 = INFO_ADDR + 0x200;
/// Boot loader name.
pub const LOADER_NAME_ADDR: u64 = INFO_ADDR + 0x240;
/// Module string (initrd path).
pub const MOD_STRING_ADDR: u64 = INFO_ADDR + 0x280;
/// End of the area for the module string.
const MOD_STRING_END: u64 = INFO_ADDR + 0x1000;

const INFO_SIZE: usize = 116;

/// Errors of Multiboot boot.
#[derive(Debug, Error)]
pub enum MultibootError {
    /// A header magic with a wrong checksum (and no valid header).
    #[error(
        "Multiboot header at offset {offset:#x} has a bad checksum \
         (magic + flags + checksum must be 0 mod 2^32; flags {flags:#x}, checksum {checksum:#x})"
    )]
    BadChecksum {
        /// File offset of the header.
        offset: usize,
        /// Its flags.
        flags: u32,
        /// Its checksum.
        checksum: u32,
    },
    /// Required features dvmm does not provide.
    #[error(
        "Multiboot header requires features {bits:#x} dvmm does not support \
         (supported: page-aligned modules, memory information, video mode is ignored)"
    )]
    UnsupportedFlags {
        /// The unsupported bits.
        bits: u32,
    },
    /// The a.out kludge address fields do not make sense.
    #[error("Multiboot header address fields are invalid: {0}")]
    BadAddressFields(String),
    /// Neither address fields nor ELF.
    #[error(
        "Multiboot kernel is not an ELF file and its header has no address fields (flag 16), \
         so there is no way to know where to load it"
    )]
    NoLoadInformation,
    /// Entry point outside the image.
    #[error("Multiboot entry point {entry:#x} is not inside the loaded kernel")]
    EntryOutsideImage {
        /// Entry point.
        entry: u64,
    },
    /// A segment or entry point above 4 GiB.
    #[error("Multiboot kernel has {what} at {addr:#x}, above the 4 GiB a 32-bit kernel can reach")]
    Above4G {
        /// Entry or segment.
        what: &'static str,
        /// Address.
        addr: u64,
    },
    /// The command line and path exceed the buffer.
    #[error(
        "Multiboot command line (kernel path + command line) is {len} bytes, the limit is {max}"
    )]
    CmdlineTooLong {
        /// Length.
        len: usize,
        /// Limit.
        max: usize,
    },
}

/// A Multiboot header found in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootHeader {
    /// File offset of the magic.
    pub offset: usize,
    /// Flags.
    pub flags: u32,
    /// Address fields (valid when flag 16 is set).
    pub header_addr: u32,
    /// Where the file's `offset - (header_addr - load_addr)` byte goes.
    pub load_addr: u32,
    /// End of the data from the file (0: end of file).
    pub load_end_addr: u32,
    /// End of the bss (0: no bss).
    pub bss_end_addr: u32,
    /// Entry point.
    pub entry_addr: u32,
}

impl MultibootHeader {
    /// Flag 16: load by the address fields.
    pub fn has_address_fields(&self) -> bool {
        self.flags & FLAG_ADDRESS_FIELDS != 0
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off + 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Searches the Multiboot header. `Ok(None)` if there is no magic at all; an error if
/// magics were found but none with a valid checksum, or a valid header whose
/// required flags or address fields cannot be honoured.
pub fn find_header(bytes: &[u8]) -> Result<Option<MultibootHeader>, MultibootError> {
    let mut bad = None;
    let limit = bytes.len().min(SEARCH_LIMIT);
    let mut off = 0;
    while off + 12 <= limit {
        if u32_at(bytes, off) == Some(HEADER_MAGIC) {
            let flags = u32_at(bytes, off + 4).unwrap_or(0);
            let checksum = u32_at(bytes, off + 8).unwrap_or(0);
            if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) == 0 {
                return header_at(bytes, off, flags).map(Some);
            }
            bad.get_or_insert(MultibootError::BadChecksum {
                offset: off,
                flags,
                checksum,
            });
        }
        off += 4;
    }
    match bad {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

fn header_at(bytes: &[u8], offset: usize, flags: u32) -> Result<MultibootHeader, MultibootError> {
    let unsupported = flags & 0xFFFF & !(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE);
    if unsupported != 0 {
        return Err(MultibootError::UnsupportedFlags { bits: unsupported });
    }
    let mut h = MultibootHeader {
        offset,
        flags,
        header_addr: 0,
        load_addr: 0,
        load_end_addr: 0,
        bss_end_addr: 0,
        entry_addr: 0,
    };
    if h.has_address_fields() {
        let f = |i: usize| {
            u32_at(bytes, offset + 12 + 4 * i).ok_or_else(|| {
                MultibootError::BadAddressFields(
                    "the header is cut off by the end of the file".into(),
                )
            })
        };
        h.header_addr = f(0)?;
        h.load_addr = f(1)?;
        h.load_end_addr = f(2)?;
        h.bss_end_addr = f(3)?;
        h.entry_addr = f(4)?;
    }
    Ok(h)
}

/// Where the kernel goes: (file offset, load address, bytes from the file, memory end).
fn kludge_layout(
    h: &MultibootHeader,
    file_len: u64,
) -> Result<(u64, u64, u64, u64), MultibootError> {
    let bad = |s: String| MultibootError::BadAddressFields(s);
    let (header_addr, load_addr) = (u64::from(h.header_addr), u64::from(h.load_addr));
    if load_addr > header_addr {
        return Err(bad(format!(
            "load_addr {load_addr:#x} is above header_addr {header_addr:#x}"
        )));
    }
    let file_off = (h.offset as u64)
        .checked_sub(header_addr - load_addr)
        .ok_or_else(|| {
            bad(format!(
                "header_addr - load_addr = {:#x} is larger than the header's file offset {:#x}",
                header_addr - load_addr,
                h.offset
            ))
        })?;
    let load_len = if h.load_end_addr == 0 {
        file_len - file_off
    } else {
        let end = u64::from(h.load_end_addr);
        if end < load_addr {
            return Err(bad(format!(
                "load_end_addr {end:#x} is below load_addr {load_addr:#x}"
            )));
        }
        end - load_addr
    };
    if file_off + load_len > file_len {
        return Err(bad(format!(
            "the header asks for {load_len:#x} bytes from file offset {file_off:#x} but the file is {file_len:#x} bytes"
        )));
    }
    let mut mem_end = load_addr + load_len;
    if h.bss_end_addr != 0 {
        let bss_end = u64::from(h.bss_end_addr);
        if bss_end < mem_end {
            return Err(bad(format!(
                "bss_end_addr {bss_end:#x} is below the end of the loaded data {mem_end:#x}"
            )));
        }
        mem_end = bss_end;
    }
    Ok((file_off, load_addr, load_len, mem_end))
}

/// Loads a Multiboot kernel with header `hdr`; `elf` is the parsed ELF image if the
/// file is one.
pub(super) fn load<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    img: &BootImages<'_>,
    hdr: &MultibootHeader,
    elf: Option<&ElfImage>,
) -> Result<BootSetup, BootError> {
    // Where the kernel goes, checked before anything is written.
    let (kstart, kend, entry) = if hdr.has_address_fields() {
        let (_, load_addr, _, mem_end) = kludge_layout(hdr, img.kernel.len() as u64)?;
        check_kernel_placement(mem_size, load_addr, mem_end)?;
        let entry = u64::from(hdr.entry_addr);
        if entry < load_addr || entry >= mem_end {
            return Err(MultibootError::EntryOutsideImage { entry }.into());
        }
        (load_addr, mem_end, entry)
    } else {
        let e = elf.ok_or(MultibootError::NoLoadInformation)?;
        let mut kstart = u64::MAX;
        let mut kend = 0;
        for s in &e.segments {
            if s.end() > FOUR_GIB {
                return Err(MultibootError::Above4G {
                    what: "a segment",
                    addr: s.paddr,
                }
                .into());
            }
            check_kernel_placement(mem_size, s.paddr, s.end())?;
            kstart = kstart.min(s.paddr);
            kend = kend.max(s.end());
        }
        // A virtual entry point inside a segment is translated (as GRUB does).
        let entry = e
            .segments
            .iter()
            .find(|s| e.entry >= s.vaddr && e.entry - s.vaddr < s.memsz)
            .map(|s| e.entry - s.vaddr + s.paddr)
            .unwrap_or(e.entry);
        if entry >= FOUR_GIB {
            return Err(MultibootError::Above4G {
                what: "the entry point",
                addr: entry,
            }
            .into());
        }
        if !e
            .segments
            .iter()
            .any(|s| entry >= s.paddr && entry < s.end())
        {
            return Err(MultibootError::EntryOutsideImage { entry }.into());
        }
        (kstart, kend, entry)
    };

    // Command line: "<kernel path> <cmdline>".
    make_cmdline(img.cmdline, CMDLINE_MAX_SIZE - 1)?;
    let path = img.kernel_path.to_string_lossy();
    let mut cmdline = if img.cmdline.trim().is_empty() {
        path.to_string()
    } else {
        format!("{} {}", path, img.cmdline.trim())
    }
    .into_bytes();
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(MultibootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        }
        .into());
    }
    cmdline.push(0);

    // Module 0: the initrd, page aligned right after the kernel.
    let module = match img.initrd {
        Some((path, data)) => {
            let start = page_align_up(kend);
            let size = data.len() as u64;
            let top = low_ram_top(mem_size);
            if start.saturating_add(size) > top {
                return Err(BootError::InitrdTooLarge {
                    path: path.to_path_buf(),
                    size,
                    available: top.saturating_sub(start),
                });
            }
            Some((start, path, data))
        }
        None => None,
    };

    // Load.
    if hdr.has_address_fields() {
        let (file_off, load_addr, load_len, mem_end) = kludge_layout(hdr, img.kernel.len() as u64)?;
        let data = &img.kernel[file_off as usize..(file_off + load_len) as usize];
        write_bytes(mem, "Multiboot kernel", load_addr, data)?;
        let bss = load_addr + load_len;
        zero_guest(mem, bss, mem_end - bss).map_err(|source| BootError::GuestWrite {
            what: "Multiboot kernel bss",
            addr: bss,
            source,
        })?;
    } else if let Some(e) = elf {
        elf::load(mem, e, img.kernel)?;
    }
    write_gdt(mem, false)?;
    write_bytes(mem, "command line", CMDLINE_ADDR, &cmdline)?;
    write_bytes(mem, "boot loader name", LOADER_NAME_ADDR, b"dvmm\0")?;

    let mut mods = Vec::new();
    if let Some((start, path, data)) = module {
        write_bytes(mem, "initrd module", start, data)?;
        let mut s = path.to_string_lossy().into_owned().into_bytes();
        s.truncate((MOD_STRING_END - MOD_STRING_ADDR - 1) as usize);
        s.push(0);
        write_bytes(mem, "module string", MOD_STRING_ADDR, &s)?;
        for v in [
            start as u32,
            (start + data.len() as u64) as u32,
            MOD_STRING_ADDR as u32,
            0,
        ] {
            mods.extend_from_slice(&v.to_le_bytes());
        }
        write_bytes(mem, "module list", MODS_ADDR, &mods)?;
    }

    let map = e820(mem_size);
    let mut mmap = Vec::with_capacity(map.len() * 24);
    for e in &map {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&e.kind.code().to_le_bytes());
    }
    write_bytes(mem, "Multiboot memory map", MMAP_ADDR, &mmap)?;

    let mut info = [0u8; INFO_SIZE];
    let mut put = |off: usize, v: u32| info[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(
        0,
        INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME,
    );
    put(4, (EBDA_START / 1024) as u32);
    put(
        8,
        (low_ram_top(mem_size).saturating_sub(HIMEM_START) / 1024) as u32,
    );
    put(16, CMDLINE_ADDR as u32);
    put(20, (mods.len() / 16) as u32);
    put(24, MODS_ADDR as u32);
    put(44, mmap.len() as u32);
    put(48, MMAP_ADDR as u32);
    put(64, LOADER_NAME_ADDR as u32);
    write_bytes(mem, "Multiboot information", INFO_ADDR, &info)?;

    Ok(BootSetup {
        kind: KernelKind::Multiboot,
        entry: EntryState::Protected32 {
            rip: entry,
            rbx: INFO_ADDR,
            rax: u64::from(BOOTLOADER_MAGIC),
        },
        e820: map,
        kernel_range: (kstart, kend),
        initrd_range: module.map(|(s, _, d)| (s, s + d.len() as u64)),
        cmdline_gpa: CMDLINE_ADDR,
        boot_info_gpa: INFO_ADDR,
    })
}
