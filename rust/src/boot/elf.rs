//! A small, bounds-checked ELF reader for kernel images: ELF32 and ELF64, little
//! endian, x86 / x86-64, `PT_LOAD` segments and the PVH entry note
//! (`XEN_ELFNOTE_PHYS32_ENTRY`).
//!
//! Why not `linux_loader::loader::Elf`: it reads ELF64 only (small kernels that
//! boot by PVH or Multiboot are often ELF32, and QEMU accepts both), it writes
//! segments before anything can check them against the guest's RAM layout, and it
//! does not clear `.bss` (`p_memsz > p_filesz`). Here the image is parsed first,
//! every segment is checked by the caller, then loaded with its `.bss` zeroed.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// Errors of the ELF reader.
#[derive(Debug, Error)]
pub enum ElfError {
    /// The file ends before a structure the headers point at.
    #[error("truncated ELF: {what} needs bytes {start:#x}..{end:#x} but the file has {len:#x}")]
    Truncated {
        /// Which structure.
        what: String,
        /// First byte needed.
        start: u64,
        /// One past the last byte needed.
        end: u64,
        /// File length.
        len: u64,
    },
    /// `EI_CLASS` is neither ELF32 nor ELF64.
    #[error("unsupported ELF class {0} (expected 1 = ELF32 or 2 = ELF64)")]
    BadClass(u8),
    /// Big-endian image.
    #[error("big-endian ELF images cannot run on x86")]
    BigEndian,
    /// Not `ET_EXEC`.
    #[error("ELF type {0} is not an executable (ET_EXEC = 2)")]
    NotExecutable(u16),
    /// Not x86 / x86-64.
    #[error("ELF machine {0} is not x86 (EM_386 = 3) or x86-64 (EM_X86_64 = 62)")]
    WrongMachine(u16),
    /// `e_phentsize` does not match the class.
    #[error("ELF program header size {got} is wrong (expected {want})")]
    BadPhentsize {
        /// Found.
        got: u16,
        /// Expected for the class.
        want: u16,
    },
    /// A segment has `p_filesz > p_memsz` or its addresses overflow.
    #[error("ELF program header {index} is inconsistent: {reason}")]
    BadSegment {
        /// Program header index.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Nothing to load.
    #[error("ELF image has no loadable (PT_LOAD) segment")]
    NoLoadableSegments,
    /// The PVH note is malformed.
    #[error("malformed PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): {0}")]
    BadPvhNote(&'static str),
    /// Writing a segment to guest memory failed.
    #[error("writing ELF segment {index} to guest memory at {addr:#x}: {source}")]
    Write {
        /// Program header index.
        index: usize,
        /// Guest-physical address.
        addr: u64,
        /// vm-memory's error.
        source: GuestMemoryError,
    },
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const ET_EXEC: u16 = 2;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
/// Note type of the PVH 32-bit entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// One `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Program header index.
    pub index: usize,
    /// Physical load address.
    pub paddr: u64,
    /// Virtual address (used to translate a virtual entry point).
    pub vaddr: u64,
    /// File offset.
    pub offset: u64,
    /// Bytes taken from the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zeroed).
    pub memsz: u64,
}

impl Segment {
    /// One past the last guest-physical byte of the segment.
    pub fn end(&self) -> u64 {
        // overflow was rejected at parse time
        self.paddr + self.memsz
    }
}

/// A parsed ELF kernel image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    /// ELF64 (else ELF32).
    pub is_64: bool,
    /// `e_entry`.
    pub entry: u64,
    /// Loadable segments with `p_memsz > 0`.
    pub segments: Vec<Segment>,
    /// The PVH entry point, if the image has the note.
    pub pvh_entry: Option<u64>,
}

/// True if `bytes` starts with the ELF magic.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

fn slice<'a>(bytes: &'a [u8], start: u64, len: u64, what: &str) -> Result<&'a [u8], ElfError> {
    let end = start.checked_add(len);
    match end {
        Some(end) if end <= bytes.len() as u64 => Ok(&bytes[start as usize..end as usize]),
        _ => Err(ElfError::Truncated {
            what: what.to_string(),
            start,
            end: end.unwrap_or(u64::MAX),
            len: bytes.len() as u64,
        }),
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

struct Phdr {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

/// Parses an ELF kernel image (does not touch guest memory).
pub fn parse(bytes: &[u8]) -> Result<ElfImage, ElfError> {
    let ident = slice(bytes, 0, 16, "ELF identification")?;
    let is_64 = match ident[4] {
        1 => false,
        2 => true,
        c => return Err(ElfError::BadClass(c)),
    };
    if ident[5] != 1 {
        return Err(ElfError::BigEndian);
    }
    let ehdr = slice(bytes, 0, if is_64 { 64 } else { 52 }, "ELF header")?;
    let e_type = u16_at(ehdr, 16);
    if e_type != ET_EXEC {
        return Err(ElfError::NotExecutable(e_type));
    }
    let machine = u16_at(ehdr, 18);
    if machine != EM_386 && machine != EM_X86_64 {
        return Err(ElfError::WrongMachine(machine));
    }
    let (entry, phoff, phentsize, phnum, want) = if is_64 {
        (
            u64_at(ehdr, 24),
            u64_at(ehdr, 32),
            u16_at(ehdr, 54),
            u16_at(ehdr, 56),
            56u16,
        )
    } else {
        (
            u64::from(u32_at(ehdr, 24)),
            u64::from(u32_at(ehdr, 28)),
            u16_at(ehdr, 42),
            u16_at(ehdr, 44),
            32u16,
        )
    };
    if phnum > 0 && phentsize != want {
        return Err(ElfError::BadPhentsize {
            got: phentsize,
            want,
        });
    }
    let table = slice(
        bytes,
        phoff,
        u64::from(phnum) * u64::from(want),
        "program header table",
    )?;

    let mut segments = Vec::new();
    let mut pvh_entry = None;
    for (index, ph) in table.chunks_exact(want as usize).enumerate() {
        let p = if is_64 {
            Phdr {
                p_type: u32_at(ph, 0),
                offset: u64_at(ph, 8),
                vaddr: u64_at(ph, 16),
                paddr: u64_at(ph, 24),
                filesz: u64_at(ph, 32),
                memsz: u64_at(ph, 40),
                align: u64_at(ph, 48),
            }
        } else {
            Phdr {
                p_type: u32_at(ph, 0),
                offset: u64::from(u32_at(ph, 4)),
                vaddr: u64::from(u32_at(ph, 8)),
                paddr: u64::from(u32_at(ph, 12)),
                filesz: u64::from(u32_at(ph, 16)),
                memsz: u64::from(u32_at(ph, 20)),
                align: u64::from(u32_at(ph, 28)),
            }
        };
        match p.p_type {
            PT_LOAD if p.memsz > 0 => {
                if p.filesz > p.memsz {
                    return Err(ElfError::BadSegment {
                        index,
                        reason: "p_filesz is larger than p_memsz",
                    });
                }
                if p.paddr.checked_add(p.memsz).is_none() {
                    return Err(ElfError::BadSegment {
                        index,
                        reason: "p_paddr + p_memsz overflows",
                    });
                }
                slice(bytes, p.offset, p.filesz, &format!("segment {index}"))?;
                segments.push(Segment {
                    index,
                    paddr: p.paddr,
                    vaddr: p.vaddr,
                    offset: p.offset,
                    filesz: p.filesz,
                    memsz: p.memsz,
                });
            }
            PT_NOTE => {
                let notes = slice(bytes, p.offset, p.filesz, &format!("note segment {index}"))?;
                if let Some(e) = find_pvh_note(notes, p.align)? {
                    pvh_entry = Some(e);
                }
            }
            _ => {}
        }
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadableSegments);
    }
    Ok(ElfImage {
        is_64,
        entry,
        segments,
        pvh_entry,
    })
}

/// Looks for the `Xen` / `XEN_ELFNOTE_PHYS32_ENTRY` note in a note segment.
fn find_pvh_note(notes: &[u8], p_align: u64) -> Result<Option<u64>, ElfError> {
    // Notes are 4-byte aligned almost everywhere; a segment aligned to 8 uses 8.
    let align: usize = if p_align == 8 { 8 } else { 4 };
    let up = |x: usize| x.div_ceil(align) * align;
    let mut off = 0usize;
    while off + 12 <= notes.len() {
        let namesz = u32_at(notes, off) as usize;
        let descsz = u32_at(notes, off + 4) as usize;
        let ntype = u32_at(notes, off + 8);
        let name_start = off + 12;
        let desc_start = name_start
            .checked_add(up(namesz))
            .ok_or(ElfError::BadPvhNote("name size overflows"))?;
        let next = desc_start
            .checked_add(up(descsz))
            .ok_or(ElfError::BadPvhNote("descriptor size overflows"))?;
        let name = notes.get(name_start..name_start + namesz);
        if ntype == XEN_ELFNOTE_PHYS32_ENTRY && name == Some(b"Xen\0".as_slice()) {
            let desc = notes
                .get(desc_start..desc_start.saturating_add(descsz))
                .ok_or(ElfError::BadPvhNote(
                    "descriptor runs past the note segment",
                ))?;
            return match descsz {
                4 => Ok(Some(u64::from(u32_at(desc, 0)))),
                8 => {
                    let e = u64_at(desc, 0);
                    if e > u64::from(u32::MAX) {
                        Err(ElfError::BadPvhNote("entry point is above 4 GiB"))
                    } else {
                        Ok(Some(e))
                    }
                }
                _ => Err(ElfError::BadPvhNote("descriptor is not 4 or 8 bytes")),
            };
        }
        off = next;
    }
    Ok(None)
}

/// Zeroes `[addr, addr + len)` of guest memory.
pub fn zero_guest<M: GuestMemoryBackend>(
    mem: &M,
    addr: u64,
    len: u64,
) -> Result<(), GuestMemoryError> {
    const CHUNK: u64 = 64 * 1024;
    let zeros = [0u8; CHUNK as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK);
        mem.write_slice(&zeros[..n as usize], GuestAddress(addr + done))?;
        done += n;
    }
    Ok(())
}

/// Loads every segment of `image` (parsed from `bytes`) at its physical address and
/// zeroes its `.bss`. The caller has checked the placement.
pub fn load<M: GuestMemoryBackend>(
    mem: &M,
    image: &ElfImage,
    bytes: &[u8],
) -> Result<(), ElfError> {
    for s in &image.segments {
        let data = slice(bytes, s.offset, s.filesz, "segment")?;
        let werr = |source| ElfError::Write {
            index: s.index,
            addr: s.paddr,
            source,
        };
        mem.write_slice(data, GuestAddress(s.paddr)).map_err(werr)?;
        zero_guest(mem, s.paddr + s.filesz, s.memsz - s.filesz).map_err(werr)?;
    }
    Ok(())
}

/// Test helpers: build small ELF images by hand.
#[cfg(test)]
pub(crate) mod build {
    /// A loadable segment for [`elf`].
    pub struct Seg {
        pub paddr: u64,
        pub data: Vec<u8>,
        pub memsz: u64,
    }

    fn note(name: &[u8], ntype: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&ntype.to_le_bytes());
        v.extend_from_slice(name);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v.extend_from_slice(desc);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    /// The PVH entry note (and a dummy note in front of it).
    pub fn pvh_notes(entry: u32) -> Vec<u8> {
        let mut v = note(b"GNU\0", 3, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        v.extend(note(b"Xen\0", 18, &entry.to_le_bytes()));
        v
    }

    /// Builds an ELF32 or ELF64 executable with the given segments and an optional
    /// note segment. The segment data follows the headers.
    pub fn elf(is_64: bool, entry: u64, segs: &[Seg], notes: Option<&[u8]>) -> Vec<u8> {
        let ehsize = if is_64 { 64 } else { 52 };
        let phentsize = if is_64 { 56 } else { 32 };
        let phnum = segs.len() + usize::from(notes.is_some());
        let mut data_off = ehsize + phentsize * phnum;
        let mut out = vec![0u8; data_off];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = if is_64 { 2 } else { 1 };
        out[5] = 1;
        out[6] = 1;
        out[16..18].copy_from_slice(&2u16.to_le_bytes());
        out[18..20].copy_from_slice(&(if is_64 { 62u16 } else { 3 }).to_le_bytes());
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        if is_64 {
            out[24..32].copy_from_slice(&entry.to_le_bytes());
            out[32..40].copy_from_slice(&(ehsize as u64).to_le_bytes());
            out[52..54].copy_from_slice(&(ehsize as u16).to_le_bytes());
            out[54..56].copy_from_slice(&(phentsize as u16).to_le_bytes());
            out[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        } else {
            out[24..28].copy_from_slice(&(entry as u32).to_le_bytes());
            out[28..32].copy_from_slice(&(ehsize as u32).to_le_bytes());
            out[40..42].copy_from_slice(&(ehsize as u16).to_le_bytes());
            out[42..44].copy_from_slice(&(phentsize as u16).to_le_bytes());
            out[44..46].copy_from_slice(&(phnum as u16).to_le_bytes());
        }
        let mut phdrs: Vec<(u32, u64, u64, u64, u64)> = Vec::new(); // type, off, paddr, filesz, memsz
        let mut payload = Vec::new();
        if let Some(n) = notes {
            phdrs.push((4, data_off as u64, 0, n.len() as u64, n.len() as u64));
            payload.extend_from_slice(n);
            data_off += n.len();
        }
        for s in segs {
            while !data_off.is_multiple_of(16) {
                payload.push(0);
                data_off += 1;
            }
            phdrs.push((1, data_off as u64, s.paddr, s.data.len() as u64, s.memsz));
            payload.extend_from_slice(&s.data);
            data_off += s.data.len();
        }
        for (i, (t, off, paddr, filesz, memsz)) in phdrs.into_iter().enumerate() {
            let p = ehsize + i * phentsize;
            let ph = &mut out[p..p + phentsize];
            ph[0..4].copy_from_slice(&t.to_le_bytes());
            if is_64 {
                ph[8..16].copy_from_slice(&off.to_le_bytes());
                ph[16..24].copy_from_slice(&paddr.to_le_bytes());
                ph[24..32].copy_from_slice(&paddr.to_le_bytes());
                ph[32..40].copy_from_slice(&filesz.to_le_bytes());
                ph[40..48].copy_from_slice(&memsz.to_le_bytes());
                ph[48..56].copy_from_slice(&4u64.to_le_bytes());
            } else {
                ph[4..8].copy_from_slice(&(off as u32).to_le_bytes());
                ph[8..12].copy_from_slice(&(paddr as u32).to_le_bytes());
                ph[12..16].copy_from_slice(&(paddr as u32).to_le_bytes());
                ph[16..20].copy_from_slice(&(filesz as u32).to_le_bytes());
                ph[20..24].copy_from_slice(&(memsz as u32).to_le_bytes());
                ph[28..32].copy_from_slice(&4u32.to_le_bytes());
            }
        }
        out.extend(payload);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn seg(paddr: u64, data: &[u8], memsz: u64) -> Seg {
        Seg {
            paddr,
            data: data.to_vec(),
            memsz,
        }
    }

    #[test]
    fn parses_elf64_with_pvh_note() {
        let img = elf(
            true,
            0x10_0000,
            &[seg(0x10_0000, b"hello", 0x2000)],
            Some(&pvh_notes(0x10_0004)),
        );
        let e = parse(&img).unwrap();
        assert!(e.is_64);
        assert_eq!(e.pvh_entry, Some(0x10_0004));
        assert_eq!(e.segments.len(), 1);
        assert_eq!(e.segments[0].end(), 0x10_2000);
    }

    #[test]
    fn parses_elf32_and_loads_with_bss_zeroed() {
        let img = elf(false, 0x20_0000, &[seg(0x20_0000, b"abcd", 0x10)], None);
        let e = parse(&img).unwrap();
        assert!(!e.is_64);
        assert_eq!(e.pvh_entry, None);
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        m.write_slice(&[0xFF; 0x20], GuestAddress(0x20_0000))
            .unwrap();
        load(&m, &e, &img).unwrap();
        let mut buf = [0u8; 0x11];
        m.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&buf[..4], b"abcd");
        assert!(buf[4..0x10].iter().all(|&b| b == 0), "bss zeroed");
        assert_eq!(buf[0x10], 0xFF, "nothing past memsz touched");
    }

    #[test]
    fn rejects_truncated_and_malformed() {
        let img = elf(true, 0x10_0000, &[seg(0x10_0000, &[0x90; 64], 64)], None);
        for cut in [3usize, 10, 40, 64, 100, img.len() - 1] {
            assert!(parse(&img[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = img.clone();
        bad[4] = 7;
        assert!(matches!(parse(&bad), Err(ElfError::BadClass(7))));
        let mut bad = img.clone();
        bad[5] = 2;
        assert!(matches!(parse(&bad), Err(ElfError::BigEndian)));
        let mut bad = img.clone();
        bad[18] = 40; // ARM
        assert!(matches!(parse(&bad), Err(ElfError::WrongMachine(40))));
        let mut bad = img.clone();
        bad[16] = 3; // ET_DYN
        assert!(matches!(parse(&bad), Err(ElfError::NotExecutable(3))));
        let mut bad = img.clone();
        bad[54] = 55;
        assert!(matches!(parse(&bad), Err(ElfError::BadPhentsize { .. })));
        let empty = elf(true, 0, &[], None);
        assert!(matches!(parse(&empty), Err(ElfError::NoLoadableSegments)));
    }

    #[test]
    fn rejects_bad_pvh_note() {
        let mut n = pvh_notes(0x10_0000);
        // make the PVH descriptor size 2
        let len = n.len();
        n[len - 16..len - 12].copy_from_slice(&2u32.to_le_bytes());
        let img = elf(true, 0x10_0000, &[seg(0x10_0000, b"x", 1)], Some(&n));
        assert!(matches!(parse(&img), Err(ElfError::BadPvhNote(_))));
    }
}
