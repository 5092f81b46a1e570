"""Training health: warnings for a model that predicts (nearly) one class, and for a validation score that stays at
chance while training accuracy rises. A silent one-class model is the worst result a run can hand over, so train
(on the validation split), evaluate (on the test split) and the report all say it, naming what to try.

Plain Python on class indices, no torch: the rules are the same wherever they are applied."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

ONE_CLASS_SHARE = 0.9  # a model that gives one class to this share of the images has (nearly) collapsed ...
OVER_TRUE_SHARE = 0.3  # ... when that class is at least this much less common among the true labels
CHANCE_MARGIN = 0.02  # validation accuracy within this of the largest class's share is "at chance"
TRAIN_RISE = 0.2  # training accuracy this far above that share has clearly learnt something
# A few validation images cannot tell chance from learning: every gap must also exceed this many standard deviations
# of an accuracy (a share) measured on that many images, so a 12-image split does not cry wolf.
SIGMAS = 3
ADVICE = ("try a lower train.lr or train.bias_lr_scale, train.precision: fp32, or train.model: cnn, and check in "
          "the report's samples that the classes differ in the pictures")


def one_class_warning(split: str, labels: Sequence[int], predicted: Sequence[int],
                      classes: Sequence[str]) -> str | None:
    """A warning when the model gives one class to ONE_CLASS_SHARE or more of the `split` images although that
    class is much rarer among their true labels; None for a healthy model (or one class in truth as well)."""
    if not predicted or len(classes) < 2:
        return None
    top, count = Counter(predicted).most_common(1)[0]
    share, true_share = count / len(predicted), sum(label == top for label in labels) / len(labels)
    if share < ONE_CLASS_SHARE or share - true_share < max(OVER_TRUE_SHARE, noise(true_share, len(labels))):
        return None
    return (f"the model predicts class {classes[top]!r} for {share:.0%} of the {len(predicted)} {split} images "
            f"(it is {true_share:.0%} of them): it has collapsed to (nearly) one class; {ADVICE}")


def chance_warning(history: Sequence[dict[str, Any]], val_labels: Sequence[int]) -> str | None:
    """A warning when the last epoch's validation accuracy is at chance (the largest class's share of the
    validation split) while training accuracy has risen well above it."""
    last = history[-1] if history else None
    if last is None or last.get("val_acc") is None or not val_labels:
        return None
    chance = Counter(val_labels).most_common(1)[0][1] / len(val_labels)
    if last["val_acc"] > chance + CHANCE_MARGIN or \
            last["train_acc"] - last["val_acc"] < max(TRAIN_RISE, noise(chance, len(val_labels))):
        return None
    return (f"validation accuracy {last['val_acc']:.3f} is at chance ({chance:.3f}, the largest class's share) "
            f"while training accuracy rose to {last['train_acc']:.3f}: the model does not generalize; {ADVICE}")


def noise(share: float, images: int) -> float:
    """SIGMAS standard deviations of a share measured on `images` images (a binomial proportion)."""
    return SIGMAS * math.sqrt(share * (1 - share) / images)
