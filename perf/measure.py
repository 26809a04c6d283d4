"""How each key of issue 6 is measured. Every function returns :class:`Figure`\\ s or
raises :class:`Missing` with the reason the figure cannot be measured here (never
a made-up number)."""

from __future__ import annotations

import os
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
        # ~0.6 ms a round on one node, ~8 ms across two (PVM host): keep 2-node boots short
        return 300 if self.quick else 1000

    @property
    def sweep_mem(self) -> str:
        return "16M" if self.quick else "64M"

    @property
    def counter_iters(self) -> str:
        return "256K" if self.quick else "1M"

    @property
    def falseshare_iters(self) -> str:
        return "1M" if self.quick else "4M"

    @property
    def dist_reps(self) -> int:
        """Repetitions of the short 2-node runs (counter, falseshare, numa)."""
        return 3 if self.quick else 7


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


def ep_runs(p: Params, two_node: bool) -> list[Figure]:
    """QEMU, dvmm on one node and (when ``two_node``) dvmm on two nodes, interleaved
    run by run so drift of this shared host hits all three alike; the efficiency pairs
    the i-th 1-node and 2-node runs. The same boots run ``ipi`` after ``ep``."""
    q: list[float] = []
    d: list[float] = []
    d2: list[float] = []
    qi: list[float] = []
    di: list[float] = []
    d2i: list[float] = []
    d2i_min: list[float] = []
    cl = ep_cmdline(p)
    for _ in range(p.vm_reps):
        rq = run_qemu(cl, smp=2)
        rd = run_dvmm(cl, vcpus=2, nodes=1)
        q.append(rq.get("ep").time_us / 1e6)
        d.append(rd.get("ep").time_us / 1e6)
        qi.append(rq.get("ipi").num("rtt_ns") / 1e3)
        di.append(rd.get("ipi").num("rtt_ns") / 1e3)
        if two_node:
            r2 = two_nodes(cl)
            d2.append(r2.get("ep").time_us / 1e6)
            g = r2.get("ipi")
            if g.values.get("peer_node") not in (None, "1"):
                raise Missing(f"ipi peer not on node 1: {g.values}")
            d2i.append(g.num("rtt_ns") / 1e3)
            d2i_min.append(g.num("min_rtt_ns") / 1e3)
    m = (
        f"the bundled guest's ep workload (cmdline '{cl}'), 2 vCPUs, 256 MiB; the guest's "
        "timed section (time_us of its result line), not boot"
    )
    figs = [
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
    ]  # fmt: skip
    if two_node:
        figs += [
            Figure(
                "dvmm_2node_2vcpu_s", "s", d2,
                "dvmmctl run --nodes 2 --vcpus 2 (one vCPU per node): " + m,
            ),
            Figure(
                "ep_efficiency_2node", "ratio", [a / b for a, b in zip(d, d2, strict=True)],
                "dvmm_1node_2vcpu_s / dvmm_2node_2vcpu_s, pairing the i-th runs (interleaved "
                "with each other and with QEMU)",
            ),
            Figure(
                "ipi_roundtrip_p50_us", "us", d2i,
                f"guest ipi workload (ipi.iters={p.ipi_iters} ipi.peer=1, after ep in the 2-node "
                "boots), vCPU 0 on node 0 pings vCPU 1 on node 1, whose CPL0 handler replies. "
                "The guest reports only each run's MEAN round trip (rtt_ns) and its minimum, "
                "not a per-round distribution: value = median over runs of the mean (tail "
                "rounds pull a mean up; the min is in extra). Same cmdline as "
                "dvmm_ipi_roundtrip_1node_us / qemu_ipi_roundtrip_1node_us",
                {"min_rtt_us_median": _med(d2i_min)},
            ),
        ]  # fmt: skip
    return figs


# ---------------------------------------------------------------- distributed VM


def two_nodes(
    cmdline: str, *, vcpus: int = 2, nodes: int = 2, memory: str = "256M",
    hold_window_us: int | None = None,
) -> VmRun:  # fmt: skip
    try:
        return run_dvmm(
            cmdline, vcpus=vcpus, nodes=nodes, memory=memory, hold_window_us=hold_window_us
        )
    except VmError as e:
        raise Missing(f"distributed VM not usable: {e}") from e


def check_distributed() -> None:
    """Raise Missing unless ``dvmmctl run --nodes 2`` boots and returns DSM counters."""
    r = two_nodes("run=counter counter.iters=1000")
    r.get("counter")
    if r.result_json is None or not find_dsm_snapshots(r.result_json):
        raise Missing(
            "dvmmctl run --nodes 2 --json returned no per-node DSM counters "
            "(nodes[i].stats.dsm with latency_us_log2)"
        )


def hold_window_supported() -> bool:
    """Whether ``dvmmctl run`` takes ``--hold-window-us`` (0 = plain invalidation)."""
    try:
        run_dvmm("run=counter counter.iters=1000", vcpus=2, nodes=2, hold_window_us=0)
    except VmError as e:
        if "hold-window" in str(e) or "unrecognized" in str(e):
            return False
        raise Missing(f"distributed VM not usable: {e}") from e
    return True


def dsm_totals(r: VmRun) -> dict[str, Any]:
    """The per-node DSM counters of a run, summed over nodes (histograms bucket-wise)."""
    if r.result_json is None:
        raise Missing("dvmmctl run --json printed no result JSON")
    snaps = find_dsm_snapshots(r.result_json)
    if not snaps:
        raise Missing("no DSM counters (nodes[i].stats.dsm) in the result JSON")
    return sum_counters(snaps)


def _hist(t: dict[str, Any]) -> list[float]:
    h = t.get("latency_us_log2")
    if not isinstance(h, list):
        raise Missing("no latency_us_log2 histogram")
    return [float(x) for x in h]


def _sweep_lines(r: VmRun) -> list[dict[str, float]]:
    """Every ``sweep`` result line of a run, in order (a cmdline may repeat the workload)."""
    out: list[dict[str, float]] = []
    for ln in r.output.splitlines():
        if "dvmm-guest: sweep " in ln and ln.rstrip().endswith("PASS"):
            kv = dict(x.split("=", 1) for x in ln.split() if "=" in x)
            out.append({k: float(kv[k]) for k in ("bytes", "write_us", "verify_us", "time_us")})
    return out


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def remote_faults(p: Params) -> tuple[list[Figure], dict[str, Any]]:
    """sweep with numa=local on 2 nodes: each vCPU writes its own node's part (local
    faults, no message), then reads the other node's part (remote read faults). A
    second sweep over the same, now read-shared, memory adds writes to read-shared pages
    (invalidation + ownership transfer); its histogram is the two-sweep run's minus the
    one-sweep run's, minus the second verify's re-reads."""
    mem = p.sweep_mem
    one = f"run=sweep sweep.mem={mem} sweep.numa=local"
    two = f"run=sweep,sweep sweep.mem={mem} sweep.numa=local"
    r50: list[float] = []
    r99: list[float] = []
    w50: list[float] = []
    scan: list[float] = []
    rmean_engine: list[float] = []
    rguest: list[float] = []
    wguest: list[float] = []
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
        rmean_engine.append(float(ta.get("fault_mean_ns", 0)) / 1e3)
        pages = sw.num("bytes") / 4096 / 2  # per vCPU
        rguest.append(sw.num("verify_us") / pages)
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
        lines = _sweep_lines(b)
        if len(lines) == 2:
            # the 2nd sweep's write phase hits read-shared pages, the 1st's only local ones
            wguest.append((lines[1]["write_us"] - lines[0]["write_us"]) / pages)
    src = (
        "percentile of the DSM fault-latency histogram (nodes[i].stats.dsm.latency_us_log2 "
        "summed over nodes; log2 buckets, geometric interpolation inside the bucket, so "
        "bucket resolution: the true value is within the same factor-2 bucket). The "
        "engine times a fault from reading the userfaultfd event to installing the granted "
        "page: the guest exit, uffd wake-up and vCPU resume (what local_fault_floor "
        "measures) are NOT included"
    )
    figs = [
        Figure(
            "remote_read_fault_p50_us", "us", r50,
            f"sweep mem={mem} numa=local, 2 nodes x 1 vCPU: the verify phase reads the other "
            f"node's half; {src}",
            {"engine_mean_us_median": _med(rmean_engine),
             "guest_verify_us_per_page_median": _med(rguest),
             "guest_note": "guest_verify_us_per_page = verify_us / pages read per vCPU: "
                           "end-to-end (exit, uffd, protocol, resume, the 4 KiB read itself), "
                           "both vCPUs faulting at once on 2 host cores"},
        ),
        Figure("remote_read_fault_p99_us", "us", r99, f"as remote_read_fault_p50_us; {src}"),
        Figure(
            "remote_write_fault_p50_us", "us", w50,
            "run=sweep,sweep (the 2nd write phase writes pages the other node holds "
            "read-shared: invalidation + ownership transfer): histogram(sweep,sweep) - "
            "histogram(sweep), minus the 2nd verify's re-reads (the 1st run's read histogram "
            f"scaled to the read-fault delta); {src}",
            {"guest_extra_write_us_per_page_median": _med(wguest),
             "guest_note": "(2nd write_us - 1st write_us) / pages per vCPU of the same run: "
                           "guest-observed extra cost of writing a read-shared page"},
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
    for _ in range(p.dist_reps):
        loc = two_nodes(f"run=sweep sweep.mem={mem} sweep.numa=local").get("sweep").time_us
        ign = two_nodes(f"run=sweep sweep.mem={mem} sweep.numa=ignore").get("sweep").time_us
        sp.append(ign / loc)
    return Figure(
        "numa_local_speedup", "ratio", sp,
        f"sweep mem={mem} on 2 nodes x 1 vCPU (memory-heavy: write own part, verify the "
        "neighbour's): guest time_us with numa=ignore (all data on node 0) / with numa=local "
        "(each vCPU's part on its own node), paired runs",
    )  # fmt: skip


def _ops_pair(
    p: Params, workload: str, iters: str, with_plain: bool
) -> tuple[list[float], list[float], dict[str, list[float]]]:
    """Interleaved runs of ``workload`` on 2 nodes with the default hold window and 0."""
    held: list[float] = []
    plain: list[float] = []
    extra: dict[str, list[float]] = {}
    for _ in range(p.dist_reps):
        for hw, out in ((None, held), (0, plain)):
            if hw == 0 and not with_plain:
                continue
            r = two_nodes(f"run={workload} {workload}.iters={iters}", hold_window_us=hw)
            g = r.get(workload)
            n = g.num("cpus") * g.num("iters")
            phases = 2 if workload == "falseshare" else 1
            out.append(phases * n / (g.time_us / 1e6))
            tag = "default" if hw is None else "plain"
            t = dsm_totals(r)
            extra.setdefault(f"{tag}_remote_faults", []).append(float(t.get("remote_faults", 0)))
            extra.setdefault(f"{tag}_held_requests", []).append(float(t.get("held_requests", 0)))
            if workload == "falseshare":
                for ph in ("line", "page"):
                    us = g.num(f"{ph}_us")
                    extra.setdefault(f"{tag}_{ph}_ops_per_s", []).append(
                        n / (us / 1e6) if us else 0
                    )
    return held, plain, extra


def contended_ops(p: Params, hold_supported: bool) -> list[Figure]:
    """counter and falseshare on 2 nodes, with the DSM's default hold window and (when
    ``dvmmctl run --hold-window-us`` exists) with 0 = the plain invalidation protocol."""
    figs: list[Figure] = []
    note = (
        "; DSM hold window: the engine's default (100 us per dvmmctl run --help); the "
        "_plain_ variant runs --hold-window-us 0 (plain invalidation protocol), interleaved"
    )
    for wl, iters, formula in (
        ("counter", p.counter_iters, "cpus*iters/time (lock xadd on one shared counter)"),
        ("falseshare", p.falseshare_iters,
         ("2*cpus*iters/time (both phases: per-CPU words in one cache line, then per-CPU "
          "lines in one page; plain increments)")),
    ):  # fmt: skip
        held, plain, extra = _ops_pair(p, wl, iters, hold_supported)
        med = {k: _med(v) for k, v in extra.items()}
        figs.append(
            Figure(
                f"{wl}_2node_ops_per_s", "ops/s", held,
                f"{wl} {wl}.iters={iters}, 2 nodes x 1 vCPU: {formula}, guest time_us{note}. "
                "DSM remote faults (page transfers) per run are in extra: few transfers mean "
                "each vCPU ran long stretches natively while it owned the page",
                med,
            )
        )  # fmt: skip
        if plain:
            figs.append(
                Figure(
                    f"{wl}_2node_plain_ops_per_s", "ops/s", plain,
                    f"as {wl}_2node_ops_per_s with dvmmctl run --hold-window-us 0 (plain "
                    "invalidation protocol)",
                )
            )  # fmt: skip
    return figs


#: (nodes, vCPUs) for the fault-throughput scaling plot.
SCALING = ((2, 2), (2, 4), (3, 3), (4, 4), (3, 6))


def scaling(p: Params) -> list[dict[str, Any]]:
    """DSM fault throughput against vCPUs and nodes: a numa=ignore sweep (all data on
    node 0, so every vCPU on another node faults remotely)."""
    rows: list[dict[str, Any]] = []
    for nodes, vcpus in SCALING[:3] if p.quick else SCALING:
        cl = f"run=sweep sweep.mem={p.sweep_mem} sweep.numa=ignore"
        r = two_nodes(cl, vcpus=vcpus, nodes=nodes, memory=f"{128 * nodes}M")
        t = dsm_totals(r)
        secs = r.get("sweep").time_us / 1e6
        faults = sum(float(t.get(k, 0)) for k in ("read_faults", "write_faults", "wp_faults"))
        remote = float(t.get("remote_faults", 0))
        rows.append(
            {
                "nodes": nodes,
                "vcpus": vcpus,
                "faults": faults,
                "remote_faults": remote,
                "sweep_s": secs,
                "faults_per_s": faults / secs,
                "remote_faults_per_s": remote / secs,
                "oversubscribed": vcpus > 2,
                "host_cores": os.cpu_count(),
            }
        )
    return rows


MeasureFn = Callable[[Params], Any]
