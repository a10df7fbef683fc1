"""The tiny study end to end on a local Ray: two trials through pretrain -> SFT -> DPO -> eval."""

import shutil

import pytest
import yaml

from conftest import artifacts, farm, metrics_table, read_json
from conftest import TINY

pytestmark = pytest.mark.slow


def test_run_writes_trials_table_and_report(tiny_run):
    results, out = tiny_run
    d = results / "tiny"
    assert "farm: report at" in out and "rate=1.0: dpo step 3/3" in out  # progress lines
    table = metrics_table(results)
    assert list(table.index) == ["rate=0.0", "rate=1.0"] and (table["status"] == "ok").all()
    for col in ("preference_accuracy", "reward_accuracy", "reward_margin", "perplexity"):
        assert table[col].notna().all()
    assert (table["eval_pairs"] == 16).all()
    for trial in table.index:
        saved = read_json(d / trial / "metrics.json")
        assert saved["status"] == "ok" and set(saved["stages"]) == {"pretrain", "sft", "dpo"}
        assert yaml.safe_load((d / trial / "config.yaml").read_text())["id"] == trial
    flipped = read_json(d / "rate=1.0" / "metrics.json")["stages"]["sft"]["audit"]
    clean = read_json(d / "rate=0.0" / "metrics.json")["stages"]["sft"]["audit"]
    assert flipped["perturbed_rows"] == flipped["train_rows"] > 0 and clean["perturbed_rows"] == 0
    report = (d / "report.md").read_text()
    assert "2 of 2 trials finished" in report and "(n=1)" in report and (d / "plot.png").exists()


def test_shared_pretrain_stage_ran_once(tiny_run):
    results, _ = tiny_run
    kinds = sorted(name.split("-")[0] for name in artifacts(results))
    assert kinds == ["dpo", "dpo", "eval", "eval", "pretrain", "sft", "sft"]
    plan = farm("plan", TINY, "--results", results).stdout
    assert "0 to run" in plan and "shared by 2 trials" in plan and "to run\n" not in plan


def test_rerun_trains_nothing(tiny_run, tmp_path):
    results, _ = tiny_run
    before, table = artifacts(results), metrics_table(results)
    out = farm("run", TINY, "--results", results).stdout
    assert "2 already finished" in out and "Ray ready" not in out  # finished trials are not even scheduled

    # With the results gone but the artifact store kept, the trials run again and every
    # stage and eval is reused: no training step, no new or rewritten artifact.
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    shutil.rmtree(copy / "tiny")
    out = farm("run", TINY, "--results", copy).stdout
    assert "0 already finished" in out and " step " not in out
    assert artifacts(copy).keys() == before.keys()
    assert metrics_table(copy).equals(table)
