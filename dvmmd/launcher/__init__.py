"""Daemon-less runs of one VM over several local nodes: ``dvmmctl run --nodes N``.

launch.py starts one worker process per node on this machine (127.0.0.x, or each in
its own network namespace, netns.py), lays the VM out with the daemon's placement
function (dvmmd.vm.placement), watches the workers and reports.
"""
