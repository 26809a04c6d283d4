"""Unit tests of the suite's own arithmetic and parsers (fast; no VM, no probes)."""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

import pytest

from perf import linux, measure, npb
from perf.ab import Side, compare, parse_env, permutation_p, render
from perf.common import (
    ISSUE_KEYS,
    TARGETS,
    Figure,
    GuestFormatError,
    faultlat_us,
    find_dsm_snapshots,
    hdr_quantile,
    ipi_us,
    log2_hist_percentile,
    merge_hdr,
    parse_results,
    sum_counters,
)
from perf.linux import linux_boot
from perf.measure import Missing, Params
from perf.run import DEFAULT_STAGES, STAGES, Collector, assemble, parse_stages
from perf.vm import VmError, VmRun

#: The guest's faultlat line (guest/src/user.c faultlat_check) on 2 nodes x 1 vCPU.
FAULTLAT = (
    "dvmm-guest: faultlat cpus=2 pages=2048 shift=1 read_kind=remote "
    "read_p50_ns=61234 read_p99_ns=180500 read_max_ns=2500000 "
    "upgrade_p50_ns=45000 upgrade_p99_ns=99000 upgrade_max_ns=400000 "
    "steal_p50_ns=70000 steal_p99_ns=210000 steal_max_ns=900000 "
    "local_p50_ns=30000 local_p99_ns=60000 local_max_ns=90000 time_us=812345 PASS"
)
IPI = (
    "dvmm-guest: ipi peer=1 peer_node=1 rounds=300 pings=300 pongs=300 rtt_ns=650000 "
    "min_rtt_ns=256000 rtt_p50_ns=400000 rtt_p99_ns=1900000 time_us=195000 PASS"
)
IPI_OLD = (
    "dvmm-guest: ipi peer=1 peer_node=1 rounds=300 pings=300 pongs=300 rtt_ns=650000 "
    "min_rtt_ns=256000 time_us=195000 PASS"
)


def test_parse_result_lines() -> None:
    out = (
        "dvmm-guest: boot cpus=2 nodes=1\n"
        "dvmm-guest: ep samples=4194304 inside=3294631 pi=3.142004 checksum=95 time_us=13452 PASS\n"
        "dvmm-guest: sweep bytes=16777216 numa=local write_us=4 verify_us=9 errors=0 time_us=13 FAIL\n"
        "dvmm-guest: custom a=1 b=2 PASS\n"
    )
    r = parse_results(out)
    assert r["ep"].time_us == 13452 and r["ep"].passed
    assert r["ep"].num("samples") == 4194304
    assert not r["sweep"].passed and r["sweep"].values["numa"] == "local"
    assert "boot" not in r
    assert r["custom"].passed and r["custom"].time_us == 0 and r["custom"].num("b") == 2


def test_faultlat_line() -> None:
    g = parse_results("noise\r\n" + FAULTLAT + "\r\n")["faultlat"]
    assert g.passed and g.time_us == 812345
    v = faultlat_us(g)
    assert v["read_p50"] == pytest.approx(61.234)
    assert v["read_p99"] == pytest.approx(180.5)
    assert v["read_max"] == pytest.approx(2500.0)
    assert v["upgrade_p50"] == pytest.approx(45.0)
    assert v["steal_p50"] == pytest.approx(70.0) and v["steal_p99"] == pytest.approx(210.0)
    assert v["cpus"] == 2 and v["pages"] == 2048
    # the line may carry other fields in any order
    shuffled = FAULTLAT.replace("shift=1 ", "").replace("cpus=2 ", "x=7 cpus=2 ")
    assert faultlat_us(parse_results(shuffled)["faultlat"])["read_p50"] == pytest.approx(61.234)


def test_faultlat_line_rejects_local_or_incomplete() -> None:
    one_node = FAULTLAT.replace("shift=1 read_kind=remote", "shift=0 read_kind=first_touch")
    with pytest.raises(GuestFormatError, match="first_touch"):
        faultlat_us(parse_results(one_node)["faultlat"])
    with pytest.raises(GuestFormatError, match="steal_p99_ns"):
        faultlat_us(parse_results(FAULTLAT.replace("steal_p99_ns", "x"))["faultlat"])


def test_ipi_line() -> None:
    v = ipi_us(parse_results(IPI)["ipi"])
    assert v == {"p50": 400.0, "p99": 1900.0, "mean": 650.0, "min": 256.0}
    with pytest.raises(GuestFormatError, match="rtt_p50_ns"):
        ipi_us(parse_results(IPI_OLD)["ipi"])


def _run(*lines: str, result_json: dict[str, object] | None = None) -> VmRun:
    text = "\n".join(lines) + "\n"
    return VmRun(text, parse_results(text), 1.0, result_json)


def test_ipi_figures_from_runs() -> None:
    p = Params(quick=True)
    s = measure._IpiSamples()
    one = IPI.replace("peer_node=1", "peer_node=0")
    s.add(_run(one.replace("rtt_p50_ns=400000", "rtt_p50_ns=300000")), _run(one), _run(IPI))
    s.add(_run(one.replace("rtt_p50_ns=400000", "rtt_p50_ns=310000")), _run(one),
          _run(IPI.replace("rtt_p50_ns=400000", "rtt_p50_ns=500000")))  # fmt: skip
    missing: dict[str, str] = {}
    figs = {f.key: f for f in s.figures(p, "run=ipi", True, missing)}
    assert not missing
    assert set(figs) == set(measure.IPI_KEYS)
    assert figs["qemu_ipi_roundtrip_1node_us"].value == pytest.approx(305.0)
    assert figs["dvmm_ipi_roundtrip_1node_us"].value == pytest.approx(400.0)
    assert figs["ipi_roundtrip_p50_us"].samples == [400.0, 500.0]
    assert figs["ipi_roundtrip_p99_us"].value == pytest.approx(1900.0)
    assert figs["ipi_roundtrip_p50_us"].extra["2node_min_us"] == pytest.approx(256.0)
    # an older guest: the ipi keys are missing with the reason, nothing is guessed
    old = measure._IpiSamples()
    old.add(_run(IPI_OLD), _run(IPI_OLD), _run(IPI_OLD))
    assert old.figures(p, "run=ipi", True, missing) == []
    assert set(missing) == set(measure.IPI_KEYS) and "rtt_p50_ns" in missing["ipi_roundtrip_p50_us"]


def test_faultlat_figures() -> None:
    p = Params(quick=True)
    runs = [
        parse_results(FAULTLAT)["faultlat"],
        parse_results(FAULTLAT.replace("read_p50_ns=61234", "read_p50_ns=81234"))["faultlat"],
        parse_results(FAULTLAT.replace("read_p50_ns=61234", "read_p50_ns=51234"))["faultlat"],
    ]
    figs = {f.key: f for f in measure.faultlat_figures(p, runs, [{"remote_faults": 8000}] * 3)}
    assert set(figs) == set(measure.FAULTLAT_KEYS)
    assert figs["remote_read_fault_p50_us"].value == pytest.approx(61.234)
    assert figs["remote_read_fault_p50_us"].samples == pytest.approx([61.234, 81.234, 51.234])
    assert figs["remote_read_fault_p99_us"].value == pytest.approx(180.5)
    assert figs["remote_upgrade_fault_p50_us"].value == pytest.approx(45.0)
    assert figs["remote_write_fault_p50_us"].value == pytest.approx(70.0)
    assert figs["remote_read_fault_p50_us"].extra["dsm_remote_faults_per_run_median"] == 8000


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
    hdr_only = {"stats": {"dsm": {"latency_ns_hdr": [[1000, 1]]}}}
    assert find_dsm_snapshots(hdr_only) == [{"latency_ns_hdr": [[1000, 1]]}]


def test_sum_counters_latency_fields() -> None:
    """Means are weighted, quantiles recomputed from the merged HDR buckets, max is the
    largest node's: never sums."""
    a = {"remote_faults": 3, "fault_mean_ns": 100, "fault_p50_ns": 20, "fault_p99_ns": 900,
         "fault_max_ns": 900, "latency_ns_hdr": [[10, 1], [20, 1], [900, 1]]}  # fmt: skip
    b = {"remote_faults": 1, "fault_mean_ns": 500, "fault_p50_ns": 500, "fault_p99_ns": 500,
         "fault_max_ns": 500, "latency_ns_hdr": [[20, 0], [500, 1]]}  # fmt: skip
    t = sum_counters([a, b])
    assert t["remote_faults"] == 4
    assert t["fault_mean_ns"] == pytest.approx((3 * 100 + 500) / 4)
    assert t["fault_max_ns"] == 900
    assert t["latency_ns_hdr"] == [[10.0, 1.0], [20.0, 1.0], [500.0, 1.0], [900.0, 1.0]]
    assert t["fault_p50_ns"] == 20 and t["fault_p99_ns"] == 900
    # a node without the HDR buckets (an older worker): no made-up quantiles
    t2 = sum_counters([a, {"remote_faults": 1, "fault_mean_ns": 5, "latency_us_log2": [1]}])
    assert "fault_p50_ns" not in t2 and "latency_ns_hdr" not in t2


def test_hdr_quantile_matches_hdrhistogram() -> None:
    # value_at_quantile: first value whose cumulative count reaches max(1, ceil(q * n))
    b = merge_hdr([[[1000, 50], [2000, 40]], [[2000, 9], [9000, 1]]])
    assert b == [(1000.0, 50.0), (2000.0, 49.0), (9000.0, 1.0)]
    assert hdr_quantile(b, 0.5) == 1000  # 50 of 100
    assert hdr_quantile(b, 0.51) == 2000
    assert hdr_quantile(b, 0.99) == 2000
    assert hdr_quantile(b, 0.999) == 9000
    assert hdr_quantile(b, 0.0) == 1000 and hdr_quantile(b, 1.0) == 9000
    assert hdr_quantile([], 0.5) is None
    assert merge_hdr([None, [[1, -1], "x", [2, 3]]]) == [(2.0, 3.0)]


def test_engine_read_quantiles_hdr_and_log2() -> None:
    p50, p99, kind = measure.engine_read_quantiles(
        {"latency_ns_hdr": [[40_000, 90], [400_000, 10]], "latency_us_log2": [0] * 24}
    )
    assert (p50, p99, kind) == (40.0, 400.0, "hdr")
    h = [0] * 24
    h[6] = 100
    p50, _, kind = measure.engine_read_quantiles({"latency_us_log2": h})
    assert kind == "log2" and 32 <= p50 < 64
    with pytest.raises(Missing):
        measure.engine_read_quantiles({"latency_us_log2": [0] * 24, "latency_ns_hdr": []})


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
    v = {
        "remote_read_fault_p50_us": 100.0, "remote_read_fault_p99_us": 350.0,
        "local_fault_floor_busy_p50_us": 30.0, "tcp_rtt_p50_us": 70.0, "tcp_rtt_busy_p50_us": 10.0,
        "ipi_roundtrip_p50_us": 400.0, "dvmm_ipi_roundtrip_1node_us": 300.0,
        "qemu_ipi_roundtrip_1node_us": 390.0,
    }  # fmt: skip
    r = t["remote_read_vs_floor"].evaluate(v)
    assert r == pytest.approx(1.0) and t["remote_read_vs_floor"].status(r) == "met"
    assert t["remote_read_vs_floor"].status(1.01) == "missed"
    r = t["remote_read_tail"].evaluate(v)
    assert r == pytest.approx(3.5) and t["remote_read_tail"].status(r) == "met"
    phys = t["remote_read_vs_physical_floor"]
    assert phys.evaluate(v) == pytest.approx(2.5) and phys.status(2.5) == "info"
    assert phys.bound_text == "—"
    r = t["ipi_cross_node_cost"].evaluate(v)
    assert r == pytest.approx(100 / 70) and t["ipi_cross_node_cost"].status(r) == "missed"
    r = t["ipi_1node_vs_qemu"].evaluate(v)
    assert r == pytest.approx(300 / 390) and t["ipi_1node_vs_qemu"].status(r) == "met"
    assert t["ep_efficiency"].status(0.5) == "missed"
    assert t["ep_efficiency"].status(t["ep_efficiency"].evaluate({})) == "n/a"
    assert t["dvmm_over_qemu"].bound_text == "<= 1.05"
    assert "remote_fault_over_rtt" not in t and "ipi_over_rtt" not in t
    stage_keys = {k for _, keys in STAGES.values() for k in keys}
    for x in TARGETS:  # every key a target reads is in the table or a stage's extra
        for k in x.keys:
            assert k in ISSUE_KEYS or k in stage_keys, k


def test_stage_filter() -> None:
    assert parse_stages(None, False) == list(DEFAULT_STAGES) and "ipi" not in DEFAULT_STAGES
    assert parse_stages("ipi,remote", False) == ["ipi", "remote"]  # run order
    assert parse_stages("remote, ep ,ipi", False) == ["ep", "remote"]  # ep gives the ipi keys
    assert parse_stages("micro,profiles", True) == ["micro"]
    with pytest.raises(ValueError, match="bogus"):
        parse_stages("remote,bogus", False)
    with pytest.raises(ValueError):
        parse_stages(",", False)
    # every table key comes from some stage
    staged = {k for _, keys in STAGES.values() for k in keys}
    assert set(ISSUE_KEYS) <= staged


def test_assemble_says_which_stage_was_skipped() -> None:
    c = Collector()
    c.add(Figure("remote_read_fault_p50_us", "us", [60.0, 70.0], "m"))
    c.add(Figure("remote_read_fault_p99_us", "us", [200.0, 300.0], "m"))
    c.add(Figure("engine_read_fault_p50_us", "us", [40.0], "m"))
    doc = assemble(c, Params(quick=True), 0.0, {}, ["remote"])
    assert doc["stages"] == ["remote"]
    assert doc["keys"]["remote_read_fault_p50_us"]["value"] == 65.0
    assert doc["keys"]["tcp_rtt_p50_us"]["value"] is None
    assert "micro" in doc["missing"]["tcp_rtt_p50_us"]
    assert "ep or ipi" in doc["missing"]["ipi_roundtrip_p50_us"]
    assert "engine_read_fault_p50_us" in doc["extra_keys"]
    st = {t["name"]: t for t in doc["targets"]}
    assert (
        st["remote_read_tail"]["status"] == "met" and st["remote_read_vs_floor"]["status"] == "n/a"
    )


def test_permutation_test() -> None:
    assert permutation_p([1.0, 1.1, 0.9, 1.0, 1.05], [2.0, 2.1, 1.9, 2.0, 2.05]) < 0.05
    assert permutation_p([1.0, 1.1, 0.9, 1.0], [1.05, 0.95, 1.0, 1.1]) > 0.05
    run = {"keys": {"tcp_rtt_p50_us": {"value": 10.0, "samples": [10.0, 10.1, 9.9, 10.0, 10.2]}}}
    slow = {"keys": {"tcp_rtt_p50_us": {"value": 20.0, "samples": [20.0, 20.1, 19.9, 20.0, 20.2]}}}
    rows = compare([run, run], [slow, slow], 0.05, 0.03)
    assert rows[0]["verdict"] == "worse"


def test_ab_configurations() -> None:
    assert parse_env(["DVMM_DSM_MODE=rt", "X=a=b", "E="], "--env-a") == {
        "DVMM_DSM_MODE": "rt", "X": "a=b", "E": ""
    }  # fmt: skip
    for bad in ("NOEQUALS", "1X=2", "=v"):
        with pytest.raises(ValueError, match="--env-b"):
            parse_env([bad], "--env-b")
    a = Side("A", None, {}, unset={"DVMM_DSM_MODE"})
    b = Side("B", None, {"DVMM_DSM_MODE": "rt"})
    base = {"PATH": "/bin", "DVMM_DSM_MODE": "spin"}
    assert a.environ(base) == {"PATH": "/bin"}  # A = the default, not the shell's export
    assert b.environ(base) == {"PATH": "/bin", "DVMM_DSM_MODE": "rt"}
    assert b.describe() == "this checkout DVMM_DSM_MODE=rt"
    assert a.describe() == "this checkout DVMM_DSM_MODE unset"


def test_ab_table() -> None:
    def run(v: list[float], ipi: float) -> dict[str, object]:
        return {
            "keys": {
                "remote_read_fault_p50_us": {"value": v[0], "unit": "us", "samples": v},
                "ipi_roundtrip_p50_us": {"value": ipi, "unit": "us", "samples": [ipi]},
                "tcp_rtt_p50_us": {"value": None, "unit": "us"},
            },
            "extra_keys": {"engine_read_fault_p50_us": {"value": 5.0, "samples": [5.0]}},
        }

    ra = [run([60.0, 62.0, 61.0], 400.0), run([63.0, 59.0, 60.5], 410.0)]
    rb = [run([40.0, 41.0, 42.0], 300.0), run([39.0, 40.5, 41.5], 320.0)]
    rows = compare(ra, rb, 0.05, 0.03, keys=["remote_read_fault_p50_us", "ipi_roundtrip_p50_us"])
    assert [r["key"] for r in rows] == ["ipi_roundtrip_p50_us", "remote_read_fault_p50_us"]
    rr = rows[1]
    assert rr["verdict"] == "better" and rr["n_a"] == 6 and rr["a_min"] == 59.0
    assert rr["p"] < 0.05 and math.isclose(rr["change_pct"], -32.92, abs_tol=0.01)
    assert rows[0]["verdict"].startswith("undecidable")  # 2+2 samples
    md = render(rows, "`DVMM_DSM_MODE=spin`", "`DVMM_DSM_MODE=rt`", ["header line"])
    lines = md.splitlines()
    assert lines[0] == "# A/B: A = `DVMM_DSM_MODE=spin` vs B = `DVMM_DSM_MODE=rt`"
    assert "header line" in lines
    row = next(x for x in lines if x.startswith("| `remote_read_fault_p50_us`"))
    assert "| us | 60.75 (59..63, 6) | 40.75 (39..42, 6) | -32.9% |" in row, row
    assert row.endswith("| better |")
    assert all(x.count("|") == 8 for x in lines if x.startswith("|"))


# ---------------------------------------------------------------- NPB (perf/npb.py)

#: The guest's npb lines (guest/src/npb.c npb_report): verified, and a corrupted input.
NPB_OUT = (
    "dvmm-guest: npb.ep class=W cpus=2 time_us=3684490 mops=18.21 verified=yes PASS\n"
    "dvmm-guest: note: npb.cg class=S zeta=8.598590197123e+00 want=8.597177507865e+00\n"
    "dvmm-guest: npb.cg class=S cpus=2 time_us=434312 mops=22.10 verified=no FAIL\n"
)


def test_npb_line_parses() -> None:
    r = parse_results(NPB_OUT)
    assert set(r) == {"npb.ep", "npb.cg"}  # the note line is not a result
    ep = npb.npb_line(r["npb.ep"])
    assert ep == npb.NpbLine("ep", "W", 2, 3.68449, 18.21, True, True)
    cg = npb.npb_line(r["npb.cg"])
    assert cg.kernel == "cg" and cg.cls == "S" and not cg.verified and not cg.passed
    assert cg.time_s == pytest.approx(0.434312)


def test_npb_line_rejects_other_lines() -> None:
    r = parse_results(
        "dvmm-guest: ep samples=4194304 inside=3294631 time_us=13452 PASS\n"
        "dvmm-guest: npb.is class=A cpus=2 verified=yes PASS\n"
    )
    with pytest.raises(GuestFormatError, match="not an npb line"):
        npb.npb_line(r["ep"])
    with pytest.raises(GuestFormatError, match="time_us"):
        npb.npb_line(r["npb.is"])


def _vm(text: str) -> VmRun:
    return VmRun(text, parse_results(text), 1.0)


def test_npb_runs_keys_and_ratios() -> None:
    runs = npb.NpbRuns("W")
    lines = {"dvmm_1x2": 2.0, "dvmm_2x1_local": 2.5, "dvmm_1x1": 4.0}
    for cfg, t in lines.items():
        text = "".join(
            f"dvmm-guest: npb.{k} class=W cpus=2 time_us={int(t * 1e6)} mops=1.00 verified=yes PASS\n"
            for k in npb.KERNELS
        )
        runs.add(cfg, _vm(text))
    assert runs.median("cg", "dvmm_1x2") == 2.0
    assert npb.ratio(runs, "mg", "dvmm_1x2", "dvmm_2x1_local") == pytest.approx(0.8)
    assert npb.ratio(runs, "mg", "dvmm_1x1", "dvmm_2x1_local") == pytest.approx(1.6)
    assert npb.ratio(runs, "mg", "dvmm_1x3", "dvmm_3x1_local") is None
    part = npb.figures(runs)
    names = {f.key for f in part.figures}
    assert "npb_ep_W_dvmm_2x1_local_s" in names and "npb_is_W_dvmm_1x1_s" in names
    assert "npb_ep_W_qemu_1x2_s" in part.missing  # not run: missing, never guessed
    md = npb.render(runs, Params(quick=False))
    assert "| ep | 0.8 |" in md and "1x1 / 2x1 local" in md


def test_npb_unverified_run_is_an_error() -> None:
    runs = npb.NpbRuns("S")
    bad = NPB_OUT.replace("npb.ep class=W", "npb.is class=S") + "".join(
        f"dvmm-guest: npb.{k} class=S cpus=2 time_us=5 mops=1.00 verified=yes PASS\n"
        for k in ("ep", "mg")
    )
    with pytest.raises(VmError, match=r"npb\.cg"):
        runs.add("qemu_1x2", _vm(bad))


def test_npb_configs_and_class() -> None:
    names = [c.name for c in npb.CONFIGS]
    assert "qemu_1x2" in names and "dvmm_3x1_ignore" in names and len(set(names)) == len(names)
    assert npb.Config("dvmm", 2, 1, "ignore").vcpus == 2
    assert npb.npb_class(Params(quick=True), None) == "S"
    assert npb.npb_class(Params(quick=False), None) == "W"
    assert npb.npb_class(Params(quick=False), "a") == "A"
    with pytest.raises(Missing):
        npb.npb_class(Params(quick=False), "B")
    assert (
        npb.cmdline("W", "ignore") == "run=npb.ep,npb.is,npb.cg,npb.mg,npb.ft class=W numa=ignore"
    )
    assert "npb" in STAGES and parse_stages("npb", False) == ["npb"]


def test_npb_config_subset_for_ab(monkeypatch: pytest.MonkeyPatch) -> None:
    assert npb.chosen_configs("") == npb.CONFIGS
    sub = npb.chosen_configs("dvmm_2x1_local, qemu_1x2")
    assert [c.name for c in sub] == ["dvmm_2x1_local", "qemu_1x2"]
    with pytest.raises(Missing, match="dvmm_9x9"):
        npb.chosen_configs("dvmm_9x9")
    monkeypatch.setenv("DVMM_PERF_NPB_CLASS", "w")
    assert npb.npb_class(Params(quick=True), None) == "W"
    assert npb.npb_class(Params(quick=True), "S") == "S"


# ---------------------------------------------------------------- linux stage

#: A console as dvmmctl prints it: printk stamps, dvmm's own lines between them.
LINUX_CONSOLE = """\
KASLR disabled: 'nokaslr' on cmdline.
[    0.000000] Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP
[    0.000000] Command line: console=ttyS0
dvmm: vCPU 1: timer interrupt injected 12555 us after its deadline
[    3.817719] ACPI: XSDT 0x00000000000E0030 000044 (v01 DVMM   DVMMXSDT 00000001 RVAT 01000000)
[    4.009381] ACPI: APIC 0x00000000000E0200 000058 (v01 DVMM   DVMMAPIC 00000001 RVAT 01000000)
[    4.104504] ACPI: SRAT 0x00000000000E0260 000078 (v03 DVMM   DVMMSRAT 00000001 RVAT 01000000)
[  199.276477] smp: Brought up 1 node, 2 CPUs
[  612.345000] Run /init as init process
[  612.400000] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b
"""
#: QEMU on a PVM host: the kernel starts, then KVM refuses xrstor (QEMU stays alive).
QEMU_DEATH = """\
KASLR disabled: 'nokaslr' on cmdline.
[    0.000000] Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\r
[    0.000000] Command line: console=ttyS0\r
[    0.012345] x86/fpu: x87 FPU will use FXSAVE\r
KVM internal error. Suberror: 1
emulation failure
RAX=0000000000000000 RBX=ffffffff82a03e58
"""


def _feed(text: str, marks: list[tuple[str, str, bool]]) -> linux_boot.Timeline:
    tl = linux_boot.Timeline(marks)
    for i, line in enumerate(text.splitlines(keepends=True)):
        tl.feed(line, 10.0 * (i + 1))  # wall: 10 s a line
    return tl


def test_linux_timeline_reads_milestones_and_stamps() -> None:
    tl = _feed(LINUX_CONSOLE, linux_boot.milestones(1, 2))
    assert tl.wall == {
        "kernel started": 20.0, "ACPI tables": 50.0, "MADT": 60.0, "SRAT": 70.0,
        "smp brought up": 80.0, "run /init": 90.0,
    }  # fmt: skip
    assert tl.guest["kernel started"] == 0.0 and tl.guest["ACPI tables"] == 3.817719
    assert tl.guest["run /init"] == 612.345 and tl.last_guest_s == 612.4
    assert tl.required_seen and tl.reached == "run /init"
    assert tl.death is not None and "Attempted to kill init" in tl.death
    # 2 nodes: "Brought up 1 node" is not the milestone, and SRAT becomes required
    tl2 = _feed(LINUX_CONSOLE, linux_boot.milestones(2, 2))
    assert "smp brought up" not in tl2.wall and not tl2.required_seen
    assert tl2.reached == "run /init"  # the furthest seen, in MILESTONES order


def test_linux_timeline_qemu_death() -> None:
    tl = _feed(QEMU_DEATH, linux_boot.milestones(1, 2))
    assert tl.wall == {"kernel started": 20.0} and tl.guest == {"kernel started": 0.0}
    assert tl.reached == "kernel started" and not tl.required_seen
    assert tl.death == "KVM internal error. Suberror: 1" and tl.last_guest_s == 0.012345
    assert _feed("no kernel at all\n", linux_boot.milestones(1, 2)).reached is None


def _times(text: str, stopped: str, detail: str) -> linux_boot.BootTimes:
    tl = _feed(text, linux_boot.milestones(1, 2))
    return linux_boot.BootTimes(
        wall=tl.wall, guest=tl.guest, reached=tl.reached, stopped=stopped, detail=detail,
        wall_s=123.0, last_guest_s=tl.last_guest_s, rc=0, death=tl.death,
    )  # fmt: skip


def test_linux_keys_and_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert linux_boot.slug("run /init") == "run_init" and linux.ORDER[:2] == (
        "kernel_started", "acpi_tables",
    )  # fmt: skip
    boots = {
        "qemu": _times(QEMU_DEATH, "died", "KVM internal error. Suberror: 1"),
        "dvmm_1n": _times(LINUX_CONSOLE, "milestones", "every required milestone seen"),
    }

    def fake(cfg: linux.Config, cmdline: str) -> linux_boot.BootTimes:
        if cfg.name not in boots:
            raise OSError("no such VMM")
        return boots[cfg.name]

    monkeypatch.setattr(linux_boot, "prepare", lambda: (tmp_path, tmp_path))
    part, extra = linux.stage(Params(), tmp_path, run=fake)
    figs = {f.key: f for f in part.figures}
    assert figs["linux_kernel_started_qemu_s"].value == 20.0
    assert "linux_acpi_tables_qemu_s" not in figs  # not reached: omitted
    assert figs["linux_reached_qemu"].value == 1.0
    assert figs["linux_reached_qemu"].extra["milestone"] == "kernel_started"
    assert figs["linux_reached_qemu"].extra["stopped"] == "died"
    assert figs["linux_run_init_dvmm_1n_s"].value == 90.0
    assert figs["linux_run_init_dvmm_1n_s"].extra["guest_s"] == 612.345
    assert figs["linux_reached_dvmm_1n"].value == 6.0  # run_init: 6th of ORDER
    assert "linux_reached_dvmm_2n" in part.missing and extra["errors"]["dvmm_2n"] == "no such VMM"
    assert extra["boots"]["qemu"]["milestone"] == "kernel_started"
    md = (tmp_path / "linux.md").read_text()
    assert "| kernel started | 20 (0.0) | 20 (0.0) |" in md
    assert "| run /init | — | 90 (612.3) |" in md
    assert "`dvmm_2n`: not run: no such VMM" in md


def test_linux_stage_is_opt_in() -> None:
    assert "linux" not in DEFAULT_STAGES and "linux" in STAGES
    assert parse_stages("linux", False) == ["linux"]
    assert parse_stages(None, True, "linux") == [*[s for s in DEFAULT_STAGES if s != "profiles"],
                                                 "linux"]  # fmt: skip
    assert parse_stages("micro", False, "linux") == ["micro", "linux"]
    with pytest.raises(ValueError, match="--with"):
        parse_stages(None, False, "linx")


def _fake_vmm(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "vmm.py"
    script.write_text(body)
    return [sys.executable, str(script)]


def test_linux_run_console_stops_a_dead_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VMM that reports the emulation failure and then stays (as QEMU does) is
    stopped after DEATH_GRACE_S; one that ignores SIGTERM is SIGKILLed."""
    monkeypatch.setattr(linux_boot, "DEATH_GRACE_S", 0.2)
    monkeypatch.setattr(linux_boot, "KILL_GRACE_S", 0.5)
    body = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"sys.stdout.write({QEMU_DEATH!r})\n"
        "sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    t = time.monotonic()
    res = linux_boot.run_console(
        _fake_vmm(tmp_path, body), linux_boot.milestones(1, 2), timeout=30,
        log_path=tmp_path / "out.log", grace_s=5, stop=linux_boot._stop_qemu, drain_s=1,
    )  # fmt: skip
    assert time.monotonic() - t < 10
    assert res.stopped == "died" and res.reached == "kernel started"
    assert res.rc == -signal.SIGKILL
    assert "emulation failure" in (tmp_path / "out.log").read_text()


def test_linux_run_console_timeout_and_exit(tmp_path: Path) -> None:
    quiet = _fake_vmm(
        tmp_path, "import time\nprint('[    1.000000] booting', flush=True)\ntime.sleep(60)\n"
    )
    res = linux_boot.run_console(
        quiet, linux_boot.milestones(1, 2), timeout=0.5, log_path=tmp_path / "q.log",
        grace_s=5, stop=linux_boot._stop_qemu, drain_s=1,
    )  # fmt: skip
    assert res.stopped == "timeout" and res.reached is None and res.last_guest_s == 1.0
    assert res.rc == -signal.SIGTERM
    (tmp_path / "vmm.py").write_text(f"import sys\nsys.stdout.write({LINUX_CONSOLE!r})\n")
    res = linux_boot.run_console(
        [sys.executable, str(tmp_path / "vmm.py")], linux_boot.milestones(1, 2), timeout=30,
        log_path=tmp_path / "e.log", grace_s=5, stop=linux_boot._stop_qemu, drain_s=1,
    )  # fmt: skip
    # every required milestone came before the panic: stopped for that (it exits in the grace)
    assert res.stopped == "milestones" and res.reached == "run /init"
    assert res.rc == 0 and set(res.wall) >= {"kernel started", "run /init"}
