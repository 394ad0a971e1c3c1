"""Wilson intervals, percentiles and the config object."""

import pytest

from rsd.config import RSDConfig
from rsd.errors import ConfigError
from rsd.stats import percentiles, rate_estimate, wilson_interval

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
