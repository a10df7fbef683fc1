"""Run a group of consecutive stages of one trial under one Ray Train `TorchTrainer`.

A `TorchTrainer.fit()` costs ~16 s before its first step and ~4.5 s after its last on a
small machine, so the stages of a trial that no other trial shares run inside one fit
rather than one fit each (bench/bench_stage_overhead.py measures the difference).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from farm.cache import PlannedStage, Store, join

RECORDS_FILE = "records.jsonl"  # the records a stage that builds data writes


def run_group(study_json: dict, trial_id: str, group: list[PlannedStage], storage: str, in_tune: bool) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from farm.spec import Study

    study = Study.model_validate(study_json)
    res = study.stages[group[0].name].resources
    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"study": study_json, "trial": trial_id, "stages": [asdict(s) for s in group], "storage": storage},
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})},
            accelerator_type=res.accelerator_type,  # the GPU type its memory was checked against (farm.memory)
        ),
        run_config=RunConfig(
            name=f"{study.name}-{trial_id}-{group[0].name}-{uuid.uuid4().hex[:6]}",
            storage_path=join(storage, "ray_train"),  # a local path or a URI (s3://...)
            callbacks=callbacks,
        ),
    )
    trainer.fit()


def _train_loop(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    from farm.spec import Study

    quiet()
    study = Study.model_validate(config["study"])
    store = Store(config["storage"])
    context = ray.train.get_context()
    for planned in (PlannedStage(**{**s, "refs": tuple(map(tuple, s["refs"]))}) for s in config["stages"]):
        torch.set_num_threads(max(1, int(study.stages[planned.name].resources.cpus_per_worker)))
        run_stage(study, store, planned, config["trial"], context.get_world_rank(), context.get_local_rank())
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the next stage on every rank loads what rank 0 just saved


def run_stage(study, store: Store, planned: PlannedStage, trial: str, rank: int, local_rank: int = 0) -> None:
    """Read the stage's data (with its labels and the records of stages it reads), run it, and
    write its artifact atomically (rank 0). A training stage resumes from its latest checkpoint."""
    from farm.data.prepare import training_records
    from farm.data.records import read_records
    from farm.label.stage import read_scores
    from farm.registry import stages
    from farm.train.base import StageContext
    from farm.train.checkpoints import Checkpoints

    if store.done(planned.kind, planned.key):
        return
    stage = study.stages[planned.name]
    data = stage.data or study.data
    inputs = {name: store.path(kind, key) for name, kind, key in planned.refs}
    scores = read_scores(store, data) if data.labels else None
    built = {s.stage: read_records(inputs[s.stage] / RECORDS_FILE) for s in data.sources if s.name == "stage"}
    records, audit = training_records(data, planned.seed, stage.shape, scores, built)
    record = {
        "stage": planned.name,
        "trial": trial,
        "seed": planned.seed,
        "input_key": planned.input_key,
        "refs": [list(r) for r in planned.refs],
        "config": stage.model_dump(mode="json"),
        "audit": audit,
    }
    every = stage.checkpoint_every if stage.trains else None  # None: no checkpoints
    checkpoints = Checkpoints(store, planned.kind, planned.key, every, rank, local_rank) if every is not None else None
    writing = store.writing(planned.kind, planned.key, record) if rank == 0 else contextlib.nullcontext(None)
    with writing as out, tempfile.TemporaryDirectory() as work:
        if checkpoints:
            checkpoints.prepare()
        ctx = StageContext(
            name=planned.name,
            stage=stage,
            model_spec=study.model,
            seed=planned.seed,
            input_path=store.path(planned.input_kind, planned.input_key) if planned.input_key else None,
            records=records,
            special_tokens=data.special_tokens(),
            output_dir=out,
            work_dir=checkpoints.local if checkpoints else Path(work),  # the trainer saves checkpoints there
            callbacks=[ProgressReport(planned.name), *_fault(stage.fault, trial, store, planned.key, rank), *filter(None, [checkpoints])]
            if stage.trains
            else [],
            inputs=inputs,
            resolve=store.path,
        )
        record["metrics"] = stages.get(planned.kind)(ctx)
        if checkpoints:
            record["metrics"]["resumed_from_step"] = checkpoints.resumed_from
    if checkpoints:  # the artifact is published (rank 0), or this rank's part of it is done
        checkpoints.finish()


def _fault(fault, trial: str, store: Store, key: str, rank: int) -> list:
    """The fault-injection callback for this attempt, if the study asks for one here."""
    if fault is None or (fault.trial and fault.trial != trial):
        return []
    counter = f"faults/{key}-{trial}"  # in the store: a retry on another node reads it too
    try:
        attempt = int(store.read_text(counter)) + 1
    except FileNotFoundError:
        attempt = 1
    if fault.times is not None and attempt > fault.times:
        return []
    if rank == 0:
        store.write_text(counter, str(attempt))
    return [InjectFault(fault)]


class InjectFault(TrainerCallback):
    def __init__(self, fault):
        self.fault = fault

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.fault.at_step:
            if self.fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at step {state.global_step} (stage setting `fault`)")


def quiet() -> None:
    """Keep worker output to the farm's own progress lines (on a cluster the driver's
    environment does not reach the workers, so this is set in each worker)."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


class ProgressReport(TrainerCallback):
    """Stream a stage's training logs to Ray (and so to Tune and the farm's progress lines)."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        import ray.train

        if logs and "loss" in logs:
            ray.train.report({"stage": self.stage, "step": state.global_step, "max_steps": state.max_steps, "loss": float(logs["loss"])})

