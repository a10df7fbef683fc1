"""farm.stats against statsmodels and scipy, and on simulated data whose answer is known."""

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from farm import stats


def simulate(rng, seeds: int, items: int, delta: float, seed_sd: float, item_sd: float) -> list[np.ndarray]:
    """Per-seed item differences: delta + a seed effect + item noise."""
    return [delta + rng.normal(0, seed_sd) + rng.normal(0, item_sd, items) for _ in range(seeds)]


def coverage(seed: int, runs: int, delta: float, **sizes) -> float:
    """The share of simulated runs whose bootstrap interval holds the true difference."""
    rng = np.random.default_rng(seed)
    covered = 0
    for i in range(runs):
        low, high, _ = stats.hierarchical_bootstrap(simulate(rng, delta=delta, **sizes), replicates=1000, seed=i)
        covered += low <= delta <= high
    return covered / runs


def test_bootstrap_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Items only (one seed, the seed level fixed): the percentile interval of the item bootstrap
    covers the true mean difference in about 95% of simulated runs."""
    assert 0.91 <= coverage(0, 300, seeds=1, items=200, delta=0.05, seed_sd=0.0, item_sd=0.5) <= 0.98


def test_bootstrap_with_seeds_covers_when_seeds_vary_and_is_wider_than_items_alone():
    """Seeds that differ (a seed effect as large as the items' standard error many times over): the
    hierarchical interval widens with the seeds' spread, and with 8 seeds covers the truth at close
    to its level (the (S-1)/S shrink of the seed level keeps it a little under 95%)."""
    assert 0.85 <= coverage(1, 200, seeds=8, items=100, delta=0.0, seed_sd=0.05, item_sd=0.3) <= 0.98
    same = simulate(np.random.default_rng(2), 4, 100, 0.0, 0.0, 0.3)
    apart = [d + s for d, s in zip(same, (-0.2, 0.2, -0.2, 0.2))]  # the same items, seeds far apart
    narrow, wide = stats.hierarchical_bootstrap(same), stats.hierarchical_bootstrap(apart)
    assert wide[1] - wide[0] > 3 * (narrow[1] - narrow[0])


def test_bootstrap_p_is_small_for_a_clear_difference_and_uniform_ish_under_the_null():
    rng = np.random.default_rng(3)
    assert stats.hierarchical_bootstrap(simulate(rng, 3, 300, 0.2, 0.0, 0.5))[2] < 0.01
    ps = [stats.hierarchical_bootstrap(simulate(rng, 1, 150, 0.0, 0.0, 1.0), replicates=500, seed=i)[2] for i in range(200)]
    assert 0.02 <= np.mean(np.array(ps) < 0.05) <= 0.10


def test_bootstrap_is_reproducible_and_estimates_the_seed_weighted_mean():
    diffs = [np.array([1.0, 0.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])]
    assert stats.mean_difference(diffs) == pytest.approx((0.75 + 0.125) / 2)  # seeds weigh alike, not items
    assert stats.hierarchical_bootstrap(diffs) == stats.hierarchical_bootstrap(diffs)


@pytest.mark.parametrize("seed", range(5))
def test_mcnemar_equals_statsmodels_exact(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 400))
    a = rng.random(n) < 0.6
    b = np.where(rng.random(n) < 0.3, ~a, a)  # b flips a share of a's outcomes
    only_a, only_b, p = stats.mcnemar(a.astype(float), b.astype(float))
    table = [[int((a & b).sum()), only_a], [only_b, int((~a & ~b).sum())]]
    assert only_a == int((a & ~b).sum()) and only_b == int((~a & b).sum())
    assert p == pytest.approx(sm_mcnemar(table, exact=True).pvalue)
    assert stats.mcnemar(a, a)[2] == 1.0  # no discordant pair: no evidence


def test_benjamini_hochberg_equals_statsmodels_and_keeps_missing_values_out():
    rng = np.random.default_rng(4)
    p = np.concatenate([rng.uniform(0, 0.01, 5), rng.uniform(0, 1, 25)])
    assert stats.benjamini_hochberg(p.tolist()) == pytest.approx(multipletests(p, method="fdr_bh")[1].tolist())
    q = stats.benjamini_hochberg([0.01, float("nan"), 0.04])
    assert np.isnan(q[1]) and q[0] == pytest.approx(multipletests([0.01, 0.04], method="fdr_bh")[1][0])


def test_power_and_seeds_needed_equal_statsmodels_paired_t_power():
    """Seed-level components only: the seeds needed are statsmodels' one-sample t-test sample size
    (rounded up), and the power at that size agrees."""
    c = stats.components([np.array([v]) for v in (0.03, -0.01, 0.05, 0.00, 0.02)])
    sd = np.sqrt(c.between_seeds)
    for delta in (0.02, 0.05):
        want = TTestPower().solve_power(effect_size=delta / sd, alpha=0.05, power=0.8, alternative="two-sided")
        got = stats.seeds_needed(c, delta)
        assert got == max(2, int(np.ceil(want)))
        assert stats.t_power(delta, sd**2, got) == pytest.approx(TTestPower().power(delta / sd, got, 0.05), abs=1e-6)


def test_components_recover_simulated_variances_and_items_needed_solves_the_formula():
    rng = np.random.default_rng(5)
    diffs = simulate(rng, 400, 50, 0.0, 0.1, 0.4)
    c = stats.components(diffs)
    assert c.within_seeds == pytest.approx(0.16, rel=0.05) and c.between_seeds == pytest.approx(0.01, rel=0.3)
    c = stats.Components(between_seeds=0.0004, within_seeds=0.25, seeds=3, items=300)
    seeds = 10
    n = stats.items_needed(c, 0.02, seeds)
    assert stats.t_power(0.02, c.seed_variance(n), seeds) >= 0.8 > stats.t_power(0.02, c.seed_variance(n - 1), seeds)
    # Where the seeds' own spread alone leaves too little power, no number of items helps.
    assert stats.items_needed(c, 0.02, 3) is None
    assert stats.seeds_needed(c, 0.05, items=10**6) < stats.seeds_needed(c, 0.05, items=100)


def test_power_stays_a_number_where_scipys_noncentral_t_gives_up():
    """Two seeds (one degree of freedom) and a large noncentrality: scipy's nct returns nan; the
    power is then integrated over the chi-square, and still grows with the items."""
    c = stats.Components(between_seeds=0.0, within_seeds=0.42, seeds=2, items=289)
    powers = [stats.t_power(0.02, c.seed_variance(n), 2) for n in (60_000, 70_000, 10**6)]
    assert not np.isnan(powers).any() and powers[0] < powers[1] < powers[2] < 1
    n = stats.items_needed(c, 0.02, 2)
    assert stats.t_power(0.02, c.seed_variance(n), 2) >= 0.8 > stats.t_power(0.02, c.seed_variance(n - 1), 2)
