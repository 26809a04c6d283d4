"""Snapshots and restore (issue 15): ``dvmmctl run --snapshot-dir ... --restore``.

The bundled guest's ``stress``, ``counter`` and ``ring`` are snapshotted in the
middle of their run (the snapshot is taken after a fixed time, and the test
checks that the workload had not finished by then: no result line before the
snapshot), restored on 1 and 2 nodes, and must print exactly the result lines
of an uninterrupted run (every field but the timings). A corrupted, truncated
or incomplete snapshot directory is refused with an error naming the file and
the check, before the VM starts (no guest output).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import dvmmctl, require_guest, require_native, requires_kvm

#: Workload results whose lines must match: every field but the timings.
TIMING = re.compile(r" (time_us|rtt\w*|total_ms)=\S+")
#: Each run in this file.
RUN_S = 300


def results(out: str) -> list[str]:
    """The workload result lines (PASS/FAIL), timings removed."""
    return [
        TIMING.sub("", ln.strip())
        for ln in out.splitlines()
        if ln.startswith("dvmm-guest: ") and ln.rstrip().endswith(("PASS", "FAIL"))
    ]


def run(*args: str) -> tuple[int, str, str]:
    require_native()
    require_guest()
    p = dvmmctl("run", "--timeout", "240", *args, timeout=RUN_S)
    return p.returncode, p.stdout, p.stderr


def snapshot_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "dvmm: snapshot " in ln]


# One node: stress alone takes ~1.9 s on an idle host here (and longer under
# load), so a snapshot after 0.5 s is in its middle whatever the machine does.
WORK = "run=stress,counter,ring stress.iters=100000000 counter.iters=2000000 ring.iters=2000000"
# Two nodes, three vCPUs: stress takes ~1 s on an idle host here (longer under
# load), so a snapshot after 0.2 s is in its middle; restored on three nodes
# (where the guest's two NUMA nodes are spread over three) the rest takes a few
# seconds.
WORK2 = "run=stress,counter,ring stress.iters=150000 counter.iters=20000 ring.iters=20000"


def reference_of(vcpus: str, work: str) -> list[str]:
    """The uninterrupted run's result lines (they do not depend on the nodes)."""
    code, out, err = run("--vcpus", vcpus, "--memory", "256M", "--cmdline", work)
    assert code == 0, out + err
    lines = results(out)
    assert lines and all(ln.endswith("PASS") for ln in lines), out
    return lines


@pytest.fixture(scope="module")
def reference() -> list[str]:
    return reference_of("2", WORK)


def snapshot_mid_run(snap: Path, nodes: str, vcpus: str, work: str, after: str) -> None:
    code, out, err = run(
        "--nodes", nodes, "--vcpus", vcpus, "--memory", "256M", "--cmdline", work,
        "--snapshot-dir", str(snap), "--snapshot-after", after,
    )  # fmt: skip
    assert code == 0, out + err
    assert len(snapshot_lines(err)) == 1, err
    assert "stopped after its snapshot" in err
    # Mid-run: the first workload had not printed its result yet.
    assert results(out) == [], out
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["nodes"] == int(nodes) and manifest["vcpus"] == int(vcpus)
    assert sorted(manifest["files"]) == sorted(
        ["devices.json"]
        + [f"vcpu-{i}.json" for i in range(int(vcpus))]
        + [f"memory-{k}.bin" for k in range(int(nodes))]
    )


@requires_kvm
def test_snapshot_on_one_node_restores_exactly(tmp_path: Path, reference: list[str]) -> None:
    snap = tmp_path / "snap"
    snapshot_mid_run(snap, "1", "2", WORK, "0.5")
    code, out, err = run("--restore", str(snap))
    assert code == 0, out + err
    assert results(out) == reference, out


@requires_kvm
def test_snapshot_on_two_nodes_restores_on_one_two_and_three(tmp_path: Path) -> None:
    reference = reference_of("3", WORK2)
    snap = tmp_path / "snap"
    snapshot_mid_run(snap, "2", "3", WORK2, "0.2")
    for on in ("2", "1", "3"):
        code, out, err = run("--nodes", on, "--restore", str(snap))
        assert code == 0, f"--nodes {on}:\n" + out + err
        assert results(out) == reference, f"--nodes {on}:\n" + out


@requires_kvm
def test_repeated_snapshots_during_one_run(tmp_path: Path, reference: list[str]) -> None:
    snap = tmp_path / "snap"
    code, out, err = run(
        "--vcpus", "2", "--memory", "256M", "--cmdline", WORK,
        "--snapshot-dir", str(snap), "--snapshot-after", "0.3", "--snapshot-every", "0.5",
    )  # fmt: skip
    assert code == 0, out + err
    # It ran to the end, snapshotting on the way; each snapshot replaced the last.
    assert results(out) == reference, out
    assert len(snapshot_lines(err)) >= 2, err
    assert not (tmp_path / "snap.partial").exists() and not (tmp_path / "snap.old").exists()
    code, out2, err2 = run("--restore", str(snap))
    assert code == 0, out2 + err2
    # The last snapshot is of the same run: whatever was left of it finishes
    # with the same results (the ones it had printed are in guest memory no more).
    assert set(results(out2)) <= set(reference) and results(out2), out2


@pytest.fixture(scope="module")
def one_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    snap = tmp_path_factory.mktemp("snapshots") / "good"
    code, out, err = run(
        "--vcpus", "2", "--memory", "64M", "--cmdline", "run=stress stress.iters=80000000",
        "--snapshot-dir", str(snap), "--snapshot-after", "0.2",
    )  # fmt: skip
    assert code == 0, out + err
    return snap


def copy_snapshot(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@requires_kvm
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip", r"memory-0\.bin: SHA-256 \w+, the manifest says \w+ \(corrupted\)"),
        ("truncate", r"vcpu-1\.json: \d+ bytes, the manifest says \d+"),
        ("missing", r"devices\.json: No such file"),
        ("no-manifest", r"not a dvmm snapshot \(no manifest\.json"),
        ("version", r"snapshot format version 99, this dvmm reads version 1 only"),
    ],
)
def test_damaged_snapshot_is_refused_before_the_vm_starts(
    tmp_path: Path, one_snapshot: Path, damage: str, message: str
) -> None:
    snap = copy_snapshot(one_snapshot, tmp_path / "snap")
    if damage == "flip":
        mem = snap / "memory-0.bin"
        b = bytearray(mem.read_bytes())
        b[len(b) // 2] ^= 0x40
        mem.write_bytes(bytes(b))
    elif damage == "truncate":
        v = snap / "vcpu-1.json"
        v.write_bytes(v.read_bytes()[:-10])
    elif damage == "missing":
        (snap / "devices.json").unlink()
    elif damage == "no-manifest":
        (snap / "manifest.json").unlink()
    else:
        m = json.loads((snap / "manifest.json").read_text())
        m["version"] = 99
        (snap / "manifest.json").write_text(json.dumps(m))
    code, out, err = run("--restore", str(snap))
    assert code != 0, out + err
    assert re.search(message, err), err
    # Nothing ran: not one guest line.
    assert "dvmm-guest:" not in out, out


@requires_kvm
def test_restore_of_the_intact_copy_works(tmp_path: Path, one_snapshot: Path) -> None:
    snap = copy_snapshot(one_snapshot, tmp_path / "snap")
    code, out, err = run("--restore", str(snap))
    assert code == 0, out + err
    assert len(results(out)) == 1 and results(out)[0].endswith("PASS"), out


def test_snapshot_options_are_checked() -> None:
    p = dvmmctl("run", "--snapshot-after", "1")
    assert p.returncode == 2 and "need --snapshot-dir" in p.stderr
    p = dvmmctl("run", "--snapshot-dir", "/nonexistent/dir/snap")
    assert p.returncode == 2 and "parent directory does not exist" in p.stderr, p.stderr
    p = dvmmctl("run", "--restore", "/nonexistent")
    assert p.returncode == 2 and "not a dvmm snapshot" in p.stderr, p.stderr
