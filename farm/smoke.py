"""`--smoke`: a profile rehearsed small. It keeps the profile's stage graph, sources, metrics,
judges and settings, and shrinks only what sets the cost: rows, steps, lengths, batch sizes, pools,
the sizes of models the study builds from a config, and the grid (each value of each axis is run
once, values the shrink makes equal counting as one; seeds only change numbers, so the first is kept). GPU requests become CPU ones, so that a
laptop or CI can run it. Results go under `<study>-smoke`.

Run against the hub, a smoke run finds in minutes what a paper run would find after hours: a
repository that cannot be read, a layout the loader does not expect, a metric that fails on real
rows. Models named by hub id keep their real weights (only an offline mirror of tiny models, as the
tests use, makes them small)."""

from __future__ import annotations

import json

from pydantic import BaseModel

from farm.plan import plan_trial
from farm.spec import Study

ROWS = 200  # per source
STEPS = 2  # per training stage
HOLDOUT = 0.1  # a held-out share of 1-2% of ROWS rows is a handful, too few for an eval set
CAPS = {  # field -> largest value kept, wherever the field appears
    "batch_size": 4, "grad_accum": 1, "max_length": 64, "max_prompt_length": 32, "max_new_tokens": 8,
    "min_length": 4, "num_prompts": 8, "bootstrap": 20, "actors": 2, "num_workers": 2, "size": ROWS,
    "rounds": 1, "num_generations": 4,
}  # fmt: skip
# A model the study builds from a config (`model.config`): its size fields.
CONFIG_CAPS = {"n_layer": 2, "num_hidden_layers": 2, "n_embd": 64, "hidden_size": 64, "n_head": 2, "num_attention_heads": 2, "intermediate_size": 128}


def shrink(trials: list) -> list:
    """The trials a smoke run of this profile runs: a covering subset of the grid (every value of
    every axis at least once), each study shrunk, and of trials that became the same run (same
    eval key) the first."""
    small = []
    for t in first_seed(trials):
        data = t.study.model_dump()
        _shrink(t.study, data)
        data["name"] = f"{data['name']}-smoke"  # its own results folder: never mixed with the real run's
        small.append(t.model_copy(update={"study": Study.model_validate(data)}))
    out, seen = [], set()
    # Values of an axis that the shrink made equal (Study D's prompt budgets, all capped) count as one
    # value. An axis that another refines (`data.transforms.0` under `data.transforms.0.rate`) keeps its
    # labels: its value in the study holds the other axis's too.
    axes = list(trials[0].axes) if trials else []
    refined = {a for a in axes if any(b.startswith(a + ".") for b in axes)}

    def cell(t, axis):
        return str(t.axes[axis]) if axis in refined else json.dumps(_get(t.study.model_dump(mode="json"), axis), sort_keys=True)

    for t in cover(small, cell):
        key = plan_trial(t.study).eval_key  # trials that differed only in what was shrunk are one run now
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def first_seed(trials: list) -> list:
    return [t for t in trials if "seed" not in t.axes or t.axes["seed"] == trials[0].axes["seed"]]


def cover(trials: list, cell=lambda t, axis: str(t.axes[axis])) -> list:
    """The i-th trial takes the (i mod n)-th value of each axis but the seed (the first seed only):
    max(axis sizes) trials hold every value of every axis. `cell(trial, axis)` is the value compared."""
    trials = first_seed(trials)
    if not trials or not trials[0].axes:
        return trials[:1]
    axes = list(trials[0].axes)
    values = {a: list(dict.fromkeys(cell(t, a) for t in trials)) for a in axes}
    by_cells = {tuple(cell(t, a) for a in axes): t for t in trials}
    n = max(len(v) for v in values.values())
    picked = [by_cells.get(tuple(values[a][i % len(values[a])] for a in axes)) for i in range(n)]
    return list({t.id: t for t in picked if t is not None}.values())


def _get(doc, path: str):
    """The value at a grid axis's dotted path in a study's dump (None where the path is absent)."""
    for key in path.split("."):
        if isinstance(doc, list) and key.isdigit() and int(key) < len(doc):
            doc = doc[int(key)]
        elif isinstance(doc, dict):
            doc = doc.get(key)
        else:
            return None
    return doc


def _shrink(model: BaseModel, data: dict) -> None:
    """Shrink `data` (the dump of `model`) in place, field by field, recursing into sub-models."""
    kind = type(model).__name__
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _shrink(value, data[name])
        elif isinstance(value, (list, tuple)):
            for v, d in zip(value, data[name]):
                if isinstance(v, BaseModel):
                    _shrink(v, d)
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            for k, v in value.items():
                _shrink(v, data[name][k])
        elif name in CAPS and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            data[name] = min(value, CAPS[name])
    if kind == "SourceSpec":
        if data.get("sample"):
            data["sample"] = min(data["sample"], ROWS)
        else:
            data["limit"] = min(data.get("limit") or ROWS, ROWS)
    if kind == "DataSpec" and 0 < data["holdout"]:
        # The eval keeps a HOLDOUT share of the rows when dev rows take part of the held-out ones.
        dev = data.get("dev", 0.0)
        data["holdout"] = max(data["holdout"], HOLDOUT if dev >= 1 else min(0.5, HOLDOUT / (1 - dev)))
    if "max_steps" in data and "epochs" in data:  # a training stage
        data["max_steps"] = STEPS
    if kind in ("Resources", "EvalResources", "LabelSpec"):  # CPU only, one CPU each
        for gpus in ("gpus_per_worker", "num_gpus", "gpus_per_actor"):
            if gpus in data:
                data[gpus] = 0
        for cpus in ("cpus_per_worker", "num_cpus", "cpus_per_actor"):
            if cpus in data:
                data[cpus] = 1
        data.pop("accelerator_type", None)
    if kind in ("BenchmarkSpec", "SafetySpec"):
        data["limit"] = min(data.get("limit") or 4, 4)
    if kind == "ModelSpec" and data.get("config"):
        data["config"] = {k: min(v, CONFIG_CAPS[k]) if k in CONFIG_CAPS else v for k, v in data["config"].items()}
