"""The train stage on a tiny prepared dataset: every registry model learns, runs are bit-identical, a killed
run resumes to the same bytes, a stale resume file is ignored, divergence stops cleanly, and the schedule has
the promised values."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prepared_data import REPO_ROOT, tiny_params, write_prepared
from stages.common import PipelineError, load_checkpoint
from stages.config import load_params
from stages.train import lr_factor, train


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def history(root: Path) -> list[dict[str, str]]:
    with open(root / "metrics" / "history.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_prepared(tmp_path)
    return tmp_path


@pytest.mark.parametrize("model, overrides", [
    ("mlp", {"train.mlp.hidden": [64], "train.lr": 0.05}),
    ("cnn", {}),
    ("airnet", {"train.airnet.widths": [16, 32, 32], "train.lr": 0.2, "train.bias_lr_scale": 4.0,
                "train.averaging": "ema", "train.averaging_decay": 0.9, "train.averaging_start": 0.0}),
    ("airnet", {"train.airnet.widths": [16, 32, 32], "train.lr": 0.2, "train.averaging": "lookahead",
                "train.averaging_start": 1.0}),
])
def test_each_model_learns_and_writes_a_self_describing_checkpoint(workdir: Path, model: str,
                                                                   overrides: dict) -> None:
    tiny_params(workdir, **{"train.model": model, "train.epochs": 3, **overrides})
    train(load_params())
    rows = history(workdir)
    assert len(rows) == 3
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["val_acc"]) > 0.5  # 4 classes: chance is 0.25
    checkpoint = load_checkpoint(workdir / "models" / "model.pth")
    assert checkpoint["model"] == model and checkpoint["classes"] == [f"class{i}" for i in range(4)]
    assert checkpoint["train"]["epochs"] == 3 and checkpoint["image_size"] == 32
    assert not (workdir / "models" / "resume").exists()
    assert {"train", "val", "epochs"} <= set(__import__("json").loads((workdir / "metrics/train.json").read_text()))


def test_two_runs_are_bit_identical(workdir: Path) -> None:
    tiny_params(workdir, **{"train.model": "airnet", "train.airnet.widths": [8, 16, 16],
                            "train.averaging": "lookahead", "train.averaging_start": 1.0})
    outputs = ["models/model.pth", "metrics/history.csv", "metrics/train.json"]
    train(load_params())
    first = [md5(workdir / p) for p in outputs]
    train(load_params())
    assert [md5(workdir / p) for p in outputs] == first


def test_divergence_stops_with_epoch_and_step_and_saves_nothing(workdir: Path) -> None:
    tiny_params(workdir, **{"train.model": "mlp", "train.mlp.hidden": [32], "train.lr": 1.0e12,
                            "train.warmup_epochs": 0})
    with pytest.raises(PipelineError, match=r"training diverged: loss is (nan|inf) at epoch 1, step \d+.*train.lr"):
        train(load_params())
    assert not (workdir / "models" / "model.pth").exists()


def test_batch_larger_than_data_is_refused(workdir: Path) -> None:
    tiny_params(workdir, **{"train.batch_size": 1000})
    with pytest.raises(PipelineError, match="train.batch_size: 1000 is larger than the training split"):
        train(load_params())


def test_stale_resume_file_is_ignored(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_params(workdir)
    resume = workdir / "models" / "resume" / "train.pt"
    resume.parent.mkdir(parents=True)
    torch.save({"fingerprint": "other run", "epoch": 1}, resume)
    train(load_params())
    assert "ignoring models/resume/train.pt" in capsys.readouterr().out


def stage(root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_training_resumes_to_identical_bytes(workdir: Path) -> None:
    tiny_params(workdir, **{"train.model": "airnet", "train.airnet.widths": [8, 16, 16], "train.epochs": 4,
                            "train.averaging": "lookahead", "train.averaging_start": 1.0})
    assert stage(workdir).wait(timeout=300) == 0
    reference = md5(workdir / "models" / "model.pth")
    (workdir / "models" / "model.pth").unlink()

    process = stage(workdir)
    resume = workdir / "models" / "resume" / "train.pt"
    deadline = time.time() + 120
    while not resume.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert resume.exists(), "no resume checkpoint appeared"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (workdir / "models" / "model.pth").exists()

    rerun = stage(workdir)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert "resuming after epoch" in output
    assert md5(workdir / "models" / "model.pth") == reference


def test_schedule_values_at_known_steps() -> None:
    assert lr_factor(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "linear") == 0.0
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(99, 100, 0, "constant") == 1.0


@pytest.mark.slow
def test_two_processes_match_one_process(workdir: Path) -> None:
    """DistributedDataParallel with gloo on 2 CPU processes: same global batch and seed as one process; the
    model differs only by floating-point summation order and per-rank BatchNorm statistics."""
    tiny_params(workdir, **{"train.model": "mlp", "train.mlp.hidden": [64], "train.epochs": 3, "train.lr": 0.05})
    assert stage(workdir).wait(timeout=300) == 0
    single = history(workdir)
    tiny_params(workdir, **{"train.model": "mlp", "train.mlp.hidden": [64], "train.epochs": 3, "train.lr": 0.05,
                            "train.nproc": 2})
    process = stage(workdir)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert "2 processes" in output
    double = history(workdir)
    for a, b in zip(single, double):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) < 1e-3
        assert abs(float(a["val_acc"]) - float(b["val_acc"])) <= 0.05


def test_fine_tuning_from_pretrained_weights_with_frozen_backbone(workdir: Path) -> None:
    from torchvision.models import resnet18
    torch.manual_seed(42)
    weights = resnet18(num_classes=1000).state_dict()
    (workdir / "models" / "pretrained").mkdir(parents=True)
    torch.save(weights, workdir / "models" / "pretrained" / "resnet18.pth")
    tiny_params(workdir, **{"train.model": "resnet18", "train.resnet18.input_size": 32, "train.epochs": 1,
                            "train.pretrained": "models/pretrained/resnet18.pth", "train.freeze_backbone": True,
                            "train.lr": 0.05})
    train(load_params())
    checkpoint = load_checkpoint(workdir / "models" / "model.pth")
    state = checkpoint["state_dict"]
    for name in ("conv1.weight", "layer4.1.conv2.weight", "layer1.0.bn1.running_mean", "bn1.bias"):
        assert torch.equal(state[f"net.resnet.{name}"], weights[name]), f"{name} changed although frozen"
    assert state["net.resnet.fc.weight"].shape == (4, 512)
    assert checkpoint["pretrained"]["path"] == "models/pretrained/resnet18.pth"
    assert len(checkpoint["pretrained"]["sha256"]) == 64


def test_pretrained_weights_must_live_where_dvc_tracks_them(workdir: Path) -> None:
    from stages.config import ParamsError
    tiny_params(workdir, **{"train.model": "resnet18", "train.pretrained": "/tmp/resnet18.pth"})
    with pytest.raises(ParamsError, match="must be a file under models/pretrained/"):
        load_params()


def test_lookahead_keeps_training_with_few_steps_per_epoch(workdir: Path) -> None:
    """One step per epoch: the end-of-epoch pull-back must blend the new step in, not throw it away."""
    tiny_params(workdir, **{"train.model": "airnet", "train.airnet.widths": [8, 16, 16], "train.batch_size": 240,
                            "train.epochs": 6, "train.averaging": "lookahead", "train.averaging_start": 1.0,
                            "train.warmup_epochs": 0, "train.lr": 0.2})
    train(load_params())
    val_losses = [row["val_loss"] for row in history(workdir)]
    assert len(set(val_losses[1:])) == len(val_losses[1:]), f"epochs without progress: {val_losses}"
