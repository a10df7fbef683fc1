"""Planning: every stage's key, and which trials share it.

A stage's key hashes its resolved config, its data, the keys of what it starts from and reads,
and its kind's version, so two trials that would run the same stage share one artifact, and a
rerun skips finished work (the artifacts themselves: `farm.store`).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

from farm.config import content
from farm.eval.runner import VERSION as EVAL_VERSION
from farm.files import digest
from farm.label.stage import VERSION as LABEL_VERSION
from farm.schema import TrainingStage
from farm.spec import input_stage


@dataclass(frozen=True)
class PlannedStage:
    name: str
    kind: str
    key: str
    input_key: str | None  # None: the stage starts from the study's base model
    input_kind: str | None
    seed: int
    users: tuple[str, ...] = ()  # ids of the trials of the study that need this artifact
    refs: tuple[tuple[str, str, str], ...] = ()  # (name, kind, key) of the other stages it reads
    label: str | None = None  # the labelling run whose scores its data reads
    doc: dict = field(default_factory=dict, compare=False, repr=False)  # what `key` hashes (farm plan --why)


@dataclass(frozen=True)
class TrialPlan:
    stages: tuple[PlannedStage, ...]
    eval_key: str
    labels: tuple[PlannedStage, ...] = ()  # labelling runs the stages' and the eval's data need first
    evaluated: str | None = None  # the stage whose model is evaluated; None: the base model
    eval_refs: tuple[tuple[str, str, str], ...] = ()  # stages the eval reads (a judge reward model)
    eval_label: str | None = None  # the labelling run whose scores the eval reads
    eval_doc: dict = field(default_factory=dict, compare=False, repr=False)  # what `eval_key` hashes

    def stage(self, name: str | None) -> PlannedStage | None:
        return next((s for s in self.stages if s.name == name), None)


def label_doc(data) -> dict:
    """What the labelling stage's key hashes: which rows (the sources, local files by content) and
    which scorers; not how the pipeline is sized (batch size, actors), which changes no score."""
    files = {f: d for f, d in content(data).items() if f.startswith(("sources.", "labels."))}
    return {
        "kind": "label",
        "version": LABEL_VERSION,
        "sources": [s.model_dump(mode="json") for s in data.sources],
        "labels": [lab.model_dump(mode="json", include={"scorer", "model", "prefix"}) for lab in data.labels],
        **({"files": files} if files else {}),
    }


def plan_trial(study) -> TrialPlan:
    """Each stage keyed by its config, its data, its seed and the keys of every stage it reads:
    the model it starts from and the stages its fields name (a judge, a generator, built records).
    Every local file or folder enters by content (`content`), hashed here, on the driver: a worker
    takes the keys from the plan and hashes nothing."""
    content(study)  # any local input that cannot be read: an error naming its field in the study file
    model_files = content(study.model, "model.")
    base = {"model": study.model.model_dump(mode="json"), **({"files": model_files} if model_files else {})}
    planned: dict[str, PlannedStage] = {}
    labels: dict[str, dict] = {}  # {key: doc} of the labelling runs the trial's data needs
    for name, stage in study.stages.items():
        seed = study.seed if stage.seed is None else stage.seed
        start = planned.get(input_stage(study.stages, name))
        refs = _refs(stage.refs(), planned)
        data = stage.data or study.data
        doc = {
            "kind": stage.kind,
            "version": stage.version,
            "config": stage.model_dump(mode="json", exclude={"data", "seed", "fault", "input", "gradient_checkpointing", "checkpoint_every"}),
            "data": data_key(data),
            "seed": seed,
            "input": start.key if start else base,
            "refs": [key for _, _, key in refs],
            **stage.key_extra(),
        }
        if isinstance(stage, TrainingStage) and stage.select:  # it scores its checkpoints on the study data's dev rows
            files = {f: d for f, d in content(study.data, "data.").items() if f.startswith("data.sources.")}
            doc["dev_rows"] = {**heldout_key(study.data), **({"files": files} if files else {})}
        label = _label(data, labels)
        planned[name] = PlannedStage(name, stage.kind, digest(doc), start and start.key, start and start.kind, seed, refs=refs, label=label, doc=doc)
    evaluated = planned.get(study.evaluated())
    reference = planned.get(input_stage(study.stages, evaluated.name)) if evaluated else None
    eval_refs = _refs(study.eval.refs(), planned)
    # The refusal phrases are read by the harmlessness metric alone: an eval without it keeps its key.
    unread = set() if "harmlessness" in study.eval.metrics else {"refusals"}
    files = {
        **content(study.eval, "eval."),
        **{f: d for f, d in content(study.data, "data.").items() if f.startswith(("data.sources.", "data.labels."))},
    }
    eval_doc = {
        "kind": "eval",
        "version": EVAL_VERSION,
        "eval": study.eval.model_dump(mode="json", exclude={"resources"} | unread),  # where it runs changes nothing
        "data": heldout_key(study.data),
        # No stages: the base model itself, built (tiny-gpt2) with the trial seed.
        "model": evaluated.key if evaluated else {"base": base, "seed": study.seed},
        "reference": reference.key if reference else base,
        "refs": [key for _, _, key in eval_refs],
        **({"files": files} if files else {}),
    }
    eval_label = _label(study.data, labels)
    runs = tuple(PlannedStage("label", "label", key, None, None, 0, doc=doc) for key, doc in labels.items())
    return TrialPlan(tuple(planned.values()), digest(eval_doc), runs, evaluated and evaluated.name, eval_refs, eval_label, eval_doc)


def _label(data, labels: dict) -> str | None:
    """The key of the labelling run `data` needs (None: it has no labels), added to `labels`."""
    if not data.labels:
        return None
    doc = label_doc(data)
    labels.setdefault(digest(doc), doc)
    return digest(doc)


def _refs(fields: dict[str, str], planned: dict) -> tuple:
    """(name, kind, key) of the stages among `fields`' values (the others name hub models)."""
    names = dict.fromkeys(v for v in fields.values() if v in planned)
    return tuple((n, planned[n].kind, planned[n].key) for n in names)


def data_key(data) -> dict:
    """The data spec as it affects the training rows: a transform at rate 0 changes nothing, so it
    is left out (each kept transform keeps its position, which seeds its random draws); local files
    by content. Which held-out rows are dev rows changes no training row: `dev` reads as 0, as
    before dev rows existed, so giving a study dev rows retrains nothing (a stage that scores the
    dev rows keys them apart, `heldout_key`)."""
    doc = {**data.model_dump(mode="json"), "dev": 0.0}
    doc["transforms"] = [(i, t) for i, t in enumerate(doc["transforms"]) if t.get("rate", 1) != 0]
    kept = {f"transforms.{i}." for i, _ in doc["transforms"]}
    files = {f: d for f, d in content(data).items() if not f.startswith("transforms.") or f.startswith(tuple(kept))}
    if files:
        doc["files"] = files
    return doc


def heldout_key(data) -> dict:
    """The data spec as it decides the held-out rows and their dev share; transforms perturb
    training rows only."""
    return data.model_dump(
        mode="json", include={"sources", "holdout", "split_seed"} | ({"labels"} if data.labels else set()) | ({"dev"} if data.dev else set())
    )


def plan_study(trials) -> dict[str, TrialPlan]:
    """Every trial's plan, each stage knowing which trials share it."""
    plans = {t.id: plan_trial(t.study) for t in trials}
    users = defaultdict(list)
    for tid, p in plans.items():
        for s in (*p.labels, *p.stages):
            users[s.key].append(tid)

    def shared(stages):
        return tuple(dataclasses.replace(s, users=tuple(users[s.key])) for s in stages)

    return {tid: dataclasses.replace(p, stages=shared(p.stages), labels=shared(p.labels)) for tid, p in plans.items()}
