"""Paired intervals for differences between two methods evaluated on the same records and seeds.

Each method gives, per task, one array per seed with one row per dev record (rows in the same record order
for both methods: `align_records` puts them there by record id). A statistic maps one seed's {task: rows}
to a number (accuracy, mean ROUGE-L, perplexity from summed NLL / tokens, or a composite such as relative
performance). The difference is the mean over seeds of statistic(a) - statistic(b), each on all records.

`paired_interval` picks the interval by the number of seeds S:
  S = 1:      no seed-level interval; a bootstrap over records only ("one seed: record noise only").
  2 <= S <= 5: mean +- t(S-1) * sd / sqrt(S) over the per-seed differences. Resampling 2-5 seeds returns
              about [min, max] of them, which is too narrow.
  S > 5:      a percentile bootstrap: each replicate draws S seeds with replacement and ONE record vector
              per task, shared by every drawn seed (a per-record effect that persists across seeds stays in).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .errors import ATPError

PerSeed = Mapping[str, Sequence]  # task -> [seed] -> rows (array-like, first axis = records)
Statistic = Callable[[dict[str, np.ndarray]], float]
T_MAX_SEEDS = 5  # up to this many seeds the interval is a t-interval, above it the bootstrap
INTERVAL_T = "t over seeds"
INTERVAL_BOOTSTRAP = "bootstrap over seeds and records"
INTERVAL_RECORDS = "one seed: record noise only"


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
        raise ATPError(f"paired difference: the methods cover different tasks ({sorted(a)} vs {sorted(b)})")
    seeds = {len(v) for v in a.values()} | {len(v) for v in b.values()}
    if len(seeds) != 1:
        raise ATPError("paired difference: every task of both methods needs the same seeds")
    for task in a:
        if a[task][0].shape[0] != b[task][0].shape[0]:
            raise ATPError(f"paired difference: task {task} has {a[task][0].shape[0]} records for one method "
                           f"and {b[task][0].shape[0]} for the other")
    return seeds.pop()


def align_records(cells: Mapping[str, tuple[Sequence[str] | None, Sequence]], what: str = "") -> list[np.ndarray]:
    """Rows of several cells (name -> (record ids, rows)) in one record order, the first cell's, paired by id.
    A cell with no ids (results from before records had them) makes every cell pair by position. Cells whose
    id sets differ were not evaluated on the same records: an error naming them."""
    names = list(cells)
    rows = {name: np.asarray(cells[name][1], dtype=float) for name in names}
    ids = {name: None if cells[name][0] is None else list(cells[name][0]) for name in names}
    where = f" ({what})" if what else ""
    if any(v is None for v in ids.values()):
        sizes = {name: len(r) for name, r in rows.items()}
        if len(set(sizes.values())) > 1:
            raise ATPError(f"records differ{where}: " + ", ".join(f"{n} has {k}" for n, k in sizes.items())
                           + " records; evaluate the cells on the same records")
        return [rows[name] for name in names]
    first = names[0]
    order = {record: i for i, record in enumerate(ids[first])}
    for name in names:
        if len(set(ids[name])) != len(ids[name]):
            raise ATPError(f"{name}{where}: record ids repeat; its per-record results cannot be paired")
    aligned = []
    for name in names:
        mine = {record: i for i, record in enumerate(ids[name])}
        if mine.keys() != order.keys():
            only = len(mine.keys() ^ order.keys())
            raise ATPError(f"records differ between {first} and {name}{where}: {only} record ids are in one "
                           "and not the other; evaluate both on the same records")
        aligned.append(rows[name][[mine[record] for record in ids[first]]])
    return aligned


def seed_differences(a: PerSeed, b: PerSeed, statistic: Statistic) -> np.ndarray:
    """statistic(a) - statistic(b) for each seed, each on all records."""
    a, b = _as_arrays("first method", a), _as_arrays("second method", b)
    seeds = _check_paired(a, b)
    return np.array([statistic({t: v[s] for t, v in a.items()}) - statistic({t: v[s] for t, v in b.items()})
                     for s in range(seeds)])


def point_difference(a: PerSeed, b: PerSeed, statistic: Statistic) -> float:
    """Mean over seeds of statistic(a) - statistic(b), on all records."""
    return float(np.mean(seed_differences(a, b, statistic)))


def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with a whole number of degrees of freedom (closed form, no scipy needed)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):  # cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ... up to cos^(df-2)
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):  # 1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The t value with P(|T| <= t) = confidence, e.g. 12.706 for df 1 and 4.303 for df 2 at 95%."""
    if df < 1 or not 0 < confidence < 1:
        raise ATPError(f"t quantile needs df >= 1 and confidence in (0, 1), got df {df}, confidence {confidence}")
    low, high = 0.0, 1.0
    while t_cdf_two_sided(high, df) < confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf_two_sided(mid, df) < confidence else (low, mid)
    return (low + high) / 2


def t_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean +- t(S-1) * sd / sqrt(S) over S >= 2 per-seed differences."""
    values = np.asarray(differences, dtype=float)
    if len(values) < 2:
        raise ATPError("a t-interval needs at least two seeds")
    mean = float(values.mean())
    half = t_quantile(len(values) - 1, confidence) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def bootstrap_difference(a: PerSeed, b: PerSeed, statistic: Statistic, *, resamples: int = 2000,
                         confidence: float = 0.95, seed: int = 0) -> dict:
    """Point difference (a - b) and its percentile bootstrap interval over seeds and records. Each replicate
    draws the seeds with replacement and one record vector per task, used for every drawn seed."""
    a, b = _as_arrays("first method", a), _as_arrays("second method", b)
    seeds = _check_paired(a, b)
    rng = np.random.default_rng(seed)
    sizes = {task: v[0].shape[0] for task, v in a.items()}
    diffs = np.empty(resamples)
    for i in range(resamples):
        drawn = rng.integers(0, seeds, size=seeds)
        rows = {task: rng.integers(0, n, size=n) for task, n in sizes.items()}
        diffs[i] = np.mean([statistic({t: a[t][s][rows[t]] for t in a}) - statistic({t: b[t][s][rows[t]] for t in b})
                            for s in drawn])
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    point = point_difference(a, b, statistic)
    return {"diff": point, "low": float(low), "high": float(high), "confidence": confidence,
            "seeds": seeds, "records": sizes, "resamples": resamples, "verdict": verdict(float(low), float(high))}


def verdict(low: float, high: float) -> str:
    return "a ahead" if low > 0 else "b ahead" if high < 0 else "tie"


def judged(result: dict, higher_is_better: bool, name: str = "a") -> str:
    """A paired_interval result's verdict for a measure's direction: "NAME better", "NAME worse" or "tie" ("a
    ahead" only says a's value is higher, which for perplexity is worse)."""
    if result["verdict"] == "tie":
        return "tie"
    return f"{name} {'better' if (result['low'] > 0) == higher_is_better else 'worse'}"


def paired_interval(a: PerSeed, b: PerSeed, statistic: Statistic, *, confidence: float = 0.95,
                    resamples: int = 2000, seed: int = 0) -> dict:
    """The difference a - b with the interval its number of seeds allows (see the module's docstring);
    `interval` names the kind, `per_seed` holds the per-seed differences."""
    per_seed = seed_differences(a, b, statistic)
    count = len(per_seed)
    if count == 1 or count > T_MAX_SEEDS:
        result = bootstrap_difference(a, b, statistic, resamples=resamples, confidence=confidence, seed=seed)
        result["interval"] = INTERVAL_RECORDS if count == 1 else INTERVAL_BOOTSTRAP
    else:
        mean, low, high = t_interval(per_seed, confidence)
        records = {task: len(v[0]) for task, v in a.items()}
        result = {"diff": mean, "low": low, "high": high, "confidence": confidence, "seeds": count,
                  "records": records, "verdict": verdict(low, high), "interval": INTERVAL_T}
    result["per_seed"] = [float(d) for d in per_seed]
    return result


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
