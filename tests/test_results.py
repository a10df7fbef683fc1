import json

import pandas as pd

from farm.cache import plan_study
from farm.report import aggregate, write_report
from farm.results import finished, table, write_table, write_trial
from farm.spec import expand


def test_table_and_report_aggregate_over_seeds(tmp_path, tiny_doc):
    tiny_doc["grid"] = {"data.transforms.0.rate": [0.0, 0.5], "seed": [1, 2, 3]}
    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    for i, t in enumerate(trials):
        acc = 0.6 - t.axes["data.transforms.0.rate"] * 0.2 + 0.01 * t.axes["seed"]
        if t.id == "rate=0.5_seed=3":
            write_trial(tmp_path, t, plans[t.id], "failed", {}, {}, "RuntimeError: boom")
        else:
            write_trial(tmp_path, t, plans[t.id], "ok", {"reward_accuracy": acc, "eval_seconds": 1.0}, {})
    df = table(tmp_path, trials)
    assert list(df["trial"]) == [t.id for t in trials] and len(df) == 6
    assert df.loc[df["trial"] == "rate=0.5_seed=3", "error"].item() == "RuntimeError: boom"
    agg = aggregate(df, ["data.transforms.0.rate", "seed"], ["reward_accuracy"])
    assert agg.loc[0.0, ("reward_accuracy", "count")] == 3
    assert abs(agg.loc[0.0, ("reward_accuracy", "mean")] - 0.62) < 1e-9
    assert abs(agg.loc[0.5, ("reward_accuracy", "mean")] - 0.515) < 1e-9  # the failed seed is left out
    assert abs(agg.loc[0.0, ("reward_accuracy", "std")] - 0.01) < 1e-9

    write_table(tmp_path, "tiny", df)
    parquet, csv = pd.read_parquet(tmp_path / "tiny" / "table.parquet"), pd.read_csv(tmp_path / "tiny" / "table.csv")
    assert list(parquet.columns) == list(csv.columns) == list(df.columns) and len(parquet) == len(csv) == 6
    report = write_report(tmp_path / "tiny", trials[0].study, df, list(trials[0].axes)).read_text()
    assert "5 of 6 trials finished" in report and "RuntimeError: boom" in report
    assert "| 0.0 | 0.62 ± 0.01 (n=3) |" in report
    assert (tmp_path / "tiny" / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "tiny").glob(".*tmp*"))  # atomic writes leave no temporaries


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
