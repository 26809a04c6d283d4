"""A VM as data, shared by the CLI, the launcher, the daemon and the worker.

spec.py: the VM spec and result JSON exchanged with the Rust core; placement.py: how
vCPUs and memory are laid out over nodes (one function for the daemon and the
launcher); boot_files.py: kernels and initrds read with the caller's rights;
sizes.py and names.py: memory sizes and VM/node names as people write them;
stats_report.py: per-node counters as a table and totals.
"""
