"""Trackers (farm/track.py) on constructed trial records: MLflow runs read back with MLflow's
client, TensorBoard event files parsed with TensorBoard's reader, W&B's offline run files read
record by record; each logged twice (a study run again) without a duplicate, and again as a new
result when the study changed; MLflow's UI served by `farm ui`."""

import os

import pytest

from farm.grid import expand
from farm.plan import plan_study
from farm.track import MLFLOW_DB, TENSORBOARD_DIR, WANDB_DIR, MLflow, TensorBoard, WandB, open_trackers

RATE = "data.transforms.0.rate"


@pytest.fixture
def finished(tiny_doc):
    """Two trials of the tiny study as `farm run` leaves them: the pretrain trained by the first
    and reused by the second, SFT and DPO trained by each, with histories and eval metrics."""
    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    first = trials[0].id

    def records(t):
        def stage(name, by, loss0):
            return {
                "trial": by,
                "config": {"lr": 0.001, "max_steps": 3},
                "metrics": {"train_runtime": 1.5},
                "history": [{"step": s, "epoch": s / 3, "loss": loss0 - s / 10, "learning_rate": 1e-3} for s in (1, 2, 3)]
                + [{"step": 3, "train_loss": loss0 - 0.2, "train_runtime": 1.5}],
            }

        return {"pretrain": stage("pretrain", first, 8.0), "sft": stage("sft", t.id, 6.0), "dpo": stage("dpo", t.id, 0.7)}

    done = [(t, plans[t.id], {"reward_accuracy": 0.5 + t.axes[RATE] / 10, "scorer": "x"}, records(t)) for t in trials]
    return trials[0].study, done


def log_all(tracker, done):
    for t, plan, metrics, stages in done:
        tracker.trial(t, plan, metrics, stages)


def test_mlflow_a_run_per_trial_nested_stage_runs_reuse_linked_and_no_duplicate_on_rerun(finished, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study, done = finished
    log_all(MLflow(study, tmp_path), done)
    log_all(MLflow(study, tmp_path), done)  # the study run again: every trial is found, nothing logged twice
    client = MlflowClient(f"sqlite:///{tmp_path / MLFLOW_DB}")
    [exp] = [e for e in client.search_experiments() if e.name == study.name]
    runs = client.search_runs([exp.experiment_id], max_results=100)
    trial_runs = {r.info.run_name: r for r in runs if r.data.tags["farm.kind"] == "trial"}
    assert set(trial_runs) == {t.id for t, *_ in done} and len(runs) == 2 * (1 + 3)
    (first, *_), (second, *_) = done
    run = trial_runs[second.id]
    assert run.data.params[RATE] == str(second.axes[RATE]) and run.data.metrics["reward_accuracy"] == pytest.approx(0.6)
    stages = {r.data.tags["farm.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id}
    assert set(stages) == {"pretrain", "sft", "dpo"}
    # the shared pretrain was trained by the first trial: here it is reused, with no curves of its own
    assert stages["pretrain"].data.tags["farm.reused_from_trial"] == first.id and not stages["pretrain"].data.metrics
    history = client.get_metric_history(stages["sft"].info.run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 5.9), (2, 5.8), (3, 5.7)]
    assert stages["sft"].data.tags["farm.stage_key"] == done[1][1].stage("sft").key
    assert stages["sft"].data.params["config.lr"] == "0.001"
    mine = {r.data.tags["farm.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial_runs[first.id].info.run_id}
    assert "farm.reused_from_trial" not in mine["pretrain"].data.tags and "loss" in mine["pretrain"].data.metrics


def test_tensorboard_event_files_parse_and_a_logged_trial_is_not_logged_again(finished, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    study, done = finished
    log_all(TensorBoard(study, tmp_path), done)
    log_all(TensorBoard(study, tmp_path), done)
    (first, *_), (second, *_) = done
    for t in (first, second):
        [events] = list((tmp_path / TENSORBOARD_DIR / t.id).glob("events.out.tfevents.*"))  # one file: not logged twice
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"sft/loss", "dpo/loss", "eval/reward_accuracy"} <= tags
        assert ("pretrain/loss" in tags) == (t is first)  # curves stay with the trial that trained the stage
        assert [(e.step, round(e.value, 6)) for e in acc.Scalars("dpo/loss")] == [(1, 0.6), (2, 0.5), (3, 0.4)]


def changed(done):
    """The same trials after the study changed: another eval key each (what `farm run` reuses)."""
    import dataclasses

    return [(t, dataclasses.replace(plan, eval_key=plan.eval_key + "x"), metrics, stages) for t, plan, metrics, stages in done]


def test_mlflow_and_tensorboard_log_a_changed_study_as_new_results(finished, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study, done = finished
    for tracker in (MLflow(study, tmp_path), TensorBoard(study, tmp_path)):
        log_all(tracker, done)
        log_all(tracker, changed(done))
    client = MlflowClient(f"sqlite:///{tmp_path / MLFLOW_DB}")
    runs = client.search_runs([client.get_experiment_by_name(study.name).experiment_id], "tags.`farm.kind` = 'trial'")
    assert len(runs) == 2 * len(done) and {r.data.tags["farm.eval_key"] for r in runs} >= {changed(done)[0][1].eval_key}
    for t, plan, *_ in changed(done):  # TensorBoard keeps the latest result per trial, once
        folder = tmp_path / TENSORBOARD_DIR / t.id
        assert (folder / "eval_key").read_text() == plan.eval_key and len(list(folder.glob("events.out.tfevents.*"))) == 1


def wandb_records(path):
    """The records of a W&B run file (`run-<id>.wandb`): a 7-byte header, then LevelDB's log format
    (32 KiB blocks of chunks: CRC-32C, length, type; a record split over blocks is FIRST, MIDDLE...,
    LAST) holding protobuf `Record`s. wandb ships no reader of its own in Python since 0.20."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, out, parts = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def test_wandb_offline_writes_a_run_per_trial_with_stage_curves_and_no_duplicate_on_rerun(finished, tmp_path, monkeypatch):
    import json

    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` here: offline
    study, done = finished
    tracker = WandB(study, tmp_path)
    assert tracker.mode == "offline"
    log_all(tracker, done)
    log_all(WandB(study, tmp_path), done)  # the study run again: nothing logged twice
    runs = sorted((tmp_path / WANDB_DIR).glob("offline-run-*"))
    assert len(runs) == len(done)
    by_name = {}
    for run in runs:
        records = wandb_records(next(run.glob("run-*.wandb")))
        [meta] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        history = [
            {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        config = {i.key: json.loads(i.value_json) for i in meta.config.update}
        summary = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
        by_name[meta.display_name] = meta.project, meta.job_type, config, history, summary
    (first, *_), (second, *_) = done
    project, job, config, history, summary = by_name[second.id]
    assert project == study.name and job == "trial" and config[RATE] == second.axes[RATE]
    assert summary["reward_accuracy"] == pytest.approx(0.6)
    assert config["stages"]["sft"]["key"] == done[1][1].stage("sft").key and config["stages"]["pretrain"]["trial"] == first.id
    sft = [(h["sft/step"], round(h["sft/loss"], 6)) for h in history if "sft/loss" in h]
    assert sft == [(1, 5.9), (2, 5.8), (3, 5.7)]
    assert not any("pretrain/loss" in h for h in history)  # reused: its curves are in the first trial's run
    assert any("pretrain/loss" in h for h in by_name[first.id][3])
    log_all(WandB(study, tmp_path), changed(done))  # a changed study: new results, new runs
    before = set((tmp_path / WANDB_DIR).glob("offline-run-*"))
    assert len(before) == 2 * len(done)
    (tmp_path / "report.md").write_text("# report")
    tracker.study([tmp_path / "report.md"])  # the table and the report: an artifact of a run `study`
    [run] = set((tmp_path / WANDB_DIR).glob("offline-run-*")) - before
    [artifact] = [r.artifact for r in wandb_records(next(run.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "report" and [f.path for f in artifact.manifest.contents] == ["report.md"]


def test_a_missing_tracker_package_is_named_before_ray(finished, tmp_path, monkeypatch):
    import builtins

    study, _ = finished
    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ModuleNotFoundError("No module named 'tensorboard'", name="tensorboard")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(RuntimeError, match=r"tracking: tensorboard needs the package 'tensorboard': pip install tensorboard"):
        open_trackers(["tensorboard"], study, tmp_path)
    with pytest.raises(RuntimeError, match=r"tracking: unknown tracker 'comet'; one of mlflow, tensorboard, wandb"):
        open_trackers(["comet"], study, tmp_path)


def test_farm_ui_serves_mlflows_ui_on_loopback_and_it_renders_in_headless_chromium(finished, tmp_path, monkeypatch, chromium):
    """`farm ui results/<study>` serves MLflow's own UI on 127.0.0.1; the experiment page, with
    the trials' runs, renders (a screenshot that is not blank); without a store it says what to run."""
    import signal
    import subprocess
    import time
    import urllib.request

    import numpy as np
    from conftest import FARM, free_port
    from PIL import Image

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study, done = finished
    log_all(MLflow(study, tmp_path), done)
    missing = subprocess.run([*FARM, "ui", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "run the study with MLflow tracking first" in missing.stderr
    port = free_port()
    server = subprocess.Popen(
        [*FARM, "ui", str(tmp_path), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )  # its own process group: the server's workers stop with it
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the MLflow UI did not answer within a minute")
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(f"sqlite:///{tmp_path / MLFLOW_DB}").get_experiment_by_name(study.name).experiment_id
        shot, page = tmp_path / "ui.png", f"{url}/#/experiments/{exp}/runs"
        flags = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,900",
            "--virtual-time-budget=20000",
        ]
        dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=180).stdout
        assert all(t.id in dom for t, *_ in done)  # the runs table lists the trials by their ids
        subprocess.run([*flags, f"--screenshot={shot}", page], capture_output=True, timeout=180)
        pixels = np.asarray(Image.open(shot).convert("L"))
        assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # not blank
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        time.sleep(1)
        try:
            os.killpg(server.pid, signal.SIGKILL)  # a worker that outlived the server
        except ProcessLookupError:
            pass


def test_ray_workers_never_import_wandb_but_the_driver_can(monkeypatch):
    """With wandb installed, TRL imports it in every trainer process (~1 s each); the farm's
    workers (which never log to a tracker) see it as absent, the driver (which logs) imports it."""
    import ray

    @ray.remote
    def worker_view():
        import sys

        from farm.process import quiet

        quiet()  # the first call of every farm task on a worker
        from accelerate.utils import is_wandb_available as accelerate_sees
        from transformers.integrations import is_wandb_available as transformers_sees

        # TRL imports wandb where either says it is there
        return sys.modules.get("wandb", 0) is None, transformers_sees() or accelerate_sees()

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        hidden, available = ray.get(worker_view.remote())
    finally:
        ray.shutdown()
    assert hidden and not available
    from farm.process import quiet

    quiet()  # in the driver: no effect
    import wandb

    assert wandb.run is None
