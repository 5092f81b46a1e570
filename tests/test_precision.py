"""train.precision: auto picks bf16 only on CPUs that compute it natively (and so faster than fp32), whatever oneDNN
says it supports; a forced bf16 on a CPU that emulates it is warned about. The rule reads CPU flags, so it is
tested here for every host class with the flags stubbed, on any machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.model import precision
from stages.model.checkpoint import load_checkpoint
from stages.model.precision import CpuInfo, autocast_dtype, warn_emulated_bf16

CPU = torch.device("cpu")
HOSTS = {  # (vendor, flags) -> what auto must pick, measured in BENCHMARKS.md / shared notes for each class
    "AMD Zen 3 (AVX2 only)": (CpuInfo("AuthenticAMD", frozenset({"avx2", "fma"})), None),
    "AMD Zen 4 (AVX512-BF16)": (CpuInfo("AuthenticAMD", frozenset({"avx2", "avx512f", "avx512_bf16"})),
                                torch.bfloat16),
    "Intel without AMX (AVX512-BF16)": (CpuInfo("GenuineIntel", frozenset({"avx2", "avx512f", "avx512_bf16"})), None),
    "Intel with AMX": (CpuInfo("GenuineIntel", frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})),
                       torch.bfloat16),
    "unknown (no /proc/cpuinfo)": (CpuInfo("", frozenset()), None),
}


@pytest.mark.parametrize("host", list(HOSTS))
def test_auto_picks_bf16_only_where_it_is_native(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, expected = HOSTS[host]
    monkeypatch.setattr(precision, "onednn_bf16", lambda: True)  # oneDNN says yes on every AVX-512 CPU
    assert autocast_dtype("auto", CPU, cpu) is expected
    assert autocast_dtype("fp32", CPU, cpu) is None
    assert autocast_dtype("bf16", CPU, cpu) is torch.bfloat16  # a forced choice is honoured (and warned about)


def test_auto_stays_fp32_where_onednn_has_no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "onednn_bf16", lambda: False)
    assert autocast_dtype("auto", CPU, HOSTS["Intel with AMX"][0]) is None


def test_the_same_host_always_gets_the_same_choice() -> None:
    """No timing enters the choice, so a rerun on the same machine trains in the same precision (same bytes)."""
    assert len({autocast_dtype("auto", CPU) for _ in range(5)}) == 1


def test_forced_bf16_on_an_emulating_cpu_warns(capsys: pytest.CaptureFixture[str]) -> None:
    warn_emulated_bf16("bf16", CPU, HOSTS["Intel without AMX (AVX512-BF16)"][0])
    out = capsys.readouterr().out
    assert out.startswith("warning: train.precision: bf16 on a CPU without native bf16") and out.count("\n") == 1
    warn_emulated_bf16("bf16", CPU, HOSTS["AMD Zen 4 (AVX512-BF16)"][0])
    warn_emulated_bf16("auto", CPU, HOSTS["AMD Zen 3 (AVX2 only)"][0])
    assert capsys.readouterr().out == ""


def test_cpu_info_reads_this_machine() -> None:
    info = CpuInfo.read()
    assert isinstance(info.native_bf16(), bool) and info.describe()


def test_train_records_the_precision_it_used_and_warns_on_forced_emulated_bf16(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from prepared_data import tiny_params, train_tiny

    monkeypatch.setattr(CpuInfo, "read", classmethod(lambda cls: HOSTS["AMD Zen 3 (AVX2 only)"][0]))
    train_tiny(tmp_path, epochs=1)
    assert json.loads((tmp_path / "metrics/train.json").read_text())["precision"] == "fp32"  # auto on Zen 3
    assert load_checkpoint(tmp_path / "models/model.pth")["train"]["precision_used"] == "fp32"
    assert "warning: train.precision: bf16" not in capsys.readouterr().out
    tiny_params(tmp_path, **{"train.epochs": 1, "train.precision": "bf16"})
    monkeypatch.chdir(tmp_path)
    from stages.base.config import load_params
    from stages.train import train

    train(load_params())
    out = capsys.readouterr().out
    assert "warning: train.precision: bf16 on a CPU without native bf16 (AuthenticAMD (avx2))" in out
    assert json.loads((tmp_path / "metrics/train.json").read_text())["precision"] == "bf16"
