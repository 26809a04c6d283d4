//! Per-node DSM counters (lock-free; read with [`Stats::snapshot`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Fault latency histogram buckets: bucket i counts faults that took
/// [2^(i-1), 2^i) microseconds (bucket 0: < 1 us); the last bucket is open.
pub const LATENCY_BUCKETS: usize = 24;

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
    pub ipis_forwarded: AtomicU64,
    pub io_forwarded: AtomicU64,
    pub resident_pages: AtomicU64,
    pub resident_peak: AtomicU64,
    pub fault_ns_total: AtomicU64,
    pub remote_faults: AtomicU64,
    pub latency_us: [AtomicU64; LATENCY_BUCKETS],
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
    pub ipis_forwarded: u64,
    pub io_forwarded: u64,
    pub resident_pages: u64,
    pub resident_peak: u64,
    /// Faults that needed a message (to another node or the local directory).
    pub remote_faults: u64,
    /// Mean latency of those faults, in nanoseconds.
    pub fault_mean_ns: u64,
    /// Histogram of fault latency (see [`LATENCY_BUCKETS`]).
    pub latency_us_log2: Vec<u64>,
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
        let us = ns / 1000;
        let b = (64 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency_us[b].fetch_add(1, Relaxed);
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
            ipis_forwarded: g(&self.ipis_forwarded),
            io_forwarded: g(&self.io_forwarded),
            resident_pages: g(&self.resident_pages),
            resident_peak: g(&self.resident_peak),
            remote_faults: n,
            fault_mean_ns: g(&self.fault_ns_total).checked_div(n).unwrap_or(0),
            latency_us_log2: self.latency_us.iter().map(g).collect(),
        }
    }
}
