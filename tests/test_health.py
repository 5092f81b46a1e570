"""The training health check: a model that predicts (nearly) one class, or whose validation accuracy sits at chance
while training accuracy rises, is warned about in the log, metrics/train.json, metrics/test.json and the report;
a healthy run's files keep their bytes (no warnings key at all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prepared_data import tiny_params, train_tiny
from stages.model.health import ADVICE, chance_warning, one_class_warning
from stages.model.checkpoint import load_checkpoint
from stages.model.tensors import save_torch

CLASSES = ["cat", "dog", "frog", "ship"]


def test_one_class_predictions_are_named() -> None:
    labels = [0, 1, 2, 3] * 25
    warning = one_class_warning("test", labels, [2] * 97 + [0, 1, 3], CLASSES)
    assert warning == (f"the model predicts class 'frog' for 97% of the 100 test images (it is 25% of them): it has "
                       f"collapsed to (nearly) one class; {ADVICE}")
    assert one_class_warning("test", labels, labels, CLASSES) is None  # healthy
    assert one_class_warning("test", labels, [2] * 80 + [0] * 20, CLASSES) is None  # below the share
    # a split that is nearly all one class in truth: predicting it is no collapse
    assert one_class_warning("test", [0] * 95 + [1] * 5, [0] * 100, CLASSES) is None
    assert one_class_warning("test", [], [], CLASSES) is None
    assert one_class_warning("test", [0, 1, 0, 1], [0, 0, 0, 0], CLASSES) is None  # 4 images prove nothing


def test_validation_at_chance_while_training_rises_is_named() -> None:
    val_labels = [0] * 30 + [1] * 20 + [2] * 25 + [3] * 25  # chance: the largest class's share, 0.30
    stuck = [{"val_acc": 0.30, "train_acc": 0.40}, {"val_acc": 0.31, "train_acc": 0.90}]
    assert chance_warning(stuck, val_labels) == (
        f"validation accuracy 0.310 is at chance (0.300, the largest class's share) while training accuracy rose to "
        f"0.900: the model does not generalize; {ADVICE}")
    assert chance_warning([{"val_acc": 0.8, "train_acc": 0.9}], val_labels) is None
    assert chance_warning([{"val_acc": 0.3, "train_acc": 0.35}], val_labels) is None  # nothing learnt yet either
    assert chance_warning([{"val_acc": None, "train_acc": 0.9}], []) is None  # no validation split
    # 12 validation images: 0.5 against 0.92 is within the noise of so few (the warning would cry wolf)
    assert chance_warning([{"val_acc": 0.5, "train_acc": 0.92}], [0] * 6 + [1] * 4 + [2] * 2) is None


def collapse(checkpoint_path: Path, favourite: int) -> None:
    """Make the trained cnn answer `favourite` for every image: its last layer's weights zero, one bias high."""
    checkpoint = load_checkpoint(checkpoint_path)
    state = checkpoint["state_dicts"][0]
    head = max(name for name in state if name.endswith(".weight") and state[name].dim() == 2)
    state[head] = torch.zeros_like(state[head])
    bias = torch.zeros_like(state[head.replace("weight", "bias")])
    bias[favourite] = 10.0
    state[head.replace("weight", "bias")] = bias
    save_torch(checkpoint, checkpoint_path)


def test_a_collapsed_model_is_warned_about_in_evaluate_and_the_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from stages import report
    from stages.base.config import load_params
    from stages.evaluate import evaluate

    train_tiny(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    tiny_params(tmp_path, **{"report.baseline": None, "report.samples": 4})
    evaluate(load_params())
    healthy = json.loads(Path("metrics/test.json").read_text())["test"]
    assert "warnings" not in healthy and "warnings" not in json.loads(Path("metrics/train.json").read_text())
    collapse(Path("models/model.pth"), favourite=1)
    capsys.readouterr()
    evaluate(load_params())
    test = json.loads(Path("metrics/test.json").read_text())["test"]
    assert test["warnings"] == [one_class_warning("test", [0, 1, 2, 3] * 15, [1] * 60, ["class0", "class1", "class2",
                                                                                        "class3"])]
    assert "warning: the model predicts class 'class1' for 100% of the 60 test images" in capsys.readouterr().out
    report.main()
    text = Path("reports/report.md").read_text()
    assert "## Warnings" in text and "**Warning.** Evaluation: the model predicts class 'class1'" in text


def test_train_warns_when_the_kept_model_predicts_one_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import stages.train as train_module

    def one_class_logits(model: torch.nn.Module, run: object) -> torch.Tensor:
        labels = run.val_labels  # type: ignore[attr-defined]
        logits = torch.zeros(len(labels), 4)
        logits[:, 3] = 1.0
        return logits

    monkeypatch.setattr(train_module, "validation_logits", one_class_logits)  # every epoch's validation too
    train_tiny(tmp_path)
    metrics = json.loads((tmp_path / "metrics" / "train.json").read_text())
    chance, one_class = metrics["warnings"]
    assert chance.startswith("validation accuracy 0.250 is at chance (0.250, the largest class's share) while "
                             "training accuracy rose to")
    assert one_class.startswith("the model predicts class 'class3' for 100% of the 40 validation images")
    out = capsys.readouterr().out
    assert "warning: validation accuracy 0.250 is at chance" in out and "warning: the model predicts class" in out
