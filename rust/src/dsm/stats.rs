//! Per-node DSM counters (read with [`Stats::snapshot`]).
//!
//! The counters are lock-free atomics. The fault-latency distribution is an
//! HDR histogram ([`hdrhistogram`], 3 significant digits: every recorded value is
//! known to within 0.1 %), so its percentiles are exact to that precision, not
//! bucket bounds a factor of 2 apart as the log2 histogram it replaced.
//!
//! Why a `Mutex<Histogram>`: the engine thread is the only recorder (one
//! uncontended lock + an array increment per resolved fault: tens of ns, no
//! allocation, the histogram's range is fixed up front), and snapshots are rare
//! (at the end of a run, or a test): a snapshot holds the lock while it reads the
//! quantiles, a single pass over the buckets (tens of microseconds). A
//! recorder + periodic merge (`hdrhistogram::sync`) would make the snapshot wait
//! for the engine to check in, which an idle engine may not do for a long time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;

use crate::sync::lock;

/// Buckets of the derived log2 histogram ([`StatsSnapshot::latency_us_log2`]):
/// bucket i counts faults that took [2^(i-1), 2^i) microseconds (bucket 0:
/// < 1 us); the last bucket is open.
pub const LATENCY_BUCKETS: usize = 24;

/// Largest latency the histogram tells apart (100 s); longer faults are
/// recorded as this value.
pub const LATENCY_MAX_NS: u64 = 100_000_000_000;

/// Significant decimal digits of the latency histogram (0.1 % resolution).
pub const LATENCY_SIGFIG: u8 = 3;

/// The fault-latency distribution, in nanoseconds.
#[derive(Debug)]
pub struct LatencyHistogram(Mutex<Histogram<u64>>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        // The bounds are constants that Histogram accepts (low >= 1,
        // high >= 2 * low, sigfig <= 5): this cannot fail.
        let h = Histogram::new_with_bounds(1, LATENCY_MAX_NS, LATENCY_SIGFIG)
            .expect("constant histogram bounds are valid");
        Self(Mutex::new(h))
    }
}

impl LatencyHistogram {
    /// Record one fault's latency (clamped to [`LATENCY_MAX_NS`]).
    pub fn record(&self, ns: u64) {
        lock(&self.0).saturating_record(ns);
    }

    /// The quantiles, the log2 view and the non-empty buckets of the histogram.
    fn read(&self) -> LatencyView {
        let h = lock(&self.0);
        let mut v = LatencyView {
            log2: vec![0; LATENCY_BUCKETS],
            ..LatencyView::default()
        };
        if h.is_empty() {
            return v;
        }
        let q: Vec<u64> = h.value_at_quantiles([0.5, 0.9, 0.99, 0.999]).collect();
        (v.p50, v.p90, v.p99, v.p999) = (q[0], q[1], q[2], q[3]);
        v.max = h.max();
        for it in h.iter_recorded() {
            let n = it.count_at_value();
            let hi = it.value_iterated_to();
            v.buckets.push((hi, n));
            let us = h.lowest_equivalent(hi) / 1000;
            let b = (64 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
            v.log2[b] += n;
        }
        v
    }
}

#[derive(Debug, Default)]
struct LatencyView {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    log2: Vec<u64>,
    buckets: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub read_faults: AtomicU64,
    pub write_faults: AtomicU64,
    pub wp_faults: AtomicU64,
    pub local_faults: AtomicU64,
    pub invalidations_sent: AtomicU64,
    pub invalidations_received: AtomicU64,
    pub pages_sent: AtomicU64,
    pub pages_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub zero_pages_sent: AtomicU64,
    pub transfers_skipped: AtomicU64,
    pub evictions: AtomicU64,
    pub held_requests: AtomicU64,
    pub prefetch_requests: AtomicU64,
    pub prefetched_pages: AtomicU64,
    pub prefetch_declined: AtomicU64,
    pub prefetch_late: AtomicU64,
    pub prefetch_used: AtomicU64,
    pub prefetch_wasted: AtomicU64,
    pub upgrade_prefetch_requests: AtomicU64,
    pub upgrade_prefetch_used: AtomicU64,
    pub upgrade_prefetch_wasted: AtomicU64,
    pub ipis_forwarded: AtomicU64,
    pub io_forwarded: AtomicU64,
    pub resident_pages: AtomicU64,
    pub resident_peak: AtomicU64,
    pub fault_ns_total: AtomicU64,
    pub remote_faults: AtomicU64,
    /// User-space copies of page contents made by the engine (see
    /// [`StatsSnapshot::page_copies`]; the transport adds its own).
    pub page_copies: AtomicU64,
    pub pages_moved: AtomicU64,
    /// Latency of the faults counted in `remote_faults` (the engine records).
    pub latency: LatencyHistogram,
}

/// A copy of the counters.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub read_faults: u64,
    pub write_faults: u64,
    pub wp_faults: u64,
    /// Faults resolved without any message (untouched pages, stale faults).
    pub local_faults: u64,
    pub invalidations_sent: u64,
    pub invalidations_received: u64,
    pub pages_sent: u64,
    pub pages_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub zero_pages_sent: u64,
    pub transfers_skipped: u64,
    pub evictions: u64,
    /// Invalidations/fetches deferred by the hold window.
    #[serde(default)]
    pub held_requests: u64,
    /// Sequential prefetch messages sent (each asks for several pages).
    #[serde(default)]
    pub prefetch_requests: u64,
    /// Pages installed by prefetch (not asked for by a fault).
    #[serde(default)]
    pub prefetched_pages: u64,
    /// Prefetched pages the home declined (busy there).
    #[serde(default)]
    pub prefetch_declined: u64,
    /// Faults on pages whose prefetch was still in flight (late hits: the
    /// access waited, but less than a full round trip).
    #[serde(default)]
    pub prefetch_late: u64,
    /// Prefetched pages the reader went through (late ones included): its
    /// stream faulted past them.
    #[serde(default)]
    pub prefetch_used: u64,
    /// Prefetched pages never reached: invalidated, evicted, or their stream
    /// was abandoned.
    #[serde(default)]
    pub prefetch_wasted: u64,
    /// Range upgrades asked ahead of a writer rewriting pages this node held
    /// read-only (upgrade prefetch, see the engine).
    #[serde(default)]
    pub upgrade_prefetch_requests: u64,
    /// Pages upgraded ahead that the writer's stream went past.
    #[serde(default)]
    pub upgrade_prefetch_used: u64,
    /// Pages upgraded ahead that were taken away before the writer reached them.
    #[serde(default)]
    pub upgrade_prefetch_wasted: u64,
    /// Copies of 4 KiB of page contents made in user space on this node,
    /// counted where they happen: the engine reading a page from its
    /// mapping to send it, the transport encoding it into a send buffer (and
    /// the shm transport pushing it into its ring), the receive side's
    /// decoder buffer (and a move inside it), the decoded payload, the
    /// payload of a message to self, and UFFDIO_COPY of a received page into
    /// guest memory (a kernel copy, but from our buffer: it goes away with
    /// pages that land in place). Not counted: the kernel's socket copies
    /// and in-place encryption.
    #[serde(default)]
    pub page_copies: u64,
    /// Pages of contents this node received from another node (each moved
    /// page is counted once, at its receiver). Summed over the nodes of a
    /// VM, `sum(page_copies) / sum(pages_moved)` is the number of copies per
    /// page moved, sender and receiver together.
    #[serde(default)]
    pub pages_moved: u64,
    pub ipis_forwarded: u64,
    pub io_forwarded: u64,
    pub resident_pages: u64,
    pub resident_peak: u64,
    /// Faults that needed a message (to another node or the local directory).
    pub remote_faults: u64,
    /// Mean latency of those faults, in nanoseconds (exact: a sum / a count).
    pub fault_mean_ns: u64,
    /// Latency quantiles of those faults, in nanoseconds: the HDR histogram's
    /// value at the quantile (the highest value of its 0.1 %-wide bucket, as
    /// `hdrhistogram::Histogram::value_at_quantile`); 0 when there were none.
    #[serde(default)]
    pub fault_p50_ns: u64,
    #[serde(default)]
    pub fault_p90_ns: u64,
    #[serde(default)]
    pub fault_p99_ns: u64,
    #[serde(default)]
    pub fault_p999_ns: u64,
    /// The slowest of those faults (to 0.1 %), in nanoseconds.
    #[serde(default)]
    pub fault_max_ns: u64,
    /// The same faults in log2 microsecond buckets (see [`LATENCY_BUCKETS`]),
    /// derived from the HDR histogram; kept for readers of the old shape.
    pub latency_us_log2: Vec<u64>,
    /// The HDR histogram's non-empty buckets, ascending: `[value_ns, count]`
    /// with `value_ns` the highest value of the bucket. Histograms of several
    /// nodes merge by adding counts of equal values; the quantile q is then the
    /// first value whose cumulative count reaches `max(1, ceil(q * total))`,
    /// which reproduces `fault_p*_ns`. At most a few thousand entries.
    #[serde(default)]
    pub latency_ns_hdr: Vec<(u64, u64)>,
}

impl Stats {
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Relaxed);
    }

    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    /// Record the latency of a fault resolved by the protocol.
    pub fn fault_latency(&self, ns: u64) {
        self.fault_ns_total.fetch_add(ns, Relaxed);
        self.remote_faults.fetch_add(1, Relaxed);
        self.latency.record(ns);
    }

    /// Resident page count changed by `delta`.
    pub fn resident(&self, delta: i64) {
        let now = if delta >= 0 {
            self.resident_pages.fetch_add(delta as u64, Relaxed) + delta as u64
        } else {
            self.resident_pages
                .fetch_sub(delta.unsigned_abs(), Relaxed)
                .saturating_sub(delta.unsigned_abs())
        };
        self.resident_peak.fetch_max(now, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let n = g(&self.remote_faults);
        let lat = self.latency.read();
        StatsSnapshot {
            read_faults: g(&self.read_faults),
            write_faults: g(&self.write_faults),
            wp_faults: g(&self.wp_faults),
            local_faults: g(&self.local_faults),
            invalidations_sent: g(&self.invalidations_sent),
            invalidations_received: g(&self.invalidations_received),
            pages_sent: g(&self.pages_sent),
            pages_received: g(&self.pages_received),
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
            zero_pages_sent: g(&self.zero_pages_sent),
            transfers_skipped: g(&self.transfers_skipped),
            evictions: g(&self.evictions),
            held_requests: g(&self.held_requests),
            prefetch_requests: g(&self.prefetch_requests),
            prefetched_pages: g(&self.prefetched_pages),
            prefetch_declined: g(&self.prefetch_declined),
            prefetch_late: g(&self.prefetch_late),
            prefetch_used: g(&self.prefetch_used),
            prefetch_wasted: g(&self.prefetch_wasted),
            upgrade_prefetch_requests: g(&self.upgrade_prefetch_requests),
            upgrade_prefetch_used: g(&self.upgrade_prefetch_used),
            upgrade_prefetch_wasted: g(&self.upgrade_prefetch_wasted),
            page_copies: g(&self.page_copies),
            pages_moved: g(&self.pages_moved),
            ipis_forwarded: g(&self.ipis_forwarded),
            io_forwarded: g(&self.io_forwarded),
            resident_pages: g(&self.resident_pages),
            resident_peak: g(&self.resident_peak),
            remote_faults: n,
            fault_mean_ns: g(&self.fault_ns_total).checked_div(n).unwrap_or(0),
            fault_p50_ns: lat.p50,
            fault_p90_ns: lat.p90,
            fault_p99_ns: lat.p99,
            fault_p999_ns: lat.p999,
            fault_max_ns: lat.max,
            latency_us_log2: lat.log2,
            latency_ns_hdr: lat.buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The q quantile of `latency_ns_hdr` as the snapshot's doc says to compute it.
    fn quantile(b: &[(u64, u64)], q: f64) -> u64 {
        let total: u64 = b.iter().map(|x| x.1).sum();
        let want = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for &(v, n) in b {
            seen += n;
            if seen >= want {
                return v;
            }
        }
        unreachable!("the counts add up to total")
    }

    #[test]
    fn empty_snapshot() {
        let s = Stats::default().snapshot();
        assert_eq!((s.remote_faults, s.fault_p50_ns, s.fault_max_ns), (0, 0, 0));
        assert_eq!(s.latency_us_log2, vec![0; LATENCY_BUCKETS]);
        assert!(s.latency_ns_hdr.is_empty());
    }

    #[test]
    fn exact_quantiles() {
        let st = Stats::default();
        // 1..=1000 us: p50 = 500 us, p99 = 990 us, max = 1000 us.
        for i in 1..=1000u64 {
            st.fault_latency(i * 1000);
        }
        let s = st.snapshot();
        let near = |got: u64, want: u64| {
            assert!(
                got >= want && got <= want + want / 1000,
                "{got} not within 0.1 % above {want}"
            );
        };
        near(s.fault_p50_ns, 500_000);
        near(s.fault_p90_ns, 900_000);
        near(s.fault_p99_ns, 990_000);
        near(s.fault_p999_ns, 999_000);
        near(s.fault_max_ns, 1_000_000);
        assert_eq!(s.fault_mean_ns, 500_500);
        assert_eq!(s.remote_faults, 1000);
        // The log2 view: [2^(i-1), 2^i) us.
        assert_eq!(s.latency_us_log2.iter().sum::<u64>(), 1000);
        // 1 us, then 512..=1000 us
        assert_eq!(s.latency_us_log2[1], 1);
        assert_eq!(s.latency_us_log2[10], 1000 - 511);
        // The bucket list reproduces the quantiles.
        for (q, want) in [
            (0.5, s.fault_p50_ns),
            (0.99, s.fault_p99_ns),
            (1.0, s.fault_max_ns),
        ] {
            assert_eq!(quantile(&s.latency_ns_hdr, q), want);
        }
        assert_eq!(s.latency_ns_hdr.iter().map(|x| x.1).sum::<u64>(), 1000);
    }

    #[test]
    fn huge_latency_is_clamped() {
        let st = Stats::default();
        st.fault_latency(u64::MAX);
        let s = st.snapshot();
        assert!(s.fault_max_ns >= LATENCY_MAX_NS && s.fault_max_ns <= LATENCY_MAX_NS / 1000 * 1001);
        assert_eq!(s.latency_us_log2[LATENCY_BUCKETS - 1], 1);
    }

    #[test]
    fn old_json_still_deserializes() {
        let old = r#"{"read_faults":1,"write_faults":0,"wp_faults":0,"local_faults":0,
            "invalidations_sent":0,"invalidations_received":0,"pages_sent":0,
            "pages_received":0,"bytes_sent":0,"bytes_received":0,"zero_pages_sent":0,
            "transfers_skipped":0,"evictions":0,"ipis_forwarded":0,"io_forwarded":0,
            "resident_pages":0,"resident_peak":0,"remote_faults":0,"fault_mean_ns":0,
            "latency_us_log2":[0,1]}"#;
        let s: StatsSnapshot = serde_json::from_str(old).expect("old shape");
        assert_eq!(s.latency_us_log2, vec![0, 1]);
        assert_eq!(s.fault_p50_ns, 0);
        let new = serde_json::to_value(Stats::default().snapshot()).expect("serialize");
        assert!(new.get("latency_ns_hdr").is_some_and(|v| v.is_array()));
    }
}
