"""Prometheus metrics (text exposition format 0.0.4) over a tiny asyncio HTTP server.

``GET /metrics`` on ``metrics.listen``. Each daemon exports the cluster as it sees it
(membership, resources), the VMs it owns, and the counters of the VMM workers on its
own node (scrape every node for the whole picture). Worker counters come from the
worker's result (``stats``) or its live ``RESULT.json.stats`` file: every numeric
field becomes ``dvmm_vm_<field>{vm,node}`` (nested objects: ``<outer>_<inner>``), a list of numbers gets an ``index`` label,
and a ``{"buckets": [[le, count], ...], "sum": s, "count": n}`` object becomes a
histogram. The DSM fault latency (``stats.dsm``: ``fault_p50_ns`` ... ``fault_p999_ns``,
``fault_mean_ns``, ``remote_faults``; rust/src/dsm/stats.rs) is also exported as a
summary, ``dvmm_vm_dsm_fault_latency_seconds{quantile="0.5"|"0.9"|"0.99"|"0.999"}``
with ``_sum`` and ``_count`` (and ``dvmm_vm_dsm_fault_latency_max_seconds``); the
engine's raw HDR buckets (``latency_ns_hdr``, up to thousands) are not exported.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeGuard

log = logging.getLogger("dvmmd.metrics")

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class Exposition:
    """Collects samples grouped by metric family, then renders them."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def add(
        self, name: str, kind: str, help_: str, value: float, labels: dict[str, str] | None = None
    ) -> None:
        fam = self.families.setdefault(name, (kind, help_, []))
        fam[2].append(f"{name}{_labels(labels or {})} {_num(value)}")

    def add_histogram(
        self,
        name: str,
        help_: str,
        buckets: Iterable[tuple[float, float]],
        total: float,
        count: float,
        labels: dict[str, str],
    ) -> None:
        fam = self.families.setdefault(name, ("histogram", help_, []))
        cumulative = 0.0
        saw_inf = False
        for le, c in sorted(buckets):
            cumulative = max(cumulative, float(c))  # accept cumulative or per-bucket counts
            saw_inf = saw_inf or math.isinf(le)
            fam[2].append(
                f"{name}_bucket{_labels({**labels, 'le': _num(float(le))})} {_num(cumulative)}"
            )
        if not saw_inf:
            fam[2].append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {_num(count)}")
        fam[2].append(f"{name}_sum{_labels(labels)} {_num(total)}")
        fam[2].append(f"{name}_count{_labels(labels)} {_num(count)}")

    def add_summary(
        self,
        name: str,
        help_: str,
        quantiles: Iterable[tuple[float, float]],
        total: float,
        count: float,
        labels: dict[str, str],
    ) -> None:
        fam = self.families.setdefault(name, ("summary", help_, []))
        for q, v in quantiles:
            fam[2].append(f"{name}{_labels({**labels, 'quantile': _num(float(q))})} {_num(v)}")
        fam[2].append(f"{name}_sum{_labels(labels)} {_num(total)}")
        fam[2].append(f"{name}_count{_labels(labels)} {_num(count)}")

    def render(self) -> str:
        out = []
        for name, (kind, help_, lines) in sorted(self.families.items()):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)
        return "\n".join(out) + "\n"


#: DSM snapshot field -> Prometheus quantile.
_FAULT_QUANTILES = (
    ("fault_p50_ns", 0.5),
    ("fault_p90_ns", 0.9),
    ("fault_p99_ns", 0.99),
    ("fault_p999_ns", 0.999),
)
#: Lists that are not per-index gauges (the HDR buckets: [[value_ns, count], ...]).
_NOT_EXPORTED = {"latency_ns_hdr"}


def _is_num(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _add_fault_latency(
    exp: Exposition, stats: dict[str, Any], labels: dict[str, str], prefix: str
) -> None:
    """The DSM fault-latency quantiles as a summary (seconds), when the snapshot has them."""
    qs = [(q, stats[k]) for k, q in _FAULT_QUANTILES if _is_num(stats.get(k))]
    count = stats.get("remote_faults")
    mean = stats.get("fault_mean_ns")
    if not qs or not _is_num(count) or not _is_num(mean):
        return
    base = "dvmm_vm_" + _NAME_BAD.sub("_", prefix).lower() + "fault_latency"
    exp.add_summary(
        base + "_seconds",
        "DSM fault latency (faults needing a message), engine-side, from its HDR histogram",
        [(q, float(v) / 1e9) for q, v in qs],
        float(mean) * float(count) / 1e9,
        float(count),
        labels,
    )
    if _is_num(stats.get("fault_max_ns")):
        exp.add(
            base + "_max_seconds",
            "gauge",
            "slowest DSM fault so far (engine-side)",
            float(stats["fault_max_ns"]) / 1e9,
            labels,
        )


def add_worker_stats(
    exp: Exposition, stats: dict[str, Any], labels: dict[str, str], prefix: str = ""
) -> None:
    _add_fault_latency(exp, stats, labels, prefix)
    for key, value in sorted(stats.items()):
        if key in _NOT_EXPORTED:
            continue
        key = prefix + str(key)
        name = "dvmm_vm_" + _NAME_BAD.sub("_", key).lower()
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            exp.add(name, "gauge", f"VMM worker counter {key}", value, labels)
        elif isinstance(value, list) and all(isinstance(x, (int, float)) for x in value):
            for i, x in enumerate(value):
                exp.add(
                    name,
                    "gauge",
                    f"VMM worker counter {key} (per index)",
                    x,
                    {**labels, "index": str(i)},
                )
        elif isinstance(value, dict) and isinstance(value.get("buckets"), list):
            try:
                buckets = [(float(b[0]), float(b[1])) for b in value["buckets"]]
                exp.add_histogram(
                    name,
                    f"VMM worker histogram {key}",
                    buckets,
                    float(value.get("sum", 0)),
                    float(value.get("count", buckets[-1][1] if buckets else 0)),
                    labels,
                )
            except (TypeError, ValueError, IndexError):
                continue
        elif isinstance(value, dict):
            add_worker_stats(exp, value, labels, key + "_")


async def serve(host: str, port: int, render: Callable[[], str]) -> asyncio.Server:
    """Serve ``GET /metrics`` (and ``/`` with a pointer to it)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", "only GET\n", "text/plain"
            elif parts[1].split("?")[0] == "/metrics":
                status, body = "200 OK", render()
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            elif parts[1] == "/":
                status, body, ctype = "200 OK", "dvmmd: see /metrics\n", "text/plain"
            else:
                status, body, ctype = "404 Not Found", "not found\n", "text/plain"
            data = body.encode()
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
