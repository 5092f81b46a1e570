"""Model selection for train: which epoch's weights an ensemble member keeps (train.keep: last | best), by which
number on the validation split (train.monitor: val_loss | val_acc | val_macro_f1), and early stopping
(train.patience: end the member after that many epochs without a better number; 0 = off).

An epoch is better only when its number is strictly better, so a tie keeps the earlier epoch (fewer epochs, the
same score). The numbers are compared at full precision; history.csv shows them to 6 digits. The weights compared
and kept are the ones validated, which are the ones train saves (the EMA average when train.averaging is ema).
The learning-rate schedule still spans train.epochs: early stopping ends a member part-way through it. The best
epoch is tracked whenever there is a validation split, so a `keep: last` run still says whether an earlier epoch
was better. The whole state, the best weights included, goes into the resume checkpoint, so a killed run resumes
to the same bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

LOWER_IS_BETTER = {"val_loss": True, "val_acc": False, "val_macro_f1": False}  # the train.monitor choices
STATE_FIELDS = ("best_epoch", "best_value", "best_weights", "epochs_since_best", "stopped_after")


@dataclass
class Selection:
    """One member's selection so far. Epochs are 1-based, as in history.csv."""
    keep: str
    monitor: str
    patience: int
    best_epoch: int | None = None
    best_value: float | None = None
    best_weights: dict[str, torch.Tensor] | None = None  # only with keep: best (on the rank that validates)
    epochs_since_best: int = 0
    stopped_after: int | None = None  # the epoch after which train.patience ended the member

    @classmethod
    def start(cls, cfg: dict[str, Any], state: dict[str, Any] | None = None) -> Selection:
        """A fresh selection for the train params `cfg`, or the one a resume checkpoint holds."""
        selection = cls(cfg["keep"], cfg["monitor"], cfg["patience"])
        for name in STATE_FIELDS if state is not None else ():
            setattr(selection, name, state[name])
        return selection

    def state(self) -> dict[str, Any]:
        """What the resume checkpoint holds (Selection.start restores it)."""
        return {name: getattr(self, name) for name in STATE_FIELDS}

    @property
    def stopped(self) -> bool:
        return self.stopped_after is not None

    def is_better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value < self.best_value if LOWER_IS_BETTER[self.monitor] else value > self.best_value

    def after_epoch(self, epoch: int, scores: dict[str, float] | None,
                    weights: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Account for `epoch` with its validation `scores` (None on ranks that do not validate): remember it if
        it is the best so far (and its weights, from `weights()`, with keep: best), and stop the member when
        train.patience epochs have passed without a better one."""
        if scores is None:
            return
        value = scores[self.monitor]
        if self.is_better(value):
            self.best_epoch, self.best_value, self.epochs_since_best = epoch, value, 0
            if self.keep == "best":
                self.best_weights = weights()
        else:
            self.epochs_since_best += 1
        if self.patience and self.epochs_since_best >= self.patience:
            self.stopped_after = epoch

    def kept_epoch(self, last_epoch: int) -> int:
        """The epoch whose weights the member keeps once `last_epoch` is its last one trained."""
        if self.keep == "best" and self.best_epoch is not None:
            return self.best_epoch
        return last_epoch

    def record(self, last_epoch: int, planned_epochs: int) -> dict[str, Any]:
        """What the checkpoint and the report say about the member: the epoch kept and why."""
        best = self.best_value is not None
        return {"kept_epoch": self.kept_epoch(last_epoch), "epochs_trained": last_epoch,
                "best_epoch": self.best_epoch, "best_value": round(self.best_value, 6) if best else None,
                "stopped_early": self.stopped, "reason": self.reason(last_epoch, planned_epochs)}

    def reason(self, last_epoch: int, planned_epochs: int) -> str:
        lowest = "lowest" if LOWER_IS_BETTER[self.monitor] else "highest"
        better = "lower" if LOWER_IS_BETTER[self.monitor] else "higher"
        waited = f"{self.epochs_since_best} epoch{'' if self.epochs_since_best == 1 else 's'}"
        stop = (f"train.patience: {self.patience} ended training after epoch {last_epoch} of {planned_epochs}, "
                f"{waited} without a {better} {self.monitor}") if self.stopped else ""
        if self.keep == "best" and self.best_value is not None:  # (ranks > 0 do not validate and keep nothing)
            text = (f"train.keep: best: epoch {self.best_epoch} of {last_epoch} trained had the {lowest} "
                    f"{self.monitor} ({self.best_value:.6g})")
            return f"{text}; {stop}" if stop else text
        text = (f"train.keep: {self.keep}: the weights after epoch {last_epoch}"
                + (f"; {stop}" if stop else f", the final one of {planned_epochs}"))
        if self.best_value is not None:
            text += f"; the {lowest} {self.monitor}, {self.best_value:.6g}, was at epoch {self.best_epoch}"
        return text
