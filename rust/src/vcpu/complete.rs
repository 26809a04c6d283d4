//! Finishing instructions the host's CPL0 emulator refuses (issue 13, item 2).
//!
//! On a PVM host (no VT-x/AMD-V; see `/work/shared/ARCHITECTURE.md`) guest code at
//! CPL0 is executed by KVM's instruction emulator, which refuses a few instructions
//! Linux executes: `KVM_RUN` returns `KVM_EXIT_INTERNAL_ERROR` with suberror
//! `KVM_INTERNAL_ERROR_EMULATION` and the vCPU still at the instruction (KVM has also
//! queued a #UD, which the completion replaces). For a small, tested set the VMM
//! finishes the instruction itself and resumes:
//!
//! | instruction | completion |
//! | --- | --- |
//! | `int3` (`CC`), `int 3` (`CD 03`) | RIP past it, #BP injected (trap, no error code) |
//! | `int1` / `icebp` (`F1`) | RIP past it, #DB injected (trap, no error code) |
//! | `ud2` (`0F 0B`) | #UD injected, RIP stays at the `ud2` (fault) |
//! | `[lock] cmpxchg16b m128` (`REX.W 0F C7 /1`) | a real `lock cmpxchg16b` on the guest page through the VMM's guest mapping; RDX:RAX and ZF as the SDM says; RIP past it |
//! | `clac` / `stac` (`0F 01 CA` / `CB`) | RFLAGS.AC cleared / set; RIP past it |
//! | `fwait` (`9B`) | #NM if CR0.TS and CR0.MP, #MF if the x87 status word has an unmasked exception pending (ES), else RIP past it |
//! | `ldmxcsr m32` (`0F AE /2`) | MXCSR loaded (KVM_GET_XSAVE / KVM_SET_XSAVE); #GP(0) for reserved bits, #NM if CR0.TS, #UD if CR0.EM or not CR4.OSFXSR; RIP past it |
//! | `stmxcsr m32` (`0F AE /3`) | MXCSR stored (KVM_GET_XSAVE); #NM / #UD as `ldmxcsr`, #PF as a supervisor write; RIP past it |
//! | `popcnt r, r/m` 16/32/64-bit (`F3 0F B8 /r`) | the count written (32-bit results zero-extend), ZF = source was 0, CF/OF/SF/AF/PF cleared; RIP past it |
//! | `lsl r, r/m16` 16/32/64-bit (`0F 03 /r`) | the descriptor read from the guest's GDT/LDT through its page tables; type, DPL/CPL/RPL checked as the SDM says; limit (page-granular scaled) written and ZF set, or ZF cleared and the destination kept; RIP past it |
//!
//! Exceptions the instruction itself raises are delivered as the CPU would: a
//! misaligned or non-canonical `cmpxchg16b` operand is #GP(0) (#SS(0) when the
//! operand is SS-relative), an unmapped or read-only page is #PF with CR2 and the
//! error code of a supervisor write. Injection uses `KVM_SET_VCPU_EVENTS`, which then
//! goes through the guest's IDT like any exception (probed on PVM: the handler runs
//! with the architectural frame).
//!
//! Only 64-bit mode at CPL0 is completed; anything else (another instruction, CPL3,
//! another mode, an operand outside RAM, instruction bytes that cannot be read)
//! leaves the exit to the crash report, unchanged. This path is only taken on an
//! emulation-failure exit, which these instructions never cause on hardware-VT
//! hosts (they run natively there), so nothing changes on those hosts.
//!
//! **Coherence.** Page-table walks and the `cmpxchg16b` go through the *guest
//! mapping* of guest RAM (`GuestRam::guest_memory`), which the DSM engine registers
//! with userfaultfd: a VMM access there faults into the coherence protocol exactly
//! like a guest access (`dsm` module docs). The `lock cmpxchg16b` write-faults until
//! this node owns the page exclusively and then completes atomically on the page;
//! 16-byte alignment means it never spans two pages. Accessed/dirty bits are set in
//! the page-table entries with atomic ORs, and only when not yet set, so a walk over
//! entries that already have them does not write (and does not pull page-table
//! pages across nodes for writing).
//!
//! **Which ones.** Probed on this project's PVM host with a real vCPU
//! (`tests/complete_insn.rs`): the emulator refuses `int3`, `int1`, `cmpxchg16b`,
//! `stac`/`clac`, `popcnt`, `fwait`, `ldmxcsr`, `stmxcsr` and `lsl` at CPL0 (KVM's
//! emulator has no LAR/LSL at all), and delivers `ud2`'s #UD itself.
//! The set is what Debian's 6.1 cloud kernel meets on its way through boot (its
//! int3 self-test and text_poke_bp, SLUB's `cmpxchg16b` when CX16 is shown,
//! `hweight` patched to `popcnt`, `clac` at every exception and interrupt entry
//! with SMAP, `fwait` in `fpu__drop`, `ldmxcsr` in `kernel_fpu_begin`, `lsl` of the
//! CPUNODE segment in the FSGSBASE paranoid entry's `GET_PERCPU_BASE`). Each
//! completion costs an exit to the VMM and a few ioctls; `clac` is by far the most frequent (tens of thousands in a
//! boot).
//!
//! Not modelled: a single-step trap (RFLAGS.TF) after a completed instruction, data
//! breakpoints, and protection keys; Linux does not combine them with these
//! instructions at CPL0.

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// Exception vectors used here.
pub const DB_VECTOR: u8 = 1;
pub const BP_VECTOR: u8 = 3;
pub const UD_VECTOR: u8 = 6;
pub const NM_VECTOR: u8 = 7;
pub const MF_VECTOR: u8 = 16;
pub const SS_VECTOR: u8 = 12;
pub const GP_VECTOR: u8 = 13;
pub const PF_VECTOR: u8 = 14;

const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_AC: u64 = 1 << 18;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR4_OSFXSR: u64 = 1 << 9;
/// MXCSR bits that may be set (MXCSR_MASK with DAZ, as on every CPU since the P4).
const MXCSR_WRITABLE: u32 = 0xFFFF;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
/// x87 status word: exception summary (an unmasked exception is pending).
const FSW_ES: u16 = 1 << 7;
const CR4_LA57: u64 = 1 << 12;
const CR4_SMAP: u64 = 1 << 21;
const EFER_LMA: u64 = 1 << 10;

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_ADDR: u64 = 0x000F_FFFF_FFFF_F000;

const PFEC_PRESENT: u32 = 1 << 0;
const PFEC_WRITE: u32 = 1 << 1;

/// A segment register named by a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

/// A decoded memory operand (64-bit mode ModRM/SIB addressing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemOperand {
    /// Segment-override prefix, if any.
    pub seg: Option<Seg>,
    /// Base register (0 = RAX .. 15 = R15).
    pub base: Option<u8>,
    /// Index register and scale (1, 2, 4, 8).
    pub index: Option<(u8, u8)>,
    /// Sign-extended displacement.
    pub disp: i64,
    /// RIP-relative (`disp` is relative to the next instruction).
    pub rip_relative: bool,
    /// Address-size override (0x67): 32-bit effective address.
    pub addr32: bool,
}

/// A register or memory operand (ModRM r/m).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// General-purpose register (0 = RAX .. 15 = R15).
    Reg(u8),
    Mem(MemOperand),
}

/// An instruction this module completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insn {
    /// `int3` (0xCC) or `int 3` (0xCD 0x03).
    Int3,
    /// `int1` / `icebp` (0xF1).
    Int1,
    /// `ud2` (0x0F 0x0B).
    Ud2,
    /// `cmpxchg16b m128` (REX.W 0x0F 0xC7 /1), with or without LOCK.
    Cmpxchg16b { mem: MemOperand, lock: bool },
    /// `fwait` / `wait` (0x9B): an instruction of its own, also when it starts
    /// `fstsw`, `finit`, ... (the CPU runs the 9B, then the no-wait form).
    Fwait,
    /// `ldmxcsr m32` (0x0F 0xAE /2): Linux's `kernel_fpu_begin`.
    Ldmxcsr { mem: MemOperand },
    /// `stmxcsr m32` (0x0F 0xAE /3).
    Stmxcsr { mem: MemOperand },
    /// `clac` (0x0F 0x01 0xCA): clear RFLAGS.AC.
    Clac,
    /// `stac` (0x0F 0x01 0xCB): set RFLAGS.AC.
    Stac,
    /// `popcnt dst, src` (0xF3 0x0F 0xB8 /r), `size` bytes (2, 4 or 8).
    Popcnt { dst: u8, src: Operand, size: u8 },
    /// `lsl dst, src` (0x0F 0x03 /r): the limit of the segment whose selector is
    /// the low 16 bits of `src`, into a `size`-byte (2, 4 or 8) `dst`.
    Lsl { dst: u8, src: Operand, size: u8 },
}

/// An instruction and its length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    pub insn: Insn,
    pub len: usize,
}

/// Why an instruction could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// More bytes are needed than were given.
    #[error("instruction bytes end before the instruction does")]
    Truncated,
    /// Not an instruction this module completes.
    #[error("not an instruction dvmm completes")]
    Unsupported,
}

/// Decodes the 64-bit-mode instruction at the start of `bytes`, if it is one this
/// module completes.
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let mut i = 0;
    let mut seg = None;
    let mut lock = false;
    let mut addr32 = false;
    let mut rep = None;
    let mut opsize = false;
    let at = |i: usize| bytes.get(i).copied().ok_or(DecodeError::Truncated);
    // Legacy prefixes (any order, at most 14 before the opcode).
    loop {
        let b = at(i)?;
        match b {
            0xF0 => lock = true,
            0x26 => seg = Some(Seg::Es),
            0x2E => seg = Some(Seg::Cs),
            0x36 => seg = Some(Seg::Ss),
            0x3E => seg = Some(Seg::Ds),
            0x64 => seg = Some(Seg::Fs),
            0x65 => seg = Some(Seg::Gs),
            0x67 => addr32 = true,
            0x66 => opsize = true,
            0xF2 | 0xF3 => rep = Some(b),
            _ => break,
        }
        i += 1;
        if i >= MAX_INSN_LEN {
            return Err(DecodeError::Unsupported);
        }
    }
    // REX (must come right before the opcode).
    let mut rex = 0u8;
    if at(i)? & 0xF0 == 0x40 {
        rex = at(i)?;
        i += 1;
    }
    let rep_or_opsize = rep.is_some() || opsize;
    let plain = !lock && !rep_or_opsize && rex & 0x08 == 0;
    let insn = match at(i)? {
        0xCC if plain => {
            i += 1;
            Insn::Int3
        }
        0xCD if plain => {
            if at(i + 1)? != 3 {
                return Err(DecodeError::Unsupported);
            }
            i += 2;
            Insn::Int3
        }
        0xF1 if plain => {
            i += 1;
            Insn::Int1
        }
        0x9B if plain => {
            i += 1;
            Insn::Fwait
        }
        0x0F => match at(i + 1)? {
            0x0B if plain => {
                i += 2;
                Insn::Ud2
            }
            0xAE if !lock && !rep_or_opsize => {
                let modrm = at(i + 2)?;
                let reg = (modrm >> 3) & 7;
                if !(reg == 2 || reg == 3) || modrm >> 6 == 3 {
                    return Err(DecodeError::Unsupported);
                }
                i += 3;
                let (mut mem, n) = decode_modrm_mem(&bytes[i..], modrm, rex)?;
                i += n;
                mem.seg = seg;
                mem.addr32 = addr32;
                if reg == 2 {
                    Insn::Ldmxcsr { mem }
                } else {
                    Insn::Stmxcsr { mem }
                }
            }
            0x01 if plain => {
                let insn = match at(i + 2)? {
                    0xCA => Insn::Clac,
                    0xCB => Insn::Stac,
                    _ => return Err(DecodeError::Unsupported),
                };
                i += 3;
                insn
            }
            0xC7 if rex & 0x08 != 0 && !rep_or_opsize => {
                i += 2;
                let modrm = at(i)?;
                i += 1;
                if (modrm >> 3) & 7 != 1 || modrm >> 6 == 3 {
                    return Err(DecodeError::Unsupported);
                }
                let (mut mem, n) = decode_modrm_mem(&bytes[i..], modrm, rex)?;
                i += n;
                mem.seg = seg;
                mem.addr32 = addr32;
                Insn::Cmpxchg16b { mem, lock }
            }
            0x03 if !lock && rep.is_none() => {
                let (dst, src, size, n) = decode_reg_rm(
                    bytes.get(i + 2..).ok_or(DecodeError::Truncated)?,
                    rex,
                    seg,
                    addr32,
                    opsize,
                )?;
                i += 2 + n;
                Insn::Lsl { dst, src, size }
            }
            // The last of F2/F3 decides (SDM 2.1.1); F3 0F B8 is popcnt.
            0xB8 if rep == Some(0xF3) && !lock => {
                let (dst, src, size, n) = decode_reg_rm(
                    bytes.get(i + 2..).ok_or(DecodeError::Truncated)?,
                    rex,
                    seg,
                    addr32,
                    opsize,
                )?;
                i += 2 + n;
                Insn::Popcnt { dst, src, size }
            }
            _ => return Err(DecodeError::Unsupported),
        },
        _ => return Err(DecodeError::Unsupported),
    };
    if i > MAX_INSN_LEN {
        return Err(DecodeError::Unsupported);
    }
    Ok(Decoded { insn, len: i })
}

/// Decodes the operands of a `reg, r/m` instruction (`lsl`, `popcnt`) from its
/// ModRM byte on (`rest`): destination register, source (register or memory with
/// the prefixes' segment and address size), operand size (REX.W 8, 66h 2, else 4)
/// and the bytes consumed.
fn decode_reg_rm(
    rest: &[u8],
    rex: u8,
    seg: Option<Seg>,
    addr32: bool,
    opsize: bool,
) -> Result<(u8, Operand, u8, usize), DecodeError> {
    let modrm = rest.first().copied().ok_or(DecodeError::Truncated)?;
    let mut n = 1;
    let dst = ((modrm >> 3) & 7) | ((rex & 4) << 1);
    let src = if modrm >> 6 == 3 {
        Operand::Reg((modrm & 7) | ((rex & 1) << 3))
    } else {
        let (mut mem, used) = decode_modrm_mem(&rest[1..], modrm, rex)?;
        n += used;
        mem.seg = seg;
        mem.addr32 = addr32;
        Operand::Mem(mem)
    };
    let size = if rex & 8 != 0 {
        8
    } else if opsize {
        2
    } else {
        4
    };
    Ok((dst, src, size, n))
}

/// Decodes the memory form of a ModRM byte (mod != 3) and what follows it (SIB,
/// displacement) in 64-bit mode. Returns the operand and the bytes consumed after
/// the ModRM byte.
fn decode_modrm_mem(rest: &[u8], modrm: u8, rex: u8) -> Result<(MemOperand, usize), DecodeError> {
    let at = |i: usize| rest.get(i).copied().ok_or(DecodeError::Truncated);
    let md = modrm >> 6;
    let rm = modrm & 7;
    let rex_b = (rex & 1) << 3;
    let rex_x = ((rex >> 1) & 1) << 3;
    let mut n = 0;
    let mut m = MemOperand::default();
    let mut disp_len = match md {
        0 => 0,
        1 => 1,
        _ => 4,
    };
    if rm == 4 {
        let sib = at(0)?;
        n += 1;
        let scale = 1u8 << (sib >> 6);
        let index = ((sib >> 3) & 7) | rex_x;
        let base = sib & 7;
        if index != 4 {
            m.index = Some((index, scale));
        }
        if base == 5 && md == 0 {
            disp_len = 4; // no base, disp32
        } else {
            m.base = Some(base | rex_b);
        }
    } else if rm == 5 && md == 0 {
        m.rip_relative = true;
        disp_len = 4;
    } else {
        m.base = Some(rm | rex_b);
    }
    m.disp = match disp_len {
        0 => 0,
        1 => i64::from(at(n)? as i8),
        _ => {
            let d = [at(n)?, at(n + 1)?, at(n + 2)?, at(n + 3)?];
            i64::from(i32::from_le_bytes(d))
        }
    };
    n += disp_len;
    Ok((m, n))
}

/// General-purpose register `r` (0 = RAX .. 15 = R15).
pub fn gpr(regs: &kvm_regs, r: u8) -> u64 {
    match r & 15 {
        0 => regs.rax,
        1 => regs.rcx,
        2 => regs.rdx,
        3 => regs.rbx,
        4 => regs.rsp,
        5 => regs.rbp,
        6 => regs.rsi,
        7 => regs.rdi,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        _ => regs.r15,
    }
}

/// Writes `v` to register `r` as an instruction with a `size`-byte destination
/// does: 8 bytes replace it, 4 bytes zero-extend, 2 bytes keep the upper 48 bits.
pub fn set_gpr(regs: &mut kvm_regs, r: u8, size: u8, v: u64) {
    let slot = match r & 15 {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    };
    *slot = match size {
        8 => v,
        4 => v & 0xFFFF_FFFF,
        _ => (*slot & !0xFFFF) | (v & 0xFFFF),
    };
}

/// The linear address of `m` for the instruction at `regs.rip` of length `len`, and
/// whether it is stack-segment relative (a fault on it is #SS, not #GP).
pub fn linear_address(
    m: &MemOperand,
    len: usize,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> (u64, bool) {
    let mut ea = m.disp as u64;
    if m.rip_relative {
        ea = ea.wrapping_add(regs.rip.wrapping_add(len as u64));
    }
    if let Some(b) = m.base {
        ea = ea.wrapping_add(gpr(regs, b));
    }
    if let Some((x, s)) = m.index {
        ea = ea.wrapping_add(gpr(regs, x).wrapping_mul(u64::from(s)));
    }
    if m.addr32 {
        ea &= 0xFFFF_FFFF;
    }
    let default_ss = matches!(m.base, Some(4) | Some(5));
    let seg = m.seg.unwrap_or(if default_ss { Seg::Ss } else { Seg::Ds });
    // 64-bit mode: only FS and GS have a base.
    let base = match seg {
        Seg::Fs => sregs.fs.base,
        Seg::Gs => sregs.gs.base,
        _ => 0,
    };
    (ea.wrapping_add(base), seg == Seg::Ss)
}

/// True if `la` is canonical for the paging mode (48 or 57 bits).
pub fn is_canonical(la: u64, la57: bool) -> bool {
    let bits = if la57 { 57 } else { 48 };
    let shift = 64 - bits;
    (((la << shift) as i64) >> shift) as u64 == la
}

/// What the completion does to the guest, besides the registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The instruction completed (registers updated): resume.
    Done,
    /// Deliver this exception; `regs.rip` is the address the frame returns to.
    Exception {
        vector: u8,
        error_code: Option<u32>,
        /// New CR2 (page faults).
        cr2: Option<u64>,
    },
}

impl Outcome {
    fn exception(vector: u8, error_code: Option<u32>) -> Self {
        Outcome::Exception {
            vector,
            error_code,
            cr2: None,
        }
    }
}

/// Why an instruction was not completed (the VM stops with the usual report).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompleteError {
    #[error("not at CPL0 (CPL {0})")]
    NotCpl0(u16),
    #[error("not in 64-bit mode")]
    Not64Bit,
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("cannot read the instruction at {0:#x}")]
    Fetch(u64),
    #[error("guest-physical address {0:#x} is not RAM")]
    NotRam(u64),
    #[error("the host CPU has no cmpxchg16b")]
    NoHostCx16,
    #[error("the vCPU's FPU state cannot be read or written")]
    NoX87State,
    #[error("fwait with an x87 exception pending and CR0.NE clear (FERR#) is not modelled")]
    LegacyFpuError,
}

/// A failed translation: the #PF error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageFault(u32);

/// Reads (or atomically ORs bits into) the 8-byte page-table entry at `gpa`.
fn pte_at<M: GuestMemoryBackend>(
    mem: &M,
    gpa: u64,
) -> Result<&std::sync::atomic::AtomicU64, CompleteError> {
    let p = mem
        .get_host_address(GuestAddress(gpa & !7))
        .map_err(|_| CompleteError::NotRam(gpa))?;
    // SAFETY: `p` points into a live guest RAM mapping (regions are page-granular,
    // so the 8-aligned entry lies inside it), valid for as long as `mem`. The guest
    // and other threads access it concurrently, hence the atomic type.
    Ok(unsafe { &*(p as *const std::sync::atomic::AtomicU64) })
}

/// Translates linear address `la` through the guest's page tables (4- or 5-level,
/// 4 KiB / 2 MiB / 1 GiB pages) for a supervisor access, setting accessed (and, for
/// a write, dirty) bits as the CPU does.
fn translate<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &kvm_sregs,
    rflags: u64,
    la: u64,
    write: bool,
) -> Result<Result<u64, PageFault>, CompleteError> {
    use std::sync::atomic::Ordering;
    let levels = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let wp = sregs.cr0 & CR0_WP != 0;
    let write_code = if write { PFEC_WRITE } else { 0 };
    let mut table = sregs.cr3 & PTE_ADDR;
    let mut walked: [Option<&std::sync::atomic::AtomicU64>; 5] = [None; 5];
    let mut user = true;
    let mut writable = true;
    let mut gpa = None;
    for (k, level) in (1..=levels).rev().enumerate() {
        let shift = 12 + 9 * (level - 1);
        let entry = pte_at(mem, table + ((la >> shift) & 511) * 8)?;
        let pte = entry.load(Ordering::SeqCst);
        if pte & PTE_P == 0 {
            return Ok(Err(PageFault(write_code)));
        }
        walked[k] = Some(entry);
        user &= pte & PTE_US != 0;
        writable &= pte & PTE_RW != 0;
        if level == 1 || (level <= 3 && pte & PTE_PS != 0) {
            let size = 1u64 << shift;
            gpa = Some((pte & PTE_ADDR & !(size - 1)) | (la & (size - 1)));
            break;
        }
        table = pte & PTE_ADDR;
    }
    let Some(gpa) = gpa else {
        return Ok(Err(PageFault(write_code)));
    };
    let smap_violation = user && sregs.cr4 & CR4_SMAP != 0 && rflags & RFLAGS_AC == 0;
    if (write && wp && !writable) || smap_violation {
        return Ok(Err(PageFault(PFEC_PRESENT | write_code)));
    }
    let leaf = walked.iter().rposition(Option::is_some);
    for (k, e) in walked.iter().enumerate() {
        let Some(e) = e else { continue };
        let bits = if write && Some(k) == leaf {
            PTE_A | PTE_D
        } else {
            PTE_A
        };
        if e.load(Ordering::SeqCst) & bits != bits {
            e.fetch_or(bits, Ordering::SeqCst);
        }
    }
    Ok(Ok(gpa))
}

/// Reads `out.len()` bytes at linear address `la` (supervisor data read), page by
/// page. A page fault gives the #PF outcome.
fn read_linear<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &kvm_sregs,
    rflags: u64,
    la: u64,
    out: &mut [u8],
) -> Result<Option<Outcome>, CompleteError> {
    let mut n = 0;
    while n < out.len() {
        let a = la.wrapping_add(n as u64);
        let gpa = match translate(mem, sregs, rflags, a, false)? {
            Ok(g) => g,
            Err(PageFault(code)) => {
                return Ok(Some(Outcome::Exception {
                    vector: PF_VECTOR,
                    error_code: Some(code),
                    cr2: Some(a),
                }))
            }
        };
        let chunk = ((0x1000 - (a & 0xFFF)) as usize).min(out.len() - n);
        mem.read_slice(&mut out[n..n + chunk], GuestAddress(gpa))
            .map_err(|_| CompleteError::NotRam(gpa))?;
        n += chunk;
    }
    Ok(None)
}

/// Writes `data` at linear address `la` (supervisor data write): every page is
/// translated (and checked) before anything is written, as the CPU does. A page
/// fault gives the #PF outcome.
fn write_linear<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &kvm_sregs,
    rflags: u64,
    la: u64,
    data: &[u8],
) -> Result<Option<Outcome>, CompleteError> {
    let mut pieces = [(0u64, 0usize, 0usize); 2];
    let mut k = 0;
    let mut n = 0;
    while n < data.len() {
        let a = la.wrapping_add(n as u64);
        let gpa = match translate(mem, sregs, rflags, a, true)? {
            Ok(g) => g,
            Err(PageFault(code)) => {
                return Ok(Some(Outcome::Exception {
                    vector: PF_VECTOR,
                    error_code: Some(code),
                    cr2: Some(a),
                }))
            }
        };
        let chunk = ((0x1000 - (a & 0xFFF)) as usize).min(data.len() - n);
        pieces[k] = (gpa, n, chunk);
        k += 1;
        n += chunk;
    }
    for &(gpa, off, len) in &pieces[..k] {
        mem.write_slice(&data[off..off + len], GuestAddress(gpa))
            .map_err(|_| CompleteError::NotRam(gpa))?;
    }
    Ok(None)
}

/// Reads up to [`MAX_INSN_LEN`] bytes of the instruction at CS:RIP (64-bit mode),
/// stopping early at an unmapped page. Returns the bytes read.
pub fn fetch_insn<M: GuestMemoryBackend>(
    mem: &M,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    out: &mut [u8; MAX_INSN_LEN],
) -> Result<usize, CompleteError> {
    let mut n = 0;
    while n < MAX_INSN_LEN {
        let la = regs.rip.wrapping_add(n as u64);
        let gpa = match translate(mem, sregs, regs.rflags, la, false)? {
            Ok(g) => g,
            Err(_) => break,
        };
        let chunk = ((0x1000 - (la & 0xFFF)) as usize).min(MAX_INSN_LEN - n);
        if mem
            .read_slice(&mut out[n..n + chunk], GuestAddress(gpa))
            .is_err()
        {
            break;
        }
        n += chunk;
    }
    if n == 0 {
        return Err(CompleteError::Fetch(regs.rip));
    }
    Ok(n)
}

/// Checks that the vCPU is where completion applies: 64-bit mode, CPL0.
pub fn check_mode(sregs: &kvm_sregs) -> Result<(), CompleteError> {
    if sregs.efer & EFER_LMA == 0 || sregs.cs.l == 0 {
        return Err(CompleteError::Not64Bit);
    }
    let cpl = sregs.cs.selector & 3;
    if cpl != 0 {
        return Err(CompleteError::NotCpl0(cpl));
    }
    Ok(())
}

/// The vCPU's x87/SSE status and control, for the instructions that need them
/// (`fwait`, `ldmxcsr`, `stmxcsr`). None / false: cannot be read / written.
pub trait FpuState {
    /// The x87 status word.
    fn fsw(&mut self) -> Option<u16>;
    /// MXCSR.
    fn mxcsr(&mut self) -> Option<u32>;
    /// Load MXCSR (the caller has checked the reserved bits).
    fn set_mxcsr(&mut self, v: u32) -> bool;
}

/// No FPU state: the instructions that need it are not completed.
pub struct NoFpu;

impl FpuState for NoFpu {
    fn fsw(&mut self) -> Option<u16> {
        None
    }
    fn mxcsr(&mut self) -> Option<u32> {
        None
    }
    fn set_mxcsr(&mut self, _: u32) -> bool {
        false
    }
}

/// Executes `d` (decoded at `regs.rip`) on the vCPU state and guest memory `mem`:
/// updates `regs` (RIP, and what the instruction writes) and says what to inject.
/// The FPU state is not known here: `fwait` and `ldmxcsr` are refused (see
/// [`execute_with`]).
pub fn execute<M: GuestMemoryBackend>(
    d: &Decoded,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &M,
) -> Result<Outcome, CompleteError> {
    execute_with(d, regs, sregs, mem, &mut NoFpu)
}

/// [`execute`], with the vCPU's FPU state for the instructions that need it.
pub fn execute_with<M: GuestMemoryBackend>(
    d: &Decoded,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &M,
    fpu: &mut dyn FpuState,
) -> Result<Outcome, CompleteError> {
    let next = regs.rip.wrapping_add(d.len as u64);
    Ok(match d.insn {
        Insn::Int3 => {
            regs.rip = next;
            Outcome::exception(BP_VECTOR, None)
        }
        Insn::Int1 => {
            regs.rip = next;
            Outcome::exception(DB_VECTOR, None)
        }
        Insn::Ud2 => Outcome::exception(UD_VECTOR, None),
        Insn::Fwait => {
            if sregs.cr0 & (CR0_TS | CR0_MP) == CR0_TS | CR0_MP {
                return Ok(Outcome::exception(NM_VECTOR, None));
            }
            let fsw = fpu.fsw().ok_or(CompleteError::NoX87State)?;
            if fsw & FSW_ES != 0 {
                if sregs.cr0 & CR0_NE == 0 {
                    return Err(CompleteError::LegacyFpuError);
                }
                return Ok(Outcome::exception(MF_VECTOR, None));
            }
            regs.rip = next;
            regs.rflags &= !RFLAGS_RF;
            Outcome::Done
        }
        Insn::Stmxcsr { mem: m } => {
            if sregs.cr0 & CR0_EM != 0 || sregs.cr4 & CR4_OSFXSR == 0 {
                return Ok(Outcome::exception(UD_VECTOR, None));
            }
            if sregs.cr0 & CR0_TS != 0 {
                return Ok(Outcome::exception(NM_VECTOR, None));
            }
            let (la, stack) = linear_address(&m, d.len, regs, sregs);
            if !is_canonical(la, sregs.cr4 & CR4_LA57 != 0) {
                let v = if stack { SS_VECTOR } else { GP_VECTOR };
                return Ok(Outcome::exception(v, Some(0)));
            }
            let v = fpu.mxcsr().ok_or(CompleteError::NoX87State)?;
            if let Some(fault) = write_linear(mem, sregs, regs.rflags, la, &v.to_le_bytes())? {
                return Ok(fault);
            }
            regs.rip = next;
            regs.rflags &= !RFLAGS_RF;
            Outcome::Done
        }
        Insn::Ldmxcsr { mem: m } => {
            if sregs.cr0 & CR0_EM != 0 || sregs.cr4 & CR4_OSFXSR == 0 {
                return Ok(Outcome::exception(UD_VECTOR, None));
            }
            if sregs.cr0 & CR0_TS != 0 {
                return Ok(Outcome::exception(NM_VECTOR, None));
            }
            let (la, stack) = linear_address(&m, d.len, regs, sregs);
            if !is_canonical(la, sregs.cr4 & CR4_LA57 != 0) {
                let v = if stack { SS_VECTOR } else { GP_VECTOR };
                return Ok(Outcome::exception(v, Some(0)));
            }
            let mut buf = [0u8; 4];
            if let Some(fault) = read_linear(mem, sregs, regs.rflags, la, &mut buf)? {
                return Ok(fault);
            }
            let v = u32::from_le_bytes(buf);
            if v & !MXCSR_WRITABLE != 0 {
                return Ok(Outcome::exception(GP_VECTOR, Some(0)));
            }
            if !fpu.set_mxcsr(v) {
                return Err(CompleteError::NoX87State);
            }
            regs.rip = next;
            regs.rflags &= !RFLAGS_RF;
            Outcome::Done
        }
        Insn::Clac | Insn::Stac => {
            if d.insn == Insn::Stac {
                regs.rflags |= RFLAGS_AC;
            } else {
                regs.rflags &= !RFLAGS_AC;
            }
            regs.rip = next;
            regs.rflags &= !RFLAGS_RF;
            Outcome::Done
        }
        Insn::Cmpxchg16b { mem: m, .. } => {
            let (la, stack) = linear_address(&m, d.len, regs, sregs);
            let seg_fault = if stack { SS_VECTOR } else { GP_VECTOR };
            if !is_canonical(la, sregs.cr4 & CR4_LA57 != 0) {
                return Ok(Outcome::exception(seg_fault, Some(0)));
            }
            if la & 15 != 0 {
                return Ok(Outcome::exception(GP_VECTOR, Some(0)));
            }
            let gpa = match translate(mem, sregs, regs.rflags, la, true)? {
                Ok(g) => g,
                Err(PageFault(code)) => {
                    return Ok(Outcome::Exception {
                        vector: PF_VECTOR,
                        error_code: Some(code),
                        cr2: Some(la),
                    })
                }
            };
            let p = mem
                .get_host_address(GuestAddress(gpa))
                .map_err(|_| CompleteError::NotRam(gpa))?;
            let expected = u128::from(regs.rax) | (u128::from(regs.rdx) << 64);
            let new = u128::from(regs.rbx) | (u128::from(regs.rcx) << 64);
            let old = cmpxchg16b_host(p.cast(), expected, new)?;
            if old == expected {
                regs.rflags |= RFLAGS_ZF;
            } else {
                regs.rflags &= !RFLAGS_ZF;
                regs.rax = old as u64;
                regs.rdx = (old >> 64) as u64;
            }
            regs.rip = next;
            regs.rflags &= !RFLAGS_RF;
            Outcome::Done
        }
        Insn::Popcnt { dst, src, size } => {
            let v = match src {
                Operand::Reg(r) => gpr(regs, r),
                Operand::Mem(m) => {
                    let (la, stack) = linear_address(&m, d.len, regs, sregs);
                    if !is_canonical(la, sregs.cr4 & CR4_LA57 != 0) {
                        let v = if stack { SS_VECTOR } else { GP_VECTOR };
                        return Ok(Outcome::exception(v, Some(0)));
                    }
                    let mut buf = [0u8; 8];
                    if let Some(fault) =
                        read_linear(mem, sregs, regs.rflags, la, &mut buf[..usize::from(size)])?
                    {
                        return Ok(fault);
                    }
                    u64::from_le_bytes(buf)
                }
            };
            let v = if size == 8 {
                v
            } else {
                v & ((1u64 << (8 * size)) - 1)
            };
            set_gpr(regs, dst, size, u64::from(v.count_ones()));
            regs.rflags &= !(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF);
            if v == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
            regs.rip = next;
            regs.rflags &= !RFLAGS_RF;
            Outcome::Done
        }
        Insn::Lsl { dst, src, size } => {
            let selector = match src {
                Operand::Reg(r) => gpr(regs, r) as u16,
                Operand::Mem(m) => {
                    let (la, stack) = linear_address(&m, d.len, regs, sregs);
                    if !is_canonical(la, sregs.cr4 & CR4_LA57 != 0) {
                        let v = if stack { SS_VECTOR } else { GP_VECTOR };
                        return Ok(Outcome::exception(v, Some(0)));
                    }
                    let mut buf = [0u8; 2];
                    if let Some(fault) = read_linear(mem, sregs, regs.rflags, la, &mut buf)? {
                        return Ok(fault);
                    }
                    u16::from_le_bytes(buf)
                }
            };
            match segment_limit(mem, sregs, selector)? {
                Err(fault) => return Ok(fault),
                Ok(Some(limit)) => {
                    set_gpr(regs, dst, size, u64::from(limit));
                    regs.rflags |= RFLAGS_ZF;
                }
                // The destination is left as it was (SDM: "no value is loaded").
                Ok(None) => regs.rflags &= !RFLAGS_ZF,
            }
            regs.rip = next;
            regs.rflags &= !RFLAGS_RF;
            Outcome::Done
        }
    })
}

/// What `lsl` finds for `selector` at the vCPU's CPL (SDM Vol. 2A, "LSL", IA-32e
/// mode): `Some(limit)` in bytes (a page-granular limit is scaled: `limit << 12 |
/// 0xFFF`); `None` (ZF cleared) for a null selector, an offset beyond the GDT's or
/// LDT's limit (or no LDT), a system type LSL does not accept in IA-32e mode (only
/// 0 — the upper half of a 16-byte descriptor —, LDT, 64-bit TSS available/busy
/// are), or a non-conforming segment whose DPL is below the CPL or the selector's
/// RPL. The present bit is not checked (the CPU does not either). The descriptor
/// is read as the CPU does, an implicit supervisor access (SMAP applies whatever
/// RFLAGS.AC): a fault there is the #PF outcome.
fn segment_limit<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &kvm_sregs,
    selector: u16,
) -> Result<Result<Option<u32>, Outcome>, CompleteError> {
    let in_ldt = selector & 4 != 0;
    if !in_ldt && selector & !3 == 0 {
        return Ok(Ok(None));
    }
    let (base, limit) = if in_ldt {
        if sregs.ldt.unusable != 0 {
            return Ok(Ok(None));
        }
        (sregs.ldt.base, sregs.ldt.limit)
    } else {
        (sregs.gdt.base, u32::from(sregs.gdt.limit))
    };
    let offset = u64::from(selector & !7);
    if offset + 7 > u64::from(limit) {
        return Ok(Ok(None));
    }
    let mut raw = [0u8; 8];
    let la = base.wrapping_add(offset);
    if let Some(fault) = read_linear(mem, sregs, 0, la, &mut raw)? {
        return Ok(Err(fault));
    }
    let desc = u64::from_le_bytes(raw);
    let typ = (desc >> 40) & 0xF;
    let code_or_data = desc & (1 << 44) != 0;
    let dpl = ((desc >> 45) & 3) as u16;
    let granular = desc & (1 << 55) != 0;
    if !code_or_data && !matches!(typ, 0 | 2 | 9 | 0xB) {
        return Ok(Ok(None));
    }
    // Conforming code (S=1, type bit 3 "code" and bit 2 "conforming") skips the
    // privilege check.
    let conforming = code_or_data && typ & 0b1100 == 0b1100;
    let cpl = sregs.cs.selector & 3;
    if !conforming && (cpl > dpl || selector & 3 > dpl) {
        return Ok(Ok(None));
    }
    let raw_limit = ((desc & 0xFFFF) | ((desc >> 32) & 0xF_0000)) as u32;
    Ok(Ok(Some(if granular {
        (raw_limit << 12) | 0xFFF
    } else {
        raw_limit
    })))
}

/// `lock cmpxchg16b` on host memory: returns the old value (equal to `expected`
/// iff the exchange happened). Inline assembly, not `core::arch`'s intrinsic: built
/// without the `cmpxchg16b` target feature the intrinsic becomes a call to
/// libatomic's `__atomic_compare_exchange_16`, which the extension cannot link.
pub fn cmpxchg16b_host(dst: *mut u128, expected: u128, new: u128) -> Result<u128, CompleteError> {
    if !std::arch::is_x86_feature_detected!("cmpxchg16b") {
        return Err(CompleteError::NoHostCx16);
    }
    let (lo, hi): (u64, u64);
    // SAFETY: the CPU has cmpxchg16b (checked above); `dst` is 16-byte aligned (the
    // guest linear address is, and pages are 4 KiB-aligned) and points into a live
    // guest RAM mapping that stays mapped while `mem` is borrowed. RBX cannot be an
    // operand (LLVM reserves it): it is swapped in and restored around the
    // instruction.
    unsafe {
        std::arch::asm!(
            "xchg {tmp}, rbx",
            "lock cmpxchg16b xmmword ptr [{dst}]",
            "mov rbx, {tmp}",
            dst = in(reg) dst,
            tmp = inout(reg) new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") expected as u64 => lo,
            inout("rdx") (expected >> 64) as u64 => hi,
            options(nostack),
        );
    }
    Ok(u128::from(lo) | (u128::from(hi) << 64))
}

/// Decodes and executes the instruction at RIP: `kvm_bytes` are the bytes KVM
/// reported with the exit (possibly fewer than the instruction); when they are not
/// enough the instruction is read from guest memory at CS:RIP.
pub fn complete<M: GuestMemoryBackend>(
    kvm_bytes: &[u8],
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &M,
) -> Result<(Decoded, Outcome), CompleteError> {
    complete_with(kvm_bytes, regs, sregs, mem, &mut NoFpu)
}

/// [`complete`] with the vCPU's FPU state (see [`execute_with`]).
pub fn complete_with<M: GuestMemoryBackend>(
    kvm_bytes: &[u8],
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &M,
    fpu: &mut dyn FpuState,
) -> Result<(Decoded, Outcome), CompleteError> {
    check_mode(sregs)?;
    let d = match decode(kvm_bytes) {
        Ok(d) => d,
        Err(DecodeError::Truncated) => {
            let mut buf = [0u8; MAX_INSN_LEN];
            let n = fetch_insn(mem, regs, sregs, &mut buf)?;
            decode(&buf[..n])?
        }
        Err(e) => return Err(e.into()),
    };
    let outcome = execute_with(&d, regs, sregs, mem, fpu)?;
    Ok((d, outcome))
}
