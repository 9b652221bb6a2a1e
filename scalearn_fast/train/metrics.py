"""GLUE metrics in numpy: accuracy, binary F1, Matthews correlation, Pearson and Spearman."""

from __future__ import annotations

import numpy as np


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if labels.size else float("nan")


def f1_binary(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = float(((preds == positive) & (labels == positive)).sum())
    fp = float(((preds == positive) & (labels != positive)).sum())
    fn = float(((preds != positive) & (labels == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation for binary labels (0 when a marginal is empty, as sklearn)."""
    preds, labels = np.asarray(preds).astype(bool), np.asarray(labels).astype(bool)
    tp = float((preds & labels).sum())
    tn = float((~preds & ~labels).sum())
    fp = float((preds & ~labels).sum())
    fn = float((~preds & labels).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    return 0.0 if denom == 0 else float((xc * yc).sum() / denom)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties given their average rank (scipy's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    for i in range(1, len(x) + 1):
        if i == len(x) or sorted_x[i] != sorted_x[start]:
            ranks[order[start:i]] = (start + i + 1) / 2.0
            start = i
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rankdata(x), rankdata(y))


# task -> (metric names, the main one used for early stopping and reports)
TASK_METRICS = {
    "rte": (("accuracy",), "accuracy"),
    "mrpc": (("accuracy", "f1"), "f1"),
    "sts-b": (("pearson", "spearman"), "pearson"),
    "cola": (("matthews", "accuracy"), "matthews"),
    "sst-2": (("accuracy",), "accuracy"),
    "qnli": (("accuracy",), "accuracy"),
    "mnli": (("accuracy",), "accuracy"),
    "qqp": (("accuracy", "f1"), "f1"),
    "wnli": (("accuracy",), "accuracy"),
}

_FUNCS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(task: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The GLUE metrics of ``task`` plus ``main`` (the task's headline metric)."""
    names, main = TASK_METRICS[task.lower()]
    out = {name: _FUNCS[name](preds, labels) for name in names}
    out["main"] = out[main]
    return out
