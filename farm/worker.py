"""Run a group of consecutive stages of one trial: in one Ray task when it trains on one worker,
under one Ray Train `TorchTrainer` when it trains data-parallel or under DeepSpeed.

A `TorchTrainer.fit()` starts a controller and a worker group in fresh processes that import
torch, transformers and TRL again: ~33 s before the first step on 2 idle cores (~45 s under load;
issue 23), more than most embedded stages train. One worker needs none of what Train adds (the
process group, the worker group's placement, its restart policy: the farm's retries are Tune's and
its checkpoints its own), so such a group runs as a Ray task, which Ray places in a pooled worker
process that already has those imports from the last one. Either way the stages of a group run in
one start, and both paths call the same `run_stages`.
"""

from __future__ import annotations

import contextlib
import queue
import tempfile
import threading
import uuid
from pathlib import Path

import ray

from farm.data.prepare import training_records
from farm.data.records import RECORDS_FILE, read_records
from farm.files import join
from farm.label.stage import read_scores
from farm.plan import PlannedStage
from farm.process import quiet
from farm.schema import TrainingStage
from farm.spec import Study
from farm.store import Store
from farm.train.base import StageContext


def run_group(study: Study, trial_id: str, group: list[PlannedStage], storage: str, in_tune: bool) -> None:
    """Train the group's stages; in a Tune trial its progress lines reach Tune. The study travels
    validated (pickled): a worker re-validates nothing, and a node need not hold the local files the
    driver checked."""
    stage = study.stages[group[0].name]
    res = stage.resources
    config = {"study": study, "trial": trial_id, "stages": group, "storage": storage}
    if res.num_workers > 1 or (isinstance(stage, TrainingStage) and stage.deepspeed):
        return fit(study, config, in_tune)
    task = group_task.options(
        num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, accelerator_type=res.accelerator_type, scheduling_strategy="DEFAULT"
    )  # outside the trial's CPU-less placement group
    from ray import tune

    for ref in task.remote(config):
        progress = ray.get(ref)
        if in_tune:
            tune.report(progress)


# Tune retries a failed trial (its failure policy), so the task itself is not retried.
@ray.remote(max_retries=0)
def group_task(config: dict):
    """The group on one worker: trains in a thread and yields its progress (a streaming task),
    then raises what the stages raised, if anything."""
    lines: queue.Queue = queue.Queue()
    failed: list[BaseException] = []

    def work():
        try:
            run_stages(config, rank=0, local_rank=0, report=lines.put)
        except BaseException as e:  # noqa: BLE001  (re-raised in the task below)
            failed.append(e)
        finally:
            lines.put(None)

    worker = threading.Thread(target=work, name="farm-stages")
    worker.start()
    while (line := lines.get()) is not None:
        yield line
    worker.join()
    if failed:
        raise failed[0]


def fit(study, config: dict, in_tune: bool) -> None:
    """The group under one Ray Train `TorchTrainer` (its workers run `run_stages`)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = study.stages[config["stages"][0].name].resources
    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})},
            accelerator_type=res.accelerator_type,  # the GPU type its memory was checked against (farm.memory)
        ),
        run_config=RunConfig(
            name=f"{study.name}-{config['trial']}-{config['stages'][0].name}-{uuid.uuid4().hex[:6]}",
            storage_path=join(config["storage"], "ray_train"),  # a local path or a URI (s3://...)
            callbacks=callbacks,
        ),
    )
    trainer.fit()


def _train_loop(config: dict) -> None:
    import ray.train

    context = ray.train.get_context()
    run_stages(config, context.get_world_rank(), context.get_local_rank(), ray.train.report)


def run_stages(config: dict, rank: int, local_rank: int, report) -> None:
    """The group's stages in order on this worker; `report` takes each progress line."""
    import torch
    import torch.distributed as dist

    quiet()
    study = config["study"]
    store = Store(config["storage"])
    for planned in config["stages"]:
        torch.set_num_threads(max(1, int(study.stages[planned.name].resources.cpus_per_worker)))
        run_stage(study, store, planned, config["trial"], rank, local_rank, report)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the next stage on every rank loads what rank 0 just saved


def run_stage(study, store: Store, planned: PlannedStage, trial: str, rank: int, local_rank: int = 0, report=None) -> None:
    """Read the stage's data (with its labels and the records of stages it reads), run it, and
    write its artifact atomically (rank 0). A training stage resumes from its latest checkpoint
    and sends its progress lines to `report` (a stage that trains nothing needs none)."""
    from transformers import set_seed

    # transformers at their import: only in a process that runs a stage, not in Tune's trial
    from farm.train import callbacks, checkpoints, select

    if store.done(planned.kind, planned.key):
        return
    # Every random draw before the trainer seeds itself (embeddings of added tokens) starts from the
    # stage's seed: a pooled worker process carries the RNG state of whatever ran in it before.
    set_seed(planned.seed)
    stage = study.stages[planned.name]
    data = stage.data or study.data
    inputs = {name: store.path(kind, key) for name, kind, key in planned.refs}
    scores = read_scores(store, planned.label) if data.labels else None
    built = {s.stage: read_records(inputs[s.stage] / RECORDS_FILE) for s in data.sources if s.name == "stage"}
    records, audit = training_records(data, planned.seed, stage.shape, scores, built)
    record = {
        "stage": planned.name,
        "trial": trial,
        "seed": planned.seed,
        "input_key": planned.input_key,
        "refs": [list(r) for r in planned.refs],
        "config": stage.model_dump(mode="json"),
        "key_doc": planned.doc,  # what the key hashes: a reused artifact says what made it
        "audit": audit,
    }
    every = stage.checkpoint_every if stage.trains else None  # None: no checkpoints
    if isinstance(stage, TrainingStage) and stage.select:
        selection = select.select_callback(study, stage, planned.name, inputs, report)
    else:
        selection = None
    saving = checkpoints.Checkpoints(store, planned.kind, planned.key, every, rank, local_rank) if every is not None else None
    progress = callbacks.ProgressReport(planned.name, report)
    writing = store.writing(planned.kind, planned.key, record) if rank == 0 else contextlib.nullcontext(None)
    with writing as out, tempfile.TemporaryDirectory() as work:
        if saving:
            saving.prepare()
        ctx = StageContext(
            name=planned.name,
            stage=stage,
            model_spec=study.model,
            seed=planned.seed,
            input_path=store.path(planned.input_kind, planned.input_key) if planned.input_key else None,
            records=records,
            special_tokens=data.special_tokens(),
            output_dir=out,
            work_dir=saving.local if saving else Path(work),  # the trainer saves checkpoints there
            callbacks=[progress, *callbacks.fault_callbacks(stage.fault, trial, store, planned.key, rank), *filter(None, [saving, selection])]
            if stage.trains
            else [],
            inputs=inputs,
            resolve=store.path,
        )
        record["metrics"] = ctx.stage.run(ctx)
        if saving:
            record["metrics"]["resumed_from_step"] = saving.resumed_from
        if selection:
            record["metrics"].update(selection.summary())
        if progress.history:
            record["history"] = progress.history
    if saving:  # the artifact is published (rank 0), or this rank's part of it is done
        saving.finish()
