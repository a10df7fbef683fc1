import json

import pandas as pd

from farm.grid import expand
from farm.plan import plan_study
from farm.results import finished, saved_trials, table, write_table, write_trial


def test_table_has_a_row_per_trial_with_axes_metrics_and_errors(tmp_path, tiny_doc):
    tiny_doc["grid"] = {"data.transforms.0.rate": [0.0, 0.5], "seed": [1, 2]}
    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    for t in trials[:-1]:
        write_trial(tmp_path, t, plans[t.id], "ok", {"acc": t.axes["seed"] / 10, "scorer": "embedded", "samples": ["lists are not columns"]}, {})
    write_trial(tmp_path, trials[-1], plans[trials[-1].id], "failed", {}, {}, "RuntimeError: boom")
    df = table(tmp_path, trials)
    assert list(df["trial"]) == [t.id for t in trials]
    assert list(df.columns) == ["trial", "status", "data.transforms.0.rate", "seed", "acc", "scorer", "error"]
    assert df["acc"].tolist()[:3] == [0.1, 0.2, 0.1] and df["error"].tolist()[-1] == "RuntimeError: boom"
    write_table(tmp_path, "tiny", df)
    parquet, csv = pd.read_parquet(tmp_path / "tiny" / "table.parquet"), pd.read_csv(tmp_path / "tiny" / "table.csv")
    assert list(parquet.columns) == list(csv.columns) == list(df.columns) and len(parquet) == len(csv) == 4
    assert not list((tmp_path / "tiny").rglob(".*tmp*"))  # atomic writes leave no temporaries
    assert [t.id for t in saved_trials(tmp_path / "tiny")] == sorted(t.id for t in trials)
    assert saved_trials(tmp_path / "tiny")[0].study == trials[0].study


def test_finished_requires_the_same_plan(tmp_path, tiny_doc):
    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    t = trials[0]
    assert finished(tmp_path, t, plans[t.id]) is None
    write_trial(tmp_path, t, plans[t.id], "ok", {"x": 1.0}, {})
    assert finished(tmp_path, t, plans[t.id])["metrics"] == {"x": 1.0}
    tiny_doc["stages"]["dpo"]["beta"] = 0.5  # the study changed: the old result is stale
    changed = expand(tiny_doc, "s.yaml")[0]
    assert finished(tmp_path, changed, plan_study([changed])[changed.id]) is None
    saved = json.loads((tmp_path / "tiny" / t.id / "metrics.json").read_text())
    assert saved["status"] == "ok" and (tmp_path / "tiny" / t.id / "config.yaml").exists()
