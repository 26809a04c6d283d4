"""Unit tests of the suite's own arithmetic (fast; no VM, no probes)."""

from __future__ import annotations

import pytest

from perf.ab import compare, permutation_p
from perf.common import (
    TARGETS,
    Figure,
    find_dsm_snapshots,
    log2_hist_percentile,
    parse_results,
    sum_counters,
)


def test_parse_result_lines() -> None:
    out = (
        "dvmm-guest: boot cpus=2 nodes=1\n"
        "dvmm-guest: ep samples=4194304 inside=3294631 pi=3.142004 checksum=95 time_us=13452 PASS\n"
        "dvmm-guest: sweep bytes=16777216 numa=local write_us=4 verify_us=9 errors=0 time_us=13 FAIL\n"
    )
    r = parse_results(out)
    assert r["ep"].time_us == 13452 and r["ep"].passed
    assert r["ep"].num("samples") == 4194304
    assert not r["sweep"].passed and r["sweep"].values["numa"] == "local"


def test_dsm_snapshots_summed_over_nodes() -> None:
    node = {"read_faults": 3, "write_faults": 1, "latency_us_log2": [0, 1, 2]}
    stats = {"exits_total": 5, "nodes": [{"dsm": node}, {"dsm": dict(node, read_faults=4)}]}
    snaps = find_dsm_snapshots(stats)
    assert len(snaps) == 2
    t = sum_counters(snaps)
    assert t["read_faults"] == 7 and t["latency_us_log2"] == [0, 2, 4]


def test_dsm_snapshots_of_a_dvmmctl_json_summary() -> None:
    node = {"read_faults": 3, "latency_us_log2": [0, 1, 2]}
    summary = {
        "status": 0,
        "nodes": [
            {"node": 0, "addr": "127.0.0.1:1", "stats": {"exits_total": 9, "dsm": node}},
            {"node": 1, "addr": "127.0.0.2:1", "stats": {"dsm": dict(node, read_faults=4)}},
        ],
        "totals": {"read_faults": 7, "latency_us_log2": [0, 2, 4]},
    }
    t = sum_counters(find_dsm_snapshots(summary))  # the per-node ones, not totals again
    assert t["read_faults"] == 7 and t["latency_us_log2"] == [0, 2, 4]
    only_totals = {"nodes": [{"node": 0, "stats": {"dsm": None}}], "totals": summary["totals"]}
    assert find_dsm_snapshots(only_totals) == [summary["totals"]]


def test_log2_histogram_percentile() -> None:
    # all faults in [32, 64) us
    h = [0.0] * 24
    h[6] = 100
    p50 = log2_hist_percentile(h, 50)
    assert p50 is not None and 32 <= p50 < 64
    assert log2_hist_percentile([0.0] * 24, 50) is None


def test_figure_median_and_spread() -> None:
    f = Figure("k", "us", [3.0, 1.0, 2.0, 10.0, 2.5], "m")
    assert f.value == 2.5
    s = f.spread()
    assert s["min"] == 1.0 and s["max"] == 10.0


def test_targets() -> None:
    t = {x.name: x for x in TARGETS}
    r = t["remote_fault_over_rtt"].evaluate(
        {"remote_read_fault_p50_us": 80.0, "local_fault_floor_p50_us": 20.0, "tcp_rtt_p50_us": 50.0}
    )
    assert r == pytest.approx(1.2) and t["remote_fault_over_rtt"].status(r) == "met"
    assert t["ep_efficiency"].status(0.5) == "missed"
    assert t["ep_efficiency"].status(t["ep_efficiency"].evaluate({})) == "n/a"


def test_permutation_test() -> None:
    assert permutation_p([1.0, 1.1, 0.9, 1.0, 1.05], [2.0, 2.1, 1.9, 2.0, 2.05]) < 0.05
    assert permutation_p([1.0, 1.1, 0.9, 1.0], [1.05, 0.95, 1.0, 1.1]) > 0.05
    run = {"keys": {"tcp_rtt_p50_us": {"value": 10.0, "samples": [10.0, 10.1, 9.9, 10.0, 10.2]}}}
    slow = {"keys": {"tcp_rtt_p50_us": {"value": 20.0, "samples": [20.0, 20.1, 19.9, 20.0, 20.2]}}}
    rows = compare([run, run], [slow, slow], 0.05, 0.03)
    assert rows[0]["verdict"] == "worse"
