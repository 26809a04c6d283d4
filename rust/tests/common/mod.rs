//! Helpers for the KVM integration tests: hand-assembled Multiboot guests and a runner.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// True when the environment says it is CI (`CI` set to anything but empty, 0,
/// false or no, as CI services and `.ci/run` do): a KVM test must then fail, not skip.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .is_ok_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "" | "0" | "false" | "no"))
}

/// True if /dev/kvm can be opened; otherwise prints why the test is skipped, or,
/// under CI, fails the test (CI must run the KVM tests).
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            assert!(
                !in_ci(),
                "{test}: CI must run the KVM tests, but /dev/kvm is not usable ({e})"
            );
            eprintln!("skipping {test}: /dev/kvm is not usable ({e})");
            false
        }
    }
}

/// A scratch directory for this test.
pub fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dvmm-it-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A Multiboot v1 kernel (a.out kludge) loaded at 1 MiB whose 32-bit protected-mode
/// code is `code` (entered right after the 32-byte header).
pub fn multiboot_kernel(code: &[u8]) -> Vec<u8> {
    let magic: u32 = 0x1BAD_B002;
    let flags: u32 = 1 << 16;
    let checksum = 0u32.wrapping_sub(magic.wrapping_add(flags));
    let load = 0x10_0000u32;
    let mut v = Vec::new();
    for w in [magic, flags, checksum, load, load, 0, 0, load + 32] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v.extend_from_slice(code);
    v
}

/// 32-bit code fragments.
pub mod asm {
    /// mov dx, port
    pub fn mov_dx(port: u16) -> Vec<u8> {
        let p = port.to_le_bytes();
        vec![0x66, 0xBA, p[0], p[1]]
    }
    /// mov al, imm8
    pub fn mov_al(v: u8) -> Vec<u8> {
        vec![0xB0, v]
    }
    /// out dx, al
    pub const OUT_DX_AL: u8 = 0xEE;
    /// out imm8, al
    pub fn out_imm(port: u8) -> Vec<u8> {
        vec![0xE6, port]
    }
    /// in al, imm8
    pub fn in_imm(port: u8) -> Vec<u8> {
        vec![0xE4, port]
    }
    /// hlt
    pub const HLT: u8 = 0xF4;
    /// cli
    pub const CLI: u8 = 0xFA;

    /// Print `s` on COM1.
    pub fn print(s: &[u8]) -> Vec<u8> {
        let mut v = mov_dx(0x3F8);
        for b in s {
            v.extend(mov_al(*b));
            v.push(OUT_DX_AL);
        }
        v
    }

    /// Write `status` to the debug-exit port, then halt forever.
    pub fn exit(status: u8) -> Vec<u8> {
        let mut v = mov_al(status);
        v.extend(out_imm(0xF4));
        v.extend([CLI, HLT, 0xEB, 0xFD]);
        v
    }
}

/// Write a kernel to the scratch dir and return (kernel path, console log path).
pub fn write_kernel(dir: &Path, name: &str, image: &[u8]) -> (String, String) {
    let k = dir.join(name);
    std::fs::write(&k, image).unwrap();
    let log = dir.join(format!("{name}.console"));
    let _ = std::fs::remove_file(&log);
    (
        k.to_string_lossy().into_owned(),
        log.to_string_lossy().into_owned(),
    )
}

/// Run a VM from a JSON spec and return the parsed result.
pub fn run(spec: serde_json::Value) -> serde_json::Value {
    let out = dvmm::vm::run_vm(&spec.to_string()).expect("run_vm failed");
    serde_json::from_str(&out).unwrap()
}

/// The bundled guest, if it has been built (under CI it must be: `make test`
/// builds it first, so its absence fails the test instead of skipping it).
pub fn bundled_guest() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/build/dvmm-guest");
    assert!(
        p.is_file() || !in_ci(),
        "CI must run the bundled-guest tests, but {} is not built (make -C guest)",
        p.display()
    );
    p.is_file().then_some(p)
}
