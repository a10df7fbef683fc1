"""Study E's pairwise evaluation: win rates by hand, reward judging, Bradley–Terry Elo on
comparisons simulated from known ratings, and prompt-bootstrap intervals."""

import dataclasses
import math

import numpy as np
import pytest

from farm.eval.pairwise import (
    Judgement,
    bootstrap_elo,
    bradley_terry_elo,
    judge_by_reward,
    win_rate,
    win_rate_table,
)

TRUE = {"base": 1000.0, "sl-cai": 1100.0, "rl-cai": 1300.0}


def p_beats(ea, eb):
    return 1 / (1 + 10 ** ((eb - ea) / 400))


def simulate(ratings, per_pair, seed=0, tie_band=0.0):
    """`per_pair` judgements for each pair, drawn from the Bradley–Terry probabilities; each
    judgement on its own prompt. Within `tie_band` of p the draw is a tie instead."""
    rng = np.random.default_rng(seed)
    names = list(ratings)
    out = []
    for x, a in enumerate(names):
        for b in names[x + 1 :]:
            u = rng.random(per_pair)
            p = p_beats(ratings[a], ratings[b])
            for k, v in enumerate(u):
                outcome = 0.5 if abs(v - p) < tie_band else float(v < p)
                out.append(Judgement(a, b, outcome, prompt=k))
    return out


def rewards_study(prompts, seeds=(0, 1, 2), shift=(0.0, 0.3, 0.8)):
    """Judgements from simulated rewards: three models, later ones better on average."""
    rng = np.random.default_rng(42)
    out = []
    for s in seeds:
        models = {m: (rng.normal(size=prompts) + d).tolist() for m, d in zip(TRUE, shift)}
        out += judge_by_reward(models, seed=s, tie=0.05)
    return out


# --- Judgement and win rate ---------------------------------------------------------------


def test_judgement_rejects_self_comparison_and_bad_outcomes():
    with pytest.raises(ValueError, match="two different models"):
        Judgement("a", "a", 1.0, 0)
    for bad in (1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match="outcome"):
            Judgement("a", "b", bad, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Judgement("a", "b", 1.0, 0).outcome = 0.0  # frozen


def test_win_rate_by_hand_in_either_orientation():
    # a: 3 wins, 1 tie, 1 loss -> (3 + 0.5) / 5 = 0.7; two of them stored as (b, a).
    js = [
        Judgement("a", "b", 1.0, 0),
        Judgement("a", "b", 1.0, 1),
        Judgement("b", "a", 0.0, 2),  # a wins
        Judgement("b", "a", 0.5, 3),  # tie
        Judgement("a", "b", 0.0, 4),  # a loses
        Judgement("a", "c", 0.0, 0),  # another pair: ignored
    ]
    assert win_rate(js, "a", "b") == pytest.approx(0.7)
    assert win_rate(js, "b", "a") == pytest.approx(0.3)
    assert win_rate(js, "a", "b") + win_rate(js, "b", "a") == pytest.approx(1.0)
    assert win_rate(iter(js), "c", "a") == 1.0  # any iterable


def test_win_rate_without_judgements_is_an_error():
    js = [Judgement("a", "b", 1.0, 0)]
    with pytest.raises(ValueError, match="no judgements between 'a' and 'c'"):
        win_rate(js, "a", "c")
    with pytest.raises(ValueError, match="no judgements"):
        win_rate([], "a", "b")


def test_win_rate_table():
    js = [Judgement("a", "b", 1.0, 0), Judgement("b", "a", 0.5, 1), Judgement("c", "a", 1.0, 0)]
    t = win_rate_table(js, ["a", "b", "c", "d"])
    assert list(t.index) == list(t.columns) == ["a", "b", "c", "d"]
    assert np.isnan(np.diag(t.to_numpy())).all()
    assert t.loc["a", "b"] == pytest.approx(0.75) and t.loc["b", "a"] == pytest.approx(0.25)
    assert t.loc["c", "a"] == 1.0 and t.loc["a", "c"] == 0.0
    assert np.isnan(t.loc["b", "c"]) and t["d"].isna().all()  # never compared


# --- judge_by_reward ----------------------------------------------------------------------


def test_judge_by_reward_pairs_order_ties_and_counts():
    models = {"base": [0.0, 1.0, 0.5], "sl": [0.05, 0.0, 0.5], "rl": [1.0, 1.0, -1.0]}
    js = judge_by_reward(models, seed=7, tie=0.1)
    assert len(js) == 3 * 3  # prompts x pairs
    assert [(j.model_a, j.model_b) for j in js[::3]] == [("base", "sl"), ("base", "rl"), ("sl", "rl")]
    assert [j.prompt for j in js] == [0, 1, 2] * 3
    assert {j.seed for j in js} == {7}
    # base-sl: |0 - 0.05| <= 0.1 tie; 1 > 0 win; equal tie. base-rl: loss, tie, win. sl-rl: loss, loss, win.
    assert [j.outcome for j in js] == [0.5, 1.0, 0.5, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0]
    # With no threshold only exact equality is a tie.
    assert [j.outcome for j in judge_by_reward(models)[:3]] == [0.0, 1.0, 0.5]


def test_judge_by_reward_counts_scale_with_models():
    models = {m: list(range(10)) for m in "abcde"}
    assert len(judge_by_reward(models)) == 10 * 10  # 10 prompts x C(5, 2) pairs
    assert judge_by_reward({"only": [1.0]}) == []


@pytest.mark.parametrize(
    "models, tie, match",
    [
        ({"a": [1.0, 2.0], "b": [1.0]}, 0.0, "same prompts"),
        ({"a": [1.0, math.nan], "b": [1.0, 2.0]}, 0.0, "non-finite"),
        ({"a": [1.0], "b": [1.0]}, -0.1, "tie threshold"),
    ],
)
def test_judge_by_reward_rejects_bad_input(models, tie, match):
    with pytest.raises(ValueError, match=match):
        judge_by_reward(models, tie=tie)


# --- Bradley–Terry Elo --------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated():
    return simulate(TRUE, per_pair=2000, seed=0)


def test_elo_recovers_known_ratings_and_ordering(simulated):
    elo = bradley_terry_elo(simulated, list(TRUE))
    assert sum(elo.values()) / 3 == pytest.approx(1000.0)
    mean_true = sum(TRUE.values()) / 3
    for m, e in TRUE.items():
        assert elo[m] == pytest.approx(e - mean_true + 1000, abs=25)
    assert sorted(elo, key=elo.get) == ["base", "sl-cai", "rl-cai"]
    assert bradley_terry_elo(simulated, list(TRUE)) == elo  # deterministic


def test_fitted_probabilities_match_observed_win_rates(simulated):
    elo = bradley_terry_elo(simulated, list(TRUE))
    for a, b in [("base", "sl-cai"), ("base", "rl-cai"), ("sl-cai", "rl-cai")]:
        assert p_beats(elo[a], elo[b]) == pytest.approx(win_rate(simulated, a, b), abs=0.015)


def test_ties_count_half_and_orientation_does_not_matter():
    js = simulate(TRUE, per_pair=500, seed=3, tie_band=0.1)
    assert any(j.outcome == 0.5 for j in js)
    flipped = [Judgement(j.model_b, j.model_a, 1 - j.outcome, j.prompt) if k % 2 else j for k, j in enumerate(js)]
    a, b = bradley_terry_elo(js, list(TRUE)), bradley_terry_elo(flipped, list(TRUE))
    assert a == pytest.approx(b, abs=1e-6)
    # A tie is worth the same as one win plus one loss.
    half = [Judgement("x", "y", 0.5, k) for k in range(4)] + [Judgement("x", "y", 1.0, 9)]
    split = [Judgement("x", "y", float(k % 2), k) for k in range(8)] + [Judgement("x", "y", 1.0, 9)] * 2
    assert bradley_terry_elo(half, ["x", "y"])["x"] == pytest.approx(bradley_terry_elo(split, ["x", "y"])["x"], abs=1e-3)


def test_anchor_shifts_all_ratings_equally(simulated):
    centred = bradley_terry_elo(simulated, list(TRUE))
    anchored = bradley_terry_elo(simulated, list(TRUE), anchor="base")
    assert anchored["base"] == 1000.0
    shifts = [anchored[m] - centred[m] for m in TRUE]
    assert shifts == pytest.approx([shifts[0]] * 3, abs=1e-9)
    with pytest.raises(ValueError, match="anchor 'gpt' is not one of the models"):
        bradley_terry_elo(simulated, list(TRUE), anchor="gpt")


def test_undefeated_model_gets_a_finite_highest_rating():
    js = [Judgement("champ", m, 1.0, k) for m in ("a", "b") for k in range(30)]
    js += [Judgement("a", "b", float(k % 3 != 0), k) for k in range(30)]
    elo = bradley_terry_elo(js, ["a", "b", "champ"])
    assert all(math.isfinite(e) for e in elo.values())
    assert elo["champ"] > elo["a"] + 400 and elo["a"] > elo["b"]


@pytest.mark.parametrize("wins, ties, losses", [(7, 2, 3), (1, 0, 1), (50, 10, 5), (1, 3, 40)])
def test_two_model_closed_form(wins, ties, losses):
    js = [Judgement("a", "b", 1.0, k) for k in range(wins)]
    js += [Judgement("b", "a", 0.5, k) for k in range(ties)]
    js += [Judgement("b", "a", 1.0, k) for k in range(losses)]
    w = win_rate(js, "a", "b")
    elo = bradley_terry_elo(js, ["a", "b"])
    assert elo["a"] - elo["b"] == pytest.approx(400 * math.log10(w / (1 - w)), abs=1e-3)
    assert elo["a"] + elo["b"] == pytest.approx(2000.0)


def test_elo_rejects_unknown_unrated_and_disconnected_models():
    js = [Judgement("a", "b", 1.0, 0), Judgement("c", "d", 0.0, 0)]
    with pytest.raises(ValueError, match=r"not in `models`: \['c', 'd'\]"):
        bradley_terry_elo(js, ["a", "b"])
    with pytest.raises(ValueError, match="connected"):
        bradley_terry_elo(js, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="connected"):
        bradley_terry_elo(js[:1], ["a", "b", "e"])  # e never compared
    with pytest.raises(ValueError, match="unique"):
        bradley_terry_elo(js[:1], ["a", "b", "a"])
    with pytest.raises(ValueError, match="no judgements"):
        bradley_terry_elo([], ["a", "b"])


# --- bootstrap ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study():
    return rewards_study(prompts=100)


def test_bootstrap_table_and_interval_contains_fit(study):
    models = list(TRUE)
    table = bootstrap_elo(study, models, n=300, seed=1)
    assert list(table.index) == models and list(table.columns) == ["elo", "low", "high", "n"]
    fit = bradley_terry_elo(study, models)
    assert table["elo"].to_dict() == pytest.approx(fit, abs=1e-6)
    assert (table["low"] < table["elo"]).all() and (table["elo"] < table["high"]).all()
    assert (table["n"] == 3 * 100 * 2).all()  # 3 seeds x 100 prompts x 2 opponents
    assert table["elo"].is_monotonic_increasing  # the simulated rewards rank the models


def test_bootstrap_is_reproducible(study):
    one = bootstrap_elo(study, list(TRUE), n=200, seed=5)
    assert one.equals(bootstrap_elo(study, list(TRUE), n=200, seed=5))
    assert not one.equals(bootstrap_elo(study, list(TRUE), n=200, seed=6))


def test_bootstrap_narrows_with_more_data(study):
    small = bootstrap_elo(study, list(TRUE), n=300)
    large = bootstrap_elo(rewards_study(prompts=1000), list(TRUE), n=300)
    assert ((large["high"] - large["low"]) < 0.6 * (small["high"] - small["low"])).all()


def test_bootstrap_resamples_prompts_not_judgements(study):
    # Four copies of every judgement on its own prompt carry no more information about
    # prompts, so a prompt bootstrap gives (nearly) the same interval; a judgement
    # bootstrap would have halved it.
    width = lambda t: (t["high"] - t["low"]).to_numpy()  # noqa: E731
    once = bootstrap_elo(study, list(TRUE), n=300, seed=2)
    four = bootstrap_elo(study * 4, list(TRUE), n=300, seed=2)
    assert four["elo"].to_numpy() == pytest.approx(once["elo"].to_numpy(), abs=1e-3)
    assert width(four) == pytest.approx(width(once), rel=1e-3)
    assert (four["n"] == 4 * once["n"]).all()


def test_bootstrap_with_anchor_and_level(study):
    t = bootstrap_elo(study, list(TRUE), n=200, anchor="base")
    assert t.loc["base", ["elo", "low", "high"]].tolist() == [1000.0, 1000.0, 1000.0]
    assert (t.loc[["sl-cai", "rl-cai"], "low"] > 1000).all()
    narrow = bootstrap_elo(study, list(TRUE), n=200, level=0.5, anchor="base")
    assert ((narrow["high"] - narrow["low"]) < (t["high"] - t["low"]))[["sl-cai", "rl-cai"]].all()
    for bad in ({"n": 0}, {"level": 1.0}):
        with pytest.raises(ValueError):
            bootstrap_elo(study, list(TRUE), **bad)


def test_bootstrap_is_fast():
    # 1000 warm-started refits of a five-model problem; generous bound for a busy machine
    # (a fit that calls into threaded BLAS per iteration took tens of seconds here).
    import time

    rng = np.random.default_rng(0)
    models = {m: (rng.normal(size=60) + 0.2 * k).tolist() for k, m in enumerate("abcde")}
    js = [j for s in range(3) for j in judge_by_reward(models, seed=s)]
    start = time.perf_counter()
    table = bootstrap_elo(js, list(models), n=1000)
    assert time.perf_counter() - start < 10
    assert (table["low"] <= table["high"]).all()


def test_win_tests_are_sign_tests_of_wins_against_losses_per_seed_and_pooled():
    """Wins, losses and ties in either orientation; the pooled p is McNemar's exact test of the
    paired outcomes as statsmodels computes it (ties dropped), per seed too; q is BH across pairs."""
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.multitest import multipletests

    from farm.eval.pairwise import win_tests

    js = []
    for seed, (wins, losses, ties) in ((1, (30, 12, 3)), (2, (25, 20, 0))):
        outcomes = [1.0] * wins + [0.0] * losses + [0.5] * ties
        # half of them written with b first: the orientation must not matter
        js += [Judgement("a", "b", o, i, seed) if i % 2 else Judgement("b", "a", 1 - o, i, seed) for i, o in enumerate(outcomes)]
    js += [Judgement("a", "c", 1.0, i, 1) for i in range(5)] + [Judgement("a", "c", 0.0, 9, 1)]
    t = win_tests(js, ["a", "b", "c"]).set_index(["model a", "model b"])
    ab = t.loc[("a", "b")]
    assert (ab["wins"], ab["losses"], ab["ties"]) == (55, 32, 3) and ab["win rate of a"] == pytest.approx((55 + 1.5) / 90)
    assert ab["p (sign test, pooled)"] == pytest.approx(mcnemar([[0, 55], [32, 0]], exact=True).pvalue)
    seed_p = [float(x) for x in ab["p per seed"].split(", ")]
    assert seed_p == pytest.approx([mcnemar([[0, 30], [12, 0]], exact=True).pvalue, mcnemar([[0, 25], [20, 0]], exact=True).pvalue], rel=1e-2)
    assert ("b", "c") not in t.index  # never compared
    assert t["q (BH)"].tolist() == pytest.approx(multipletests(t["p (sign test, pooled)"], method="fdr_bh")[1].tolist())
