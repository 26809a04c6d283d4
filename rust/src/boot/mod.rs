//! Direct kernel boot, as QEMU's `-kernel` offers it.
//!
//! [`load_kernel`] reads a kernel image (and optionally an initrd), recognises its
//! format, loads it into guest memory with its boot information and returns a
//! [`BootSetup`]: the boot vCPU's [`EntryState`] and the e820 map. Formats, tried in
//! this order:
//!
//! 1. **PVH** ([`pvh`]): an ELF (32 or 64 bit) with a `XEN_ELFNOTE_PHYS32_ENTRY` note —
//!    the bundled guest's format. `hvm_start_info` at [`START_INFO_ADDR`] carries the
//!    command line, the memory map, the RSDP and the initrd as module 0.
//! 2. **Multiboot v1** ([`multiboot`]): a Multiboot header in the first 8 KiB, loaded by
//!    the header's address fields (a.out kludge) or the ELF program headers.
//! 3. **Linux bzImage** ([`linux`]): the 64-bit boot protocol (long mode, identity page
//!    tables, `boot_params` at [`BOOT_PARAMS_ADDR`]).
//!
//! The code only needs `M: vm_memory::GuestMemoryBackend` (vm-memory 0.18's name for
//! what older releases called `GuestMemory`; `GuestMemoryMmap` implements it), so it
//! does not care how guest RAM is implemented: plain memory, a memfd mapped twice, or
//! later the coherent distributed memory, as long as it is reachable through that
//! trait when the kernel is loaded.
//!
//! Boot data in low memory (all inside the first e820 RAM entry):
//!
//! | gpa | what |
//! | --- | --- |
//! | 0x500 | boot GDT (null, -, CS 0x10, DS 0x18, TSS 0x20) |
//! | 0x6000 | `hvm_start_info` + memmap + modlist (PVH) / Multiboot info, mmap, modules |
//! | 0x7000 | Linux `boot_params` (zero page) |
//! | 0x8FF0 | Linux entry stack |
//! | 0x9000-0xEFFF | Linux identity page tables (PML4, PDPT, 4 PDs: 0..4 GiB) |
//! | 0x20000 | kernel command line (up to 64 KiB) |
//!
//! Kernels must load at or above 1 MiB, in RAM. Initrds go page-aligned at the top of
//! the RAM below 3 GiB (PVH, Linux: below `initrd_addr_max`) or right after the kernel
//! (Multiboot, as GRUB does).

pub mod cpu;
pub mod e820;
pub mod elf;
pub mod linux;
pub mod multiboot;
pub mod pvh;

#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

pub use cpu::{segment_from_descriptor, BOOT_CS, BOOT_DS, GDT_ADDR, GDT_LIMIT};
pub use e820::{
    e820, gpa_to_ram_offset, low_ram_top, ram_offset_to_gpa, ram_ranges, E820Entry, E820Kind,
    EBDA_START, FOUR_GIB, HIMEM_START, MMIO_HOLE_START,
};
pub use elf::ElfError;
pub use linux::LinuxError;
pub use multiboot::MultibootError;
pub use pvh::PvhError;

/// `hvm_start_info` (PVH) or the Multiboot information structure.
pub const START_INFO_ADDR: u64 = 0x6000;
/// Linux `boot_params` (the "zero page").
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Room for the command line, including its terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Smallest guest RAM a kernel can be booted in.
pub const MIN_MEM_SIZE: u64 = 2 << 20;
/// Page size used to align modules and initrds.
pub const PAGE_SIZE: u64 = 0x1000;

/// Which boot protocol a kernel was loaded with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// ELF with a PVH entry note.
    Pvh,
    /// Multiboot v1.
    Multiboot,
    /// Linux bzImage, 64-bit boot protocol.
    LinuxBzImage,
}

impl std::fmt::Display for KernelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelKind::Pvh => "PVH ELF",
            KernelKind::Multiboot => "Multiboot v1",
            KernelKind::LinuxBzImage => "Linux bzImage",
        })
    }
}

/// How the boot vCPU starts. [`EntryState::apply`] turns it into `kvm_regs` /
/// `kvm_sregs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// PVH and Multiboot: 32-bit protected mode, paging off, flat 4 GiB CS (0x10) and
    /// data segments (0x18) from the boot GDT at [`GDT_ADDR`], EBX = `hvm_start_info`
    /// / Multiboot info gpa, EAX = 0x2BADB002 for Multiboot (0 for PVH).
    Protected32 {
        /// Entry point.
        rip: u64,
        /// Boot information gpa.
        rbx: u64,
        /// Multiboot magic, else 0.
        rax: u64,
    },
    /// Linux 64-bit boot protocol: long mode with identity page tables and a GDT built
    /// in guest RAM, RSI = `boot_params` gpa.
    Long64 {
        /// Entry point (`startup_64`: load address + 0x200).
        rip: u64,
        /// `boot_params` gpa.
        rsi: u64,
        /// PML4 gpa.
        cr3: u64,
        /// GDT gpa.
        gdt_base: u64,
        /// GDT limit.
        gdt_limit: u16,
        /// Initial stack pointer.
        rsp: u64,
    },
}

/// The result of loading a kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootSetup {
    /// Boot protocol used.
    pub kind: KernelKind,
    /// Initial state of the boot vCPU.
    pub entry: EntryState,
    /// The e820 map given to the guest.
    pub e820: Vec<E820Entry>,
    /// Guest-physical `[start, end)` of the loaded kernel (including its `.bss`, and
    /// for Linux the whole `init_size`).
    pub kernel_range: (u64, u64),
    /// Guest-physical `[start, end)` of the initrd / first module, if any.
    pub initrd_range: Option<(u64, u64)>,
    /// Guest-physical address of the NUL-terminated command line.
    pub cmdline_gpa: u64,
    /// Guest-physical address of the boot information (`hvm_start_info`, Multiboot
    /// info or `boot_params`).
    pub boot_info_gpa: u64,
}

/// Errors of direct kernel boot.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file does not exist.
    #[error("kernel image {}: file not found", path.display())]
    KernelNotFound {
        /// Path given.
        path: PathBuf,
    },
    /// The initrd file does not exist.
    #[error("initrd {}: file not found", path.display())]
    InitrdNotFound {
        /// Path given.
        path: PathBuf,
    },
    /// Reading a file failed.
    #[error("cannot read {what} {}: {source}", path.display())]
    Unreadable {
        /// "kernel image" or "initrd".
        what: &'static str,
        /// Path given.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The kernel file is empty.
    #[error("kernel image {} is empty", path.display())]
    KernelEmpty {
        /// Path given.
        path: PathBuf,
    },
    /// No known format.
    #[error(
        "kernel image {} is not in a format dvmm can boot (tried: ELF with a PVH entry note, \
         Multiboot v1 header in the first 8 KiB, Linux bzImage with a \"HdrS\" setup header)",
        path.display()
    )]
    UnrecognisedFormat {
        /// Path given.
        path: PathBuf,
    },
    /// An ELF image with no way in.
    #[error(
        "kernel image {} is an ELF file without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) \
         and without a Multiboot header: dvmm boots ELF kernels only through one of those",
        path.display()
    )]
    ElfWithoutEntry {
        /// Path given.
        path: PathBuf,
    },
    /// Malformed ELF image.
    #[error("malformed ELF kernel: {0}")]
    Elf(#[from] ElfError),
    /// PVH boot failed.
    #[error("PVH boot: {0}")]
    Pvh(#[from] PvhError),
    /// Multiboot boot failed.
    #[error("Multiboot kernel: {0}")]
    Multiboot(#[from] MultibootError),
    /// Linux boot failed.
    #[error("Linux bzImage: {0}")]
    Linux(#[from] LinuxError),
    /// Command line too long for the kernel or for dvmm's buffer.
    #[error("command line is {len} bytes long, the limit is {max} bytes")]
    CmdlineTooLong {
        /// Length given.
        len: usize,
        /// Maximum allowed.
        max: usize,
    },
    /// Command line with characters a kernel cannot take.
    #[error("invalid command line: {0}")]
    CmdlineInvalid(String),
    /// Initrd does not fit.
    #[error(
        "initrd {} is {size} bytes but only {available} bytes of guest RAM are free for it \
         (give the VM more memory)",
        path.display()
    )]
    InitrdTooLarge {
        /// Path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room available.
        available: u64,
    },
    /// Kernel image placed where it cannot go.
    #[error("kernel occupies {start:#x}..{end:#x}, which is {reason}")]
    KernelPlacement {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
        /// Why it cannot go there.
        reason: String,
    },
    /// Guest RAM too small.
    #[error("guest memory of {mem_size} bytes is too small to boot a kernel (at least {min})")]
    MemoryTooSmall {
        /// RAM size given.
        mem_size: u64,
        /// Minimum.
        min: u64,
    },
    /// `mem` does not back the layout of `mem_size`.
    #[error(
        "guest memory does not back the RAM layout of a {mem_size}-byte VM: {gpa:#x} is missing"
    )]
    MemoryNotBacked {
        /// RAM size given.
        mem_size: u64,
        /// First missing address found.
        gpa: u64,
    },
    /// A write to guest memory failed.
    #[error("writing {what} to guest memory at {addr:#x}: {source}")]
    GuestWrite {
        /// What was written.
        what: &'static str,
        /// Where.
        addr: u64,
        /// vm-memory's error.
        source: GuestMemoryError,
    },
}

/// Everything [`load_images`] needs, with the files already read.
#[derive(Clone, Copy, Debug)]
pub struct BootImages<'a> {
    /// Path of the kernel (for messages).
    pub kernel_path: &'a Path,
    /// The kernel image.
    pub kernel: &'a [u8],
    /// Path and contents of the initrd / first module.
    pub initrd: Option<(&'a Path, &'a [u8])>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// The command line a Linux bzImage gets instead, when it differs (the CPU
    /// model's restrictions in Linux's own switches: `cpuid::linux_cmdline`).
    pub linux_cmdline: Option<&'a str>,
    /// Guest-physical address of the ACPI RSDP (0: none).
    pub rsdp_gpa: u64,
}

/// Reads `kernel_path` (and `initrd`), recognises the kernel format (PVH ELF, then
/// Multiboot v1, then Linux bzImage), loads it into `mem` for a VM of `mem_size`
/// bytes of RAM laid out by [`ram_ranges`], writes the boot information and returns
/// the boot vCPU's entry state and the e820 map. A Linux bzImage gets
/// `linux_cmdline` when given, the others `cmdline`.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    kernel_path: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    linux_cmdline: Option<&str>,
    rsdp_gpa: u64,
) -> Result<BootSetup, BootError> {
    let kernel = read_file(kernel_path, "kernel image")?;
    if kernel.is_empty() {
        return Err(BootError::KernelEmpty {
            path: kernel_path.to_path_buf(),
        });
    }
    let initrd_data = match initrd {
        Some(p) => Some((p, read_file(p, "initrd")?)),
        None => None,
    };
    load_images(
        mem,
        mem_size,
        &BootImages {
            kernel_path,
            kernel: &kernel,
            initrd: initrd_data.as_ref().map(|(p, d)| (*p, d.as_slice())),
            cmdline,
            linux_cmdline,
            rsdp_gpa,
        },
    )
}

/// [`load_kernel`] on images already in memory.
pub fn load_images<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    img: &BootImages<'_>,
) -> Result<BootSetup, BootError> {
    if img.kernel.is_empty() {
        return Err(BootError::KernelEmpty {
            path: img.kernel_path.to_path_buf(),
        });
    }
    check_memory(mem, mem_size)?;

    let elf = if elf::is_elf(img.kernel) {
        Some(elf::parse(img.kernel))
    } else {
        None
    };
    if let Some(Ok(e)) = &elf {
        if let Some(entry) = e.pvh_entry {
            return pvh::load(mem, mem_size, img, e, entry);
        }
    }
    let mb = match multiboot::find_header(img.kernel) {
        Ok(h) => h,
        // A stray magic in a bzImage's setup code is not a Multiboot header.
        Err(_) if elf.is_none() && linux::is_bzimage(img.kernel) => None,
        Err(e) => return Err(e.into()),
    };
    match mb {
        Some(hdr) => {
            let elf = match elf {
                Some(Ok(e)) => Some(e),
                // The header's address fields make the ELF headers irrelevant.
                Some(Err(_)) if hdr.has_address_fields() => None,
                Some(Err(e)) => return Err(e.into()),
                None => None,
            };
            return multiboot::load(mem, mem_size, img, &hdr, elf.as_ref());
        }
        None => match elf {
            Some(Ok(_)) => {
                return Err(BootError::ElfWithoutEntry {
                    path: img.kernel_path.to_path_buf(),
                })
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        },
    }
    if linux::is_bzimage(img.kernel) {
        return linux::load(mem, mem_size, img);
    }
    Err(BootError::UnrecognisedFormat {
        path: img.kernel_path.to_path_buf(),
    })
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, BootError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            if what == "initrd" {
                BootError::InitrdNotFound {
                    path: path.to_path_buf(),
                }
            } else {
                BootError::KernelNotFound {
                    path: path.to_path_buf(),
                }
            }
        } else {
            BootError::Unreadable {
                what,
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Checks that `mem` backs every RAM range of a `mem_size`-byte VM.
fn check_memory<M: GuestMemoryBackend>(mem: &M, mem_size: u64) -> Result<(), BootError> {
    if mem_size < MIN_MEM_SIZE {
        return Err(BootError::MemoryTooSmall {
            mem_size,
            min: MIN_MEM_SIZE,
        });
    }
    for (start, len) in ram_ranges(mem_size) {
        for gpa in [start, start + len - 1] {
            if !mem.address_in_range(GuestAddress(gpa)) {
                return Err(BootError::MemoryNotBacked { mem_size, gpa });
            }
        }
    }
    Ok(())
}

/// Validates the command line against `max_len` (bytes, without the NUL).
fn make_cmdline(cmdline: &str, max_len: usize) -> Result<Cmdline, BootError> {
    let max = max_len.min(CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if let Some(c) = cmdline.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(BootError::CmdlineInvalid(format!(
            "character {c:?} is not printable ASCII"
        )));
    }
    let c = Cmdline::try_from(cmdline, max + 1)
        .map_err(|e| BootError::CmdlineInvalid(e.to_string()))?;
    c.as_cstring()
        .map_err(|e| BootError::CmdlineInvalid(e.to_string()))?;
    Ok(c)
}

/// Writes the command line at [`CMDLINE_ADDR`] with linux-loader's `load_cmdline`.
fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &Cmdline) -> Result<(), BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(|e| BootError::CmdlineInvalid(format!("cannot write it to guest memory: {e}")))
}

/// Checks that a kernel occupying `[start, end)` lies in RAM at or above 1 MiB.
fn check_kernel_placement(mem_size: u64, start: u64, end: u64) -> Result<(), BootError> {
    let reason = if end <= start {
        return Ok(());
    } else if start < HIMEM_START {
        "below 1 MiB, where dvmm keeps the boot data, the EBDA and the BIOS area".to_string()
    } else if e820::is_usable_ram(mem_size, start, end - start) {
        return Ok(());
    } else if start < MMIO_HOLE_START && end > low_ram_top(mem_size) && mem_size <= MMIO_HOLE_START
    {
        format!("beyond the end of guest RAM ({mem_size:#x} bytes)")
    } else if start < FOUR_GIB && end > MMIO_HOLE_START {
        "in the MMIO hole between 3 GiB and 4 GiB".to_string()
    } else {
        format!("outside the guest RAM of a {mem_size:#x}-byte VM")
    };
    Err(BootError::KernelPlacement { start, end, reason })
}

/// Rounds up to the page size (saturating).
fn page_align_up(x: u64) -> u64 {
    x.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

/// Places an initrd of `size` bytes page-aligned as high as possible below
/// `min(limit, RAM top below 3 GiB)` but not below `lowest`.
fn place_initrd_high(
    mem_size: u64,
    path: &Path,
    size: u64,
    lowest: u64,
    limit: u64,
) -> Result<u64, BootError> {
    let top = low_ram_top(mem_size).min(limit);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        available: top.saturating_sub(lowest),
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < lowest {
        return Err(too_large());
    }
    Ok(addr)
}

/// Writes `data` at `addr`, naming `what` in the error.
fn write_bytes<M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    addr: u64,
    data: &[u8],
) -> Result<(), BootError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { what, addr, source })
}

fn write_gdt<M: GuestMemoryBackend>(mem: &M, long: bool) -> Result<(), BootError> {
    cpu::write_gdt(mem, long).map_err(|source| BootError::GuestWrite {
        what: "boot GDT",
        addr: GDT_ADDR,
        source,
    })
}
