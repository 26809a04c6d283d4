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
from collections.abc import Iterable, Mapping, Sequence
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

#: Every key issue 6 names, with its unit. latest.json always has all of them.
ISSUE_KEYS: dict[str, str] = {
    "local_fault_floor_p50_us": "us",
    "tcp_rtt_p50_us": "us",
    "remote_read_fault_p50_us": "us",
    "remote_read_fault_p99_us": "us",
    "remote_write_fault_p50_us": "us",
    "tcp_stream_gbps": "Gbit/s",
    "remote_scan_gbps": "Gbit/s",
    "ipi_roundtrip_p50_us": "us",
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
}


@dataclass(frozen=True)
class Target:
    """One 'where we want to be' line of issue 6: ``lhs op bound``."""

    name: str
    expr: str  # human-readable formula
    keys: tuple[str, ...]
    op: str  # "<=" or ">="
    bound: float

    def evaluate(self, values: Mapping[str, float | None]) -> float | None:
        v = [values.get(k) for k in self.keys]
        if any(x is None for x in v):
            return None
        x = [float(y) for y in v if y is not None]
        if self.name == "remote_fault_over_rtt":
            return (x[0] - x[1]) / x[2] if x[2] else None
        if len(x) == 1:
            return x[0]
        return x[0] / x[1] if x[1] else None

    def status(self, ratio: float | None) -> str:
        if ratio is None:
            return "n/a"
        ok = ratio <= self.bound if self.op == "<=" else ratio >= self.bound
        return "met" if ok else "missed"


TARGETS: tuple[Target, ...] = (
    Target(
        "remote_fault_over_rtt",
        "(remote_read_fault_p50_us - local_fault_floor_p50_us) / tcp_rtt_p50_us",
        ("remote_read_fault_p50_us", "local_fault_floor_p50_us", "tcp_rtt_p50_us"),
        "<=",
        1.2,
    ),
    Target(
        "remote_fault_hist_over_rtt",
        "remote_read_fault_p50_us / tcp_rtt_p50_us (handler-side histogram, no floor subtracted)",
        ("remote_read_fault_p50_us", "tcp_rtt_p50_us"),
        "<=",
        1.2,
    ),
    Target(
        "scan_over_stream",
        "remote_scan_gbps / tcp_stream_gbps",
        ("remote_scan_gbps", "tcp_stream_gbps"),
        ">=",
        0.5,
    ),
    Target(
        "ipi_over_rtt",
        "ipi_roundtrip_p50_us / tcp_rtt_p50_us",
        ("ipi_roundtrip_p50_us", "tcp_rtt_p50_us"),
        "<=",
        1.5,
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

_RESULT = re.compile(r"dvmm-guest: (\S+) (.*?)\s*time_us=(\d+) (PASS|FAIL)\s*$")
_KV = re.compile(r"(\w+)=(\S+)")


@dataclass
class GuestResult:
    workload: str
    values: dict[str, str]
    time_us: int
    passed: bool

    def num(self, key: str) -> float:
        return float(self.values[key])


def parse_results(text: str) -> dict[str, GuestResult]:
    """The result lines ``dvmm-guest: <workload> k=v ... time_us=N PASS`` by workload."""
    out: dict[str, GuestResult] = {}
    for line in text.splitlines():
        m = _RESULT.search(line)
        if m:
            kv = dict(_KV.findall(m.group(2)))
            out[m.group(1)] = GuestResult(m.group(1), kv, int(m.group(3)), m.group(4) == "PASS")
    return out


# ---------------------------------------------------------------- DSM statistics


def find_dsm_snapshots(summary: Any) -> list[dict[str, Any]]:
    """Every per-node DSM counter snapshot of a ``dvmmctl run --json`` summary.

    The summary is ``{status, reason, error, nodes: [{node, addr, stats: {..., dsm:
    {...}}}], totals}`` (dvmmd/localcluster.py); ``totals`` already sums the nodes, so
    it is used only when no node carries its own ``stats.dsm``. Anything else (a bare
    ``stats`` dict or list) is searched for dicts with ``latency_us_log2``, never
    descending into a ``totals`` entry (that would count every fault twice).
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
        if isinstance(tot, dict) and "latency_us_log2" in tot:
            return [tot]
    found: list[dict[str, Any]] = []
    if isinstance(summary, dict):
        if "latency_us_log2" in summary:
            found.append(summary)
        else:
            for k, v in summary.items():
                if k != "totals":
                    found.extend(find_dsm_snapshots(v))
    elif isinstance(summary, list):
        for v in summary:
            found.extend(find_dsm_snapshots(v))
    return found


def sum_counters(snaps: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counters summed over nodes; histograms summed bucket by bucket."""
    total: dict[str, Any] = {}
    for s in snaps:
        for k, v in s.items():
            if isinstance(v, bool):
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
    return total


def log2_hist_percentile(hist: Sequence[float], p: float) -> float | None:
    """Percentile (0..100) in microseconds of a log2 latency histogram.

    Bucket 0 counts faults under 1 us, bucket i >= 1 those in [2^(i-1), 2^i) us
    (rust/src/dsm/stats.rs; the engine truncates to whole microseconds first).
    Within a bucket the value is interpolated geometrically (assumes the faults
    are spread log-uniformly inside it): the true percentile lies in the same
    bucket, i.e. it is known to within a factor of 2, no better.
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
