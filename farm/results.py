"""The results layout and the study table.

results/<study>/<trial-id>/config.yaml   the trial's resolved study and axis values
results/<study>/<trial-id>/metrics.json  eval metrics, each stage's record (its training history too), status
results/<study>/<trial-id>/items.json    per-item values of the metrics that are means over items
results/<study>/table.csv, table.parquet one row per trial: axes + metrics
Every file is replaced atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import yaml

from farm.config import value_label
from farm.files import atomic_write, write_json
from farm.grid import Trial
from farm.preflight import revisions

ITEMS_FILE = "items.json"


def study_dir(results: str | Path, study: str) -> Path:
    return Path(results) / study


def write_trial(
    results: Path,
    trial,
    plan,
    status: str,
    metrics: dict,
    stages: dict,
    error: str | None = None,
    eval_versions: dict | None = None,
    items: dict | None = None,
) -> None:
    """The trial's config and record: its metrics, each stage's marker (with the library versions
    that made it), the versions that made its eval, and the commit of each hub input it read; and
    its metrics' per-item values ({metric: {"ids", "values"}}, as its eval wrote them)."""
    d = study_dir(results, trial.study.name) / trial.id
    config = {"id": trial.id, "profile": trial.profile, "axes": trial.axes, "study": trial.study.model_dump(mode="json")}
    atomic_write(d / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    if items is not None:  # before metrics.json: a trial whose record is written has its items
        write_json(d / ITEMS_FILE, items)
    write_json(
        d / "metrics.json",
        {
            "trial": trial.id,
            "status": status,
            "eval_key": plan.eval_key,
            "metrics": metrics,
            "stages": stages,
            "error": error,
            "eval_versions": eval_versions,
            "revisions": revisions(trial.study),
        },
    )


def finished(results: Path, trial, plan) -> dict | None:
    """The trial's saved metrics if it already finished with this exact plan."""
    try:
        saved = json.loads((study_dir(results, trial.study.name) / trial.id / "metrics.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):  # not JSON, or not UTF-8: not a finished trial's
        return None
    return saved if saved.get("status") == "ok" and saved.get("eval_key") == plan.eval_key else None


def saved_trials(d: Path) -> list:
    """The trials of a finished (or partly finished) run, read back from their config.yaml."""
    configs = sorted(Path(d).glob("*/config.yaml"))
    if not configs:
        raise FileNotFoundError(f"{d}: no trial folders with a config.yaml; is this a results/<study> folder?")
    trials = []
    for p in configs:
        try:
            trials.append(Trial.model_validate(yaml.safe_load(p.read_text(encoding="utf-8"))))
        except (ValueError, yaml.YAMLError) as e:  # pydantic's ValidationError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{p}: not a trial's config.yaml as `farm run` writes it: {str(e).splitlines()[0]}") from None
    return trials


def table(results: Path, trials) -> pd.DataFrame:
    """One row per trial of the study: id, status, every axis, every metric (numbers, and
    names such as the scorer that produced a metric)."""
    rows = []
    for t in trials:
        path = study_dir(results, t.study.name) / t.id / "metrics.json"
        saved = json.loads(path.read_text()) if path.exists() else {"status": "missing", "metrics": {}}
        row = {"trial": t.id, "status": saved["status"], **{a: _cell(v) for a, v in t.axes.items()}}
        row.update({k: v for k, v in saved["metrics"].items() if isinstance(v, (int, float, str))})
        # What the evaluated model was trained on, as its stage's kind says it measures it (Study D's x axis).
        last = t.study.evaluated()
        trained = ((saved.get("stages") or {}).get(last or "") or {}).get("metrics", {})
        row.update({k: trained[k] for k in (t.study.stages[last].columns if last else ()) if k in trained})
        if saved.get("error"):
            row["error"] = saved["error"]
        rows.append(row)
    return pd.DataFrame(rows)


def read_items(d: Path, trial_ids) -> dict[str, dict[str, pd.Series]]:
    """{trial: {metric: values indexed by item id}} for the trials that kept per-item values. An id
    repeated within a metric (two eval rows of one source id) is told apart by its occurrence."""
    out = {}
    for t in trial_ids:
        path = Path(d) / t / ITEMS_FILE
        if not path.exists():
            continue
        saved = json.loads(path.read_text(encoding="utf-8"))
        out[t] = {}
        for metric, v in saved.items():
            ids = pd.Series(v["ids"], dtype=str)
            ids = ids + ids.groupby(ids).cumcount().map(lambda k: f"#{k}" if k else "")
            out[t][metric] = pd.Series(v["values"], index=ids.to_numpy(), dtype=float)
    return out


def read_histories(d: Path, trial_ids) -> dict[str, dict[str, pd.DataFrame]]:
    """{trial: {stage: its trainer's log history, a row per logged step}} from the trials' records,
    for the stages that trained and kept one."""
    out = {}
    for t in trial_ids:
        path = Path(d) / t / "metrics.json"
        if not path.exists():
            continue
        stages = json.loads(path.read_text(encoding="utf-8")).get("stages") or {}
        out[t] = {name: pd.DataFrame(r["history"]) for name, r in stages.items() if r and r.get("history")}
    return out


def _cell(value):
    return value_label(value) if isinstance(value, (dict, list)) else value


def write_table(results: Path, study: str, df: pd.DataFrame) -> None:
    d = study_dir(results, study)
    atomic_write(d / "table.csv", df.to_csv(index=False).encode())
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write(d / "table.parquet", buf.getvalue())
