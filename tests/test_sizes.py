"""Size parsing: dvmmd.sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dvmmd.vm.sizes import (
    MAX_GUEST_MEMORY,
    MIN_GUEST_MEMORY,
    SizeError,
    format_size,
    parse_guest_memory,
    parse_size,
)

K, M, G, T = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("4096B", 4096),
        ("4k", 4 * K),
        ("4K", 4 * K),
        ("4KiB", 4 * K),
        ("4kb", 4 * K),
        ("256M", 256 * M),
        ("256m", 256 * M),
        ("256MiB", 256 * M),
        ("256MB", 256 * M),
        ("1G", G),
        ("1g", G),
        ("1GiB", G),
        ("1.5G", 3 * G // 2),
        ("0.5M", M // 2),
        (".5M", M // 2),
        ("2T", 2 * T),
        (" 64M ", 64 * M),
        ("64 M", 64 * M),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "M", "abc", "12X", "1.2.3M", "-1M", "+1M", "1e6", "0x100", "1M2", "1 G B", "1.0000001K",
     "1.5", "NaN", "inf", "256 megabytes"],
)  # fmt: skip
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(SizeError) as e:
        parse_size(text)
    assert repr(text) in str(e.value)


def test_parse_size_rejects_non_strings() -> None:
    with pytest.raises(SizeError):
        parse_size(256)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (1, "1B"), (4096, "4K"), (256 * M, "256M"), (G, "1G"), (3 * G // 2, "1536M"),
     (T, "1T"), (4097, "4097B")],
)  # fmt: skip
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@given(st.integers(min_value=0, max_value=2**50))
def test_format_parse_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=2**20), st.sampled_from(["K", "M", "G", "KiB", "MB"]))
def test_units_are_binary(n: int, unit: str) -> None:
    mult = {"K": K, "KiB": K, "M": M, "MB": M, "G": G}[unit]
    assert parse_size(f"{n}{unit}") == n * mult


def test_guest_memory_accepts() -> None:
    assert parse_guest_memory("16M") == MIN_GUEST_MEMORY
    assert parse_guest_memory("256M") == 256 * M
    assert parse_guest_memory("1G") == G
    assert parse_guest_memory(str(20 * M + 4096)) == 20 * M + 4096


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("1000", "multiple of the 4 KiB page size"),
        ("16777217", "multiple of the 4 KiB page size"),
        ("1.5K", "multiple of the 4 KiB page size"),
        ("8M", "too small"),
        ("0", "too small"),
        ("65T", "too large"),
        ("twelve", "invalid size"),
    ],
)
def test_guest_memory_rejects(text: str, words: str) -> None:
    with pytest.raises(SizeError) as e:
        parse_guest_memory(text)
    assert words in str(e.value)


def test_limits_are_sane() -> None:
    assert MIN_GUEST_MEMORY % 4096 == 0
    assert MAX_GUEST_MEMORY % 4096 == 0
    assert MIN_GUEST_MEMORY < MAX_GUEST_MEMORY
