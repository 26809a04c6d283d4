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
//! A blocked access is modelled like a thread blocked in userfaultfd: it calls
//! `fault` once, then sleeps until the engine wakes its page (install, wake,
//! write-unprotect) and only then faults again, so a lost wake-up shows up
//! as an access blocked forever.

use std::collections::{BTreeMap, HashSet, VecDeque};

use dvmm::dsm::protocol::{Access, CacheState, Data, Effect, FaultOutcome, Msg, Node, NodeId};
use proptest::prelude::*;

type Lane = (NodeId, NodeId, bool);

struct Sim {
    nodes: Vec<Node>,
    mem: Vec<Vec<Option<u64>>>,
    truth: Vec<u64>,
    lanes: BTreeMap<Lane, VecDeque<(Msg, Option<u64>)>>,
    blocked: Vec<Vec<(u64, Access)>>,
    done_accesses: usize,
    reads: usize,
    prefetches: usize,
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
            lanes: BTreeMap::new(),
            blocked: vec![Vec::new(); n],
            done_accesses: 0,
            reads: 0,
            prefetches: 0,
            woken: vec![HashSet::new(); n],
        }
    }

    fn pages(&self) -> u64 {
        self.truth.len() as u64
    }

    fn apply(&mut self, n: NodeId, effects: Vec<Effect>, payload: Option<u64>) {
        let ni = n as usize;
        for e in effects {
            match e {
                Effect::Send { to, msg } => {
                    let data = match msg {
                        Msg::Grant {
                            data: Data::Page,
                            page,
                            ..
                        } => Some(self.mem[ni][page as usize].expect("sending a page not held")),
                        _ => None,
                    };
                    self.lanes
                        .entry((n, to, msg.is_bulk()))
                        .or_default()
                        .push_back((msg, data));
                }
                Effect::Install { page, zero, .. } => {
                    assert!(self.mem[ni][page as usize].is_none(), "install over a copy");
                    let v = if zero {
                        0
                    } else {
                        payload.expect("install without payload")
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
            .filter(|&i| q.iter().take(i).all(|(m, _)| m.page() != q[i].0.page()))
            .collect();
        let (msg, payload) = q.remove(firsts[j % firsts.len()]).unwrap();
        let (from, to, _) = lane;
        let mut out = Vec::new();
        self.nodes[to as usize]
            .handle(from, msg, &mut out)
            .unwrap_or_else(|e| panic!("protocol error at node {to}: {e} ({msg:?})"));
        self.apply(to, out, payload);
        if retry {
            self.retry(to as usize);
        }
        true
    }

    fn check(&self) {
        let n = self.nodes.len();
        for p in 0..self.pages() {
            let states: Vec<_> = (0..n).map(|i| self.nodes[i].state(p).unwrap()).collect();
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
        4 => (0..64usize).prop_map(Op::Deliver),
        2 => (0..64usize, 0..8usize).prop_map(|(k, j)| Op::DeliverOutOfOrder(k, j)),
        1 => (0..n).prop_map(Op::Retry),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, u64, Vec<Op>, Vec<usize>)> {
    (2usize..=4, 1u64..=4).prop_flat_map(|(n, per)| {
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
    }
    sim.check();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn coherence_under_random_interleavings((n, per, ops, drain) in scenario()) {
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
