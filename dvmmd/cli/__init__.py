"""dvmmctl, the command line: one module per verb group (dvmmctl.py wires them).

``dvmmctl`` (pyproject's script) and ``python -m dvmmd.cli`` run `dvmmctl.main`.
"""
