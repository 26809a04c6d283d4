"""The NPB stage: the guest's NAS Parallel Benchmark kernels (npb.ep, npb.is, npb.cg,
npb.mg, npb.ft) under QEMU/KVM and dvmm on one node and under dvmm on 2 and 3 nodes
(``numa=local`` and ``numa=ignore``); keys ``npb_<kernel>_<class>_<config>_s`` and a
speedup table (perf/results/npb.md) with a plot (npb.png).

A configuration is ``<vmm>_<nodes>x<vcpus per node>`` plus the numa mode on several
nodes, e.g. ``qemu_1x2``, ``dvmm_1x2``, ``dvmm_2x1_local``. One boot runs all five
kernels; configurations are interleaved repetition by repetition so drift of this
shared host hits them alike.

    python -m perf.run --only npb [--quick] [--npb-class S|W|A]

For A/B runs (perf/ab.py passes the environment, not options, to the suite):
``DVMM_PERF_NPB_CONFIGS=dvmm_2x1_local,...`` runs only those configurations and
``DVMM_PERF_NPB_CLASS=W`` sets the class.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from perf.common import Figure, GuestFormatError, GuestResult
from perf.measure import Missing, Params, Partial
from perf.vm import VmError, VmRun, run_dvmm, run_qemu

KERNELS = ("ep", "is", "cg", "mg", "ft")
#: Guest memory per class: the kernels' data on one node plus the guest's own.
MEMORY_MB = {"S": 256, "W": 512, "A": 2048}


@dataclass(frozen=True)
class NpbLine:
    """One ``dvmm-guest: npb.<kernel> class=C cpus=N time_us=T mops=M verified=yes|no``
    line (guest/src/npb.c npb_report)."""

    kernel: str
    cls: str
    cpus: int
    time_s: float
    mops: float
    verified: bool
    passed: bool


def npb_line(r: GuestResult) -> NpbLine:
    """The fields of an npb result line; :class:`GuestFormatError` when one is missing
    or the workload is not an npb kernel."""
    if not r.workload.startswith("npb."):
        raise GuestFormatError(f"not an npb line: {r.workload}")
    missing = [k for k in ("class", "cpus", "time_us", "mops", "verified") if k not in r.values]
    if missing:
        raise GuestFormatError(f"{r.workload} line has no {', '.join(missing)}: {r.values}")
    try:
        return NpbLine(
            kernel=r.workload[4:],
            cls=r.values["class"],
            cpus=int(r.values["cpus"]),
            time_s=int(r.values["time_us"]) / 1e6,
            mops=float(r.values["mops"]),
            verified=r.values["verified"] == "yes",
            passed=r.passed,
        )
    except ValueError as e:
        raise GuestFormatError(f"{r.workload} line: {e}: {r.values}") from e


@dataclass(frozen=True)
class Config:
    vmm: str  # "qemu" or "dvmm"
    nodes: int
    per_node: int  # vCPUs per node
    numa: str = "local"

    @property
    def vcpus(self) -> int:
        return self.nodes * self.per_node

    @property
    def name(self) -> str:
        base = f"{self.vmm}_{self.nodes}x{self.per_node}"
        return base if self.nodes == 1 else f"{base}_{self.numa}"

    def describe(self) -> str:
        cores = os.cpu_count() or 0
        over = f", {self.vcpus} vCPUs on {cores} host cores" if self.vcpus > cores else ""
        where = (
            "qemu-system-x86_64 -enable-kvm"
            if self.vmm == "qemu"
            else f"dvmmctl run --nodes {self.nodes} --vcpus {self.vcpus}"
        )
        return f"{where} (numa={self.numa}{over})"


#: What is run: 1 node x 1..3 vCPUs (QEMU and dvmm), 2 and 3 nodes x 1 vCPU (both
#: numa modes). Same total vCPUs: 1x2 vs 2x1, 1x3 vs 3x1; same per node: 1x1 vs kx1.
CONFIGS: tuple[Config, ...] = (
    Config("qemu", 1, 1), Config("qemu", 1, 2), Config("qemu", 1, 3),
    Config("dvmm", 1, 1), Config("dvmm", 1, 2), Config("dvmm", 1, 3),
    Config("dvmm", 2, 1, "local"), Config("dvmm", 2, 1, "ignore"),
    Config("dvmm", 3, 1, "local"), Config("dvmm", 3, 1, "ignore"),
)  # fmt: skip


def npb_class(p: Params, cls: str | None) -> str:
    """The problem class: given, else $DVMM_PERF_NPB_CLASS, else S for --quick and W
    for the full suite."""
    c = (cls or os.environ.get("DVMM_PERF_NPB_CLASS") or ("S" if p.quick else "W")).upper()
    if c not in MEMORY_MB:
        raise Missing(f"NPB class {c!r}: the guest has S, W and A")
    return c


def reps(p: Params) -> int:
    return 1 if p.quick else 3


def key(kernel: str, cls: str, cfg: str) -> str:
    return f"npb_{kernel}_{cls}_{cfg}_s"


def cmdline(cls: str, numa: str) -> str:
    return "run=" + ",".join(f"npb.{k}" for k in KERNELS) + f" class={cls} numa={numa}"


def boot(cfg: Config, cls: str) -> VmRun:
    cl = cmdline(cls, cfg.numa)
    mem = MEMORY_MB[cls]
    if cfg.vmm == "qemu":
        return run_qemu(cl, smp=cfg.vcpus, memory_mb=mem, timeout=1800)
    return run_dvmm(cl, vcpus=cfg.vcpus, nodes=cfg.nodes, memory=f"{mem}M", timeout=1800)


@dataclass
class NpbRuns:
    """Per (kernel, config) the guest-timed seconds of each repetition."""

    cls: str
    times: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    mops: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # config -> why it has no figures

    def add(self, cfg: str, run: VmRun) -> None:
        for k in KERNELS:
            line = npb_line(run.get(f"npb.{k}"))
            if not (line.verified and line.passed):
                raise VmError(f"npb.{k} not verified under {cfg}: {run.results[f'npb.{k}'].values}")
            self.times.setdefault((k, cfg), []).append(line.time_s)
            self.mops.setdefault((k, cfg), []).append(line.mops)

    def median(self, kernel: str, cfg: str) -> float | None:
        t = self.times.get((kernel, cfg))
        return statistics.median(t) if t else None


def measure(p: Params, cls: str, configs: Sequence[Config] = CONFIGS,
            log: Callable[[str], None] = print) -> NpbRuns:  # fmt: skip
    runs = NpbRuns(cls)
    for rep in range(reps(p)):
        for cfg in configs:
            if cfg.name in runs.errors:
                continue
            try:
                run = boot(cfg, cls)
                runs.add(cfg.name, run)
                log(f"perf: npb class {cls} {cfg.name} rep {rep + 1}: " + ", ".join(
                    f"{k} {runs.times[(k, cfg.name)][-1]:.3f} s" for k in KERNELS))  # fmt: skip
            except (VmError, GuestFormatError, OSError) as e:
                runs.errors[cfg.name] = str(e)
                log(f"perf: npb {cfg.name}: {str(e).splitlines()[0][:300]}")
    return runs


def figures(runs: NpbRuns, configs: Sequence[Config] = CONFIGS) -> Partial:
    figs: list[Figure] = []
    missing: dict[str, str] = {}
    for cfg in configs:
        for k in KERNELS:
            name = key(k, runs.cls, cfg.name)
            t = runs.times.get((k, cfg.name))
            if not t or cfg.name in runs.errors:
                missing[name] = runs.errors.get(cfg.name, "not run")
                continue
            figs.append(
                Figure(
                    name, "s", t,
                    f"guest npb.{k} class {runs.cls}, time_us of its verified result line "
                    f"(the specification's timed section), {cfg.describe()}; one boot runs "
                    f"all five kernels ('{cmdline(runs.cls, cfg.numa)}')",
                    {"mops_median": statistics.median(runs.mops[(k, cfg.name)])},
                )
            )  # fmt: skip
    return Partial(figs, missing)


# ---------------------------------------------------------------- table and plot

#: (title, [(column, numerator config, denominator config)]): each cell is
#: time(numerator) / time(denominator), > 1 when the denominator is faster.
RATIOS: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    ("Same total vCPUs: time on 1 node / time on k nodes", (
        ("1x2 / 2x1 local", "dvmm_1x2", "dvmm_2x1_local"),
        ("1x2 / 2x1 ignore", "dvmm_1x2", "dvmm_2x1_ignore"),
        ("1x3 / 3x1 local", "dvmm_1x3", "dvmm_3x1_local"),
        ("1x3 / 3x1 ignore", "dvmm_1x3", "dvmm_3x1_ignore"),
        ("QEMU 1x2 / dvmm 2x1 local", "qemu_1x2", "dvmm_2x1_local"),
    )),
    ("Same vCPUs per node (1): time on 1 node / time on k nodes (speedup from nodes)", (
        ("1x1 / 2x1 local", "dvmm_1x1", "dvmm_2x1_local"),
        ("1x1 / 2x1 ignore", "dvmm_1x1", "dvmm_2x1_ignore"),
        ("1x1 / 3x1 local", "dvmm_1x1", "dvmm_3x1_local"),
        ("1x1 / 3x1 ignore", "dvmm_1x1", "dvmm_3x1_ignore"),
    )),
    ("One node: time under dvmm / time under QEMU/KVM (target <= 1.05)", (
        ("1x1", "dvmm_1x1", "qemu_1x1"),
        ("1x2", "dvmm_1x2", "qemu_1x2"),
        ("1x3", "dvmm_1x3", "qemu_1x3"),
    )),
)  # fmt: skip


def ratio(runs: NpbRuns, kernel: str, num: str, den: str) -> float | None:
    a, b = runs.median(kernel, num), runs.median(kernel, den)
    return a / b if a is not None and b else None


def _cell(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def render(runs: NpbRuns, p: Params, configs: Sequence[Config] = CONFIGS,
           plot: str | None = None) -> str:  # fmt: skip
    cores = os.cpu_count() or 0
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    L = [
        "# NAS Parallel Benchmark kernels: times and speedups across nodes\n",
        (
            f"Class **{runs.cls}**, {reps(p)} repetition(s) per configuration "
            f"({'quick' if p.quick else 'full'} suite), medians. Each time is the guest's own "
            "(`time_us` of the verified `npb.<kernel>` line: the specification's timed section, "
            "not boot). A configuration `<vmm>_<nodes>x<vCPUs per node>[_<numa>]`; "
            f"this host has {cores} cores, so configurations with more vCPUs than that are "
            "oversubscribed (marked *). `numa=local` places each vCPU's share of the data on "
            "its own node (SRAT); `numa=ignore` puts it all on node 0. Regenerate with "
            "`python -m perf.run --only npb` (`--quick`: class S, one repetition). "
            f"Host load average (1/5/15 min) when the table was written: {load}.\n"
        ),
        "## Times (s)\n",
    ]
    head = ["kernel"] + [c.name + ("*" if c.vcpus > cores else "") for c in configs]
    L.append("| " + " | ".join(head) + " |")
    L.append("| " + " | ".join("---" for _ in head) + " |")
    for k in KERNELS:
        L.append(
            "| " + " | ".join([k] + [_cell(runs.median(k, c.name), 4) for c in configs]) + " |"
        )
    L.append("")
    for title, cols in RATIOS:
        L.append(f"## {title}\n")
        L.append("| kernel | " + " | ".join(c for c, _, _ in cols) + " |")
        L.append("| --- | " + " | ".join("---" for _ in cols) + " |")
        for k in KERNELS:
            L.append(
                f"| {k} | " + " | ".join(_cell(ratio(runs, k, n, d)) for _, n, d in cols) + " |"
            )
        L.append("")
    if runs.errors:
        L.append("## Not measured\n")
        for cfg, why in runs.errors.items():
            L.append(f"- `{cfg}`: {why.splitlines()[0][:400]}")
        L.append("")
    if plot:
        L.append(f"![NPB speedups]({plot})\n")
    return "\n".join(L) + "\n"


def draw(runs: NpbRuns, out: Path) -> str | None:
    """A bar chart of both speedup tables; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (title, cols) in zip(axes, RATIOS[:2], strict=True):
        width = 0.8 / len(cols)
        for i, (col, num, den) in enumerate(cols):
            vals = [ratio(runs, k, num, den) or float("nan") for k in KERNELS]
            ax.bar([x + i * width for x in range(len(KERNELS))], vals, width, label=col)
        ax.axhline(1.0, color="#444", lw=0.8)
        ax.set_yscale("log")  # the ratios span several decades across nodes
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(KERNELS))], list(KERNELS))
        ax.set_title(title.split(":")[0], fontsize=10)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"time ratio, class {runs.cls} (> 1: the k-node run is faster)")
    fig.tight_layout()
    name = "npb.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def stage(p: Params, out: Path, cls: str | None = None) -> Partial:
    """Measure, write npb.md (and npb.png), return the figures for latest.json."""
    c = npb_class(p, cls)
    configs = chosen_configs(os.environ.get("DVMM_PERF_NPB_CONFIGS", ""))
    runs = measure(p, c, configs)
    if configs != CONFIGS:  # an A/B subset: the table needs every configuration
        return figures(runs, configs)
    (out / "npb.md").write_text(render(runs, p, plot=draw(runs, out)))
    print(f"perf: wrote {out / 'npb.md'}", flush=True)
    return figures(runs)


def chosen_configs(names: str) -> tuple[Config, ...]:
    """The configurations named (comma-separated), all of them for an empty string;
    :class:`Missing` names an unknown one."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        return CONFIGS
    known = {c.name: c for c in CONFIGS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise Missing(f"DVMM_PERF_NPB_CONFIGS: no configuration {', '.join(unknown)} "
                      f"(there are {', '.join(known)})")  # fmt: skip
    return tuple(known[n] for n in wanted)
