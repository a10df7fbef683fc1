"""The tiny study end to end on a local Ray: two trials through pretrain -> SFT -> DPO -> eval."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY, artifacts, farm, farm_in_terminal, metrics_table, read_json

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
        # each pair's values, by row id, as the eval wrote them into its artifact: their means are the table's
        items = read_json(d / trial / "items.json")
        assert items == read_json(results / ".store" / "artifacts" / f"eval-{saved['eval_key']}" / "items.json")
        assert set(items) == {"preference_accuracy", "reward_accuracy", "reward_margin"}
        for metric, v in items.items():
            assert len(set(v["ids"])) == len(v["values"]) == 16 and sum(v["values"]) / 16 == pytest.approx(table.loc[trial, metric])
    flipped = read_json(d / "rate=1.0" / "metrics.json")["stages"]["sft"]["audit"]
    clean = read_json(d / "rate=0.0" / "metrics.json")["stages"]["sft"]["audit"]
    assert flipped["perturbed_rows"] == flipped["train_rows"] > 0 and clean["perturbed_rows"] == 0
    # each training stage keeps its trainer's log history (3 steps, logged every step), and the
    # report draws it: pretrain once (one run both trials share), SFT and DPO per flip rate
    for name in ("pretrain", "sft", "dpo"):
        history = read_json(d / "rate=0.0" / "metrics.json")["stages"][name]["history"]
        assert [e["step"] for e in history if "loss" in e] == [1, 2, 3] and all("learning_rate" in e for e in history if "loss" in e)
    dpo = read_json(d / "rate=1.0" / "metrics.json")["stages"]["dpo"]["history"]
    assert all("rewards/margins" in e for e in dpo if "loss" in e)  # the algorithm's own terms
    report = (d / "report.md").read_text()
    assert "2 of 2 trials finished" in report and "(n=1)" in report and (d / "plot.png").exists()
    assert "![Training curves: loss by step" in report and (d / "curves.png").exists()


def tracked(results):
    """{trial: (its MLflow run, {stage: nested run})}, read back with MLflow's client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'tiny' / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name == "tiny"]
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = {r.info.run_name: r for r in runs if r.data.tags["farm.kind"] == "trial"}
    return {
        t: (r, {c.data.tags["farm.stage"]: c for c in runs if c.data.tags.get("mlflow.parentRunId") == r.info.run_id}) for t, r in trials.items()
    }, runs


def test_run_logs_trials_and_stages_to_mlflow_tensorboard_and_wandb(tiny_run):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results, out = tiny_run
    runs, every = tracked(results)
    assert set(runs) == {"rate=0.0", "rate=1.0"} and "tracking: mlflow, tensorboard, wandb" in out
    table = metrics_table(results)
    for trial, (run, stages) in runs.items():
        assert run.data.metrics["reward_accuracy"] == pytest.approx(table.loc[trial, "reward_accuracy"])
        assert run.data.params["data.transforms.0.rate"] == trial.split("=")[1]
        assert set(stages) == {"pretrain", "sft", "dpo"} and "loss" in stages["dpo"].data.metrics
        # links to the artifacts in the store
        assert (results / ".store" / "artifacts" / f"eval-{run.data.tags['farm.eval_key']}").samefile(run.data.tags["farm.eval_artifact"])
        assert all(
            Path(s.data.tags["farm.artifact"]).name == f"{s.data.tags['farm.stage_kind']}-{s.data.tags['farm.stage_key']}"
            and Path(s.data.tags["farm.artifact"]).is_dir()
            for s in stages.values()
        )
    # one pretrain, trained by one trial: the other's is logged as reused from it, without curves
    pretrains = [stages["pretrain"] for _, stages in runs.values()]
    assert sorted("farm.reused_from_trial" in p.data.tags for p in pretrains) == [False, True]
    [study] = [r for r in every if r.data.tags["farm.kind"] == "study"]
    client = MlflowClient(f"sqlite:///{results / 'tiny' / 'mlflow.db'}")
    assert {"table.csv", "report.md", "report.html", "curves.png"} <= {f.path for f in client.list_artifacts(study.info.run_id)}
    acc = EventAccumulator(str(results / "tiny" / "tensorboard" / "rate=1.0"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("dpo/loss")] == [1, 2, 3]
    # W&B offline (no API key here): a run per trial and one for the study's files, each finished
    assert len(list((results / "tiny" / "wandb").glob("offline-run-*/run-*.wandb"))) == 3
    assert len(list((results / "tiny" / "wandb" / "farm-logged").iterdir())) == 2


def test_shared_pretrain_stage_ran_once(tiny_run):
    results, _ = tiny_run
    kinds = sorted(name.split("-")[0] for name in artifacts(results))
    assert kinds == ["dpo", "dpo", "eval", "eval", "pretrain", "sft", "sft"]
    plan = farm("plan", TINY, "--results", results).stdout
    assert "0 to run" in plan and "shared by 2 trials" in plan and "to run\n" not in plan


def test_rerun_trains_nothing(tiny_run, tmp_path):
    results, _ = tiny_run
    before, table = artifacts(results), metrics_table(results)
    logged = len(tracked(results)[1])
    out = farm("run", TINY, "--results", results, "--track", "mlflow").stdout
    assert "2 already finished" in out and "Ray ready" not in out  # finished trials are not even scheduled
    assert len(tracked(results)[1]) == logged  # the tracker finds the trials' runs: none logged twice

    # With the results gone but the artifact store kept, the trials run again and every
    # stage and eval is reused: no training step, no new or rewritten artifact.
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    shutil.rmtree(copy / "tiny")
    out = farm_in_terminal("run", TINY, "--results", copy)  # on a terminal: the live view
    assert "0 already finished" in out and " step " not in out
    assert "\x1b[" in out and "2 done, 0 running, 0 pending, 0 failed" in out  # redrawn in place, to its last state
    assert artifacts(copy).keys() == before.keys()
    assert metrics_table(copy).equals(table)


# The smallest study with a stage two trials share: one 2-step pretrain, evaluated twice.
SHARED = {
    "name": "two-drivers",
    "seed": 1,
    "model": {"base": "tiny-gpt2", "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}},
    "data": {"sources": [{"name": "hh_rlhf", "limit": 60}], "holdout": 0.2},
    "stages": {"pretrain": {"max_steps": 2, "batch_size": 4, "max_length": 32}},
    "eval": {"metrics": ["perplexity"], "max_length": 32, "max_prompt_length": 16},
    "grid": {"eval.limit": [4, 8]},
}


def test_two_drivers_on_one_store_train_a_shared_stage_once(tmp_path):
    """Two `farm run` of one study at once, on one results folder and store: the shared stage is
    trained once (one driver waits on its lock and reuses it), and both end with the same results."""
    import re
    import subprocess

    from conftest import FARM, ROOT

    study = tmp_path / "two.yaml"
    study.write_text(yaml.safe_dump(SHARED, sort_keys=False))
    results = tmp_path / "results"
    run = [*FARM, "run", str(study), "--results", str(results)]
    drivers = [subprocess.Popen(run, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [d.communicate(timeout=600)[0] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], "\n\n".join(outs)
    assert sum(out.count("pretrain step 2/2") for out in outs) == 1, "\n\n".join(outs)
    # No twin was built and dropped, none half-written: one pretrain, one eval per trial.
    assert sorted(p.name.split("-")[0] for p in (results / ".store" / "artifacts").iterdir()) == ["eval", "eval", "pretrain"]
    done = [sorted(re.findall(r"(limit=\d): done (.*)", out)) for out in outs]
    assert len(done[0]) == 2 and done[0] == done[1]  # both drivers report the same metrics for each trial
    table = pd.read_csv(results / "two-drivers" / "table.csv").set_index("trial")
    assert (table["status"] == "ok").all() and sorted(table.index) == ["limit=4", "limit=8"]
    for trial, shown in done[0]:
        assert f"perplexity={table.loc[trial, 'perplexity']:.4g}" in shown
