"""Study E's pairwise evaluation: models compared prompt by prompt by a judge, summarised as
win rates, (wins + ties/2) / N, and Elo ratings fitted by Bradley–Terry maximum likelihood,
P(A beats B) = 1 / (1 + 10^((E_B - E_A) / 400)), with prompt-bootstrap intervals (METHODS)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from farm import stats

# Elo points per natural-log-odds unit: P = 1/(1 + 10^(-dE/400)) = sigmoid(dE * ln10 / 400).
ELO_PER_LOGIT = 400 / math.log(10)
CENTRE = 1000.0
# L2 penalty on the ratings in log-odds units, added to the summed negative log-likelihood.
# Without it a model that wins (or loses) every judgement has no finite maximum-likelihood
# rating; with it such a model still gets a finite rating (a few thousand Elo from the rest).
# It is small enough to move well-determined ratings by far less than 1e-3 Elo.
PENALTY = 1e-6


@dataclasses.dataclass(frozen=True)
class Judgement:
    """One comparison on one prompt: outcome 1 = model_a wins, 0.5 = tie, 0 = model_b wins
    (a fraction in between is taken as a soft outcome)."""

    model_a: str
    model_b: str
    outcome: float
    prompt: int
    seed: int | None = None

    def __post_init__(self):
        if self.model_a == self.model_b:
            raise ValueError(f"a judgement compares two different models, got {self.model_a!r} twice")
        if not 0.0 <= self.outcome <= 1.0:  # also rejects NaN
            raise ValueError(f"outcome must lie in [0, 1] (1 = a wins, 0.5 = tie, 0 = b wins), got {self.outcome!r}")


def judge_by_reward(models: Mapping[str, Sequence[float]], seed: int | None = None, tie: float = 0.0) -> list[Judgement]:
    """One Judgement per unordered pair of models (pairs in the dict's order, a before b) per
    prompt, pair by pair: the higher reward wins, a tie when |r_a - r_b| <= tie."""
    if tie < 0:
        raise ValueError(f"tie threshold must be >= 0, got {tie}")
    rewards = {name: np.asarray(r, dtype=float) for name, r in models.items()}
    lengths = {name: len(r) for name, r in rewards.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"every model must be scored on the same prompts; prompt counts differ: {lengths}")
    for name, r in rewards.items():
        # A NaN reward would silently read as a loss (every comparison with NaN is False).
        if not np.isfinite(r).all():
            raise ValueError(f"model {name!r} has non-finite rewards at prompts {np.flatnonzero(~np.isfinite(r)).tolist()}")
    out = []
    for a, b in itertools.combinations(rewards, 2):
        for prompt, (ra, rb) in enumerate(zip(rewards[a].tolist(), rewards[b].tolist())):
            outcome = 0.5 if abs(ra - rb) <= tie else (1.0 if ra > rb else 0.0)
            out.append(Judgement(a, b, outcome, prompt, seed))
    return out


def _pair_totals(judgements: Iterable[Judgement]) -> dict[tuple[str, str], list[float]]:
    """{(a, b): [n, score of a]} with each pair under one key (the orientation first seen);
    a judgement in the other orientation adds 1 - outcome to a's score."""
    totals: dict[tuple[str, str], list[float]] = {}
    for j in judgements:
        key, score = ((j.model_a, j.model_b), j.outcome)
        if key not in totals and key[::-1] in totals:
            key, score = key[::-1], 1.0 - j.outcome
        t = totals.setdefault(key, [0, 0.0])
        t[0] += 1
        t[1] += score
    return totals


def _rate(totals, a: str, b: str) -> float:
    if (a, b) in totals:
        n, score = totals[(a, b)]
        return score / n
    if (b, a) in totals:
        n, score = totals[(b, a)]
        return (n - score) / n
    raise ValueError(f"no judgements between {a!r} and {b!r}")


def win_rate(judgements: Iterable[Judgement], a: str, b: str) -> float:
    """(wins + ties/2) / N of `a` against `b`, over the judgements between them in either
    orientation. ValueError when there are none."""
    return _rate(_pair_totals(j for j in judgements if {j.model_a, j.model_b} == {a, b}), a, b)


def win_rate_table(judgements: Iterable[Judgement], models: Sequence[str]) -> pd.DataFrame:
    """Square table: the row model's win rate against the column model; NaN on the diagonal
    and where two models were never compared."""
    totals = _pair_totals(judgements)
    table = pd.DataFrame(np.nan, index=pd.Index(list(models), name="model"), columns=list(models))
    for a, b in itertools.permutations(models, 2):
        if (a, b) in totals or (b, a) in totals:
            table.loc[a, b] = _rate(totals, a, b)
    return table


def win_tests(judgements: Sequence[Judgement], models: Sequence[str]) -> pd.DataFrame:
    """Each pair of models (a before b in `models`' order): a's wins, losses and ties over the
    prompts, and the sign test of wins against losses (McNemar's exact test of the paired outcomes:
    ties carry no evidence), pooled over seeds and per seed; q: Benjamini-Hochberg across the pairs.
    It tests these models on these prompts, each prompt's judgement independent of the others."""
    rows = []
    for a, b in itertools.combinations(models, 2):
        mine = [(j.seed, j.outcome if j.model_a == a else 1.0 - j.outcome) for j in judgements if {j.model_a, j.model_b} == {a, b}]
        if not mine:
            continue
        seeds = np.array([s for s, _ in mine], dtype=object)
        outcome = np.array([o for _, o in mine])
        per_seed = [stats.mcnemar(outcome[seeds == s] == 1.0, outcome[seeds == s] == 0.0) for s in dict.fromkeys(seeds.tolist())]
        wins, losses = sum(t[0] for t in per_seed), sum(t[1] for t in per_seed)
        rows.append(
            {
                "model a": a,
                "model b": b,
                "wins": wins,
                "losses": losses,
                "ties": len(mine) - wins - losses,
                "win rate of a": float(outcome.mean()),
                "p (sign test, pooled)": stats.discordant_p(wins, losses),
                "p per seed": ", ".join(f"{t[2]:.3g}" for t in per_seed),
            }
        )
    out = pd.DataFrame(rows)
    if len(out):
        out.insert(out.columns.get_loc("p (sign test, pooled)") + 1, "q (BH)", stats.benjamini_hochberg(out["p (sign test, pooled)"].tolist()))
    return out


# --- Bradley–Terry -----------------------------------------------------------------------


def _pair_arrays(judgements: Sequence[Judgement], models: Sequence[str]):
    """Judgements pooled per model pair: index arrays i, j and, per pair, the count and i's
    score. The likelihood is linear in the outcomes, so these are sufficient statistics."""
    if len(set(models)) != len(models):
        raise ValueError(f"model names must be unique: {list(models)}")
    index = {m: k for k, m in enumerate(models)}
    unknown = sorted({m for j in judgements for m in (j.model_a, j.model_b)} - index.keys())
    if unknown:
        raise ValueError(f"judgements name models not in `models`: {unknown}")
    totals = _pair_totals(judgements)
    i = np.array([index[a] for a, _ in totals], dtype=np.intp)
    j = np.array([index[b] for _, b in totals], dtype=np.intp)
    n = np.array([t[0] for t in totals.values()], dtype=float)
    w = np.array([t[1] for t in totals.values()], dtype=float)
    return i, j, n, w


def _check_connected(i, j, n, models: Sequence[str], what: str = "the models") -> None:
    """Ratings are only comparable within a connected set of comparisons; elsewhere the
    penalty alone would place the groups, which would mean nothing."""
    parent = list(range(len(models)))

    def root(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b in zip(i[n > 0].tolist(), j[n > 0].tolist()):
        parent[root(a)] = root(b)
    groups: dict[int, list[str]] = {}
    for k, m in enumerate(models):
        groups.setdefault(root(k), []).append(m)
    if len(groups) > 1:
        raise ValueError(f"{what} do not form one connected set of comparisons, so their ratings are not comparable: {list(groups.values())}")


def _fit(i, j, n, w, k: int, x0=None) -> np.ndarray:
    """Maximum-likelihood ratings in log-odds units (mean ~0, fixed by the penalty)."""
    from scipy.optimize import minimize

    total = max(n.sum(), 1.0)

    def objective(theta):
        d = theta[i] - theta[j]
        # -[w log s(d) + (n - w) log s(-d)], with log s(x) = -log(1 + e^-x) computed stably.
        nll = (w * np.logaddexp(0.0, -d) + (n - w) * np.logaddexp(0.0, d)).sum()
        g = n / (1.0 + np.exp(-d)) - w  # d(nll)/d(d) = n p - w
        grad = np.bincount(i, g, minlength=k) - np.bincount(j, g, minlength=k) + 2 * PENALTY * theta
        # Divided by the judgement count so the gradient tolerance means the same at any N.
        return (nll + PENALTY * (theta * theta).sum()) / total, grad / total

    start = np.zeros(k) if x0 is None else np.asarray(x0, dtype=float)
    # BFGS rather than L-BFGS-B: the problem is tiny, and L-BFGS-B's compiled core calls
    # OpenBLAS, whose threads made the fits tens of times slower on a busy machine.
    res = minimize(objective, start, jac=True, method="BFGS", options={"gtol": 1e-10, "maxiter": 10_000})
    # BFGS may stop on "precision loss" when the line search cannot improve at machine
    # precision; that is the optimum, so judge convergence by the gradient itself.
    if not res.success and np.abs(res.jac).max() > 1e-7:
        raise RuntimeError(f"Bradley–Terry fit did not converge: {res.message}")
    return res.x


def _to_elo(theta: np.ndarray, models: Sequence[str], anchor: str | None) -> np.ndarray:
    """Log-odds ratings (rows of `theta`) to Elo, the scale fixed: mean 1000, or `anchor` at 1000."""
    elo = np.asarray(theta) * ELO_PER_LOGIT
    ref = elo[..., list(models).index(anchor)] if anchor is not None else elo.mean(axis=-1)
    return elo - np.expand_dims(ref, -1) + CENTRE


def _check_anchor(anchor, models):
    if anchor is not None and anchor not in models:
        raise ValueError(f"anchor {anchor!r} is not one of the models {list(models)}")


def bradley_terry_elo(judgements: Iterable[Judgement], models: Sequence[str], anchor: str | None = None) -> dict[str, float]:
    """Elo ratings maximising sum o·log p + (1 - o)·log(1 - p), p = 1/(1 + 10^((E_b - E_a)/400)),
    over all judgements (a tie is half a win for each side), plus a tiny L2 penalty (PENALTY,
    in log-odds units) that keeps an undefeated model finite. Centred to mean 1000, or with
    `anchor` at 1000. Every model must be compared, and all of them connected by comparisons."""
    models = list(models)
    _check_anchor(anchor, models)
    judgements = list(judgements)
    if not judgements:
        raise ValueError("no judgements to fit")
    i, j, n, w = _pair_arrays(judgements, models)
    _check_connected(i, j, n, models)
    elo = _to_elo(_fit(i, j, n, w, len(models)), models, anchor)
    return dict(zip(models, elo.tolist()))


def bootstrap_elo(
    judgements: Iterable[Judgement],
    models: Sequence[str],
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    anchor: str | None = None,
) -> pd.DataFrame:
    """Per model: elo (fit on all judgements), low and high (percentile interval at `level`
    over `n` refits on prompts resampled with replacement) and n (judgements it is in).

    The resampled unit is a (seed, prompt): the judgements on one prompt share it, so they
    are drawn together. Each refit fixes the scale as the main fit does, so with an anchor
    the anchor's own interval is [1000, 1000]."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    models = list(models)
    _check_anchor(anchor, models)
    judgements = list(judgements)
    if not judgements:
        raise ValueError("no judgements to resample")
    k = len(models)
    i, j, n_all, w_all = _pair_arrays(judgements, models)
    _check_connected(i, j, n_all, models)
    theta = _fit(i, j, n_all, w_all, k)
    pair_of = {(models[a], models[b]): p for p, (a, b) in enumerate(zip(i.tolist(), j.tolist()))}

    # Per (seed, prompt) group and pair: the count and score, so a resample is a weighted sum.
    groups: dict[tuple, int] = {}
    rows_n, rows_w = [], []
    for jd in judgements:
        g = groups.setdefault((jd.seed, jd.prompt), len(groups))
        if g == len(rows_n):
            rows_n.append(np.zeros(len(pair_of)))
            rows_w.append(np.zeros(len(pair_of)))
        key = (jd.model_a, jd.model_b)
        score = jd.outcome if key in pair_of else 1.0 - jd.outcome
        p = pair_of[key] if key in pair_of else pair_of[key[::-1]]
        rows_n[g][p] += 1
        rows_w[g][p] += score
    counts, scores = np.array(rows_n).reshape(-1, len(pair_of)), np.array(rows_w).reshape(-1, len(pair_of))

    rng = np.random.default_rng(seed)
    # How often each group is drawn in each resample: G draws with replacement from G groups.
    draws = rng.multinomial(len(groups), np.full(len(groups), 1.0 / len(groups)), size=n)
    # All resamples' pair totals in one product: many small BLAS calls inside the loop are
    # what made this slow (OpenBLAS threads contend on a busy machine).
    n_boot, w_boot = draws @ counts, draws @ scores
    boot = np.empty((n, k))
    for r in range(n):
        _check_connected(i, j, n_boot[r], models, what=f"in bootstrap resample {r}, the models")
        # Warm start from the full-data fit: the refits are small perturbations of it.
        boot[r] = _fit(i, j, n_boot[r], w_boot[r], k, x0=theta)

    alpha = (1 - level) / 2
    low, high = np.quantile(_to_elo(boot, models, anchor), [alpha, 1 - alpha], axis=0)
    involved = {m: 0 for m in models}
    for jd in judgements:
        involved[jd.model_a] += 1
        involved[jd.model_b] += 1
    return pd.DataFrame(
        {"elo": _to_elo(theta, models, anchor), "low": low, "high": high, "n": [involved[m] for m in models]},
        index=pd.Index(models, name="model"),
    )
