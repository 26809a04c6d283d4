//! Boot the bundled SMP guest (guest/build/dvmm-guest) with 1, 2 and 4 vCPUs and check
//! that every workload passes, with dvmm's LAPIC and with KVM's (`lapic: kernel`). Skipped (with the reason printed) without /dev/kvm or
//! when the guest has not been built (`make -C guest`).

mod common;

use common::*;
use serde_json::json;

fn boot(vcpus: u32) {
    boot_with(vcpus, "user");
}

fn boot_with(vcpus: u32, lapic: &str) {
    let test = format!("bundled_guest_{vcpus}_{lapic}");
    if !kvm_available(&test) {
        return;
    }
    let Some(guest) = bundled_guest() else {
        eprintln!("skipping {test}: guest/build/dvmm-guest is not built (run `make -C guest`)");
        return;
    };
    let dir = scratch(&test);
    let log = dir.join("console.log");
    let _ = std::fs::remove_file(&log);
    let t = std::time::Instant::now();
    let r = run(json!({
        "vcpus": vcpus,
        "memory": 256u64 << 20,
        "kernel": guest,
        "cmdline": "",
        "console_log": log,
        "console_stdout": false,
        "timeout_s": 120,
        "lapic": lapic,
    }));
    let elapsed = t.elapsed();
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(r["reason"], "debug_exit", "{r}\nconsole:\n{console}");
    assert_eq!(r["status"], 0, "{r}\nconsole:\n{console}");
    assert!(console.contains(" 0 failed"), "console:\n{console}");
    assert!(
        console.contains(&format!("cpus={vcpus} ")),
        "guest did not see {vcpus} vCPUs:\n{console}"
    );
    let mut workloads = 0;
    for line in console.lines() {
        let l = line.trim_end();
        if !l.starts_with("dvmm-guest: ") || l.contains(" passed, ") {
            continue;
        }
        if l.ends_with("PASS") {
            workloads += 1;
        } else {
            assert!(
                !l.ends_with("FAIL"),
                "workload failed with {vcpus} vCPUs: {l}\nconsole:\n{console}"
            );
        }
    }
    assert!(workloads > 0, "no workload lines:\n{console}");
    if lapic == "kernel" {
        // IPIs, the timer and HLT stayed in KVM: no LAPIC access reached us.
        assert_eq!(r["stats"]["lapic_accesses"], 0, "{r}");
        assert_eq!(r["stats"]["interrupts_injected"], 0, "{r}");
    }
    eprintln!(
        "bundled guest, {vcpus} vCPU(s), {lapic} LAPIC: {workloads} workloads PASS in {:.0} ms (stats {})",
        elapsed.as_secs_f64() * 1e3,
        r["stats"]
    );
}

#[test]
fn bundled_guest_1_vcpu() {
    boot(1);
}

#[test]
fn bundled_guest_2_vcpus() {
    boot(2);
}

#[test]
fn bundled_guest_4_vcpus() {
    boot(4);
}

#[test]
fn bundled_guest_2_vcpus_kernel_lapic() {
    boot_with(2, "kernel");
}

#[test]
fn bundled_guest_4_vcpus_kernel_lapic() {
    boot_with(4, "kernel");
}

/// KVM's LAPIC across pauses: the vCPUs leave KVM_RUN (also from an in-kernel
/// halt) and come back without losing an interrupt, so the guest still finishes
/// every workload with exact results.
#[test]
fn kernel_lapic_guest_survives_pauses() {
    use dvmm::vcpu::VcpuState;
    use std::time::Duration;
    let test = "kernel_lapic_guest_survives_pauses";
    if !kvm_available(test) {
        return;
    }
    let Some(guest) = bundled_guest() else {
        eprintln!("skipping {test}: guest/build/dvmm-guest is not built (run `make -C guest`)");
        return;
    };
    let dir = scratch(test);
    let log = dir.join("console.log");
    let _ = std::fs::remove_file(&log);
    let spec = json!({
        "vcpus": 2,
        "memory": 256u64 << 20,
        "kernel": guest,
        "cmdline": "run=ipi,counter,spinlock,ep",
        "console_log": log,
        "console_stdout": false,
        "timeout_s": 120,
        "lapic": "kernel",
    });
    let vm = dvmm::vm::Vm::new(dvmm::vm::VmSpec::from_json(&spec.to_string()).unwrap()).unwrap();
    let ctl = vm.control();
    let h = std::thread::spawn(move || vm.run());
    let mut pauses = 0;
    while !h.is_finished() && pauses < 20 {
        std::thread::sleep(Duration::from_millis(15));
        ctl.pause();
        if ctl.wait_states(&[VcpuState::Paused], Duration::from_secs(10)) {
            pauses += 1;
        } else {
            // Only a VM that ended in the meantime may fail to pause.
            assert!(
                ctl.states().contains(&VcpuState::Stopped),
                "{:?}",
                ctl.states()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
        ctl.resume();
    }
    let r = h.join().unwrap();
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(r.reason, "debug_exit", "{console}");
    assert_eq!(r.status, Some(0), "{console}");
    assert!(console.contains("4 passed, 0 failed"), "{console}");
    assert!(
        pauses > 0,
        "the VM ended before the first pause:\n{console}"
    );
    eprintln!("{test}: {pauses} pauses");
}
