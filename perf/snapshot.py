"""The ``snapshot`` stage (issue 15): how long a snapshot of a running 2-node
VM stops the guest and how fast it writes its memory, beside the disk's own
sequential write speed measured in the same run on the same filesystem.

The guest first writes a pattern over ``mem`` bytes (``sweep``: every page
non-zero, half of it homed on each node), then runs ``stress`` until the
snapshot, taken while it runs; the VM stops after it. Figures, each the median
of the repetitions:

- ``snapshot_pause_ms``: the guest-visible stop (the boot node pauses every
  node, every node saves its share, the manifest is written, ...);
- ``snapshot_pause_overhead_ms``: that minus the time spent writing files;
- ``snapshot_write_gbps``: bytes of the snapshot / time writing them;
- ``disk_write_gbps``: ``mem`` bytes written and fsynced with 1 MiB writes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from perf.common import REPO, Figure
from perf.measure import Missing, Params
from perf.vm import dvmmctl_run

KEYS = (
    "snapshot_pause_ms", "snapshot_pause_overhead_ms", "snapshot_write_gbps", "disk_write_gbps",
)  # fmt: skip

#: "dvmm: snapshot DIR: N pages (X MiB in F files) written in W ms; the guest stood still P ms"
_LINE = re.compile(
    r"dvmm: snapshot \S+: (\d+) pages \(([\d.]+) MiB in (\d+) files\) written in (\d+) ms; "
    r"the guest stood still (\d+) ms"
)


def disk_write_gbps(directory: Path, size: int) -> float:
    """``size`` bytes written with 1 MiB writes and fsynced, as Gbit/s."""
    path = directory / "disk-write-test"
    block = os.urandom(1 << 20)
    t = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size >> 20):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.monotonic() - t
    path.unlink()
    return size * 8 / dt / 1e9


def one(p: Params, mem_mb: int, directory: Path) -> tuple[float, float, float]:
    """One snapshot of a 2-node VM: (pause ms, write ms, Gbit/s written)."""
    snap = directory / "snap"
    cmdline = f"run=sweep,stress sweep.mem={mem_mb}M stress.iters=200000000"
    r = dvmmctl_run(
        [
            "run", "--nodes", "2", "--vcpus", "2", "--memory", f"{mem_mb + 128}M",
            "--cmdline", cmdline, "--timeout", "300",
            "--snapshot-dir", str(snap), "--snapshot-after", "8" if p.quick else "12",
        ],
        timeout=420,
    )  # fmt: skip
    m = _LINE.search(r.stderr)
    if r.returncode != 0 or m is None or "sweep" not in r.stdout:
        raise Missing(
            f"snapshot run exited {r.returncode} (sweep done: {'sweep' in r.stdout}): "
            f"{r.stderr.strip()[-600:]}"
        )
    shutil.rmtree(snap, ignore_errors=True)
    mib, write_ms, pause_ms = float(m.group(2)), float(m.group(4)), float(m.group(5))
    return pause_ms, write_ms, mib * (1 << 20) * 8 / (write_ms / 1e3) / 1e9


def stage(p: Params) -> list[Figure]:
    mem_mb = 128 if p.quick else 512
    reps = 2 if p.quick else 3
    pause: list[float] = []
    over: list[float] = []
    gbps: list[float] = []
    disk: list[float] = []
    (REPO / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dvmm-perf-snap-", dir=REPO / "build") as d:
        directory = Path(d)
        for _ in range(reps):
            disk.append(disk_write_gbps(directory, mem_mb << 20))
            pa, wr, g = one(p, mem_mb, directory)
            pause.append(pa)
            over.append(pa - wr)
            gbps.append(g)
    how = (
        f"2 nodes x 1 vCPU, the guest wrote {mem_mb} MiB (sweep) then runs stress; a snapshot "
        "after the sweep (dvmmctl run --snapshot-dir, the VM stops after it), in build/ "
    )
    return [
        Figure("snapshot_pause_ms", "ms", pause, how + "- guest-visible stop, pause to end"),
        Figure("snapshot_pause_overhead_ms", "ms", over, how + "- stop minus file writing"),
        Figure("snapshot_write_gbps", "Gbit/s", gbps, how + "- snapshot bytes / writing time"),
        Figure(
            "disk_write_gbps",
            "Gbit/s",
            disk,
            f"{mem_mb} MiB of random data in 1 MiB write(2)s and one fsync, same filesystem, "
            "just before each snapshot run",
        ),
    ]
