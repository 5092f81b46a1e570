"""Experiments, model versions and CI: a queued hyperparameter sweep, models round-tripped through a local DVC
remote into a fresh clone, and the GitHub Actions workflow linted."""

from __future__ import annotations

import copy
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import pipeline_repo
from pipeline_repo import BIN_DIR, REPO_ROOT, Baseline, PipelineRepo

sys.path.insert(0, str(REPO_ROOT / "tools"))
import sweep_summary  # noqa: E402  (tools/ is not a package)

WORKFLOW = REPO_ROOT / ".github/workflows/ci.yml"
ZIZMOR_CONFIG = REPO_ROOT / ".github/zizmor.yml"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    return pipeline_repo.baseline(tmp_path_factory)


# ---------------------------------------------------------------- a queued sweep


@pytest.mark.slow
def test_queued_sweep_runs_both_experiments(base: Baseline, tmp_path: Path) -> None:
    # Neither value may be the baseline's own lr: that experiment would rightly run nothing.
    assert pipeline_repo.TINY["train.lr"] not in (0.05, 0.1)
    repo = base.repo.copy_to(tmp_path / "repo")
    queued = repo.dvc("exp", "run", "--queue", "-S", "train.lr=0.05,0.1")
    assert queued.output.count("Queued experiment") == 2, queued.output
    # Two at once, as `dvc queue start -j 2` would: the stages set OMP_WAIT_POLICY=PASSIVE so the two torch
    # processes share the cores without spin-waiting each other down.
    # DVC's queue sometimes keeps following the logs after both experiments ran (#8165, #10398, seen once in
    # CI): once it has printed its closing summary, a hang counts as done; the checks below read the results.
    run = repo.dvc("exp", "run", "--run-all", "-j", "2", timeout=300, done_marker="Ran experiment(s)")
    # Queued runs start from the committed baseline: data comes from the cache, only training onwards runs.
    assert run.output.count("Running stage 'train'") == 2, run.output
    assert "Running stage 'download'" not in run.output, run.output

    shown = json.loads(repo.dvc("exp", "show", "--json").output)
    results: dict[float, dict[str, Any]] = {}
    for record in sweep_summary.revision_records(shown):
        if record.get("rev") == "workspace" or record.get("rev") == base.commit:
            continue
        data = record["data"]
        lr = data["params"]["params.yaml"]["data"]["train"]["lr"]
        results[lr] = data.get("metrics", {})
    assert set(results) == {0.05, 0.1}, json.dumps(shown, indent=1)[:4000]
    for lr, metrics in results.items():
        assert "metrics/test.json" in metrics, f"lr={lr}: no test metrics in {metrics}"
        assert metrics["metrics/test.json"].get("data"), f"lr={lr}: empty test metrics"
    assert results[0.05]["metrics/test.json"] != results[0.1]["metrics/test.json"]

    table = repo.dvc("exp", "show", "--csv").output
    assert "train.lr" in table and "0.05" in table and "0.1" in table

    failed = repo.dvc("queue", "status").output
    assert "Failed" not in failed, failed

    # The sweep summary turns the same JSON into a ranked table and a figure.
    (tmp_path / "show.json").write_text(json.dumps(shown))
    sweep_summary.main(["--json", str(tmp_path / "show.json"), "--out", str(tmp_path / "sweep")])
    summary = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "train.lr" in summary.splitlines()[2] and "test.acc" in summary
    lrs_in_rows = [line for line in summary.splitlines() if line.startswith("|") and ("0.05" in line or "0.1 " in line)]
    assert len(lrs_in_rows) >= 2, summary
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- model versions through a local remote


@pytest.mark.slow
def test_model_versions_round_trip_through_a_local_remote(base: Baseline, tmp_path: Path) -> None:
    repo = base.repo.copy_to(tmp_path / "repo")
    remote = tmp_path / "dvc-remote"
    repo.dvc("remote", "add", "-d", "local", str(remote))
    first = repo.commit("a local DVC remote")
    first_model = repo.md5("models/model.pth")
    repo.dvc("push")

    repo.set_params({"train.seed": 1})
    rerun = repo.dvc("repro")
    assert "train" in rerun.ran, rerun.output
    second = repo.commit("retrain with seed 1")
    second_model = repo.md5("models/model.pth")
    assert second_model != first_model
    repo.dvc("push")

    clone = repo.clone_to(tmp_path / "clone")
    assert not (clone.path / "models/model.pth").exists()
    clone.dvc("pull", "--all-commits")
    assert clone.md5("models/model.pth") == second_model

    clone.git("checkout", "-q", first)
    clone.dvc("checkout")
    assert clone.md5("models/model.pth") == first_model
    assert clone.md5("metrics/test.json") == _git_md5(repo, first, "metrics/test.json")

    clone.git("checkout", "-q", second)
    clone.dvc("checkout")
    assert clone.md5("models/model.pth") == second_model
    assert clone.dvc("status").output.strip().endswith("up to date."), "workspace differs from the commit"


def _git_md5(repo: PipelineRepo, rev: str, path: str) -> str:
    import hashlib

    blob = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo.path, check=True, stdout=subprocess.PIPE).stdout
    return hashlib.md5(blob).hexdigest()


# ---------------------------------------------------------------- documented commands


def documented_exp_runs() -> list[tuple[str, list[tuple[str, str]]]]:
    """Every `dvc exp run ... -S key=value ...` command in the README, the Makefile and the workflow."""
    commands = []
    for path in (REPO_ROOT / "README.md", REPO_ROOT / "Makefile", WORKFLOW):
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            if "dvc exp run" in line and "-S" in line:
                pairs = [(key, value) for key, value in re.findall(r"-S\s+'?([\w.]+)=([^\s'`)]+)", line)
                         if not key.startswith("section.")]  # the README's "-S section.key=value" pattern
                if pairs:  # prose such as "`dvc exp run -S ...`" names no key
                    commands.append((f"{path.name}: {line.strip()}", pairs))
    return commands


def test_documented_experiment_commands_use_valid_params() -> None:
    """The README's seed setup, sweep and offline commands must keep matching params.yaml's keys and schema."""
    from stages.config import ParamsError, validate

    commands = documented_exp_runs()
    assert len(commands) >= 4, commands  # offline (README, Makefile), seed setup, sweep, CI profile
    assert any("train.model=mlp" in c for c, _ in commands), "the seed tutorial's command is not in the README"
    defaults = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    for command, pairs in commands:
        # a comma separates sweep values (`-S train.lr=0.1,0.2`), except inside a list (`widths=[48,192,192]`)
        choices = [[(key, value) for value in re.split(r",(?![^\[]*\])", values)] for key, values in pairs]
        for combination in itertools.product(*choices):
            params = copy.deepcopy(defaults)
            for key, value in combination:
                *parents, leaf = key.split(".")
                node = params
                for part in parents:
                    node = node[part]
                assert leaf in node, f"{command}: {key} is not a key of params.yaml"
                node[leaf] = yaml.safe_load(value)  # how `dvc exp run -S` reads a value
            try:
                validate(params)
            except ParamsError as error:
                pytest.fail(f"{command}: {error}")


# ---------------------------------------------------------------- the CI workflow


def test_workflow_runs_tests_pipeline_and_reports_diffs() -> None:
    """What the workflow must do, read from its YAML (the linters below check its syntax and safety)."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads a bare `on` as true
    assert "pull_request" in triggers and triggers["push"]["branches"] == ["main"]
    assert workflow["permissions"] == {"contents": "read"}

    (job,) = workflow["jobs"].values()
    assert job["permissions"] == {"contents": "read", "pull-requests": "write"}
    steps = job["steps"]
    uses = {step["uses"].split("@")[0]: step for step in steps if "uses" in step}
    for step in steps:
        if "uses" in step:
            ref = step["uses"].split("@")[1]
            assert ref.startswith("v") and ref[1:].isdigit(), f"{step['uses']}: pin actions by major version"
    assert uses["actions/checkout"]["with"]["fetch-depth"] == 0
    assert uses["actions/setup-python"]["with"]["cache"] == "pip"
    assert uses["actions/cache"]["with"]["path"] == ".dvc/cache"

    script = "\n".join(step.get("run", "") for step in steps)
    assert "make test" in script
    assert "dvc exp run" in script and "data.source=synthetic" in script
    assert 'dvc metrics diff "origin/$BASE_REF" --md' in script
    assert 'dvc params diff "origin/$BASE_REF" --md' in script
    assert "GITHUB_STEP_SUMMARY" in script
    assert "actions/github-script" in uses


def _linter(name: str) -> Path | None:
    found = BIN_DIR / name
    if found.exists():
        return found
    which = shutil.which(name)
    return Path(which) if which else None


BAD_WORKFLOW = """\
name: bad
on: pull_request
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: echo "${{ github.event.pull_request.title }}"
      - run: echo hi
        wiht:
          x: 1
"""


def test_workflow_passes_zizmor() -> None:
    """zizmor (from PyPI, binary in the wheel) parses the workflow and audits it (template injection,
    credentials left in the checkout, unpinned actions, excessive permissions)."""
    zizmor = _linter("zizmor")
    if zizmor is None:
        pytest.skip("zizmor is not installed (it comes with the project's test extras: pip install -e '.[test]')")
    done = subprocess.run([zizmor, "--offline", "--config", ZIZMOR_CONFIG, WORKFLOW], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_zizmor_fails_a_bad_workflow(tmp_path: Path) -> None:
    zizmor = _linter("zizmor")
    if zizmor is None:
        pytest.skip("zizmor is not installed (it comes with the project's test extras: pip install -e '.[test]')")
    bad = tmp_path / ".github/workflows/bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(BAD_WORKFLOW)
    done = subprocess.run([zizmor, "--offline", "--config", ZIZMOR_CONFIG, bad], capture_output=True, text=True)
    assert done.returncode != 0 and "template-injection" in done.stdout, done.stdout + done.stderr


def test_workflow_matches_the_github_workflow_schema(tmp_path: Path) -> None:
    """check-jsonschema's copy of SchemaStore's workflow schema ships in its wheel: no network needed."""
    checker = _linter("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema is not installed (it comes with the test extras: pip install -e '.[test]')")
    command = [checker, "--builtin-schema", "vendor.github-workflows"]
    done = subprocess.run([*command, WORKFLOW], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

    bad = tmp_path / "bad.yml"
    bad.write_text(BAD_WORKFLOW)
    done = subprocess.run([*command, bad], capture_output=True, text=True)
    assert done.returncode != 0, "the schema check accepted a step with an unknown key"
