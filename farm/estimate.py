"""Cost estimates for `farm plan`: GPU-hours per stage from model size, tokens and throughput,
so that a user sees what a study costs before `ray up`. Pure arithmetic: no hub access.

The model is deliberately coarse:

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

from farm.data.prepare import is_heldout
from farm.data.sources import load_source
from farm.models import FARM_BPE_VOCAB, TINY_GPT2
from farm.registry import sources
from farm.spec import BUILT_MODELS, ModelSpec, SourceSpec


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
GATED = ("llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3")  # MLPs of three matrices


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
    h = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    vocab = cfg.get("vocab_size")
    if not (h and layers and vocab):
        return None
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    kv = h * (cfg.get("num_key_value_heads") or heads) / heads if heads else h
    ffn = cfg.get("intermediate_size") or cfg.get("ffn_dim") or cfg.get("n_inner") or 4 * h
    mlp = 3 if cfg.get("model_type") in GATED else 2
    embeddings = vocab * h * (1 if cfg.get("tie_word_embeddings", True) else 2) + (cfg.get("n_positions") or 0) * h
    return layers * (2 * h * h + 2 * h * kv + mlp * h * ffn) + embeddings


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
        seqs = rows * getattr(s, "epochs", 1)
    train = "lora" if getattr(s, "lora", None) else "full"
    if s.kind in ("pretrain", "sft"):
        return [(train, seqs * s.max_length, base)]
    if s.kind == "reward":  # chosen and rejected
        return [(train, seqs * 2 * s.max_length, base)]
    if s.kind == "dpo":  # chosen and rejected, by the policy and by the reference model
        return [(train, seqs * 2 * s.max_length, base), ("forward", seqs * 2 * s.max_length, base)]
    if s.kind == "pro":  # every candidate of a ranking: the subset's length, else all the rank stage built
        subset = next((t for t in (s.data or study.data).transforms if t.name == "ranking_subset"), None)
        builders = [study.stages[x.stage] for x in (s.data or study.data).sources if x.name == "stage"]
        k = subset.ranking_length if subset else max((2 + b.samples for b in builders if b.kind == "rank"), default=None)
        return [(train, seqs * k * s.max_length, base)] if k else None
    if s.kind == "rl":  # completions: generated, read by the reward model and the reference, trained on
        completions = seqs if s.max_steps > 0 else seqs * s.num_generations
        p, n = s.max_prompt_length, s.max_new_tokens
        work = [("generate", completions * n, base), ("forward", completions * p, base), (train, completions * (p + n), base),
                ("forward", completions * (p + n), params(s.reward_model))]  # fmt: skip
        return work + ([("forward", completions * (p + n), base)] if s.beta > 0 else [])
    g = getattr(s, "generation", None)
    if s.kind == "rank":  # `samples` answers a prompt, then every candidate scored
        answers = seqs * s.samples
        return [("generate", answers * g.max_new_tokens, params(s.generator)), ("forward", answers * s.max_prompt_length, params(s.generator)),
                ("forward", seqs * (2 + s.samples) * s.max_length, params(s.reward_model))]  # fmt: skip
    if s.kind == "critique_revision":  # the first answer, then a critique and a revision a round
        asks = seqs * (1 + 2 * s.rounds)
        return [("generate", asks * g.max_new_tokens, base), ("forward", asks * s.max_prompt_length, base)]
    if s.kind == "ai_feedback":  # two answers a prompt, then the feedback model reads both options
        answers = seqs * 2
        return [("generate", answers * g.max_new_tokens, base), ("forward", answers * s.max_prompt_length, base),
                ("forward", answers * s.max_length, params(s.feedback_model))]  # fmt: skip
    return None


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
            if s.kind == "pretrain" and s.max_steps <= 0:  # packed into blocks: a long row fills several
                e.note = "packs whole rows: more tokens if rows are longer than max_length"
            if gpus:
                e.hours = gpu_hours(work, rates)
                e.note = e.note if e.hours is not None else "unknown size"
    return list(out.values()), models
