"""Per-node counters of a distributed VM, as a table for a person and as totals.

Each worker's result carries ``stats`` (the VM's exit counters) with the DSM
counters under ``stats["dsm"]`` (``rust/src/dsm/stats.rs``: read/write/
write-protect faults, invalidations, pages and bytes moved, transfers skipped
by version, IPIs and I/O forwarded, resident pages current and peak, fault
latency). ``format_table`` lays them out one column per node plus a total;
``totals`` sums them for the ``--json`` summary.

Fault latency: ``fault_mean_ns`` (exact), the quantiles ``fault_p50_ns``,
``fault_p90_ns``, ``fault_p99_ns``, ``fault_p999_ns`` and ``fault_max_ns`` of the
engine's HDR histogram (exact to 0.1 %), that histogram's non-empty buckets
``latency_ns_hdr`` (``[[value_ns, count], ...]``), and the older log2 view
``latency_us_log2`` (bucket i: [2^(i-1), 2^i) us). Workers from before the HDR
histogram have only ``fault_mean_ns`` and ``latency_us_log2``: the table then shows
the log2 bucket bounds instead.

Totals are sums, except: ``fault_mean_ns`` is the mean over every node's
faults (weighted by ``remote_faults``), ``latency_us_log2`` is summed bucket by
bucket, ``latency_ns_hdr`` is merged (counts of equal values added) and the
quantiles are recomputed from it (left out when a node has no ``latency_ns_hdr``),
``fault_max_ns`` is the largest node's, and ``resident_peak_max`` (added) is the
largest single node's peak, which is the memory-aggregation figure
(``resident_peak`` itself is the sum of the nodes' peaks, an upper bound on the
cluster's resident guest memory).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeGuard

from dvmmd.vm.sizes import PAGE_SIZE

__all__ = [
    "QUANTILES",
    "dsm_of",
    "format_table",
    "hdr_quantile_ns",
    "latency_percentile_us",
    "merge_hdr",
    "totals",
]

#: The quantile fields of a DSM snapshot and their quantile.
QUANTILES: dict[str, float] = {
    "fault_p50_ns": 0.5,
    "fault_p90_ns": 0.9,
    "fault_p99_ns": 0.99,
    "fault_p999_ns": 0.999,
}

#: (key in stats.dsm, row label, how to show it) in display order.
_DSM_ROWS: tuple[tuple[str, str, str], ...] = (
    ("read_faults", "read faults", "n"),
    ("write_faults", "write faults", "n"),
    ("wp_faults", "write-protect faults", "n"),
    ("local_faults", "local faults (no message)", "n"),
    ("remote_faults", "faults needing a message", "n"),
    ("fault_mean_ns", "fault latency mean", "ns"),
    ("fault_p50_ns", "fault latency p50", "ns"),
    ("fault_p90_ns", "fault latency p90", "ns"),
    ("fault_p99_ns", "fault latency p99", "ns"),
    ("fault_p999_ns", "fault latency p99.9", "ns"),
    ("fault_max_ns", "fault latency max", "ns"),
    ("@p50", "fault latency p50 (<=, log2)", "us"),
    ("@p99", "fault latency p99 (<=, log2)", "us"),
    ("invalidations_sent", "invalidations sent", "n"),
    ("invalidations_received", "invalidations received", "n"),
    ("pages_sent", "pages sent", "n"),
    ("pages_received", "pages received", "n"),
    ("zero_pages_sent", "zero pages sent", "n"),
    ("bytes_sent", "bytes sent", "bytes"),
    ("bytes_received", "bytes received", "bytes"),
    ("transfers_skipped", "transfers skipped (version)", "n"),
    ("evictions", "evictions", "n"),
    ("ipis_forwarded", "IPIs forwarded", "n"),
    ("io_forwarded", "I/O accesses forwarded", "n"),
    ("resident_pages", "resident pages (now)", "pages"),
    ("resident_peak", "resident pages (peak)", "pages"),
)
#: VM-level counters shown under the DSM ones, when present.
_VM_ROWS: tuple[tuple[str, str, str], ...] = (
    ("exits_total", "VM exits", "n"),
    ("interrupts_injected", "interrupts injected", "n"),
    ("ipis_sent", "IPIs sent", "n"),
    ("insns_completed", "refused instructions completed", "n"),
    ("timer_fires", "LAPIC timer expiries", "n"),
    ("timer_late", "timer interrupts >10 ms late", "n"),
    ("timer_late_max_us", "timer lateness (max)", "us"),
    ("injections_deferred", "injections deferred", "n"),
    ("run_ms", "run time", "ms"),
)
_HIST = "latency_us_log2"
_HDR = "latency_ns_hdr"
_SKIP = {_HIST, _HDR}
#: Rows shown only for workers without the HDR fields (the log2 bucket bounds).
_LOG2_ROWS = {"@p50", "@p99"}


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def dsm_of(stats: Any) -> dict[str, Any]:
    """The DSM counters of one worker's ``stats`` (empty when there are none)."""
    if isinstance(stats, Mapping):
        dsm = stats.get("dsm")
        if isinstance(dsm, Mapping):
            return dict(dsm)
    return {}


def latency_percentile_us(hist: Any, q: float) -> int | None:
    """Upper bound (us) of the log2 bucket holding the ``q`` quantile, or None.

    Bucket 0 counts faults under 1 us, bucket i >= 1 those in [2^(i-1), 2^i) us;
    the last bucket is open (its bound is reported as its lower edge).
    """
    if not isinstance(hist, Sequence) or isinstance(hist, (str, bytes)):
        return None
    counts = [c if _is_int(c) and c > 0 else 0 for c in hist]
    total = sum(counts)
    if total == 0:
        return None
    need = q * total
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= need and c:
            if i == len(counts) - 1:
                return 1 << max(i - 1, 0)
            return 1 << i
    return None


def merge_hdr(hists: Iterable[Any]) -> list[tuple[int, int]]:
    """Merge ``latency_ns_hdr`` bucket lists: counts of equal values add (every
    node's histogram has the same bucket boundaries). Malformed entries are skipped."""
    acc: dict[int, int] = {}
    for h in hists:
        if not isinstance(h, Sequence) or isinstance(h, (str, bytes)):
            continue
        for pair in h:
            if isinstance(pair, Sequence) and not isinstance(pair, (str, bytes)) and len(pair) == 2:
                v, c = pair
                if _is_int(v) and _is_int(c) and c > 0:
                    acc[v] = acc.get(v, 0) + c
    return sorted(acc.items())


def hdr_quantile_ns(buckets: Sequence[tuple[int, int]], q: float) -> int | None:
    """The ``q`` quantile (0..1) of a merged ``latency_ns_hdr`` list, computed as the
    engine's HDR histogram does: the first bucket value whose cumulative count
    reaches ``max(1, ceil(q * total))``. None when there are no faults."""
    total = sum(c for _, c in buckets)
    if total == 0:
        return None
    want = max(1, math.ceil(min(q, 1.0) * total))
    seen = 0
    for v, c in buckets:
        seen += c
        if seen >= want:
            return v
    return buckets[-1][0]


def totals(per_node_stats: Sequence[Any]) -> dict[str, Any]:
    """Sum the DSM counters of every node (see the module doc for the exceptions)."""
    dsms = [dsm_of(s) for s in per_node_stats]
    out: dict[str, Any] = {}
    keys: list[str] = []
    for d in dsms:
        keys.extend(k for k in d if k not in keys)
    for k in keys:
        if k in QUANTILES or k == "fault_max_ns":
            continue  # recomputed below
        if k == _HDR:
            hdrs = [d.get(k) for d in dsms if d]
            if all(isinstance(h, list) for h in hdrs):
                merged = merge_hdr(hdrs)
                out[k] = [[v, c] for v, c in merged]
                for qk, q in QUANTILES.items():
                    out[qk] = hdr_quantile_ns(merged, q) or 0
        elif k == _HIST:
            hists = [d[k] for d in dsms if isinstance(d.get(k), list)]
            width = max((len(h) for h in hists), default=0)
            out[k] = [
                sum(h[i] for h in hists if i < len(h) and _is_int(h[i])) for i in range(width)
            ]
        elif k == "fault_mean_ns":
            n = sum(d.get("remote_faults", 0) for d in dsms if _is_int(d.get("remote_faults")))
            weighted = sum(
                d[k] * d.get("remote_faults", 0)
                for d in dsms
                if _is_int(d.get(k)) and _is_int(d.get("remote_faults"))
            )
            out[k] = weighted // n if n else 0
        else:
            vals = [d[k] for d in dsms if _is_num(d.get(k))]
            if vals:
                out[k] = sum(vals)
    maxes = [d["fault_max_ns"] for d in dsms if _is_int(d.get("fault_max_ns"))]
    if maxes:
        out["fault_max_ns"] = max(maxes)
    peaks = [d["resident_peak"] for d in dsms if _is_int(d.get("resident_peak"))]
    if peaks:
        out["resident_peak_max"] = max(peaks)
    return out


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if not _is_num(v):
        return str(v)
    if kind == "bytes":
        return _fmt_bytes(v)
    if kind == "ns":
        return f"{v / 1000:.1f} us" if v else "-"
    if kind == "us":
        return f"{v} us"
    if kind == "ms":
        return f"{v:.0f} ms" if isinstance(v, float) else f"{v} ms"
    if kind == "pages":
        return f"{v} ({_fmt_bytes(v * PAGE_SIZE)})"
    return f"{v:,}" if _is_int(v) else f"{v:.3g}"


def _cell(source: Mapping[str, Any], key: str) -> Any:
    if key == "@p50":
        return latency_percentile_us(source.get(_HIST), 0.5)
    if key == "@p99":
        return latency_percentile_us(source.get(_HIST), 0.99)
    return source.get(key)


def format_table(nodes: Sequence[Mapping[str, Any]], *, title: str = "dvmm stats") -> str:
    """A table of the counters: one column per node, then the total.

    ``nodes`` are ``{"node": i, "addr": "...", "stats": <worker stats>}``
    (``stats`` may be missing for a node that died).
    """
    stats = [n.get("stats") for n in nodes]
    dsms = [dsm_of(s) for s in stats]
    total = totals(stats)
    headers = [f"node {n.get('node', i)}" for i, n in enumerate(nodes)]
    multi = len(nodes) > 1
    if multi:
        headers.append("total")
    rows: list[list[str]] = []
    known = {k for k, _, _ in _DSM_ROWS} | set(QUANTILES) | {"fault_max_ns"}
    hdr = any("fault_p50_ns" in d for d in dsms)
    # exact quantiles when the workers have them, else the log2 bucket bounds
    hide = _LOG2_ROWS if hdr else {*QUANTILES, "fault_max_ns"}
    dsm_rows = [r for r in _DSM_ROWS if r[0] not in hide]
    for d in dsms:
        for k, v in d.items():
            if k not in known and k not in _SKIP and _is_num(v):
                known.add(k)
                dsm_rows.append((k, k.replace("_", " "), "n"))
    if any(dsms):
        for key, label, kind in dsm_rows:
            cells = [_fmt(_cell(d, key), kind) if d else "-" for d in dsms]
            if multi:
                cells.append(_fmt(_cell(total, key), kind))
            if all(c in ("-", "0") for c in cells):
                continue
            rows.append([label, *cells])
    vm_stats = [s if isinstance(s, Mapping) else {} for s in stats]
    for key, label, kind in _VM_ROWS:
        vals = [s.get(key) for s in vm_stats]
        if all(v is None for v in vals):
            continue
        cells = [_fmt(v, kind) for v in vals]
        if multi:
            if key in ("run_ms", "timer_late_max_us"):  # a maximum, not a sum
                nums = [v for v in vals if _is_num(v)]
                cells.append(_fmt(max(nums), kind) if nums else "-")
            else:
                cells.append(_fmt(sum(v for v in vals if _is_num(v)), kind))
        rows.append([label, *cells])
    if not rows:
        return f"{title}: (no counters)"
    addr_row = ["address", *[str(n.get("addr") or "-") for n in nodes]]
    if multi:
        addr_row.append("")
    table = [["", *headers], addr_row, *rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    lines = [f"{title}:"]
    for r in table:
        first = r[0].ljust(widths[0])
        rest = "  ".join(cell.rjust(w) for cell, w in zip(r[1:], widths[1:], strict=True))
        lines.append(f"  {first}  {rest}".rstrip())
    return "\n".join(lines)
