"""Experiment trackers: a study's trials and stages where researchers already look (MLflow and
TensorBoard; Weights & Biases not yet: with wandb installed, TRL imports it in every worker process).

The driver logs, from the records the store and the results already hold, after each trial
finishes: no worker talks to a tracker, so a cluster needs no tracker credentials on its nodes.
Identity comes from the farm, not from the tracker: a trial is one run named by its trial id,
each of its stages one nested run tagged with the stage key. Before logging, a tracker looks the
trial up; a run already there (an interrupted study run again, a finished one rerun) is not
logged twice. A stage trained by another trial (a shared pretrain) or reused from the store is
logged as reused, with the trial that trained it, and its curves stay with that trial's run.
"""

from __future__ import annotations

import os
from pathlib import Path

TRACKERS = ("mlflow", "tensorboard")
MLFLOW_DB = "mlflow.db"
TENSORBOARD_DIR = "tensorboard"


def trained_here(trial_id: str, record: dict) -> bool:
    """Whether this trial trained the stage (its record names the trial that made it)."""
    return record.get("trial") == trial_id


def curves(record: dict) -> list[tuple[int, str, float]]:
    """(step, name, value) of a stage's training history: every number logged at a step."""
    return [(int(e["step"]), k, float(v)) for e in record.get("history") or [] for k, v in e.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float))]


def numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MLflow:
    """A run per trial (tag farm.trial), a nested run per stage (tags farm.stage, farm.stage_key,
    and farm.reused_from_trial where another trial trained it), a run for the study's table and
    report. The store: $MLFLOW_TRACKING_URI, else SQLite under results/<study>/ (`farm ui`)."""

    def __init__(self, study, out: Path):
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # creating the store logs each schema migration at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / MLFLOW_DB).resolve()}"
        out.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(study.name)
        # experimentKind: MLflow's UI opens a training experiment on its runs, not on GenAI traces.
        self.experiment = found.experiment_id if found else self.client.create_experiment(
            study.name, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI") else (out / "mlartifacts").resolve().as_uri(),
            tags={"mlflow.experimentKind": "custom_model_development"})

    def _find(self, **tags) -> str | None:
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment], filter_string=where, max_results=1)
        return runs[0].info.run_id if runs else None

    def _log(self, run_id: str, params: dict | None = None, metrics: dict | None = None, steps: list | None = None) -> None:
        import time

        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)  # when it was logged; a value's place in training is its step
        batch = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()] + [Metric(k, v, now, s) for s, k, v in steps or []]
        params = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        for i in range(0, max(len(batch), 1), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(run_id, metrics=batch[i:i + 1000], params=params if i == 0 else [])

    def trial(self, trial, plan, metrics: dict, stages: dict) -> None:
        if self._find(**{"farm.kind": "trial", "farm.trial": trial.id}):
            return  # logged by an earlier run of the study
        run = self.client.create_run(self.experiment, run_name=trial.id, tags={
            "farm.kind": "trial", "farm.trial": trial.id, "farm.profile": trial.profile, "farm.eval_key": plan.eval_key})
        parent = run.info.run_id
        for s in plan.stages:
            record = stages.get(s.name) or {}
            tags = {"mlflow.parentRunId": parent, "farm.kind": "stage", "farm.trial": trial.id, "farm.stage": s.name,
                    "farm.stage_kind": s.kind, "farm.stage_key": s.key}
            here = trained_here(trial.id, record)
            if not here:
                tags["farm.reused_from_trial"] = str(record.get("trial"))
            child = self.client.create_run(self.experiment, run_name=s.name, tags=tags).info.run_id
            config = {f"config.{k}": v for k, v in (record.get("config") or {}).items() if isinstance(v, (int, float, str, bool))}
            self._log(child, params=config, metrics=numbers(record.get("metrics") or {}) if here else None,
                      steps=curves(record) if here else None)
            self.client.set_terminated(child)
        self._log(parent, params={**{k: v for k, v in trial.axes.items()}, "profile": trial.profile}, metrics=numbers(metrics))
        self.client.set_terminated(parent)

    def study(self, files: list[Path]) -> None:
        run_id = self._find(**{"farm.kind": "study"}) or self.client.create_run(
            self.experiment, run_name="study", tags={"farm.kind": "study"}).info.run_id
        for f in files:
            self.client.log_artifact(run_id, str(f))  # a rerun replaces the file: the report of the latest run
        self.client.set_terminated(run_id)


class TensorBoard:
    """Event files under results/<study>/tensorboard/<trial>/: each stage's curves (the stages the
    trial trained) as `<stage>/<name>` by step, its eval metrics as `eval/<name>`. A trial whose
    folder exists was logged already."""

    def __init__(self, study, out: Path):
        from torch.utils.tensorboard import SummaryWriter  # it needs the tensorboard package

        self.root, self.writer = out / TENSORBOARD_DIR, SummaryWriter

    def trial(self, trial, plan, metrics: dict, stages: dict) -> None:
        folder = self.root / trial.id
        if folder.exists():
            return
        part = folder.with_name(folder.name + ".part")  # a trial half-written by an interrupted driver is written again
        writer = self.writer(str(part))
        for s in plan.stages:
            record = stages.get(s.name) or {}
            if trained_here(trial.id, record):
                for step, name, value in curves(record):
                    writer.add_scalar(f"{s.name}/{name}", value, step)
        for name, value in numbers(metrics).items():
            writer.add_scalar(f"eval/{name}", value, 0)
        writer.close()
        part.rename(folder)

    def study(self, files: list[Path]) -> None:
        pass


def open_trackers(names: list[str], study, out: Path) -> list:
    """The trackers `names` asks for, opened on results/<study>/ (`out`); a tracker whose package is
    missing is an error naming the extra that installs it, before Ray starts."""
    made = []
    for name in names:
        if name not in TRACKERS:
            raise RuntimeError(f"tracking: unknown tracker {name!r}; one of {', '.join(TRACKERS)}")
        try:
            made.append({"mlflow": MLflow, "tensorboard": TensorBoard}[name](study, out))
        except ImportError as e:
            raise RuntimeError(f"tracking: {name} needs the package {e.name!r}: pip install {name} "
                               f"(or leave {name} out of the study's `tracking` / farm run --track)") from None
    return made


def log_trial(trackers: list, trial, plan, metrics: dict, stages: dict) -> None:
    """Log a finished trial to every tracker; a tracker that fails warns and the study goes on."""
    import sys

    for t in trackers:
        try:
            t.trial(trial, plan, metrics, stages)
        except Exception as e:  # a tracker is a view of the results, never a reason to lose them
            print(f"farm: warning: {type(t).__name__} did not log trial {trial.id}: {type(e).__name__}: {e}", file=sys.stderr)
