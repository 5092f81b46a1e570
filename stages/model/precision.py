"""Which precision a run uses on this machine: `train.precision: auto` takes bf16 only where the CPU computes it
natively and faster than fp32, by a rule on the CPU's flags that bench/precision.py verifies by timing both.

oneDNN reports bf16 support (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`) on every AVX-512 CPU, but without
bf16 units it emulates it: measured slower than fp32 on an Intel Xeon with AVX512-BF16 and no AMX (0.56-0.59x,
BENCHMARKS.md), 10-20x slower on AVX2-only CPUs. Native and fast: Intel with AMX (amx_bf16), AMD Zen 4/5
(avx512_bf16 on AuthenticAMD). A rule on flags, not a timing probe at start-up, so the same machine always makes
the same choice and a rerun gives the same bytes."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.base.runtime import log


@dataclass(frozen=True)
class CpuInfo:
    """What the precision rule reads about the CPU: its vendor id and its feature flags (from /proc/cpuinfo)."""
    vendor: str
    flags: frozenset[str]

    @classmethod
    def read(cls) -> "CpuInfo":
        vendor, flags = "", frozenset()
        try:
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
                if vendor and flags:
                    break
        except OSError:  # not Linux: no flags, so auto stays on fp32 (always correct, never emulated)
            vendor = platform.processor()
        return cls(vendor, flags)

    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware that beats fp32: AMX tiles, or AMD's AVX512-BF16 (Zen 4 and later)."""
        return "amx_bf16" in self.flags or (self.vendor == "AuthenticAMD" and "avx512_bf16" in self.flags)

    def describe(self) -> str:
        shown = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in self.flags]
        return f"{self.vendor or 'unknown vendor'} ({', '.join(shown) or 'no AVX2/AVX-512 flags'})"


def onednn_bf16() -> bool:
    """Whether torch's oneDNN runs bf16 at all on this CPU (natively or emulated)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str, device: torch.device, cpu: CpuInfo | None = None) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on `device`, or None for plain fp32. auto: bf16 on CUDA GPUs that
    support it (fp16 AMP on older ones) and on CPUs with native bf16 (CpuInfo.native_bf16); fp32 elsewhere."""
    if precision == "fp32" or device.type == "mps":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    cpu = cpu or CpuInfo.read()
    return torch.bfloat16 if cpu.native_bf16() and onednn_bf16() else None


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def warn_emulated_bf16(precision: str, device: torch.device, cpu: CpuInfo | None = None) -> None:
    """One line when bf16 is forced on a CPU that only emulates it (there it trains many times slower)."""
    cpu = cpu or CpuInfo.read()
    if precision == "bf16" and device.type == "cpu" and not cpu.native_bf16():
        log(f"warning: train.precision: bf16 on a CPU without native bf16 ({cpu.describe()}): it is emulated and "
            "runs slower than fp32 here; train.precision: auto picks the faster one")
