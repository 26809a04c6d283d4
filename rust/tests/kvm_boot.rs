//! Integration tests that boot tiny hand-assembled guests under KVM (skipped without
//! /dev/kvm).

mod common;

use common::*;
use serde_json::json;

fn spec(kernel: &str, log: &str) -> serde_json::Value {
    json!({
        "vcpus": 1,
        "memory": 16 << 20,
        "kernel": kernel,
        "console_log": log,
        "console_stdout": false,
        "timeout_s": 60,
    })
}

#[test]
fn serial_output_and_debug_exit_status() {
    if !kvm_available("serial_output_and_debug_exit_status") {
        return;
    }
    let dir = scratch("ok");
    let mut code = asm::print(b"OK\n");
    code.extend(asm::exit(42));
    let (k, log) = write_kernel(&dir, "ok.bin", &multiboot_kernel(&code));
    let r = run(spec(&k, &log));
    assert_eq!(r["reason"], "debug_exit", "{r}");
    assert_eq!(r["status"], 42, "{r}");
    assert!(r["error"].is_null());
    assert_eq!(std::fs::read(&log).unwrap(), b"OK\n");
    assert!(r["stats"]["exits_total"].as_u64().unwrap() >= 4, "{r}");
}

#[test]
fn unknown_ports_read_ones_and_ignore_writes() {
    if !kvm_available("unknown_ports_read_ones_and_ignore_writes") {
        return;
    }
    let dir = scratch("unknown");
    let mut code = asm::mov_al(0x12);
    code.extend(asm::out_imm(0x80)); // POST port: nobody there
    code.extend(asm::out_imm(0x21)); // PIC mask: nobody there
    code.extend(asm::in_imm(0x99)); // reads 0xFF
    code.extend(asm::out_imm(0xF4)); // exit with what was read
    code.extend([asm::CLI, asm::HLT]);
    let (k, log) = write_kernel(&dir, "unknown.bin", &multiboot_kernel(&code));
    let r = run(spec(&k, &log));
    assert_eq!(r["reason"], "debug_exit", "{r}");
    assert_eq!(r["status"], 0xFF, "{r}");
    assert_eq!(r["stats"]["unknown_pio"], 3, "{r}");
}

#[test]
fn triple_fault_is_a_crash_with_registers() {
    if !kvm_available("triple_fault_is_a_crash_with_registers") {
        return;
    }
    let dir = scratch("triple");
    // No IDT (limit 0): ud2 -> #UD -> #DF -> triple fault.
    let mut code = asm::print(b"x");
    code.extend([0x0F, 0x0B]);
    let (k, log) = write_kernel(&dir, "triple.bin", &multiboot_kernel(&code));
    let r = run(spec(&k, &log));
    assert_eq!(r["reason"], "crash", "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("triple fault") || err.contains("KVM_EXIT"),
        "{err}"
    );
    let d = &r["vcpu_dump"];
    assert!(d.is_object(), "{r}");
    assert_eq!(d["vcpu"], 0);
    for k in [
        "rip", "rsp", "rflags", "cr0", "cr3", "cr4", "efer", "cs", "ss",
    ] {
        assert!(d[k].is_string(), "missing {k}: {d}");
    }
    assert!(d["regs"]["rax"].is_string());
    assert!(r["status"].is_null());
}

#[test]
fn refused_instruction_is_a_clear_crash() {
    if !kvm_available("refused_instruction_is_a_clear_crash") {
        return;
    }
    let dir = scratch("refused");
    // xrstor [eax] (with eax = 0x2000): refused by KVM's instruction emulator on PVM
    // hosts (emulation failure); on hosts with VMX it #UDs (CR4.OSXSAVE=0) and, with no
    // IDT, triple-faults. Either way: a crash naming the exit, with registers.
    let code = vec![0xB8, 0x00, 0x20, 0x00, 0x00, 0x0F, 0xAE, 0x28, asm::HLT];
    let (k, log) = write_kernel(&dir, "refused.bin", &multiboot_kernel(&code));
    let r = run(spec(&k, &log));
    assert_eq!(r["reason"], "crash", "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("KVM_EXIT_INTERNAL_ERROR") || err.contains("KVM_EXIT_SHUTDOWN"),
        "{err}"
    );
    assert!(r["vcpu_dump"]["rip"].is_string(), "{r}");
    eprintln!("refused instruction: {err}");
}

#[test]
fn timeout_stops_a_spinning_guest() {
    if !kvm_available("timeout_stops_a_spinning_guest") {
        return;
    }
    let dir = scratch("spin");
    let code = vec![0xEB, 0xFE]; // jmp $
    let (k, log) = write_kernel(&dir, "spin.bin", &multiboot_kernel(&code));
    let mut s = spec(&k, &log);
    s["timeout_s"] = json!(0.5);
    let t = std::time::Instant::now();
    let r = run(s);
    assert_eq!(r["reason"], "timeout", "{r}");
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn halted_guest_with_interrupts_off_waits_for_timeout() {
    if !kvm_available("halted_guest_with_interrupts_off_waits_for_timeout") {
        return;
    }
    let dir = scratch("cli-hlt");
    let code = vec![asm::CLI, asm::HLT, 0xEB, 0xFD];
    let (k, log) = write_kernel(&dir, "clihlt.bin", &multiboot_kernel(&code));
    let mut s = spec(&k, &log);
    s["timeout_s"] = json!(0.3);
    let r = run(s);
    assert_eq!(r["reason"], "timeout", "{r}");
}

#[test]
fn bad_kernel_image_is_a_clear_error() {
    if !kvm_available("bad_kernel_image_is_a_clear_error") {
        return;
    }
    let dir = scratch("badkernel");
    let (k, log) = write_kernel(&dir, "garbage.bin", &[0x55u8; 4096]);
    let e = dvmm::vm::run_vm(&spec(&k, &log).to_string()).unwrap_err();
    assert!(e.is_user_error(), "{e}");
    assert!(e.to_string().contains("garbage.bin"), "{e}");
}

/// mov eax, imm32; mov [addr], eax
fn store32(addr: u32, v: u32) -> Vec<u8> {
    let mut c = vec![0xB8];
    c.extend(v.to_le_bytes());
    c.push(0xA3);
    c.extend(addr.to_le_bytes());
    c
}

#[test]
fn garbage_to_apic_ioapic_and_unknown_mmio_is_survived() {
    if !kvm_available("garbage_to_apic_ioapic_and_unknown_mmio_is_survived") {
        return;
    }
    let dir = scratch("garbage");
    let mut code = Vec::new();
    for (a, v) in [
        (0xFEE0_00F0u32, 0xFFFF_FFFFu32), // SVR: enable + garbage
        (0xFEE0_0310, 0xDEAD_BEEF),       // ICR high
        (0xFEE0_0300, 0xDEAD_BEEF),       // ICR low: SIPI to all-but-self
        (0xFEE0_0300, 0x0000_0000),       // fixed vector 0 to APIC 0xDE: illegal vector
        (0xFEE0_0003, 0x1234_5678),       // unaligned
        (0xFEE0_0FF0, 0xFFFF_FFFF),       // reserved register
        (0xFEE0_0380, 0x0000_0010),       // timer initial count (masked LVT)
        (0xFEC0_0000, 0xFFFF_FFFF),       // IOREGSEL out of range
        (0xFEC0_0010, 0xFFFF_FFFF),       // IOWIN
        (0xFEC0_0040, 0xFFFF_FFFF),       // IOAPIC EOI
        (0xD000_0000, 0x0BAD_F00D),       // nothing there
    ] {
        code.extend(store32(a, v));
    }
    code.extend(asm::print(b"alive\n"));
    code.extend(asm::exit(5));
    let (k, log) = write_kernel(&dir, "garbage.bin", &multiboot_kernel(&code));
    let r = run(spec(&k, &log));
    assert_eq!(r["reason"], "debug_exit", "{r}");
    assert_eq!(r["status"], 5, "{r}");
    assert_eq!(std::fs::read(&log).unwrap(), b"alive\n");
    assert_eq!(r["stats"]["unknown_mmio"], 1, "{r}");
    assert_eq!(r["stats"]["lapic_accesses"], 7, "{r}");
}

#[test]
fn pause_resume_and_stop_a_running_vm() {
    if !kvm_available("pause_resume_and_stop_a_running_vm") {
        return;
    }
    use dvmm::vcpu::VcpuState;
    use std::time::Duration;
    let dir = scratch("pause");
    let code = vec![0xEB, 0xFE]; // jmp $ (no exits: only a kick gets it out)
    let (k, log) = write_kernel(&dir, "pause.bin", &multiboot_kernel(&code));
    let spec = dvmm::vm::VmSpec::from_json(&spec(&k, &log).to_string()).unwrap();
    let vm = dvmm::vm::Vm::new(spec).unwrap();
    let ctl = vm.control();
    let h = std::thread::spawn(move || vm.run());
    assert!(ctl.wait_states(&[VcpuState::Running], Duration::from_secs(10)));
    ctl.pause();
    assert!(
        ctl.wait_states(&[VcpuState::Paused], Duration::from_secs(10)),
        "{:?}",
        ctl.states()
    );
    ctl.resume();
    assert!(ctl.wait_states(&[VcpuState::Running], Duration::from_secs(10)));
    ctl.stop();
    let r = h.join().unwrap();
    assert_eq!(r.reason, "stopped");
    assert_eq!(ctl.states(), vec![VcpuState::Stopped]);
}

/// A guest echoing COM1 input (polling LSR bit 0) until it reads 'q', then exiting
/// with status 7.
fn echo_guest() -> Vec<u8> {
    let mut code = Vec::new();
    // loop: mov dx, LSR; in al, dx; test al, 1; jz loop
    code.extend(asm::mov_dx(0x3FD));
    code.extend([0xEC, 0xA8, 0x01, 0x74, 0xF7]);
    // mov dx, RBR; in al, dx; cmp al, 'q'; je done; out dx, al; jmp loop
    code.extend(asm::mov_dx(0x3F8));
    code.extend([0xEC, 0x3C, b'q', 0x74, 0x03, asm::OUT_DX_AL, 0xEB, 0xEB]);
    // done:
    code.extend(asm::exit(7));
    multiboot_kernel(&code)
}

#[test]
fn console_input_from_a_fifo_reaches_the_guest() {
    if !kvm_available("console_input_from_a_fifo_reaches_the_guest") {
        return;
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = scratch("console-in");
    let (k, log) = write_kernel(&dir, "echo.bin", &echo_guest());
    let fifo = dir.join("console.in");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Open read-write (never blocks): the bytes wait in the pipe until the VM reads.
    let mut w = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    // More than the UART's 64-byte FIFO before the 'q': nothing may be dropped.
    let long: Vec<u8> = (0..200).map(|i| b'a' + (i % 16) as u8).collect();
    w.write_all(b"hello ").unwrap();
    w.write_all(&long).unwrap();
    w.write_all(b"q").unwrap();
    let mut s = spec(&k, &log);
    s["console_input"] = json!(fifo.to_str().unwrap());
    let r = run(s);
    assert_eq!(r["reason"], "debug_exit", "{r}");
    assert_eq!(r["status"], 7, "{r}");
    let mut want = b"hello ".to_vec();
    want.extend(&long);
    assert_eq!(std::fs::read(&log).unwrap(), want);
}

#[test]
fn bad_console_input_path_is_a_clear_error() {
    if !kvm_available("bad_console_input_path_is_a_clear_error") {
        return;
    }
    let dir = scratch("console-in-bad");
    let (k, log) = write_kernel(&dir, "echo.bin", &echo_guest());
    let mut s = spec(&k, &log);
    s["console_input"] = json!("/nonexistent-dir/console.in");
    let e = dvmm::vm::run_vm(&s.to_string()).unwrap_err();
    assert!(e.is_user_error(), "{e}");
    assert!(e.to_string().contains("/nonexistent-dir/console.in"), "{e}");
    // A regular file is not a FIFO.
    s["console_input"] = json!(k);
    let e = dvmm::vm::run_vm(&s.to_string()).unwrap_err();
    assert!(e.to_string().contains("not a FIFO"), "{e}");
}
