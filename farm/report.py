"""report.md: the study table aggregated across seeds (mean ± std, n) and a plot of the main
metric against the main axis."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from farm.cache import atomic_write

SEED_AXIS = "seed"
BOOKKEEPING = {"done", "eval_pairs", "eval_seconds"}


def aggregate(df: pd.DataFrame, axes: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, std and n of each metric over the seeds of every other axis combination."""
    ok = df[df["status"] == "ok"]
    by = [a for a in axes if a != SEED_AXIS]
    if not by:
        ok = ok.assign(_all="all")
        by = ["_all"]
    agg = ok.groupby(by, sort=True)[metrics].agg(["mean", "std", "count"])
    return agg


def main_choice(study, axes: list[str], metrics: list[str]) -> tuple[str | None, str]:
    axis = study.report.main_axis or next((a for a in axes if a != SEED_AXIS), None)
    metric = study.report.main_metric or (metrics[0] if metrics else "")
    return axis, metric


def write_report(out_dir: Path, study, df: pd.DataFrame, axes: list[str]) -> Path:
    metrics = [c for c in df.columns if c not in {"trial", "status", "error", *axes} and pd.api.types.is_numeric_dtype(df[c])]
    metrics = [m for m in metrics if m not in BOOKKEEPING]
    axis, metric = main_choice(study, axes, metrics)
    lines = [f"# {study.name}", "", study.description.strip(), ""]
    n_ok = int((df["status"] == "ok").sum())
    lines.append(f"{n_ok} of {len(df)} trials finished. Axes: {', '.join(axes) or 'none'}.")
    failed = df[df["status"] != "ok"]
    for _, row in failed.iterrows():
        lines.append(f"- trial `{row['trial']}` {row['status']}: {row.get('error', '')}")
    lines += ["", "## Across seeds (mean ± std, n)", ""]
    if n_ok and metrics:
        agg = aggregate(df, axes, metrics)
        shown = metrics
        lines.append("| " + " | ".join(list(agg.index.names) + shown) + " |")
        lines.append("|" + "---|" * (len(agg.index.names) + len(shown)))
        for key, row in agg.iterrows():
            key = key if isinstance(key, tuple) else (key,)
            cells = [f"{row[(m, 'mean')]:.4g} ± {0 if pd.isna(row[(m, 'std')]) else row[(m, 'std')]:.2g} (n={int(row[(m, 'count')])})" for m in shown]
            lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
        if axis and metric in metrics:
            atomic_write(out_dir / "plot.png", _plot(df, axis, metric))
            lines += ["", f"## {metric} by {axis}", "", f"![{metric} by {axis}](plot.png)"]
    lines += ["", f"Per-trial rows: `table.csv` / `table.parquet`; per-trial configs and metrics: `<trial-id>/`."]
    path = out_dir / "report.md"
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path


def _plot(df: pd.DataFrame, axis: str, metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    xs = sorted(ok[axis].unique(), key=str)
    pos = {x: i for i, x in enumerate(xs)}
    ax.scatter([pos[x] for x in ok[axis]], ok[metric], alpha=0.5, label="trials")
    stats = ok.groupby(axis)[metric].agg(["mean", "std"]).reindex(xs)
    ax.errorbar(range(len(xs)), stats["mean"], yerr=stats["std"].fillna(0), fmt="o-", color="black", capsize=4, label="mean ± std")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(axis)
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
