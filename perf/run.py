"""Run the whole performance suite and write perf/results/latest.json + report.md + plots.

    python -m perf.run [--quick] [--out perf/results] [--no-profile] [--only STAGE,...]

Stages (``--only`` picks some; ``--list-stages`` prints them with their keys):

1. ``micro``: micro-benchmarks under pytest-benchmark (perf/test_micro.py): raw TCP
   between two processes on the nodes' addresses (blocking and busy-polling), the
   local userfaultfd floors (blocking and busy-polling handler);
2. ``ep``: the bundled guest's ep (+ ipi) workload under QEMU/KVM, dvmm on one node and
   dvmm on two nodes (``dvmmctl run --nodes 2``), interleaved run by run; the ipi keys
   come from the same boots. ``ipi`` (not in the default set): only the ipi workload,
   for short A/B runs; skipped when ``ep`` runs;
3. the other distributed-VM figures: ``remote`` (guest-timed remote faults: faultlat;
   scan bandwidth and the engine's histogram: sweep), ``contended`` (counter and
   falseshare with the DSM hold window and without, ``--hold-window-us 0``), ``numa``
   (locality), ``scaling`` (fault throughput). A figure that cannot be measured is
   recorded as null with the reason under ``missing`` -- never guessed;
4. ``npb``: the guest's NAS Parallel Benchmark kernels on 1 node (QEMU/KVM and dvmm) and on
   2 and 3 nodes (dvmm, numa=local and numa=ignore) -> npb_* keys, npb.md and npb.png
   (perf/npb.py; class W, ``--quick`` S, ``--npb-class`` to choose);
   ``linux`` (not in the default set, ~35-50 min: ``--only linux`` or ``--with linux``):
   Debian's kernel booted under QEMU/KVM, dvmm 1 node and dvmm 2 nodes, the time to
   each boot milestone -> linux_* keys and linux.md (perf/linux.py);
5. ``profiles``: under a 2-node load, py-spy flame graphs of the workers and of the
   daemons (``dvmmctl demo``), ``perf record -g`` of the workers' native threads;
6. perf/results/latest.json and report.md with PNG plots (perf.report).
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

from perf import linux, measure, migration, npb, report, snapshot
from perf.common import (
    ISSUE_KEYS,
    PERF,
    REPO,
    RESULTS,
    TARGETS,
    Figure,
    host_description,
)
from perf.measure import (
    ENGINE_KEYS,
    EP_KEYS,
    FAULTLAT_KEYS,
    IPI_KEYS,
    Missing,
    Params,
    Partial,
)
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

    def partial(self, r: Partial) -> None:
        self.add(*r.figures)
        for k, why in r.missing.items():
            self.miss([k], why)

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


MICRO_KEYS = (
    "tcp_rtt_p50_us", "tcp_rtt_busy_p50_us", "tcp_stream_gbps", "local_fault_floor_p50_us",
    "local_fault_floor_busy_p50_us",
)  # fmt: skip
SCAN_KEYS = (
    "remote_scan_gbps", "remote_scan_shm_gbps", "guest_touch_floor_gbps", "prefetch_hit_ratio",
    "copies_per_page", *ENGINE_KEYS,
)  # fmt: skip
CONTENDED_KEYS = ("counter_2node_ops_per_s", "falseshare_2node_ops_per_s")
PLAIN_KEYS = ("falseshare_2node_plain_ops_per_s", "counter_2node_plain_ops_per_s")

#: name -> (what it runs, the keys it gives), in run order. ``ipi`` is not in the
#: default set: ``ep``'s boots run the ipi workload too.
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "micro": ("C probes: TCP round trip and stream, local userfaultfd floors", MICRO_KEYS),
    "ep": ("guest ep+ipi: QEMU, dvmm 1 node, dvmm 2 nodes, interleaved", (*EP_KEYS, *IPI_KEYS)),
    "ipi": ("guest ipi only: QEMU, dvmm 1 node, dvmm 2 nodes (skipped with ep)", IPI_KEYS),
    "remote": ("guest faultlat + sweep on 2 nodes", (*FAULTLAT_KEYS, *SCAN_KEYS)),
    "contended": ("counter, falseshare on 2 nodes, hold window / plain", (*CONTENDED_KEYS, *PLAIN_KEYS)),
    "numa": ("sweep numa=ignore vs numa=local on 2 nodes", ("numa_local_speedup",)),
    "security": ("remote scan and read miss under each --data-plane mode", measure.SECURITY_KEYS),
    "scaling": ("fault throughput against nodes and vCPUs (extra.fault_scaling)", ()),
    "snapshot": ("snapshot of a 2-node VM: guest-visible stop, write speed vs disk", snapshot.KEYS),
    "migration": ("live vCPU migration on 2 nodes: the guest's gap vs floor and 5 ms + RTT", migration.KEYS),
    "npb": ("NPB EP/IS/CG/MG/FT: QEMU and dvmm 1 node, dvmm 2 and 3 nodes (npb.md)", ()),
    "linux": ("Debian kernel boot milestones: QEMU, dvmm 1 node, dvmm 2 nodes (linux.md)", ()),
    "profiles": ("py-spy and perf profiles under a 2-node load", ()),
}  # fmt: skip
#: Not in the default set: ``ipi`` (ep's boots give it), ``linux`` (~35-50 min here).
OPT_IN = ("ipi", "linux")
DEFAULT_STAGES = tuple(k for k in STAGES if k not in OPT_IN)
#: Stages that need ``dvmmctl run --nodes 2`` (ep and ipi run their 1-node part without).
DISTRIBUTED = ("remote", "contended", "numa", "security", "scaling", "snapshot", "migration")
#: The 2-node keys of ep / ipi.
TWO_NODE_EP_KEYS = ("dvmm_2node_2vcpu_s", "ep_efficiency_2node", "ipi_roundtrip_p50_us",
                    "ipi_roundtrip_p99_us")  # fmt: skip


def _stage_names(opt: str, names: str) -> list[str]:
    want = [x.strip() for x in names.split(",") if x.strip()]
    bad = [x for x in want if x not in STAGES]
    if bad or not want:
        raise ValueError(
            f"{opt}: unknown stage(s) {', '.join(bad) or '(none given)'}; "
            f"stages: {', '.join(STAGES)}"
        )
    return want


def parse_stages(only: str | None, no_profile: bool, with_: str | None = None) -> list[str]:
    """The stages to run, in run order, from ``--only a,b`` (None: the default set)
    plus ``--with c,d`` (stages added to that set, e.g. the opt-in ``linux``)."""
    want = list(DEFAULT_STAGES) if only is None else _stage_names("--only", only)
    if with_ is not None:
        want += _stage_names("--with", with_)
    chosen = [k for k in STAGES if k in want]
    if "ep" in chosen and "ipi" in chosen:
        chosen.remove("ipi")  # ep's boots give the ipi keys
    if no_profile and "profiles" in chosen:
        chosen.remove("profiles")
    return chosen


def run_distributed(c: Collector, p: Params, stages: Sequence[str]) -> None:
    def scan() -> None:
        figs, lat = measure.remote_scan(p)
        c.add(*figs)
        c.extra["dsm_latency"] = lat

    def scaling() -> None:
        c.extra["fault_scaling"] = measure.scaling(p)

    if "remote" in stages:
        c.stage("remote_faultlat", FAULTLAT_KEYS, lambda: c.add(*measure.faultlat(p)))
        c.stage("remote_scan", SCAN_KEYS, scan)
    if "contended" in stages:
        hold = measure.hold_window_supported()
        c.extra["hold_window_switch"] = hold
        c.stage("contended", [*CONTENDED_KEYS, *PLAIN_KEYS],
                lambda: c.add(*measure.contended_ops(p, hold)))  # fmt: skip
        if not hold:
            c.miss(
                PLAIN_KEYS,
                "dvmmctl run has no --hold-window-us (no switch to the plain invalidation protocol)",
            )
    if "numa" in stages:
        c.stage("numa", ["numa_local_speedup"], lambda: c.add(measure.numa_speedup(p)))
    if "security" in stages:
        c.stage("security", list(measure.SECURITY_KEYS),
                lambda: c.add(*measure.security_modes(p)))  # fmt: skip
    if "scaling" in stages:
        c.stage("scaling", ["fault_scaling"], scaling)
    if "snapshot" in stages:
        c.stage("snapshot", list(snapshot.KEYS), lambda: c.add(*snapshot.stage(p)))
    if "migration" in stages:
        c.stage("migration", list(migration.KEYS), lambda: c.add(*migration.stage(p)))


PROFILE_LOAD = "run=sweep,falseshare,counter,ipi sweep.mem=64M ipi.iters=300 falseshare.iters=2M"


def _perf_report(perf_bin: str, data: Path, title: str) -> str:
    text = [title]
    for sort in ("comm,dso", "comm,dso,sym"):
        rep = subprocess.run(
            [perf_bin, "report", "-i", str(data), "--stdio", "--no-children",
             "--sort", sort, "-g", "none", "--percent-limit", "0.5"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        text.append(f"### perf report --sort {sort}\n{rep.stdout}")
    rep = subprocess.run(
        [perf_bin, "report", "-i", str(data), "--stdio", "--no-children", "--comm",
         "dsm-0,dsm-1,vcpu0,vcpu1", "--sort", "comm,sym", "-g", "graph,3,caller",
         "--percent-limit", "3"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    text.append(f"### call chains (-g) of the DSM and vCPU threads, >= 3 %\n{rep.stdout[:60000]}")
    return "\n".join(text)


def run_profiles(c: Collector, p: Params, out: Path) -> None:
    """Profiles under a 2-node load: py-spy flame graphs of the workers and of the
    daemons (``dvmmctl demo``), and ``perf record -g`` of the workers' native threads."""
    load = PROFILE_LOAD
    worker = [sys.executable, "-m", "dvmmd.cli", "run", "--nodes", "2", "--vcpus", "2",
              "--memory", "256M", "--cmdline", load]  # fmt: skip
    demo = [sys.executable, "-m", "dvmmd.cli", "demo", "--vcpus", "2", "--cmdline", load]
    notes: dict[str, str] = {"load": f"guest cmdline '{load}' on 2 nodes x 1 vCPU"}
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    # --nonblocking: py-spy's default pauses the sampled process; a worker paused for
    # long enough is declared dead by its peer (no traffic for 3 s) and the VM fails.
    # --native needs the pause, so it is off: native frames are in the perf profile.
    spy_base = [spy, "record", "--subprocesses", "--nonblocking", "--idle", "-r", "100"]
    for name, cmd, what in (
        ("worker-flame.svg", worker, "dvmmctl run --nodes 2 (launcher + 2 VMM workers)"),
        ("daemon-flame.svg", demo, "dvmmctl demo (2 dvmmd daemons, their VMM workers, the CLI)"),
    ):
        if not Path(spy).exists():
            notes[name] = "py-spy not installed in the venv (pip install py-spy)"
            continue
        svg = out / name
        svg.unlink(missing_ok=True)
        r = subprocess.run([*spy_base, "-o", str(svg), "--", *cmd], cwd=REPO,
                           capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        ok = r.returncode == 0 and svg.exists()
        notes[name] = (
            f"py-spy record --subprocesses --nonblocking --idle of {what}. py-spy sees only "
            "Python threads: a worker's Python main thread just waits in _native.run_vm "
            "(the Rust vCPU, DSM and transport threads are invisible to it; see "
            "worker-perf.txt); the daemons are pure Python (asyncio API, peers, VM manager)"
            if ok
            else f"py-spy failed ({r.returncode}): {(r.stderr or r.stdout)[-400:]}"
        )
    perf_bin = shutil.which("perf")
    if perf_bin is None:
        notes["worker-perf.txt"] = "perf not installed (apt-get install linux-perf)"
    else:
        data = out / "worker.perf.data"
        r = subprocess.run(
            [perf_bin, "record", "-F", "999", "-g", "-o", str(data), "--", *worker],
            cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if r.returncode == 0 and data.exists():
            (out / "worker-perf.txt").write_text(
                _perf_report(
                    perf_bin, data,
                    f"# perf record -F 999 -g (cpu-clock) of `dvmmctl run --nodes 2 --vcpus 2 "
                    f"--cmdline '{load}'`\n# threads: vcpuN = KVM_RUN loop of vCPU N, dsm-N = "
                    "node N's DSM engine (uffd faults, protocol, page copy); guest CPL3 time is "
                    "not visible to host perf (it shows as the vCPU thread in the kernel)\n",
                )
            )  # fmt: skip
            notes["worker-perf.txt"] = (
                "perf record -g of the 2-node run (all processes), by thread/DSO/symbol and "
                "the call chains of the vCPU and DSM threads"
            )
        else:
            notes["worker-perf.txt"] = f"perf record failed ({r.returncode}): {r.stderr[-300:]}"
        data.unlink(missing_ok=True)
        Path(str(data) + ".old").unlink(missing_ok=True)
    c.extra["profiles"] = notes


def git_revision() -> str:
    r = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return r.stdout.strip() or "unknown"


def assemble(
    c: Collector, p: Params, started: float, host: dict[str, Any],
    stages: Sequence[str] = DEFAULT_STAGES,
) -> dict[str, Any]:  # fmt: skip
    keys: dict[str, Any] = {}
    for k, unit in ISSUE_KEYS.items():
        if k in c.json_figs:
            keys[k] = c.json_figs[k]
        else:
            keys[k] = {"value": None, "unit": unit, "n": 0, "spread": None}
            owners = [name for name, (_, ks) in STAGES.items() if k in ks]
            skipped = owners and not any(s in stages for s in owners)
            c.missing.setdefault(
                k,
                f"stage {' or '.join(owners)} not selected (stages run: {','.join(stages)})"
                if skipped
                else "not measured (its stage did not run)",
            )
    extra_keys = {k: v for k, v in c.json_figs.items() if k not in ISSUE_KEYS}
    values = {k: v.get("value") for k, v in {**keys, **extra_keys}.items()}
    targets = []
    for t in TARGETS:
        ratio = t.evaluate(values)
        targets.append(
            {"name": t.name, "expr": t.expr, "target": t.bound_text,
             "value": None if ratio is None else round(ratio, 4), "status": t.status(ratio),
             "keys": list(t.keys)}
        )  # fmt: skip
    return {
        "schema": 1,
        "revision": git_revision(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": p.quick,
        "stages": list(stages),
        "duration_s": round(time.monotonic() - started, 1),
        "host": host,
        "keys": keys,
        "extra_keys": extra_keys,
        "missing": dict(c.missing),
        "targets": targets,
        "distributions": c.distributions,
        "extra": c.extra,
        "stage_seconds": c.timings,
    }


def _stage_list() -> str:
    lines = []
    for name, (what, keys) in STAGES.items():
        default = "" if name in DEFAULT_STAGES else " (not in the default set)"
        lines.append(f"{name}{default}: {what}")
        if keys:
            lines.append("    " + ", ".join(keys))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m perf.run",
        description=__doc__.split("\n\n")[0],
        epilog="stages: " + ", ".join(STAGES) + " (--list-stages: with their keys)",
    )
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (< 3 minutes)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory (perf/results)")
    ap.add_argument("--no-profile", action="store_true", help="skip py-spy / perf profiles")
    ap.add_argument("--no-report", action="store_true", help="only latest.json, no Markdown/PNG")
    ap.add_argument(
        "--only", metavar="STAGE[,STAGE...]",
        help="run only these stages (default: all but ipi and linux), e.g. --only micro,ipi",
    )  # fmt: skip
    ap.add_argument(
        "--with", dest="with_", metavar="STAGE[,STAGE...]",
        help="add these stages to the chosen set, e.g. --with linux (not in the default set)",
    )  # fmt: skip
    ap.add_argument("--list-stages", action="store_true", help="print the stages and exit")
    ap.add_argument(
        "--npb-class", choices=("S", "W", "A"),
        help="NPB problem class of the npb stage (default W; S with --quick)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.list_stages:
        print(_stage_list())
        return 0
    try:
        stages = parse_stages(args.only, args.no_profile, args.with_)
    except ValueError as e:
        ap.error(str(e))
    p = Params(quick=args.quick)
    out: Path = args.out.resolve()  # sub-commands run with other cwds
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    host = host_description()  # its loadavg_start is now
    c = Collector()
    print(f"perf: stages {', '.join(stages)}", flush=True)
    if "micro" in stages:
        c.stage("micro", MICRO_KEYS, lambda: run_micro(c, p, out))
    two_node = False
    if any(s in stages for s in ("ep", "ipi", *DISTRIBUTED)):
        try:
            measure.check_distributed()
            two_node = True
        except Missing as e:
            dist = [k for s in DISTRIBUTED if s in stages for k in STAGES[s][1]]
            c.miss([*TWO_NODE_EP_KEYS, *dist], str(e))
    if "ep" in stages:
        c.stage("ep_ipi", STAGES["ep"][1], lambda: c.partial(measure.ep_runs(p, two_node)))
    if "ipi" in stages:
        c.stage("ipi", IPI_KEYS, lambda: c.partial(measure.ipi_runs(p, two_node)))
    if two_node:
        run_distributed(c, p, stages)
    if "npb" in stages:
        c.stage("npb", [], lambda: c.partial(npb.stage(p, out, args.npb_class)))
    if "linux" in stages:

        def linux_stage() -> None:
            part, c.extra["linux"] = linux.stage(p, out)
            c.partial(part)

        c.stage("linux", [], linux_stage)
    if "profiles" in stages:
        c.stage("profiles", [], lambda: run_profiles(c, p, out))
    doc = assemble(c, p, started, host, stages)
    doc["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "latest.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"perf: wrote {out / 'latest.json'} in {doc['duration_s']} s", flush=True)
    if not args.no_report:
        report.write(doc, out)
        print(f"perf: wrote {out / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
