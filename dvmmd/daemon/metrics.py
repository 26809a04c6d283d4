"""Prometheus metrics of a daemon: a prometheus_client collector, served by asyncio.

``GET /metrics`` on ``metrics.listen``. Each daemon exports the cluster as it sees it
(membership, resources), the VMs it owns, and the counters of the VMM workers on its
own node (scrape every node for the whole picture). The exposition is
prometheus_client's (``generate_latest``) from a custom collector (`DaemonCollector`)
that builds the metric families from the daemon's state at each scrape.

Worker counters come from the worker's result (``stats``) or its live
``RESULT.json.stats`` file: each numeric field becomes ``dvmm_vm_<field>{vm,node}``
(nested objects: ``<outer>_<inner>``, e.g. ``stats.dsm.read_faults`` ->
``dvmm_vm_dsm_read_faults_total``). Cumulative counts are counters (``_total``); the
few values that go up and down (`GAUGE_FIELDS`: resident pages, setup time, the
engine's latency quantiles) are gauges. ``per_vcpu_exits`` is a counter per ``vcpu``
label. The DSM fault latency (``stats.dsm``, rust/src/dsm/stats.rs) is a histogram,
``dvmm_vm_dsm_fault_latency_seconds`` (``_bucket{le}``, ``_sum``, ``_count``) from the
engine's log2 buckets (``latency_us_log2``: bucket i holds [2^(i-1), 2^i) us, the last
one open), so ``histogram_quantile`` works and nodes aggregate; the engine's own
quantiles from its HDR histogram are the gauge
``dvmm_vm_dsm_fault_latency_quantile_seconds{quantile}`` (and ``..._max_seconds``).
The raw HDR buckets (``latency_ns_hdr``, up to thousands) are not exported.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeGuard

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger("dvmmd.metrics")

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")

#: Worker fields that are values, not cumulative counts (at any nesting level).
GAUGE_FIELDS = frozenset(
    {
        "resident_pages",
        "resident_peak",
        "setup_ms",
        "fault_mean_ns",
        "fault_p50_ns",
        "fault_p90_ns",
        "fault_p99_ns",
        "fault_p999_ns",
        "fault_max_ns",
    }
)
#: Lists that are not exported as such: the HDR buckets ([[value_ns, count], ...]), the
#: log2 buckets (exported as the histogram) and the vCPU indexes (the ``vcpu`` label).
_NOT_EXPORTED = frozenset({"latency_ns_hdr", "latency_us_log2", "local_vcpus"})

#: DSM snapshot field -> quantile.
_FAULT_QUANTILES = (
    ("fault_p50_ns", 0.5),
    ("fault_p90_ns", 0.9),
    ("fault_p99_ns", 0.99),
    ("fault_p999_ns", 0.999),
)


class Families:
    """The metric families of one scrape, by name; samples can come in any order, and
    every sample of a family has the label names of its first."""

    def __init__(self) -> None:
        self.by_name: dict[str, tuple[Metric, tuple[str, ...]]] = {}

    def _family(
        self, make: Callable[..., Metric], name: str, help_: str, labels: dict[str, str]
    ) -> tuple[Metric, list[str]]:
        fam = self.by_name.get(name)
        if fam is None:
            fam = (make(name, help_, labels=list(labels)), tuple(labels))
            self.by_name[name] = fam
        metric, names = fam
        return metric, [str(labels.get(k, "")) for k in names]

    def gauge(
        self, name: str, help_: str, value: float, labels: dict[str, str] | None = None
    ) -> None:
        metric, values = self._family(GaugeMetricFamily, name, help_, labels or {})
        metric.add_metric(values, float(value))  # type: ignore[attr-defined]

    def counter(
        self, name: str, help_: str, value: float, labels: dict[str, str] | None = None
    ) -> None:
        """``name`` without ``_total`` (prometheus_client adds it to the sample)."""
        metric, values = self._family(CounterMetricFamily, name, help_, labels or {})
        metric.add_metric(values, float(value))  # type: ignore[attr-defined]

    def histogram(
        self,
        name: str,
        help_: str,
        cumulative: Sequence[tuple[float, float]],
        total: float,
        labels: dict[str, str],
    ) -> None:
        """``cumulative``: ``(le, count of observations <= le)`` ascending; the +Inf
        bucket (the count) is added when the last ``le`` is not infinite."""
        buckets = [(_float_label(le), float(c)) for le, c in cumulative]
        if not cumulative or not math.isinf(cumulative[-1][0]):
            buckets.append(("+Inf", float(cumulative[-1][1]) if cumulative else 0.0))
        metric, values = self._family(HistogramMetricFamily, name, help_, labels)
        metric.add_metric(values, buckets, float(total))  # type: ignore[attr-defined]

    def collect(self) -> list[Metric]:
        return [m for _, (m, _) in sorted(self.by_name.items())]


class DaemonCollector(Collector):
    """A prometheus_client collector that builds every family at scrape time."""

    def __init__(self, build: Callable[[Families], None]) -> None:
        self.build = build

    def collect(self) -> Iterable[Metric]:
        fams = Families()
        self.build(fams)
        return fams.collect()


def registry_of(build: Callable[[Families], None]) -> CollectorRegistry:
    """A registry holding only the daemon's collector (no process or GC metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(build))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)


def _float_label(v: float) -> str:
    """A float as a label value (``le``, ``quantile``), as Prometheus writes them."""
    return "+Inf" if math.isinf(v) and v > 0 else repr(float(v))


def _is_num(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metric_name(prefix: str, key: str) -> str:
    return "dvmm_vm_" + _NAME_BAD.sub("_", prefix + key).lower()


def _add_fault_latency(
    f: Families, stats: dict[str, Any], labels: dict[str, str], prefix: str
) -> None:
    """The DSM fault latency: the log2 buckets as a histogram (seconds), the engine's
    HDR quantiles and maximum as gauges."""
    base = _metric_name(prefix, "fault_latency")
    log2 = stats.get("latency_us_log2")
    if isinstance(log2, list) and log2 and all(_is_num(c) and c >= 0 for c in log2):
        cumulative: list[tuple[float, float]] = []
        seen = 0.0
        for i, c in enumerate(log2):
            seen += float(c)
            le = math.inf if i == len(log2) - 1 else (2**i) * 1e-6
            cumulative.append((le, seen))
        mean = stats.get("fault_mean_ns")
        total = float(mean) * seen / 1e9 if _is_num(mean) else 0.0
        f.histogram(
            base + "_seconds",
            "DSM fault latency (faults needing a message), engine-side, log2 buckets",
            cumulative,
            total,
            labels,
        )
    for key, q in _FAULT_QUANTILES:
        if _is_num(stats.get(key)):
            f.gauge(
                base + "_quantile_seconds",
                "DSM fault latency quantile from the engine's HDR histogram",
                float(stats[key]) / 1e9,
                {**labels, "quantile": _float_label(q)},
            )
    if _is_num(stats.get("fault_max_ns")):
        f.gauge(
            base + "_max_seconds",
            "slowest DSM fault so far (engine-side)",
            float(stats["fault_max_ns"]) / 1e9,
            labels,
        )


def add_worker_stats(
    f: Families, stats: dict[str, Any], labels: dict[str, str], prefix: str = ""
) -> None:
    """One VMM worker's counters (its ``stats`` object) as metric families."""
    if "latency_us_log2" in stats or "fault_max_ns" in stats:
        _add_fault_latency(f, stats, labels, prefix)
    vcpus = stats.get("local_vcpus")
    for key, value in sorted(stats.items()):
        key = str(key)
        name = _metric_name(prefix, key)
        if key in _NOT_EXPORTED or isinstance(value, bool):
            continue
        if _is_num(value):
            if key in GAUGE_FIELDS:
                f.gauge(name, f"VMM worker value {prefix}{key}", value, labels)
            elif value >= 0:
                f.counter(name, f"VMM worker counter {prefix}{key}", value, labels)
        elif isinstance(value, list) and all(_is_num(x) for x in value):
            # per-vCPU counters (per_vcpu_exits): labelled with the vCPU they count
            per_vcpu = isinstance(vcpus, list) and len(vcpus) == len(value)
            for i, x in enumerate(value):
                which = str(vcpus[i]) if per_vcpu and isinstance(vcpus, list) else str(i)
                f.counter(
                    name,
                    f"VMM worker counter {prefix}{key}, per vCPU",
                    x,
                    {**labels, "vcpu": which},
                )
        elif isinstance(value, dict):
            add_worker_stats(f, value, labels, prefix + key + "_")


async def serve(host: str, port: int, registry: CollectorRegistry) -> asyncio.Server:
    """Serve ``GET /metrics`` (``registry`` in Prometheus text format; ``/``: a pointer).

    A dozen lines of asyncio instead of prometheus_client's threaded HTTP server: the
    collector reads the daemon's state, which lives on this loop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            body: bytes | str
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", "only GET\n", "text/plain"
            elif parts[1].split("?")[0] == "/metrics":
                status, body, ctype = "200 OK", render(registry), CONTENT_TYPE_LATEST
            elif parts[1] == "/":
                status, body, ctype = "200 OK", "dvmmd: see /metrics\n", "text/plain"
            else:
                status, body, ctype = "404 Not Found", "not found\n", "text/plain"
            data = body if isinstance(body, bytes) else body.encode()
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head + (data if parts and parts[0] != "HEAD" else b""))
            await writer.drain()
        except (OSError, TimeoutError, UnicodeDecodeError, ValueError) as e:
            log.debug("metrics request failed: %s", e)
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
