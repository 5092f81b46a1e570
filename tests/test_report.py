"""report stage on a tiny fake workspace: every input file is written here, the checkpoint is a plain dict of
the checkpoint's fields (the report never runs the model). Also: class names that pandas would misread, through
real evaluate and report runs, and a full disk while the report is written."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from stages import report
from stages.base.runtime import PipelineError, write_json
from stages.evaluate import calibration_rows, to_csv
from stages.model.checkpoint import load_checkpoint, make_checkpoint
from stages.model.tensors import save_torch

CLASSES = ["cat", "dog", "frog"]
PNGS = ["curves.png", "confusion.png", "per_class.png", "samples.png", "reliability.png", "top_losses.png"]


def write_workspace(root: Path, repo_root: Path, *, samples: int = 6, baseline: str | None = "main",
                    with_val: bool = True, test_acc: float = 0.5, pretrained: bool = True) -> None:
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["report"] = {"samples": samples, "baseline": baseline}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    generator = torch.Generator().manual_seed(0)
    n_test = 12
    labels = torch.arange(n_test) % len(CLASSES)
    images = torch.randint(0, 256, (n_test, 3, 8, 8), dtype=torch.uint8, generator=generator)
    (root / "data/prepared").mkdir(parents=True)
    save_torch({"images": images, "labels": labels}, root / "data/prepared/test.pt")
    write_json(root / "data/prepared/meta.json", {
        "classes": CLASSES, "image_size": 8, "stats": "dataset", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25],
        "splits": {"train": 30, "val": 6, "test": n_test},
        "counts": {"train": {c: 10 for c in CLASSES}, "val": {c: 2 for c in CLASSES}, "test": {c: 4 for c in CLASSES}},
        "source": {"kind": "images", "source": "data/sources/pets.zip", "sha256": "ab" * 32},
        "skipped": [{"file": "cat/broken.jpg", "reason": "cannot identify image file"}], "skipped_count": 1,
    })

    train_params = dict(params["train"], model="cnn", weight_decay=1.0e-5)
    checkpoint = make_checkpoint(
        model="cnn", model_config={"channels": [4, 8, 8]}, classes=CLASSES, image_size=8,
        mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.25],
        state_dicts=[{"conv.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(3)}], train=train_params,
        pretrained={"path": "weights/resnet18.pth", "sha256": "cd" * 32} if pretrained else None,
        epochs_completed=2)
    (root / "models").mkdir()
    save_torch(checkpoint, root / "models/model.pth")

    metrics = root / "metrics"
    metrics.mkdir()
    train_metrics = {"train": {"loss": 1.2, "acc": 0.45}, "epochs": 2}
    if with_val:
        train_metrics["val"] = {"loss": 1.3, "acc": 0.4}
    write_json(metrics / "train.json", train_metrics)
    val = ("1.5,0.3,0.25", "1.3,0.4,0.35") if with_val else (",,", ",,")
    (metrics / "history.csv").write_text("member,epoch,train_loss,train_acc,val_loss,val_acc,val_macro_f1,lr\n"
                                         f"1,1,1.6,0.3,{val[0]},0.1\n1,2,1.2,0.45,{val[1]},0.0\n")
    write_json(metrics / "test.json", {"test": {"loss": 1.25, "acc": test_acc}, "tta": 1})
    (metrics / "per_class.csv").write_text("class,accuracy,count,precision,recall,f1,support\n"  # predictions.csv's
                                           "cat,0.75,4,0.6,0.75,0.666667,4\ndog,0.5,4,0.5,0.5,0.5,4\n"
                                           "frog,0.25,4,0.333333,0.25,0.285714,4\n")
    predicted = [0, 1, 1, 0, 1, 0, 0, 0, 2, 2, 2, 1]
    rows = [f"{i},{CLASSES[int(labels[i])]},{CLASSES[p]},0.6" for i, p in enumerate(predicted)]
    (metrics / "predictions.csv").write_text("index,actual,predicted,confidence\n" + "\n".join(rows) + "\n")
    write_calibration(root)


def write_calibration(root: Path) -> None:
    """metrics/calibration.csv for the predictions in metrics/predictions.csv, by evaluate's own code."""
    predictions = pd.read_csv(root / "metrics/predictions.csv", dtype=str, keep_default_na=False)
    confidence = torch.tensor(predictions["confidence"].astype(float).to_numpy(), dtype=torch.float64)
    correct = torch.tensor((predictions["actual"] == predictions["predicted"]).to_numpy())
    (root / "metrics/calibration.csv").write_text(to_csv(["bin", "lower", "upper", "images", "confidence", "accuracy"],
                                                         calibration_rows(confidence, correct)))


@pytest.fixture
def workspace(tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Keep git from finding a repository above tmp_path (the baseline lookup must see only what a test makes).
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    write_workspace(tmp_path, repo_root)
    return tmp_path


def read_report(root: Path) -> str:
    return (root / "reports/report.md").read_text(encoding="utf-8")


def test_report_has_tables_figures_and_html(workspace: Path) -> None:
    report.main()
    text = read_report(workspace)
    for heading in ("# Training report", "## Metrics", "## Training curves", "## Confusion matrix (test)",
                    "## Per-class accuracy (test)", "## Sample test predictions", "## Model",
                    "## Training parameters", "## Pretrained weights", "## Data"):
        assert f"\n{heading}\n" in f"\n{text}", heading
    for png in PNGS:
        assert f"]({png})" in text
        data = (workspace / "reports" / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(workspace / "reports" / png) as image:
            image.verify()
        assert b"matplotlib" not in data  # no software tag: the bytes do not depend on the version string
    assert "| test accuracy | 0.5000 |" in text
    assert "| val accuracy (last epoch) | 0.4000 |" in text
    # per-class table: accuracy, test images, precision, recall, F1, its most common confusion
    assert "| class | accuracy | test images | precision | recall | F1 | most often predicted instead |" in text
    assert "| cat | 0.7500 | 4 | 0.6000 | 0.7500 | 0.6667 | frog (1) |" in text
    assert "| frog | 0.2500 | 4 | 0.3333 | 0.2500 | 0.2857 | dog (2) |" in text
    assert "| train.augment.flip | alternate |" in text  # nested train params, flattened
    assert "| train.cnn.channels | [32, 64, 128] |" in text
    assert "train.mlp.hidden" not in text and "train.airnet" not in text  # other models' sections left out
    assert "| train.weight_decay | 1e-05 |" in text
    assert "| config.channels | [4, 8, 8] |" in text
    assert "| path | weights/resnet18.pth |" in text and f"| SHA-256 | {'cd' * 32} |" in text
    assert f"| checksum (sha256) | {'ab' * 32} |" in text
    assert "| skipped files | 1 |" in text and "cat/broken.jpg" in text
    assert "| total | 30 | 6 | 12 |" in text  # counts per class and split
    assert "(2 of 6)" in text  # 6 samples, round robin over classes: indices 0..5, two of them wrong

    page = (workspace / "reports/report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    separators = [line for line in text.splitlines() if line.startswith("| --- |")]
    assert page.count("<table") == len(separators) >= 8
    for png in PNGS:
        assert f'<img src="{png}"' in page
    assert not [p.name for p in workspace.iterdir() if p.name.startswith(".reports")]  # no temp folders left


def test_sample_choice_is_stratified_and_deterministic() -> None:
    import pandas as pd

    predictions = pd.DataFrame({"index": [5, 0, 1, 2, 3, 4], "actual": [1, 0, 0, 0, 1, 2],
                                "predicted": [1, 0, 0, 0, 1, 2], "confidence": [1.0] * 6})
    chosen = report.choose_samples(predictions, 4)
    assert list(chosen["index"]) == [0, 3, 4, 1]  # first of each class in test order, then the second ones


def test_two_runs_give_identical_bytes(workspace: Path) -> None:
    report.main()
    first = {p.name: p.read_bytes() for p in sorted((workspace / "reports").iterdir())}
    report.main()
    second = {p.name: p.read_bytes() for p in sorted((workspace / "reports").iterdir())}
    assert sorted(first) == sorted(PNGS + ["report.html", "report.md"])
    assert first == second


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                   cwd=root, check=True, capture_output=True)


def test_baseline_comparison_against_main(workspace: Path) -> None:
    git(workspace, "init", "-q", "-b", "main")
    git(workspace, "add", "metrics/train.json", "metrics/test.json")
    git(workspace, "commit", "-q", "-m", "baseline metrics")
    write_json(workspace / "metrics/test.json", {"test": {"loss": 1.0, "acc": 0.625}, "tta": 1})
    report.main()
    text = read_report(workspace)
    assert "## Comparison with baseline `main`" in text
    assert "| file | metric | baseline | current | delta |" in text
    assert "| metrics/test.json | test.acc | 0.5000 | 0.6250 | +0.1250 |" in text
    assert "| metrics/test.json | test.loss | 1.2500 | 1.0000 | -0.2500 |" in text
    assert "| metrics/train.json | val.acc | 0.4000 | 0.4000 | 0 |" in text
    assert "No baseline comparison" not in text


def test_missing_git_repo_or_revision_is_one_line(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report.main()
    assert "No baseline comparison: this folder is not a git repository." in read_report(workspace)

    git(workspace, "init", "-q", "-b", "work")
    git(workspace, "add", "metrics")
    git(workspace, "commit", "-q", "-m", "no main branch here")
    report.main()
    assert "No baseline comparison: git revision 'main' does not exist here." in read_report(workspace)

    monkeypatch.setenv("PATH", str(workspace / "no-such-bin"))  # git itself is not installed
    report.main()
    assert "No baseline comparison: git is not installed." in read_report(workspace)


def test_without_validation_split_or_pretrained_or_baseline(tmp_path: Path, repo_root: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_workspace(tmp_path, repo_root, with_val=False, pretrained=False, baseline=None, samples=0)
    # evaluate leaves the accuracy empty for a class without test images
    (tmp_path / "metrics/per_class.csv").write_text("class,accuracy,count,precision,recall,f1,support\n"
                                                    "cat,0.75,4,0.6,0.75,0.666667,4\ndog,,0,0.0,0.0,0.0,0\n"
                                                    "frog,0.25,4,0.333333,0.25,0.285714,4\n")
    report.main()
    text = read_report(tmp_path)
    assert "| dog | — | 0 |" in text
    assert "val accuracy" not in text
    assert "None: the model started from random initialisation." in text
    assert "No baseline comparison: `report.baseline` is not set." in text
    assert "samples.png" not in text and not (tmp_path / "reports/samples.png").exists()
    with Image.open(tmp_path / "reports/curves.png") as image:
        image.verify()


def test_an_ensemble_is_reported_as_one(workspace: Path) -> None:
    checkpoint = torch.load(workspace / "models/model.pth", weights_only=True)
    checkpoint["state_dicts"] *= 2
    save_torch(checkpoint, workspace / "models/model.pth")
    (workspace / "metrics/history.csv").write_text(
        "member,epoch,train_loss,train_acc,val_loss,val_acc,val_macro_f1,lr\n1,1,1.6,0.3,1.5,0.3,0.25,0.1\n"
        "1,2,1.2,0.45,1.3,0.4,0.35,0.0\n2,1,1.7,0.3,1.5,0.3,0.25,0.1\n2,2,1.3,0.4,1.4,0.35,0.3,0.0\n")
    report.main()
    text = read_report(workspace)
    assert "| val accuracy (ensemble of 2) | 0.4000 |" in text
    assert "| train accuracy (last member, last epoch) | 0.4500 |" in text
    assert "| ensemble members (logits averaged) | 2 |" in text and "per member" in text


def test_failure_keeps_previous_report(workspace: Path) -> None:
    report.main()
    before = read_report(workspace)
    os.remove(workspace / "metrics/predictions.csv")
    with pytest.raises(PipelineError, match=r"metrics/predictions.csv: test predictions not found"):
        report.main()
    assert read_report(workspace) == before
    assert not [p.name for p in workspace.iterdir() if p.name.startswith(".reports")]


def test_stale_predictions_are_refused(workspace: Path) -> None:
    with open(workspace / "metrics/predictions.csv", "a") as handle:
        handle.write("12,cat,horse,0.9\n")
    with pytest.raises(PipelineError, match=r"class names the model .* does not know: horse"):
        report.main()
    assert not (workspace / "reports").exists()


def test_stale_calibration_bins_are_refused(workspace: Path) -> None:
    with open(workspace / "metrics/predictions.csv", "a") as handle:
        handle.write("11,cat,cat,0.9\n")  # 13 predictions, 12 images in the bins
    with pytest.raises(PipelineError, match=r"metrics/calibration.csv: the bins hold 12 test images but "
                                            r"metrics/predictions.csv lists 13; the files are stale"):
        report.main()
    assert not (workspace / "reports").exists()


def test_per_class_metrics_from_before_precision_and_recall_are_refused(workspace: Path) -> None:
    (workspace / "metrics/per_class.csv").write_text("class,accuracy,count\ncat,0.75,4\ndog,0.5,4\nfrog,0.25,4\n")
    with pytest.raises(PipelineError, match=r"metrics/per_class.csv: per-class metrics lacks the column\(s\) "
                                            r"precision, recall, f1; expected class, accuracy, count, precision"):
        report.main()
    assert not (workspace / "reports").exists()


def test_stage_entry_point_prints_one_line_error(workspace: Path, repo_root: Path) -> None:
    (workspace / "models/model.pth").write_bytes(b"not a checkpoint")
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    result = subprocess.run([sys.executable, "-m", "stages.report"], cwd=workspace, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: models/model.pth: cannot load model checkpoint")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_class_names_like_missing_values_or_numbers_survive_evaluate_and_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folder names are class names: pandas would read `None`, `NA`, `nan` as missing and `00`, `01` as 0, 1."""
    from stages.base.config import load_params
    from stages.evaluate import evaluate
    from stages.train import train

    from prepared_data import tiny_params, write_prepared

    classes = ["00", "01", "NA", "None", "True", "nan"]
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    write_prepared(tmp_path, classes=len(classes))
    meta = json.loads((tmp_path / "data/prepared/meta.json").read_text())
    write_json(tmp_path / "data/prepared/meta.json", {**meta, "classes": classes})
    tiny_params(tmp_path, **{"train.epochs": 1, "report.baseline": None, "report.samples": 6})
    train(load_params())
    evaluate(load_params())
    per_class = (tmp_path / "metrics/per_class.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in per_class[1:]] == classes
    report.main()
    text = read_report(tmp_path)
    for name in classes:
        assert f"\n| {name} | " in text, name  # its own row in the per-class table, with its accuracy
    assert "| classes | 00, 01, NA, None, True, nan |" in text
    assert "| test images | 60 |" in text


def test_disk_full_is_one_line_and_keeps_the_previous_report(workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    from stages.base.runtime import run_stage
    report.main()
    before = {p.name: p.read_bytes() for p in (workspace / "reports").iterdir()}
    write_text = Path.write_text

    def disk_full(self: Path, text: str, *args: object, **kwargs: object) -> int:
        if self.name != "report.html":
            return write_text(self, text, *args, **kwargs)
        write_text(self, text[:100], *args, **kwargs)  # the disk fills up part-way through the page
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", disk_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_stage(report.main)
    assert exit_info.value.code == 2
    # a failed write names no file; the error names the output folder, not its temporary stand-in
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: reports: No space left on device; free some disk space and rerun"]
    assert {p.name: p.read_bytes() for p in (workspace / "reports").iterdir()} == before
    assert not [p.name for p in workspace.iterdir() if p.name.startswith(".reports")]  # no temporary folder left


# ---------------------------------------------------------------- error analysis: confused pairs, calibration, losses

# The fixture's predictions (labels are index % 3), with confidences that spread over the bins: 0.2 = 3/15 lies on a
# bin edge and belongs to the lower bin (0.133, 0.2], as in evaluate's ECE.
CONFIDENCES = [0.95, 0.9, 0.99, 0.5, 0.7, 0.8, 0.4, 0.99, 0.3, 0.6, 0.2, 0.85]
FIXTURE_PREDICTED = [0, 1, 1, 0, 1, 0, 0, 0, 2, 2, 2, 1]


def write_confidences(root: Path) -> None:
    rows = [f"{i},{CLASSES[i % 3]},{CLASSES[p]},{c}" for i, (p, c) in enumerate(zip(FIXTURE_PREDICTED, CONFIDENCES))]
    (root / "metrics/predictions.csv").write_text("index,actual,predicted,confidence\n" + "\n".join(rows) + "\n")
    test = json.loads((root / "metrics/test.json").read_text())
    test["test"].update({"macro_f1": 0.484127, "balanced_accuracy": 0.5, "ece": 0.3125})
    write_json(root / "metrics/test.json", test)
    write_calibration(root)


def test_most_confused_pairs_table(workspace: Path) -> None:
    report.main()
    text = read_report(workspace)
    assert "\n## Most confused pairs (test)\n" in text
    assert "6 misclassified test images; all (true → predicted) pairs" in text
    table = text.split("## Most confused pairs (test)")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| true class | predicted as | test images | share of the true class |",
                    "| frog | dog | 2 | 0.5000 |",  # the most frequent first, ties by true then predicted class
                    "| cat | frog | 1 | 0.2500 |", "| dog | cat | 1 | 0.2500 |", "| dog | frog | 1 | 0.2500 |",
                    "| frog | cat | 1 | 0.2500 |"]


def test_confused_pairs_are_capped_and_skip_the_diagonal() -> None:
    matrix = np.full((5, 5), 3, dtype=np.int64)
    np.fill_diagonal(matrix, 50)
    matrix[4, 0] = 7
    pairs = report.confused_pairs(matrix, list("abcde"))
    assert len(pairs) == report.CONFUSED_PAIRS_SHOWN
    assert pairs.iloc[0].tolist() == ["e", "a", "7", f"{7 / 66:.4f}"]
    assert pairs.iloc[1].tolist() == ["a", "b", "3", f"{3 / 62:.4f}"]
    assert not (pairs["true class"] == pairs["predicted as"]).any()
    assert report.confused_pairs(np.diag([4, 5]), ["a", "b"]).empty


def test_calibration_bins_match_a_direct_count_and_evaluates_ece(workspace: Path) -> None:
    """The report's bins, read from evaluate's calibration.csv (non-empty bins, 6 decimals) and filled out with
    the empty ones."""
    from stages.evaluate import expected_calibration_error

    write_confidences(workspace)
    predictions = pd.DataFrame({"confidence": CONFIDENCES, "actual": [i % 3 for i in range(12)],
                                "predicted": FIXTURE_PREDICTED})
    table = report.read_calibration(12)
    assert len(table) == 15 and table["images"].sum() == 12
    edges = np.arange(16) / 15
    correct = (predictions["actual"] == predictions["predicted"]).to_numpy()
    for b, row in table.iterrows():
        inside = [(c, ok) for c, ok in zip(CONFIDENCES, correct) if edges[b] < c <= edges[b + 1]]
        assert row["images"] == len(inside)
        if inside:
            assert row["confidence"] == pytest.approx(np.mean([c for c, _ in inside]), abs=5e-7)  # 6 decimals
            assert row["accuracy"] == pytest.approx(np.mean([ok for _, ok in inside]), abs=5e-7)
        else:
            assert np.isnan(row["confidence"]) and np.isnan(row["accuracy"])
    assert table.loc[2, "images"] == 1  # 0.2 sits on the edge 3/15: the lower bin
    filled = table[table["images"] > 0]
    ece = float((filled["images"] * (filled["accuracy"] - filled["confidence"]).abs()).sum() / 12)
    expected = expected_calibration_error(torch.tensor(CONFIDENCES, dtype=torch.float64), torch.tensor(correct))
    assert ece == pytest.approx(expected, abs=1e-6)


def test_calibration_section_and_reliability_diagram(workspace: Path) -> None:
    write_confidences(workspace)
    report.main()
    text = read_report(workspace)
    assert "\n## Calibration (test)\n" in text and "](reliability.png)" in text
    assert "Expected calibration error 0.3125:" in text
    assert "| confidence bin | test images | mean confidence | accuracy | accuracy − confidence |" in text
    assert "| (0.133, 0.200] | 1 | 0.2000 | 0.0000 | -0.2000 |" in text
    assert "| (0.933, 1.000] | 3 | 0.9767 | 0.3333 | -0.6433 |" in text  # 0.95 right, 0.99 and 0.99 wrong
    assert "| test macro-F1 | 0.4841 |" in text and "| test balanced accuracy | 0.5000 |" in text
    assert "| test expected calibration error (15 bins) | 0.3125 |" in text
    assert_drawn(workspace / "reports/reliability.png")


def test_top_losses_are_the_most_confidently_wrong(workspace: Path) -> None:
    write_confidences(workspace)
    report.main()
    text = read_report(workspace)
    assert "\n## Top losses (test)\n" in text and "](top_losses.png)" in text
    table = text.split("## Top losses (test)")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| test image | true class | predicted | probability |",
                    "| 2 | frog | dog | 0.9900 |", "| 7 | dog | cat | 0.9900 |",  # a tie: test-split order
                    "| 11 | frog | dog | 0.8500 |", "| 5 | frog | cat | 0.8000 |", "| 9 | cat | frog | 0.6000 |",
                    "| 10 | dog | frog | 0.2000 |"]
    assert_drawn(workspace / "reports/top_losses.png")
    chosen = report.choose_top_losses(pd.DataFrame({"index": range(12), "actual": [i % 3 for i in range(12)],
                                                    "predicted": FIXTURE_PREDICTED, "confidence": CONFIDENCES}), 2)
    assert chosen["index"].tolist() == [2, 7]


def test_error_analysis_without_mistakes(workspace: Path) -> None:
    rows = [f"{i},{CLASSES[i % 3]},{CLASSES[i % 3]},0.9" for i in range(12)]
    predictions = "index,actual,predicted,confidence\n" + "\n".join(rows) + "\n"
    (workspace / "metrics/predictions.csv").write_text(predictions)
    write_calibration(workspace)
    report.main()
    text = read_report(workspace)
    assert text.count("No test image was misclassified.") == 2  # confused pairs and top losses
    assert not (workspace / "reports/top_losses.png").exists()
    assert (workspace / "reports/reliability.png").is_file()


def test_error_analysis_figures_are_byte_identical(workspace: Path) -> None:
    write_confidences(workspace)
    report.main()
    first = {name: (workspace / "reports" / name).read_bytes() for name in ("reliability.png", "top_losses.png")}
    report.main()
    assert first == {name: (workspace / "reports" / name).read_bytes() for name in first}


def assert_drawn(path: Path) -> None:
    """A real figure: a PNG of a sensible size whose pixels are not all one colour."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_the_report_says_which_epoch_was_kept_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.base.config import load_params
    from stages.evaluate import evaluate
    from stages.train import train

    from prepared_data import tiny_params, write_prepared

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    write_prepared(tmp_path)
    tiny_params(tmp_path, **{"train.epochs": 10, "train.lr": 0.3, "train.keep": "best", "train.monitor": "val_acc",
                             "train.patience": 2, "report.baseline": None})
    train(load_params())
    evaluate(load_params())
    report.main()
    record = load_checkpoint(tmp_path / "models/model.pth")["selection"]["members"][0]
    kept, trained = record["kept_epoch"], record["epochs_trained"]
    assert kept < trained < 10
    text = read_report(tmp_path)
    assert f"trained for {trained} epochs (weights of epoch {kept}: train.keep: best, by val_acc)" in text
    assert (f"**Weights kept:** epoch {kept} of {trained} trained; train.keep: best: epoch {kept} of {trained} "
            f"trained had the highest val_acc (1); train.patience: 2 ended training after epoch {trained} of 10, "
            f"2 epochs without a higher val_acc.") in text
    assert f"| val accuracy (epoch {kept}) | 1.0000 |" in text and f"| val macro-F1 (epoch {kept}) |" in text
    assert f"| weights from epoch | {kept} |" in text
