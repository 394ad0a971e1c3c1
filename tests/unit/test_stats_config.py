"""Wilson intervals, percentiles and the config object."""

import pytest

from rsd.config import RSDConfig
from rsd.errors import ConfigError
from rsd.stats import pass_threshold, percentiles, rate_estimate, wilson_interval

pytestmark = pytest.mark.unit


def test_wilson_known_values():
    low, high = wilson_interval(45, 50)  # 90 %
    assert low == pytest.approx(0.7864, abs=1e-3) and high == pytest.approx(0.9565, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for n in range(1, 60):  # the rate always lies inside its interval, also at 0 % and 100 %
        for k in (0, n // 2, n):
            low, high = wilson_interval(k, n)
            assert low <= k / n <= high
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    est = rate_estimate(45, 50)
    assert est.n == 50 and est.successes == 45 and est.rate == 0.9
    assert "45/50" in str(est)


def test_percentiles():
    assert percentiles([1, 2, 3, 4, 5]) == {"p50": 3.0, "p90": pytest.approx(4.6)}
    assert percentiles([]) == {"p50": None, "p90": None}


def _binomial_below(n: int, k: int, p: float) -> float:
    """P(successes < k) by brute force over every outcome sequence's count (independent of pass_threshold)."""
    import itertools

    total = 0.0
    for outcome in itertools.product((0, 1), repeat=n):
        s = sum(outcome)
        if s < k:
            total += p ** s * (1 - p) ** (n - s)
    return total


@pytest.mark.parametrize("n,p", [(8, 0.9), (10, 0.75), (12, 0.5), (6, 0.99)])
def test_pass_threshold_is_the_largest_count_failing_at_most_max_fail(n, p):
    k = pass_threshold(n, p, max_fail=0.05)
    assert _binomial_below(n, k, p) <= 0.05 < (_binomial_below(n, k + 1, p) if k < n else 1.0)


def test_pass_threshold_known_values_and_edges():
    assert pass_threshold(20, 0.964) == 16 and pass_threshold(20, 0.964, max_fail=0.006) == 17  # P(< 17) = 0.51 %
    # the nightly GPU test's thresholds from the pixel policy's full runs' Wilson lower bounds (478, 459, 492 of 500)
    assert [pass_threshold(50, wilson_interval(s, 500)[0]) for s in (478, 459, 492)] == [42, 38, 45]
    assert pass_threshold(30, 1.0) == 30 and pass_threshold(30, 0.0) == 0
    for bad in ((0, 0.5), (10, 1.5), (10, -0.1)):
        with pytest.raises(ValueError):
            pass_threshold(*bad)
    with pytest.raises(ValueError):
        pass_threshold(10, 0.5, max_fail=0.0)


def test_config_defaults_and_validation():
    cfg = RSDConfig()
    assert (cfg.chunk_len, cfg.action_dim, cfg.latent_dim, cfg.num_layers, cfg.num_levels, cfg.hidden_dim,
            cfg.draft_layers) == (8, 7, 16, 8, 7, 4096, 3)
    assert cfg.tokens_per_chunk == 1024
    assert RSDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="num_levels"):
        RSDConfig(num_levels=6)
    with pytest.raises(ConfigError, match="draft_layers"):
        RSDConfig(draft_layers=9)
    with pytest.raises(ConfigError, match="chunk_len"):
        RSDConfig(chunk_len=0)
    with pytest.raises(ConfigError, match="Unknown RSDConfig fields"):
        RSDConfig.from_dict({"chunk_len": 8, "bogus": 1})
