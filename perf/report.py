"""latest.json -> report.md and PNG plots (matplotlib, Agg backend).

python -m perf.report [perf/results/latest.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from perf.common import ISSUE_KEYS, RESULTS


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def _plots(doc: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Draw what there is; returns (file, caption) pairs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made: list[tuple[str, str]] = []
    dist: dict[str, list[float]] = doc.get("distributions", {})

    def cdf(keys: list[str], title: str, name: str, xlabel: str) -> None:
        have = [k for k in keys if dist.get(k)]
        if not have:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in have:
            xs = sorted(dist[k])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.plot(xs, ys, label=k)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of samples")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((name, title))

    cdf(["tcp_rtt_p50_us", "tcp_rtt_busy_p50_us"], "TCP round trip, 64 B, two processes (CDF)",
        "tcp_rtt_cdf.png", "round trip (us)")  # fmt: skip
    cdf(["local_fault_floor_p50_us", "local_fault_floor_busy_p50_us",
         "host_uffd_fault_block_p50_us", "host_uffd_fault_busy_p50_us"],
        "Local userfaultfd fault round trip (CDF)", "local_fault_cdf.png", "round trip (us)")  # fmt: skip

    # single-node VM times, QEMU vs dvmm, with min..max
    allk = {**doc.get("keys", {}), **doc.get("extra_keys", {})}
    bars = [k for k in ("qemu_1node_2vcpu_s", "dvmm_1node_2vcpu_s", "dvmm_2node_2vcpu_s")
            if allk.get(k, {}).get("value") is not None]  # fmt: skip
    if bars:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        vals = [allk[k]["value"] for k in bars]
        lo = [allk[k]["value"] - allk[k]["spread"]["min"] for k in bars]
        hi = [allk[k]["spread"]["max"] - allk[k]["value"] for k in bars]
        ax.bar(bars, vals, yerr=[lo, hi], capsize=6, color=["#888", "#3a7", "#37a"][: len(bars)])
        ax.set_ylabel("guest ep time (s), median, min..max")
        ax.set_title("Embarrassingly parallel workload, 2 vCPUs")
        fig.tight_layout()
        fig.savefig(out / "ep_times.png", dpi=110)
        plt.close(fig)
        made.append(("ep_times.png", "ep workload: QEMU/KVM vs dvmm"))

    lat = doc.get("extra", {}).get("dsm_latency") or {}
    hdr = [(float(v), float(c)) for v, c in lat.get("sweep_read_latency_ns_hdr") or []]
    hists = doc.get("extra", {}).get("dsm_histograms")  # latest.json before issue 9
    if hdr:
        total = sum(c for _, c in hdr)
        fig, ax = plt.subplots(figsize=(7, 4))
        xs, ys, seen = [], [], 0.0
        for v, c in hdr:
            seen += c
            xs.append(v / 1e3)
            ys.append(seen / total)
        ax.step(xs, ys, where="post", label=f"engine, sweep read faults (n={int(total)})")
        for k, style in (("remote_read_fault_p50_us", "--"), ("remote_read_fault_p99_us", ":")):
            v = allk.get(k, {}).get("value")
            if v is not None:
                ax.axvline(v, color="#a73", linestyle=style, label=f"guest faultlat {k}")
        ax.set_xscale("log")
        ax.set_xlabel("fault latency (us)")
        ax.set_ylabel("fraction of faults")
        ax.set_title("Remote read fault latency: DSM engine histogram (HDR) vs guest")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "remote_fault_hist.png", dpi=110)
        plt.close(fig)
        made.append(("remote_fault_hist.png", "engine read-fault latency CDF, guest percentiles"))
    elif hists:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, h in hists.items():
            if h:
                xs2 = [0.5] + [2.0 ** (i - 1) for i in range(1, len(h))]
                ax.step(xs2, h, where="post", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("fault latency (us, log2 buckets)")
        ax.set_ylabel("faults")
        ax.set_title("Remote fault latency (dvmm DSM histogram)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "remote_fault_hist.png", dpi=110)
        plt.close(fig)
        made.append(("remote_fault_hist.png", "remote read / write fault latency histograms"))

    pairs = [(wl, f"{wl}_2node_ops_per_s", f"{wl}_2node_plain_ops_per_s")
             for wl in ("counter", "falseshare")]  # fmt: skip
    pairs = [x for x in pairs if allk.get(x[1], {}).get("value") is not None]
    if pairs:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.38
        for j, (label, idx, color) in enumerate((("hold window (default)", 1, "#37a"),
                                                 ("plain invalidation", 2, "#a73"))):  # fmt: skip
            xs, vals, lo, hi = [], [], [], []
            for i, pr in enumerate(pairs):
                f = allk.get(pr[idx], {})
                if f.get("value") is None:
                    continue
                xs.append(i + (j - 0.5) * width)
                vals.append(f["value"])
                lo.append(f["value"] - f["spread"]["min"])
                hi.append(f["spread"]["max"] - f["value"])
            if xs:
                ax.bar(xs, vals, width, yerr=[lo, hi], capsize=5, label=label, color=color)
        ax.set_xticks(range(len(pairs)), [pr[0] for pr in pairs])
        ax.set_yscale("log")
        ax.set_ylabel("guest ops/s (median, min..max)")
        ax.set_title("Contended workloads, 2 nodes x 1 vCPU")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "contended_ops.png", dpi=110)
        plt.close(fig)
        made.append(("contended_ops.png", "counter / falseshare: hold window vs plain protocol"))

    rows = doc.get("extra", {}).get("fault_scaling")
    if rows:
        cores = rows[0].get("host_cores") or 2
        fig, ax = plt.subplots(figsize=(7, 4))
        for nodes in sorted({r["nodes"] for r in rows}):
            pts = sorted((r for r in rows if r["nodes"] == nodes), key=lambda r: r["vcpus"])
            ax.plot([r["vcpus"] for r in pts], [r["faults_per_s"] for r in pts], "o-",
                    label=f"{nodes} nodes: all DSM faults")  # fmt: skip
            ax.plot([r["vcpus"] for r in pts], [r["remote_faults_per_s"] for r in pts], "x--",
                    label=f"{nodes} nodes: remote (messaged) faults")  # fmt: skip
        ax.axvspan(cores + 0.5, max(r["vcpus"] for r in rows) + 0.5, color="red", alpha=0.08,
                   label=f"oversubscribed: more vCPUs than the {cores} host cores")  # fmt: skip
        ax.set_xlabel(
            f"faulting vCPUs (all nodes on one {cores}-core host; each node also runs a DSM thread)"
        )
        ax.set_ylabel("faults / s of the guest sweep")
        ax.set_title("DSM fault throughput vs vCPUs and nodes (sweep, numa=ignore)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fault_scaling.png", dpi=110)
        plt.close(fig)
        made.append(("fault_scaling.png", "fault throughput against vCPUs and nodes"))
    return made


def render(doc: dict[str, Any], plots: list[tuple[str, str]]) -> str:
    h = doc.get("host", {})
    L: list[str] = []
    L.append("# dvmm performance report\n")
    L.append(
        f"Revision `{doc.get('revision')}`, {doc.get('date')}, "
        f"{'quick' if doc.get('quick') else 'full'} suite in {doc.get('duration_s')} s. "
        f"Host: {h.get('cpus')} CPUs ({h.get('cpu_model', '?')}), virtualization: "
        f"{h.get('virtualization')}, kernel {h.get('kernel')}. Load average (1/5/15 min) "
        f"at start {h.get('loadavg_start')}, at end {h.get('loadavg_end')}."
        + (f" Stages: {', '.join(doc['stages'])}." if doc.get("stages") else "")
        + "\n"
    )
    L.append("Values are medians over repetitions; spread is min..max and the interquartile "
             "half-range relative to the median. `null` = not measurable on this revision "
             "(reason under *Missing*).\n")  # fmt: skip
    L.append("## Targets (issue 6, revised by issue 9)\n")
    L.append("| target | formula | bound | value | status |")
    L.append("| --- | --- | --- | --- | --- |")
    for t in doc.get("targets", []):
        L.append(
            f"| {t['name']} | `{t['expr']}` | {t['target']} | {_fmt(t['value'])} | "
            f"**{t['status']}** |"
        )
    L.append("")
    L.append("## Keys\n")
    L.append("| key | value | unit | n | min..max | ±IQR/2 |")
    L.append("| --- | --- | --- | --- | --- | --- |")

    def row(k: str, f: dict[str, Any]) -> str:
        s = f.get("spread") or {}
        mm = f"{_fmt(s.get('min'))}..{_fmt(s.get('max'))}" if s else "—"
        iqr = f"{s['iqr_rel_pct']:.1f}%" if s and s.get("iqr_rel_pct") is not None else "—"
        return f"| `{k}` | {_fmt(f.get('value'))} | {f.get('unit', '')} | {f.get('n', 0)} | {mm} | {iqr} |"

    for k in ISSUE_KEYS:
        L.append(row(k, doc["keys"].get(k, {})))
    L.append("")
    if doc.get("extra_keys"):
        L.append("Extra keys:\n")
        L.append("| key | value | unit | n | min..max | ±IQR/2 |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for k, f in sorted(doc["extra_keys"].items()):
            L.append(row(k, f))
        L.append("")
    L.append("## How each figure is measured\n")
    for k, f in {**doc["keys"], **doc.get("extra_keys", {})}.items():
        if f.get("method"):
            extra = f" ({json.dumps(f['extra'])})" if f.get("extra") else ""
            L.append(f"- `{k}`: {f['method']}{extra}")
    L.append("")
    if doc.get("missing"):
        L.append("## Missing\n")
        for k, why in doc["missing"].items():
            L.append(f"- `{k}`: {why.splitlines()[0][:400]}")
        L.append("")
    rows = doc.get("extra", {}).get("fault_scaling")
    if rows:
        L.append("## Fault-throughput scaling\n")
        L.append("| nodes | vCPUs | oversubscribed | sweep s | DSM faults | remote faults | "
                 "faults/s | remote/s |")  # fmt: skip
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            L.append(
                f"| {r['nodes']} | {r['vcpus']} | {'yes' if r['oversubscribed'] else 'no'} | "
                f"{_fmt(r['sweep_s'])} | {_fmt(r['faults'])} | {_fmt(r['remote_faults'])} | "
                f"{_fmt(r['faults_per_s'])} | {_fmt(r['remote_faults_per_s'])} |"
            )
        L.append("")
    prof = doc.get("extra", {}).get("profiles")
    if prof:
        L.append("## Profiles\n")
        for k, v in prof.items():
            L.append(f"- {k}: {v}")
        L.append("")
    if plots:
        L.append("## Plots\n")
        for name, cap in plots:
            L.append(f"![{cap}]({name})\n")
    if doc.get("stage_seconds"):
        L.append(
            "Stage durations (s): " + ", ".join(f"{k} {v}" for k, v in doc["stage_seconds"].items())
        )
    return "\n".join(L) + "\n"


def write(doc: dict[str, Any], out: Path) -> None:
    plots = _plots(doc, out)
    (out / "report.md").write_text(render(doc, plots))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else RESULTS / "latest.json"
    write(json.loads(path.read_text()), path.parent)
    print(f"wrote {path.parent / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
