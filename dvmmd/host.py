"""What kind of host this is: hardware virtualization (VT-x/AMD-V), KVM PVM, or none.

Cheap (only /proc/cpuinfo and /sys/module): the VM spec asks it for the default CPU
model and ``dvmmctl doctor`` (cli/doctor.py) reports it with its meaning.

- ``vmx`` / ``svm``: hardware virtualization (Intel VT-x / AMD-V); all guest
  code runs natively.
- ``pvm``: the PVM flavour of KVM (``kvm_pvm`` module; the CPU shows no VMX or
  SVM). Guest code at CPL3 runs natively, but CPL0, real-mode and
  protected-mode code is run by KVM's instruction emulator.
"""

from __future__ import annotations

import os
from pathlib import Path

PVM_MEANING = (
    "PVM flavour of KVM (kvm_pvm, no VMX/SVM): guest CPL3 code runs natively; "
    "guest CPL0, real-mode and protected-mode code is emulated (~500 ns per "
    "instruction, some instructions refused), so an unmodified Linux is "
    "impractical here; the bundled guest runs its work at CPL3"
)
HW_MEANING = "hardware virtualization ({}): all guest code runs natively"


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def host_kind(cpuinfo: str, modules: set[str], kvm_present: bool) -> tuple[str, str]:
    """Classify the host: ``vmx``, ``svm``, ``pvm``, ``none`` or ``unknown``.

    ``modules`` are the loaded module names under /sys/module that matter
    (``kvm_intel``, ``kvm_amd``, ``kvm_pvm``).
    """
    flags = _cpu_flags(cpuinfo)
    if "kvm_intel" in modules and "vmx" in flags:
        return "vmx", HW_MEANING.format("Intel VT-x")
    if "kvm_amd" in modules and "svm" in flags:
        return "svm", HW_MEANING.format("AMD-V")
    if "kvm_pvm" in modules:
        return "pvm", PVM_MEANING
    if not kvm_present:
        if "vmx" in flags or "svm" in flags:
            return "none", "the CPU has hardware virtualization but KVM is not available"
        return "none", "no KVM and no hardware virtualization"
    if "vmx" in flags:
        return "vmx", HW_MEANING.format("Intel VT-x")
    if "svm" in flags:
        return "svm", HW_MEANING.format("AMD-V")
    return "unknown", "/dev/kvm exists but the KVM flavour is not recognized"


def loaded_modules() -> set[str]:
    return {
        m for m in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm") if Path("/sys/module", m).exists()
    }


def current_host_kind(kvm_path: str = "/dev/kvm") -> str:
    """This host's kind (:func:`host_kind`), cheaply: no KVM ioctls, only /proc and /sys."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return host_kind(cpuinfo, loaded_modules(), os.path.exists(kvm_path))[0]
