"""dvmmctl's argument handling: clear errors, exit 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
from conftest import REPO, dvmmctl

from dvmmd.cli import doctor
from dvmmd.cli import dvmmctl as cli
from dvmmd.cli import run as run_verb
from dvmmd.cli.common import CliError


def assert_clean_usage_error(r: object, *needles: str) -> None:
    import subprocess

    assert isinstance(r, subprocess.CompletedProcess)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert "error:" in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_help_lists_every_verb_with_a_description() -> None:
    r = dvmmctl("--help")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    verbs = list(sub.choices)
    assert {"doctor", "run", "demo"} <= set(verbs)
    help_by_verb = {a.dest: a.help for a in sub._choices_actions}
    for verb in verbs:
        assert help_by_verb.get(verb), f"verb {verb!r} has no one-line description"
        # the verb appears in --help with its description's first words
        first_words = " ".join(str(help_by_verb[verb]).split()[:3])
        assert re.search(rf"^\s+{re.escape(verb)}\s", r.stdout, re.MULTILINE), (verb, r.stdout)
        assert first_words in " ".join(r.stdout.split()), (verb, first_words, r.stdout)


@pytest.mark.parametrize("verb", ["doctor", "run", "demo"])
def test_verb_help(verb: str) -> None:
    r = dvmmctl(verb, "--help")
    assert r.returncode == 0, r.stderr
    assert f"dvmmctl {verb}" in r.stdout


def test_run_help_lists_options() -> None:
    r = dvmmctl("run", "--help")
    for opt in ("--vcpus", "--memory", "--kernel", "--initrd", "--cmdline", "--console-log",
                "--timeout", "--json", "--stats", "--nodes"):  # fmt: skip
        assert opt in r.stdout, opt


def test_version() -> None:
    r = dvmmctl("--version")
    assert r.returncode == 0
    assert "dvmmctl 0.1.0" in r.stdout


def test_console_script_installed() -> None:
    script = REPO / ".venv" / "bin" / "dvmmctl"
    if not script.exists():
        pytest.skip(f"{script} not installed (run `make setup`)")
    import subprocess

    r = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    assert "doctor" in r.stdout and "run" in r.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ([], ["required"]),
        (["bogus-verb"], ["invalid choice", "bogus-verb"]),
        (["run", "--vcpus", "0"], ["--vcpus", "at least 1 vCPU"]),
        (["run", "--vcpus", "-3"], ["--vcpus"]),
        (["run", "--vcpus", "abc"], ["--vcpus", "not an integer"]),
        (["run", "--vcpus", "2.5"], ["--vcpus", "not an integer"]),
        (["run", "--vcpus", "255"], ["--vcpus", "more than dvmm supports", "254"]),
        (["run", "--vcpus", "100000"], ["--vcpus", "more than dvmm supports"]),
        (["run", "--memory", "12X"], ["--memory", "unknown unit"]),
        (["run", "--memory", "lots"], ["--memory", "invalid size"]),
        (["run", "--memory", "1000"], ["--memory", "4 KiB"]),
        (["run", "--memory", "8M"], ["--memory", "too small"]),
        (["run", "--memory", "100T"], ["--memory", "too large"]),
        (["run", "--memory"], ["--memory", "expected one argument"]),
        (["run", "--timeout", "-1"], ["--timeout"]),
        (["run", "--timeout", "soon"], ["--timeout"]),
        (["run", "--nodes", "17"], ["--nodes 17", "1 to 16"]),
        (["run", "--nodes", "3", "--vcpus", "2"], ["--nodes 3", "at least 3 vCPUs"]),
        (["run", "--nodes", "0"], ["--nodes"]),
        (["run", "--no-such-option"], ["unrecognized arguments"]),
        (["run", "--kernel", "/nonexistent/kernel"], ["/nonexistent/kernel", "does not exist"]),
        (["run", "--kernel", "/"], ["not a regular file"]),
        (["doctor", "--bogus"], ["unrecognized arguments"]),
        # boot (and demo) check counts and sizes exactly as run does
        (["boot", "x", "--vcpus", "0"], ["--vcpus", "at least 1 vCPU"]),
        (["boot", "x", "--vcpus", "100000"], ["--vcpus", "more than dvmm supports"]),
        (["boot", "x", "--memory", "1000"], ["--memory", "4 KiB"]),
        (["boot", "x", "--memory", "8M"], ["--memory", "too small"]),
        (["boot", "x", "--timeout", "-1"], ["--timeout"]),
        (["boot", "x", "--timeout", "nan"], ["--timeout"]),
        (["boot", "x", "--cpu", "486"], ["--cpu", "unknown CPU model"]),
        (["boot", "x", "--foreign-budget", "1"], ["--foreign-budget", "at least one 4 KiB page"]),
        (["demo", "--vcpus", "0"], ["--vcpus", "at least 1 vCPU"]),
        (["demo", "--memory", "8M"], ["--memory", "too small"]),
    ],
)
def test_bad_arguments(args: list[str], needles: list[str]) -> None:
    assert_clean_usage_error(dvmmctl(*args), *needles)


def test_garbage_kernel(tmp_path: Path) -> None:
    k = tmp_path / "garbage.bin"
    k.write_bytes(os.urandom(3000).replace(b"\x7fELF", b"xxxx"))
    assert_clean_usage_error(dvmmctl("run", "--kernel", str(k)), str(k), "not a kernel image")


def test_empty_kernel(tmp_path: Path) -> None:
    k = tmp_path / "empty"
    k.write_bytes(b"")
    assert_clean_usage_error(dvmmctl("run", "--kernel", str(k)), "empty")


def test_missing_initrd(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(b"\x7fELF\x02" + b"\0" * 100)
    r = dvmmctl("run", "--kernel", str(k), "--initrd", str(tmp_path / "nope"))
    assert_clean_usage_error(r, "initrd", "does not exist")


def test_console_log_in_missing_directory(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(b"\x7fELF\x02" + b"\0" * 100)
    r = dvmmctl("run", "--kernel", str(k), "--console-log", str(tmp_path / "no" / "log"))
    assert_clean_usage_error(r, "console log", "does not exist")


def test_missing_bundled_guest_env(tmp_path: Path) -> None:
    r = dvmmctl("run", env={"DVMM_GUEST": str(tmp_path / "nothing-here")})
    assert_clean_usage_error(r, "DVMM_GUEST", "no such kernel file")


def test_unexpected_exception_is_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise RuntimeError("something broke")

    monkeypatch.setattr(doctor, "cmd_doctor", boom)
    monkeypatch.delenv("DVMM_DEBUG", raising=False)
    assert cli.main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert "dvmmctl: error: RuntimeError: something broke" in err
    assert "Traceback" not in err


def test_cli_error_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise CliError("no luck")

    monkeypatch.setattr(doctor, "cmd_doctor", fail)
    assert cli.main(["doctor"]) == 1
    assert "dvmmctl: error: no luck" in capsys.readouterr().err


def test_format_vcpu_dump_shapes() -> None:
    text = run_verb.format_vcpu_dump(
        {"vcpu": 1, "exit_reason": "SHUTDOWN", "regs": {"rip": 0x100020, "rsp": 0, "rflags": 2}}
    )
    assert "exit_reason: SHUTDOWN" in text
    assert "rip=0x100020" in text
    assert run_verb.format_vcpu_dump("just text").strip() == "just text"


def test_describe_result() -> None:
    assert run_verb.describe_result({"reason": "debug_exit", "status": 0}) is None
    assert "status 3" in str(run_verb.describe_result({"reason": "debug_exit", "status": 3}))
    crash = run_verb.describe_result(
        {"reason": "crash", "error": "triple fault", "vcpu_dump": {"regs": {"rip": 16}}}
    )
    assert crash is not None and "triple fault" in crash and "rip=0x10" in crash
    assert "30 s timeout" in str(run_verb.describe_result({"reason": "timeout"}, 30))
    assert "KVM said no" in str(
        run_verb.describe_result({"reason": "error", "error": "KVM said no"})
    )


def test_format_stats() -> None:
    text = run_verb.format_stats({"exits": {"io": 3, "mmio": 4}, "runtime_ns": 10})
    assert "exits.io" in text and "exits.mmio" in text and "runtime_ns" in text


def test_cluster_stats_table_summarizes_long_histograms() -> None:
    """The engine's HDR histogram (thousands of buckets) is a count in the daemon's
    stats table, not a column thousands of characters wide (``--json`` has it all)."""
    from dvmmd.cli import vms

    hdr = [[1000 + i, 1] for i in range(1500)]
    res = {
        "name": "vm",
        "state": "stopped",
        "reason": "debug_exit",
        "nodes": [{"node": "n1", "stats": {"dsm": {"latency_ns_hdr": hdr, "pages_sent": 7}}}],
    }
    text = vms.format_stats(res)
    assert max(len(line) for line in text.splitlines()) < 120, text[:300]
    assert "(1500 values, see --json)" in text
    assert "dsm.pages_sent" in text


def test_every_verb_takes_json() -> None:
    """--json on every verb (issue 14), the run and cluster sub-verbs included."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        if name == "cluster":
            inner = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
            parsers = list(inner.choices.values())
        else:
            parsers = [p]
        for q in parsers:
            assert any("--json" in a.option_strings for a in q._actions), q.prog


def test_one_default_socket() -> None:
    """dvmmctl's default socket is the daemon's default api.socket."""
    from dvmmd.cli.client import default_socket
    from dvmmd.config import DEFAULT_SOCKET, parse_config

    cfg = parse_config(
        '[node]\nname = "n"\nlisten = "127.0.0.1:1"\nstate_dir = "/var/lib/dvmmd"\n'
        '[cluster]\nsecret_file = "/s"\n'
    )
    assert str(cfg.api_socket) == DEFAULT_SOCKET
    env = os.environ.pop("DVMM_SOCKET", None)
    try:
        assert default_socket() == DEFAULT_SOCKET
    finally:
        if env is not None:
            os.environ["DVMM_SOCKET"] = env
