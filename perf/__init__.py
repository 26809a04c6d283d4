"""dvmm performance suite (issue 6): `python -m perf.run` or `make perf`."""
