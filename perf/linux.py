"""The linux stage (issue 13, item 6): how long Debian's kernel takes to reach each
boot milestone under QEMU/KVM (one node; how far it gets), dvmm on one node and dvmm
on two nodes -> keys ``linux_<milestone>_<config>_s``, ``linux_reached_<config>`` and
perf/results/linux.md.

One boot per configuration, with the Linux boot test's kernel, initramfs and default
command line (tests/linux/linux_boot.py, whose ``Timeline`` / ``run_console`` time the
console). Not in the default stage set (~35-50 min on a PVM host):

    python -m perf.run --only linux        # or: make perf LINUX=1 (adds it to the suite)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perf.common import REPO, Figure
from perf.measure import Missing, Params, Partial

# tests/linux is no package (the boot test is a script run by path): import it by its directory.
sys.path.insert(0, str(REPO / "tests" / "linux"))
import linux_boot
from linux_boot import BootTimes, slug

__all__ = ["CONFIGS", "Config", "figures", "linux_boot", "render", "stage"]


@dataclass(frozen=True)
class Config:
    name: str  # the key suffix: qemu, dvmm_1n, dvmm_2n
    vmm: str  # "qemu" or "dvmm"
    nodes: int
    timeout_s: int

    @property
    def vcpus(self) -> int:
        return max(2, self.nodes)

    def describe(self) -> str:
        if self.vmm == "qemu":
            return f"qemu-system-x86_64 -enable-kvm -cpu host -smp {self.vcpus} -m {MEMORY}"
        return f"dvmmctl run --nodes {self.nodes} --vcpus {self.vcpus} --memory {MEMORY}"


MEMORY = "512M"
#: QEMU stops within minutes on a PVM host; a dvmm boot to /init takes ~14-16 min here.
CONFIGS: tuple[Config, ...] = (
    Config("qemu", "qemu", 1, 600),
    Config("dvmm_1n", "dvmm", 1, 1800),
    Config("dvmm_2n", "dvmm", 2, 1800),
)
#: Seconds a boot runs on after its last required milestone (/init printing on VT-x).
GRACE_S = 20.0
#: Milestone slugs in boot order (kernel_started, acpi_tables, madt, srat,
#: smp_brought_up, run_init, init_prints); ``linux_reached_<config>`` is the 1-based
#: position of the furthest one seen in this list (0: none).
ORDER = tuple(slug(name) for name, _, _ in linux_boot.MILESTONES)


def key(milestone: str, config: str) -> str:
    return f"linux_{slug(milestone)}_{config}_s"


def reached_key(config: str) -> str:
    return f"linux_reached_{config}"


def figures(cfg: Config, res: BootTimes, cmdline: str) -> list[Figure]:
    """A figure per milestone reached (wall seconds from the VMM's start; the kernel's
    own time stamp in ``extra.guest_s``) and the furthest milestone's position."""
    how = (
        f"{cfg.describe()} of Debian's cloud kernel with the Linux boot test's initramfs "
        f"(tests/linux/linux_boot.py), cmdline '{cmdline}'; one boot"
    )
    figs = [
        Figure(
            key(name, cfg.name),
            "s",
            [round(res.wall[name], 1)],
            f"wall seconds from starting the VMM to the first console line of milestone "
            f"'{name}' ({how}); extra.guest_s: the kernel's printk stamp on it",
            {"guest_s": res.guest.get(name)},
        )
        for name, _, _ in linux_boot.MILESTONES
        if name in res.wall
    ]
    pos = ORDER.index(slug(res.reached)) + 1 if res.reached else 0
    figs.append(
        Figure(
            reached_key(cfg.name),
            "milestone",
            [float(pos)],
            f"position of the furthest milestone seen in ({', '.join(ORDER)}), 0: none; "
            f"extra.milestone names it, extra.stopped says what ended the boot ({how})",
            summary(res),
        )
    )
    return figs


def summary(res: BootTimes) -> dict[str, Any]:
    return {
        "milestone": slug(res.reached) if res.reached else None,
        "stopped": res.stopped,
        "detail": res.detail[:300],
        "wall_s": round(res.wall_s, 1),
        "last_guest_s": res.last_guest_s,
        "exit": res.rc,
    }


def render(runs: dict[str, BootTimes], errors: dict[str, str], cmdline: str) -> str:
    """linux.md: wall (guest) seconds per milestone and configuration, and how each
    boot ended."""
    cfgs = [c for c in CONFIGS if c.name in runs or c.name in errors]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    L = [
        "# Linux boot milestones\n",
        (
            "Debian's cloud kernel (`build/linux/vmlinuz`) with the Linux boot test's "
            f"initramfs and command line `{cmdline}`, one boot per configuration, "
            f"{MEMORY}, 2 vCPUs. Each cell: wall seconds from starting the VMM to the "
            "milestone's first console line (in brackets: the kernel's own printk time "
            "stamp on it); — = not reached. Regenerate with `python -m perf.run --only "
            f"linux`. Host load average (1/5/15 min) at the end: {load}.\n"
        ),
        "| milestone | " + " | ".join(c.name for c in cfgs) + " |",
        "| --- | " + " | ".join("---" for _ in cfgs) + " |",
    ]
    for name, _, _ in linux_boot.MILESTONES:
        cells = []
        for c in cfgs:
            r = runs.get(c.name)
            if r is None or name not in r.wall:
                cells.append("—")
                continue
            g = r.guest.get(name)
            cells.append(f"{r.wall[name]:.0f}" + (f" ({g:.1f})" if g is not None else ""))
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("How each boot ended:\n")
    for c in cfgs:
        r = runs.get(c.name)
        if r is None:
            L.append(f"- `{c.name}`: not run: {errors[c.name].splitlines()[0][:300]}")
            continue
        last = f", last kernel stamp {r.last_guest_s:.1f} s" if r.last_guest_s else ""
        L.append(
            f"- `{c.name}` ({c.describe()}): reached **{r.reached or 'nothing'}**; "
            f"stopped: {r.stopped} after {r.wall_s:.0f} s{last} ({r.detail[:200]})"
        )
    L.append("")
    return "\n".join(L) + "\n"


def boot(cfg: Config, cmdline: str) -> BootTimes:
    return linux_boot.time_boot(
        cfg.vmm, cfg.nodes, cfg.vcpus, MEMORY, cmdline, cfg.timeout_s,
        tag=f"perf-{cfg.name}", grace_s=GRACE_S,
    )  # fmt: skip


def stage(
    p: Params, out: Path, configs: tuple[Config, ...] | None = None,
    run: Callable[[Config, str], BootTimes] = boot,
) -> tuple[Partial, dict[str, Any]]:  # fmt: skip
    """Boot each configuration once, write linux.md; the figures and, for
    latest.json's ``extra.linux``, how each boot ended. ``p`` is unused: one boot per
    configuration, quick or not."""
    del p
    cmdline = os.environ.get("DVMM_LINUX_CMDLINE", linux_boot.DEFAULT_CMDLINE)
    try:
        linux_boot.prepare()
    except (SystemExit, OSError, subprocess.SubprocessError) as e:
        raise Missing(f"no Linux kernel / initramfs (tests/linux/linux_boot.py prepare): {e}")
    runs: dict[str, BootTimes] = {}
    errors: dict[str, str] = {}
    figs: list[Figure] = []
    missing: dict[str, str] = {}
    for cfg in CONFIGS if configs is None else configs:
        try:
            res = run(cfg, cmdline)
        except (SystemExit, OSError, subprocess.SubprocessError) as e:
            errors[cfg.name] = str(e) or type(e).__name__
            missing[reached_key(cfg.name)] = errors[cfg.name]
            print(f"perf: linux {cfg.name}: {errors[cfg.name][:300]}", flush=True)
            continue
        runs[cfg.name] = res
        figs += figures(cfg, res, cmdline)
        print(
            f"perf: linux {cfg.name}: reached {res.reached} ({res.stopped} after "
            f"{res.wall_s:.0f} s: {res.detail[:160]})",
            flush=True,
        )
    (out / "linux.md").write_text(render(runs, errors, cmdline))
    print(f"perf: wrote {out / 'linux.md'}", flush=True)
    extra = {
        "cmdline": cmdline,
        "boots": {name: summary(r) for name, r in runs.items()},
        "errors": errors,
    }
    return Partial(figs, missing), extra
