//! Distributed VM (issue 4): the bundled guest on 2 and 3 nodes, each node a separate
//! process on its own loopback address (127.0.0.x), compared with one node; cross-node
//! counter/spinlock totals; a killed worker; a garbage-sending peer.
//!
//! Each node is this test binary re-executed with `--exact node_worker`: the
//! `node_worker` test runs `run_vm` on the spec named by `DVMM_NODE_SPEC` and writes
//! the result to `DVMM_NODE_RESULT` (and does nothing in a normal test run).
//! Skipped without /dev/kvm or without the built guest.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SESSION: &str = "00112233445566778899aabbccddeeff";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Node `i`'s X25519 private key (fixed test keys).
fn private_key(i: usize) -> [u8; 32] {
    let mut k = [0x11u8; 32];
    k[0] = i as u8 + 1;
    k
}

/// The worker side (runs only when spawned by `spawn_node`).
#[test]
fn node_worker() {
    let (Some(spec), Some(out)) = (
        std::env::var_os("DVMM_NODE_SPEC"),
        std::env::var_os("DVMM_NODE_RESULT"),
    ) else {
        return;
    };
    let spec = std::fs::read_to_string(spec).unwrap();
    let r = match dvmm::vm::run_vm(&spec) {
        Ok(r) => r,
        Err(e) => json!({"reason": "spawn_error", "error": e.to_string()}).to_string(),
    };
    std::fs::write(out, r).unwrap();
}

/// A free TCP port (bound on 127.0.0.1 and released; the nodes use it on 127.0.0.x).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

struct Cluster {
    dir: PathBuf,
    n: usize,
    port: u16,
    children: Vec<Option<Child>>,
}

/// Specs for `n` nodes, vCPUs and memory split evenly (node i runs vCPUs
/// `i*v/n..(i+1)*v/n`).
fn specs(n: usize, vcpus: u32, mem: u64, cmdline: &str, dir: &Path, port: u16) -> Vec<Value> {
    let guest = bundled_guest().unwrap();
    let per = mem / n as u64 / 4096 * 4096;
    let numa: Vec<Value> = (0..n)
        .map(|i| {
            let cpus: Vec<u32> = (0..vcpus)
                .filter(|c| (*c as usize * n) / vcpus as usize == i)
                .collect();
            let size = if i + 1 < n {
                per
            } else {
                mem - per * (n as u64 - 1)
            };
            json!({"cpus": cpus, "mem_start": per * i as u64, "mem_size": size})
        })
        .collect();
    let nodes: Vec<Value> = (0..n)
        .map(|j| json!({"addr": format!("127.0.0.{}:{port}", j + 1)}))
        .collect();
    let pubs: Vec<String> = (0..n)
        .map(|i| hex(&dvmm::dsm::auth::public_key(&private_key(i))))
        .collect();
    (0..n)
        .map(|i| {
            json!({
                "vcpus": vcpus,
                "memory": mem,
                "kernel": guest,
                "cmdline": cmdline,
                "numa": numa,
                "console_log": dir.join(format!("console{i}.log")),
                "console_stdout": false,
                "timeout_s": 180,
                "cluster": {"node_index": i, "nodes": nodes, "session_hex": SESSION,
                            "node_pubkeys_hex": pubs, "private_key_hex": hex(&private_key(i)),
                            "boot_node": 0,
                            "connect_timeout_s": 20},
            })
        })
        .collect()
}

impl Cluster {
    fn new(test: &str, n: usize) -> Cluster {
        let dir = scratch(test);
        for f in std::fs::read_dir(&dir).unwrap().flatten() {
            let _ = std::fs::remove_file(f.path());
        }
        Cluster {
            dir,
            n,
            port: free_port(),
            children: (0..n).map(|_| None).collect(),
        }
    }

    fn spawn_node(&mut self, i: usize, spec: &Value) {
        let sp = self.dir.join(format!("spec{i}.json"));
        std::fs::write(&sp, spec.to_string()).unwrap();
        let log = std::fs::File::create(self.dir.join(format!("stderr{i}.log"))).unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "node_worker", "--nocapture", "--test-threads=1"])
            .env("DVMM_NODE_SPEC", &sp)
            .env("DVMM_NODE_RESULT", self.dir.join(format!("result{i}.json")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
    }

    fn start(&mut self, vcpus: u32, mem: u64, cmdline: &str) {
        let specs = specs(self.n, vcpus, mem, cmdline, &self.dir, self.port);
        for (i, s) in specs.iter().enumerate() {
            self.spawn_node(i, s);
        }
    }

    /// Wait for every node (bounded) and return the results.
    fn wait(&mut self, timeout: Duration) -> Vec<Value> {
        let end = Instant::now() + timeout;
        let mut out = Vec::new();
        for i in 0..self.n {
            if let Some(c) = self.children[i].as_mut() {
                loop {
                    if c.try_wait().unwrap().is_some() {
                        break;
                    }
                    if Instant::now() > end {
                        let _ = c.kill();
                        let _ = c.wait();
                        panic!(
                            "node {i} did not finish within {timeout:?}; stderr:\n{}",
                            self.stderr(i)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let r = std::fs::read_to_string(self.dir.join(format!("result{i}.json")))
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or(Value::Null);
            out.push(r);
        }
        out
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console0.log")).unwrap_or_default()
    }

    fn stderr(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("stderr{i}.log"))).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Workloads with a PASS line (`dvmm-guest: <workload> ... PASS`).
fn passed(console: &str) -> BTreeSet<String> {
    console
        .lines()
        .filter(|l| l.starts_with("dvmm-guest: ") && l.trim_end().ends_with(" PASS"))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

fn skip(test: &str) -> bool {
    if !kvm_available(test) {
        return true;
    }
    if bundled_guest().is_none() {
        eprintln!("skipping {test}: guest/build/dvmm-guest is not built (run `make -C guest`)");
        return true;
    }
    false
}

fn single_node(test: &str, vcpus: u32, mem: u64, cmdline: &str) -> (Value, String) {
    let dir = scratch(&format!("{test}-single"));
    let log = dir.join("console.log");
    let _ = std::fs::remove_file(&log);
    let r = run(json!({
        "vcpus": vcpus, "memory": mem, "kernel": bundled_guest().unwrap(),
        "cmdline": cmdline, "console_log": log, "console_stdout": false, "timeout_s": 120,
    }));
    (r, std::fs::read_to_string(&log).unwrap_or_default())
}

fn check_all_nodes_ok(c: &Cluster, results: &[Value]) {
    let console = c.console();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r["reason"],
            "debug_exit",
            "node {i}: {r}\nstderr:\n{}\nconsole:\n{console}",
            c.stderr(i)
        );
        assert_eq!(r["status"], 0, "node {i}: {r}\nconsole:\n{console}");
        assert_eq!(r["node"], i, "node {i}: {r}");
        assert!(r["stats"]["dsm"].is_object(), "node {i}: {r}");
    }
}

fn compare_with_single_node(test: &str, nodes: usize, vcpus: u32, mem: u64) {
    if skip(test) {
        return;
    }
    let (r1, con1) = single_node(test, vcpus, mem, "");
    assert_eq!(r1["status"], 0, "single node: {r1}\n{con1}");
    let mut c = Cluster::new(test, nodes);
    let t = Instant::now();
    c.start(vcpus, mem, "");
    let results = c.wait(Duration::from_secs(240));
    let took = t.elapsed();
    check_all_nodes_ok(&c, &results);
    let console = c.console();
    assert!(console.contains(" 0 failed"), "console:\n{console}");
    assert!(
        console.contains(&format!("cpus={vcpus} nodes={nodes} ")),
        "guest did not see {vcpus} vCPUs on {nodes} nodes:\n{console}"
    );
    assert_eq!(
        passed(&console),
        passed(&con1),
        "different PASS lines\n{nodes} nodes:\n{console}\n1 node:\n{con1}"
    );
    assert!(!passed(&console).is_empty());
    eprintln!(
        "{test}: {} workloads PASS on {nodes} nodes in {:.0} ms (1 node: {:.0} ms run)",
        passed(&console).len(),
        took.as_secs_f64() * 1e3,
        r1["stats"]["run_ms"].as_f64().unwrap_or(0.0)
    );
    for (i, r) in results.iter().enumerate() {
        eprintln!(
            "node {i}: run_ms={} dsm={}",
            r["stats"]["run_ms"], r["stats"]["dsm"]
        );
    }
}

#[test]
fn cluster_2_nodes_bundled_guest() {
    compare_with_single_node("cluster2", 2, 2, 256 << 20);
}

#[test]
fn cluster_3_nodes_bundled_guest() {
    compare_with_single_node("cluster3", 3, 3, 384 << 20);
}

#[test]
fn cluster_counter_and_spinlock_cross_node_totals() {
    let test = "cluster_counter";
    if skip(test) {
        return;
    }
    let mut c = Cluster::new(test, 2);
    c.start(
        2,
        256 << 20,
        "run=counter,spinlock counter.iters=100000 spinlock.iters=100000",
    );
    let results = c.wait(Duration::from_secs(240));
    check_all_nodes_ok(&c, &results);
    let console = c.console();
    assert!(
        console.lines().any(|l| l
            .starts_with("dvmm-guest: counter cpus=2 iters=100000 total=200000 ")
            && l.ends_with(" PASS")),
        "{console}"
    );
    assert!(
        console.lines().any(|l| l.starts_with(
            "dvmm-guest: spinlock cpus=2 iters=100000 buckets=64 total=200000 list=200000 "
        ) && l.ends_with(" PASS")),
        "{console}"
    );
    assert!(console.contains("2 passed, 0 failed"), "{console}");
    // The counter really moved between the nodes.
    let inv: u64 = results
        .iter()
        .map(|r| {
            r["stats"]["dsm"]["invalidations_received"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert!(inv > 0, "no coherence traffic: {results:?}");
}

#[test]
fn cluster_killed_worker_stops_the_others() {
    let test = "cluster_killed";
    if skip(test) {
        return;
    }
    let mut c = Cluster::new(test, 3);
    c.start(3, 384 << 20, "run=ep ep.size=16G");
    // Wait until the guest runs on every node (the boot line lists the nodes).
    let end = Instant::now() + Duration::from_secs(60);
    while !c.console().contains("dvmm-guest: node 2 ") {
        assert!(Instant::now() < end, "guest did not boot:\n{}", c.console());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let victim = c.children[1].as_mut().unwrap();
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    c.children[1] = None;
    let killed = Instant::now();
    let results = c.wait(Duration::from_secs(30));
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "others took {took:?} to stop"
    );
    let addr = format!("node 1 (127.0.0.2:{})", c.port);
    for i in [0, 2] {
        let r = &results[i];
        assert_eq!(r["reason"], "error", "node {i}: {r}\n{}", c.stderr(i));
        let e = r["error"].as_str().unwrap_or("");
        assert!(
            e.contains(&addr),
            "node {i}: error does not name {addr}: {r}"
        );
    }
    eprintln!(
        "{test}: survivors stopped {took:?} after the kill: {}",
        results[0]["error"]
    );
}

#[test]
fn cluster_garbage_peer_is_refused() {
    let test = "cluster_garbage";
    if skip(test) {
        return;
    }
    let mut c = Cluster::new(test, 2);
    let specs = specs(2, 2, 256 << 20, "run=counter,ep", &c.dir, c.port);
    c.spawn_node(0, &specs[0]);
    // Node 0 listens for node 1; a stranger connects first and sends junk.
    let addr = format!("127.0.0.1:{}", c.port);
    let end = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match std::net::TcpStream::connect(&addr) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < end, "node 0 does not listen: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\nthis is not a dvmm frame at all.......\n");
    std::thread::sleep(Duration::from_millis(200));
    c.spawn_node(1, &specs[1]);
    // And another stranger while the VM runs.
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(mut s2) = std::net::TcpStream::connect(&addr) {
        let _ = s2.write_all(&[0xAB; 300]);
    }
    let results = c.wait(Duration::from_secs(120));
    check_all_nodes_ok(&c, &results);
    assert!(
        c.console().contains("2 passed, 0 failed"),
        "{}",
        c.console()
    );
    let err = c.stderr(0);
    assert!(
        err.contains("refusing connection from 127.0.0.1:"),
        "no logged refusal:\n{err}"
    );
    drop(s);
}
