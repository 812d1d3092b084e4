"""Paired bootstrap intervals for differences between two methods evaluated on the same records and seeds.

Each method gives, per task, one array per seed with one row per dev record (records in the same order
for both methods). A resample draws seeds with replacement, then records with replacement within each
task; both methods get the same draw, so the interval is for the paired difference. A statistic maps one
seed's resampled {task: rows} to a number (accuracy, mean ROUGE-L, perplexity from summed NLL / tokens,
or a composite such as relative performance); the difference is the mean over the drawn seeds.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .errors import ATPError

PerSeed = Mapping[str, Sequence]  # task -> [seed] -> rows (array-like, first axis = records)
Statistic = Callable[[dict[str, np.ndarray]], float]


def _as_arrays(name: str, values: PerSeed) -> dict[str, list[np.ndarray]]:
    arrays = {task: [np.asarray(rows, dtype=float) for rows in seeds] for task, seeds in values.items()}
    for task, seeds in arrays.items():
        if not seeds:
            raise ATPError(f"{name}: task {task} has no seeds")
        if any(len(rows) != len(seeds[0]) for rows in seeds):
            raise ATPError(f"{name}: task {task} has a different number of records per seed")
    return arrays


def _check_paired(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> int:
    if set(a) != set(b):
        raise ATPError(f"paired bootstrap: the methods cover different tasks ({sorted(a)} vs {sorted(b)})")
    seeds = {len(v) for v in a.values()} | {len(v) for v in b.values()}
    if len(seeds) != 1:
        raise ATPError("paired bootstrap: every task of both methods needs the same seeds")
    for task in a:
        if a[task][0].shape[0] != b[task][0].shape[0]:
            raise ATPError(f"paired bootstrap: task {task} has {a[task][0].shape[0]} records for one method "
                           f"and {b[task][0].shape[0]} for the other")
    return seeds.pop()


def point_difference(a: PerSeed, b: PerSeed, statistic: Statistic) -> float:
    """Mean over seeds of statistic(a) - statistic(b), on all records."""
    a, b = _as_arrays("first method", a), _as_arrays("second method", b)
    seeds = _check_paired(a, b)
    return float(np.mean([statistic({t: v[s] for t, v in a.items()}) - statistic({t: v[s] for t, v in b.items()})
                          for s in range(seeds)]))


def bootstrap_difference(a: PerSeed, b: PerSeed, statistic: Statistic, *, resamples: int = 2000,
                         confidence: float = 0.95, seed: int = 0) -> dict:
    """Point difference (a - b) and its percentile bootstrap interval over seeds and records."""
    a, b = _as_arrays("first method", a), _as_arrays("second method", b)
    seeds = _check_paired(a, b)
    rng = np.random.default_rng(seed)
    sizes = {task: v[0].shape[0] for task, v in a.items()}
    diffs = np.empty(resamples)
    for i in range(resamples):
        drawn = rng.integers(0, seeds, size=seeds)
        total = 0.0
        for s in drawn:
            rows = {task: rng.integers(0, n, size=n) for task, n in sizes.items()}
            total += (statistic({t: a[t][s][rows[t]] for t in a}) - statistic({t: b[t][s][rows[t]] for t in b}))
        diffs[i] = total / seeds
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    point = float(np.mean([statistic({t: v[s] for t, v in a.items()}) - statistic({t: v[s] for t, v in b.items()})
                           for s in range(seeds)]))
    return {"diff": point, "low": float(low), "high": float(high), "confidence": confidence,
            "seeds": seeds, "records": sizes, "resamples": resamples,
            "verdict": "a ahead" if low > 0 else "b ahead" if high < 0 else "tie"}


def mean_of(task: str, column: int | None = None) -> Statistic:
    """Statistic: the mean of one task's per-record values (accuracy 0/1, ROUGE-L)."""
    def statistic(rows: dict[str, np.ndarray]) -> float:
        values = rows[task] if column is None else rows[task][:, column]
        return float(values.mean())
    return statistic


def perplexity_of(task: str) -> Statistic:
    """Statistic: exp(sum NLL / sum tokens) over one task's records, rows being (summed NLL, tokens)."""
    def statistic(rows: dict[str, np.ndarray]) -> float:
        return float(np.exp(rows[task][:, 0].sum() / max(rows[task][:, 1].sum(), 1.0)))
    return statistic
