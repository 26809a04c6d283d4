"""The DSM fault-latency fields in the stats table, the totals and the metrics exporter
(issue 9: the engine's HDR histogram, rust/src/dsm/stats.rs)."""

from __future__ import annotations

import re
from typing import Any

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


def test_metrics_export_a_summary() -> None:
    exp = metrics.Exposition()
    stats = {"exits_total": 3, **_node([[40_000, 90], [400_000, 10]], 76_000)}
    stats["dsm"].update(fault_p90_ns=40_000, fault_p99_ns=400_000, fault_p999_ns=400_000)
    metrics.add_worker_stats(exp, stats, {"vm": "m", "node": "n1"})
    text = exp.render()
    print(text)
    name = "dvmm_vm_dsm_fault_latency_seconds"
    assert f"# TYPE {name} summary" in text
    assert f'{name}{{vm="m",node="n1",quantile="0.5"}} 4e-05' in text
    assert f'{name}{{vm="m",node="n1",quantile="0.99"}} 0.0004' in text
    assert f'{name}{{vm="m",node="n1",quantile="0.999"}} 0.0004' in text
    assert f'{name}_count{{vm="m",node="n1"}} 100.0' in text
    assert f'{name}_sum{{vm="m",node="n1"}} 0.0076' in text
    assert 'dvmm_vm_dsm_fault_latency_max_seconds{vm="m",node="n1"} 0.0004' in text
    assert 'dvmm_vm_dsm_fault_p50_ns{vm="m",node="n1"} 40000' in text  # the gauges stay
    assert "latency_ns_hdr" not in text
    assert 'dvmm_vm_dsm_latency_us_log2{vm="m",node="n1",index="0"} 0' in text
    # a snapshot without quantiles (older worker): no summary
    exp2 = metrics.Exposition()
    metrics.add_worker_stats(exp2, {"dsm": {"remote_faults": 1, "fault_mean_ns": 5}}, {})
    assert "summary" not in exp2.render()
