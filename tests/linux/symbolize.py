"""Turn `dvmm-profile` lines (DVMM_PROFILE=N, rust/src/vcpu/profile.rs) into
kernel symbols: per window, the functions the vCPU's timer ticks landed in.

    symbolize.py SYMBOLS LOG [--offset HEX]

SYMBOLS is `nm -n` output of the guest kernel (Debian's vmlinuz has no
System.map: decompress its payload and run vmlinux-to-elf, which rebuilds an
ELF from the kernel's own kallsyms). Boot with `nokaslr`, or give the KASLR
slide as --offset.
"""

from __future__ import annotations

import argparse
import bisect
import re
from collections import Counter
from pathlib import Path

LINE = re.compile(r"dvmm-profile vcpu=(\d+) t=([\d.]+) (.*)")


def load_symbols(path: Path) -> tuple[list[int], list[str]]:
    addrs: list[int] = []
    names: list[str] = []
    for ln in path.read_text().splitlines():
        parts = ln.split()
        if len(parts) == 3 and parts[1].lower() in "tw":
            addrs.append(int(parts[0], 16))
            names.append(parts[2])
    return addrs, names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("symbols", type=Path)
    ap.add_argument("log", type=Path)
    ap.add_argument("--offset", default="0", help="KASLR slide (hex)")
    a = ap.parse_args()
    addrs, names = load_symbols(a.symbols)
    slide = int(a.offset, 16)
    total: Counter[str] = Counter()
    for ln in a.log.read_text(errors="replace").splitlines():
        m = LINE.search(ln)
        if not m:
            continue
        per: Counter[str] = Counter()
        for item in m.group(3).split():
            rip_s, n_s = item.split("=")
            rip = int(rip_s, 16) - slide
            i = bisect.bisect_right(addrs, rip) - 1
            name = (
                names[i] if i >= 0 and rip < (1 << 64) and rip >= 0xFFFF_8000_0000_0000 else "user"
            )
            per[name] += int(n_s)
        total.update(per)
        top = ", ".join(f"{k} {v}" for k, v in per.most_common(6))
        print(f"vcpu{m.group(1)} t={m.group(2)}: {top}")
    print("total:", ", ".join(f"{k} {v}" for k, v in total.most_common(25)))


if __name__ == "__main__":
    main()
