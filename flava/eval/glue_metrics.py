"""The official GLUE metrics besides accuracy (Wang et al. 2019, Table 1): Matthews correlation for CoLA, F1 of the
positive class for MRPC and QQP, Spearman correlation (with Pearson) for STS-B. Which task reports which is
``GlueTask.metrics`` in :mod:`flava.eval.official`; :mod:`flava.eval.finetune` computes them at the chosen epoch.

Degenerate inputs score 0 rather than dividing by zero, as scikit-learn does: a constant prediction or a single-class
target has Matthews correlation 0, F1 is 0 when there is no positive to find or predict, a constant series
correlates 0 with anything.

:func:`selection_score` scores a validation split by the metric a fine-tune chooses its epoch on (one of
:data:`SELECTION_METRICS`) and :func:`select_epoch` picks the epoch.
"""
from __future__ import annotations

from typing import Literal, Sequence, get_args

import numpy as np


def _confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(true class, predicted class) counts, ``num_classes`` square."""
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (target, pred), 1)
    return out


def _check_labels(pred: Sequence[int], target: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred, dtype=np.int64), np.asarray(target, dtype=np.int64)
    if pred.shape != target.shape or pred.ndim != 1 or pred.size == 0:
        raise ValueError(f"predictions {pred.shape} and targets {target.shape} must be equal non-empty 1-D")
    if min(pred.min(), target.min()) < 0:
        raise ValueError("class indices must be >= 0")
    return pred, target


def matthews_corrcoef(pred: Sequence[int], target: Sequence[int]) -> float:
    """Matthews correlation of class indices (Gorodkin's K-class form; for two classes
    ``(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``), 0 when either side is constant."""
    pred, target = _check_labels(pred, target)
    conf = _confusion(pred, target, int(max(pred.max(), target.max())) + 1).astype(np.float64)
    n = conf.sum()
    correct = np.trace(conf)
    true_per_class, pred_per_class = conf.sum(axis=1), conf.sum(axis=0)
    cov = correct * n - float(pred_per_class @ true_per_class)
    var_pred = n * n - float(pred_per_class @ pred_per_class)
    var_true = n * n - float(true_per_class @ true_per_class)
    if var_pred == 0 or var_true == 0:
        return 0.0
    return float(cov / np.sqrt(var_pred * var_true))


def f1_score(pred: Sequence[int], target: Sequence[int], positive: int = 1) -> float:
    """F1 of the ``positive`` class: ``2TP / (2TP + FP + FN)``, 0 when nothing is positive on either side."""
    pred, target = _check_labels(pred, target)
    hit_pred, hit_true = pred == positive, target == positive
    tp = int(np.sum(hit_pred & hit_true))
    wrong = int(np.sum(hit_pred != hit_true))  # FP + FN
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (``[10, 20, 20, 30]`` -> ``[1, 2.5, 2.5, 4]``)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(group, weights=ranks)
    return sums[group] / counts[group]


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson r, 0 when either series is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"series {x.shape} and {y.shape} must be equal non-empty 1-D")
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float((x @ y) / denom) if denom > 0 else 0.0


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson r of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


# The validation score a fine-tune picks its epoch on; ``GlueTask.select_on`` in :mod:`flava.eval.official` names
# each GLUE task's. ``f1_accuracy_mean`` is (F1 + accuracy) / 2, GLUE's score of a task reporting both.
SelectionMetric = Literal["accuracy", "mcc", "f1_accuracy_mean", "pearson", "spearman"]
SELECTION_METRICS: tuple[SelectionMetric, ...] = get_args(SelectionMetric)
CLASSIFICATION_SELECTION: tuple[SelectionMetric, ...] = ("accuracy", "mcc", "f1_accuracy_mean")
REGRESSION_SELECTION: tuple[SelectionMetric, ...] = ("pearson", "spearman")


def selection_score(metric: SelectionMetric, outputs: Sequence[float], target: Sequence[float],
                    positive: int = 1) -> float:
    """``metric`` of one split: ``outputs`` are predicted class indices for the classification metrics (``positive``
    is F1's class), predicted values for ``pearson`` / ``spearman``."""
    if metric in REGRESSION_SELECTION:
        return pearson(outputs, target) if metric == "pearson" else spearman(outputs, target)
    pred, target = _check_labels(outputs, target)
    if metric == "mcc":
        return matthews_corrcoef(pred, target)
    accuracy = float(np.mean(pred == target))
    if metric == "accuracy":
        return accuracy
    if metric == "f1_accuracy_mean":
        return (f1_score(pred, target, positive) + accuracy) / 2
    raise ValueError(f"unknown selection metric {metric!r}; choose from {SELECTION_METRICS}")


def select_epoch(scores: Sequence[float]) -> int:
    """Index of the best of the per-epoch validation ``scores``, the first one on ties."""
    if not len(scores):
        raise ValueError("no epoch to select from")
    return max(range(len(scores)), key=lambda i: scores[i])
