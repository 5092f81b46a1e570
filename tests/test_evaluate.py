"""The evaluate stage: metrics (each checked against scikit-learn), per-class scores, predictions that agree with
the model, TTA, bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as sklearn_metrics  # a test dependency only (pyproject's `test` extra)

from stages.base.config import load_params
from stages.base.runtime import ParamsError, PipelineError
from stages.evaluate import evaluate, expected_calibration_error, summary_metrics
from stages.model.checkpoint import load_checkpoint
from stages.model.nets import infer, model_from_checkpoint
from stages.model.scores import class_scores, confusion_counts, macro_f1
from stages.model.tensors import load_split, save_torch

from prepared_data import tiny_params, train_tiny, write_prepared


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    train_tiny(root)
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
    # the new keys come after the old ones; 4 classes <= evaluate.top_k (5): no top-5 accuracy
    assert list(metrics["test"]) == ["loss", "acc", "macro_f1", "balanced_accuracy", "ece"]
    assert_files_match_scikit_learn(trained, rows, metrics["test"])
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

    from stages.model.checkpoint import make_checkpoint
    from stages.model.nets import build_model

    from repo_root import REPO_ROOT

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


# ---------------------------------------------------------------- the metrics against scikit-learn

def assert_files_match_scikit_learn(root: Path, rows: list[dict[str, str]], test: dict[str, float]) -> None:
    """test.json, per_class.json and per_class.csv, as written, against scikit-learn on predictions.csv."""
    actual, predicted = [r["actual"] for r in rows], [r["predicted"] for r in rows]
    assert test["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(actual, predicted, average="macro", zero_division=0), abs=1e-6)
    assert test["balanced_accuracy"] == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(actual, predicted), abs=1e-6)
    classes = [f"class{i}" for i in range(4)]
    expected = sklearn_metrics.precision_recall_fscore_support(actual, predicted, labels=classes, zero_division=0)
    document = json.loads((root / "metrics/per_class.json").read_text())["test"]
    assert list(document) == ["per_class_acc", "per_class_precision", "per_class_recall", "per_class_f1",
                              "per_class_support"]
    with open(root / "metrics/per_class.csv") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["class", "accuracy", "count", "precision", "recall", "f1", "support"]
    for key, values in zip(("precision", "recall", "f1", "support"), expected):
        assert list(document[f"per_class_{key}"].values()) == pytest.approx(values.tolist(), abs=1e-6)
        assert [float(r[key]) for r in table] == pytest.approx(values.tolist(), abs=1e-6)


def random_case(seed: int, num_classes: int = 7, images: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and labels where class 1 is never predicted, class 2 has no test images but is predicted,
    and class 3 neither has images nor is predicted (it counts in no average)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (images,), generator=generator)
    labels[(labels == 2) | (labels == 3)] = 0
    logits = torch.randn(images, num_classes, generator=generator) * 3
    logits[:, 1] -= 50  # never the top class, still in the top k
    logits[:, 3] -= 50
    logits[:8, 2] += 50  # a few images predicted as class 2, which has none
    return logits, labels


def reference_ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """The textbook definition, directly: bins (lo, hi] of the top-class probability, weighted |accuracy - conf|."""
    confidence, predicted = probabilities.max(1), probabilities.argmax(1)
    edges = np.arange(bins + 1) / bins
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = abs((predicted[inside] == labels[inside]).mean() - confidence[inside].mean())
            total += inside.mean() * gap
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_matches_scikit_learn(seed: int) -> None:
    logits, labels = random_case(seed)
    predicted = logits.argmax(1)
    scores = class_scores(confusion_counts(labels, predicted, logits.shape[1]))
    y_true, y_pred = labels.numpy(), predicted.numpy()
    assert 1 not in y_pred and 2 in y_pred and 2 not in y_true and 3 not in np.concatenate([y_true, y_pred])
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=range(logits.shape[1]), zero_division=0)
    np.testing.assert_allclose(scores.precision.numpy(), precision, atol=1e-12)
    np.testing.assert_allclose(scores.recall.numpy(), recall, atol=1e-12)
    np.testing.assert_allclose(scores.f1.numpy(), f1, atol=1e-12)
    assert scores.support.tolist() == support.tolist()
    assert scores.precision[1] == 0 and scores.recall[2] == 0 and scores.f1[3] == 0  # zero_division=0

    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        balanced = sklearn_metrics.balanced_accuracy_score(y_true, y_pred)
    metrics = summary_metrics(logits, labels, scores, top_k=5)
    assert list(metrics) == ["macro_f1", "balanced_accuracy", "top5_accuracy", "ece"]
    assert metrics["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-6)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced, abs=1e-6)
    assert metrics["top5_accuracy"] == pytest.approx(sklearn_metrics.top_k_accuracy_score(
        y_true, logits.numpy(), k=5, labels=range(logits.shape[1])), abs=1e-6)
    assert metrics["ece"] == pytest.approx(reference_ece(logits.softmax(1).double().numpy(), y_true), abs=1e-6)
    # the unrounded macro-F1 that train selects epochs by (train.monitor: val_macro_f1)
    assert macro_f1(labels, predicted, logits.shape[1]) == pytest.approx(
        sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_top_k_breaks_ties_as_scikit_learn(k: int) -> None:
    """Logits rounded to a coarse grid (as bf16 inference gives) tie often; the ranking must not depend on
    torch.topk's order among equal values."""
    generator = torch.Generator().manual_seed(k)
    logits = (torch.randn(500, 6, generator=generator) * 2).round()
    labels = torch.randint(0, 6, (500,), generator=generator)
    scores = class_scores(confusion_counts(labels, logits.argmax(1), 6))
    expected = sklearn_metrics.top_k_accuracy_score(labels.numpy(), logits.numpy(), k=k, labels=range(6))
    assert summary_metrics(logits, labels, scores, top_k=k)[f"top{k}_accuracy"] == pytest.approx(expected, abs=1e-6)


def test_top_k_is_left_out_with_no_more_classes_than_k() -> None:
    logits, labels = random_case(0, num_classes=5)
    scores = class_scores(confusion_counts(labels, logits.argmax(1), 5))
    assert "top5_accuracy" not in summary_metrics(logits, labels, scores, top_k=5)
    assert "top4_accuracy" in summary_metrics(logits, labels, scores, top_k=4)


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_matches_a_direct_reference(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.randn(1000, 10, generator=generator).mul(1.5).softmax(1).double()
    labels = torch.randint(0, 10, (1000,), generator=generator)
    confidence, predicted = probabilities.max(1)
    ece = expected_calibration_error(confidence, predicted == labels)
    assert ece == pytest.approx(reference_ece(probabilities.numpy(), labels.numpy()), abs=1e-12)
    # confidences exactly on the bin edges 1/15, 2/15, ... belong to the lower bin: (lo, hi]
    on_edges = torch.arange(1, 16, dtype=torch.float64) / 15
    hits = torch.ones(15, dtype=torch.bool)
    assert expected_calibration_error(on_edges, hits) == pytest.approx((1 - on_edges).mean().item(), abs=1e-12)


def test_perfect_predictions_score_one_and_zero_calibration_error_when_certain() -> None:
    labels = torch.arange(12) % 6
    logits = torch.nn.functional.one_hot(labels, 6).float() * 1000
    scores = class_scores(confusion_counts(labels, labels, 6))
    assert summary_metrics(logits, labels, scores, top_k=1) == {
        "macro_f1": 1.0, "balanced_accuracy": 1.0, "top1_accuracy": 1.0, "ece": 0.0}


@pytest.mark.parametrize("value, message", [
    (0, "evaluate.top_k: expected a value >= 1, got 0"),
    (2.5, "evaluate.top_k: expected an integer, got 2.5"),
    ("5", "evaluate.top_k: expected an integer, got '5'"),
])
def test_a_bad_top_k_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: object,
                                        message: str) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path, **{"evaluate.top_k": value})
    with pytest.raises(ParamsError, match=f"^{message}$"):
        load_params()


def test_written_metrics_of_an_untrained_model_match_scikit_learn(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with random weights makes many mistakes (unlike the trained fixture), so every written number
    is checked where it is not trivially 1; top-2 accuracy against the model's own logits."""
    from stages.model.checkpoint import make_checkpoint
    from stages.model.nets import build_model

    monkeypatch.chdir(tmp_path)
    write_prepared(tmp_path)
    tiny_params(tmp_path, **{"evaluate.top_k": 2})
    torch.manual_seed(3)
    model = build_model("cnn", {"channels": [8, 16, 16]}, 4, 32, [0.5] * 3, [0.5] * 3)
    save_torch(make_checkpoint(model="cnn", model_config={"channels": [8, 16, 16]},
                               classes=[f"class{i}" for i in range(4)], image_size=32, mean=[0.5] * 3, std=[0.5] * 3,
                               state_dicts=[model.state_dict()], train={}), tmp_path / "models/model.pth")
    evaluate(load_params())
    test = json.loads((tmp_path / "metrics/test.json").read_text())["test"]
    with open(tmp_path / "metrics/predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert test["acc"] < 0.9  # the case is not trivial
    assert_files_match_scikit_learn(tmp_path, rows, test)
    images, labels = load_split(tmp_path / "data/prepared/test.pt")
    logits = infer(model_from_checkpoint(load_checkpoint(tmp_path / "models/model.pth")), images, batch_size=50)
    assert test["top2_accuracy"] == pytest.approx(
        sklearn_metrics.top_k_accuracy_score(labels.numpy(), logits.numpy(), k=2, labels=range(4)), abs=1e-6)
    probabilities = logits.softmax(1).double().numpy()
    assert test["ece"] == pytest.approx(reference_ece(probabilities, labels.numpy()), abs=1e-6)


def test_top_k_below_the_class_count_is_written(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained)
    tiny_params(trained, **{"train.epochs": 3, "evaluate.top_k": 2})
    evaluate(load_params())
    test = json.loads((trained / "metrics/test.json").read_text())["test"]
    assert list(test) == ["loss", "acc", "macro_f1", "balanced_accuracy", "top2_accuracy", "ece"]
    assert test["acc"] <= test["top2_accuracy"] <= 1.0


# ---------------------------------------------------------------- the reliability diagram's data (calibration.csv)

@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_rows_match_scikit_learns_calibration_curve(seed: int) -> None:
    from sklearn.calibration import calibration_curve

    from stages.evaluate import calibration_rows

    logits, labels = random_case(seed)
    confidence, predicted = logits.softmax(1).max(1)
    correct = predicted == labels
    rows = calibration_rows(confidence, correct)
    accuracy, mean_confidence = calibration_curve(correct.numpy(), confidence.double().numpy(), n_bins=15)
    assert [float(r[5]) for r in rows] == pytest.approx(accuracy.tolist(), abs=1e-6)
    assert [float(r[4]) for r in rows] == pytest.approx(mean_confidence.tolist(), abs=1e-6)
    assert sum(r[3] for r in rows) == len(labels) and all(r[3] > 0 for r in rows)
    # the same bins as the ECE: it is the image-weighted mean gap of these rows
    gap = sum(r[3] * abs(float(r[5]) - float(r[4])) for r in rows) / len(labels)
    assert gap == pytest.approx(expected_calibration_error(confidence, correct), abs=1e-5)
    for number, lower, upper, _images, mean, _accuracy in rows:
        assert float(lower) == pytest.approx(number / 15, abs=1e-6) and float(lower) <= float(mean) <= float(upper)


def test_calibration_csv_is_written_with_the_predictions(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained)
    tiny_params(trained, **{"train.epochs": 3})
    evaluate(load_params())
    first = (trained / "metrics/calibration.csv").read_bytes()
    with open(trained / "metrics/calibration.csv") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["bin", "lower", "upper", "images", "confidence", "accuracy"]
    assert sum(int(r["images"]) for r in table) == 60
    with open(trained / "metrics/predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    right = sum(r["actual"] == r["predicted"] for r in rows)
    assert sum(int(r["images"]) * float(r["accuracy"]) for r in table) == pytest.approx(right, abs=1e-4)
    evaluate(load_params())
    assert (trained / "metrics/calibration.csv").read_bytes() == first  # deterministic
