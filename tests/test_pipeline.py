"""End to end: `dvc repro` of the whole pipeline in temporary git repositories, on generated data.

One baseline run (the session fixture `baseline`, conftest.py) is shared by the whole session; the module
fixtures below each add one more run on a copy of it, and several tests check what that run did.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline_repo import STAGES, Baseline, DvcRun, PipelineRepo

pytestmark = pytest.mark.slow

EXPECTED_OUTPUTS = (
    "data/prepared/train.pt", "data/prepared/val.pt", "data/prepared/test.pt", "data/prepared/meta.json",
    "models/model.pth", "models/model.onnx", "models/model.safetensors",
    "metrics/train.json", "metrics/history.csv", "metrics/test.json", "metrics/per_class.json",
    "metrics/per_class.csv", "metrics/predictions.csv", "metrics/calibration.csv",
    "reports/report.md",
)
PLOT_TITLES = ("Loss per epoch", "Accuracy per epoch", "Confusion matrix (test)", "Per-class test accuracy",
               "Reliability diagram (test)")


# ---------------------------------------------------------------- the first run and a no-op rerun


def test_first_repro_runs_every_stage_and_writes_every_output(baseline: Baseline) -> None:
    assert baseline.first.ran == set(STAGES), baseline.first.output
    root = baseline.repo.path
    missing = [f for f in EXPECTED_OUTPUTS if not (root / f).is_file() or (root / f).stat().st_size == 0]
    assert not missing, f"missing or empty outputs: {missing}"
    assert any((root / "data/raw").rglob("*")), "data/raw is empty"

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)

    test_metrics = json.loads((root / "metrics/test.json").read_text())
    accuracy = [value for key, value in test_metrics["test"].items() if key.startswith("acc")]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0, test_metrics
    # The synthetic data is learnable: two epochs of a tiny CNN beat chance (0.1 for 10 classes) by far.
    assert accuracy[0] >= 0.3, f"the model did not learn: {test_metrics}"
    report = (root / "reports/report.md").read_text()
    assert "accuracy" in report.lower()


def test_model_is_a_self_describing_checkpoint(baseline: Baseline) -> None:
    from stages.model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(baseline.repo.path / "models/model.pth")
    meta = json.loads((baseline.repo.path / "data/prepared/meta.json").read_text())
    assert checkpoint["model"] == "cnn"
    assert list(checkpoint["classes"]) == list(meta["classes"])


def test_second_repro_runs_nothing(baseline: Baseline) -> None:
    again = baseline.repo.dvc("repro")
    assert again.ran == set(), again.output
    assert again.restored == set(), again.output
    status = baseline.repo.dvc("status")
    assert "up to date" in status.output, status.output


def test_fresh_clone_reproduces_every_output_bit_for_bit(baseline: Baseline, tmp_path: Path) -> None:
    clone = baseline.repo.clone_to(tmp_path / "clone")
    # The report compares with the metrics committed on `main` (report.baseline), a git input that DVC does not
    # track: give the clone the `main` the first run saw (the commit before the run, without metrics).
    clone.git("checkout", "-q", "-b", "rerun")
    clone.git("branch", "-f", "main", "HEAD~1")
    # -f: evaluate has only committed (uncached) outputs and would be skipped as unchanged once train has
    # rebuilt the very same model; forcing it makes every output file come from this run.
    rerun = clone.dvc("repro", "-f")
    assert rerun.ran == set(STAGES), rerun.output
    expected = baseline.repo.reproducible_digests()
    assert "models/model.pth" in expected and any(f.startswith("reports/") for f in expected)
    got = clone.reproducible_digests()
    assert sorted(got) == sorted(expected)
    differ = [f for f in expected if got[f] != expected[f]]
    assert not differ, f"outputs differ between two runs of the same commit: {differ}"


# ---------------------------------------------------------------- a branch with other train params


@dataclass
class BranchRun:
    repo: PipelineRepo
    repro: DvcRun


@pytest.fixture(scope="module")
def branch(baseline: Baseline, tmp_path_factory: pytest.TempPathFactory) -> BranchRun:
    """main holds the baseline run; branch `more-epochs` trains 3 epochs instead of 2 and commits the result."""
    repo = baseline.repo.copy_to(tmp_path_factory.mktemp("branch") / "repo")
    repo.git("checkout", "-q", "-b", "more-epochs")
    repo.set_params({"train.epochs": 3})
    run = repo.dvc("repro")
    repo.commit("train 3 epochs")
    return BranchRun(repo, run)


def test_changing_epochs_reruns_train_export_evaluate_report_only(branch: BranchRun) -> None:
    assert branch.repro.ran == {"train", "export", "evaluate", "report"}, branch.repro.output
    assert {"download", "normalize"} <= branch.repro.unchanged, branch.repro.output


def test_report_compares_with_main(branch: BranchRun) -> None:
    report = (branch.repo.path / "reports/report.md").read_text()
    assert "Baseline `main`" in report, report
    assert "| metrics/test.json |" in report, report


def test_metrics_diff_against_main(branch: BranchRun) -> None:
    diff = json.loads(branch.repo.dvc("metrics", "diff", "main", "--json").output)
    changed = {(path, key) for path, metrics in diff.items() for key, values in metrics.items()
               if values.get("old") != values.get("new")}
    assert any(path == "metrics/train.json" for path, _ in changed), diff
    assert any(path == "metrics/test.json" for path, _ in changed), diff

    text = branch.repo.dvc("metrics", "diff", "main").output
    assert "metrics/test.json" in text

    markdown = branch.repo.dvc("metrics", "diff", "main", "--md").output
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert lines and "Path" in lines[0] and "main" in lines[0], markdown
    assert set(lines[1].replace("|", "").strip()) <= set("-: "), markdown  # the header rule
    assert any("metrics/test.json" in line for line in lines[2:]), markdown


def test_params_diff_against_main(branch: BranchRun) -> None:
    markdown = branch.repo.dvc("params", "diff", "main", "--md").output
    rows = [line for line in markdown.splitlines() if "train.epochs" in line]
    assert len(rows) == 1, markdown
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[0] == "params.yaml" and cells[2:4] == ["2", "3"], markdown


def test_plots_show_and_diff_write_html_with_every_plot(branch: BranchRun) -> None:
    branch.repo.dvc("plots", "show")
    page = (branch.repo.path / "dvc_plots/index.html").read_text()
    missing = [title for title in PLOT_TITLES if title not in page]
    assert not missing, f"plots missing from dvc_plots/index.html: {missing}"
    for label in ("epoch", "cross-entropy loss", "true class", "predicted class"):
        assert label in page, label

    branch.repo.dvc("plots", "diff", "main", "--out", "plots_diff")
    page = (branch.repo.path / "plots_diff/index.html").read_text()
    assert all(title in page for title in PLOT_TITLES)
    assert "main" in page and "workspace" in page


# ---------------------------------------------------------------- an image-folder archive as the source

SHAPES = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def write_image_zip(path: Path, *, changed: bool = False) -> None:
    """train/ and test/ folders of 16x16 PNGs, three colour classes, under one wrapping folder. `changed`
    repaints one training image."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for split, count in (("train", 12), ("test", 4)):
            for name, colour in SHAPES.items():
                for i in range(count):
                    shade = tuple(min(255, c + 7 * i) for c in colour)
                    if changed and (split, name, i) == ("train", "red", 0):
                        shade = (255, 255, 255)
                    image = Image.new("RGB", (16, 16), shade)
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    info = zipfile.ZipInfo(f"shapes/{split}/{name}/{i:03d}.png", date_time=(2024, 1, 1, 0, 0, 0))
                    archive.writestr(info, buffer.getvalue())


@dataclass
class ImageFolderRuns:
    repo: PipelineRepo
    first: DvcRun
    noop: DvcRun
    after_change: DvcRun
    meta_before: dict


@pytest.fixture(scope="module")
def image_folder(baseline: Baseline, tmp_path_factory: pytest.TempPathFactory) -> ImageFolderRuns:
    repo = baseline.repo.copy_to(tmp_path_factory.mktemp("imagefolder") / "repo")
    archive = repo.path / "data/sources/shapes.zip"
    write_image_zip(archive)
    repo.set_params({"data.source": "data/sources/shapes.zip"})
    first = repo.dvc("repro")
    meta = json.loads((repo.path / "data/prepared/meta.json").read_text())
    noop = repo.dvc("repro")
    write_image_zip(archive, changed=True)
    after_change = repo.dvc("repro")
    return ImageFolderRuns(repo, first, noop, after_change, meta)


def test_image_folder_archive_runs_the_pipeline(image_folder: ImageFolderRuns) -> None:
    assert image_folder.first.ran == set(STAGES), image_folder.first.output
    assert list(image_folder.meta_before["classes"]) == sorted(SHAPES)
    predictions = (image_folder.repo.path / "metrics/predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + 4 * len(SHAPES)  # header + one row per test image


def test_unchanged_image_source_reruns_nothing(image_folder: ImageFolderRuns) -> None:
    assert image_folder.noop.ran == set(), image_folder.noop.output


def test_changing_one_image_reruns_download_and_everything_after(image_folder: ImageFolderRuns) -> None:
    # The new pixels change the prepared split, hence the model, hence evaluate's and report's inputs.
    assert image_folder.after_change.ran == set(STAGES), image_folder.after_change.output

