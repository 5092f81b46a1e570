"""Throwaway git + DVC repositories of this pipeline, for the end-to-end tests.

`create_repo` copies what a user's clone holds (stages/, dvc.yaml, params.yaml, .dvc/config, and the
dependencies that no stage produces, such as data/sources/) into a fresh git repository, sets params for a run
of a few seconds (TINY) and commits. DVC runs from the interpreter's own bin folder (the venv the tests run in),
with that folder first on PATH so the stages' `python -m stages.<name>` commands find the same Python, and with
a fixed git identity so commits work where none is configured (CI).

`build_baseline(path)` builds one repository, runs the whole pipeline once and commits the result; the session
fixture `baseline` (conftest.py) builds it once per test session for every test module, which work on copies
(`PipelineRepo.copy_to`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.base.config import set_dotted

from repo_root import REPO_ROOT

BIN_DIR = Path(sys.executable).parent  # not resolved: a venv's python is a link out of the venv
STAGES = ("download", "normalize", "features", "train", "export", "evaluate", "report")

# Besides the stages' own dependencies (read from dvc.yaml), what a clone needs to run the pipeline.
# plots/template.html: .dvc/config points `dvc plots show` at it (the offline page).
ALWAYS_COPIED = ("stages", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore",
                 "plots/template.html")

# A run of a few seconds per stage: 300 generated images (270 train, 30 validation), a small CNN, two epochs.
TINY: dict[str, Any] = {
    "data.source": "synthetic",
    "data.synthetic.train_size": 300,
    "data.synthetic.test_size": 100,
    "data.val_fraction": 0.1,
    "train.model": "cnn",
    "train.cnn.channels": [8, 16, 32],
    "train.epochs": 2,
    "train.batch_size": 32,
    # The defaults are tuned for airnet on 50,000 images; these keep a tiny CNN on 270 images stable.
    "train.lr": 0.2,
    "train.bias_lr_scale": 1.0,
    "train.warmup_epochs": 0.5,
    "evaluate.tta": 1,
    "report.samples": 4,
}

# Files whose bytes must not depend on when or where the pipeline ran. Wall-clock seconds are kept out of them
# on purpose (train writes them to metrics/train_time.json only).
TIMING_FILE = re.compile(r"(^|/)[^/]*time[^/]*\.json$")

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Pipeline Tests",
    "GIT_AUTHOR_EMAIL": "pipeline-tests@example.invalid",
    "GIT_COMMITTER_NAME": "Pipeline Tests",
    "GIT_COMMITTER_EMAIL": "pipeline-tests@example.invalid",
}

RUN_TIMEOUT_S = 900  # a hang (e.g. the DVC queue) fails the test instead of blocking the suite


def dvc_executable() -> Path:
    dvc = BIN_DIR / ("dvc.exe" if os.name == "nt" else "dvc")
    if not dvc.exists():
        pytest.fail(f"dvc not found beside the test interpreter ({dvc}); install the project: make test")
    return dvc


def required_stage_files() -> list[Path]:
    """Every stages/*.py that dvc.yaml lists as a dependency: the end-to-end tests need all of them."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    files = {dep for stage in spec["stages"].values() for dep in stage.get("deps", [])
             if isinstance(dep, str) and dep.startswith("stages/") and dep.endswith(".py")}
    return sorted(REPO_ROOT / f for f in files)


def _path_of(entry: Any) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def pipeline_inputs() -> list[str]:
    """What a fresh clone holds that `dvc repro` needs: the stage code, dvc.yaml, params.yaml, DVC's config, and
    every dependency that no stage produces (e.g. data/sources/), as files that git tracks or would track."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    produced = {_path_of(out).rstrip("/") for stage in spec["stages"].values()
                for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])}
    deps = {_path_of(dep).rstrip("/") for stage in spec["stages"].values() for dep in stage.get("deps", [])}
    external = {d for d in deps if not any(d == p or d.startswith(p + "/") for p in produced)}
    return sorted(set(ALWAYS_COPIED) | external)


def _git_visible_files(paths: list[str]) -> list[str]:
    """Files under `paths` that git tracks or would track (not ignored): what a clone of a commit holds."""
    done = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z", "--", *paths], cwd=REPO_ROOT,
                          check=True, stdout=subprocess.PIPE)
    return sorted({f for f in done.stdout.decode().split("\0") if f})


def check_stages_present() -> None:
    missing = [str(p.relative_to(REPO_ROOT)) for p in required_stage_files() if not p.is_file()]
    if missing:
        pytest.fail(f"the pipeline is incomplete, dvc.yaml needs: {', '.join(missing)}")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_IDENTITY)
    env.update({"DVC_NO_ANALYTICS": "1", "PIPELINE_DEVICE": "cpu", "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_TERMINAL_PROMPT": "0"})
    return env


@dataclass
class DvcRun:
    """One DVC command's combined output, and which stages it ran, skipped or restored from the run-cache."""
    args: tuple[str, ...]
    returncode: int
    output: str

    @property
    def ran(self) -> set[str]:
        return set(re.findall(r"Running stage '([^']+)'", self.output))

    @property
    def unchanged(self) -> set[str]:
        return set(re.findall(r"Stage '([^']+)' didn't change, skipping", self.output))

    @property
    def restored(self) -> set[str]:
        return set(re.findall(r"Stage '([^']+)' is cached - skipping run", self.output))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class PipelineRepo:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"PipelineRepo({self.path})"

    # ------------------------------------------------------------ commands

    def run(self, *args: str | Path, check: bool = True, timeout: float = RUN_TIMEOUT_S,
            done_marker: str | None = None) -> subprocess.CompletedProcess:
        """Run a command in the repository; on failure the test fails with the command's whole output.
        done_marker: a command that printed it has finished its work, so a hang after it counts as success."""
        command = [str(a) for a in args]
        try:
            done = subprocess.run(command, cwd=self.path, env=environment(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as error:
            output = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
            if done_marker is not None and done_marker in output:
                return subprocess.CompletedProcess(command, 0, output)
            pytest.fail(f"`{' '.join(command)}` in {self.path} ran over {timeout:.0f} s; output:\n{output}")
        if check and done.returncode != 0:
            pytest.fail(f"`{' '.join(command)}` in {self.path} exited {done.returncode}; output:\n{done.stdout}")
        return done

    def dvc(self, *args: str, check: bool = True, timeout: float = RUN_TIMEOUT_S,
            done_marker: str | None = None) -> DvcRun:
        done = self.run(dvc_executable(), *args, check=check, timeout=timeout, done_marker=done_marker)
        return DvcRun(tuple(args), done.returncode, done.stdout)

    def git(self, *args: str, check: bool = True) -> str:
        return self.run("git", *args, check=check).stdout.strip()

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--no-verify", "-m", message)
        return self.git("rev-parse", "HEAD")

    # ------------------------------------------------------------ params and files

    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / "params.yaml").read_text(encoding="utf-8"))

    def set_params(self, overrides: dict[str, Any]) -> None:
        params = self.params()
        for key, value in overrides.items():
            set_dotted(params, key, value)
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    def md5(self, relative: str) -> str:
        return md5(self.path / relative)

    def output_files(self) -> list[str]:
        """Every file the pipeline wrote (data, model, metrics, report), relative to the repository root."""
        roots = ["data/raw", "data/prepared", "models/model.pth", "models/model.onnx", "models/model.safetensors",
                 "metrics", "reports"]
        files: list[str] = []
        for root in roots:
            path = self.path / root
            if path.is_file():
                files.append(root)
            elif path.is_dir():
                files += [p.relative_to(self.path).as_posix() for p in sorted(path.rglob("*")) if p.is_file()]
        return files

    def reproducible_digests(self) -> dict[str, str]:
        """MD5 of every output file that must be bit-identical across reruns (all but wall-clock timings)."""
        return {f: self.md5(f) for f in self.output_files() if not TIMING_FILE.search(f)}

    # ------------------------------------------------------------ copies

    def copy_to(self, dest: Path) -> "PipelineRepo":
        """A complete copy: git history, DVC cache and workspace (outputs included)."""
        shutil.copytree(self.path, dest, symlinks=True)
        return PipelineRepo(dest)

    def clone_to(self, dest: Path) -> "PipelineRepo":
        """A fresh `git clone`: committed files only, no DVC cache and no cached outputs."""
        subprocess.run(["git", "clone", "-q", str(self.path), str(dest)], check=True, env=environment(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return PipelineRepo(dest)


def create_repo(path: Path, overrides: dict[str, Any] | None = None) -> PipelineRepo:
    """A new git repository holding the pipeline with TINY params (plus `overrides`), committed on main."""
    check_stages_present()
    path.mkdir(parents=True, exist_ok=True)
    inputs = pipeline_inputs()
    missing = [name for name in inputs if not (REPO_ROOT / name).exists()]
    if missing:
        pytest.fail(f"missing from the repository, but the pipeline needs them: {', '.join(missing)}")
    for name in inputs:
        if (REPO_ROOT / name).is_dir():
            (path / name).mkdir(parents=True, exist_ok=True)  # a dependency folder may hold nothing for git
    for name in _git_visible_files(inputs):
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    # .dvc/.gitignore keeps DVC's cache and tmp out of git, as `dvc init` would.
    (path / ".dvc/.gitignore").write_text("/config.local\n/tmp\n/cache\n", encoding="utf-8")
    repo = PipelineRepo(path)
    repo.set_params({**TINY, **(overrides or {})})
    repo.git("init", "-q", "-b", "main")
    # Local identity too: DVC's own git backends (pygit2, dulwich) do not all read the GIT_* variables.
    repo.git("config", "user.name", GIT_IDENTITY["GIT_AUTHOR_NAME"])
    repo.git("config", "user.email", GIT_IDENTITY["GIT_AUTHOR_EMAIL"])
    repo.git("config", "commit.gpgsign", "false")
    repo.commit("pipeline with tiny params")
    return repo


@dataclass
class Baseline:
    repo: PipelineRepo
    first: DvcRun  # the first `dvc repro`, which ran every stage
    commit: str  # the commit holding its dvc.lock and metrics


def build_baseline(path: Path) -> Baseline:
    """The pipeline at `path`, run once on TINY params and committed (conftest.py's session fixture `baseline`)."""
    repo = create_repo(path)
    first = repo.dvc("repro")
    return Baseline(repo, first, repo.commit("baseline run"))
