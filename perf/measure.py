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
from perf.common import (
    Figure,
    GuestFormatError,
    GuestResult,
    faultlat_us,
    find_dsm_snapshots,
    hdr_quantile,
    ipi_us,
    log2_hist_percentile,
    merge_hdr,
    sum_counters,
)
from perf.vm import VmError, VmRun, run_dvmm, run_qemu


class Missing(Exception):
    """A figure that cannot be measured on this revision or host; the message says why."""


@dataclass
class Partial:
    """The figures a measurement could make, and why the others are missing."""

    figures: list[Figure]
    missing: dict[str, str]


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
    def faultlat_size(self) -> int:
        """faultlat.size: pages per vCPU and phase (the guest's default is 1024)."""
        return 1024 if self.quick else 2048

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


def ipi_cmdline(p: Params) -> str:
    return f"run=ipi ipi.iters={p.ipi_iters} ipi.peer=1"


IPI_KEYS = (
    "ipi_roundtrip_p50_us", "ipi_roundtrip_p99_us", "dvmm_ipi_roundtrip_1node_us",
    "qemu_ipi_roundtrip_1node_us",
)  # fmt: skip
EP_KEYS = ("qemu_1node_2vcpu_s", "dvmm_1node_2vcpu_s", "dvmm_2node_2vcpu_s", "ep_efficiency_2node")


class _IpiSamples:
    """Per-run ipi percentiles of QEMU (1 node), dvmm 1 node and dvmm 2 nodes."""

    def __init__(self) -> None:
        self.q: list[float] = []
        self.d1: list[float] = []
        self.d2_50: list[float] = []
        self.d2_99: list[float] = []
        self.extra: dict[str, list[float]] = {}
        self.error: str | None = None

    def _x(self, k: str, v: float | None) -> None:
        if v is not None:
            self.extra.setdefault(k, []).append(v)

    def add(self, rq: VmRun | None, rd: VmRun | None, r2: VmRun | None) -> None:
        if self.error is not None:
            return
        try:
            for name, run, out in (("qemu", rq, self.q), ("dvmm_1node", rd, self.d1)):
                if run is not None:
                    v = ipi_us(run.get("ipi"))
                    out.append(v["p50"])
                    self._x(f"{name}_p99_us", v["p99"])
                    self._x(f"{name}_mean_us", v.get("mean"))
            if r2 is not None:
                g = r2.get("ipi")
                if g.values.get("peer_node") not in (None, "1"):
                    raise GuestFormatError(f"ipi peer not on node 1: {g.values}")
                v = ipi_us(g)
                self.d2_50.append(v["p50"])
                self.d2_99.append(v["p99"])
                self._x("2node_mean_us", v.get("mean"))
                self._x("2node_min_us", v.get("min"))
        except (GuestFormatError, VmError) as e:
            self.error = str(e)

    def figures(self, p: Params, cl: str, two_node: bool, missing: dict[str, str]) -> list[Figure]:
        if self.error is not None:
            for k in IPI_KEYS:
                missing[k] = self.error
            return []
        med = {k: _med(v) for k, v in self.extra.items()}
        where = (
            f"guest ipi workload (cmdline '{cl}'): vCPU 0 pings vCPU 1 {p.ipi_iters} times with "
            "a fixed-vector IPI, whose CPL0 handler replies; the guest times every round "
            "(rdtsc) and prints per-round percentiles (rtt_p50_ns, rtt_p99_ns)"
        )
        figs = [
            Figure(
                "qemu_ipi_roundtrip_1node_us", "us", self.q,
                f"{where}; under QEMU/KVM (in-kernel LAPIC), 2 vCPUs: per-run rtt_p50_ns, "
                "median over runs",
                {k: v for k, v in med.items() if k.startswith("qemu")},
            ),
            Figure(
                "dvmm_ipi_roundtrip_1node_us", "us", self.d1,
                f"{where}; under dvmm on one node (userspace LAPIC), 2 vCPUs: per-run "
                "rtt_p50_ns, median over runs",
                {k: v for k, v in med.items() if k.startswith("dvmm_1node")},
            ),
        ]  # fmt: skip
        if two_node:
            figs += [
                Figure(
                    "ipi_roundtrip_p50_us", "us", self.d2_50,
                    f"{where}; dvmmctl run --nodes 2 --vcpus 2 (vCPU 0 on node 0, vCPU 1 on "
                    "node 1): per-run rtt_p50_ns, median over runs; the same cmdline as "
                    "dvmm_/qemu_ipi_roundtrip_1node_us",
                    {k: v for k, v in med.items() if k.startswith("2node")},
                ),
                Figure(
                    "ipi_roundtrip_p99_us", "us", self.d2_99,
                    "as ipi_roundtrip_p50_us: per-run rtt_p99_ns, median over runs",
                ),
            ]  # fmt: skip
        return figs


def ep_runs(p: Params, two_node: bool) -> Partial:
    """QEMU, dvmm on one node and (when ``two_node``) dvmm on two nodes, interleaved
    run by run so drift of this shared host hits all three alike; the efficiency pairs
    the i-th 1-node and 2-node runs. The same boots run ``ipi`` after ``ep``: the ipi
    keys come from them too (missing alone when the guest prints no percentiles)."""
    q: list[float] = []
    d: list[float] = []
    d2: list[float] = []
    ipi = _IpiSamples()
    cl = ep_cmdline(p)
    for _ in range(p.vm_reps):
        rq = run_qemu(cl, smp=2)
        rd = run_dvmm(cl, vcpus=2, nodes=1)
        q.append(rq.get("ep").time_us / 1e6)
        d.append(rd.get("ep").time_us / 1e6)
        r2 = None
        if two_node:
            r2 = two_nodes(cl)
            d2.append(r2.get("ep").time_us / 1e6)
        ipi.add(rq, rd, r2)
    m = (
        f"the bundled guest's ep workload (cmdline '{cl}'), 2 vCPUs, 256 MiB; the guest's "
        "timed section (time_us of its result line), not boot"
    )
    missing: dict[str, str] = {}
    figs = [
        Figure("qemu_1node_2vcpu_s", "s", q, "qemu-system-x86_64 -enable-kvm -cpu qemu64,+x2apic: " + m),
        Figure("dvmm_1node_2vcpu_s", "s", d, "dvmmctl run --vcpus 2: " + m),
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
        ]  # fmt: skip
    figs += ipi.figures(p, cl, two_node, missing)
    return Partial(figs, missing)


def ipi_runs(p: Params, two_node: bool) -> Partial:
    """Only the ipi keys (stage ``ipi``, for short A/B runs): ``run=ipi`` under QEMU,
    dvmm on one node and dvmm on two nodes, interleaved run by run."""
    ipi = _IpiSamples()
    cl = ipi_cmdline(p)
    for _ in range(p.vm_reps):
        rq = run_qemu(cl, smp=2)
        rd = run_dvmm(cl, vcpus=2, nodes=1)
        r2 = two_nodes(cl) if two_node else None
        ipi.add(rq, rd, r2)
    missing: dict[str, str] = {}
    figs = ipi.figures(p, cl, two_node, missing)
    return Partial(figs, missing)


# ---------------------------------------------------------------- distributed VM


def two_nodes(
    cmdline: str, *, vcpus: int = 2, nodes: int = 2, memory: str = "256M",
    hold_window_us: int | None = None, extra_args: tuple[str, ...] = (),
) -> VmRun:  # fmt: skip
    try:
        return run_dvmm(
            cmdline, vcpus=vcpus, nodes=nodes, memory=memory, hold_window_us=hold_window_us,
            extra_args=extra_args,
        )  # fmt: skip
    except VmError as e:
        raise Missing(f"distributed VM not usable: {e}") from e


def check_distributed() -> None:
    """Raise Missing unless ``dvmmctl run --nodes 2`` boots and returns DSM counters."""
    r = two_nodes("run=counter counter.iters=1000")
    r.get("counter")
    if r.result_json is None or not find_dsm_snapshots(r.result_json):
        raise Missing(
            "dvmmctl run --nodes 2 --json returned no per-node DSM counters (nodes[i].stats.dsm)"
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


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


FAULTLAT_KEYS = (
    "remote_read_fault_p50_us", "remote_read_fault_p99_us", "remote_upgrade_fault_p50_us",
    "remote_write_fault_p50_us", "local_fault_guest_p50_us",
)  # fmt: skip


def faultlat_cmdline(p: Params) -> str:
    return f"run=faultlat faultlat.size={p.faultlat_size}"


def faultlat_figures(p: Params, runs: list[GuestResult], dsm: list[dict[str, Any]]) -> list[Figure]:
    """The guest-timed fault keys from faultlat result lines (one per run) and the
    runs' summed DSM counters (for the cross-checks in ``extra``)."""
    per = [faultlat_us(g) for g in runs]

    def col(k: str) -> list[float]:
        return [x[k] for x in per]

    remote = [float(t.get("remote_faults", 0)) for t in dsm]
    cl = faultlat_cmdline(p)
    how = (
        f"guest faultlat workload (cmdline '{cl}') on dvmmctl run --nodes 2 --vcpus 2 (one "
        "vCPU per node): each vCPU times every first access to pages homed on the other node "
        "(rdtsc fenced around one access at a time, random page order, no prefetch can hide "
        "a miss); end to end as the guest sees it (exit, userfaultfd, protocol, network, "
        "install, resume). Per run the guest prints percentiles over both vCPUs' accesses; "
        "the value is the median over runs"
    )
    ex = {
        "dsm_remote_faults_per_run_median": _med(remote),
        "accesses_per_phase_per_run": _med(col("pages"))
        if all("pages" in x for x in per)
        else None,
    }
    return [
        Figure(
            "remote_read_fault_p50_us", "us", col("read_p50"),
            f"{how}. read phase: a page only its home holds (read miss): read_p50_ns",
            {**ex, "read_max_us_median": _med(col("read_max"))},
        ),
        Figure(
            "remote_read_fault_p99_us", "us", col("read_p99"),
            "as remote_read_fault_p50_us: read_p99_ns",
        ),
        Figure(
            "remote_upgrade_fault_p50_us", "us", col("upgrade_p50"),
            f"{how}. upgrade phase: a write to a page read-shared by this node and its home "
            "(write-protect fault, invalidation of the home's copy): upgrade_p50_ns",
            {"upgrade_p99_us_median": _med(col("upgrade_p99")),
             "upgrade_max_us_median": _med(col("upgrade_max"))},
        ),
        Figure(
            "local_fault_guest_p50_us", "us", col("local_p50"),
            f"{how}. local phase (before the others): the first touch of a page homed on the "
            "toucher's own node that nobody has touched (userfaultfd, resolved by the local "
            "engine without a message, zero page): the floor of a DSM fault as the guest sees "
            "it, with PVM's own first-touch cost in it: local_p50_ns",
            {"local_p99_us_median": _med(col("local_p99")),
             "local_max_us_median": _med(col("local_max"))},
        ),
        Figure(
            "remote_write_fault_p50_us", "us", col("steal_p50"),
            f"{how}. steal phase: a write to a page of the writer's own node that the other "
            "node holds modified (ownership and data come back): steal_p50_ns",
            {"steal_p99_us_median": _med(col("steal_p99")),
             "steal_max_us_median": _med(col("steal_max"))},
        ),
    ]  # fmt: skip


def faultlat(p: Params) -> list[Figure]:
    """Remote fault latency as the guest sees it: faultlat on 2 nodes x 1 vCPU."""
    runs: list[GuestResult] = []
    dsm: list[dict[str, Any]] = []
    for _ in range(p.vm_reps):
        r = two_nodes(faultlat_cmdline(p))
        runs.append(r.get("faultlat"))
        dsm.append(dsm_totals(r))
    try:
        return faultlat_figures(p, runs, dsm)
    except GuestFormatError as e:
        raise Missing(str(e)) from e


ENGINE_KEYS = ("engine_read_fault_p50_us", "engine_read_fault_p99_us")


def engine_read_quantiles(t: dict[str, Any]) -> tuple[float, float, str]:
    """(p50, p99) in us of a run's summed DSM fault-latency histogram and how exact
    they are: the HDR histogram (0.1 %) or, on revisions before issue 9, the log2
    buckets (a factor of 2)."""
    hdr = t.get("latency_ns_hdr")
    if isinstance(hdr, list) and hdr:
        b = merge_hdr([hdr])
        v50, v99 = hdr_quantile(b, 0.5), hdr_quantile(b, 0.99)
        if v50 is not None and v99 is not None:
            return v50 / 1e3, v99 / 1e3, "hdr"
    h = t.get("latency_us_log2")
    if isinstance(h, list):
        hist = [float(x) for x in h]
        l50, l99 = log2_hist_percentile(hist, 50), log2_hist_percentile(hist, 99)
        if l50 is not None and l99 is not None:
            return l50, l99, "log2"
    raise Missing("the sweep on 2 nodes recorded no remote faults (empty DSM histogram)")


def remote_scan(p: Params) -> tuple[list[Figure], dict[str, Any]]:
    """sweep with numa=local on 2 nodes: each vCPU writes its own node's part (local
    faults, no message), then reads the other node's part (remote read faults): the
    scan bandwidth and the DSM engine's histogram of those read faults (a diagnostic:
    it does not see the guest exit, the uffd wake-up or the resume)."""
    mem = p.sweep_mem
    one = f"run=sweep sweep.mem={mem} sweep.numa=local"
    e50: list[float] = []
    e99: list[float] = []
    scan: list[float] = []
    scan_shm: list[float] = []
    touch: list[float] = []
    hit: list[float] = []
    copies: list[float] = []
    mean_engine: list[float] = []
    guest: list[float] = []
    kinds: set[str] = set()
    hdrs: list[Any] = []
    for _ in range(p.vm_reps):
        a = two_nodes(one)
        ta = dsm_totals(a)
        v50, v99, kind = engine_read_quantiles(ta)
        kinds.add(kind)
        e50.append(v50)
        e99.append(v99)
        mean_engine.append(float(ta.get("fault_mean_ns", 0)) / 1e3)
        fetched = float(ta.get("prefetched_pages", 0))
        if fetched > 0:
            hit.append(float(ta.get("prefetch_used", 0)) / fetched)
        moved = float(ta.get("pages_moved", 0))
        if moved > 0:
            copies.append(float(ta.get("page_copies", 0)) / moved)
        if isinstance(ta.get("latency_ns_hdr"), list):
            hdrs.append(ta["latency_ns_hdr"])
        sw = a.get("sweep")
        pages = sw.num("bytes") / 4096 / 2  # per vCPU
        guest.append(sw.num("verify_us") / pages)
        # both vCPUs read the other node's part at once: aggregate bandwidth
        scan.append(sw.num("bytes") * 8 / sw.num("verify_us") / 1e3)
        # The same run's write phase: each vCPU first-touches its own node's half
        # (no network): what touching fresh pages costs this guest on this host.
        touch.append(sw.num("bytes") * 8 / sw.num("write_us") / 1e3)
        # The same over the shared-memory transport (nodes on one host).
        sh = two_nodes(one, extra_args=("--transport", "shm")).get("sweep")
        scan_shm.append(sh.num("bytes") * 8 / sh.num("verify_us") / 1e3)
    res = (
        "HDR histogram, 3 significant digits (exact to 0.1 %)"
        if kinds == {"hdr"}
        else "log2 buckets (this revision's engine has no HDR histogram): known to a factor of 2"
    )
    src = (
        f"sweep mem={mem} numa=local, 2 nodes x 1 vCPU: the verify phase reads the other "
        "node's half. Percentile of the DSM engine's fault-latency histogram "
        f"(nodes[i].stats.dsm.latency_ns_hdr merged over nodes; {res}). The engine times a "
        "fault from reading the userfaultfd event to installing the granted page: the guest "
        "exit, uffd wake-up and vCPU resume are NOT included (a diagnostic beside "
        "remote_read_fault_*, which the guest times end to end)"
    )
    figs = [
        Figure(
            "engine_read_fault_p50_us", "us", e50, src,
            {"engine_mean_us_median": _med(mean_engine),
             "guest_verify_us_per_page_median": _med(guest),
             "guest_note": "guest_verify_us_per_page = verify_us / pages read per vCPU: "
                           "end-to-end, both vCPUs faulting at once on 2 host cores"},
        ),
        Figure("engine_read_fault_p99_us", "us", e99, f"as engine_read_fault_p50_us; {src}"),
        Figure(
            "remote_scan_gbps", "Gbit/s", scan,
            f"sweep mem={mem} numa=local, 2 nodes: verify phase (each vCPU reads the other "
            "node's half at once): bytes*8/verify_us, aggregate of both directions",
        ),
        Figure(
            "remote_scan_shm_gbps", "Gbit/s", scan_shm,
            "as remote_scan_gbps, with dvmmctl run --transport shm (rings in shared "
            "memory between the two node processes, same sealed records), run after each "
            "TCP run",
        ),
        Figure(
            "guest_touch_floor_gbps", "Gbit/s", touch,
            f"sweep mem={mem} numa=local, 2 nodes, the remote_scan_gbps runs' write phase: "
            "each vCPU writes its own node's half, pages nobody touched (a userfaultfd "
            "zero-page fault resolved by the local engine, no message, plus the host's "
            "shadow-paging fault): bytes*8/write_us. The floor beside remote_scan_gbps: "
            "a remote page costs the guest the same exit, fault and mapping, plus the "
            "transfer",
        ),
        Figure(
            "prefetch_hit_ratio", "ratio", hit,
            "the remote_scan_gbps runs' DSM counters summed over both nodes: "
            "prefetch_used / prefetched_pages (pages the adaptive prefetcher fetched that "
            "a fault then found in place; the rest were wasted or invalidated first)",
        ),
        Figure(
            "copies_per_page", "copies", copies,
            "the remote_scan_gbps runs' DSM counters summed over both nodes: page_copies / "
            "pages_moved, every user-space copy of page bytes on both sides per page "
            "received (sender: from the engine mapping into the send buffer; receiver: "
            "out of the decoder's buffer into guest memory, or into a payload and the "
            "UFFDIO_COPY source when a page cannot land in place; decoder-buffer "
            "compaction); kernel socket copies not counted",
        ),
    ]  # fmt: skip
    merged = merge_hdr(hdrs)
    return figs, {"sweep_read_latency_ns_hdr": [[v, c] for v, c in merged]}


#: Data-plane protection modes (``dvmmctl run --data-plane``), default first.
DATA_PLANE_MODES = ("encrypt", "integrity", "none")
SECURITY_KEYS = tuple(
    f"{k}_{m}" for m in DATA_PLANE_MODES for k in ("remote_scan_gbps", "remote_read_fault_p50_us")
)


def security_modes(p: Params) -> list[Figure]:
    """The cost of protecting the data plane: the sweep's remote scan and faultlat's
    read-miss p50 under each ``--data-plane`` mode, interleaved run by run (so host
    drift hits every mode alike)."""
    sweep = f"run=sweep sweep.mem={p.sweep_mem} sweep.numa=local"
    scan: dict[str, list[float]] = {m: [] for m in DATA_PLANE_MODES}
    read: dict[str, list[float]] = {m: [] for m in DATA_PLANE_MODES}
    for _ in range(p.vm_reps):
        for m in DATA_PLANE_MODES:
            args = ("--data-plane", m)
            sw = two_nodes(sweep, extra_args=args).get("sweep")
            scan[m].append(sw.num("bytes") * 8 / sw.num("verify_us") / 1e3)
            fl = faultlat_us(two_nodes(faultlat_cmdline(p), extra_args=args).get("faultlat"))
            read[m].append(fl["read_p50"])
    how = (
        "dvmmctl run --nodes 2 --vcpus 2 --data-plane {m} (the three modes interleaved run by "
        "run; encrypt = AES-256-GCM on every frame, the default; integrity = GCM tag only; "
        "none = authenticated handshake, bare frames)"
    )
    figs: list[Figure] = []
    for m in DATA_PLANE_MODES:
        figs.append(Figure(
            f"remote_scan_gbps_{m}", "Gbit/s", scan[m],
            f"as remote_scan_gbps (sweep mem={p.sweep_mem} numa=local, verify phase, "
            f"aggregate of both directions); {how.format(m=m)}",
        ))  # fmt: skip
        figs.append(Figure(
            f"remote_read_fault_p50_us_{m}", "us", read[m],
            f"as remote_read_fault_p50_us (guest faultlat read phase, read_p50_ns); "
            f"{how.format(m=m)}",
        ))  # fmt: skip
    return figs


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
