"""Presets (presets/*.yaml) and their command, tools/preset.py: every preset is valid params, every mention of one
names a file, the command refuses what it cannot apply, and each preset runs by its command end to end."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.base.config import set_dotted, validate
from stages.base.runtime import ParamsError

from pipeline_repo import Baseline, PipelineRepo
from repo_root import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))
import preset  # noqa: E402  (tools/ is not a package)

PRESETS = preset.preset_names()
DEFAULTS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
# Where presets are named: `tools/preset.py NAME`, `presets/NAME.yaml` and the benchmark's `read_preset("NAME")`.
MENTIONS = re.compile(r"tools/preset\.py\s+(?:--print\s+)?([a-z][\w-]*)|presets/([\w-]+)\.yaml"
                      r"|read_preset\(\"([\w-]+)\"\)")
DOCUMENTS = ("README.md", "BENCHMARKS.md", "bench/time_to_accuracy.py")


def test_the_presets_are_there() -> None:
    assert {"seed", "fc", "airnet", "airnet-fast", "transfer"} <= set(PRESETS), PRESETS
    assert preset.read_preset("seed")["train.model"] == "mlp"  # the seed tutorial's FC net
    # airnet goes back from airnet-fast: the same keys, at params.yaml's values
    fast, default = preset.read_preset("airnet-fast"), preset.read_preset("airnet")
    assert set(fast) == set(default)
    for dotted, value in default.items():
        node = DEFAULTS
        for key in dotted.split("."):
            node = node[key]
        assert value == node and type(value) is type(node), dotted


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_valid_params_as_its_command_sets_them(name: str) -> None:
    """The command's `-S key=value` pairs, read as `dvc exp run -S` reads them, merged into params.yaml."""
    assert preset.description(name), f"presets/{name}.yaml: the first line should be a comment describing it"
    args = preset.override_args(name)
    pairs = [arg.split("=", 1) for arg in args[1::2]]
    assert args[::2] == ["-S"] * len(pairs) and pairs
    params = copy.deepcopy(DEFAULTS)
    try:
        for key, value in pairs:
            set_dotted(params, key, yaml.safe_load(value.strip("'")))
        validate(params)
    except ParamsError as error:
        pytest.fail(f"presets/{name}.yaml: {error}")
    assert params == preset.check_preset(name)


def test_every_mention_of_a_preset_names_a_file() -> None:
    mentioned: set[str] = set()
    for document in DOCUMENTS:
        for match in MENTIONS.finditer((REPO_ROOT / document).read_text(encoding="utf-8")):
            name = next(group for group in match.groups() if group)
            assert name in PRESETS, f"{document} names preset {name!r}, but presets/{name}.yaml does not exist"
            mentioned.add(name)
    assert set(PRESETS) <= mentioned, f"presets no document names: {sorted(set(PRESETS) - mentioned)}"


def test_print_shows_the_dvc_command_with_extra_arguments_last(capsys: pytest.CaptureFixture) -> None:
    assert preset.main(["--print", "airnet-fast", "-S", "train.seed=1", "--queue"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("dvc exp run -S ") and printed.endswith("-S train.seed=1 --queue"), printed
    assert "-S train.averaging_start=30%" in printed and "'train.airnet.widths=[48,192,192]'" in printed


def test_list_shows_every_preset_with_its_description(capsys: pytest.CaptureFixture) -> None:
    assert preset.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == PRESETS
    assert all(len(line.split()) > 3 for line in lines), lines


def test_unknown_preset_is_refused_naming_the_presets() -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools/preset.py"), "no-such-preset"], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert done.returncode == 2, done
    assert "no preset 'no-such-preset' (presets/no-such-preset.yaml does not exist)" in done.stderr
    assert "airnet-fast" in done.stderr


@pytest.mark.parametrize("content, message", [
    ("train:\n  lrr: 0.1\n", "presets/bad.yaml: train.lrr: no such key in params.yaml"),
    ("training:\n  lr: 0.1\n", "presets/bad.yaml: training: no such section in params.yaml (setting training.lr)"),
    ("train:\n  lr: -1\n", "presets/bad.yaml: train.lr: expected a value > 0, got -1"),
    ("train:\n  averaging_start: 130%\n", "presets/bad.yaml: train.averaging_start: '130%': expected"),
    ("train:\n  lr: 1.0e-5\n", "presets/bad.yaml: train.lr: 1e-05 does not survive dvc exp run -S"),
])
def test_bad_preset_is_refused_before_dvc_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture, content: str, message: str) -> None:
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets/bad.yaml").write_text(f"# a broken preset\n{content}", encoding="utf-8")
    monkeypatch.setattr(preset, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(preset, "PRESETS_DIR", tmp_path / "presets")
    monkeypatch.setattr(preset.subprocess, "call", lambda *a, **k: pytest.fail(f"dvc ran: {a}"))
    assert preset.main(["bad"]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- each preset by its command, end to end

# After the preset, on the command line: the baseline's tiny data and a run of seconds (a later -S wins).
TINY_DATA = {"data.source": "synthetic", "data.synthetic.train_size": 300, "data.synthetic.test_size": 100,
             "report.samples": 4}
TINY_RUN: dict[str, dict[str, Any]] = {
    "seed": {"train.epochs": 1},
    "fc": {"train.epochs": 2, "train.batch_size": 256},
    "airnet": {"train.epochs": 2, "train.batch_size": 256, "train.airnet.widths": [8, 16, 16]},
    "airnet-fast": {"train.epochs": 3, "train.batch_size": 256, "train.airnet.widths": [8, 16, 16]},
    "transfer": {"train.epochs": 2, "train.batch_size": 64, "train.efficientnet_lite0.input_size": 32,
                 "export.check_images": 16},
    "transfer-fast": {"train.efficientnet_lite0.input_size": 32, "export.check_images": 16},
    "offline": {"train.epochs": 2, "train.batch_size": 256},
}


def comments(text: str) -> list[str]:
    return [line.split("#", 1)[1].strip() for line in text.splitlines() if "#" in line]


def shown_value(shown: Any) -> Any:
    """A value as `dvc params diff --json` shows it: lists come as their text, "[8, 16, 16]"."""
    return yaml.safe_load(shown) if isinstance(shown, str) and shown.startswith("[") else shown


@pytest.fixture(scope="module")
def preset_repo(baseline: Baseline, tmp_path_factory: pytest.TempPathFactory) -> PipelineRepo:
    """The baseline with the repository's own params.yaml (comments and all), the presets and their command, and
    EfficientNet-Lite0's ImageNet weights (from the transfer extra's package) where the transfer presets look."""
    from test_transfer import package_weights

    repo = baseline.repo.copy_to(tmp_path_factory.mktemp("presets") / "repo")
    shutil.copy(REPO_ROOT / "params.yaml", repo.path / "params.yaml")
    shutil.copytree(REPO_ROOT / "presets", repo.path / "presets")
    (repo.path / "tools").mkdir()
    shutil.copy(REPO_ROOT / "tools/preset.py", repo.path / "tools/preset.py")
    for name in ("transfer", "transfer-fast"):
        pretrained = repo.path / preset.read_preset(name)["train.pretrained"]
        pretrained.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package_weights(), pretrained)
    repo.commit("the repository's params.yaml and the presets")
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_by_its_command(preset_repo: PipelineRepo, tmp_path: Path, name: str) -> None:
    from stages.model.checkpoint import load_checkpoint

    repo = preset_repo.copy_to(tmp_path / "repo")
    overrides = {**TINY_DATA, **TINY_RUN.get(name, {})}
    extra = [arg for dotted, value in overrides.items() for arg in ("-S", f"{dotted}={preset.override_value(value)}")]
    before = (repo.path / "params.yaml").read_text(encoding="utf-8")
    done = repo.run(sys.executable, "tools/preset.py", name, *extra)
    assert "Running stage 'train'" in done.stdout and "Running stage 'evaluate'" in done.stdout, done.stdout

    after = (repo.path / "params.yaml").read_text(encoding="utf-8")
    assert comments(after) == comments(before), after
    expected = {**preset.read_preset(name), **overrides}
    diff = json.loads(repo.dvc("params", "diff", "--json").output).get("params.yaml", {})
    for dotted, value in expected.items():
        default: Any = DEFAULTS
        for key in dotted.split("."):
            default = default[key]
        if value != default:
            assert shown_value(diff.get(dotted, {}).get("new")) == value, f"{dotted}: {diff.get(dotted)}"
    assert json.loads((repo.path / "metrics/test.json").read_text())["test"]
    model = expected.get("train.model", DEFAULTS["train"]["model"])
    assert load_checkpoint(repo.path / "models/model.pth")["model"] == model
