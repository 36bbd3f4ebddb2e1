"""Statistics that decide: means over seeds and paired differences with 95% intervals.

A seed hides the same entries for every method and starts every method from the
same stage-1 weights, so two methods are compared by their difference at each
seed: its mean, standard deviation and two-sided 95% Student-t interval over
the seeds. An interval that lies above zero is a difference the seeds support.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from scipy.stats import t as student_t


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for one value
    n: int
    low: float  # 95% interval of the mean
    high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def above_zero(self) -> bool:
        return self.n >= 2 and self.low > 0

    @property
    def below_zero(self) -> bool:
        return self.n >= 2 and self.high < 0


def summarise(values: list[float]) -> Summary:
    """Mean, standard deviation and 95% t-interval of finite `values` (NaNs dropped)."""
    kept = [v for v in values if not math.isnan(v)]
    n = len(kept)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan, math.nan)
    mean = sum(kept) / n
    if n == 1:
        return Summary(mean, 0.0, 1, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1))
    half = float(student_t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return Summary(mean, std, n, mean - half, mean + half)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Summary:
    """Summary of a[seed] - b[seed] over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    return summarise([a[s] - b[s] for s in seeds])
