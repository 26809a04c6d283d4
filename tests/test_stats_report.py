"""The DSM fault-latency fields in the stats table, the totals and the metrics exporter
(issue 9: the engine's HDR histogram, rust/src/dsm/stats.rs)."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from dvmmd.daemon import metrics
from dvmmd.vm import stats_report


def _node(buckets: list[list[int]], mean: int, **kw: Any) -> dict[str, Any]:
    n = sum(c for _, c in buckets)
    return {
        "dsm": {
            "read_faults": n, "remote_faults": n, "fault_mean_ns": mean,
            "fault_p50_ns": stats_report.hdr_quantile_ns([(v, c) for v, c in buckets], 0.5) or 0,
            "fault_p90_ns": 0, "fault_p99_ns": 0, "fault_p999_ns": 0,
            "fault_max_ns": buckets[-1][0] if buckets else 0,
            "latency_us_log2": [0] * 24, "latency_ns_hdr": buckets, **kw,
        }
    }  # fmt: skip


def test_hdr_quantile_is_value_at_quantile() -> None:
    b = stats_report.merge_hdr([[[1000, 50], [2000, 40]], [[2000, 9], [9000, 1]], None])
    assert b == [(1000, 50), (2000, 49), (9000, 1)]
    assert stats_report.hdr_quantile_ns(b, 0.5) == 1000
    assert stats_report.hdr_quantile_ns(b, 0.51) == 2000
    assert stats_report.hdr_quantile_ns(b, 0.999) == 9000
    assert stats_report.hdr_quantile_ns(b, 0.0) == 1000
    assert stats_report.hdr_quantile_ns([], 0.5) is None
    assert stats_report.merge_hdr([[[1, 0], [2, True], "x", [3, 4]]]) == [(3, 4)]


def test_totals_merge_the_histograms() -> None:
    a = _node([[40_000, 90], [400_000, 10]], 76_000)
    b = _node([[40_000, 10], [90_000, 90]], 85_000)
    tot = stats_report.totals([a, b])
    assert tot["remote_faults"] == 200
    assert tot["fault_mean_ns"] == (100 * 76_000 + 100 * 85_000) // 200  # weighted
    assert tot["latency_ns_hdr"] == [[40_000, 100], [90_000, 90], [400_000, 10]]
    assert tot["fault_p50_ns"] == 40_000  # 100 of 200
    assert tot["fault_p90_ns"] == 90_000
    assert tot["fault_p99_ns"] == 400_000 and tot["fault_p999_ns"] == 400_000
    assert tot["fault_max_ns"] == 400_000  # the larger node's, not a sum
    # a node from before the HDR histogram: no quantiles are made up for the total
    old = {"dsm": {"remote_faults": 5, "fault_mean_ns": 1000, "latency_us_log2": [5]}}
    tot2 = stats_report.totals([a, old])
    assert "fault_p50_ns" not in tot2 and "latency_ns_hdr" not in tot2
    assert tot2["fault_max_ns"] == 400_000


def test_table_shows_exact_quantiles() -> None:
    a = _node([[40_000, 90], [400_000, 10]], 76_000)
    b = _node([[90_000, 10]], 90_000)
    table = stats_report.format_table(
        [
            {"node": 0, "addr": "127.0.0.1:1", "stats": a},
            {"node": 1, "addr": "127.0.0.2:1", "stats": b},
        ]
    )
    print(table)
    assert re.search(r"fault latency p50\s+40\.0 us\s+90\.0 us\s+40\.0 us", table), table
    assert re.search(r"fault latency max\s+400\.0 us\s+90\.0 us\s+400\.0 us", table), table
    assert "log2" not in table and "latency ns hdr" not in table
    # workers without the HDR fields: the log2 bucket bounds, as before
    hist = [0] * 24
    hist[6] = 10
    old = {"dsm": {"remote_faults": 10, "fault_mean_ns": 40_000, "latency_us_log2": hist}}
    table = stats_report.format_table([{"node": 0, "addr": "a", "stats": old}])
    assert re.search(r"fault latency p50 \(<=, log2\)\s+64 us", table), table
    assert "fault latency p99.9" not in table


def test_table_timer_rows_sum_counts_and_take_the_worst_lateness() -> None:
    a = {"timer_fires": 100, "timer_late": 2, "timer_late_max_us": 15_000}
    b = {"timer_fires": 50, "timer_late": 1, "timer_late_max_us": 40_000}
    table = stats_report.format_table(
        [{"node": 0, "addr": "a", "stats": a}, {"node": 1, "addr": "b", "stats": b}]
    )
    assert re.search(r"LAPIC timer expiries\s+100\s+50\s+150", table), table
    assert re.search(r"timer interrupts >10 ms late\s+2\s+1\s+3", table), table
    # the total of a maximum is the maximum, not the sum
    assert re.search(r"timer lateness \(max\)\s+15000 us\s+40000 us\s+40000 us", table), table


def _scrape(stats: dict[str, Any]) -> dict[str, Any]:
    """The families a daemon serves for one worker's ``stats``, parsed back."""
    registry = metrics.registry_of(
        lambda f: metrics.add_worker_stats(f, stats, {"vm": "m", "node": "n1"})
    )
    text = metrics.render(registry).decode()
    return {fam.name: fam for fam in text_string_to_metric_families(text)}


def test_metrics_export_the_fault_latency_histogram() -> None:
    stats = {"exits_total": 3, **_node([[40_000, 90], [400_000, 10]], 76_000)}
    stats["dsm"].update(fault_p90_ns=40_000, fault_p99_ns=400_000, fault_p999_ns=400_000)
    log2 = [0] * 24
    log2[6], log2[9] = 90, 10  # 32-64 us and 256-512 us
    stats["dsm"]["latency_us_log2"] = log2
    fams = _scrape(stats)
    h = fams["dvmm_vm_dsm_fault_latency_seconds"]
    assert h.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in h.samples if s.name.endswith("_bucket")]
    assert len(buckets) == 24 and buckets[-1] == ("+Inf", 100.0)
    les = [float(le) for le, _ in buckets]
    assert les == sorted(les) and les[0] == 1e-6 and les[6] == 64e-6
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)  # cumulative
    assert dict(buckets)[repr(32e-6)] == 0 and dict(buckets)[repr(64e-6)] == 90
    [count] = [s.value for s in h.samples if s.name.endswith("_count")]
    [total] = [s.value for s in h.samples if s.name.endswith("_sum")]
    assert count == 100 and abs(total - 0.0076) < 1e-12
    assert all(s.labels["vm"] == "m" and s.labels["node"] == "n1" for s in h.samples)
    q = fams["dvmm_vm_dsm_fault_latency_quantile_seconds"]
    assert q.type == "gauge"
    assert {s.labels["quantile"]: s.value for s in q.samples} == {
        "0.5": 4e-05, "0.9": 4e-05, "0.99": 0.0004, "0.999": 0.0004,
    }  # fmt: skip
    assert fams["dvmm_vm_dsm_fault_latency_max_seconds"].samples[0].value == 0.0004
    # cumulative counts are counters, values that go up and down gauges
    assert fams["dvmm_vm_dsm_read_faults"].type == "counter"
    assert fams["dvmm_vm_dsm_read_faults"].samples[0].name == "dvmm_vm_dsm_read_faults_total"
    assert fams["dvmm_vm_exits"].type == "counter"  # exits_total
    assert fams["dvmm_vm_dsm_fault_p50_ns"].type == "gauge"
    assert not any("latency_ns_hdr" in n or "latency_us_log2" in n for n in fams)


def test_metrics_per_vcpu_counters_and_resident_gauges() -> None:
    fams = _scrape({"local_vcpus": [2, 3], "per_vcpu_exits": [5, 7], "dsm": {"resident_pages": 9}})
    exits = fams["dvmm_vm_per_vcpu_exits"]
    assert exits.type == "counter"
    assert {s.labels["vcpu"]: s.value for s in exits.samples} == {"2": 5, "3": 7}
    assert fams["dvmm_vm_dsm_resident_pages"].type == "gauge"
    assert "dvmm_vm_local_vcpus" not in fams
    # a snapshot without the log2 buckets (older worker): no histogram
    assert "dvmm_vm_dsm_fault_latency_seconds" not in _scrape(
        {"dsm": {"remote_faults": 1, "fault_mean_ns": 5}}
    )
