"""Small statistics used for reporting: success-rate intervals and latency percentiles."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

__all__ = ["RateEstimate", "wilson_interval", "rate_estimate", "percentiles", "pass_threshold"]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial rate (95 % for z=1.96). ``n == 0`` gives ``(0.0, 1.0)``."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # clamp so that float rounding never puts the point estimate outside its own interval (e.g. 6/6 -> high 0.99999...)
    return min(max(0.0, centre - half), p), max(min(1.0, centre + half), p)


@dataclass(frozen=True)
class RateEstimate:
    n: int
    successes: int
    rate: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.successes}/{self.n} = {100 * self.rate:.1f}% "
                f"(95% CI {100 * self.ci_low:.1f}-{100 * self.ci_high:.1f})")


def rate_estimate(successes: int, n: int) -> RateEstimate:
    low, high = wilson_interval(successes, n)
    return RateEstimate(n=n, successes=successes, rate=(successes / n if n else 0.0), ci_low=low, ci_high=high)


def percentiles(values: Iterable[float], qs: tuple[float, ...] = (50, 90)) -> dict[str, float | None]:
    """``{"p50": ..., "p90": ...}``; ``None`` for an empty input (not 0: nothing was measured)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {f"p{int(q)}": None for q in qs}
    return {f"p{int(q)}": float(np.percentile(arr, q)) for q in qs}


def pass_threshold(n: int, p: float, max_fail: float = 0.005) -> int:
    """The largest k for which a policy that succeeds with probability ``p`` gets fewer than k successes in ``n``
    episodes with probability <= ``max_fail``: a test asserting ``successes >= k`` fails such a policy at most that
    often. Use a full run's Wilson lower bound as ``p`` to set a short test's threshold from it (exact binomial)."""
    if n < 1 or not 0.0 <= p <= 1.0 or not 0.0 < max_fail < 1.0:
        raise ValueError(f"need n >= 1, 0 <= p <= 1 and 0 < max_fail < 1, got n={n}, p={p}, max_fail={max_fail}")
    below = 0.0  # P(successes < k), for k = 0, 1, ...
    for k in range(n + 1):
        below_next = below + math.comb(n, k) * p ** k * (1.0 - p) ** (n - k)  # P(successes < k + 1)
        if below_next > max_fail:
            return k
        below = below_next
    return n
