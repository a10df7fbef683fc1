"""Estimates for `farm plan`: GPU-hours per stage from model size, tokens and throughput, so that a
user sees what a study costs before `ray up`; and each stage's and eval's peak GPU memory (the
arithmetic in farm/memory.py, from the stage's fields here), which `farm run` checks before Ray
starts. Pure arithmetic: no hub access.

The cost model is deliberately coarse:

- Work is counted in tokens of three kinds. Trained tokens (forward and backward passes);
  forward-only tokens (a reference model, a reward or feedback model scoring answers, the prompt
  a generation reads); generated tokens (one decoding step each).
- `throughput` is training tokens/s per GPU with LoRA for a model of `params` parameters. Compute
  grows with parameters, so a model of P parameters runs params / P times as fast.
- Full fine-tuning costs 1.5x LoRA: per parameter and token a forward pass is ~2 FLOPs and the
  backward ~4, half of them the weight gradients that LoRA skips (~4 FLOPs against ~6). A
  forward-only pass is ~2 FLOPs: half the LoRA cost.
- Decoding is bound by memory bandwidth, not compute: generated tokens have their own figure,
  `gen_throughput`, at the same reference size.
- A row counts `max_length` tokens (rows are cut to it, most are shorter) and a generation
  `max_new_tokens` and its prompt `max_prompt_length`: upper bounds, except for a pretrain
  stage trained for epochs, which packs whole rows into blocks (a long row fills several).
- Rows: a bundled or local source is counted (held-out rows too); a hub source is its `sample`
  or `limit`, else the rows its dataset card gives (`Source.hub_rows`), less the held-out share.
- Eval and labelling (scorers over the data) are not estimated.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from farm import memory
from farm.config import BUILT_MODELS
from farm.data.prepare import is_heldout
from farm.data.sources import SourceSpec, load_source
from farm.memory import Arch, Memory, arch_from_config
from farm.models import FARM_BPE_VOCAB, TINY_GPT2, ModelSpec, precision
from farm.registry import sources
from farm.schema import TrainingStage
from farm.spec import input_stage


@dataclass(frozen=True)
class Rates:
    throughput: float = 3000.0  # training tokens/s per GPU with LoRA at `params` (a 7B model in bf16 on an A100)
    params: float = 7e9
    gen_throughput: float = 1500.0  # generated tokens/s per GPU at `params` (batched HF generate)


# Cost of a token of each kind of work, in units of a LoRA-trained token (see the module docstring).
COST = {"lora": 1.0, "full": 1.5, "forward": 0.5, "generate": 1.0}

# Hub names that carry no size.
KNOWN_SIZES = {
    "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.5e9, "distilgpt2": 82e6,
    "deberta-v3-base": 184e6, "deberta-v3-large": 435e6, "roberta-base": 125e6, "roberta-large": 355e6,
}  # fmt: skip
# A size in a name: "7b" of Llama-2-7b-chat-hf, "1.3b" of opt-1.3b, "125m"; not "8x7B" (a mixture
# of experts has fewer parameters than that) nor "7b1" (bloom-7b1).
SIZE = re.compile(r"(?<![\d.x])(\d+(?:\.\d+)?)([bm])(?![a-z0-9])", re.IGNORECASE)
VOCABS = {"farm-bpe": FARM_BPE_VOCAB, "gpt2": 50257}  # the bundled tokenizers of built models


def model_params(model: ModelSpec | str) -> float | None:
    """Parameters of a model: a built model from its config, a local folder from its config.json,
    a hub id from the size in its name or KNOWN_SIZES. None when unknown: never guessed."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec(base=model)
    if spec.base in BUILT_MODELS:
        return config_params({**TINY_GPT2, "vocab_size": VOCABS.get(spec.tokenizer), **spec.config})
    config = Path(spec.base).expanduser() / "config.json"
    if spec.base.startswith(("/", "./", "../", "~")) and config.is_file():
        return config_params(json.loads(config.read_text()))
    name = spec.base.rstrip("/").rsplit("/", 1)[-1].lower()
    m = SIZE.search(name)
    if m:
        return float(m.group(1)) * (1e9 if m.group(2).lower() == "b" else 1e6)
    return next((KNOWN_SIZES[k] for k in sorted(KNOWN_SIZES, key=len, reverse=True) if k in name), None)


def config_params(cfg: dict) -> float | None:
    """Parameters of a decoder from its HF config: per layer the attention (4 h^2, less for
    grouped key-value heads) and the MLP (2 or, gated, 3 matrices of h x ffn), plus embeddings,
    learned positions and an untied output head. Biases and norms are left out (< 1%)."""
    arch = arch_from_config(cfg)
    return arch.params if arch else None


def model_arch(model: ModelSpec | str) -> Arch | None:
    """The architecture of a model: a built model's config, a local folder's config.json, or a hub
    model of farm.memory.KNOWN_CONFIGS. None when unknown."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec(base=model)
    if spec.base in BUILT_MODELS:
        vocab = VOCABS.get(spec.tokenizer)
        return arch_from_config({"model_type": "gpt2", **TINY_GPT2, "vocab_size": vocab, **spec.config}) if vocab else None
    config = Path(spec.base).expanduser() / "config.json"
    if spec.base.startswith(("/", "./", "../", "~")):
        return arch_from_config(json.loads(config.read_text())) if config.is_file() else None
    return memory.known_arch(spec.base)


@functools.lru_cache(maxsize=None)
def counted_rows(source_json: str, holdout: float, split_seed: int) -> tuple[int, int]:
    """(training rows, held-out rows) of a bundled or local source, counted. Cached: a grid
    reads the same source in every trial."""
    records = load_source(SourceSpec.model_validate_json(source_json))
    held = sum(is_heldout(r.id, holdout, split_seed) for r in records)
    return len(records) - held, held


def data_rows(data, built: dict) -> float | None:
    """Rows a stage reads from `data`: its training rows, or its held-out ones (`rows: heldout`);
    a mix's `size`; a ranking subset's prompts. `built` holds the rows of the stages before it
    ({name: rows}) for `name: stage` sources. None when a source's size is unknown."""
    heldout = data.rows == "heldout"
    total = data.size if data.size and not heldout else 0.0  # a weighted mix: `size` training rows in all
    for s in [] if total else data.sources:
        if s.name == "stage":
            n = 0 if heldout else built.get(s.stage)  # built records are all training rows
        elif s.name == "file" or s.origin == "bundled":
            n = counted_rows(s.model_dump_json(), data.holdout, data.split_seed)[heldout]
        else:
            sizes = [x for x in (s.limit, s.sample, sources.get(s.name).hub_rows.get((s.subset, s.split))) if x]
            n = min(sizes) * (data.holdout if heldout else 1 - data.holdout) if sizes else None
        if n is None:
            return None
        total += n
    for t in data.transforms:
        if t.name == "ranking_subset":
            total = t.num_prompts
    return total


def stage_work(s, study, rows: float | None, base: float | None) -> list[tuple[str, float, float | None]] | None:
    """The work of stage `s` of `study` as (kind of work, tokens, parameters of the model doing
    it); None when it cannot be told (rows unknown, or a kind of stage this does not know)."""

    def params(ref: str) -> float | None:  # a stage of the study (grown from the base model) or a hub id / path
        return base if ref in study.stages else model_params(ref)

    if s.trains and s.max_steps > 0:  # rows seen, whatever the data
        seqs = s.max_steps * s.batch_size * s.grad_accum * s.resources.num_workers
    elif rows is None:
        return None
    else:
        seqs = rows * (s.epochs if isinstance(s, TrainingStage) else 1)
    train = "lora" if isinstance(s, TrainingStage) and s.lora else "full"
    return s.work(seqs, train, base, params, study)


def gpu_hours(work, rates: Rates) -> float | None:
    """GPU-hours of (kind of work, tokens, parameters) items; None if a model's size is unknown."""
    seconds = 0.0
    for kind, tokens, params in work:
        if params is None:
            return None
        rate = rates.gen_throughput if kind == "generate" else rates.throughput
        seconds += tokens * COST[kind] * (params / rates.params) / rate
    return seconds / 3600


@dataclass
class Estimate:
    name: str
    kind: str
    key: str
    users: tuple[str, ...]  # ids of the trials that share it (it runs once for all of them)
    rows: float | None = None
    tokens: float | None = None  # trained + generated + read by forward-only passes
    gpus: float | None = None  # 0: it runs on CPU; None: not estimated
    hours: float | None = None  # GPU-hours; None: CPU, unknown or not estimated (see note)
    seconds: float | None = None  # at the nominal rates, on a GPU or not: the live view's unit of work (farm.progress)
    note: str = ""


def estimate_study(trials, plans, rates: Rates = Rates()) -> tuple[list[Estimate], dict[str, float | None]]:
    """An Estimate of every distinct stage of the study's plans (labelling included, not
    estimated; eval left out), in plan order; and the parameters of every model the work runs
    ({name: parameters, None if unknown})."""
    out: dict[str, Estimate] = {}
    models: dict[str, float | None] = {}
    for t in trials:
        study = t.study
        base = models[study.model.base] = model_params(study.model)
        built: dict[str, float | None] = {}
        for p in plans[t.id].labels:
            out.setdefault(p.key, Estimate(p.name, p.kind, p.key, p.users, note="labelling: not estimated"))
        for p in plans[t.id].stages:
            s = study.stages[p.name]
            rows = built[p.name] = data_rows(s.data or study.data, built)
            if p.key in out:
                continue
            for ref in s.refs().values():
                if ref not in study.stages:
                    models[ref] = model_params(ref)
            work = stage_work(s, study, rows, base)
            gpus = s.resources.gpus_per_worker * (s.resources.num_workers if s.trains else 1)  # a builder runs as one task
            e = out[p.key] = Estimate(p.name, p.kind, p.key, p.users, rows=rows, gpus=gpus)
            if work is None:
                e.note = "rows unknown: a hub source without a sample, limit or hub_rows figure" if rows is None else f"kind {s.kind}: not estimated"
                continue
            e.tokens = sum(tokens for _, tokens, _ in work)
            e.note = s.work_note()
            hours = gpu_hours(work, rates)
            e.seconds = hours * 3600 if hours is not None else None
            if gpus:
                e.hours = hours
                e.note = e.note if e.hours is not None else "unknown size"
    return list(out.values()), models


# ---------------------------------------------------------------- peak GPU memory (farm/memory.py)

SCORING = {"preference_accuracy", "perplexity"}  # eval metrics that score answers in batches of eval.batch_size x max_length
GENERATING = {"generation", "harmlessness", "reward_score"}  # ... that generate as eval.generation says (misalignment: eval.conditional)


def _model(ref: str | None, study) -> Arch | None:
    """The architecture of a model a field names: a stage of the study (grown from the study's
    model), the study's model itself (None), or a hub id / path."""
    return model_arch(study.model if ref is None or ref in study.stages else ref)


def stage_memory(name: str, study) -> Memory | None:
    """Peak GPU memory per GPU of stage `name` of `study`, whether or not it asks for a GPU (the
    caller decides what a CPU stage shows); None when a model's architecture is unknown. Each kind
    says its own (`memory`), given the architectures of the models it reads."""
    s = study.stages[name]
    gpu = s.resources.accelerator_type
    where = dict(gpu=gpu or memory.DEFAULT_GPU, assumed=gpu is None, share=min(1.0, s.resources.gpus_per_worker) or 1.0)
    return s.memory(study, _model(input_stage(study.stages, name), study), lambda ref: _model(ref, study), where)


def eval_memory(study) -> Memory | None:
    """Peak GPU memory of a trial's evaluation: the evaluated model and its reference (one model
    when the evaluated stage is LoRA, whose reference is its adapter disabled, or when the base
    model is evaluated), the judge, and the largest of scoring, safety windows and generation.
    lm-eval's benchmarks are not estimated."""
    e = study.eval
    arch = model_arch(study.model)
    last = study.evaluated()
    judge = _model(e.reward_model, study) if e.reward_model else None
    if arch is None or (e.reward_model and judge is None):
        return None
    held = {"model": arch.params * memory.READ_BYTES}
    if last is not None and not study.stages[last].lora:
        held["reference"] = arch.params * memory.READ_BYTES
    if judge is not None:
        held["judge"] = judge.params * memory.READ_BYTES
    scored, windows = e.batch_size * e.max_length, e.safety.batch_size * e.safety.max_length
    asked = set(e.metrics)
    phases = {
        "score": {"forward": memory.forward_pass(arch, scored, scored)} if asked & SCORING else {},
        "safety": {"forward": memory.forward_pass(arch, windows, windows)} if "safety_score" in asked else {},
        "generate": memory.generating_as(arch, e.generation, e.max_prompt_length) if asked & GENERATING else {},
        "conditional": memory.generating_as(arch, e.conditional.generation, e.max_prompt_length) if "misalignment" in asked else {},
    }
    phases = {k: {part: v for part, v in p.items() if part != "model"} for k, p in phases.items() if p}  # the model is held
    gpu = e.resources.accelerator_type
    return Memory(held, phases, gpu=gpu or memory.DEFAULT_GPU, assumed=gpu is None, share=min(1.0, e.resources.num_gpus) or 1.0)


def artifact_size(name: str, study) -> tuple[float | None, str]:
    """(bytes, what) of a stage's artifact: a LoRA stage's adapter (fp32), a full stage's weights
    in the dtype it trains them in; a stage that builds records: (None, "records")."""
    s = study.stages[name]
    if s.produces == "records":
        return None, "records"
    arch = _model(input_stage(study.stages, name), study)
    if arch is None:
        return None, "unknown size"
    if s.lora:
        n = memory.lora_params(arch, s.lora.r, s.lora.target_modules)
        return (n * 4 if n is not None else None), "LoRA adapter"
    dtype = precision(s, on_gpu=s.resources.gpus_per_worker > 0)[0]
    return arch.params * memory.DTYPE_BYTES[dtype], f"{dtype} weights".replace("float32", "fp32").replace("bfloat16", "bf16")


@dataclass
class MemoryRow:
    name: str  # a stage's name, or "eval"
    kind: str
    key: str
    users: tuple[str, ...]
    memory: Memory | None  # None: not estimated (on a CPU, or a model of unknown architecture)
    gpus: float  # per worker (a stage) or per task (eval); 0: it runs on CPUs
    artifact: float | None = None
    artifact_kind: str = ""


def memory_study(trials, plans) -> list[MemoryRow]:
    """A MemoryRow for every distinct stage and eval of the study's plans, in plan order."""
    out: dict[str, MemoryRow] = {}
    for t in trials:
        study, plan = t.study, plans[t.id]
        for p in plan.stages:
            if p.key not in out:
                s = study.stages[p.name]
                gpus = s.resources.gpus_per_worker
                size, what = artifact_size(p.name, study)
                out[p.key] = MemoryRow(p.name, p.kind, p.key, p.users, stage_memory(p.name, study) if gpus else None, gpus, size, what)
        if plan.eval_key not in out:
            gpus = study.eval.resources.num_gpus
            users = tuple(u.id for u in trials if plans[u.id].eval_key == plan.eval_key)
            out[plan.eval_key] = MemoryRow("eval", "eval", plan.eval_key, users, eval_memory(study) if gpus else None, gpus)
    return list(out.values())


def memory_fixes(name: str, study, m: Memory) -> list[str]:
    """What would bring stage `name` (or "eval") of `study` under its GPU's memory, in the study's words."""
    need = m.total
    bigger = memory.smallest_gpu_for(need)
    gpu = f"resources.accelerator_type: {bigger} ({memory.GPU_MEMORY_GIB[bigger]:g} GiB)" if bigger else None
    if name == "eval":
        e = study.eval
        return [f"batch_size below {e.batch_size}", f"generation.batch_size below {e.generation.batch_size}", *([gpu] if gpu else [])]
    s = study.stages[name]
    if not s.trains:
        g = s.generation
        return [f"generation.batch_size below {g.batch_size}", *([f"batch_size below {s.batch_size} (scoring)"] if hasattr(s, "batch_size") else []),
                *([gpu] if gpu else [])]  # fmt: skip
    fixes = []
    if not s.lora:
        fixes.append("lora: {r: 8} (trains adapters only: no gradients or optimizer state for the base)")
    if not m.checkpointing:
        fixes.append("gradient_checkpointing: true")
    if s.batch_size > 1:
        smaller = next(d for d in range(s.batch_size // 2, 0, -1) if s.batch_size % d == 0)  # the effective batch stays whole
        fixes.append(f"batch_size: {smaller} with grad_accum: {s.grad_accum * s.batch_size // smaller} (the same effective batch)")
    if not s.lora and s.zero()[0] < 3:
        workers = s.resources.num_workers
        fixes.append(
            f"deepspeed: zero3 (or zero2) with more resources.num_workers (now {workers}): shards the optimizer state, gradients and weights"
        )
    elif s.deepspeed and s.resources.num_workers < 8:
        fixes.append(f"more resources.num_workers (now {s.resources.num_workers}) to shard over")
    if gpu:
        fixes.append(gpu)
    return fixes
