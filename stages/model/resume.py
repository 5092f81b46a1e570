"""The train stage's resume checkpoint: what a run has produced so far (Progress), the fingerprint that binds a
resume file to one run, and reading and writing the file after every epoch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from stages.base.paths import (FEATURES_TRAIN, FEATURES_VAL, META_JSON, PACKAGE_DIR, RESUME_PATH, TRAIN_SPLIT,
                               VAL_SPLIT, code_closure)
from stages.base.runtime import PipelineError, file_digest
from stages.model.weights import weights_file
from stages.model.tensors import load_torch, save_torch

RESUME_FIELDS = frozenset({"fingerprint", "member", "members", "selections", "epoch", "elapsed", "history", "model",
                           "optimizers", "average", "selection"})  # what save_resume writes


@dataclass
class Progress:
    """What a training run has produced so far, which a resumed run carries on from: the finished members'
    weights and their selection records, the per-epoch history rows, and the seconds spent training."""
    members: list[dict[str, torch.Tensor]] = field(default_factory=list)
    selections: list[dict[str, Any]] = field(default_factory=list)  # Selection.record of each finished member
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0

    def epochs_trained(self, member: int | None = None) -> int:
        """The last epoch in the history of `member` (1-based), or of any member: the most any has trained."""
        return max(row["epoch"] for row in self.history if member is None or row["member"] == member)

    def row(self, member: int, epoch: int) -> dict[str, Any]:
        """The history row of `member` (1-based) at `epoch` (1-based)."""
        return next(row for row in self.history if row["member"] == member and row["epoch"] == epoch)


def fingerprint(params: dict[str, Any], world: int) -> str:
    """Identifies a training run: the train params, the data files, the starting weights, the code training
    runs (every stages module `python -m stages.train` imports), the torch version and the process count. A
    resume checkpoint from any other run is ignored, so an edit to the code never resumes from weights of the old
    code."""
    digest = hashlib.sha256(json.dumps(params["train"], sort_keys=True).encode())
    files = [TRAIN_SPLIT, VAL_SPLIT, META_JSON]
    files += [PACKAGE_DIR.parent / path for path in code_closure("stages.train")]
    train = params["train"]
    for key in ("pretrained", "init"):  # weights_file: the clear error for a missing file
        if train[key] != "none":
            files.append(weights_file(key, train[key], train["model"]))
    if train["cache_features"]:
        files += [FEATURES_TRAIN, FEATURES_VAL]
    for path in files:
        digest.update(file_digest(path).encode())
    digest.update(f"{torch.__version__} world={world}".encode())
    return digest.hexdigest()


def resume_run(run_fingerprint: str, ensemble: int,
               log_main: Callable[[str], None]) -> tuple[Progress, dict[str, Any] | None]:
    """The progress an interrupted attempt at the run `run_fingerprint` left, and its resume checkpoint, from which
    the member in progress resumes; a fresh Progress and None when there is none to use (`log_main` says why)."""
    if not RESUME_PATH.is_file():
        return Progress(), None
    try:
        state = load_torch(RESUME_PATH, "resume checkpoint")
    except PipelineError as error:  # truncated, damaged or unreadable: it only saves time, so start afresh
        log_main(f"ignoring {RESUME_PATH}: {str(error).removeprefix(f'{RESUME_PATH}: ')}; training from the start "
                 f"(the file is replaced after the first epoch)")
        return Progress(), None
    if not isinstance(state, dict) or state.get("fingerprint") != run_fingerprint:
        log_main(f"ignoring {RESUME_PATH}: it belongs to other params or data")
        return Progress(), None
    missing = sorted(RESUME_FIELDS - set(state))
    if missing:
        log_main(f"ignoring {RESUME_PATH}: it lacks {', '.join(missing)}; training from the start")
        return Progress(), None
    log_main(f"resuming after epoch {state['epoch']}"
             + (f" of member {state['member'] + 1}" if ensemble > 1 else "") + f" from {RESUME_PATH}")
    progress = Progress(list(state["members"]), list(state["selections"]), list(state["history"]), state["elapsed"])
    return progress, state


def save_resume(run_fingerprint: str, progress: Progress, member: int, epochs_done: int,
                member_state: dict[str, Any]) -> None:
    """Everything needed to continue after epoch `epochs_done` of member `member` (0-based): the run's progress
    and `member_state`, that member's model, optimizers, average and selection."""
    save_torch({"fingerprint": run_fingerprint, "member": member, "members": progress.members,
                "selections": progress.selections, "epoch": epochs_done, "elapsed": progress.elapsed,
                "history": progress.history, **member_state}, RESUME_PATH)
