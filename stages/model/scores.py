"""Classification scores from labels and predictions, as scikit-learn defines them: the per-class precision,
recall, F1 and support that evaluate reports, and the macro-F1 that evaluate reports and train can select epochs
by (train.monitor: val_macro_f1). A ratio with a zero denominator (the precision of a class never predicted, the
recall of a class without images) is 0, as scikit-learn's `zero_division=0`; macro-F1 averages the classes that
occur among the labels or the predictions. tests/test_evaluate.py checks every number against scikit-learn."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassScores:
    """Per-class scores, float64, one entry per class index."""
    precision: torch.Tensor
    recall: torch.Tensor
    f1: torch.Tensor
    support: torch.Tensor  # int64: images of the class
    predicted: torch.Tensor  # int64: images predicted as the class

    @property
    def macro_f1(self) -> float:
        occurring = (self.support > 0) | (self.predicted > 0)
        return self.f1[occurring].mean().item()

    @property
    def balanced_accuracy(self) -> float:
        return self.recall[self.support > 0].mean().item()


def confusion_counts(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 num_classes x num_classes matrix: true class by row, predicted class by column."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def ratio_or_zero(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator in float64, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    numerator, denominator = numerator.double(), denominator.double()
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.zeros_like(numerator))


def class_scores(confusion: torch.Tensor) -> ClassScores:
    true_positives = confusion.diagonal()
    support, predicted = confusion.sum(1), confusion.sum(0)
    # F1 as 2 TP / (2 TP + FP + FN), as scikit-learn computes it: no rounding through precision and recall
    f1 = ratio_or_zero(2 * true_positives, support + predicted)
    return ClassScores(precision=ratio_or_zero(true_positives, predicted),
                       recall=ratio_or_zero(true_positives, support), f1=f1, support=support, predicted=predicted)


def macro_f1(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> float:
    return class_scores(confusion_counts(labels, predicted, num_classes)).macro_f1
