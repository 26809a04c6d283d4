//! The DSM engine end to end: every node is a separate process (this test
//! binary re-executed with `DSM_CHILD` set), with its own memfd mapped twice;
//! plain host threads read and write the guest mapping (no KVM needed) and the
//! userfaultfd engine keeps it coherent over authenticated loopback TCP.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dvmm::dsm::auth::{self, NodeKeys};
use dvmm::dsm::seal::Protection;
use dvmm::dsm::{DsmConfig, DsmEngine, DsmHandle};

/// Node `i`'s test key pair (fixed: the child processes derive the same ones).
fn test_keys(me: u16, n: usize) -> NodeKeys {
    let private = |i: usize| -> [u8; 32] {
        let mut k = [0u8; 32];
        k[0] = 0x40 + i as u8;
        k[31] = 0x5a;
        k
    };
    let pubs: Vec<[u8; 32]> = (0..n).map(|i| auth::public_key(&private(i))).collect();
    NodeKeys::new(
        me,
        private(me.into()),
        &pubs,
        [7u8; 16],
        Protection::Encrypt,
    )
    .unwrap()
}
const PAGE: usize = 4096;

struct Ram {
    guest: *mut u8,
    _engine: *mut u8,
}

// SAFETY: the mappings are process-wide and live until exit; threads only use
// them through atomics.
unsafe impl Send for Ram {}
// SAFETY: as above.
unsafe impl Sync for Ram {}

fn map_ram(len: usize) -> (i32, Ram) {
    // SAFETY: plain syscalls creating and mapping a fresh memfd; results checked.
    unsafe {
        let fd = libc::memfd_create(c"dsm-guest".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let g = libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0);
        let e = libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0);
        assert!(g != libc::MAP_FAILED && e != libc::MAP_FAILED);
        (
            fd,
            Ram {
                guest: g.cast(),
                _engine: e.cast(),
            },
        )
    }
}

struct NodeEnv {
    me: u16,
    n: usize,
    ram: Ram,
    dsm: DsmHandle,
}

impl NodeEnv {
    fn word(&self, page: usize, idx: usize) -> &AtomicU64 {
        // SAFETY: the guest mapping is valid for the process lifetime and the
        // offset is inside it; AtomicU64 has the alignment of the 8-byte slot.
        unsafe { &*(self.ram.guest.add(page * PAGE + idx * 8) as *const AtomicU64) }
    }

    /// Barrier through the DSM itself (an atomic counter in a shared page).
    fn barrier(&self, page: usize, round: u64) {
        let c = self.word(page, 0);
        c.fetch_add(1, Ordering::SeqCst);
        let want = round * self.n as u64;
        let end = Instant::now() + Duration::from_secs(60);
        while c.load(Ordering::SeqCst) < want {
            assert!(Instant::now() < end, "barrier timeout");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn start_node(pages_per_node: usize, budget: Option<usize>) -> NodeEnv {
    let me: u16 = std::env::var("DSM_NODE").unwrap().parse().unwrap();
    let addrs: Vec<SocketAddr> = std::env::var("DSM_ADDRS")
        .unwrap()
        .split(',')
        .map(|a| a.parse().unwrap())
        .collect();
    let n = addrs.len();
    let len = n * pages_per_node * PAGE;
    let (fd, ram) = map_ram(len);
    let per = (pages_per_node * PAGE) as u64;
    let ranges = (0..n as u64).map(|i| i * per..(i + 1) * per).collect();
    let mut cfg = DsmConfig::new(
        me,
        addrs,
        test_keys(me, n),
        ranges,
        fd,
        ram.guest as usize,
        ram._engine as usize,
    );
    cfg.foreign_budget = budget;
    cfg.connect_deadline = Duration::from_secs(20);
    // SAFETY: both mappings cover the whole memfd and live until process exit.
    let dsm = unsafe { DsmEngine::start(cfg) }.expect("start DSM");
    NodeEnv { me, n, ram, dsm }
}

fn finish(env: NodeEnv, barrier_page: usize, round: u64) -> ! {
    env.barrier(barrier_page, round);
    let s = env.dsm.stats();
    println!(
        "RESULT node={} stats={}",
        env.me,
        serde_json::to_string(&s).unwrap()
    );
    if let Some(e) = env.dsm.error() {
        println!("RESULT node={} error={e}", env.me);
        std::process::exit(2);
    }
    // Let the others finish reading the barrier page before we go.
    std::thread::sleep(Duration::from_millis(500));
    std::process::exit(0);
}

fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let ls: Vec<_> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// Run `n` child processes executing test `name`; returns their stdout lines
/// starting with RESULT.
fn run_cluster(name: &str, n: usize, timeout: Duration) -> Vec<String> {
    let addrs = free_addrs(n);
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let exe = std::env::current_exe().unwrap();
    let mut kids: Vec<Child> = (0..n)
        .map(|i| {
            Command::new(&exe)
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env("DSM_CHILD", "1")
                .env("DSM_NODE", i.to_string())
                .env("DSM_ADDRS", list.join(","))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let end = Instant::now() + timeout;
    let mut done = vec![None; n];
    while done.iter().any(|d| d.is_none()) {
        for (i, k) in kids.iter_mut().enumerate() {
            if done[i].is_none() {
                if let Some(st) = k.try_wait().unwrap() {
                    done[i] = Some(st);
                }
            }
        }
        if Instant::now() > end {
            for k in kids.iter_mut() {
                let _ = k.kill();
            }
            panic!("cluster test {name} timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut lines = Vec::new();
    for (i, k) in kids.into_iter().enumerate() {
        let out = k.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        for l in text
            .lines()
            .filter_map(|l| l.find("RESULT").map(|i| &l[i..]))
        {
            eprintln!("{l}");
            lines.push(l.to_string());
        }
        assert!(done[i].unwrap().success(), "node {i} failed: {text}");
    }
    lines
}

fn child() -> bool {
    std::env::var("DSM_CHILD").is_ok()
}

fn get(lines: &[String], key: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
        })
        .map(|s| s.to_string())
        .collect()
}

/// Two nodes: remote read fault latency, 2 x 20000 concurrent atomic
/// increments of one shared counter (exact total), and a ping-pong handoff.
#[test]
fn two_nodes_counter_and_latency() {
    const PAGES: usize = 64;
    if child() {
        let env = start_node(PAGES, None);
        // Remote read faults: node 0 writes 32 of its pages, node 1 reads them.
        if env.me == 0 {
            for p in 10..42 {
                env.word(p, 1).store(p as u64 * 3, Ordering::SeqCst);
            }
        }
        env.barrier(PAGES + 1, 1);
        if env.me == 1 {
            let mut total = Duration::ZERO;
            for p in 10..42 {
                let t = Instant::now();
                let v = env.word(p, 1).load(Ordering::SeqCst);
                total += t.elapsed();
                assert_eq!(v, p as u64 * 3);
            }
            println!(
                "RESULT read_fault_us={:.1}",
                total.as_secs_f64() * 1e6 / 32.0
            );
            // Upgrade faults (WP on a shared copy, no transfer).
            let mut total = Duration::ZERO;
            for p in 10..42 {
                let t = Instant::now();
                env.word(p, 1).store(1, Ordering::SeqCst);
                total += t.elapsed();
            }
            println!(
                "RESULT upgrade_fault_us={:.1}",
                total.as_secs_f64() * 1e6 / 32.0
            );
        }
        env.barrier(PAGES + 1, 2);
        // Concurrent atomic increments.
        let c = env.word(3, 0);
        for _ in 0..20_000 {
            c.fetch_add(1, Ordering::SeqCst);
        }
        env.barrier(PAGES + 1, 3);
        assert_eq!(c.load(Ordering::SeqCst), 40_000);
        println!(
            "RESULT node={} counter={}",
            env.me,
            c.load(Ordering::SeqCst)
        );
        let s = env.dsm.stats();
        println!(
            "RESULT node={} after_counter_mean_us={} faults={} hist={:?}",
            env.me,
            s.fault_mean_ns / 1000,
            s.remote_faults,
            s.latency_us_log2
        );
        // Ping-pong handoff of a turn word (home node 1).
        let turn = env.word(PAGES + 6, 0);
        let me = env.me as u64;
        let t = Instant::now();
        for _ in 0..2000 {
            let end = Instant::now() + Duration::from_secs(30);
            while turn.load(Ordering::SeqCst) % 2 != me {
                assert!(Instant::now() < end, "ping-pong stuck");
                std::hint::spin_loop();
            }
            turn.fetch_add(1, Ordering::SeqCst);
        }
        if env.me == 0 {
            println!(
                "RESULT handoff_us={:.1}",
                t.elapsed().as_secs_f64() * 1e6 / 4000.0
            );
        }
        finish(env, PAGES + 1, 4);
    }
    let lines = run_cluster("two_nodes_counter_and_latency", 2, Duration::from_secs(120));
    assert_eq!(get(&lines, "counter"), vec!["40000", "40000"]);
}

/// Three nodes, two threads each, random reads and atomic adds over a shared
/// region of 3 x 16 pages; the final checksum read by every node equals the sum
/// of all additions.
#[test]
fn three_nodes_random_stress() {
    const PAGES: usize = 16;
    if child() {
        let env = std::sync::Arc::new(start_node(PAGES, None));
        let region = 3 * PAGES - 1; // last page: barrier
        let words = region * PAGE / 8;
        let mut hs = Vec::new();
        for t in 0..2u64 {
            let env = env.clone();
            hs.push(std::thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (u64::from(env.me) * 7 + t + 1);
                let mut added = 0u64;
                for _ in 0..20_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Skewed towards a few hot pages, like real sharing.
                    let w = if x & 1 == 0 {
                        (x >> 8) as usize % 64
                    } else {
                        (x >> 8) as usize % words
                    };
                    let (p, i) = (w / 512, w % 512);
                    if x & 6 == 0 {
                        let v = (x >> 40) & 0xff;
                        env.word(p, i).fetch_add(v, Ordering::SeqCst);
                        added = added.wrapping_add(v);
                    } else {
                        std::hint::black_box(env.word(p, i).load(Ordering::SeqCst));
                    }
                }
                added
            }));
        }
        let added: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        env.barrier(region, 1);
        let mut sum = 0u64;
        for w in 0..words {
            sum = sum.wrapping_add(env.word(w / 512, w % 512).load(Ordering::SeqCst));
        }
        println!("RESULT node={} added={added} checksum={sum}", env.me);
        let env = std::sync::Arc::try_unwrap(env).ok().unwrap();
        finish(env, region, 2);
    }
    let lines = run_cluster("three_nodes_random_stress", 3, Duration::from_secs(180));
    let added: u64 = get(&lines, "added")
        .iter()
        .map(|s| s.parse::<u64>().unwrap())
        .sum();
    let sums = get(&lines, "checksum");
    assert_eq!(sums.len(), 3);
    for s in sums {
        assert_eq!(s.parse::<u64>().unwrap(), added);
    }
}

/// Memory aggregation: 3 nodes each home of S = 512 pages; node 0 writes and
/// verifies all 3S pages, then node 1 verifies them all; with a foreign budget
/// of 64 pages, no node's resident guest memory exceeds S + 64 (+ slack).
#[test]
fn three_nodes_memory_aggregation() {
    const S: usize = 512;
    const BUDGET: usize = 64;
    if child() {
        let env = start_node(S, Some(BUDGET));
        let barrier = S - 1; // on node 0
        let pages = 3 * S;
        let pat = |p: usize, i: usize| (p as u64) << 20 | i as u64;
        if env.me == 0 {
            for p in 0..pages {
                if p == barrier {
                    continue;
                }
                for i in (0..512).step_by(64) {
                    env.word(p, i).store(pat(p, i), Ordering::Relaxed);
                }
            }
            for p in 0..pages {
                if p == barrier {
                    continue;
                }
                for i in (0..512).step_by(64) {
                    assert_eq!(
                        env.word(p, i).load(Ordering::Relaxed),
                        pat(p, i),
                        "page {p}"
                    );
                }
            }
        }
        env.barrier(barrier, 1);
        if env.me == 1 {
            for p in (0..pages).rev() {
                if p == barrier {
                    continue;
                }
                for i in (0..512).step_by(64) {
                    assert_eq!(
                        env.word(p, i).load(Ordering::Relaxed),
                        pat(p, i),
                        "page {p}"
                    );
                }
            }
        }
        env.barrier(barrier, 2);
        let s = env.dsm.stats();
        println!(
            "RESULT node={} peak={} resident_now={} mincore={}",
            env.me,
            s.resident_peak,
            s.resident_pages,
            env.dsm.resident_pages()
        );
        finish(env, barrier, 3);
    }
    let lines = run_cluster(
        "three_nodes_memory_aggregation",
        3,
        Duration::from_secs(180),
    );
    let peaks = get(&lines, "peak");
    assert_eq!(peaks.len(), 3);
    for p in &peaks {
        let p: usize = p.parse().unwrap();
        assert!(p <= S + BUDGET + 16, "peak resident {p} pages > S + budget");
    }
    for m in get(&lines, "mincore") {
        let m: usize = m.parse().unwrap();
        assert!(m <= S + BUDGET + 16, "mincore resident {m}");
    }
}
