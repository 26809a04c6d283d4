"""A/B: run the suite on two revisions or two configurations and report which figures
changed beyond noise.

    python -m perf.ab REV_A REV_B [--runs 3] [--quick] [--only STAGES] [--out perf/results/ab]
    python -m perf.ab --env-a DVMM_DSM_MODE=spin --env-b DVMM_DSM_MODE=rt \
        [--runs 3] [--quick] [--only micro,remote,ipi] [--keys K,...]

Revisions: each is checked out in its own ``git worktree`` (under perf/build/ab/),
set up with ``make setup`` (its own .venv, native extension, guest; Rust builds
share one CARGO_TARGET_DIR), then *this* checkout's suite runs against it.
Configurations (no revisions given): both sides are this checkout as built, and
differ only by the environment variables ``--env-a`` / ``--env-b`` (repeatable,
``NAME=VALUE``) set for the suite and everything it starts: ``dvmmctl run`` and its
VMM worker processes inherit them (dvmmd/launcher/launch.py passes its environment
on), which is how runtime switches of the Rust engine are selected. Both can be
combined (two revisions, each with its own environment).

The suite runs ``--runs`` times per side, alternating A, B, A, B, ... so slow drift
of the machine hits both alike; ``--only`` passes a stage subset to ``perf.run`` to
keep a run short. Per key, the per-repetition samples of all runs are pooled and
compared with a two-sided permutation test on the difference of means (the change
shown is of the medians); a key "changed" when p < --alpha and the medians differ by
more than --min-change (relative). Writes ``ab.md`` (a Markdown table ready for
perf/README.md) and ``ab.json`` under --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perf.common import BUILD, HIGHER_IS_BETTER, PERF, REPO, RESULTS
from perf.run import parse_stages


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
    runs_a: list[dict[str, Any]],
    runs_b: list[dict[str, Any]],
    alpha: float,
    min_change: float,
    keys: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per key measured on either side (only ``keys`` when given): medians,
    min..max, sample counts, the relative change of the medians, p and a verdict."""
    units: dict[str, str] = {}

    def samples(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for r in runs:
            for k, f in {**r.get("keys", {}), **r.get("extra_keys", {})}.items():
                if f.get("value") is not None:
                    out.setdefault(k, []).extend(f.get("samples") or [f["value"]])
                    units.setdefault(k, str(f.get("unit", "")))
        return out

    sa, sb = samples(runs_a), samples(runs_b)
    rows = []
    for k in sorted(set(sa) | set(sb)):
        if keys is not None and k not in keys:
            continue
        a, b = sa.get(k, []), sb.get(k, [])
        base: dict[str, Any] = {
            "key": k, "unit": units.get(k, ""),
            "a": statistics.median(a) if a else None, "b": statistics.median(b) if b else None,
            "a_min": min(a) if a else None, "a_max": max(a) if a else None,
            "b_min": min(b) if b else None, "b_max": max(b) if b else None,
            "n_a": len(a), "n_b": len(b),
        }  # fmt: skip
        if not a or not b:
            rows.append({**base, "verdict": "only one side"})
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        rel = (mb - ma) / ma if ma else 0.0
        p = permutation_p(a, b)
        changed = p < alpha and abs(rel) > min_change
        better = (rel > 0) == (k in HIGHER_IS_BETTER)
        verdict = ("better" if better else "worse") if changed else "same within noise"
        if verdict == "same within noise" and min_p(len(a), len(b)) >= alpha:
            verdict = f"undecidable: n={len(a)}+{len(b)} cannot reach p < {alpha}"
        rows.append({**base, "change_pct": round(rel * 100, 2), "p": round(p, 4),
                     "verdict": verdict})  # fmt: skip
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


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    """``NAME=VALUE`` strings -> a dict (ValueError names the flag and the item)."""
    out: dict[str, str] = {}
    for it in items or []:
        name, eq, value = it.partition("=")
        if not eq or not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{flag} {it!r}: expected NAME=VALUE")
        out[name] = value
    return out


@dataclass
class Side:
    """One side of the comparison: a worktree of a revision (None: this checkout as it
    is) and the extra environment of every suite run."""

    label: str
    worktree: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: variables the other side sets and this one does not: removed from this side's
    #: environment, so that side A without --env-a is the default, not whatever the
    #: calling shell exported
    unset: set[str] = field(default_factory=set)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def environ(self, base: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in self.unset}
        env.update(self.env)
        return env

    def describe(self) -> str:
        what = [self.label] if self.worktree is not None else ["this checkout"]
        what += [f"{k}={v}" for k, v in self.env.items()]
        what += [f"{k} unset" for k in sorted(self.unset)]
        return " ".join(what)


def suite_cmd(py: str, out: Path, quick: bool, only: str | None) -> list[str]:
    cmd = [py, "-m", "perf.run", "--out", str(out), "--no-profile", "--no-report"]
    if quick:
        cmd.append("--quick")
    if only:
        cmd += ["--only", only]
    return cmd


def run_suite(side: Side, out: Path, quick: bool, only: str | None = None) -> dict[str, Any]:
    """This checkout's suite against the side's product, with the side's environment.

    A worktree: its venv, native module and guest (``DVMM_PERF_REPO``). This checkout:
    the running interpreter, cwd = this checkout."""
    if side.worktree is not None:
        wt = side.worktree
        shim = _shim(wt.parent)
        env = side.environ(dict(os.environ, PYTHONPATH=str(shim), DVMM_PERF_REPO=str(wt)))
        env.pop("VIRTUAL_ENV", None)
        # cwd = the shim: `python -m` puts the cwd first on sys.path, and the worktree's
        # own (older) perf/ must not shadow this suite
        cmd, cwd = suite_cmd(str(wt / ".venv" / "bin" / "python"), out, quick, only), shim
    else:
        env = side.environ(dict(os.environ))
        cmd, cwd = suite_cmd(sys.executable, out, quick, only), PERF.parent
    print(f"ab: side {side.describe()}", flush=True)
    _sh(cmd, cwd, env)
    doc: dict[str, Any] = json.loads((out / "latest.json").read_text())
    return doc


def _num(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def render(rows: list[dict[str, Any]], a: str, b: str, header: Sequence[str] = ()) -> str:
    """The comparison as Markdown: medians with min..max and n per side, the change of
    the medians, the permutation p-value and the verdict."""
    lines = [f"# A/B: A = {a} vs B = {b}\n", *header]
    if header:
        lines.append("")
    lines += ["| key | unit | A median (min..max, n) | B median (min..max, n) | change | p | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip

    def cell(r: dict[str, Any], s: str) -> str:
        if r.get(s) is None:
            return "—"
        return f"{_num(r[s])} ({_num(r.get(s + '_min'))}..{_num(r.get(s + '_max'))}, {r.get('n_' + s)})"

    for r in rows:
        change = f"{r['change_pct']:+.1f}%" if r.get("change_pct") is not None else "—"
        lines.append(
            f"| `{r['key']}` | {r.get('unit', '')} | {cell(r, 'a')} | {cell(r, 'b')} | {change} | "
            f"{r.get('p', '—')} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def _rev() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                       capture_output=True, text=True, check=False)  # fmt: skip
    return r.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="*", metavar="REV",
                    help="two git revisions (A B); none: compare configurations of this checkout")  # fmt: skip
    ap.add_argument("--env-a", action="append", metavar="NAME=VALUE",
                    help="environment of side A's runs (repeatable)")  # fmt: skip
    ap.add_argument("--env-b", action="append", metavar="NAME=VALUE",
                    help="environment of side B's runs (repeatable)")  # fmt: skip
    ap.add_argument("--runs", type=int, default=3, help="suite runs per side (3)")
    ap.add_argument("--quick", action="store_true", help="use the quick suite for each run")
    ap.add_argument("--only", metavar="STAGE[,STAGE...]",
                    help="perf.run stages to run (python -m perf.run --list-stages)")  # fmt: skip
    ap.add_argument("--keys", metavar="KEY[,KEY...]", help="only these keys in the table")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--min-change", type=float, default=0.03, help="relative change floor (0.03)")
    ap.add_argument("--out", type=Path, default=RESULTS / "ab")
    args = ap.parse_args(argv)
    try:
        env_a, env_b = parse_env(args.env_a, "--env-a"), parse_env(args.env_b, "--env-b")
    except ValueError as e:
        ap.error(str(e))
    if len(args.revs) not in (0, 2):
        ap.error("give two revisions (REV_A REV_B) or none")
    if not args.revs and env_a == env_b:
        ap.error("without revisions, --env-a and --env-b must differ (two configurations)")
    if args.only:
        try:
            parse_stages(args.only, no_profile=True)
        except ValueError as e:
            ap.error(str(e))
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    args.out = args.out.resolve()  # the suite runs with another cwd
    if args.revs:
        root = BUILD / "ab"
        root.mkdir(parents=True, exist_ok=True)
        sa = Side(args.revs[0], prepare(args.revs[0], root), env_a)
        sb = Side(args.revs[1], prepare(args.revs[1], root), env_b)
    else:
        sa, sb = Side("A", None, env_a), Side("B", None, env_b)
    sa.unset, sb.unset = set(env_b) - set(env_a), set(env_a) - set(env_b)
    started = dt.datetime.now(dt.UTC)
    load0 = os.getloadavg()
    for i in range(args.runs):
        for name, side in (("a", sa), ("b", sb)):
            side.runs.append(run_suite(side, args.out / f"{name}{i}", args.quick, args.only))
    rows = compare(sa.runs, sb.runs, args.alpha, args.min_change, keys)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "a": sa.describe(), "b": sb.describe(), "revision": _rev(), "runs": args.runs,
        "quick": args.quick, "only": args.only, "started": started.isoformat(timespec="seconds"),
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip
    (args.out / "ab.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    header = (
        f"Checkout `{meta['revision']}`, {meta['started']}, {args.runs} run(s) per side "
        f"alternating A, B, ...; {'quick' if args.quick else 'full'} suite"
        f"{', stages ' + args.only if args.only else ''}; load average {meta['loadavg_start']} "
        f"-> {meta['loadavg_end']}. Per key: median of the pooled per-repetition samples "
        f"(min..max, n); p: two-sided permutation test of the means; changed when p < "
        f"{args.alpha} and the medians differ by > {args.min_change:.0%}."
    )
    md = render(rows, f"`{sa.describe()}`", f"`{sb.describe()}`", [header])
    (args.out / "ab.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
