//! IA32_APIC_BASE on a real vCPU (KVM): CPUID.1:EDX[9] ("APIC on chip") follows the
//! global enable bit (SDM 11.4.3: with EN clear the processor behaves as one without
//! an APIC, and CPUID says so), and the xAPIC page moves with the base.
//!
//! dvmm's LAPIC is in userspace, so KVM answers CPUID from its own copy of the MSR;
//! the vCPU loop mirrors every guest write of IA32_APIC_BASE into KVM (KVM_SET_MSRS),
//! which makes KVM's CPUID bit follow. The guest is a tiny Multiboot kernel (32-bit
//! protected mode, paging off) that prints one character per check on COM1.
//!
//! Needs /dev/kvm: skipped with the reason elsewhere, a failure when the environment
//! says it is CI.

mod common;

use common::*;
use serde_json::json;

/// `rdmsr IA32_APIC_BASE` into esi (low) / edi (high).
fn save_apic_base() -> Vec<u8> {
    vec![
        0xB9, 0x1B, 0, 0, 0, // mov ecx, 0x1b
        0x0F, 0x32, // rdmsr
        0x89, 0xC6, // mov esi, eax
        0x89, 0xD7, // mov edi, edx
    ]
}

/// `wrmsr IA32_APIC_BASE, (saved & and) | or`.
fn write_apic_base(and: u32, or: u32) -> Vec<u8> {
    let mut v = vec![0x89, 0xF0]; // mov eax, esi
    v.push(0x25); // and eax, imm32
    v.extend(and.to_le_bytes());
    v.push(0x0D); // or eax, imm32
    v.extend(or.to_le_bytes());
    v.extend([0x89, 0xFA]); // mov edx, edi
    v.extend([0xB9, 0x1B, 0, 0, 0]); // mov ecx, 0x1b
    v.extend([0x0F, 0x30]); // wrmsr
    v
}

/// Print '0' + CPUID.1:EDX[9].
fn print_cpuid_apic_bit() -> Vec<u8> {
    vec![
        0xB8, 1, 0, 0, 0, // mov eax, 1
        0x31, 0xC9, // xor ecx, ecx
        0x0F, 0xA2, // cpuid
        0x89, 0xD0, // mov eax, edx
        0xC1, 0xE8, 0x09, // shr eax, 9
        0x83, 0xE0, 0x01, // and eax, 1
        0x04, 0x30, // add al, '0'
        0x66, 0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xEE, // out dx, al
    ]
}

/// Print '1' if the 32-bit word at physical `addr` equals `want`, else '0'.
fn print_load_equals(addr: u32, want: u32) -> Vec<u8> {
    let mut v = vec![0xA1]; // mov eax, [addr]
    v.extend(addr.to_le_bytes());
    v.push(0x3D); // cmp eax, imm32
    v.extend(want.to_le_bytes());
    v.extend([0x0F, 0x94, 0xC0]); // sete al
    v.extend([0x04, 0x30]); // add al, '0'
    v.extend([0x66, 0xBA, 0xF8, 0x03, 0xEE]); // mov dx, 0x3f8; out dx, al
    v
}

const EN: u32 = 1 << 11;
const EXTD: u32 = 1 << 10;
const KEEP: u32 = !(EN | EXTD);
const VERSION: u32 = dvmm::apic::APIC_VERSION;
const MOVED: u32 = 0xFED4_0000;

#[test]
fn cpuid_apic_bit_follows_apic_base_enable_and_the_page_moves() {
    let test = "cpuid_apic_bit_follows_apic_base_enable";
    if !kvm_available(test) {
        return;
    }
    // (code, what it prints, what that means)
    let steps: Vec<(Vec<u8>, &str, &str)> = vec![
        (print_cpuid_apic_bit(), "1", "reset: xAPIC enabled"),
        (write_apic_base(KEEP, 0), "", "EN=0"),
        (print_cpuid_apic_bit(), "0", "globally disabled"),
        (
            print_load_equals(0xFEE0_0030, u32::MAX),
            "1",
            "disabled: page reads ones",
        ),
        (write_apic_base(KEEP, EN), "", "EN=1"),
        (print_cpuid_apic_bit(), "1", "xAPIC re-enabled"),
        (write_apic_base(KEEP, EN | EXTD), "", "x2APIC"),
        (print_cpuid_apic_bit(), "1", "x2APIC mode"),
        (write_apic_base(KEEP, 0), "", "EN=0 from x2APIC"),
        (print_cpuid_apic_bit(), "0", "disabled from x2APIC"),
        (
            write_apic_base(0xFFF & KEEP, MOVED | EN),
            "",
            "xAPIC at 0xFED40000",
        ),
        (print_cpuid_apic_bit(), "1", "relocated, enabled"),
        (
            print_load_equals(MOVED + 0x30, VERSION),
            "1",
            "version at the new base",
        ),
        (
            print_load_equals(0xFEE0_0030, u32::MAX),
            "1",
            "nothing at the old base",
        ),
        (write_apic_base(KEEP, EN), "", "back at 0xFEE00000"),
        (
            print_load_equals(0xFEE0_0030, VERSION),
            "1",
            "version at the old base",
        ),
        (print_cpuid_apic_bit(), "1", "enabled at the end"),
    ];
    let mut code = vec![0xBC, 0, 0, 8, 0]; // mov esp, 0x80000
    code.extend(save_apic_base());
    let mut want = String::new();
    for (c, out, _) in &steps {
        code.extend(c);
        want.push_str(out);
    }
    code.extend(asm::exit(0));

    let dir = scratch("cpuid-apic-bit");
    let (k, log) = write_kernel(&dir, "apicbit.bin", &multiboot_kernel(&code));
    let r = run(json!({
        "vcpus": 1, "memory": 16 << 20, "kernel": k, "console_log": log,
        "console_stdout": false, "timeout_s": 60,
    }));
    assert_eq!(r["reason"], "debug_exit", "{r}");
    assert_eq!(r["status"], 0, "{r}");
    let got = std::fs::read_to_string(&log).unwrap();
    let meaning: Vec<&str> = steps
        .iter()
        .filter(|s| !s.1.is_empty())
        .map(|s| s.2)
        .collect();
    for (i, (g, w)) in got.chars().zip(want.chars()).enumerate() {
        assert_eq!(
            g, w,
            "check {i} ({}): got {got:?}, want {want:?}",
            meaning[i]
        );
    }
    assert_eq!(got, want);
    assert_eq!(r["stats"]["msr_gp"], 0, "{r}");
}
