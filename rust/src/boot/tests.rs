//! Tests of kernel loading with synthetic images (no KVM needed).

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::elf::build::{elf, pvh_notes, Seg};
use super::*;

const MIB: u64 = 1 << 20;
const MEM: u64 = 64 * MIB;
const RSDP: u64 = 0xE_0000;

fn guest(mem_size: u64) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

fn load(
    m: &GuestMemoryMmap,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<BootSetup, BootError> {
    load_images(
        m,
        MEM,
        &BootImages {
            kernel_path: Path::new("/k/kernel"),
            kernel,
            initrd: initrd.map(|d| (Path::new("/k/initrd.img"), d)),
            cmdline,
            linux_cmdline: None,
            rsdp_gpa: RSDP,
        },
    )
}

fn r32(m: &GuestMemoryMmap, a: u64) -> u32 {
    m.read_obj(GuestAddress(a)).unwrap()
}
fn r64(m: &GuestMemoryMmap, a: u64) -> u64 {
    m.read_obj(GuestAddress(a)).unwrap()
}
fn bytes(m: &GuestMemoryMmap, a: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    m.read_slice(&mut v, GuestAddress(a)).unwrap();
    v
}
fn cstr(m: &GuestMemoryMmap, a: u64) -> String {
    let v = bytes(m, a, 4096);
    let n = v.iter().position(|&b| b == 0).unwrap();
    String::from_utf8(v[..n].to_vec()).unwrap()
}

fn pvh_kernel(is_64: bool) -> Vec<u8> {
    elf(
        is_64,
        0x10_0000,
        &[
            Seg {
                paddr: 0x10_0000,
                data: b"\xf4PVH-TEXT".to_vec(),
                memsz: 0x3000,
            },
            Seg {
                paddr: 0x20_0000,
                data: b"DATA".to_vec(),
                memsz: 4,
            },
        ],
        Some(&pvh_notes(0x10_0000)),
    )
}

// ---------------------------------------------------------------- PVH

#[test]
fn pvh_elf64_with_initrd() {
    let m = guest(MEM);
    m.write_slice(&[0xAA; 0x100], GuestAddress(0x10_0000 + 9))
        .unwrap();
    let initrd: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let b = load(
        &m,
        &pvh_kernel(true),
        Some(&initrd),
        "run=all console=ttyS0",
    )
    .unwrap();

    assert_eq!(b.kind, KernelKind::Pvh);
    assert_eq!(
        b.entry,
        EntryState::Protected32 {
            rip: 0x10_0000,
            rbx: 0x6000,
            rax: 0
        }
    );
    assert_eq!(b.kernel_range, (0x10_0000, 0x20_0004));
    // segments and bss
    assert_eq!(bytes(&m, 0x10_0000, 9), b"\xf4PVH-TEXT");
    assert!(bytes(&m, 0x10_0009, 0x100).iter().all(|&x| x == 0));
    assert_eq!(bytes(&m, 0x20_0000, 4), b"DATA");

    // hvm_start_info
    assert_eq!(r32(&m, 0x6000), 0x336e_c578);
    assert_eq!(r32(&m, 0x6004), 1, "version");
    assert_eq!(r32(&m, 0x600C), 1, "nr_modules");
    let modlist = r64(&m, 0x6010);
    assert_eq!(r64(&m, 0x6018), CMDLINE_ADDR);
    assert_eq!(r64(&m, 0x6020), RSDP);
    let memmap = r64(&m, 0x6028);
    let entries = r32(&m, 0x6030);
    assert_eq!(memmap, pvh::MEMMAP_ADDR);
    assert_eq!(entries as usize, b.e820.len());
    assert_eq!(b.e820, e820(MEM));
    for (i, e) in b.e820.iter().enumerate() {
        let a = memmap + 24 * i as u64;
        assert_eq!(r64(&m, a), e.addr);
        assert_eq!(r64(&m, a + 8), e.size);
        assert_eq!(r32(&m, a + 16), e.kind.code());
    }
    assert_eq!(r32(&m, memmap + 16), 1, "first entry RAM");
    assert_eq!(r32(&m, memmap + 24 + 16), 2, "EBDA reserved");

    // module = initrd, page aligned at the top of RAM
    let (istart, iend) = b.initrd_range.unwrap();
    assert_eq!(istart % 4096, 0);
    assert!(iend <= MEM && MEM - iend < 4096);
    assert_eq!(r64(&m, modlist), istart);
    assert_eq!(r64(&m, modlist + 8), initrd.len() as u64);
    assert_eq!(bytes(&m, istart, initrd.len()), initrd);

    assert_eq!(cstr(&m, CMDLINE_ADDR), "run=all console=ttyS0");
    // GDT for protected mode
    assert_eq!(r64(&m, GDT_ADDR + 0x10), 0x00CF_9B00_0000_FFFF);
}

#[test]
fn pvh_elf32_without_initrd() {
    let m = guest(MEM);
    let b = load(&m, &pvh_kernel(false), None, "").unwrap();
    assert_eq!(b.kind, KernelKind::Pvh);
    assert_eq!(b.initrd_range, None);
    assert_eq!(r32(&m, 0x600C), 0);
    assert_eq!(r64(&m, 0x6010), 0);
    assert_eq!(cstr(&m, CMDLINE_ADDR), "");
}

#[test]
fn pvh_preferred_over_multiboot_header() {
    let mut text = mb_header(0x3, None);
    text.extend_from_slice(&[0x90; 16]);
    let k = elf(
        false,
        0x10_0000,
        &[Seg {
            paddr: 0x10_0000,
            data: text,
            memsz: 0x1000,
        }],
        Some(&pvh_notes(0x10_000C)),
    );
    let m = guest(MEM);
    let b = load(&m, &k, None, "").unwrap();
    assert_eq!(b.kind, KernelKind::Pvh);
    assert_eq!(
        b.entry,
        EntryState::Protected32 {
            rip: 0x10_000C,
            rbx: 0x6000,
            rax: 0
        }
    );
}

#[test]
fn pvh_entry_outside_image() {
    let k = elf(
        true,
        0x10_0000,
        &[Seg {
            paddr: 0x10_0000,
            data: vec![0x90; 8],
            memsz: 8,
        }],
        Some(&pvh_notes(0x50_0000)),
    );
    let err = load(&guest(MEM), &k, None, "").unwrap_err();
    assert!(
        matches!(
            err,
            BootError::Pvh(PvhError::EntryOutsideImage { entry: 0x50_0000 })
        ),
        "{err}"
    );
}

// ---------------------------------------------------------- Multiboot

/// A Multiboot header; with `kludge = Some((header_addr, load_addr, load_end,
/// bss_end, entry))` flag 16 and the address fields are added.
fn mb_header(flags: u32, kludge: Option<[u32; 5]>) -> Vec<u8> {
    let flags = flags | if kludge.is_some() { 1 << 16 } else { 0 };
    let mut v = Vec::new();
    v.extend_from_slice(&0x1BAD_B002u32.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(
        &0u32
            .wrapping_sub(0x1BAD_B002)
            .wrapping_sub(flags)
            .to_le_bytes(),
    );
    if let Some(f) = kludge {
        for x in f {
            v.extend_from_slice(&x.to_le_bytes());
        }
    }
    v
}

/// An a.out-kludge image: 0x20 bytes of code, the header at file offset 0x20,
/// loaded at 0x100000, bss to 0x103000, entry 0x100000.
fn mb_kludge_kernel() -> Vec<u8> {
    let mut k = vec![0x90u8; 0x20];
    k[0] = 0xFA; // cli
    let hdr_len = 32u32;
    let load_end = 0x10_0000 + 0x20 + hdr_len + 0x10;
    k.extend(mb_header(
        0x3,
        Some([0x10_0020, 0x10_0000, load_end, 0x10_3000, 0x10_0000]),
    ));
    k.extend_from_slice(&[0xEE; 0x10]);
    k.extend_from_slice(b"NOT LOADED");
    k
}

#[test]
fn multiboot_kludge_with_module() {
    let m = guest(MEM);
    m.write_slice(&[0x55; 0x100], GuestAddress(0x10_0060))
        .unwrap();
    let k = mb_kludge_kernel();
    let module = b"module contents".to_vec();
    let b = load(&m, &k, Some(&module), "a=1 b").unwrap();
    assert_eq!(b.kind, KernelKind::Multiboot);
    assert_eq!(
        b.entry,
        EntryState::Protected32 {
            rip: 0x10_0000,
            rbx: 0x6000,
            rax: 0x2BAD_B002
        }
    );
    assert_eq!(b.kernel_range, (0x10_0000, 0x10_3000));
    assert_eq!(bytes(&m, 0x10_0000, 0x20), k[..0x20]);
    assert_eq!(bytes(&m, 0x10_0040, 0x10), vec![0xEE; 0x10]);
    assert!(
        bytes(&m, 0x10_0050, 0x100).iter().all(|&x| x == 0),
        "bss zeroed"
    );

    let info = 0x6000;
    let flags = r32(&m, info);
    assert_eq!(flags, 1 | 4 | 8 | 64 | 512);
    assert_eq!(r32(&m, info + 4), 639, "mem_lower");
    assert_eq!(r32(&m, info + 8), ((MEM - MIB) / 1024) as u32, "mem_upper");
    assert_eq!(cstr(&m, u64::from(r32(&m, info + 16))), "/k/kernel a=1 b");
    assert_eq!(r32(&m, info + 20), 1, "mods_count");
    let mods = u64::from(r32(&m, info + 24));
    let (ms, me) = (u64::from(r32(&m, mods)), u64::from(r32(&m, mods + 4)));
    assert_eq!(ms, 0x10_3000, "module page-aligned right after the bss");
    assert_eq!(me - ms, module.len() as u64);
    assert_eq!(bytes(&m, ms, module.len()), module);
    assert_eq!(b.initrd_range, Some((ms, me)));
    assert_eq!(cstr(&m, u64::from(r32(&m, mods + 8))), "/k/initrd.img");
    // memory map
    let mlen = r32(&m, info + 44);
    let maddr = u64::from(r32(&m, info + 48));
    let e = e820(MEM);
    assert_eq!(mlen as usize, e.len() * 24);
    for (i, ent) in e.iter().enumerate() {
        let a = maddr + 24 * i as u64;
        assert_eq!(r32(&m, a), 20);
        assert_eq!(r64(&m, a + 4), ent.addr);
        assert_eq!(r64(&m, a + 12), ent.size);
        assert_eq!(r32(&m, a + 20), ent.kind.code());
    }
    assert_eq!(cstr(&m, u64::from(r32(&m, info + 64))), "dvmm");
}

#[test]
fn multiboot_elf32_with_virtual_entry() {
    // Higher-half style: vaddr 0xC0100000, paddr 0x100000, entry given as vaddr.
    let mut text = mb_header(0x1, None);
    text.extend_from_slice(&[0xF4; 4]);
    let mut k = elf(
        false,
        0xC010_000C,
        &[Seg {
            paddr: 0x10_0000,
            data: text.clone(),
            memsz: 0x2000,
        }],
        None,
    );
    // patch p_vaddr of the only program header (ELF32: phdr at 52, vaddr at +8)
    k[52 + 8..52 + 12].copy_from_slice(&0xC010_0000u32.to_le_bytes());
    let m = guest(MEM);
    let b = load(&m, &k, None, "").unwrap();
    assert_eq!(b.kind, KernelKind::Multiboot);
    assert_eq!(
        b.entry,
        EntryState::Protected32 {
            rip: 0x10_000C,
            rbx: 0x6000,
            rax: 0x2BAD_B002
        }
    );
    assert_eq!(bytes(&m, 0x10_0000, text.len()), text);
    assert_eq!(r32(&m, 0x6000 + 20), 0, "no modules");
    assert_eq!(cstr(&m, CMDLINE_ADDR), "/k/kernel");
}

#[test]
fn multiboot_bad_checksum() {
    let mut k = mb_kludge_kernel();
    k[0x28] ^= 1;
    let err = load(&guest(MEM), &k, None, "").unwrap_err();
    assert!(
        matches!(
            err,
            BootError::Multiboot(MultibootError::BadChecksum { offset: 0x20, .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("checksum"));
}

#[test]
fn multiboot_unsupported_required_flag() {
    let mut k = vec![0u8; 16];
    k.extend(mb_header(
        0x3 | 0x8,
        Some([0x10_0010, 0x10_0000, 0, 0, 0x10_0000]),
    ));
    let err = load(&guest(MEM), &k, None, "").unwrap_err();
    assert!(
        matches!(
            err,
            BootError::Multiboot(MultibootError::UnsupportedFlags { bits: 0x8 })
        ),
        "{err}"
    );
    // The video bit alone is accepted (and ignored).
    let mut k = vec![0u8; 16];
    k.extend(mb_header(
        0x7,
        Some([0x10_0010, 0x10_0000, 0, 0, 0x10_0000]),
    ));
    assert!(load(&guest(MEM), &k, None, "").is_ok());
}

#[test]
fn multiboot_bad_address_fields() {
    let cases = [
        // load_addr above header_addr
        [0x10_0000, 0x10_0010, 0, 0, 0x10_0010],
        // header_addr - load_addr larger than the file offset
        [0x20_0000, 0x10_0000, 0, 0, 0x10_0000],
        // load_end below load_addr
        [0x10_0010, 0x10_0000, 0xF_0000, 0, 0x10_0000],
        // asks for more than the file has
        [0x10_0010, 0x10_0000, 0x20_0000, 0, 0x10_0000],
    ];
    for f in cases {
        let mut k = vec![0u8; 16];
        k.extend(mb_header(0, Some(f)));
        let err = load(&guest(MEM), &k, None, "").unwrap_err();
        assert!(
            matches!(
                err,
                BootError::Multiboot(MultibootError::BadAddressFields(_))
            ),
            "{f:x?}: {err}"
        );
    }
    // entry outside the image
    let mut k = vec![0u8; 16];
    k.extend(mb_header(0, Some([0x10_0010, 0x10_0000, 0, 0, 0x30_0000])));
    let err = load(&guest(MEM), &k, None, "").unwrap_err();
    assert!(matches!(
        err,
        BootError::Multiboot(MultibootError::EntryOutsideImage { .. })
    ));
    // header without address fields in a file that is not ELF
    let mut k = vec![0u8; 16];
    k.extend(mb_header(0, None));
    let err = load(&guest(MEM), &k, None, "").unwrap_err();
    assert!(matches!(
        err,
        BootError::Multiboot(MultibootError::NoLoadInformation)
    ));
}

#[test]
fn multiboot_kernel_below_1mib_refused() {
    let mut k = vec![0u8; 16];
    k.extend(mb_header(0, Some([0x8010, 0x8000, 0, 0, 0x8000])));
    let err = load(&guest(MEM), &k, None, "").unwrap_err();
    assert!(
        matches!(err, BootError::KernelPlacement { start: 0x8000, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("below 1 MiB"));
}

#[test]
fn multiboot_module_too_large() {
    let k = mb_kludge_kernel();
    let big = vec![0u8; (MEM - 0x10_3000 + 1) as usize];
    let err = load(&guest(MEM), &k, Some(&big), "").unwrap_err();
    assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("/k/initrd.img"));
}

// ------------------------------------------------------------- bzImage

/// A synthetic bzImage: 1 setup sector + boot sector, then `payload_len` bytes.
fn bzimage(payload_len: usize) -> Vec<u8> {
    let mut k = vec![0u8; 2 * 512];
    let put16 = |k: &mut Vec<u8>, o: usize, v: u16| k[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |k: &mut Vec<u8>, o: usize, v: u32| k[o..o + 4].copy_from_slice(&v.to_le_bytes());
    k[0x1F1] = 1; // setup_sects
    put16(&mut k, 0x1FE, 0xAA55);
    k[0x202..0x206].copy_from_slice(b"HdrS");
    put16(&mut k, 0x206, 0x020F);
    k[0x211] = 0x01; // LOADED_HIGH
    put32(&mut k, 0x214, 0x10_0000); // code32_start
    put32(&mut k, 0x22C, 0x7FFF_FFFF); // initrd_addr_max
    put32(&mut k, 0x230, 0x20_0000); // kernel_alignment
    k[0x234] = 1; // relocatable
    put16(&mut k, 0x236, 0x1 | 0x2); // XLF_KERNEL_64 | CAN_BE_LOADED_ABOVE_4G
    put32(&mut k, 0x238, 2048); // cmdline_size
    k[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    put32(&mut k, 0x260, 0x80_0000); // init_size
    k.extend((0..payload_len).map(|i| (i * 7) as u8));
    k
}

#[test]
fn bzimage_boot_params_and_tables() {
    let m = guest(MEM);
    let k = bzimage(0x3000);
    let initrd = vec![0x17u8; 0x5000];
    let b = load(&m, &k, Some(&initrd), "console=ttyS0 root=/dev/ram0").unwrap();
    assert_eq!(b.kind, KernelKind::LinuxBzImage);
    let load_addr = 0x100_0000;
    assert_eq!(
        b.entry,
        EntryState::Long64 {
            rip: load_addr + 0x200,
            rsi: 0x7000,
            cr3: 0x9000,
            gdt_base: 0x500,
            gdt_limit: GDT_LIMIT,
            rsp: cpu::BOOT_STACK,
        }
    );
    assert_eq!(b.kernel_range, (load_addr, load_addr + 0x80_0000));
    // protected-mode kernel at the load address
    assert_eq!(bytes(&m, load_addr, 0x3000), k[0x400..]);

    let bp = BOOT_PARAMS_ADDR;
    assert_eq!(&bytes(&m, bp + 0x202, 4), b"HdrS");
    assert_eq!(bytes(&m, bp + 0x210, 1)[0], 0xFF, "type_of_loader");
    assert_eq!(r32(&m, bp + 0x214), load_addr as u32, "code32_start");
    assert_eq!(r32(&m, bp + 0x228), CMDLINE_ADDR as u32, "cmd_line_ptr");
    assert_eq!(cstr(&m, CMDLINE_ADDR), "console=ttyS0 root=/dev/ram0");
    let (istart, iend) = b.initrd_range.unwrap();
    assert_eq!(r32(&m, bp + 0x218), istart as u32, "ramdisk_image");
    assert_eq!(r32(&m, bp + 0x21C), initrd.len() as u32, "ramdisk_size");
    assert_eq!(istart % 4096, 0);
    assert!(iend <= MEM && istart >= load_addr + 0x80_0000);
    assert_eq!(bytes(&m, istart, initrd.len()), initrd);
    assert_eq!(r64(&m, bp + 0x70), RSDP, "acpi_rsdp_addr");
    let e = e820(MEM);
    assert_eq!(bytes(&m, bp + 0x1E8, 1)[0] as usize, e.len());
    for (i, ent) in e.iter().enumerate() {
        let a = bp + 0x2D0 + 20 * i as u64;
        assert_eq!(r64(&m, a), ent.addr);
        assert_eq!(r64(&m, a + 8), ent.size);
        assert_eq!(r32(&m, a + 16), ent.kind.code());
    }
    // page tables and the 64-bit GDT
    assert_eq!(r64(&m, 0x9000), 0xA003);
    assert_eq!(r64(&m, 0xA000), 0xB003);
    assert_eq!(
        r64(&m, 0xB000 + 8 * 8),
        (8 << 21) | 0x83,
        "16 MiB identity mapped"
    );
    assert_eq!(r64(&m, GDT_ADDR + 0x10), 0x00AF_9B00_0000_FFFF);

    // the vCPU state derived from it
    let mut regs = kvm_bindings::kvm_regs::default();
    let mut sregs = kvm_bindings::kvm_sregs::default();
    b.entry.apply(&mut regs, &mut sregs);
    assert_eq!(regs.rip, load_addr + 0x200);
    assert_eq!(regs.rsi, 0x7000);
    assert_eq!(sregs.cs.l, 1);
    assert_eq!(sregs.efer, 0x500);
}

#[test]
fn bzimage_without_pref_address_fit_loads_aligned_above_1mib() {
    // 20 MiB VM: pref_address 16 MiB + 8 MiB init_size does not fit.
    let mem = 20 * MIB;
    let m = guest(mem);
    let b = load_images(
        &m,
        mem,
        &BootImages {
            kernel_path: Path::new("bz"),
            kernel: &bzimage(0x1000),
            initrd: None,
            cmdline: "",
            linux_cmdline: None,
            rsdp_gpa: 0,
        },
    )
    .unwrap();
    assert_eq!(b.kernel_range.0, 0x20_0000);
    assert_eq!(r32(&m, BOOT_PARAMS_ADDR + 0x218), 0, "no ramdisk");
}

#[test]
fn bzimage_header_errors() {
    let m = guest(MEM);
    let mut k = bzimage(0x100);
    k[0x1FE] = 0;
    assert!(matches!(
        load(&m, &k, None, "").unwrap_err(),
        BootError::Linux(LinuxError::BadBootFlag(0xAA00))
    ));
    let mut k = bzimage(0x100);
    k[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
    let err = load(&m, &k, None, "").unwrap_err();
    assert!(matches!(
        err,
        BootError::Linux(LinuxError::ProtocolTooOld(0x206))
    ));
    assert!(err.to_string().contains("2.06"), "{err}");
    let mut k = bzimage(0x100);
    k[0x236] = 0;
    assert!(matches!(
        load(&m, &k, None, "").unwrap_err(),
        BootError::Linux(LinuxError::No64BitEntry)
    ));
    let mut k = bzimage(0x100);
    k[0x211] = 0;
    assert!(matches!(
        load(&m, &k, None, "").unwrap_err(),
        BootError::Linux(LinuxError::NotLoadedHigh)
    ));
    // nothing after the setup sectors
    let k = bzimage(0);
    assert!(matches!(
        load(&m, &k, None, "").unwrap_err(),
        BootError::Linux(LinuxError::Truncated(_))
    ));
    // command line longer than the kernel's cmdline_size
    let k = bzimage(0x100);
    let err = load(&m, &k, None, &"x".repeat(2049)).unwrap_err();
    assert!(
        matches!(
            err,
            BootError::CmdlineTooLong {
                len: 2049,
                max: 2048
            }
        ),
        "{err}"
    );
}

#[test]
fn bzimage_initrd_too_large() {
    let k = bzimage(0x100);
    let big = vec![0u8; (MEM - 0x180_0000 + 4096) as usize];
    let err = load(&guest(MEM), &k, Some(&big), "").unwrap_err();
    assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
}

// -------------------------------------------------------- bad input

#[test]
fn garbage_is_unrecognised() {
    let mut x: u64 = 0x1234_5678_9ABC_DEF1;
    let junk: Vec<u8> = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let err = load(&guest(MEM), &junk, None, "").unwrap_err();
    assert!(matches!(err, BootError::UnrecognisedFormat { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("/k/kernel") && msg.contains("PVH") && msg.contains("Multiboot"));
    assert!(msg.contains("bzImage"));
    // tiny files too
    for n in [1usize, 3, 11, 100] {
        let err = load(&guest(MEM), &junk[..n], None, "").unwrap_err();
        assert!(
            matches!(err, BootError::UnrecognisedFormat { .. }),
            "{n}: {err}"
        );
    }
}

#[test]
fn empty_kernel() {
    let err = load(&guest(MEM), &[], None, "").unwrap_err();
    assert!(matches!(err, BootError::KernelEmpty { .. }));
}

#[test]
fn truncated_elf() {
    let k = pvh_kernel(true);
    for cut in [4usize, 20, 63, 100, 150, k.len() - 2] {
        let err = load(&guest(MEM), &k[..cut], None, "").unwrap_err();
        assert!(matches!(err, BootError::Elf(_)), "cut {cut}: {err}");
    }
}

#[test]
fn elf_without_pvh_or_multiboot() {
    let k = elf(
        true,
        0x10_0000,
        &[Seg {
            paddr: 0x10_0000,
            data: vec![0x90; 64],
            memsz: 64,
        }],
        None,
    );
    let err = load(&guest(MEM), &k, None, "").unwrap_err();
    assert!(matches!(err, BootError::ElfWithoutEntry { .. }), "{err}");
    assert!(err.to_string().contains("PVH entry note"));
}

#[test]
fn kernel_beyond_ram() {
    let k = elf(
        true,
        0x3F0_0000,
        &[Seg {
            paddr: 0x3F0_0000,
            data: vec![0x90; 64],
            memsz: 0x20_0000,
        }],
        Some(&pvh_notes(0x3F0_0000)),
    );
    let err = load(&guest(MEM), &k, None, "").unwrap_err();
    assert!(matches!(err, BootError::KernelPlacement { .. }), "{err}");
    assert!(
        err.to_string().contains("beyond the end of guest RAM"),
        "{err}"
    );
}

#[test]
fn cmdline_errors() {
    let m = guest(MEM);
    let err = load(&m, &pvh_kernel(true), None, &"a".repeat(CMDLINE_MAX_SIZE)).unwrap_err();
    assert!(matches!(err, BootError::CmdlineTooLong { .. }), "{err}");
    let err = load(&m, &pvh_kernel(true), None, "caf\u{e9}").unwrap_err();
    assert!(matches!(err, BootError::CmdlineInvalid(_)), "{err}");
    let err = load(&m, &pvh_kernel(true), None, "a\nb").unwrap_err();
    assert!(matches!(err, BootError::CmdlineInvalid(_)), "{err}");
    // the longest accepted
    let long = "a".repeat(CMDLINE_MAX_SIZE - 1);
    load(&m, &pvh_kernel(true), None, &long).unwrap();
    assert_eq!(cstr_len(&m, CMDLINE_ADDR), CMDLINE_MAX_SIZE - 1);
}

fn cstr_len(m: &GuestMemoryMmap, a: u64) -> usize {
    let v = bytes(m, a, CMDLINE_MAX_SIZE + 1);
    v.iter().position(|&b| b == 0).unwrap()
}

#[test]
fn pvh_initrd_too_large() {
    let big = vec![0u8; (MEM - 0x20_1000 + 1) as usize];
    let err = load(&guest(MEM), &pvh_kernel(true), Some(&big), "").unwrap_err();
    assert!(matches!(err, BootError::InitrdTooLarge { size, .. } if size == big.len() as u64));
}

#[test]
fn memory_checks() {
    let small = guest(MIB);
    let err = load_images(
        &small,
        MIB,
        &BootImages {
            kernel_path: Path::new("k"),
            kernel: &pvh_kernel(true),
            initrd: None,
            cmdline: "",
            linux_cmdline: None,
            rsdp_gpa: 0,
        },
    )
    .unwrap_err();
    assert!(matches!(err, BootError::MemoryTooSmall { .. }), "{err}");
    // mem_size says 128 MiB but only 64 MiB are backed
    let m = guest(MEM);
    let err = load_images(
        &m,
        2 * MEM,
        &BootImages {
            kernel_path: Path::new("k"),
            kernel: &pvh_kernel(true),
            initrd: None,
            cmdline: "",
            linux_cmdline: None,
            rsdp_gpa: 0,
        },
    )
    .unwrap_err();
    assert!(matches!(err, BootError::MemoryNotBacked { .. }), "{err}");
}

// ------------------------------------------------------------- files

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("dvmm-boot-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn load_kernel_from_files() {
    let d = TempDir::new("files");
    let kp = d.0.join("kernel.elf");
    let ip = d.0.join("initrd");
    std::fs::write(&kp, pvh_kernel(true)).unwrap();
    std::fs::write(&ip, b"INITRD").unwrap();
    let m = guest(MEM);
    let b = load_kernel(&m, MEM, &kp, Some(&ip), "x=1", None, RSDP).unwrap();
    let (s, e) = b.initrd_range.unwrap();
    assert_eq!(bytes(&m, s, (e - s) as usize), b"INITRD");

    let missing = d.0.join("nope");
    let err = load_kernel(&m, MEM, &missing, None, "", None, 0).unwrap_err();
    assert!(matches!(err, BootError::KernelNotFound { .. }));
    assert!(err.to_string().contains("nope"), "{err}");
    let err = load_kernel(&m, MEM, &kp, Some(&missing), "", None, 0).unwrap_err();
    assert!(matches!(err, BootError::InitrdNotFound { .. }), "{err}");
    // a directory is unreadable as a file
    let err = load_kernel(&m, MEM, &d.0, None, "", None, 0).unwrap_err();
    assert!(matches!(err, BootError::Unreadable { .. }), "{err}");
    let empty = d.0.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let err = load_kernel(&m, MEM, &empty, None, "", None, 0).unwrap_err();
    assert!(matches!(err, BootError::KernelEmpty { .. }), "{err}");
    assert!(err.to_string().contains("empty"));
}

#[test]
fn bundled_guest_loads() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/build/dvmm-guest");
    if !p.exists() {
        println!("skipped: bundled guest {} not built", p.display());
        return;
    }
    let mem = 256 * MIB;
    let m = guest(mem);
    let b = load_kernel(&m, mem, &p, None, "run=all", None, RSDP)
        .unwrap_or_else(|e| panic!("loading the bundled guest: {e}"));
    assert_eq!(b.kind, KernelKind::Pvh, "the bundled guest boots by PVH");
    let EntryState::Protected32 { rip, rbx, .. } = b.entry else {
        panic!("PVH entry is 32-bit protected mode");
    };
    assert_eq!(rbx, START_INFO_ADDR);
    assert!(rip >= b.kernel_range.0 && rip < b.kernel_range.1);
    assert_eq!(r32(&m, START_INFO_ADDR), 0x336e_c578);
    assert_eq!(cstr(&m, CMDLINE_ADDR), "run=all");
}

#[test]
fn linux_cmdline_goes_to_bzimage_only() {
    let lines = |kernel: &[u8]| {
        let m = guest(MEM);
        let b = load_images(
            &m,
            MEM,
            &BootImages {
                kernel_path: Path::new("k"),
                kernel,
                initrd: None,
                cmdline: "console=ttyS0",
                linux_cmdline: Some("console=ttyS0 noxsave"),
                rsdp_gpa: 0,
            },
        )
        .unwrap();
        cstr(&m, b.cmdline_gpa)
    };
    assert_eq!(lines(&bzimage(0x1000)), "console=ttyS0 noxsave");
    assert_eq!(lines(&pvh_kernel(true)), "console=ttyS0");
}
