import math

import numpy as np
import pytest

from atp.errors import ATPError
from atp.stats import (
    INTERVAL_BOOTSTRAP,
    INTERVAL_RECORDS,
    INTERVAL_T,
    align_records,
    bootstrap_difference,
    mean_of,
    paired_interval,
    perplexity_of,
    point_difference,
    t_quantile,
)


def _accuracy(p, n, seeds, rng):
    return {"mc": [(rng.random(n) < p).astype(float) for _ in range(seeds)]}


def test_a_real_gap_has_an_interval_above_zero():
    rng = np.random.default_rng(1)
    a, b = _accuracy(0.7, 400, 3, rng), _accuracy(0.4, 400, 3, rng)
    result = bootstrap_difference(a, b, mean_of("mc"), resamples=300)
    assert result["low"] > 0.15 and result["verdict"] == "a ahead"
    assert result["low"] < result["diff"] < result["high"]


def test_same_distribution_is_a_tie_and_identical_inputs_give_zero():
    rng = np.random.default_rng(2)
    a, b = _accuracy(0.5, 200, 3, rng), _accuracy(0.5, 200, 3, rng)
    assert bootstrap_difference(a, b, mean_of("mc"), resamples=300)["verdict"] == "tie"
    same = bootstrap_difference(a, a, mean_of("mc"), resamples=50)
    assert same["diff"] == same["low"] == same["high"] == 0.0


def test_pairing_shrinks_the_interval():
    """A constant per-record advantage on noisy records: paired resampling sees it exactly."""
    rng = np.random.default_rng(3)
    base = rng.normal(30, 10, size=(2, 100))
    a, b = {"rouge": list(base + 1.0)}, {"rouge": list(base)}
    result = bootstrap_difference(a, b, mean_of("rouge"), resamples=200)
    assert result["low"] == pytest.approx(1.0) and result["high"] == pytest.approx(1.0)


def test_perplexity_statistic_is_exp_of_token_weighted_nll():
    rows = {"ppl": np.array([[10.0, 5.0], [2.0, 3.0]])}
    assert perplexity_of("ppl")(rows) == pytest.approx(math.exp(12.0 / 8.0))
    a = {"ppl": [rows["ppl"]]}
    b = {"ppl": [np.array([[8.0, 5.0], [2.0, 3.0]])]}
    assert point_difference(a, b, perplexity_of("ppl")) == pytest.approx(math.exp(1.5) - math.exp(10 / 8))


def test_unpaired_inputs_are_refused():
    a = {"mc": [np.ones(5)]}
    with pytest.raises(ATPError, match="records"):
        bootstrap_difference(a, {"mc": [np.ones(6)]}, mean_of("mc"))
    with pytest.raises(ATPError, match="different tasks"):
        bootstrap_difference(a, {"other": [np.ones(5)]}, mean_of("mc"))
    with pytest.raises(ATPError, match="same seeds"):
        bootstrap_difference(a, {"mc": [np.ones(5), np.ones(5)]}, mean_of("mc"))


def test_t_interval_over_three_seeds_by_hand():
    """Per-seed differences 1, 2, 6 (each on all records): mean 3, sd sqrt(7), t(2, 0.975) = 4.302653."""
    a = {"mc": [np.array([2.0, 2.0]), np.array([3.0, 3.0]), np.array([7.0, 7.0])]}
    b = {"mc": [np.array([1.0, 1.0])] * 3}
    result = paired_interval(a, b, mean_of("mc"))
    half = 4.302652729 * math.sqrt(7) / math.sqrt(3)
    assert result["interval"] == INTERVAL_T and result["seeds"] == 3 and result["per_seed"] == [1.0, 2.0, 6.0]
    assert result["diff"] == pytest.approx(3.0)
    assert result["low"] == pytest.approx(3.0 - half, abs=1e-6)
    assert result["high"] == pytest.approx(3.0 + half, abs=1e-6)
    assert result["verdict"] == "tie"  # [-3.57, +9.57]; resampling three seeds would give about [1, 6]
    assert t_quantile(1) == pytest.approx(12.7062047, abs=1e-6) and t_quantile(4) == pytest.approx(2.7764451, abs=1e-6)
    assert t_quantile(30) == pytest.approx(2.0422725, abs=1e-6)


def test_bootstrap_shares_one_record_vector_across_drawn_seeds():
    """A persistent per-record effect (the same records favour a in every seed): drawing a fresh record vector
    per drawn seed averages it down; one vector per replicate keeps it."""
    rng = np.random.default_rng(4)
    effect = rng.normal(0, 1, size=40)
    seeds = 8
    a = {"x": [effect + rng.normal(0, 0.05, size=40) for _ in range(seeds)]}
    b = {"x": [np.zeros(40) for _ in range(seeds)]}
    shared = bootstrap_difference(a, b, mean_of("x"), resamples=400)
    # the old per-seed draws, for comparison
    fresh = []
    for _ in range(400):
        drawn = rng.integers(0, seeds, size=seeds)
        fresh.append(np.mean([a["x"][s][rng.integers(0, 40, size=40)].mean() for s in drawn]))
    fresh_width = np.quantile(fresh, 0.975) - np.quantile(fresh, 0.025)
    shared_width = shared["high"] - shared["low"]
    assert shared_width > 2 * fresh_width  # sqrt(8) narrower with fresh draws
    sd = effect.std(ddof=1) / math.sqrt(40)  # the record-level standard error of the mean effect
    assert shared_width == pytest.approx(2 * 1.96 * sd, rel=0.25)
    assert paired_interval(a, b, mean_of("x"), resamples=50)["interval"] == INTERVAL_BOOTSTRAP  # more than 5 seeds


def test_records_are_paired_by_id_not_position():
    ids = [f"r{i}" for i in range(6)]
    values = np.arange(6.0)
    order = [3, 0, 5, 1, 4, 2]
    shuffled = ([ids[i] for i in order], values[order] + 1)
    aligned = align_records({"atp seed 0": (ids, values), "taylor seed 0": shuffled})
    assert list(aligned[0]) == list(values) and list(aligned[1]) == list(values + 1)
    with pytest.raises(ATPError, match="records differ between atp seed 0 and taylor seed 0"):
        align_records({"atp seed 0": (ids, values), "taylor seed 0": (ids[:5] + ["r9"], values)})
    assert len(align_records({"old": (None, values), "new": (ids, values)})) == 2  # older results: by position


def test_one_seed_has_no_seed_level_interval():
    rng = np.random.default_rng(5)
    a, b = _accuracy(0.6, 200, 1, rng), _accuracy(0.5, 200, 1, rng)
    result = paired_interval(a, b, mean_of("mc"), resamples=300)
    assert result["interval"] == INTERVAL_RECORDS == "one seed: record noise only"
    assert result["low"] < result["diff"] < result["high"] and result["seeds"] == 1


def test_evaluated_records_get_content_ids():
    from atp.evaluation import content_ids

    ids = content_ids([{"q": "a"}, {"q": "b"}, {"q": "a"}])
    assert ids[0] != ids[1] and ids[2] == ids[0] + "#2"
    assert content_ids([{"q": "b"}]) == [ids[1]]  # from the content, not the position


def test_judged_reads_the_verdict_in_the_measure_direction():
    from atp.stats import judged

    higher = {"verdict": "a ahead", "low": 2.0, "high": 5.0}
    lower = {"verdict": "b ahead", "low": -5.0, "high": -2.0}
    assert judged(higher, higher_is_better=True) == "a better"
    assert judged(higher, higher_is_better=False) == "a worse"  # a's perplexity is higher
    assert judged(lower, higher_is_better=False, name="atp-paper") == "atp-paper better"
    assert judged({"verdict": "tie", "low": -1.0, "high": 1.0}, higher_is_better=False) == "tie"
