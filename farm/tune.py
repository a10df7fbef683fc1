"""The grid under Ray Tune: one Tune trial per grid point, each running its stage chain
(through the artifact cache) and its evaluation, with Tune's failure policy."""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading

import ray
from ray import tune

from farm.capacity import capacity
from farm.eval.metrics import FILES, ITEMS
from farm.eval.runner import evaluate
from farm.files import join, write_json
from farm.label.stage import label_data, read_scores
from farm.plan import PlannedStage, TrialPlan
from farm.process import quiet
from farm.progress import Grid, view
from farm.results import ITEMS_FILE  # in an eval's artifact as in a trial's results
from farm.store import Store
from farm.worker import run_group, run_stage

# The trial function only waits on its stage groups (Ray tasks or TorchTrainers) and eval task. Tune refuses an empty
# request, and any CPU share it takes would leave a 1-CPU worker without a whole CPU on a
# small machine, so a trial asks for a little memory and no CPU.
TRIAL_RESOURCES = [{"memory": 128 * 2**20}]


def stage_groups(plan: TrialPlan, study) -> list[list[PlannedStage]]:
    """Consecutive training stages that the same trials need, with the same resources, run in one
    fit; a stage that trains nothing (it builds records) is a group of its own."""
    groups: list[list[PlannedStage]] = []
    for s in plan.stages:
        prev = groups[-1][-1] if groups else None
        both_train = prev and study.stages[prev.name].trains and study.stages[s.name].trains
        if both_train and prev.users == s.users and study.stages[prev.name].resources == study.stages[s.name].resources:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def run_trial(config: dict, payloads: dict) -> None:
    payload = payloads[config["trial_id"]]
    study, plan = payload["study"], payload["plan"]
    store = Store(payload["storage"])
    for planned in plan.labels:  # labelled data first: the stages and the eval read it
        if not store.done("label", planned.key):
            with store.lock(planned.key):
                if not store.done("label", planned.key):
                    # Ray Data's actors are scheduled outside the trial's (CPU-less) placement group.
                    ray.get(label_task.options(scheduling_strategy="DEFAULT").remote(payload, planned.key))
    for group in stage_groups(plan, study):
        if all(store.done(s.kind, s.key) for s in group):
            continue
        # A stage is trained once, whoever needs it: the other trials of this grid, or of another driver
        # on the same store (two `farm run` at once), wait on its lock, then reuse it. Every stage of
        # the group is locked (in one order, so two groups never wait on each other): another study may
        # group the same stages otherwise.
        with contextlib.ExitStack() as locks:
            for key in sorted({s.key for s in group}):
                locks.enter_context(store.lock(key))
            pending = [s for s in group if not store.done(s.kind, s.key)]
            if pending and study.stages[group[0].name].trains:
                run_group(study, config["trial_id"], pending, payload["storage"], in_tune=True)
            elif pending:  # one Ray task with the stage's resources, outside the trial's placement group
                res = study.stages[group[0].name].resources
                task = build_task.options(
                    num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, accelerator_type=res.accelerator_type, scheduling_strategy="DEFAULT"
                )
                ray.get(task.remote(payload, group[0]))
    with store.lock(plan.eval_key):  # trials with the same final model share one evaluation
        if not store.done("eval", plan.eval_key):
            res = study.eval.resources
            # "DEFAULT" keeps the task out of the trial's placement group, which holds no CPU.
            task = evaluate_task.options(
                num_cpus=res.num_cpus, num_gpus=res.num_gpus, accelerator_type=res.accelerator_type, scheduling_strategy="DEFAULT"
            )
            ray.get(task.remote(payload))
    tune.report({"done": 1, **store.marker("eval", plan.eval_key)["metrics"]})


@ray.remote
def evaluate_task(payload: dict) -> None:
    import torch

    quiet()
    study, plan = payload["study"], payload["plan"]
    store = Store(payload["storage"])
    torch.set_num_threads(max(1, int(study.eval.resources.num_cpus)))
    last = plan.stage(plan.evaluated)  # None: evaluate the base model
    model = store.path(last.kind, last.key) if last else None
    ref = store.path(last.input_kind, last.input_key) if last and last.input_key else None
    record = {"trial": payload["trial_id"], "model_key": last.key if last else None, "key_doc": plan.eval_doc}
    scores = read_scores(store, plan.eval_label) if study.data.labels else None
    refs = {name: store.path(kind, key) for name, kind, key in plan.eval_refs}
    # Finished answers and lm-eval's request cache outlive a failed attempt here (on this node,
    # under a URI store), so a retry goes on from them; removed once the eval is published.
    scratch = store.checkpoints("eval", plan.eval_key)[1]
    with store.writing("eval", plan.eval_key, record) as out:
        record["metrics"] = evaluate(study, model, ref, last.seed if last else study.seed, scores, refs, store.path, scratch)
        write_json(out / ITEMS_FILE, record["metrics"].pop(ITEMS, {}))
        for name, value in record["metrics"].pop(FILES, {}).items():  # what a metric keeps for after the grid
            write_json(out / name, value)
    shutil.rmtree(scratch, ignore_errors=True)


@ray.remote
def build_task(payload: dict, planned: PlannedStage) -> None:
    """A stage that trains nothing (it builds records), run once in a Ray task."""
    import torch

    quiet()
    study = payload["study"]
    torch.set_num_threads(max(1, int(study.stages[planned.name].resources.cpus_per_worker)))
    run_stage(study, Store(payload["storage"]), planned, payload["trial_id"], rank=0)


@ray.remote(num_cpus=0)
def label_task(payload: dict, key: str) -> None:
    quiet()
    study, plan = payload["study"], payload["plan"]
    # The data whose key it is, by the plan's keys (hashed on the driver): the eval's, or a stage's.
    data = study.data if plan.eval_label == key else next(study.stages[s.name].data or study.data for s in plan.stages if s.label == key)
    label_data(data, Store(payload["storage"]), key)


def max_concurrent(trials, cap=None) -> int:
    """As many trials at once as the cluster can give their largest stage: counted on every node
    the cluster can have (`farm.capacity`: alive, or launchable by its autoscaler), so that a
    cluster that scales from zero runs a grid side by side, not one trial at a time."""
    cap = cap or capacity()
    fits = []
    for t in trials:
        for stage in t.study.stages.values():
            r = stage.resources
            worker = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
            if r.accelerator_type:  # as Ray asks for it: a sliver of the node's accelerator_type resource
                worker[f"accelerator_type:{r.accelerator_type}"] = 0.001
            fits.append(cap.bundles(worker) // r.num_workers)
    return max(1, min([*fits, len(trials)]))


# Set by `farm run`'s Ctrl-C handler. The KeyboardInterrupt it raises can land where Python or Ray
# ignores an exception (a finalizer, a callback from Ray's core): the grid then stops at Tune's next
# step instead of running to its end (seen once in a loaded test run).
INTERRUPTED = threading.Event()


class Progress(tune.Callback):
    """Tune's events to the grid's state and view (farm.progress), and to `farm run`'s handlers."""

    def __init__(self, grid, view, on_complete, on_error):
        self.grid, self.view, self.on_complete, self.on_error = grid, view, on_complete, on_error

    def __getstate__(self):
        # Tune pickles its callbacks into tuner.pkl, for Tuner.restore (the farm resumes from its store
        # instead); a terminal does not pickle ("Cannot pickle files that map to tty objects").
        return {}

    def on_step_begin(self, iteration, trials, **info):
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt

    def on_trial_start(self, iteration, trials, trial, **info):
        self.grid.started(trial.config["trial_id"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "stage" in result:  # a training loss, or a dev score of checkpoint selection (`select`)
            tid = trial.config["trial_id"]
            self.grid.step(tid, result["stage"], result["step"], result["max_steps"])
            values = " ".join(f"{k} {result[k]:.4g}" for k in result if k == "loss" or k.startswith("dev_"))
            self.view.step(tid, f"{result['stage']} step {result['step']}/{result['max_steps']} {values}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        tid = trial.config["trial_id"]
        result = trial.last_result or {}
        shown = {k: v for k, v in result.items() if isinstance(v, float) and not k.startswith(("time", "eval_seconds", "gen_tokens_per_s"))}
        self.grid.ended(tid, ok=True)
        self.view.ended(tid, "done " + " ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items()) if k != "loss"))
        self.on_complete(tid)

    def on_trial_error(self, iteration, trials, trial, **info):
        tid = trial.config["trial_id"]
        self.grid.ended(tid, ok=False)
        self.view.ended(tid, f"FAILED: {trial.error_file or 'see Ray logs'}")
        self.on_error(tid, trial)


def run_grid(trials, plans: dict, storage: str, experiment: str, max_failures: int, on_complete, on_error, concurrency: int | None = None, grid=None):
    """Run the trials under Tune; `grid` (farm.progress.Grid) is what the view shows, by default
    the trials' stages without estimates."""
    from ray.tune import FailureConfig, RunConfig

    grid = grid or Grid({t.id: [(s.name, s.key, None) for s in plans[t.id].stages] for t in trials})
    shown = view(grid, sys.stdout)

    payloads = {t.id: {"trial_id": t.id, "study": t.study, "plan": plans[t.id], "storage": storage} for t in trials}
    trainable = tune.with_resources(tune.with_parameters(run_trial, payloads=payloads), tune.PlacementGroupFactory(TRIAL_RESOURCES))
    tuner = tune.Tuner(
        trainable,
        param_space={"trial_id": tune.grid_search([t.id for t in trials])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency or max_concurrent(trials),
            trial_dirname_creator=lambda trial: trial.config["trial_id"],
        ),
        run_config=RunConfig(
            name=experiment,
            storage_path=join(storage, "tune"),  # a local path or a URI (s3://...)
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=[Progress(grid, shown, on_complete, on_error)],
            verbose=0,
        ),
    )
    try:
        return tuner.fit()
    finally:
        shown.close()
