"""How each key of issue 6 is measured. Every function returns :class:`Figure`\\ s or
raises :class:`Missing` with the reason the figure cannot be measured here (never
a made-up number)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from perf import probes
from perf.common import Figure, find_dsm_snapshots, log2_hist_percentile, sum_counters
from perf.vm import VmError, VmRun, run_dvmm, run_qemu


class Missing(Exception):
    """A figure that cannot be measured on this revision or host; the message says why."""


@dataclass(frozen=True)
class Params:
    """Repetitions and sizes: the full suite and ``--quick``."""

    quick: bool = False

    @property
    def reps(self) -> int:
        return 3 if self.quick else 7

    @property
    def vm_reps(self) -> int:
        return 3 if self.quick else 5

    @property
    def rtt_count(self) -> int:
        return 2000 if self.quick else 5000

    @property
    def stream_s(self) -> float:
        return 1.0 if self.quick else 2.0

    @property
    def ep_size(self) -> str:
        # ~0.35 s (quick) / ~1.3 s of guest compute on 2 vCPUs here (idle host)
        return "256M" if self.quick else "1G"

    @property
    def ipi_iters(self) -> int:
        return 500 if self.quick else 2000

    @property
    def sweep_mem(self) -> str:
        return "16M" if self.quick else "64M"

    @property
    def counter_iters(self) -> int:
        return 20000 if self.quick else 100000

    @property
    def falseshare_iters(self) -> int:
        return 5000 if self.quick else 20000


# ---------------------------------------------------------------- raw network


def tcp_rtt(p: Params, mode: str) -> tuple[Figure, list[float]]:
    """p50 of ``rtt_count`` 64-byte round trips, per repetition; plus every sample."""
    p50s: list[float] = []
    p99s: list[float] = []
    samples: list[float] = []
    for _ in range(p.reps):
        r = probes.tcp_rtt(mode, count=p.rtt_count)
        p50s.append(float(r["p50_us"]))
        p99s.append(float(r["p99_us"]))
        samples.extend(float(x) for x in r["samples_us"])
    key = "tcp_rtt_p50_us" if mode == "block" else "tcp_rtt_busy_p50_us"
    fig = Figure(
        key,
        "us",
        p50s,
        f"tcp_probe rtt: 64 B ping-pong 127.0.0.1 -> 127.0.0.2, two processes, TCP_NODELAY, "
        f"{'recv() sleeps' if mode == 'block' else 'both sides busy-poll (MSG_DONTWAIT)'}; "
        f"p50 of {p.rtt_count} round trips per repetition",
        {"p99_us_median": statistics.median(p99s)},
    )
    return fig, samples


def tcp_stream(p: Params) -> Figure:
    g = [float(probes.tcp_stream(p.stream_s)["gbps"]) for _ in range(p.reps if not p.quick else 3)]
    return Figure(
        "tcp_stream_gbps",
        "Gbit/s",
        g,
        f"tcp_probe stream: one process sends 1 MiB writes to another over 127.0.0.1 -> "
        f"127.0.0.2 for {p.stream_s} s; bytes received / time",
    )


# ---------------------------------------------------------------- local fault floor


def local_fault(p: Params, mode: str, handler: str) -> tuple[Figure, list[float]]:
    p50s: list[float] = []
    samples: list[float] = []
    extra: dict[str, Any] = {}
    for _ in range(p.reps):
        r = probes.uffd_fault(mode, handler, pages=64, rounds=3 if p.quick else 5)
        p50s.append(float(r["p50_us"]))
        samples.extend(float(x) for x in r["samples_us"])
        extra = {"baseline_p50_us": r["baseline_p50_us"], "raw_p50_us": r["raw_p50_us"]}
    if mode == "kvm":
        key = "local_fault_floor_p50_us" if handler == "block" else "local_fault_floor_busy_p50_us"
        method = (
            "uffd_probe kvm: a real-mode KVM guest touches pages of a memfd memslot registered "
            "with userfaultfd (MISSING); a handler thread "
            f"({'sleeping in poll()' if handler == 'block' else 'busy-polling'}) resolves each "
            "with UFFDIO_COPY. Per page: time between the guest's port exits minus the same "
            "pass over populated pages (exit + emulation baseline). Not yet dvmm's own fault "
            "handler: the single-node VMM does not use userfaultfd."
        )
    else:
        key = f"host_uffd_fault_{handler}_p50_us"
        method = (
            "uffd_probe host: a host thread (no KVM) writes to pages of a userfaultfd-registered "
            f"memfd mapping; handler {handler}"
        )
    return Figure(key, "us", p50s, method, extra), samples


# ---------------------------------------------------------------- single node VMs


def ep_cmdline(p: Params) -> str:
    return f"run=ep,ipi ep.size={p.ep_size} ipi.iters={p.ipi_iters} ipi.peer=1"


def ep_1node(p: Params) -> tuple[Figure, Figure, Figure, Figure]:
    """QEMU and dvmm on one node, interleaved (drift hits both alike)."""
    q: list[float] = []
    d: list[float] = []
    qi: list[float] = []
    di: list[float] = []
    cl = ep_cmdline(p)
    for _ in range(p.vm_reps):
        rq = run_qemu(cl, smp=2)
        rd = run_dvmm(cl, vcpus=2, nodes=1)
        q.append(rq.get("ep").time_us / 1e6)
        d.append(rd.get("ep").time_us / 1e6)
        qi.append(rq.get("ipi").num("rtt_ns") / 1e3)
        di.append(rd.get("ipi").num("rtt_ns") / 1e3)
    m = (
        f"the bundled guest's ep workload (cmdline '{cl}'), 2 vCPUs, 256 MiB; the guest's "
        "timed section (time_us of its result line), not boot"
    )
    return (
        Figure("qemu_1node_2vcpu_s", "s", q, "qemu-system-x86_64 -enable-kvm -cpu qemu64,+x2apic: " + m),
        Figure("dvmm_1node_2vcpu_s", "s", d, "dvmmctl run --vcpus 2: " + m),
        Figure(
            "qemu_ipi_roundtrip_1node_us", "us", qi,
            "guest ipi workload under QEMU/KVM (in-kernel LAPIC), 2 vCPUs: mean rtt_ns of the run",
        ),
        Figure(
            "dvmm_ipi_roundtrip_1node_us", "us", di,
            "guest ipi workload under dvmm on one node (userspace LAPIC), 2 vCPUs: mean rtt_ns",
        ),
    )  # fmt: skip


# ---------------------------------------------------------------- distributed VM (issue 4)


def two_nodes(cmdline: str, *, vcpus: int = 2, nodes: int = 2) -> VmRun:
    try:
        return run_dvmm(cmdline, vcpus=vcpus, nodes=nodes)
    except VmError as e:
        raise Missing(f"distributed VM not usable: {e}") from e


def check_distributed() -> None:
    """Raise Missing unless ``dvmmctl run --nodes 2`` boots and returns DSM counters."""
    r = two_nodes("run=counter counter.iters=1000")
    r.get("counter")
    if r.result_json is None or not find_dsm_snapshots(r.result_json.get("stats")):
        raise Missing(
            "dvmmctl run --nodes 2 --json returned no DSM counters (no dict with latency_us_log2 "
            "in stats)"
        )


def dsm_totals(r: VmRun) -> dict[str, Any]:
    if r.result_json is None:
        raise Missing("dvmmctl run --json printed no result JSON")
    snaps = find_dsm_snapshots(r.result_json.get("stats"))
    if not snaps:
        raise Missing("no DSM counters (latency_us_log2) in the result JSON")
    return sum_counters(snaps)


def ep_2node(p: Params, one_node: Figure) -> tuple[Figure, Figure]:
    cl = ep_cmdline(p)
    t2 = [two_nodes(cl).get("ep").time_us / 1e6 for _ in range(p.vm_reps)]
    f2 = Figure(
        "dvmm_2node_2vcpu_s", "s", t2,
        f"dvmmctl run --nodes 2 --vcpus 2 (one vCPU per node), cmdline '{cl}'",
    )  # fmt: skip
    eff = [a / b for a, b in zip(one_node.samples, t2, strict=False)]
    fe = Figure(
        "ep_efficiency_2node", "ratio", eff,
        "dvmm_1node_2vcpu_s / dvmm_2node_2vcpu_s, pairing the i-th runs",
    )  # fmt: skip
    return f2, fe


def _hist(t: dict[str, Any]) -> list[float]:
    h = t.get("latency_us_log2")
    if not isinstance(h, list):
        raise Missing("no latency_us_log2 histogram")
    return [float(x) for x in h]


def remote_faults(p: Params) -> tuple[list[Figure], dict[str, Any]]:
    """sweep with numa=local on 2 nodes: each vCPU writes its own node's part (no messages),
    then reads the other node's part (remote read faults). A second sweep over the same
    (now read-shared) memory adds write faults to read-shared pages; its histogram is
    the two-sweep run's minus the one-sweep run's."""
    mem = p.sweep_mem
    one = f"run=sweep sweep.mem={mem} sweep.numa=local"
    two = f"run=sweep,sweep sweep.mem={mem} sweep.numa=local"
    r50: list[float] = []
    r99: list[float] = []
    w50: list[float] = []
    scan: list[float] = []
    wmean: list[float] = []
    hist_read: list[float] = []
    hist_write: list[float] = []
    for _ in range(p.vm_reps):
        a = two_nodes(one)
        ta = dsm_totals(a)
        ha = _hist(ta)
        sw = a.get("sweep")
        v50 = log2_hist_percentile(ha, 50)
        v99 = log2_hist_percentile(ha, 99)
        if v50 is None or v99 is None:
            raise Missing("the sweep on 2 nodes recorded no remote faults")
        r50.append(v50)
        r99.append(v99)
        # both vCPUs read the other node's part at once: aggregate bandwidth
        scan.append(sw.num("bytes") * 8 / sw.num("verify_us") / 1e3)
        b = two_nodes(two)
        tb = dsm_totals(b)
        hb = _hist(tb)
        reads_a = float(ta.get("read_faults", 0))
        reads_delta = float(tb.get("read_faults", 0)) - reads_a
        scale = reads_delta / reads_a if reads_a else 0.0
        delta = [max(0.0, y - x) for x, y in zip(ha, hb, strict=False)]
        # remove the second sweep's re-reads, shaped like the first sweep's reads
        wh = [max(0.0, d - scale * x) for d, x in zip(delta, ha, strict=False)]
        w = log2_hist_percentile(wh, 50)
        if w is None:
            raise Missing("the second sweep recorded no write faults")
        w50.append(w)
        hist_read = [x + y for x, y in zip(hist_read or [0.0] * len(ha), ha, strict=False)]
        hist_write = [x + y for x, y in zip(hist_write or [0.0] * len(wh), wh, strict=False)]
        # cross-check from the guest's clock: write phase of the 2nd sweep per page
        pages = float(sw.num("bytes")) / 4096 / 2  # per vCPU
        sweeps = b.output.count("dvmm-guest: sweep ")
        if sweeps == 2:
            last = [ln for ln in b.output.splitlines() if "dvmm-guest: sweep " in ln][-1]
            wus = float(last.split("write_us=")[1].split()[0])
            wmean.append(wus / pages)
    src = "fault latency histogram of dvmmctl run --json (log2 buckets, interpolated)"
    figs = [
        Figure("remote_read_fault_p50_us", "us", r50, f"sweep mem={mem} numa=local, 2 nodes: {src}"),
        Figure("remote_read_fault_p99_us", "us", r99, f"sweep mem={mem} numa=local, 2 nodes: {src}"),
        Figure(
            "remote_write_fault_p50_us", "us", w50,
            f"second sweep over read-shared pages: histogram(sweep,sweep) - histogram(sweep), minus "
            f"its re-reads scaled from the first sweep's read histogram; {src}",
            {"guest_write_phase_us_per_page": statistics.median(wmean) if wmean else None},
        ),
        Figure(
            "remote_scan_gbps", "Gbit/s", scan,
            f"sweep mem={mem} numa=local, 2 nodes: verify phase (each vCPU reads the other "
            "node's half at once): bytes*8/verify_us, aggregate of both directions",
        ),
    ]  # fmt: skip
    return figs, {"read_hist": hist_read, "write_hist": hist_write}


def numa_speedup(p: Params) -> Figure:
    mem = p.sweep_mem
    sp: list[float] = []
    for _ in range(p.vm_reps):
        loc = two_nodes(f"run=sweep sweep.mem={mem} sweep.numa=local").get("sweep").time_us
        ign = two_nodes(f"run=sweep sweep.mem={mem} sweep.numa=ignore").get("sweep").time_us
        sp.append(ign / loc)
    return Figure(
        "numa_local_speedup", "ratio", sp,
        f"sweep mem={mem} on 2 nodes: time with numa=ignore (all on node 0) / numa=local",
    )  # fmt: skip


def counter_ops(p: Params) -> Figure:
    ops: list[float] = []
    for _ in range(p.vm_reps):
        r = two_nodes(f"run=counter counter.iters={p.counter_iters}").get("counter")
        ops.append(r.num("cpus") * r.num("iters") / (r.time_us / 1e6))
    return Figure(
        "counter_2node_ops_per_s", "ops/s", ops,
        f"counter iters={p.counter_iters}, 2 vCPUs on 2 nodes: cpus*iters/time",
    )  # fmt: skip


def falseshare_ops(p: Params) -> Figure:
    ops: list[float] = []
    line: list[float] = []
    page: list[float] = []
    for _ in range(p.vm_reps):
        r = two_nodes(f"run=falseshare falseshare.iters={p.falseshare_iters}").get("falseshare")
        n = r.num("cpus") * r.num("iters")
        ops.append(2 * n / (r.time_us / 1e6))
        line.append(n / (r.num("line_us") / 1e6) if r.num("line_us") else 0.0)
        page.append(n / (r.num("page_us") / 1e6) if r.num("page_us") else 0.0)
    return Figure(
        "falseshare_2node_ops_per_s", "ops/s", ops,
        f"falseshare iters={p.falseshare_iters}, 2 vCPUs on 2 nodes: both phases (same line, "
        "same page), cpus*iters*2/time",
        {"line_ops_per_s": statistics.median(line), "page_ops_per_s": statistics.median(page)},
    )  # fmt: skip


def ipi_2node(p: Params) -> Figure:
    rt = [
        two_nodes(f"run=ipi ipi.iters={p.ipi_iters} ipi.peer=1").get("ipi").num("rtt_ns") / 1e3
        for _ in range(p.vm_reps)
    ]
    return Figure(
        "ipi_roundtrip_p50_us", "us", rt,
        "guest ipi workload, vCPU 0 and 1 on different nodes: the guest reports the mean "
        "round trip of each run (rtt_ns); value = median over runs",
    )  # fmt: skip


#: (nodes, vCPUs) for the fault-throughput scaling plot.
SCALING = ((2, 2), (2, 4), (3, 3), (3, 6), (4, 4))


def scaling(p: Params) -> list[dict[str, Any]]:
    """Fault throughput (DSM faults / s of the guest's sweep) against vCPUs and nodes."""
    rows: list[dict[str, Any]] = []
    for nodes, vcpus in SCALING[:3] if p.quick else SCALING:
        mem = f"{256 * nodes}M"
        cl = f"run=sweep sweep.mem={p.sweep_mem} sweep.numa=ignore"
        try:
            r = run_dvmm(cl, vcpus=vcpus, nodes=nodes, memory=mem)
        except VmError as e:
            raise Missing(f"distributed VM not usable: {e}") from e
        t = dsm_totals(r)
        faults = (
            float(t.get("read_faults", 0))
            + float(t.get("write_faults", 0))
            + float(t.get("wp_faults", 0))
        )
        rows.append(
            {
                "nodes": nodes,
                "vcpus": vcpus,
                "faults": faults,
                "faults_per_s": faults / (r.get("sweep").time_us / 1e6),
                "oversubscribed": vcpus > 2,
            }
        )
    return rows


MeasureFn = Callable[[Params], Any]
