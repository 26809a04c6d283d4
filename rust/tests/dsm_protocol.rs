//! Property tests of the coherence protocol state machine (dsm::protocol).
//!
//! A simulated cluster of N nodes, each with a model memory (one counter per
//! page), runs random interleavings of reads, writes and evictions, with random
//! message delivery order: every (from, to) pair has two FIFO lanes (control and
//! bulk, as the real transport) delivered independently. Checked at every step:
//! at most one writable copy and no other copy beside it; every valid copy holds
//! the value of the last write (so every read returns it); copysets match the
//! nodes' states; and in the end every blocked access completes (no deadlock).
//! Sequential prefetch (`Node::prefetch`: batched read requests, declined
//! per page when busy at the home) is one of the random operations.
//!
//! Range transactions (`Node::request_range`, `RangeMsg`) are random
//! operations too: read and write ranges, waiting or declining at busy pages,
//! with or without threads then touching every page, overlapping single-page
//! traffic, prefetch, evictions and each other. A range message may overtake
//! an earlier message of its lane only if they share no page (as the engine's
//! hold window reorders). Further invariants: every grant (single or range)
//! carries, per page, the version the home's directory has for the page and
//! never an older one than any grant before, and its data is the last write;
//! all valid copies of a page have the same version (the latest granted); at
//! quiescence no request is left pending.
//!
//! A blocked access is modelled like a thread blocked in userfaultfd: it calls
//! `fault` once, then sleeps until the engine wakes its page (install, wake,
//! write-unprotect) and only then faults again, so a lost wake-up shows up
//! as an access blocked forever.

use std::collections::{BTreeMap, HashSet, VecDeque};

use std::ops::Range;

use dvmm::dsm::protocol::{
    Access, CacheState, Data, Effect, FaultOutcome, Keep, Msg, Node, NodeId, OnBusy, ProtocolError,
    RangeMsg, MAX_RANGE,
};
use proptest::prelude::*;

type Lane = (NodeId, NodeId, bool);

/// A message in flight: single-page or range.
#[derive(Debug, Clone)]
enum M {
    P(Msg),
    R(RangeMsg),
}

impl M {
    fn pages(&self) -> Range<u64> {
        match self {
            M::P(m) => m.page()..m.page() + 1,
            M::R(m) => m.pages(),
        }
    }
}

fn overlap(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

struct Sim {
    nodes: Vec<Node>,
    mem: Vec<Vec<Option<u64>>>,
    truth: Vec<u64>,
    /// Highest version any grant has carried for each page (1 at start).
    granted: Vec<u64>,
    /// Messages per lane, each with its payload (page contents in slot order).
    lanes: BTreeMap<Lane, VecDeque<(M, Vec<u64>)>>,
    blocked: Vec<Vec<(u64, Access)>>,
    done_accesses: usize,
    reads: usize,
    prefetches: usize,
    ranges: usize,
    range_grants: usize,
    /// Every message delivered: (from, to, message).
    delivered: Vec<(NodeId, NodeId, M)>,
    /// Pages whose blocked threads have been woken (install, wake).
    woken: Vec<HashSet<u64>>,
}

impl Sim {
    fn new(n: usize, per_node: u64) -> Sim {
        let homes: Vec<_> = (0..n as u64)
            .map(|i| i * per_node..(i + 1) * per_node)
            .collect();
        let pages = n as u64 * per_node;
        Sim {
            nodes: (0..n)
                .map(|i| Node::new(i as NodeId, homes.clone()).unwrap())
                .collect(),
            mem: vec![vec![None; pages as usize]; n],
            truth: vec![0; pages as usize],
            granted: vec![1; pages as usize],
            lanes: BTreeMap::new(),
            blocked: vec![Vec::new(); n],
            done_accesses: 0,
            reads: 0,
            prefetches: 0,
            ranges: 0,
            range_grants: 0,
            delivered: Vec::new(),
            woken: vec![HashSet::new(); n],
        }
    }

    fn pages(&self) -> u64 {
        self.truth.len() as u64
    }

    /// Execute node `n`'s effects; `incoming` is the message being handled
    /// (with its payload), whose contents `Install` takes.
    fn apply(&mut self, n: NodeId, effects: Vec<Effect>, incoming: Option<(&M, &[u64])>) {
        let ni = n as usize;
        for e in effects {
            match e {
                Effect::Send { to, msg } => {
                    let data = match msg {
                        Msg::Grant {
                            data: Data::Page,
                            page,
                            ..
                        } => vec![self.mem[ni][page as usize].expect("sending a page not held")],
                        _ => vec![],
                    };
                    self.lanes
                        .entry((n, to, msg.is_bulk()))
                        .or_default()
                        .push_back((M::P(msg), data));
                }
                Effect::SendRange { to, msg } => {
                    let mut data = Vec::new();
                    if let RangeMsg::Grant { first, data: d, .. } = &msg {
                        for (i, d) in d.iter().enumerate() {
                            if *d == Data::Page {
                                let p = *first as usize + i;
                                data.push(self.mem[ni][p].expect("sending a page not held"));
                            }
                        }
                        assert_eq!(data.len(), msg.data_pages());
                    }
                    self.lanes
                        .entry((n, to, msg.is_bulk()))
                        .or_default()
                        .push_back((M::R(msg), data));
                }
                Effect::Install { page, zero, .. } => {
                    assert!(self.mem[ni][page as usize].is_none(), "install over a copy");
                    let v = if zero {
                        0
                    } else {
                        let (m, payload) = incoming.expect("install without a message");
                        let slot = match m {
                            M::P(_) => 0,
                            M::R(r) => r.slot_of(page).expect("install of a page not carried"),
                        };
                        payload[slot]
                    };
                    self.mem[ni][page as usize] = Some(v);
                    self.woken[ni].insert(page);
                }
                Effect::Drop { page } => self.mem[ni][page as usize] = None,
                Effect::MakeWritable { page } | Effect::Wake { page } => {
                    self.woken[ni].insert(page);
                }
                Effect::WriteProtect { .. } => {}
            }
        }
    }

    /// Try an access; returns true if it completed.
    fn try_access(&mut self, n: usize, page: u64, access: Access, first: bool) -> bool {
        if !self.nodes[n].can_access(page, access) {
            // A blocked thread faults again only once woken.
            if !first && !self.woken[n].remove(&page) {
                return false;
            }
            let mut out = Vec::new();
            let r = self.nodes[n].fault(page, access, &mut out).unwrap();
            self.apply(n as NodeId, out, None);
            if r == FaultOutcome::Waiting {
                return false;
            }
            assert!(
                self.nodes[n].can_access(page, access),
                "resolved but no access"
            );
        }
        let v = self.mem[n][page as usize].expect("access to a page without memory");
        match access {
            Access::Read => {
                assert_eq!(v, self.truth[page as usize], "read returned a stale value");
                self.reads += 1;
            }
            Access::Write => {
                assert_eq!(v, self.truth[page as usize]);
                self.truth[page as usize] += 1;
                self.mem[n][page as usize] = Some(v + 1);
            }
        }
        self.done_accesses += 1;
        true
    }

    fn access(&mut self, n: usize, page: u64, access: Access) {
        if !self.try_access(n, page, access, true) {
            self.blocked[n].push((page, access));
        }
    }

    fn prefetch(&mut self, n: usize, after: u64, max: u32) {
        let mut out = Vec::new();
        let (start, count) = self.nodes[n].prefetch(after, max, &mut out).unwrap();
        if count > 0 {
            for p in start..start + u64::from(count) {
                assert!(self.nodes[n].is_pending(p));
                assert_eq!(self.nodes[n].state(p).unwrap().0, CacheState::Invalid);
            }
            self.prefetches += 1;
        }
        self.apply(n as NodeId, out, None);
    }

    /// Range request by node `n` for `page..page + count` (clamped to the
    /// home range of `page`); with `touch`, a thread then accesses every page.
    fn range(
        &mut self,
        n: usize,
        page: u64,
        count: u32,
        access: Access,
        busy: OnBusy,
        touch: bool,
    ) {
        let home = self.nodes[n].home_of(page).unwrap();
        let end = (0..self.pages())
            .rev()
            .find(|&p| self.nodes[n].home_of(p).unwrap() == home)
            .unwrap()
            + 1;
        let count = count.min((end - page) as u32);
        let mut out = Vec::new();
        let runs = self.nodes[n]
            .request_range(page, count, access, busy, &mut out)
            .unwrap();
        assert_eq!(runs.len(), out.len(), "one message per run");
        for &(first, c) in &runs {
            assert!(c >= 1 && first >= page && first + u64::from(c) <= page + u64::from(count));
            for p in first..first + u64::from(c) {
                assert!(self.nodes[n].is_pending(p));
            }
        }
        if !runs.is_empty() {
            self.ranges += 1;
        }
        self.apply(n as NodeId, out, None);
        if touch {
            for p in page..page + u64::from(count) {
                self.access(n, p, access);
            }
        }
    }

    /// Checks at the delivery of a grant to `to`: per page, the version is the
    /// directory's (the transaction is in flight) and never older than any
    /// grant before; data carried is the last write.
    fn check_grant(&mut self, m: &M, payload: &[u64]) {
        let check = |sim: &mut Sim, page: u64, version: u64, data: Data, slot: usize| {
            let home = sim.nodes[0].home_of(page).unwrap() as usize;
            let dir_version = sim.nodes[home].dir_entry(page).unwrap().2;
            assert_eq!(
                version, dir_version,
                "page {page}: grant of another version"
            );
            assert!(
                version >= sim.granted[page as usize],
                "page {page}: grant of a stale version {version}"
            );
            sim.granted[page as usize] = version;
            if data == Data::Page {
                assert_eq!(
                    payload[slot], sim.truth[page as usize],
                    "page {page}: stale data"
                );
            }
            if data == Data::Zero {
                assert_eq!(
                    sim.truth[page as usize], 0,
                    "page {page}: zero for a written page"
                );
            }
        };
        match m {
            M::P(Msg::Grant {
                page,
                version,
                data,
                ..
            }) => check(self, *page, *version, *data, 0),
            M::R(r @ RangeMsg::Grant { versions, data, .. }) => {
                self.range_grants += 1;
                for (p, (v, d)) in r.pages().zip(versions.iter().zip(data.iter())) {
                    check(self, p, *v, *d, r.slot_of(p).unwrap_or(0));
                }
            }
            _ => {}
        }
    }

    fn retry(&mut self, n: usize) {
        let list = std::mem::take(&mut self.blocked[n]);
        for (page, access) in list {
            if !self.try_access(n, page, access, false) {
                self.blocked[n].push((page, access));
            }
        }
    }

    fn evict(&mut self, n: usize, page: u64) {
        let mut out = Vec::new();
        self.nodes[n].evict(page, &mut out).unwrap();
        self.apply(n as NodeId, out, None);
    }

    /// Deliver the head of the `k`-th non-empty lane; false if all are empty.
    fn deliver(&mut self, k: usize, retry: bool) -> bool {
        self.deliver_nth(k, 0, retry)
    }

    /// Deliver a message of the `k`-th non-empty lane that is the oldest one for
    /// its page in that lane (the `j`-th such, modulo their number): the
    /// engine's hold window defers an invalidation or fetch of a held page and
    /// keeps later messages for that page behind it, but lets messages for
    /// other pages overtake it. False if every lane is empty.
    fn deliver_nth(&mut self, k: usize, j: usize, retry: bool) -> bool {
        let nonempty: Vec<Lane> = self
            .lanes
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(l, _)| *l)
            .collect();
        if nonempty.is_empty() {
            return false;
        }
        let lane = nonempty[k % nonempty.len()];
        let q = self.lanes.get_mut(&lane).unwrap();
        let firsts: Vec<usize> = (0..q.len())
            .filter(|&i| {
                let pi = q[i].0.pages();
                q.iter().take(i).all(|(m, _)| !overlap(&m.pages(), &pi))
            })
            .collect();
        let (msg, payload) = q.remove(firsts[j % firsts.len()]).unwrap();
        let (from, to, _) = lane;
        self.check_grant(&msg, &payload);
        let mut out = Vec::new();
        let r = match &msg {
            M::P(m) => self.nodes[to as usize].handle(from, *m, &mut out),
            M::R(m) => self.nodes[to as usize].handle_range(from, m, &mut out),
        };
        r.unwrap_or_else(|e| panic!("protocol error at node {to}: {e} ({msg:?})"));
        self.apply(to, out, Some((&msg, &payload)));
        self.delivered.push((from, to, msg));
        if retry {
            self.retry(to as usize);
        }
        true
    }

    /// Deliver the head of lane (from, to, bulk); false if it is empty.
    fn deliver_lane(&mut self, from: NodeId, to: NodeId, bulk: bool) -> bool {
        let nonempty: Vec<Lane> = self
            .lanes
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(l, _)| *l)
            .collect();
        match nonempty.iter().position(|l| *l == (from, to, bulk)) {
            Some(k) => self.deliver_nth(k, 0, false),
            None => false,
        }
    }

    /// Deliver everything (oldest lane first), retrying blocked accesses.
    fn drain(&mut self) {
        loop {
            for node in 0..self.nodes.len() {
                self.retry(node);
            }
            if !self.deliver(0, true) {
                break;
            }
            self.check();
        }
        for node in 0..self.nodes.len() {
            assert!(self.blocked[node].is_empty(), "node {node} blocked");
            assert!(self.nodes[node].dir_idle());
        }
    }

    /// Range messages delivered so far, of the kind `f` selects.
    fn count_range(&self, f: impl Fn(&RangeMsg) -> bool) -> usize {
        self.delivered
            .iter()
            .filter(|(_, _, m)| matches!(m, M::R(r) if f(r)))
            .count()
    }

    /// Single-page messages delivered so far, of the kind `f` selects.
    fn count_page(&self, f: impl Fn(&Msg) -> bool) -> usize {
        self.delivered
            .iter()
            .filter(|(_, _, m)| matches!(m, M::P(p) if f(p)))
            .count()
    }

    fn check(&self) {
        let n = self.nodes.len();
        for p in 0..self.pages() {
            let states: Vec<_> = (0..n).map(|i| self.nodes[i].state(p).unwrap()).collect();
            // All valid copies have one version: the latest granted.
            for (i, s) in states.iter().enumerate() {
                if s.0 != CacheState::Invalid {
                    assert_eq!(
                        s.2, self.granted[p as usize],
                        "page {p} node {i}: a valid copy of an old version"
                    );
                }
            }
            let writers = states
                .iter()
                .filter(|s| s.0 == CacheState::Modified)
                .count();
            assert!(writers <= 1, "page {p}: {writers} writable copies");
            if writers == 1 {
                let valid = states.iter().filter(|s| s.0 != CacheState::Invalid).count();
                assert_eq!(valid, 1, "page {p}: a writable copy beside other copies");
            }
            for (i, s) in states.iter().enumerate() {
                let m = self.mem[i][p as usize];
                match s.0 {
                    CacheState::Invalid => assert_eq!(m, None, "page {p} node {i}: stale memory"),
                    _ if s.1 => assert_eq!(
                        m,
                        Some(self.truth[p as usize]),
                        "page {p} node {i}: copy differs from the last write"
                    ),
                    _ => {
                        assert_eq!(m, None);
                        assert_eq!(self.truth[p as usize], 0, "untouched page written");
                    }
                }
            }
            // Copyset consistency when the home is idle: holders == valid copies.
            let home = self.nodes[0].home_of(p).unwrap() as usize;
            if self.nodes[home].dir_idle() {
                let (holders, exclusive, version) = self.nodes[home].dir_entry(p).unwrap();
                for (i, s) in states.iter().enumerate() {
                    let held = holders & (1 << i) != 0;
                    let in_flight = self.lanes.values().any(|q| !q.is_empty());
                    if !in_flight {
                        assert_eq!(held, s.0 != CacheState::Invalid, "page {p} node {i}");
                        if held {
                            assert_eq!(s.2, version, "page {p} node {i}: version");
                        }
                    }
                }
                if exclusive {
                    assert_eq!(holders.count_ones(), 1);
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Access {
        node: usize,
        page: u64,
        write: bool,
    },
    Evict {
        node: usize,
        page: u64,
    },
    /// Sequential prefetch after `page` (as the engine issues after a read
    /// fault): up to `max` pages in one message.
    Prefetch {
        node: usize,
        page: u64,
        max: u32,
    },
    /// A range request (`request_range`) for up to `count` pages from `page`.
    Range {
        node: usize,
        page: u64,
        count: u32,
        write: bool,
        wait: bool,
        touch: bool,
    },
    Deliver(usize),
    /// Per-page FIFO only (the hold window's deferral).
    DeliverOutOfOrder(usize, usize),
    Retry(usize),
}

fn op(n: usize, pages: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..n, 0..pages, any::<bool>()).prop_map(|(node, page, write)| Op::Access { node, page, write }),
        1 => (0..n, 0..pages).prop_map(|(node, page)| Op::Evict { node, page }),
        2 => (0..n, 0..pages, 1u32..=6).prop_map(|(node, page, max)| Op::Prefetch { node, page, max }),
        3 => (0..n, 0..pages, 1u32..=8, any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(node, page, count, write, wait, touch)| Op::Range { node, page, count, write, wait, touch }),
        4 => (0..64usize).prop_map(Op::Deliver),
        2 => (0..64usize, 0..8usize).prop_map(|(k, j)| Op::DeliverOutOfOrder(k, j)),
        1 => (0..n).prop_map(Op::Retry),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, u64, Vec<Op>, Vec<usize>)> {
    (2usize..=4, 1u64..=6).prop_flat_map(|(n, per)| {
        (
            Just(n),
            Just(per),
            prop::collection::vec(op(n, n as u64 * per), 1..400),
            prop::collection::vec(0usize..64, 0..64),
        )
    })
}

fn run(n: usize, per: u64, ops: &[Op], drain: &[usize]) {
    let mut sim = Sim::new(n, per);
    for o in ops {
        match *o {
            Op::Access { node, page, write } => {
                let a = if write { Access::Write } else { Access::Read };
                sim.access(node, page, a)
            }
            Op::Evict { node, page } => sim.evict(node, page),
            Op::Prefetch { node, page, max } => sim.prefetch(node, page, max),
            Op::Range {
                node,
                page,
                count,
                write,
                wait,
                touch,
            } => {
                let a = if write { Access::Write } else { Access::Read };
                let b = if wait { OnBusy::Wait } else { OnBusy::Decline };
                sim.range(node, page, count, a, b, touch)
            }
            Op::Deliver(k) => {
                sim.deliver(k, false);
            }
            Op::DeliverOutOfOrder(k, j) => {
                sim.deliver_nth(k, j, false);
            }
            Op::Retry(node) => sim.retry(node),
        }
        sim.check();
    }
    // Drain: every blocked access must complete (no deadlock, no livelock).
    let mut steps = 0usize;
    let mut i = 0usize;
    loop {
        for node in 0..n {
            sim.retry(node);
        }
        let k = drain.get(i).copied().unwrap_or(i);
        i += 1;
        if !sim.deliver(k, true) {
            break;
        }
        sim.check();
        steps += 1;
        assert!(steps < 100_000, "no quiescence");
    }
    for node in 0..n {
        assert!(sim.blocked[node].is_empty(), "node {node} blocked forever");
        assert!(
            sim.nodes[node].dir_idle(),
            "node {node}: transaction never ended"
        );
        for p in 0..sim.pages() {
            assert!(
                !sim.nodes[node].is_pending(p),
                "node {node} page {p}: request never answered"
            );
        }
    }
    sim.check();
    if std::env::var_os("DSM_SIM_STATS").is_some() {
        eprintln!(
            "n={n} per={per} ops={} accesses={} ranges={} range_grants={} prefetches={}",
            ops.len(),
            sim.done_accesses,
            sim.ranges,
            sim.range_grants,
            sim.prefetches
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn coherence_under_random_interleavings((n, per, ops, drain) in scenario()) {
        run(n, per, &ops, &drain);
    }
}

/// Longer ranges over more pages per node (fewer nodes, fewer cases: each
/// step checks every page).
fn range_scenario() -> impl Strategy<Value = (usize, u64, Vec<Op>, Vec<usize>)> {
    (2usize..=3, 8u64..=40).prop_flat_map(|(n, per)| {
        let pages = n as u64 * per;
        let op = prop_oneof![
            3 => (0..n, 0..pages, any::<bool>()).prop_map(|(node, page, write)| Op::Access { node, page, write }),
            1 => (0..n, 0..pages).prop_map(|(node, page)| Op::Evict { node, page }),
            1 => (0..n, 0..pages, 1u32..=16).prop_map(|(node, page, max)| Op::Prefetch { node, page, max }),
            3 => (0..n, 0..pages, 1u32..=40, any::<bool>(), any::<bool>(), any::<bool>())
                .prop_map(|(node, page, count, write, wait, touch)| Op::Range { node, page, count, write, wait, touch }),
            5 => (0..64usize).prop_map(Op::Deliver),
            3 => (0..64usize, 0..8usize).prop_map(|(k, j)| Op::DeliverOutOfOrder(k, j)),
            1 => (0..n).prop_map(Op::Retry),
        ];
        (
            Just(n),
            Just(per),
            prop::collection::vec(op, 1..300),
            prop::collection::vec(0usize..64, 0..64),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn coherence_with_long_ranges((n, per, ops, drain) in range_scenario()) {
        run(n, per, &ops, &drain);
    }
}

/// A long deterministic run with heavy contention on one page.
#[test]
fn contention_many_steps() {
    let n = 3;
    let mut sim = Sim::new(n, 1);
    let mut x: u64 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..50_000 {
        match next() % 10 {
            0..=3 => {
                let node = (next() % n as u64) as usize;
                let w = next() % 2 == 0;
                sim.access(
                    node,
                    next() % 3,
                    if w { Access::Write } else { Access::Read },
                );
            }
            4 => sim.evict((next() % n as u64) as usize, next() % 3),
            _ => {
                sim.deliver(next() as usize, next() % 2 == 0);
            }
        }
        sim.check();
    }
    while sim.deliver(0, true) {
        for node in 0..n {
            sim.retry(node);
        }
    }
    for node in 0..n {
        sim.retry(node);
    }
    while sim.deliver(0, true) {}
    for b in &sim.blocked {
        assert!(b.is_empty());
    }
    assert!(sim.done_accesses > 10_000, "{}", sim.done_accesses);
    assert!(sim.reads > 1000);
}

/// The version rule: an upgrade of a current shared copy is granted without data.
#[test]
fn upgrade_skips_transfer() {
    let homes = vec![0..1, 1..2];
    let mut a = Node::new(0, homes.clone()).unwrap();
    let mut b = Node::new(1, homes).unwrap();
    let mut out = Vec::new();
    // b reads page 0 (home a, untouched): zero page, shared.
    assert_eq!(
        b.fault(0, Access::Read, &mut out).unwrap(),
        FaultOutcome::Waiting
    );
    assert_eq!(
        out,
        vec![Effect::Send {
            to: 0,
            msg: Msg::Req {
                page: 0,
                access: Access::Read,
                have: 0
            }
        }]
    );
    let mut o2 = Vec::new();
    a.handle(1, out[0].msg(), &mut o2).unwrap();
    // The home sends a Fetch to itself.
    let fetch = o2[0].msg();
    let mut o3 = Vec::new();
    a.handle(0, fetch, &mut o3).unwrap();
    let grant = o3[0].msg();
    assert!(matches!(
        grant,
        Msg::Grant {
            data: Data::Zero,
            version: 1,
            ..
        }
    ));
    let mut o4 = Vec::new();
    b.handle(0, grant, &mut o4).unwrap();
    a.handle(1, o4.last().unwrap().msg(), &mut Vec::new())
        .unwrap();
    // Now b writes: the upgrade request carries have = 1 and gets no data.
    let mut o5 = Vec::new();
    b.fault(0, Access::Write, &mut o5).unwrap();
    let mut o6 = Vec::new();
    a.handle(1, o5[0].msg(), &mut o6).unwrap();
    // The home invalidates itself first.
    assert_eq!(o6[0].msg(), Msg::Inv { page: 0 });
    let mut o7 = Vec::new();
    a.handle(0, Msg::Inv { page: 0 }, &mut o7).unwrap();
    let mut o8 = Vec::new();
    a.handle(0, Msg::InvAck { page: 0 }, &mut o8).unwrap();
    assert_eq!(
        o8[0].msg(),
        Msg::Grant {
            page: 0,
            access: Access::Write,
            version: 2,
            data: Data::None
        }
    );
}

trait EffMsg {
    fn msg(&self) -> Msg;
}
impl EffMsg for Effect {
    fn msg(&self) -> Msg {
        match self {
            Effect::Send { msg, .. } => *msg,
            e => panic!("not a send: {e:?}"),
        }
    }
}

/// Malformed / out-of-protocol messages are errors, never panics.
#[test]
fn out_of_protocol_messages_are_errors() {
    let homes = vec![0..2, 2..4];
    let mut a = Node::new(0, homes).unwrap();
    let mut out = Vec::new();
    assert!(a.handle(1, Msg::Done { page: 0 }, &mut out).is_err());
    assert!(a.handle(1, Msg::InvAck { page: 1 }, &mut out).is_err());
    assert!(a
        .handle(
            1,
            Msg::Req {
                page: 2,
                access: Access::Read,
                have: 0
            },
            &mut out
        )
        .is_err());
    assert!(a
        .handle(
            1,
            Msg::Req {
                page: 99,
                access: Access::Read,
                have: 0
            },
            &mut out
        )
        .is_err());
    assert!(a.handle(7, Msg::Done { page: 0 }, &mut out).is_err());
    assert!(a.handle(1, Msg::Inv { page: 0 }, &mut out).is_err());
    assert!(a
        .handle(
            1,
            Msg::Grant {
                page: 2,
                access: Access::Read,
                version: 1,
                data: Data::None
            },
            &mut out
        )
        .is_err());
    assert!(a.handle(1, Msg::Evict { page: 0 }, &mut out).is_ok());
    // Prefetch: empty, too long, or reaching past the home's range.
    for (page, count) in [(0, 0), (0, 65), (1, 2), (2, 1)] {
        assert!(a
            .handle(1, Msg::Prefetch { page, count }, &mut out)
            .is_err());
    }
    // A refusal with no prefetch pending.
    let mut b = Node::new(1, vec![0..2, 2..4]).unwrap();
    assert!(b.handle(0, Msg::Nack { page: 0 }, &mut out).is_err());
    assert!(b.handle(1, Msg::Nack { page: 0 }, &mut out).is_err());
}

/// A sequential scan with prefetch: one message asks for a run of pages; a
/// page busy at the home is declined (or served) and an access waiting on it
/// still completes, whatever the delivery order.
#[test]
fn prefetch_batches_and_declines() {
    for seed in 0..200usize {
        let mut sim = Sim::new(3, 16);
        // Node 0 (home of 0..16) writes its pages; node 2 takes page 2.
        for p in 0..16 {
            sim.access(0, p, Access::Write);
        }
        sim.access(2, 2, Access::Write);
        while sim.deliver(0, true) {}
        // Node 1 reads page 0 and prefetches after it.
        sim.access(1, 0, Access::Read);
        sim.prefetch(1, 0, 8);
        assert_eq!(sim.prefetches, 1);
        let msgs = sim.lanes.values().map(|q| q.len()).sum::<usize>();
        assert_eq!(msgs, 2, "one request and one prefetch message");
        // Meanwhile node 0 reads page 2 (a transaction at the home) and node
        // 1 touches page 2 too.
        sim.access(0, 2, Access::Read);
        sim.access(1, 2, Access::Read);
        let mut k = seed;
        while sim.deliver(k, true) {
            k = k.wrapping_mul(31).wrapping_add(7);
            sim.check();
        }
        for node in 0..3 {
            sim.retry(node);
        }
        while sim.deliver(0, true) {}
        assert!(sim.blocked.iter().all(|b| b.is_empty()), "seed {seed}");
        for p in 0..9 {
            assert_eq!(
                sim.nodes[1].state(p).unwrap().0,
                CacheState::Shared,
                "seed {seed} page {p}"
            );
        }
        sim.check();
    }
}

/// A 2 MiB read range of pages that sit at their home: one request, one
/// fetch, one grant carrying all 512 pages, one completion.
#[test]
fn range_full_2mib_is_one_transaction() {
    let mut sim = Sim::new(2, u64::from(MAX_RANGE));
    for p in 0..u64::from(MAX_RANGE) {
        sim.access(0, p, Access::Write);
    }
    sim.range(1, 0, MAX_RANGE, Access::Read, OnBusy::Wait, true);
    assert_eq!(sim.blocked[1].len(), MAX_RANGE as usize);
    sim.drain();
    assert_eq!(sim.delivered.len(), 4, "{:?}", sim.delivered.len());
    assert_eq!(sim.count_range(|m| matches!(m, RangeMsg::Req { .. })), 1);
    assert_eq!(sim.count_range(|m| matches!(m, RangeMsg::Fetch { .. })), 1);
    assert_eq!(
        sim.count_range(|m| matches!(m, RangeMsg::Grant { data, .. }
            if data.len() == MAX_RANGE as usize && data.iter().all(|d| *d == Data::Page))),
        1
    );
    assert_eq!(sim.count_range(|m| matches!(m, RangeMsg::Done { .. })), 1);
    for p in 0..u64::from(MAX_RANGE) {
        assert_eq!(
            sim.nodes[1].state(p).unwrap(),
            (CacheState::Shared, true, 1)
        );
        assert_eq!(sim.nodes[0].dir_entry(p).unwrap(), (0b11, false, 1));
    }
}

/// Set up node 0 as home of 0..8 with: page 3 held by node 2, page 5 busy
/// (node 2's write request started at the home, its fetch not delivered).
fn busy_setup() -> Sim {
    let mut sim = Sim::new(3, 8);
    for p in 0..8 {
        sim.access(0, p, Access::Write);
    }
    sim.access(2, 3, Access::Write);
    sim.drain();
    sim.access(2, 5, Access::Write);
    assert!(
        sim.deliver_lane(2, 0, false),
        "the request reaches the home"
    );
    assert!(!sim.nodes[0].dir_idle());
    sim.delivered.clear();
    sim
}

/// Pages busy at the home are split off a waiting range and queued as single
/// pages; the rest is served in runs of equal holders.
#[test]
fn range_splits_at_busy_pages_and_holder_changes() {
    let mut sim = busy_setup();
    sim.range(1, 0, 8, Access::Read, OnBusy::Wait, true);
    assert!(sim.deliver_lane(1, 0, false));
    // Runs 0..3 (home), 3 (node 2), 4 (home), 6..8 (home); page 5 queued.
    let fetches: Vec<(NodeId, Range<u64>)> = sim
        .lanes
        .iter()
        .flat_map(|((_, to, _), q)| {
            q.iter().filter_map(move |(m, _)| match m {
                M::R(f @ RangeMsg::Fetch { .. }) => Some((*to, f.pages())),
                _ => None,
            })
        })
        .collect();
    let mut want = vec![(0, 0..3), (2, 3..4), (0, 4..5), (0, 6..8)];
    let mut got = fetches.clone();
    got.sort_by_key(|f| f.1.start);
    want.sort_by_key(|f| f.1.start);
    assert_eq!(got, want);
    sim.drain();
    assert_eq!(sim.count_range(|m| matches!(m, RangeMsg::Done { .. })), 4);
    // Page 5 came with a single-page grant, after node 2's write.
    assert_eq!(
        sim.count_page(|m| matches!(
            m,
            Msg::Grant {
                page: 5,
                access: Access::Read,
                ..
            }
        )),
        1
    );
    for p in 0..8 {
        assert_eq!(
            sim.nodes[1].state(p).unwrap().0,
            CacheState::Shared,
            "page {p}"
        );
    }
    assert_eq!(
        sim.nodes[1].state(5).unwrap().2,
        2,
        "version after node 2's write"
    );
}

/// A declining range (prefetch) gets a `Nack` for its busy pages; an access
/// waiting on a declined page asks again with a queued single-page request.
#[test]
fn range_declines_busy_pages() {
    for touch in [false, true] {
        let mut sim = busy_setup();
        sim.range(1, 4, 4, Access::Read, OnBusy::Decline, false);
        if touch {
            sim.access(1, 5, Access::Read);
        }
        assert!(sim.deliver_lane(1, 0, false));
        sim.drain();
        assert_eq!(
            sim.count_range(|m| matches!(m, RangeMsg::Nack { first: 5, count: 1 })),
            1
        );
        let resent = sim.count_page(|m| matches!(m, Msg::Req { page: 5, .. }));
        assert_eq!(resent, usize::from(touch), "touch {touch}");
        let want = if touch {
            CacheState::Shared
        } else {
            CacheState::Invalid
        };
        assert_eq!(sim.nodes[1].state(5).unwrap().0, want);
        for p in [4, 6, 7] {
            assert_eq!(sim.nodes[1].state(p).unwrap().0, CacheState::Shared);
        }
    }
}

/// A write range over pages the requester holds current copies of: one
/// invalidation round, a grant without data, versions bumped per page.
#[test]
fn range_write_upgrade_skips_data() {
    let mut sim = Sim::new(2, 8);
    for p in 0..8 {
        // Different versions per page: page p written (granted) p times.
        for _ in 0..p {
            sim.access(1, p, Access::Write);
            sim.drain();
            sim.access(0, p, Access::Write);
            sim.drain();
        }
    }
    sim.range(1, 0, 8, Access::Read, OnBusy::Wait, false);
    sim.drain();
    sim.delivered.clear();
    let before: Vec<u64> = (0..8).map(|p| sim.nodes[1].state(p).unwrap().2).collect();
    sim.range(1, 0, 8, Access::Write, OnBusy::Wait, true);
    sim.drain();
    assert_eq!(
        sim.count_range(|m| matches!(m, RangeMsg::Inv { first: 0, count: 8 })),
        1
    );
    assert_eq!(
        sim.count_range(|m| matches!(m, RangeMsg::Grant { data, .. }
            if data.iter().all(|d| *d == Data::None))),
        1
    );
    assert_eq!(sim.delivered.len(), 5, "req, inv, ack, grant, done");
    for p in 0..8 {
        assert_eq!(
            sim.nodes[1].state(p).unwrap(),
            (CacheState::Modified, true, before[p as usize] + 1)
        );
    }
}

/// Several ranges of one requester in flight at once, and a range request
/// that leaves out pages already pending or accessible.
#[test]
fn ranges_in_flight_and_request_splitting() {
    let mut sim = Sim::new(2, 16);
    let mut out = Vec::new();
    let runs = sim.nodes[1]
        .request_range(0, 4, Access::Read, OnBusy::Wait, &mut out)
        .unwrap();
    assert_eq!(runs, vec![(0, 4)]);
    sim.apply(1, out, None);
    sim.access(1, 6, Access::Read);
    let mut out = Vec::new();
    let runs = sim.nodes[1]
        .request_range(2, 10, Access::Read, OnBusy::Wait, &mut out)
        .unwrap();
    // 2..4 pending, 6 pending (single page): 4..6 and 7..12.
    assert_eq!(runs, vec![(4, 2), (7, 5)]);
    sim.apply(1, out, None);
    sim.drain();
    assert_eq!(sim.count_range(|m| matches!(m, RangeMsg::Grant { .. })), 3);
    for p in 0..12 {
        assert_eq!(sim.nodes[1].state(p).unwrap().0, CacheState::Shared);
    }
    // Everything already readable: nothing to send.
    let mut out = Vec::new();
    let runs = sim.nodes[1]
        .request_range(0, 12, Access::Read, OnBusy::Wait, &mut out)
        .unwrap();
    assert!(runs.is_empty() && out.is_empty());
}

/// Malformed or out-of-protocol range messages are errors, never panics.
#[test]
fn out_of_protocol_range_messages_are_errors() {
    let homes = vec![0..8, 8..16];
    let mut a = Node::new(0, homes.clone()).unwrap();
    let mut b = Node::new(1, homes).unwrap();
    let mut out = Vec::new();
    let req = |first, count: u32, n: usize| RangeMsg::Req {
        first,
        count,
        access: Access::Read,
        busy: OnBusy::Wait,
        have: vec![0; n].into_boxed_slice(),
    };
    for m in [
        req(0, 0, 0),
        req(0, MAX_RANGE + 1, MAX_RANGE as usize + 1),
        req(6, 4, 4),        // crosses into node 1's range
        req(8, 2, 2),        // not homed here
        req(0, 4, 3),        // versions missing
        req(u64::MAX, 2, 2), // past the end
        RangeMsg::Done { first: 0, count: 2 },
        RangeMsg::InvAck { first: 0, count: 2 },
        RangeMsg::Inv { first: 0, count: 2 }, // home is me, not the sender
    ] {
        let e = a.handle_range(1, &m, &mut out).unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::BadRange { .. } | ProtocolError::Unexpected { .. }
            ),
            "{m:?}: {e}"
        );
    }
    assert!(matches!(
        a.handle_range(9, &RangeMsg::Done { first: 0, count: 1 }, &mut out),
        Err(ProtocolError::BadNode(9))
    ));
    // A grant, nack or fetch for pages never requested / not held.
    let grant = RangeMsg::Grant {
        first: 0,
        count: 2,
        access: Access::Read,
        versions: vec![1, 1].into_boxed_slice(),
        data: vec![Data::Zero, Data::Zero].into_boxed_slice(),
    };
    assert!(b.handle_range(0, &grant, &mut out).is_err());
    assert!(b
        .handle_range(0, &RangeMsg::Nack { first: 0, count: 2 }, &mut out)
        .is_err());
    let fetch = RangeMsg::Fetch {
        first: 0,
        count: 2,
        to: 0,
        keep: Keep::Shared,
        versions: vec![1, 1].into_boxed_slice(),
    };
    assert!(b.handle_range(0, &fetch, &mut out).is_err());
    // A fetch with the wrong number of versions, or to a node that does not exist.
    let mut fetch2 = fetch.clone();
    if let RangeMsg::Fetch { versions, .. } = &mut fetch2 {
        *versions = vec![1].into_boxed_slice();
    }
    assert!(a.handle_range(0, &fetch2, &mut out).is_err());
    if let RangeMsg::Fetch { to, .. } = &mut fetch2 {
        *to = 5;
    }
    assert!(a.handle_range(0, &fetch2, &mut out).is_err());
    // A grant whose arrays do not match its count, for requested pages.
    out.clear();
    b.request_range(0, 2, Access::Read, OnBusy::Wait, &mut out)
        .unwrap();
    let short = RangeMsg::Grant {
        first: 0,
        count: 2,
        access: Access::Read,
        versions: vec![1].into_boxed_slice(),
        data: vec![Data::Zero, Data::Zero].into_boxed_slice(),
    };
    assert!(b.handle_range(0, &short, &mut out).is_err());
    // A grant without data for pages this node does not hold.
    let none = RangeMsg::Grant {
        first: 0,
        count: 2,
        access: Access::Read,
        versions: vec![1, 1].into_boxed_slice(),
        data: vec![Data::None, Data::None].into_boxed_slice(),
    };
    assert!(b.handle_range(0, &none, &mut out).is_err());
    // Nothing was applied by the failed grants.
    assert_eq!(b.state(0).unwrap().0, CacheState::Invalid);
    // Requests the caller gets wrong.
    for (first, count) in [(0, 0), (6, 4), (16, 1)] {
        assert!(b
            .request_range(first, count, Access::Read, OnBusy::Wait, &mut out)
            .is_err());
    }
}

/// The slot of a page in a range grant's payload.
#[test]
fn range_grant_slots() {
    let g = RangeMsg::Grant {
        first: 10,
        count: 4,
        access: Access::Read,
        versions: vec![1; 4].into_boxed_slice(),
        data: vec![Data::Page, Data::None, Data::Zero, Data::Page].into_boxed_slice(),
    };
    assert_eq!(g.data_pages(), 2);
    assert!(g.is_bulk());
    let slots: Vec<_> = (9..15).map(|p| g.slot_of(p)).collect();
    assert_eq!(slots, vec![None, Some(0), None, None, Some(1), None]);
    assert!(!RangeMsg::Done { first: 0, count: 1 }.is_bulk());
}

/// The home requests a range of its own pages while it takes one of them
/// back from an evicting last holder: the take-back's grant does not answer
/// the range request, which stays pending until its own answer (a `Nack`, or
/// a grant without data after the take-back) arrives, in either order.
#[test]
fn home_range_during_take_back() {
    for busy in [OnBusy::Wait, OnBusy::Decline] {
        for grant_first in [false, true] {
            let mut sim = Sim::new(2, 8);
            sim.access(1, 6, Access::Write);
            sim.drain();
            sim.evict(1, 6);
            assert!(
                sim.deliver_lane(1, 0, false),
                "the eviction reaches the home"
            );
            // Only page 6 is not accessible at the home.
            sim.range(0, 0, 8, Access::Read, busy, true);
            assert_eq!(sim.ranges, 1);
            assert!(sim.nodes[0].is_pending(6));
            assert!(
                sim.deliver_lane(0, 0, false),
                "the range request: page 6 busy"
            );
            assert!(sim.deliver_lane(0, 1, false), "the take-back fetch");
            if grant_first {
                assert!(sim.deliver_lane(1, 0, true), "the take-back grant");
                assert!(sim.nodes[0].is_pending(6), "still waiting for its answer");
            }
            sim.drain();
            assert_eq!(sim.nodes[0].state(6).unwrap().0, CacheState::Modified);
            assert!(!sim.nodes[0].is_pending(6));
            assert_eq!(
                sim.count_range(|m| matches!(m, RangeMsg::Nack { .. })),
                usize::from(busy == OnBusy::Decline)
            );
        }
    }
}
