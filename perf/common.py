"""Shared pieces of the performance suite: paths, keys, statistics, guest output.

Every figure is a :class:`Figure`: the per-repetition samples, their median (the
value reported) and their spread. Keys are the names of issue 6, so reports from
different revisions can be compared key by key.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: This suite (perf/) and where it writes.
PERF = Path(__file__).resolve().parent
BUILD = PERF / "build"
RESULTS = PERF / "results"
#: The dvmm checkout under test: this one, or DVMM_PERF_REPO (perf.ab points it at a
#: worktree of another revision while running this checkout's suite).
REPO = Path(os.environ.get("DVMM_PERF_REPO") or PERF.parent).resolve()
GUEST = REPO / "guest" / "build" / "dvmm-guest"

#: The loopback addresses `dvmmctl run --nodes N` gives its nodes (127.0.0.x).
NODE_ADDRS = ("127.0.0.1", "127.0.0.2")

#: Every key of the suite's table (issue 6, revised by issue 9), with its unit.
#: latest.json always has all of them (``value`` null when not measured).
ISSUE_KEYS: dict[str, str] = {
    # floors, measured in the same run (C probes)
    "local_fault_floor_p50_us": "us",
    "local_fault_floor_busy_p50_us": "us",
    "tcp_rtt_p50_us": "us",
    "tcp_rtt_busy_p50_us": "us",
    "tcp_stream_gbps": "Gbit/s",
    # what the guest sees (its faultlat and ipi workloads time every access / round)
    "remote_read_fault_p50_us": "us",
    "remote_read_fault_p99_us": "us",
    "remote_upgrade_fault_p50_us": "us",
    "remote_write_fault_p50_us": "us",
    "local_fault_guest_p50_us": "us",
    "remote_scan_gbps": "Gbit/s",
    "guest_touch_floor_gbps": "Gbit/s",
    "ipi_roundtrip_p50_us": "us",
    "ipi_roundtrip_p99_us": "us",
    "dvmm_ipi_roundtrip_1node_us": "us",
    "qemu_ipi_roundtrip_1node_us": "us",
    # whole workloads
    "qemu_1node_2vcpu_s": "s",
    "dvmm_1node_2vcpu_s": "s",
    "dvmm_2node_2vcpu_s": "s",
    "ep_efficiency_2node": "ratio",
    "counter_2node_ops_per_s": "ops/s",
    "falseshare_2node_ops_per_s": "ops/s",
    "numa_local_speedup": "ratio",
}

#: Keys where a larger value is better (for the A/B verdict "better/worse").
HIGHER_IS_BETTER = {
    "tcp_stream_gbps",
    "remote_scan_gbps",
    "ep_efficiency_2node",
    "counter_2node_ops_per_s",
    "falseshare_2node_ops_per_s",
    "falseshare_2node_plain_ops_per_s",
    "counter_2node_plain_ops_per_s",
    "numa_local_speedup",
    "remote_scan_guest_gbps",
    "remote_scan_gbps_encrypt",
    "remote_scan_gbps_integrity",
    "remote_scan_gbps_none",
    "remote_scan_shm_gbps",
    "guest_touch_floor_gbps",
    "prefetch_hit_ratio",
}


def _ratio(x: Sequence[float]) -> float | None:
    return x[0] / x[1] if x[1] else None


def _over_sum(x: Sequence[float]) -> float | None:
    """x0 / (x1 + x2)."""
    return x[0] / (x[1] + x[2]) if x[1] + x[2] else None


def _diff_over(x: Sequence[float]) -> float | None:
    """(x0 - x1) / x2."""
    return (x[0] - x[1]) / x[2] if x[2] else None


@dataclass(frozen=True)
class Target:
    """One 'where we want to be' line: ``formula(keys) op bound``.

    ``op`` "info" is a ratio reported for context, with no bound (status "info").
    """

    name: str
    expr: str  # human-readable formula
    keys: tuple[str, ...]
    op: str  # "<=", ">=" or "info"
    bound: float
    formula: Callable[[Sequence[float]], float | None] = _ratio

    def evaluate(self, values: Mapping[str, float | None]) -> float | None:
        v = [values.get(k) for k in self.keys]
        if any(x is None for x in v):
            return None
        x = [float(y) for y in v if y is not None]
        if len(x) == 1:
            return x[0]
        return self.formula(x)

    def status(self, ratio: float | None) -> str:
        if ratio is None:
            return "n/a"
        if self.op == "info":
            return "info"
        ok = ratio <= self.bound if self.op == "<=" else ratio >= self.bound
        return "met" if ok else "missed"

    @property
    def bound_text(self) -> str:
        return "—" if self.op == "info" else f"{self.op} {self.bound}"


TARGETS: tuple[Target, ...] = (
    Target(
        "remote_read_vs_floor",
        "remote_read_fault_p50_us / (local_fault_floor_busy_p50_us + tcp_rtt_p50_us)",
        ("remote_read_fault_p50_us", "local_fault_floor_busy_p50_us", "tcp_rtt_p50_us"),
        "<=",
        1.0,
        _over_sum,
    ),
    Target(
        "remote_read_tail",
        "remote_read_fault_p99_us / remote_read_fault_p50_us",
        ("remote_read_fault_p99_us", "remote_read_fault_p50_us"),
        "<=",
        4.0,
    ),
    Target(
        "remote_read_vs_guest_floor",
        "remote_read_fault_p50_us / (local_fault_guest_p50_us + tcp_rtt_p50_us) "
        "(the local floor as the guest sees it: a first touch resolved by its own node's "
        "engine, same runs; reported, no bound)",
        ("remote_read_fault_p50_us", "local_fault_guest_p50_us", "tcp_rtt_p50_us"),
        "info",
        0.0,
        _over_sum,
    ),
    Target(
        "remote_read_vs_physical_floor",
        "remote_read_fault_p50_us / (local_fault_floor_busy_p50_us + tcp_rtt_busy_p50_us) "
        "(both hops busy-polling: the physical floor here; reported, no bound)",
        ("remote_read_fault_p50_us", "local_fault_floor_busy_p50_us", "tcp_rtt_busy_p50_us"),
        "info",
        0.0,
        _over_sum,
    ),
    Target(
        "ipi_cross_node_cost",
        "(ipi_roundtrip_p50_us - dvmm_ipi_roundtrip_1node_us) / tcp_rtt_p50_us",
        ("ipi_roundtrip_p50_us", "dvmm_ipi_roundtrip_1node_us", "tcp_rtt_p50_us"),
        "<=",
        1.0,
        _diff_over,
    ),
    Target(
        "ipi_1node_vs_qemu",
        "dvmm_ipi_roundtrip_1node_us / qemu_ipi_roundtrip_1node_us",
        ("dvmm_ipi_roundtrip_1node_us", "qemu_ipi_roundtrip_1node_us"),
        "<=",
        1.0,
    ),
    Target(
        "scan_over_stream",
        "remote_scan_gbps / tcp_stream_gbps",
        ("remote_scan_gbps", "tcp_stream_gbps"),
        ">=",
        0.5,
    ),
    Target("copies_per_page", "copies_per_page", ("copies_per_page",), "<=", 2.0),
    Target(
        "encryption_cost",
        "remote_scan_gbps_encrypt / remote_scan_gbps_none",
        ("remote_scan_gbps_encrypt", "remote_scan_gbps_none"),
        ">=",
        0.85,
    ),
    Target("ep_efficiency", "ep_efficiency_2node", ("ep_efficiency_2node",), ">=", 0.9),
    Target(
        "dvmm_over_qemu",
        "dvmm_1node_2vcpu_s / qemu_1node_2vcpu_s",
        ("dvmm_1node_2vcpu_s", "qemu_1node_2vcpu_s"),
        "<=",
        1.05,
    ),
    Target(
        "falseshare_gain",
        "falseshare_2node_ops_per_s / falseshare_2node_plain_ops_per_s",
        ("falseshare_2node_ops_per_s", "falseshare_2node_plain_ops_per_s"),
        ">=",
        3.0,
    ),
)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100) of an already sorted sequence."""
    if not sorted_values:
        raise ValueError("no values")
    k = (len(sorted_values) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


@dataclass
class Figure:
    """A measured figure: one sample per repetition; the value is their median."""

    key: str
    unit: str
    samples: list[float]
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return statistics.median(self.samples)

    def spread(self) -> dict[str, float]:
        s = sorted(self.samples)
        return {
            "min": s[0],
            "max": s[-1],
            "p25": percentile(s, 25),
            "p75": percentile(s, 75),
            # relative half-range of the interquartile range, in percent of the median
            "iqr_rel_pct": (percentile(s, 75) - percentile(s, 25)) / 2 / self.value * 100
            if self.value
            else 0.0,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "value": round_sig(self.value),
            "unit": self.unit,
            "n": len(self.samples),
            "spread": {k: round_sig(v) for k, v in self.spread().items()},
            "samples": [round_sig(x) for x in self.samples],
            "method": self.method,
            **({"extra": self.extra} if self.extra else {}),
        }


def round_sig(x: float, digits: int = 5) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(0, digits - 1 - math.floor(math.log10(abs(x)))))


# ---------------------------------------------------------------- guest output

# ``time_us=`` is printed by the guest's generic result printer; optional here.
_RESULT = re.compile(r"dvmm-guest: (\S+) (.*?)\s*(?:time_us=(\d+) )?(PASS|FAIL)\s*$")
_KV = re.compile(r"(\w+)=(\S+)")


@dataclass
class GuestResult:
    workload: str
    values: dict[str, str]
    time_us: int
    passed: bool

    def num(self, key: str) -> float:
        return float(self.values[key])

    def has(self, *keys: str) -> bool:
        return all(k in self.values for k in keys)


def parse_results(text: str) -> dict[str, GuestResult]:
    """The result lines ``dvmm-guest: <workload> k=v ... time_us=N PASS`` by workload
    (the last one of each workload when a cmdline repeats it)."""
    out: dict[str, GuestResult] = {}
    for line in text.splitlines():
        m = _RESULT.search(line)
        if m:
            kv = dict(_KV.findall(m.group(2)))
            t = int(m.group(3)) if m.group(3) else 0
            out[m.group(1)] = GuestResult(m.group(1), kv, t, m.group(4) == "PASS")
    return out


#: The phases of the guest's faultlat workload (guest/src/user.c): each vCPU times,
#: one access at a time (rdtsc fenced around it), every first access to pages homed
#: on another node, in random order: ``read`` a page only its home holds, ``upgrade``
#: a write to a page read-shared by this node and the home, ``steal`` a write to a
#: page another node holds modified.
FAULTLAT_PHASES = ("read", "upgrade", "steal", "local")


class GuestFormatError(ValueError):
    """A guest result line without the fields this suite reads (older guest?)."""


def faultlat_us(r: GuestResult) -> dict[str, float]:
    """``<phase>_<p50|p99|max>`` in microseconds from a faultlat result line.

    Raises :class:`GuestFormatError` when a field is missing, or when the run had
    no remote partner (``shift=0`` / ``read_kind`` other than ``remote``: one node,
    so the timings are local first touches, not remote faults).
    """
    kind = r.values.get("read_kind")
    if kind is not None and kind != "remote":
        raise GuestFormatError(f"faultlat read_kind={kind} (no CPU on another node): {r.values}")
    if r.values.get("shift") == "0":
        raise GuestFormatError(f"faultlat shift=0 (no CPU on another node): {r.values}")
    out: dict[str, float] = {}
    for ph in FAULTLAT_PHASES:
        for q in ("p50", "p99", "max"):
            k = f"{ph}_{q}_ns"
            if k not in r.values:
                raise GuestFormatError(f"faultlat line has no {k}: {r.values}")
            out[f"{ph}_{q}"] = float(r.values[k]) / 1e3
    for k in ("cpus", "pages"):
        if k in r.values:
            out[k] = float(r.values[k])
    return out


def ipi_us(r: GuestResult) -> dict[str, float]:
    """The ipi line's per-round percentiles and mean/min in microseconds:
    ``p50``, ``p99`` (rtt_p50_ns / rtt_p99_ns), ``mean`` (rtt_ns), ``min``
    (min_rtt_ns). Raises :class:`GuestFormatError` without rtt_p50_ns/rtt_p99_ns
    (a guest older than issue 9 prints only the mean and the minimum)."""
    if not r.has("rtt_p50_ns", "rtt_p99_ns"):
        raise GuestFormatError(
            f"ipi line has no rtt_p50_ns/rtt_p99_ns (guest older than issue 9?): {r.values}"
        )
    out = {"p50": r.num("rtt_p50_ns") / 1e3, "p99": r.num("rtt_p99_ns") / 1e3}
    for k, f in (("mean", "rtt_ns"), ("min", "min_rtt_ns")):
        if k in r.values or f in r.values:
            out[k] = r.num(f) / 1e3
    return out


# ---------------------------------------------------------------- DSM statistics

#: Fields of a DSM counter snapshot (rust/src/dsm/stats.rs StatsSnapshot) that are
#: not counters: summing them over nodes would be wrong (see :func:`sum_counters`).
_HDR = "latency_ns_hdr"
_LOG2 = "latency_us_log2"
HDR_QUANTILES = {"fault_p50_ns": 0.5, "fault_p90_ns": 0.9, "fault_p99_ns": 0.99,
                 "fault_p999_ns": 0.999}  # fmt: skip


def _is_snapshot(d: Mapping[str, Any]) -> bool:
    return _LOG2 in d or _HDR in d


def find_dsm_snapshots(summary: Any) -> list[dict[str, Any]]:
    """Every per-node DSM counter snapshot of a ``dvmmctl run --json`` summary.

    The summary is ``{status, reason, error, nodes: [{node, addr, stats: {..., dsm:
    {...}}}], totals}`` (dvmmd/launcher/launch.py); ``totals`` already sums the nodes, so
    it is used only when no node carries its own ``stats.dsm``. Anything else (a bare
    ``stats`` dict or list) is searched for dicts with ``latency_ns_hdr`` or
    ``latency_us_log2``, never descending into a ``totals`` entry (that would count
    every fault twice).
    """
    if isinstance(summary, dict) and isinstance(summary.get("nodes"), list):
        per_node = [
            n["stats"]["dsm"]
            for n in summary["nodes"]
            if isinstance(n, dict)
            and isinstance(n.get("stats"), dict)
            and isinstance(n["stats"].get("dsm"), dict)
        ]
        if per_node:
            return per_node
        tot = summary.get("totals")
        if isinstance(tot, dict) and _is_snapshot(tot):
            return [tot]
    found: list[dict[str, Any]] = []
    if isinstance(summary, dict):
        if _is_snapshot(summary):
            found.append(summary)
        else:
            for k, v in summary.items():
                if k != "totals":
                    found.extend(find_dsm_snapshots(v))
    elif isinstance(summary, list):
        for v in summary:
            found.extend(find_dsm_snapshots(v))
    return found


def merge_hdr(hists: Iterable[Any]) -> list[tuple[float, float]]:
    """Merge ``latency_ns_hdr`` bucket lists (``[[value_ns, count], ...]``): counts of
    equal values add (every node's histogram has the same buckets)."""
    acc: dict[float, float] = {}
    for h in hists:
        if not isinstance(h, list):
            continue
        for pair in h:
            if isinstance(pair, list | tuple) and len(pair) == 2:
                v, c = pair
                if isinstance(v, int | float) and isinstance(c, int | float) and c > 0:
                    acc[float(v)] = acc.get(float(v), 0.0) + float(c)
    return sorted(acc.items())


def hdr_quantile(buckets: Sequence[Sequence[float]], q: float) -> float | None:
    """The q quantile (0..1) of a ``latency_ns_hdr`` bucket list, as the engine's
    HDR histogram computes it (``value_at_quantile``): the first bucket value whose
    cumulative count reaches ``max(1, ceil(q * total))``. None when empty."""
    total = sum(c for _, c in buckets)
    if total <= 0:
        return None
    want = max(1.0, math.ceil(min(q, 1.0) * total))
    seen = 0.0
    for v, c in buckets:
        seen += c
        if seen >= want:
            return float(v)
    return float(buckets[-1][0])


def sum_counters(snaps: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counters summed over nodes; log2 histograms summed bucket by bucket.

    Not sums: ``fault_mean_ns`` is the mean weighted by ``remote_faults``;
    ``latency_ns_hdr`` is merged and the ``fault_p*_ns`` quantiles are recomputed
    from it (or dropped when a node has no ``latency_ns_hdr``); ``fault_max_ns`` is
    the largest node's."""
    snaps = list(snaps)
    total: dict[str, Any] = {}
    for s in snaps:
        for k, v in s.items():
            if isinstance(v, bool) or k in HDR_QUANTILES or k in ("fault_max_ns", "fault_mean_ns"):
                continue
            if isinstance(v, int | float):
                total[k] = total.get(k, 0) + v
            elif isinstance(v, list) and all(isinstance(x, int | float) for x in v):
                cur: list[float] = total.setdefault(k, [0] * len(v))
                for i, x in enumerate(v):
                    if i < len(cur):
                        cur[i] += x
                    else:
                        cur.append(x)
    n = sum(float(s.get("remote_faults", 0)) for s in snaps)
    if any("fault_mean_ns" in s for s in snaps):
        w = sum(float(s.get("fault_mean_ns", 0)) * float(s.get("remote_faults", 0)) for s in snaps)
        total["fault_mean_ns"] = w / n if n else 0.0
    maxes = [
        float(s["fault_max_ns"]) for s in snaps if isinstance(s.get("fault_max_ns"), int | float)
    ]
    if maxes:
        total["fault_max_ns"] = max(maxes)
    if snaps and all(isinstance(s.get(_HDR), list) for s in snaps):
        merged = merge_hdr(s[_HDR] for s in snaps)
        total[_HDR] = [[v, c] for v, c in merged]
        for k, q in HDR_QUANTILES.items():
            total[k] = hdr_quantile(merged, q) or 0.0
    return total


def log2_hist_percentile(hist: Sequence[float], p: float) -> float | None:
    """Percentile (0..100) in microseconds of a log2 latency histogram.

    Bucket 0 counts faults under 1 us, bucket i >= 1 those in [2^(i-1), 2^i) us
    (rust/src/dsm/stats.rs; the engine truncates to whole microseconds first).
    Within a bucket the value is interpolated geometrically (assumes the faults
    are spread log-uniformly inside it): the true percentile lies in the same
    bucket, i.e. it is known to within a factor of 2, no better. Only for
    revisions whose engine has no ``latency_ns_hdr`` (before issue 9).
    """
    total = sum(hist)
    if total <= 0:
        return None
    want = total * p / 100.0
    seen = 0.0
    for i, c in enumerate(hist):
        if c <= 0:
            continue
        if seen + c >= want:
            frac = (want - seen) / c
            if i == 0:
                return frac
            lo = 2.0 ** (i - 1)
            return float(lo * 2.0**frac)
        seen += c
    return float(2 ** (len(hist) - 1))


def host_description() -> dict[str, Any]:
    """What kind of host this is (the figures depend on it)."""
    info: dict[str, Any] = {"cpus": os.cpu_count()}
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and "cpu_model" not in info:
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    hw_virt = " vmx" in flags or " svm" in flags
    pvm = Path("/sys/module/kvm_pvm").exists()
    info["kvm"] = Path("/dev/kvm").exists()
    info["virtualization"] = (
        "hardware (VT-x/AMD-V)"
        if hw_virt
        else ("KVM PVM (nested, no VT-x/AMD-V)" if pvm else "none")
    )
    try:
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        info["kernel"] = os.uname().release
    except OSError:
        pass
    return info
