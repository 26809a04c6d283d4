//! Adaptive sequential prefetch: which pages to ask for ahead of a reader, and
//! whether the pages asked for ahead were worth it. Pure bookkeeping (no I/O):
//! the engine tells it about read faults, grants, refusals and lost pages; it
//! answers how many pages to request after a fault.
//!
//! Each node keeps a few *streams* (one per sequential reader: two vCPUs
//! scanning two regions interleave their faults, so a single "last fault"
//! would see neither as sequential). A read fault that lands shortly after a
//! stream's last fault continues it; anything else starts a new stream
//! (replacing the least recently used one). A new stream prefetches only once
//! a second fault lands on (about) the next page, so a random reader, whose
//! faults rarely do, is left alone. A stream's window starts at
//! [`MIN_WINDOW`] pages and doubles on every sequential fault up to the limit,
//! because a fault in a sequential stream means the prefetched pages ran out
//! (or arrived late). Prefetched pages the stream never reached — the stream
//! was abandoned, or the page was invalidated or evicted first — are *wasted*,
//! and each waste halves the window, so a reader that jumps around stops
//! paying for pages it does not read. A prefetched page counts as *used* once
//! its stream faults past it (the guest read through it without a fault:
//! installed pages do not fault, so passing them is the evidence of use).
//!
//! **Recall.** Iterative programs (the NPB kernels, a solver's sweeps) go
//! over the same arrays again and again: each pass starts a new stream at the
//! same page, and would pay two faults before its window opened and a few
//! more while it doubled back to the size the last pass reached. So a node
//! remembers, per page a stream started at, the window that stream grew to
//! ([`RECALL`] entries at most); a new stream starting at such a page asks
//! for that window at once. A random reader's faults rarely land on a page a
//! sequential stream once started at, so it is still left alone.
//!
//! The same bookkeeping serves *write* streams (the engine keeps a second
//! prefetcher for them, see `prefetch_upgrade` in the engine): a node
//! rewriting an array other nodes read gets write access to the following
//! pages it holds read-only in one range upgrade instead of one invalidation
//! round trip per page.

use std::collections::{BTreeSet, HashMap};

use super::protocol::PageIdx;

/// Smallest window (pages).
pub const MIN_WINDOW: u32 = 4;
/// Streams tracked per node.
pub const STREAMS: usize = 4;
/// Stream start pages whose window is remembered (see "Recall"); when full,
/// the memory is cleared (a program with more sequential passes than this is
/// not the iterative kind the recall is for).
pub const RECALL: usize = 1024;

#[derive(Debug, Clone, Default)]
struct Stream {
    /// The page the stream started at (its key in the recall).
    start: PageIdx,
    /// The stream's last fault.
    last: PageIdx,
    /// Current window (pages per request).
    k: u32,
    /// Prefetched pages (in flight or installed) the stream has not passed yet.
    ahead: BTreeSet<PageIdx>,
    /// Recency (larger: more recent).
    used_at: u64,
}

impl Stream {
    /// How far past its last fault the next fault of this stream may land: a
    /// new stream must be confirmed by a fault on (about) the next page, so a
    /// random reader's faults that happen to land close together start no
    /// prefetch; a running stream may land anywhere in or just past the pages
    /// it has in flight (the reader caught up with a batch still arriving, or
    /// ran past one that arrived).
    fn reach(&self) -> u64 {
        if self.k == 0 {
            NEW_STREAM_REACH
        } else {
            2 * u64::from(self.k) + 8
        }
    }
}

/// How far past a new stream's first fault its second may land (pages).
pub const NEW_STREAM_REACH: u64 = 2;

/// Counters (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchCounts {
    /// Pages requested ahead of a reader.
    pub requested: u64,
    /// Prefetched pages the reader went through (including late ones).
    pub used: u64,
    /// Prefetched pages the reader faulted on while still in flight.
    pub late: u64,
    /// Prefetched pages never reached: invalidated, evicted or abandoned.
    pub wasted: u64,
}

/// The prefetcher of one node.
#[derive(Debug, Default)]
pub struct Prefetcher {
    max: u32,
    streams: Vec<Stream>,
    /// Which stream each tracked page belongs to.
    owner: HashMap<PageIdx, usize>,
    clock: u64,
    counts: PrefetchCounts,
    /// Remember windows by start page ("Recall"); off: new streams start at 0.
    recall_on: bool,
    recall: HashMap<PageIdx, u32>,
}

impl Prefetcher {
    /// `max` pages per request at most (0: prefetch off).
    pub fn new(max: u32) -> Prefetcher {
        Prefetcher {
            max,
            ..Prefetcher::default()
        }
    }

    /// As [`Prefetcher::new`], remembering windows by start page ("Recall").
    pub fn with_recall(max: u32) -> Prefetcher {
        Prefetcher {
            max,
            recall_on: true,
            ..Prefetcher::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    pub fn counts(&self) -> PrefetchCounts {
        self.counts
    }

    /// Prefetched pages not yet reached (in flight or installed): they count
    /// against the foreign budget.
    pub fn tracked(&self) -> usize {
        self.owner.len()
    }

    /// Whether `page` was prefetched and not yet reached.
    pub fn is_tracked(&self, page: PageIdx) -> bool {
        self.owner.contains_key(&page)
    }

    /// A fault on `page` (of the kind this prefetcher follows) that needs a
    /// message. Returns how many pages after `page` to request (0: none).
    pub fn on_fault(&mut self, page: PageIdx) -> u32 {
        if self.max == 0 {
            return 0;
        }
        self.clock += 1;
        let now = self.clock;
        if self.owner.contains_key(&page) {
            self.counts.late += 1;
        }
        // The stream this fault continues: the nearest one behind it, within
        // its window of pages still to come.
        let hit = self
            .streams
            .iter()
            .enumerate()
            .filter(|(_, s)| page > s.last && page - s.last <= s.reach())
            .min_by_key(|(_, s)| page - s.last)
            .map(|(i, _)| i);
        let Some(i) = hit else {
            return self.start_stream(page, now);
        };
        // Everything it prefetched below this fault was read through.
        let passed: Vec<PageIdx> = {
            let s = &mut self.streams[i];
            let rest = s.ahead.split_off(&(page + 1));
            let done = std::mem::replace(&mut s.ahead, rest);
            done.into_iter().collect()
        };
        for p in passed {
            self.owner.remove(&p);
            self.counts.used += 1;
        }
        let max = self.max;
        let s = &mut self.streams[i];
        s.last = page;
        s.used_at = now;
        s.k = if s.k == 0 {
            MIN_WINDOW
        } else {
            s.k.saturating_mul(2)
        }
        .min(max);
        let (start, k) = (s.start, s.k);
        self.remember(start, k);
        k
    }

    /// Remember that a stream starting at `start` grew to window `k`.
    fn remember(&mut self, start: PageIdx, k: u32) {
        if !self.recall_on {
            return;
        }
        if self.recall.len() >= RECALL && !self.recall.contains_key(&start) {
            self.recall.clear();
        }
        self.recall.insert(start, k);
    }

    /// A new stream at `page`; returns its first window (0 unless recalled).
    fn start_stream(&mut self, page: PageIdx, now: u64) -> u32 {
        let k = self.recall.get(&page).copied().unwrap_or(0).min(self.max);
        let fresh = Stream {
            start: page,
            last: page,
            k,
            ahead: BTreeSet::new(),
            used_at: now,
        };
        // The same pass again (an iterative program back at the start of an
        // array): it replaces its previous stream, whose pages ahead were
        // gone through (the program finished that pass and came back).
        if let Some(i) = self.streams.iter().position(|s| s.start == page) {
            let old = std::mem::replace(&mut self.streams[i], fresh);
            for p in old.ahead {
                self.owner.remove(&p);
                self.counts.used += 1;
            }
            return k;
        }
        if self.streams.len() < STREAMS {
            self.streams.push(fresh);
            return k;
        }
        let Some((lru, _)) = self
            .streams
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.used_at)
        else {
            return 0;
        };
        let old = std::mem::replace(&mut self.streams[lru], fresh);
        // The abandoned stream's pages ahead were never reached.
        for p in old.ahead {
            self.owner.remove(&p);
            self.counts.wasted += 1;
        }
        k
    }

    /// Pages `start..start + n` were requested for the stream whose last fault
    /// is `after` (the fault that `on_fault` answered).
    pub fn requested(&mut self, after: PageIdx, start: PageIdx, n: u32) {
        let Some(i) = self.streams.iter().position(|s| s.last == after) else {
            return;
        };
        for p in start..start + u64::from(n) {
            if self.owner.insert(p, i).is_none() {
                self.streams[i].ahead.insert(p);
                self.counts.requested += 1;
            }
        }
    }

    /// The home refused a prefetched page (it was busy): not wasted, just not coming.
    pub fn refused(&mut self, page: PageIdx) {
        if let Some(i) = self.owner.remove(&page) {
            self.streams[i].ahead.remove(&page);
            self.counts.requested = self.counts.requested.saturating_sub(1);
        }
    }

    /// A page upgraded ahead of a writer was read by another node before the
    /// writer's stream passed it (a producer handing its output over, the
    /// usual end of a pass): no longer tracked, counted as used (it was
    /// writable when the writer got there, or the writer never went there
    /// and nothing was taken from anyone), the window unchanged.
    pub fn handed_over(&mut self, page: PageIdx) {
        if let Some(i) = self.owner.remove(&page) {
            self.streams[i].ahead.remove(&page);
            self.counts.used += 1;
        }
    }

    /// `page` left this node (invalidated or evicted) or the fault on it was
    /// resolved by another path: if it was prefetched and not reached, it was
    /// wasted, and its stream's window halves.
    pub fn lost(&mut self, page: PageIdx) {
        if let Some(i) = self.owner.remove(&page) {
            let s = &mut self.streams[i];
            s.ahead.remove(&page);
            s.k = (s.k / 2).max(MIN_WINDOW).min(self.max);
            self.counts.wasted += 1;
            let (start, k) = (s.start, s.k);
            if self.recall.contains_key(&start) {
                self.remember(start, k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed a sequential reader that faults wherever no page was prefetched.
    fn scan(p: &mut Prefetcher, from: PageIdx, to: PageIdx) -> u32 {
        let mut faults = 0;
        let mut page = from;
        while page < to {
            if p.is_tracked(page) {
                page += 1;
                continue;
            }
            faults += 1;
            let k = p.on_fault(page);
            if k > 0 {
                p.requested(page, page + 1, k);
            }
            page += 1;
        }
        faults
    }

    #[test]
    fn sequential_reader_window_grows_and_pages_count_as_used() {
        let mut p = Prefetcher::new(64);
        let faults = scan(&mut p, 0, 10_000);
        // 4, 8, 16, 32, then 64 per fault: about 10 000 / 65 faults.
        assert!(faults < 170, "{faults} faults");
        // Pass the last batch too.
        p.on_fault(20_000);
        let c = p.counts();
        assert_eq!(c.wasted, 0);
        assert!(c.used + 64 >= c.requested, "{c:?}");
        assert!(c.requested > 9_000, "{c:?}");
    }

    /// Feed `n` read faults on pseudo-random pages (LCG from `seed`).
    fn random_reader(p: &mut Prefetcher, seed: u64, n: usize) {
        let mut x = seed;
        for _ in 0..n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let page = (x >> 33) % 1_000_000;
            let k = p.on_fault(page);
            if k > 0 {
                p.requested(page, page + 1, k);
            }
        }
    }

    #[test]
    fn random_reader_gets_no_prefetch() {
        let mut p = Prefetcher::new(64);
        random_reader(&mut p, 12345, 1000);
        // A jump lands on the page after a new stream's only by chance.
        assert_eq!(p.counts().requested, 0, "{:?}", p.counts());
    }

    #[test]
    fn two_interleaved_streams_are_both_detected() {
        let mut p = Prefetcher::new(64);
        let (mut a, mut b) = (0u64, 500_000u64);
        let mut faults = 0;
        for _ in 0..5000 {
            for s in [&mut a, &mut b] {
                if !p.is_tracked(*s) {
                    faults += 1;
                    let k = p.on_fault(*s);
                    if k > 0 {
                        p.requested(*s, *s + 1, k);
                    }
                }
                *s += 1;
            }
        }
        assert!(faults < 400, "{faults} faults for 10 000 pages");
    }

    #[test]
    fn lost_pages_are_wasted_and_shrink_the_window() {
        let mut p = Prefetcher::new(64);
        scan(&mut p, 0, 200);
        let before = p.streams[0].k;
        let ahead: Vec<PageIdx> = p.streams[0].ahead.iter().copied().take(3).collect();
        assert_eq!(ahead.len(), 3);
        for pg in ahead {
            p.lost(pg);
        }
        assert_eq!(p.counts().wasted, 3);
        assert_eq!(p.streams[0].k, (before / 8).max(MIN_WINDOW));
        // Refusals are not waste.
        let next = *p.streams[0].ahead.iter().next().unwrap();
        p.refused(next);
        assert_eq!(p.counts().wasted, 3);
    }

    #[test]
    fn abandoned_streams_count_their_pages_as_wasted() {
        let mut p = Prefetcher::new(64);
        scan(&mut p, 0, 100);
        let pending = p.tracked() as u64;
        assert!(pending > 0);
        // STREAMS new streams push the first one out.
        for i in 0..STREAMS as u64 {
            p.on_fault(1_000_000 * (i + 1));
        }
        assert_eq!(p.counts().wasted, pending);
        assert_eq!(p.tracked(), 0);
    }

    #[test]
    fn a_pass_over_the_same_array_again_gets_its_window_at_once() {
        for recall in [false, true] {
            let mut p = if recall {
                Prefetcher::with_recall(64)
            } else {
                Prefetcher::new(64)
            };
            // Pass 1: 0 (new stream), 1 (window 4: 2..5), 6 (window 8: 7..14).
            assert_eq!(scan(&mut p, 0, 15), 3);
            // Other streams push it out (its pages ahead count as wasted).
            for i in 1..=STREAMS as u64 {
                p.on_fault(100_000 * i);
            }
            assert_eq!(p.tracked(), 0);
            let faults = scan(&mut p, 0, 15);
            if recall {
                // 0 asks for the window of 8 remembered for it (1..8) at
                // once; 9 continues the stream.
                assert_eq!(faults, 2, "{:?}", p.counts());
            } else {
                assert_eq!(faults, 3);
            }
        }
    }

    #[test]
    fn a_pass_back_at_its_start_counts_the_last_pass_as_used() {
        let mut p = Prefetcher::with_recall(64);
        assert_eq!(scan(&mut p, 0, 15), 3);
        let ahead = p.tracked() as u64;
        assert!(ahead > 0);
        let used = p.counts().used;
        assert_eq!(p.on_fault(0), 8);
        assert_eq!(p.counts().used, used + ahead);
        assert_eq!(p.counts().wasted, 0);
    }

    #[test]
    fn pages_handed_over_are_used_and_no_longer_tracked() {
        let mut p = Prefetcher::with_recall(64);
        scan(&mut p, 0, 15);
        let ahead: Vec<PageIdx> = p.streams[0].ahead.iter().copied().collect();
        assert!(!ahead.is_empty());
        let (used, k) = (p.counts().used, p.streams[0].k);
        for &pg in &ahead {
            p.handed_over(pg);
            assert!(!p.is_tracked(pg));
        }
        assert_eq!(p.counts().used, used + ahead.len() as u64);
        assert_eq!((p.counts().wasted, p.streams[0].k), (0, k));
    }

    #[test]
    fn random_reader_gets_no_prefetch_with_recall_either() {
        let mut p = Prefetcher::with_recall(64);
        random_reader(&mut p, 777, 3000);
        assert_eq!(p.counts().requested, 0, "{:?}", p.counts());
    }

    #[test]
    fn the_recall_is_bounded() {
        let mut p = Prefetcher::with_recall(64);
        for i in 0..(RECALL as u64 + 10) {
            // Each a two-fault stream: remembered with window 4.
            p.on_fault(i * 1000);
            p.on_fault(i * 1000 + 1);
        }
        assert!(p.recall.len() <= RECALL);
    }

    #[test]
    fn off_means_nothing() {
        let mut p = Prefetcher::new(0);
        assert_eq!(scan(&mut p, 0, 100), 100);
        assert_eq!(p.counts(), PrefetchCounts::default());
    }
}
