//! Boot the bundled SMP guest (guest/build/dvmm-guest) with 1, 2 and 4 vCPUs and check
//! that every workload passes. Skipped (with the reason printed) without /dev/kvm or
//! when the guest has not been built (`make -C guest`).

mod common;

use common::*;
use serde_json::json;

fn boot(vcpus: u32) {
    let test = format!("bundled_guest_{vcpus}");
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
    eprintln!(
        "bundled guest, {vcpus} vCPU(s): {workloads} workloads PASS in {:.0} ms (stats {})",
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
