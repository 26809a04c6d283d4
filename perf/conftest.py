"""pytest configuration for the performance suite (`pytest perf/ --benchmark-json ...`).

``PERF_QUICK=1`` selects the short repetition counts of ``python -m perf.run --quick``.
"""

from __future__ import annotations

import os

import pytest

from perf.measure import Params


@pytest.fixture(scope="session")
def params() -> Params:
    return Params(quick=os.environ.get("PERF_QUICK", "") not in ("", "0"))
