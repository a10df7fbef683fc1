"""Paired comparisons of two conditions on the same eval items, over seeds: the difference of
means with a hierarchical bootstrap interval, McNemar's test for 0/1 items, the false discovery
rate across many tests, and the seeds and items a difference of a given size needs.

Every function takes the per-seed item differences of one comparison: a list with one array per
seed, `b - a` item by item, the items being the eval rows both trials scored. Pure functions of
numpy arrays; the report and `farm plan --power` feed them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

BOOTSTRAP = 4000  # replicates: the 2.5% and 97.5% quantiles to about +-0.1 of a standard error
POWER = 0.8
ALPHA = 0.05


def mean_difference(diffs: list[np.ndarray]) -> float:
    """The estimand: the mean over seeds of each seed's mean item difference (seeds weigh alike)."""
    return float(np.mean([d.mean() for d in diffs]))


def hierarchical_bootstrap(diffs: list[np.ndarray], replicates: int = BOOTSTRAP, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, p) of the mean difference: resample seeds with replacement, then the items of
    each drawn seed with replacement (a seed drawn twice gets two independent item draws), and take
    the percentile interval of the replicates' means. p is two-sided, twice the share of replicates
    on the far side of zero (at least 1 / replicates). With S seeds the seed level resamples S
    values, which understates the between-seed variance by (S - 1) / S: with two or three seeds the
    interval is too narrow wherever seeds differ more than their items explain."""
    rng = np.random.default_rng(seed)
    s = len(diffs)
    drawn = rng.integers(0, s, size=(replicates, s))  # which seed fills each slot of each replicate
    means = np.empty((replicates, s))
    for k, d in enumerate(diffs):
        rows, slots = np.nonzero(drawn == k)
        # The mean of n items drawn with replacement, for every slot this seed fills; in chunks of
        # about a million draws (an lm-eval task has thousands of items).
        step = max(1, 2**20 // len(d))
        for i in range(0, len(rows), step):
            picks = rng.integers(0, len(d), size=(len(rows[i : i + step]), len(d)))
            means[rows[i : i + step], slots[i : i + step]] = d[picks].mean(axis=1)
    boot = means.mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    p = min(1.0, 2 * max(min((boot <= 0).mean(), (boot >= 0).mean()), 1 / replicates))
    return float(low), float(high), float(p)


def is_binary(values: np.ndarray) -> bool:
    return bool(len(values)) and bool(np.isin(values, (0.0, 1.0)).all())


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """(a only, b only, p): McNemar's exact test of paired 0/1 outcomes, the two-sided binomial
    test of the discordant pairs (statsmodels' `mcnemar(exact=True)`). It tests these two models
    on these items: the items are independent draws, the models fixed."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return only_a, only_b, discordant_p(only_a, only_b)


def discordant_p(only_a: int, only_b: int) -> float:
    """McNemar's exact p from the discordant counts (pooled tables add their counts)."""
    n = only_a + only_b
    return float(stats.binomtest(only_b, n, 0.5).pvalue) if n else 1.0


def benjamini_hochberg(p: list[float]) -> list[float]:
    """Adjusted p-values (q) controlling the false discovery rate across the tests given (scipy's
    `false_discovery_control`, method "bh"); a missing p stays missing and is not counted."""
    p = np.asarray(p, float)
    q = np.full(len(p), np.nan)
    known = ~np.isnan(p)
    if known.any():
        q[known] = stats.false_discovery_control(p[known], method="bh")
    return q.tolist()


@dataclass(frozen=True)
class Components:
    """Variance of the paired differences: between seeds (of the seed means, less what their items
    explain, at least 0) and within a seed (between items)."""

    between_seeds: float
    within_seeds: float  # nan when only seed-level values are known
    seeds: int
    items: int  # items per seed (the smallest); 0 without per-item values

    def seed_variance(self, items: int | None) -> float:
        """The variance of one seed's mean difference over `items` items (the run's if None)."""
        if np.isnan(self.within_seeds):
            return self.between_seeds
        return self.between_seeds + self.within_seeds / (items or self.items)


def components(diffs: list[np.ndarray]) -> Components:
    """Method-of-moments estimates from one or more seeds' item differences (one-way random effects).
    One value per seed (a metric without per-item values): the seed level only."""
    if all(len(d) == 1 for d in diffs):
        v = np.concatenate(diffs)
        return Components(float(v.var(ddof=1)) if len(v) > 1 else float("nan"), float("nan"), len(v), 0)
    within = float(np.mean([d.var(ddof=1) for d in diffs]))
    n = np.array([len(d) for d in diffs])
    means = np.array([d.mean() for d in diffs])
    between = max(0.0, float(means.var(ddof=1) - np.mean(within / n))) if len(diffs) > 1 else float("nan")
    return Components(between, within, len(diffs), int(n.min()))


def pooled(parts: list[Components]) -> Components:
    """Components averaged over several comparisons of one metric (each a noisy estimate)."""

    def mean(values: list[float]) -> float:
        known = [v for v in values if not np.isnan(v)]
        return float(np.mean(known)) if known else float("nan")

    return Components(
        mean([c.between_seeds for c in parts]), mean([c.within_seeds for c in parts]), min(c.seeds for c in parts), min(c.items for c in parts)
    )


def t_power(delta: float, variance: float, seeds: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test over `seeds` seed-level differences of variance
    `variance` to detect a true mean difference `delta` (noncentral t)."""
    if seeds < 2:
        return 0.0
    if variance <= 0:
        return 1.0
    df = seeds - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(delta) / np.sqrt(variance / seeds)
    power = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    if np.isnan(power):  # scipy's nct gives up at a large noncentrality with few degrees of freedom
        from scipy.integrate import quad

        # T = (Z + nc) / sqrt(V / df), V ~ chi2(df): integrate the normal tails over V.
        def tails(v: float) -> float:
            c = crit * np.sqrt(v / df)
            return (stats.norm.sf(c - nc) + stats.norm.cdf(-c - nc)) * stats.chi2.pdf(v, df)

        power = quad(tails, 0, np.inf, limit=200)[0]
    return power


def seeds_needed(c: Components, delta: float, items: int | None = None, power: float = POWER, most: int = 10_000) -> int | None:
    """The fewest seeds (at least 2) whose seed-level test detects `delta` with `power`, each seed
    scored on `items` items (the run's if None); None beyond `most` or without a variance estimate."""
    variance = c.seed_variance(items)
    if np.isnan(variance):
        return None
    lo, hi = 2, 2
    while t_power(delta, variance, hi) < power:  # double, then bisect: power grows with seeds
        lo, hi = hi + 1, hi * 2
        if hi > most:
            return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if t_power(delta, variance, mid) >= power else (mid + 1, hi)
    return lo


def items_needed(c: Components, delta: float, seeds: int, power: float = POWER, most: int = 10**7) -> int | None:
    """The fewest items per seed for `seeds` seeds to detect `delta` with `power`; None where no
    number of items can (the between-seed variance alone is too large) or beyond `most`."""
    if np.isnan(c.within_seeds) or np.isnan(c.between_seeds) or t_power(delta, c.between_seeds + c.within_seeds / most, seeds) < power:
        return None
    lo, hi = 1, 1
    while t_power(delta, c.seed_variance(hi), seeds) < power:
        lo, hi = hi + 1, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if t_power(delta, c.seed_variance(mid), seeds) >= power else (mid + 1, hi)
    return lo
