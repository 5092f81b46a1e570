"""The evaluate stage: metrics, per-class accuracy, predictions that agree with the model, TTA, bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from prepared_data import tiny_params, write_prepared
from stages.common import PipelineError, load_checkpoint, load_split, save_torch
from stages.config import load_params
from stages.evaluate import evaluate
from stages.models import infer, model_from_checkpoint
from stages.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    cwd = Path.cwd()
    try:
        import os
        os.chdir(root)
        write_prepared(root)
        tiny_params(root, **{"train.epochs": 3})
        train(load_params())
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.parametrize("tta", [1, 2, 6])
def test_metrics_and_predictions(trained: Path, monkeypatch: pytest.MonkeyPatch, tta: int) -> None:
    monkeypatch.chdir(trained)
    tiny_params(trained, **{"train.epochs": 3, "evaluate.tta": tta})
    evaluate(load_params())
    metrics = json.loads((trained / "metrics/test.json").read_text())
    assert set(metrics) == {"test"}
    assert 0.5 < metrics["test"]["acc"] <= 1.0 and metrics["test"]["loss"] > 0
    per_class = json.loads((trained / "metrics/per_class.json").read_text())["test"]["per_class_acc"]
    assert list(per_class) == [f"class{i}" for i in range(4)]
    with open(trained / "metrics/predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    images, labels = load_split(trained / "data/prepared/test.pt")
    assert len(rows) == len(labels) == 60
    accuracy = sum(r["actual"] == r["predicted"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(metrics["test"]["acc"], abs=1e-6)
    per_class_mean = sum(per_class.values()) / 4  # balanced classes: the mean of per-class accuracy is accuracy
    assert per_class_mean == pytest.approx(metrics["test"]["acc"], abs=1e-6)
    if tta == 1:  # the stored predictions are exactly the model's argmax
        checkpoint = load_checkpoint(trained / "models/model.pth")
        model = model_from_checkpoint(checkpoint)
        predicted = infer(model, images, batch_size=50).argmax(1)
        assert [checkpoint["classes"][i] for i in predicted.tolist()] == [r["predicted"] for r in rows]


def test_image_size_mismatch_is_explained(trained: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/model.pth").write_bytes((trained / "models/model.pth").read_bytes())
    save_torch({"images": torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "labels": torch.zeros(2, dtype=torch.long)},
               tmp_path / "data/prepared/test.pt")
    tiny_params(tmp_path)
    with pytest.raises(PipelineError, match="images are 16 px but the model was trained on 32 px"):
        evaluate(load_params())


def test_missing_model_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_prepared(tmp_path)
    tiny_params(tmp_path)
    with pytest.raises(PipelineError, match="models/model.pth: model checkpoint not found"):
        evaluate(load_params())


def test_predict_on_image_files_agrees_with_evaluate(trained: Path, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The predict command on test images saved as PNG files gives evaluate's top-1 class for each."""
    from PIL import Image

    from stages import predict

    monkeypatch.chdir(trained)
    tiny_params(trained, **{"train.epochs": 3, "evaluate.tta": 1})
    evaluate(load_params())
    with open(trained / "metrics/predictions.csv") as handle:
        expected = {int(r["index"]): r["predicted"] for r in csv.DictReader(handle)}
    images, _ = load_split(trained / "data/prepared/test.pt")
    for index in range(12):
        Image.fromarray(images[index].permute(1, 2, 0).numpy()).save(tmp_path / f"{index:02d}.png")
    capsys.readouterr()
    predict.main([str(trained / "models/model.pth"), str(tmp_path), "--format", "json", "--tta", "1"])
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 12
    for result in results:
        index = int(Path(result["file"]).stem)
        assert result["predictions"][0]["class"] == expected[index]
        assert sum(p["probability"] for p in result["predictions"]) <= 1.0 + 1e-6


@pytest.mark.parametrize("field, value, message", [
    ("classes", 4, "classes: expected a list of at least 2 distinct class names (text), got 4"),  # a TypeError
    ("model_config", {"channels": [8, 16]}, "model_config.channels: expected a list of at least 3 integers"),
])
def test_a_bad_checkpoint_stops_the_stage_with_one_line(tmp_path: Path, field: str, value: object,
                                                        message: str) -> None:
    """As a process: one `error:` line naming the checkpoint and its field, exit status 2, no traceback, and the
    previous metrics kept."""
    import os
    import subprocess
    import sys

    from repo_root import REPO_ROOT
    from stages.common import make_checkpoint
    from stages.models import build_model

    write_prepared(tmp_path)
    tiny_params(tmp_path)
    model = build_model("cnn", {"channels": [8, 16, 16]}, 4, 32, [0.5] * 3, [0.5] * 3)
    checkpoint = make_checkpoint(model="cnn", model_config={"channels": [8, 16, 16]},
                                 classes=[f"class{i}" for i in range(4)], image_size=32, mean=[0.5] * 3,
                                 std=[0.5] * 3, state_dicts=[model.state_dict()], train={})
    checkpoint[field] = value
    save_torch(checkpoint, tmp_path / "models/model.pth")
    metrics = tmp_path / "metrics/test.json"
    metrics.parent.mkdir()
    metrics.write_text('{"test": {"acc": 0.5}}\n')
    done = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: models/model.pth: {message}") and done.stderr.count("\n") == 1, \
        done.stderr
    assert metrics.read_text() == '{"test": {"acc": 0.5}}\n' and not (tmp_path / "metrics/predictions.csv").exists()
