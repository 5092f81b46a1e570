"""Hostile or mistaken YAML in every entry point that reads it (params.yaml through the stages, presets through
tools/preset.py): one `error:` line naming the file or key, short whatever the value's size, fast, and nothing run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from repo_root import REPO_ROOT
from stages.base.config import load_params
from stages.base.runtime import ParamsError, brief
from stages.base.yamlfile import MAX_VALUES, expanded_size

BILLION_LAUGHS = "".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n']
    + [f"{new}: &{new} [{', '.join(['*' + old] * 9)}]\n" for old, new in zip("abcdefgh", "bcdefghi")])


def params_text(**replace: str) -> str:
    text = (REPO_ROOT / "params.yaml").read_text(encoding="utf-8")
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new, 1)
    return text


def run_stage(tmp_path: Path, stage: str = "download") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_duplicated_key_is_refused_by_name_as_dvc_does(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(params_text(**{"  epochs: 22": "  epochs: 22\n  epochs: 3"}))
    line = one_error_line(run_stage(tmp_path, "train"))
    assert "key 'epochs' is written twice" in line and "params.yaml" in line
    assert not (tmp_path / "models").exists()


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(params_text() + BILLION_LAUGHS)
    start = time.perf_counter()
    line = one_error_line(run_stage(tmp_path))
    assert "aliases (*name) expand to more than" in line
    assert time.perf_counter() - start < 30  # it grew past 1.5 GB in 30 s before


@pytest.mark.parametrize(("length", "expected"), [(200_000, "error: data.source: expected"),
                                                   (10_000_000, "error: params.yaml: 10,00")])
def test_a_huge_value_gives_a_short_message(tmp_path: Path, length: int, expected: str) -> None:
    """A long value is named by its key and shortened; a params file of megabytes is refused by its size."""
    (tmp_path / "params.yaml").write_text(params_text(**{"source: cifar10": f"source: {'x' * length}"}))
    line = one_error_line(run_stage(tmp_path))
    assert line.startswith(expected) and len(line) < 400


@pytest.mark.parametrize("baseline", ["x" * 200_000, "--output=/tmp/evil", "main;rm"])
def test_report_baseline_is_checked_like_every_key(tmp_path: Path, baseline: str) -> None:
    (tmp_path / "params.yaml").write_text(params_text(**{"baseline: main": f"baseline: '{baseline}'"}))
    with pytest.raises(ParamsError, match=r"^report\.baseline: expected null or a git revision") as error:
        load_params(tmp_path / "params.yaml")
    assert len(str(error.value)) < 400


def test_expanded_size_counts_shared_values_without_expanding_them() -> None:
    bomb = yaml.safe_load(BILLION_LAUGHS)
    start = time.perf_counter()
    assert expanded_size(bomb) > MAX_VALUES
    assert brief(bomb).endswith("...]}") or len(brief(bomb)) < 200
    assert time.perf_counter() - start < 1
    assert expanded_size({"a": [1, 2, {"b": 3}]}) == 6


@pytest.mark.parametrize("name", ["/abs/path/evil", "../../somewhere/evil", "presets/fc", "fc.yaml", ""])
def test_a_preset_is_a_plain_name_in_presets(name: str) -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "preset.py"), "--print", name],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout
    assert "Traceback" not in done.stderr and done.stderr.count("\n") <= 2  # argparse's usage line for ''


def test_a_preset_alias_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import preset

    monkeypatch.setattr(preset, "PRESETS_DIR", tmp_path)
    monkeypatch.setattr(preset, "REPO_ROOT", tmp_path.parent)
    (tmp_path / "bomb.yaml").write_text(BILLION_LAUGHS)
    with pytest.raises(preset.PresetError, match=r"bomb.yaml: its aliases \(\*name\) expand to more than"):
        preset.read_preset("bomb")
