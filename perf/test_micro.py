"""Micro-benchmarks under pytest-benchmark: raw TCP and the local userfaultfd floor.

Each test runs one figure's repetitions once under ``benchmark.pedantic`` and puts
the figure (``Figure.to_json``) and a thinned sample distribution into
``extra_info``; ``perf.run`` reads them back from ``--benchmark-json``.
"""

from __future__ import annotations

from typing import Any

import pytest

from perf import measure
from perf.common import Figure
from perf.measure import Params


def _record(benchmark: Any, fig: Figure, dist: list[float]) -> None:
    step = max(1, len(dist) // 2000)
    benchmark.extra_info["figure"] = {"key": fig.key, **fig.to_json()}
    benchmark.extra_info["distribution"] = sorted(dist)[::step]


@pytest.mark.parametrize("mode", ["block", "busy"])
def test_tcp_rtt(benchmark: Any, params: Params, mode: str) -> None:
    fig, dist = benchmark.pedantic(measure.tcp_rtt, args=(params, mode), rounds=1, iterations=1)
    _record(benchmark, fig, dist)
    assert fig.value > 0


def test_tcp_stream(benchmark: Any, params: Params) -> None:
    fig = benchmark.pedantic(measure.tcp_stream, args=(params,), rounds=1, iterations=1)
    _record(benchmark, fig, [])
    assert fig.value > 0


@pytest.mark.parametrize(("mode", "handler"), [("kvm", "block"), ("kvm", "busy"),
                                               ("host", "block"), ("host", "busy")])  # fmt: skip
def test_local_fault(benchmark: Any, params: Params, mode: str, handler: str) -> None:
    fig, dist = benchmark.pedantic(
        measure.local_fault, args=(params, mode, handler), rounds=1, iterations=1
    )
    _record(benchmark, fig, dist)
    assert fig.value > 0
