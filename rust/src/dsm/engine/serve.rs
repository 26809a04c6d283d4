//! The engine thread's work: wait (how depends on the [`ServiceMode`]), read
//! faults and frames, run them through the protocol (with the hold window and
//! prefetch), and hand the effects to `effects`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::handle::{set_normal, set_realtime, PageCopy, Shared};
use super::landing::Lander;
use super::{EffectError, EngineFault, ServiceMode};
use crate::dsm::prefetch::Prefetcher;
use crate::dsm::protocol::{
    self, Access, CacheState, Data, Effect, FaultOutcome, Msg, NodeId, OnBusy, PageIdx, RangeMsg,
};
use crate::dsm::stats::Stats;
use crate::dsm::transport::TransportEvent;
use crate::dsm::uffd::{Fault, UffdError, PAGE};
use crate::dsm::wire::Frame;
use crate::sync::lock;
use userfaultfd::EventBuffer;

/// A protocol message of either kind.
#[derive(Debug, Clone)]
pub(super) enum PMsg {
    One(Msg),
    Range(RangeMsg),
}

impl PMsg {
    /// The pages it is about.
    pub(super) fn pages(&self) -> Range<PageIdx> {
        match self {
            PMsg::One(m) => m.page()..m.page() + 1,
            PMsg::Range(m) => m.pages(),
        }
    }

    /// Whether it takes a page away from this node (held back by the hold
    /// window).
    pub(super) fn takes_away(&self) -> bool {
        matches!(
            self,
            PMsg::One(Msg::Inv { .. } | Msg::Fetch { .. })
                | PMsg::Range(RangeMsg::Inv { .. } | RangeMsg::Fetch { .. })
        )
    }
}

/// Where an `Install` effect finds the contents: the page of a single-page
/// grant, or a range grant's payload (its `Data::Page` pages in slot order).
#[derive(Clone, Copy)]
pub(super) enum Payload<'a> {
    None,
    One(&'a [u8]),
    Range(&'a RangeMsg, &'a [u8]),
    /// The message's pages of data landed in place (see `landing`).
    Landed,
}

impl<'a> Payload<'a> {
    /// The contents of `page`, if the message carries them.
    pub(super) fn page(&self, page: PageIdx) -> Option<&'a [u8; PAGE]> {
        let d = match *self {
            Payload::None | Payload::Landed => return None,
            Payload::One(d) => d,
            Payload::Range(m, d) => {
                let at = m.slot_of(page)?.checked_mul(PAGE)?;
                d.get(at..at.checked_add(PAGE)?)?
            }
        };
        <&[u8; PAGE]>::try_from(d).ok()
    }
}

/// A message's page contents: bytes (or none), or landed in place.
pub(super) enum Body {
    Bytes(Option<Box<[u8]>>),
    Landed,
}

impl From<Option<Box<[u8]>>> for Body {
    fn from(d: Option<Box<[u8]>>) -> Body {
        Body::Bytes(d)
    }
}

/// A protocol message held back by the hold window.
pub(super) struct Deferred {
    until: Instant,
    from: NodeId,
    msg: PMsg,
    data: Option<Box<[u8]>>,
}

/// A `sched_yield` in the idle spin that took longer than this ran another
/// thread: the core is not idle.
const IDLE_YIELD_BUSY: Duration = Duration::from_micros(20);

pub(super) struct Engine {
    pub(super) sh: Arc<Shared>,
    pub(super) node: protocol::Node,
    /// Messages to ourselves (the home's own requests), with page data.
    pub(super) local: VecDeque<(PMsg, Option<Box<[u8]>>)>,
    pub(super) pending_since: HashMap<PageIdx, Instant>,
    /// Foreign pages in installation order (may hold stale entries).
    pub(super) foreign: VecDeque<PageIdx>,
    pub(super) foreign_resident: usize,
    pub(super) evicting: HashSet<PageIdx>,
    pub(super) budget: Option<usize>,
    pub(super) my_range: Range<PageIdx>,
    pub(super) spin: Duration,
    pub(super) idle_spin: Duration,
    pub(super) service: ServiceMode,
    /// A side effect failed: the VM is stopping; execute nothing more.
    pub(super) failed: bool,
    pub(super) last_activity: Instant,
    /// `RtIdle`: the idle spin found the core busy (until the next activity).
    pub(super) idle_busy: bool,
    pub(super) faults: Vec<Fault>,
    /// Raw fault messages as read from the userfaultfd.
    pub(super) fault_buf: EventBuffer,
    pub(super) events: Vec<TransportEvent>,
    pub(super) effects: Vec<Effect>,
    /// Hold window (zero: off).
    pub(super) hold: Duration,
    /// Pages granted for writing recently: end of their hold window.
    pub(super) hold_until: HashMap<PageIdx, Instant>,
    /// Messages held back by the hold window, in arrival order.
    pub(super) deferred: VecDeque<Deferred>,
    /// Number of deferred messages per page (later messages for such a page
    /// are deferred too, so each page's messages keep their order).
    pub(super) deferred_pages: HashMap<PageIdx, u32>,
    /// Adaptive sequential prefetch (see `prefetch`).
    pub(super) pf: Prefetcher,
    /// Upgrade prefetch: write streams over pages held read-only (see
    /// `prefetch_upgrade`); off when its `max` is 0.
    pub(super) wpf: Prefetcher,
    /// Prefetch with range requests ([`DsmConfig::ranges`]).
    pub(super) ranges: bool,
    /// Pages each node is home of.
    pub(super) homes: Vec<Range<PageIdx>>,
    /// The pages of data of a range grant being sent.
    pub(super) rpages: Vec<PageIdx>,
    /// Pages whose contents landed in place (or are reserved to) and are not
    /// mapped for the guest yet (see `landing`).
    pub(super) landed: HashSet<PageIdx>,
    /// Received pages land in place ([`super::land_from_env`]).
    pub(super) land: bool,
}

impl Engine {
    /// The engine thread's loop.
    pub(super) fn run(engine: &Mutex<Engine>) {
        let sh = lock(engine).sh.clone();
        if sh.service != ServiceMode::VcpuServe {
            // Nobody else serves: hold the engine for good.
            let mut e = lock(engine);
            let mut rt = sh.service != ServiceMode::Legacy;
            while !sh.stop.load(Ordering::Relaxed) {
                if sh.service == ServiceMode::RtIdle {
                    // Real-time while a fault waits or while blocked; normal
                    // priority for the idle spin.
                    let want = !e.idle_spinning();
                    if want != rt {
                        let _ = if want { set_realtime() } else { set_normal() };
                        rt = want;
                    }
                }
                let t = e.next_timeout();
                e.turn(t);
            }
            return;
        }
        let watch = [sh.mem.fd(), sh.wake.as_raw_fd()];
        while !sh.stop.load(Ordering::Relaxed) {
            let quiet = {
                let mut e = lock(engine);
                let quiet = e.pending_since.is_empty()
                    && e.deferred.is_empty()
                    && sh.server_attached.load(Ordering::SeqCst);
                if !quiet {
                    let t = e.next_timeout();
                    e.turn(t);
                }
                quiet
            };
            if quiet {
                // A vCPU serves the sockets: wait for a fault (or a kick) only,
                // without holding the engine; serve anyway every 1 ms.
                let mut fds = watch.map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                // SAFETY: fds is a valid array of pollfd of the given length.
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1) };
                lock(engine).turn(Some(Duration::ZERO));
                sh.transport.flush();
            }
        }
    }

    /// [`super::DsmHandle::page_copies`]: where each page's contents are.
    fn page_copies(&self, first: PageIdx, count: u32) -> Vec<PageCopy> {
        (first..first.saturating_add(PageIdx::from(count)))
            .map(|p| match self.node.state(p) {
                _ if self.node.is_pending(p) || self.landed.contains(&p) => PageCopy::Elsewhere,
                Some((CacheState::Invalid, _, _)) | None => PageCopy::Elsewhere,
                Some((_, false, _)) => PageCopy::Zero,
                Some((_, true, _)) => PageCopy::Here,
            })
            .collect()
    }

    /// In the idle spin: no fault of ours waits, but traffic came within
    /// `idle_spin`.
    pub(super) fn idle_spinning(&self) -> bool {
        self.pending_since.is_empty()
            && !self.idle_busy
            && Instant::now().saturating_duration_since(self.last_activity) < self.idle_spin
    }

    /// How long the next poll may block (zero: spin).
    pub(super) fn next_timeout(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let since = now.saturating_duration_since(self.last_activity);
        let waiting = !self.pending_since.is_empty() && since < self.spin;
        let spinning = match self.service {
            ServiceMode::Legacy => waiting || since < self.idle_spin,
            ServiceMode::Rt => false,
            ServiceMode::RtSpin | ServiceMode::VcpuServe => waiting,
            ServiceMode::RtIdle => waiting || (since < self.idle_spin && !self.idle_busy),
        };
        if spinning {
            if self.service == ServiceMode::Legacy {
                // Let another engine on this core (co-located nodes) run.
                // SAFETY: no preconditions.
                unsafe { libc::sched_yield() };
            } else if self.service == ServiceMode::RtIdle && !waiting {
                // Spin only while the core is idle: a yield that gave the core to
                // another thread (a vCPU) for a while ends the idle spin, so the
                // next message wakes a real-time engine that preempts it instead.
                let t0 = Instant::now();
                // SAFETY: no preconditions.
                unsafe { libc::sched_yield() };
                if t0.elapsed() > IDLE_YIELD_BUSY {
                    self.idle_busy = true;
                }
            }
            return Some(Duration::ZERO);
        }
        let t = Duration::from_millis(100);
        match self.deferred.iter().map(|d| d.until).min() {
            Some(u) => Some(t.min(u.saturating_duration_since(now))),
            None => Some(t),
        }
    }

    /// One round: wait up to `timeout` for traffic or faults, then handle what
    /// came (any thread holding the engine may run it).
    pub(super) fn turn(&mut self, timeout: Option<Duration>) {
        let extra = [self.sh.mem.fd(), self.sh.wake.as_raw_fd()];
        let mut events = std::mem::take(&mut self.events);
        let mut faults = std::mem::take(&mut self.faults);
        let mut effects = std::mem::take(&mut self.effects);
        let lander = Lander {
            enabled: self.land,
            node: &self.node,
            mem: &self.sh.mem,
            deferred: &self.deferred_pages,
            stats: &self.sh.stats,
            landed: RefCell::new(std::mem::take(&mut self.landed)),
            failed: RefCell::new(None),
        };
        let polled = self
            .sh
            .transport
            .poll_landing(timeout, &extra, &mut events, &lander);
        self.landed = lander.landed.into_inner();
        if let Some((page, err)) = lander.failed.into_inner() {
            self.failed = true;
            self.sh
                .fail(EngineFault::Effect(EffectError::Memory { page, err }));
        }
        let ready = match polled {
            Ok(r) => r,
            Err(e) => {
                self.sh.fail(EngineFault::Poll(e));
                std::thread::sleep(Duration::from_millis(10));
                0
            }
        };
        if ready & 2 != 0 {
            let _ = self.sh.wake.read();
        }
        let mut active = false;
        if ready & 1 != 0 {
            if let Err(e) = self.sh.mem.read_faults(&mut self.fault_buf, &mut faults) {
                self.sh.fail(EngineFault::ReadFaults(e));
            }
        }
        for f in faults.drain(..) {
            active = true;
            self.on_fault(f, &mut effects);
        }
        for ev in events.drain(..) {
            active = true;
            self.on_event(ev, &mut effects);
        }
        self.drain_local(&mut effects);
        while let Ok(q) = self.sh.queries.1.try_recv() {
            let _ = q.reply.send(self.page_copies(q.first, q.count));
        }
        if !self.deferred.is_empty() && self.run_deferred(&mut effects) {
            active = true;
        }
        self.evict_over_budget(&mut effects);
        if active {
            self.last_activity = Instant::now();
            self.idle_busy = false;
        }
        self.events = events;
        self.faults = faults;
        self.effects = effects;
    }

    pub(super) fn on_fault(&mut self, f: Fault, effects: &mut Vec<Effect>) {
        let st = &self.sh.stats;
        if f.wp {
            Stats::inc(&st.wp_faults);
        } else if f.write {
            Stats::inc(&st.write_faults);
        } else {
            Stats::inc(&st.read_faults);
        }
        let access = if f.write || f.wp {
            Access::Write
        } else {
            Access::Read
        };
        if f.minor && self.remap(f.page) {
            Stats::inc(&self.sh.stats.local_faults);
            return;
        }
        let st = &self.sh.stats;
        effects.clear();
        match self.node.fault(f.page, access, effects) {
            Ok(FaultOutcome::Resolved) => Stats::inc(&st.local_faults),
            Ok(FaultOutcome::Waiting) => {
                self.pending_since
                    .entry(f.page)
                    .or_insert_with(Instant::now);
            }
            Err(e) => {
                self.sh.fail(EngineFault::Fault {
                    page: f.page,
                    source: e,
                });
                return;
            }
        }
        let fx = std::mem::take(effects);
        self.exec(&fx, Payload::None);
        *effects = fx;
        if self.pf.enabled() && access == Access::Read && self.node.is_pending(f.page) {
            self.prefetch(f.page, effects);
        }
        if self.wpf.enabled() && f.wp && self.node.is_pending(f.page) {
            self.prefetch_upgrade(f.page, effects);
        }
        self.drain_local(effects);
    }

    /// A MINOR fault: the page is in the memfd but not mapped for the guest.
    /// A page this node holds (the kernel dropped its mapping, e.g. after
    /// swapping it) is mapped again as its state allows; returns whether that
    /// settled the fault. A landed page not mapped yet, or anything else, goes
    /// through the protocol like a MISSING fault (and waits for its grant).
    fn remap(&mut self, page: PageIdx) -> bool {
        let Some((state, true, _)) = self.node.state(page) else {
            return false;
        };
        if state == CacheState::Invalid || self.landed.contains(&page) {
            return false;
        }
        let r = match self
            .sh
            .mem
            .map_landed(page, 1, state == CacheState::Modified)
        {
            // Mapped since the fault was queued: only wake.
            Err(UffdError::AlreadyPresent { .. }) => self.sh.mem.wake(page),
            r => r,
        };
        if let Err(err) = r {
            self.failed = true;
            self.sh
                .fail(EngineFault::Effect(EffectError::Memory { page, err }));
        }
        true
    }

    /// Sequential read detection and prefetch after a read fault on `page`
    /// that needs a message (its own request is already sent).
    pub(super) fn prefetch(&mut self, page: PageIdx, effects: &mut Vec<Effect>) {
        let mut k = self.pf.on_fault(page);
        if let Some(b) = self.budget.filter(|_| self.is_foreign(page)) {
            let used = self.foreign_resident + self.pending_since.len() + self.pf.tracked();
            k = k.min(u32::try_from(b.saturating_sub(used)).unwrap_or(u32::MAX));
        }
        if k > 0 && self.ranges {
            self.prefetch_range(page, k, effects);
        } else if k > 0 {
            effects.clear();
            match self.node.prefetch(page, k, effects) {
                Ok((start, n)) if n > 0 => {
                    Stats::inc(&self.sh.stats.prefetch_requests);
                    self.pf.requested(page, start, n);
                    let fx = std::mem::take(effects);
                    self.exec(&fx, Payload::None);
                    *effects = fx;
                }
                Ok(_) => {}
                Err(source) => self.sh.fail(EngineFault::Prefetch { page, source }),
            }
        }
        self.sync_prefetch_stats();
    }

    /// Prefetch with a range request: the window as `Node::prefetch` picks
    /// it (skip what is valid or in flight right after `page`, at most `2 *
    /// k` pages: the stream's window still arriving; then the run of up to
    /// `k` pages that can be asked for), requested with one
    /// [`RangeMsg::Req`] whose busy pages the home declines.
    pub(super) fn prefetch_range(&mut self, page: PageIdx, k: u32, effects: &mut Vec<Effect>) {
        // A home reading back its own pages (held elsewhere) prefetches them
        // too: the range request goes to its own directory, which fetches them
        // from their holders (single-page `Prefetch` messages cannot do that).
        let Some(end) = self.home_end(page) else {
            return;
        };
        let askable = |node: &protocol::Node, p: PageIdx| {
            matches!(node.state(p), Some((CacheState::Invalid, _, _))) && !node.is_pending(p)
        };
        let mut p = page + 1;
        let skip_end = p.saturating_add(2 * u64::from(k));
        while p < end && p < skip_end && !askable(&self.node, p) {
            p += 1;
        }
        let start = p;
        let limit = start
            .saturating_add(u64::from(k.min(protocol::MAX_RANGE)))
            .min(end);
        while p < limit && askable(&self.node, p) {
            p += 1;
        }
        self.request_window(page, start, (p - start) as u32, Access::Read, effects);
    }

    /// The end of the range of pages homed where `page` is.
    fn home_end(&self, page: PageIdx) -> Option<PageIdx> {
        let home = self.node.home_of(page).ok()?;
        self.homes.get(usize::from(home)).map(|r| r.end)
    }

    /// Ask for the window `start..start + n` of the stream whose last fault
    /// is `after` with one range request whose busy pages the home declines:
    /// read copies for the read prefetcher, write access for the upgrade
    /// prefetcher (`access` says which).
    fn request_window(
        &mut self,
        after: PageIdx,
        start: PageIdx,
        n: u32,
        access: Access,
        effects: &mut Vec<Effect>,
    ) {
        if n == 0 {
            return;
        }
        effects.clear();
        match self
            .node
            .request_range(start, n, access, OnBusy::Decline, effects)
        {
            Ok(runs) => {
                let (pf, requests) = match access {
                    Access::Read => (&mut self.pf, &self.sh.stats.prefetch_requests),
                    Access::Write => (&mut self.wpf, &self.sh.stats.upgrade_prefetch_requests),
                };
                if !runs.is_empty() {
                    Stats::inc(requests);
                }
                for (s, c) in runs {
                    pf.requested(after, s, c);
                }
                let fx = std::mem::take(effects);
                self.exec(&fx, Payload::None);
                *effects = fx;
            }
            Err(source) => self.sh.fail(EngineFault::RangePrefetch {
                start,
                count: n,
                source,
            }),
        }
    }

    /// Upgrade prefetch after a write-protect fault on `page` that needs a
    /// message (its own upgrade is already asked for): if the fault continues
    /// a write stream, write access to the run of pages after it that this
    /// node holds `Shared`, homed on the same node, with one range request
    /// whose busy pages the home declines. Pages in flight or already made
    /// writable by this stream right after `page` are skipped (at most `2 *
    /// k`); the run stops at the first page not held read-only, so nothing
    /// this node does not hold is taken from other nodes.
    pub(super) fn prefetch_upgrade(&mut self, page: PageIdx, effects: &mut Vec<Effect>) {
        let k = self.wpf.on_fault(page);
        if k == 0 {
            return;
        }
        let Some(end) = self.home_end(page) else {
            return;
        };
        let mut p = page + 1;
        let skip_end = p.saturating_add(2 * u64::from(k));
        let writable_ahead = |node: &protocol::Node, wpf: &Prefetcher, p: PageIdx| {
            node.is_pending(p)
                || (wpf.is_tracked(p)
                    && matches!(node.state(p), Some((CacheState::Modified, true, _))))
        };
        while p < end && p < skip_end && writable_ahead(&self.node, &self.wpf, p) {
            p += 1;
        }
        let start = p;
        let limit = start
            .saturating_add(u64::from(k.min(protocol::MAX_RANGE)))
            .min(end);
        while p < limit
            && matches!(self.node.state(p), Some((CacheState::Shared, true, _)))
            && !self.node.is_pending(p)
        {
            p += 1;
        }
        if p == start {
            return;
        }
        self.request_window(page, start, (p - start) as u32, Access::Write, effects);
        self.sync_prefetch_stats();
    }

    /// Publish the prefetchers' counters.
    pub(super) fn sync_prefetch_stats(&self) {
        let c = self.pf.counts();
        let st = &self.sh.stats;
        st.prefetch_late.store(c.late, Ordering::Relaxed);
        st.prefetch_used.store(c.used, Ordering::Relaxed);
        st.prefetch_wasted.store(c.wasted, Ordering::Relaxed);
        let w = self.wpf.counts();
        st.upgrade_prefetch_used.store(w.used, Ordering::Relaxed);
        st.upgrade_prefetch_wasted
            .store(w.wasted, Ordering::Relaxed);
    }

    pub(super) fn on_event(&mut self, ev: TransportEvent, effects: &mut Vec<Effect>) {
        match ev {
            TransportEvent::PeerDown { node, reason } => {
                if let Some(app) = &self.sh.app {
                    app.peer_down(node, &reason);
                }
                let fault = EngineFault::PeerDown { node, reason };
                eprintln!("dvmm-dsm: node {}: {fault}", self.sh.me);
                self.sh.record(Arc::new(fault));
            }
            TransportEvent::Landed { from, frame } => {
                let msg = match frame {
                    Frame::Proto { msg, .. } => PMsg::One(msg),
                    Frame::Range { msg, .. } => PMsg::Range(msg),
                    // The decoder lands grants only.
                    _ => return,
                };
                self.on_msg(from, msg, Body::Landed, effects);
                self.drain_local(effects);
            }
            TransportEvent::Frame { from, frame, .. } => match frame {
                Frame::Proto { msg, data } => {
                    self.on_msg(from, PMsg::One(msg), data.into(), effects);
                    self.drain_local(effects);
                }
                Frame::Range { msg, data } => {
                    self.on_msg(from, PMsg::Range(msg), data.into(), effects);
                    self.drain_local(effects);
                }
                Frame::App { kind, tag, payload } => {
                    if let Some(app) = &self.sh.app {
                        app.frame(from, kind, tag, payload);
                    }
                }
                Frame::Ping | Frame::Auth { .. } => {}
            },
        }
    }

    /// Handle a protocol message now, or hold it back if it would take away a
    /// page inside its hold window.
    pub(super) fn on_msg(
        &mut self,
        from: NodeId,
        msg: PMsg,
        data: Body,
        effects: &mut Vec<Effect>,
    ) {
        if !self.hold.is_zero() {
            let pages = msg.pages();
            let mut until: Option<Instant> = None;
            if msg.takes_away() {
                let now = Instant::now();
                for page in pages.clone() {
                    if let Some(&u) = self.hold_until.get(&page) {
                        if u > now {
                            until = Some(until.map_or(u, |t| t.max(u)));
                        } else {
                            self.hold_until.remove(&page);
                        }
                    }
                }
            }
            if until.is_none() && pages.clone().any(|p| self.deferred_pages.contains_key(&p)) {
                until = Some(Instant::now());
            }
            if let Some(until) = until {
                Stats::inc(&self.sh.stats.held_requests);
                for page in pages {
                    *self.deferred_pages.entry(page).or_insert(0) += 1;
                }
                // Nothing stays landed while its message waits.
                let data = match data {
                    Body::Landed => self.unland(&msg),
                    Body::Bytes(d) => d,
                };
                self.deferred.push_back(Deferred {
                    until,
                    from,
                    msg,
                    data,
                });
                return;
            }
        }
        self.handle_msg(from, msg, data, effects);
    }

    /// Handle the deferred messages whose window is over (in order per page).
    /// Returns whether any was handled.
    pub(super) fn run_deferred(&mut self, effects: &mut Vec<Effect>) -> bool {
        let now = Instant::now();
        let mut any = false;
        let mut i = 0;
        while i < self.deferred.len() {
            let d = &self.deferred[i];
            let pages = d.msg.pages();
            // An earlier message for one of its pages still waiting blocks this one.
            let blocked = self.deferred.iter().take(i).any(|e| {
                let o = e.msg.pages();
                o.start < pages.end && pages.start < o.end
            });
            if d.until > now || blocked {
                i += 1;
                continue;
            }
            let Some(d) = self.deferred.remove(i) else {
                break;
            };
            for page in pages {
                if let Some(c) = self.deferred_pages.get_mut(&page) {
                    *c -= 1;
                    if *c == 0 {
                        self.deferred_pages.remove(&page);
                    }
                }
                self.hold_until.remove(&page);
            }
            any = true;
            self.handle_msg(d.from, d.msg, d.data.into(), effects);
            self.drain_local(effects);
        }
        any
    }

    pub(super) fn handle_msg(
        &mut self,
        from: NodeId,
        msg: PMsg,
        data: Body,
        effects: &mut Vec<Effect>,
    ) {
        let landed = matches!(data, Body::Landed).then(|| msg.pages());
        match msg {
            PMsg::One(m) => self.handle_one(from, m, data, effects),
            PMsg::Range(m) => self.handle_range(from, m, data, effects),
        }
        if let Some(pages) = landed {
            self.drop_unmapped(pages);
        }
    }

    fn handle_one(&mut self, from: NodeId, msg: Msg, data: Body, effects: &mut Vec<Effect>) {
        let st = &self.sh.stats;
        match msg {
            Msg::Inv { page } => {
                if from != self.sh.me {
                    Stats::inc(&st.invalidations_received);
                }
                self.evicting.remove(&page);
            }
            Msg::Fetch { page, .. } => {
                self.evicting.remove(&page);
            }
            Msg::Nack { page } => {
                Stats::inc(&st.prefetch_declined);
                self.pf.refused(page);
                self.wpf.refused(page);
            }
            Msg::Grant {
                data: Data::Page, ..
            } if from != self.sh.me => {
                Stats::inc(&st.pages_received);
                Stats::inc(&st.pages_moved);
                Stats::add(&st.bytes_received, PAGE as u64);
            }
            _ => {}
        }
        effects.clear();
        if let Err(e) = self.node.handle(from, msg, effects) {
            self.sh.fail(EngineFault::Violation { from, source: e });
            return;
        }
        let fx = std::mem::take(effects);
        let payload = match &data {
            Body::Landed => Payload::Landed,
            Body::Bytes(d) => d.as_deref().map_or(Payload::None, Payload::One),
        };
        self.exec(&fx, payload);
        *effects = fx;
        if let Msg::Grant { page, access, .. } = msg {
            self.granted(page, access);
        }
    }

    /// Bookkeeping after a grant of `page` was installed.
    pub(super) fn granted(&mut self, page: PageIdx, access: Access) {
        if access == Access::Write && !self.hold.is_zero() {
            if self.hold_until.len() >= 4096 {
                let now = Instant::now();
                self.hold_until.retain(|_, u| *u > now);
            }
            self.hold_until.insert(page, Instant::now() + self.hold);
        }
        let prefetched = self.pf.is_tracked(page) || self.wpf.is_tracked(page);
        if let Some(t0) = self.pending_since.remove(&page) {
            self.sh.stats.fault_latency(t0.elapsed().as_nanos() as u64);
        } else if prefetched {
            Stats::inc(&self.sh.stats.prefetched_pages);
        }
    }

    /// Handle a range message (see `handle_msg`); `data` is a range grant's
    /// payload.
    pub(super) fn handle_range(
        &mut self,
        from: NodeId,
        msg: RangeMsg,
        data: Body,
        effects: &mut Vec<Effect>,
    ) {
        let st = &self.sh.stats;
        let (_, count) = msg.span();
        let remote = from != self.sh.me;
        match &msg {
            RangeMsg::Inv { .. } => {
                if remote {
                    Stats::add(&st.invalidations_received, u64::from(count));
                }
                for page in msg.pages() {
                    self.evicting.remove(&page);
                }
            }
            RangeMsg::Fetch { .. } => {
                for page in msg.pages() {
                    self.evicting.remove(&page);
                }
            }
            RangeMsg::Nack { .. } => {
                Stats::add(&st.prefetch_declined, u64::from(count));
                for page in msg.pages() {
                    self.pf.refused(page);
                    self.wpf.refused(page);
                }
            }
            RangeMsg::Grant { .. } if remote => {
                let n = msg.data_pages() as u64;
                Stats::add(&st.pages_received, n);
                Stats::add(&st.pages_moved, n);
                Stats::add(&st.bytes_received, n * PAGE as u64);
            }
            _ => {}
        }
        effects.clear();
        if let Err(e) = self.node.handle_range(from, &msg, effects) {
            self.sh.fail(EngineFault::Violation { from, source: e });
            return;
        }
        let fx = std::mem::take(effects);
        let payload = match &data {
            Body::Landed => Payload::Landed,
            Body::Bytes(d) => Payload::Range(&msg, d.as_deref().unwrap_or(&[])),
        };
        self.exec(&fx, payload);
        *effects = fx;
        if let RangeMsg::Grant { access, .. } = msg {
            for page in msg.pages() {
                self.granted(page, access);
            }
        }
    }

    pub(super) fn drain_local(&mut self, effects: &mut Vec<Effect>) {
        while let Some((msg, data)) = self.local.pop_front() {
            let me = self.sh.me;
            self.on_msg(me, msg, data.into(), effects);
        }
    }

    pub(super) fn is_foreign(&self, page: PageIdx) -> bool {
        !self.my_range.contains(&page)
    }
}
