"""The ``migration`` stage (issue 15): how long a live vCPU migration stops
the vCPU, as the guest measures it, beside what the guest sees without
migrations and the network round trip, measured in the same run.

The guest runs ``gap`` on 2 nodes x 1 vCPU: every CPU reads the TSC in a
loop and keeps the longest time between two reads (its longest time off the
CPU). With moves, vCPU 1 goes back and forth between the nodes every 0.4 s;
without, nothing moves (the floor: host scheduling, timer interrupts). Figures,
each the median of the repetitions:

- ``vcpu_migration_gap_ms``: vCPU 1's longest gap in a run with moves;
- ``vcpu_migration_gap_floor_ms``: vCPU 1's longest gap in a run without;
- ``vcpu_migration_stop_ms``: the VMM's own figure per move (pause request on
  the old node to the start on the new one; median of every move);
- the target is ``5 ms + tcp_rtt_p50_us`` (``vcpu_migration_target_ms``).
"""

from __future__ import annotations

import json
import re
import statistics

from perf import probes
from perf.common import Figure
from perf.measure import Missing, Params
from perf.vm import dvmmctl_run

KEYS = (
    "vcpu_migration_gap_ms", "vcpu_migration_gap_floor_ms", "vcpu_migration_stop_ms",
    "vcpu_migration_target_ms",
)  # fmt: skip

_GAP = re.compile(r"dvmm-guest: gap .* cpu_gap_us=(\d+),(\d+) .*PASS")


def one(moves: int, run_ms: int) -> tuple[float, list[float]]:
    """One ``gap`` run: (vCPU 1's longest gap in ms, the VMM's stop per move in ms)."""
    args = [
        "run", "--nodes", "2", "--vcpus", "2", "--memory", "256M", "--json",
        "--cmdline", f"run=gap gap.iters={run_ms}", "--timeout", "120",
    ]  # fmt: skip
    for k in range(moves):
        args += ["--migrate-vcpu", f"1:{k % 2}@{0.4 + 0.4 * k:.2f}"]
    r = dvmmctl_run(args, timeout=180)
    m = _GAP.search(r.stdout)
    if r.returncode != 0 or m is None:
        raise Missing(f"gap run exited {r.returncode}: {(r.stdout + r.stderr).strip()[-600:]}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    boot = next(n for n in summary["nodes"] if n["node"] == 0)
    stops = [float(x["stopped_ms"]) for x in boot["stats"].get("migrations", [])]
    if len(stops) != moves:
        raise Missing(f"{len(stops)} of {moves} moves made: {r.stderr.strip()[-600:]}")
    return int(m.group(2)) / 1e3, stops


def stage(p: Params) -> list[Figure]:
    reps = 2 if p.quick else 3
    moves = 6 if p.quick else 10
    run_ms = int((0.4 + 0.4 * moves) * 1000) + 400
    gap: list[float] = []
    floor: list[float] = []
    stop_medians: list[float] = []
    every_stop: list[float] = []
    rtt: list[float] = []
    for _ in range(reps):
        f, _ = one(0, run_ms)
        floor.append(f)
        g, stops = one(moves, run_ms)
        gap.append(g)
        stop_medians.append(statistics.median(stops))
        every_stop.extend(stops)
        rtt.append(float(probes.tcp_rtt("block", count=2000)["p50_us"]))
    how = (
        f"guest gap on 2 nodes x 1 vCPU for {run_ms} ms (dvmmctl run --migrate-vcpu), "
        f"vCPU 1 moved between the nodes {moves} times, every 0.4 s"
    )
    return [
        Figure("vcpu_migration_gap_ms", "ms", gap, how + ": vCPU 1's longest gap, guest TSC"),
        Figure(
            "vcpu_migration_gap_floor_ms",
            "ms",
            floor,
            f"guest gap on 2 nodes x 1 vCPU for {run_ms} ms, no moves: vCPU 1's longest gap",
        ),
        Figure(
            "vcpu_migration_stop_ms",
            "ms",
            stop_medians,
            how + ": the VMM's stop per move (pause request to start on the new node), median",
            {"max_ms": max(every_stop)},
        ),
        Figure(
            "vcpu_migration_target_ms",
            "ms",
            [5.0 + x / 1e3 for x in rtt],
            "5 ms + tcp_probe 64 B round trip p50 (127.0.0.1 -> 127.0.0.2), same run",
        ),
    ]
