"""Evaluate a trial's final artifact: load it (and the model its last stage started from,
the reference) from the store — never from a trainer's in-memory model — on the device Ray gave
the eval, and run the study's metrics on clean held-out records."""

from __future__ import annotations

import json
import time
from pathlib import Path

from farm.data.prepare import eval_records
from farm.data.records import convert
from farm.eval.metrics import FILES, ITEMS
from farm.models import BASE_FILE, GENERATION, base_model, device, fetch_bases, inference_dtype, load_artifact
from farm.registry import metrics

# Bump when this code changes what an evaluation makes: its old artifacts stop matching (farm.plan).
VERSION = 3


class AdapterDisabled:
    """A LoRA model read with its adapter off: the base it was trained from, without a second
    copy of a 7B base in memory. Metrics call it like a model."""

    def __init__(self, peft_model):
        self.peft = peft_model

    def __call__(self, *args, **kwargs):
        with self.peft.disable_adapter():
            return self.peft(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.peft.disable_adapter():
            return self.peft.generate(*args, **kwargs)

    def __getattr__(self, name):  # device, config, eval, parameters, ...
        return getattr(self.peft, name)


def load_models(study, model_path, reference_path, seed: int, dtype, resolve=None):
    """(model, reference, tokenizer). No model path: the base model, which is its own reference.
    A LoRA artifact whose adapter applies to the reference itself: one copy of the base serves
    both (the reference is the adapter disabled). Otherwise two models are loaded."""
    if model_path is None:
        model, tok = base_model(study.model, seed, dtype)
        return model, model, tok
    if _adapter_on(Path(model_path), reference_path):
        model, tok = load_artifact(model_path, dtype, resolve, merge=False)
        return model, AdapterDisabled(model), tok
    model, tok = load_artifact(model_path, dtype, resolve)
    # The reference of a first stage is the base model, rebuilt exactly as the stage built it.
    ref = load_artifact(reference_path, dtype, resolve)[0] if reference_path else base_model(study.model, seed, dtype)[0]
    return model, ref, tok


def _adapter_on(path: Path, reference_path) -> bool:
    if not (path / BASE_FILE).is_file():
        return False
    base = json.loads((path / BASE_FILE).read_text())
    if "stage" in base:
        return reference_path is not None and Path(reference_path).name == "-".join(base["stage"])
    return reference_path is None  # both are the study's base model, built with the same seed


def evaluate(study, model_path, reference_path, seed: int, scores: dict | None = None, refs: dict | None = None, resolve=None, scratch=None) -> dict:
    """`seed` is the one the first stage built the base model with, when that is the reference.
    Without a model path the base model itself is evaluated (a study or trial with no stages).
    `refs` ({stage name: artifact path}) resolves the eval fields that name a stage (the judge);
    `resolve(kind, key)` is the store's path of an artifact a LoRA adapter applies to. `scratch`, a
    folder that outlives this process (the store's, under the eval's key), keeps finished answers
    and lm-eval's request cache, so a retried evaluation does not start from zero. The metrics come
    back with their per-item values under ITEMS."""
    start = time.time()
    dev = device()
    model, ref, tok = load_models(study, model_path, reference_path, seed, inference_dtype(dev), resolve)
    model.to(dev)
    ref.to(dev)
    rows = eval_records(study, scores=scores)  # read once, then seen by each metric in the shape it needs
    # Metrics read a judge named by a stage from its artifact (the pairwise judge acts after the grid).
    spec = study.eval.model_copy(update={f: str((refs or {}).get(v, v)) for f, v in study.eval.refs().items() if "." not in f})
    for path in (refs or {}).values():
        fetch_bases(path, resolve)
    GENERATION.start(scratch)
    out: dict = {}
    items: dict = {}
    files: dict = {}
    try:
        for name in study.eval.metrics:
            metric = metrics.get(name)
            values = metric.fn(model, ref, tok, convert(rows, metric.shape) if metric.shape else [], spec)
            items.update(values.pop(ITEMS, {}))
            files.update(values.pop(FILES, {}))
            out.update(values)
        if items:  # per-item values of every metric that is a mean over items: a file beside the metrics
            out[ITEMS] = items
        if files:
            out[FILES] = files
        if GENERATION.tokens:
            out["gen_tokens_per_s"] = round(GENERATION.tokens / max(GENERATION.seconds, 1e-9), 1)
    finally:
        GENERATION.start(None)  # answers kept for this model only
    out["eval_device"] = str(dev)
    out["eval_seconds"] = round(time.time() - start, 2)
    return out
