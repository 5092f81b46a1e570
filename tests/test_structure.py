"""The pipeline's structure cannot drift from its code: each stage's code deps in dvc.yaml are exactly the stages/
files its script imports, and every data path dvc.yaml names is one that stages/base/paths.py defines.

A module missing from a stage's deps is the dangerous case: DVC would serve a stale result after that module
changed. An extra one only reruns a stage needlessly; both fail here."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.base import paths
from stages.base.paths import code_closure

from repo_root import REPO_ROOT

COMMAND = re.compile(r"^python -m (stages\.\w+)$")


def stages_of(dvc_yaml: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dvc_yaml["stages"]


def load_dvc_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))


def entry_path(entry: str | dict[str, Any]) -> str:
    """A deps/outs/metrics entry is a path, or a one-key mapping from the path to its options (cache: false)."""
    return entry if isinstance(entry, str) else next(iter(entry))


@functools.cache
def closure_of(module: str) -> frozenset[str]:
    return frozenset(str(path) for path in code_closure(module))


def code_files(deps: set[str]) -> set[str]:
    """The code files that stages/ deps name: a file as it is, a folder as every .py file below it (a stage may
    list a whole library folder, such as stages/base, when it imports all of it)."""
    files = set()
    for dep in deps:
        path = REPO_ROOT / dep
        files |= ({str(f.relative_to(REPO_ROOT)) for f in path.rglob("*.py")} if path.is_dir() else {dep})
    return files


def code_dep_mismatches(dvc_yaml: dict[str, Any]) -> list[str]:
    """For each stage, the stages/ files its command runs but dvc.yaml does not list, and the reverse."""
    problems = []
    for name, stage in stages_of(dvc_yaml).items():
        match = COMMAND.match(stage["cmd"])
        assert match, f"stage {name}: cmd {stage['cmd']!r} is not `python -m stages.<module>`"
        imported = closure_of(match.group(1))
        listed = code_files({entry_path(dep) for dep in stage.get("deps", [])
                             if entry_path(dep).startswith("stages/")})
        problems += [f"stage {name}: imports {path} but dvc.yaml does not list it"
                     for path in sorted(imported - listed)]
        problems += [f"stage {name}: dvc.yaml lists {path}, which it does not import"
                     for path in sorted(listed - imported)]
    return problems


def test_each_stage_lists_exactly_the_code_it_imports() -> None:
    assert code_dep_mismatches(load_dvc_yaml()) == []


def test_a_forgotten_module_is_caught() -> None:
    """The check above can fail: drop one code dep of each stage in turn and it must be reported."""
    for name, stage in stages_of(load_dvc_yaml()).items():
        code_deps = [dep for dep in stage["deps"] if entry_path(dep).startswith("stages/")]
        for dropped in code_deps:
            broken = load_dvc_yaml()
            broken["stages"][name]["deps"].remove(dropped)
            expected = [f"stage {name}: imports {path} but dvc.yaml does not list it"
                        for path in sorted(code_files({entry_path(dropped)}))]
            assert code_dep_mismatches(broken) == expected


def test_stage_names_scripts_and_functions_agree() -> None:
    """stage name = stages/<name>.py = its main(): the pipeline reads at a glance."""
    for name, stage in stages_of(load_dvc_yaml()).items():
        assert stage["cmd"] == f"python -m stages.{name}"
        source = (REPO_ROOT / "stages" / f"{name}.py").read_text(encoding="utf-8")
        assert "\ndef main() -> None:" in source and f"\ndef {name}(" in source, name


def defined_paths() -> set[str]:
    return {str(value) for value in vars(paths).values() if isinstance(value, Path)}


@pytest.mark.parametrize("kind", ["deps", "outs", "metrics"])
def test_dvc_yaml_data_paths_are_the_ones_the_stages_use(kind: str) -> None:
    """Every file or folder passed between stages is named once, in stages/base/paths.py; dvc.yaml must name the
    same."""
    known = defined_paths()
    for name, stage in stages_of(load_dvc_yaml()).items():
        for entry in stage.get(kind, []):
            path = entry_path(entry)
            if not path.startswith("stages/"):
                assert path in known, f"stage {name}: {kind} {path} is not defined in stages/base/paths.py"


def test_code_closure_follows_imports_transitively() -> None:
    """evaluate imports model.nets, which imports dataset.augment: augment, and the __init__ of every package on
    the way, are part of evaluate's code."""
    closure = {str(path) for path in code_closure("stages.evaluate")}
    assert {"stages/__init__.py", "stages/evaluate.py", "stages/model/__init__.py", "stages/model/nets.py",
            "stages/dataset/__init__.py", "stages/dataset/augment.py"} <= closure
    assert "stages/train.py" not in closure


def test_resume_fingerprint_hashes_the_train_stage_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume state is reused only by the same code: the fingerprint hashes the files of train's import closure,
    which are also its deps in dvc.yaml (so no hand-kept list can forget one)."""
    from stages.base.config import load_params
    from stages.model import resume

    hashed: list[Path] = []
    monkeypatch.setattr(resume, "file_digest", lambda path: hashed.append(Path(path)) or "digest")
    resume.fingerprint(load_params(REPO_ROOT / "params.yaml"), world=1)
    code = {str(path.resolve().relative_to(REPO_ROOT)) for path in hashed if path.suffix == ".py"}
    listed = code_files({entry_path(dep) for dep in stages_of(load_dvc_yaml())["train"]["deps"]
                         if entry_path(dep).startswith("stages/")})
    assert code == {str(path) for path in code_closure("stages.train")} == listed
