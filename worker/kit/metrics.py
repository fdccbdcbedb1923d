"""Validation metrics: accuracy and macro-F1 (classification), Pearson and Spearman (regression)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def primary_metric_name(task_type: str) -> str:
    """The metric a task is judged by: accuracy, or Pearson correlation for regression."""
    return "pearson" if task_type == "regression" else "accuracy"


def classification_metrics(
    predictions: Sequence[int], labels: Sequence[int], num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 (averaged over every label id, absent ones scoring 0)."""
    pred = np.asarray(predictions, dtype=np.int64)
    gold = np.asarray(labels, dtype=np.int64)
    if pred.shape != gold.shape or pred.size == 0:
        raise ValueError("predictions and labels must be non-empty and of equal length")
    f1s = []
    for label in range(num_labels):
        tp = float(np.sum((pred == label) & (gold == label)))
        fp = float(np.sum((pred == label) & (gold != label)))
        fn = float(np.sum((pred != label) & (gold == label)))
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float(np.mean(pred == gold)), "macro_f1": float(np.mean(f1s))}


def regression_metrics(predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlations (0.0 when either side is constant) and MSE."""
    from scipy.stats import pearsonr, spearmanr

    pred = np.asarray(predictions, dtype=np.float64)
    gold = np.asarray(labels, dtype=np.float64)
    if pred.shape != gold.shape or pred.size < 2:
        raise ValueError("regression metrics need at least two predictions and equal lengths")
    mse = float(np.mean((pred - gold) ** 2))
    if np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return {"pearson": 0.0, "spearman": 0.0, "mse": mse}
    pearson = float(pearsonr(pred, gold)[0])
    spearman = float(spearmanr(pred, gold)[0])
    return {
        "pearson": 0.0 if math.isnan(pearson) else pearson,
        "spearman": 0.0 if math.isnan(spearman) else spearman,
        "mse": mse,
    }


def task_metrics(
    task_type: str, predictions: Sequence, labels: Sequence, num_labels: int
) -> dict[str, float | str]:
    """The metrics of a task type plus `metric_name` and `metric` (its primary value)."""
    if task_type == "regression":
        metrics: dict[str, float | str] = dict(regression_metrics(predictions, labels))
    else:
        metrics = dict(classification_metrics(predictions, labels, num_labels))
    name = primary_metric_name(task_type)
    metrics["metric_name"] = name
    metrics["metric"] = metrics[name]
    return metrics
