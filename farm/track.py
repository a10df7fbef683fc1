"""Experiment trackers: a study's trials and stages where researchers already look (MLflow,
TensorBoard, Weights & Biases).

The driver logs, from the records the store and the results already hold, after each trial
finishes: no worker talks to a tracker, so a cluster needs no tracker credentials on its nodes.
Identity comes from the farm, not from the tracker: a trial is one run named by its trial id,
each of its stages one nested run tagged with the stage key. A trial's result is its trial id and
its eval key (what `farm.results.finished` reuses): before logging, a tracker looks that up; a run
already there (an interrupted study run again, a finished one rerun) is not logged twice, and a
trial whose study changed is logged as a new result. A stage trained by another trial (a shared pretrain) or reused from the store is
logged as reused, with the trial that trained it, and its curves stay with that trial's run.
"""

from __future__ import annotations

import os
from pathlib import Path

from farm.files import digest

TRACKERS = ("mlflow", "tensorboard", "wandb")
MLFLOW_DB = "mlflow.db"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # W&B's own folder name, under results/<study>/


def trained_here(trial_id: str, record: dict) -> bool:
    """Whether this trial trained the stage (its record names the trial that made it)."""
    return record.get("trial") == trial_id


def curves(record: dict) -> list[tuple[int, str, float]]:
    """(step, name, value) of a stage's training history: every number logged at a step."""
    return [
        (int(e["step"]), k, float(v))
        for e in record.get("history") or []
        for k, v in e.items()
        if k not in ("step", "epoch") and isinstance(v, (int, float))
    ]


def scalars(config: dict) -> dict:
    """A stage config's flat values (what a tracker's parameters hold)."""
    return {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}


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
        self.experiment = (
            found.experiment_id
            if found
            else self.client.create_experiment(
                study.name,
                artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI") else (out / "mlartifacts").resolve().as_uri(),
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        )

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
            self.client.log_batch(run_id, metrics=batch[i : i + 1000], params=params if i == 0 else [])

    def trial(self, trial, plan, metrics: dict, stages: dict, locate=None) -> None:
        if self._find(**{"farm.kind": "trial", "farm.trial": trial.id, "farm.eval_key": plan.eval_key}):
            return  # logged by an earlier run of the study
        tags = {"farm.kind": "trial", "farm.trial": trial.id, "farm.profile": trial.profile, "farm.eval_key": plan.eval_key}
        if locate:
            tags["farm.eval_artifact"] = locate("eval", plan.eval_key)
        run = self.client.create_run(self.experiment, run_name=trial.id, tags=tags)
        parent = run.info.run_id
        for s in plan.stages:
            record = stages.get(s.name) or {}
            tags = {
                "mlflow.parentRunId": parent,
                "farm.kind": "stage",
                "farm.trial": trial.id,
                "farm.stage": s.name,
                "farm.stage_kind": s.kind,
                "farm.stage_key": s.key,
            }
            if locate:
                tags["farm.artifact"] = locate(s.kind, s.key)
            here = trained_here(trial.id, record)
            if not here:
                tags["farm.reused_from_trial"] = str(record.get("trial"))
            child = self.client.create_run(self.experiment, run_name=s.name, tags=tags).info.run_id
            config = {f"config.{k}": v for k, v in scalars(record.get("config") or {}).items()}
            self._log(child, params=config, metrics=numbers(record.get("metrics") or {}) if here else None, steps=curves(record) if here else None)
            self.client.set_terminated(child)
        self._log(parent, params={**{k: v for k, v in trial.axes.items()}, "profile": trial.profile}, metrics=numbers(metrics))
        self.client.set_terminated(parent)

    def study(self, files: list[Path]) -> None:
        run_id = (
            self._find(**{"farm.kind": "study"}) or self.client.create_run(self.experiment, run_name="study", tags={"farm.kind": "study"}).info.run_id
        )
        for f in files:
            self.client.log_artifact(run_id, str(f))  # a rerun replaces the file: the report of the latest run
        self.client.set_terminated(run_id)


class TensorBoard:
    """Event files under results/<study>/tensorboard/<trial>/: each stage's curves (the stages the
    trial trained) as `<stage>/<name>` by step, its eval metrics as `eval/<name>`. A trial whose
    folder holds its eval key was logged already; one with another key (the study changed) is
    written again."""

    def __init__(self, study, out: Path):
        from torch.utils.tensorboard import SummaryWriter  # it needs the tensorboard package

        self.root, self.writer = out / TENSORBOARD_DIR, SummaryWriter

    def trial(self, trial, plan, metrics: dict, stages: dict, locate=None) -> None:
        import shutil

        folder = self.root / trial.id
        mark = folder / "eval_key"
        if mark.is_file() and mark.read_text() == plan.eval_key:
            return
        part = folder.with_name(folder.name + ".part")  # a trial half-written by an interrupted driver is written again
        shutil.rmtree(part, ignore_errors=True)
        writer = self.writer(str(part))
        for s in plan.stages:
            record = stages.get(s.name) or {}
            if trained_here(trial.id, record):
                for step, name, value in curves(record):
                    writer.add_scalar(f"{s.name}/{name}", value, step)
        for name, value in numbers(metrics).items():
            writer.add_scalar(f"eval/{name}", value, 0)
        writer.close()
        (part / "eval_key").write_text(plan.eval_key)
        shutil.rmtree(folder, ignore_errors=True)
        part.rename(folder)

    def study(self, files: list[Path]) -> None:
        pass


class WandB:
    """Weights & Biases: a run per trial (name: the trial id; id: a digest of the study, the trial
    and its eval key, so a study run again resumes the same run), each stage's curves as
    `<stage>/<name>` against its own `<stage>/step`, the stages' keys, configs and reuse in the run's
    config (W&B has no nested runs), the eval metrics in its summary; a run `study` with the table
    and report as an artifact. Project: $WANDB_PROJECT, else the study's name. Online where W&B has
    an API key ($WANDB_API_KEY or `wandb login`), else offline under results/<study>/wandb/ (`wandb
    sync` uploads it); $WANDB_MODE decides where set. A trial is marked logged once its run is
    finished: W&B cannot be asked offline which runs it holds."""

    def __init__(self, study, out: Path):
        import wandb

        self.wandb, self.out, self.name = wandb, out, study.name
        self.project = os.environ.get("WANDB_PROJECT") or study.name
        self.mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key() else "offline")
        self.logged = out / WANDB_DIR / "farm-logged"  # <run id>: one empty file per finished trial run

    def _run(self, run_id: str, name: str, job_type: str, config: dict):
        self.out.mkdir(parents=True, exist_ok=True)
        settings = self.wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False)
        return self.wandb.init(
            project=self.project,
            id=run_id,
            name=name,
            job_type=job_type,
            config=config,
            dir=str(self.out),
            mode=self.mode,
            resume="allow",
            reinit="create_new",
            settings=settings,
        )

    def trial(self, trial, plan, metrics: dict, stages: dict, locate=None) -> None:
        run_id = digest([self.name, trial.id, plan.eval_key])
        if (self.logged / run_id).exists():
            return
        config = {**trial.axes, "profile": trial.profile, "trial": trial.id, "eval_key": plan.eval_key, "stages": {}}
        if locate:
            config["eval_artifact"] = locate("eval", plan.eval_key)
        for s in plan.stages:
            record = stages.get(s.name) or {}
            config["stages"][s.name] = {
                "kind": s.kind,
                "key": s.key,
                "trial": record.get("trial"),
                **({"artifact": locate(s.kind, s.key)} if locate else {}),
                **scalars(record.get("config") or {}),
            }
        run = self._run(run_id, trial.id, "trial", config)
        try:
            for s in plan.stages:
                record = stages.get(s.name) or {}
                if not trained_here(trial.id, record):
                    continue  # its curves are in the run of the trial that trained it (config.stages.<name>.trial)
                run.define_metric(f"{s.name}/step")
                run.define_metric(f"{s.name}/*", step_metric=f"{s.name}/step")
                steps: dict[int, dict] = {}
                for step, name, value in curves(record):
                    steps.setdefault(step, {})[f"{s.name}/{name}"] = value
                for step in sorted(steps):
                    run.log({f"{s.name}/step": step, **steps[step]})
            run.summary.update(numbers(metrics))
        finally:
            run.finish()
        self.logged.mkdir(parents=True, exist_ok=True)
        (self.logged / run_id).touch()

    def study(self, files: list[Path]) -> None:
        run = self._run(digest([self.name, "study"]), "study", "study", {})
        try:
            artifact = self.wandb.Artifact(f"{self.name}-report", type="report")
            for f in files:
                artifact.add_file(str(f))
            run.log_artifact(artifact)  # a new version of the artifact for each run of the study
        finally:
            run.finish()


def _wandb_key() -> bool:
    """Whether W&B has an API key here: $WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def open_trackers(names: list[str], study, out: Path) -> list:
    """The trackers `names` asks for, opened on results/<study>/ (`out`); a tracker whose package is
    missing is an error naming the extra that installs it, before Ray starts."""
    made = []
    for name in names:
        if name not in TRACKERS:
            raise RuntimeError(f"tracking: unknown tracker {name!r}; one of {', '.join(TRACKERS)}")
        try:
            made.append({"mlflow": MLflow, "tensorboard": TensorBoard, "wandb": WandB}[name](study, out))
        except ImportError as e:
            raise RuntimeError(
                f"tracking: {name} needs the package {e.name!r}: pip install {name} "
                f"(or leave {name} out of the study's `tracking` / farm run --track)"
            ) from None
    return made


def log_trial(trackers: list, trial, plan, metrics: dict, stages: dict, locate=None) -> None:
    """Log a finished trial to every tracker; a tracker that fails warns and the study goes on.
    `locate(kind, key)`: where an artifact lives in the store (`Store.location`), for the links."""
    import sys

    for t in trackers:
        try:
            t.trial(trial, plan, metrics, stages, locate)
        except Exception as e:  # a tracker is a view of the results, never a reason to lose them
            print(f"farm: warning: {type(t).__name__} did not log trial {trial.id}: {type(e).__name__}: {e}", file=sys.stderr)
