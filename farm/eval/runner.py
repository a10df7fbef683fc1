"""Evaluate a trial's final artifact: load it (and the model its last stage started from,
the reference) from the store — never from a trainer's in-memory model — and run the
study's metrics on clean held-out records."""

from __future__ import annotations

import time

from farm.data.prepare import eval_records
from farm.data.records import convert
from farm.models import base_model, load_artifact
from farm.registry import metrics


def evaluate(study, model_path, reference_path, seed: int, scores: dict | None = None, refs: dict | None = None) -> dict:
    """`seed` is the one the first stage built the base model with, when that is the reference.
    Without a model path the base model itself is evaluated (a study or trial with no stages).
    `refs` ({stage name: artifact path}) resolves the eval fields that name a stage (the judge)."""
    start = time.time()
    model, tok = load_artifact(model_path) if model_path else base_model(study.model, seed)
    # The reference of a first stage is the base model, rebuilt exactly as the stage built it.
    ref = load_artifact(reference_path)[0] if reference_path else base_model(study.model, seed)[0]
    rows = eval_records(study, scores=scores)  # read once, then seen by each metric in the shape it needs
    # Metrics read a judge named by a stage from its artifact (the pairwise judge acts after the grid).
    spec = study.eval.model_copy(update={f: str((refs or {}).get(v, v)) for f, v in study.eval.refs().items() if "." not in f})
    out: dict = {}
    for name in study.eval.metrics:
        metric = metrics.get(name)
        out.update(metric.fn(model, ref, tok, convert(rows, metric.shape) if metric.shape else [], spec))
    out["eval_seconds"] = round(time.time() - start, 2)
    return out
