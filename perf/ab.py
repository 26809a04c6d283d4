"""A/B: run the suite on two git revisions and report which figures changed beyond noise.

    python -m perf.ab REV_A REV_B [--runs 3] [--quick] [--out perf/results/ab]

Each revision is checked out in its own ``git worktree`` (under perf/build/ab/),
set up with ``make setup`` (its own .venv, native extension, guest; Rust builds
share one CARGO_TARGET_DIR), then *this* checkout's suite runs ``--runs`` times per
revision, alternating A and B so slow drift of the machine hits both alike. Per key,
the per-repetition samples of all runs are pooled and compared with a two-sided
permutation test on the difference of means (the change shown is of the medians);
a key "changed" when p < --alpha and the medians differ by more than --min-change
(relative).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perf.common import BUILD, HIGHER_IS_BETTER, PERF, REPO, RESULTS


def permutation_p(
    a: Sequence[float], b: Sequence[float], *, draws: int = 20000, seed: int = 1
) -> float:
    """Two-sided permutation p-value of |mean(a) - mean(b)| (exact when small).

    The mean, not the median, is the test statistic: with few samples a median
    difference survives swapping the extremes and the test loses its power.
    """
    if len(a) < 2 or len(b) < 2:
        return 1.0
    obs = abs(statistics.fmean(a) - statistics.fmean(b))
    pool = list(a) + list(b)
    n = len(a)
    combos = list(itertools.combinations(range(len(pool)), n)) if len(pool) <= 16 else None
    hits = 0
    total = 0
    if combos is not None:
        for idx in combos:
            s = set(idx)
            x = [pool[i] for i in idx]
            y = [pool[i] for i in range(len(pool)) if i not in s]
            hits += abs(statistics.fmean(x) - statistics.fmean(y)) >= obs - 1e-12
            total += 1
    else:
        rng = random.Random(seed)
        for _ in range(draws):
            rng.shuffle(pool)
            hits += abs(statistics.fmean(pool[:n]) - statistics.fmean(pool[n:])) >= obs - 1e-12
            total += 1
        hits += 1  # the observed arrangement
        total += 1
    return hits / total


def min_p(n_a: int, n_b: int) -> float:
    """The smallest p-value the exact two-sided test can give with these sample counts
    (2 of the C(n_a+n_b, n_a) arrangements are at least as extreme as a perfect split)."""
    if n_a < 2 or n_b < 2:
        return 1.0
    return min(1.0, 2 / math.comb(n_a + n_b, n_a)) if n_a + n_b <= 16 else 0.0


def compare(
    runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]], alpha: float, min_change: float
) -> list[dict[str, Any]]:
    def samples(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for r in runs:
            for k, f in {**r.get("keys", {}), **r.get("extra_keys", {})}.items():
                if f.get("value") is not None:
                    out.setdefault(k, []).extend(f.get("samples") or [f["value"]])
        return out

    sa, sb = samples(runs_a), samples(runs_b)
    rows = []
    for k in sorted(set(sa) | set(sb)):
        a, b = sa.get(k, []), sb.get(k, [])
        if not a or not b:
            rows.append({"key": k, "a": statistics.median(a) if a else None,
                         "b": statistics.median(b) if b else None, "verdict": "only one side"})  # fmt: skip
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        rel = (mb - ma) / ma if ma else 0.0
        p = permutation_p(a, b)
        changed = p < alpha and abs(rel) > min_change
        better = (rel > 0) == (k in HIGHER_IS_BETTER)
        verdict = ("better" if better else "worse") if changed else "same within noise"
        if verdict == "same within noise" and min_p(len(a), len(b)) >= alpha:
            verdict = f"undecidable: n={len(a)}+{len(b)} cannot reach p < {alpha}"
        rows.append({"key": k, "a": ma, "b": mb, "change_pct": round(rel * 100, 2),
                     "p": round(p, 4), "n_a": len(a), "n_b": len(b), "verdict": verdict})  # fmt: skip
    return rows


def _sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    print("ab:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def prepare(rev: str, root: Path) -> Path:
    """A worktree of ``rev`` with its venv, native extension and guest built."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    wt = root / sha
    if not wt.exists():
        _sh(["git", "worktree", "add", "--detach", str(wt), sha], REPO)
    env = dict(os.environ, CARGO_TARGET_DIR=str(root / "cargo-target"))
    _sh(["make", "setup"], wt, env)
    return wt


def _shim(root: Path) -> Path:
    """A directory holding only ``perf`` -> this checkout's perf/: on PYTHONPATH it makes
    ``import perf`` this suite while ``import dvmmd`` still resolves to the worktree's own
    package (its venv's editable install; the suite starts dvmmctl with cwd = worktree).
    Putting this checkout's root on PYTHONPATH instead would shadow the worktree's dvmmd."""
    shim = root / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "perf"
    if not link.is_symlink():
        link.symlink_to(PERF, target_is_directory=True)
    return shim


def run_suite(wt: Path, out: Path, quick: bool) -> dict[str, Any]:
    """This checkout's suite against the worktree's product (its venv, module and guest)."""
    py = wt / ".venv" / "bin" / "python"
    shim = _shim(wt.parent)
    env = dict(os.environ, PYTHONPATH=str(shim), DVMM_PERF_REPO=str(wt))
    env.pop("VIRTUAL_ENV", None)
    cmd = [str(py), "-m", "perf.run", "--out", str(out), "--no-profile", "--no-report"]
    if quick:
        cmd.append("--quick")
    # cwd = the shim: `python -m` puts the cwd first on sys.path, and the worktree's own
    # (older) perf/ must not shadow this suite
    _sh(cmd, shim, env)
    doc: dict[str, Any] = json.loads((out / "latest.json").read_text())
    return doc


def render(rows: list[dict[str, Any]], a: str, b: str) -> str:
    lines = [f"# A/B: {a} (A) vs {b} (B)\n", "| key | A | B | change | p | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| `{r['key']}` | {r.get('a')} | {r.get('b')} | {r.get('change_pct', '—')}% | "
            f"{r.get('p', '—')} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("rev_a")
    ap.add_argument("rev_b")
    ap.add_argument("--runs", type=int, default=3, help="suite runs per revision (3)")
    ap.add_argument("--quick", action="store_true", help="use the quick suite for each run")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--min-change", type=float, default=0.03, help="relative change floor (0.03)")
    ap.add_argument("--out", type=Path, default=RESULTS / "ab")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()  # the suite runs with another cwd
    root = BUILD / "ab"
    root.mkdir(parents=True, exist_ok=True)
    wa, wb = prepare(args.rev_a, root), prepare(args.rev_b, root)
    runs: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    for i in range(args.runs):
        for side, wt in (("a", wa), ("b", wb)):
            runs[side].append(run_suite(wt, args.out / f"{side}{i}", args.quick))
    rows = compare(runs["a"], runs["b"], args.alpha, args.min_change)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = render(rows, args.rev_a, args.rev_b)
    (args.out / "ab.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
