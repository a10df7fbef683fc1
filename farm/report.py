"""The study report: the table aggregated across seeds (mean, std, n, 95% t-interval), paired
tests across seeds, published numbers beside ours, plots, the config and the environment —
as `report.md` (terminals, git) and a self-contained `report.html` (images inlined)."""

from __future__ import annotations

import base64
import html
import importlib.metadata
import io
import os
import platform
import shutil
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from farm import registry
from farm import stats as farm_stats
from farm.config import axis_labels
from farm.eval.metrics import arrow
from farm.files import atomic_write
from farm.results import read_histories, read_items, saved_trials
from farm.spec import PlotSpec
from farm.store import library_versions, version_drift

SEED_AXIS = "seed"
GRID_POINT = "grid point"
BOOKKEEPING = {"done", "selected_step", "eval_pairs", "eval_seconds", "generated", "gen_tokens_per_s", "eval_device"}
# Properties of an instrument rather than results of a trial: shown once, as notes.
INSTRUMENT_SUFFIX = "_heldout_accuracy"
PACKAGES = ("farm", "ray", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "scipy")


@dataclass
class Report:
    title: str
    description: str
    summary: str
    failed: list[tuple[str, str]]
    tables: list[tuple[str, pd.DataFrame, str]] = field(default_factory=list)  # (heading, table, note)
    plots: list[tuple[str, str, bytes]] = field(default_factory=list)  # (caption, file name, png)
    notes: list[str] = field(default_factory=list)
    departures: list[str] = field(default_factory=list)  # from the reference protocol, as the study file states them
    config: str = ""
    environment: dict[str, str] = field(default_factory=dict)


def metric_columns(df: pd.DataFrame, axes: list[str]) -> list[str]:
    skip = {"trial", "status", "error", *axes, *BOOKKEEPING}
    return [c for c in df.columns if c not in skip and not c.endswith(INSTRUMENT_SUFFIX) and pd.api.types.is_numeric_dtype(df[c])]


def marked(column: str, metric: str | None = None) -> str:
    """`column` with the direction its metric (`metric`, by default the column itself) declares
    (farm.eval.metrics): "reward_accuracy (↑)", "perplexity (↓)"; as it is where none is declared."""

    better = arrow(metric or column)
    return f"{column} ({better})" if better else column


def group_axes(axes: list[str]) -> list[str]:
    return [a for a in axes if a != SEED_AXIS]


def groups(frame: pd.DataFrame, by: list[str]):
    """({column: value}, rows) for each combination of `by` (one group of every row without `by`)."""
    for key, g in frame.groupby(by, sort=True) if by else [((), frame)]:
        yield dict(zip(by, key if isinstance(key, tuple) else (key,))), g


def summarize(df: pd.DataFrame, axes: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per grid point other than the seed: mean, std, n and 95% t-interval of each metric."""
    rows = []
    for point, g in groups(df[df["status"] == "ok"], group_axes(axes)):
        row = dict(point)
        for m in metrics:
            values = g[m].dropna().to_numpy(dtype=float)
            mean, std, n = mean_std_n(values)
            half = ci_half_width(std, n)
            row.update({f"{m}.mean": mean, f"{m}.std": std, f"{m}.n": n, f"{m}.ci95": half})
        rows.append(row)
    return pd.DataFrame(rows)


def mean_std_n(values: np.ndarray) -> tuple[float, float, int]:
    n = len(values)
    return (float(values.mean()) if n else float("nan")), (float(values.std(ddof=1)) if n > 1 else float("nan")), n


def ci_half_width(std: float, n: int) -> float:
    """Half-width of the 95% confidence interval of a mean, Student's t with n-1 degrees of freedom."""
    return float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")


def comparisons(df: pd.DataFrame, axes: list[str], main_axis: str | None):
    """(other axes' values, "v vs first", first's rows, v's rows): each value of the main axis against
    its first value within every combination of the other axes, rows indexed by seed, on the seeds
    both share."""
    if not main_axis or SEED_AXIS not in axes or main_axis == SEED_AXIS:
        return
    ok = df[df["status"] == "ok"]
    values = sorted(ok[main_axis].unique(), key=_sort_key)
    for point, g in groups(ok, [a for a in group_axes(axes) if a != main_axis]):
        base = g[g[main_axis] == values[0]].set_index(SEED_AXIS)
        for v in values[1:]:
            cmp = g[g[main_axis] == v].set_index(SEED_AXIS)
            seeds = base.index.intersection(cmp.index)
            yield point, f"{v} vs {values[0]}", base.loc[seeds], cmp.loc[seeds]


def chosen_pairs(df: pd.DataFrame, spec):
    """The trials a PairSpec compares, in the shape `comparisons` yields; a ValueError when a query
    selects more than one trial for a seed within a group (`by` must tell them apart)."""
    for point, g in groups(df[df["status"] == "ok"], spec.by):
        base, cmp = g.query(spec.a), g.query(spec.b)
        for side, rows in (("a", base), ("b", cmp)):
            if rows[SEED_AXIS].duplicated().any():
                raise ValueError(
                    f"{side} selects several trials of one seed{' in ' + _point(point) if spec.by else ''}; "
                    "add the columns that tell them apart to `by`"
                )
        base, cmp = base.set_index(SEED_AXIS), cmp.set_index(SEED_AXIS)
        seeds = base.index.intersection(cmp.index)
        if len(seeds):
            yield point, spec.title, base.loc[seeds], cmp.loc[seeds]


def paired_tests(pairs, metrics: list[str], column: str) -> pd.DataFrame:
    """Each pair of conditions (`comparisons`, `chosen_pairs`) paired by seed (scipy's ttest_rel),
    per metric, with the t-interval of the mean difference; q: Benjamini-Hochberg across the
    table's tests."""
    rows = []
    for point, label, base, cmp in pairs:
        for m in metrics:
            a, b = base[m].to_numpy(float), cmp[m].to_numpy(float)
            # No test for fewer than two seeds, or differences without spread (t undefined).
            p = float(stats.ttest_rel(b, a).pvalue) if len(a) > 1 and np.std(b - a) > 1e-12 else float("nan")
            half = ci_half_width(float(np.std(b - a, ddof=1)), len(a)) if len(a) > 1 else float("nan")
            mean = float(np.mean(b - a)) if len(a) else float("nan")
            rows.append(
                {
                    **point,
                    column: label,
                    "metric": m,
                    "seeds": len(a),
                    "mean difference": mean,
                    "low (95%)": mean - half,
                    "high (95%)": mean + half,
                    "p (paired t)": p,
                }
            )
    out = pd.DataFrame(rows)
    if len(out):
        out["q (BH)"] = farm_stats.benjamini_hochberg(out["p (paired t)"].tolist())
    return out


def item_differences(base: pd.DataFrame, cmp: pd.DataFrame, metric: str, items: dict) -> tuple[list, list, list] | None:
    """Per seed, the two trials' values on the items both scored, (a values, b values, b - a), for
    a metric both kept per item; None otherwise."""
    a_all, b_all, diffs = [], [], []
    for seed in base.index:
        a, b = items.get(base.loc[seed, "trial"], {}).get(metric), items.get(cmp.loc[seed, "trial"], {}).get(metric)
        if a is None or b is None:
            return None
        shared = a.index.intersection(b.index)
        if not len(shared):
            return None
        a_all.append(a[shared].to_numpy(float))
        b_all.append(b[shared].to_numpy(float))
        diffs.append(b_all[-1] - a_all[-1])
    return (a_all, b_all, diffs) if diffs else None


def item_tests(pairs, metrics: list[str], column: str, items: dict) -> pd.DataFrame:
    """Each pair of conditions, per metric kept per item: the mean item difference (seeds weigh
    alike) with a hierarchical bootstrap interval and p (farm.stats), and for 0/1 items McNemar's
    exact test per seed and pooled over seeds; q: Benjamini-Hochberg across the table's tests of
    each kind."""
    rows = []
    for point, label, base, cmp in pairs:
        for m in metrics:
            found = item_differences(base, cmp, m, items)
            if found is None:
                continue
            a, b, diffs = found
            low, high, p = farm_stats.hierarchical_bootstrap(diffs)
            n = sorted({len(d) for d in diffs})
            row = {
                **point,
                column: label,
                "metric": m,
                "seeds": len(diffs),
                "items per seed": str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}",
                "mean difference": farm_stats.mean_difference(diffs),
                "low (95%)": low,
                "high (95%)": high,
                "p (bootstrap)": p,
            }
            if all(farm_stats.is_binary(x) for x in a + b):
                tests = [farm_stats.mcnemar(x, y) for x, y in zip(a, b)]
                only_a, only_b = sum(t[0] for t in tests), sum(t[1] for t in tests)
                row.update(
                    {
                        "McNemar a only / b only": f"{only_a} / {only_b}",
                        "p (McNemar, pooled)": farm_stats.discordant_p(only_a, only_b),
                        "p (McNemar) per seed": ", ".join(_fmt(t[2]) for t in tests),
                    }
                )
            rows.append(row)
    out = pd.DataFrame(rows)
    for column, q in (("p (bootstrap)", "q (bootstrap, BH)"), ("p (McNemar, pooled)", "q (McNemar, BH)")):
        if column in out:
            out.insert(out.columns.get_loc(column) + 1, q, farm_stats.benjamini_hochberg(out[column].tolist()))
    return out


ITEM_TESTS_NOTE = (
    "paired item by item on the eval rows both trials scored, within each seed. 95% interval (low, high): hierarchical bootstrap "
    "(resample seeds, then items within each drawn seed; percentile interval, 4000 replicates); with few seeds it "
    "understates the between-seed variance (by (S-1)/S at S seeds), so read it beside the seed-level test. "
    "McNemar: exact test of the discordant 0/1 items (a right and b wrong, and the reverse), per seed and pooled over "
    "seeds; it tests these trained models on these items, not the training procedure across seeds. "
    "q: Benjamini-Hochberg adjusted p across every test of the column (metrics x axis values); unadjusted p beside it"
)


def reference_table(reference, summary: pd.DataFrame, axes: list[str], skip: frozenset = frozenset()) -> pd.DataFrame:
    """Published numbers and ours, row by row, for the grid points the study file names; `skip`
    holds the (reference row index, metric) pairs another table already shows."""
    rows = []
    for i, ref in enumerate(reference.rows):
        match = summary
        for axis, value in ref.axes.items():
            match = match[match[axis] == value] if axis in match else match.iloc[0:0]
        for metric, published in ref.metrics.items():
            if (i, metric) in skip:
                continue
            row = {"published condition": ref.label, "ours at": _point(ref.axes), "metric": metric, "published": published}
            if len(match) == 1 and f"{metric}.mean" in match:
                r = match.iloc[0]
                row["ours"] = _mean_ci(r[f"{metric}.mean"], r[f"{metric}.ci95"], r[f"{metric}.n"])
            else:
                row["ours"] = "—"
            rows.append(row)
    return pd.DataFrame(rows)


def matching(names: list[str], available: list[str]) -> list[str]:
    """The columns named, a name ending in "/" standing for every column with that prefix."""
    return [c for n in names for c in available if (c.startswith(n) if n.endswith("/") else c == n)]


def point_labels(frame: pd.DataFrame, axes: list[str]) -> list[str]:
    """Each row's grid point as the trial ids write it ("sft=lima, dpo=hh"), the seed left out."""
    by = group_axes(axes)
    short = axis_labels(axes)
    return [", ".join(f"{short[a]}={r[a]}" for a in by) or "all trials" for _, r in frame.iterrows()]


def wide_tables(spec, summary: pd.DataFrame, axes: list[str], metrics: list[str], reference) -> list:
    """Ours (a row per grid point, a column per metric) and, where the reference block gives any
    of these metrics, the published numbers in the same shape."""
    cols = matching(spec.metrics, metrics)
    name = {c: c.split("/", 1)[-1] for c in cols}
    ours = pd.DataFrame({"grid point": point_labels(summary, axes)})
    for c in cols:
        ours[marked(name[c], c)] = [_mean_ci(r[f"{c}.mean"], r[f"{c}.ci95"], r[f"{c}.n"]) for _, r in summary.iterrows()]
    out = [(f"{spec.title}: ours", ours, "mean ± 95% CI half-width (n seeds)")]
    published = [r for r in (reference.rows if reference else []) if matching(spec.metrics, list(r.metrics))]
    if published:
        keys = list(dict.fromkeys(k for r in published for k in matching(spec.metrics, list(r.metrics))))
        rows = [
            {"published condition": r.label, "ours at": _point(r.axes), **{k.split("/", 1)[-1]: r.metrics.get(k, float("nan")) for k in keys}}
            for r in published
        ]
        note = f"Published: {reference.source}. {reference.note}".strip()
        out.append((f"{spec.title}: published", pd.DataFrame(rows), note))
    return out


def with_derived_columns(df: pd.DataFrame, axes: list[str], columns: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """The table with each derived column (name -> pandas expression) added, and a note for
    each one that failed. Expressions may name an axis by its short name (`num_prompts` for
    `data.transforms.0.num_prompts`) and earlier derived columns."""
    notes = []
    for name, expr in columns.items():
        try:
            if name in df.columns:
                raise ValueError(f"the table already has a column {name!r}")
            values = _with_short_names(df, axes).eval(expr)
            # A budget N * k / 2 comes out float; whole numbers should read 24000, not 2.4e+04,
            # and match a reference row's `budget: 24000` as they print.
            if pd.api.types.is_float_dtype(values) and values.notna().all() and (values == values.round()).all():
                values = values.astype(int)
            df = df.assign(**{name: values})
        except Exception as e:  # any pandas evaluation error: the study file's expression is wrong
            notes.append(f"column {name!r} skipped: {e}")
    return df, notes


def _with_short_names(df: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """The table with each axis also under its short name (as trial ids write it), for expressions."""
    short = {label: df[a] for a, label in axis_labels(axes).items() if label != a and label not in df.columns and a in df.columns}
    return df.assign(**short)


def pivot_rows(spec, axes: list[str]) -> list[str]:
    return spec.rows if spec.rows is not None else [a for a in group_axes(axes) if a != spec.columns]


def in_published_twin(spec, ref, metric: str, axes: list[str]) -> bool:
    """Whether a table's published twin shows this metric of this reference row."""
    if not spec.columns:
        return bool(matching(spec.metrics, [metric]))
    return metric == spec.metrics[0] and all(k in ref.axes for k in [*pivot_rows(spec, axes), spec.columns])


def pivot_tables(spec, df: pd.DataFrame, axes: list[str], reference) -> list:
    """One metric, a row per combination of `rows`, a column per value of `columns`: ours (mean ±
    95% CI half-width across the trials at each cell) and, from the reference rows whose axes
    give every row and column key, the published numbers in the same shape. Raises on a `where`
    pandas cannot evaluate or a column the table lacks (KeyError)."""
    metric, column, rows = spec.metrics[0], spec.columns, pivot_rows(spec, axes)
    trials = df.loc[_with_short_names(df, axes).query(spec.where).index] if spec.where else df
    for name in [*rows, column, metric]:
        if name not in trials.columns:
            raise KeyError(name)
    cells = summarize(trials, [*rows, column], [metric])
    # Records, not iterrows: a row of numbers would come back as floats (k=2.0).
    ours = {
        (tuple(r[k] for k in rows), r[column]): _mean_ci(r[f"{metric}.mean"], r[f"{metric}.ci95"], r[f"{metric}.n"])
        for r in cells.to_dict("records")
        if r[f"{metric}.n"] > 0
    }
    where = f"; trials where {spec.where}" if spec.where else ""
    out = [(f"{spec.title}: ours", _pivot(ours, rows, column, axes), f"{marked(metric)}: mean ± 95% CI half-width (n trials){where}")]
    published = {
        (tuple(r.axes[k] for k in rows), r.axes[column]): r.metrics[metric]
        for r in (reference.rows if reference else [])
        if in_published_twin(spec, r, metric, axes)
    }
    if published:
        note = f"Published: {reference.source}. {reference.note}".strip()
        out.append((f"{spec.title}: published", _pivot(published, rows, column, axes), note))
    return out


def _pivot(cells: dict, rows: list[str], column: str, axes: list[str]) -> pd.DataFrame:
    """{(row key, column value): cell} as a table: sorted row keys, sorted columns, NaN (shown "—") where no cell."""
    keys = sorted({k for k, _ in cells}, key=lambda k: tuple(map(_sort_key, k)))
    values = sorted({v for _, v in cells}, key=_sort_key)
    short = axis_labels(axes)
    out = pd.DataFrame(keys, columns=[short.get(r, r) for r in rows]) if rows else pd.DataFrame(index=range(len(keys)))
    for v in values:
        out[f"{short.get(column, column)}={v}"] = [cells.get((k, v), np.nan) for k in keys]
    return out


def fit_line(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least squares y ≈ slope·x + intercept: slope, intercept, MSE (mean squared residual), R²
    and the number of points; NaN where x has fewer than two distinct values."""
    fit = {"slope": np.nan, "intercept": np.nan, "MSE": np.nan, "R²": np.nan, "n points": len(x)}
    if len(np.unique(x)) > 1:
        line = stats.linregress(x, y)
        residual = y - (line.slope * x + line.intercept)
        fit.update({"slope": float(line.slope), "intercept": float(line.intercept), "MSE": float(np.mean(residual**2)), "R²": float(line.rvalue**2)})
    return fit


def linear_fits(ok: pd.DataFrame, x: str, y: str, by: list[str]) -> pd.DataFrame:
    """A least-squares line of y against x per combination of the `by` columns, every trial a point."""
    rows = []
    for point, g in groups(ok, by):
        g = g.dropna(subset=[x, y])
        rows.append({**point, **fit_line(g[x].to_numpy(float), g[y].to_numpy(float))})
    return pd.DataFrame(rows)


def power_rows(
    df: pd.DataFrame, axes: list[str], metric: str, main_axis: str | None, items: dict
) -> list[tuple[dict, str, float, farm_stats.Components]]:
    """(other axes' values, "v vs first", observed mean difference, variance components) of `metric`
    for each comparison of the main axis: from its items where both trials kept them, else from its
    seed-level values."""
    out = []
    for point, label, base, cmp in comparisons(df, axes, main_axis):
        found = item_differences(base, cmp, metric, items)
        diffs = found[2] if found else [np.array([d]) for d in (cmp[metric] - base[metric]).dropna().to_numpy(float)]
        if diffs:
            out.append((point, label, farm_stats.mean_difference(diffs), farm_stats.components(diffs)))
    return out


def power_table(rows: list, main_axis: str) -> pd.DataFrame:
    table = []
    for point, label, observed, c in rows:
        table.append(
            {
                **point,
                main_axis: label,
                "observed difference": observed,
                "between-seed SD": np.sqrt(c.between_seeds),
                "item SD": np.sqrt(c.within_seeds),
                "items per seed": c.items or float("nan"),
                "seeds run": c.seeds,
                "seeds for 80% power at the observed difference": farm_stats.seeds_needed(c, observed) if observed else None,
            }
        )
    return pd.DataFrame(table)


POWER_NOTE = (
    "variance of the paired differences split between seeds and items (one-way random effects, method of moments; "
    "between-seed SD 0 when the seed means vary no more than their items explain). Seeds: the fewest for a two-sided "
    "paired t-test over seeds (alpha 0.05, noncentral t) to detect the observed difference with 80% power, each seed "
    "scored on as many items as here. From two or three seeds the between-seed SD is itself uncertain: a pilot's "
    "figure. `farm plan --power DELTA ...` gives seeds and items for other differences"
)


def build(study, df: pd.DataFrame, axes: list[str], config_doc: dict, items: dict | None = None, histories: dict | None = None) -> Report:
    """`items`: {trial: {metric: values by item id}} (farm.results.read_items), for the paired
    comparisons over items; `histories`: {trial: {stage: log history}} (farm.results.read_histories),
    for the training curves."""
    metrics = metric_columns(df, axes)  # before the derived columns: those are not metrics
    main_axis = study.report.main_axis or next(iter(group_axes(axes)), None)
    names = study.report.labels  # {axis: the study's name for it}
    main_name = names.get(main_axis, main_axis)
    main_metric = study.report.main_metric or (metrics[0] if metrics else None)
    n_ok = int((df["status"] == "ok").sum())
    report = Report(
        title=study.name,
        description=study.description.strip(),
        summary=f"{n_ok} of {len(df)} trials finished. Axes: {', '.join(axes) or 'none'}. "
        f"Intervals are 95% Student-t intervals of the mean across seeds."
        + (" Scored on the dev rows (eval.rows: dev): a run that chooses settings, not the study's result." if study.eval.rows == "dev" else ""),
        failed=[(r["trial"], str(r.get("error", r["status"]))) for _, r in df[df["status"] != "ok"].iterrows()],
        config=yaml.safe_dump(config_doc, sort_keys=False),
        environment=environment(),
        departures=list(study.departures),
    )
    labels = [c for c in df.columns if c not in {"trial", "status", "error", *axes} and df[c].dtype == object]
    report.notes += [f"{c}: {', '.join(map(str, df[c].dropna().unique()))}" for c in labels]
    report.notes += [f"{c}: {', '.join(_fmt(float(v)) for v in df[c].dropna().unique())}" for c in df.columns if c.endswith(INSTRUMENT_SUFFIX)]
    df, notes = with_derived_columns(df, axes, study.report.columns)
    report.notes += notes
    if not (n_ok and metrics):
        return report
    summary = summarize(df, axes, metrics)
    point_axes = group_axes(axes)
    for name in [c for c in study.report.columns if c in df.columns] if point_axes else []:
        # A derived column with one value per grid point (a budget N * k / 2, not a per-trial
        # ratio) joins the summary, so that reference rows can name it.
        values = df[df["status"] == "ok"].groupby(point_axes)[name]
        if (values.nunique(dropna=False) <= 1).all():
            summary = summary.merge(values.first().reset_index(), on=point_axes, how="left")
    spec_tables, shown_tables = [], []
    for spec in study.report.tables:
        if not spec.columns:
            spec_tables += wide_tables(spec, summary, axes, metrics, study.reference)
            shown_tables.append(spec)
            continue
        try:
            spec_tables += pivot_tables(spec, df, axes, study.reference)
            shown_tables.append(spec)
        except KeyError as e:
            report.notes.append(f"table '{spec.title}' skipped: the table has no column {e.args[0]!r}")
        except Exception as e:  # a `where` pandas cannot evaluate: the study file's query is wrong
            report.notes.append(f"table '{spec.title}' skipped: {e}")
    # Metrics a wide table shows get no second column here (a study of ~30 metrics stays readable);
    # a pivot with `where` shows only some trials, so its metric stays.
    in_tables = {m for t in shown_tables if not t.where for m in matching(t.metrics, metrics)}
    rest = [m for m in metrics if m not in in_tables or m == main_metric]
    shown = summary[group_axes(axes)].copy() if group_axes(axes) else pd.DataFrame(index=summary.index)
    for m in rest:
        shown[marked(m)] = [_mean_ci(r[f"{m}.mean"], r[f"{m}.ci95"], r[f"{m}.n"], r[f"{m}.std"]) for _, r in summary.iterrows()]
    report.tables.append(
        ("Across seeds", shown, "mean ± 95% CI half-width (std, n)" + ("; the tables below show the other metrics" if in_tables else ""))
    )
    main_pairs = list(comparisons(df, axes, main_axis))
    tests = paired_tests(main_pairs, rest, main_axis)
    if len(tests):
        report.tables.append(
            (
                f"Paired tests across seeds: {main_name}",
                tests,
                "two-sided paired t-test over the seeds both conditions share (it assumes their differences normal) and its "
                "95% interval; q: Benjamini-Hochberg adjusted p across the table's tests (metrics x axis values)",
            )
        )
    per_item = item_tests(main_pairs, metrics, main_axis, items or {})
    if len(per_item):
        report.tables.append((f"Paired differences over items and seeds: {main_name}", per_item, ITEM_TESTS_NOTE))
    for spec in study.report.pairs:
        chosen = [m for m in spec.metrics or [main_metric] if m in metrics]
        try:
            pairs = list(chosen_pairs(df, spec))
        except Exception as e:  # a query pandas cannot evaluate, a column the table lacks, a `by` too coarse
            report.notes.append(f"pairs '{spec.title}' skipped: {e}")
            continue
        if not pairs:
            report.notes.append(f"pairs '{spec.title}': no seed has trials on both sides ({spec.a}; {spec.b})")
            continue
        report.tables.append(
            (
                f"Paired across seeds: {spec.title}",
                paired_tests(pairs, chosen, "pair"),
                f"b ({spec.b}) minus a ({spec.a}), paired by seed within {', '.join(spec.by) or 'the study'}; "
                "two-sided paired t-test, 95% t-interval; q: Benjamini-Hochberg across the table's tests",
            )
        )
        within = item_tests(pairs, chosen, "pair", items or {})
        if len(within):
            report.tables.append((f"Paired over items and seeds: {spec.title}", within, ITEM_TESTS_NOTE))
    power = power_rows(df, axes, main_metric, main_axis, items or {}) if main_metric in metrics else []
    if power:
        report.tables.append((f"Seeds needed: {main_metric}", power_table(power, main_axis), POWER_NOTE))
    if study.reference:
        note = f"Published: {study.reference.source}. {study.reference.note}".strip()
        # Published numbers a table's published twin shows are not repeated row by row.
        twins = frozenset(
            (i, m) for i, r in enumerate(study.reference.rows) for m in r.metrics if any(in_published_twin(t, r, m, axes) for t in shown_tables)
        )
        long = reference_table(study.reference, summary, axes, twins)
        if len(long):
            report.tables.append(("Published numbers beside ours", long, note))
    report.tables += spec_tables
    # The main metric's paired differences: over items where its trials kept them, else over seeds.
    main = next((t[t["metric"] == main_metric] for t in (per_item, tests) if len(t) and (t["metric"] == main_metric).any()), None)
    if main is not None:
        kind = "items and seeds, hierarchical bootstrap" if "p (bootstrap)" in main else "seeds, Student t"
        caption = f"{main_metric}: paired difference from {main_name}={_reference_value(df, main_axis)} (95% interval over {kind})"
        report.plots.append((caption, "difference.png", difference_plot(main, main_axis, caption, names)))
    specs = list(study.report.plots)
    if not specs and main_axis and main_metric in metrics:
        specs = [PlotSpec(kind="line", x=main_axis, y=main_metric)]
    for i, spec in enumerate(specs):
        caption = spec.title or f"{spec.y} by {names.get(spec.x, spec.x or GRID_POINT)}"
        try:
            png = plot(spec, df, axes, names)
        except KeyError as e:
            report.notes.append(f"plot '{caption}' skipped: the table has no column {e.args[0]!r}")
            continue
        report.plots.append((caption, "plot.png" if i == 0 else f"plot-{i + 1}.png", png))
        if spec.kind == "fit":
            fits = linear_fits(df[df["status"] == "ok"], spec.x, spec.y, spec.by).rename(columns=axis_labels(axes))
            report.tables.append(
                (
                    f"Linear fit: {spec.y} against {names.get(spec.x, spec.x)}",
                    fits,
                    "least squares over every trial (each seed a point); MSE: mean squared residual",
                )
            )
    png = curves_plot(df, histories, list(study.stages), main_axis, names) if histories else None
    if png:
        report.plots.append(("Training curves: loss by step (mean over seeds, 95% band)", "curves.png", png))
    report.tables = [(title, t.rename(columns=names), note) for title, t, note in report.tables]
    return report


def write_report(out_dir: Path, study, df: pd.DataFrame, axes: list[str], config_doc: dict) -> Path:
    report = build(study, df, axes, config_doc, read_items(out_dir, df["trial"]), read_histories(out_dir, df["trial"]))
    made_with, notes = provenance(out_dir)
    report.environment.update(made_with)
    report.notes += notes
    for name in registry.steps.names():  # what a step after the grid wrote (Study E's arena)
        report.tables += registry.steps.get(name).tables(out_dir)
    for _, name, png in report.plots:
        atomic_write(out_dir / name, png)
    atomic_write(out_dir / "report.html", render_html(report).encode())
    path = out_dir / "report.md"
    atomic_write(path, render_md(report).encode())
    return path


# ---------------------------------------------------------------- rendering


def render_md(r: Report) -> str:
    out = [f"# {r.title}", "", r.description, "", r.summary, ""]
    out += [f"- trial `{t}` failed: {e}" for t, e in r.failed]
    if r.departures:
        out += ["", "## Departures from the reference protocol", "", *[f"- {d}" for d in r.departures]]
    for heading, table, note in r.tables:
        out += ["", f"## {heading}", "", f"_{note}_", "", md_table(table)]
    for caption, name, _ in r.plots:
        out += ["", f"## {caption}", "", f"![{caption}]({name})"]
    out += [f"\n_{note}_" for note in r.notes]
    out += ["", "## Config", "", "```yaml", r.config.rstrip(), "```", "", "## Environment", ""]
    out += [f"- {k}: {v}" for k, v in r.environment.items()]
    out += ["", "Per-trial rows: `table.csv` / `table.parquet`; per-trial configs and metrics: `<trial-id>/`.", ""]
    return "\n".join(out)


def render_html(r: Report) -> str:
    e = html.escape
    parts = [f"<h1>{e(r.title)}</h1>", f"<p>{e(r.description)}</p>", f"<p>{e(r.summary)}</p>"]
    if r.failed:
        parts.append("<h2>Failed trials</h2><ul>" + "".join(f"<li><code>{e(t)}</code>: {e(err)}</li>" for t, err in r.failed) + "</ul>")
    if r.departures:
        parts.append("<h2>Departures from the reference protocol</h2><ul>" + "".join(f"<li>{e(d)}</li>" for d in r.departures) + "</ul>")
    for heading, table, note in r.tables:
        parts.append(f"<h2>{e(heading)}</h2><p><em>{e(note)}</em></p>" + table.to_html(index=False, na_rep="—", float_format=_fmt, escape=True))
    for caption, _, png in r.plots:
        data = base64.b64encode(png).decode()
        parts.append(f'<h2>{e(caption)}</h2><img alt="{e(caption)}" src="data:image/png;base64,{data}">')
    parts += [f"<p><em>{e(note)}</em></p>" for note in r.notes]
    parts.append(f"<h2>Config</h2><pre>{e(r.config)}</pre>")
    parts.append("<h2>Environment</h2><ul>" + "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in r.environment.items()) + "</ul>")
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}"
        "th{background:#eee}pre{background:#f6f6f6;padding:1em;overflow-x:auto}img{max-width:100%}"
    )
    return f'<!doctype html><html><head><meta charset="utf-8"><title>{e(r.title)}</title><style>{style}</style></head><body>{"".join(parts)}</body></html>\n'


def md_table(df: pd.DataFrame) -> str:
    # A cell is one line of text: generated answers hold newlines and pipes.
    cells = [[_fmt(v) if isinstance(v, float) else " ".join(str(v).split()).replace("|", "\\|") for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def _fmt(v: float) -> str:
    return "—" if pd.isna(v) else f"{v:.4g}"


def _mean_ci(mean: float, ci: float, n: int, std: float | None = None) -> str:
    """The mean to the precision its interval supports: the half-width to two significant digits
    and the mean to the same decimal place (0.626 ± 0.022, not 0.6259 ± 0.02163)."""
    extra = f"std {std:.2g}, " if std is not None and not pd.isna(std) else ""
    if pd.isna(ci) or not np.isfinite(ci) or ci <= 0 or pd.isna(mean):
        spread = " ± 0" if ci == 0 else ""
        return f"{_fmt(mean)}{spread} ({extra}n={int(n)})"
    places = max(0, 1 - int(np.floor(np.log10(ci))))
    return f"{mean:.{places}f} ± {ci:.{places}f} ({extra}n={int(n)})"


def _point(axes: dict, names: dict | None = None) -> str:
    return ", ".join(f"{(names or {}).get(k, k)}={v}" for k, v in axes.items()) or "all trials"


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float, np.number)) else (1, 0, str(v))


# ---------------------------------------------------------------- plot and environment


def plot(spec, df: pd.DataFrame, axes: list[str], names: dict | None = None) -> bytes:
    """Render one PlotSpec (axes named by `names`, the study's labels); raises KeyError naming a
    column the table lacks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"]
    ys = [c for c in ok.columns if c.startswith(spec.y)] if spec.y.endswith("/") else [spec.y]
    x = spec.x
    if x is None:  # a row per grid point
        x = GRID_POINT
        ok = ok.assign(**{x: point_labels(ok, axes)})
    for col in [x, *(ys or [spec.y]), *spec.by]:  # a prefix that matches no column is missing too
        if col not in ok.columns:
            raise KeyError(col)
    width = max(6.5, 2.5 + 0.6 * len(ys)) if spec.kind == "heatmap" else 6.5  # room for a value in every cell
    fig, ax = plt.subplots(figsize=(width, 4.2 if spec.x else 2.2 + 0.35 * ok[x].nunique()), dpi=120)
    names = names or {}
    {"line": _line, "fit": _fit, "heatmap": _heatmap, "bars": _bars}[spec.kind](ax, ok, axes, x, ys, spec.by, names)
    ax.set_title(spec.title or f"{spec.y} by {names.get(x, x)}", fontsize=10)
    return _png(fig)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def difference_plot(rows: pd.DataFrame, main_axis: str, title: str, names: dict) -> bytes:
    """Each comparison's mean difference with its interval, one series per combination of the
    other axes, and the line of no difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = list(rows.columns[: list(rows.columns).index(main_axis)])
    labels = list(dict.fromkeys(rows[main_axis]))
    series = list(groups(rows, others))
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    width = 0.6 / len(series)
    for i, (point, g) in enumerate(series):  # side by side around each comparison's tick
        x = np.array([labels.index(v) for v in g[main_axis]]) + (i - (len(series) - 1) / 2) * width
        y = g["mean difference"].to_numpy(float)
        err = np.vstack([y - g["low (95%)"].to_numpy(float), g["high (95%)"].to_numpy(float) - y])
        ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="o", capsize=4, label=_point(point, names) if others else None)
    ax.axhline(0, color="grey", lw=1, ls="--")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(names.get(main_axis, main_axis))
    ax.set_ylabel("difference (b - a)")
    if others:
        ax.legend(fontsize=8)
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    return _png(fig)


def curves_plot(df: pd.DataFrame, histories: dict, stages: list[str], main_axis: str | None, names: dict, metric: str = "loss") -> bytes | None:
    """A panel per training stage (in the study's order): `metric` against the step, for each value
    of the main axis the mean over its trials' seeds and a 95% t band. A stage whose curve is the
    same in every trial (trained once, shared) is one line. None: no trial kept a history."""
    ok = df[df["status"] == "ok"]
    finished = set(ok["trial"])
    curves = {}  # stage -> [(label, steps x runs)]
    for stage in stages:
        runs = {
            t: h[stage].dropna(subset=[metric]).groupby("step")[metric].last()
            for t, h in histories.items()
            if t in finished and stage in h and metric in h[stage]
        }
        if not runs:
            continue
        if len({tuple(r.items()) for r in runs.values()}) == 1:
            curves[stage] = [("every trial (one run)", next(iter(runs.values())).to_frame())]
            continue
        by = ok.groupby(main_axis, sort=False) if main_axis else [("all trials", ok)]
        values = sorted(((v, g) for v, g in by), key=lambda vg: _sort_key(vg[0]))
        curves[stage] = [
            (f"{names.get(main_axis, main_axis)}={v}" if main_axis else v, pd.concat([runs[t] for t in g["trial"] if t in runs], axis=1))
            for v, g in values
            if any(t in runs for t in g["trial"])
        ]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, len(curves), figsize=(max(6.5, 3.6 * len(curves)), 3.6), dpi=120, squeeze=False)
    for ax, (stage, lines) in zip(axs[0], curves.items()):
        for label, frame in lines:  # rows: steps; columns: the seeds' runs
            n = frame.count(axis=1).to_numpy()
            mean, sd = frame.mean(axis=1).to_numpy(float), frame.std(axis=1).to_numpy(float)
            half = np.where(n > 1, stats.t.ppf(0.975, np.maximum(n - 1, 1)) * np.nan_to_num(sd) / np.sqrt(n), 0.0)
            line = ax.plot(frame.index, mean, label=label if len(lines) == 1 and frame.shape[1] == 1 else f"{label} (n={int(n.max())})")[0]
            ax.fill_between(frame.index, mean - half, mean + half, color=line.get_color(), alpha=0.2)
        ax.set(title=stage, xlabel="step", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def _reference_value(df: pd.DataFrame, axis: str):
    return sorted(df[df["status"] == "ok"][axis].unique(), key=_sort_key)[0]


def _positions(ok: pd.DataFrame, axis: str):
    xs = sorted(ok[axis].unique(), key=_sort_key)
    if pd.api.types.is_numeric_dtype(ok[axis]):
        return xs, (lambda v: v)
    return xs, {x: i for i, x in enumerate(xs)}.get


def _line(ax, ok, axes, axis, ys, by, names):
    """Mean and 95% interval (a band) against a grid axis, a line per combination of the `by`
    columns (default: the other axes), every trial as a point."""
    metric = ys[0]
    xs, pos = _positions(ok, axis)
    others = by or [a for a in group_axes(axes) if a != axis]
    summary = summarize(ok, [*others, axis], [metric])
    for key, s in summary.groupby(others, sort=True) if others else [((), summary)]:
        key = key if isinstance(key, tuple) else (key,)
        s = s.sort_values(axis, key=lambda col: col.map(_sort_key))
        x = [pos(v) for v in s[axis]]
        mean, half = s[f"{metric}.mean"].to_numpy(float), np.nan_to_num(s[f"{metric}.ci95"].to_numpy(float))
        line = ax.plot(x, mean, "o-", label=_point(dict(zip(others, key)), names) if others else "mean (95% CI)")[0]
        ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.2)
    ax.scatter([pos(v) for v in ok[axis]], ok[metric], s=12, color="gray", alpha=0.6, label="trials", zorder=3)
    # With few seeds a t-interval is wide (n=2: ±12.7 std errors); keep the data in view.
    lo, hi = float(ok[metric].min()), float(ok[metric].max())
    pad = (hi - lo) * 0.5 or abs(hi) * 0.1 or 0.1
    ax.set_ylim(lo - pad, hi + pad)
    if not pd.api.types.is_numeric_dtype(ok[axis]):
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set(xlabel=names.get(axis, axis), ylabel=marked(metric))  # which way is better, as the tables say
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _fit(ax, ok, axes, x, ys, by, names):
    """Every trial as a point, a least-squares line per combination of the `by` columns (each its
    own colour), each with its slope and mean squared error."""
    short = {**axis_labels(axes), **names}
    for i, (key, g) in enumerate(ok.groupby(by, sort=True) if by else [((), ok)]):
        key = key if isinstance(key, tuple) else (key,)
        g = g.dropna(subset=[x, ys[0]])
        xv, yv = g[x].to_numpy(float), g[ys[0]].to_numpy(float)
        fit, color = fit_line(xv, yv), f"C{i % 10}"  # explicit: scatter and plot cycle colours apart
        name = ", ".join(f"{short.get(c, c)}={v}" for c, v in zip(by, key)) or "fit"
        ax.scatter(xv, yv, s=16, color=color, label=f"{name}: slope {_fmt(fit['slope'])}, MSE {_fmt(fit['MSE'])}")
        if not np.isnan(fit["slope"]):
            grid = np.linspace(xv.min(), xv.max(), 50)
            ax.plot(grid, fit["slope"] * grid + fit["intercept"], "--", color=color)
    ax.set(xlabel=names.get(x, x), ylabel=marked(ys[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _heatmap(ax, ok, axes, axis, ys, by, names):
    """Mean over seeds (and other axes) of each metric (columns) at each value of an axis (rows)."""
    means = ok.groupby(axis)[ys].mean().reindex(sorted(ok[axis].unique(), key=_sort_key))
    image = ax.imshow(means.to_numpy(float), aspect="auto", cmap="viridis")
    ax.figure.colorbar(image, ax=ax)
    labels = [c.split("/", 1)[-1] for c in ys]
    ax.set_xticks(range(len(ys)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(means)), [str(v) for v in means.index], fontsize=8)
    for (i, j), v in np.ndenumerate(means.to_numpy(float)):
        ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="white")
    ax.set(xlabel=ys[0].split("/", 1)[0] if len(ys) > 1 else ys[0], ylabel=names.get(axis, axis))


def _bars(ax, ok, axes, axis, ys, by, names):
    """Grouped bars: one group per value of an axis, one bar per metric, 95% interval whiskers."""
    xs = sorted(ok[axis].unique(), key=_sort_key)
    width = 0.8 / len(ys)
    for k, metric in enumerate(ys):
        stats_ = [mean_std_n(ok.loc[ok[axis] == x, metric].dropna().to_numpy(float)) for x in xs]
        means = [m for m, _, _ in stats_]
        halves = [np.nan_to_num(ci_half_width(sd, n)) for _, sd, n in stats_]
        ax.bar(
            np.arange(len(xs)) + (k - (len(ys) - 1) / 2) * width,
            means,
            width,
            yerr=halves,
            capsize=3,
            label=metric.split("/", 1)[-1] if len(ys) > 1 else metric,
        )
    long = max(len(str(x)) for x in xs) > 8  # grid points ("sft=lima, dpo=hh") would overlap
    ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=25 if long else 0, ha="right" if long else "center", fontsize=8)
    ax.set(xlabel=names.get(axis, axis), ylabel=ys[0].split("/", 1)[0] if len(ys) > 1 else ys[0])
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def provenance(out_dir: Path) -> tuple[dict[str, str], list[str]]:
    """From the trials' records (`*/metrics.json`): environment lines for the library versions the
    study's artifacts (stages, labelling, evals) were made with and the hub commits its trials read,
    and a note for each artifact made under another major.minor version than this environment's (a
    rerun reuses it: versions are not in the keys)."""
    import json
    from collections import Counter

    made: dict[tuple[str, str], dict] = {}  # (kind, key) -> versions: an artifact shared by trials counts once
    revisions: dict[str, set[str]] = {}
    for path in sorted(Path(out_dir).glob("*/metrics.json")):
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not a trial's record (the table says which trials are missing)
            continue
        for record in (saved.get("stages") or {}).values():
            if record and record.get("versions"):
                made[(record["kind"], record["key"])] = record["versions"]
        if saved.get("eval_versions"):
            made[("eval", saved["eval_key"])] = saved["eval_versions"]
        for repo, rev in (saved.get("revisions") or {}).items():
            revisions.setdefault(repo, set()).add(str(rev))
    env = {}
    by_library: dict[str, Counter] = {}
    for versions in made.values():
        for name, v in versions.items():
            by_library.setdefault(name, Counter())[v] += 1
    if by_library:
        env["artifacts made with"] = "; ".join(
            f"{name} " + ", ".join(f"{v} ({n} artifact{'s' if n > 1 else ''})" if len(c) > 1 else v for v, n in sorted(c.items()))
            for name, c in by_library.items()
        )
    if revisions:
        env["hub revisions"] = "; ".join(f"{repo} @ {', '.join(sorted(revs))}" for repo, revs in sorted(revisions.items()))
    now = library_versions()
    notes = [
        f"artifact {kind}-{key} was made with {', '.join(drift)} and reused as is (library versions are not in the keys)"
        for (kind, key), versions in made.items()
        if (drift := version_drift(versions, now))
    ]
    return env, notes


def environment() -> dict[str, str]:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": str(os.cpu_count())}
    for pkg in PACKAGES:
        try:
            env[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    if shutil.which("nvidia-smi"):
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
        env["gpus"] = "; ".join(gpus.splitlines()) or "none"
    else:
        env["gpus"] = "none"
    return env


def compare(a: Path, b: Path) -> str:
    """Two runs of one study, trial by trial: each metric in both and b - a, as a markdown table."""
    trials_a, trials_b = saved_trials(a), saved_trials(b)
    if trials_a[0].study.name != trials_b[0].study.name:
        raise ValueError(f"{a} holds study {trials_a[0].study.name!r} but {b} holds {trials_b[0].study.name!r}")
    ta, tb = pd.read_csv(Path(a) / "table.csv"), pd.read_csv(Path(b) / "table.csv")
    axes = set(trials_a[0].axes)
    metrics = [
        c
        for c in ta.columns
        if c in tb.columns and c not in {"trial", "status", "error", *axes, *BOOKKEEPING} and pd.api.types.is_numeric_dtype(ta[c])
    ]
    both = ta.merge(tb, on="trial", suffixes=(" (a)", " (b)"))
    rows = pd.DataFrame({"trial": both["trial"]})
    for m in metrics:
        rows[f"{m} (a)"], rows[f"{m} (b)"] = both[f"{m} (a)"], both[f"{m} (b)"]
        rows[f"{m} b-a"] = both[f"{m} (b)"] - both[f"{m} (a)"]
    lines = [f"a: {a}", f"b: {b}", "", md_table(rows)]
    only = sorted(set(ta["trial"]) ^ set(tb["trial"]))
    if only:
        lines += ["", f"in one run only: {', '.join(only)}"]
    return "\n".join(lines)
