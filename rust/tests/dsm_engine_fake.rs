//! Two real DSM engines in one process, joined by an in-process fake
//! transport (no sockets): every message is encoded with `wire` (pages copied
//! straight from the sender's mapping) and decoded by a real `Decoder` per
//! lane in the receiver's poll, with the receiving engine's `Landing`, so
//! range messages travel as the trains of frames a real transport carries and
//! pages land in place as they do over TCP. Host threads play the vCPUs, touching the
//! nodes' guest mappings (userfaultfd, no KVM).
//!
//! Covers: prefetch bookkeeping (prefetched / used / wasted counters) with
//! and without range transactions, range grants (one request and one grant
//! train per window), upgrade prefetch and recall (a node rewriting pages
//! another node read: a few range upgrades instead of one per page, exact
//! fault counts with it off), eviction under a foreign budget with coherent re-reads,
//! and failed effects of range messages stopping the VM with the page named
//! (a failed send of a range grant; a failed install inside a range grant,
//! which must not be reported `Done`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use dvmm::dsm::auth::NodeKeys;
use dvmm::dsm::engine::ServiceMode;
use dvmm::dsm::protocol::{Msg, NodeId, RangeMsg};
use dvmm::dsm::seal::Protection;
use dvmm::dsm::transport::{Lane, Transport, TransportError, TransportEvent};
use dvmm::dsm::wire::{self, Decoder, Frame, Landing, Limits, PageSource, RangeFrames};
use dvmm::dsm::{DsmConfig, DsmEngine, DsmHandle, StatsSnapshot};
use vmm_sys_util::eventfd::EventFd;

const PAGE: usize = 4096;
const NODES: usize = 2;

/// What a node sent (recorded for the assertions).
#[derive(Debug, Clone)]
enum Sent {
    One(Msg),
    Range(RangeMsg),
}

/// One node's end of the in-process mesh.
struct FakeNode {
    me: NodeId,
    peers: OnceLock<Vec<Weak<FakeNode>>>,
    /// Bytes (sender, lane, bytes) waiting for this node's `poll`.
    inbox: Mutex<VecDeque<(NodeId, Lane, Vec<u8>)>>,
    /// Pages copied into send buffers (one per page sent).
    tx_copies: AtomicU64,
    /// Rung (eventfd) when the inbox gets something: `poll` sleeps on it.
    bell: EventFd,
    /// Receive side per (sender, lane): a real decoder.
    rx: Mutex<HashMap<(NodeId, u8), Decoder>>,
    /// Send side per (receiver, lane): next sequence number. Held while a
    /// frame is delivered, so each lane keeps its order.
    tx: Mutex<HashMap<(NodeId, u8), u64>>,
    sent: Mutex<Vec<Sent>>,
    /// Make every send of a range grant fail (a broken link).
    fail_range_grants: AtomicBool,
    closed: AtomicBool,
    pages: u64,
}

impl FakeNode {
    fn mesh(pages: u64) -> Vec<Arc<FakeNode>> {
        let nodes: Vec<Arc<FakeNode>> = (0..NODES as NodeId)
            .map(|me| {
                Arc::new(FakeNode {
                    me,
                    peers: OnceLock::new(),
                    inbox: Mutex::new(VecDeque::new()),
                    tx_copies: AtomicU64::new(0),
                    bell: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap(),
                    rx: Mutex::new(HashMap::new()),
                    tx: Mutex::new(HashMap::new()),
                    sent: Mutex::new(Vec::new()),
                    fail_range_grants: AtomicBool::new(false),
                    closed: AtomicBool::new(false),
                    pages,
                })
            })
            .collect();
        for n in &nodes {
            let _ = n.peers.set(nodes.iter().map(Arc::downgrade).collect());
        }
        nodes
    }

    fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    /// Encode `frames` frames with `enc(i, seq, out)` on `lane` to `to` and
    /// hand the bytes to its decoder.
    fn transmit(
        &self,
        to: NodeId,
        lane: Lane,
        frames: usize,
        enc: &dyn Fn(usize, u64, &mut Vec<u8>),
    ) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(TransportError::PeerDown(to));
        }
        let peer = self
            .peers
            .get()
            .and_then(|p| p.get(usize::from(to)))
            .and_then(Weak::upgrade)
            .filter(|_| to != self.me)
            .ok_or(TransportError::BadNode(to))?;
        let mut tx = self.tx.lock().unwrap();
        let seq = tx.entry((to, lane as u8)).or_insert(0);
        let mut bytes = Vec::new();
        for i in 0..frames {
            enc(i, *seq, &mut bytes);
            *seq += 1;
        }
        peer.receive(self.me, lane, &bytes);
        Ok(())
    }

    fn receive(&self, from: NodeId, lane: Lane, bytes: &[u8]) {
        self.inbox
            .lock()
            .unwrap()
            .push_back((from, lane, bytes.to_vec()));
        let _ = self.bell.write(1);
    }

    /// Decode what arrived (as a socket would be read: straight into each
    /// lane's decoder), landing pages with `land`.
    fn deliver(&self, events: &mut Vec<TransportEvent>, land: Option<&dyn Landing>) {
        let arrived: Vec<_> = self.inbox.lock().unwrap().drain(..).collect();
        let mut rx = self.rx.lock().unwrap();
        for (from, lane, bytes) in arrived {
            let dec = rx.entry((from, lane as u8)).or_insert_with(|| {
                Decoder::new(
                    Limits {
                        pages: self.pages,
                        nodes: NODES,
                    },
                    0,
                )
            });
            let mut src = &bytes[..];
            'read: while !src.is_empty() {
                if dec.read_from(&mut src).is_err() {
                    break;
                }
                loop {
                    match dec.next_landed(land) {
                        Ok(Some((frame, landed))) => {
                            events.push(TransportEvent::received(from, lane, frame, landed))
                        }
                        Ok(None) => break,
                        Err(e) => {
                            events.push(TransportEvent::PeerDown {
                                node: from,
                                reason: format!("malformed frame: {e}"),
                            });
                            break 'read;
                        }
                    }
                }
            }
        }
    }
}

impl Transport for FakeNode {
    fn me(&self) -> NodeId {
        self.me
    }
    fn nodes(&self) -> usize {
        NODES
    }
    fn send(&self, to: NodeId, lane: Lane, frame: &Frame) -> Result<(), TransportError> {
        if let Frame::Range { msg, data } = frame {
            return self.send_range(to, msg, data.as_deref().unwrap_or(&[]));
        }
        self.transmit(to, lane, 1, &|_, seq, out| wire::encode(frame, seq, out))
    }
    fn send_msg(&self, to: NodeId, msg: &Msg, data: Option<&[u8]>) -> Result<(), TransportError> {
        self.send_msg_from(to, msg, data.as_ref().map(|d| d as &dyn PageSource))
    }
    fn send_msg_from(
        &self,
        to: NodeId,
        msg: &Msg,
        data: Option<&dyn PageSource>,
    ) -> Result<(), TransportError> {
        wire::check_msg_from(msg, data)?;
        self.sent.lock().unwrap().push(Sent::One(*msg));
        let lane = if msg.is_bulk() {
            Lane::Bulk
        } else {
            Lane::Control
        };
        self.transmit(to, lane, 1, &|_, seq, out| {
            wire::encode_msg_from(msg, data, seq, out)
        })?;
        let pages = data.map_or(0, |d| d.bytes() / PAGE) as u64;
        self.tx_copies.fetch_add(pages, Ordering::Relaxed);
        Ok(())
    }
    fn send_range(&self, to: NodeId, msg: &RangeMsg, pages: &[u8]) -> Result<(), TransportError> {
        self.send_range_from(to, msg, &pages)
    }
    fn send_range_from(
        &self,
        to: NodeId,
        msg: &RangeMsg,
        pages: &dyn PageSource,
    ) -> Result<(), TransportError> {
        let train = RangeFrames::from_source(msg, pages)?;
        self.sent.lock().unwrap().push(Sent::Range(msg.clone()));
        if matches!(msg, RangeMsg::Grant { .. }) && self.fail_range_grants.load(Ordering::Relaxed) {
            return Err(TransportError::PeerDown(to));
        }
        let lane = if train.is_bulk() {
            Lane::Bulk
        } else {
            Lane::Control
        };
        self.transmit(to, lane, train.len(), &|i, seq, out| {
            train.encode(i, seq, out)
        })?;
        self.tx_copies
            .fetch_add((pages.bytes() / PAGE) as u64, Ordering::Relaxed);
        Ok(())
    }
    fn page_copies(&self) -> u64 {
        let rx: u64 = self
            .rx
            .lock()
            .unwrap()
            .values()
            .map(|d| d.page_copies())
            .sum();
        rx + self.tx_copies.load(Ordering::Relaxed)
    }
    fn poll_landing(
        &self,
        timeout: Option<Duration>,
        extra: &[RawFd],
        events: &mut Vec<TransportEvent>,
        land: &dyn Landing,
    ) -> Result<u64, TransportError> {
        self.wait(timeout, extra, events, Some(land))
    }
    fn poll(
        &self,
        timeout: Option<Duration>,
        extra: &[RawFd],
        events: &mut Vec<TransportEvent>,
    ) -> Result<u64, TransportError> {
        self.wait(timeout, extra, events, None)
    }
    fn shutdown(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

impl FakeNode {
    /// `poll`: deliver what arrived, or sleep on the bell and the extra fds.
    fn wait(
        &self,
        timeout: Option<Duration>,
        extra: &[RawFd],
        events: &mut Vec<TransportEvent>,
        land: Option<&dyn Landing>,
    ) -> Result<u64, TransportError> {
        self.deliver(events, land);
        let ms = if !events.is_empty() || self.closed.load(Ordering::Relaxed) {
            0
        } else {
            timeout.map_or(100, |t| t.as_micros().div_ceil(1000).min(100) as i32)
        };
        let mut fds: Vec<libc::pollfd> = extra
            .iter()
            .chain(std::iter::once(&self.bell.as_raw_fd()))
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        let mut ready = 0;
        if r > 0 {
            for (k, p) in fds.iter().enumerate().take(extra.len()) {
                if p.revents != 0 {
                    ready |= 1 << k;
                }
            }
        }
        // Non-blocking: nothing to read is not an error here.
        let _ = self.bell.read();
        self.deliver(events, land);
        Ok(ready)
    }
}

/// One node's guest RAM: a memfd mapped twice (the guest's view, the engine's).
struct Vm {
    memfd: RawFd,
    guest: usize,
    engine: usize,
}

impl Vm {
    fn new(pages: usize) -> Vm {
        let len = pages * PAGE;
        // SAFETY: plain syscalls creating and mapping a fresh memfd; results checked.
        unsafe {
            let fd = libc::memfd_create(c"dsm-fake".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let g = libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0);
            let e = libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0);
            assert!(g != libc::MAP_FAILED && e != libc::MAP_FAILED);
            Vm {
                memfd: fd,
                guest: g as usize,
                engine: e as usize,
            }
        }
    }

    /// The first word of `page` in the guest view (faults into the engine).
    fn word(&self, page: usize) -> *mut u64 {
        (self.guest + page * PAGE) as *mut u64
    }

    fn read(&self, page: usize) -> u64 {
        // SAFETY: the mapping lives for the test process (never unmapped) and
        // `page` is inside it.
        unsafe { std::ptr::read_volatile(self.word(page)) }
    }

    fn write(&self, page: usize, v: u64) {
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_volatile(self.word(page), v) }
    }
}

struct Cluster {
    vms: Vec<Arc<Vm>>,
    links: Vec<Arc<FakeNode>>,
    dsm: Vec<DsmHandle>,
}

struct Opts {
    per_node: usize,
    ranges: bool,
    prefetch: u32,
    /// Foreign budget of node 1 (pages).
    budget: Option<usize>,
    /// Upgrade prefetch (with recall), see `dsm::engine`.
    upgrades: bool,
}

fn cluster(o: &Opts) -> Cluster {
    let total = NODES * o.per_node;
    let links = FakeNode::mesh(total as u64);
    let mut keys = NodeKeys::generate(NODES, Protection::Encrypt).expect("keys");
    let addrs: Vec<SocketAddr> = (1..=NODES)
        .map(|i| format!("127.0.0.1:{i}").parse().unwrap())
        .collect();
    let b = (o.per_node * PAGE) as u64;
    let vms: Vec<Arc<Vm>> = (0..NODES).map(|_| Arc::new(Vm::new(total))).collect();
    let mut dsm = Vec::new();
    for (i, k) in keys.drain(..).enumerate() {
        let mut cfg = DsmConfig::new(
            i as NodeId,
            addrs.clone(),
            k,
            (0..NODES as u64).map(|n| n * b..(n + 1) * b).collect(),
            vms[i].memfd,
            vms[i].guest,
            vms[i].engine,
        );
        cfg.service = ServiceMode::Legacy;
        cfg.ranges = o.ranges;
        cfg.prefetch_max_pages = o.prefetch;
        cfg.foreign_budget = if i == 1 { o.budget } else { None };
        cfg.upgrade_prefetch = o.upgrades;
        cfg.recall = o.upgrades;
        let t: Arc<dyn Transport> = links[i].clone();
        // SAFETY: both mappings cover the whole memfd and are never unmapped
        // (leaked for the life of the test process); the memfd stays open.
        dsm.push(unsafe { DsmEngine::start_with(cfg, t) }.expect("engine starts"));
    }
    Cluster { vms, links, dsm }
}

impl Cluster {
    fn stats(&self, n: usize) -> StatsSnapshot {
        self.dsm[n].stats()
    }

    /// Node `n` runs `f` on a host thread with a deadline (a fault the engines
    /// never resolve fails the test instead of hanging it).
    fn on<T: Send + 'static>(&self, n: usize, f: impl FnOnce(&Vm) -> T + Send + 'static) -> T {
        let vm = self.vms[n].clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f(&vm));
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(v) => v,
            Err(_) => panic!(
                "node {n}'s accesses did not finish; errors: {:?}",
                self.dsm.iter().map(|d| d.error()).collect::<Vec<_>>()
            ),
        }
    }

    fn no_errors(&self) {
        for (i, d) in self.dsm.iter().enumerate() {
            assert!(d.error().is_none(), "node {i}: {:?}", d.error());
        }
    }

    /// Wait until `pred` holds for node `n`'s counters.
    fn wait_stats(&self, n: usize, what: &str, pred: impl Fn(&StatsSnapshot) -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        while !pred(&self.stats(n)) {
            assert!(
                Instant::now() < end,
                "node {n}: never {what}: {:?}",
                self.stats(n)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn shutdown(self) {
        for d in &self.dsm {
            d.release_memory();
        }
    }
}

/// Node 0 writes `value(p)` into each of its pages, node 1 reads them all in
/// order and checks them. Returns node 1's counters.
fn sequential_read(c: &Cluster, per_node: usize, salt: u64) -> StatsSnapshot {
    c.on(0, move |vm| {
        for p in 0..per_node {
            vm.write(p, salt ^ (p as u64 + 1));
        }
    });
    let bad = c.on(1, move |vm| {
        (0..per_node)
            .filter(|&p| vm.read(p) != salt ^ (p as u64 + 1))
            .collect::<Vec<_>>()
    });
    assert!(
        bad.is_empty(),
        "node 1 read wrong contents on pages {bad:?}"
    );
    c.no_errors();
    c.stats(1)
}

fn prefetch_bookkeeping(ranges: bool) {
    const N: usize = 256;
    let c = cluster(&Opts {
        per_node: N,
        ranges,
        prefetch: 64,
        budget: None,
        upgrades: true,
    });
    sequential_read(&c, N, 0);
    // The last window may still be being installed when the reader is
    // through: wait for it.
    c.wait_stats(1, "installed every page", |s| s.page_copies == N as u64);
    let s = c.stats(1);
    // The reader misses (faults on a page not on its way) only where the
    // prefetched pages ran out; late hits depend on the scheduling.
    assert!(s.read_faults - s.prefetch_late < N as u64 / 4, "{s:?}");
    assert!(s.prefetch_requests > 0, "{s:?}");
    assert!(s.prefetched_pages + s.prefetch_late > N as u64 / 2, "{s:?}");
    assert_eq!(s.prefetch_wasted, 0, "{s:?}");
    // Pages the stream went past are used (the pages after its last fault
    // are neither used nor wasted yet).
    assert!(s.prefetch_used > 0, "{s:?}");
    // (Late hits count as used, not as prefetched: a fault waited for them.)
    assert!(
        s.prefetch_used <= s.prefetched_pages + s.prefetch_late,
        "{s:?}"
    );
    let s0 = c.stats(0);
    assert_eq!(
        s0.pages_sent, N as u64,
        "node 0 sends every page once: {s0:?}"
    );
    assert_eq!(s.pages_received, N as u64, "{s:?}");
    // Copies of page contents: the sender's transport copies each page
    // from its mapping into the send buffer once, the receiver's decoder
    // writes it into its guest memory once (it lands in place; the fake's
    // "socket" read is the kernel's copy over TCP); nothing else copies.
    assert_eq!(s.pages_moved, N as u64, "{s:?}");
    assert_eq!(s0.page_copies, N as u64, "{s0:?}");
    assert_eq!(s.page_copies, N as u64, "{s:?}");
    let ranges_sent = |n: usize| {
        c.links[n]
            .sent()
            .into_iter()
            .filter(|m| matches!(m, Sent::Range(_)))
            .count()
    };
    let prefetches = c.links[1]
        .sent()
        .into_iter()
        .filter(|m| matches!(m, Sent::One(Msg::Prefetch { .. })))
        .count();
    if ranges {
        assert_eq!(prefetches, 0, "range mode sent Prefetch messages");
        let trains: Vec<usize> = c.links[0]
            .sent()
            .into_iter()
            .filter_map(|m| match m {
                Sent::Range(g @ RangeMsg::Grant { .. }) => Some(g.data_pages()),
                _ => None,
            })
            .collect();
        assert!(
            trains.iter().any(|&k| k >= 8),
            "no range grant of 8 pages or more: {trains:?}"
        );
        // Every range grant is answered with its range Done (the last one
        // may still be on its way when the reader is through).
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let dones = c.links[1]
                .sent()
                .into_iter()
                .filter(|m| matches!(m, Sent::Range(RangeMsg::Done { .. })))
                .count();
            if dones == trains.len() {
                break;
            }
            assert!(
                Instant::now() < end,
                "{dones} Done for {} grants",
                trains.len()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    } else {
        assert!(prefetches > 0);
        assert_eq!(ranges_sent(0) + ranges_sent(1), 0, "ranges sent while off");
    }
    c.shutdown();
}

#[test]
fn prefetch_bookkeeping_with_ranges() {
    prefetch_bookkeeping(true);
}

#[test]
fn prefetch_bookkeeping_without_ranges() {
    prefetch_bookkeeping(false);
}

/// Node 0 rewrites its pages after node 1 has read them (an array published
/// each pass); returns node 0's write-protect faults of the rewrite.
fn rewrite_after_read(c: &Cluster, n: usize, salt: u64) -> u64 {
    let got = c.on(1, move |vm| (0..n).map(|p| vm.read(p)).collect::<Vec<_>>());
    assert!(
        got.iter().enumerate().all(|(p, &v)| v == salt ^ p as u64),
        "node 1 read stale pages"
    );
    let before = c.stats(0).wp_faults;
    c.on(0, move |vm| {
        (0..n).for_each(|p| vm.write(p, (salt + 1) ^ p as u64))
    });
    c.stats(0).wp_faults - before
}

/// A node rewriting pages another node read asks for write access to the rest
/// of the run with range upgrades (not one invalidation per page); the next
/// pass recalls the window at once; the reader then sees every new value.
fn upgrade_prefetch(on: bool) {
    const N: usize = 64;
    let c = cluster(&Opts {
        per_node: N,
        ranges: true,
        prefetch: 64,
        budget: None,
        upgrades: on,
    });
    c.on(0, |vm| (0..N).for_each(|p| vm.write(p, p as u64)));
    let first = rewrite_after_read(&c, N, 0);
    let second = rewrite_after_read(&c, N, 1);
    let third = rewrite_after_read(&c, N, 2);
    let back = c.on(1, |vm| (0..N).map(|p| vm.read(p)).collect::<Vec<_>>());
    assert!(
        back.iter().enumerate().all(|(p, &v)| v == 3 ^ p as u64),
        "stale after rewrites"
    );
    c.no_errors();
    let s = c.stats(0);
    if on {
        // 0 (new stream), 1 (window 4), 6 (8), 15 (16), 32 (32): a handful.
        assert!(first <= 8, "first rewrite: {first} write-protect faults");
        // Recalled: the first fault asks for the window the last pass reached.
        assert!(
            second <= 3 && third <= 3,
            "later rewrites: {second}, {third} faults"
        );
        assert!(s.upgrade_prefetch_requests > 0, "{s:?}");
        assert!(s.upgrade_prefetch_used > 0, "{s:?}");
    } else {
        assert_eq!((first, second, third), (N as u64, N as u64, N as u64));
        assert_eq!(s.upgrade_prefetch_requests, 0, "{s:?}");
    }
    c.shutdown();
}

#[test]
fn rewriting_pages_read_elsewhere_upgrades_ahead() {
    upgrade_prefetch(true);
}

#[test]
fn without_upgrade_prefetch_each_page_is_upgraded_alone() {
    upgrade_prefetch(false);
}

/// Prefetched pages invalidated before the reader gets to them are wasted.
#[test]
fn invalidated_prefetched_pages_are_wasted() {
    let c = cluster(&Opts {
        per_node: 64,
        ranges: true,
        prefetch: 64,
        budget: None,
        upgrades: true,
    });
    c.on(0, |vm| (0..16).for_each(|p| vm.write(p, 100 + p as u64)));
    // Two sequential faults start a stream: pages 2.. are prefetched.
    assert_eq!(c.on(1, |vm| (vm.read(0), vm.read(1))), (100, 101));
    c.wait_stats(1, "received prefetched pages", |s| s.prefetched_pages >= 4);
    // The home writes them: node 1's copies are invalidated unread.
    c.on(0, |vm| (2..6).for_each(|p| vm.write(p, 200 + p as u64)));
    c.wait_stats(1, "counted wasted pages", |s| s.prefetch_wasted >= 4);
    let s = c.stats(1);
    assert!(s.invalidations_received >= 4, "{s:?}");
    // And node 1 reads the new contents.
    assert_eq!(c.on(1, |vm| vm.read(3)), 203);
    c.no_errors();
    c.shutdown();
}

/// A foreign budget bounds what node 1 keeps of node 0's pages while it
/// reads all of them with range prefetch; pages evicted and read again are
/// current.
#[test]
fn eviction_keeps_the_budget_and_coherence() {
    const N: usize = 256;
    const BUDGET: usize = 16;
    let c = cluster(&Opts {
        per_node: N,
        ranges: true,
        prefetch: 64,
        budget: Some(BUDGET),
        upgrades: true,
    });
    let s = sequential_read(&c, N, 0);
    assert!(s.evictions > 0, "{s:?}");
    assert!(
        s.resident_peak <= (BUDGET + 16) as u64,
        "peak resident {} pages > budget {BUDGET}: {s:?}",
        s.resident_peak
    );
    // Node 0 writes everything again (invalidating what node 1 still holds);
    // node 1 reads the new contents, evicted pages included.
    let s = sequential_read(&c, N, 0x5555);
    assert!(s.resident_peak <= (BUDGET + 16) as u64, "{s:?}");
    c.shutdown();
}

/// A range grant whose send fails stops the VM, naming the pages.
#[test]
fn failed_range_grant_send_stops_the_vm() {
    let c = cluster(&Opts {
        per_node: 64,
        ranges: true,
        prefetch: 64,
        budget: None,
        upgrades: true,
    });
    c.on(0, |vm| (0..16).for_each(|p| vm.write(p, 7)));
    c.links[0].fail_range_grants.store(true, Ordering::Relaxed);
    // Single-page grants still work; the prefetch of 2.. is a range grant.
    assert_eq!(c.on(1, |vm| (vm.read(0), vm.read(1))), (7, 7));
    let end = Instant::now() + Duration::from_secs(20);
    let e = loop {
        if let Some(e) = c.dsm[0].error() {
            break e;
        }
        assert!(Instant::now() < end, "node 0 reported no error");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(
        e.contains("sending range Grant for pages 2..") && e.contains("to node 1"),
        "{e}"
    );
    c.shutdown();
}

/// An install inside a range grant that fails stops the VM naming the page,
/// and the grant is never reported `Done` (the home would believe node 1
/// holds pages it does not).
#[test]
fn failed_range_install_is_not_reported_done() {
    let c = cluster(&Opts {
        per_node: 64,
        ranges: true,
        prefetch: 64,
        budget: None,
        upgrades: true,
    });
    c.on(0, |vm| (0..16).for_each(|p| vm.write(p, 9)));
    // Page 5 appears in node 1's memfd behind its engine's back: the range
    // grant's UFFDIO_COPY for it finds it there (EEXIST).
    // SAFETY: the engine mapping is valid and page 5 is inside it.
    unsafe { std::ptr::write_volatile((c.vms[1].engine + 5 * PAGE) as *mut u64, 0xbad) };
    assert_eq!(c.on(1, |vm| (vm.read(0), vm.read(1))), (9, 9));
    let end = Instant::now() + Duration::from_secs(20);
    let e = loop {
        if let Some(e) = c.dsm[1].error() {
            break e;
        }
        assert!(Instant::now() < end, "node 1 reported no error");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(e.contains("page 5"), "{e}");
    std::thread::sleep(Duration::from_millis(50));
    let done: Vec<_> = c.links[1]
        .sent()
        .into_iter()
        .filter(|m| matches!(m, Sent::Range(RangeMsg::Done { .. })))
        .collect();
    assert!(
        done.is_empty(),
        "Done sent after a failed install: {done:?}"
    );
    c.shutdown();
}

#[test]
fn home_reads_back_its_own_pages_with_range_prefetch() {
    const N: usize = 256;
    let c = cluster(&Opts {
        per_node: N,
        ranges: true,
        prefetch: 64,
        budget: None,
        upgrades: true,
    });
    // Node 1 writes every page homed at node 0 (taking them modified), then
    // node 0 reads them back in order: its own pages, held elsewhere.
    c.on(1, |vm| (0..N).for_each(|p| vm.write(p, 0xfeed ^ p as u64)));
    let bad = c.on(0, |vm| {
        (0..N)
            .filter(|&p| vm.read(p) != 0xfeed ^ p as u64)
            .collect::<Vec<_>>()
    });
    assert!(
        bad.is_empty(),
        "node 0 read wrong contents on pages {bad:?}"
    );
    c.no_errors();
    let s = c.stats(0);
    assert_eq!(s.pages_received, N as u64, "{s:?}");
    // The read-back was prefetched: most pages arrived before a fault asked.
    assert!(s.prefetch_requests > 0, "{s:?}");
    assert!(s.prefetched_pages + s.prefetch_late > N as u64 / 2, "{s:?}");
    assert!(s.read_faults - s.prefetch_late < N as u64 / 4, "{s:?}");
    // As range requests to its own directory (none as `Prefetch` messages).
    let prefetches = c.links[0]
        .sent()
        .into_iter()
        .filter(|m| matches!(m, Sent::One(Msg::Prefetch { .. })))
        .count();
    assert_eq!(prefetches, 0);
    // Node 1 keeps read-shared copies, still readable without a fault.
    let r1 = c.stats(1).read_faults;
    assert_eq!(c.on(1, |vm| vm.read(7)), 0xfeed ^ 7);
    assert_eq!(c.stats(1).read_faults, r1);
    c.shutdown();
}
