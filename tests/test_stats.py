import math

import numpy as np
import pytest

from atp.errors import ATPError
from atp.stats import bootstrap_difference, mean_of, perplexity_of, point_difference


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
