"""Run the whole performance suite and write perf/results/latest.json + report.md + plots.

    python -m perf.run [--quick] [--out perf/results] [--no-profile]

1. micro-benchmarks under pytest-benchmark (perf/test_micro.py): raw TCP between two
   processes on the nodes' addresses, the local userfaultfd floor;
2. the bundled guest's ep workload under QEMU/KVM and dvmm on one node, interleaved;
3. the distributed-VM figures (issue 4): when ``dvmmctl run --nodes 2`` is not usable
   they are recorded as null with the reason under ``missing`` — never guessed;
4. profiles: py-spy flame graph of a worker under load, ``perf`` top symbols of its
   Rust threads (py-spy only sees threads that run Python);
5. perf/results/latest.json and report.md with PNG plots (perf.report).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from perf import measure, report
from perf.common import (
    ISSUE_KEYS,
    PERF,
    REPO,
    RESULTS,
    TARGETS,
    Figure,
    host_description,
)
from perf.measure import Missing, Params
from perf.probes import ProbeError
from perf.vm import VmError


class Collector:
    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}
        self.json_figs: dict[str, dict[str, Any]] = {}
        self.missing: dict[str, str] = {}
        self.distributions: dict[str, list[float]] = {}
        self.extra: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    def add(self, *figs: Figure) -> None:
        for f in figs:
            self.figures[f.key] = f
            self.json_figs[f.key] = f.to_json()
            print(f"perf: {f.key} = {f.value:.4g} {f.unit} (n={len(f.samples)})", flush=True)

    def miss(self, keys: Sequence[str], why: str) -> None:
        for k in keys:
            if k not in self.json_figs:
                self.missing[k] = why
        print(f"perf: missing {', '.join(keys)}: {why.splitlines()[0][:300]}", flush=True)

    def stage(self, name: str, keys: Sequence[str], fn: Callable[[], None]) -> None:
        t = time.monotonic()
        try:
            fn()
        except (Missing, VmError, ProbeError, OSError, subprocess.SubprocessError) as e:
            self.miss(keys, str(e) or type(e).__name__)
        self.timings[name] = round(time.monotonic() - t, 1)


def run_micro(c: Collector, p: Params, out: Path) -> None:
    bj = out / "benchmark.json"
    env = dict(os.environ, PERF_QUICK="1" if p.quick else "0")
    cmd = [
        sys.executable, "-m", "pytest", str(PERF / "test_micro.py"), "-q",
        "-p", "no:cacheprovider", "--rootdir", str(REPO), "--benchmark-json", str(bj),
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    print(r.stdout[-600:], flush=True)
    if not bj.exists():
        raise Missing(f"pytest-benchmark wrote no {bj.name}: {r.stdout[-800:]} {r.stderr[-800:]}")
    data = json.loads(bj.read_text())
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        fig = info.get("figure")
        if not fig:
            continue
        key = fig.pop("key")
        c.json_figs[key] = fig
        print(f"perf: {key} = {fig['value']} {fig['unit']} (n={fig['n']})", flush=True)
        if info.get("distribution"):
            c.distributions[key] = info["distribution"]
    if r.returncode != 0:
        failed = [ln for ln in r.stdout.splitlines() if "FAILED" in ln or "Error" in ln]
        c.extra["micro_failures"] = failed[-20:]


def run_vm1(c: Collector, p: Params) -> None:
    c.add(*measure.ep_1node(p))


DIST_KEYS = [
    "remote_read_fault_p50_us", "remote_read_fault_p99_us", "remote_write_fault_p50_us",
    "remote_scan_gbps", "ipi_roundtrip_p50_us", "dvmm_2node_2vcpu_s", "ep_efficiency_2node",
    "counter_2node_ops_per_s", "falseshare_2node_ops_per_s", "numa_local_speedup",
]  # fmt: skip


def run_distributed(c: Collector, p: Params) -> None:
    try:
        measure.check_distributed()
    except Missing as e:
        c.miss([*DIST_KEYS, "falseshare_2node_plain_ops_per_s", "fault_scaling"], str(e))
        return

    def remote() -> None:
        figs, hists = measure.remote_faults(p)
        c.add(*figs)
        c.extra["dsm_histograms"] = hists

    def ep2() -> None:
        one = c.figures.get("dvmm_1node_2vcpu_s")
        if one is None:
            raise Missing("needs dvmm_1node_2vcpu_s, which is missing")
        c.add(*measure.ep_2node(p, one))

    def scaling() -> None:
        c.extra["fault_scaling"] = measure.scaling(p)

    c.stage("remote_faults", DIST_KEYS[:4], remote)
    c.stage("ipi_2node", ["ipi_roundtrip_p50_us"], lambda: c.add(measure.ipi_2node(p)))
    c.stage("ep_2node", ["dvmm_2node_2vcpu_s", "ep_efficiency_2node"], ep2)
    c.stage("counter", ["counter_2node_ops_per_s"], lambda: c.add(measure.counter_ops(p)))
    c.stage("falseshare", ["falseshare_2node_ops_per_s"], lambda: c.add(measure.falseshare_ops(p)))
    c.stage("numa", ["numa_local_speedup"], lambda: c.add(measure.numa_speedup(p)))
    c.stage("scaling", ["fault_scaling"], scaling)
    c.miss(
        ["falseshare_2node_plain_ops_per_s"],
        "dvmm has no switch yet to run the plain invalidation protocol (no ping-pong "
        "detection) for the comparison the issue asks for",
    )


def run_profiles(c: Collector, p: Params, out: Path) -> None:
    """Flame graph of a VMM worker under load (py-spy) and perf's view of its native threads."""
    load = "run=ep,sweep,counter ep.size=64M sweep.mem=32M"
    worker = [sys.executable, "-m", "dvmmd.cli", "run", "--vcpus", "2", "--cmdline", load]
    notes: dict[str, str] = {}
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if Path(spy).exists():
        svg = out / "worker-flame.svg"
        r = subprocess.run(
            [spy, "record", "--native", "--idle", "-r", "250", "-o", str(svg), "--", *worker],
            cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        notes["worker_flame"] = (
            f"{svg.name}: py-spy record --native --idle of `dvmmctl run --vcpus 2 --cmdline "
            f"'{load}'`. py-spy samples only threads that run Python: the main thread waiting "
            "in _native.run_vm (GIL released) is shown with its native frames; the Rust vCPU "
            "threads are in worker-perf.txt"
            if r.returncode == 0 and svg.exists()
            else f"py-spy failed ({r.returncode}): {r.stderr[-400:]}"
        )
    else:
        notes["worker_flame"] = "py-spy not installed in the venv (pip install py-spy)"
    perf_bin = shutil.which("perf")
    if perf_bin:
        data = out / "worker.perf.data"
        r = subprocess.run(
            [perf_bin, "record", "-F", "999", "-g", "-o", str(data), "--", *worker],
            cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if r.returncode == 0 and data.exists():
            text = []
            for sort in ("comm,dso", "comm,dso,sym"):
                rep = subprocess.run(
                    [perf_bin, "report", "-i", str(data), "--stdio", "--no-children",
                     "--sort", sort, "-g", "none", "--percent-limit", "0.5"],
                    capture_output=True, text=True, timeout=300, check=False,
                )  # fmt: skip
                text.append(f"### perf report --sort {sort}\n{rep.stdout}")
            (out / "worker-perf.txt").write_text("\n".join(text))
            notes["worker_perf"] = (
                "worker-perf.txt: perf record -g of the same run, by thread/dso/symbol"
            )
            data.unlink(missing_ok=True)
            Path(str(data) + ".old").unlink(missing_ok=True)
        else:
            notes["worker_perf"] = f"perf record failed ({r.returncode}): {r.stderr[-300:]}"
    notes["daemon_flame"] = (
        "not profiled: the distributed VM (issue 4) is not usable yet, so there is no daemon "
        "under load to profile"
    )
    c.extra["profiles"] = notes


def git_revision() -> str:
    r = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return r.stdout.strip() or "unknown"


def assemble(c: Collector, p: Params, started: float) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for k, unit in ISSUE_KEYS.items():
        if k in c.json_figs:
            keys[k] = c.json_figs[k]
        else:
            keys[k] = {"value": None, "unit": unit, "n": 0, "spread": None}
            c.missing.setdefault(k, "not measured (its stage did not run)")
    extra_keys = {k: v for k, v in c.json_figs.items() if k not in ISSUE_KEYS}
    values = {k: v.get("value") for k, v in {**keys, **extra_keys}.items()}
    targets = []
    for t in TARGETS:
        ratio = t.evaluate(values)
        targets.append(
            {"name": t.name, "expr": t.expr, "target": f"{t.op} {t.bound}",
             "value": None if ratio is None else round(ratio, 4), "status": t.status(ratio)}
        )  # fmt: skip
    return {
        "schema": 1,
        "revision": git_revision(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": p.quick,
        "duration_s": round(time.monotonic() - started, 1),
        "host": host_description(),
        "keys": keys,
        "extra_keys": extra_keys,
        "missing": dict(c.missing),
        "targets": targets,
        "distributions": c.distributions,
        "extra": c.extra,
        "stage_seconds": c.timings,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (< 3 minutes)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory (perf/results)")
    ap.add_argument("--no-profile", action="store_true", help="skip py-spy / perf profiles")
    ap.add_argument("--no-report", action="store_true", help="only latest.json, no Markdown/PNG")
    args = ap.parse_args(argv)
    p = Params(quick=args.quick)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    c = Collector()
    c.stage("micro", ["tcp_rtt_p50_us", "tcp_stream_gbps", "local_fault_floor_p50_us"],
            lambda: run_micro(c, p, out))  # fmt: skip
    c.stage("vm_1node", ["qemu_1node_2vcpu_s", "dvmm_1node_2vcpu_s"], lambda: run_vm1(c, p))
    c.stage("distributed", DIST_KEYS, lambda: run_distributed(c, p))
    if not args.no_profile:
        c.stage("profiles", [], lambda: run_profiles(c, p, out))
    doc = assemble(c, p, started)
    (out / "latest.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"perf: wrote {out / 'latest.json'} in {doc['duration_s']} s", flush=True)
    if not args.no_report:
        report.write(doc, out)
        print(f"perf: wrote {out / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
